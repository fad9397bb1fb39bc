"""`qsnap save` behind real QEMU 7.2: migrate "exec:qsnap save IMG".

Every image is checked by tools that do not share qsnap's reader: qemu-img
check (structure, leaks), qemu-img convert (RAM content at the documented
offsets), plus `qsnap check` (checksums). Crash tests feed truncated real
streams, SIGKILL qsnap during a real migration and fill a small tmpfs.
"""

import os
import signal
import subprocess
from pathlib import Path

import pytest

from bigcmp import assert_same

from qsnaptest import guests, tools as qsnaptools
from qsnaptest.qemu import PAGE_SIZE, LinuxGuest, QemuError, parse_size
from qsnaptest.tools import (block, check_blobs_in_raw, error_lines, nonzero_pages, qemu_img_check,
                         qemu_img_raw, qsnap_cmd, qsnap_env, qsnap_info, run_qsnap, temp_leftovers,
                         wait_for, wait_save_done)

MIB = 1 << 20
MEMORY = "512M"
# 80 MiB of random data: cluster-aligned blobs, one unaligned, one of three pages.
# With 1 MiB clusters a pc guest's image has ~13 MiB beyond its blob clusters:
# 6 fixed clusters (header, metadata region, L2, L1, refcount block and
# table), one per small ROM block (ACPI tables, pc.bios, table-loader, rsdp)
# and 3 for what SeaBIOS writes to pc.ram; the unaligned blobs cost 2 more.
# So the bound below needs ~72 MiB of data here (72.4 MiB: 87.0 <= 87.3 MiB).
LAYOUT = [(16 * MIB, 32 * MIB), (64 * MIB + 0x123, 8 * MIB), (256 * MIB, 40 * MIB),
          (464 * MIB + 0x5000, 0x3000)]
SEED = 11
KINDS = ("background", "precopy-live", "precopy-stopped")

# a smaller guest for the return-path and crash tests
SMALL_MEMORY = "128M"
SMALL_LAYOUT = [(16 * MIB, 24 * MIB), (48 * MIB + 0x777, 0x9000)]
SMALL_SEED = 12


def blob_guest(blobs, memory=MEMORY, **kw):
    return qsnaptools.blob_guest(blobs, memory, **kw)


def start_save(vm, img, kind, caps=None, max_bandwidth=None, opts=()):
    vm.set_parameters(max_bandwidth=max_bandwidth or 16 << 30)
    if caps:
        vm.set_capabilities(caps)
    if kind == "background":
        vm.set_capabilities(background_snapshot=True)
    elif kind == "precopy-stopped":
        vm.stop()
    vm.migrate("exec:" + qsnap_cmd("save", *opts, img))


def save(vm, img, kind, timeout=180, **kw):
    """Save ``vm`` through exec:qsnap save; return the final query-migrate."""
    start_save(vm, img, kind, **kw)
    info = vm.wait_migration(timeout=timeout)
    wait_save_done(vm)
    return info


def check_image(img, blobs=()):
    """qemu-img check, qsnap check, blobs in the raw conversion; returns (info, raw path)."""
    assert Path(img).is_file(), f"no image at {img}"
    assert not temp_leftovers(img)
    qemu_img_check(img)
    r = run_qsnap("check", img)
    assert r.returncode == 0, f"qsnap check: {r.returncode}\n{r.stdout}\n{r.stderr}"
    info = qsnap_info(img)
    assert info["complete"]
    raw = qemu_img_raw(img, Path(img).with_suffix(".raw"))
    ram = block(info, "pc.ram")
    check_blobs_in_raw(raw, ram["offset"], blobs)
    return info, raw


# --------------------------------------------------------------------------
# blob guest: background snapshot, live precopy, stopped guest


@pytest.fixture(scope="module")
def blob_saves(qemu_bin, tmp_path_factory):
    d = tmp_path_factory.mktemp("blob-saves")
    guests.check_blob_layout(LAYOUT, parse_size(MEMORY))
    blobs = guests.make_blobs(d / "blobs", LAYOUT, SEED)
    out = {}
    for kind in KINDS:
        img = d / f"{kind}.qsnap"
        vm = blob_guest(blobs)
        try:
            info = save(vm, img, kind)
            out[kind] = (img, info, vm.status(), vm.log_tail())
        finally:
            vm.shutdown()
    return blobs, out


