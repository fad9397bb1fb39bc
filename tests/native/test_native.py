"""Build qsnap/csrc with the native driver under ASan/UBSan and run it."""
import os
import pathlib
import shutil
import subprocess

import pytest

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "qsnap" / "csrc"


def test_csrc_under_asan_ubsan(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    sources = sorted(str(p) for p in CSRC.glob("*.c")
                     if p.stem in ("zero", "crc32c", "sink", "xbzrle", "ramparse"))
    exe = tmp_path / "csrc_driver"
    cmd = [gcc, "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-O1", "-g",
           "-std=gnu11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}",
           str(HERE / "driver.c"), *sources, "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    r = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "native csrc tests passed" in r.stdout
