"""Helpers shared by the stream tests."""
import io
import struct

from qsnap.stream.events import PageBatch, RamBlock
from qsnap.stream.reader import StreamReader
from qsnap.stream.writer import StreamWriter

BLOCKS = [RamBlock("pc.ram", 0x100000), RamBlock("pc.bios", 0x40000)]


def tail(w, footers=True):
    w.section_full(0, "timer", 0, 2, b"\x01" * 25)
    w.eof()
    w.vmdescription(b'{"page_size":4096,"devices":[]}')


def make(body=None, *, footers=True, blocks=BLOCKS, machine="pc-i440fx-7.2", pre=None, end=True, capabilities=(),
         **mem_kw):
    """A complete small stream; ``body(w)`` writes records inside one PART."""
    f = io.BytesIO()
    w = StreamWriter(f, footers=footers)
    w.header()
    if machine:
        w.configuration(machine, capabilities=capabilities)
    if pre:
        pre(w)
    w.section_start(2, "ram", 0, 4)
    w.mem_size(blocks, **mem_kw)
    w.eos()
    w.footer(2)
    w.section_part(2)
    if body:
        body(w)
    w.eos()
    w.footer(2)
    if end:
        w.section_end(2)
        w.eos()
        w.footer(2)
    tail(w)
    return f.getvalue()


def events(data, pure=None, **kw):
    return list(StreamReader(io.BytesIO(data), pure=pure, **kw))


def pages(data, pure=None, **kw):
    """[(idstr, offset, flags, payload)] of every RAM record (copied)."""
    out = []
    for e in StreamReader(io.BytesIO(data), pure=pure, **kw):
        if isinstance(e, PageBatch):
            out.extend(e.iter_pages())
    return out


def word(off, flags):
    return struct.pack(">Q", off | flags)
