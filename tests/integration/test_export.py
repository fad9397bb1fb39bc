"""`qsnap export` / `qsnap import` against real QEMU.

* ELF: a stopped guest is saved (`stop`, then migrate "exec:qsnap save IMG")
  and dumped by QEMU itself (dump-guest-memory, paging: false) at the same
  instant; `qsnap export --format=elf` of the image must have the same bytes
  at the same guest-physical addresses and the same registers in NT_PRSTATUS,
  and readelf, gdb and Volatility 3 must read it.
* mapped-ram with QEMU 10.0 (QSNAP_QEMU must name 10.0, as in CI; skipped
  otherwise, failed when it is missing under QSNAP_REQUIRE_QEMU=1): an
  exported file restores in QEMU to the RAM `qsnap load` gives; a file QEMU
  wrote (with and without multifd), imported, loads to the RAM QEMU's own
  restore of that file gives; an image saved by the test's own build (7.2 in
  CI) restores in 10.0, same machine type, through mapped-ram.
"""
import os
import shutil
import subprocess

import pytest

from elfcore import read_core

from qsnaptest import guests, tools as qsnaptools
from qsnaptest.qemu import BlobGuest, LinuxGuest, Qemu, parse_size
from qsnaptest.tools import compare_ram, qsnap_cmd, qsnap_env, run_qsnap, wait_save_done

from .conftest import require_qemu, requested_build

MIB = 1 << 20
MEMORY = "128M"
LAYOUT = [(16 * MIB, 8 * MIB), (64 * MIB + 0x123, 3 * MIB), (100 * MIB, 0x5000)]
SEED = 31
CHUNK = 16 * MIB


def save_stopped(vm, img):
    """stop, then exec:qsnap save IMG; the guest stays stopped for dump-guest-memory."""
    vm.set_parameters(max_bandwidth=16 << 30)
    vm.stop()
    vm.migrate("exec:" + qsnap_cmd("save", "-q", img))
    vm.wait_migration(timeout=180)
    wait_save_done(vm)
    assert vm.status() in ("paused", "postmigrate")


def dump_guest_memory(vm, path):
    vm.qmp("dump-guest-memory", paging=False, protocol=f"file:{path}")
    return read_core(path)


