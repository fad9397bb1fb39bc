"""The load engine: qsnap image -> precopy migration stream on stdout.

Runs behind ``migrate_incoming "exec:qsnap load IMG"``.  The stream is what a
QEMU 7.2+ destination accepts as a precopy migration (migration-stream.md 6.1):

    header + configuration        verbatim from the image
    pre-RAM FULL sections         verbatim (8.0+ early setup), may be empty
    SECTION_START ram             MEM_SIZE + block list, EOS, footer
    SECTION_PART ram  x N         PAGE records of every stored page, in host-file
                                  order (sequential reads through the C read-ahead
                                  ring; for a backing chain one pass per file, each
                                  with its own descriptor), then ZERO records of
                                  every unstored page of every migrated block; EOS,
                                  footer
    [COMMAND SWITCHOVER_START]    if the saved stream had one
    [SECTION_END ram]             EOS, footer; if the saved stream had a RAM END
    device state                  verbatim: FULL sections, EOF, VMDESCRIPTION

Each stored page's crc32c is checked before its cluster is written: a mismatch
raises ChecksumError and that page never reaches QEMU.  Memory use is bounded by
the read-ahead buffers plus the per-block bitmaps and checksum arrays.  Only
stderr carries messages; stdout is the stream.
"""
import fcntl
import os
import stat
import sys
import time
from bisect import bisect_left

from qsnap import _core
from qsnap._core import take
from qsnap.errors import ImageError
from qsnap.image import pages
from qsnap.image.pages import ClusterState, chain_of, chain_plan, cluster_plan, open_data
from qsnap.stream import constants as C
from qsnap.stream import encode

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 1 << 20
PART_BYTES = 64 << 20           # page data per SECTION_PART
ZERO_PAGES_PER_PART = 4 << 20   # ZERO records per SECTION_PART (~36-40 MB of records)
ZERO_PAGES_PER_CALL = 1 << 18


def ram_framing(info):
    """Framing of the RAM section as the saved stream had it (savevm.c save_section_header/footer)."""
    rs = info["ram_section"]
    if rs is None:
        raise ImageError("the image records no RAM section (meta.stream.ram_section is null)")
    return encode.RamFraming(rs["section_id"], rs.get("instance_id", 0),
                             rs.get("version_id", C.RAM_SECTION_VERSION), bool(info.get("footers", True)))


def mem_size_record(blocks, info, host_page_size=None):
    """MEM_SIZE record + block list of the RAM SECTION_START (ram.c ram_save_setup).

    Precopy has no POSTCOPY_ADVISE, so no block carries a page-size field; the
    GPA field is present iff x-ignore-shared is on (migration-stream.md 3.2).
    With ``host_page_size`` (postcopy) a block whose page size differs from it
    carries its be64 page size, before the GPA.
    """
    total = sum(b.length for b in blocks)
    declared = info.get("mem_size_total")
    if declared is not None and declared != total:
        raise ImageError(f"mem_size_total {declared} differs from the sum of block lengths {total}")
    ignore_shared = "x-ignore-shared" in (info.get("capabilities") or [])
    if ignore_shared:
        for b in blocks:
            if b.gpa is None:
                raise ImageError(f"block '{b.idstr}' has no GPA but x-ignore-shared is on")
    return encode.mem_size(blocks, host_page_size=host_page_size, gpa_fields=ignore_shared)


