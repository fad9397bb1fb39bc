"""qsnap export / import on synthetic images: layout, holes, notes, crash safety, errors."""
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from bigcmp import assert_same
from elfcore import EM_386, EM_X86_64, read_core

from qsnap.errors import ChecksumError, ImageError, QsnapError
from qsnap.export import export
from qsnap.export.memmap import FOUR_GIB, guest_ranges
from qsnap.image.reader import Image
from qsnap.save import save
from qsnap.stream.events import RamBlock
from qsnap.stream.reader import StreamReader
from qsnap.stream.writer import StreamWriter

PS = 4096
MIB = 1 << 20
BLOCKS = [RamBlock("pc.ram", 8 * MIB), RamBlock("/rom@etc/acpi/tables", 0x20000),
          RamBlock("pc.bios", 0x40000)]

SEG = {"vmsd_name": "segment", "version": 1, "fields": [
    {"name": "selector", "type": "uint32", "size": 4}, {"name": "base", "type": "uint64", "size": 8},
    {"name": "limit", "type": "uint32", "size": 4}, {"name": "flags", "type": "uint32", "size": 4}]}
CPU_FIELDS = (
    [{"name": "env.regs", "array_len": 16, "type": "uint64", "size": 8},
     {"name": "env.eip", "type": "uint64", "size": 8},
     {"name": "env.eflags", "type": "uint64", "size": 8},
     {"name": "env.hflags", "type": "uint32", "size": 4},
     {"name": "env.fpuc", "type": "uint16", "size": 2},
     {"name": "env.fpregs", "array_len": 2, "type": "struct", "size": 10, "struct": {
         "vmsd_name": "fpreg", "version": 0, "fields": [{"name": "tmp", "type": "tmp", "size": 10, "fields": [
             {"name": "tmp_mant", "type": "uint64", "size": 8}, {"name": "tmp_exp", "type": "uint16", "size": 2}]}]}},
     {"name": "env.segs", "array_len": 6, "type": "struct", "struct": SEG, "size": 20}]
    + [{"name": k, "type": "struct", "struct": SEG, "size": 20} for k in ("env.ldt", "env.tr", "env.gdt", "env.idt")]
    + [{"name": f"env.cr[{i}]", "type": "uint64", "size": 8} for i in (0, 2, 3, 4)]
    + [{"name": "env.xmm", "type": "buffer", "size": 16},
       {"name": "env.kernelgsbase", "type": "uint64", "size": 8}])
CPU_SUBS = [{"vmsd_name": "cpu/test_msr", "version": 1, "fields": [{"name": "env.msr", "type": "uint64", "size": 8}]}]
LMA = 1 << 14


def cpu_values(index, long_mode=True):
    seg = lambda i: {"selector": 0x10 + i, "base": 0x1000 * i + index, "limit": 0xFFFFF, "flags": 0xC09300}  # noqa: E731
    v = {"env.regs": [0x1111_0000_0000 * (index + 1) + r for r in range(16)], "env.eip": 0xFFFF_FFFF_8100_0000 + index,
         "env.eflags": 0x246, "env.hflags": LMA if long_mode else 0, "env.fpuc": 0x37F,
         "env.fpregs": [{"tmp": {"tmp_mant": 1, "tmp_exp": 2}}] * 2, "env.segs": [seg(i) for i in range(6)],
         "env.xmm": bytes(range(16)), "env.kernelgsbase": 0xFFFF_8880_0000_0000 + index}
    for k, i in (("env.ldt", 6), ("env.tr", 7), ("env.gdt", 8), ("env.idt", 9)):
        v[k] = seg(i)
    for i in (0, 2, 3, 4):
        v[f"env.cr[{i}]"] = 0x8000_0011 + i
    return v


def encode(fields, values):
    """vmstate bytes of ``values`` as ``fields`` describe them (big-endian integers)."""
    out = []
    for f in fields:
        vals = values[f["name"]] if "array_len" in f else [values[f["name"]]]
        for v in vals:
            if "struct" in f:
                out.append(encode(f["struct"]["fields"], v))
            elif "fields" in f:
                out.append(encode(f["fields"], v))
            elif f["type"] == "buffer":
                out.append(v)
            else:
                out.append(int(v).to_bytes(f["size"], "big"))
    return b"".join(out)


