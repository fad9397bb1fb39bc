# RAM-record parser bindings (stream codec).
#
# RamParser runs csrc/ramparse.c over a buffer with the GIL released and writes
# qs_page_rec structs into a reusable NumPy array of PAGE_REC_DTYPE.  The C
# status/error codes become qsnap.errors.StreamError in _ram_error
# (_errors.pxi) only.

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

RAM_NEED_MORE = QS_RAM_NEED_MORE
RAM_EOS = QS_RAM_EOS
RAM_FULL = QS_RAM_FULL
RAM_MEMSIZE = QS_RAM_MEMSIZE
RAM_ERR = QS_RAM_ERR


cdef object _page_rec_dtype():
    """qsnap.stream.events.PAGE_REC_DTYPE, the records' layout: a NumPy dtype, so
    looked up when a parser or sink first needs it, not when _core is imported."""
    from qsnap.stream.events import PAGE_REC_DTYPE
    return PAGE_REC_DTYPE


cdef int _fill_blocks(qs_block *nb, list blocks) except -1:
    """Copy (idstr, length) pairs into the C block list (validated: may raise)."""
    cdef Py_ssize_t i
    cdef bytes name
    cdef uint64_t length
    for i, (name, pylength) in enumerate(blocks):
        if not 0 < len(name) <= 255:
            raise ValueError(f"RAM block {i} idstr of length {len(name)} not in 1..255")
        if not 0 <= pylength < 1 << 64:
            raise ValueError(f"RAM block '{name.decode(errors='replace')}' length {pylength} "
                             "out of range")
        length = pylength
        nb[i].idlen = <uint8_t>len(name)
        memcpy(nb[i].idstr, <const char *>name, len(name))
        nb[i].length = length
    return 0


cdef class RamParser:
    """C RAM-record parser with a reusable record array of ``cap`` entries.

    ``parse(buf, base_offset)`` returns ``(status, records, consumed)`` where
    ``records`` is a view of the first n entries (valid until the next call).
    """

    cdef qs_ram_state st
    cdef qs_block *cblocks
    cdef Py_buffer recbuf
    cdef bint have_recbuf
    cdef readonly object records_array
    cdef readonly Py_ssize_t cap
    cdef object _blocks

    def __cinit__(self, Py_ssize_t cap=8192, uint32_t page_size=4096):
        if cap <= 0:
            raise ValueError("cap must be positive")
        if page_size < 512 or (page_size & (page_size - 1)) != 0:
            raise ValueError("page size must be a power of two >= 512")
        self.cap = cap
        self.records_array = _np.zeros(cap, _page_rec_dtype())
        PyObject_GetBuffer(self.records_array, &self.recbuf, PyBUF_WRITABLE)
        self.have_recbuf = True
        self.cblocks = NULL
        self._blocks = []
        self.st.blocks = NULL
        self.st.n_blocks = 0
        self.st.last_block = -1
        self.st.page_size = page_size
        self.st.base_offset = 0
        self.st.err_code = 0

    def __dealloc__(self):
        if self.have_recbuf:
            PyBuffer_Release(&self.recbuf)
        free(self.cblocks)

    def set_blocks(self, blocks):
        """Install the block list: a sequence of (idstr bytes, length)."""
        blocks = [(bytes(n), int(l)) for n, l in blocks]
        if len(blocks) > 0x7fffffff:
            raise ValueError(f"{len(blocks)} RAM blocks, more than the parser takes")
        cdef size_t nbytes = max(len(blocks), 1) * sizeof(qs_block)
        cdef qs_block *nb = <qs_block *>calloc(1, nbytes)
        if nb == NULL:
            raise _no_memory("the RAM block list", nbytes)
        try:
            _fill_blocks(nb, blocks)
        except BaseException:
            free(nb)
            raise
        free(self.cblocks)
        self.cblocks = nb
        self.st.blocks = nb
        self.st.n_blocks = <uint32_t>len(blocks)
        self._blocks = blocks

    property last_block:
        def __get__(self):
            return self.st.last_block
        def __set__(self, int32_t v):
            self.st.last_block = v

    property page_size:
        def __get__(self):
            return self.st.page_size

    def parse(self, buf, uint64_t base_offset=0):
        cdef Py_buffer view
        cdef int rc
        cdef size_t n = 0, consumed = 0
        cdef size_t cap = <size_t>self.cap
        cdef qs_page_rec *out = <qs_page_rec *>self.recbuf.buf
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            self.st.base_offset = base_offset
            self.st.err_code = 0
            self.st.err_offset = 0
            self.st.err_value = 0
            with nogil:
                rc = qs_ram_parse(&self.st, <const uint8_t *>view.buf, <size_t>view.len,
                                  out, cap, &n, &consumed)
        finally:
            PyBuffer_Release(&view)
        if rc == QS_RAM_ERR:
            raise _ram_error(&self.st, self._blocks, buf)
        return rc, self.records_array[:n], consumed
