/* crc32c: slicing-by-8 in portable C, and on x86-64 the SSE4.2 crc32
 * instruction over three interleaved streams (combined with zero-shift
 * tables, after Mark Adler's crc32c.c), selected at run time. */
#include "crc32c.h"

#include <string.h>

#define POLY 0x82f63b78u

static uint32_t crc32c_table[8][256];

static void sw_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++)
            crc = crc & 1 ? (crc >> 1) ^ POLY : crc >> 1;
        crc32c_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = crc32c_table[0][n];
        for (int k = 1; k < 8; k++) {
            crc = crc32c_table[0][crc & 0xff] ^ (crc >> 8);
            crc32c_table[k][n] = crc;
        }
    }
}

static inline uint64_t load_le64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

uint32_t qs_crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = (const unsigned char *)buf;
    uint64_t c = crc ^ 0xffffffffu;
    while (len && ((uintptr_t)p & 7)) {
        c = crc32c_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        len--;
    }
    while (len >= 8) {
        c ^= load_le64(p);
        c = crc32c_table[7][c & 0xff] ^ crc32c_table[6][(c >> 8) & 0xff] ^
            crc32c_table[5][(c >> 16) & 0xff] ^ crc32c_table[4][(c >> 24) & 0xff] ^
            crc32c_table[3][(c >> 32) & 0xff] ^ crc32c_table[2][(c >> 40) & 0xff] ^
            crc32c_table[1][(c >> 48) & 0xff] ^ crc32c_table[0][c >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        c = crc32c_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return (uint32_t)c ^ 0xffffffffu;
}

#if defined(__x86_64__)
#include <nmmintrin.h>

#define LONG_BLK 8192
#define SHORT_BLK 256

static uint32_t crc32c_long[4][256];
static uint32_t crc32c_short[4][256];
static int have_hw;

static uint32_t gf2_matrix_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    while (vec) {
        if (vec & 1)
            sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static void gf2_matrix_square(uint32_t *square, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        square[n] = gf2_matrix_times(mat, mat[n]);
}

/* Operator that appends len zero bytes (len a power of two) to a crc. */
static void zeros_op(uint32_t *even, size_t len)
{
    uint32_t odd[32];
    uint32_t row = 1;
    odd[0] = POLY;
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    gf2_matrix_square(even, odd);
    gf2_matrix_square(odd, even);
    do {
        gf2_matrix_square(even, odd);
        len >>= 1;
        if (len == 0)
            return;
        gf2_matrix_square(odd, even);
        len >>= 1;
    } while (len);
    memcpy(even, odd, sizeof(odd));
}

static void zeros_table(uint32_t zeros[][256], size_t len)
{
    uint32_t op[32];
    zeros_op(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        zeros[0][n] = gf2_matrix_times(op, n);
        zeros[1][n] = gf2_matrix_times(op, n << 8);
        zeros[2][n] = gf2_matrix_times(op, n << 16);
        zeros[3][n] = gf2_matrix_times(op, n << 24);
    }
}

static inline uint32_t shift(uint32_t zeros[][256], uint32_t crc)
{
    return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^
           zeros[2][(crc >> 16) & 0xff] ^ zeros[3][crc >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *next = (const unsigned char *)buf;
    uint64_t crc0 = crc ^ 0xffffffffu, crc1, crc2;

    while (len && ((uintptr_t)next & 7)) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
        len--;
    }
    while (len >= LONG_BLK * 3) {
        const unsigned char *end = next + LONG_BLK;
        crc1 = 0;
        crc2 = 0;
        do {
            uint64_t a, b, c;
            memcpy(&a, next, 8);
            memcpy(&b, next + LONG_BLK, 8);
            memcpy(&c, next + 2 * LONG_BLK, 8);
            crc0 = _mm_crc32_u64(crc0, a);
            crc1 = _mm_crc32_u64(crc1, b);
            crc2 = _mm_crc32_u64(crc2, c);
            next += 8;
        } while (next < end);
        crc0 = shift(crc32c_long, (uint32_t)crc0) ^ crc1;
        crc0 = shift(crc32c_long, (uint32_t)crc0) ^ crc2;
        next += LONG_BLK * 2;
        len -= LONG_BLK * 3;
    }
    while (len >= SHORT_BLK * 3) {
        const unsigned char *end = next + SHORT_BLK;
        crc1 = 0;
        crc2 = 0;
        do {
            uint64_t a, b, c;
            memcpy(&a, next, 8);
            memcpy(&b, next + SHORT_BLK, 8);
            memcpy(&c, next + 2 * SHORT_BLK, 8);
            crc0 = _mm_crc32_u64(crc0, a);
            crc1 = _mm_crc32_u64(crc1, b);
            crc2 = _mm_crc32_u64(crc2, c);
            next += 8;
        } while (next < end);
        crc0 = shift(crc32c_short, (uint32_t)crc0) ^ crc1;
        crc0 = shift(crc32c_short, (uint32_t)crc0) ^ crc2;
        next += SHORT_BLK * 2;
        len -= SHORT_BLK * 3;
    }
    while (len >= 8) {
        uint64_t a;
        memcpy(&a, next, 8);
        crc0 = _mm_crc32_u64(crc0, a);
        next += 8;
        len -= 8;
    }
    while (len) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
        len--;
    }
    return (uint32_t)crc0 ^ 0xffffffffu;
}

__attribute__((constructor))
static void crc32c_init(void)
{
    sw_init();
    zeros_table(crc32c_long, LONG_BLK);
    zeros_table(crc32c_short, SHORT_BLK);
    __builtin_cpu_init();
    have_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
}

int qs_crc32c_hw_available(void)
{
    return have_hw;
}

uint32_t qs_crc32c(uint32_t crc, const void *buf, size_t len)
{
    return have_hw ? crc32c_hw(crc, buf, len) : qs_crc32c_sw(crc, buf, len);
}

#else /* !__x86_64__ */

__attribute__((constructor))
static void crc32c_init(void)
{
    sw_init();
}

int qs_crc32c_hw_available(void)
{
    return 0;
}

uint32_t qs_crc32c(uint32_t crc, const void *buf, size_t len)
{
    return qs_crc32c_sw(crc, buf, len);
}
#endif

void qs_crc32c_pages(const void *buf, size_t n_pages, size_t page_size, uint32_t *out)
{
    const unsigned char *p = (const unsigned char *)buf;
    for (size_t i = 0; i < n_pages; i++)
        out[i] = qs_crc32c(0, p + i * page_size, page_size);
}
