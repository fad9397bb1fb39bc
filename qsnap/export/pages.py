"""Reading a block's stored pages in large, checksum-verified runs.

Every export walks the image the same way: per block, the data clusters of
its region in virtual order, several host-contiguous clusters per read; each
stored page is checked against its crc32c before it leaves this module, so a
corrupt page never reaches an export file. A block's page state (1 bit and a
4-byte crc32c per page: a GiB per TiB of guest) is read from the image one
window of WINDOW_PAGES pages at a time, as load and check read it. Memory is
bounded by PREFETCH + 1 reads of up to READ_BYTES and as many windows of state.
"""
import collections
import concurrent.futures
import itertools
import os
from dataclasses import dataclass

import numpy as np

from qsnap._core import page_crcs
from qsnap.errors import ChecksumError, ImageError, IOFailure
from qsnap.image.pages import close_all, open_chain

READ_BYTES = 8 << 20
PREFETCH = 2  # reads in flight ahead of the writer: memory is (PREFETCH + 1) * READ_BYTES
WINDOW_PAGES = 1 << 18   # pages of page state read at once: 32 KiB of bitmap, 1 MiB of checksums


def window_pages(img, pages=None):
    """Pages per window of page state: ``pages`` (default WINDOW_PAGES) rounded up to
    whole clusters and whole bitmap bytes (the image's bitmap is read from byte boundaries)."""
    pages = WINDOW_PAGES if pages is None else pages
    unit = max(8, img.cluster_size // img.target_page_size)
    return -(-pages // unit) * unit


def bitmap_bytes(block, first, n):
    """uint8 stored-bit bytes (little-endian bit order) of pages first..first+n-1 of
    ``block`` (``first`` a multiple of 8; bits past the block's end are 0)."""
    return np.frombuffer(block.bits(first, n), dtype=np.uint8)


@dataclass
class StateWindow:
    """The stored bits and crc32c of pages [first, first + len(bits)) of a block."""

    first: int
    bits: np.ndarray     # bool per page
    crcs: np.ndarray     # '<u4' per page

    @classmethod
    def read(cls, block, first, n):
        n = max(0, min(n, block.n_pages - first))
        bits = np.unpackbits(bitmap_bytes(block, first, n), bitorder="little")[:n].astype(bool)
        return cls(first, bits, np.frombuffer(block.crcs(first, n), dtype="<u4"))


def _stored_clusters(state, ppc):
    """Block cluster indices (``ppc`` pages each) of a window that hold a stored page;
    the window starts on a cluster boundary."""
    n = len(state.bits)
    padded = np.zeros(-(-n // ppc) * ppc, bool)
    padded[:n] = state.bits
    return (np.flatnonzero(padded.reshape(-1, ppc).any(axis=1)) + state.first // ppc).tolist()


def _runs(mask):
    """(start, end) index pairs of the True runs of a boolean array."""
    d = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    return zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist())


class PageSource:
    """Stored pages of an open ``qsnap.image.reader.Image``; one runs() iteration at a time
    (they share the read buffers)."""

    def __init__(self, img, read_bytes=READ_BYTES, window=None):
        self.img = img
        self.read_bytes = max(read_bytes, img.cluster_size)
        self.window = window_pages(img, window)
        self._bufs = None
        self.fds = open_chain(img)      # one per file of the backing chain
        for fd in self.fds:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (OSError, AttributeError):
                pass

    def close(self):
        close_all(self.fds)
        self.fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def runs(self, bi):
        """Yield (offset in block, memoryview) for runs of consecutive stored pages of block ``bi``.

        A view is valid until the next one is asked for: the read buffers are
        reused (PREFETCH + 1 of them, allocated once; fresh 8 MiB buffers would
        cost a page fault per page). The next reads and their checksums run in
        a helper thread while the caller writes the current one: pread, crc32c
        and the caller's pwrite all release the GIL."""
        b = self.img.blocks[bi]
        extents = enumerate(self._extents(b))
        if self._bufs is None:
            self._bufs = [bytearray(self.read_bytes) for _ in range(PREFETCH + 1)]
        pending = collections.deque()
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qsnap-read") as pool:
            try:
                for k, e in itertools.islice(extents, PREFETCH):
                    pending.append(pool.submit(self._load, b, *e, self._bufs[k % len(self._bufs)]))
                while pending:
                    p0, view, crcs, state = pending.popleft().result()
                    for k, e in itertools.islice(extents, 1):
                        pending.append(pool.submit(self._load, b, *e, self._bufs[k % len(self._bufs)]))
                    yield from self._checked_runs(b, state, p0, view, crcs)
            finally:
                for f in pending:
                    f.cancel()

    def _extents(self, b):
        """(first page, end page, (chain index, host offset), StateWindow) of each read:
        clusters consecutive both in the block and in one file of the chain, up to
        ``read_bytes``, within one window of page state (read here, window by window)."""
        ppc = self.img.cluster_size // self.img.target_page_size
        for first in range(0, b.n_pages, self.window):
            state = StateWindow.read(b, first, self.window)
            end = first + len(state.bits)
            wanted = _stored_clusters(state, ppc)
            i = 0
            while i < len(wanted):
                j, hosts = self._extent(b, wanted, i)
                yield wanted[i] * ppc, min(end, wanted[j - 1] * ppc + ppc), hosts[0], state
                i = j

    def _load(self, b, p0, p1, where, state, buf):
        tps = self.img.target_page_size
        view = self._pread(memoryview(buf)[:(p1 - p0) * tps], where, b, p0 * tps)
        return p0, view, page_crcs(view, tps), state

    def _checked_runs(self, b, state, p0, mv, crcs):
        tps = self.img.target_page_size
        lo = p0 - state.first
        sel = state.bits[lo:lo + len(crcs)]
        self._verify(b, crcs, p0, sel, state.crcs[lo:lo + len(crcs)])
        for s, e in _runs(sel):
            yield (p0 + s) * tps, mv[s * tps:e * tps]

    def _extent(self, b, wanted, i):
        """Clusters wanted[i:j] that are consecutive both in the block and in the file."""
        cs = self.img.cluster_size
        hosts = [self._host(b, wanted[i])]
        j = i + 1
        while (j < len(wanted) and (j - i + 1) * cs <= self.read_bytes
               and wanted[j] == wanted[j - 1] + 1):
            h = self._host(b, wanted[j])
            if h != (hosts[-1][0], hosts[-1][1] + cs):
                break
            hosts.append(h)
            j += 1
        return j, hosts

    def _host(self, b, cluster):
        """(chain index, host offset) of a cluster of block ``b``: the file of the chain
        that holds it."""
        voff = b.offset + cluster * self.img.cluster_size
        f, h = self.img.locate(voff)
        if f is None:
            raise ImageError(f"block '{b.idstr}' has stored pages at 0x{cluster * self.img.cluster_size:x} "
                             f"but no data cluster (virtual offset 0x{voff:x})")
        return next(k for k, im in enumerate(self.img.chain) if im is f), h

    def _pread(self, view, where, b, block_offset):
        """Fill ``view`` from file ``where[0]`` of the chain at offset ``where[1]``; returns it."""
        k, offset = where
        path = self.img.chain[k].path
        done = 0
        try:
            while done < len(view):
                n = os.preadv(self.fds[k], [view[done:]], offset + done)
                if n == 0:
                    break
                done += n
        except OSError as e:
            raise IOFailure(f"cannot read image {path} at offset 0x{offset:x}: {e.strerror}") from None
        if done != len(view):
            raise ImageError(f"image {path} ends inside block '{b.idstr}' page 0x{block_offset:x} "
                             f"(image offset 0x{offset:x})")
        return view

    def _verify(self, b, got, p0, sel, want):
        tps = self.img.target_page_size
        bad = np.flatnonzero(sel & (got != want))
        if len(bad):
            po = (p0 + int(bad[0])) * tps
            f, h = self.img.locate(b.offset + po)
            where = "" if f is None or f is self.img else f" of {f.path}"
            raise ChecksumError(f"checksum mismatch in block '{b.idstr}' page 0x{po:x} "
                                f"(image offset 0x{h:x}{where})")


def write_ranges(pages, out, ranges, offsets):
    """Each stored page of each range at its file offset; the rest stays a hole."""
    by_block = {}
    for r, off in zip(ranges, offsets):
        by_block.setdefault(r.block, []).append((r, off))
    for bi, parts in by_block.items():
        for boff, data in pages.runs(bi):
            end = boff + len(data)
            for r, off in parts:
                lo, hi = max(boff, r.block_offset), min(end, r.block_offset + r.length)
                if lo < hi:
                    out.pwrite(data[lo - boff:hi - boff], off + lo - r.block_offset)
