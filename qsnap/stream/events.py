"""Events yielded by :class:`qsnap.stream.reader.StreamReader`, in stream order.

Offsets are absolute stream offsets (bytes from the start of the stream) of the
first byte of the record.  ``PageBatch`` holds views into the reader's buffer
that stay valid only until the reader yields its next event.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import numpy as np

from .constants import (
    MIG_CMD_NAMES,
    MIG_CMD_PING,
    MIG_CMD_POSTCOPY_ADVISE,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
)

# One parsed RAM record; layout of qs_page_rec in csrc/ramparse.h (native endianness).
PAGE_REC_DTYPE = np.dtype(
    [
        ("offset", "u8"),
        ("data_pos", "u8"),
        ("data_len", "u4"),
        ("block", "u4"),
        ("flags", "u2"),
        ("fill", "u1"),
        ("_pad", "V5"),
    ]
)
assert PAGE_REC_DTYPE.itemsize == 32

NO_BLOCK = 0xFFFFFFFF  # records without a block (MULTIFD_FLUSH)


@dataclass
class FileHeader:
    __slots__ = ("offset", "version")
    offset: int
    version: int


@dataclass
class Configuration:
    """The QEMU_VM_CONFIGURATION record; ``raw`` is verbatim, 0x07 included."""

    offset: int
    machine: Optional[str]
    subsections: List[Tuple[str, int, bytes]] = field(default_factory=list)
    capabilities: List[str] = field(default_factory=list)
    target_page_bits: Optional[int] = None
    uuid: Optional[bytes] = None
    raw: bytes = b""


@dataclass
class Command:
    """A QEMU_VM_COMMAND; ``blob`` is the PACKAGED blob (not counted in ``payload``)."""

    __slots__ = ("offset", "cmd", "payload", "blob")
    offset: int
    cmd: int
    payload: bytes
    blob: Optional[bytes]

    @property
    def name(self) -> str:
        return MIG_CMD_NAMES.get(self.cmd, "cmd%d" % self.cmd)

    @property
    def ping_value(self) -> Optional[int]:
        """The be32 value of a PING (savevm.c qemu_savevm_send_ping), else None."""
        if self.cmd != MIG_CMD_PING or len(self.payload) != 4:
            return None
        return int.from_bytes(self.payload, "big")

    @property
    def advise(self) -> Optional[Tuple[int, int]]:
        """(host page-size summary, target page size) of a 16-byte POSTCOPY_ADVISE, else None."""
        if self.cmd != MIG_CMD_POSTCOPY_ADVISE or len(self.payload) != 16:
            return None
        return int.from_bytes(self.payload[:8], "big"), int.from_bytes(self.payload[8:], "big")


@dataclass
class SectionHeader:
    __slots__ = ("offset", "type", "section_id", "idstr", "instance_id", "version_id")
    offset: int
    type: int
    section_id: int
    idstr: Optional[str]
    instance_id: Optional[int]
    version_id: Optional[int]


@dataclass
class SectionFooter:
    __slots__ = ("offset", "section_id")
    offset: int
    section_id: int


@dataclass
class RamBlock:
    """One MEM_SIZE entry; optional fields are None when absent from the wire.

    ``mapped_ram`` is ``(version, page_size, bitmap_offset, pages_offset)``.
    """

    __slots__ = ("idstr", "length", "page_size", "gpa", "mapped_ram")
    idstr: str
    length: int
    page_size: Optional[int]
    gpa: Optional[int]
    mapped_ram: Optional[tuple]

    def __init__(self, idstr, length, page_size=None, gpa=None, mapped_ram=None):
        self.idstr = idstr
        self.length = length
        self.page_size = page_size
        self.gpa = gpa
        self.mapped_ram = mapped_ram


@dataclass
class MemSize:
    __slots__ = ("offset", "total", "blocks")
    offset: int
    total: int
    blocks: List[RamBlock]


@dataclass
class PageBatch:
    """RAM records of one parse call: ``records`` (PAGE_REC_DTYPE) index ``data``."""

    __slots__ = ("section_id", "records", "data", "blocks")
    section_id: int
    records: np.ndarray
    data: memoryview
    blocks: List[RamBlock]

    def __len__(self) -> int:
        return len(self.records)

    def iter_pages(self) -> Iterator[Tuple[Optional[str], int, int, Optional[bytes]]]:
        """Slow per-record view for tests: (idstr, offset, flags, payload or None).

        ZERO records give ``bytes([fill]) * 0`` -> None payload; MULTIFD_FLUSH
        gives idstr None.
        """
        for r in self.records.tolist():
            offset, dpos, dlen, block, flags, fill, _ = r
            idstr = self.blocks[block].idstr if block != NO_BLOCK else None
            kind = flags & ~RAM_SAVE_FLAG_CONTINUE
            if kind in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_COMPRESS_PAGE):
                payload = bytes(self.data[dpos : dpos + dlen])
            elif kind == RAM_SAVE_FLAG_ZERO:
                payload = None if fill == 0 else bytes([fill])
            else:
                payload = None
            yield idstr, offset, flags, payload


@dataclass
class Eos:
    __slots__ = ("offset", "section_id")
    offset: int
    section_id: int


@dataclass
class PreRamSection:
    """A SECTION_FULL before the RAM START (8.0+ early setup), verbatim with footer."""

    __slots__ = ("offset", "raw")
    offset: int
    raw: bytes


@dataclass
class DeviceState:
    """Everything from the first FULL/EOF byte after RAM to the end of input, verbatim."""

    __slots__ = ("offset", "data", "vmdescription", "eof_pos")
    offset: int
    data: bytes
    vmdescription: Optional[dict]
    eof_pos: int  # index of the EOF byte in ``data``

    @property
    def raw_sections(self) -> bytes:
        """The FULL sections (with footers) before the EOF byte."""
        return self.data[: self.eof_pos]


@dataclass
class EndOfStream:
    __slots__ = ("offset",)
    offset: int
