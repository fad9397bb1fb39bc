/*
 * Ordered read-ahead ring over a file descriptor (O_DIRECT or buffered).
 *
 * The caller gives a list of file extents (offset, length), sorted or not.
 * Adjacent extents (one ending where the next begins) are coalesced into one
 * read of at most buf_size bytes.  n_threads worker threads issue the reads
 * with pread() into n_bufs buffers (posix_memalign'ed to 4096) so that several
 * reads are in flight; the consumer takes completed buffers strictly in extent
 * order with qs_aio_next() and gives each back with qs_aio_release().
 *
 * No Python.h: every function may be called without the GIL.  Not thread safe
 * on the consumer side (one consumer thread).
 */
#ifndef QSNAP_AIO_H
#define QSNAP_AIO_H

#include <stddef.h>
#include <stdint.h>

#include "intr.h"

#define QS_AIO_ALIGN 4096
#define QS_AIO_MAX_BUFS 1024
#define QS_AIO_MAX_THREADS 64

/* status codes (negative); errno details are in qs_aio_err */
#define QS_AIO_OK 0
#define QS_AIO_END 1          /* qs_aio_next: no more buffers */
#define QS_AIO_EINVAL -1      /* bad parameters (value = offending value) */
#define QS_AIO_ENOMEM -2      /* allocation failed */
#define QS_AIO_ETHREAD -3     /* pthread_create failed (sys_errno) */
#define QS_AIO_EIO -4         /* pread failed (sys_errno, offset) */
#define QS_AIO_ESHORT -5      /* pread hit end of file (offset = where, value = bytes missing) */
#define QS_AIO_ECANCELED -6   /* the ring was cancelled */
#define QS_AIO_ESTATE -7      /* API misuse (release without next, next without release) */
#define QS_AIO_EINTR -8       /* qs_aio_next abandoned by the interrupt hook (offset = read awaited) */

typedef struct qs_extent {
    uint64_t offset;
    uint64_t length;
} qs_extent;

typedef struct qs_aio_err {
    int code;            /* QS_AIO_* */
    int sys_errno;       /* errno of the failing call, 0 if none */
    uint64_t offset;     /* file offset of the failing read */
    uint64_t value;      /* extra value (length, parameter) */
} qs_aio_err;

/* One completed read, as handed to the consumer. */
typedef struct qs_aio_chunk {
    const uint8_t *data;     /* buf_size-capacity aligned buffer */
    uint64_t offset;         /* file offset of data[0] */
    size_t length;           /* bytes read (sum of the extents' lengths) */
    size_t first_extent;     /* index (in the caller's list) of the first extent */
    size_t n_extents;        /* extents first_extent .. first_extent+n_extents-1 */
} qs_aio_chunk;

typedef struct qs_aio qs_aio;

/*
 * Start the ring.  extents are copied.  Every extent must be non-empty and
 * <= buf_size; for an O_DIRECT fd offsets and lengths must be aligned to the
 * device's block size (the caller's business; a misaligned read fails EINVAL).
 * buf_size: multiple of 4096, >= 4096.  n_bufs: 1..QS_AIO_MAX_BUFS.
 * n_threads: 1..QS_AIO_MAX_THREADS (capped at n_bufs).
 * On success *out owns threads and buffers; free it with qs_aio_close().
 */
int qs_aio_open(qs_aio **out, int fd, const qs_extent *extents, size_t n_extents,
                size_t buf_size, unsigned n_bufs, unsigned n_threads, qs_aio_err *err);

/* The hook qs_aio_next calls every slice it waits (intr.h);
 * copied.  NULL: wait without one. */
void qs_aio_set_intr(qs_aio *a, const qs_intr *intr);

/*
 * Block until the next read (in order) has completed and describe it in *chunk.
 * Returns QS_AIO_OK, QS_AIO_END after the last one, QS_AIO_EINTR when the
 * interrupt hook asked to stop waiting (call again to resume), or a negative
 * error (the error of that read; reads after a failed one are never issued).
 * The buffer stays valid until qs_aio_release().
 */
int qs_aio_next(qs_aio *a, qs_aio_chunk *chunk, qs_aio_err *err);

/* Give the buffer of the last qs_aio_next() back to the ring. */
int qs_aio_release(qs_aio *a, qs_aio_err *err);

/* Stop issuing reads and wake everybody; qs_aio_next() then fails ECANCELED.
 * Safe from any thread.  In-flight preads finish (they cannot be interrupted). */
void qs_aio_cancel(qs_aio *a);

/* Cancel, join the workers and free everything.  NULL is allowed. */
void qs_aio_close(qs_aio *a);

/* Number of reads the extents were coalesced into. */
size_t qs_aio_n_reads(const qs_aio *a);

#endif
