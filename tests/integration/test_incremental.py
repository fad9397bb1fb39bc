"""Incremental images behind real QEMU: `qsnap save --parent` chains of blob guests (KVM).

Each level of the chain is a background snapshot of a guest whose RAM differs
from the previous level's by a known amount: one blob rewritten with new data,
at one level a blob zeroed (loaded from a file of zeros).  The stream of every
level is kept (``exec:tee RAW | qsnap save --parent PREV IMG``) and also saved
stand-alone; tools that do not share qsnap's reader (qemu-img check, info,
map, convert) check the chain, and restores through it are compared with
QEMU's own restore of the raw stream.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from bigcmp import assert_same

from qsnap.vm.qmp import Qmp
from qsnaptest import diskguest, guests, tools as qsnaptools
from qsnaptest.qemu import Qemu, parse_size
from qsnaptest.tools import (assert_same_vm_ram, postcopy_restore, qemu_img_check, qsnap_cmd,
                             qsnap_env, run_qsnap, wait_save)

MIB = 1 << 20
MEMORY = "256M"
LAYOUT = [(16 * MIB, 24 * MIB), (64 * MIB, 8 * MIB), (100 * MIB + 0x321, MIB), (160 * MIB, 4 * MIB)]
SEED = 31
DEPTH = 5          # images in the chain: base + 4 incremental
CHANGED = {1: 2, 2: 1, 3: 3, 4: 0}   # level -> the blob it rewrites
ZEROED = (2, 1)    # at level 2, blob 1 (8 MiB, cluster aligned) becomes zeros


def level_blobs(d, level):
    """The blobs of chain level ``level``: level k > 0 rewrites blob CHANGED[k]
    with new data (level ZEROED[0]: with zeros)."""
    blobs = guests.make_blobs(d / f"blobs{level}", LAYOUT, SEED)
    for k in range(1, level + 1):
        i = CHANGED[k]
        addr, size = LAYOUT[i]
        data = bytes(size) if k == ZEROED[0] else guests.blob_bytes(SEED + k, i, size)
        path = d / f"blobs{level}" / f"blob{i}-{k}.bin"
        path.write_bytes(data)
        blobs[i] = guests.Blob(path, addr, data)
    return blobs


def snapshot(blobs, img, raw, parent=None):
    vm = qsnaptools.blob_guest(blobs, MEMORY, accel="kvm")
    try:
        vm.set_parameters(max_bandwidth=16 << 30)
        vm.set_capabilities(background_snapshot=True)
        opts = ("--parent", parent) if parent else ()
        vm.migrate(f"exec:tee {shlex.quote(str(raw))} | {qsnap_cmd('save', '-q', *opts, img)}")
        wait_save(vm, timeout=180)
    finally:
        vm.shutdown()
    assert img.is_file() and raw.is_file()


@pytest.fixture(scope="module")
def chain(qemu_bin, tmp_path_factory):
    """[(image, raw stream, stand-alone save of the stream, blobs)] from base to
    tip: DEPTH levels, or base and one child where the reader cannot open a
    child to save onto it."""
    d = tmp_path_factory.mktemp("chain")
    guests.check_blob_layout(LAYOUT, parse_size(MEMORY))
    out = []
    for level in range(DEPTH):
        blobs = level_blobs(d, level)
        img, raw, full = d / f"l{level}.qsnap", d / f"l{level}.stream", d / f"l{level}-full.qsnap"
        snapshot(blobs, img, raw, parent=out[-1][0] if out else None)
        with open(raw, "rb") as f:
            r = run_qsnap("save", "-q", full, stdin=f)
        assert r.returncode == 0, r.stderr
        out.append((img, raw, full, blobs))
    return out


def ram_end(img):
    from qsnap.image.metadata import read_metadata
    return max(b["offset"] + b["length"] for b in read_metadata(str(img))["ram_blocks"])


def raw_ram(img, tmp_path):
    """The RAM regions of ``img`` through its backing chain, as qemu-img reads them."""
    out = tmp_path / (img.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(out)], check=True)
    with open(out, "rb") as f:
        data = f.read(ram_end(img))
    out.unlink()
    return data


def qemu_img_json(*args):
    r = subprocess.run(["qemu-img", *args, "--output=json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.all_qemu
def test_every_level_reads_as_its_stand_alone_save(chain, tmp_path):
    """qemu-img check is clean at every level, info --backing-chain lists the
    chain, and convert through it gives the RAM of a stand-alone save of the
    same stream, byte for byte."""
    for level, (img, _, full, _) in enumerate(chain):
        qemu_img_check(img)
        info = qemu_img_json("info", "--backing-chain", str(img))
        assert [Path(i["filename"]).name for i in info] == [f"l{k}.qsnap" for k in range(level, -1, -1)]
        assert_same(raw_ram(img, tmp_path), raw_ram(full, tmp_path), f"level {level} through its chain")


@pytest.mark.all_qemu
def test_children_store_what_changed(chain):
    """A child holds its changed blob's clusters and its own metadata, not the
    guest's other RAM (53 MiB stand-alone)."""
    for level, (img, _, full, _) in enumerate(chain[1:], 1):
        changed = 0 if level == ZEROED[0] else LAYOUT[CHANGED[level]][1]
        # 1 MiB clusters: + a partial cluster of an unaligned blob, 2 that
        # SeaBIOS writes differently at each boot, header, metadata region,
        # L2, L1, refcount block and table: 9 clusters
        bound = changed + 9 * MIB
        assert os.path.getsize(img) <= bound, (level, os.path.getsize(img), bound)


