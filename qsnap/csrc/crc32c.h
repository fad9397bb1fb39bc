/* crc32c (Castagnoli, reflected polynomial 0x82f63b78, init/final xor
 * 0xffffffff): crc32c(0, "123456789", 9) == 0xe3069283. No Python.h. */
#ifndef QSNAP_CRC32C_H
#define QSNAP_CRC32C_H
#include <stddef.h>
#include <stdint.h>

/* Continue a crc: pass 0 to start, the previous result to chain. */
uint32_t qs_crc32c(uint32_t crc, const void *buf, size_t len);

/* The portable slicing-by-8 implementation (also used for tests). */
uint32_t qs_crc32c_sw(uint32_t crc, const void *buf, size_t len);

/* 1 if qs_crc32c uses the SSE4.2 crc32 instruction. */
int qs_crc32c_hw_available(void);

/* out[i] = crc32c of page i of buf (n_pages pages of page_size bytes). */
void qs_crc32c_pages(const void *buf, size_t n_pages, size_t page_size, uint32_t *out);

#endif
