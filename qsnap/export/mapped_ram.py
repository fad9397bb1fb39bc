"""Mapped-ram export: a ``file:`` migration stream QEMU >= 9.0 restores with
``migrate_incoming "file:OUT"`` and the ``mapped-ram`` capability on.

Layout (QEMU migration/ram.c mapped_ram_setup_ramblock, ram_save_setup,
docs/devel/migration/mapped-ram.rst; migration-stream.md 8.2):

    "QEVM" version 3
    configuration             the image's, with "mapped-ram" added to
                              configuration/capabilities (savevm.c vmstate_capabilites)
    pre-RAM FULL sections     verbatim from the image (8.0+ early setup)
    SECTION_START "ram"       MEM_SIZE word, then per block:
                                counted idstr, be64 used_length, [be64 GPA iff x-ignore-shared],
                                MappedRamHeader (be32 version 1, be64 page_size,
                                be64 bitmap_offset, be64 pages_offset),
                                and the file continues at pages_offset + used_length;
                              after the last block: EOS, footer
    [COMMAND SWITCHOVER_START] if the saved stream had one
    [SECTION_END "ram"]       EOS, footer; if the saved stream had one
    device state              verbatim: FULL sections, EOF, VMDESCRIPTION

Per block: the bitmap at bitmap_offset (right after its header; host unsigned
longs, page i = bit i%64 of little-endian word i/64), page i at pages_offset +
i*page_size, everything else a hole. Only the pages the image stores (the
non-zero ones) are written and have their bit set; the destination leaves the
others as they are, zero in a fresh QEMU.
"""
import io
import struct

import numpy as np

from qsnap.errors import ImageError, StreamError
from qsnap.export.pages import stored_bits
from qsnap.stream import constants as C
from qsnap.stream.events import Configuration
from qsnap.stream.reader import StreamReader
from qsnap.stream.writer import StreamWriter

# ram.c: MappedRamHeader, packed, big-endian
MAPPED_RAM_HDR = struct.Struct(">IQQQ")
MAPPED_RAM_CAPABILITY = "mapped-ram"
# savevm.c: capabilities checked against the destination's (migrate_..._validate)
VALIDATED_CAPABILITIES = ("x-ignore-shared", MAPPED_RAM_CAPABILITY)


def _be32(v):
    return struct.pack(">I", v)


def _be64(v):
    return struct.pack(">Q", v)


def _counted(s):
    raw = s.encode() if isinstance(s, str) else bytes(s)
    return bytes([len(raw)]) + raw


def parse_configuration(header_bytes):
    """The Configuration record of an image's saved stream header."""
    # the reader peeks past the configuration for the next record: give it an EOF byte
    reader = StreamReader(io.BytesIO(bytes(header_bytes) + bytes([C.QEMU_VM_EOF])))
    try:
        for e in reader:
            if isinstance(e, Configuration):
                return e
            if not hasattr(e, "version"):
                break
    except StreamError:
        pass
    raise ImageError("the image's stream header has no configuration section; QEMU needs one "
                     "to announce the mapped-ram capability")


def file_header(header_bytes, capabilities):
    """Stream header + configuration with ``capabilities`` (the validated ones that are on)."""
    conf = parse_configuration(header_bytes)
    out = io.BytesIO()
    w = StreamWriter(out)
    w.header()
    w.configuration(conf.machine, capabilities=capabilities, uuid=conf.uuid,
                    target_page_bits=conf.target_page_bits)
    return out.getvalue()


def bitmap_size(length, page_size):
    """ram.c: BITS_TO_LONGS(num_pages) * sizeof(unsigned long)."""
    pages = -(-length // page_size)
    return -(-pages // 64) * 8


class _Framing:
    """savevm.c save_section_header / save_section_footer for the RAM section."""

    def __init__(self, info):
        rs = info.get("ram_section")
        if not rs:
            raise ImageError("the image records no RAM section (meta.stream.ram_section is null)")
        self.sid = _be32(rs["section_id"])
        self.instance_id = rs.get("instance_id", 0)
        self.version_id = rs.get("version_id", C.RAM_SECTION_VERSION)
        self.footer = bytes([C.QEMU_VM_SECTION_FOOTER]) + self.sid if info.get("footers", True) else b""

    def start(self):
        return (bytes([C.QEMU_VM_SECTION_START]) + self.sid + _counted(C.RAM_SECTION_IDSTR)
                + _be32(self.instance_id) + _be32(self.version_id))

    def close(self):
        return _be64(C.RAM_SAVE_FLAG_EOS) + self.footer

    def end(self):
        return bytes([C.QEMU_VM_SECTION_END]) + self.sid + self.close()


def write_mapped_ram(img, pages, out):
    """Write ``img`` as a mapped-ram stream to ``out`` (an AtomicOutput); returns the file size."""
    info = img.stream_info
    tps = img.target_page_size
    framing = _Framing(info)
    ignore_shared = "x-ignore-shared" in (info.get("capabilities") or [])
    caps = [c for c in VALIDATED_CAPABILITIES if c == MAPPED_RAM_CAPABILITY or
            c in (info.get("capabilities") or [])]
    head = file_header(img.header_bytes, caps) + img.pre_ram + framing.start()
    head += _be64(sum(b.length for b in img.blocks) | C.RAM_SAVE_FLAG_MEM_SIZE)
    pos = 0
    regions = []
    for b in img.blocks:
        entry = _counted(b.idstr) + _be64(b.length)
        if ignore_shared:
            if b.gpa is None:
                raise ImageError(f"block '{b.idstr}' has no GPA but x-ignore-shared is on")
            entry += _be64(b.gpa)
        hdr_at = pos + len(head) + len(entry)
        bitmap_offset = hdr_at + MAPPED_RAM_HDR.size
        pages_offset = -(-(bitmap_offset + bitmap_size(b.length, tps))
                         // C.MAPPED_RAM_FILE_OFFSET_ALIGNMENT) * C.MAPPED_RAM_FILE_OFFSET_ALIGNMENT
        entry += MAPPED_RAM_HDR.pack(C.MAPPED_RAM_HDR_VERSION, tps, bitmap_offset, pages_offset)
        out.pwrite(head + entry, pos)
        regions.append((bitmap_offset, pages_offset))
        pos = pages_offset + b.length
        head = b""
    tail = framing.close()
    if info.get("switchover_start"):
        tail += struct.pack(">BHH", C.QEMU_VM_COMMAND, C.MIG_CMD_SWITCHOVER_START, 0)
    if info.get("ram_end", True):
        tail += framing.end()
    tail += img.device_state
    out.pwrite(head + tail, pos)
    size = pos + len(head) + len(tail)
    out.size(size)
    for bi, (bitmap_offset, pages_offset) in enumerate(regions):
        _write_block(img, pages, out, bi, bitmap_offset, pages_offset)
    return size


def _write_block(img, pages, out, bi, bitmap_offset, pages_offset):
    b = img.blocks[bi]
    bits = stored_bits(b, img.target_page_size)
    bm = np.packbits(bits, bitorder="little").tobytes()
    out.pwrite(bm + bytes(bitmap_size(b.length, img.target_page_size) - len(bm)), bitmap_offset)
    for boff, data in pages.runs(bi):
        out.pwrite(data, pages_offset + boff)
