"""Capture real QEMU migration streams and prove them with QEMU itself.

Each stream is written with ``migrate "exec:cat > FILE"`` and then loaded into
a fresh destination (``-incoming defer``, ``migrate_incoming "exec:cat FILE"``).
For blob guests the destination's RAM must hold every blob byte for byte; for
the Linux guest the restored guest must keep ticking. No qsnap code is
involved, so these tests check the harness and the captures; the reader tests
at the end check ``qsnap.stream.reader`` against the same files.
"""

import gzip
import subprocess
import sys
import time

import pytest

from bigcmp import assert_same

from qsnaptest import guests
from qsnaptest.tools import qsnap_env, run_qsnap
from .capture_data import DATA_FILE, DATA_LAYOUT, DATA_MEMORY, DATA_SEED
from qsnaptest.qemu import (CAPTURE_KINDS, QEVM_MAGIC, QEVM_VERSION, BlobGuest, CaptureUnsupported,
                   LinuxGuest, Qemu, capture_stream, parse_size, stream_header)

MEMORY = "32M"
LAYOUT = [(16 << 20, 1 << 20), ((20 << 20) + 0x123, 0x2345), (30 << 20, 0x10000)]
SEED = 7
PAGE_SIZE = 4096
RAM_SAVE_FLAG_ZERO = 0x02  # migration/ram.c


def restore(path, memory, **kw) -> Qemu:
    """Start a paused destination and load ``path`` into it; the caller shuts it down."""
    dst = Qemu(memory=memory, incoming=True, paused=True, name="dst", **kw).start()
    try:
        dst.migrate_incoming(f"exec:cat {path}")
        dst.wait_migration(timeout=120)
    except BaseException:
        dst.shutdown()
        raise
    return dst


def assert_blobs(vm: Qemu, blobs):
    for b in blobs:
        got = vm.read_memory(b.addr, len(b.data))
        assert_same(got, b.data, f"blob at {b.addr:#x}")


def _capture_or_skip(vm, path, kind, **kw):
    try:
        return capture_stream(vm, path, kind, **kw)
    except CaptureUnsupported as e:
        pytest.skip(f"host cannot do background snapshots: {e}")


# --------------------------------------------------------------------------
# blob guests


@pytest.mark.parametrize("memory", ["32M", "256M"])
def test_blobs_survive_boot(qemu_bin, blob_factory, tmp_path, memory):
    """Blobs are intact after SeaBIOS gave up, and SeaBIOS wrote nowhere else."""
    mem = parse_size(memory)
    end = guests.blob_safe_end(mem)
    layout = [(guests.BLOB_MIN_ADDR, 0x10000), (end - 0x10000, 0x10000)]
    guests.check_blob_layout(layout, mem)
    blobs = blob_factory(layout, seed=1)
    with BlobGuest(memory=memory, blobs=blobs) as vm:
        assert vm.status() == "running"
        vm.wait_bios_done()
        vm.verify_blobs()
        ram = vm.ram_dump(tmp_path / "ram.bin").read_bytes()
    allowed = guests.seabios_areas(mem) + [(b.addr, b.addr + len(b.data)) for b in blobs]
    for page in range(0, mem, PAGE_SIZE):
        if any(ram[page:page + PAGE_SIZE]):
            assert any(lo <= page and page + PAGE_SIZE <= hi for lo, hi in allowed), \
                f"unexpected non-zero page {page:#x}"


@pytest.fixture(scope="module")
def blob_streams(qemu_bin, tmp_path_factory):
    """{kind: (stream path, query-migrate info)} for one capture of each kind."""
    d = tmp_path_factory.mktemp("blob-streams")
    guests.check_blob_layout(LAYOUT, parse_size(MEMORY))
    blobs = guests.make_blobs(d, LAYOUT, SEED)
    out = {}
    for kind in CAPTURE_KINDS:
        path = d / f"{kind}.stream"
        with BlobGuest(memory=MEMORY, blobs=blobs) as vm:
            time.sleep(0.5)
            t = time.monotonic()
            try:
                info = capture_stream(vm, path, kind, timeout=60)
            except CaptureUnsupported as e:
                out[kind] = e
                continue
            info["_seconds"] = time.monotonic() - t
            info["_status_after"] = vm.status()
        out[kind] = (path, info)
    return blobs, out


