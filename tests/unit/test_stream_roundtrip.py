"""Property tests: writer -> reader round trips, C parser vs pure twin, truncation."""
import io
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qsnap.errors import StreamError
from qsnap.stream import _pyreader
from qsnap.stream.constants import RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO
from qsnap.stream.events import Command, EndOfStream, PageBatch, RamBlock
from qsnap.stream.reader import StreamReader
from qsnap.stream.synth import synth_stream
from qsnap.stream.writer import StreamWriter

from _streamutil import events
from bigcmp import assert_same

try:
    from qsnap._core import RamParser
except ImportError:  # pragma: no cover
    RamParser = None

names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)
block_lists = st.lists(st.tuples(names, st.integers(1, 64)), min_size=1, max_size=5,
                       unique_by=lambda t: t[0])


@st.composite
def stream_specs(draw):
    blocks = [RamBlock(n, p * 4096) for n, p in draw(block_lists)]
    recs = []
    for _ in range(draw(st.integers(0, 30))):
        bi = draw(st.integers(0, len(blocks) - 1))
        pg = draw(st.integers(0, blocks[bi].length // 4096 - 1))
        kind = draw(st.sampled_from(["page", "zero", "xbzrle", "part"]))
        recs.append((kind, bi, pg, draw(st.integers(0, 255))))
    cmds = draw(st.lists(st.sampled_from(["orp", "ping", "advise", "switch"]), max_size=4))
    return blocks, recs, cmds, draw(st.booleans()), draw(st.booleans()), draw(st.booleans())


def build(spec):
    blocks, recs, cmds, footers, use_continue, machine = spec
    f = io.BytesIO()
    w = StreamWriter(f, footers=footers, use_continue=use_continue)
    w.header()
    if machine or footers:
        w.configuration("pc-i440fx-7.2")
    for c in cmds:
        {"orp": w.open_return_path, "ping": lambda: w.ping(7), "advise": w.postcopy_advise_empty,
         "switch": w.switchover_start}[c]()
    w.section_start(3, "ram", 0, 4)
    w.mem_size(blocks)
    w.eos(); w.footer(3)
    w.section_part(3)
    expect = []
    for kind, bi, pg, val in recs:
        b = blocks[bi].idstr
        if kind == "page":
            w.page(b, pg * 4096, bytes([val]) * 4096)
            expect.append((b, pg * 4096, "page", bytes([val]) * 4096))
        elif kind == "zero":
            w.zero(b, pg * 4096, fill=val)
            expect.append((b, pg * 4096, "zero", val))
        elif kind == "xbzrle":
            w.xbzrle(b, pg * 4096, bytes([val]) * (val % 50))
            expect.append((b, pg * 4096, "xbzrle", bytes([val]) * (val % 50)))
        else:
            w.eos(); w.footer(3); w.section_part(3)
    w.eos(); w.footer(3)
    w.section_end(3); w.eos(); w.footer(3)
    w.section_full(0, "timer", 0, 2, b"abc")
    w.eof()
    return f.getvalue(), expect


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_specs(), st.booleans())
def test_roundtrip(spec, pure):
    data, expect = build(spec)
    got = []
    cmds = []
    for e in StreamReader(io.BytesIO(data), pure=pure, buffer_size=1 << 16, max_batch=7):
        if isinstance(e, PageBatch):
            for idstr, off, flags, payload in e.iter_pages():
                kind = flags & ~RAM_SAVE_FLAG_CONTINUE
                if kind == RAM_SAVE_FLAG_PAGE:
                    got.append((idstr, off, "page", payload))
                elif kind == RAM_SAVE_FLAG_ZERO:
                    got.append((idstr, off, "zero", payload[0] if payload else 0))
                else:
                    got.append((idstr, off, "xbzrle", payload))
        elif isinstance(e, Command):
            cmds.append(e.name)
    assert_same(got, expect, "pages")
    assert len(cmds) == len(spec[2])


# -- C parser vs pure twin -----------------------------------------------------

TWIN_BLOCKS = [(b"pc.ram", 0x10000), (b"b", 0x3000)]


@st.composite
def record_bytes(draw):
    out = b""
    for _ in range(draw(st.integers(0, 12))):
        choice = draw(st.integers(0, 9))
        off = draw(st.integers(0, 20)) * 0x1000
        if choice == 0:
            out += draw(st.binary(max_size=40))
            continue
        flags = draw(st.sampled_from([0x02, 0x08, 0x40, 0x100, 0x200, 0x10, 0x04, 0x22, 0x28, 0x62, 0x01, 0x80,
                                      0x0a, 0x122, 0x800]))
        out += struct.pack(">Q", off | flags)
        if not flags & 0x20:
            out += draw(st.sampled_from([b"\x06pc.ram", b"\x01b", b"\x03foo", b"\x00"]))
        kind = flags & ~0x20
        if kind == 0x02:
            out += draw(st.binary(min_size=0, max_size=1))
        elif kind == 0x08:
            out += bytes(draw(st.sampled_from([4096, 100])))
        elif kind == 0x40:
            n = draw(st.integers(0, 5000))
            out += bytes([draw(st.sampled_from([1, 1, 2]))]) + struct.pack(">H", n) + bytes(min(n, 200))
        elif kind == 0x100:
            n = draw(st.integers(0, 5000))
            out += struct.pack(">I", n) + bytes(min(n, 300))
    return out


@pytest.mark.skipif(RamParser is None, reason="qsnap._core not built")
@settings(max_examples=300, deadline=None)
@given(record_bytes(), st.integers(-1, 1), st.integers(1, 6), st.integers(0, 1 << 40))
def test_c_matches_pure(buf, last_block, cap, base):
    c = RamParser(cap, 4096)
    c.set_blocks(TWIN_BLOCKS)
    c.last_block = last_block
    p = _pyreader.PyRamParser(cap, 4096)
    p.set_blocks(TWIN_BLOCKS)
    p.last_block = last_block
    try:
        rc = c.parse(buf, base)
        ce = None
    except StreamError as e:
        rc, ce = None, str(e)
    try:
        rp = p.parse(buf, base)
        pe = None
    except StreamError as e:
        rp, pe = None, str(e)
    assert_same(ce, pe, "parse error (C vs pure)")
    if rc is not None:
        assert rc[0] == rp[0] and rc[2] == rp[2]
        assert_same(rc[1].tobytes(), rp[1].tobytes(), "page records (C vs pure)")
    assert c.last_block == p.last_block


# -- truncation ------------------------------------------------------------------

def small_stream():
    f = io.BytesIO()
    synth_stream(f, blocks=(("pc.ram", 6 * 4096), ("pc.bios", 2 * 4096)), mode="precopy-live", passes=2,
                 dirty_share=0.5, return_path=True, seed=3)
    return f.getvalue()


def legit_prefix(data, n):
    """QEMU accepts a stream cut right after EOF (before VMDESCRIPTION)."""
    return data[n - 1] == 0 and data[n : n + 1] == b"\x06" and int.from_bytes(data[n + 1 : n + 5], "big") == len(data) - n - 5


@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_truncation_every_offset(pure):
    data = small_stream()
    last = events(data, pure)[-1]   # the whole stream parses to its end
    assert isinstance(last, EndOfStream) and last.offset == len(data), last
    for n in range(len(data)):
        if legit_prefix(data, n):
            events(data[:n], pure)
            continue
        with pytest.raises(StreamError):
            events(data[:n], pure, buffer_size=1 << 16)


def test_truncation_random_offsets_large():
    f = io.BytesIO()
    synth_stream(f, blocks=(("pc.ram", 8 << 20),), mode="background", seed=5)
    data = f.getvalue()
    rnd = random.Random(0)
    for n in sorted(rnd.randrange(len(data)) for _ in range(40)):
        with pytest.raises(StreamError) as ei:
            events(data[:n], buffer_size=1 << 20)
        assert "truncated" in str(ei.value) or "EOF" in str(ei.value)


# -- synth ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["background", "precopy-live", "precopy-stopped"])
@pytest.mark.parametrize("data_kind", ["random", "pattern"])
def test_synth_final_pages(mode, data_kind):
    f = io.BytesIO()
    res = synth_stream(f, blocks=(("pc.ram", 2 << 20), ("pc.bios", 64 << 10)), mode=mode, data=data_kind,
                       zero_page_share=0.1, dirty_share=0.3, seed=11)
    assert res.total == len(f.getvalue())
    mem = {}
    for e in StreamReader(io.BytesIO(f.getvalue())):
        if isinstance(e, PageBatch):
            for idstr, off, flags, payload in e.iter_pages():
                mem[(idstr, off)] = None if (flags & 0xF) == RAM_SAVE_FLAG_ZERO or payload == bytes(4096) else payload
    expect = {(i, o): d for i, o, d in res.iter_nonzero()}
    assert_same({k: v for k, v in mem.items() if v is not None}, expect, "{k: v for k, v in mem.items() if v is not None}")
    # every page is sent at least once
    assert len(mem) == (2 << 20) // 4096 + (64 << 10) // 4096
    for (i, o), d in list(expect.items())[:20]:
        assert_same(res.final_page(i, o), d, "res.final_page(i, o)")
