"""StreamReader: each record kind and each error, on the C parser and the pure twin."""
import ctypes
import io
import os
import re
import struct

import pytest

from qsnap.errors import QsnapError, StreamError
from qsnap.stream.constants import (
    MIG_CMD_ENABLE_COLO, MIG_CMD_POSTCOPY_RESUME, MIG_CMD_RECV_BITMAP, QEMU_VM_SECTION_FULL,
    RAM_SAVE_FLAG_COMPRESS_PAGE, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_ZERO,
)
from qsnap.stream.events import (
    Command, Configuration, DeviceState, EndOfStream, MemSize, PreRamSection, RamBlock,
    SectionFooter,
)
from qsnap.stream.reader import StreamReader
from qsnap.stream.writer import StreamWriter

from _streamutil import BLOCKS, events, make, pages, word
from bigcmp import assert_same


@pytest.fixture(params=[False, True], ids=["c", "pure"])
def pure(request):
    return request.param


def err(data, pure, match, **kw):
    with pytest.raises(StreamError) as ei:
        events(data, pure, **kw)
    msg = str(ei.value)
    assert re.search(match, msg), msg
    return msg


def test_minimal_stream_events(pure):
    evs = events(make(), pure)
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["FileHeader", "Configuration", "SectionHeader", "MemSize", "Eos", "SectionFooter",
                     "SectionHeader", "Eos", "SectionFooter", "SectionHeader", "Eos", "SectionFooter",
                     "DeviceState", "EndOfStream"]
    ms = evs[3]
    assert ms.total == 0x140000 and [b.idstr for b in ms.blocks] == ["pc.ram", "pc.bios"]
    ds = evs[-2]
    assert ds.vmdescription == {"page_size": 4096, "devices": []}
    assert ds.data[0] == QEMU_VM_SECTION_FULL and ds.data[ds.eof_pos] == 0
    assert evs[-1].offset == len(make())


def test_page_zero_continue(pure):
    data = make(lambda w: (w.page("pc.ram", 0x1000, b"a" * 4096), w.zero("pc.ram", 0x2000),
                           w.zero("pc.bios", 0, fill=7), w.page("pc.bios", 0x3f000, b"b" * 4096)))
    assert_same(pages(data, pure), [
        ("pc.ram", 0x1000, RAM_SAVE_FLAG_PAGE, b"a" * 4096),
        ("pc.ram", 0x2000, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE, None),
        ("pc.bios", 0, RAM_SAVE_FLAG_ZERO, b"\x07"),
        ("pc.bios", 0x3f000, RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE, b"b" * 4096),
    ], "pages")


def test_xbzrle_compress_multifd_flush(pure):
    def body(w):
        w.xbzrle("pc.ram", 0, b"\x00\x02ab")
        w.raw(word(0x1000, RAM_SAVE_FLAG_COMPRESS_PAGE | RAM_SAVE_FLAG_CONTINUE) + struct.pack(">I", 3) + b"xyz")
        w.multifd_flush()
    got = pages(make(body), pure)
    assert got == [("pc.ram", 0, RAM_SAVE_FLAG_XBZRLE, b"\x00\x02ab"),
                   ("pc.ram", 0x1000, RAM_SAVE_FLAG_COMPRESS_PAGE | RAM_SAVE_FLAG_CONTINUE, b"xyz"),
                   (None, 0, RAM_SAVE_FLAG_MULTIFD_FLUSH, None)]


def test_continue_persists_across_sections(pure):
    def body(w):
        w.page("pc.bios", 0, bytes(4096))
        w.eos(); w.footer(2); w.section_part(2)
        w.zero("pc.bios", 0x1000)
    got = pages(make(body), pure)
    assert got[1] == ("pc.bios", 0x1000, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE, None)


@pytest.mark.parametrize("flags,name", [(0x41, "XBZRLE|FULL"), (0x01, "FULL"), (0x80, "HOOK"),
                                        (0x0a, "PAGE|ZERO"), (0x400, "0x400")])
def test_bad_flags(pure, flags, name):
    data = make(lambda w: w.raw(word(0, flags) + b"\x06pc.ram" + bytes(4200)))
    msg = err(data, pure, r"unknown RAM record flags 0x%x \(%s\) at stream offset 0x[0-9a-f]+" % (flags, re.escape(name)))
    off = int(msg.rsplit("0x", 1)[1], 16)
    assert data[off : off + 8] == word(0, flags)


def test_unknown_block(pure):
    data = make(lambda w: w.raw(word(0, RAM_SAVE_FLAG_ZERO) + b"\x03foo\x00"))
    err(data, pure, r"unknown RAM block 'foo' at stream offset 0x[0-9a-f]+")


def test_page_outside_block(pure):
    data = make(lambda w: w.zero("pc.ram", 0x100000))
    err(data, pure, r"page offset 0x100000 outside block 'pc.ram' \(length 0x100000\) at stream offset 0x")


