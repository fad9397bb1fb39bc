/*
 * Interruptible waits: how C that may block for long lets its caller handle
 * signals.
 *
 * C in csrc/ never blocks without a bound: a wait on a condition variable or
 * on poll() lasts at most QS_INTR_SLICE_MS, and a blocking syscall returns
 * EINTR when a signal arrives.  After each such slice or interruption it calls
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

#include <stdint.h>
#include <time.h>

#ifndef QS_INTR_SLICE_MS
#define QS_INTR_SLICE_MS 100   /* the native tests build with a shorter slice */
#endif

typedef struct qs_intr {
    int (*fn)(void *ctx);   /* NULL: never interrupted */
    void *ctx;
} qs_intr;

/* Non-zero when the caller wants the operation abandoned. */
static inline int qs_intr_check(const qs_intr *i)
{
    return i && i->fn ? i->fn(i->ctx) : 0;
}

/* The CLOCK_MONOTONIC time one slice from now, for pthread_cond_timedwait on
 * a condition variable created with pthread_condattr_setclock(CLOCK_MONOTONIC). */
static inline struct timespec qs_intr_deadline(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_nsec += (long)QS_INTR_SLICE_MS * 1000000L;
    t.tv_sec += t.tv_nsec / 1000000000L;
    t.tv_nsec %= 1000000000L;
    return t;
}

#endif
