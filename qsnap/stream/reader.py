"""StreamReader: bounded-memory streaming parser of QEMU migration streams.

Iterating a reader yields the events of :mod:`qsnap.stream.events` in stream
order.  Memory stays bounded whatever the stream size: one read buffer
(``buffer_size``, grown only for a single item larger than it), a reusable
record array of ``max_batch`` entries, and the device-state tail / PACKAGED
blobs (each at most ``max_device_state`` bytes).

Layout facts follow QEMU migration/savevm.c (qemu_loadvm_state) and
migration/ram.c (ram_load_precopy); see /work/shared/docs/migration-stream.md.

Device sections (SECTION_FULL) are not self-delimiting.  The reader never
interprets them: everything from the first FULL/EOF byte after the RAM START to
the end of input is returned verbatim as one ``DeviceState``, checked by
:func:`qsnap.stream.tail.parse_tail`.  FULL sections *before* the RAM START
(8.0+ early setup) are delimited by their footers and are supported only in
streams with footers.
"""
from __future__ import annotations

import io
import os
import stat
import struct

import numpy as np

from ..errors import StreamError
from . import _pyreader
from .constants import (
    MAPPED_RAM_HDR_VERSION,
    MIG_CMD_LEN,
    MIG_CMD_MAX,
    MIG_CMD_NAMES,
    MIG_CMD_OPEN_RETURN_PATH,
    MIG_CMD_PACKAGED,
    MIG_CMD_POSTCOPY_ADVISE,
    MIG_CMD_POSTCOPY_RAM_DISCARD,
    MIG_CMD_RECV_BITMAP,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    RAM_SAVE_FLAG_PAGE,
    RAM_SECTION_IDSTR,
    RAM_SECTION_VERSION,
    SECTION_TYPE_NAMES,
    TARGET_PAGE_SIZE_DEFAULT,
)
from .tail import parse_tail
from .tail import truncated as _truncated
from .events import (
    Command,
    Configuration,
    DeviceState,
    EndOfStream,
    Eos,
    FileHeader,
    MemSize,
    PageBatch,
    PAGE_REC_DTYPE,
    PreRamSection,
    RamBlock,
    SectionFooter,
    SectionHeader,
)

_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20
_MAX_MACHINE_NAME = 4096
_MAX_CAPABILITIES = 4096
_MAX_BUFFER = 64 << 20  # largest single item kept in the read buffer
# Unread bytes up to this many are moved to the front of the read buffer
# before the next read, so that reads keep landing in the same, cached
# stretch of it instead of walking through all of it.
_SMALL_REST = 64 << 10


def _use_pure(pure):
    if pure is None:
        return os.environ.get("QSNAP_PUREPYTHON", "") not in ("", "0")
    return bool(pure)


def _make_parser(pure, cap, page_size):
    if not pure:
        try:
            from .._core import RamParser
        except ImportError:  # extension not built: fall back to the twin
            pure = True
    if pure:
        return _pyreader.PyRamParser(cap, page_size)
    return RamParser(cap, page_size)


