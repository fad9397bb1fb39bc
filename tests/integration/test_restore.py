"""qsnap restore against real QEMU 7.2 (and 10.0: the tests marked all_qemu).

The snapshots here are made the way ``qsnap snapshot`` makes them, step by step:
the blob guest (a virtio disk on a qcow2 image) is paused, its disk put on an
overlay in one QMP transaction (the old image becomes the snapshot's frozen
image), the VM record written, and RAM and devices saved with
``migrate "exec:tee RAW | qsnap save --vm-info INFO IMG"``.  The raw stream, loaded
with ``exec:cat``, is the reference every restore's RAM must equal.

An image saved by QEMU 10.0 (``pc-i440fx-10.0``) is refused by a 7.2, with
``--launch --qemu`` and with ``--qmp``; those tests need both builds
(``QSNAP_QEMU=7.2,10.0``, as in CI; skipped when QSNAP_QEMU does not name both,
failed when one is missing under QSNAP_REQUIRE_QEMU=1).
"""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from qsnap.vm import disks as vmdisks
from qsnap.vm import overlays
from qsnap.vm.qmp import Qmp
from qsnaptest import guests
from qsnaptest.qemu import BlobGuest, Qemu, parse_size, ram_ranges
from qsnaptest.tools import error_lines, qsnap_cmd, qsnap_env, run_qsnap
from .conftest import requested_build

MEMORY = "128M"
LAYOUT = [(16 << 20, 8 << 20), (40 << 20, 0x12345)]
PAGE = 4096
DISK_PATTERN = 0x55


# --- making snapshots ----------------------------------------------------------------------

def make_disk(path, pattern=DISK_PATTERN):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "32M"], check=True)
    subprocess.run(["qemu-io", "-c", f"write -P {pattern:#x} 0 1M", str(path)], check=True,
                   capture_output=True)
    return Path(path)


def disk_args(disk):
    return ["-drive", f"file={disk},if=none,id=d0,format=qcow2",
            "-device", "virtio-blk-pci,drive=d0,id=vd0"]


def machine_of(vm):
    t = vm.qmp("qom-get", path="/machine", property="type")
    return t[:-len("-machine")] if t.endswith("-machine") else t


def vm_record(vm, disks, was_running=True):
    v = vm.qmp("query-version")
    with open(f"/proc/{vm.proc.pid}/cmdline", "rb") as f:
        cmdline = [a.decode() for a in f.read().split(b"\0")[:-1]]
    return {"qemu_version": "{major}.{minor}.{micro}".format(**v["qemu"]),
            "qemu_package": v["package"], "machine": machine_of(vm), "cmdline": cmdline,
            "mode": "stopped", "was_running": was_running, "downtime_ms": None,
            "ram_only": not disks, "disks": disks}


def freeze_disk(vm, overlay):
    """Put disk vd0 on ``overlay``; the record of the old image, now frozen."""
    block = next(b for b in vm.qmp("query-block") if b["qdev"].startswith("/machine/peripheral/vd0/"))
    frozen = block["inserted"]["image"]["filename"]
    vm.qmp("transaction", actions=[{"type": "blockdev-snapshot-sync", "data": {
        "node-name": block["inserted"]["node-name"], "snapshot-node-name": "snap-top",
        "snapshot-file": str(overlay), "format": "qcow2", "mode": "absolute-paths"}}])
    return {"device": block["device"], "qdev": block["qdev"], "node_name": block["inserted"]["node-name"],
            "frozen": frozen, "format": "qcow2",
            "virtual_size": block["inserted"]["image"]["virtual-size"], "cmdline_file": frozen,
            "fingerprint": vmdisks.fingerprint(frozen)}


def snapshot(vm, d, name, with_disk=True):
    """A snapshot of ``vm`` into d/name.qsnap (+ .stream, the raw stream); returns paths."""
    img, raw, info = d / f"{name}.qsnap", d / f"{name}.stream", d / f"{name}.vm.json"
    vm.stop()
    disks = [freeze_disk(vm, d / f"disk.{name}.qcow2")] if with_disk else []
    info.write_text(json.dumps(vm_record(vm, disks)))
    vm.set_parameters(max_bandwidth=16 << 30)
    vm.migrate(f"exec:tee {raw} | {qsnap_cmd('save', '-q', '--vm-info', info, img)}")
    vm.wait_migration(timeout=120)
    vm.wait_no_descendants(120)
    vm.cont()
    assert img.exists()
    return img, raw


