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

from qsnap.errors import ImageError, StreamError
from qsnap.export.pages import bitmap_bytes
from qsnap.stream import constants as C
from qsnap.stream import encode
from qsnap.stream.events import Configuration
from qsnap.stream.reader import StreamReader

# savevm.c: the capabilities checked against the destination's; those that are
# on are listed in configuration/capabilities
VALIDATED_CAPABILITIES = ("x-ignore-shared", C.MIGRATION_CAPABILITY_MAPPED_RAM)


def parse_configuration(header_bytes):
    """The Configuration record of an image's saved stream header."""
    # the reader peeks past the configuration for the next record: give it an EOF byte
    reader = StreamReader(io.BytesIO(bytes(header_bytes) + encode.eof()))
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
    return encode.file_header() + encode.configuration(conf.machine, capabilities, conf.uuid,
                                                       conf.target_page_bits)


def write_mapped_ram(img, pages, out):
    """Write ``img`` as a mapped-ram stream to ``out`` (an AtomicOutput); returns the file size."""
    info = img.stream_info
    tps = img.target_page_size
    rs = info.get("ram_section")
    if not rs:
        raise ImageError("the image records no RAM section (meta.stream.ram_section is null)")
    framing = encode.RamFraming(rs["section_id"], rs.get("instance_id", 0),
                                rs.get("version_id", C.RAM_SECTION_VERSION), bool(info.get("footers", True)))
    saved_caps = info.get("capabilities") or []
    caps = [c for c in VALIDATED_CAPABILITIES if c == C.MIGRATION_CAPABILITY_MAPPED_RAM or c in saved_caps]
    head = (file_header(img.header_bytes, caps) + img.pre_ram
            + encode.section_start(framing.section_id, C.RAM_SECTION_IDSTR, framing.instance_id,
                                   framing.version_id)
            + encode.be64(sum(b.length for b in img.blocks) | C.RAM_SAVE_FLAG_MEM_SIZE))
    pos, regions = 0, []
    for b in img.blocks:
        entry = _block_entry(b, "x-ignore-shared" in saved_caps)
        bitmap_offset = pos + len(head) + len(entry) + C.MAPPED_RAM_HDR_SIZE
        pages_offset = _round_up(bitmap_offset + encode.mapped_ram_bitmap_size(b.length, tps),
                                 C.MAPPED_RAM_FILE_OFFSET_ALIGNMENT)
        out.pwrite(head + entry + encode.mapped_ram_header(tps, bitmap_offset, pages_offset), pos)
        regions.append((bitmap_offset, pages_offset))
        pos, head = pages_offset + b.length, b""
    tail = framing.section_close
    if info.get("switchover_start"):
        tail += encode.switchover_start()
    if info.get("ram_end", True):
        tail += encode.section_end(framing.section_id) + framing.section_close
    tail += img.device_state
    out.pwrite(tail, pos)
    out.size(pos + len(tail))
    for bi, (bitmap_offset, pages_offset) in enumerate(regions):
        _write_block(img, pages, out, bi, bitmap_offset, pages_offset)
    return pos + len(tail)


def _round_up(v, align):
    return -(-v // align) * align


def _block_entry(b, gpa_field):
    """idstr and used_length of a block's MEM_SIZE entry [+ its GPA with x-ignore-shared]."""
    entry = encode.idstr(b.idstr) + encode.be64(b.length)
    if gpa_field:
        if b.gpa is None:
            raise ImageError(f"block '{b.idstr}' has no GPA but x-ignore-shared is on")
        entry += encode.be64(b.gpa)
    return entry


def _write_block(img, pages, out, bi, bitmap_offset, pages_offset):
    b = img.blocks[bi]
    _write_bitmap(b, out, bitmap_offset, encode.mapped_ram_bitmap_size(b.length, img.target_page_size),
                  pages.window)
    for boff, data in pages.runs(bi):
        out.pwrite(data, pages_offset + boff)


def _write_bitmap(b, out, at, size, window):
    """The block's bitmap, ``size`` bytes at ``at``, copied from the image's a window at a
    time: both keep page i in bit i % 8 of byte i / 8 (QEMU's host unsigned longs are
    little-endian here), and past the last page both are 0."""
    done = 0
    for first in range(0, b.n_pages, window):
        bm = bitmap_bytes(b, first, window).tobytes()
        out.pwrite(bm, at + done)
        done += len(bm)
    out.pwrite(bytes(size - done), at + done)   # the last unsigned long's unused bytes
