"""Page and cluster reads of a qsnap image for the load and postcopy engines.

Which data clusters hold RAM and in what order to read them (host order, so the
disk reads sequentially), how to open the image for those reads (O_DIRECT where
the filesystem allows it), and reading a run of target pages by pread.  Plans are
array.array ("Q" offsets, "I" chain and block indexes); no NumPy.
"""
import errno
import mmap
import os
from array import array

from qsnap._core import indexes_where, region_of, shifted_left, take
from qsnap.errors import ImageError, IOFailure, UsageError


def open_data(path, cache, log, direct_read_works=None):
    """(fd, direct) for the data reads: O_DIRECT for cache='none' unless the filesystem refuses.

    ``direct_read_works(fd)`` decides whether an O_DIRECT fd can be read
    (default: try one aligned read)."""
    probe = direct_read_works or direct_read_works_probe
    if cache not in ("none", "writeback"):
        raise UsageError(f"cache mode '{cache}' is not one of none, writeback")
    if cache == "none" and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise IOFailure(f"cannot open image {path}: {e.strerror}") from None
        else:
            if probe(fd):
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


def direct_read_works_probe(fd):
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


def cluster_plan(img, blocks):
    """(host, virtual, block index) of every data cluster inside a RAM region, host order."""
    host, virt = img.ram_clusters()
    keep, idx = _block_of(virt, blocks, img.cluster_size)
    return take(host, keep), take(virt, keep), take(idx, keep)


def chain_plan(img, blocks):
    """(file, host, virtual, block index) of every data cluster inside a RAM region,
    wherever in ``img.chain`` it lies (``file`` indexes the chain), sorted by
    (file, host): each file is read in host order (chain.cluster_sources)."""
    if len(chain_of(img)) == 1:    # a stand-alone image: its own data clusters
        host, virt, bidx = cluster_plan(img, blocks)
        return array("I", bytes(4 * len(host))), host, virt, bidx
    from qsnap.image.chain import cluster_sources

    virt, src, host = cluster_sources(img)
    virt = shifted_left(virt, img.cluster_bits)
    keep, idx = _block_of(virt, blocks, img.cluster_size)
    return take(src, keep), take(host, keep), take(virt, keep), take(idx, keep)


def chain_of(img):
    """The files of ``img``'s backing chain, ``img`` first (an object without one: itself)."""
    return getattr(img, "chain", None) or [img]


def _block_of(virt, blocks, cs):
    """(indexes of the virtual offsets ``virt`` inside a block's region, array('Q');
    the block index of each offset, array('I'))."""
    if not blocks:
        return array("Q"), array("I", bytes(4 * len(virt)))
    by_start = sorted(range(len(blocks)), key=lambda i: blocks[i].offset)
    starts = array("Q", [blocks[i].offset for i in by_start])
    ends = array("Q", [blocks[i].offset + -(-blocks[i].length // cs) * cs for i in by_start])
    inside, pos = region_of(virt, starts, ends)   # metadata-region clusters are not pages
    return indexes_where(inside), take(array("I", by_start), pos)


class ClusterState:
    """The page state (stored bits, checksums) of the clusters of a cluster plan,
    read from the image a batch of clusters at a time: the callable that
    PageEmitter.send_clusters(state=...) asks for the next batch.  Row k - k0 of
    each buffer (flat: a bytearray of stored-bit rows, an array('I') of checksum
    rows) covers ``window`` pages from cluster k's first page rounded down to a
    multiple of 8; pages past the block's end are 0."""

    STATE_PAGES = 1 << 18   # pages of state per batch (1 MiB of checksums)

    def __init__(self, img, blocks, virt, bidx, window):
        self.img, self.blocks, self.window = img, blocks, window
        self.virt, self.bidx = virt, bidx
        self.batch = max(1, self.STATE_PAGES // window)
        # clusters that continue the previous one's pages: one read for a run of them
        self.runs = img.cluster_size // img.target_page_size == window

    def _follows(self, r):
        """Cluster r holds the pages right after cluster r - 1's, in the same block."""
        return (self.runs and int(self.bidx[r]) == int(self.bidx[r - 1])
                and int(self.virt[r]) == int(self.virt[r - 1]) + self.img.cluster_size)

    def __call__(self, k0):
        k1 = min(k0 + self.batch, len(self.virt))
        w, tps = self.window, self.img.target_page_size
        bits = bytearray((k1 - k0) * w // 8)
        crcs = array("I", bytes(4 * (k1 - k0) * w))
        j = k0
        while j < k1:
            r = j + 1
            while r < k1 and self._follows(r):
                r += 1
            b = self.blocks[int(self.bidx[j])]
            first = ((int(self.virt[j]) - b.offset) // tps) & ~7
            got = b.bit_bytes(first, (r - j) * w)
            at = (j - k0) * w // 8
            bits[at:at + len(got)] = got
            got = b.crc_array(first, (r - j) * w)
            at = (j - k0) * w
            crcs[at:at + len(got)] = got
            j = r
        return k1, bits, crcs


def open_chain(img):
    """Descriptors of every file of ``img.chain`` for reads on request (page cache)."""
    fds = []
    try:
        for im in chain_of(img):
            fds.append(os.open(im.path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        close_all(fds)
        raise IOFailure(f"cannot open image {chain_of(img)[len(fds)].path}: {e.strerror}") from None
    return fds


def close_all(fds):
    for fd in fds:
        os.close(fd)


def read_target_pages(img, fds, block, tp0, tp1):
    """Image bytes of target pages [tp0, tp1) of ``block``, read through the chain
    (pread on ``fds[k]`` for ``img.chain[k]``; an int: the one file of a stand-alone
    image; unallocated -> zeros)."""
    tps, cs = img.target_page_size, img.cluster_size
    fds = [fds] if isinstance(fds, int) else fds
    v = block.offset + tp0 * tps
    end = block.offset + tp1 * tps
    parts = []
    while v < end:
        n = min(end - v, cs - (v & (cs - 1)))
        f, h = img.locate(v)
        if f is not None:
            k = next(k for k, im in enumerate(img.chain) if im is f)
            try:
                d = os.pread(fds[k], n, h)
            except OSError as e:
                raise IOFailure(f"cannot read the image {f.path}: {e.strerror} at image offset "
                                f"0x{h:x}") from None
            if len(d) != n:
                raise ImageError(f"image file {f.path} truncated at image offset 0x{h:x}")
            parts.append(d)
        else:
            parts.append(bytes(n))
        v += n
    return b"".join(parts)
