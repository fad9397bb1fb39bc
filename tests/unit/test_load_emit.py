"""csrc/emit.c: PAGE/ZERO records byte for byte, checksums, CONTINUE, write errors."""
import fcntl
import json
import os
import random
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from qsnap import _core
from qsnap.errors import ChecksumError, IOFailure

from bigcmp import assert_same

PAGE = 4096
FLAG_ZERO, FLAG_PAGE, FLAG_EOS, FLAG_CONT = 0x02, 0x08, 0x10, 0x20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def be64(v):
    return struct.pack(">Q", v)


def counted(s):
    return bytes([len(s)]) + s


def make_block(n_pages, stored, data_seed):
    """(bitmap, checksums, data) for a block whose `stored` pages hold random data."""
    rnd = random.Random(data_seed)
    bitmap = np.zeros((n_pages + 7) // 8, np.uint8)
    crcs = np.zeros(n_pages, np.uint32)
    data = bytearray(n_pages * PAGE)
    for p in stored:
        bitmap[p // 8] |= 1 << (p % 8)
        page = rnd.randbytes(PAGE)
        data[p * PAGE:(p + 1) * PAGE] = page
        crcs[p] = _core.crc32c(page)
    return bitmap, crcs, bytes(data)


@pytest.fixture
def out(tmp_path):
    f = open(tmp_path / "out.bin", "w+b")
    yield f
    f.close()


def read_all(f):
    f.seek(0)
    return f.read()


@pytest.fixture
def two_blocks():
    # block 0 "pc.ram": 8 pages at region 0, pages 1, 2, 5 stored
    # block 1 "rom": 4 pages (+ a partial cluster) at region 1 MiB, page 0 stored
    bm0, cs0, d0 = make_block(8, [1, 2, 5], 1)
    bm1, cs1, d1 = make_block(4, [0], 2)
    blocks = [("pc.ram", 0, 8 * PAGE, bm0, cs0), (b"rom", 1 << 20, 4 * PAGE, bm1, cs1)]
    return blocks, d0, d1


def test_page_and_zero_records_byte_exact(out, two_blocks):
    blocks, d0, d1 = two_blocks
    em = _core.PageEmitter(out.fileno(), PAGE)
    em.set_blocks(blocks)
    em.bytes(b"\x02\x00\x00\x00\x02")          # a PART header queued before the pages
    em.cluster(0, 0, d0)
    em.cluster(1, 1 << 20, d1)
    em.zero_range(0)
    em.zero_range(1)
    em.bytes(be64(FLAG_EOS))
    em.flush()

    pg = lambda d, p: d[p * PAGE:(p + 1) * PAGE]  # noqa: E731
    want = (
        b"\x02\x00\x00\x00\x02"
        + be64(0x1000 | FLAG_PAGE) + counted(b"pc.ram") + pg(d0, 1)
        + be64(0x2000 | FLAG_PAGE | FLAG_CONT) + pg(d0, 2)
        + be64(0x5000 | FLAG_PAGE | FLAG_CONT) + pg(d0, 5)
        + be64(0x0000 | FLAG_PAGE) + counted(b"rom") + pg(d1, 0)
        + be64(0x0000 | FLAG_ZERO) + counted(b"pc.ram") + b"\0"
        + be64(0x3000 | FLAG_ZERO | FLAG_CONT) + b"\0"
        + be64(0x4000 | FLAG_ZERO | FLAG_CONT) + b"\0"
        + be64(0x6000 | FLAG_ZERO | FLAG_CONT) + b"\0"
        + be64(0x7000 | FLAG_ZERO | FLAG_CONT) + b"\0"
        + be64(0x1000 | FLAG_ZERO) + counted(b"rom") + b"\0"
        + be64(0x2000 | FLAG_ZERO | FLAG_CONT) + b"\0"
        + be64(0x3000 | FLAG_ZERO | FLAG_CONT) + b"\0"
        + be64(FLAG_EOS)
    )
    assert_same(read_all(out), want, "read_all(out)")
    assert (em.pages, em.zero_pages, em.bytes_out) == (4, 8, len(want))
    assert em.last_block == 1


def test_continue_state_spans_calls_and_can_be_reset(out, two_blocks):
    blocks, d0, _ = two_blocks
    em = _core.PageEmitter(out.fileno(), PAGE)
    em.set_blocks(blocks)
    em.cluster(0, 0, d0[:2 * PAGE])     # page 1
    em.cluster(0, 2 * PAGE, d0[2 * PAGE:])  # pages 2, 5: CONTINUE
    em.last_block = -1
    em.zero_range(0, 3, 4)              # page 3: idstr again after the reset
    em.flush()
    got = read_all(out)
    rec2 = got[8 + 7 + PAGE:]
    assert rec2[:8] == be64(0x2000 | FLAG_PAGE | FLAG_CONT)
    assert got.endswith(be64(0x3000 | FLAG_ZERO) + counted(b"pc.ram") + b"\0")


def test_cluster_past_the_block_end_and_partial_last_cluster(out):
    bm, cs, d = make_block(3, [0, 2], 5)
    em = _core.PageEmitter(out.fileno(), PAGE)
    em.set_blocks([("b", 0, 3 * PAGE, bm, cs)])
    cluster = d + bytes(5 * PAGE)            # an 8-page cluster, block has 3 pages
    em.cluster(0, 0, cluster)
    em.cluster(0, 8 * PAGE, bytes(8 * PAGE))  # entirely past the end: nothing
    assert em.pages == 2
    assert len(read_all(out)) == 2 * (8 + PAGE) + 2


def test_checksum_mismatch_stops_before_the_bad_page(out, two_blocks):
    blocks, d0, _ = two_blocks
    em = _core.PageEmitter(out.fileno(), PAGE)
    em.set_blocks(blocks)
    em.bytes(b"HEAD")
    em.flush()
    bad = bytearray(d0)
    bad[5 * PAGE + 100] ^= 0x40
    em.bytes(b"\x02\x00\x00\x00\x02")
    with pytest.raises(ChecksumError, match=r"block 'pc.ram' page 0x5000"):
        em.cluster(0, 0, bytes(bad))
    # nothing of the cluster went out, not even its good pages 1 and 2
    assert read_all(out) == b"HEAD"
    assert em.pages == 0


def test_emitted_data_is_not_copied_but_written_whole(out):
    # a full 1 MiB cluster of stored pages goes out in one flush
    n = 256
    bm, cs, d = make_block(n, range(n), 9)
    em = _core.PageEmitter(out.fileno(), PAGE)
    em.set_blocks([("pc.ram", 0, n * PAGE, bm, cs)])
    em.cluster(0, 0, d)
    got = read_all(out)
    assert len(got) == n * (8 + PAGE) + 7
    assert em.writes == 1
    for p in range(n):
        start = p * (8 + PAGE) + 7 + 8
        assert_same(got[start:start + PAGE], d[p * PAGE:(p + 1) * PAGE], "got[start:start + PAGE]")


def test_large_zero_range_in_bulk(out):
    n = 200_000
    bm = np.zeros((n + 7) // 8, np.uint8)
    bm[10] = 0xFF                            # pages 80..87 stored
    em = _core.PageEmitter(out.fileno(), PAGE)
    em.set_blocks([("pc.ram", 0, n * PAGE, bm, np.zeros(n, np.uint32))])
    em.zero_range(0)
    em.flush()
    got = read_all(out)
    assert em.zero_pages == n - 8
    assert len(got) == 8 + 7 + 1 + (n - 9) * 9
    words = [got[15 + 1 + i * 9:15 + 1 + i * 9 + 8] for i in (78, 79)]
    assert words == [be64(79 * PAGE | FLAG_ZERO | FLAG_CONT), be64(88 * PAGE | FLAG_ZERO | FLAG_CONT)]
    assert em.writes < 20


def test_epipe_is_a_clean_io_failure(two_blocks):
    blocks, d0, _ = two_blocks
    r, w = os.pipe()
    os.close(r)
    try:
        em = _core.PageEmitter(w, PAGE)
        em.set_blocks(blocks)
        with pytest.raises(IOFailure, match="EPIPE"):
            em.cluster(0, 0, d0)
    finally:
        os.close(w)


def test_nonblocking_pipe_partial_writes_and_eagain():
    n = 1024                                  # 4 MiB of pages through a 64 KiB pipe
    bm, cs, d = make_block(n, range(n), 11)
    r, w = os.pipe()
    fl = fcntl.fcntl(w, fcntl.F_GETFL)
    fcntl.fcntl(w, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    got = bytearray()

    def drain():
        while True:
            b = os.read(r, 7000)              # odd sizes: the writer sees partial writes
            if not b:
                return
            got.extend(b)

    t = threading.Thread(target=drain)
    t.start()
    try:
        em = _core.PageEmitter(w, PAGE)
        em.set_blocks([("pc.ram", 0, n * PAGE, bm, cs)])
        for c in range(0, n, 256):
            em.cluster(0, c * PAGE, d[c * PAGE:(c + 256) * PAGE])
    finally:
        os.close(w)
        t.join()
        os.close(r)
    assert len(got) == n * (8 + PAGE) + 7
    assert_same(got[15:15 + PAGE], d[:PAGE], "got[15:15 + PAGE]")
    assert_same(got[-PAGE:], d[-PAGE:], "got[-PAGE:]")


def test_bad_arguments(out, two_blocks):
    blocks, d0, _ = two_blocks
    em = _core.PageEmitter(out.fileno(), PAGE)
    em.set_blocks(blocks)
    with pytest.raises(ValueError):
        em.cluster(0, 100, d0)                # not page aligned
    with pytest.raises(ValueError):
        em.cluster(1, 0, d0)                  # before the block's region
    with pytest.raises(IndexError):
        em.cluster(2, 0, d0)
    with pytest.raises(ValueError):
        em.set_blocks([("x" * 256, 0, PAGE, np.zeros(1, np.uint8), np.zeros(1, np.uint32))])
    with pytest.raises(ValueError):
        em.set_blocks([("x", 0, 16 * PAGE, np.zeros(1, np.uint8), np.zeros(16, np.uint32))])


def test_send_clusters_reads_in_host_order_and_frames_sections(tmp_path, out):
    cs_size = 64 * 1024
    ppc = cs_size // PAGE
    n_pages = 6 * ppc
    stored = [p for p in range(n_pages) if p % 3 != 1]
    bm, cs, d = make_block(n_pages, stored, 21)
    # image file: cluster k of the block at host slot order[k]
    order = [4, 0, 5, 2, 1, 3]
    img = bytearray(7 * cs_size)
    for k, slot in enumerate(order):
        img[(slot + 1) * cs_size:(slot + 2) * cs_size] = d[k * cs_size:(k + 1) * cs_size]
    path = tmp_path / "img"
    path.write_bytes(bytes(img))
    host = np.array([(slot + 1) * cs_size for slot in order], np.uint64)
    virt = np.array([(1 << 20) + k * cs_size for k in range(6)], np.uint64)
    by_host = np.argsort(host)
    fd = os.open(path, os.O_RDONLY)
    try:
        em = _core.PageEmitter(out.fileno(), PAGE)
        em.set_blocks([("pc.ram", 1 << 20, n_pages * PAGE, bm, cs)])
        parts = em.send_clusters(fd, host[by_host], virt[by_host], np.zeros(6, np.uint32), cs_size,
                                 b"<", b">", part_bytes=2 * cs_size, buf_size=128 * 1024,
                                 n_bufs=3, n_threads=2)
    finally:
        os.close(fd)
    got = read_all(out)
    assert parts >= 2
    # parse: '<' records... '>' repeated
    pos, seen, sections, cont = 0, [], 0, False
    while pos < len(got):
        assert got[pos:pos + 1] == b"<"
        pos += 1
        sections += 1
        while got[pos:pos + 1] != b">":
            word = struct.unpack(">Q", got[pos:pos + 8])[0]
            pos += 8
            flags = word & 0xFFF
            assert flags & ~FLAG_CONT == FLAG_PAGE
            assert bool(flags & FLAG_CONT) == cont
            if not cont:
                assert got[pos:pos + 7] == counted(b"pc.ram")
                pos += 7
                cont = True
            p = (word & ~0xFFF) // PAGE
            assert_same(got[pos:pos + PAGE], d[p * PAGE:(p + 1) * PAGE], "got[pos:pos + PAGE]")
            pos += PAGE
            seen.append(p)
        pos += 1
    assert_same(sections, parts, "section records")
    assert_same(sorted(seen), stored, "sorted(seen)")
    # clusters come in host order: cluster at host slot 0 (k=1) first
    assert seen[0] // ppc == 1


def test_large_raw_bytes_keep_their_order(out):
    em = _core.PageEmitter(out.fileno(), PAGE)
    big = bytes(range(256)) * 4096                # 1 MiB: written directly, after the queue
    em.bytes(b"abc")
    em.bytes(big)
    em.bytes(b"xyz")
    em.flush()
    assert read_all(out) == b"abc" + big + b"xyz"
    assert em.bytes_out == len(big) + 6


def test_load_path_takes_plain_buffers_without_numpy(tmp_path):
    """The read-ahead ring, windowed state and ZERO records with array.array,
    bytearray and memoryview in a process where importing NumPy fails: the
    same bytes as with NumPy arrays (2-D state rows) here."""
    import _emit_plain as ep

    ppc = ep.CLUSTER // PAGE
    n_pages = 6 * ppc - 3                          # a partial last cluster
    stored = [p for p in range(n_pages) if p % 3 != 1 and p // ppc != 2]
    bm, cs, d = make_block(n_pages, stored, 7)
    order = [3, 0, 4, 1, 2]                        # cluster 2 has no stored page: not in the image
    clusters = [0, 1, 3, 4, 5]
    img = bytearray((len(order) + 1) * ep.CLUSTER)
    for k, slot in zip(clusters, order):
        piece = d[k * ep.CLUSTER:(k + 1) * ep.CLUSTER]
        img[(slot + 1) * ep.CLUSTER:(slot + 1) * ep.CLUSTER + len(piece)] = piece
    (tmp_path / "img").write_bytes(bytes(img))
    by_host = sorted(range(len(order)), key=lambda i: order[i])
    case = {"image": str(tmp_path / "img"), "n_pages": n_pages, "bitmap": bm.tobytes().hex(),
            "crcs": [int(c) for c in cs], "window_pages": _core.state_window_pages(ppc),
            "host": [(order[i] + 1) * ep.CLUSTER for i in by_host],
            "virt": [ep.REGION + clusters[i] * ep.CLUSTER for i in by_host]}
    (tmp_path / "case.json").write_text(json.dumps(case))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, ep.__file__, str(tmp_path / "case.json"), str(tmp_path / "plain")],
                       env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    plain = json.loads(r.stdout)

    host, virt, blk, state, window, extents = ep.plain_inputs(case)

    def np_state(k0):                              # the reader's form: 2-D NumPy rows
        k1, bits, sums = state(k0)
        return k1, np.frombuffer(bits, np.uint8).reshape(k1 - k0, -1), np.array(sums, np.uint32).reshape(k1 - k0, -1)

    parts, ring_bytes = ep.run(case, tmp_path / "numpy", np.array(host, np.uint64), np.array(virt, np.uint64),
                               np.zeros(len(host), np.uint32), np_state, bm,
                               np.array(extents, np.uint64).reshape(-1, 2))
    got = (tmp_path / "plain").read_bytes()
    assert_same(got, (tmp_path / "numpy").read_bytes(), "plain-buffer stream")
    assert plain["parts"] == parts >= 2
    assert bytes.fromhex(plain["ring_bytes"]) == ring_bytes == bytes(img[ep.CLUSTER:])
    # PAGE records (the first with the idstr), then CONTINUE ZERO records, and "<" ">" per section
    assert len(got) == len(stored) * (8 + PAGE) + 7 + (n_pages - len(stored)) * 9 + 2 * parts


def _zero_records_reference(bitmap, first, end, state_first, idstr, cont):
    """ZERO records of the unstored pages in [first, end), one page at a time."""
    out = bytearray()
    for p in range(first, end):
        i = p - state_first
        if bitmap[i // 8] >> (i % 8) & 1:
            continue
        out += be64(p * PAGE | FLAG_ZERO | (FLAG_CONT if cont else 0))
        if not cont:
            out += counted(idstr)
            cont = True
        out += b"\0"
    return bytes(out)


@pytest.mark.parametrize("seed", range(4))
def test_zero_range_runs_byte_exact(out, seed):
    """Runs of unstored pages of every length (beyond one arena of records too),
    whole stored bytes and single stored pages, over a bitmap window."""
    rnd = random.Random(seed)
    n = 120_000
    bits = []
    while len(bits) < n:
        bits += [rnd.random() < 0.3] * rnd.choice([1, 2, 7, 8, 9, 63, 64, 65, 500, 40_000])
    bits = bits[:n]
    bm = bytearray((n + 7) // 8)
    for p, b in enumerate(bits):
        bm[p // 8] |= b << (p % 8)
    window_first = 8 * rnd.randrange(1, 100)
    end = n - rnd.randrange(0, 20)
    em = _core.PageEmitter(out.fileno(), PAGE)
    em.set_blocks([("pc.ram", 0, n * PAGE, None, None)])
    em.zero_range(0, window_first, end, bitmap=bm[window_first // 8:])     # a window of the state
    em.flush()
    want = _zero_records_reference(bm[window_first // 8:], window_first, end, window_first, b"pc.ram", False)
    assert_same(read_all(out), want, "ZERO records of a window")
    assert em.zero_pages == bits[window_first:end].count(False)

    first = rnd.randrange(0, 100)                                          # the block's own state
    em.set_blocks([("pc.ram", 0, n * PAGE, bm, np.zeros(n, np.uint32))])
    out.seek(0)
    out.truncate()
    em.zero_range(0, first, end)
    em.flush()
    want = _zero_records_reference(bm, first, end, 0, b"pc.ram", False)
    assert_same(read_all(out), want, "ZERO records of a block")
