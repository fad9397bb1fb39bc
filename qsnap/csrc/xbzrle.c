/* XBZRLE: pairs of ULEB128 "zrun" (unchanged bytes) and "nzrun" (n new bytes,
 * then the bytes). Each ULEB128 has at most 2 bytes (values < 16384); a zrun of
 * 0 only comes first; an nzrun is never 0; nothing may overflow dst. Same rules
 * as QEMU's xbzrle_decode_buffer() (migration/xbzrle.c). */
#include "xbzrle.h"

#include <string.h>

static int uleb128_decode_small(const uint8_t *in, uint32_t *n)
{
    if (!(in[0] & 0x80)) {
        *n = in[0];
        return 1;
    }
    if (in[1] & 0x80)
        return -1;
    *n = (uint32_t)(in[0] & 0x7f) | ((uint32_t)in[1] << 7);
    return 2;
}

long qs_xbzrle_decode(const uint8_t *src, size_t slen, uint8_t *dst, size_t dlen)
{
    size_t i = 0, d = 0;
    uint32_t count;
    int ret;

    while (i < slen) {
        if (slen - i < 2)
            return -1 - (long)i;
        ret = uleb128_decode_small(src + i, &count);
        if (ret < 0 || (i && !count))
            return -1 - (long)i;
        i += (size_t)ret;
        d += count;
        if (d > dlen)
            return -1 - (long)i;

        if (slen - i < 2)
            return -1 - (long)i;
        ret = uleb128_decode_small(src + i, &count);
        if (ret < 0 || !count)
            return -1 - (long)i;
        i += (size_t)ret;
        if (d + count > dlen || i + count > slen)
            return -1 - (long)i;
        memcpy(dst + d, src + i, count);
        d += count;
        i += count;
    }
    return (long)d;
}
