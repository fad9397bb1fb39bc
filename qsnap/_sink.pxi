# Page sink, zero detection and checksum bindings (image side).
#
# C status codes from csrc/sink.c become qsnap.errors exceptions in
# _sink_error() (_errors.pxi) and nowhere else.

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.string cimport memcpy, memset

# The sink takes the parser's records as they are (qs_sink_rec is qs_page_rec);
# their dtype (_core.SINK_REC_DTYPE) is NumPy's, made on first use.
cdef object _sink_rec_dtype():
    dt = _page_rec_dtype()
    assert dt.itemsize == sizeof(qs_sink_rec) == 32
    return dt


def is_zero(buf):
    """True if every byte of ``buf`` (any contiguous buffer) is zero."""
    cdef Py_buffer view
    cdef int r
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            r = qs_is_zero(view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return bool(r)


def crc32c(buf, uint32_t crc=0):
    """crc32c (Castagnoli) of ``buf``, continuing from ``crc`` (0 to start)."""
    cdef Py_buffer view
    cdef uint32_t r
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            r = qs_crc32c(crc, view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return r


def crc32c_sw(buf, uint32_t crc=0):
    """The portable (slicing-by-8) crc32c, for comparison with :func:`crc32c`."""
    cdef Py_buffer view
    cdef uint32_t r
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            r = qs_crc32c_sw(crc, view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return r


def crc32c_hw_available():
    """True if crc32c() uses the SSE4.2 crc32 instruction on this CPU."""
    return bool(qs_crc32c_hw_available())


def page_crcs(buf, size_t page_size=4096):
    """NumPy uint32 array: the crc32c of each ``page_size`` page of ``buf``."""
    cdef Py_buffer view
    if page_size == 0:
        raise ValueError("page_size must be > 0")
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if <size_t>view.len % page_size:
            raise ValueError(f"buffer length {view.len} is not a multiple of the page size {page_size}")
        n = <size_t>view.len // page_size
        out = _np.zeros(n, dtype='<u4')
        _crc_pages_into(view.buf, n, page_size, out)
    finally:
        PyBuffer_Release(&view)
    return out


cdef int _crc_pages_into(const void *buf, size_t n, size_t page_size, object out) except -1:
    cdef uint32_t[::1] o = out
    if n:
        with nogil:
            qs_crc32c_pages(buf, n, page_size, &o[0])
    return 0


cdef class ClusterSink:
    """Collects RAM pages into whole clusters of an image file (csrc/sink.c).

    ``fd`` is open read-write (with O_DIRECT when ``direct``); data clusters
    are appended from ``append_offset``. ``region_offsets``/``block_lengths``
    describe the blocks records refer to; ``block_names`` (idstrs) and
    ``path`` only make error messages readable.  ``spill_dir``: where the
    page-state spill file (an anonymous temporary file) goes, so that at
    most a few MiB of per-page state stay in memory; None keeps it all in
    memory (allocated as pages arrive).
    """
    cdef qs_sink *_s
    cdef readonly str path
    cdef readonly object block_names
    cdef readonly uint64_t virtual_size
    cdef readonly uint32_t cluster_size
    cdef readonly uint32_t page_size
    cdef object _region_offsets
    cdef object _spill
    cdef _Interrupt _intr

    def __cinit__(self, int fd, uint64_t virtual_size, *, uint32_t cluster_size=1 << 20,
                  uint32_t page_size=4096, uint32_t n_slots=32, append_offset=None,
                  bint direct=False, region_offsets=None, block_lengths=None,
                  block_names=None, str path="<fd>", spill_dir=None):
        cdef uint64_t app = cluster_size if append_offset is None else append_offset
        cdef qs_sink_err err
        cdef int rc
        memset(&err, 0, sizeof(err))
        self._s = NULL
        self._intr = _Interrupt()
        rc = qs_sink_new(&self._s, fd, virtual_size, cluster_size, page_size, n_slots, app,
                         direct, &err)
        if rc == QS_SINK_EINVAL:
            raise ValueError(f"bad page sink parameter 0x{err.value:x}: fd {fd}, virtual size "
                             f"0x{virtual_size:x}, cluster size {cluster_size}, page size "
                             f"{page_size}, {n_slots} slots, append offset 0x{app:x}")
        if rc:
            raise _sink_error(&err, path, None, self._intr)
        qs_sink_set_intr(self._s, &self._intr.c)
        self._spill = None
        if spill_dir is not None:
            self._set_spill(spill_dir, path)
        self.path = path
        self.block_names = list(block_names) if block_names is not None else None
        self.virtual_size = virtual_size
        self.cluster_size = cluster_size
        self.page_size = page_size
        self._region_offsets = None
        if region_offsets is not None:
            offs = _as_exact(region_offsets, _np.uint64, "region_offsets")
            if block_lengths is None:
                raise ValueError("region_offsets needs block_lengths")
            lens = _as_exact(block_lengths, _np.uint64, "block_lengths")
            if offs.shape != lens.shape or offs.ndim != 1:
                raise ValueError("region_offsets and block_lengths differ in shape")
            self._set_blocks(offs, lens)
            self._region_offsets = offs

    cdef int _set_spill(self, spill_dir, str path) except -1:
        import tempfile
        cdef qs_sink_err err
        memset(&err, 0, sizeof(err))
        try:
            self._spill = tempfile.TemporaryFile(dir=spill_dir, prefix=".qsnap-state-")
        except OSError as e:
            raise _IOFailure(f"{_strerror(e.errno or 0)} creating the page-state spill file "
                             f"of {path} in {spill_dir}") from None
        if qs_sink_set_spill(self._s, self._spill.fileno(), &err):
            raise _sink_error(&err, path, None, self._intr)
        return 0

    cdef int _set_blocks(self, object offs, object lens) except -1:
        cdef const uint64_t[::1] o = offs
        cdef const uint64_t[::1] l = lens
        cdef qs_sink_err err
        cdef int rc
        if o.shape[0] == 0:
            return 0
        if o.shape[0] > 0xffffffff:
            raise ValueError(f"{o.shape[0]} blocks, more than a sink takes")
        memset(&err, 0, sizeof(err))
        rc = qs_sink_set_blocks(self._s, &o[0], &l[0], <uint32_t>o.shape[0], &err)
        if rc == QS_SINK_EINVAL:
            raise ValueError(f"block {err.block} region at 0x{err.offset:x} (length 0x{err.value:x}) "
                             f"not cluster aligned or beyond the virtual size 0x{self.virtual_size:x}")
        if rc:
            raise _sink_error(&err, self.path, None, self._intr)
        return 0

    def __dealloc__(self):
        qs_sink_free(self._s)
        self._s = NULL

    cdef qs_sink *_live(self) except NULL:
        if self._s == NULL:
            raise ValueError("the page sink is closed")
        return self._s

    def close(self):
        """Stop the sink's writer threads and free the sink (idempotent).

        Writes not yet flushed are dropped; once this returns the sink no longer
        touches its fd, which may then be closed. Other methods then raise
        ValueError."""
        cdef qs_sink *s = self._s
        self._s = NULL
        with nogil:
            qs_sink_free(s)
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def put_batch(self, records, data, region_offsets=None):
        """Apply a batch of page records (PAGE_REC_DTYPE array) whose payloads are in ``data``."""
        cdef Py_buffer rv, dv
        cdef qs_sink_err err
        cdef int rc = 0
        cdef size_t n
        cdef const uint64_t *offp = NULL
        cdef const uint64_t[::1] offs
        cdef uint32_t nb = 0
        cdef qs_sink *s = self._live()
        if not isinstance(records, _np.ndarray) or records.dtype != _sink_rec_dtype():
            raise TypeError(f"records must be an array of the page-record dtype, not "
                            f"{getattr(records, 'dtype', type(records).__name__)}")
        records = _np.ascontiguousarray(records)
        n = records.shape[0]
        if n == 0:
            return
        if region_offsets is not None:
            offs = _as_exact(region_offsets, _np.uint64, "region_offsets")
            nb = <uint32_t>offs.shape[0]
            if nb:
                offp = &offs[0]
        elif self._region_offsets is None:
            raise ValueError("the sink has no block regions; pass region_offsets")
        memset(&err, 0, sizeof(err))
        PyObject_GetBuffer(records, &rv, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(data, &dv, PyBUF_SIMPLE)
            try:
                with nogil:
                    rc = qs_sink_put_batch(s, <const qs_sink_rec *>rv.buf, n,
                                           <const uint8_t *>dv.buf, <size_t>dv.len,
                                           offp, nb, &err)
            finally:
                PyBuffer_Release(&dv)
        finally:
            PyBuffer_Release(&rv)
        if rc:
            raise _sink_error(&err, self.path, self.block_names, self._intr)

    def put_page(self, uint64_t voff, data=None, int fill=0):
        """Put one page at virtual offset ``voff``: ``data`` (page_size bytes) or None for zero/fill."""
        cdef Py_buffer v
        cdef qs_sink_err err
        cdef int rc
        cdef qs_sink *s = self._live()
        memset(&err, 0, sizeof(err))
        err.block = 0xffffffff
        if data is None:
            with nogil:
                rc = qs_sink_put(s, voff, NULL, <uint8_t>fill, &err)
        else:
            PyObject_GetBuffer(data, &v, PyBUF_SIMPLE)
            try:
                if <size_t>v.len != self.page_size:
                    raise ValueError(f"page of {v.len} bytes, expected {self.page_size}")
                with nogil:
                    rc = qs_sink_put(s, voff, <const uint8_t *>v.buf, 0, &err)
            finally:
                PyBuffer_Release(&v)
        if rc:
            raise _sink_error(&err, self.path, None, self._intr)

    def get_page(self, uint64_t voff):
        """Current content of the page at ``voff`` (slot, file or zeros), as bytes."""
        cdef qs_sink_err err
        cdef int rc
        cdef qs_sink *s = self._live()
        out = bytearray(self.page_size)
        cdef uint8_t[::1] o = out
        memset(&err, 0, sizeof(err))
        err.block = 0xffffffff
        with nogil:
            rc = qs_sink_get(s, voff, &o[0], &err)
        if rc:
            raise _sink_error(&err, self.path, None, self._intr)
        return bytes(out)

    def flush(self):
        """Write every open cluster to the file; returns once every queued write is done."""
        cdef qs_sink_err err
        cdef int rc
        cdef qs_sink *s = self._live()
        memset(&err, 0, sizeof(err))
        err.block = 0xffffffff
        with nogil:
            rc = qs_sink_flush(s, &err)
        if rc:
            raise _sink_error(&err, self.path, None, self._intr)

    @property
    def n_clusters(self):
        return qs_sink_n_clusters(self._live())

    @property
    def n_pages(self):
        return qs_sink_n_pages(self._live())

    def host_map(self, first=0, n=None):
        """NumPy uint64 copy: host offset of virtual clusters first..first+n-1
        (all by default; 0 = unallocated)."""
        cdef qs_sink *s = self._live()
        cdef qs_sink_err err
        cdef int rc
        total = qs_sink_n_clusters(s)
        if n is None:
            n = total - first
        if first < 0 or n < 0 or first + n > total:
            raise ValueError(f"cluster range {first}+{n} outside 0..{total}")
        out = _np.zeros(n, dtype=_np.uint64)
        cdef uint64_t[::1] o = out
        cdef uint64_t f = first, k = n
        memset(&err, 0, sizeof(err))
        if k:
            with nogil:
                rc = qs_sink_read_hosts(s, f, k, &o[0], &err)
            if rc:
                raise _sink_error(&err, self.path, None, self._intr)
        return out

    def block_records(self):
        """NumPy uint64 copy: page records seen per block (ZERO, PAGE, XBZRLE)."""
        cdef const uint64_t *p = qs_sink_block_records(self._live())
        if p == NULL or self._region_offsets is None:
            return _np.zeros(0, dtype=_np.uint64)
        n = self._region_offsets.shape[0]
        out = _np.zeros(n, dtype=_np.uint64)
        cdef uint64_t[::1] o = out
        if n:
            memcpy(&o[0], p, <size_t>n * sizeof(uint64_t))
        return out

    def _page_range(self, first_page, n_pages):
        total = qs_sink_n_pages(self._live())
        if n_pages is None:
            n_pages = total - first_page
        if first_page < 0 or n_pages < 0 or first_page + n_pages > total:
            raise ValueError(f"page range {first_page}+{n_pages} outside 0..{total}")
        return first_page, n_pages

    def nonzero_bitmap(self, first_page=0, n_pages=None):
        """NumPy uint8 copy of the stored-page bitmap (LSB first) for a page range.

        ``first_page`` must be a multiple of 8; bits past ``n_pages`` are 0."""
        first_page, n_pages = self._page_range(first_page, n_pages)
        if first_page % 8:
            raise ValueError("first_page must be a multiple of 8")
        nbytes = (n_pages + 7) // 8
        out = _np.zeros(nbytes, dtype=_np.uint8)
        cdef uint8_t[::1] o = out
        if nbytes:
            self._read_pages(first_page, n_pages, &o[0], NULL)
            if n_pages % 8:
                out[-1] &= (1 << (n_pages % 8)) - 1
        return out

    cdef int _read_pages(self, uint64_t first, uint64_t n, uint8_t *bm, uint32_t *crcs) except -1:
        cdef qs_sink *s = self._live()
        cdef qs_sink_err err
        cdef int rc
        memset(&err, 0, sizeof(err))
        with nogil:
            rc = qs_sink_read_pages(s, first, n, bm, crcs, &err)
        if rc:
            raise _sink_error(&err, self.path, None, self._intr)
        return 0

    def checksums(self, first_page=0, n_pages=None):
        """NumPy little-endian uint32 copy of the page crcs for a page range."""
        first_page, n_pages = self._page_range(first_page, n_pages)
        lead = first_page % 8   # pages are read from a multiple of 8 on
        out = _np.zeros(n_pages + lead, dtype='<u4')
        cdef uint32_t[::1] o = out
        if n_pages:
            self._read_pages(first_page - lead, n_pages + lead, NULL, &o[0])
        return out[lead:]

    cdef qs_sink_stats _stats(self):
        cdef qs_sink_stats st
        qs_sink_get_stats(self._live(), &st)
        return st

    @property
    def pages_zero(self):
        return self._stats().pages_zero

    @property
    def pages_nonzero(self):
        return self._stats().pages_nonzero

    @property
    def clusters_written(self):
        return self._stats().clusters_written

    @property
    def page_rewrites(self):
        return self._stats().page_rewrites

    @property
    def bytes_written(self):
        return self._stats().bytes_written

    @property
    def append_offset(self):
        """Next free host offset; the file length once flushed."""
        return self._stats().append_offset

    def counters(self):
        st = self._stats()
        return {"pages_zero": st.pages_zero, "pages_nonzero": st.pages_nonzero,
                "clusters_written": st.clusters_written, "page_rewrites": st.page_rewrites,
                "bytes_written": st.bytes_written, "disk_wait_s": st.wait_ns / 1e9}