def export(img, out, fmt):
    r = run_qsnap("export", f"--format={fmt}", img, out, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    assert b"qsnap: warning" not in r.stderr, r.stderr.decode()
    return out


def assert_same_loads(ours, qemu):
    """Every byte QEMU's core holds, ours holds at the same guest-physical address."""
    assert ours.loads, "no PT_LOAD in the export"
    for q in qemu.loads:
        assert q.filesz == q.memsz
        covering = [s for s in ours.loads if s.paddr <= q.paddr and q.paddr + q.memsz <= s.paddr + s.memsz]
        assert covering, f"QEMU's PT_LOAD {q.paddr:#x}+{q.memsz:#x} is not in the export: {ours.loads}"
        s = covering[0]
        with open(qemu.path, "rb") as fq, open(ours.path, "rb") as fo:
            for off in range(0, q.memsz, CHUNK):
                n = min(CHUNK, q.memsz - off)
                fq.seek(q.offset + off)
                fo.seek(s.offset + q.paddr - s.paddr + off)
                a, b = fq.read(n), fo.read(n)
                if a != b:
                    bad = next(i for i in range(0, n, 4096) if a[i:i + 4096] != b[i:i + 4096])
                    raise AssertionError(f"guest-physical page {q.paddr + off + bad:#x} differs")


def assert_same_registers(ours, qemu):
    gprs_q, gprs_o = qemu.prstatus(), ours.prstatus()
    assert len(gprs_q) == len(gprs_o) > 0
    assert ours.machine == qemu.machine
    for q, o in zip(gprs_q, gprs_o):
        assert {k: hex(v) for k, v in o.items()} == {k: hex(v) for k, v in q.items()}
    # the whole QEMUCPUState: segments with bases, limits and flags, cr0-cr4, kernel_gs_base
    for q, o in zip(qemu.qemu_notes(), ours.qemu_notes()):
        assert len(q) == len(o) == 440
        diff = [i for i in range(0, 440, 8) if q[i:i + 8] != o[i:i + 8]]
        assert not diff, f"QEMU note differs at byte offsets {diff}"


def readelf_notes(path):
    r = subprocess.run(["readelf", "--notes", str(path)], capture_output=True, text=True, check=True)
    return r.stdout


def gdb_pc(path):
    if shutil.which("gdb") is None:
        pytest.fail("gdb is not installed (.ci/run installs it)") if require_qemu() else pytest.skip("no gdb")
    r = subprocess.run(["gdb", "-batch", "-nx", "-c", str(path), "-ex", "p/x $pc"],
                       capture_output=True, text=True, timeout=120)
    last = [ln for ln in r.stdout.splitlines() if ln.startswith("$1 = ")]
    assert last, r.stdout + r.stderr
    return int(last[0].split("=")[1], 16)


# --------------------------------------------------------------------------
# ELF against dump-guest-memory, QEMU 7.2


@pytest.fixture(scope="module")
def blob_cores(qemu_bin, tmp_path_factory):
    d = tmp_path_factory.mktemp("export-blob")
    guests.check_blob_layout(LAYOUT, parse_size(MEMORY))
    blobs = guests.make_blobs(d / "blobs", LAYOUT, SEED)
    img, ours, qemu = saved_and_dumped(blobs, MEMORY, d)
    return blobs, img, ours, qemu


def saved_and_dumped(blobs, memory, d):
    """A blob guest saved stopped into d/vm.qsnap and dumped by QEMU's dump-guest-memory:
    (image, our ELF export of it, QEMU's core), both cores read."""
    img = d / "vm.qsnap"
    vm = qsnaptools.blob_guest(blobs, memory)
    try:
        save_stopped(vm, img)
        qemu = dump_guest_memory(vm, d / "qemu.core")
    finally:
        vm.shutdown()
    return img, read_core(export(img, d / "qsnap.core", "elf")), qemu


def test_blob_elf_matches_dump_guest_memory(blob_cores):
    blobs, _img, ours, qemu = blob_cores
    assert_same_loads(ours, qemu)
    assert_same_registers(ours, qemu)
    for b in blobs:
        assert ours.read_gpa(b.addr, len(b.data)) == b.data


def test_blob_elf_is_sparse(blob_cores):
    _blobs, _img, ours, _qemu = blob_cores
    st = os.stat(ours.path)
    assert st.st_blocks * 512 < 20 * MIB < st.st_size  # ~11 MiB of blobs in a 128 MiB guest


def test_blob_elf_tools_read_it(blob_cores):
    _blobs, _img, ours, qemu = blob_cores
    notes = readelf_notes(ours.path)
    assert "NT_PRSTATUS" in notes and "QEMU" in notes
    pc = ours.prstatus()[0]
    assert gdb_pc(ours.path) == pc.get("rip", pc.get("eip")) == gdb_pc(qemu.path)


def test_blob_raw_is_guest_physical(blob_cores, tmp_path):
    blobs, img, _ours, qemu = blob_cores
    raw = export(img, tmp_path / "vm.raw", "raw")
    with open(raw, "rb") as f:
        for s in qemu.loads:
            f.seek(s.paddr)
            assert f.read(4096) == qemu.read_gpa(s.paddr, 4096)
        for b in blobs:
            f.seek(b.addr)
            assert f.read(len(b.data)) == b.data


def test_q35_blob_elf_matches_dump_guest_memory(qemu_bin, tmp_path):
    blobs = guests.make_blobs(tmp_path / "blobs", LAYOUT, SEED + 3)
    img = tmp_path / "vm.qsnap"
    vm = qsnaptools.blob_guest(blobs, MEMORY, machine="pc-q35-7.2")
    try:
        save_stopped(vm, img)
        qemu = dump_guest_memory(vm, tmp_path / "qemu.core")
    finally:
        vm.shutdown()
    ours = read_core(export(img, tmp_path / "qsnap.core", "elf"))
    assert_same_loads(ours, qemu)
    assert_same_registers(ours, qemu)
    for b in blobs:
        assert ours.read_gpa(b.addr, len(b.data)) == b.data


# 3.5 GiB: the smallest pc-i440fx guest whose RAM is split around the PCI hole
# (3 GiB below, 512 MiB from 4 GiB); one blob in each part
BIG_MEMORY = "3584M"
BIG_LAYOUT = [(32 * MIB, 2 * MIB), ((1 << 32) + 100 * MIB + 0x777, 2 * MIB)]


@pytest.mark.slow
def test_blob_elf_above_4g_matches_dump_guest_memory(qemu_bin, tmp_path):
    blobs = guests.make_blobs(tmp_path / "blobs", BIG_LAYOUT, SEED + 2)
    _, ours, qemu = saved_and_dumped(blobs, BIG_MEMORY, tmp_path)
    assert [(s.paddr, s.memsz) for s in ours.loads if s.paddr != (1 << 32) - 0x40000] == \
        [(0, 3 << 30), (1 << 32, 512 * MIB)]
    assert_same_loads(ours, qemu)
    assert_same_registers(ours, qemu)
    for b in blobs:
        assert ours.read_gpa(b.addr, len(b.data)) == b.data
    os.unlink(qemu.path)  # 3.5 GiB of mostly zeros


@pytest.fixture(scope="module")
def linux_cores(linux_guest_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("export-linux")
    img = d / "linux.qsnap"
    with LinuxGuest(*linux_guest_files, env=qsnap_env()) as vm:
        vm.wait_ticks(3, timeout=300)
        save_stopped(vm, img)
        qemu = dump_guest_memory(vm, d / "qemu.core")
    ours = read_core(export(img, d / "qsnap.core", "elf"))
    return img, ours, qemu


def test_linux_elf_matches_dump_guest_memory(linux_cores):
    _img, ours, qemu = linux_cores
    assert_same_loads(ours, qemu)
    assert_same_registers(ours, qemu)
    assert ours.machine == 62  # EM_X86_64: the kernel runs in long mode
    assert gdb_pc(ours.path) == ours.prstatus()[0]["rip"]


def test_linux_elf_volatility_finds_the_banner(linux_cores, tmp_path):
    _img, ours, _qemu = linux_cores
    vol = shutil.which("vol")
    if vol is None:
        msg = "Volatility 3 is not installed (pip install volatility3; the test extra has it)"
        pytest.fail(msg) if require_qemu() else pytest.skip(msg)
    r = subprocess.run([vol, "-q", "--cache-path", str(tmp_path), "-f", ours.path, "banners.Banners"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "Linux version 6." in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


# --------------------------------------------------------------------------
# mapped-ram with QEMU 10.0


@pytest.fixture(scope="module")
def qemu10():
    """The QEMU 10.0 build (mapped-ram is new in 9.0)."""
    return requested_build("10.0")


def q10(build, cls=Qemu, **kw):
    """A ``cls`` on QEMU 10.0 (``build``), by default with its own pc machine type."""
    kw.setdefault("machine", build.machine("pc"))
    kw.setdefault("memory", MEMORY)
    return cls(build=build, env=qsnap_env(), **kw)


def restored_ram(build, tmp_path, name, uri, caps=None, multifd=False):
    """RAM of a paused QEMU 10.0 after migrate_incoming ``uri``."""
    with q10(build, name=name, incoming=True, paused=True) as dst:
        if caps:
            dst.set_capabilities(caps)
        if multifd:
            dst.set_capabilities(multifd=True)
        dst.migrate_incoming(uri)
        dst.wait_migration(timeout=180)
        dst.wait_no_descendants(60)
        return dst.ram_dump(tmp_path / f"{name}.ram").read_bytes()


@pytest.fixture(scope="module")
def q10_blobs(qemu10, tmp_path_factory):
    """The blobs of the 10.0 guests (the fixture skips the tests without 10.0)."""
    d = tmp_path_factory.mktemp("export-q10")
    return guests.make_blobs(d / "blobs", LAYOUT, SEED + 1)


def test_q10_mapped_ram_export_restores(qemu10, q10_blobs, tmp_path):
    img = tmp_path / "vm.qsnap"
    vm = q10(qemu10, BlobGuest, blobs=q10_blobs, accel="tcg").start()
    try:
        vm.wait_bios_done()
        save_stopped(vm, img)
    finally:
        vm.shutdown()
    out = export(img, tmp_path / "vm.mapped-ram", "mapped-ram")
    qsnap_ram = restored_ram(qemu10, tmp_path, "dst-load", "exec:" + qsnap_cmd("load", img))
    qemu_ram = restored_ram(qemu10, tmp_path, "dst-file", f"file:{out}", caps={"mapped-ram": True})
    compare_ram(qemu_ram, qsnap_ram, "QEMU 10.0 mapped-ram restore of the export vs qsnap load")
    for b in q10_blobs:
        assert qemu_ram[b.addr:b.addr + len(b.data)] == b.data


@pytest.mark.parametrize("multifd", [False, True], ids=["plain", "multifd"])
def test_q10_mapped_ram_import(qemu10, q10_blobs, tmp_path, multifd):
    src = tmp_path / "vm.mapped-ram"
    vm = q10(qemu10, BlobGuest, blobs=q10_blobs, accel="tcg").start()
    try:
        vm.wait_bios_done()
        vm.set_capabilities({"mapped-ram": True, "multifd": multifd})
        vm.stop()
        vm.migrate(f"file:{src}")
        vm.wait_migration(timeout=180)
    finally:
        vm.shutdown()
    img = tmp_path / "vm.qsnap"
    r = run_qsnap("import", src, img)
    assert r.returncode == 0, r.stderr.decode()
    assert run_qsnap("check", img).returncode == 0
    qemu_ram = restored_ram(qemu10, tmp_path, "dst-file", f"file:{src}", caps={"mapped-ram": True},
                            multifd=multifd)
    qsnap_ram = restored_ram(qemu10, tmp_path, "dst-load", "exec:" + qsnap_cmd("load", img))
    compare_ram(qsnap_ram, qemu_ram, "qsnap load of the import vs QEMU 10.0's own mapped-ram restore")
    for b in q10_blobs:
        assert qsnap_ram[b.addr:b.addr + len(b.data)] == b.data


def test_q72_snapshot_restores_in_q10_through_mapped_ram(qemu, qemu10, blob_cores, tmp_path):
    """An image saved on the test's build (QEMU 7.2 in CI), exported to mapped-ram,
    restores in QEMU 10.0 (same machine type): the way onto QEMU's fastest restore path
    for old snapshots."""
    blobs, img, _ours, _qemu = blob_cores
    out = export(img, tmp_path / "vm.mapped-ram", "mapped-ram")
    with q10(qemu10, machine=qemu.machine("pc"), name="dst-72", incoming=True, paused=True) as dst:
        dst.set_capabilities({"mapped-ram": True})
        dst.migrate_incoming(f"file:{out}")
        dst.wait_migration(timeout=180)
        BlobGuest.verify_blobs(dst, blobs)
