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
import sys
import threading
import time

import numpy as np

from qsnap import _core
from qsnap.errors import ImageError, IOFailure, ProtocolError, QsnapError, UsageError
from qsnap.image import workingset
from qsnap.image.pages import (ClusterState, chain_of, chain_plan, close_all, open_chain, open_data,
                               read_target_pages)
from qsnap.load import PART_BYTES, grow_pipe, mem_size_record, ram_framing
from qsnap.stream import constants as C
from qsnap.stream import encode, returnpath
from qsnap.stream.tail import device_sections

HOST_PAGE_SIZE = mmap.PAGESIZE
GROUP_PAGES = 64                 # target pages per background record group
ZERO_GROUP = 1 << 14             # host pages per ZERO group
POSTCOPY_PIPE_SIZE = 256 << 10   # a requested page never waits behind more than this
PING_VALUES = (1, 2, 3, 4)
EARLY_BYTES = 1 << 20            # per block, always sent before LISTEN
WS_RUN_BYTES = 1 << 20           # working-set pages read and sent per run (at most)
PREFETCH_MODES = ("after", "before", "none")   # when the working set goes: after/before the switch
DISCARD_BATCH = C.MAX_DISCARDS_PER_COMMAND * 1024   # ranges encoded at a time (whole commands)
_DEBUG = bool(os.environ.get("QSNAP_PC_DEBUG"))