@pytest.mark.all_qemu
def test_zeroed_blob_reads_zero_over_the_parent(chain):
    """The blob zeroed at level ZEROED[0] is zero-flagged: zeros in the child,
    whatever its parent holds there."""
    img = chain[ZEROED[0]][0]
    addr, size = LAYOUT[ZEROED[1]]
    extents = qemu_img_json("map", str(img))
    covered = 0
    for e in extents:
        lo, hi = max(e["start"], addr), min(e["start"] + e["length"], addr + size)
        if lo < hi:
            assert e["zero"] and not e["data"] and e["depth"] == 0, e
            covered += hi - lo
    assert covered == size


def _restore_pair(img, raw, tmp_path, postcopy):
    """Restore ``raw`` (exec:cat) and ``img`` (qsnap load, through its chain) into
    two paused destinations; their RAM must be identical."""
    with Qemu(memory=MEMORY, incoming=True, paused=True, env=qsnap_env(), name="cat") as a, \
            Qemu(memory=MEMORY, incoming=True, paused=True, env=qsnap_env(), name="qsnap") as b:
        a.migrate_incoming(f"exec:cat {shlex.quote(str(raw))}")
        if postcopy:
            seen, _ = postcopy_restore(b, img, 50)
            assert "postcopy-active" in seen, seen
        else:
            b.migrate_incoming("exec:" + qsnap_cmd("load", img))
            b.wait_migration(timeout=120)
        a.wait_migration(timeout=120)
        b.wait_no_descendants(30)
        assert_same_vm_ram(a, b, tmp_path)


@pytest.mark.all_qemu
@pytest.mark.parametrize("level", [1, DEPTH - 1])
@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_restore_through_the_chain_matches_the_raw_stream(chain, tmp_path, level, postcopy):
    img, raw, _, _ = chain[level]
    _restore_pair(img, raw, tmp_path, postcopy)


@pytest.mark.all_qemu
def test_swapped_parent_is_refused(chain, tmp_path):
    """A parent replaced by another image (here: the stand-alone save of the
    same level, same RAM but another snapshot) is refused by name."""
    d = tmp_path / "swap"
    d.mkdir()
    base, _, full0, _ = chain[0]
    child = chain[1][0]
    shutil.copy(full0, d / base.name)
    shutil.copy(child, d / child.name)
    r = run_qsnap("load", d / child.name)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert err.startswith("qsnap: error: ") and "does not match" in err and base.name in err, err