def device_state(n_cpus=1, *, long_mode=True, cpu_version=12, vmdescription=True):
    """FULL sections (timer, cpu x n, a subsection), EOF, VMDESCRIPTION."""
    f = io.BytesIO()
    w = StreamWriter(f)
    desc = [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
             "fields": [{"name": "data", "type": "buffer", "size": 9}]}]
    w.section_full(3, "timer", 0, 2, b"\x7e" * 9)
    for i in range(n_cpus):
        payload = encode(CPU_FIELDS, cpu_values(i, long_mode))
        payload += b"\x05" + bytes([len("cpu/test_msr")]) + b"cpu/test_msr" + struct.pack(">IQ", 1, 0xABC)
        w.section_full(4 + i, "cpu", i, cpu_version, payload)
        desc.append({"name": "cpu", "instance_id": i, "vmsd_name": "cpu", "version": cpu_version,
                     "fields": CPU_FIELDS, "subsections": CPU_SUBS})
    w.eof()
    if vmdescription:
        w.vmdescription(json.dumps({"page_size": PS, "devices": desc}).encode())
    return f.getvalue()


def page(block, off):
    return struct.pack(">QQ", hash(block) & 0xFFFF_FFFF | 1, off) * (PS // 16)


# pages stored: a run, a lone page, the last page; everything else zero
STORED = {"pc.ram": [0, PS, 2 * PS, 0x9F000, 5 * MIB, 8 * MIB - PS],
          "/rom@etc/acpi/tables": [0x1000], "pc.bios": [0x3F000]}


def make_stream(*, machine="pc-i440fx-7.2", blocks=BLOCKS, stored=STORED, capabilities=(), **ds):
    f = io.BytesIO()
    w = StreamWriter(f)
    w.header()
    w.configuration(machine, capabilities=capabilities)
    w.section_start(2, "ram", 0, 4)
    w.mem_size(blocks)
    w.eos()
    w.footer(2)
    w.section_part(2)
    for b in blocks:
        for off in range(0, b.length, PS):
            if off in stored.get(b.idstr, ()):
                w.page(b.idstr, off, page(b.idstr, off))
            else:
                w.zero(b.idstr, off)
    w.eos()
    w.footer(2)
    w.section_end(2)
    w.eos()
    w.footer(2)
    w.raw(device_state(**ds))
    return f.getvalue()


def make_image(tmp_path, name="vm.img", **kw):
    src = tmp_path / (name + ".stream")
    src.write_bytes(make_stream(**kw))
    img = tmp_path / name
    with open(src, "rb") as f, open(os.devnull, "wb") as null:
        save(str(img), in_fd=f.fileno(), out_fd=null.fileno(), quiet=True)
    return img


def qsnap(*args):
    return subprocess.run([sys.executable, "-m", "qsnap", *map(str, args)], capture_output=True, timeout=120)


def expected(idstr, off):
    return page(idstr, off) if off in STORED.get(idstr, ()) else bytes(PS)


@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path, n_cpus=2)


# --- ELF -------------------------------------------------------------------------

def test_elf_segments_at_guest_physical_addresses(image, tmp_path):
    out = tmp_path / "vm.core"
    export(image, out, "elf", quiet=True)
    core = read_core(out)
    assert core.elf_class == 2 and core.machine == EM_X86_64
    assert [(s.paddr, s.memsz) for s in core.loads] == [(0, 8 * MIB), (FOUR_GIB - 0x40000, 0x40000)]
    assert all(s.filesz == s.memsz and s.offset % PS == 0 for s in core.loads)
    for off in range(0, 8 * MIB, PS):
        assert core.read_gpa(off, PS) == expected("pc.ram", off), hex(off)
    for off in range(0, 0x40000, PS):
        assert core.read_gpa(FOUR_GIB - 0x40000 + off, PS) == expected("pc.bios", off), hex(off)