class Snap:
    def __init__(self, d, img, raw, blobs, frozen):
        self.dir, self.img, self.raw, self.blobs, self.frozen = d, img, raw, blobs, frozen

    def state(self):
        """What a restore must never change: the image's and the frozen image's bytes."""
        return (self.img.read_bytes(), self.frozen.read_bytes(), os.stat(self.frozen).st_mtime_ns)


@pytest.fixture(scope="module")
def snap(qemu_bin, tmp_path_factory):
    """A blob guest with a virtio disk, snapshotted; the source keeps running meanwhile."""
    d = tmp_path_factory.mktemp("restore")
    blobs = guests.make_blobs(d, LAYOUT, 7)
    disk = make_disk(d / "disk.qcow2")
    with BlobGuest(memory=MEMORY, blobs=blobs, accel="tcg", env=qsnap_env(), args=disk_args(disk),
                   name="src") as vm:
        vm.wait_bios_done()
        img, raw = snapshot(vm, d, "s1")
        # the source goes on writing its disk, on its own overlay
        vm.hmp('qemu-io d0 "write -P 0x77 0 64k"')
        yield Snap(d, img, raw, blobs, disk)


# --- destinations and clones -------------------------------------------------------------------

def dest(d, name, memory=MEMORY, machine=None, disk=None, **kw):
    """A -incoming defer QEMU with a second QMP socket for qsnap (the harness holds the first)."""
    sock = d / f"{name}.qmp"
    args = ["-qmp", f"unix:{sock},server=on,wait=off"] + (disk_args(disk) if disk else [])
    kw.setdefault("machine", machine)  # None: the build's own pc machine type
    vm = Qemu(memory=memory, incoming=True, accel="tcg", env=qsnap_env(), args=args, name=name, **kw)
    vm.qsnap_qmp = sock
    return vm


def cat_reference(snap, tmp_path):
    """RAM of the raw stream loaded by QEMU itself (exec:cat), its disk on an overlay."""
    overlay = tmp_path / "ref-overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(snap.frozen), "-F", "qcow2",
                    str(overlay)], check=True)
    with dest(snap.dir, "cat", disk=overlay) as ref:
        ref.migrate_incoming(f"exec:cat {snap.raw}")
        ref.wait_migration(timeout=120)
        return ref.ram_dump(tmp_path / "ref.ram").read_bytes()


def first_diff(a, b):
    return next(i for i in range(0, len(a), PAGE) if a[i:i + PAGE] != b[i:i + PAGE])


def assert_same_ram(ram, ref, what):
    assert len(ram) == len(ref), f"{what}: RAM sizes {len(ram)} != {len(ref)}"
    if ram != ref:
        pytest.fail(f"{what}: RAM differs from the exec:cat restore at page {first_diff(ram, ref):#x}")


class Clone:
    """A QEMU that qsnap restore --launch started (not ours to supervise: we only have its pid)."""

    def __init__(self, out):
        self.out, self.pid = out, out["pid"]
        self.q = Qmp(out["qmp"]).connect()

    def cmd(self, name, args=None, **kw):
        return self.q.cmd(name, args, **kw)

    def status(self):
        return self.cmd("query-status")["status"]

    def hmp(self, line):
        return self.cmd("human-monitor-command", {"command-line": line})

    def ram_dump(self, path):
        with open(path, "wb") as out:
            for gpa, _off, size in ram_ranges(parse_size(MEMORY)):
                part = Path(str(path) + ".part")
                self.cmd("pmemsave", val=gpa, size=size, filename=str(part))
                out.write(part.read_bytes())
                part.unlink()
        return Path(path).read_bytes()

    def read(self, addr, size, path):
        self.cmd("pmemsave", val=addr, size=size, filename=str(path))
        return Path(path).read_bytes()

    def kill(self):
        self.q.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            for _ in range(100):
                if not _alive(self.pid):
                    return
                time.sleep(0.05)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def procs_using(path):
    """Pids of processes whose command line mentions ``path``."""
    out, needle = [], str(path).encode()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if needle in f.read():
                        out.append(int(p))
            except OSError:
                pass
    return out


