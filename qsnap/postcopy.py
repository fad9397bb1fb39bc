"""The postcopy load engine: qsnap image -> postcopy migration stream on stdout.

Runs behind ``migrate_incoming "exec:qsnap load --postcopy[=PCT] IMG"`` on a
destination with the ``postcopy-ram`` capability.  stdout carries the stream,
stdin is the return path (QEMU spawns exec: children with both pipes).  The
stream is what QEMU's own postcopy source sends (migration-stream.md 6.3):

    header + configuration            verbatim from the image
    COMMAND OPEN_RETURN_PATH, PING(1)
    COMMAND POSTCOPY_ADVISE           host page-size summary, target page size
    pre-RAM FULL sections             verbatim (8.0+ early setup), may be empty
    SECTION_START ram                 MEM_SIZE list, page size of huge-page blocks
    SECTION_PART ram  x N             precopy: the first clusters (host order) until
                                      PCT% of the non-zero pages, every page of them
    [COMMAND SWITCHOVER_START]        if the saved stream had one (10.0+)
    COMMAND POSTCOPY_RAM_DISCARD x N  only after precopy data: every range not sent
    PING(2), PACKAGED{LISTEN, device state up to its EOF, PING(3), RUN}, PING(4)
    SECTION_PART ram  x N             postcopy: requested pages first, else the
                                      zero host pages, then the data clusters
    SECTION_END ram, EOF              no VMDESCRIPTION

Every host page of every migrated block is delivered exactly once, as one
run of records (PAGE for stored target pages, ZERO for the others).  A
return-path reader thread validates and queues page requests; the writer
serves the queue between background record groups (at most ``group_pages``
target pages), reading requested pages with pread, checksums checked in C.
"""
import collections
import json
import math
import mmap
import os
import struct
import sys
import threading
import time

import numpy as np

from qsnap import _core
from qsnap.errors import ImageError, IOFailure, ProtocolError, QsnapError, UsageError
from qsnap.load import (PART_BYTES, _cluster_plan, _Framing, _grow_pipe, _open_image_data,
                        mem_size_record)
from qsnap.stream import constants as C

HOST_PAGE_SIZE = mmap.PAGESIZE
GROUP_PAGES = 64                 # target pages per background record group
ZERO_GROUP = 1 << 14             # host pages per ZERO group
POSTCOPY_PIPE_SIZE = 256 << 10   # a requested page never waits behind more than this
PING_VALUES = (1, 2, 3, 4)
EARLY_BYTES = 1 << 20            # per block, always sent before LISTEN
_DEBUG = bool(os.environ.get("QSNAP_PC_DEBUG"))

_RP_FIXED_LEN = {
    C.MIG_RP_MSG_SHUT: 4,
    C.MIG_RP_MSG_PONG: 4,
    C.MIG_RP_MSG_REQ_PAGES: 12,
    C.MIG_RP_MSG_RESUME_ACK: 4,
    C.MIG_RP_MSG_SWITCHOVER_ACK: 0,
}


def _cmd(cmd, payload=b""):
    return struct.pack(">BHH", C.QEMU_VM_COMMAND, cmd, len(payload)) + payload


def _ping(v):
    return _cmd(C.MIG_CMD_PING, struct.pack(">I", v))


def device_state_sections(img):
    """The image's device state without its EOF and VMDESCRIPTION (FULL sections only)."""
    from qsnap.stream.reader import StreamReader

    r = StreamReader(_EmptySource())
    r.uses_footers = bool(img.stream_info.get("footers", True))
    try:
        eof_pos, _ = r._check_tail(img.device_state, 0)
    except QsnapError as e:
        raise ImageError(f"bad device state in {img.path}: {e}") from None
    return img.device_state[:eof_pos]


class _EmptySource:
    def read(self, n=-1):
        return b""

    def readinto(self, b):
        return 0


def discard_commands(idstr, ranges):
    """POSTCOPY_RAM_DISCARD commands for (start, length) byte ranges, 12 per command."""
    raw = idstr.encode()
    head = bytes([C.POSTCOPY_RAM_DISCARD_VERSION, len(raw)]) + raw + b"\0"
    out = []
    for i in range(0, len(ranges), C.MAX_DISCARDS_PER_COMMAND):
        body = b"".join(struct.pack(">QQ", s, n) for s, n in ranges[i:i + C.MAX_DISCARDS_PER_COMMAND])
        out.append(_cmd(C.MIG_CMD_POSTCOPY_RAM_DISCARD, head + body))
    return b"".join(out)