class _Input:
    """One read buffer over a file object or fd, with compaction.

    ``mv[pos:end]`` holds unread bytes; ``base`` is the stream offset of buf[0].
    """

    def __init__(self, src, buffer_size):
        self.buf = bytearray(max(buffer_size, 1 << 16))
        self.mv = memoryview(self.buf)
        self.pos = 0
        self.end = 0
        self.base = 0
        self.eof = False
        self.src = src
        self.fd = None
        if isinstance(src, int):
            self.fd = src
            self._readinto = lambda m: os.readv(self.fd, [m])
        else:
            try:
                self.fd = src.fileno()
            except (AttributeError, OSError, io.UnsupportedOperation):
                self.fd = None
            if hasattr(src, "readinto"):
                self._readinto = src.readinto
            elif hasattr(src, "read"):
                def _ri(m, _read=src.read):
                    data = _read(len(m))
                    m[: len(data)] = data
                    return len(data)

                self._readinto = _ri
            else:
                raise TypeError("src must be a binary file object or an int fd")
        if self.fd is not None:
            try:
                if stat.S_ISFIFO(os.fstat(self.fd).st_mode):
                    import fcntl

                    fcntl.fcntl(self.fd, _F_SETPIPE_SZ, _PIPE_SIZE)
            except (OSError, ValueError, ImportError):
                pass

    @property
    def offset(self):
        return self.base + self.pos

    @property
    def avail(self):
        return self.end - self.pos

    def _raw_read(self, m):
        try:
            n = self._readinto(m)
        except OSError as e:
            from ..errors import IOFailure

            raise IOFailure("read error at stream offset 0x%x: %s" % (self.base + self.end, e)) from e
        return n or 0

    def fill(self, need):
        """Read until at least ``need`` bytes are unread; False at end of input."""
        while self.end - self.pos < need:
            if self.eof:
                return False
            cap = len(self.buf)
            if need > cap:
                if need > _MAX_BUFFER:
                    raise StreamError("item of %d bytes at stream offset 0x%x is too large" % (need, self.offset))
                nb = bytearray(max(need, cap * 2))
                nb[: self.end - self.pos] = self.mv[self.pos : self.end]
                self.buf, self.mv = nb, memoryview(nb)
                self.base += self.pos
                self.end -= self.pos
                self.pos = 0
            elif self.end == cap or cap - self.pos < need or (
                self.pos and (self.end - self.pos <= _SMALL_REST or cap - self.end < cap // 4)
            ):
                n = self.end - self.pos
                self.mv[0:n] = self.mv[self.pos : self.end]
                self.base += self.pos
                self.pos = 0
                self.end = n
            got = self._raw_read(self.mv[self.end :])
            if got == 0:
                self.eof = True
                return self.end - self.pos >= need
            self.end += got
        return True

    def ensure(self, n, what):
        if self.end - self.pos < n and not self.fill(n):
            raise _truncated(n - self.avail, what, self.offset)

    def take(self, n, what):
        self.ensure(n, what)
        b = bytes(self.mv[self.pos : self.pos + n])
        self.pos += n
        return b

    def u8(self, what):
        self.ensure(1, what)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def peek_u8(self, what):
        self.ensure(1, what)
        return self.buf[self.pos]

    def be16(self, what):
        return int.from_bytes(self.take(2, what), "big")

    def be32(self, what):
        return int.from_bytes(self.take(4, what), "big")

    def be64(self, what):
        return int.from_bytes(self.take(8, what), "big")

    def peek_be64(self, what):
        self.ensure(8, what)
        return int.from_bytes(self.mv[self.pos : self.pos + 8], "big")

    def read_exact(self, n, what):
        """Read ``n`` bytes (may exceed the buffer) into a new bytes object."""
        start = self.offset
        have = min(self.avail, n)
        out = bytearray(n)
        out[:have] = self.mv[self.pos : self.pos + have]
        self.pos += have
        got = have
        om = memoryview(out)
        while got < n:
            r = self._raw_read(om[got:])
            if r == 0:
                self.eof = True
                raise _truncated(n - got, what, start + got)
            got += r
        self.base += got - have  # bytes read around the buffer
        return bytes(out)

    def read_rest(self, limit, what, until=None):
        """Everything up to end of input (at most ``limit`` bytes).

        ``until(parts)`` may end the read early: it is asked after each read
        and returns True when the bytes so far are complete.
        """
        start = self.offset
        parts = [bytes(self.mv[self.pos : self.end])]
        total = len(parts[0])
        self.pos = self.end
        chunk = bytearray(1 << 20)
        cm = memoryview(chunk)
        while True:
            if total > limit:
                raise StreamError(
                    "%s at stream offset 0x%x is larger than the limit of %d bytes" % (what, start, limit)
                )
            if self.eof or (until is not None and until(parts)):
                break
            r = self._raw_read(cm)
            if r == 0:
                self.eof = True
                break
            total += r
            parts.append(bytes(cm[:r]))
        data = b"".join(parts)
        self.base = start + total - self.pos
        return data

    def seek_file(self, file_offset):
        """Reposition to an absolute file offset (mapped-ram), dropping buffered data."""
        if self.fd is not None and not hasattr(self.src, "seek"):
            os.lseek(self.fd, file_offset, os.SEEK_SET)
        else:
            self.src.seek(file_offset)
        self.pos = self.end = 0
        self.eof = False


class StreamReader:
    """Iterate QEMU migration-stream events from a file object or fd.

    Attributes kept up to date while iterating: ``offset`` (stream offset of the
    next unread byte), ``blocks`` (list of RamBlock from MEM_SIZE, or None),
    ``uses_footers`` (None until known), ``configuration`` (Configuration or
    None), ``commands`` (list of Command seen on the outer stream).

    ``stop_at_logical_end``: when the stream opened a return path, its source
    keeps the pipe open until it gets SHUT, so the stream ends at the
    VMDESCRIPTION that completes the device state rather than at end of input.
    """

    def __init__(self, src, *, buffer_size=8 << 20, max_batch=8192, max_device_state=256 << 20, pure=None,
                 stop_at_logical_end=False):
        if max_batch <= 0 or buffer_size <= 0:
            raise ValueError("buffer_size and max_batch must be positive")
        self._in = _Input(src, buffer_size)
        self._pure = _use_pure(pure)
        self._max_batch = max_batch
        self.max_device_state = max_device_state
        self.stop_at_logical_end = stop_at_logical_end
        self.page_size = TARGET_PAGE_SIZE_DEFAULT
        self.blocks = None
        self.uses_footers = None
        self.configuration = None
        self.commands = []
        self.ram_section_id = None
        self.advise = None  # (host page-size summary, target page size) from a 16-byte ADVISE
        self._parser = None
        self._started = False
        self._file_start = None

    @property
    def offset(self):
        return self._in.offset

    def __iter__(self):
        if self._started:
            raise StreamError("a StreamReader can be iterated only once")
        self._started = True
        return self._events()

    # -- top level ----------------------------------------------------------

    def _events(self):
        inp = self._in
        yield self._file_header()
        if inp.peek_u8("section type") == QEMU_VM_CONFIGURATION:
            self.configuration = self._configuration()
            yield self.configuration

        while True:
            off = inp.offset
            t = inp.peek_u8("section type")
            if t == QEMU_VM_COMMAND:
                cmd = self._command()
                self.commands.append(cmd)
                yield cmd
            elif t == QEMU_VM_SECTION_START:
                yield from self._ram_start(off)
            elif t in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
                yield from self._ram_part_or_end(off, t)
            elif t == QEMU_VM_SECTION_FULL and self.ram_section_id is None:
                yield self._pre_ram_section()
            elif t in (QEMU_VM_SECTION_FULL, QEMU_VM_EOF):
                if self.ram_section_id is None:
                    raise StreamError("stream has no RAM section (EOF at stream offset 0x%x)" % off)
                yield self._tail()
                yield EndOfStream(inp.offset)
                return
            else:
                raise StreamError(
                    "unknown section type 0x%02x (%s) at stream offset 0x%x"
                    % (t, SECTION_TYPE_NAMES.get(t, "unknown"), off)
                )

    def _file_header(self):
        inp = self._in
        magic = inp.be32("file header")
        if magic != QEMU_VM_FILE_MAGIC:
            raise StreamError("not a migration stream: bad magic 0x%08x at stream offset 0x0" % magic)
        version = inp.be32("file header")
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise StreamError("obsolete stream version 0x%x (SaveVM v2) at stream offset 0x4" % version)
        if version != QEMU_VM_FILE_VERSION:
            raise StreamError("unsupported stream version 0x%x at stream offset 0x4" % version)
        return FileHeader(0, version)

    def _ram_start(self, off):
        """SECTION_START of the one iterable section qsnap supports: RAM."""
        hdr = self._full_header()
        if hdr.idstr != RAM_SECTION_IDSTR.decode():
            raise StreamError("unsupported iterable section %r at stream offset 0x%x" % (hdr.idstr, off))
        if self.ram_section_id is not None:
            raise StreamError("second RAM SECTION_START at stream offset 0x%x" % off)
        if hdr.version_id != RAM_SECTION_VERSION:
            raise StreamError(
                "unsupported RAM section version %d at stream offset 0x%x" % (hdr.version_id, off)
            )
        if hdr.instance_id != 0:
            raise StreamError(
                "unknown RAM section instance %d at stream offset 0x%x" % (hdr.instance_id, off)
            )
        self.ram_section_id = hdr.section_id
        yield hdr
        yield from self._ram_payload(hdr.section_id, True)
        yield from self._footer(hdr.section_id)

    def _ram_part_or_end(self, off, t):
        """SECTION_PART/END: only of the RAM section a START opened."""
        inp = self._in
        inp.pos += 1
        sid = inp.be32("section id")
        if self.ram_section_id is None or sid != self.ram_section_id:
            raise StreamError(
                "%s for unknown section id %d at stream offset 0x%x" % (SECTION_TYPE_NAMES[t], sid, off)
            )
        yield SectionHeader(off, t, sid, None, None, None)
        yield from self._ram_payload(sid, False)
        yield from self._footer(sid)

    def _idstr(self, what):
        off = self._in.offset
        n = self._in.u8(what + " length")
        if n == 0:
            raise StreamError("%s of length 0 at stream offset 0x%x" % (what, off))
        raw = self._in.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise StreamError("%s %r is not UTF-8 at stream offset 0x%x" % (what, raw, off)) from None

    def _full_header(self):
        inp = self._in
        off = inp.offset
        t = inp.u8("section type")
        sid = inp.be32("section id")
        idstr = self._idstr("section idstr")
        instance_id = inp.be32("instance id")
        version_id = inp.be32("version id")
        return SectionHeader(off, t, sid, idstr, instance_id, version_id)

    def _footer(self, sid):
        inp = self._in
        off = inp.offset
        if self.uses_footers is None:
            self.uses_footers = inp.peek_u8("section footer or next section") == QEMU_VM_SECTION_FOOTER
        if not self.uses_footers:
            return
        t = inp.u8("section footer")
        if t != QEMU_VM_SECTION_FOOTER:
            raise StreamError(
                "missing section footer for section %d (got byte 0x%02x) at stream offset 0x%x" % (sid, t, off)
            )
        got = inp.be32("section footer")
        if got != sid:
            raise StreamError(
                "mismatched section id in footer: read 0x%x expected 0x%x at stream offset 0x%x" % (got, sid, off)
            )
        yield SectionFooter(off, sid)

    # -- configuration and commands -----------------------------------------

    def _configuration(self):
        inp = self._in
        off = inp.offset
        raw = [inp.take(1, "configuration")]
        n = inp.be32("machine name length")
        raw.append(n.to_bytes(4, "big"))
        if n > _MAX_MACHINE_NAME:
            raise StreamError("machine name length %d too large at stream offset 0x%x" % (n, off + 1))
        name_b = inp.take(n, "machine name")
        raw.append(name_b)
        try:
            machine = name_b.decode("ascii")
        except UnicodeDecodeError:
            raise StreamError("machine name %r is not ASCII at stream offset 0x%x" % (name_b, off + 5)) from None
        cfg = Configuration(off, machine)
        while inp.peek_u8("configuration subsection or next record") == QEMU_VM_SUBSECTION:
            soff = inp.offset
            raw.append(inp.take(1, "subsection"))
            sn = inp.u8("subsection name length")
            sname_b = inp.take(sn, "subsection name")
            ver_b = inp.take(4, "subsection version")
            raw += [bytes([sn]), sname_b, ver_b]
            version = int.from_bytes(ver_b, "big")
            sname = sname_b.decode("latin-1")
            if sname == "configuration/target-page-bits":
                payload = inp.take(4, "target-page-bits")
                bits = int.from_bytes(payload, "big")
                if not 9 <= bits <= 16:
                    raise StreamError("target page bits %d out of range at stream offset 0x%x" % (bits, soff))
                cfg.target_page_bits = bits
                self.page_size = 1 << bits
            elif sname == "configuration/capabilities":
                cnt_b = inp.take(4, "capability count")
                cnt = int.from_bytes(cnt_b, "big")
                if cnt > _MAX_CAPABILITIES:
                    raise StreamError("capability count %d too large at stream offset 0x%x" % (cnt, soff))
                parts = [cnt_b]
                for _ in range(cnt):
                    cl = inp.u8("capability name length")
                    cb = inp.take(cl, "capability name")
                    parts += [bytes([cl]), cb]
                    cfg.capabilities.append(cb.decode("latin-1"))
                payload = b"".join(parts)
            elif sname == "configuration/uuid":
                payload = inp.take(16, "uuid")
                cfg.uuid = payload
            else:
                raise StreamError("unknown configuration subsection %r at stream offset 0x%x" % (sname, soff))
            raw.append(payload)
            cfg.subsections.append((sname, version, payload))
        cfg.raw = b"".join(raw)
        return cfg

    def _command(self):
        inp = self._in
        off = inp.offset
        inp.pos += 1
        cmd = inp.be16("command")
        length = inp.be16("command length")
        name = MIG_CMD_NAMES.get(cmd, "")
        if cmd == 0 or cmd >= MIG_CMD_MAX:
            raise StreamError("MIG_CMD 0x%x unknown (len 0x%x) at stream offset 0x%x" % (cmd, length, off))
        fixed = MIG_CMD_LEN.get(cmd, 0)
        if fixed >= 0 and length != fixed:
            raise StreamError(
                "%s received with bad length - expecting %d, got %d at stream offset 0x%x"
                % (name, fixed, length, off)
            )
        if cmd == MIG_CMD_POSTCOPY_ADVISE and length not in (0, 16):
            raise StreamError("POSTCOPY_ADVISE with bad length %d at stream offset 0x%x" % (length, off))
        payload = inp.take(length, name + " payload")
        blob = None
        if cmd == MIG_CMD_POSTCOPY_ADVISE and length == 16:
            summary, tps = struct.unpack(">QQ", payload)
            if tps == 0 or tps & (tps - 1) or not 512 <= tps <= 1 << 16:
                raise StreamError("POSTCOPY_ADVISE target page size 0x%x invalid at stream offset 0x%x" % (tps, off))
            self.advise = (summary, tps)
        elif cmd == MIG_CMD_POSTCOPY_RAM_DISCARD:
            self._check_discard(payload, off)
        elif cmd == MIG_CMD_RECV_BITMAP:
            if length < 2 or payload[0] + 1 != length or payload[0] == 0:
                raise StreamError("RECV_BITMAP with bad length %d at stream offset 0x%x" % (length, off))
        elif cmd == MIG_CMD_PACKAGED:
            blen = int.from_bytes(payload, "big")
            if blen > self.max_device_state:
                raise StreamError(
                    "PACKAGED blob of %d bytes exceeds the limit of %d at stream offset 0x%x"
                    % (blen, self.max_device_state, off)
                )
            blob = inp.read_exact(blen, "PACKAGED blob")
        return Command(off, cmd, payload, blob)

    @staticmethod
    def _check_discard(p, off):
        n = len(p)
        if n < 20:
            raise StreamError("POSTCOPY_RAM_DISCARD invalid length %d at stream offset 0x%x" % (n, off))
        if p[0] != 0:
            raise StreamError("POSTCOPY_RAM_DISCARD version %d unsupported at stream offset 0x%x" % (p[0], off))
        idlen = p[1]
        if idlen == 0 or 3 + idlen > n or p[2 + idlen] != 0 or (n - 3 - idlen) % 16:
            raise StreamError("POSTCOPY_RAM_DISCARD malformed (idstr length %d, len %d) at stream offset 0x%x"
                              % (idlen, n, off))

    # -- RAM ----------------------------------------------------------------

    def _ram_payload(self, sid, is_start):
        inp = self._in
        if self._parser is None:
            self._parser = _make_parser(self._pure, self._max_batch, self.page_size)
        parser = self._parser
        while True:
            data = inp.mv[inp.pos : inp.end]
            status, recs, consumed = parser.parse(data, inp.offset)
            if self.blocks is None and (len(recs) or status == _pyreader.QS_RAM_EOS):
                # RAM_SAVE_FLAG_MEM_SIZE opens a RAM section (migration/ram.c,
                # ram_load_precopy): no record may come before the block list.
                raise StreamError(
                    "RAM record (flags 0x%x) before the MEM_SIZE record at stream offset 0x%x"
                    % (self._first_flags(recs, data), inp.offset)
                )
            if len(recs):
                if self._mapped_ram():
                    raise StreamError(
                        "unexpected RAM record flags 0x%x in a mapped-ram stream at stream offset 0x%x"
                        % (int(recs["flags"][0]), inp.offset)
                    )
                yield PageBatch(sid, recs, data[:consumed].toreadonly(), self.blocks)
            inp.pos += consumed
            if status == _pyreader.QS_RAM_EOS:
                yield Eos(inp.offset - 8, sid)
                return
            if status == _pyreader.QS_RAM_FULL:
                continue
            if status == _pyreader.QS_RAM_MEMSIZE:
                if not is_start or self.blocks is not None:
                    raise StreamError("unexpected MEM_SIZE record at stream offset 0x%x" % inp.offset)
                yield from self._mem_size(sid)
                continue
            # NEED_MORE: the record at inp.pos is incomplete
            need = max(_pyreader.record_need(inp.mv[inp.pos : inp.end], parser.page_size), inp.avail + 1)
            if not inp.fill(need):
                raise _truncated(need - inp.avail, "RAM record", inp.offset)

    def _first_flags(self, recs, data):
        if len(recs):
            return int(recs["flags"][0])
        return int.from_bytes(data[:8], "big") & (self.page_size - 1)

    def _mapped_ram(self):
        return self.configuration is not None and "mapped-ram" in self.configuration.capabilities

    def _mem_size(self, sid):
        inp = self._in
        off = inp.offset
        ps = self.page_size
        total = inp.be64("MEM_SIZE record") & ~(ps - 1)
        caps = self.configuration.capabilities if self.configuration else []
        gpa_fields = "x-ignore-shared" in caps
        mapped = "mapped-ram" in caps
        blocks = []
        remaining = total
        names = set()
        while remaining > 0:
            boff = inp.offset
            idstr = self._idstr("RAM block idstr")
            if idstr in names:
                raise StreamError("duplicate RAM block %r at stream offset 0x%x" % (idstr, boff))
            names.add(idstr)
            length = inp.be64("RAM block length")
            if length > remaining:
                raise StreamError(
                    "RAM block %r length 0x%x exceeds the remaining MEM_SIZE total 0x%x at stream offset 0x%x"
                    % (idstr, length, remaining, boff)
                )
            remaining -= length
            page_size = gpa = mr = None
            if self.advise is not None:
                v = inp.peek_be64("RAM block page size or next record")
                summary = self.advise[0]
                if v > ps and v & (v - 1) == 0 and v & summary == v:
                    page_size = v
                    inp.pos += 8
            if gpa_fields:
                gpa = inp.be64("RAM block address")
            if mapped:
                mr = self._mapped_ram_header(idstr, length, inp.offset)
            blocks.append(RamBlock(idstr, length, page_size, gpa, mr))
        self.blocks = blocks
        self._parser.set_blocks([(b.idstr.encode(), b.length) for b in blocks])
        yield MemSize(off, total, blocks)
        if mapped:
            yield from self._mapped_ram_pages(sid)

    def _mapped_ram_header(self, idstr, length, off):
        inp = self._in
        hdr = inp.take(28, "MappedRamHeader")
        version, page_size, bitmap_offset, pages_offset = struct.unpack(">IQQQ", hdr)
        if version > MAPPED_RAM_HDR_VERSION or version == 0:
            raise StreamError("mapped-ram header version %d unsupported at stream offset 0x%x" % (version, off))
        if page_size != self.page_size:
            raise StreamError("mapped-ram page size 0x%x unsupported at stream offset 0x%x" % (page_size, off))
        nbits = (length + page_size - 1) // page_size
        bitmap_size = (nbits + 63) // 64 * 8
        if pages_offset % page_size or pages_offset < bitmap_offset + bitmap_size:
            raise StreamError(
                "mapped-ram pages offset 0x%x invalid for block %r at stream offset 0x%x" % (pages_offset, idstr, off)
            )
        fd = inp.fd
        if fd is None:
            raise StreamError("mapped-ram stream needs a seekable file (block %r at stream offset 0x%x)" % (idstr, off))
        try:
            if self._file_start is None:
                cur = self._in.src.tell() if hasattr(self._in.src, "tell") else os.lseek(fd, 0, os.SEEK_CUR)
                self._file_start = cur - (inp.base + inp.end)
            size = os.fstat(fd).st_size
        except OSError:
            raise StreamError("mapped-ram stream needs a seekable file (block %r at stream offset 0x%x)"
                              % (idstr, off)) from None
        target = pages_offset + length
        if target > size:
            raise _truncated(target - size, "mapped-ram region of block %r" % idstr, off)
        base_stream = target - self._file_start
        inp.seek_file(target)
        inp.base = base_stream
        return (version, page_size, bitmap_offset, pages_offset)

    def _mapped_ram_pages(self, sid):
        fd = self._in.fd
        ps = self.page_size
        chunk_pages = max(1, min(self._max_batch, (len(self._in.buf) // ps)))
        for bi, b in enumerate(self.blocks):
            _ver, _ps, bitmap_offset, pages_offset = b.mapped_ram
            npages = (b.length + ps - 1) // ps
            bsize = (npages + 63) // 64 * 8
            bm = os.pread(fd, bsize, bitmap_offset)
            if len(bm) != bsize:
                raise _truncated(bsize - len(bm), "mapped-ram bitmap of block %r" % b.idstr, bitmap_offset)
            bits = np.unpackbits(np.frombuffer(bm, np.uint8), bitorder="little")[:npages]
            idx = np.flatnonzero(bits)
            for c in range(0, len(idx), chunk_pages):
                sel = idx[c : c + chunk_pages]
                buf = bytearray(len(sel) * ps)
                mv = memoryview(buf)
                # contiguous runs -> one pread each
                breaks = np.flatnonzero(np.diff(sel) != 1) + 1
                starts = np.concatenate(([0], breaks))
                ends = np.concatenate((breaks, [len(sel)]))
                for s, e in zip(starts.tolist(), ends.tolist()):
                    want = (e - s) * ps
                    foff = pages_offset + int(sel[s]) * ps
                    got = os.preadv(fd, [mv[s * ps : e * ps]], foff)
                    if got != want:
                        raise _truncated(want - got, "mapped-ram pages of block %r" % b.idstr, foff)
                recs = np.zeros(len(sel), PAGE_REC_DTYPE)
                recs["offset"] = sel.astype(np.uint64) * ps
                recs["data_pos"] = np.arange(len(sel), dtype=np.uint64) * ps
                recs["data_len"] = ps
                recs["block"] = bi
                recs["flags"] = RAM_SAVE_FLAG_PAGE
                yield PageBatch(sid, recs, mv.toreadonly(), self.blocks)

    # -- device state ---------------------------------------------------------

    def _pre_ram_section(self):
        inp = self._in
        off = inp.offset
        hdr = self._full_header()
        if self.uses_footers is False:
            raise StreamError("SECTION_FULL before the RAM section needs section footers at stream offset 0x%x" % off)
        pat = bytes([QEMU_VM_SECTION_FOOTER]) + hdr.section_id.to_bytes(4, "big")
        search_abs = inp.offset
        while True:
            start = off - inp.base
            i = inp.buf.find(pat, search_abs - inp.base, inp.end)
            if i >= 0 and i + 6 <= inp.end:
                if inp.buf[i + 5] in (QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_START, QEMU_VM_COMMAND):
                    raw = bytes(inp.mv[start : i + 5])
                    inp.pos = i + 5
                    self.uses_footers = True
                    return PreRamSection(off, raw)
                search_abs = inp.base + i + 1
                continue
            search_abs = inp.base + (i if i >= 0 else max(start, inp.end - 5))
            if inp.end - start > self.max_device_state:
                raise StreamError("early SECTION_FULL at stream offset 0x%x is too large" % off)
            inp.pos = start  # keep the whole section in the buffer while reading more
            if not inp.fill(inp.avail + 1):
                raise _truncated(1, "footer of SECTION_FULL %r" % hdr.idstr, inp.base + inp.end)

    def _tail(self):
        inp = self._in
        off = inp.offset
        until = None
        if self.stop_at_logical_end and any(
            c.cmd == MIG_CMD_OPEN_RETURN_PATH for c in self.commands
        ):
            until = lambda parts: self._tail_complete(parts, off)  # noqa: E731
        data = inp.read_rest(self.max_device_state, "device state", until)
        eof_pos, vmdesc = parse_tail(data, off, self.uses_footers)
        return DeviceState(off, data, vmdesc, eof_pos)

    def _tail_complete(self, parts, off):
        """With a return path open the source keeps the pipe open until SHUT:
        the stream ends at the VMDESCRIPTION, not at end of input."""
        if not parts or not parts[-1].endswith(b"}"):
            return False
        try:
            _, vmdesc = parse_tail(b"".join(parts), off, self.uses_footers)
        except StreamError:
            return False
        return vmdesc is not None
