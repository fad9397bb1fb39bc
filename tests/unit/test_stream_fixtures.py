"""Every real QEMU stream in tests/data (and ../shared/fixtures where present) parses to the end, with the facts tests/data/README.md states."""
import collections
import gzip
import io

import pytest

from qsnap.stream.constants import (
    MIG_CMD_POSTCOPY_ADVISE, QEMU_VM_SECTION_END, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START, RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
)
from qsnap.stream.events import (
    Command, Configuration, DeviceState, EndOfStream, MemSize, PageBatch, SectionFooter, SectionHeader,
)
from qsnap.stream.reader import StreamReader

NAMES = ["pc72", "bg72", "rp72", "hp72", "is72", "uuid72", "pc23", "pc100", "bg100", "pc100_m72", "mr100"]
_cache = {}


def load(fixtures_dir, name):
    if name not in _cache:
        with gzip.open(fixtures_dir / ("%s.stream.gz" % name)) as f:
            _cache[name] = f.read()
    return _cache[name]


class Parsed:
    def __init__(self, data, pure, path=None):
        self.counts = collections.Counter()
        self.pages = {}
        self.events = []
        if path is not None:
            f = open(path, "rb")
        else:
            f = io.BytesIO(data)
        with f:
            self.reader = r = StreamReader(f, pure=pure)
            for e in r:
                if isinstance(e, PageBatch):
                    for idstr, off, flags, payload in e.iter_pages():
                        k = flags & ~0x20
                        self.counts[k] += 1
                        if k == RAM_SAVE_FLAG_PAGE:
                            self.pages[(idstr, off)] = payload
                        elif k == RAM_SAVE_FLAG_ZERO:
                            self.pages[(idstr, off)] = None
                else:
                    self.events.append(e)

    def of(self, cls):
        return [e for e in self.events if isinstance(e, cls)]

    def section_types(self):
        return [e.type for e in self.of(SectionHeader)]


@pytest.fixture(params=[False, True], ids=["c", "pure"])
def pure(request):
    return request.param


def parse(fixtures_dir, name, pure, tmp_path=None):
    data = load(fixtures_dir, name)
    path = None
    if name == "mr100":  # mapped-ram needs a seekable file
        path = tmp_path / "mr100.bin"
        path.write_bytes(data)
    p = Parsed(data, pure, path)
    assert isinstance(p.events[-1], EndOfStream) and p.events[-1].offset == len(data) or name == "mr100"
    return p


@pytest.mark.parametrize("name", NAMES)
def test_parses_to_end(fixtures_dir, name, pure, tmp_path):
    p = parse(fixtures_dir, name, pure, tmp_path)
    ds = p.of(DeviceState)[0]
    assert ds.vmdescription is not None and "devices" in ds.vmdescription
    assert ds.data[ds.eof_pos] == 0
    ms = p.of(MemSize)[0]
    assert ms.total == 0x2082000 == sum(b.length for b in ms.blocks)
    assert len(ms.blocks) == 6


def test_pc72(fixtures_dir, pure):
    p = parse(fixtures_dir, "pc72", pure)
    assert p.of(Configuration)[0].machine == "pc-i440fx-7.2"
    assert p.section_types() == [QEMU_VM_SECTION_START, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END]
    assert {e.section_id for e in p.of(SectionHeader)} == {2}
    assert p.counts[RAM_SAVE_FLAG_ZERO] == 8273 and p.counts[RAM_SAVE_FLAG_PAGE] == 49
    assert p.reader.uses_footers is True and not p.of(Command)
    assert len(p.of(SectionFooter)) == 3
    ds = p.of(DeviceState)[0]
    assert ds.data[:11] == b"\x04\x00\x00\x00\x00\x05timer"
    assert ds.vmdescription["page_size"] == 4096 and list(ds.vmdescription) == ["page_size", "devices"]


def test_bg72_background(fixtures_dir, pure):
    p = parse(fixtures_dir, "bg72", pure)
    assert QEMU_VM_SECTION_END not in p.section_types()
    assert p.counts[RAM_SAVE_FLAG_ZERO] == 8211 and p.counts[RAM_SAVE_FLAG_PAGE] == 111
    assert len(p.pages) == 0x2082 == 8211 + 111  # each page exactly once