# --- qsnap snapshot --incremental: RAM and disks chain together ---------------------------

@pytest.fixture(scope="module")
def disk_guest_files(qemu_bin):
    try:
        return diskguest.files()
    except guests.GuestUnavailable as e:
        pytest.skip(f"disk guest unavailable: {e}")


def _snapshot(sock, img, *args):
    r = run_qsnap("snapshot", "--qmp", sock, "--output=json", *args, img, timeout=900)
    return r, (json.loads(r.stdout) if r.returncode == 0 else None)


def _chain_files(path):
    return [Path(i["filename"]).name for i in qemu_img_json("info", "--backing-chain", str(path))]


def test_incremental_snapshot_chains_ram_and_disks(disk_guest_files, tmp_path):
    """A disk guest snapshotted, then snapshotted with --incremental: the second
    image's parent is the first, and its frozen disk is the overlay the first
    snapshot put the VM on (so the disks chain as the images do).  Restored
    through the chain, the guest reads its disk back and goes on from the
    snapshot's record."""
    disk = diskguest.create_disk(tmp_path / "disk.qcow2")
    sock = tmp_path / "qsnap.qmp"
    vm = diskguest.DiskGuest(*disk_guest_files, disks=[disk], env=qsnap_env(), name="src",
                             args=["-chardev", f"socket,id=qsnapmon,path={sock},server=on,wait=off",
                                   "-mon", "chardev=qsnapmon,mode=control"])
    vm.start()
    try:
        vm.wait_record(3, timeout=300)
        r, _ = _snapshot(sock, tmp_path / "none.qsnap", "--incremental")
        err = r.stderr.decode()
        assert r.returncode != 0 and err.startswith("qsnap: error: ") and \
            "no earlier snapshot" in err and len(err.strip().splitlines()) == 1, err
        assert vm.status() == "running" and not (tmp_path / "none.qsnap").exists()

        r, a = _snapshot(sock, tmp_path / "a.qsnap")
        assert r.returncode == 0, r.stderr.decode()
        vm.wait_record(vm.last_record() + 3)
        r, b = _snapshot(sock, tmp_path / "b.qsnap", "--incremental")
        assert r.returncode == 0, r.stderr.decode()
        vm.wait_record(vm.last_record() + 2)
    finally:
        vm.shutdown()
    assert b["parent"] == str(tmp_path / "a.qsnap")
    assert _chain_files(tmp_path / "b.qsnap") == ["b.qsnap", "a.qsnap"]
    frozen_b = Path(b["disks"][0]["frozen"])
    assert frozen_b == Path(a["disks"][0]["overlay"]) == tmp_path / "disk.a.qcow2"
    assert _chain_files(b["disks"][0]["overlay"]) == ["disk.a.b.qcow2", "disk.a.qcow2", "disk.qcow2"]
    assert os.path.getsize(tmp_path / "b.qsnap") < os.path.getsize(tmp_path / "a.qsnap")

    frozen_recs = diskguest.records(frozen_b)
    k = diskguest.contiguous_top(frozen_recs)
    restored_disk = diskguest.create_overlay(tmp_path / "restored.qcow2", frozen_b)
    dst = diskguest.DiskGuest(*disk_guest_files, disks=[restored_disk], incoming=True,
                              env=qsnap_env(), name="dst")
    dst.start()
    try:
        dst.migrate_incoming("exec:" + qsnap_cmd("load", tmp_path / "b.qsnap"))
        dst.wait_migration(timeout=600)
        if dst.status() != "running":
            dst.cont()
        dst.wait_record(k + 3, timeout=300)
        k2, m = diskguest.check_continuation(frozen_recs, diskguest.records(restored_disk))
        assert k2 == k and m >= k + 3
        assert dst.recs()[0] in (k, k + 1)
        assert dst.errors() == []
    finally:
        dst.shutdown()


