/*
 * RAM record emission for `qsnap load`: QEMU RAM page records built as an
 * iovec list and written with writev().
 *
 * Record layout (migration/ram.c, ram_save_page / save_zero_page):
 *   be64 (offset | RAM_SAVE_FLAG_PAGE [| RAM_SAVE_FLAG_CONTINUE])
 *   [u8 len, idstr]            only when CONTINUE is not set
 *   TARGET_PAGE_SIZE bytes     PAGE: the data;  ZERO: one fill byte 0
 *
 * Headers go into a side arena owned by qs_emit; page data is referenced
 * where it lies (the read-ahead buffer), never copied.  The CONTINUE state
 * (block of the previous record) is kept in qs_emit across calls and
 * sections, as QEMU's destination keeps last_recv_block.
 *
 * No Python.h; callable without the GIL.
 */
#ifndef QSNAP_EMIT_H
#define QSNAP_EMIT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "intr.h"

/* migration/ram.c */
#define QS_RAM_SAVE_FLAG_ZERO 0x002
#define QS_RAM_SAVE_FLAG_PAGE 0x008
#define QS_RAM_SAVE_FLAG_EOS 0x010
#define QS_RAM_SAVE_FLAG_CONTINUE 0x020

#define QS_EMIT_OK 0
#define QS_EMIT_ECRC -1      /* stored page fails its checksum (block, offset, expected, actual) */
#define QS_EMIT_EPIPE -2     /* the reader closed the output */
#define QS_EMIT_EIO -3       /* write failed (sys_errno) */
#define QS_EMIT_EINVAL -4    /* bad arguments (offset, value) */
#define QS_EMIT_ENOMEM -5     /* value = bytes asked for */
#define QS_EMIT_EINTR -6      /* a write abandoned by the interrupt hook (value = bytes written);
                               * what was queued is dropped: the stream is cut */

#define QS_EMIT_ARENA (256 * 1024)
#define QS_EMIT_IOV_MAX 1024

typedef struct qs_emit_err {
    int code;
    int sys_errno;
    uint32_t block;          /* block index (ECRC) */
    uint64_t offset;         /* page offset in the block (ECRC), argument (EINVAL) */
    uint64_t value;          /* bytes written so far (EPIPE/EIO), bad value (EINVAL) */
    uint32_t expected;       /* stored crc32c (ECRC) */
    uint32_t actual;         /* computed crc32c (ECRC) */
} qs_emit_err;

/* One RAM block of the image as the emitter sees it. */
typedef struct qs_emit_block {
    uint32_t index;          /* identity for CONTINUE tracking */
    uint8_t idlen;           /* 1..255 */
    const uint8_t *idstr;
    uint64_t region;         /* virtual offset of page 0 in the image */
    uint64_t length;         /* used_length in bytes */
    uint64_t n_pages;        /* ceil(length / page_size) */
    const uint8_t *bitmap;   /* 1 bit per target page, LSB first; 1 = stored */
    const uint32_t *crcs;    /* crc32c per target page (native endian) */
    /* The pages bitmap and crcs describe: [state_first, state_end), bit 0 of
     * bitmap[0] and crcs[0] being page state_first (a multiple of 8), so that
     * a window of a large block's state serves.  state_end 0: the whole block
     * from page 0.  A page outside the window is QS_EMIT_EINVAL. */
    uint64_t state_first;
    uint64_t state_end;
} qs_emit_block;

typedef struct qs_emit {
    int fd;
    uint32_t page_size;
    int64_t last_block;      /* index of the block of the previous record, -1 = none */
    uint64_t bytes_out;      /* bytes written to fd */
    uint64_t pages;          /* PAGE records built */
    uint64_t zero_pages;     /* ZERO records built */
    uint64_t writes;         /* writev/write calls */
    struct iovec *iov;
    unsigned n_iov;
    uint8_t *arena;
    size_t arena_len;
    qs_intr intr;            /* called while a write waits (intr.h) */
    int blocking;            /* fd is in blocking mode */
    int restore_flags;       /* file status flags to put back on fd, -1 = none */
} qs_emit;