def restore(*args, timeout=300):
    r = run_qsnap("restore", "--output=json", *args, timeout=timeout)
    out = json.loads(r.stdout) if r.returncode == 0 else None
    return r, out


def launch(snap, tmp_path, name, *args):
    r, out = restore("--launch", "--dir", tmp_path / name, *args, snap.img)
    assert r.returncode == 0, r.stderr.decode()
    clone = Clone(out)
    clone.r = r
    return clone


def disk_has_pattern(image, pattern):
    """True if the first MiB of the disk ``image`` (with its backing chain) is all ``pattern``
    (read with -U: a running QEMU may hold the image)."""
    r = subprocess.run(["qemu-io", "-U", "-r", "-c", f"read -P {pattern:#x} 0 1M", str(image)],
                       capture_output=True, text=True)
    return r.returncode == 0 and "verification failed" not in r.stdout


def guest_write(hmp, pattern):
    """The guest's disk d0 gets ``pattern`` in its first MiB, flushed to the image file."""
    hmp(f'qemu-io d0 "write -P {pattern:#x} 0 1M"')
    hmp('qemu-io d0 "flush"')


# --- restore --qmp ---------------------------------------------------------------------------------

@pytest.mark.all_qemu
@pytest.mark.parametrize("postcopy", [None, 25])
def test_qmp_restore_matches_cat(snap, tmp_path, postcopy):
    ref = cat_reference(snap, tmp_path)
    before = snap.state()
    with dest(snap.dir, "dst", disk=snap.frozen, paused=True) as dst:
        caps = dst.qmp("query-migrate-capabilities")
        r, out = restore("--qmp", dst.qsnap_qmp, "--paused", "--dir", tmp_path / "r",
                         *([f"--postcopy={postcopy}"] if postcopy is not None else []), snap.img)
        assert r.returncode == 0, r.stderr.decode()
        assert out["status"] == "paused" and out["pid"] == dst.proc.pid
        assert out["migration_statuses"][-1] == "completed"
        assert ("postcopy-active" in out["migration_statuses"]) == (postcopy is not None)
        assert not procs_using(snap.img), "a qsnap load outlived the restore"
        assert_same_ram(dst.ram_dump(tmp_path / "dst.ram").read_bytes(), ref, "restore --qmp")
        assert dst.qmp("query-migrate-capabilities") == caps
        # the disk runs on a fresh overlay of the frozen image
        [overlay] = out["overlays"]
        top = next(b for b in dst.qmp("query-block") if b["device"] == "d0")["inserted"]["image"]
        assert top["filename"] == overlay and top["backing-image"]["filename"] == str(snap.frozen)
        dst.cont()
        assert dst.status() == "running"
        assert disk_has_pattern(overlay, DISK_PATTERN)
        guest_write(dst.hmp, 0x99)
        assert disk_has_pattern(overlay, 0x99) and disk_has_pattern(snap.frozen, DISK_PATTERN)
    assert snap.state() == before


def test_qmp_restore_runs_the_guest(snap, tmp_path):
    with dest(snap.dir, "dst") as dst:
        img = ram_only_image(snap, tmp_path)
        r, out = restore("--qmp", dst.qsnap_qmp, img)
        assert r.returncode == 0, r.stderr.decode()
        assert out["status"] == "running" and dst.status() == "running"
        assert out["overlays"] == []
        BlobGuest.verify_blobs(dst, snap.blobs)


def ram_only_image(snap, tmp_path):
    """An image of the blob guest without disks (its own source, module cache)."""
    img = snap.dir / "ramonly.qsnap"
    if not img.exists():
        with BlobGuest(memory=MEMORY, blobs=snap.blobs, accel="tcg", env=qsnap_env(), name="src2") as vm:
            vm.wait_bios_done()
            snapshot(vm, snap.dir, "ramonly", with_disk=False)
    return img


# --- restore --launch ------------------------------------------------------------------------------

