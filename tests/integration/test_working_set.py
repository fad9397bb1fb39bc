"""Working sets with real QEMU 7.2 and a live Linux guest: record, replay, damage, interruption."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qsnaptest.qemu import LinuxGuest
from qsnaptest.tools import (assert_same_vm_ram as same_ram, qsnap_cmd, qsnap_env, save_with_tee, slow_pipe,
                             wait_postcopy)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _pythonpath(monkeypatch):
    """QEMU's /bin/sh child must find this checkout's qsnap."""
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + old if old else ""))


def restore(dst, img, *opts, stats=None, err=None, throttle=None):
    """Postcopy restore of ``img`` into ``dst`` with extra ``qsnap load`` options."""
    dst.set_capabilities(postcopy_ram=True, events=True)
    extra = ["--stats", str(stats)] if stats else []
    cmd = qsnap_cmd("load", "--postcopy=0", *opts, *extra, str(img))
    if err:
        cmd += f" 2>{shlex.quote(str(err))}"
    dst.migrate_incoming("exec:" + cmd + (f" | {throttle}" if throttle else ""))
    seen, _ = wait_postcopy(dst)
    assert "postcopy-active" in seen, seen
    dst.wait_no_descendants(timeout=120)   # qsnap stores the working set after the migration


def qsnap(*args):
    return subprocess.run([sys.executable, "-m", "qsnap", *map(str, args)], capture_output=True,
                          text=True, env=qsnap_env(), timeout=300)


def ws_info(img):
    r = qsnap("info", "--output=json", img)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    return info["working_set"], info["working_set_problem"]


@pytest.fixture(scope="module")
def recorded(linux_guest_files, tmp_path_factory):
    """A Linux guest's image and raw stream; the image with a working set recorded
    from a restore in which the guest ran (throttled, so it faulted pages in)."""
    d = tmp_path_factory.mktemp("ws-linux")
    img, raw = d / "linux.qsnap", d / "linux.stream"
    with LinuxGuest(*linux_guest_files) as vm:
        vm.wait_ticks(2, timeout=180)
        save_with_tee(vm, img, raw)
    assert ws_info(img) == (None, None)
    stats = d / "record.json"
    with LinuxGuest(*linux_guest_files, incoming=True, name="rec") as b:
        restore(b, img, "--record-working-set", stats=stats, throttle=slow_pipe())
    s = json.loads(stats.read_text())
    assert s["pages_requested"] > 0 and s["working_set_recorded"] > 0
    return img, raw, s


def test_recorded_working_set_survives_check(recorded):
    img, _raw, s = recorded
    r = qsnap("check", img)
    assert r.returncode == 0, r.stdout + r.stderr
    ws, problem = ws_info(img)
    assert problem is None
    assert ws["pages"] == s["working_set_recorded"] and ws["restores"] == 1
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_postcopy_with_working_set_same_ram_as_precopy(recorded, linux_guest_files, tmp_path):
    img, raw, _ = recorded
    stats, err = tmp_path / "stats.json", tmp_path / "err.txt"
    with LinuxGuest(*linux_guest_files, incoming=True, paused=True, name="pre") as a, \
            LinuxGuest(*linux_guest_files, incoming=True, paused=True, name="pc") as b:
        a.migrate_incoming("exec:" + qsnap_cmd("load", "-q", str(img)))
        restore(b, img, stats=stats, err=err)
        a.wait_migration(timeout=300)
        same_ram(a, b, tmp_path)
    s = json.loads(stats.read_text())
    assert s["pages_working_set"] > 0 and s["working_set_pages"] > 0
    assert "warning" not in err.read_text()


def test_damaged_working_set_is_ignored(recorded, linux_guest_files, tmp_path):
    src, raw, _ = recorded
    img = tmp_path / "damaged.qsnap"
    shutil.copy(src, img)
    # an out-of-range page in the first entry: the working set's crc no longer matches
    from qsnap.image.reader import Image
    with Image.open(img) as im:
        h = im.host_offset(im.meta_offset + im.meta["working_set"]["offset"])
    with open(img, "r+b") as f:
        f.seek(h + 4)
        f.write((0xFFFFFF).to_bytes(4, "little"))
    assert "checksum mismatch" in ws_info(img)[1]
    assert qsnap("check", img).returncode == 2
    stats, err = tmp_path / "stats.json", tmp_path / "err.txt"
    with LinuxGuest(*linux_guest_files, incoming=True, paused=True, name="cat") as a, \
            LinuxGuest(*linux_guest_files, incoming=True, paused=True, name="pc") as b:
        a.migrate_incoming(f"exec:cat {shlex.quote(str(raw))}")
        restore(b, img, stats=stats, err=err)
        a.wait_migration(timeout=300)
        same_ram(a, b, tmp_path)
    s = json.loads(stats.read_text())
    assert s["pages_working_set"] == 0
    warnings = [ln for ln in err.read_text().splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "ignoring the working set" in warnings[0], err.read_text()


KILL_AT = """
import os, signal, sys
from qsnap.image import workingset as ws, writer
step = sys.argv[2]
orig = getattr(writer.ImageWriter, step)
def die(self, *a, **kw):
    if step != "_write_header" or kw.get("complete"):
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, *a, **kw)
setattr(writer.ImageWriter, step, die)
ws.store(sys.argv[1], ws.entries([(0, 0x100, 0)]))
"""


@pytest.mark.parametrize("step", ["_copy_range", "_write_tables", "_write_header", "_put_in_place"])
def test_killed_update_leaves_image_as_it_was(recorded, tmp_path, step):
    src, _raw, _ = recorded
    img = tmp_path / "vm.qsnap"
    shutil.copy(src, img)
    before = img.read_bytes()
    ws_before = ws_info(img)
    p = subprocess.run([sys.executable, "-c", KILL_AT, str(img), step], env=qsnap_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert img.read_bytes() == before
    assert ws_info(img) == ws_before
    r = qsnap("check", img)
    assert r.returncode == 0, r.stdout + r.stderr
