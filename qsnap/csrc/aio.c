/*
 * Ordered read-ahead ring: see aio.h.
 *
 * Reads are numbered 0..n_reads-1; read `seq` always uses buffer seq % n_bufs.
 * A worker may start read `seq` once the consumer has released read
 * seq - n_bufs, i.e. while seq < next_consume + n_bufs.  One mutex guards the
 * whole state; workers sleep on work_cv, the consumer on done_cv.
 */
#include "aio.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { SLOT_FREE = 0, SLOT_READING, SLOT_DONE, SLOT_FAILED };

typedef struct qs_read {
    uint64_t offset;
    size_t length;
    size_t first_extent;
    size_t n_extents;
} qs_read;

typedef struct qs_slot {
    uint8_t *buf;
    int state;
    size_t seq;
    qs_aio_err err;
} qs_slot;

struct qs_aio {
    int fd;
    size_t buf_size;
    unsigned n_bufs;
    unsigned n_threads;      /* threads started */
    qs_read *reads;
    size_t n_reads;
    qs_slot *slots;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t work_cv;
    pthread_cond_t done_cv;
    size_t next_issue;       /* next read a worker claims */
    size_t next_consume;     /* read the consumer takes next */
    int holding;             /* the consumer holds read next_consume */
    int cancelled;
    int failed;              /* a read failed: issue no further reads */
    qs_intr intr;            /* the consumer's interrupt hook */
};

static int set_err(qs_aio_err *err, int code, int sys_errno, uint64_t offset, uint64_t value)
{
    if (err) {
        err->code = code;
        err->sys_errno = sys_errno;
        err->offset = offset;
        err->value = value;
    }
    return code;
}

/* Read exactly len bytes at off.  Returns QS_AIO_OK or an error in *err. */
static int read_full(int fd, uint8_t *buf, size_t len, uint64_t off, qs_aio_err *err)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            /* after a short O_DIRECT read the retry is misaligned: that is EOF */
            if (done > 0 && errno == EINVAL)
                return set_err(err, QS_AIO_ESHORT, 0, off + done, len - done);
            return set_err(err, QS_AIO_EIO, errno, off + done, len - done);
        }
        if (r == 0)
            return set_err(err, QS_AIO_ESHORT, 0, off + done, len - done);
        done += (size_t)r;
    }
    return QS_AIO_OK;
}