def device_state_sections(img):
    """The image's device state without its EOF and VMDESCRIPTION (FULL sections only)."""
    try:
        return device_sections(img.device_state, bool(img.stream_info.get("footers", True)))
    except QsnapError as e:
        raise ImageError(f"bad device state in {img.path}: {e}") from None


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
        self.recorded = None       # a list: every valid page request is also kept here

    def run(self):
        try:
            self._read_messages()
            with self.cond:
                self.closed = True
                self.cond.notify_all()
            if not self.stream_done and self.shut is None:
                raise IOFailure("QEMU closed the return path before the migration completed")
        except Exception as e:  # noqa: BLE001  a bug here too must wake the writer, not hang it
            with self.cond:
                self.error = e
                self.closed = True
                self.cond.notify_all()
            if self.flag is not None:
                self.flag.set()

    def _read_messages(self):
        """Decode and handle messages until QEMU closes the return path."""
        decoder = returnpath.Decoder()
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except InterruptedError:
                continue
            except OSError as e:
                raise IOFailure(f"cannot read the return path: {e.strerror}") from None
            if not chunk:
                break
            for msg in decoder.feed(chunk):
                self.messages += 1
                if _DEBUG:
                    os.write(2, f"rp {msg.type} {len(msg.payload)} {msg.payload.hex()} "
                                f"t={time.monotonic():.3f}\n".encode())
                self._handle(msg)
        decoder.close()

    def _handle(self, msg):
        where = f"at return-path offset 0x{msg.offset:x}"
        typ = msg.type
        if typ == C.MIG_RP_MSG_PONG:
            if msg.value not in PING_VALUES or msg.value in self.pongs:
                raise ProtocolError(f"unexpected PONG value {msg.value} {where}")
            with self.cond:
                self.pongs.append(msg.value)
                self.cond.notify_all()
        elif typ == C.MIG_RP_MSG_SHUT:
            if msg.value:
                raise ProtocolError(f"QEMU reported an error on the return path (SHUT {msg.value})")
            if not self.stream_done:
                raise ProtocolError(f"SHUT before the stream ended {where}")
            with self.cond:
                self.shut = msg.value
                self.cond.notify_all()
        elif typ == C.MIG_RP_MSG_SWITCHOVER_ACK:
            self.switchover_acks += 1
        elif typ in (C.MIG_RP_MSG_REQ_PAGES_ID, C.MIG_RP_MSG_REQ_PAGES):
            self._request(msg, where)
        else:
            raise ProtocolError(f"unexpected return-path message {msg.name} (type {typ}) "
                                f"length {len(msg.payload)} {where}")

    def _request(self, msg, where):
        """Check a page request against the image and queue it for the writer."""
        t = time.monotonic()
        if msg.idstr is not None:
            bi = self.by_name.get(msg.idstr)
            if bi is None:
                raise ProtocolError(f"REQ_PAGES_ID for unknown RAM block '{msg.idstr}' {where}")
            self._last_block = bi
        else:
            bi = self._last_block
            if bi is None:
                raise ProtocolError(f"REQ_PAGES without a previous REQ_PAGES_ID {where}")
        b = self.blocks[bi]
        hps = self.host_sizes[bi]
        start, length = msg.start, msg.length
        if length == 0 or start % hps or length % hps or start + length > b.length:
            raise ProtocolError(f"{msg.name} for start 0x{start:x} length 0x{length:x} misaligned "
                                f"(page size 0x{hps:x}) or outside block '{b.idstr}' "
                                f"(length 0x{b.length:x}) {where}")
        with self.cond:
            self.requests.append((t, bi, start, length))
            if self.recorded is not None:
                self.recorded.append((t, bi, start, length))
            self.cond.notify_all()
        if self.flag is not None:
            self.flag.set()


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
                  n_threads=_core.AIO_DEFAULT_THREADS, prefetch="after", record_working_set=False,
                  record_window=0.0):
    """Write a postcopy migration stream from the image to ``out_fd``; serve ``in_fd`` requests.

    ``prefetch``: send the image's working set right "after" the switch to
    postcopy, "before" it (with the precopy share) or not at all ("none").
    ``record_working_set``: merge the guest's page requests into the image's
    working set once the migration has completed.  ``record_window``: for that
    many seconds after the switch only requested pages are sent, so the record
    holds what the guest touches, not only what it touched before the
    background pass reached it.
    Returns the statistics dict (also written as JSON to ``stats_path``).
    When QEMU goes away (the return path fails) the error is raised here, also
    while a write waits for a stream reader that is still there.
    """
    if not 0 <= percent <= 100:
        raise UsageError(f"postcopy percentage {percent} not in 0..100")
    if group_pages < 1:
        raise UsageError("group_pages must be positive")
    if prefetch not in PREFETCH_MODES:
        raise UsageError(f"prefetch mode {prefetch!r} is not one of {', '.join(PREFETCH_MODES)}")
    if not 0 <= record_window <= 3600:
        raise UsageError(f"record window {record_window} s not in 0..3600")
    t0 = time.monotonic()
    from qsnap.image.reader import Image

    if isinstance(image_path, (str, bytes, os.PathLike)):
        with Image.open(image_path) as img:
            pc = _Postcopy(img, percent, cache, in_fd, out_fd, log, group_pages,
                           part_bytes, n_bufs, n_threads, t0, prefetch,
                           record_window if record_working_set else None)
            stats = pc.run()
    else:
        pc = _Postcopy(image_path, percent, cache, in_fd, out_fd, log, group_pages,
                       part_bytes, n_bufs, n_threads, t0, prefetch,
                           record_window if record_working_set else None)
        stats = pc.run()
    if record_working_set:
        stats["working_set_recorded"] = pc.store_working_set()
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
                 part_bytes, n_bufs, n_threads, t0, prefetch="after", record=None):
        self.img = img
        self.prefetch = prefetch
        self.record = record is not None
        self.record_window = record or 0.0
        self.working_set = workingset.usable(img, log) if prefetch != "none" else None
        self.ws_pages = 0
        self.t_switch = None
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
        self.n_host_pages = [-(-n // t) for n, t in zip(self.n_pages, self.tphp)]
        # small-page blocks go by data cluster, huge-page blocks by host page
        self.small = [hps <= cs for hps in self.host_sizes]

    # Which pages are stored is read from the image when needed, a window at a
    # time: no table per page or host page of the guest is kept for it.

    def _has_data(self, bi, hp0, hp1):
        """uint8 per host page of [hp0, hp1) of block bi: 1 where a target page is stored."""
        t = self.tphp[bi]
        hp1 = min(hp1, self.n_host_pages[bi])
        bits = np.zeros(max(0, hp1 - hp0) * t, bool)
        got = self.blocks[bi].stored_bits(hp0 * t, len(bits))
        bits[:len(got)] = got
        return bits.reshape(-1, t).any(axis=1).astype(np.uint8)

    def _data_host_pages(self, bi):
        """Host pages of block bi holding a stored page, ascending, a window at a time."""
        for hp0 in range(0, self.n_host_pages[bi], ZERO_GROUP):
            hd = self._has_data(bi, hp0, hp0 + ZERO_GROUP)
            yield from (hp0 + int(h) for h in np.flatnonzero(hd))

    def _stored_pages(self, bi, tp0, tp1):
        return int(self.blocks[bi].stored_bits(tp0, tp1 - tp0).sum())

    def _state(self, bi, tp0, tp1):
        """The emitter's page-state window (first, stored bits, checksums) for target
        pages [tp0, tp1) of block bi."""
        b = self.blocks[bi]
        first = tp0 & ~7
        n = max(8, tp1 - first)
        n += -n % 8
        bits = np.zeros(n // 8, np.uint8)
        crcs = np.zeros(n, np.uint32)
        got = b.bits(first, n)
        bits[:len(got)] = got
        got = b.crcs(first, n)
        crcs[:len(got)] = got
        return first, bits, crcs

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

    def _send_host_pages(self, bi, hp0, hp1):
        """Read and send the unsent host pages [hp0, hp1) of block bi."""
        t = self.tphp[bi]
        tp0, tp1 = hp0 * t, min(hp1 * t, self.n_pages[bi])
        state = self._state(bi, tp0, tp1)
        stored = np.unpackbits(state[1], bitorder="little")[tp0 - state[0]:tp1 - state[0]].any()
        data = read_target_pages(self.img, self.req_fds, self.blocks[bi], tp0, tp1) if stored else None
        return self.pager.emit(bi, hp0, hp1, data, tp0, state=state)

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
            if self.pager.sent[bi].all(hp0, hp1):
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
        self._layout()
        self._setup_output()
        dev = device_state_sections(self.img)
        self.migrated = [i for i, b in enumerate(self.blocks) if b.migrated]
        sys.setswitchinterval(0.0005)
        self.flag = _core.RequestFlag()
        self.rp = ReturnPath(self.in_fd, self.blocks, self.host_sizes, self.flag)
        if self.record:
            self.rp.recorded = []
        self.em.interrupt_check = self._check_return_path
        self.rp.start()
        # every file of the backing chain: its data clusters in one pass each (chain_plan
        # sorts them by file), on-demand reads through the chain (read_target_pages)
        src, host, virt, bidx = (np.asarray(a) for a in chain_plan(self.img, self.blocks))
        self.req_fds = open_chain(self.img)
        fds = []
        try:
            direct = False
            for im in chain_of(self.img):
                fd, direct_k = open_data(im.path, self.cache, self.log)
                fds.append(fd)
                direct = direct or direct_k
            self._negotiate()
            keep = self._send_precopy_share(fds, src, host, virt, bidx)
            pages_precopy = self.em.pages + self.em.zero_pages
            n_ranges = self._hand_over(dev, precopy_data=pages_precopy > 0)
            self.t_switch = time.monotonic()
            t_handover = self.t_switch - self.t0
            self._send_postcopy(fds, src[~keep], host[~keep], virt[~keep], bidx[~keep])
        finally:
            close_all(fds)
            close_all(self.req_fds)
        t_stream = time.monotonic() - self.t0
        self._close_output()
        self._wait_shut()
        return self._stats(pages_precopy, t_handover, n_ranges, direct, t_stream)

    def _setup_output(self):
        """The RAM framing, stdout's pipe size, the C emitter and host-page tracker."""
        self.framing = ram_framing(self.info)
        grow_pipe(self.out_fd)
        try:
            import fcntl
            fcntl.fcntl(self.out_fd, 1031, POSTCOPY_PIPE_SIZE)  # F_SETPIPE_SZ
        except OSError:
            pass
        self.em = _core.PageEmitter(self.out_fd, self.tps)
        # page state goes to the emitter a window at a time (_state, ClusterState)
        self.em.set_blocks([(b.idstr, b.offset, b.length, None, None) for b in self.blocks])
        self.pager = _core.HostPager(self.em, self.tphp)
        for i, b in enumerate(self.blocks):
            if not b.migrated:
                self.pager.sent[i].set()

    def _negotiate(self):
        """Header, return path, ADVISE (before any RAM data), RAM START."""
        em, img = self.em, self.img
        summary = 0
        for i in self.migrated or range(len(self.blocks)):
            summary |= self.host_sizes[i]
        em.bytes(img.header_bytes)
        em.bytes(encode.open_return_path())
        em.bytes(encode.ping(1))
        em.bytes(encode.postcopy_advise(summary, self.tps))
        em.bytes(img.pre_ram)
        em.bytes(self.framing.start(mem_size_record(self.blocks, self.info, HOST_PAGE_SIZE)))
        em.flush()

    def _precopy_plan(self, host, virt, bidx):
        """Which data clusters (a mask over the plan) and huge host pages go before
        LISTEN: host order, until ``percent`` of the non-zero pages."""
        blocks = self.blocks
        total_nz = sum(b.nonzero_pages for b in blocks if b.migrated)
        target = math.ceil(total_nz * self.percent / 100.0)
        keep = np.zeros(len(host), bool)
        huge_pre = []
        if not target:
            return keep, huge_pre
        acc = 0
        ppc = self.cs // self.tps
        for k in range(len(host)):
            if acc >= target:
                break
            bi = int(bidx[k])
            if not self.small[bi] or not blocks[bi].migrated:
                continue
            p0 = (int(virt[k]) - blocks[bi].offset) // self.tps
            p1 = min(p0 + ppc, self.n_pages[bi])
            keep[k] = True
            acc += self._stored_pages(bi, p0, p1)
        for bi in self.migrated:
            if self.small[bi]:
                continue
            t = self.tphp[bi]
            for hp in self._data_host_pages(bi):
                if acc >= target:
                    break
                acc += self._stored_pages(bi, hp * t, min((hp + 1) * t, self.n_pages[bi]))
                huge_pre.append((bi, hp))
        return keep, huge_pre

    def _send_precopy_share(self, fds, src, host, virt, bidx):
        """The precopy pages; returns the mask of data clusters sent."""
        keep, huge_pre = self._precopy_plan(host, virt, bidx)
        self._cluster_pass(fds, src[keep], host[keep], virt[keep], bidx[keep], serve=False)
        # Legacy low memory and the small ROM blocks always go before LISTEN:
        # QEMU's listen thread can block on a fault there (pc.ram 0xc0000 while
        # the main thread loads the PAM state), and a faulted listen thread
        # cannot read the page it waits for.  QEMU's own source sends them
        # in its first precopy pass (it walks RAM upwards).
        for bi in self.migrated:
            hps = self.host_sizes[bi]
            n = -(-min(EARLY_BYTES, self.blocks[bi].length) // hps)
            if n:
                self._part()
                self._send_host_pages(bi, 0, n)
        for bi, hp in huge_pre:
            self._part()
            self._send_host_pages(bi, hp, hp + 1)
        if self.prefetch == "before":
            self._send_working_set(serve=False)
        self._close_part()
        return keep

    def _hand_over(self, dev, precopy_data):
        """Discards, then LISTEN + device state + RUN in one PACKAGED; returns the discard count."""
        em = self.em
        if self.info.get("switchover_start"):
            em.bytes(encode.switchover_start())
        n_ranges = 0
        if precopy_data:
            # THP may have populated neighbours of precopy pages: discard every
            # range not sent (the first discard also turns THP off).
            for bi in self.migrated:
                n_ranges += self._send_discards(bi)
        em.bytes(encode.ping(2))
        blob = encode.postcopy_listen() + dev + encode.ping(3) + encode.postcopy_run()
        em.bytes(encode.packaged_header(len(blob)))
        em.bytes(blob)
        em.bytes(encode.ping(4))
        em.flush()
        em.last_block = -1   # the source resets CONTINUE at the switch to postcopy
        return n_ranges

    def _send_postcopy(self, fds, src, host, virt, bidx):
        """Requested pages first, then zero host pages, then data; END and EOF."""
        em, pager = self.em, self.pager
        self._serve()
        if self.record_window:
            self._serve_only(self.t_switch + self.record_window)
        if self.prefetch == "after":
            self._send_working_set(serve=True)
        for bi in self.migrated:
            nhp = pager.n_host_pages(bi)
            for hp in range(0, nhp, ZERO_GROUP):
                self._serve()
                self._part()
                t = self.tphp[bi]
                hp1 = min(hp + ZERO_GROUP, nhp)
                pager.zero_pass(bi, hp, hp1, self._has_data(bi, hp, hp1), window=True,
                                state=self._state(bi, hp * t, min(hp1 * t, self.n_pages[bi])))
                em.flush()
        self._cluster_pass(fds, src, host, virt, bidx, serve=True)
        for bi in self.migrated:
            if self.small[bi]:
                continue
            for hp in self._data_host_pages(bi):
                if pager.sent[bi][hp]:
                    continue
                self._serve()
                self._part()
                self._send_host_pages(bi, hp, hp + 1)
        self._serve()
        self._check_all_sent()
        self._close_part()
        self.rp.stream_done = True
        em.bytes(self.framing.end())
        em.bytes(encode.eof())
        em.flush()

    # --- working set ------------------------------------------------------------------

    def _send_working_set(self, serve):
        """The working set's host pages in recorded order, adjacent pages read and
        sent together; with ``serve``, page requests still go first between runs."""
        if self.working_set is None:
            return
        t = time.monotonic()
        for bi, hp0, hp1 in working_set_runs(self.working_set.entries, self.tphp, self.host_sizes):
            if serve:
                self._serve()
            if self.pager.sent[bi].all(hp0, hp1):
                continue
            self._part()
            self.ws_pages += self._send_host_pages(bi, hp0, hp1)
        self.em.flush()
        if _DEBUG:
            os.write(2, f"working set: {self.ws_pages} pages in {time.monotonic() - t:.3f} s\n".encode())

    def _serve_only(self, until):
        """Send nothing but requested pages until ``until`` (monotonic) or the end
        of the return path."""
        rp = self.rp
        while True:
            self._serve()
            left = until - time.monotonic()
            with rp.cond:
                if left <= 0 or rp.closed:
                    return
                if not rp.requests:
                    rp.cond.wait(min(left, 0.05))

    def store_working_set(self):
        """Merge the recorded page requests into the image's working set: its size."""
        entries = workingset.from_requests(self.rp.recorded, self.host_sizes, self.tps, self.t_switch)
        return len(workingset.store(self.img.path, entries, log=self.log))

    def _check_all_sent(self):
        for bi in self.migrated:
            sent = self.pager.sent[bi]
            left = sent.find(0, len(sent), False)
            if left < len(sent):
                raise ImageError(f"host page 0x{left * self.host_sizes[bi]:x} of block "
                                 f"'{self.blocks[bi].idstr}' has no data cluster")

    def _wait_shut(self):
        """QEMU's last message is SHUT; then it closes the channel."""
        rp = self.rp
        with rp.cond:
            while rp.shut is None and not rp.closed:
                rp.cond.wait(1.0)
        if rp.error is not None:
            raise rp.error

    def _stats(self, pages_precopy, t_handover, n_ranges, direct, t_stream):
        em, rp = self.em, self.rp
        return {
            "image": str(self.img.path),
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
            "seconds": time.monotonic() - self.t0,
            "prefetch": self.prefetch,
            "working_set_pages": len(self.working_set) if self.working_set is not None else 0,
            "pages_working_set": self.ws_pages,
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

    def _send_discards(self, bi):
        """DISCARD commands for every byte range of the block's unsent host pages
        (a batch of ranges at a time: their number grows with the guest); returns
        the number of ranges."""
        hps = self.host_sizes[bi]
        length = self.blocks[bi].length
        name = self.blocks[bi].idstr
        batch, n = [], 0
        for s, e in self.pager.sent[bi].unsent_runs():
            batch.append((s * hps, min(e * hps, length) - s * hps))
            if len(batch) == DISCARD_BATCH:
                self.em.bytes(encode.ram_discard(name, batch))
                n += len(batch)
                batch = []
        if batch:
            self.em.bytes(encode.ram_discard(name, batch))
        return n + len(batch)

    def _cluster_pass(self, fds, src, host, virt, bidx, serve):
        """Send the unsent host pages of data clusters (small-page blocks): one pass
        per file of the chain (``src`` indexes it, ``fds`` holds its descriptors)."""
        for k, fd in enumerate(fds):
            sel = src == k
            self._file_pass(fd, host[sel], virt[sel], bidx[sel], serve)

    def _file_pass(self, fd, host, virt, bidx, serve):
        """Send the unsent host pages of data clusters of one file, host order.

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
        state = ClusterState(self.img, blocks, virt, bidx,
                             _core.state_window_pages(self.cs // self.tps))
        with _core.ClusterPass(self.pager, fd, host, virt, bidx, self.cs, group,
                               self.flag if serve else None, max(_core.AIO_DEFAULT_BUF_SIZE, self.cs),
                               self.n_bufs, self.n_threads, state=state) as cp:
            while True:
                if serve:
                    self._serve()
                self._part()
                if cp.step(self._part_mark + self.part_bytes) == _core.CLUSTER_PASS_END:
                    break


def working_set_runs(entries, tphp, host_sizes):
    """(block, hp0, hp1) runs of working-set entries: adjacent host pages of one
    block in recorded order form one run of at most WS_RUN_BYTES."""
    if not len(entries):
        return []
    bi = entries["block"].astype(np.int64)
    hp = entries["page"].astype(np.int64) // np.asarray(tphp, np.int64)[bi]
    brk = np.flatnonzero((bi[1:] != bi[:-1]) | (hp[1:] != hp[:-1] + 1)) + 1
    runs = []
    for s, e in zip(np.concatenate(([0], brk)), np.concatenate((brk, [len(bi)]))):
        b, h0, h1 = int(bi[s]), int(hp[s]), int(hp[e - 1]) + 1
        step = max(1, WS_RUN_BYTES // host_sizes[b])
        runs += [(b, h, min(h + step, h1)) for h in range(h0, h1, step)]
    return runs