@pytest.mark.all_qemu
def test_snapshot_incremental_and_parent_ram_only(qemu_bin, tmp_path):
    """A RAM-only blob guest: `snapshot --incremental` takes the last snapshot as
    parent, `--parent` the one given; through qemu-img convert each child reads
    as a later stand-alone snapshot of the same halted guest, but for what
    SeaBIOS' timer interrupt updates meanwhile (the BIOS data area)."""
    blobs = guests.make_blobs(tmp_path / "blobs", LAYOUT, SEED)
    sock = tmp_path / "qsnap.qmp"
    vm = qsnaptools.blob_guest(blobs, MEMORY, accel="kvm",
                               args=["-chardev", f"socket,id=qsnapmon,path={sock},server=on,wait=off",
                                     "-mon", "chardev=qsnapmon,mode=control"])
    try:
        r, base = _snapshot(sock, tmp_path / "base.qsnap", "--disks=none")
        assert r.returncode == 0, r.stderr.decode()
        r, one = _snapshot(sock, tmp_path / "one.qsnap", "--disks=none", "--incremental")
        assert r.returncode == 0, r.stderr.decode()
        r, two = _snapshot(sock, tmp_path / "two.qsnap", "--disks=none", "--parent",
                           tmp_path / "one.qsnap")
        assert r.returncode == 0, r.stderr.decode()
        assert two["parent"] == str(tmp_path / "one.qsnap")
        r, full = _snapshot(sock, tmp_path / "full.qsnap", "--disks=none")
        assert r.returncode == 0, r.stderr.decode()
    finally:
        vm.shutdown()
    assert base["parent"] is None and full["parent"] is None
    assert one["parent"] == str(tmp_path / "base.qsnap")
    assert _chain_files(tmp_path / "one.qsnap") == ["one.qsnap", "base.qsnap"]
    # the halted guest's RAM does not change: the child holds its own header,
    # metadata region and tables, and what SeaBIOS' timers touch
    assert os.path.getsize(tmp_path / "one.qsnap") <= 9 * MIB
    full_ram = _outside_bios(raw_ram(tmp_path / "full.qsnap", tmp_path))
    assert_same(_outside_bios(raw_ram(tmp_path / "one.qsnap", tmp_path)), full_ram,
                "the --incremental child through its parent")
    assert _chain_files(tmp_path / "two.qsnap") == ["two.qsnap", "one.qsnap", "base.qsnap"]
    assert_same(_outside_bios(raw_ram(tmp_path / "two.qsnap", tmp_path)), full_ram,
                "the --parent child through its chain")
    # qsnap restore --launch follows the chain too, by precopy and by postcopy
    mem = parse_size(MEMORY)
    for how in ([], ["--postcopy=10"]):
        ram = _launched_ram(tmp_path / "two.qsnap", tmp_path / f"launch{len(how)}", how)
        assert_same(_outside_bios(ram), full_ram[:mem], f"restore --launch {how} of the 3-deep chain")


def _launched_ram(img, d, args):
    """Guest RAM (256 MiB from 0) of ``qsnap restore --launch --paused IMG``."""
    r = subprocess.run(shlex.split(qsnap_cmd("restore", "--launch", "--paused", "--output=json",
                                             "--dir", d, *args, img)),
                       capture_output=True, env=qsnap_env(), timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    q = Qmp(out["qmp"]).connect()
    try:
        assert q.cmd("query-status")["status"] == "paused"
        dump = d / "ram.dump"
        q.cmd("pmemsave", val=0, size=parse_size(MEMORY), filename=str(dump))
        return dump.read_bytes()
    finally:
        q.close()
        os.kill(out["pid"], signal.SIGKILL)


def _outside_bios(ram):
    """The RAM regions with the areas SeaBIOS may write zeroed (pc.ram comes first)."""
    ram = bytearray(ram)
    for lo, hi in guests.seabios_areas(parse_size(MEMORY)):
        ram[lo:hi] = bytes(hi - lo)
    return bytes(ram)
