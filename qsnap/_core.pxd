# cython: language_level=3
# C declarations of qsnap/csrc, in one place.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t


# --- csrc/intr.h (interruptible waits) --------------------------------------

cdef extern from "intr.h" nogil:
    enum:
        QS_INTR_SLICE_MS

    ctypedef struct qs_intr:
        int (*fn)(void *ctx) noexcept
        void *ctx
        int slice_ms


# --- csrc/ramparse.h (stream codec) ---------------------------------------

from libc.stdint cimport int32_t

cdef extern from "ramparse.h" nogil:
    ctypedef struct qs_page_rec:
        uint64_t offset
        uint64_t data_pos
        uint32_t data_len
        uint32_t block
        uint16_t flags
        uint8_t fill

    ctypedef struct qs_block:
        uint8_t idlen
        char idstr[256]
        uint64_t length

    ctypedef struct qs_ram_state:
        const qs_block *blocks
        uint32_t n_blocks
        int32_t last_block
        uint32_t page_size
        uint64_t base_offset
        int err_code
        uint64_t err_offset
        uint64_t err_value

    enum:
        QS_RAM_ERR
        QS_RAM_NEED_MORE
        QS_RAM_EOS
        QS_RAM_FULL
        QS_RAM_MEMSIZE
        QS_NO_BLOCK

    int qs_ram_parse(qs_ram_state *st, const uint8_t *buf, size_t len, qs_page_rec *out,
                     size_t cap, size_t *n_out, size_t *consumed)

# --- end ramparse ------------------------------------------------------------


# --- csrc/zero.h, csrc/crc32c.h, csrc/sink.h (image side) -------------------

cdef extern from "csrc/zero.h" nogil:
    int qs_is_zero(const void *buf, size_t len)

cdef extern from "csrc/crc32c.h" nogil:
    uint32_t qs_crc32c(uint32_t crc, const void *buf, size_t len)
    uint32_t qs_crc32c_sw(uint32_t crc, const void *buf, size_t len)
    int qs_crc32c_hw_available()
    void qs_crc32c_pages(const void *buf, size_t n_pages, size_t page_size, uint32_t *out)

cdef extern from "csrc/xbzrle.h" nogil:
    long qs_xbzrle_decode(const uint8_t *src, size_t slen, uint8_t *dst, size_t dlen)

cdef extern from "csrc/sink.h" nogil:
    ctypedef qs_page_rec qs_sink_rec

    enum:
        QS_SINK_OK
        QS_SINK_EWRITE
        QS_SINK_EREAD
        QS_SINK_ENOMEM
        QS_SINK_EBADREC
        QS_SINK_ERANGE
        QS_SINK_EDATA
        QS_SINK_EXBZRLE
        QS_SINK_EUNSUPPORTED
        QS_SINK_EBLOCK
        QS_SINK_EINVAL
        QS_SINK_ETHREAD
        QS_SINK_EINTR
        QS_SINK_ESPILL
        QS_SINK_EPARENT
        QS_SINK_HOST_ZERO
        QS_SINK_HOST_INHERIT

    ctypedef struct qs_sink_err:
        int status
        int errnum
        uint64_t voff
        uint64_t host_off
        uint64_t value
        uint64_t rec_index
        uint32_t block
        uint64_t offset

    ctypedef struct qs_sink_stats:
        uint64_t pages_zero
        uint64_t pages_nonzero
        uint64_t clusters_written
        uint64_t page_rewrites
        uint64_t bytes_written
        uint64_t append_offset
        uint64_t wait_ns
        uint64_t clusters_inherited
        uint64_t clusters_zeroed
        uint64_t parent_bytes_read

    ctypedef struct qs_sink:
        pass

    int qs_sink_new(qs_sink **out, int fd, uint64_t virtual_size, uint32_t cluster_size,
                    uint32_t page_size, uint32_t n_slots, uint64_t append_offset, int direct,
                    qs_sink_err *err)
    void qs_sink_free(qs_sink *s)
    void qs_sink_set_intr(qs_sink *s, const qs_intr *intr)
    int qs_sink_set_blocks(qs_sink *s, const uint64_t *offsets,
                           const uint64_t *lengths, uint32_t n, qs_sink_err *err)
    int qs_sink_put(qs_sink *s, uint64_t voff, const uint8_t *data, uint8_t fill,
                    qs_sink_err *err)
    int qs_sink_put_batch(qs_sink *s, const qs_sink_rec *recs, size_t n,
                          const uint8_t *data, size_t data_len,
                          const uint64_t *region_offsets, uint32_t n_blocks,
                          qs_sink_err *err)
    int qs_sink_flush(qs_sink *s, qs_sink_err *err)
    int qs_sink_get(qs_sink *s, uint64_t voff, uint8_t *out, qs_sink_err *err)
    void qs_sink_get_stats(const qs_sink *s, qs_sink_stats *out)
    uint64_t qs_sink_n_clusters(const qs_sink *s)
    uint64_t qs_sink_n_pages(const qs_sink *s)
    int qs_sink_set_spill(qs_sink *s, int fd, qs_sink_err *err)
    int qs_sink_set_parent(qs_sink *s, const int *fds, uint32_t n_fds, const uint64_t *virt,
                           const uint32_t *src, const uint64_t *host, uint64_t n,
                           qs_sink_err *err)
    int qs_sink_read_hosts(qs_sink *s, uint64_t first, uint64_t n, uint64_t *out,
                           qs_sink_err *err)
    int qs_sink_read_pages(qs_sink *s, uint64_t first, uint64_t n, uint8_t *bitmap,
                           uint32_t *crcs, qs_sink_err *err)
    const uint64_t *qs_sink_block_records(const qs_sink *s)