static void *worker(void *arg)
{
    qs_aio *a = arg;
    pthread_mutex_lock(&a->mu);
    for (;;) {
        while (!a->cancelled && !a->failed && a->next_issue < a->n_reads
               && a->next_issue >= a->next_consume + a->n_bufs)
            pthread_cond_wait(&a->work_cv, &a->mu);
        if (a->cancelled || a->failed || a->next_issue >= a->n_reads)
            break;
        size_t seq = a->next_issue++;
        qs_slot *s = &a->slots[seq % a->n_bufs];
        const qs_read *rd = &a->reads[seq];
        s->state = SLOT_READING;
        s->seq = seq;
        pthread_mutex_unlock(&a->mu);

        qs_aio_err e = {0, 0, 0, 0};
        int rc = read_full(a->fd, s->buf, rd->length, rd->offset, &e);

        pthread_mutex_lock(&a->mu);
        if (rc == QS_AIO_OK) {
            s->state = SLOT_DONE;
        } else {
            s->err = e;
            s->state = SLOT_FAILED;
            a->failed = 1;
            pthread_cond_broadcast(&a->work_cv);
        }
        pthread_cond_broadcast(&a->done_cv);
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

static void free_ring(qs_aio *a)
{
    if (a->slots) {
        for (unsigned i = 0; i < a->n_bufs; i++)
            free(a->slots[i].buf);
    }
    free(a->slots);
    free(a->threads);
    free(a->reads);
    free(a);
}

/* The mutex and condition variables (done_cv on the monotonic clock, for
 * timed waits); 0 or the pthread error, nothing left initialised on error. */
static int sync_init(qs_aio *a)
{
    pthread_condattr_t ca;
    int rc = pthread_condattr_init(&ca);
    if (rc)
        return rc;
    rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    if (rc)
        goto out_attr;
    rc = pthread_mutex_init(&a->mu, NULL);
    if (rc)
        goto out_attr;
    rc = pthread_cond_init(&a->work_cv, NULL);
    if (rc)
        goto out_mu;
    rc = pthread_cond_init(&a->done_cv, &ca);
    if (rc)
        goto out_work;
    pthread_condattr_destroy(&ca);
    return 0;
out_work:
    pthread_cond_destroy(&a->work_cv);
out_mu:
    pthread_mutex_destroy(&a->mu);
out_attr:
    pthread_condattr_destroy(&ca);
    return rc;
}

/* Start n workers with every signal blocked: signals stay with the caller's
 * thread (the interpreter's), whose blocking calls they interrupt.  0 or the
 * pthread error; a->n_threads counts those started. */
static int start_workers(qs_aio *a, unsigned n)
{
    sigset_t all, old;
    sigfillset(&all);
    int rc = pthread_sigmask(SIG_SETMASK, &all, &old);
    if (rc)
        return rc;
    for (unsigned i = 0; i < n && rc == 0; i++) {
        rc = pthread_create(&a->threads[i], NULL, worker, a);
        if (rc == 0)
            a->n_threads++;
    }
    int mrc = pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc ? rc : mrc;
}

int qs_aio_open(qs_aio **out, int fd, const qs_extent *extents, size_t n_extents,
                size_t buf_size, unsigned n_bufs, unsigned n_threads, qs_aio_err *err)
{
    *out = NULL;
    set_err(err, QS_AIO_OK, 0, 0, 0);
    if (fd < 0)
        return set_err(err, QS_AIO_EINVAL, 0, 0, (uint64_t)(int64_t)fd);
    if (buf_size < QS_AIO_ALIGN || buf_size % QS_AIO_ALIGN)
        return set_err(err, QS_AIO_EINVAL, 0, 0, buf_size);
    if (n_bufs < 1 || n_bufs > QS_AIO_MAX_BUFS)
        return set_err(err, QS_AIO_EINVAL, 0, 0, n_bufs);
    if (n_threads < 1 || n_threads > QS_AIO_MAX_THREADS)
        return set_err(err, QS_AIO_EINVAL, 0, 0, n_threads);
    if (n_threads > n_bufs)
        n_threads = n_bufs;

    qs_aio *a = calloc(1, sizeof(*a));
    if (!a)
        return set_err(err, QS_AIO_ENOMEM, ENOMEM, 0, sizeof(*a));
    a->fd = fd;
    a->buf_size = buf_size;

    /* coalesce extents into reads */
    a->reads = malloc((n_extents ? n_extents : 1) * sizeof(qs_read));
    if (!a->reads) {
        free_ring(a);
        return set_err(err, QS_AIO_ENOMEM, ENOMEM, 0, (n_extents ? n_extents : 1) * sizeof(qs_read));
    }
    for (size_t i = 0; i < n_extents; i++) {
        const qs_extent *x = &extents[i];
        if (x->length == 0 || x->length > buf_size || x->offset + x->length < x->offset) {
            free_ring(a);
            return set_err(err, QS_AIO_EINVAL, 0, x->offset, x->length);
        }
        qs_read *cur = a->n_reads ? &a->reads[a->n_reads - 1] : NULL;
        if (cur && cur->offset + cur->length == x->offset && cur->length + x->length <= buf_size) {
            cur->length += x->length;
            cur->n_extents++;
        } else {
            cur = &a->reads[a->n_reads++];
            cur->offset = x->offset;
            cur->length = x->length;
            cur->first_extent = i;
            cur->n_extents = 1;
        }
    }

    if (a->n_reads < n_bufs)
        n_bufs = a->n_reads ? (unsigned)a->n_reads : 1;
    if (n_threads > n_bufs)
        n_threads = n_bufs;
    a->slots = calloc(n_bufs, sizeof(qs_slot));
    if (!a->slots) {
        free_ring(a);
        return set_err(err, QS_AIO_ENOMEM, ENOMEM, 0, (uint64_t)n_bufs * sizeof(qs_slot));
    }
    a->n_bufs = n_bufs;
    for (unsigned i = 0; i < n_bufs; i++) {
        void *p = NULL;
        if (posix_memalign(&p, QS_AIO_ALIGN, buf_size) != 0) {
            free_ring(a);
            return set_err(err, QS_AIO_ENOMEM, ENOMEM, 0, buf_size);
        }
        a->slots[i].buf = p;
    }
    a->threads = calloc(n_threads, sizeof(pthread_t));
    if (!a->threads) {
        free_ring(a);
        return set_err(err, QS_AIO_ENOMEM, ENOMEM, 0, (uint64_t)n_threads * sizeof(pthread_t));
    }
    int rc = sync_init(a);
    if (rc) {
        free_ring(a);
        return set_err(err, QS_AIO_ETHREAD, rc, 0, 0);
    }
    rc = start_workers(a, n_threads);
    if (rc) {
        qs_aio_close(a);
        return set_err(err, QS_AIO_ETHREAD, rc, 0, n_threads);
    }
    *out = a;
    return QS_AIO_OK;
}

void qs_aio_set_intr(qs_aio *a, const qs_intr *intr)
{
    if (intr)
        a->intr = *intr;
    else
        a->intr.fn = NULL;
}

/* Read `seq` has completed or failed (mu held). */
static int slot_ready(const qs_slot *s, size_t seq)
{
    return s->seq == seq && (s->state == SLOT_DONE || s->state == SLOT_FAILED);
}

/* Wait (mu held) until read next_consume is ready or the ring is cancelled,
 * one slice at a time, asking the interrupt hook (without mu) after each.
 * 0, or 1 when the hook says stop. */
static int wait_ready(qs_aio *a, const qs_slot *s)
{
    while (!a->cancelled && !slot_ready(s, a->next_consume)) {
        int rc = qs_intr_cond_wait(&a->intr, &a->done_cv, &a->mu);
        if (rc != ETIMEDOUT || a->cancelled || slot_ready(s, a->next_consume))
            continue;
        pthread_mutex_unlock(&a->mu);
        int stop = qs_intr_check(&a->intr);
        pthread_mutex_lock(&a->mu);
        if (stop)
            return 1;
    }
    return 0;
}

int qs_aio_next(qs_aio *a, qs_aio_chunk *chunk, qs_aio_err *err)
{
    int rc;
    pthread_mutex_lock(&a->mu);
    if (a->holding) {
        rc = set_err(err, QS_AIO_ESTATE, 0, 0, a->next_consume);
        goto out;
    }
    if (a->next_consume >= a->n_reads) {
        rc = QS_AIO_END;
        goto out;
    }
    qs_slot *s = &a->slots[a->next_consume % a->n_bufs];
    if (wait_ready(a, s)) {
        rc = set_err(err, QS_AIO_EINTR, EINTR, a->reads[a->next_consume].offset, 0);
        goto out;
    }
    if (a->cancelled) {
        rc = set_err(err, QS_AIO_ECANCELED, 0, a->reads[a->next_consume].offset, 0);
        goto out;
    }
    if (s->state == SLOT_FAILED) {
        if (err)
            *err = s->err;
        rc = s->err.code;
        goto out;
    }
    const qs_read *rd = &a->reads[a->next_consume];
    chunk->data = s->buf;
    chunk->offset = rd->offset;
    chunk->length = rd->length;
    chunk->first_extent = rd->first_extent;
    chunk->n_extents = rd->n_extents;
    a->holding = 1;
    rc = QS_AIO_OK;
out:
    pthread_mutex_unlock(&a->mu);
    return rc;
}

int qs_aio_release(qs_aio *a, qs_aio_err *err)
{
    int rc = QS_AIO_OK;
    pthread_mutex_lock(&a->mu);
    if (!a->holding) {
        rc = set_err(err, QS_AIO_ESTATE, 0, 0, a->next_consume);
    } else {
        a->slots[a->next_consume % a->n_bufs].state = SLOT_FREE;
        a->next_consume++;
        a->holding = 0;
        pthread_cond_broadcast(&a->work_cv);
    }
    pthread_mutex_unlock(&a->mu);
    return rc;
}

void qs_aio_cancel(qs_aio *a)
{
    if (!a)
        return;
    pthread_mutex_lock(&a->mu);
    a->cancelled = 1;
    pthread_cond_broadcast(&a->work_cv);
    pthread_cond_broadcast(&a->done_cv);
    pthread_mutex_unlock(&a->mu);
}

void qs_aio_close(qs_aio *a)
{
    if (!a)
        return;
    qs_aio_cancel(a);
    for (unsigned i = 0; i < a->n_threads; i++)
        pthread_join(a->threads[i], NULL);
    pthread_cond_destroy(&a->done_cv);
    pthread_cond_destroy(&a->work_cv);
    pthread_mutex_destroy(&a->mu);
    free_ring(a);
}

size_t qs_aio_n_reads(const qs_aio *a)
{
    return a->n_reads;
}