class ReturnPath(threading.Thread):
    """Reads and validates return-path messages from ``fd``; queues page requests.

    ``blocks``: the image's BlockInfo list; a request must name a migrated block
    and cover whole host pages (``host_sizes``) inside it.
    """

    def __init__(self, fd, blocks, host_sizes, flag=None):
        super().__init__(name="qsnap-return-path", daemon=True)
        self.fd = fd
        self.flag = flag           # RequestFlag: set after a request is queued or on an error
        self.by_name = {b.idstr: i for i, b in enumerate(blocks) if b.migrated}
        self.blocks = blocks
        self.host_sizes = host_sizes
        self.requests = collections.deque()   # (t_read, block, start, length)
        self.cond = threading.Condition()
        self.pongs = []
        self.shut = None
        self.closed = False
        self.error = None
        self.stream_done = False   # set by the writer just before the final END + EOF
        self.messages = 0
        self.switchover_acks = 0
        self._last_block = None
        self._offset = 0

    def run(self):
        buf = bytearray()
        try:
            while True:
                try:
                    chunk = os.read(self.fd, 65536)
                except InterruptedError:
                    continue
                except OSError as e:
                    raise IOFailure(f"cannot read the return path: {e.strerror}") from None
                if not chunk:
                    break
                buf += chunk
                pos = self._parse(buf)
                del buf[:pos]
            if buf:
                raise ProtocolError(f"return path closed inside a message ({len(buf)} bytes "
                                    f"at return-path offset 0x{self._offset:x})")
            with self.cond:
                self.closed = True
                self.cond.notify_all()
            if not self.stream_done and self.shut is None:
                raise IOFailure("QEMU closed the return path before the migration completed")
        except QsnapError as e:
            with self.cond:
                self.error = e
                self.closed = True
                self.cond.notify_all()
            if self.flag is not None:
                self.flag.set()

    def _parse(self, buf):
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            typ, ln = struct.unpack_from(">HH", buf, pos)
            off = self._offset
            name = C.MIG_RP_MSG_NAMES.get(typ, "unknown")
            if typ == C.MIG_RP_MSG_INVALID or typ >= C.MIG_RP_MSG_MAX:
                raise ProtocolError(f"return-path message type {typ} ({name}) length {ln} "
                                    f"out of range at return-path offset 0x{off:x}")
            if ln > C.MIG_RP_MAX_LEN:
                raise ProtocolError(f"return-path message {name} length {ln} exceeds "
                                    f"{C.MIG_RP_MAX_LEN} at return-path offset 0x{off:x}")
            fixed = _RP_FIXED_LEN.get(typ)
            if fixed is not None and ln != fixed:
                raise ProtocolError(f"return-path message {name} with bad length {ln} "
                                    f"(expected {fixed}) at return-path offset 0x{off:x}")
            if n - pos - 4 < ln:
                break
            payload = bytes(buf[pos + 4:pos + 4 + ln])
            pos += 4 + ln
            self._offset += 4 + ln
            self.messages += 1
            if _DEBUG:
                os.write(2, f"rp {typ} {ln} {bytes(buf[pos - ln:pos]).hex()} t={time.monotonic():.3f}\n".encode())
            self._handle(typ, name, ln, payload, off)
        return pos

    def _handle(self, typ, name, ln, p, off):
        where = f"at return-path offset 0x{off:x}"
        if typ == C.MIG_RP_MSG_PONG:
            v = struct.unpack(">I", p)[0]
            if v not in PING_VALUES or v in self.pongs:
                raise ProtocolError(f"unexpected PONG value {v} {where}")
            with self.cond:
                self.pongs.append(v)
                self.cond.notify_all()
        elif typ == C.MIG_RP_MSG_SHUT:
            v = struct.unpack(">I", p)[0]
            if v:
                raise ProtocolError(f"QEMU reported an error on the return path (SHUT {v})")
            if not self.stream_done:
                raise ProtocolError(f"SHUT before the stream ended {where}")
            with self.cond:
                self.shut = v
                self.cond.notify_all()
        elif typ == C.MIG_RP_MSG_SWITCHOVER_ACK:
            self.switchover_acks += 1
        elif typ in (C.MIG_RP_MSG_REQ_PAGES_ID, C.MIG_RP_MSG_REQ_PAGES):
            t = time.monotonic()
            start, length = struct.unpack_from(">QI", p)
            if typ == C.MIG_RP_MSG_REQ_PAGES_ID:
                if ln < 14 or p[12] == 0 or ln != 13 + p[12]:
                    raise ProtocolError(f"REQ_PAGES_ID with bad length {ln} {where}")
                idstr = p[13:].decode("utf-8", "replace")
                bi = self.by_name.get(idstr)
                if bi is None:
                    raise ProtocolError(f"REQ_PAGES_ID for unknown RAM block '{idstr}' {where}")
                self._last_block = bi
            else:
                bi = self._last_block
                if bi is None:
                    raise ProtocolError(f"REQ_PAGES without a previous REQ_PAGES_ID {where}")
            b = self.blocks[bi]
            hps = self.host_sizes[bi]
            if length == 0 or start % hps or length % hps or start + length > b.length:
                raise ProtocolError(f"{name} for start 0x{start:x} length 0x{length:x} misaligned "
                                    f"(page size 0x{hps:x}) or outside block '{b.idstr}' "
                                    f"(length 0x{b.length:x}) {where}")
            with self.cond:
                self.requests.append((t, bi, start, length))
                self.cond.notify_all()
            if self.flag is not None:
                self.flag.set()
        else:
            raise ProtocolError(f"unexpected return-path message {name} (type {typ}) length {ln} {where}")


