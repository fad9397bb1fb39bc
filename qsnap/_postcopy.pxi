# Postcopy page delivery (load --postcopy): whole host pages, each at most once.
#
# HostPager keeps one byte per host page and block ("sent") and emits runs of
# unsent host pages through a PageEmitter with csrc/emit.c's
# qs_emit_page_range (PAGE for stored target pages, ZERO for the others,
# checksums checked before anything of the run is queued).  Loops run with
# the GIL released.


cdef class HostPager:
    """Sent-state per host page for the blocks of ``em`` (PageEmitter).

    ``pages_per_host`` lists, per block, the target pages in one host page.
    """

    cdef PageEmitter em
    cdef readonly list sent
    cdef list _tphp
    cdef readonly uint64_t host_pages_sent

    def __cinit__(self, PageEmitter em, pages_per_host):
        self.em = em
        self.sent = []
        self._tphp = []
        self.host_pages_sent = 0
        if len(pages_per_host) != em.n_blocks:
            raise ValueError("pages_per_host must list every block")
        cdef Py_ssize_t i
        for i in range(em.n_blocks):
            t = int(pages_per_host[i])
            if t < 1 or t & (t - 1):
                raise ValueError(f"bad target pages per host page {t}")
            n = (em.blocks[i].n_pages + t - 1) // t
            self.sent.append(_lnp.zeros(n, dtype=_lnp.uint8))
            self._tphp.append(t)

    def n_host_pages(self, Py_ssize_t block):
        return self.sent[block].shape[0]

    def emit(self, Py_ssize_t block, uint64_t hp0, uint64_t hp1, data=None, uint64_t data_tp0=0):
        """Records for the unsent host pages in [hp0, hp1) of ``block``, then flush.

        ``data`` (or None when none of them has a stored page) holds the image
        bytes of target pages ``data_tp0`` onwards and must cover every stored
        page of the range.  Returns the number of host pages sent.
        """
        cdef const qs_emit_block *b = self.em._block(block)
        cdef uint8_t[::1] sent = self.sent[block]
        cdef uint64_t t = self._tphp[block]
        cdef uint64_t nhp = sent.shape[0]
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
        cdef uint64_t hp = hp0, j, tp0, tp1, count = 0
        cdef qs_emit_err err
        cdef int rc = QS_EMIT_OK
        with nogil:
            while hp < hp1:
                if sent[hp]:
                    hp += 1
                    continue
                j = hp
                while j < hp1 and not sent[j]:
                    j += 1
                tp0 = hp * t
                tp1 = j * t
                if tp1 > b.n_pages:
                    tp1 = b.n_pages
                rc = qs_emit_page_range(&self.em.em, b, tp0, tp1,
                                        dp + (tp0 - data_tp0) * ps if dp != NULL else NULL, &err)
                if rc != QS_EMIT_OK:
                    break
                while hp < j:
                    sent[hp] = 1
                    hp += 1
                    count += 1
            if rc == QS_EMIT_OK:
                rc = qs_emit_flush(&self.em.em, &err)
        self.host_pages_sent += count
        if rc != QS_EMIT_OK:
            raise self.em._error(&err)
        return count

    def zero_pass(self, Py_ssize_t block, uint64_t hp0, uint64_t hp1, has_data):
        """ZERO records for the unsent host pages in [hp0, hp1) without stored pages.

        ``has_data``: uint8 per host page, 1 = some target page is stored.
        Records are queued, not flushed.  Returns the number of host pages sent.
        """
        cdef const qs_emit_block *b = self.em._block(block)
        cdef uint8_t[::1] sent = self.sent[block]
        cdef const uint8_t[::1] hd = _lnp.ascontiguousarray(has_data, dtype=_lnp.uint8)
        cdef uint64_t t = self._tphp[block]
        cdef uint64_t nhp = sent.shape[0]
        if hd.shape[0] != nhp:
            raise ValueError("has_data must have one entry per host page")
        if hp1 > nhp:
            hp1 = nhp
        cdef uint64_t hp = hp0, j, tp1, count = 0
        cdef qs_emit_err err
        cdef int rc = QS_EMIT_OK
        with nogil:
            while hp < hp1:
                if sent[hp] or hd[hp]:
                    hp += 1
                    continue
                j = hp
                while j < hp1 and not sent[j] and not hd[j]:
                    j += 1
                tp1 = j * t
                if tp1 > b.n_pages:
                    tp1 = b.n_pages
                rc = qs_emit_page_range(&self.em.em, b, hp * t, tp1, NULL, &err)
                if rc != QS_EMIT_OK:
                    break
                while hp < j:
                    sent[hp] = 1
                    hp += 1
                    count += 1
        self.host_pages_sent += count
        if rc != QS_EMIT_OK:
            raise self.em._error(&err)
        return count
