/* RAM-record parser for the QEMU migration stream ("ram" section payload).
 *
 * Pure C, no Python.h: a function of (state, buffer) that fills an array of
 * qs_page_rec.  Record layout and flag values follow QEMU migration/ram.c
 * (ram_load_precopy); see docs/architecture.md for the record contract.
 */
#ifndef QSNAP_RAMPARSE_H
#define QSNAP_RAMPARSE_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t offset;   /* page offset inside the block (flags stripped) */
    uint64_t data_pos; /* payload position in the parsed buffer, else 0 */
    uint32_t data_len; /* payload length, else 0 */
    uint32_t block;    /* index into the MEM_SIZE block list (UINT32_MAX: none) */
    uint16_t flags;    /* wire flags, CONTINUE included */
    uint8_t fill;      /* ZERO fill byte */
    uint8_t _pad[5];
} qs_page_rec;

_Static_assert(sizeof(qs_page_rec) == 32, "qs_page_rec must be 32 bytes");

typedef struct {
    uint8_t idlen;
    char idstr[256];
    uint64_t length;
} qs_block;

typedef struct {
    const qs_block *blocks;
    uint32_t n_blocks;
    int32_t last_block;   /* -1: no block yet (CONTINUE is an error) */
    uint32_t page_size;   /* target page size, power of two */
    uint64_t base_offset; /* absolute stream offset of buf[0], for errors */
    int err_code;
    uint64_t err_offset;  /* absolute stream offset of the bad record */
    uint64_t err_value;
} qs_ram_state;

/* return codes */
enum {
    QS_RAM_ERR = -1,
    QS_RAM_NEED_MORE = 0, /* incomplete record at the end of buf */
    QS_RAM_EOS = 1,       /* EOS record consumed */
    QS_RAM_FULL = 2,      /* cap records produced */
    QS_RAM_MEMSIZE = 3    /* MEM_SIZE record at buf[consumed], not consumed */
};

/* err_code values; err_value meaning in brackets */
enum {
    QS_RAM_E_NONE = 0,
    QS_RAM_E_FLAGS = 1,         /* unknown flag combination [flags] */
    QS_RAM_E_NO_BLOCK = 2,      /* CONTINUE with no previous block [flags] */
    QS_RAM_E_IDLEN_ZERO = 3,    /* idstr length 0 [0] */
    QS_RAM_E_UNKNOWN_BLOCK = 4, /* unknown idstr [position of its length byte in buf] */
    QS_RAM_E_OFFSET = 5,        /* page offset >= block length [offset]; last_block = block */
    QS_RAM_E_XBZRLE_ENC = 6,    /* XBZRLE encoding byte != 1 [byte] */
    QS_RAM_E_XBZRLE_LEN = 7,    /* XBZRLE length > page size [length] */
    QS_RAM_E_COMPRESS_LEN = 8   /* COMPRESS_PAGE length > compressBound [length] */
};

#define QS_NO_BLOCK 0xFFFFFFFFu

int qs_ram_parse(qs_ram_state *st, const uint8_t *buf, size_t len, qs_page_rec *out,
                 size_t cap, size_t *n_out, size_t *consumed);

#endif