def test_continue_without_block(pure):
    data = make(lambda w: w.raw(word(0, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE) + b"\x00"))
    err(data, pure, r"CONTINUE .* no previous block at stream offset 0x")


def test_idstr_len_zero(pure):
    err(make(lambda w: w.raw(word(0, RAM_SAVE_FLAG_ZERO) + b"\x00\x00")), pure, r"length 0 at stream offset 0x")


def test_xbzrle_errors(pure):
    err(make(lambda w: w.raw(word(0, RAM_SAVE_FLAG_XBZRLE) + b"\x06pc.ram\x02\x00\x01x")), pure,
        r"XBZRLE encoding byte 0x2 at stream offset 0x")
    err(make(lambda w: w.raw(word(0, RAM_SAVE_FLAG_XBZRLE) + b"\x06pc.ram\x01\x10\x01" + bytes(5000))), pure,
        r"XBZRLE length 0x1001 .* at stream offset 0x")


def test_compress_len(pure):
    err(make(lambda w: w.raw(word(0, RAM_SAVE_FLAG_COMPRESS_PAGE) + b"\x06pc.ram" + struct.pack(">I", 0x2000))),
        pure, r"COMPRESS_PAGE length 0x2000 .* at stream offset 0x")


def test_header_errors(pure):
    err(b"QEVX" + bytes(4), pure, r"bad magic .* at stream offset 0x0")
    err(b"QEVM\x00\x00\x00\x02", pure, r"obsolete .* at stream offset 0x4")
    err(b"QEVM\x00\x00\x00\x04", pure, r"unsupported stream version .* at stream offset 0x4")
    err(b"QEV", pure, r"truncated stream: expected 1 more bytes for file header at stream offset 0x0")


def test_configuration_subsections(pure):
    f = io.BytesIO()
    w = StreamWriter(f)
    w.header()
    w.configuration("pc-q35-7.2", capabilities=["x-ignore-shared"], uuid=bytes(range(16)), target_page_bits=12)
    raw_cfg = f.getvalue()[8:]
    w.section_start(2, "ram", 0, 4)
    w.mem_size(BLOCKS, gpa_fields=True)
    w.eos(); w.footer(2)
    w.eof()
    evs = events(f.getvalue(), pure)
    cfg = evs[1]
    assert isinstance(cfg, Configuration)
    assert cfg.machine == "pc-q35-7.2" and cfg.capabilities == ["x-ignore-shared"]
    assert cfg.uuid == bytes(range(16)) and cfg.target_page_bits == 12 and cfg.raw == raw_cfg
    assert [s[0] for s in cfg.subsections] == ["configuration/target-page-bits", "configuration/capabilities",
                                               "configuration/uuid"]
    ms = [e for e in evs if isinstance(e, MemSize)][0]
    assert [b.gpa for b in ms.blocks] == [0, 0]


def test_unknown_configuration_subsection(pure):
    data = b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x02pc\x05\x04abcd\x00\x00\x00\x01"
    err(data, pure, r"unknown configuration subsection 'abcd' at stream offset 0xf")


def test_no_footers_stream(pure):
    evs = events(make(footers=False, machine=None), pure)
    assert not any(isinstance(e, (SectionFooter, Configuration)) for e in evs)


def test_missing_and_mismatched_footer(pure):
    data = make()
    i = data.index(b"\x7e\x00\x00\x00\x02", 30)
    bad = data[:i] + b"\x7e\x00\x00\x00\x03" + data[i + 5:]
    err(bad, pure, r"mismatched section id in footer: read 0x3 expected 0x2 at stream offset 0x%x" % i)
    # footers seen once, then missing
    j = data.index(b"\x7e\x00\x00\x00\x02", i + 1)
    bad = data[:j] + data[j + 5:]
    err(bad, pure, r"missing section footer for section 2 .* at stream offset 0x%x" % j)


def test_commands(pure):
    def pre(w):
        w.open_return_path(); w.ping(1); w.postcopy_advise(0x201000, 0x1000)
        w.ram_discard("pc.ram", [(i * 0x1000, 0x1000) for i in range(13)])
        w.packaged(b"\x08\x00\x04\x00\x00"); w.switchover_start(); w.postcopy_advise_empty()
        w.command(MIG_CMD_RECV_BITMAP, b"\x02ab"); w.command(MIG_CMD_POSTCOPY_RESUME); w.command(MIG_CMD_ENABLE_COLO)
    evs = events(make(pre=pre), pure)
    cmds = [e for e in evs if isinstance(e, Command)]
    assert [c.name for c in cmds] == ["OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE", "POSTCOPY_RAM_DISCARD",
                                      "POSTCOPY_RAM_DISCARD", "PACKAGED", "SWITCHOVER_START", "POSTCOPY_ADVISE",
                                      "RECV_BITMAP", "POSTCOPY_RESUME", "ENABLE_COLO"]
    assert len(cmds[3].payload) == 3 + 6 + 12 * 16 and len(cmds[4].payload) == 3 + 6 + 16
    assert cmds[5].blob == b"\x08\x00\x04\x00\x00"


