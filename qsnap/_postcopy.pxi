# Postcopy page delivery (load --postcopy): whole host pages, each at most once.
#
# HostPager keeps one bit per host page and block ("sent": 32 MiB for a TiB of
# 4 KiB pages, scanned in C without temporaries) and emits runs of
# unsent host pages through a PageEmitter with csrc/emit.c's
# qs_emit_page_range (PAGE for stored target pages, ZERO for the others,
# checksums checked before anything of the run is queued).  Loops run with
# the GIL released.
#
# ClusterPass is the background pass over the data clusters of small-page
# blocks: it emits from the read-ahead ring's buffers (no copy), one record
# group at a time, and hands control back to Python when the return-path
# thread sets a RequestFlag, so requested pages go out ahead of the rest.


import operator as _operator


cdef class RequestFlag:
    """Set by the return-path thread when a page request is queued (or on an
    error); polled without the GIL by ClusterPass between record groups."""

    cdef int value

    def set(self):
        qs_flag_set(&self.value, 1)

    def clear(self):
        qs_flag_set(&self.value, 0)

    def __bool__(self):
        return qs_flag_get(&self.value) != 0


cdef extern from "emit.h" nogil:
    uint64_t qs_bits_find(const uint8_t *bits, uint64_t start, uint64_t end, int value)
    void qs_bits_set(uint8_t *bits, uint64_t start, uint64_t end)


