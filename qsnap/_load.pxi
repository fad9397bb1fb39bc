# Read-ahead ring and RAM record emission bindings (load side).
#
# AioRing wraps csrc/aio.c (ordered pread read-ahead with worker threads);
# PageEmitter wraps csrc/emit.c (PAGE/ZERO records written with writev) and
# drives the ring over an image's data clusters with the GIL released per
# buffer.  C status codes become qsnap.errors exceptions in _aio_error and
# _emit_error (_errors.pxi) only.

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport calloc as _calloc, free as _free
from libc.string cimport memset as _memset

_lnp = _np   # NumPy on first use (_errors.pxi), for _postcopy.pxi: the load path needs none

AIO_DEFAULT_BUF_SIZE = 1 << 20
AIO_DEFAULT_BUFS = 8
AIO_DEFAULT_THREADS = 4

_EMPTY_CRCS = _array("I")


cdef class AioRing:
    """Ordered read-ahead over ``extents`` (rows of (offset, length)) of ``fd``.

    ``next()`` returns ``(offset, first_extent, n_extents, data)`` of the next
    read in order (``data`` is a copy) or None at the end; ``release()`` gives
    its buffer back.  Iterating does both.  ``close()`` cancels and joins.
    """

    cdef qs_aio *ring
    cdef bint holding
    cdef _Interrupt _intr

    def __cinit__(self, int fd, extents, size_t buf_size=AIO_DEFAULT_BUF_SIZE,
                  unsigned n_bufs=AIO_DEFAULT_BUFS, unsigned n_threads=AIO_DEFAULT_THREADS):
        self.ring = NULL
        self.holding = False
        self._intr = _Interrupt()
        cdef const uint64_t[::1] v = _c_array(extents, "Q", "extents")
        if v.shape[0] % 2:
            raise ValueError(f"extents: {v.shape[0]} numbers, not (offset, length) pairs")
        cdef size_t n = v.shape[0] // 2
        cdef const qs_extent *ext = <const qs_extent *>&v[0] if n else NULL
        cdef qs_aio_err err
        _memset(&err, 0, sizeof(err))
        cdef int rc
        with nogil:
            rc = qs_aio_open(&self.ring, fd, ext, n, buf_size, n_bufs, n_threads, &err)
        if rc != QS_AIO_OK:
            raise _aio_error(&err, self._intr)
        qs_aio_set_intr(self.ring, &self._intr.c)

    def __dealloc__(self):
        if self.ring != NULL:
            with nogil:
                qs_aio_close(self.ring)
            self.ring = NULL

    cdef int _check(self) except -1:
        if self.ring == NULL:
            raise ValueError("read-ahead ring is closed")
        return 0

    @property
    def n_reads(self):
        self._check()
        return qs_aio_n_reads(self.ring)

    def next(self):
        self._check()
        cdef qs_aio_chunk c
        cdef qs_aio_err err
        _memset(&err, 0, sizeof(err))
        cdef int rc
        _memset(&err, 0, sizeof(err))
        with nogil:
            rc = qs_aio_next(self.ring, &c, &err)
        if rc == QS_AIO_END:
            return None
        if rc != QS_AIO_OK:
            raise _aio_error(&err, self._intr)
        self.holding = True
        return (c.offset, c.first_extent, c.n_extents,
                PyBytes_FromStringAndSize(<const char *>c.data, c.length))

    def release(self):
        self._check()
        cdef qs_aio_err err
        _memset(&err, 0, sizeof(err))
        if qs_aio_release(self.ring, &err) != QS_AIO_OK:
            raise _aio_error(&err, self._intr)
        self.holding = False

    def __iter__(self):
        while True:
            item = self.next()
            if item is None:
                return
            self.release()
            yield item

    def cancel(self):
        if self.ring != NULL:
            with nogil:
                qs_aio_cancel(self.ring)

    def close(self):
        if self.ring != NULL:
            with nogil:
                qs_aio_close(self.ring)
            self.ring = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