def _stream(blob_streams, kind):
    blobs, out = blob_streams
    if isinstance(out[kind], Exception):
        pytest.skip(f"host cannot do background snapshots: {out[kind]}")
    return blobs, out[kind]


@pytest.mark.all_qemu
@pytest.mark.parametrize("kind", CAPTURE_KINDS)
def test_blob_capture(blob_streams, kind):
    _, (path, info) = _stream(blob_streams, kind)
    assert info["status"] == "completed"
    assert stream_header(path) == (QEVM_MAGIC, QEVM_VERSION)
    # every page is in the stream; the random blobs can only be sent as full pages
    assert path.stat().st_size > sum(size for _, size in LAYOUT)
    expected_state = {"background": "running", "precopy-live": "postmigrate",
                      "precopy-stopped": "postmigrate"}[kind]
    assert info["_status_after"] == expected_state


@pytest.mark.all_qemu
@pytest.mark.parametrize("kind", CAPTURE_KINDS)
def test_blob_capture_restores(blob_streams, kind):
    blobs, (path, _) = _stream(blob_streams, kind)
    dst = restore(path, MEMORY)
    try:
        assert dst.status() in ("paused", "prelaunch")
        assert_blobs(dst, blobs)
    finally:
        dst.shutdown()


# Where the builds' streams differ (migration-stream.md; tests/data/README.md):
# QEMU 10.0 numbers the ram section 1 (7.2: 2), sends SWITCHOVER_START (11)
# before the RAM END of a precopy with a machine type >= 10.0, and its
# VMDESCRIPTION JSON starts with a "configuration" member.
RAM_SECTION_ID = {"7.2": 2, "10.0": 1}


def stream_features(path) -> dict:
    from qsnap.stream.events import Command, Configuration, DeviceState, SectionHeader
    from qsnap.stream.reader import StreamReader
    out = {"ram_ids": set(), "commands": [], "machine": None, "vmdesc_keys": None}
    with open(path, "rb") as f:
        for e in StreamReader(f):
            if isinstance(e, SectionHeader):
                out["ram_ids"].add(e.section_id)
            elif isinstance(e, Command):
                out["commands"].append(e.name)
            elif isinstance(e, Configuration):
                out["machine"] = e.machine
            elif isinstance(e, DeviceState):
                out["vmdesc_keys"] = list(e.vmdescription or {})
    return out