def test_rp72_commands(fixtures_dir, pure):
    p = parse(fixtures_dir, "rp72", pure)
    cmds = p.of(Command)
    assert [c.name for c in cmds] == ["OPEN_RETURN_PATH", "PING"]
    assert cmds[1].payload == b"\x00\x00\x00\x01"


def test_hp72_hugepage(fixtures_dir, pure):
    p = parse(fixtures_dir, "hp72", pure)
    adv = [c for c in p.of(Command) if c.cmd == MIG_CMD_POSTCOPY_ADVISE][0]
    assert int.from_bytes(adv.payload[:8], "big") == 0x201000
    assert int.from_bytes(adv.payload[8:], "big") == 0x1000
    blocks = {b.idstr: b for b in p.of(MemSize)[0].blocks}
    assert blocks["m"].page_size == 0x200000
    assert all(b.page_size is None for n, b in blocks.items() if n != "m")


def test_is72_gpa(fixtures_dir, pure):
    p = parse(fixtures_dir, "is72", pure)
    assert p.of(Configuration)[0].capabilities == ["x-ignore-shared"]
    gpa = {b.idstr: b.gpa for b in p.of(MemSize)[0].blocks}
    assert gpa["pc.bios"] == 0xFFFC0000 and gpa["pc.rom"] == 0xC0000 and gpa["pc.ram"] == 0
    assert gpa["/rom@etc/acpi/tables"] == 0


def test_uuid72(fixtures_dir, pure):
    cfg = parse(fixtures_dir, "uuid72", pure).of(Configuration)[0]
    assert cfg.uuid is not None and len(cfg.uuid) == 16
    assert [s[0] for s in cfg.subsections] == ["configuration/uuid"]


def test_pc23_old_machine(fixtures_dir, pure):
    p = parse(fixtures_dir, "pc23", pure)
    assert not p.of(Configuration) and not p.of(SectionFooter)
    assert p.reader.uses_footers is False
    assert p.section_types() == [QEMU_VM_SECTION_START, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END]


def test_pc100(fixtures_dir, pure):
    p = parse(fixtures_dir, "pc100", pure)
    assert {e.section_id for e in p.of(SectionHeader)} == {1}
    names = [c.name for c in p.of(Command)]
    assert names == ["SWITCHOVER_START"]
    # SWITCHOVER_START sits between the last PART and the END
    kinds = [type(e).__name__ if not isinstance(e, SectionHeader) else e.type for e in p.events]
    assert kinds.index("Command") < kinds.index(QEMU_VM_SECTION_END)
    assert list(p.of(DeviceState)[0].vmdescription)[0] == "configuration"


def test_pc100_m72_no_switchover(fixtures_dir, pure):
    p = parse(fixtures_dir, "pc100_m72", pure)
    assert not p.of(Command) and p.of(Configuration)[0].machine == "pc-i440fx-7.2"


def test_bg100(fixtures_dir, pure):
    p = parse(fixtures_dir, "bg100", pure)
    assert QEMU_VM_SECTION_END not in p.section_types()
    assert len(p.pages) == 0x2082 == sum(p.counts.values())


def test_mr100_mapped_ram(fixtures_dir, pure, tmp_path):
    p = parse(fixtures_dir, "mr100", pure, tmp_path)
    assert p.of(Configuration)[0].capabilities == ["mapped-ram"]
    blocks = p.of(MemSize)[0].blocks
    pcram = blocks[0]
    assert pcram.idstr == "pc.ram" and pcram.mapped_ram[1:] == (0x1000, 0x8E, 0x100000)
    assert p.counts[RAM_SAVE_FLAG_ZERO] == 0
    assert p.pages and all(v is not None and any(v) for v in p.pages.values())
    # pc.bios: 64 pages, the top 46 present (bitmap 00 00 fc ff ff ff ff ff)
    bios = sorted(o // 4096 for (i, o) in p.pages if i == "pc.bios")
    assert bios == list(range(18, 64))
    assert isinstance(p.events[-1], EndOfStream) and p.events[-1].offset == len(load(fixtures_dir, "mr100"))
