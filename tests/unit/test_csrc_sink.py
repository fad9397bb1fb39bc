import errno
import os
import random
import subprocess

import numpy as np
import pytest

from qsnap import _core
from qsnap.errors import IOFailure, StreamError
from qsnap.stream.constants import (RAM_SAVE_FLAG_COMPRESS_PAGE, RAM_SAVE_FLAG_CONTINUE,
                                    RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_PAGE,
                                    RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_ZERO)

from bigcmp import assert_same

PAGE_REC_DTYPE = np.dtype([('offset', 'u8'), ('data_pos', 'u8'), ('data_len', 'u4'),
                           ('block', 'u4'), ('flags', 'u2'), ('fill', 'u1'), ('_pad', 'V5')])
PS = 4096
CS = 1 << 16


def test_dtype_matches_c():
    assert _core.SINK_REC_DTYPE == PAGE_REC_DTYPE
    assert PAGE_REC_DTYPE.itemsize == 32


def content(path, host_map, vsize, cs):
    """The virtual content from the file and the host map (a qcow2 reader's view)."""
    out = bytearray(vsize)
    with open(path, "rb") as f:
        for c, h in enumerate(host_map):
            if h:
                f.seek(int(h))
                out[c * cs:(c + 1) * cs] = f.read(cs)
    return out


def make_sink(tmp_path, vsize, cs=CS, n_slots=32, **kw):
    path = tmp_path / "img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, bytes(cs), 0)
    sink = _core.ClusterSink(fd, vsize, cluster_size=cs, n_slots=n_slots, path=str(path), **kw)
    return path, fd, sink


