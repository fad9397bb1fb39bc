/*
 * Interruptible waits: how C that may block for long lets its caller handle
 * signals.
 *
 * Given a hook, C in csrc/ never blocks without a bound: a wait on a condition
 * variable or on poll() lasts at most a slice (qsnap: QS_INTR_SLICE_MS), and a
 * blocking syscall returns EINTR when a signal arrives.  After each such slice or interruption it calls
 * the caller's hook (qsnap's Cython runs the Python signal handlers there,
 * with the GIL, and the engine's own checks).  A non-zero result from the
 * hook abandons the operation: the C function returns its module's *_EINTR
 * status, leaving its object in a state that may be freed or used again; the
 * caller raises what the hook recorded.  A zero result resumes the wait, so an
 * operation is never left half done for a signal whose handler returns.
 *
 * No Python.h: the hook is a plain function pointer.
 */
#ifndef QSNAP_INTR_H
#define QSNAP_INTR_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

#define QS_INTR_SLICE_MS 100   /* qsnap's slice: signals are handled within it */

typedef struct qs_intr {
    int (*fn)(void *ctx);   /* NULL: wait without slices, never interrupted */
    void *ctx;
    int slice_ms;           /* length of a slice (0: ask the hook whenever a wait would block) */
} qs_intr;

/* Non-zero when the caller wants the operation abandoned. */
static inline int qs_intr_check(const qs_intr *i)
{
    return i->fn ? i->fn(i->ctx) : 0;
}

/* poll() timeout for one slice: -1 (no end) without a hook. */
static inline int qs_intr_poll_ms(const qs_intr *i)
{
    return i->fn ? i->slice_ms : -1;
}

/* Wait on cv (mu held) for at most one slice; ETIMEDOUT when the slice ended.
 * cv must use CLOCK_MONOTONIC (pthread_condattr_setclock). */
static inline int qs_intr_cond_wait(const qs_intr *i, pthread_cond_t *cv, pthread_mutex_t *mu)
{
    if (!i->fn)
        return pthread_cond_wait(cv, mu);
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_nsec += (long)i->slice_ms * 1000000L;
    t.tv_sec += t.tv_nsec / 1000000000L;
    t.tv_nsec %= 1000000000L;
    return pthread_cond_timedwait(cv, mu, &t);
}

#endif