@pytest.mark.parametrize("raw,match", [
    (b"\x08\x00\x00\x00\x00", r"MIG_CMD 0x0 unknown \(len 0x0\) at stream offset 0x"),
    (b"\x08\x00\x0c\x00\x00", r"MIG_CMD 0xc unknown"),
    (b"\x08\x00\x02\x00\x03abc", r"PING received with bad length - expecting 4, got 3 at stream offset 0x"),
    (b"\x08\x00\x03\x00\x08" + bytes(8), r"POSTCOPY_ADVISE with bad length 8 at stream offset 0x"),
    (b"\x08\x00\x06\x00\x05\x00\x01m\x00\x00", r"POSTCOPY_RAM_DISCARD invalid length 5 at stream offset 0x"),
    (b"\x08\x00\x0a\x00\x02\x05a", r"RECV_BITMAP with bad length 2 at stream offset 0x"),
    (b"\x08\x00\x07\x00\x04\xff\xff\xff\xff", r"PACKAGED blob of 4294967295 bytes exceeds the limit .* at stream offset 0x"),
    (b"\x08\x00\x07\x00\x04\x00\x00\x01\x00abc", r"truncated stream: expected 253 more bytes for PACKAGED blob"),
])
def test_command_errors(pure, raw, match):
    err(b"QEVM\x00\x00\x00\x03" + raw, pure, match)


def test_section_errors(pure):
    base = b"QEVM\x00\x00\x00\x03"
    err(base + b"\x01\x00\x00\x00\x02\x05block\x00\x00\x00\x00\x00\x00\x00\x01", pure,
        r"unsupported iterable section 'block' at stream offset 0x8")
    err(base + b"\x01\x00\x00\x00\x02\x03ram\x00\x00\x00\x00\x00\x00\x00\x03", pure,
        r"unsupported RAM section version 3 at stream offset 0x8")
    err(base + b"\x02\x00\x00\x00\x02", pure, r"SECTION_PART for unknown section id 2 at stream offset 0x8")
    err(base + b"\x00", pure, r"no RAM section .* at stream offset 0x8")
    err(base + b"\x42", pure, r"unknown section type 0x42 .* at stream offset 0x8")
    err(base + b"\x01\x00\x00\x00\x02\x00", pure, r"section idstr of length 0 at stream offset 0xd")


def test_mem_size_errors(pure):
    base = b"QEVM\x00\x00\x00\x03\x01\x00\x00\x00\x02\x03ram\x00\x00\x00\x00\x00\x00\x00\x04"
    err(base + word(0x2000, 4) + b"\x01a" + struct.pack(">Q", 0x3000), pure,
        r"RAM block 'a' length 0x3000 exceeds the remaining MEM_SIZE total 0x2000 at stream offset 0x")
    err(base + word(0x2000, 4) + b"\x00", pure, r"RAM block idstr of length 0 at stream offset 0x")
    err(base + word(0x2000, 4) + b"\x01a" + struct.pack(">Q", 0x1000) + b"\x01a", pure, r"duplicate RAM block 'a'")
    # MEM_SIZE in a PART
    data = make(lambda w: w.raw(word(0x1000, 4)))
    err(data, pure, r"unexpected MEM_SIZE record at stream offset 0x")


def test_hugepage_field_needs_advise(pure):
    blocks = [RamBlock("m", 0x400000, page_size=0x200000), RamBlock("pc.bios", 0x40000, page_size=0x200000)]
    data = make(pre=lambda w: w.postcopy_advise(0x201000), blocks=blocks, page_size_fields=True)
    ms = [e for e in events(data, pure) if isinstance(e, MemSize)][0]
    assert [b.page_size for b in ms.blocks] == [0x200000, 0x200000]


def test_device_state_checks(pure):
    good = make()
    evs = events(good, pure)
    assert isinstance(evs[-2], DeviceState)
    # trailing junk after VMDESCRIPTION
    err(good + b"x", pure, r"(unexpected|truncated)")
    # JSON broken
    i = good.rindex(b"{")
    bad = good[:i] + b"[" + good[i + 1:]
    err(bad, pure, r"(JSON|truncated)")
    # EOF only (postcopy-like) is fine; stream truncated right after EOF too
    assert events(good[: good.rindex(b"\x06")], pure)[-2].vmdescription is None


def test_device_state_limit(pure):
    err(make(), pure, r"device state at stream offset 0x[0-9a-f]+ is larger than the limit", max_device_state=8,
        buffer_size=64)