def grow_pipe(fd):
    """A bigger stdout pipe: fewer, larger writes to QEMU."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


# The old private names: tests of the postcopy cluster pass call the plan, and
# tests replace the O_DIRECT probe to see the page-cache fallback.
_cluster_plan = cluster_plan
_direct_read_works = pages.direct_read_works_probe


def load(image_path, out_fd=1, *, cache="none", quiet=False, log=sys.stderr,
         part_bytes=PART_BYTES, buf_size=None, n_bufs=_core.AIO_DEFAULT_BUFS,
         n_threads=_core.AIO_DEFAULT_THREADS, prefetch=True):
    """Write a precopy migration stream regenerated from the image to ``out_fd``.

    With ``prefetch`` the data clusters of the image's working set go first
    (only the order of the records changes, never what they hold).
    ``image_path`` is a path or an open ``qsnap.image.reader.Image``.
    ``cache='none'`` reads data clusters with O_DIRECT (falling back to the page
    cache where the filesystem refuses it); ``'writeback'`` reads through the
    page cache.  Returns a statistics dict.  Raises ChecksumError before a page
    that fails its checksum is sent, IOFailure when the reader goes away (EPIPE).
    """
    t0 = time.monotonic()
    if isinstance(image_path, (str, bytes, os.PathLike)):
        from qsnap.image.reader import Image

        with Image.open(image_path) as img:
            return _load(img, out_fd, t0, cache, quiet, log, part_bytes, buf_size, n_bufs, n_threads,
                         prefetch)
    return _load(image_path, out_fd, t0, cache, quiet, log, part_bytes, buf_size, n_bufs, n_threads,
                 prefetch)


def file_passes(img, src, host, virt, bidx, prefetch, log):
    """(the working set's passes, the other passes), each [(chain index, host, virt,
    bidx)]: one cluster pass per file of the chain, each with its own descriptor (QEMU
    takes a stream's pages in any order).  With ``prefetch`` and a usable working set
    (a damaged one: one warning line, and none), its clusters are in the first list,
    file by file.  ``src`` is ascending (chain_plan)."""
    chain = chain_of(img)
    ws = None
    if prefetch:
        from qsnap.image import workingset

        ws = workingset.usable(img, log)
    if ws is None and len(chain) == 1:
        # nothing stored: no data file to open (nor its O_DIRECT probe read)
        return [], [(0, host, virt, bidx)] if len(host) else []
    wanted = set(workingset.cluster_offsets(ws, img.blocks, img.cluster_size, img.target_page_size)) \
        if ws is not None else set()
    first, rest = [], []
    for k in range(len(chain)):
        lo, hi = bisect_left(src, k), bisect_left(src, k + 1)
        h, v, b = host[lo:hi], virt[lo:hi], bidx[lo:hi]
        m = 0
        if ws is not None:
            order = workingset.clusters_first(ws, img.blocks, h, v, img.cluster_size,
                                              img.target_page_size)
            h, v, b = take(h, order), take(v, order), take(b, order)
            m = sum(1 for x in v if x in wanted)
        first.append((k, h[:m], v[:m], b[:m]))
        rest.append((k, h[m:], v[m:], b[m:]))
    return [p for p in first if len(p[1])], [p for p in rest if len(p[1])]


def _load(img, out_fd, t0, cache, quiet, log, part_bytes, buf_size, n_bufs, n_threads, prefetch):
    info = img.stream_info
    blocks = list(img.blocks)
    page_size = img.target_page_size
    cs = img.cluster_size
    if buf_size is None:
        buf_size = max(_core.AIO_DEFAULT_BUF_SIZE, cs)
    framing = ram_framing(info)

    grow_pipe(out_fd)
    em = _core.PageEmitter(out_fd, page_size)
    # page state (stored bits, checksums) goes to the emitter a window at a time
    em.set_blocks([(b.idstr, b.offset, b.length, None, None) for b in blocks])
    src, host, virt, bidx = chain_plan(img, blocks)
    ws_passes, passes = file_passes(img, src, host, virt, bidx, prefetch, log)

    em.bytes(img.header_bytes)
    em.bytes(img.pre_ram)
    em.bytes(framing.start(mem_size_record(blocks, info)))
    em.flush()
    t_pages = time.monotonic()
    send = _ClusterSender(em, img, blocks, framing, cache, log, part_bytes, buf_size, n_bufs, n_threads)
    parts = send(ws_passes)
    # then the unstored pages: QEMU's work on each ZERO record (it reads the page to see
    # whether it must clear it) overlaps the reads of the data clusters that follow
    # instead of coming after them; QEMU takes a precopy stream's pages in any order
    parts += _send_zero_pages(em, blocks, framing)
    em.flush()
    parts += send(passes)
    t_pages = time.monotonic() - t_pages
    if info.get("switchover_start"):
        em.bytes(encode.switchover_start())
    if info.get("ram_end", True):
        em.bytes(framing.end())
    em.flush()
    em.bytes(img.device_state)
    em.flush()

    elapsed = time.monotonic() - t0
    stats = {
        "image": str(img.path),
        "stream_bytes": em.bytes_out,
        "pages": em.pages,
        "zero_pages": em.zero_pages,
        "sections": parts + 1 + (1 if info.get("ram_end", True) else 0),
        "clusters": len(host),
        "data_bytes_read": len(host) * cs,
        "direct_io": send.direct,
        "seconds": elapsed,
        "page_seconds": t_pages,
        "writes": em.writes,
    }
    if not quiet:
        mb = em.bytes_out / 1e6
        log.write(
            f"qsnap: loaded {img.path}: {em.pages} pages and {em.zero_pages} zero pages, "
            f"{mb:.1f} MB stream in {elapsed:.2f} s ({mb / max(elapsed, 1e-9):.0f} MB/s"
            f"{', O_DIRECT' if send.direct else ''})\n")
        log.flush()
    return stats


class _ClusterSender:
    """Sends cluster passes through the emitter, each file opened for its pass
    (O_DIRECT where it works: ``direct`` says whether any was)."""

    def __init__(self, em, img, blocks, framing, cache, log, part_bytes, buf_size, n_bufs, n_threads):
        self.em, self.img, self.blocks, self.framing = em, img, blocks, framing
        self.cache, self.log = cache, log
        self.opts = {"part_bytes": part_bytes, "buf_size": buf_size, "n_bufs": n_bufs,
                     "n_threads": n_threads}
        self.direct = False

    def __call__(self, passes):
        """The section parts the passes took."""
        img, cs = self.img, self.img.cluster_size
        parts = 0
        for k, h, v, b in passes:
            fd, direct = open_data(chain_of(img)[k].path, self.cache, self.log,
                                   lambda fd: _direct_read_works(fd))
            self.direct = self.direct or direct
            try:
                window = self.em.state_window_pages(cs // img.target_page_size)
                parts += self.em.send_clusters(fd, h, v, b, cs, self.framing.part_start,
                                               self.framing.section_close,
                                               state=ClusterState(img, self.blocks, v, b, window),
                                               **self.opts)
            finally:
                os.close(fd)
        return parts


def _send_zero_pages(em, blocks, framing):
    """ZERO records for the unstored pages of every migrated block, in sections."""
    parts = 0
    in_part = 0
    open_ = False
    for i, b in enumerate(blocks):
        if not b.migrated:
            continue
        n_pages = -(-b.length // em.page_size)
        for first in range(0, n_pages, ZERO_PAGES_PER_CALL):
            if not open_:
                em.bytes(framing.part_start)
                open_ = True
            before = em.zero_pages
            end = min(first + ZERO_PAGES_PER_CALL, n_pages)
            em.zero_range(i, first, end, bitmap=b.bit_bytes(first, end - first))
            in_part += em.zero_pages - before
            if in_part >= ZERO_PAGES_PER_PART:
                em.bytes(framing.section_close)
                parts += 1
                open_ = False
                in_part = 0
    if open_:
        em.bytes(framing.section_close)
        parts += 1
    return parts
