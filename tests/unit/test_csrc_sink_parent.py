"""The page sink's parent mode (csrc/sink.h): a child stores only the clusters
whose content differs from its parent chain's; the rest are INHERITED or ZERO."""
import os
import random

import numpy as np
import pytest

from qsnap import _core
from qsnap.errors import IOFailure

from bigcmp import assert_same

PS = 4096
CS = 1 << 16
CP = CS // PS
ZERO, INHERIT = _core.HOST_ZERO, _core.HOST_INHERIT


class Chain:
    """Parent files holding a model's clusters at shuffled host offsets: the
    sources a child's sink gets (virt, src, host) and the chain's content."""

    def __init__(self, tmp_path, vsize, levels, rnd):
        self.vsize = vsize
        self.content = bytearray(vsize)
        self.fds, self.paths = [], []
        rows = {}
        for lvl, clusters in enumerate(levels):   # levels[0]: the nearest parent
            path = tmp_path / f"parent{lvl}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            order = list(clusters)
            rnd.shuffle(order)
            for k, (c, data) in enumerate(order):
                host = (k + 1) * CS
                os.pwrite(fd, data, host)
                if c not in rows:   # a nearer level hides a farther one
                    rows[c] = (lvl, host)
                    self.content[c * CS:(c + 1) * CS] = data
            self.fds.append(fd)
            self.paths.append(str(path))
        virt = sorted(rows)
        self.virt = np.array(virt, np.uint64)
        self.src = np.array([rows[c][0] for c in virt], np.uint32)
        self.host = np.array([rows[c][1] for c in virt], np.uint64)

    def attach(self, sink):
        sink.set_parent(self.fds, self.virt, self.src, self.host, self.paths)

    def close(self):
        for fd in self.fds:
            os.close(fd)


def child_sink(tmp_path, vsize, n_slots=4, **kw):
    path = tmp_path / "child"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, bytes(CS), 0)
    sink = _core.ClusterSink(fd, vsize, cluster_size=CS, n_slots=n_slots, path=str(path),
                             region_offsets=[0], block_lengths=[vsize], **kw)
    return path, fd, sink


def child_content(path, hm, chain):
    """What a qcow2 reader sees through the child: its own clusters, zero
    clusters, the chain's for the rest."""
    out = bytearray(chain.vsize)
    with open(path, "rb") as f:
        for c, h in enumerate(hm.tolist()):
            if h >= CS:
                f.seek(h)
                out[c * CS:(c + 1) * CS] = f.read(CS)
            elif h == ZERO:
                pass
            else:
                out[c * CS:(c + 1) * CS] = chain.content[c * CS:(c + 1) * CS]
    return out


def random_page(rnd):
    page = bytearray(PS)
    page[:8] = rnd.getrandbits(64).to_bytes(8, "little")
    page[rnd.randrange(PS)] = rnd.randrange(1, 256)
    return bytes(page)