def test_pre_ram_section(pure):
    f = io.BytesIO()
    w = StreamWriter(f)
    w.header(); w.configuration("pc-i440fx-8.0")
    w.section_full(5, "virtio-mem-early", 0, 1, b"\x7e\x00\x00\x00\x05\x99" * 3 + b"payload")
    data_pre = f.getvalue()
    w.section_start(2, "ram", 0, 4); w.mem_size(BLOCKS); w.eos(); w.footer(2)
    w.section_full(0, "timer", 0, 1, b"t"); w.eof()
    evs = events(f.getvalue(), pure, buffer_size=16)
    pre = [e for e in evs if isinstance(e, PreRamSection)]
    assert len(pre) == 1 and pre[0].raw == data_pre[8 + 18:]


def test_small_buffer_and_batch(pure):
    data = make(lambda w: [w.page("pc.ram", i * 4096, bytes([i]) * 4096) for i in range(40)])
    ref = pages(data, pure)
    assert_same(pages(data, pure, buffer_size=5000, max_batch=3), ref, "pages(data, pure, buffer_size=5000, max_batch=3)")
    assert len(ref) == 40


def test_fd_and_pipe_source(pure, tmp_path):
    data = make(lambda w: [w.zero("pc.ram", i * 4096) for i in range(10)])
    p = tmp_path / "s"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        evs = list(StreamReader(fd, pure=pure))
    finally:
        os.close(fd)
    assert isinstance(evs[-1], EndOfStream) and evs[-1].offset == len(data)
    r, wfd = os.pipe()
    import threading
    t = threading.Thread(target=lambda: (os.write(wfd, data), os.close(wfd)))
    t.start()
    try:
        evs2 = list(StreamReader(r, pure=pure))
    finally:
        t.join(); os.close(r)
    assert len(evs2) == len(evs)


def test_reader_attributes(pure):
    r = StreamReader(io.BytesIO(make(pre=lambda w: w.open_return_path())), pure=pure)
    list(r)
    assert r.uses_footers is True and r.configuration.machine == "pc-i440fx-7.2"
    assert [b.idstr for b in r.blocks] == ["pc.ram", "pc.bios"] and r.commands[0].name == "OPEN_RETURN_PATH"
    assert r.offset == len(make(pre=lambda w: w.open_return_path()))


def test_only_qsnap_errors_on_garbage(pure):
    import random
    rnd = random.Random(1)
    base = make(lambda w: w.page("pc.ram", 0, b"z" * 4096))
    for _ in range(200):
        b = bytearray(base)
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        try:
            events(bytes(b), pure)
        except QsnapError:
            pass


def test_purepython_env_selects_twin(monkeypatch):
    from qsnap.stream import _pyreader
    monkeypatch.setenv("QSNAP_PUREPYTHON", "1")
    r = StreamReader(io.BytesIO(make()))
    list(r)
    assert isinstance(r._parser, _pyreader.PyRamParser)
    monkeypatch.setenv("QSNAP_PUREPYTHON", "0")
    r = StreamReader(io.BytesIO(make()))
    list(r)
    assert not isinstance(r._parser, _pyreader.PyRamParser)


def test_iterate_once():
    r = StreamReader(io.BytesIO(make()))
    list(r)
    with pytest.raises(StreamError):
        iter(r)


class _Chunked(io.RawIOBase):
    """A source that hands out at most `chunk` bytes per read, like a pipe, and
    records where in the reader's buffer each read landed."""

    def __init__(self, data, chunk):
        self.data, self.pos, self.chunk, self.landed = data, 0, chunk, []

    def readable(self):
        return True

    def readinto(self, m):
        n = min(len(m), self.chunk, len(self.data) - self.pos)
        m[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        if n:
            # the address of the view's first byte, relative to the buffer's
            base = ctypes.addressof(ctypes.c_char.from_buffer(m.obj))
            self.landed.append(ctypes.addressof(ctypes.c_char.from_buffer(m)) - base)
        return n


def test_reads_land_at_the_front_of_the_buffer(pure):
    """Once a read's records are parsed, the few bytes left over move to the
    front of the buffer, so the next read lands there again: reads reuse one
    cached stretch of the buffer instead of walking through all 8 MiB of it."""
    data = make(lambda w: [w.page("pc.ram", i % 256 * 4096, bytes([i % 251 + 1]) * 4096)
                           for i in range(1000)])
    chunk = 16 << 10
    src = _Chunked(data, chunk)
    evs = list(StreamReader(src, pure=pure))
    assert isinstance(evs[-1], EndOfStream) and evs[-1].offset == len(data)
    assert len(src.landed) >= len(data) // chunk
    assert max(src.landed) < 64 << 10, sorted(set(src.landed))[-5:]