def _percentiles(xs):
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    a = np.sort(np.asarray(xs, dtype=np.float64)) * 1e3
    def q(p):
        return float(a[min(len(a) - 1, max(0, math.ceil(p / 100 * len(a)) - 1))])
    return {"p50": q(50), "p90": q(90), "p99": q(99), "max": float(a[-1])}


def load_postcopy(image_path, percent=10.0, cache="none", stats_path=None, quiet=False, *,
                  in_fd=0, out_fd=1, log=sys.stderr, group_pages=GROUP_PAGES,
                  part_bytes=PART_BYTES, n_bufs=_core.AIO_DEFAULT_BUFS,
                  n_threads=_core.AIO_DEFAULT_THREADS):
    """Write a postcopy migration stream from the image to ``out_fd``; serve ``in_fd`` requests.

    Returns the statistics dict (also written as JSON to ``stats_path``).
    When QEMU goes away (the return path fails) the error is raised here, also
    while a write waits for a stream reader that is still there.
    """
    if not 0 <= percent <= 100:
        raise UsageError(f"postcopy percentage {percent} not in 0..100")
    if group_pages < 1:
        raise UsageError("group_pages must be positive")
    t0 = time.monotonic()
    from qsnap.image.reader import Image

    if isinstance(image_path, (str, bytes, os.PathLike)):
        with Image.open(image_path) as img:
            stats = _Postcopy(img, percent, cache, in_fd, out_fd, log, group_pages,
                              part_bytes, n_bufs, n_threads, t0).run()
    else:
        stats = _Postcopy(image_path, percent, cache, in_fd, out_fd, log, group_pages,
                          part_bytes, n_bufs, n_threads, t0).run()
    if stats_path:
        with open(stats_path, "w") as f:
            json.dump(stats, f, indent=2)
    if not quiet:
        s = stats["service_ms"]
        log.write(f"qsnap: postcopy load of {stats['image']}: hand-over after "
                  f"{stats['handover_seconds']:.3f} s, {stats['pages_precopy']} pages precopy, "
                  f"{stats['pages_postcopy']} postcopy, {stats['pages_requested']} requested"
                  + (f" (p50 {s['p50']:.2f} ms, p99 {s['p99']:.2f} ms)" if s["p50"] is not None else "")
                  + f", {stats['seconds']:.2f} s\n")
        log.flush()
    return stats