def parent_levels(rnd, n_clusters, n_levels):
    """Per level, some clusters with a mix of data and zero pages."""
    levels = []
    for _ in range(n_levels):
        clusters = []
        for c in rnd.sample(range(n_clusters), n_clusters // 2):
            data = b"".join(random_page(rnd) if rnd.random() < 0.7 else bytes(PS)
                            for _ in range(CP))
            clusters.append((c, data))
        levels.append(clusters)
    return levels


def check_state(sink, model, npages):
    bm = np.unpackbits(sink.nonzero_bitmap(), bitorder="little")[:npages]
    crcs = sink.checksums()
    for p in range(npages):
        page = bytes(model[p * PS:(p + 1) * PS])
        assert bm[p] == (page != bytes(PS)), p
        assert crcs[p] == (_core.crc32c(page) if bm[p] else 0), p


@pytest.mark.parametrize("n_slots,n_levels,spill", [(1, 1, False), (4, 2, False), (3, 3, True)])
def test_child_reads_as_the_stream_through_the_chain(tmp_path, n_slots, n_levels, spill):
    """Random puts (the parent's page, a changed page, zeros, fill) in random
    order, some pages sent twice, some never: through the chain the child reads
    as the stream (last write wins, unsent pages zero), the stored bits and
    checksums describe that whole content, and only clusters that changed are
    written."""
    rnd = random.Random(n_slots * 10 + n_levels)
    n_clusters = 24
    vsize = n_clusters * CS
    npages = vsize // PS
    chain = Chain(tmp_path, vsize, parent_levels(rnd, n_clusters, n_levels), rnd)
    path, fd, sink = child_sink(tmp_path, vsize, n_slots,
                                spill_dir=str(tmp_path) if spill else None)
    chain.attach(sink)
    model = bytearray(vsize)
    changed = rnd.sample(range(n_clusters), 6)   # the only clusters whose content changes
    unsent = set(rnd.sample(range(n_clusters), 3)) - set(changed)
    order = [p for p in range(npages) if p // CP not in unsent]
    order += rnd.sample(order, len(order) // 4)   # re-sends (live precopy)
    rnd.shuffle(order)
    for step, p in enumerate(order):
        parent_page = bytes(chain.content[p * PS:(p + 1) * PS])
        if p // CP in changed and rnd.random() < 0.3:
            r = rnd.random()
            if r < 0.4:
                page = random_page(rnd)
            elif r < 0.7:
                page = bytes(PS)
            else:
                page = b"\x5a" * PS
        else:
            page = parent_page
        if page == bytes(PS):
            sink.put_page(p * PS, None)
        elif page == b"\x5a" * PS:
            sink.put_page(p * PS, None, fill=0x5a)
        else:
            sink.put_page(p * PS, page)
        model[p * PS:(p + 1) * PS] = page
        if step % 97 == 0:
            q = rnd.choice(order[:step + 1])
            assert sink.get_page(q * PS) == bytes(model[q * PS:(q + 1) * PS]), q
    sink.flush()
    hm = sink.host_map()
    assert_same(child_content(path, hm, chain), model, "child through the chain")
    check_state(sink, model, npages)
    parent_has = set(chain.virt.tolist())
    for c in range(n_clusters):
        mine = bytes(model[c * CS:(c + 1) * CS])
        theirs = bytes(chain.content[c * CS:(c + 1) * CS])
        if c not in changed and c not in unsent and c in parent_has:
            assert hm[c] == INHERIT, (c, hm[c])   # as the parent has it: not written
        if c in unsent and c in parent_has and theirs != bytes(CS):
            assert hm[c] == ZERO, (c, hm[c])
        if mine != theirs and mine == bytes(CS):
            assert hm[c] in (ZERO, 0), (c, hm[c])
    assert sink.clusters_written == np.count_nonzero(hm >= CS)
    assert sink.clusters_written <= len(changed)
    sink.close()
    os.close(fd)
    chain.close()


def test_inherited_and_zero_clusters_reopen(tmp_path):
    """With one slot every cluster is closed before its pages all arrive: an
    INHERITED cluster reopens from the parent, a ZERO one from zeros, and a
    page changed and changed back is written (conservative), never inherited
    wrongly.  A cluster evicted as the parent's with pages missing that never
    come is written at the flush, those pages zero."""
    rnd = random.Random(5)
    vsize = 5 * CS
    data = [b"".join(random_page(rnd) for _ in range(CP)) for _ in range(5)]
    chain = Chain(tmp_path, vsize, [list(enumerate(data))], rnd)
    path, fd, sink = child_sink(tmp_path, vsize, n_slots=1)
    chain.attach(sink)
    model = bytearray(vsize)

    def put(c, i, page):
        sink.put_page((c * CP + i) * PS, page if page != bytes(PS) else None)
        model[(c * CP + i) * PS:(c * CP + i + 1) * PS] = page

    def parent(c, i):
        return data[c][i * PS:(i + 1) * PS]

    for i in range(CP // 2):          # cluster 0: first half as the parent's
        put(0, i, parent(0, i))
    for i in range(CP // 2):          # cluster 4: likewise, the rest never comes
        put(4, i, parent(4, i))
    put(1, 0, bytes(PS))              # cluster 1: one page zeroed, then closed
    for i in range(CP // 2, CP):      # cluster 0 reopens (it was INHERITED so far)
        put(0, i, parent(0, i))
    for i in range(1, CP):            # cluster 1 reopens with its own data
        put(1, i, parent(1, i))
    changed = random_page(rnd)        # cluster 2: changed, then changed back
    put(2, 3, changed)
    for i in range(CP):
        put(2, i, parent(2, i))
    for i in range(CP):               # cluster 3: all zero -> ZERO
        put(3, i, bytes(PS))
    sink.flush()
    hm = sink.host_map()
    assert hm[0] == INHERIT
    assert hm[1] >= CS
    assert hm[2] >= CS
    assert hm[3] == ZERO
    assert hm[4] >= CS
    assert_same(child_content(path, hm, chain), model, "child through the chain")
    check_state(sink, model, vsize // PS)
    counters = sink.counters()
    assert counters["clusters_zeroed"] == 2   # cluster 1 when evicted, cluster 3
    assert counters["parent_bytes_read"] >= 4 * CS
    sink.close()
    os.close(fd)
    chain.close()


def test_xbzrle_against_an_inherited_page(tmp_path):
    """XBZRLE decodes against the page's current content, which may be the
    parent's (an INHERITED cluster, no longer open)."""
    rnd = random.Random(9)
    vsize = 3 * CS
    data = [b"".join(random_page(rnd) for _ in range(CP)) for _ in range(3)]
    chain = Chain(tmp_path, vsize, [list(enumerate(data))], rnd)
    path, fd, sink = child_sink(tmp_path, vsize, n_slots=1)
    chain.attach(sink)
    for p in range(CP):
        sink.put_page(p * PS, data[0][p * PS:(p + 1) * PS])
    sink.put_page(CP * PS, data[1][:PS])   # evicts cluster 0 (INHERITED, complete)
    assert sink.get_page(5 * PS) == data[0][5 * PS:6 * PS]
    sink.close()
    os.close(fd)
    chain.close()


def test_truncated_parent_is_an_error_naming_it(tmp_path):
    rnd = random.Random(3)
    vsize = 2 * CS
    chain = Chain(tmp_path, vsize, [[(1, random_page(rnd) * CP)]], rnd)
    os.ftruncate(chain.fds[0], CS + CS // 2)
    path, fd, sink = child_sink(tmp_path, vsize)
    chain.attach(sink)
    with pytest.raises(IOFailure, match=r"reading the parent image .*parent0 at offset 0x18000"):
        sink.put_page(CS, bytes(PS))
    sink.close()
    os.close(fd)
    chain.close()


def test_set_parent_rejects_bad_rows(tmp_path):
    vsize = 2 * CS
    path, fd, sink = child_sink(tmp_path, vsize)
    u64, u32 = np.uint64, np.uint32
    with pytest.raises(ValueError, match="row 0"):
        sink.set_parent([fd], np.array([2], u64), np.array([0], u32), np.array([CS], u64), ["p"])
    with pytest.raises(ValueError, match="row 0"):
        sink.set_parent([fd], np.array([0], u64), np.array([1], u32), np.array([CS], u64), ["p"])
    with pytest.raises(ValueError, match="row 1"):
        sink.set_parent([fd], np.array([0, 0], u64), np.array([0, 0], u32),
                        np.array([CS, CS], u64), ["p"])
    sink.put_page(0, None)
    with pytest.raises(ValueError, match="after the first page"):
        sink.set_parent([fd], np.array([0], u64), np.array([0], u32), np.array([CS], u64), ["p"])
    sink.close()
    os.close(fd)