@pytest.mark.all_qemu
@pytest.mark.parametrize("kind", KINDS)
def test_blob_save(blob_saves, kind):
    """Completed migration; image passes qemu-img check and qsnap check; blobs exact."""
    blobs, out = blob_saves
    img, mig, status, log = out[kind]
    assert mig["status"] == "completed"
    assert status == ("running" if kind == "background" else "postmigrate")
    assert "qsnap: saved" in log and "qsnap: error" not in log
    check_image(img, blobs)


@pytest.mark.all_qemu
@pytest.mark.parametrize("kind", KINDS)
def test_blob_save_density(blob_saves, kind):
    """Zero pages take no space: file <= 1.15 x non-zero page bytes + 4 MiB."""
    blobs, out = blob_saves
    img = out[kind][0]
    info = qsnap_info(img)
    raw = Path(img).with_suffix(".raw")
    if not raw.exists():
        qemu_img_raw(img, raw)
    # non-zero pages counted in qemu-img's view of the RAM regions, not by qsnap
    nz = sum(nonzero_pages(raw, b["offset"], b["length"]) for b in info["ram_blocks"])
    assert nz == sum(b["nonzero_pages"] for b in info["ram_blocks"])
    assert nz * PAGE_SIZE >= sum(len(b.data) for b in blobs)
    size = Path(img).stat().st_size
    limit = 1.15 * nz * PAGE_SIZE + 4 * MIB
    assert size <= limit, f"{size / MIB:.1f} MiB file for {nz * PAGE_SIZE / MIB:.1f} MiB of pages"


# --------------------------------------------------------------------------
# live Linux guest


LINUX_KINDS = ("background", "precopy-live")