/* A pipe or socket fd is switched to O_NONBLOCK until qs_emit_free(). */
int qs_emit_init(qs_emit *e, int fd, uint32_t page_size, qs_emit_err *err);
void qs_emit_free(qs_emit *e);

/* The hook called while a write waits for the reader or after a signal
 * (intr.h); copied.  NULL: none. */
void qs_emit_set_intr(qs_emit *e, const qs_intr *intr);

/* Queue raw bytes (section headers, EOS, footers) to go before what follows.
 * Copied into the arena (or written at once when larger than the arena). */
int qs_emit_bytes(qs_emit *e, const void *buf, size_t len, qs_emit_err *err);

/*
 * Emit PAGE records for the stored pages of one cluster of block b.
 * data holds `len` bytes of the image's virtual disk starting at virtual
 * offset voff (page aligned, inside b's region).  First every stored page's
 * crc32c is checked; on a mismatch nothing of this cluster is written and
 * QS_EMIT_ECRC names the first bad page.  Then the records (and anything
 * queued before) are written; on return no pointer into data is kept.
 */
int qs_emit_cluster(qs_emit *e, const qs_emit_block *b, uint64_t voff,
                    const uint8_t *data, size_t len, qs_emit_err *err);

/* Emit ZERO records (fill 0) for the pages in [first, end) of b whose bitmap
 * bit is 0.  Records are queued; call qs_emit_flush() to write them. */
int qs_emit_zero_range(qs_emit *e, const qs_emit_block *b, uint64_t first, uint64_t end,
                       qs_emit_err *err);

/*
 * Queue records for EVERY target page in [p0, p1) of b: PAGE for stored pages
 * (data of page i at data + (i - p0) * page_size), ZERO (fill 0) for the
 * others.  Every stored page's crc32c is checked first; on a mismatch nothing
 * is queued and QS_EMIT_ECRC names the first bad page.  data may be NULL only
 * when no page of the range is stored (else QS_EMIT_EINVAL).  data must stay
 * valid until the next qs_emit_flush() (records may be flushed earlier).
 * Used by postcopy, where a host page is delivered whole, zero pages included.
 */
int qs_emit_page_range(qs_emit *e, const qs_emit_block *b, uint64_t p0, uint64_t p1,
                       const uint8_t *data, qs_emit_err *err);

/*
 * Postcopy sent state: 1 bit per host page, bit i&7 of byte i>>3 (NumPy's
 * "little" bit order).  qs_bits_find returns the first i in [start, end)
 * whose bit is `value` (0 or 1), else end; qs_bits_set sets [start, end).
 */
uint64_t qs_bits_find(const uint8_t *bits, uint64_t start, uint64_t end, int value);
void qs_bits_set(uint8_t *bits, uint64_t start, uint64_t end);

/*
 * Postcopy: queue records for the host pages in [hp0, hp1) of b whose bit in
 * `sent` (one per host page of `tphp` target pages, as above) is 0, as runs of whole
 * host pages (qs_emit_page_range), and mark them sent.  data holds the image
 * bytes of target pages data_tp0 onwards (NULL when none of them is stored).
 * *count grows by the host pages queued.  Nothing is flushed.
 */
int qs_emit_host_pages(qs_emit *e, const qs_emit_block *b, uint8_t *sent, uint64_t tphp,
                       uint64_t hp0, uint64_t hp1, const uint8_t *data, uint64_t data_tp0,
                       uint64_t *count, qs_emit_err *err);

/* A flag set by one thread (page request queued) and polled by another. */
static inline int qs_flag_get(const int *f)
{
    return __atomic_load_n(f, __ATOMIC_ACQUIRE);
}

static inline void qs_flag_set(int *f, int v)
{
    __atomic_store_n(f, v, __ATOMIC_RELEASE);
}

/* Write everything queued: partial writes, EINTR, EAGAIN (poll) handled. */
int qs_emit_flush(qs_emit *e, qs_emit_err *err);

/* Write a buffer completely (no queueing), with the same handling. */
int qs_emit_write_all(qs_emit *e, const void *buf, size_t len, qs_emit_err *err);

#endif
