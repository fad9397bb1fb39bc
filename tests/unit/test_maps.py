"""The image reader's cluster-map helpers in qsnap._core (_maps.pxi) against NumPy."""

import struct
from array import array

import numpy as np
import pytest

from qsnap import _core
from qsnap.image.qcow2 import L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO

CS = 1 << 16


def _rng_u64(n, high, seed):
    return np.random.default_rng(seed).integers(0, high, n, dtype=np.uint64)


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_argsort_take_and_repeats_match_numpy(n):
    keys = _rng_u64(n, 50, n)                       # many repeats: the order must be stable
    order = _core.argsort_u64(array("Q", keys.tolist()))
    assert order.typecode == "Q"
    assert list(order) == np.argsort(keys, kind="stable").tolist()
    srt = _core.take(array("Q", keys.tolist()), order)
    assert list(srt) == np.sort(keys).tolist()
    dup = np.flatnonzero(np.sort(keys)[1:] == np.sort(keys)[:-1])
    assert _core.first_repeat(srt) == (int(dup[0]) + 1 if len(dup) else -1)
    small = _core.take(array("I", range(n)), order)
    assert small.typecode == "I" and list(small) == list(order)
    with pytest.raises(IndexError):
        _core.take(array("Q", [1, 2]), array("Q", [2]))


def test_in_sorted_region_of_indexes_where_shifted_left():
    values = _rng_u64(500, 1000, 1)
    table = np.unique(_rng_u64(100, 1000, 2))
    mask = _core.in_sorted(array("Q", values.tolist()), array("Q", table.tolist()))
    assert list(mask) == np.isin(values, table).astype(int).tolist()
    starts, ends = [10, 200, 600], [100, 300, 601]
    inside, region = _core.region_of(array("Q", values.tolist()), array("Q", starts), array("Q", ends))
    k = np.searchsorted(starts, values, side="right") - 1
    want = [(bool(j >= 0 and v < ends[j]), max(int(j), 0)) for v, j in zip(values, k)]
    assert list(zip(map(bool, inside), region)) == want
    assert list(_core.indexes_where(inside)) == np.flatnonzero(np.frombuffer(inside, np.uint8)).tolist()
    assert list(_core.indexes_where(inside, False)) == \
        np.flatnonzero(np.frombuffer(inside, np.uint8) == 0).tolist()
    assert list(_core.shifted_left(array("Q", [0, 1, 3]), 20)) == [0, 1 << 20, 3 << 20]
    with pytest.raises(ValueError):
        _core.region_of(array("Q"), array("Q", [1]), array("Q"))


def test_be64_nonzero():
    raw = struct.pack(">5Q", 0, 7, 0, 1 << 63, 0)
    idx, vals = _core.be64_nonzero(raw)
    assert list(idx) == [1, 3] and list(vals) == [7, 1 << 63]


def _scan(entries, zero_flag_entries=True, file_size=16 * CS, first=0):
    return _core.l2_scan(struct.pack(f">{len(entries)}Q", *entries), QCOW_OFLAG_COMPRESSED,
                         L2E_STD_RESERVED_MASK, QCOW_OFLAG_ZERO, L2E_OFFSET_MASK, zero_flag_entries, CS,
                         file_size, first)


def test_l2_scan_maps_and_zero_flags():
    copied = 1 << 63
    mapped, hosts, zeros, bad = _scan([0, 3 * CS | copied, QCOW_OFLAG_ZERO, 0, 5 * CS], first=100)
    assert (list(mapped), list(hosts), list(zeros), bad) == ([101, 104], [3 * CS, 5 * CS], [102], (-1, -1, -1))


@pytest.mark.parametrize("entries, zero_ok, want", [
    ([0, CS, 1 << 62 | 2 * CS], True, (2, -1, -1)),          # compressed
    ([CS, 2 * CS | 2], True, (-1, 1, -1)),                   # a reserved bit
    ([QCOW_OFLAG_ZERO], False, (-1, 0, 0)),                   # format 1 has no zero flag (nor host offset)
    ([CS | QCOW_OFLAG_ZERO], True, (-1, 0, -1)),              # zero flag with a host offset
    ([CS, CS + 512], True, (-1, -1, 1)),                     # unaligned
    ([16 * CS], True, (-1, -1, 0)),                          # past the file's end
    ([1 << 62 | CS, 2 * CS | 2, 3 * CS + 512], True, (0, 1, 2)),   # the first of each kind
])
def test_l2_scan_finds_the_first_bad_entry_of_each_kind(entries, zero_ok, want):
    assert _scan(entries, zero_ok)[3] == want