def test_elf_zero_pages_are_holes(image, tmp_path):
    out = tmp_path / "vm.core"
    export(image, out, "elf", quiet=True)
    core = read_core(out)
    fd = os.open(out, os.O_RDONLY)
    try:
        data = set()
        pos = 0
        while True:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            data.update(range(pos // PS, -(-end // PS)))
            pos = end
    finally:
        os.close(fd)
    ram = core.loads[0].offset // PS
    stored_pages = {ram + o // PS for o in STORED["pc.ram"]}
    ram_data = {p for p in data if ram <= p < ram + 8 * MIB // PS}
    if len(data) * PS >= os.path.getsize(out):
        pytest.skip("the filesystem of tmp_path does not keep holes")
    assert ram_data == stored_pages


def test_elf_notes_from_cpu_sections(image, tmp_path):
    out = tmp_path / "vm.core"
    export(image, out, "elf", quiet=True)
    core = read_core(out)
    pr = core.prstatus()
    assert [p["pid"] for p in pr] == [1, 2]
    for i, regs in enumerate(pr):
        v = cpu_values(i)
        r = v["env.regs"]
        assert (regs["rax"], regs["rcx"], regs["rdx"], regs["rbx"], regs["rsp"], regs["rbp"],
                regs["rsi"], regs["rdi"]) == tuple(r[:8])
        assert [regs[f"r{n}"] for n in range(8, 16)] == r[8:]
        assert regs["rip"] == v["env.eip"] and regs["eflags"] == 0x246
        assert regs["cs"] == 0x11 and regs["ss"] == 0x12 and regs["fs_base"] == 0x4000 + i
    q = core.qemu_notes()
    assert len(q) == 2 and all(len(d) == 440 for d in q)
    version, size, rax = struct.unpack_from("<IIQ", q[1])
    assert (version, size, rax) == (1, 440, cpu_values(1)["env.regs"][0])
    cr = struct.unpack_from("<6Q", q[1], 440 - 48)
    assert cr == (0x8000_0011, 0, 0x8000_0013, 0x8000_0014, 0x8000_0015, 0xFFFF_8880_0000_0001)


def test_elf_outside_long_mode_uses_i386_prstatus(tmp_path):
    img = make_image(tmp_path, long_mode=False)
    out = tmp_path / "vm.core"
    export(img, out, "elf", quiet=True)
    core = read_core(out)
    assert core.machine == EM_386
    regs, = core.prstatus()
    r = cpu_values(0, False)["env.regs"]
    assert (regs["eax"], regs["ebx"], regs["esp"]) == (r[0] & 0xFFFFFFFF, r[3] & 0xFFFFFFFF, r[4] & 0xFFFFFFFF)
    assert regs["eip"] == cpu_values(0)["env.eip"] & 0xFFFFFFFF


@pytest.mark.parametrize("kw, why", [({"vmdescription": False}, "no VMDESCRIPTION"),
                                     ({"cpu_version": 99}, "has version 99")])
def test_elf_without_decodable_cpu_state_warns_and_exports_memory(tmp_path, kw, why):
    img = make_image(tmp_path, **kw)
    out = tmp_path / "vm.core"
    r = qsnap("export", "--format=elf", img, out)
    assert r.returncode == 0, r.stderr
    err = r.stderr.decode()
    assert "qsnap: warning:" in err and "NT_PRSTATUS" in err and why in err, err
    core = read_core(out)
    assert core.notes == [] and core.read_gpa(5 * MIB, PS) == page("pc.ram", 5 * MIB)


# --- guest-physical map -------------------------------------------------------------

@pytest.mark.parametrize("machine, size, low", [
    ("pc-i440fx-7.2", 0xE0000000, 0xC0000000), ("pc-i440fx-7.2", 0xDFFFF000, 0xDFFFF000),
    ("pc-q35-7.2", 0xB0000000, 0x80000000), ("pc-q35-10.0", 0xAFFFF000, 0xAFFFF000)])
def test_main_ram_split_around_the_pci_hole(machine, size, low):
    blocks = [RamBlock("pc.ram", size), RamBlock("pc.bios", 0x40000)]
    rs = guest_ranges(blocks, machine)
    ram = [(r.gpa, r.block_offset, r.length) for r in rs if r.block == 0]
    want = [(0, 0, low)] + ([(FOUR_GIB, low, size - low)] if size > low else [])
    assert ram == want
    assert [(r.gpa, r.length) for r in rs if r.block == 1] == [(FOUR_GIB - 0x40000, 0x40000)]


def test_unknown_machine_is_an_error(tmp_path):
    img = make_image(tmp_path, machine="microvm")
    r = qsnap("export", "--format=raw", img, tmp_path / "out")
    lines = r.stderr.decode().splitlines()
    assert r.returncode != 0 and lines == [lines[0]] and lines[0].startswith("qsnap: error: ")
    assert "microvm" in lines[0] and not (tmp_path / "out").exists()


# --- raw ----------------------------------------------------------------------------------

def test_raw_is_guest_physical(image, tmp_path):
    out = tmp_path / "vm.raw"
    export(image, out, "raw", quiet=True)
    assert os.path.getsize(out) == FOUR_GIB
    with open(out, "rb") as f:
        assert_same(f.read(8 * MIB), b"".join(expected("pc.ram", o) for o in range(0, 8 * MIB, PS)))
        f.seek(FOUR_GIB - 0x40000)
        assert_same(f.read(), b"".join(expected("pc.bios", o) for o in range(0, 0x40000, PS)))
    assert os.stat(out).st_blocks * 512 < 64 * MIB  # sparse: the 4 GiB are mostly holes


# --- mapped-ram ----------------------------------------------------------------------------

def test_mapped_ram_layout(image, tmp_path):
    out = tmp_path / "vm.mr"
    export(image, out, "mapped-ram", quiet=True)
    data = out.read_bytes()
    with open(out, "rb") as f:
        events = list(StreamReader(f))
    conf = events[1]
    assert conf.machine == "pc-i440fx-7.2" and conf.capabilities == ["mapped-ram"]
    mem = next(e for e in events if type(e).__name__ == "MemSize")
    for b in mem.blocks:
        version, ps, bitmap_offset, pages_offset = b.mapped_ram
        assert version == 1 and ps == PS and pages_offset % MIB == 0
        n = b.length // PS
        bits = np.unpackbits(np.frombuffer(data[bitmap_offset:bitmap_offset + -(-n // 64) * 8], np.uint8),
                             bitorder="little")
        assert sorted(np.flatnonzero(bits) * PS) == STORED[b.idstr]
        for off in STORED[b.idstr]:
            assert data[pages_offset + off:pages_offset + off + PS] == page(b.idstr, off)
    assert data.endswith(device_state(n_cpus=2))


def test_mapped_ram_import_round_trip(image, tmp_path):
    """export --format=mapped-ram, then import: the same pages, device state and header."""
    out = tmp_path / "vm.mr"
    back = tmp_path / "back.img"
    export(image, out, "mapped-ram", quiet=True)
    r = qsnap("import", out, back)
    assert r.returncode == 0, r.stderr
    with Image.open(image) as a, Image.open(back) as b:
        assert a.header_bytes == b.header_bytes  # mapped-ram is not left in the capabilities
        assert a.device_state == b.device_state and a.stream_info["capabilities"] == []
        for ba, bb in zip(a.blocks, b.blocks):
            assert (ba.idstr, ba.length) == (bb.idstr, bb.length)
            assert_same(ba.bitmap.tobytes(), bb.bitmap.tobytes())
            for off in STORED[ba.idstr]:
                assert b.read_page(b.block_index(bb.idstr), off) == page(ba.idstr, off)


# --- crash safety and errors ------------------------------------------------------------------

def corrupt_ram_byte(image, ram_offset, value):
    """Overwrite the stored byte at ``ram_offset`` of pc.ram in ``image`` (its page's
    checksum then fails)."""
    with Image.open(image) as img:
        bi = img.block_index("pc.ram")
        h = img.host_offset(img.blocks[bi].offset + ram_offset)
    with open(image, "r+b") as f:
        f.seek(h)
        f.write(value)


@pytest.mark.parametrize("fmt", ["elf", "raw", "mapped-ram"])
def test_failed_export_keeps_the_older_output(image, tmp_path, fmt):
    """A corrupt page stops the export: no temporary file stays, the old OUT is intact."""
    out = tmp_path / "out"
    out.write_bytes(b"older export")
    corrupt_ram_byte(image, 5 * MIB + 100, b"\xff")
    with pytest.raises(ChecksumError, match="pc.ram' page 0x500000"):
        export(image, out, fmt, quiet=True)
    assert out.read_bytes() == b"older export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "vm.img", "vm.img.stream"]


def test_interrupted_export_leaves_nothing(image, tmp_path, monkeypatch):
    from qsnap.export import pages

    def boom(self, bi):
        raise KeyboardInterrupt
    monkeypatch.setattr(pages.PageSource, "runs", boom)
    with pytest.raises(KeyboardInterrupt):
        export(image, tmp_path / "out", "elf", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.img", "vm.img.stream"]


@pytest.mark.parametrize("args, what", [
    (["export", "--format=elf", "{tmp}/missing.img", "{tmp}/o"], "missing.img"),
    (["export", "--format=elf", "{tmp}/vm.img.stream", "{tmp}/o"], "not a qsnap image"),
    (["export", "--format=tar", "{img}", "{tmp}/o"], "invalid choice"),
    (["export", "--format=elf", "{img}", "{tmp}"], "is a directory"),
    (["import", "{img}", "{tmp}/o"], "not a migration stream"),
    (["import", "{tmp}/missing", "{tmp}/o"], "missing"),
    (["export", "--format=raw", "{img}", "{img}"], "is the input"),
    (["import", "{img}", "{img}"], "is the input"),
])
def test_bad_input_gets_one_error_line(image, tmp_path, args, what):
    r = qsnap(*[a.format(tmp=tmp_path, img=image) for a in args])
    lines = r.stderr.decode().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert lines[0].startswith("qsnap: error: ") and what in lines[0], lines[0]
    assert not (tmp_path / "o").exists()
    with Image.open(image) as img:  # the input is never harmed
        assert not img.verify_all()


def test_truncated_mapped_ram_input_is_refused(image, tmp_path):
    out = tmp_path / "vm.mr"
    export(image, out, "mapped-ram", quiet=True)
    with open(out, "r+b") as f:
        f.truncate(3 * MIB)
    r = qsnap("import", out, tmp_path / "o.img")
    lines = r.stderr.decode().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "truncated" in lines[0], r.stderr
    assert not (tmp_path / "o.img").exists()


def test_qsnap_errors_are_qsnap_errors(tmp_path):
    with pytest.raises(QsnapError):
        export(tmp_path / "nothing", tmp_path / "o", "elf")
    with pytest.raises(ImageError):
        guest_ranges([RamBlock("other", 4096)], "pc-i440fx-7.2")


@pytest.mark.parametrize("fmt", ["elf", "mapped-ram"])
def test_disk_full_keeps_the_older_output(image, tmp_path, monkeypatch, fmt):
    """A write failing on a writer thread ends the export with one IOFailure naming the file."""
    import errno

    from qsnap.errors import IOFailure
    from qsnap import atomic

    out = tmp_path / "out"
    out.write_bytes(b"older export")
    real = os.pwrite

    def pwrite(fd, data, offset):
        if offset >= MIB:  # the header goes through, page data does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)
    monkeypatch.setattr(atomic.os, "pwrite", pwrite)
    with pytest.raises(IOFailure, match=r"no space left on device writing .*\.out\.qsnap-"):
        export(image, out, fmt, quiet=True)
    assert out.read_bytes() == b"older export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "vm.img", "vm.img.stream"]


# --- page state read window by window --------------------------------------------------------

WINDOWED_STORED = {"pc.ram": sorted({0, PS, 0x9F000, MIB - PS, MIB, 3 * MIB + 0x5000, 5 * MIB,
                                     6 * MIB - PS, 6 * MIB, 8 * MIB - PS}),
                   "/rom@etc/acpi/tables": [0x1000], "pc.bios": [0x3F000]}


@pytest.fixture
def windowed_image(tmp_path):
    """Stored pages on both sides of several cluster (and so window) boundaries."""
    return make_image(tmp_path, n_cpus=1, stored=WINDOWED_STORED)


def exported(img, out, fmt, monkeypatch, window):
    from qsnap.export import pages

    monkeypatch.setattr(pages, "WINDOW_PAGES", window)
    export(img, out, fmt, quiet=True)
    return out


def data_extents(path):
    """(start, end) of the data (non-hole) extents of a file: SEEK_DATA / SEEK_HOLE."""
    out, pos, size = [], 0, os.path.getsize(path)
    with open(path, "rb") as f:
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:   # ENXIO: only a hole follows
                break
            pos = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


@pytest.mark.parametrize("fmt", ["elf", "raw", "mapped-ram"])
def test_windowed_page_state_exports_the_same_bytes(windowed_image, tmp_path, monkeypatch, fmt):
    """One cluster of page state per window gives the file that one window for the block gives
    (raw is a 4 GiB sparse file: its data extents are compared)."""
    with Image.open(windowed_image) as img:
        ppc = img.cluster_size // PS
        assert img.blocks[img.block_index("pc.ram")].n_pages // ppc >= 4   # several windows
    whole = exported(windowed_image, tmp_path / "whole", fmt, monkeypatch, 1 << 30)
    small = exported(windowed_image, tmp_path / "small", fmt, monkeypatch, 1)
    assert os.path.getsize(small) == os.path.getsize(whole)
    extents = data_extents(whole)
    assert data_extents(small) == extents    # the same holes, which read as zeros
    with open(whole, "rb") as w, open(small, "rb") as s:
        for start, end in extents:
            w.seek(start)
            s.seek(start)
            assert_same(s.read(end - start), w.read(end - start))


def test_windowed_raw_matches_qemu_img_convert(windowed_image, tmp_path, monkeypatch):
    """Each guest-physical range of the raw export holds what qemu-img reads at its
    block's virtual offset; between the ranges the file is a hole."""
    out = exported(windowed_image, tmp_path / "vm.raw", "raw", monkeypatch, 1)
    disk = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(windowed_image), str(disk)],
                   check=True)
    with Image.open(windowed_image) as img:
        ranges = guest_ranges(img.blocks, img.meta.get("machine"))
        offsets = [img.blocks[r.block].offset for r in ranges]
    extents = data_extents(out)
    with open(out, "rb") as raw, open(disk, "rb") as virt:
        for r, voff in zip(ranges, offsets):
            raw.seek(r.gpa)
            virt.seek(voff + r.block_offset)
            assert_same(raw.read(r.length), virt.read(r.length))
        raw.seek(0x9F000)
        assert raw.read(PS) == page("pc.ram", 0x9F000)   # the comparison saw data
    assert os.path.getsize(out) == max(r.gpa + r.length for r in ranges)
    for start, end in extents:   # no data outside the ranges
        assert any(r.gpa <= start and end <= r.gpa + r.length for r in ranges), (start, end)


@pytest.mark.parametrize("fmt", ["elf", "raw", "mapped-ram"])
def test_corrupt_page_in_a_later_window_is_found(windowed_image, tmp_path, monkeypatch, fmt):
    from qsnap.export import pages

    monkeypatch.setattr(pages, "WINDOW_PAGES", 1)
    corrupt_ram_byte(windowed_image, 6 * MIB + 7, b"\xee")
    with pytest.raises(ChecksumError, match="pc.ram' page 0x600000"):
        export(windowed_image, tmp_path / "out", fmt, quiet=True)
    assert not (tmp_path / "out").exists()
