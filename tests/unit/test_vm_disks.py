"""Frozen-image fingerprints and the overlay plan of a restore (qsnap.vm.disks)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from qsnap.errors import VmError
from qsnap.vm import disks, overlays


def recorded(tmp_path, data=b"x" * 5000):
    frozen = tmp_path / "frozen.qcow2"
    frozen.write_bytes(data)
    return {"device": "d0", "qdev": "/machine/peripheral/vd0/virtio-backend", "frozen": str(frozen),
            "format": "qcow2", "fingerprint": disks.fingerprint(frozen)}


def test_fingerprint_hashes_the_first_4_mib_only(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"a" * (5 << 20))
    fp = disks.fingerprint(p)
    with open(p, "r+b") as f:
        f.seek(4 << 20)
        f.write(b"b")
    os.utime(p, ns=(fp["mtime_ns"], fp["mtime_ns"]))
    assert disks.fingerprint(p) == fp  # past 4 MiB: size and mtime must catch it
    assert fp["size"] == 5 << 20 and len(fp["sha256_4m"]) == 64


def test_check_frozen_names_the_image_and_what_changed(tmp_path):
    d = recorded(tmp_path)
    disks.check_frozen(d)
    st = os.stat(d["frozen"])
    with open(d["frozen"], "r+b") as f:
        f.write(b"y")
    os.utime(d["frozen"], ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(VmError, match=r"frozen\.qcow2 of disk d0 changed after the snapshot \(content"):
        disks.check_frozen(d)
    os.unlink(d["frozen"])
    with pytest.raises(VmError, match="frozen.qcow2 of disk d0 is missing"):
        disks.check_frozen(d)


def qemu_lock(path, byte):
    """A shared open-file-description lock on ``byte`` of ``path``, as QEMU takes one on
    byte 100 + bit of each permission it holds (block/file-posix.c); the open fd."""
    import fcntl
    import struct

    fd = os.open(path, os.O_RDONLY)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
    return fd


def test_write_locked_sees_qemus_write_permission_lock_only(tmp_path):
    d = recorded(tmp_path)
    assert not disks.write_locked(d["frozen"])
    reader = qemu_lock(d["frozen"], 100)  # consistent read: a VM running on it as a backing file
    try:
        assert not disks.write_locked(d["frozen"])
        disks.check_not_written(d)
        writer = qemu_lock(d["frozen"], 101)
        try:
            assert disks.write_locked(d["frozen"])
            with pytest.raises(VmError, match=r"frozen\.qcow2 of disk d0 is open for writing in another process"):
                disks.check_not_written(d)
        finally:
            os.close(writer)
        assert not disks.write_locked(d["frozen"])
    finally:
        os.close(reader)
    assert not disks.write_locked(tmp_path / "missing.qcow2")  # nothing to tell: check_frozen's


def block(*files, qdev="/machine/peripheral/vd0/virtio-backend"):
    image = None
    for f in reversed(files):
        image = {"filename": f, **({"backing-image": image} if image else {})}
    return {"device": "", "qdev": qdev, "inserted": {"node-name": "n1", "image": image}}


def test_plan_overlay(tmp_path):
    d = recorded(tmp_path)
    assert disks.plan_overlay(block(d["frozen"]), d) == "overlay"
    assert disks.plan_overlay(block("/mine/over.qcow2", d["frozen"]), d) == "keep"
    with pytest.raises(VmError, match="uses /vm/base.img, not the snapshot's frozen image"):
        disks.plan_overlay(block("/vm/base.img"), d)
    with pytest.raises(VmError, match="has no disk device d0"):
        disks.find_device([block(d["frozen"], qdev="/other")], d)
    assert disks.find_device([block(d["frozen"])], d)["inserted"]["node-name"] == "n1"


def test_overlay_action_names_the_new_node_and_opens_the_made_file(tmp_path):
    d = recorded(tmp_path)
    used = set()
    p1, p2 = disks.overlay_path(str(tmp_path), d, used), disks.overlay_path(str(tmp_path), d, used)
    assert p1 != p2 and p1.endswith("frozen.overlay.qcow2")
    act = disks.overlay_action(block(d["frozen"]), p1, "qsnap-x-0")
    assert act["data"] == {"node-name": "n1", "snapshot-node-name": "qsnap-x-0", "snapshot-file": p1,
                           "format": "qcow2", "mode": "existing"}


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_create_overlay_records_its_backing_and_refuses_an_existing_file(tmp_path):
    frozen = tmp_path / "frozen.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(frozen), "32M"], check=True)
    before = frozen.read_bytes(), os.stat(frozen).st_mtime_ns
    p = str(tmp_path / "frozen.overlay.qcow2")
    overlays.create_overlay(p, str(frozen), "qcow2", 32 << 20, "disk d0")
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", p], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 32 << 20
    assert info["backing-filename"] == str(frozen) and info["backing-filename-format"] == "qcow2"
    made = open(p, "rb").read()
    with pytest.raises(VmError, match="already exists"):
        overlays.create_overlay(p, str(frozen), "qcow2", 32 << 20, "disk d0")
    assert open(p, "rb").read() == made
    missing = str(tmp_path / "no-such-dir" / "o.qcow2")
    with pytest.raises(VmError, match="qemu-img could not create overlay .*o.qcow2 for disk d0"):
        overlays.create_overlay(missing, str(frozen), "qcow2", 32 << 20, "disk d0")
    assert not os.path.lexists(missing)
    assert (frozen.read_bytes(), os.stat(frozen).st_mtime_ns) == before


def test_start_dir_finds_a_daemonized_qemus_relative_files(tmp_path):
    """-daemonize makes QEMU chdir to / after opening its files: the directory its relative
    disk names stand for is found from the files it holds open, not from its cwd."""
    from qsnap.vm import vmrecord

    vm_dir = tmp_path / "vm"
    (vm_dir / "img").mkdir(parents=True)
    (vm_dir / "img" / "disk.qcow2").write_bytes(b"x")
    code = ("import os, sys, time; os.chdir(sys.argv[1]); f = open('img/disk.qcow2', 'rb'); "
            "os.chdir(sys.argv[2]); print('ready', flush=True); time.sleep(60)")
    for cwd_after in ("/", str(vm_dir)):
        p = subprocess.Popen([sys.executable, "-c", code, str(vm_dir), cwd_after],
                             stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "ready"
            assert vmrecord.start_dir(p.pid, ["img/disk.qcow2", str(tmp_path / "abs.qcow2")]) == str(vm_dir)
            # a name it does not hold open says nothing: the cwd stands
            assert vmrecord.start_dir(p.pid, ["other.qcow2"]) == cwd_after
            assert vmrecord.start_dir(p.pid, []) == cwd_after
        finally:
            p.kill()
            p.wait()
