# cython: language_level=3
# C declarations of qsnap/csrc, in one place.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t


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



# --- end sink ----------------------------------------------------------------
