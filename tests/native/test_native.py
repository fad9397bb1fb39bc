"""Build qsnap/csrc with the native driver under ASan/UBSan and TSan and run it."""
import os
import pathlib
import shutil
import subprocess

import pytest

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "qsnap" / "csrc"


def _build(tmp_path, sanitize):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    sources = sorted(str(p) for p in CSRC.glob("*.c")
                     if p.stem in ("zero", "crc32c", "sink", "xbzrle", "ramparse", "aio", "emit"))
    exe = tmp_path / "csrc_driver"
    cmd = [gcc, *sanitize, "-O1", "-g", "-std=gnu11", "-D_GNU_SOURCE", "-pthread",
           "-Wall", "-Wextra", "-Werror",
           "-DQS_SINK_CACHE_CHUNKS=3",   # few page-state chunks in memory: the spill file works
           f"-I{CSRC}", str(HERE / "driver.c"), *sources,
           "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


def _run(exe, env):
    # TMPDIR: the O_DIRECT stress test's file goes next to the executable
    env = dict(os.environ, TMPDIR=str(exe.parent), **env)
    r = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "native csrc tests passed" in r.stdout


def test_csrc_under_asan_ubsan(tmp_path):
    exe = _build(tmp_path, ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
    _run(exe, {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
               "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"})


def _tsan_works(tmp_path):
    """gcc links ThreadSanitizer and its runtime starts on this kernel."""
    src = tmp_path / "probe.c"
    src.write_text("int main(void) { return 0; }\n")
    exe = tmp_path / "probe"
    if subprocess.run([shutil.which("gcc") or "gcc", "-fsanitize=thread", str(src), "-o", str(exe)],
                      capture_output=True).returncode:
        return False
    return subprocess.run([str(exe)], capture_output=True).returncode == 0


def test_csrc_under_tsan(tmp_path):
    """The sink's writer threads (two with O_DIRECT) against each other and
    the caller, the read-ahead ring's workers against its consumer, the
    emitter against a pipe's reader thread: no data race."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    if not _tsan_works(tmp_path):
        pytest.skip("ThreadSanitizer does not build or start here")
    exe = _build(tmp_path, ["-fsanitize=thread"])
    _run(exe, {"TSAN_OPTIONS": "halt_on_error=1:exitcode=66"})
