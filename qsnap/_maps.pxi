# Cluster maps of the image reader without NumPy: the loops over qcow2 tables and
# cluster lists that `qsnap load` runs before its first byte (qsnap.image.reader,
# .chain, .pages).  Arrays in and out are array.array ("Q" uint64, "I" uint32)
# or any buffer of those items (_c_array); masks are bytearrays of 0/1.

from libc.stdlib cimport malloc as _malloc, qsort as _qsort


cdef inline uint64_t _be64(const uint8_t *p) noexcept nogil:
    return ((<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) | (<uint64_t>p[2] << 40)
            | (<uint64_t>p[3] << 32) | (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16)
            | (<uint64_t>p[6] << 8) | <uint64_t>p[7])


cdef object _u64_array(Py_ssize_t n):
    """A zero-filled array('Q') of n items."""
    return _array("Q", bytes(8 * n))


def be64_nonzero(buf):
    """(indexes, values): array('Q') of the non-zero entries of a table of big-endian
    u64 (a qcow2 L1 or refcount table), values in native order."""
    cdef const uint8_t[::1] b = _c_array(buf, "B", "table")
    cdef Py_ssize_t n = b.shape[0] // 8, i, m = 0
    cdef uint64_t v
    for i in range(n):
        if _be64(&b[8 * i]):
            m += 1
    idx, vals = _u64_array(m), _u64_array(m)
    cdef uint64_t[::1] iv = idx, vv = vals
    m = 0
    for i in range(n):
        v = _be64(&b[8 * i])
        if v:
            iv[m] = i
            vv[m] = v
            m += 1
    return idx, vals


def l2_scan(buf, uint64_t compressed_flag, uint64_t reserved_mask, uint64_t zero_flag,
            uint64_t offset_mask, bint zero_flag_entries, uint64_t cluster_size, uint64_t file_size,
            uint64_t first_index=0):
    """One qcow2 L2 table of big-endian entries, checked (qsnap.image.reader._read_l2 says
    what each check means): (mapped, hosts, zeros, bad).  ``mapped``/``hosts``: the
    indexes plus ``first_index`` (virtual clusters) and the host offsets of the mapped
    entries; ``zeros``: the same indexes of the bare zero-flag entries (with
    ``zero_flag_entries``; all array('Q')); ``bad``: the index of the first entry
    failing each check, in order (compressed, reserved or zero-flag bits, host
    offset), -1 where none does."""
    cdef const uint8_t[::1] b = _c_array(buf, "B", "L2 table")
    cdef Py_ssize_t n = b.shape[0] // 8, i, n_map = 0, n_zero = 0
    cdef Py_ssize_t bad_comp = -1, bad_bits = -1, bad_off = -1
    cdef uint64_t e, off
    for i in range(n):
        e = _be64(&b[8 * i])
        if not e:
            continue
        if e & compressed_flag and bad_comp < 0:
            bad_comp = i
        if zero_flag_entries and e == zero_flag:
            n_zero += 1
            continue
        if e & (reserved_mask | zero_flag) and bad_bits < 0:
            bad_bits = i
        off = e & offset_mask
        if (off == 0 or off % cluster_size or off > file_size - cluster_size) and bad_off < 0:
            bad_off = i
        n_map += 1
    mapped, hosts, zeros = _u64_array(n_map), _u64_array(n_map), _u64_array(n_zero)
    cdef uint64_t[::1] mv = mapped, hv = hosts, zv = zeros
    n_map = n_zero = 0
    for i in range(n):
        e = _be64(&b[8 * i])
        if not e:
            continue
        if zero_flag_entries and e == zero_flag:
            zv[n_zero] = first_index + i
            n_zero += 1
        else:
            mv[n_map] = first_index + i
            hv[n_map] = e & offset_mask
            n_map += 1
    return mapped, hosts, zeros, (bad_comp, bad_bits, bad_off)


cdef struct _KeyIdx:
    uint64_t key
    uint64_t idx


cdef int _cmp_key_idx(const void *a, const void *b) noexcept nogil:
    cdef const _KeyIdx *x = <const _KeyIdx *>a
    cdef const _KeyIdx *y = <const _KeyIdx *>b
    if x.key != y.key:
        return -1 if x.key < y.key else 1
    return -1 if x.idx < y.idx else (1 if x.idx > y.idx else 0)


def argsort_u64(keys):
    """array('Q'): the stable order of the uint64 ``keys`` (as NumPy's
    argsort(kind="stable"))."""
    cdef const uint64_t[::1] k = _c_array(keys, "Q", "sort keys")
    cdef Py_ssize_t n = k.shape[0], i
    order = _u64_array(n)
    if n == 0:
        return order
    cdef uint64_t[::1] ov = order
    cdef _KeyIdx *t = <_KeyIdx *>_malloc(n * sizeof(_KeyIdx))
    if t == NULL:
        raise _no_memory("a sort table", n * sizeof(_KeyIdx))
    try:
        with nogil:
            for i in range(n):
                t[i].key = k[i]
                t[i].idx = i
            _qsort(t, n, sizeof(_KeyIdx), _cmp_key_idx)
            for i in range(n):
                ov[i] = t[i].idx
    finally:
        _free(t)
    return order


