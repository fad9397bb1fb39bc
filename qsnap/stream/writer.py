"""StreamWriter: emit QEMU migration streams (QEMU migration/savevm.c, ram.c layout).

Sections: ``section_start/section_part/section_end`` write the header only;
close them with ``end_section(id)`` (writes the footer when footers are on), or
use ``with w.section(...)`` which does it for you.  ``section_full`` writes a
whole FULL section including its footer.  The CONTINUE state (last block of a
page record) persists across sections as QEMU's does.
"""
from __future__ import annotations

import contextlib
import os
import struct

import numpy as np

from ..errors import IOFailure, StreamError
from .constants import (
    ENCODING_FLAG_XBZRLE,
    IDSTR_MAX,
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
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
)

HOST_PAGE_SIZE = 4096


def _idstr(name):
    b = name.encode() if isinstance(name, str) else bytes(name)
    if not 0 < len(b) <= IDSTR_MAX:
        raise StreamError("idstr %r must be 1..255 bytes" % (name,))
    return bytes([len(b)]) + b


class StreamWriter:
    """Write a migration stream to a file object (``write``) or an int fd."""

    def __init__(self, out, *, page_size=4096, footers=True, use_continue=True):
        if page_size < 512 or page_size & (page_size - 1):
            raise StreamError("page size %d is not a power of two >= 512" % page_size)
        self.page_size = page_size
        self.footers = footers
        self.use_continue = use_continue
        self.bytes_written = 0
        self._last_block = None
        if isinstance(out, int):
            fd = out

            def _w(b):
                mv = memoryview(b)
                while len(mv):
                    n = os.write(fd, mv)
                    mv = mv[n:]

            self._write = _w
        else:
            self._write = out.write

    # -- raw ------------------------------------------------------------------

    def raw(self, data):
        """Write bytes verbatim."""
        try:
            self._write(data)
        except OSError as e:
            raise IOFailure("write failed at stream offset 0x%x: %s" % (self.bytes_written, e)) from e
        self.bytes_written += len(data)

    # -- header, configuration, commands ---------------------------------------

    def header(self, version=3):
        self.raw(struct.pack(">II", QEMU_VM_FILE_MAGIC, version))

    def configuration(self, machine, capabilities=(), uuid=None, target_page_bits=None):
        m = machine.encode()
        parts = [bytes([QEMU_VM_CONFIGURATION]), struct.pack(">I", len(m)), m]

        def sub(name, payload):
            parts.extend([bytes([QEMU_VM_SUBSECTION]), _idstr(name), struct.pack(">I", 1), payload])

        if target_page_bits is not None:
            sub("configuration/target-page-bits", struct.pack(">I", target_page_bits))
        if capabilities:
            sub("configuration/capabilities",
                struct.pack(">I", len(capabilities)) + b"".join(_idstr(c) for c in capabilities))
        if uuid is not None:
            if len(uuid) != 16:
                raise StreamError("uuid must be 16 bytes")
            sub("configuration/uuid", bytes(uuid))
        self.raw(b"".join(parts))

    def command(self, cmd, payload=b""):
        if len(payload) > 0xFFFF:
            raise StreamError("command payload of %d bytes is too long" % len(payload))
        self.raw(struct.pack(">BHH", QEMU_VM_COMMAND, cmd, len(payload)) + bytes(payload))

    def open_return_path(self):
        self.command(MIG_CMD_OPEN_RETURN_PATH)

    def ping(self, value):
        self.command(MIG_CMD_PING, struct.pack(">I", value))

    def postcopy_advise(self, summary, tps=4096):
        self.command(MIG_CMD_POSTCOPY_ADVISE, struct.pack(">QQ", summary, tps))

    def postcopy_advise_empty(self):
        self.command(MIG_CMD_POSTCOPY_ADVISE)

    def postcopy_listen(self):
        self.command(MIG_CMD_POSTCOPY_LISTEN)

    def postcopy_run(self):
        self.command(MIG_CMD_POSTCOPY_RUN)

    def switchover_start(self):
        self.command(MIG_CMD_SWITCHOVER_START)

    def ram_discard(self, idstr, ranges):
        """POSTCOPY_RAM_DISCARD commands for (start, length) byte ranges, 12 per command."""
        head = bytes([POSTCOPY_RAM_DISCARD_VERSION]) + _idstr(idstr) + b"\0"
        ranges = list(ranges)
        for i in range(0, len(ranges), MAX_DISCARDS_PER_COMMAND):
            body = b"".join(struct.pack(">QQ", s, l) for s, l in ranges[i : i + MAX_DISCARDS_PER_COMMAND])
            self.command(MIG_CMD_POSTCOPY_RAM_DISCARD, head + body)

    def packaged(self, blob):
        self.command(MIG_CMD_PACKAGED, struct.pack(">I", len(blob)))
        self.raw(bytes(blob))

    # -- sections --------------------------------------------------------------

    def section_start(self, section_id, idstr, instance_id=0, version_id=4):
        self.raw(bytes([QEMU_VM_SECTION_START]) + struct.pack(">I", section_id) + _idstr(idstr)
                 + struct.pack(">II", instance_id, version_id))

    def section_part(self, section_id):
        self.raw(struct.pack(">BI", QEMU_VM_SECTION_PART, section_id))

    def section_end(self, section_id):
        self.raw(struct.pack(">BI", QEMU_VM_SECTION_END, section_id))

    def footer(self, section_id):
        if self.footers:
            self.raw(struct.pack(">BI", QEMU_VM_SECTION_FOOTER, section_id))

    end_section = footer

    @contextlib.contextmanager
    def section(self, kind, section_id, idstr=None, instance_id=0, version_id=4):
        """``with w.section(QEMU_VM_SECTION_PART, 2): ...`` writes header, body, footer."""
        if kind == QEMU_VM_SECTION_START:
            self.section_start(section_id, idstr, instance_id, version_id)
        elif kind == QEMU_VM_SECTION_PART:
            self.section_part(section_id)
        elif kind == QEMU_VM_SECTION_END:
            self.section_end(section_id)
        else:
            raise StreamError("section() takes START, PART or END, not 0x%x" % kind)
        yield self
        self.footer(section_id)

    def section_full(self, section_id, idstr, instance_id, version_id, payload):
        self.raw(bytes([QEMU_VM_SECTION_FULL]) + struct.pack(">I", section_id) + _idstr(idstr)
                 + struct.pack(">II", instance_id, version_id) + bytes(payload))
        self.footer(section_id)

    def eof(self):
        self.raw(bytes([QEMU_VM_EOF]))

    def vmdescription(self, json_bytes):
        self.raw(struct.pack(">BI", QEMU_VM_VMDESCRIPTION, len(json_bytes)) + bytes(json_bytes))

    # -- RAM records -------------------------------------------------------------

    def mem_size(self, blocks, *, page_size_fields=False, gpa_fields=False):
        """MEM_SIZE record + block list; ``blocks`` are RamBlock-like (idstr, length, page_size, gpa)."""
        total = sum(b.length for b in blocks)
        if total & (self.page_size - 1):
            raise StreamError("MEM_SIZE total 0x%x is not page aligned" % total)
        parts = [struct.pack(">Q", total | RAM_SAVE_FLAG_MEM_SIZE)]
        for b in blocks:
            parts.append(_idstr(b.idstr) + struct.pack(">Q", b.length))
            if page_size_fields and b.page_size is not None and b.page_size != HOST_PAGE_SIZE:
                parts.append(struct.pack(">Q", b.page_size))
            if gpa_fields:
                parts.append(struct.pack(">Q", b.gpa or 0))
        self.raw(b"".join(parts))
        self._last_block = None

    def _word_and_id(self, idstr, offset, flag, use_continue):
        if offset & (self.page_size - 1):
            raise StreamError("page offset 0x%x is not page aligned" % offset)
        idb = idstr.encode() if isinstance(idstr, str) else bytes(idstr)
        cont = self.use_continue if use_continue is None else use_continue
        if cont and idb == self._last_block:
            return struct.pack(">Q", offset | flag | RAM_SAVE_FLAG_CONTINUE)
        self._last_block = idb
        return struct.pack(">Q", offset | flag) + _idstr(idb)

    def page(self, idstr, offset, data, *, use_continue=None):
        if len(data) != self.page_size:
            raise StreamError("page data must be %d bytes, got %d" % (self.page_size, len(data)))
        self.raw(self._word_and_id(idstr, offset, RAM_SAVE_FLAG_PAGE, use_continue) + bytes(data))

    def zero(self, idstr, offset, fill=0, *, use_continue=None):
        self.raw(self._word_and_id(idstr, offset, RAM_SAVE_FLAG_ZERO, use_continue) + bytes([fill]))

    def xbzrle(self, idstr, offset, encoded, *, use_continue=None):
        if len(encoded) > self.page_size:
            raise StreamError("XBZRLE data of %d bytes exceeds the page size" % len(encoded))
        self.raw(self._word_and_id(idstr, offset, RAM_SAVE_FLAG_XBZRLE, use_continue)
                 + struct.pack(">BH", ENCODING_FLAG_XBZRLE, len(encoded)) + bytes(encoded))

    def eos(self):
        self.raw(struct.pack(">Q", RAM_SAVE_FLAG_EOS))

    def multifd_flush(self):
        self.raw(struct.pack(">Q", RAM_SAVE_FLAG_MULTIFD_FLUSH))

    def write_pages(self, idstr, offsets, data_buffer):
        """Bulk PAGE records for one block: page i of ``data_buffer`` at ``offsets[i]``.

        The first record names the block unless CONTINUE applies; the rest use
        CONTINUE (when enabled).  Built with NumPy, written in one call.
        """
        ps = self.page_size
        offsets = np.asarray(offsets, dtype=np.uint64)
        n = len(offsets)
        data = np.frombuffer(memoryview(data_buffer).cast("B"), np.uint8)
        if len(data) != n * ps:
            raise StreamError("write_pages: %d offsets need %d bytes of data, got %d" % (n, n * ps, len(data)))
        if n == 0:
            return
        if np.any(offsets & np.uint64(ps - 1)):
            raise StreamError("write_pages: offsets must be page aligned")
        if not self.use_continue:
            for i in range(n):
                self.page(idstr, int(offsets[i]), data[i * ps : (i + 1) * ps].tobytes())
            return
        first = self._word_and_id(idstr, int(offsets[0]), RAM_SAVE_FLAG_PAGE, None)
        self.raw(first + data[:ps].tobytes())
        if n > 1:
            rec = np.empty((n - 1, 8 + ps), np.uint8)
            words = (offsets[1:] | np.uint64(RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE)).astype(">u8")
            rec[:, :8] = words.view(np.uint8).reshape(-1, 8)
            rec[:, 8:] = data[ps:].reshape(-1, ps)
            self.raw(memoryview(rec).cast("B"))
