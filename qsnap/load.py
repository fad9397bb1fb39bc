"""The load engine: qsnap image -> precopy migration stream on stdout.

Runs behind ``migrate_incoming "exec:qsnap load IMG"``.  The stream is what a
QEMU 7.2+ destination accepts as a precopy migration (migration-stream.md 6.1):

    header + configuration        verbatim from the image
    pre-RAM FULL sections         verbatim (8.0+ early setup), may be empty
    SECTION_START ram             MEM_SIZE + block list, EOS, footer
    SECTION_PART ram  x N         PAGE records of every stored page, in host-file
                                  order (sequential reads through the C read-ahead
                                  ring), then ZERO records of every unstored page
                                  of every migrated block; EOS, footer
    [COMMAND SWITCHOVER_START]    if the saved stream had one
    [SECTION_END ram]             EOS, footer; if the saved stream had a RAM END
    device state                  verbatim: FULL sections, EOF, VMDESCRIPTION

Each stored page's crc32c is checked before its cluster is written: a mismatch
raises ChecksumError and that page never reaches QEMU.  Memory use is bounded by
the read-ahead buffers plus the per-block bitmaps and checksum arrays.  Only
stderr carries messages; stdout is the stream.
"""
import errno
import fcntl
import mmap
import os
import stat
import struct
import sys
import time

import numpy as np

from qsnap import _core
from qsnap.errors import ImageError, IOFailure, UsageError
from qsnap.stream import constants as C

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 1 << 20
PART_BYTES = 64 << 20           # page data per SECTION_PART
ZERO_PAGES_PER_PART = 4 << 20   # ZERO records per SECTION_PART (~36-40 MB of records)
ZERO_PAGES_PER_CALL = 1 << 18


def _be32(v):
    return struct.pack(">I", v)


def _be64(v):
    return struct.pack(">Q", v)


def _counted(s):
    raw = s.encode() if isinstance(s, str) else bytes(s)
    return bytes([len(raw)]) + raw


class _Framing:
    """Section framing of the RAM section (savevm.c save_section_header/footer)."""

    def __init__(self, info):
        rs = info["ram_section"]
        if rs is None:
            raise ImageError("the image records no RAM section (meta.stream.ram_section is null)")
        self.section_id = rs["section_id"]
        self.instance_id = rs.get("instance_id", 0)
        self.version_id = rs.get("version_id", C.RAM_SECTION_VERSION)
        self.footers = bool(info.get("footers", True))
        sid = _be32(self.section_id)
        self.footer = bytes([C.QEMU_VM_SECTION_FOOTER]) + sid if self.footers else b""
        self.eos = _be64(C.RAM_SAVE_FLAG_EOS)
        self.part_start = bytes([C.QEMU_VM_SECTION_PART]) + sid
        self.section_close = self.eos + self.footer

    def start(self, payload):
        return (bytes([C.QEMU_VM_SECTION_START]) + _be32(self.section_id)
                + _counted(C.RAM_SECTION_IDSTR) + _be32(self.instance_id) + _be32(self.version_id)
                + payload + self.section_close)

    def end(self):
        return bytes([C.QEMU_VM_SECTION_END]) + _be32(self.section_id) + self.section_close


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
    out = [_be64(total | C.RAM_SAVE_FLAG_MEM_SIZE)]
    for b in blocks:
        out.append(_counted(b.idstr) + _be64(b.length))
        if host_page_size is not None and b.page_size != host_page_size:
            out.append(_be64(b.page_size))
        if ignore_shared:
            if b.gpa is None:
                raise ImageError(f"block '{b.idstr}' has no GPA but x-ignore-shared is on")
            out.append(_be64(b.gpa))
    return b"".join(out)


def _open_image_data(path, cache, log):
    """fd for the data reads: O_DIRECT for cache='none' unless the filesystem refuses."""
    if cache not in ("none", "writeback"):
        raise UsageError(f"cache mode '{cache}' is not one of none, writeback")
    if cache == "none" and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise IOFailure(f"cannot open image {path}: {e.strerror}") from None
        else:
            if _direct_read_works(fd):
                return fd, True
            os.close(fd)
        log.write(f"qsnap: note: {path}: the filesystem refuses O_DIRECT, reading through the page cache\n")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise IOFailure(f"cannot open image {path}: {e.strerror}") from None
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (OSError, AttributeError):
        pass
    return fd, False


