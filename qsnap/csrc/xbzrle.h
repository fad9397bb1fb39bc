/* XBZRLE page decoding (QEMU migration/xbzrle.c, xbzrle_decode_buffer). */
#ifndef QSNAP_XBZRLE_H
#define QSNAP_XBZRLE_H
#include <stddef.h>
#include <stdint.h>

/* Apply the encoding src[0..slen) in place over dst[0..dlen). Returns the
 * number of bytes of dst the encoding spans, or -1 - (position in src of the
 * bad byte) when the encoding is malformed (dst may be partly updated). */
long qs_xbzrle_decode(const uint8_t *src, size_t slen, uint8_t *dst, size_t dlen);

#endif