@pytest.mark.all_qemu
def test_launch_restores_and_runs(snap, tmp_path):
    ref = cat_reference(snap, tmp_path)
    before = snap.state()
    clone = launch(snap, tmp_path, "c1")
    try:
        out = clone.out
        # the load was qsnap's own child, fed to QEMU by fd: (QEMU forked nothing), and is gone
        assert not procs_using(snap.img), "a qsnap load outlived the restore"
        # QEMU's output goes to its log, named in the summary, never to qsnap's stderr
        assert out["qemu_log"] == str(tmp_path / "c1" / "qemu.log") and Path(out["qemu_log"]).exists()
        assert clone.r.stderr == b"", clone.r.stderr
        assert out["status"] == "running" and clone.status() == "running"
        assert _alive(clone.pid) and out["qmp"] == str(tmp_path / "c1" / "qmp.sock")
        assert any("-chardev qmp" in c for c in out["changes"]), out["changes"]
        assert any("-serial file:" in c for c in out["changes"]), out["changes"]
        # the load child: started before QMP connected, ended once the stream was
        # complete, and its CPU time read before it was reaped
        load = out["load"]
        assert load["started_s"] < 0 < out["timeline"]["completed"] <= load["ended_s"] <= out["seconds"]
        assert load["cpu"]["user_s"] + load["cpu"]["sys_s"] > 0, load
        # QEMU's CPU time at QMP connected and when the load completed: the first is part of the second
        start, done = out["launch"]["qemu_start_cpu"], out["qemu_cpu_at_completed"]
        assert 0 <= start["user_s"] + start["sys_s"] <= done["user_s"] + done["sys_s"], (start, done)
        clone.cmd("stop")
        ram = clone.ram_dump(tmp_path / "c1.ram")
        for b in snap.blobs:
            assert ram[b.addr:b.addr + len(b.data)] == b.data, f"blob at {b.addr:#x}"
        # the BIOS data area below 1 MiB moves on while the guest runs; the rest may not
        assert_same_ram(ram[1 << 20:], ref[1 << 20:], "restore --launch, above 1 MiB")
        [overlay] = out["overlays"]
        assert Path(overlay).parent == tmp_path / "c1" and disk_has_pattern(overlay, DISK_PATTERN)
    finally:
        clone.kill()
    assert snap.state() == before


@pytest.mark.all_qemu
def test_launch_postcopy_paused_matches_cat(snap, tmp_path):
    ref = cat_reference(snap, tmp_path)
    clone = launch(snap, tmp_path, "pc", "--postcopy=10", "--paused")
    try:
        assert clone.out["status"] == "paused" and clone.out["postcopy"] == 10
        assert not procs_using(snap.img), "a qsnap load outlived the restore"
        assert clone.out["migration_statuses"][-2:] == ["postcopy-active", "completed"]
        assert_same_ram(clone.ram_dump(tmp_path / "pc.ram"), ref, "restore --launch --postcopy")
        clone.cmd("cont")
        assert clone.status() == "running"
    finally:
        clone.kill()


def test_two_clones_at_once_from_the_same_state(snap, tmp_path):
    ref = cat_reference(snap, tmp_path)
    before = snap.state()
    a = launch(snap, tmp_path, "a", "--paused")
    try:
        b = launch(snap, tmp_path, "b", "--paused", "--qmp", tmp_path / "b.qmp")
        try:
            assert b.out["qmp"] == str(tmp_path / "b.qmp")
            assert a.pid != b.pid and _alive(a.pid) and _alive(b.pid)
            [oa], [ob] = a.out["overlays"], b.out["overlays"]
            assert oa != ob and Path(oa).parent == tmp_path / "a" and Path(ob).parent == tmp_path / "b"
            for c, name in ((a, "a"), (b, "b")):
                assert_same_ram(c.ram_dump(tmp_path / f"{name}.ram"), ref, f"clone {name}")
            a.cmd("cont")
            b.cmd("cont")
            assert a.status() == b.status() == "running"
            # each writes its own overlay; neither sees the other's writes
            guest_write(a.hmp, 0xAA)
            assert disk_has_pattern(oa, 0xAA) and disk_has_pattern(ob, DISK_PATTERN)
        finally:
            b.kill()
    finally:
        a.kill()
    assert snap.state() == before


# --- refusals ---------------------------------------------------------------------------------------

