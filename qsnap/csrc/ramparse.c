/* RAM-record parser; see ramparse.h.  Mirrors QEMU migration/ram.c
 * ram_load_precopy(): dispatch on (flags & ~CONTINUE) as an exact value. */
#include "ramparse.h"

#include <string.h>

#define F_ZERO 0x002u
#define F_MEM_SIZE 0x004u
#define F_PAGE 0x008u
#define F_EOS 0x010u
#define F_CONTINUE 0x020u
#define F_XBZRLE 0x040u
#define F_COMPRESS_PAGE 0x100u
#define F_MULTIFD_FLUSH 0x200u

static inline uint64_t be64(const uint8_t *p)
{
    return ((uint64_t)p[0] << 56) | ((uint64_t)p[1] << 48) | ((uint64_t)p[2] << 40) |
           ((uint64_t)p[3] << 32) | ((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16) |
           ((uint64_t)p[6] << 8) | (uint64_t)p[7];
}

static inline int set_err(qs_ram_state *st, int code, uint64_t abs_off, uint64_t value)
{
    st->err_code = code;
    st->err_offset = abs_off;
    st->err_value = value;
    return QS_RAM_ERR;
}

/* Find the block named buf[0..n) ; -1 if none. */
static int32_t find_block(const qs_ram_state *st, const uint8_t *name, uint8_t n)
{
    /* fast path: most records without CONTINUE name the previous block */
    if (st->last_block >= 0 && (uint32_t)st->last_block < st->n_blocks) {
        const qs_block *b = &st->blocks[st->last_block];
        if (b->idlen == n && memcmp(b->idstr, name, n) == 0)
            return st->last_block;
    }
    for (uint32_t i = 0; i < st->n_blocks; i++) {
        const qs_block *b = &st->blocks[i];
        if (b->idlen == n && memcmp(b->idstr, name, n) == 0)
            return (int32_t)i;
    }
    return -1;
}

int qs_ram_parse(qs_ram_state *st, const uint8_t *buf, size_t len, qs_page_rec *out,
                 size_t cap, size_t *n_out, size_t *consumed)
{
    const uint64_t mask = (uint64_t)st->page_size - 1;
    const uint64_t compress_bound = (uint64_t)st->page_size + st->page_size / 1000 + 64;
    size_t pos = 0, n = 0;
    int rc = QS_RAM_NEED_MORE;

    st->err_code = QS_RAM_E_NONE;
    *n_out = 0;
    *consumed = 0;
    for (;;) {
        if (n >= cap) {
            rc = QS_RAM_FULL;
            break;
        }
        if (len - pos < 8) {
            rc = QS_RAM_NEED_MORE;
            break;
        }
        const uint64_t rec_abs = st->base_offset + pos;
        const uint64_t word = be64(buf + pos);
        const uint32_t flags = (uint32_t)(word & mask);
        const uint64_t addr = word & ~mask;
        const uint32_t kind = flags & ~F_CONTINUE;
        size_t p = pos + 8;

        if (kind == F_EOS) {
            pos = p;
            rc = QS_RAM_EOS;
            break;
        }
        if (kind == F_MEM_SIZE) {
            rc = QS_RAM_MEMSIZE;
            break;
        }
        if (kind == F_MULTIFD_FLUSH) {
            qs_page_rec *r = &out[n++];
            memset(r, 0, sizeof(*r));
            r->offset = addr;
            r->block = QS_NO_BLOCK;
            r->flags = (uint16_t)flags;
            pos = p;
            continue;
        }
        if (kind != F_ZERO && kind != F_PAGE && kind != F_XBZRLE && kind != F_COMPRESS_PAGE)
            return set_err(st, QS_RAM_E_FLAGS, rec_abs, flags);

        int32_t block;
        if (flags & F_CONTINUE) {
            if (st->last_block < 0 || (uint32_t)st->last_block >= st->n_blocks)
                return set_err(st, QS_RAM_E_NO_BLOCK, rec_abs, flags);
            block = st->last_block;
        } else {
            if (len - p < 1) {
                rc = QS_RAM_NEED_MORE;
                break;
            }
            uint8_t idlen = buf[p];
            if (idlen == 0)
                return set_err(st, QS_RAM_E_IDLEN_ZERO, rec_abs, 0);
            if (len - p - 1 < idlen) {
                rc = QS_RAM_NEED_MORE;
                break;
            }
            block = find_block(st, buf + p + 1, idlen);
            if (block < 0)
                return set_err(st, QS_RAM_E_UNKNOWN_BLOCK, rec_abs, p);
            p += 1 + (size_t)idlen;
        }

        uint8_t fill = 0;
        uint64_t dpos = 0;
        uint32_t dlen = 0;
        switch (kind) {
        case F_ZERO:
            if (len - p < 1)
                goto need_more;
            fill = buf[p];
            p += 1;
            break;
        case F_PAGE:
            if (len - p < st->page_size)
                goto need_more;
            dpos = p;
            dlen = st->page_size;
            p += st->page_size;
            break;
        case F_XBZRLE: {
            if (len - p < 3)
                goto need_more;
            if (buf[p] != 0x01)
                return set_err(st, QS_RAM_E_XBZRLE_ENC, rec_abs, buf[p]);
            uint32_t l = ((uint32_t)buf[p + 1] << 8) | buf[p + 2];
            if (l > st->page_size)
                return set_err(st, QS_RAM_E_XBZRLE_LEN, rec_abs, l);
            p += 3;
            if (len - p < l)
                goto need_more;
            dpos = p;
            dlen = l;
            p += l;
            break;
        }
        default: { /* F_COMPRESS_PAGE */
            if (len - p < 4)
                goto need_more;
            uint32_t l = ((uint32_t)buf[p] << 24) | ((uint32_t)buf[p + 1] << 16) |
                         ((uint32_t)buf[p + 2] << 8) | buf[p + 3];
            if (l > compress_bound)
                return set_err(st, QS_RAM_E_COMPRESS_LEN, rec_abs, l);
            p += 4;
            if (len - p < l)
                goto need_more;
            dpos = p;
            dlen = l;
            p += l;
            break;
        }
        }
        /* QEMU sets its last block before checking the offset */
        st->last_block = block;
        if (addr >= st->blocks[block].length)
            return set_err(st, QS_RAM_E_OFFSET, rec_abs, addr);

        qs_page_rec *r = &out[n++];
        r->offset = addr;
        r->data_pos = dpos;
        r->data_len = dlen;
        r->block = (uint32_t)block;
        r->flags = (uint16_t)flags;
        r->fill = fill;
        memset(r->_pad, 0, sizeof(r->_pad));
        pos = p;
        continue;
    need_more:
        rc = QS_RAM_NEED_MORE;
        break;
    }
    *n_out = n;
    *consumed = pos;
    return rc;
}
