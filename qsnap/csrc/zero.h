/* Zero-page detection. No Python.h: callable without the GIL. */
#ifndef QSNAP_ZERO_H
#define QSNAP_ZERO_H
#include <stddef.h>

/* 1 if all len bytes of buf are zero (also for len == 0), else 0. */
int qs_is_zero(const void *buf, size_t len);

#endif