def take(values, order):
    """values[order[0]], values[order[1]], ...: an array of the type of ``values``
    ("Q" or "I"), ``order`` any uint64 buffer of indexes (IndexError if one is out of range)."""
    cdef const uint64_t[::1] o = _c_array(order, "Q", "order")
    cdef Py_ssize_t n = o.shape[0], i
    cdef const uint64_t[::1] v64
    cdef const uint32_t[::1] v32
    cdef uint64_t[::1] r64
    cdef uint32_t[::1] r32
    if memoryview(values).itemsize == 8:
        v64 = _c_array(values, "Q", "values")
        out = _u64_array(n)
        r64 = out
        for i in range(n):
            if o[i] >= <uint64_t>v64.shape[0]:
                raise IndexError(f"index {o[i]} out of range")
            r64[i] = v64[o[i]]
        return out
    v32 = _c_array(values, "I", "values")
    out = _array("I", bytes(4 * n))
    if n:
        r32 = out
    for i in range(n):
        if o[i] >= <uint64_t>v32.shape[0]:
            raise IndexError(f"index {o[i]} out of range")
        r32[i] = v32[o[i]]
    return out


def in_sorted(values, sorted_values):
    """bytearray: 1 where an item of the uint64 ``values`` is in the ascending uint64
    ``sorted_values`` (binary search), else 0."""
    cdef const uint64_t[::1] v = _c_array(values, "Q", "values")
    cdef const uint64_t[::1] s = _c_array(sorted_values, "Q", "sorted values")
    cdef Py_ssize_t n = v.shape[0], m = s.shape[0], i, lo, hi, mid
    mask = bytearray(n)
    cdef uint8_t[::1] mk = mask
    for i in range(n):
        lo, hi = 0, m
        while lo < hi:
            mid = (lo + hi) // 2
            if s[mid] < v[i]:
                lo = mid + 1
            else:
                hi = mid
        mk[i] = lo < m and s[lo] == v[i]
    return mask


def region_of(values, starts, ends):
    """(inside, region): for each uint64 of ``values``, whether it lies in one of the
    half-open regions [starts[r], ends[r]) (``starts`` ascending, the regions
    disjoint), as a bytearray of 0/1, and the index r of the last region starting at
    or before it (array('Q'), 0 where none does)."""
    cdef const uint64_t[::1] v = _c_array(values, "Q", "values")
    cdef const uint64_t[::1] s = _c_array(starts, "Q", "region starts")
    cdef const uint64_t[::1] e = _c_array(ends, "Q", "region ends")
    cdef Py_ssize_t n = v.shape[0], m = s.shape[0], i, lo, hi, mid
    if e.shape[0] != m:
        raise ValueError("region starts and ends differ in length")
    inside = bytearray(n)
    region = _u64_array(n)
    if n == 0:
        return inside, region
    cdef uint8_t[::1] iv = inside
    cdef uint64_t[::1] rv = region
    for i in range(n):
        lo, hi = 0, m          # first start > v[i]
        while lo < hi:
            mid = (lo + hi) // 2
            if s[mid] <= v[i]:
                lo = mid + 1
            else:
                hi = mid
        if lo:
            rv[i] = lo - 1
            iv[i] = v[i] < e[lo - 1]
    return inside, region


def indexes_where(mask, bint value=True):
    """array('Q'): the indexes of the items of a 0/1 byte ``mask`` that are ``value``."""
    cdef const uint8_t[::1] mk = _c_array(mask, "B", "mask")
    cdef Py_ssize_t n = mk.shape[0], i, m = 0
    for i in range(n):
        m += (mk[i] != 0) == value
    out = _u64_array(m)
    if m == 0:
        return out
    cdef uint64_t[::1] ov = out
    m = 0
    for i in range(n):
        if (mk[i] != 0) == value:
            ov[m] = i
            m += 1
    return out


def shifted_left(values, unsigned bits):
    """array('Q'): each uint64 of ``values`` shifted left by ``bits`` (cluster index -> offset)."""
    cdef const uint64_t[::1] v = _c_array(values, "Q", "values")
    cdef Py_ssize_t n = v.shape[0], i
    out = _u64_array(n)
    if n == 0:
        return out
    cdef uint64_t[::1] ov = out
    for i in range(n):
        ov[i] = v[i] << bits
    return out


def first_repeat(sorted_values):
    """Index i of the first item of an ascending uint64 buffer equal to the one
    before it, -1 if none is."""
    cdef const uint64_t[::1] s = _c_array(sorted_values, "Q", "sorted values")
    cdef Py_ssize_t i
    for i in range(1, s.shape[0]):
        if s[i] == s[i - 1]:
            return i
    return -1