cdef class PageEmitter:
    """PAGE/ZERO record writer to ``fd`` for the RAM blocks given to ``set_blocks``.

    Blocks are ``(idstr, region_offset, length, bitmap, checksums)``; the
    CONTINUE state is shared by every call, across sections.
    """

    cdef qs_emit em
    cdef bint live
    cdef qs_emit_block *blocks
    cdef Py_ssize_t n_blocks
    cdef unsigned long blocks_gen    # set_blocks calls: pagers check theirs is current
    cdef list _keep
    cdef readonly list names
    cdef _Interrupt intr

    def __cinit__(self, int fd, uint32_t page_size=4096):
        cdef qs_emit_err err
        _memset(&err, 0, sizeof(err))
        self.live = False
        self.blocks = NULL
        self.n_blocks = 0
        self._keep = []
        self.names = []
        self.intr = _Interrupt()
        if qs_emit_init(&self.em, fd, page_size, &err) != QS_EMIT_OK:
            qs_emit_free(&self.em)
            raise self._error(&err)
        qs_emit_set_intr(&self.em, &self.intr.c)
        self.live = True

    def __dealloc__(self):
        if self.live:
            qs_emit_free(&self.em)
        _free(self.blocks)

    cdef object _error(self, const qs_emit_err *e):
        return _emit_error(e, self.names, self.intr)

    @property
    def interrupt_check(self):
        """Called (with no arguments) while a write waits for the reader, after
        the signal handlers; what it raises ends the write.  None: no check."""
        return self.intr.check

    @interrupt_check.setter
    def interrupt_check(self, check):
        self.intr.check = check

    def set_blocks(self, blocks):
        cdef Py_ssize_t i, n = len(blocks)
        cdef uint64_t ps = self.em.page_size
        cdef size_t nbytes = (n if n else 1) * sizeof(qs_emit_block)
        cdef qs_emit_block *cb = <qs_emit_block *>_calloc(1, nbytes)
        cdef const uint8_t[::1] bm
        cdef const uint32_t[::1] cs
        cdef const uint8_t[::1] ids
        if cb == NULL:
            raise _no_memory("the emitter's block list", nbytes)
        keep = []
        names = []
        try:
            for i in range(n):
                idstr, region, length, bitmap, checksums = blocks[i]
                raw = idstr.encode() if isinstance(idstr, str) else bytes(idstr)
                if not 1 <= len(raw) <= 255:
                    raise ValueError(f"block idstr length {len(raw)} not in 1..255")
                npages = (length + ps - 1) // ps
                if bitmap is None and checksums is None:   # state given window by window
                    bitmap = b""
                    checksums = _EMPTY_CRCS
                    npages_state = 0
                else:
                    npages_state = npages
                bitmap = _c_array(bitmap, "B", "block bitmap")
                checksums = _c_array(checksums, "I", "block checksums")
                if len(bitmap) * 8 < npages_state or len(checksums) < npages_state:
                    raise ValueError(f"bitmap/checksums of block '{raw.decode(errors='replace')}' "
                                     f"too short for {npages} pages")
                if region % ps:
                    raise ValueError(f"block region 0x{region:x} not page aligned")
                keep += [raw, bitmap, checksums]
                names.append(raw.decode(errors="replace"))
                ids = raw
                cb[i].index = <uint32_t>i
                cb[i].idlen = <uint8_t>len(raw)
                cb[i].idstr = &ids[0]
                cb[i].region = region
                cb[i].length = length
                cb[i].n_pages = npages
                if npages_state:
                    bm = bitmap
                    cs = checksums
                    cb[i].bitmap = &bm[0]
                    cb[i].crcs = &cs[0]
        except BaseException:
            _free(cb)
            raise
        _free(self.blocks)
        self.blocks = cb
        self.n_blocks = n
        self.blocks_gen += 1
        self._keep = keep
        self.names = names
        self.em.last_block = -1

    cdef const qs_emit_block *_block(self, Py_ssize_t i) except NULL:
        if not 0 <= i < self.n_blocks:
            raise IndexError(f"block index {i} out of range")
        return &self.blocks[i]

    @property
    def page_size(self):
        return self.em.page_size

    @property
    def bytes_out(self):
        return self.em.bytes_out

    @property
    def pages(self):
        return self.em.pages

    @property
    def zero_pages(self):
        return self.em.zero_pages

    @property
    def writes(self):
        return self.em.writes

    @property
    def last_block(self):
        return self.em.last_block

    @last_block.setter
    def last_block(self, int64_t value):
        self.em.last_block = value

    def bytes(self, data):
        """Queue raw stream bytes (written with the next flush)."""
        cdef const uint8_t[::1] v = memoryview(data).cast("B")
        cdef qs_emit_err err
        _memset(&err, 0, sizeof(err))
        cdef int rc
        cdef size_t n = v.shape[0]
        if n == 0:
            return
        with nogil:
            rc = qs_emit_bytes(&self.em, &v[0], n, &err)
        if rc != QS_EMIT_OK:
            raise self._error(&err)

    def flush(self):
        cdef qs_emit_err err
        _memset(&err, 0, sizeof(err))
        cdef int rc
        with nogil:
            rc = qs_emit_flush(&self.em, &err)
        if rc != QS_EMIT_OK:
            raise self._error(&err)

    def cluster(self, Py_ssize_t block, uint64_t voff, data):
        """Check and write PAGE records for the stored pages of one cluster."""
        cdef const qs_emit_block *b = self._block(block)
        cdef const uint8_t[::1] v = memoryview(data).cast("B")
        cdef qs_emit_err err
        _memset(&err, 0, sizeof(err))
        cdef int rc
        cdef size_t n = v.shape[0]
        if n == 0:
            return
        with nogil:
            rc = qs_emit_cluster(&self.em, b, voff, &v[0], n, &err)
        if rc != QS_EMIT_OK:
            raise self._error(&err)

    def zero_range(self, Py_ssize_t block, uint64_t first=0, end=None, bitmap=None):
        """Queue ZERO records for the unstored pages in [first, end) of a block.

        ``bitmap``: the stored bits of pages first.. (``first`` a multiple of 8),
        in place of the block's own (a window of a large block's state)."""
        cdef qs_emit_block wb = self._block(block)[0]
        cdef uint64_t stop = wb.n_pages if end is None else end
        cdef const uint8_t[::1] bm
        cdef qs_emit_err err
        _memset(&err, 0, sizeof(err))
        cdef int rc
        if bitmap is not None:
            bm = _c_array(bitmap, "B", "bitmap window")
            if first % 8 or bm.shape[0] * 8 < min(stop, wb.n_pages) - min(first, stop):
                raise ValueError(f"bitmap window of {bm.shape[0]} bytes at page {first} does not "
                                 f"cover pages {first}..{stop}")
            if first >= stop:
                return
            wb.bitmap = &bm[0]
            wb.crcs = NULL
            wb.state_first = first
            wb.state_end = first + <uint64_t>bm.shape[0] * 8
        with nogil:
            rc = qs_emit_zero_range(&self.em, &wb, first, stop, &err)
        if rc != QS_EMIT_OK:
            raise self._error(&err)

    def state_window_pages(self, size_t cluster_pages):
        return state_window_pages(cluster_pages)

    def send_clusters(self, int fd, host_offsets, virtual_offsets, block_index,
                      size_t cluster_size, bytes part_start, bytes part_end,
                      uint64_t part_bytes=64 << 20, size_t buf_size=AIO_DEFAULT_BUF_SIZE,
                      unsigned n_bufs=AIO_DEFAULT_BUFS, unsigned n_threads=AIO_DEFAULT_THREADS,
                      state=None):
        """PAGE records for the clusters at ``host_offsets`` of ``fd``, read in that order.

        Cluster k holds virtual offset ``virtual_offsets[k]`` of block
        ``block_index[k]``.  Records are framed as sections: ``part_start``
        before the first record, ``part_end`` once ``part_bytes`` of page data
        went out (and after the last).  Returns the number of sections.

        ``state``: None to use the blocks' own bitmaps and checksums, else a
        callable ``state(k0) -> (k1, bitmaps, crcs)`` giving the page state of
        clusters k0..k1-1 (k1 > k0): rows of ``state_window_pages(...)``/8
        stored-bit bytes (uint8) and rows of as many checksums (uint32), row
        k - k0 starting at the cluster's first page rounded down to a multiple
        of 8, each as one buffer (flat, or 2-D of those rows).  So only a
        window of the state is in memory at a time.

        The offsets and indexes are any buffers of uint64 / uint32 items
        (array.array "Q" / "I", NumPy arrays) or sequences of ints.
        """
        cdef const uint64_t[::1] hv = _c_array(host_offsets, "Q", "host_offsets")
        cdef const uint64_t[::1] vv = _c_array(virtual_offsets, "Q", "virtual_offsets")
        cdef const uint32_t[::1] bv = _c_array(block_index, "I", "block_index")
        cdef Py_ssize_t n = hv.shape[0]
        if vv.shape[0] != n or bv.shape[0] != n:
            raise ValueError("host_offsets, virtual_offsets and block_index differ in length")
        if n == 0:
            return 0
        cdef Py_ssize_t i
        for i in range(n):
            if bv[i] >= self.n_blocks:
                raise ValueError(f"block index {bv[i]} out of range")
        cdef const uint64_t *vp = &vv[0]
        cdef const uint32_t *bp = &bv[0]
        cdef const uint8_t *ps_ptr = part_start
        cdef const uint8_t *pe_ptr = part_end
        cdef size_t ps_len = len(part_start), pe_len = len(part_end)
        cdef uint64_t page_size = self.em.page_size
        cdef qs_aio *ring = NULL
        cdef qs_aio_err aerr
        _memset(&aerr, 0, sizeof(aerr))
        cdef qs_emit_err eerr
        _memset(&eerr, 0, sizeof(eerr))
        cdef qs_aio_chunk c
        cdef int arc = QS_AIO_OK, erc = QS_EMIT_OK
        cdef size_t j, k, pos
        cdef uint64_t before, acc = 0
        cdef bint part_open = False
        cdef Py_ssize_t parts = 0
        cdef bint windowed = state is not None
        cdef size_t k0 = 0, k1 = 0, wp = state_window_pages(cluster_size // page_size)
        cdef const uint8_t[:, ::1] wbm
        cdef const uint32_t[:, ::1] wcrc
        cdef qs_emit_block wb
        cdef const qs_emit_block *bk
        cdef qs_extent *ext = <qs_extent *>_calloc(n, sizeof(qs_extent))
        if ext == NULL:
            raise _no_memory("the cluster read list", n * sizeof(qs_extent))
        for i in range(n):
            ext[i].offset = hv[i]
            ext[i].length = cluster_size
        with nogil:
            arc = qs_aio_open(&ring, fd, ext, n, buf_size, n_bufs, n_threads, &aerr)
        _free(ext)   # copied by the ring
        if arc != QS_AIO_OK:
            raise _aio_error(&aerr, self.intr)
        qs_aio_set_intr(ring, &self.intr.c)
        try:
            while True:
                with nogil:
                    arc = qs_aio_next(ring, &c, &aerr)
                    if arc == QS_AIO_OK:
                        pos = 0
                        for j in range(c.n_extents):
                            k = c.first_extent + j
                            if not part_open:
                                erc = qs_emit_bytes(&self.em, ps_ptr, ps_len, &eerr)
                                if erc != QS_EMIT_OK:
                                    break
                                part_open = True
                            before = self.em.pages
                            bk = &self.blocks[bp[k]]
                            if windowed:
                                if k >= k1:
                                    with gil:
                                        k0 = k
                                        k1, wbm, wcrc = _state_rows(state, k, n, wp)
                                wb = bk[0]
                                wb.state_first = ((vp[k] - wb.region) // page_size) & ~(<uint64_t>7)
                                wb.state_end = wb.state_first + wp
                                wb.bitmap = &wbm[k - k0, 0]
                                wb.crcs = &wcrc[k - k0, 0]
                                bk = &wb
                            erc = qs_emit_cluster(&self.em, bk, vp[k],
                                                  c.data + pos, cluster_size, &eerr)
                            if erc != QS_EMIT_OK:
                                break
                            pos += cluster_size
                            acc += (self.em.pages - before) * page_size
                            if acc >= part_bytes:
                                erc = qs_emit_bytes(&self.em, pe_ptr, pe_len, &eerr)
                                if erc != QS_EMIT_OK:
                                    break
                                part_open = False
                                parts += 1
                                acc = 0
                        qs_aio_release(ring, NULL)
                if arc == QS_AIO_END:
                    break
                if arc != QS_AIO_OK:
                    raise _aio_error(&aerr, self.intr)
                if erc != QS_EMIT_OK:
                    raise self._error(&eerr)
                PyErr_CheckSignals()
            if part_open:
                self.bytes(part_end)
                parts += 1
            self.flush()
        finally:
            with nogil:
                qs_aio_close(ring)
        return parts


def state_window_pages(size_t cluster_pages):
    """Pages of state per cluster for PageEmitter.send_clusters(state=...): the
    cluster's pages from its first page rounded down to a multiple of 8."""
    return (cluster_pages + 7) // 8 * 8 + (8 if cluster_pages % 8 else 0)


def _state_rows(state, size_t k, size_t n, size_t wp):
    """The next window of cluster page state from the send_clusters callable, checked:
    (k1, bitmap rows, checksum rows) as 2-D buffers."""
    k1, bitmaps, crcs = state(k)
    bits_flat = _c_array(bitmaps, "B", "state bitmaps")
    crcs_flat = _c_array(crcs, "I", "state checksums")
    shapes = (_shape(bitmaps, bits_flat), _shape(crcs, crcs_flat))
    if not k < k1 <= n or shapes[0] not in ((k1 - k, wp // 8), ((k1 - k) * wp // 8,)) \
            or shapes[1] not in ((k1 - k, wp), ((k1 - k) * wp,)):
        raise ValueError(f"page state for clusters {k}..{k1} of {n} has shapes {shapes[0]}, "
                         f"{shapes[1]}; expected ({k1 - k}, {wp // 8}), ({k1 - k}, {wp})")
    rows = k1 - k
    return (k1, bits_flat.cast("B").cast("B", shape=(rows, wp // 8)),
            crcs_flat.cast("B").cast("I", shape=(rows, wp)))


cdef tuple _shape(obj, flat):
    """The shape of ``obj`` as a buffer, or of its flat copy if it is a sequence."""
    try:
        return memoryview(obj).shape
    except TypeError:
        return (len(flat),)