def _direct_sink(path, vsize, **kw):
    """A sink writing `path` through O_DIRECT (skip where refused), and a plain fd on it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, bytes(CS), 0)
    try:
        dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as e:
        os.close(fd)
        if e.errno != errno.EINVAL:
            raise
        pytest.skip(f"filesystem refuses O_DIRECT: {e}")
    sink = _core.ClusterSink(dfd, vsize, cluster_size=CS, direct=True, region_offsets=[0],
                             block_lengths=[vsize], path=str(path), **kw)
    return fd, dfd, sink


def _one_block_sink(tmp_path, vsize, direct, n_slots=2):
    """A sink over one block of `vsize` bytes at tmp_path/img, through O_DIRECT or
    the page cache: (fd, the O_DIRECT fd or None, sink)."""
    if direct:
        return _direct_sink(tmp_path / "img", vsize, n_slots=n_slots)
    _, fd, sink = make_sink(tmp_path, vsize, n_slots=n_slots, region_offsets=[0],
                            block_lengths=[vsize])
    return fd, None, sink


def _close(*fds):
    for fd in fds:
        if fd is not None:
            os.close(fd)


@pytest.mark.parametrize("n_slots", [1, 3, 32])
def test_random_pages_against_model(tmp_path, n_slots):
    rnd = random.Random(n_slots)
    vsize = 24 * CS
    npages = vsize // PS
    path, fd, sink = make_sink(tmp_path, vsize, n_slots=n_slots)
    model = bytearray(vsize)
    hot = [rnd.randrange(npages) for _ in range(40)]
    for step in range(3000):
        p = rnd.choice(hot) if rnd.random() < 0.5 else rnd.randrange(npages)
        r = rnd.random()
        if r < 0.3:
            sink.put_page(p * PS, None)
            model[p * PS:(p + 1) * PS] = bytes(PS)
        elif r < 0.35:
            sink.put_page(p * PS, bytes(PS))   # all-zero data is a zero page
            model[p * PS:(p + 1) * PS] = bytes(PS)
        elif r < 0.4:
            sink.put_page(p * PS, None, fill=0x33)
            model[p * PS:(p + 1) * PS] = b"\x33" * PS
        else:
            page = bytearray(PS)
            page[rnd.randrange(PS)] = rnd.randrange(1, 256)
            page[:8] = rnd.getrandbits(64).to_bytes(8, "little")
            sink.put_page(p * PS, bytes(page))
            model[p * PS:(p + 1) * PS] = page
        if step % 500 == 0:
            assert_same(sink.get_page(p * PS), bytes(model[p * PS:(p + 1) * PS]), "sink.get_page(p * PS)")
    sink.flush()
    hm = sink.host_map()
    size = os.fstat(fd).st_size
    os.close(fd)
    assert size % CS == 0
    assert size == sink.append_offset
    assert sink.clusters_written == np.count_nonzero(hm)
    # whole clusters, each mapped once, none over cluster 0
    assert len(set(hm[hm != 0].tolist())) == np.count_nonzero(hm)
    assert all(h % CS == 0 and h >= CS for h in hm[hm != 0].tolist())
    assert_same(content(path, hm, vsize, CS), model, "content(path, hm, vsize, CS)")
    bm = np.unpackbits(sink.nonzero_bitmap(), bitorder="little")[:npages]
    crcs = sink.checksums()
    for p in range(npages):
        page = bytes(model[p * PS:(p + 1) * PS])
        assert bm[p] == (page != bytes(PS)), p
        if bm[p]:
            assert crcs[p] == _core.crc32c(page)
    # clusters with no non-zero page anywhere stay unallocated
    for c in range(vsize // CS):
        if model[c * CS:(c + 1) * CS] == bytes(CS) and hm[c] == 0:
            continue
        if hm[c] == 0:
            pytest.fail(f"cluster {c} has data but is unallocated")
    if n_slots == 1:
        assert sink.page_rewrites > 0


def test_overwrite_on_disk_nonzero_zero_nonzero(tmp_path):
    vsize = 4 * CS
    path, fd, sink = make_sink(tmp_path, vsize, n_slots=1)
    a, b = b"\x01" * PS, b"\x02" * PS
    sink.put_page(0, a)
    sink.put_page(CS, b)            # evicts cluster 0 to disk
    assert sink.clusters_written == 1
    sink.put_page(PS, None)          # zero over a zero page on disk: no write
    assert sink.page_rewrites == 0
    sink.put_page(0, None)           # zero over a non-zero page on disk: rewrite with zeros
    assert sink.page_rewrites == 1
    assert_same(sink.get_page(0), bytes(PS), "sink.get_page(0)")
    sink.put_page(0, b)
    assert sink.page_rewrites == 2
    sink.flush()
    # the writer thread has written the two clusters and the two pages
    assert sink.bytes_written == 2 * CS + 2 * PS
    hm = sink.host_map()
    data = content(path, hm, vsize, CS)
    os.close(fd)
    assert data[:PS] == b and data[CS:CS + PS] == b
    assert sink.pages_zero == 2 and sink.pages_nonzero == 3


def test_cluster_zeroed_in_slot_is_not_allocated(tmp_path):
    path, fd, sink = make_sink(tmp_path, 2 * CS)
    sink.put_page(PS, b"\x07" * PS)
    sink.put_page(PS, None)
    sink.flush()
    assert np.count_nonzero(sink.host_map()) == 0 and sink.clusters_written == 0
    os.close(fd)


def recs_from(items):
    r = np.zeros(len(items), dtype=PAGE_REC_DTYPE)
    for i, it in enumerate(items):
        for k, v in it.items():
            r[i][k] = v
    return r


def batch_sink(tmp_path, n_slots=4):
    path, fd, sink = make_sink(tmp_path, 4 * CS, n_slots=n_slots,
                               region_offsets=[0, 2 * CS], block_lengths=[2 * CS, CS],
                               block_names=["pc.ram", "vga"])
    return path, fd, sink


def test_put_batch_types_and_counts(tmp_path):
    path, fd, sink = batch_sink(tmp_path)
    data = os.urandom(2 * PS)
    # XBZRLE over page 0x1000 of block 0: bytes 10..13 new, rest unchanged
    enc = bytes([10, 4]) + b"WXYZ"
    recs = recs_from([
        dict(offset=0x1000, data_pos=0, data_len=PS, block=0, flags=RAM_SAVE_FLAG_PAGE),
        dict(offset=0x2000, data_pos=PS, data_len=PS, block=1,
             flags=RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE),
        dict(offset=0x3000, block=0, flags=RAM_SAVE_FLAG_ZERO, fill=0),
        dict(flags=RAM_SAVE_FLAG_MULTIFD_FLUSH),
        dict(offset=0x1000, data_pos=2 * PS, data_len=len(enc), block=0, flags=RAM_SAVE_FLAG_XBZRLE),
        dict(offset=0x4000, data_pos=2 * PS, data_len=len(enc), block=0, flags=RAM_SAVE_FLAG_XBZRLE),
    ])
    sink.put_batch(recs, memoryview(data + enc))
    assert list(sink.block_records()) == [4, 1]
    expect = bytearray(data[:PS])
    expect[10:14] = b"WXYZ"
    assert_same(sink.get_page(0x1000), bytes(expect), "sink.get_page(0x1000)")
    z = bytearray(PS)
    z[10:14] = b"WXYZ"
    assert_same(sink.get_page(0x4000), bytes(z), "sink.get_page(0x4000)")
    assert_same(sink.get_page(2 * CS + 0x2000), data[PS:], "sink.get_page(2 * CS + 0x2000)")
    sink.flush()
    os.close(fd)


@pytest.mark.parametrize("rec,data,msg", [
    (dict(offset=0, block=0, flags=0x800), b"", "unknown RAM record flags 0x800 in block 'pc.ram' page 0x0"),
    (dict(offset=0, block=0, flags=RAM_SAVE_FLAG_COMPRESS_PAGE, data_len=5), b"x" * 5, "COMPRESS_PAGE"),
    (dict(offset=0, block=7, flags=RAM_SAVE_FLAG_ZERO), b"", "block index 7"),
    (dict(offset=CS, block=1, flags=RAM_SAVE_FLAG_ZERO), b"", "illegal RAM offset 0x10000 in block 'vga'"),
    (dict(offset=0x10, block=0, flags=RAM_SAVE_FLAG_ZERO), b"", "illegal RAM offset 0x10"),
    (dict(offset=0, block=0, flags=RAM_SAVE_FLAG_PAGE, data_pos=1, data_len=PS), bytes(PS), "payload"),
    (dict(offset=0, block=0, flags=RAM_SAVE_FLAG_PAGE, data_pos=0, data_len=100), bytes(PS), "payload"),
    (dict(offset=0, block=0, flags=RAM_SAVE_FLAG_XBZRLE, data_len=2), bytes([0, 0]), "XBZRLE"),
    (dict(offset=0, block=0, flags=RAM_SAVE_FLAG_XBZRLE, data_len=3), bytes([0xff, 0x7f, 1]), "XBZRLE"),
])
def test_put_batch_bad_records(tmp_path, rec, data, msg):
    path, fd, sink = batch_sink(tmp_path)
    with pytest.raises(StreamError, match=msg):
        sink.put_batch(recs_from([rec]), data)
    os.close(fd)


def test_write_error_is_iofailure(tmp_path):
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o644)
    sink = _core.ClusterSink(fd, 2 * CS, cluster_size=CS, n_slots=1, path="ro-image",
                             region_offsets=[0], block_lengths=[2 * CS])
    sink.put_page(0, b"\x01" * PS)
    msg = r"bad file descriptor writing ro-image at offset 0x10000"
    with pytest.raises(IOFailure, match=msg):
        # the eviction of cluster 0 is queued and fails on the writer thread:
        # reported by this put if the writer was quick, else by the flush
        sink.put_page(CS, b"\x01" * PS)
        sink.flush()
    # the first error stays: every later call reports it
    with pytest.raises(IOFailure, match=msg):
        sink.put_page(CS + PS, b"\x02" * PS)
    with pytest.raises(IOFailure, match=msg):
        sink.put_page(CS + PS, None)
    with pytest.raises(IOFailure, match=msg):
        sink.get_page(CS)
    with pytest.raises(IOFailure, match=msg):
        sink.put_batch(recs_from([dict(offset=0, block=0, flags=RAM_SAVE_FLAG_ZERO)]), b"")
    with pytest.raises(IOFailure, match=msg):
        sink.flush()
    assert sink.bytes_written == 0
    sink.close()
    os.close(fd)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_enospc_message():
    fd = os.open("/dev/full", os.O_RDWR)
    try:
        sink = _core.ClusterSink(fd, 2 * CS, cluster_size=CS, n_slots=1, path="/dev/full")
        sink.put_page(0, b"\x01" * PS)
        with pytest.raises(IOFailure, match=r"no space left on device writing /dev/full at offset 0x10000"):
            sink.flush()
    finally:
        os.close(fd)


def test_bad_parameters():
    with pytest.raises(ValueError):
        _core.ClusterSink(0, 3 * CS + 1, cluster_size=CS)
    with pytest.raises(ValueError):
        _core.ClusterSink(0, 4 * CS, cluster_size=3 * CS)


def test_o_direct_rewrite_and_xbzrle_from_disk(tmp_path):
    path = tmp_path / "direct"
    fd0, fd, sink = _direct_sink(path, 4 * CS, n_slots=1)
    page = bytearray(os.urandom(PS))
    sink.put_page(0x3000, bytes(page))
    sink.put_page(CS, b"\x01" * PS)           # evicts cluster 0 (aligned whole-cluster write)
    enc = bytes([0x80, 0x01, 3]) + b"abc"     # zrun 128, 3 new bytes
    sink.put_batch(recs_from([dict(offset=0x3000, data_pos=0, data_len=len(enc), block=0,
                                   flags=RAM_SAVE_FLAG_XBZRLE)]), enc)
    page[128:131] = b"abc"
    assert sink.page_rewrites == 1
    sink.put_page(0x3000, None)               # zero over a stored page on disk
    sink.put_page(0x3000, bytes(page))
    sink.flush()
    os.close(fd)
    hm = sink.host_map()
    assert_same(content(path, hm, 4 * CS, CS)[0x3000:0x4000], page, "content(path, hm, 4 * CS, CS)[0x3000:0x4000]")
    assert os.fstat(fd0).st_size % CS == 0
    os.close(fd0)
    assert sink.checksums(3, 1)[0] == _core.crc32c(bytes(page))


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("n_slots", [1, 2])
def test_writer_queue_stress_against_model(tmp_path, n_slots, direct):
    """Thousands of evictions through one or two slots keep the writer's queue
    full; rewrites, zero and fill pages and XBZRLE deltas land in clusters just
    queued or long written, and reads of them see the latest content.  With
    O_DIRECT two writers run: clusters concurrently, page rewrites alone."""
    rnd = random.Random(1000 + n_slots)
    n_clusters = 2500
    vsize = n_clusters * CS
    ppc = CS // PS
    if direct:
        # fd (without O_DIRECT) stays for the checks
        path = tmp_path / "img"
        fd, dfd, sink = _direct_sink(path, vsize, n_slots=n_slots)
    else:
        path, fd, sink = make_sink(tmp_path, vsize, n_slots=n_slots,
                                   region_offsets=[0], block_lengths=[vsize])
        dfd = None
    model = {}                      # page index -> content, absent = zero

    def page_of(p):
        return model.get(p, bytes(PS))

    for c in range(n_clusters):
        items, data = [], bytearray()
        for p in rnd.sample(range(c * ppc, (c + 1) * ppc), rnd.randint(1, 3)):
            page = rnd.randbytes(PS)
            items.append(dict(offset=p * PS, data_pos=len(data), data_len=PS, flags=RAM_SAVE_FLAG_PAGE))
            data += page
            model[p] = page
        for _ in range(rnd.randint(0, 2) if c else 0):
            back = rnd.randint(1, min(c, 3)) if rnd.random() < 0.5 else rnd.randint(1, c)
            p = (c - back) * ppc + rnd.randrange(ppc)
            kind = rnd.randrange(4)
            if kind == 0:
                items.append(dict(offset=p * PS, flags=RAM_SAVE_FLAG_ZERO))
                model.pop(p, None)
            elif kind == 1:
                fill = rnd.randrange(1, 256)
                items.append(dict(offset=p * PS, flags=RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE,
                                  fill=fill))
                model[p] = bytes([fill]) * PS
            elif kind == 2:
                page = rnd.randbytes(PS)
                items.append(dict(offset=p * PS, data_pos=len(data), data_len=PS,
                                  flags=RAM_SAVE_FLAG_PAGE))
                data += page
                model[p] = page
            else:
                at, new = rnd.randrange(128), rnd.randbytes(4)
                enc = bytes([at, 4]) + new
                items.append(dict(offset=p * PS, data_pos=len(data), data_len=len(enc),
                                  flags=RAM_SAVE_FLAG_XBZRLE))
                data += enc
                old = bytearray(page_of(p))
                old[at:at + 4] = new
                model[p] = bytes(old)
                if model[p] == bytes(PS):
                    del model[p]
        sink.put_batch(recs_from(items), bytes(data))
        if c % 10 == 9:
            p = (c - rnd.randrange(2)) * ppc + rnd.randrange(ppc)
            assert_same(sink.get_page(p * PS), page_of(p), (c, p))
    sink.flush()
    assert sink.page_rewrites > 1000
    assert sink.bytes_written == sink.clusters_written * CS + sink.page_rewrites * PS
    assert os.fstat(fd).st_size == sink.append_offset
    hm = sink.host_map()
    for c in range(n_clusters):
        expect = b"".join(page_of(p) for p in range(c * ppc, (c + 1) * ppc))
        got = os.pread(fd, CS, int(hm[c])) if hm[c] else bytes(CS)
        assert_same(got, expect, c)
    bm = np.unpackbits(sink.nonzero_bitmap(), bitorder="little")[:vsize // PS]
    assert set(np.flatnonzero(bm).tolist()) == set(model)
    crcs = sink.checksums()
    assert all(crcs[p] == _core.crc32c(v) for p, v in model.items())
    _close(fd, dfd)


@pytest.mark.parametrize("failing", [False, True])
def test_close_with_writes_queued(tmp_path, failing):
    """close() drops queued writes, after a write error or not, without hanging;
    the sink then refuses to be used."""
    path = tmp_path / "img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    sfd = os.open(path, os.O_RDONLY) if failing else fd
    sink = _core.ClusterSink(sfd, 512 * CS, cluster_size=CS, n_slots=1, path=str(path))
    page = b"\x05" * PS
    try:
        for c in range(512):
            sink.put_page(c * CS, page)
        for c in range(64):
            sink.put_page((c % 8) * CS + PS, page)      # rewrites queued behind the clusters
    except IOFailure:
        assert failing
    sink.close()
    sink.close()
    size = os.fstat(fd).st_size
    assert size <= 512 * CS
    with pytest.raises(ValueError, match="closed"):
        sink.put_page(0, page)
    with pytest.raises(ValueError, match="closed"):
        sink.flush()
    with pytest.raises(ValueError, match="closed"):
        sink.host_map()
    with pytest.raises(ValueError, match="closed"):
        sink.counters()
    assert os.fstat(fd).st_size == size
    if sfd != fd:
        os.close(sfd)
    os.close(fd)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_recycled_buffers_hold_no_stale_bytes(tmp_path, direct):
    """Cluster buffers come back from the writers unzeroed: pages that never
    got data read as zeros, in the file, through get_page and under XBZRLE."""
    n_full, n_sparse = 60, 60
    vsize = (n_full + n_sparse) * CS
    fd, dfd, sink = _one_block_sink(tmp_path, vsize, direct)
    model = bytearray(vsize)
    for c in range(n_full):                   # every buffer ends up full of 0xAA-ish data
        for p in range(CS // PS):
            page = bytes([0xA0 + p % 16]) * PS
            sink.put_page(c * CS + p * PS, page)
            model[c * CS + p * PS:c * CS + (p + 1) * PS] = page
    enc = bytes([0x10, 0x02]) + b"hi"         # zrun 16, 2 new bytes
    for c in range(n_full, n_full + n_sparse):
        base = c * CS
        page = os.urandom(PS)
        sink.put_page(base + 3 * PS, page)
        model[base + 3 * PS:base + 4 * PS] = page
        assert_same(sink.get_page(base + 5 * PS), bytes(PS), f"unwritten page of cluster {c}")
        sink.put_batch(recs_from([dict(offset=base + 7 * PS, data_pos=0, data_len=len(enc),
                                       block=0, flags=RAM_SAVE_FLAG_XBZRLE)]), enc)
        model[base + 7 * PS + 16:base + 7 * PS + 18] = b"hi"
        sink.put_page(base + 3 * PS, None)    # stored, then zero again in the open slot
        model[base + 3 * PS:base + 4 * PS] = bytes(PS)
    sink.flush()
    path = tmp_path / "img"
    assert_same(content(path, sink.host_map(), vsize, CS), model, "file content")
    assert sink.clusters_written == n_full + n_sparse
    _close(fd, dfd)


def test_o_direct_file_is_preallocated_then_trimmed(tmp_path):
    """With O_DIRECT the file is allocated ahead of the clusters written (so
    the writers never extend it); flush trims it to the append position."""
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                            text=True).stdout.strip()
    if fstype in ("tmpfs", "ramfs", "hugetlbfs"):
        pytest.skip(f"{tmp_path} is on {fstype}, where qsnap does not preallocate")
    n = 200
    fd, dfd, sink = _direct_sink(tmp_path / "img", n * CS, n_slots=1)
    page = b"\x5a" * PS
    for c in range(n):
        sink.put_page(c * CS, page)
    ahead = os.fstat(fd).st_size
    assert ahead > sink.append_offset + CS, (ahead, sink.append_offset)
    sink.flush()
    assert os.fstat(fd).st_size == sink.append_offset == (n + 1) * CS
    assert os.fstat(fd).st_blocks * 512 <= (n + 1) * CS + (1 << 20)   # nothing kept beyond
    sink.put_page(0, None)                    # a rewrite after the flush: still correct
    sink.put_page(n * CS - PS, page)
    sink.flush()
    assert os.fstat(fd).st_size == sink.append_offset
    hm = sink.host_map()
    data = content(tmp_path / "img", hm, n * CS, CS)
    assert_same(data[:PS], bytes(PS), "page 0 after the rewrite")
    assert_same(data[n * CS - PS:], page, "last page")
    os.close(dfd)
    os.close(fd)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_pages_from_any_source_alignment(tmp_path, direct):
    """Pages are copied into cluster buffers by streaming stores from wherever
    the stream put them: payloads at every byte alignment arrive whole, in the
    open slot (get_page), in the file, and over a page stored before."""
    n_clusters = 6
    vsize = n_clusters * CS
    fd, dfd, sink = _one_block_sink(tmp_path, vsize, direct)
    rnd = random.Random(7)
    model = bytearray(vsize)
    for rnd_pass in range(2):                      # the second pass overwrites in open slots
        items, data = [], bytearray()
        for i in range(n_clusters * CS // PS):
            if rnd_pass and i % 3:
                continue
            data += bytes(rnd.randrange(1, 24))    # the payload starts at any alignment
            page = rnd.randbytes(PS)
            items.append(dict(offset=i * PS, data_pos=len(data), data_len=PS, block=0,
                              flags=RAM_SAVE_FLAG_PAGE))
            data += page
            model[i * PS:(i + 1) * PS] = page
        for lo in range(0, len(items), 100):        # batches of 100: slots evicted between
            sink.put_batch(recs_from(items[lo:lo + 100]), bytes(data))
        for i in (0, 5, 15):
            got = sink.get_page((n_clusters - 1) * CS + i * PS)
            want = model[(n_clusters - 1) * CS + i * PS:(n_clusters - 1) * CS + (i + 1) * PS]
            assert_same(got, bytes(want), f"page {i} of the open last cluster")
    sink.flush()
    assert_same(content(tmp_path / "img", sink.host_map(), vsize, CS), model, "file content")
    _close(fd, dfd)


def test_complete_cluster_is_queued_at_once(tmp_path):
    """A cluster whose every page has arrived (data or zero, in any order) is
    queued right away, not when the LRU evicts its slot; a page re-sent after
    that is a rewrite in place, and the file holds the last content."""
    n = 8
    path, fd, sink = make_sink(tmp_path, n * CS, n_slots=32, region_offsets=[0],
                               block_lengths=[n * CS])
    per = CS // PS
    model = bytearray(n * CS)
    order = list(range(per))
    random.Random(3).shuffle(order)
    for c in range(n):
        for k, p in enumerate(order):
            voff = c * CS + p * PS
            page = None if p % 4 == 1 else os.urandom(PS)   # some pages arrive as ZERO
            sink.put_page(voff, page)
            if page:
                model[voff:voff + PS] = page
            # slots are plenty: only completeness queues the cluster
            assert sink.clusters_written == c + (k == per - 1), (c, k)
    half = os.urandom(PS)
    sink.put_page(0, half)                   # a re-send after the cluster went out
    model[0:PS] = half
    assert sink.page_rewrites == 1
    sink.flush()
    assert_same(content(path, sink.host_map(), n * CS, CS), model, "file content")
    os.close(fd)


def test_incomplete_cluster_stays_in_its_slot(tmp_path):
    """Pages of a cluster that has not yet seen all of its pages keep arriving
    in the slot (no rewrite), however many other clusters complete meanwhile."""
    n = 6
    path, fd, sink = make_sink(tmp_path, n * CS, n_slots=2, region_offsets=[0],
                               block_lengths=[n * CS])
    model = bytearray(n * CS)
    for p in range(CS // PS - 1):            # cluster 0: all pages but the last
        page = os.urandom(PS)
        sink.put_page(p * PS, page)
        model[p * PS:(p + 1) * PS] = page
    for c in range(1, n):                    # five complete clusters pass by
        for p in range(CS // PS):
            page = os.urandom(PS)
            sink.put_page(c * CS + p * PS, page)
            model[c * CS + p * PS:c * CS + (p + 1) * PS] = page
    assert sink.clusters_written == n - 1
    page = os.urandom(PS)
    sink.put_page(3 * PS, page)              # still in its slot: no rewrite
    model[3 * PS:4 * PS] = page
    assert sink.page_rewrites == 0
    sink.flush()
    assert_same(content(path, sink.host_map(), n * CS, CS), model, "file content")
    os.close(fd)


def test_page_state_spilled_beyond_the_cache_matches_a_model(tmp_path):
    """A space of 600 page-state chunks (4096 pages each) with a spill file: more
    chunks than the sink keeps in memory (256), touched at random, so chunks are
    written to the spill file and read back; contents, stored bits, checksums and
    host offsets all match a model."""
    rnd = random.Random(7)
    chunk_pages = 4096
    vsize = 600 * chunk_pages * PS
    npages = vsize // PS
    path, fd, sink = make_sink(tmp_path, vsize, n_slots=4, spill_dir=str(tmp_path))
    model = {}
    hot = [rnd.randrange(npages) for _ in range(50)]
    for step in range(4000):
        p = rnd.choice(hot) if rnd.random() < 0.3 else rnd.randrange(npages)
        if rnd.random() < 0.2:
            sink.put_page(p * PS, None)
            model[p] = bytes(PS)
        else:
            page = rnd.getrandbits(64).to_bytes(8, "little") + bytes(PS - 8)
            sink.put_page(p * PS, page)
            model[p] = page
        if step % 97 == 0:
            q = rnd.choice(list(model))
            assert sink.get_page(q * PS) == model[q]
    sink.flush()
    spill = [f for f in os.listdir(tmp_path) if f != "img"]
    assert spill == []   # anonymous: nothing left beside the image
    hm = sink.host_map()
    assert sink.clusters_written == np.count_nonzero(hm)
    with open(path, "rb") as f:
        for p, page in model.items():
            h = int(hm[p * PS // CS])
            stored = page != bytes(PS)
            assert bool(h) or not stored, p
            if h:
                f.seek(h + p * PS % CS)
                assert f.read(PS) == page, p
    for p, page in model.items():
        bit = int(np.unpackbits(sink.nonzero_bitmap(p - p % 8, 8), bitorder="little")[p % 8])
        assert bit == (page != bytes(PS)), p
        assert sink.checksums(p, 1)[0] == (_core.crc32c(page) if bit else 0), p
    untouched = [p for p in (rnd.randrange(npages) for _ in range(200)) if p not in model]
    assert not any(sink.get_page(p * PS) != bytes(PS) for p in untouched)
    sink.close()
    os.close(fd)
