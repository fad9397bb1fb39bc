/* Zero-page detection: 64 bytes per step with SSE2 (baseline on x86-64),
 * 8-byte words elsewhere. Unaligned heads and tails are handled bytewise or
 * with overlapping unaligned loads; no read goes outside [buf, buf+len). */
#include "zero.h"

#include <stdint.h>
#include <string.h>

#if !defined(QS_NO_SIMD) && (defined(__x86_64__) || defined(__SSE2__))
#include <emmintrin.h>
#define QS_HAVE_SSE2 1
#endif

static int is_zero_small(const uint8_t *p, size_t len)
{
    uint8_t acc = 0;
    for (size_t i = 0; i < len; i++)
        acc |= p[i];
    return acc == 0;
}

#ifdef QS_HAVE_SSE2
int qs_is_zero(const void *buf, size_t len)
{
    const uint8_t *p = (const uint8_t *)buf;
    if (len < 16)
        return is_zero_small(p, len);
    /* First and last 16 bytes with unaligned loads, then aligned body. */
    __m128i acc = _mm_or_si128(_mm_loadu_si128((const __m128i *)p),
                               _mm_loadu_si128((const __m128i *)(p + len - 16)));
    if (_mm_movemask_epi8(_mm_cmpeq_epi8(acc, _mm_setzero_si128())) != 0xffff)
        return 0;
    const uint8_t *end = p + len;
    const uint8_t *q = (const uint8_t *)(((uintptr_t)p + 15) & ~(uintptr_t)15);
    const uint8_t *qend = (const uint8_t *)((uintptr_t)end & ~(uintptr_t)15);
    while (q + 64 <= qend) {
        __m128i a = _mm_or_si128(_mm_load_si128((const __m128i *)q),
                                 _mm_load_si128((const __m128i *)(q + 16)));
        __m128i b = _mm_or_si128(_mm_load_si128((const __m128i *)(q + 32)),
                                 _mm_load_si128((const __m128i *)(q + 48)));
        a = _mm_or_si128(a, b);
        if (_mm_movemask_epi8(_mm_cmpeq_epi8(a, _mm_setzero_si128())) != 0xffff)
            return 0;
        q += 64;
    }
    acc = _mm_setzero_si128();
    while (q + 16 <= qend) {
        acc = _mm_or_si128(acc, _mm_load_si128((const __m128i *)q));
        q += 16;
    }
    return _mm_movemask_epi8(_mm_cmpeq_epi8(acc, _mm_setzero_si128())) == 0xffff;
}
#else
int qs_is_zero(const void *buf, size_t len)
{
    const uint8_t *p = (const uint8_t *)buf;
    if (len < 8)
        return is_zero_small(p, len);
    uint64_t a, b;
    memcpy(&a, p, 8);
    memcpy(&b, p + len - 8, 8);
    if (a | b)
        return 0;
    size_t i = 8;
    uint64_t acc = 0;
    for (; i + 32 <= len; i += 32) {
        uint64_t w[4];
        memcpy(w, p + i, 32);
        if (w[0] | w[1] | w[2] | w[3])
            return 0;
    }
    for (; i + 8 <= len; i += 8) {
        memcpy(&a, p + i, 8);
        acc |= a;
    }
    return acc == 0;
}
#endif
