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
from . import encode
from .constants import (
    ENCODING_FLAG_XBZRLE,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
)

HOST_PAGE_SIZE = 4096
_idstr = encode.idstr


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
        self.raw(encode.file_header(version))

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
        self.raw(encode.command(cmd, payload))

    def open_return_path(self):
        self.raw(encode.open_return_path())

    def ping(self, value):
        self.raw(encode.ping(value))

    def postcopy_advise(self, summary, tps=4096):
        self.raw(encode.postcopy_advise(summary, tps))

    def postcopy_advise_empty(self):
        self.raw(encode.postcopy_advise_empty())

    def postcopy_listen(self):
        self.raw(encode.postcopy_listen())

    def postcopy_run(self):
        self.raw(encode.postcopy_run())

    def switchover_start(self):
        self.raw(encode.switchover_start())

    def ram_discard(self, idstr, ranges):
        """POSTCOPY_RAM_DISCARD commands for (start, length) byte ranges, 12 per command."""
        self.raw(encode.ram_discard(idstr, ranges))

    def packaged(self, blob):
        self.raw(encode.packaged(blob))

    # -- sections --------------------------------------------------------------

    def section_start(self, section_id, idstr, instance_id=0, version_id=4):
        self.raw(encode.section_start(section_id, idstr, instance_id, version_id))

    def section_part(self, section_id):
        self.raw(encode.section_part(section_id))

    def section_end(self, section_id):
        self.raw(encode.section_end(section_id))

    def footer(self, section_id):
        if self.footers:
            self.raw(encode.section_footer(section_id))

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
        self.raw(encode.section_full(section_id, idstr, instance_id, version_id) + bytes(payload))
        self.footer(section_id)

    def eof(self):
        self.raw(encode.eof())

    def vmdescription(self, json_bytes):
        self.raw(encode.vmdescription(json_bytes))

    # -- RAM records -------------------------------------------------------------

    def mem_size(self, blocks, *, page_size_fields=False, gpa_fields=False):
        """MEM_SIZE record + block list; ``blocks`` are RamBlock-like (idstr, length, page_size, gpa)."""
        total = sum(b.length for b in blocks)
        if total & (self.page_size - 1):
            raise StreamError("MEM_SIZE total 0x%x is not page aligned" % total)
        self.raw(encode.mem_size(blocks, host_page_size=HOST_PAGE_SIZE if page_size_fields else None,
                                 gpa_fields=gpa_fields))
        self._last_block = None

    def record_head(self, idstr, offset, flag, use_continue=None):
        """The be64 word of a page record and, unless CONTINUE applies, its block idstr."""
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
        self.raw(self.record_head(idstr, offset, RAM_SAVE_FLAG_PAGE, use_continue) + bytes(data))

    def zero(self, idstr, offset, fill=0, *, use_continue=None):
        self.raw(self.record_head(idstr, offset, RAM_SAVE_FLAG_ZERO, use_continue) + bytes([fill]))

    def xbzrle(self, idstr, offset, encoded, *, use_continue=None):
        if len(encoded) > self.page_size:
            raise StreamError("XBZRLE data of %d bytes exceeds the page size" % len(encoded))
        self.raw(self.record_head(idstr, offset, RAM_SAVE_FLAG_XBZRLE, use_continue)
                 + struct.pack(">BH", ENCODING_FLAG_XBZRLE, len(encoded)) + bytes(encoded))

    def eos(self):
        self.raw(encode.ram_eos())

    def multifd_flush(self):
        self.raw(encode.multifd_flush())

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
        first = self.record_head(idstr, int(offsets[0]), RAM_SAVE_FLAG_PAGE, None)
        self.raw(first + data[:ps].tobytes())
        if n > 1:
            rec = np.empty((n - 1, 8 + ps), np.uint8)
            words = (offsets[1:] | np.uint64(RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE)).astype(">u8")
            rec[:, :8] = words.view(np.uint8).reshape(-1, 8)
            rec[:, 8:] = data[ps:].reshape(-1, ps)
            self.raw(memoryview(rec).cast("B"))