def _direct_read_works(fd):
    buf = mmap.mmap(-1, 4096)  # page aligned
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise IOFailure(f"cannot read the image: {e.strerror} at image offset 0x0") from None
    finally:
        buf.close()


def _grow_pipe(fd):
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


def _cluster_plan(img, blocks):
    """(host, virtual, block index) of every data cluster inside a RAM region, host order."""
    dc = np.asarray(img.data_clusters())
    if dc.size == 0:
        z = np.zeros(0, np.uint64)
        return z, z, np.zeros(0, np.uint32)
    if dc.dtype.names:
        host = np.asarray(dc[dc.dtype.names[0]], np.uint64)
        virt = np.asarray(dc[dc.dtype.names[1]], np.uint64)
    else:
        dc = dc.reshape(-1, 2)
        host = dc[:, 0].astype(np.uint64)
        virt = dc[:, 1].astype(np.uint64)
    order = np.argsort(host, kind="stable")
    host, virt = host[order], virt[order]
    cs = img.cluster_size
    starts = np.array([b.offset for b in blocks], np.uint64)
    ends = np.array([b.offset + -(-b.length // cs) * cs for b in blocks], np.uint64)
    by_start = np.argsort(starts, kind="stable")
    pos = np.searchsorted(starts[by_start], virt, side="right") - 1
    inside = pos >= 0
    idx = np.where(inside, by_start[np.maximum(pos, 0)], 0)
    inside &= virt < ends[idx]                 # metadata-region clusters are not pages
    return host[inside], virt[inside], idx[inside].astype(np.uint32)


def load(image_path, out_fd=1, *, cache="none", quiet=False, log=sys.stderr,
         part_bytes=PART_BYTES, buf_size=None, n_bufs=_core.AIO_DEFAULT_BUFS,
         n_threads=_core.AIO_DEFAULT_THREADS):
    """Write a precopy migration stream regenerated from the image to ``out_fd``.

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
            return _load(img, out_fd, t0, cache, quiet, log, part_bytes, buf_size, n_bufs, n_threads)
    return _load(image_path, out_fd, t0, cache, quiet, log, part_bytes, buf_size, n_bufs, n_threads)


def _load(img, out_fd, t0, cache, quiet, log, part_bytes, buf_size, n_bufs, n_threads):
    info = img.stream_info
    blocks = list(img.blocks)
    page_size = img.target_page_size
    cs = img.cluster_size
    if buf_size is None:
        buf_size = max(_core.AIO_DEFAULT_BUF_SIZE, cs)
    framing = _Framing(info)

    _grow_pipe(out_fd)
    em = _core.PageEmitter(out_fd, page_size)
    em.set_blocks([(b.idstr, b.offset, b.length, b.bitmap, b.checksums) for b in blocks])
    host, virt, bidx = _cluster_plan(img, blocks)

    fd, direct = _open_image_data(img.path, cache, log)
    try:
        em.bytes(img.header_bytes)
        em.bytes(img.pre_ram)
        em.bytes(framing.start(mem_size_record(blocks, info)))
        em.flush()
        t_pages = time.monotonic()
        parts = em.send_clusters(fd, host, virt, bidx, cs, framing.part_start,
                                 framing.section_close, part_bytes=part_bytes,
                                 buf_size=buf_size, n_bufs=n_bufs, n_threads=n_threads)
        t_pages = time.monotonic() - t_pages
    finally:
        os.close(fd)
    parts += _send_zero_pages(em, blocks, framing)
    if info.get("switchover_start"):
        em.bytes(struct.pack(">BHH", C.QEMU_VM_COMMAND, C.MIG_CMD_SWITCHOVER_START, 0))
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
        "clusters": int(host.shape[0]),
        "data_bytes_read": int(host.shape[0]) * cs,
        "direct_io": direct,
        "seconds": elapsed,
        "page_seconds": t_pages,
        "writes": em.writes,
    }
    if not quiet:
        mb = em.bytes_out / 1e6
        log.write(
            f"qsnap: loaded {img.path}: {em.pages} pages and {em.zero_pages} zero pages, "
            f"{mb:.1f} MB stream in {elapsed:.2f} s ({mb / max(elapsed, 1e-9):.0f} MB/s"
            f"{', O_DIRECT' if direct else ''})\n")
        log.flush()
    return stats


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
            em.zero_range(i, first, min(first + ZERO_PAGES_PER_CALL, n_pages))
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