def assert_refused(r, *words):
    lines = error_lines(r.stderr)
    assert r.returncode != 0 and len(lines) == 1, r.stderr.decode()
    assert "Traceback" not in r.stderr.decode()
    print(lines[0])
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", ["machine", "ram"])
def test_qmp_refuses_other_machine_or_ram(snap, tmp_path, case):
    before = snap.state()
    kw = {"machine": "pc-i440fx-7.1"} if case == "machine" else {"memory": "256M"}
    with dest(snap.dir, "dst", disk=snap.frozen, **kw) as dst:
        r, _ = restore("--qmp", dst.qsnap_qmp, "--dir", tmp_path / "r", snap.img)
        words = ("pc-i440fx-7.1", "pc-i440fx-7.2") if case == "machine" else ("pc.ram", "128 MiB", "256 MiB")
        assert_refused(r, *words)
        assert dst.status() == "inmigrate"  # still waiting, nothing loaded
        block = next(b for b in dst.qmp("query-block") if b["device"] == "d0")
        assert block["inserted"]["image"]["filename"] == str(snap.frozen)  # no overlay put on
    assert not (tmp_path / "r").exists()
    assert snap.state() == before


def test_refuses_missing_or_changed_frozen_disk(snap, tmp_path):
    before = snap.state()
    moved = snap.frozen.with_suffix(".away")
    os.rename(snap.frozen, moved)
    try:
        r, _ = restore("--launch", "--dir", tmp_path / "m", snap.img)
        assert_refused(r, str(snap.frozen), "missing")
    finally:
        os.rename(moved, snap.frozen)
    st = os.stat(snap.frozen)
    os.utime(snap.frozen, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        r, _ = restore("--launch", "--dir", tmp_path / "c", snap.img)
        assert_refused(r, str(snap.frozen), "changed after the snapshot")
        with dest(snap.dir, "dst", disk=snap.frozen) as dst:
            r, _ = restore("--qmp", dst.qsnap_qmp, snap.img)
            assert_refused(r, str(snap.frozen), "changed after the snapshot")
            assert dst.status() == "inmigrate"
    finally:
        os.utime(snap.frozen, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()
    assert snap.state() == before


def test_launch_needs_a_vm_record(snap, tmp_path):
    img = tmp_path / "plain.qsnap"
    with BlobGuest(memory=MEMORY, blobs=snap.blobs, accel="tcg", env=qsnap_env(), name="plain") as vm:
        vm.wait_bios_done()
        vm.set_capabilities(background_snapshot=True)
        vm.migrate(f"exec:{qsnap_cmd('save', '-q', img)}")
        vm.wait_migration()
        vm.wait_no_descendants()
    r, _ = restore("--launch", img)
    assert_refused(r, "no VM record", "-incoming defer", "--qmp")


@pytest.fixture(scope="module")
def old_qemu():
    """QEMU 7.2, which knows no pc-i440fx-10.0."""
    return requested_build("7.2")


@pytest.fixture(scope="module")
def q10_snap(snap):
    """An image saved by QEMU 10.0 (its machine pc-i440fx-10.0), with a VM record."""
    q10 = requested_build("10.0")
    with BlobGuest(memory=MEMORY, blobs=snap.blobs, accel="tcg", env=qsnap_env(), name="q10",
                   build=q10, machine=q10.machine("pc")) as vm:
        vm.wait_bios_done()
        img, _ = snapshot(vm, snap.dir, "q10", with_disk=False)
    return img


def test_launch_on_a_qemu_without_the_machine_type(old_qemu, q10_snap, tmp_path):
    before = q10_snap.read_bytes()
    work = tmp_path / "old"
    r, _ = restore("--launch", "--qemu", old_qemu.binary, "--dir", work, q10_snap)
    line = assert_refused(r, "QEMU 10.0.2", "pc-i440fx-10.0", "does not provide")
    assert "7.2" in line
    assert not work.exists() and not procs_using(work)
    assert q10_snap.read_bytes() == before


def test_qmp_into_a_qemu_without_the_machine_type(old_qemu, q10_snap, snap, tmp_path):
    with dest(snap.dir, "dst", build=old_qemu) as dst:
        r, _ = restore("--qmp", dst.qsnap_qmp, q10_snap)
        assert_refused(r, "QEMU 10.0.2", "pc-i440fx-10.0", "does not provide")
        assert dst.status() == "inmigrate"


# --- a Linux guest writing numbered records to its disk --------------------------------------------

@pytest.fixture(scope="module")
def disk_snap(qemu_bin, tmp_path_factory):
    """The record-writing guest, snapshotted (background) with qsnap snapshot while it
    writes; the source goes on writing records on its own overlay meanwhile."""
    from qsnaptest import diskguest

    try:
        kernel, initrd = diskguest.files()
    except guests.GuestUnavailable as e:
        pytest.skip(f"disk guest unavailable: {e}")
    d = tmp_path_factory.mktemp("diskguest")
    disk = diskguest.create_disk(d / "disk.qcow2")
    sock = d / "src.qmp"
    with diskguest.DiskGuest(kernel, initrd, disks=[disk], env=qsnap_env(),
                             args=["-qmp", f"unix:{sock},server=on,wait=off"]) as vm:
        vm.wait_record(3)
        img = d / "dg.qsnap"
        r = run_qsnap("snapshot", "--qmp", sock, "--output=json", img, timeout=600)
        assert r.returncode == 0, r.stderr.decode()
        frozen = diskguest.records(disk)
        later = vm.wait_record(diskguest.contiguous_top(frozen) + 3)  # the source writes on
        # records carry the guest's RTC in whole seconds: a clone's record is told from the
        # source's by its time only once a second has passed since the source wrote K+3
        time.sleep(1.0)
        yield d, img, disk, frozen, later


@pytest.mark.parametrize("postcopy", [None, 10])
def test_disk_guest_goes_on_from_the_snapshot(disk_snap, tmp_path, postcopy):
    from qsnaptest import diskguest

    d, img, disk, frozen, source_later = disk_snap
    k = diskguest.contiguous_top(frozen)
    before = img.read_bytes(), disk.read_bytes()
    r, out = restore("--launch", "--dir", tmp_path / "c", *([f"--postcopy={postcopy}"] if postcopy else []),
                     img, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    clone = Clone(out)
    try:
        assert out["status"] == "running" and out["seconds_to_run"] is not None
        assert ("postcopy-active" in out["migration_statuses"]) == bool(postcopy)
        console = tmp_path / "c" / "console.log"
        assert any(str(console) in c for c in out["changes"]), out["changes"]
        deadline = time.monotonic() + 180
        while True:
            recs = [int(x) for x in diskguest.REC_RE.findall(console.read_text(errors="replace"))]
            if recs and recs[-1] >= k + 3:
                break
            assert _alive(clone.pid) and time.monotonic() < deadline, console.read_text()[-2000:]
            time.sleep(0.2)
        text = console.read_text(errors="replace")
        assert diskguest.ERROR_MARKER not in text, text[-2000:]
        # the guest goes on from the snapshot's record: its RAM and disk agree
        assert recs[0] in (k, k + 1), (recs[:5], k)
        [overlay] = out["overlays"]
        clone.hmp('qemu-io d0 "flush"')
        restored = diskguest.records(overlay)
        _, top = diskguest.check_continuation(frozen, restored)
        assert top >= k + 3
        # the source wrote records after the snapshot too (on its own overlay); the clone
        # wrote its own, later ones under the same numbers and sees none of the source's.
        # Record K+1 may carry a time both read before the snapshot (the guest reads the
        # clock, then writes), so it may tie; the clone read K+2's time after the restore.
        source = diskguest.records(overlays.overlay_path(str(disk), str(img)))
        assert source_later > k and max(source) >= k + 3
        assert restored[k + 1][1] >= source[k + 1][1], (restored[k + 1], source[k + 1])
        for n in (k + 2, k + 3):
            assert restored[n][1] > source[n][1], (n, restored[n], source[n])
    finally:
        clone.kill()
    assert (img.read_bytes(), disk.read_bytes()) == before


# --- failures after QEMU started ---------------------------------------------------------------------

def test_launch_refusal_after_start_leaves_nothing(snap, tmp_path):
    """Extra arguments after -- that give the clone other RAM: refused once QEMU is up;
    QEMU is ended, the directory and its overlays removed."""
    before = snap.state()
    work = tmp_path / "big"
    r, _ = restore("--launch", "--dir", work, snap.img, "--", "-m", "256M")
    assert_refused(r, "pc.ram", "256 MiB")
    assert not work.exists() and not procs_using(work)
    assert snap.state() == before


def corrupt_copy(snap, tmp_path):
    """A copy of the snapshot image with one stored RAM page damaged (a blob's first page)."""
    from qsnaptest.tools import block, host_offset, qsnap_info

    img = tmp_path / "bad.qsnap"
    shutil.copyfile(snap.img, img)
    off = host_offset(img, block(qsnap_info(img))["offset"] + snap.blobs[0].addr)
    with open(img, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    return img


@pytest.mark.all_qemu
def test_load_failure_is_explained_and_cleaned_up(snap, tmp_path, qemu):
    bad = corrupt_copy(snap, tmp_path)
    before = snap.state()
    work = tmp_path / "w"
    r, _ = restore("--launch", "--dir", work, bad)
    line = assert_refused(r, "exited during the restore", "checksum", f"saved by QEMU {qemu.major_minor}")
    assert not work.exists() and not procs_using(work) and not procs_using(bad), line
    with dest(snap.dir, "dst", disk=snap.frozen) as dst:
        r, _ = restore("--qmp", dst.qsnap_qmp, "--dir", tmp_path / "q", bad)
        assert_refused(r, "exited during the restore", "checksum")
        assert not procs_using(bad), "a qsnap load outlived the restore"
        dst.proc.wait(10)  # QEMU exits after a failed incoming migration (7.2; 10.0's exit-on-error)
    assert not (tmp_path / "q").exists()
    assert snap.state() == before


def test_qmp_refuses_a_qemu_not_waiting_for_a_migration(snap, tmp_path):
    sock = tmp_path / "run.qmp"
    with Qemu(memory=MEMORY, accel="tcg", args=["-qmp", f"unix:{sock},server=on,wait=off"]) as vm:
        r, _ = restore("--qmp", sock, snap.img)
        assert_refused(r, "is running, not waiting for an incoming migration", "-incoming defer")
        assert vm.status() == "running"


def test_launch_a_blockdev_vm(snap, tmp_path):
    """A disk given as -blockdev (no drive id: QMP names it by node only): the clone's
    -blockdev reads the frozen image, under a new overlay."""
    disk = make_disk(tmp_path / "bd.qcow2", pattern=0x42)
    sock = tmp_path / "src.qmp"
    args = ["-blockdev", f"driver=file,filename={disk},node-name=f0",
            "-blockdev", "driver=qcow2,file=f0,node-name=d0",
            # share-rw: HMP qemu-io writes through a second user of the node
            "-device", "virtio-blk-pci,drive=d0,id=vd0,share-rw=on",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    with BlobGuest(memory=MEMORY, blobs=snap.blobs, accel="tcg", env=qsnap_env(), args=args,
                   name="bd") as vm:
        vm.wait_bios_done()
        img, _ = snapshot(vm, tmp_path, "bd")
        frozen_before = disk.read_bytes()
        clone = launch(Snap(tmp_path, img, None, snap.blobs, disk), tmp_path, "bdc")
        try:
            assert clone.status() == "running"
            assert any("-blockdev filename=" in c for c in clone.out["changes"]), clone.out["changes"]
            [overlay] = clone.out["overlays"]
            [b] = [b for b in clone.cmd("query-block") if b.get("qdev", "").startswith("/machine/peripheral/vd0")]
            assert b["inserted"]["image"]["filename"] == overlay
            assert b["inserted"]["image"]["backing-image"]["filename"] == str(disk)
            assert disk_has_pattern(overlay, 0x42)
            clone.hmp(f'qemu-io {b["inserted"]["node-name"]} "write -P 0x43 0 1M"')
            clone.hmp(f'qemu-io {b["inserted"]["node-name"]} "flush"')
            assert disk_has_pattern(overlay, 0x43)
        finally:
            clone.kill()
        assert disk.read_bytes() == frozen_before


def test_qmp_refuses_a_qemu_already_loading_a_migration(snap, tmp_path):
    with dest(snap.dir, "busy", disk=snap.frozen) as dst:
        dst.migrate_incoming("exec:sleep 60")  # an incoming migration waiting for its stream
        r, _ = restore("--qmp", dst.qsnap_qmp, "--dir", tmp_path / "r", snap.img)
        assert_refused(r, "already has an incoming migration running", "sleep 60")
        block = next(b for b in dst.qmp("query-block") if b["device"] == "d0")
        assert block["inserted"]["image"]["filename"] == str(snap.frozen)
    assert not (tmp_path / "r").exists()