# --- end sink ----------------------------------------------------------------


# --- csrc/aio.h, csrc/emit.h (load side) ---------------------------------------

cdef extern from "aio.h" nogil:
    enum:
        QS_AIO_OK
        QS_AIO_END
        QS_AIO_EINVAL
        QS_AIO_ENOMEM
        QS_AIO_ETHREAD
        QS_AIO_EIO
        QS_AIO_ESHORT
        QS_AIO_ECANCELED
        QS_AIO_ESTATE
        QS_AIO_EINTR

    ctypedef struct qs_extent:
        uint64_t offset
        uint64_t length

    ctypedef struct qs_aio_err:
        int code
        int sys_errno
        uint64_t offset
        uint64_t value

    ctypedef struct qs_aio_chunk:
        const uint8_t *data
        uint64_t offset
        size_t length
        size_t first_extent
        size_t n_extents

    ctypedef struct qs_aio:
        pass

    int qs_aio_open(qs_aio **out, int fd, const qs_extent *extents, size_t n_extents,
                    size_t buf_size, unsigned n_bufs, unsigned n_threads, qs_aio_err *err)
    void qs_aio_set_intr(qs_aio *a, const qs_intr *intr)
    int qs_aio_next(qs_aio *a, qs_aio_chunk *chunk, qs_aio_err *err)
    int qs_aio_release(qs_aio *a, qs_aio_err *err)
    void qs_aio_cancel(qs_aio *a)
    void qs_aio_close(qs_aio *a)
    size_t qs_aio_n_reads(const qs_aio *a)

cdef extern from "emit.h" nogil:
    enum:
        QS_EMIT_OK
        QS_EMIT_ECRC
        QS_EMIT_EPIPE
        QS_EMIT_EIO
        QS_EMIT_EINVAL
        QS_EMIT_ENOMEM
        QS_EMIT_EINTR

    ctypedef struct qs_emit_err:
        int code
        int sys_errno
        uint32_t block
        uint64_t offset
        uint64_t value
        uint32_t expected
        uint32_t actual

    ctypedef struct qs_emit_block:
        uint32_t index
        uint8_t idlen
        const uint8_t *idstr
        uint64_t region
        uint64_t length
        uint64_t n_pages
        const uint8_t *bitmap
        const uint32_t *crcs
        uint64_t state_first
        uint64_t state_end

    ctypedef struct qs_emit:
        int fd
        uint32_t page_size
        int64_t last_block
        uint64_t bytes_out
        uint64_t pages
        uint64_t zero_pages
        uint64_t writes

    int qs_emit_init(qs_emit *e, int fd, uint32_t page_size, qs_emit_err *err)
    void qs_emit_free(qs_emit *e)
    void qs_emit_set_intr(qs_emit *e, const qs_intr *intr)
    int qs_emit_bytes(qs_emit *e, const void *buf, size_t len, qs_emit_err *err)
    int qs_emit_cluster(qs_emit *e, const qs_emit_block *b, uint64_t voff,
                        const uint8_t *data, size_t len, qs_emit_err *err)
    int qs_emit_zero_range(qs_emit *e, const qs_emit_block *b, uint64_t first, uint64_t end,
                           qs_emit_err *err)
    int qs_emit_flush(qs_emit *e, qs_emit_err *err)
    int qs_emit_write_all(qs_emit *e, const void *buf, size_t len, qs_emit_err *err)

# --- end aio/emit --------------------------------------------------------------

# --- postcopy ---

cdef extern from "emit.h" nogil:
    int qs_emit_page_range(qs_emit *e, const qs_emit_block *b, uint64_t p0, uint64_t p1,
                           const uint8_t *data, qs_emit_err *err)
    int qs_emit_host_pages(qs_emit *e, const qs_emit_block *b, uint8_t *sent, uint64_t tphp,
                           uint64_t hp0, uint64_t hp1, const uint8_t *data, uint64_t data_tp0,
                           uint64_t *count, qs_emit_err *err)
    int qs_flag_get(const int *f)
    void qs_flag_set(int *f, int v)