class _Postcopy:
    def __init__(self, img, percent, cache, in_fd, out_fd, log, group_pages,
                 part_bytes, n_bufs, n_threads, t0):
        self.img = img
        self.percent = percent
        self.cache = cache
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.log = log
        self.group_pages = group_pages
        self.part_bytes = part_bytes
        self.n_bufs = n_bufs
        self.n_threads = n_threads
        self.t0 = t0
        self.info = img.stream_info
        self.blocks = list(img.blocks)
        self.tps = img.target_page_size
        self.cs = img.cluster_size
        self.service = []
        self.requests = 0
        self.requests_ignored = 0
        self.pages_requested = 0
        self._part_open = False
        self._part_mark = 0

    # --- setup ---------------------------------------------------------------------

    def _layout(self):
        tps, cs = self.tps, self.cs
        self.host_sizes = [max(b.page_size, tps) for b in self.blocks]
        for b, hps in zip(self.blocks, self.host_sizes):
            if hps & (hps - 1) or b.offset % min(hps, cs):
                raise ImageError(f"block '{b.idstr}' page size 0x{hps:x} unusable")
        self.tphp = [h // tps for h in self.host_sizes]
        self.n_pages = [-(-b.length // tps) for b in self.blocks]
        self.has_data = []
        self.cum = []
        for b, t, n in zip(self.blocks, self.tphp, self.n_pages):
            bits = np.unpackbits(b.bitmap, bitorder="little")[:n].astype(np.uint8)
            nhp = -(-n // t)
            padded = np.zeros(nhp * t, np.uint8)
            padded[:n] = bits
            self.has_data.append(padded.reshape(nhp, t).any(axis=1).astype(np.uint8))
            self.cum.append(np.concatenate(([0], np.cumsum(bits, dtype=np.int64))))
        # small-page blocks go by data cluster, huge-page blocks by host page
        self.small = [hps <= cs for hps in self.host_sizes]

    def _check_return_path(self):
        """Raise the return path's error: QEMU went away or misbehaved.  The
        emitter calls this while a write waits for the stream's reader."""
        if self.rp.error is not None:
            raise self.rp.error

    # --- output helpers ---------------------------------------------------------

    def _part(self):
        """Make sure a RAM SECTION_PART is open; close it after part_bytes."""
        em = self.em
        if self._part_open and em.bytes_out - self._part_mark >= self.part_bytes:
            em.bytes(self.framing.section_close)
            self._part_open = False
        if not self._part_open:
            em.bytes(self.framing.part_start)
            self._part_open = True
            self._part_mark = em.bytes_out

    def _close_part(self):
        if self._part_open:
            self.em.bytes(self.framing.section_close)
            self._part_open = False

    def _read_pages(self, bi, tp0, tp1):
        """Image bytes of target pages [tp0, tp1) of block bi (pread, unallocated -> zeros)."""
        b, tps, cs = self.blocks[bi], self.tps, self.cs
        img = self.img
        v = b.offset + tp0 * tps
        end = b.offset + tp1 * tps
        parts = []
        while v < end:
            n = min(end - v, cs - (v & (cs - 1)))
            h = img.host_offset(v)
            if h:
                try:
                    d = os.pread(self.req_fd, n, h)
                except OSError as e:
                    raise IOFailure(f"cannot read the image: {e.strerror} at image offset "
                                    f"0x{h:x}") from None
                if len(d) != n:
                    raise ImageError(f"image file truncated at image offset 0x{h:x}")
                parts.append(d)
            else:
                parts.append(bytes(n))
            v += n
        return b"".join(parts)

    def _send_host_pages(self, bi, hp0, hp1):
        """Read and send the unsent host pages [hp0, hp1) of block bi."""
        t = self.tphp[bi]
        tp0, tp1 = hp0 * t, min(hp1 * t, self.n_pages[bi])
        data = self._read_pages(bi, tp0, tp1) if self.has_data[bi][hp0:hp1].any() else None
        return self.pager.emit(bi, hp0, hp1, data, tp0)

    # --- requests -----------------------------------------------------------------

    def _serve(self):
        rp = self.rp
        self.flag.clear()    # before draining: a request queued from now on sets it again
        if rp.error is not None:
            raise rp.error
        q = rp.requests
        while q:
            t_req, bi, start, length = q.popleft()
            self.requests += 1
            hps = self.host_sizes[bi]
            hp0, hp1 = start // hps, (start + length) // hps
            sent = self.pager.sent[bi]
            if sent[hp0:hp1].all():
                self.requests_ignored += 1
                continue
            self._part()
            n = self._send_host_pages(bi, hp0, hp1)
            self.service.append(time.monotonic() - t_req)
            self.pages_requested += n
        if rp.error is not None:
            raise rp.error

    # --- main -----------------------------------------------------------------------

    def run(self):
        img, info, blocks = self.img, self.info, self.blocks
        self._layout()
        self.framing = framing = _Framing(info)
        _grow_pipe(self.out_fd)
        try:
            import fcntl
            fcntl.fcntl(self.out_fd, 1031, POSTCOPY_PIPE_SIZE)  # F_SETPIPE_SZ
        except OSError:
            pass
        self.em = em = _core.PageEmitter(self.out_fd, self.tps)
        em.set_blocks([(b.idstr, b.offset, b.length, b.bitmap, b.checksums) for b in blocks])
        self.pager = pager = _core.HostPager(em, self.tphp)
        for i, b in enumerate(blocks):
            if not b.migrated:
                pager.sent[i][:] = 1
        dev = device_state_sections(img)
        migrated = [i for i, b in enumerate(blocks) if b.migrated]
        summary = 0
        for i in migrated or range(len(blocks)):
            summary |= self.host_sizes[i]
        sys.setswitchinterval(0.0005)

        self.flag = _core.RequestFlag()
        self.rp = rp = ReturnPath(self.in_fd, blocks, self.host_sizes, self.flag)
        em.interrupt_check = self._check_return_path
        rp.start()
        host, virt, bidx = _cluster_plan(img, blocks)
        try:
            self.req_fd = os.open(img.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise IOFailure(f"cannot open image {img.path}: {e.strerror}") from None
        fd, direct = _open_image_data(img.path, self.cache, self.log)
        try:
            # setup: header, return path, ADVISE (before any RAM data), RAM START
            em.bytes(img.header_bytes)
            em.bytes(_cmd(C.MIG_CMD_OPEN_RETURN_PATH))
            em.bytes(_ping(1))
            em.bytes(_cmd(C.MIG_CMD_POSTCOPY_ADVISE, struct.pack(">QQ", summary, self.tps)))
            em.bytes(img.pre_ram)
            em.bytes(framing.start(mem_size_record(blocks, info, HOST_PAGE_SIZE)))
            em.flush()

            # precopy share, chosen by host order of the data clusters
            total_nz = sum(b.nonzero_pages for i, b in enumerate(blocks) if b.migrated)
            target = math.ceil(total_nz * self.percent / 100.0)
            keep = np.zeros(len(host), bool)
            huge_pre = []
            acc = 0
            ppc = self.cs // self.tps
            if target:
                for k in range(len(host)):
                    if acc >= target:
                        break
                    bi = int(bidx[k])
                    if not self.small[bi] or not blocks[bi].migrated:
                        continue
                    p0 = (int(virt[k]) - blocks[bi].offset) // self.tps
                    p1 = min(p0 + ppc, self.n_pages[bi])
                    keep[k] = True
                    acc += int(self.cum[bi][p1] - self.cum[bi][p0])
                for bi in migrated:
                    if self.small[bi]:
                        continue
                    for hp in np.flatnonzero(self.has_data[bi]):
                        if acc >= target:
                            break
                        t = self.tphp[bi]
                        acc += int(self.cum[bi][min((hp + 1) * t, self.n_pages[bi])]
                                   - self.cum[bi][hp * t])
                        huge_pre.append((bi, int(hp)))
            self._cluster_pass(fd, host[keep], virt[keep], bidx[keep], serve=False)
            # Legacy low memory and the small ROM blocks always go before LISTEN:
            # QEMU's listen thread can block on a fault there (pc.ram 0xc0000 while
            # the main thread loads the PAM state), and a faulted listen thread
            # cannot read the page it waits for.  QEMU's own source sends them
            # in its first precopy pass (it walks RAM upwards).
            for bi in migrated:
                hps = self.host_sizes[bi]
                n = -(-min(EARLY_BYTES, blocks[bi].length) // hps)
                if n:
                    self._part()
                    self._send_host_pages(bi, 0, n)
            for bi, hp in huge_pre:
                self._part()
                self._send_host_pages(bi, hp, hp + 1)
            self._close_part()
            pages_precopy = em.pages + em.zero_pages
            precopy_data = pages_precopy > 0

            if info.get("switchover_start"):
                em.bytes(_cmd(C.MIG_CMD_SWITCHOVER_START))
            n_ranges = 0
            if precopy_data:
                # THP may have populated neighbours of precopy pages: discard every
                # range not sent (the first discard also turns THP off).
                for bi in migrated:
                    ranges = self._unsent_ranges(bi)
                    n_ranges += len(ranges)
                    em.bytes(discard_commands(blocks[bi].idstr, ranges))
            em.bytes(_ping(2))
            blob = (_cmd(C.MIG_CMD_POSTCOPY_LISTEN) + dev + _ping(3) + _cmd(C.MIG_CMD_POSTCOPY_RUN))
            em.bytes(_cmd(C.MIG_CMD_PACKAGED, struct.pack(">I", len(blob))))
            em.bytes(blob)
            em.bytes(_ping(4))
            em.flush()
            t_handover = time.monotonic() - self.t0
            em.last_block = -1   # the source resets CONTINUE at the switch to postcopy

            # postcopy: requested pages first, then zero host pages, then data
            self._serve()
            for bi in migrated:
                nhp = pager.n_host_pages(bi)
                for hp in range(0, nhp, ZERO_GROUP):
                    self._serve()
                    self._part()
                    pager.zero_pass(bi, hp, hp + ZERO_GROUP, self.has_data[bi])
                    em.flush()
            self._cluster_pass(fd, host[~keep], virt[~keep], bidx[~keep], serve=True)
            for bi in migrated:
                if self.small[bi]:
                    continue
                for hp in np.flatnonzero(self.has_data[bi] & (pager.sent[bi] == 0)):
                    self._serve()
                    self._part()
                    self._send_host_pages(bi, int(hp), int(hp) + 1)
            self._serve()
            for bi in migrated:
                left = np.flatnonzero(pager.sent[bi] == 0)
                if len(left):
                    raise ImageError(f"host page 0x{int(left[0]) * self.host_sizes[bi]:x} of block "
                                     f"'{blocks[bi].idstr}' has no data cluster")
            self._close_part()
            rp.stream_done = True
            em.bytes(framing.end())
            em.bytes(bytes([C.QEMU_VM_EOF]))
            em.flush()
        finally:
            os.close(fd)
            os.close(self.req_fd)
        t_stream = time.monotonic() - self.t0
        self._close_output()
        # QEMU's last message is SHUT; then it closes the channel
        with rp.cond:
            while rp.shut is None and not rp.closed:
                rp.cond.wait(1.0)
        if rp.error is not None:
            raise rp.error
        elapsed = time.monotonic() - self.t0
        return {
            "image": str(img.path),
            "percent": self.percent,
            "handover_seconds": t_handover,
            "requests": self.requests,
            "requests_already_sent": self.requests_ignored,
            "pages_requested": self.pages_requested,
            "service_ms": _percentiles(self.service),
            "pages_precopy": pages_precopy,
            "pages_postcopy": em.pages + em.zero_pages - pages_precopy,
            "data_pages": em.pages,
            "zero_pages": em.zero_pages,
            "discard_ranges": n_ranges,
            "stream_bytes": em.bytes_out,
            "direct_io": direct,
            "stream_seconds": t_stream,
            "seconds": elapsed,
            "pongs": list(rp.pongs),
            "shut": rp.shut,
        }

    def _close_output(self):
        """The stream is complete: let QEMU see end of input, keep the fd number valid."""
        try:
            nul = os.open(os.devnull, os.O_WRONLY)
            os.dup2(nul, self.out_fd)
            os.close(nul)
        except OSError:
            pass

    def _unsent_ranges(self, bi):
        """(start, length) byte ranges of the block's unsent host pages."""
        sent = self.pager.sent[bi]
        hps = self.host_sizes[bi]
        length = self.blocks[bi].length
        d = np.diff(np.concatenate(([1], sent.astype(np.int8), [1])))
        starts = np.flatnonzero(d == -1)
        ends = np.flatnonzero(d == 1)
        return [(int(s) * hps, min(int(e) * hps, length) - int(s) * hps) for s, e in zip(starts, ends)]

    def _cluster_pass(self, fd, host, virt, bidx, serve):
        """Send the unsent host pages of data clusters (small-page blocks), host order.

        The C pass emits straight from the read-ahead buffers with the GIL
        released; with ``serve`` it comes back here whenever the return-path
        thread flags a page request, between record groups of ``group_pages``.
        """
        blocks = self.blocks
        sel = np.array([self.small[int(b)] and blocks[int(b)].migrated for b in bidx], bool) \
            if len(bidx) else np.zeros(0, bool)
        host, virt, bidx = host[sel], virt[sel], bidx[sel]
        if not len(host):
            return
        group = self.group_pages if serve else self.cs // self.tps
        with _core.ClusterPass(self.pager, fd, host, virt, bidx, self.cs, group,
                               self.flag if serve else None, max(_core.AIO_DEFAULT_BUF_SIZE, self.cs),
                               self.n_bufs, self.n_threads) as cp:
            while True:
                if serve:
                    self._serve()
                self._part()
                if cp.step(self._part_mark + self.part_bytes) == _core.CLUSTER_PASS_END:
                    break
