"""Incremental images behind real QEMU: a child image (two saves of a blob guest, one blob
changed in between; the second rebased onto the first) restores, by precopy and by
postcopy, to RAM identical to a restore of the second save; flatten and commit keep it.
"""
import json
import subprocess

import pytest

from qsnaptest import guests
from qsnaptest.guests import Blob
from qsnaptest.qemu import BlobGuest, Qemu, parse_size
from qsnaptest.tools import (assert_same_vm_ram, blob_guest, postcopy_restore, qemu_img_check,
                             qsnap_cmd, qsnap_env, run_qsnap, save_with_tee)

from qsnap.image.reader import Image
from qsnap.image.rewrite import rewrite

MIB = 1 << 20
MEMORY = "256M"
LAYOUT = [(16 * MIB, 24 * MIB), (100 * MIB + 0x321, 4 * MIB), (200 * MIB, 0x5000)]
SEED = 33


@pytest.fixture(scope="module")
def saves(qemu_bin, tmp_path_factory):
    """base.qsnap, full.qsnap (blob 1 changed) with its raw stream, child.qsnap (full on base)."""
    d = tmp_path_factory.mktemp("chain")
    guests.check_blob_layout(LAYOUT, parse_size(MEMORY))
    first = guests.make_blobs(d / "a", LAYOUT, SEED)
    changed = bytes(b ^ 0x5A for b in first[1].data)
    (d / "changed.bin").write_bytes(changed)
    second = [first[0], Blob(d / "changed.bin", first[1].addr, changed), first[2]]
    for name, blobs in (("base", first), ("full", second)):
        vm = blob_guest(blobs, MEMORY)
        try:
            save_with_tee(vm, d / f"{name}.qsnap", d / f"{name}.stream")
        finally:
            vm.shutdown()
    with Image.open(d / "full.qsnap") as src, Image.open(d / "base.qsnap") as base:
        summary = rewrite(src, d / "child.qsnap", base)
    assert summary["clusters_inherited"] > 0 and summary["clusters_copied"] > 0, summary
    return d, second


def _precopy(img, name):
    dst = Qemu(memory=MEMORY, incoming=True, paused=True, name=name, env=qsnap_env()).start()
    dst.migrate_incoming("exec:" + qsnap_cmd("load", img))
    assert dst.wait_migration(timeout=120)["status"] == "completed"
    dst.wait_no_descendants(30)
    return dst


def test_child_is_small_and_clean(saves):
    d, _ = saves
    assert (d / "child.qsnap").stat().st_size < (d / "full.qsnap").stat().st_size / 2
    qemu_img_check(d / "child.qsnap")
    r = run_qsnap("check", d / "child.qsnap")
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(run_qsnap("info", "--output=json", d / "child.qsnap", check=True).stdout)
    assert [c["path"] for c in info["chain"]] == [str(d / "child.qsnap"), str(d / "base.qsnap")]


@pytest.mark.all_qemu
def test_precopy_restore_of_a_child(saves, tmp_path):
    d, blobs = saves
    a = _precopy(d / "child.qsnap", "child")
    try:
        b = _precopy(d / "full.qsnap", "full")
        try:
            BlobGuest.verify_blobs(a, blobs)
            assert_same_vm_ram(a, b, tmp_path)
        finally:
            b.shutdown()
    finally:
        a.shutdown()


@pytest.mark.all_qemu
@pytest.mark.parametrize("pct", [0, 50])
def test_postcopy_restore_of_a_child(saves, tmp_path, pct):
    d, blobs = saves
    with Qemu(memory=MEMORY, incoming=True, paused=True, name="cat") as a, \
            Qemu(memory=MEMORY, incoming=True, paused=True, name="child", env=qsnap_env()) as b:
        a.migrate_incoming(f"exec:cat {d / 'full.stream'}")
        seen, _ = postcopy_restore(b, d / "child.qsnap", pct)
        a.wait_migration(timeout=120)
        assert "postcopy-active" in seen, seen
        BlobGuest.verify_blobs(b, blobs)
        assert_same_vm_ram(a, b, tmp_path)


def test_flatten_and_commit_round_trip(saves, tmp_path):
    d, blobs = saves
    child = tmp_path / "child.qsnap"
    child.write_bytes((d / "child.qsnap").read_bytes())
    (tmp_path / "base.qsnap").symlink_to(d / "base.qsnap")
    r = run_qsnap("flatten", child, tmp_path / "flat.qsnap")
    assert r.returncode == 0, r.stderr
    r = run_qsnap("commit", child)
    assert r.returncode == 0, r.stderr
    for img in (tmp_path / "flat.qsnap", child):
        assert run_qsnap("check", img).returncode == 0
        info = json.loads(run_qsnap("info", "--output=json", img, check=True).stdout)
        assert info["backing_file"] is None and len(info["chain"]) == 1
    for name in ("full", "child", "flat"):
        src = (d if name == "full" else tmp_path) / f"{name}.qsnap"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(src), str(tmp_path / f"{name}.raw")],
                       check=True)
    with Image.open(d / "full.qsnap") as im:
        ram = im.meta_offset
    full = (tmp_path / "full.raw").read_bytes()[:ram]
    assert (tmp_path / "flat.raw").read_bytes()[:ram] == full
    assert (tmp_path / "child.raw").read_bytes()[:ram] == full
    dst = _precopy(child, "committed")
    try:
        BlobGuest.verify_blobs(dst, blobs)
    finally:
        dst.shutdown()