cdef class SentBits:
    """One block's sent state: 1 bit per host page (NumPy "little" bit order).

    Indexing gives a page's state (a bool) or a slice's (a bool array of that
    slice only); the scans run in C over the bits.
    """

    cdef readonly object bits     # uint8 array, (n + 7) // 8 bytes
    cdef uint8_t *p
    cdef readonly uint64_t n

    def __cinit__(self, uint64_t n):
        self.n = n
        self.bits = _lnp.zeros(max((n + 7) // 8, 1), dtype=_lnp.uint8)
        cdef uint8_t[::1] v = self.bits
        self.p = &v[0]

    def __len__(self):
        return self.n

    @property
    def shape(self):
        return (self.n,)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, stride = key.indices(self.n)
            if stride != 1:
                raise ValueError("sent state slices must be contiguous")
            stop = max(start, stop)
            first = start & ~7
            window = _lnp.unpackbits(self.bits[first // 8:(stop + 7) // 8], bitorder="little")
            return window[start - first:stop - first].astype(bool)
        i = _operator.index(key)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"host page {key} out of range")
        return bool((self.p[i >> 3] >> (i & 7)) & 1)

    def find(self, uint64_t start, uint64_t end, bint value):
        """The first host page in [start, end) whose state is ``value``, else end."""
        if end > self.n:
            end = self.n
        if start >= end:
            return end
        with nogil:
            start = qs_bits_find(self.p, start, end, value)
        return start

    def all(self, uint64_t start=0, end=None):
        """True when every host page of [start, end) has been sent."""
        cdef uint64_t e = self.n if end is None else min(<uint64_t>end, self.n)
        return start >= e or self.find(start, e, False) == e

    def set(self, uint64_t start=0, end=None):
        """Mark host pages [start, end) sent."""
        cdef uint64_t e = self.n if end is None else min(<uint64_t>end, self.n)
        if start < e:
            with nogil:
                qs_bits_set(self.p, start, e)

    def unsent_runs(self):
        """(first, end) host-page runs not yet sent, ascending, one at a time."""
        cdef uint64_t i = self.find(0, self.n, False), j
        while i < self.n:
            j = self.find(i, self.n, True)
            yield i, j
            i = self.find(j, self.n, False)


cdef class HostPager:
    """Sent-state per host page for the blocks of ``em`` (PageEmitter).

    ``pages_per_host`` lists, per block, the target pages in one host page.
    """

    cdef PageEmitter em
    cdef unsigned long blocks_gen
    cdef readonly list sent
    cdef list _tphp
    cdef uint8_t **sentp
    cdef uint64_t *tphp
    cdef readonly uint64_t host_pages_sent

    def __cinit__(self, PageEmitter em, pages_per_host):
        self.em = em
        self.sent = []
        self._tphp = []
        self.sentp = NULL
        self.tphp = NULL
        self.host_pages_sent = 0
        if len(pages_per_host) != em.n_blocks:
            raise ValueError("pages_per_host must list every block")
        self.blocks_gen = em.blocks_gen
        cdef Py_ssize_t i
        cdef SentBits sb
        self.sentp = <uint8_t **>_calloc(em.n_blocks + 1, sizeof(uint8_t *))
        self.tphp = <uint64_t *>_calloc(em.n_blocks + 1, sizeof(uint64_t))
        if self.sentp == NULL or self.tphp == NULL:
            raise _no_memory("the host page tables", (em.n_blocks + 1) * (sizeof(uint8_t *) + sizeof(uint64_t)))
        for i in range(em.n_blocks):
            t = int(pages_per_host[i])
            if t < 1 or t & (t - 1):
                raise ValueError(f"bad target pages per host page {t}")
            n = (em.blocks[i].n_pages + t - 1) // t
            sb = SentBits(n)
            self.sentp[i] = sb.p
            self.tphp[i] = t
            self.sent.append(sb)
            self._tphp.append(t)

    def __dealloc__(self):
        _free(self.sentp)
        _free(self.tphp)

    cdef int _current(self) except -1:
        """The sent tables are sized for the emitter's blocks of when the pager
        was made: refuse to run C over blocks set since."""
        if self.em.blocks_gen != self.blocks_gen:
            raise ValueError("the emitter's blocks changed after the host pager was made")
        return 0

    def n_host_pages(self, Py_ssize_t block):
        return (<SentBits>self.sent[block]).n

    def emit(self, Py_ssize_t block, uint64_t hp0, uint64_t hp1, data=None, uint64_t data_tp0=0,
             state=None):
        """Records for the unsent host pages in [hp0, hp1) of ``block``, then flush.

        ``data`` (or None when none of them has a stored page) holds the image
        bytes of target pages ``data_tp0`` onwards and must cover every stored
        page of the range.  ``state``: None for the block's own page state, or
        (first, bitmap, crcs) for a window of it from target page ``first`` (a
        multiple of 8) covering the range.  Returns the number of host pages sent.
        """
        self._current()
        cdef qs_emit_block wb
        cdef const qs_emit_block *b = _windowed(self.em._block(block), state, &wb)
        cdef uint64_t t = self.tphp[block]
        cdef uint64_t nhp = (<SentBits>self.sent[block]).n
        cdef uint64_t ps = self.em.em.page_size
        cdef const uint8_t[::1] dv
        cdef const uint8_t *dp = NULL
        cdef uint64_t dlen = 0
        if data is not None:
            dv = memoryview(data).cast("B")
            dlen = dv.shape[0]
            if dlen:
                dp = &dv[0]
        if hp1 > nhp:
            hp1 = nhp
        if hp0 >= hp1:
            return 0
        cdef uint64_t first_tp = hp0 * t
        if dp != NULL and (first_tp < data_tp0 or ((min(hp1 * t, b.n_pages) - data_tp0) * ps > dlen)):
            raise ValueError("data does not cover the host pages")
        cdef uint64_t count = 0
        cdef qs_emit_err err
        _memset(&err, 0, sizeof(err))
        cdef int rc
        with nogil:
            rc = qs_emit_host_pages(&self.em.em, b, self.sentp[block], t, hp0, hp1, dp, data_tp0,
                                    &count, &err)
            if rc == QS_EMIT_OK:
                rc = qs_emit_flush(&self.em.em, &err)
        self.host_pages_sent += count
        if rc != QS_EMIT_OK:
            raise self.em._error(&err)
        return count

    def zero_pass(self, Py_ssize_t block, uint64_t hp0, uint64_t hp1, has_data, bint window=False,
                  state=None):
        """ZERO records for the unsent host pages in [hp0, hp1) without stored pages.

        ``has_data``: uint8 per host page, 1 = some target page is stored: one
        per host page of the block, or with ``window`` one per host page of
        [hp0, hp1) only (clipped to the block).  ``state`` as for emit().
        Records are queued, not flushed.  Returns the number of host pages sent.
        """
        self._current()
        cdef qs_emit_block wb
        cdef const qs_emit_block *b = _windowed(self.em._block(block), state, &wb)
        cdef uint8_t *sent = self.sentp[block]
        cdef const uint8_t[::1] hd = _as_exact(has_data, _lnp.uint8, "has_data")
        cdef uint64_t t = self._tphp[block]
        cdef uint64_t nhp = (<SentBits>self.sent[block]).n
        if hp1 > nhp:
            hp1 = nhp
        cdef uint64_t base = hp0 if window else 0
        if window and hd.shape[0] != (hp1 - hp0 if hp1 > hp0 else 0):
            raise ValueError("has_data must have one entry per host page of the window")
        if not window and hd.shape[0] != nhp:
            raise ValueError("has_data must have one entry per host page")
        cdef uint64_t hp = hp0, j, tp1, count = 0
        cdef qs_emit_err err
        _memset(&err, 0, sizeof(err))
        cdef int rc = QS_EMIT_OK
        with nogil:
            hp = qs_bits_find(sent, hp, hp1, 0)
            while hp < hp1:
                if hd[hp - base]:
                    hp = qs_bits_find(sent, hp + 1, hp1, 0)
                    continue
                j = hp + 1
                while j < hp1 and not hd[j - base] and not (sent[j >> 3] >> (j & 7)) & 1:
                    j += 1
                tp1 = j * t
                if tp1 > b.n_pages:
                    tp1 = b.n_pages
                rc = qs_emit_page_range(&self.em.em, b, hp * t, tp1, NULL, &err)
                if rc != QS_EMIT_OK:
                    break
                qs_bits_set(sent, hp, j)
                count += j - hp
                hp = qs_bits_find(sent, j, hp1, 0)
        self.host_pages_sent += count
        if rc != QS_EMIT_OK:
            raise self.em._error(&err)
        return count


cdef const qs_emit_block *_windowed(const qs_emit_block *b, state, qs_emit_block *wb) except NULL:
    """``b``, or with ``state`` = (first, bitmap, crcs) a copy of it in ``wb`` whose
    page state is that window (the arrays are kept alive by the caller's tuple)."""
    cdef const uint8_t[::1] bm
    cdef const uint32_t[::1] cr
    if state is None:
        return b
    first, bitmap, crcs = state
    for arr, dt in ((bitmap, _lnp.uint8), (crcs, _lnp.uint32)):
        # no converted copy: the pointers must stay valid while the caller holds ``state``
        if not isinstance(arr, _lnp.ndarray) or arr.dtype != dt or not arr.flags.c_contiguous:
            raise TypeError(f"page state window arrays must be contiguous {_lnp.dtype(dt)} arrays")
    bm = bitmap
    cr = crcs
    n = min(bm.shape[0] * 8, cr.shape[0])
    if first % 8 or n == 0:
        raise ValueError(f"page state window at page {first} of {n} pages")
    wb[0] = b[0]
    wb.state_first = first
    wb.state_end = first + n
    wb.bitmap = &bm[0]
    wb.crcs = &cr[0]
    return wb


# step() results
cdef enum:
    _PASS_END = 0
    _PASS_REQUEST = 1
    _PASS_LIMIT = 2

CLUSTER_PASS_END = _PASS_END
CLUSTER_PASS_REQUEST = _PASS_REQUEST
CLUSTER_PASS_LIMIT = _PASS_LIMIT


cdef class ClusterPass:
    """The postcopy background pass over small-page data clusters.

    Reads the clusters at ``host_offsets`` of ``fd`` (1 cluster each, in that
    order) through the C read-ahead ring and emits the unsent host pages of
    each straight from the ring's buffers, in record groups of at most
    ``group_pages`` target pages (whole host pages), flushing after each.
    ``step()`` runs with the GIL released and returns when the pass is done,
    when ``flag`` (a RequestFlag) is set at a group boundary, or when the
    emitter's byte count reaches ``stop_bytes``; the next step() resumes
    where it stopped.  ``state``: None for the blocks' own page state, else a
    callable giving it a batch of clusters at a time, as for
    PageEmitter.send_clusters.
    """

    cdef HostPager pager
    cdef PageEmitter em
    cdef qs_aio *ring
    cdef object _virt, _bidx
    cdef const uint64_t *vp
    cdef const uint32_t *bp
    cdef size_t n
    cdef uint64_t cs
    cdef uint64_t group
    cdef RequestFlag flag
    cdef int *flagp
    cdef bint holding
    cdef qs_aio_chunk c
    cdef size_t j
    cdef uint64_t q
    cdef bint q_set
    cdef readonly uint64_t host_pages_sent
    cdef object state
    cdef size_t k0, k1, wp
    cdef const uint8_t[:, ::1] wbm
    cdef const uint32_t[:, ::1] wcrc

    def __cinit__(self, HostPager pager, int fd, host_offsets, virtual_offsets, block_index,
                  uint64_t cluster_size, uint64_t group_pages, RequestFlag flag=None,
                  size_t buf_size=AIO_DEFAULT_BUF_SIZE, unsigned n_bufs=AIO_DEFAULT_BUFS,
                  unsigned n_threads=AIO_DEFAULT_THREADS, state=None):
        self.ring = NULL
        self.state = state
        self.k0 = self.k1 = 0
        self.pager = pager
        self.em = pager.em
        self.flag = flag
        self.flagp = &flag.value if flag is not None else NULL
        self.holding = False
        self.q_set = False
        self.j = 0
        self.host_pages_sent = 0
        if group_pages < 1:
            raise ValueError("group_pages must be positive")
        self.group = group_pages
        self.cs = cluster_size
        cdef uint64_t ps = self.em.em.page_size
        self.wp = state_window_pages(cluster_size // ps) if ps else 0
        if cluster_size < ps or cluster_size % ps:
            raise ValueError(f"cluster size {cluster_size} not a multiple of the page size")
        host = _as_exact(host_offsets, _lnp.uint64, "host_offsets")
        self._virt = _as_exact(virtual_offsets, _lnp.uint64, "virtual_offsets")
        self._bidx = _as_exact(block_index, _lnp.uint32, "block_index")
        self.n = host.shape[0]
        if self._virt.shape[0] != self.n or self._bidx.shape[0] != self.n:
            raise ValueError("host_offsets, virtual_offsets and block_index differ in length")
        if self.n and self._bidx.max() >= self.em.n_blocks:
            raise ValueError(f"block index {self._bidx.max()} out of range")
        if self.n:
            bl = self._bidx.astype(_lnp.int64)
            region = _lnp.array([self.em.blocks[i].region for i in range(self.em.n_blocks)],
                                _lnp.uint64)[bl]
            hps = _lnp.array([self.pager.tphp[i] * ps for i in range(self.em.n_blocks)],
                             _lnp.uint64)[bl]
            if (hps > cluster_size).any():
                raise ValueError("ClusterPass needs host pages no larger than a cluster")
            if (self._virt < region).any() or ((self._virt - region) % hps).any():
                raise ValueError("cluster not host-page aligned in its block")
        cdef const uint64_t[::1] vv
        cdef const uint32_t[::1] bv
        if self.n:
            vv = self._virt
            bv = self._bidx
            self.vp = &vv[0]
            self.bp = &bv[0]
        ext = _lnp.empty((max(self.n, 1), 2), dtype=_lnp.uint64)
        ext[:self.n, 0] = host
        ext[:, 1] = cluster_size
        cdef const uint64_t[:, ::1] ev = ext
        cdef qs_aio_err aerr
        _memset(&aerr, 0, sizeof(aerr))
        cdef int rc
        cdef size_t nn = self.n
        with nogil:
            rc = qs_aio_open(&self.ring, fd, <const qs_extent *>&ev[0, 0], nn, buf_size, n_bufs,
                             n_threads, &aerr)
        if rc != QS_AIO_OK:
            self.ring = NULL
            raise _aio_error(&aerr, self.em.intr)
        qs_aio_set_intr(self.ring, &self.em.intr.c)

    def __dealloc__(self):
        if self.ring != NULL:
            with nogil:
                qs_aio_close(self.ring)
            self.ring = NULL

    def close(self):
        if self.ring != NULL:
            with nogil:
                qs_aio_close(self.ring)
            self.ring = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def step(self, uint64_t stop_bytes=0xFFFFFFFFFFFFFFFF):
        if self.ring == NULL:
            raise ValueError("cluster pass is closed")
        self.pager._current()
        cdef qs_emit *e = &self.em.em
        cdef uint64_t ps = e.page_size
        cdef uint64_t ppc = self.cs // ps
        cdef qs_aio_err aerr
        _memset(&aerr, 0, sizeof(aerr))
        cdef qs_emit_err eerr
        _memset(&eerr, 0, sizeof(eerr))
        cdef int arc = QS_AIO_OK, erc = QS_EMIT_OK, result = _PASS_END
        cdef size_t k
        cdef uint32_t bi
        cdef const qs_emit_block *b
        cdef qs_emit_block wb
        cdef bint windowed = self.state is not None
        cdef uint64_t t, p0, p1, qe, step, count = 0
        with nogil:
            while True:
                if not self.holding:
                    arc = qs_aio_next(self.ring, &self.c, &aerr)
                    if arc != QS_AIO_OK:
                        break
                    self.holding = True
                    self.j = 0
                    self.q_set = False
                while self.j < self.c.n_extents:
                    k = self.c.first_extent + self.j
                    bi = self.bp[k]
                    b = &self.em.blocks[bi]
                    if windowed:
                        if k >= self.k1:
                            with gil:
                                self.k0 = k
                                self.k1, self.wbm, self.wcrc = _state_rows(self.state, k, self.n,
                                                                           self.wp)
                        wb = b[0]
                        wb.state_first = ((self.vp[k] - wb.region) // ps) & ~(<uint64_t>7)
                        wb.state_end = wb.state_first + self.wp
                        wb.bitmap = &self.wbm[k - self.k0, 0]
                        wb.crcs = &self.wcrc[k - self.k0, 0]
                        b = &wb
                    t = self.pager.tphp[bi]
                    p0 = (self.vp[k] - b.region) // ps
                    p1 = p0 + ppc
                    if p1 > b.n_pages:
                        p1 = b.n_pages
                    if not self.q_set:
                        self.q = p0
                        self.q_set = True
                    step = self.group - self.group % t if self.group >= t else t
                    while self.q < p1:
                        if self.flagp != NULL and qs_flag_get(self.flagp):
                            result = _PASS_REQUEST
                            break
                        if e.bytes_out >= stop_bytes:
                            result = _PASS_LIMIT
                            break
                        qe = self.q + step
                        if qe > p1:
                            qe = p1
                        erc = qs_emit_host_pages(e, b, self.pager.sentp[bi], t, self.q // t,
                                                 (qe + t - 1) // t,
                                                 self.c.data + self.j * self.cs, p0, &count, &eerr)
                        if erc == QS_EMIT_OK:
                            erc = qs_emit_flush(e, &eerr)
                        if erc != QS_EMIT_OK:
                            break
                        self.q = ((qe + t - 1) // t) * t
                    if result != _PASS_END or erc != QS_EMIT_OK:
                        break
                    self.j += 1
                    self.q_set = False
                if result != _PASS_END or erc != QS_EMIT_OK:
                    break
                qs_aio_release(self.ring, NULL)
                self.holding = False
        self.host_pages_sent += count
        self.pager.host_pages_sent += count
        if erc != QS_EMIT_OK:
            raise self.em._error(&eerr)
        if arc != QS_AIO_OK and arc != QS_AIO_END:
            raise _aio_error(&aerr, self.em.intr)
        PyErr_CheckSignals()
        return result
