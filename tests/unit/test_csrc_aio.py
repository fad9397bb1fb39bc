"""csrc/aio.c: the ordered read-ahead ring, against plain pread."""
import os
import random
import threading
import time

import pytest

from qsnap import _core
from qsnap.errors import ImageError, IOFailure

from bigcmp import assert_same

PAGE = 4096


@pytest.fixture(scope="module")
def datafile(tmp_path_factory):
    path = tmp_path_factory.mktemp("aio") / "data.bin"
    rnd = random.Random(7)
    path.write_bytes(rnd.randbytes(8 << 20))
    return path


@pytest.fixture
def fd(datafile):
    fd = os.open(datafile, os.O_RDONLY)
    yield fd
    os.close(fd)


def random_extents(rnd, file_size, n, max_len):
    """Page-aligned extents in random order, with runs of adjacent ones."""
    out = []
    while len(out) < n:
        length = rnd.randrange(1, max_len // PAGE + 1) * PAGE
        off = rnd.randrange(0, (file_size - length) // PAGE + 1) * PAGE
        out.append((off, length))
        # sometimes continue right after it, to exercise coalescing
        while rnd.random() < 0.5 and len(out) < n:
            off += length
            length = rnd.randrange(1, max_len // PAGE + 1) * PAGE
            if off + length > file_size:
                break
            out.append((off, length))
    return out


def check_ring(fd, extents, ref_fd=None, **kw):
    ref_fd = fd if ref_fd is None else ref_fd
    n_ext = 0
    reads = 0
    with _core.AioRing(fd, extents, **kw) as ring:
        expected_reads = ring.n_reads
        for off, first, n, data in ring:
            assert first == n_ext, "buffers must come strictly in extent order"
            assert off == extents[first][0]
            want = b"".join(os.pread(ref_fd, extents[i][1], extents[i][0]) for i in range(first, first + n))
            assert_same(data, want, f"extent {first}")
            n_ext += n
            reads += 1
    assert n_ext == len(extents)
    assert reads == expected_reads


@pytest.mark.parametrize("n_threads,n_bufs", [(1, 1), (1, 4), (3, 2), (8, 8), (16, 32)])
def test_order_and_content_random_extents(fd, datafile, n_threads, n_bufs):
    rnd = random.Random(n_threads * 100 + n_bufs)
    size = datafile.stat().st_size
    buf_size = 64 * 1024
    extents = random_extents(rnd, size, 300, buf_size)
    check_ring(fd, extents, buf_size=buf_size, n_bufs=n_bufs, n_threads=n_threads)


def test_big_buffers_many_threads(fd, datafile):
    rnd = random.Random(1)
    size = datafile.stat().st_size
    extents = random_extents(rnd, size, 100, 1 << 20)
    check_ring(fd, extents, buf_size=2 << 20, n_bufs=8, n_threads=8)


def test_adjacent_extents_coalesce_up_to_buffer_size(fd):
    extents = [(i * 65536, 65536) for i in range(8)] + [(1 << 20, 4096)]
    with _core.AioRing(fd, extents, buf_size=131072, n_bufs=2, n_threads=2) as ring:
        assert ring.n_reads == 5
        got = [(off, first, n, len(data)) for off, first, n, data in ring]
    assert got == [(0, 0, 2, 131072), (131072, 2, 2, 131072), (262144, 4, 2, 131072),
                   (393216, 6, 2, 131072), (1 << 20, 8, 1, 4096)]


def test_empty_extent_list(fd):
    with _core.AioRing(fd, []) as ring:
        assert ring.n_reads == 0
        assert ring.next() is None


def test_read_past_eof_is_an_error_after_earlier_buffers(fd, datafile):
    size = datafile.stat().st_size
    extents = [(0, 65536), (1 << 20, 65536), (size - 4096, 8192), (0, 4096)]
    with _core.AioRing(fd, extents, buf_size=65536, n_bufs=4, n_threads=4) as ring:
        assert ring.next()[1] == 0
        ring.release()
        assert ring.next()[1] == 1
        ring.release()
        with pytest.raises(ImageError, match=r"truncated: 4096 bytes missing at image offset 0x800000"):
            ring.next()


def test_read_entirely_past_eof(fd, datafile):
    size = datafile.stat().st_size
    with _core.AioRing(fd, [(size, 4096)], buf_size=4096) as ring:
        with pytest.raises(ImageError, match="truncated"):
            ring.next()


def test_read_error_names_errno_and_offset(tmp_path):
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with _core.AioRing(d, [(4096, 4096)], buf_size=4096) as ring:
            with pytest.raises(IOFailure, match=r"cannot read the image: is a directory at image offset 0x1000"):
                ring.next()
    finally:
        os.close(d)


def test_cancel_mid_stream_then_close(fd):
    extents = [(i * 65536, 65536) for i in range(100)]
    ring = _core.AioRing(fd, extents, buf_size=65536, n_bufs=4, n_threads=4)
    assert ring.next()[1] == 0
    ring.release()
    ring.cancel()
    with pytest.raises(IOFailure, match="cancelled"):
        ring.next()
    ring.close()
    with pytest.raises(ValueError, match="closed"):
        ring.next()


def test_cancel_from_another_thread_stops_the_consumer(fd):
    ring = _core.AioRing(fd, [(i * 4096, 4096) for i in range(256)], buf_size=4096,
                         n_bufs=2, n_threads=2)
    t = threading.Timer(0.05, ring.cancel)
    t.start()
    taken = 0
    with pytest.raises(IOFailure, match="cancelled"):
        while ring.next() is not None:
            ring.release()
            taken += 1
            time.sleep(0.002)
    t.join()
    ring.close()
    assert 0 < taken < 256


def _os_threads():
    """Thread ids of this process as the kernel sees them (the ring's workers are pthreads)."""
    return set(os.listdir("/proc/self/task"))


def test_close_with_reads_in_flight_joins_threads(fd):
    for _ in range(20):
        before = _os_threads()
        ring = _core.AioRing(fd, [(i * 65536, 65536) for i in range(128)], buf_size=65536,
                             n_bufs=8, n_threads=8)
        ring.next()
        # by ids, not counts: a thread of an earlier test may end meanwhile
        workers = _os_threads() - before
        assert len(workers) == 8
        ring.close()  # holding a buffer, workers busy: must not hang or crash
        assert not workers & _os_threads()   # every worker joined
        with pytest.raises(ValueError, match="closed"):
            ring.next()


def test_dealloc_without_close(fd):
    ring = _core.AioRing(fd, [(0, 65536)] * 50, buf_size=65536, n_bufs=4, n_threads=4)
    ring.next()
    del ring


@pytest.mark.parametrize("kw,extents", [
    ({"buf_size": 65536}, [(0, 131072)]),     # extent larger than a buffer
    ({"buf_size": 65536}, [(0, 0)]),          # empty extent
    ({"buf_size": 1000}, [(0, 512)]),         # buffer size not 4096-aligned
    ({"n_bufs": 0}, [(0, 4096)]),
    ({"n_threads": 0}, [(0, 4096)]),
])
def test_bad_parameters(fd, kw, extents):
    with pytest.raises(ValueError):
        _core.AioRing(fd, extents, **kw)


def test_misuse_release_without_next(fd):
    with _core.AioRing(fd, [(0, 4096)], buf_size=4096) as ring:
        with pytest.raises(RuntimeError):
            ring.release()


def test_o_direct(datafile, fd):
    ref_fd = fd
    try:
        dfd = os.open(datafile, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        pytest.skip(f"O_DIRECT not supported here: {e.strerror}")
    try:
        extents = [(i * 1048576, 1048576) for i in (3, 0, 1, 2, 7)]
        try:
            check_ring(dfd, extents, ref_fd=ref_fd, buf_size=2 << 20, n_bufs=4, n_threads=2)
        except IOFailure as e:
            if "Invalid argument" in str(e):
                pytest.skip("filesystem refuses O_DIRECT reads")
            raise
    finally:
        os.close(dfd)