@pytest.mark.all_qemu
@pytest.mark.parametrize("kind", CAPTURE_KINDS)
def test_stream_features(qemu, blob_streams, kind, tmp_path):
    """This build's stream has its build's features, and qsnap save + load keeps them."""
    _, (path, _) = _stream(blob_streams, kind)
    got = stream_features(path)
    assert got["machine"] == qemu.machine("pc")
    if qemu.major_minor in RAM_SECTION_ID:
        assert got["ram_ids"] == {RAM_SECTION_ID[qemu.major_minor]}
    newer = qemu.version_tuple >= (10, 0)
    assert got["commands"] == (["SWITCHOVER_START"] if newer and kind != "background" else [])
    assert got["vmdesc_keys"] == (["configuration"] if newer else []) + ["page_size", "devices"]
    img, again = tmp_path / "img.qsnap", tmp_path / "again.stream"
    with open(path, "rb") as f:
        r = run_qsnap("save", "-q", img, stdin=f)
    assert r.returncode == 0, r.stderr
    with open(again, "wb") as f:
        r = subprocess.run([sys.executable, "-m", "qsnap", "load", "-q", str(img)], stdout=f,
                           stderr=subprocess.PIPE, env=qsnap_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    regenerated = stream_features(again)
    assert regenerated["ram_ids"] == got["ram_ids"] and regenerated["machine"] == got["machine"]
    assert [c for c in regenerated["commands"] if c == "SWITCHOVER_START"] == \
        [c for c in got["commands"] if c == "SWITCHOVER_START"]


def test_restore_detects_wrong_blob(blob_streams):
    """The restore check can fail: other blob bytes do not match."""
    blobs, (path, _) = _stream(blob_streams, "precopy-stopped")
    other = guests.make_blobs(path.parent / "other", LAYOUT, SEED + 1)
    dst = restore(path, MEMORY)
    try:
        with pytest.raises(AssertionError):
            assert_blobs(dst, other)
    finally:
        dst.shutdown()


# --------------------------------------------------------------------------
# live Linux guest (TCG)


# ~100 MiB of the 256 MiB guest is non-zero: at 32 MiB/s a precopy takes ~4 s,
# while /init rewrites 4 MiB every ~0.5 s
LINUX_BANDWIDTH = 32 << 20


LINUX_KINDS = ("background", "precopy-live")


@pytest.fixture(scope="module")
def linux_streams(linux_guest_files, tmp_path_factory):
    """One boot of the live guest, captured twice: background snapshot, then live precopy.

    {kind: (path, query-migrate info, tick before, tick after, status after)}
    """
    kernel, initrd = linux_guest_files
    d = tmp_path_factory.mktemp("linux-streams")
    out = {}
    with LinuxGuest(kernel, initrd) as vm:
        for kind in LINUX_KINDS:
            vm.wait_ticks(vm.ticks() + 2, timeout=120)
            before = vm.ticks()
            path = d / f"linux-{kind}.stream"
            try:
                info = capture_stream(vm, path, kind, timeout=180,
                                      max_bandwidth=LINUX_BANDWIDTH)
            except CaptureUnsupported as e:
                out[kind] = e
                continue
            out[kind] = (path, info, before, vm.ticks(), vm.status())
            if kind == "background":
                vm.set_capabilities(background_snapshot=False)
    return out


def _linux_stream(linux_streams, kind):
    if isinstance(linux_streams[kind], Exception):
        pytest.skip(f"host cannot do background snapshots: {linux_streams[kind]}")
    return linux_streams[kind]


@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_linux_capture(linux_streams, kind):
    path, info, before, after, status = _linux_stream(linux_streams, kind)
    assert info["status"] == "completed"
    assert stream_header(path) == (QEVM_MAGIC, QEVM_VERSION)
    if kind == "background":
        # 7.2 does not rate-limit background snapshots (~0.5 s here); the
        # guest was running when the snapshot was taken and keeps running
        assert status == "running"
    else:
        # the guest ran (and dirtied RAM) while its RAM was being sent, and
        # the pages it dirtied after the first pass were resent
        assert after >= before + 2
        assert status == "postmigrate"
        assert info["ram"]["dirty-sync-count"] >= 3


@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_linux_capture_restores(linux_streams, linux_guest_files, kind):
    """The restored guest resumes where the stream was taken and keeps ticking."""
    path, _info, before, _after, _status = _linux_stream(linux_streams, kind)
    with LinuxGuest(*linux_guest_files, incoming=True, name="linux-dst") as dst:
        dst.migrate_incoming(f"exec:cat {path}")
        dst.wait_migration(timeout=120)
        first = dst.wait_ticks(0, timeout=60)
        assert first >= before
        dst.wait_ticks(first + 2, timeout=60)


# --------------------------------------------------------------------------
# the committed stream (tests/data)


def test_committed_stream_restores(qemu_bin, tmp_path):
    path = tmp_path / "bg72.stream"
    path.write_bytes(gzip.decompress(DATA_FILE.read_bytes()))
    assert stream_header(path) == (QEVM_MAGIC, QEVM_VERSION)
    blobs = guests.make_blobs(tmp_path / "blobs", DATA_LAYOUT, DATA_SEED)
    dst = restore(path, DATA_MEMORY)
    try:
        assert_blobs(dst, blobs)
    finally:
        dst.shutdown()


# --------------------------------------------------------------------------
# qsnap's stream reader against real captures


def rebuild_ram(path, idstr: str = "pc.ram", size: int = None) -> bytearray:
    """RAM block ``idstr`` as the stream leaves it (last write wins, ZERO -> zeros)."""
    reader = pytest.importorskip("qsnap.stream.reader")
    ram = bytearray(size or 0)
    seen = 0
    with open(path, "rb") as f:
        for ev in reader.StreamReader(f):
            if type(ev).__name__ != "PageBatch":
                continue
            for block, offset, flags, payload in ev.iter_pages():
                if block != idstr:
                    continue
                seen += 1
                if payload is None:  # ZERO
                    payload = bytes(PAGE_SIZE)
                elif flags & RAM_SAVE_FLAG_ZERO:  # ZERO with a fill byte
                    payload = payload * PAGE_SIZE
                assert len(payload) == PAGE_SIZE, f"{flags=:#x} {len(payload)=}"
                if offset + PAGE_SIZE > len(ram):
                    ram.extend(bytes(offset + PAGE_SIZE - len(ram)))
                ram[offset:offset + PAGE_SIZE] = payload
    assert seen, f"no {idstr} pages in {path}"
    return ram


@pytest.mark.all_qemu
@pytest.mark.parametrize("kind", CAPTURE_KINDS)
def test_reader_recovers_blobs(blob_streams, kind):
    blobs, (path, _) = _stream(blob_streams, kind)
    ram = rebuild_ram(path, size=parse_size(MEMORY))
    for b in blobs:
        assert_same(bytes(ram[b.addr:b.addr + len(b.data)]), b.data, f"blob {b.addr:#x}")


def test_reader_recovers_committed_blobs(tmp_path):
    path = tmp_path / "bg72.stream"
    path.write_bytes(gzip.decompress(DATA_FILE.read_bytes()))
    ram = rebuild_ram(path, size=parse_size(DATA_MEMORY))
    for addr, data in ((b.addr, b.data) for b in
                       guests.make_blobs(tmp_path / "blobs", DATA_LAYOUT, DATA_SEED)):
        assert_same(bytes(ram[addr:addr + len(data)]), data, f"blob {addr:#x}")


@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_reader_matches_qemu_restore(linux_streams, linux_guest_files, tmp_path, kind):
    """pc.ram rebuilt by the reader == pc.ram of a QEMU that loaded the same stream."""
    pytest.importorskip("qsnap.stream.reader")
    path = _linux_stream(linux_streams, kind)[0]
    with LinuxGuest(*linux_guest_files, incoming=True, paused=True, name="linux-dst") as dst:
        dst.migrate_incoming(f"exec:cat {path}")
        dst.wait_migration(timeout=120)
        qemu_ram = dst.ram_dump(tmp_path / "ram.bin").read_bytes()
        mem = dst.memory
    ram = rebuild_ram(path, size=mem)
    assert len(ram) == len(qemu_ram) == mem
    # [0xa0000, 0x100000) is VGA/ROM/PAM in the guest-physical view pmemsave reads
    for lo, hi in ((0, 0xa0000), (0x100000, mem)):
        if ram[lo:hi] != qemu_ram[lo:hi]:
            bad = next(i for i in range(lo, hi, PAGE_SIZE)
                       if ram[i:i + PAGE_SIZE] != qemu_ram[i:i + PAGE_SIZE])
            pytest.fail(f"pc.ram differs from QEMU's restore at page {bad:#x}")