@pytest.fixture(scope="module")
def linux_saves(linux_guest_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("linux-saves")
    out = {}
    with LinuxGuest(*linux_guest_files, env=qsnap_env()) as vm:
        for kind in LINUX_KINDS:
            vm.wait_ticks(vm.ticks() + 2, timeout=120)
            before = vm.ticks()
            img = d / f"linux-{kind}.qsnap"
            info = save(vm, img, kind, max_bandwidth=32 * MIB)
            out[kind] = (img, info, before, vm.ticks(), vm.status())
            if kind == "background":
                vm.wait_ticks(vm.ticks() + 1)  # still running after the snapshot
                vm.set_capabilities(background_snapshot=False)
    return out


@pytest.mark.all_qemu
@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_linux_save(linux_saves, kind):
    img, mig, before, after, status = linux_saves[kind]
    assert mig["status"] == "completed"
    if kind == "background":
        assert status == "running"
    else:
        assert status == "postmigrate"
        assert after >= before + 2, "the guest did not run during the live precopy"
        assert mig["ram"]["dirty-sync-count"] >= 3
    info, _raw = check_image(img)
    # /init keeps 32 MiB of random data in tmpfs
    assert block(info, "pc.ram")["nonzero_pages"] * PAGE_SIZE > 40 * MIB


# --------------------------------------------------------------------------
# return path


@pytest.fixture(scope="module")
def small_blobs(tmp_path_factory):
    guests.check_blob_layout(SMALL_LAYOUT, parse_size(SMALL_MEMORY))
    return guests.make_blobs(tmp_path_factory.mktemp("small-blobs"), SMALL_LAYOUT, SMALL_SEED)


RP_TRACE = ["-trace", "source_return_path_thread_*"]


@pytest.mark.all_qemu
@pytest.mark.parametrize("caps,kind", [
    ({"return-path": True}, "precopy-stopped"),
    ({"return-path": True}, "precopy-live"),
    ({"postcopy-ram": True}, "precopy-live"),
], ids=["return-path-stopped", "return-path-live", "postcopy-ram"])
def test_return_path(qemu_bin, small_blobs, tmp_path, caps, kind):
    """qsnap answers PING with PONG and sends SHUT 0 once the image is in place."""
    img = tmp_path / "rp.qsnap"
    vm = blob_guest(small_blobs, memory=SMALL_MEMORY, args=RP_TRACE)
    try:
        start_save(vm, img, kind, caps=caps)
        mig = vm.wait_migration(timeout=60)
        # the source completes only after SHUT, which qsnap sends after the rename
        assert img.is_file()
        wait_save_done(vm)
        log = vm.log_tail(20000)
    finally:
        vm.shutdown()
    assert mig["status"] == "completed"
    assert "source_return_path_thread_pong 0x1" in log
    assert "source_return_path_thread_shut 0x0" in log
    check_image(img, small_blobs)


def test_return_path_needs_shut(qemu_bin, small_blobs, tmp_path):
    """Control: with a return path, a sink that never answers leaves the source hanging."""
    vm = blob_guest(small_blobs, memory=SMALL_MEMORY)
    try:
        vm.set_capabilities({"return-path": True})
        vm.stop()
        vm.migrate(f"exec:cat > {tmp_path / 'rp.stream'}")
        with pytest.raises(QemuError, match="still 'active'"):
            vm.wait_migration(timeout=3)
    finally:
        vm.kill()
        vm.shutdown()


def test_return_path_reports_failure(qemu_bin, small_blobs, tmp_path):
    """A save that fails after QEMU sent everything fails the migration (SHUT 1).

    The tmpfs holds the data clusters but not the metadata and tables written
    at the end. Without a return path QEMU would already say 'completed'.
    """
    big = tmp_path / "big"
    big.mkdir()
    ref = big / "ref.qsnap"
    vm = blob_guest(small_blobs, memory=SMALL_MEMORY)
    try:
        save(vm, ref, "precopy-stopped")
    finally:
        vm.shutdown()
    size = ref.stat().st_size
    small = tmp_path / "small"
    with _tmpfs(small, size - 3 * MIB):
        img = small / "img.qsnap"
        for caps, expect in (({"return-path": True}, "failed"), ({}, "completed")):
            vm = blob_guest(small_blobs, memory=SMALL_MEMORY)
            try:
                start_save(vm, img, "precopy-stopped", caps=caps)
                if expect == "failed":
                    with pytest.raises(QemuError, match="migration failed"):
                        vm.wait_migration(timeout=60)
                else:
                    vm.wait_migration(timeout=60)
                wait_save_done(vm)
                log = vm.log_tail(20000)
            finally:
                vm.shutdown()
            assert len(error_lines(log)) == 1, log
            assert "no space left" in error_lines(log)[0].lower()
            assert not img.exists()
            assert not temp_leftovers(img)


# --------------------------------------------------------------------------
# crashes: truncated input, SIGKILL, full disk


@pytest.fixture(scope="module")
def small_stream(qemu_bin, small_blobs, tmp_path_factory):
    """A real stream of the small blob guest (stopped, precopy) and its device-state offset."""
    from qsnap.stream import events as ev
    from qsnap.stream.reader import StreamReader

    d = tmp_path_factory.mktemp("small-stream")
    path = d / "raw.stream"
    vm = blob_guest(small_blobs, memory=SMALL_MEMORY)
    try:
        vm.stop()
        vm.migrate(f"exec:cat > {path}")
        vm.wait_migration(timeout=60)
        wait_save_done(vm)
    finally:
        vm.shutdown()
    ds = None
    with open(path, "rb") as f:
        for e in StreamReader(f):
            if isinstance(e, ev.DeviceState):
                ds = (e.offset, len(e.data))
    return path, ds


def _older_image(path):
    data = b"an older image at this path\n" * 1000
    path.write_bytes(data)
    return data


def test_truncated_streams(small_stream, tmp_path):
    raw, (ds_off, ds_len) = small_stream
    size = raw.stat().st_size
    assert ds_off + ds_len == size
    cuts = [0, 6, 100, 5000, size // 2, ds_off - 1, ds_off, ds_off + 200, ds_off + ds_len // 2,
            size - 300, size - 1]
    full = run_qsnap("save", tmp_path / "full.qsnap", stdin=open(raw, "rb"))
    assert full.returncode == 0, full.stderr
    data = raw.read_bytes()
    for n in cuts:
        for older in (False, True):
            img = tmp_path / f"cut-{n}-{older}.qsnap"
            old = _older_image(img) if older else None
            r = subprocess.run(["sh", "-c", f"head -c {n} {raw} | " + qsnap_cmd("save", img)],
                               capture_output=True, env=qsnap_env(), timeout=60)
            what = f"cut at {n} of {size} (device state at {ds_off})"
            assert r.returncode != 0, what
            errs = error_lines(r.stderr)
            assert len(errs) == 1 and len(r.stderr.decode().strip().splitlines()) == 1, \
                f"{what}: {r.stderr.decode()}"
            assert_same(r.stdout, b"", what)
            if older:
                assert_same(img.read_bytes(), old, what)
            else:
                assert not img.exists(), what
            assert not temp_leftovers(img), what
    assert len(data) == size


def test_sigkill_during_save(qemu_bin, small_blobs, tmp_path):
    """kill -9 of qsnap mid-migration: QEMU fails the migration, the older image stays."""
    img = tmp_path / "vm.qsnap"
    old = _older_image(img)
    vm = blob_guest(small_blobs, memory=SMALL_MEMORY)
    try:
        # ~26 MiB at 8 MiB/s: about 3 s of migration
        start_save(vm, img, "precopy-live", max_bandwidth=8 * MIB)

        def qsnap_pid():
            for pid, argv in vm.descendants():
                if "qsnap" in argv and "save" in argv:
                    return pid
            return None

        pid = wait_for(qsnap_pid, 10, "the qsnap child of QEMU")
        wait_for(lambda: vm.query_migrate().get("ram", {}).get("transferred", 0) > 8 * MIB, 10,
                 "8 MiB sent to qsnap")
        assert vm.query_migrate()["status"] == "active"
        assert temp_leftovers(img)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(QemuError, match="migration failed"):
            vm.wait_migration(timeout=60)
        wait_save_done(vm)
    finally:
        vm.shutdown()
    assert_same(img.read_bytes(), old, "img.read_bytes()")
    # the killed save left its temporary file, marked incomplete
    left = temp_leftovers(img)
    assert len(left) == 1
    info = qsnap_info(left[0])
    assert info["complete"] is False
    r = run_qsnap("load", left[0])
    assert r.returncode != 0 and len(error_lines(r.stderr)) == 1


def test_cancel_during_save(qemu_bin, small_blobs, tmp_path):
    """migrate_cancel mid-save: QEMU closes the pipe, qsnap reports the truncation, no image."""
    img = tmp_path / "vm.qsnap"
    vm = blob_guest(small_blobs, memory=SMALL_MEMORY)
    try:
        start_save(vm, img, "precopy-live", max_bandwidth=8 * MIB)
        wait_for(lambda: vm.query_migrate().get("ram", {}).get("transferred", 0) > 4 * MIB, 10,
                 "4 MiB sent to qsnap")
        vm.qmp("migrate_cancel")
        vm.wait_migration(statuses=("cancelled",), timeout=30)
        wait_save_done(vm)
        assert vm.status() == "running"
        log = vm.log_tail(20000)
    finally:
        vm.shutdown()
    errs = error_lines(log)
    assert len(errs) == 1 and "truncated stream" in errs[0], log
    assert not img.exists() and not temp_leftovers(img)


class _tmpfs:
    def __init__(self, path, size):
        self.path, self.size = Path(path), size

    def __enter__(self):
        self.path.mkdir(exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs",
                            str(self.path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
        return self.path

    def __exit__(self, *exc):
        subprocess.run(["umount", str(self.path)], check=True)


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_full_disk(small_stream, tmp_path, cache):
    raw = small_stream[0]
    assert raw.stat().st_size > 20 * MIB
    with _tmpfs(tmp_path / "small", 16 * MIB) as d:
        img = d / "vm.qsnap"
        r = run_qsnap("save", f"--cache={cache}", img, stdin=open(raw, "rb"))
        assert r.returncode != 0
        errs = error_lines(r.stderr)
        assert len(errs) == 1, r.stderr.decode()
        assert errs[0].startswith("qsnap: error: no space left"), errs[0]
        assert not img.exists()
        assert not temp_leftovers(img)
        assert not any(d.iterdir())
