"""Encoders of the migration stream: pure functions that return bytes.

The one place that lays out what qsnap writes into a stream: the file header,
section framing, the MEM_SIZE block list, RAM records without payload and every
MIG_CMD.  ``StreamWriter`` writes what these return; the load and postcopy
engines put them between the pages their C emitter writes.  Layout as in QEMU
migration/savevm.c (qemu_savevm_command_send, save_section_header,
save_section_footer, qemu_savevm_send_postcopy_ram_discard) and migration/ram.c
(ram_save_setup).
"""
from __future__ import annotations

import struct

from ..errors import StreamError
from .constants import (
    IDSTR_MAX,
    MAPPED_RAM_HDR_VERSION,
    MAX_DISCARDS_PER_COMMAND,
    MIG_CMD_OPEN_RETURN_PATH,
    MIG_CMD_PACKAGED,
    MIG_CMD_PING,
    MIG_CMD_POSTCOPY_ADVISE,
    MIG_CMD_POSTCOPY_LISTEN,
    MIG_CMD_POSTCOPY_RAM_DISCARD,
    MIG_CMD_POSTCOPY_RUN,
    MIG_CMD_SWITCHOVER_START,
    POSTCOPY_RAM_DISCARD_VERSION,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SECTION_IDSTR,
    RAM_SECTION_VERSION,
)


def be32(v):
    return struct.pack(">I", v)


def be64(v):
    return struct.pack(">Q", v)


def idstr(name):
    """A length-prefixed idstr (savevm.c qemu_put_counted_string)."""
    b = name.encode() if isinstance(name, str) else bytes(name)
    if not 0 < len(b) <= IDSTR_MAX:
        raise StreamError("idstr %r must be 1..255 bytes" % (name,))
    return bytes([len(b)]) + b


def file_header(version=3):
    return struct.pack(">II", QEMU_VM_FILE_MAGIC, version)


# -- commands (savevm.c qemu_savevm_command_send and its callers) ----------------

def command(cmd, payload=b""):
    if len(payload) > 0xFFFF:
        raise StreamError("command payload of %d bytes is too long" % len(payload))
    return struct.pack(">BHH", QEMU_VM_COMMAND, cmd, len(payload)) + bytes(payload)


def open_return_path():
    return command(MIG_CMD_OPEN_RETURN_PATH)


def ping(value):
    return command(MIG_CMD_PING, be32(value))


def postcopy_advise(summary, target_page_size):
    """ADVISE with the host page-size summary and the target page size."""
    return command(MIG_CMD_POSTCOPY_ADVISE, struct.pack(">QQ", summary, target_page_size))


def postcopy_advise_empty():
    return command(MIG_CMD_POSTCOPY_ADVISE)


def postcopy_listen():
    return command(MIG_CMD_POSTCOPY_LISTEN)


def postcopy_run():
    return command(MIG_CMD_POSTCOPY_RUN)


def switchover_start():
    return command(MIG_CMD_SWITCHOVER_START)


def ram_discard(name, ranges):
    """POSTCOPY_RAM_DISCARD commands for (start, length) byte ranges, 12 per command."""
    head = bytes([POSTCOPY_RAM_DISCARD_VERSION]) + idstr(name) + b"\0"
    ranges = list(ranges)
    out = []
    for i in range(0, len(ranges), MAX_DISCARDS_PER_COMMAND):
        body = b"".join(struct.pack(">QQ", s, n) for s, n in ranges[i:i + MAX_DISCARDS_PER_COMMAND])
        out.append(command(MIG_CMD_POSTCOPY_RAM_DISCARD, head + body))
    return b"".join(out)


def packaged_header(length):
    """PACKAGED command announcing a blob of ``length`` bytes (the blob follows it)."""
    return command(MIG_CMD_PACKAGED, be32(length))


def packaged(blob):
    return packaged_header(len(blob)) + bytes(blob)


# -- sections (savevm.c save_section_header, save_section_footer) -------------------

def section_start(section_id, name, instance_id=0, version_id=RAM_SECTION_VERSION):
    return (bytes([QEMU_VM_SECTION_START]) + be32(section_id) + idstr(name)
            + struct.pack(">II", instance_id, version_id))


def section_full(section_id, name, instance_id, version_id):
    """Header of a FULL section; the payload and the footer follow it."""
    return (bytes([QEMU_VM_SECTION_FULL]) + be32(section_id) + idstr(name)
            + struct.pack(">II", instance_id, version_id))


