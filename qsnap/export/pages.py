"""Reading a block's stored pages in large, checksum-verified runs.

Every export walks the image the same way: per block, the data clusters of
its region in virtual order, several host-contiguous clusters per read; each
stored page is checked against its crc32c before it leaves this module, so a
corrupt page never reaches an export file. Memory is bounded by PREFETCH + 1
reads of up to READ_BYTES.
"""
import collections
import concurrent.futures
import itertools
import os

import numpy as np

from qsnap._core import page_crcs
from qsnap.errors import ChecksumError, ImageError, IOFailure
from qsnap.image.layout import pages_of
from qsnap.image.pages import close_all, open_chain

READ_BYTES = 8 << 20
PREFETCH = 2  # reads in flight ahead of the writer: memory is (PREFETCH + 1) * READ_BYTES


def stored_bits(block, tps):
    """Boolean array: page i of ``block`` is stored in the image."""
    n = pages_of(block.length, tps)
    return np.unpackbits(block.bitmap, bitorder="little")[:n].astype(bool)


def _runs(mask):
    """(start, end) index pairs of the True runs of a boolean array."""
    d = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    return zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist())


class PageSource:
    """Stored pages of an open ``qsnap.image.reader.Image``; one runs() iteration at a time
    (they share the read buffers)."""

    def __init__(self, img, read_bytes=READ_BYTES):
        self.img = img
        self.read_bytes = max(read_bytes, img.cluster_size)
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
        bits = stored_bits(b, self.img.target_page_size)
        extents = enumerate(self._extents(b, bits))
        if self._bufs is None:
            self._bufs = [bytearray(self.read_bytes) for _ in range(PREFETCH + 1)]
        pending = collections.deque()
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qsnap-read") as pool:
            try:
                for k, e in itertools.islice(extents, PREFETCH):
                    pending.append(pool.submit(self._load, b, *e, self._bufs[k % len(self._bufs)]))
                while pending:
                    p0, view, crcs = pending.popleft().result()
                    for k, e in itertools.islice(extents, 1):
                        pending.append(pool.submit(self._load, b, *e, self._bufs[k % len(self._bufs)]))
                    yield from self._checked_runs(b, bits, p0, view, crcs)
            finally:
                for f in pending:
                    f.cancel()

    def _extents(self, b, bits):
        """(first page, end page, (chain index, host offset)) of each read: clusters
        consecutive both in the block and in one file of the chain, up to ``read_bytes``."""
        ppc = self.img.cluster_size // self.img.target_page_size
        n = len(bits)
        wanted = [c for c in range(-(-n // ppc)) if bits[c * ppc:(c + 1) * ppc].any()]
        i = 0
        while i < len(wanted):
            j, hosts = self._extent(b, wanted, i)
            yield wanted[i] * ppc, min(n, wanted[j - 1] * ppc + ppc), hosts[0]
            i = j

    def _load(self, b, p0, p1, where, buf):
        tps = self.img.target_page_size
        view = self._pread(memoryview(buf)[:(p1 - p0) * tps], where, b, p0 * tps)
        return p0, view, page_crcs(view, tps)

    def _checked_runs(self, b, bits, p0, mv, crcs):
        tps = self.img.target_page_size
        sel = bits[p0:p0 + len(crcs)]
        self._verify(b, crcs, p0, sel)
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

    def _verify(self, b, got, p0, sel):
        tps = self.img.target_page_size
        bad = np.flatnonzero(sel & (got != b.checksums[p0:p0 + len(sel)]))
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