def section_part(section_id):
    return struct.pack(">BI", QEMU_VM_SECTION_PART, section_id)


def section_end(section_id):
    return struct.pack(">BI", QEMU_VM_SECTION_END, section_id)


def section_footer(section_id):
    return struct.pack(">BI", QEMU_VM_SECTION_FOOTER, section_id)


def eof():
    return bytes([QEMU_VM_EOF])


def vmdescription(json_bytes):
    return struct.pack(">BI", QEMU_VM_VMDESCRIPTION, len(json_bytes)) + bytes(json_bytes)


# -- RAM records (ram.c) ---------------------------------------------------------------

def ram_eos():
    return be64(RAM_SAVE_FLAG_EOS)


def multifd_flush():
    return be64(RAM_SAVE_FLAG_MULTIFD_FLUSH)


def mem_size(blocks, *, host_page_size=None, gpa_fields=False):
    """MEM_SIZE record + block list of the RAM SECTION_START (ram.c ram_save_setup).

    ``blocks`` are RamBlock-like (idstr, length, page_size, gpa).  With
    ``host_page_size`` (postcopy was advised) a block whose page size is known
    and differs from it carries its be64 page size; with ``gpa_fields``
    (x-ignore-shared) every block carries its be64 guest-physical address.
    """
    total = sum(b.length for b in blocks)
    out = [be64(total | RAM_SAVE_FLAG_MEM_SIZE)]
    for b in blocks:
        out.append(idstr(b.idstr) + be64(b.length))
        if host_page_size is not None and b.page_size is not None and b.page_size != host_page_size:
            out.append(be64(b.page_size))
        if gpa_fields:
            out.append(be64(b.gpa or 0))
    return b"".join(out)


class RamFraming:
    """Framing of the RAM section's START, PART and END (with or without footers)."""

    def __init__(self, section_id, instance_id=0, version_id=RAM_SECTION_VERSION, footers=True):
        self.section_id = section_id
        self.instance_id = instance_id
        self.version_id = version_id
        self.footers = footers
        self.footer = section_footer(section_id) if footers else b""
        self.eos = ram_eos()
        self.part_start = section_part(section_id)
        self.section_close = self.eos + self.footer

    def start(self, payload):
        """SECTION_START ram, ``payload`` (the MEM_SIZE record), EOS, footer."""
        return (section_start(self.section_id, RAM_SECTION_IDSTR, self.instance_id, self.version_id)
                + payload + self.section_close)

    def end(self):
        return section_end(self.section_id) + self.section_close


# -- configuration (savevm.c vmstate_configuration) -------------------------------------

def configuration(machine, capabilities=(), uuid=None, target_page_bits=None):
    """The configuration record: machine name, then the subsections QEMU sends
    (target-page-bits, capabilities, uuid, in that order)."""
    m = machine.encode()
    parts = [bytes([QEMU_VM_CONFIGURATION]), be32(len(m)), m]

    def sub(name, payload):
        parts.extend([bytes([QEMU_VM_SUBSECTION]), idstr(name), be32(1), payload])

    if target_page_bits is not None:
        sub("configuration/target-page-bits", be32(target_page_bits))
    if capabilities:
        sub("configuration/capabilities", be32(len(capabilities)) + b"".join(idstr(c) for c in capabilities))
    if uuid is not None:
        if len(uuid) != 16:
            raise StreamError("uuid must be 16 bytes")
        sub("configuration/uuid", bytes(uuid))
    return b"".join(parts)


def without_capability(conf, name):
    """A Configuration event re-encoded without capability ``name``."""
    return configuration(conf.machine, [c for c in conf.capabilities if c != name],
                         conf.uuid, conf.target_page_bits)


# -- mapped-ram (ram.c mapped_ram_setup_ramblock, MappedRamHeader) ---------------------

def mapped_ram_bitmap_size(length, page_size):
    """BITS_TO_LONGS(pages) * sizeof(unsigned long) of a block's page bitmap."""
    pages = -(-length // page_size)
    return -(-pages // 64) * 8


def mapped_ram_header(page_size, bitmap_offset, pages_offset):
    """MappedRamHeader, packed big-endian: version, page_size, bitmap_offset, pages_offset."""
    return struct.pack(">IQQQ", MAPPED_RAM_HDR_VERSION, page_size, bitmap_offset, pages_offset)
