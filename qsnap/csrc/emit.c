/* RAM record emission: see emit.h. */
#include "emit.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32c.h"

static int set_err(qs_emit_err *err, int code, int sys_errno, uint64_t offset, uint64_t value)
{
    if (err) {
        memset(err, 0, sizeof(*err));
        err->code = code;
        err->sys_errno = sys_errno;
        err->offset = offset;
        err->value = value;
    }
    return code;
}

static inline void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

/* Page i's stored bit and crc (i inside the block's state window). */
static inline int page_stored(const qs_emit_block *b, uint64_t i)
{
    i -= b->state_first;
    return (b->bitmap[i >> 3] >> (i & 7)) & 1;
}

static inline uint32_t page_crc(const qs_emit_block *b, uint64_t i)
{
    return b->crcs[i - b->state_first];
}

/* Pages [p0, p1) lie inside b's state window (which has checksums if
 * need_crcs): a block may come without state, given window by window. */
static int check_window(const qs_emit_block *b, uint64_t p0, uint64_t p1, uint64_t ps,
                        int need_crcs, qs_emit_err *err)
{
    uint64_t end = b->state_end ? b->state_end : b->n_pages;
    if (p0 < b->state_first || p1 > end || !b->bitmap || (need_crcs && !b->crcs))
        return set_err(err, QS_EMIT_EINVAL, 0, p0 * ps, b->state_first * ps);
    return QS_EMIT_OK;
}

/* A pipe or socket is switched to O_NONBLOCK (restored by qs_emit_free): a
 * write then never blocks, and waiting for the reader happens in poll(), one
 * interruptible slice at a time, whichever thread a signal goes to.  Other
 * files do not block for long, and a terminal is shared with the user's shell. */
static void set_nonblocking(qs_emit *e)
{
    struct stat st;
    int fl = fcntl(e->fd, F_GETFL);
    e->blocking = fl < 0 || !(fl & O_NONBLOCK);
    if (fl < 0 || !e->blocking || fstat(e->fd, &st) || !(S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode)))
        return;
    if (fcntl(e->fd, F_SETFL, fl | O_NONBLOCK) == 0) {
        e->restore_flags = fl;
        e->blocking = 0;
    }
}

int qs_emit_init(qs_emit *e, int fd, uint32_t page_size, qs_emit_err *err)
{
    memset(e, 0, sizeof(*e));
    e->restore_flags = -1;
    e->fd = fd;
    e->last_block = -1;
    if (fd < 0)
        return set_err(err, QS_EMIT_EINVAL, 0, 0, (uint64_t)(int64_t)fd);
    if (page_size < 512 || (page_size & (page_size - 1)))
        return set_err(err, QS_EMIT_EINVAL, 0, 0, page_size);
    e->page_size = page_size;
    set_nonblocking(e);
    e->iov = malloc(QS_EMIT_IOV_MAX * sizeof(struct iovec));
    e->arena = malloc(QS_EMIT_ARENA);
    if (!e->iov || !e->arena) {
        qs_emit_free(e);
        return set_err(err, QS_EMIT_ENOMEM, ENOMEM, 0, QS_EMIT_ARENA);
    }
    return QS_EMIT_OK;
}

void qs_emit_set_intr(qs_emit *e, const qs_intr *intr)
{
    if (intr)
        e->intr = *intr;
    else
        e->intr.fn = NULL;
}

void qs_emit_free(qs_emit *e)
{
    if (e->restore_flags >= 0) {
        (void)fcntl(e->fd, F_SETFL, e->restore_flags);
        e->restore_flags = -1;
    }
    free(e->iov);
    free(e->arena);
    e->iov = NULL;
    e->arena = NULL;
    e->n_iov = 0;
    e->arena_len = 0;
}

static int interrupted(qs_emit *e, qs_emit_err *err)
{
    return set_err(err, QS_EMIT_EINTR, EINTR, 0, e->bytes_out);
}

/* Wait until fd is writable (non-blocking output), one slice at a time,
 * asking the interrupt hook after each slice or signal. */
static int wait_writable(qs_emit *e, qs_emit_err *err)
{
    struct pollfd p = {.fd = e->fd, .events = POLLOUT, .revents = 0};
    for (;;) {
        int r = poll(&p, 1, qs_intr_poll_ms(&e->intr));
        if (r > 0)
            return QS_EMIT_OK;   /* writable, or an error writev will report */
        if (r < 0 && errno != EINTR)
            return set_err(err, QS_EMIT_EIO, errno, 0, e->bytes_out);
        if (qs_intr_check(&e->intr))
            return interrupted(e, err);
    }
}

static int write_error(qs_emit *e, int sys_errno, qs_emit_err *err)
{
    if (sys_errno == EPIPE)
        return set_err(err, QS_EMIT_EPIPE, EPIPE, 0, e->bytes_out);
    return set_err(err, QS_EMIT_EIO, sys_errno, 0, e->bytes_out);
}

/* Write the n iovecs at v completely (v is consumed).  A signal (EINTR, or a
 * short write on a blocking fd, which only a signal causes on a pipe) and
 * each slice spent waiting for a non-blocking fd go to the interrupt hook. */
static int write_iov(qs_emit *e, struct iovec *v, unsigned n, qs_emit_err *err)
{
    while (n) {
        int cnt = n > QS_EMIT_IOV_MAX ? QS_EMIT_IOV_MAX : (int)n;
        ssize_t w = writev(e->fd, v, cnt);
        if (w < 0) {
            int rc;
            if (errno == EINTR)
                rc = qs_intr_check(&e->intr) ? interrupted(e, err) : QS_EMIT_OK;
            else if (errno == EAGAIN || errno == EWOULDBLOCK)
                rc = wait_writable(e, err);
            else
                rc = write_error(e, errno, err);
            if (rc)
                return rc;
            continue;
        }
        e->bytes_out += (uint64_t)w;
        e->writes++;
        size_t left = (size_t)w;
        while (n && left >= v->iov_len) {
            left -= v->iov_len;
            v++;
            n--;
        }
        if (n && left) {
            v->iov_base = (uint8_t *)v->iov_base + left;
            v->iov_len -= left;
        }
        if (n && e->blocking && qs_intr_check(&e->intr))
            return interrupted(e, err);
    }
    return QS_EMIT_OK;
}

int qs_emit_flush(qs_emit *e, qs_emit_err *err)
{
    int rc = write_iov(e, e->iov, e->n_iov, err);
    e->n_iov = 0;
    e->arena_len = 0;
    return rc;
}

int qs_emit_write_all(qs_emit *e, const void *buf, size_t len, qs_emit_err *err)
{
    struct iovec one = {.iov_base = (void *)buf, .iov_len = len};
    return len ? write_iov(e, &one, 1, err) : QS_EMIT_OK;
}

/* Room for n arena bytes and `iovs` more iovecs, flushing if needed. */
static int reserve(qs_emit *e, size_t n, unsigned iovs, qs_emit_err *err)
{
    if (e->arena_len + n > QS_EMIT_ARENA || e->n_iov + iovs > QS_EMIT_IOV_MAX)
        return qs_emit_flush(e, err);
    return QS_EMIT_OK;
}

/* Account n bytes just written at arena + arena_len as an iovec. */
static void commit(qs_emit *e, size_t n)
{
    uint8_t *p = e->arena + e->arena_len;
    struct iovec *last = e->n_iov ? &e->iov[e->n_iov - 1] : NULL;
    if (last && (uint8_t *)last->iov_base + last->iov_len == p) {
        last->iov_len += n;
    } else {
        e->iov[e->n_iov].iov_base = p;
        e->iov[e->n_iov].iov_len = n;
        e->n_iov++;
    }
    e->arena_len += n;
}

int qs_emit_bytes(qs_emit *e, const void *buf, size_t len, qs_emit_err *err)
{
    int rc;
    if (len == 0)
        return QS_EMIT_OK;
    if (len > QS_EMIT_ARENA / 2) {
        rc = qs_emit_flush(e, err);
        return rc ? rc : qs_emit_write_all(e, buf, len, err);
    }
    rc = reserve(e, len, 1, err);
    if (rc)
        return rc;
    memcpy(e->arena + e->arena_len, buf, len);
    commit(e, len);
    return QS_EMIT_OK;
}

/* Write a record header for page `page` of b at the arena's end. */
static size_t put_header(qs_emit *e, const qs_emit_block *b, uint64_t page, uint64_t flag)
{
    uint8_t *p = e->arena + e->arena_len;
    int cont = e->last_block == (int64_t)b->index;
    put_be64(p, page * e->page_size | flag | (cont ? QS_RAM_SAVE_FLAG_CONTINUE : 0));
    if (cont)
        return 8;
    p[8] = b->idlen;
    memcpy(p + 9, b->idstr, b->idlen);
    e->last_block = b->index;
    return 9 + (size_t)b->idlen;
}

/* Check the crc32c of every stored page of [p0, p1) (data holds page p0 first)
 * before any of them is written. */
static int verify_pages(const qs_emit_block *b, uint64_t p0, uint64_t p1,
                        const uint8_t *data, uint64_t ps, qs_emit_err *err)
{
    for (uint64_t i = p0; i < p1; i++) {
        if (!page_stored(b, i))
            continue;
        if (!data)
            return set_err(err, QS_EMIT_EINVAL, 0, i * ps, 0);
        uint32_t c = qs_crc32c(0, data + (i - p0) * ps, ps);
        if (c != page_crc(b, i)) {
            set_err(err, QS_EMIT_ECRC, 0, i * ps, 0);
            err->block = b->index;
            err->expected = page_crc(b, i);
            err->actual = c;
            return QS_EMIT_ECRC;
        }
    }
    return QS_EMIT_OK;
}

static int check_cluster_args(const qs_emit *e, const qs_emit_block *b, uint64_t voff,
                              size_t len, qs_emit_err *err)
{
    uint64_t ps = e->page_size;
    if (b->idlen == 0)
        return set_err(err, QS_EMIT_EINVAL, 0, b->index, 0);
    if (voff < b->region || (voff - b->region) % ps)
        return set_err(err, QS_EMIT_EINVAL, 0, voff, b->region);
    if (len % ps)
        return set_err(err, QS_EMIT_EINVAL, 0, voff, len);
    return QS_EMIT_OK;
}

int qs_emit_cluster(qs_emit *e, const qs_emit_block *b, uint64_t voff,
                    const uint8_t *data, size_t len, qs_emit_err *err)
{
    const uint64_t ps = e->page_size;
    int rc = check_cluster_args(e, b, voff, len, err);
    if (rc)
        return rc;
    uint64_t p0 = (voff - b->region) / ps;
    if (p0 >= b->n_pages)
        return QS_EMIT_OK;
    uint64_t p1 = p0 + len / ps;
    if (p1 > b->n_pages)
        p1 = b->n_pages;
    rc = check_window(b, p0, p1, ps, 1, err);
    if (rc)
        return rc;

    /* 1. every stored page's checksum, before anything of this cluster goes out */
    rc = verify_pages(b, p0, p1, data, ps, err);
    if (rc)
        return rc;

    /* 2. header in the arena + data in place, per stored page */
    for (uint64_t i = p0; i < p1; i++) {
        if (!page_stored(b, i))
            continue;
        rc = reserve(e, 9 + 255, 2, err);
        if (rc)
            return rc;
        commit(e, put_header(e, b, i, QS_RAM_SAVE_FLAG_PAGE));
        e->iov[e->n_iov].iov_base = (void *)(data + (i - p0) * ps);
        e->iov[e->n_iov].iov_len = ps;
        e->n_iov++;
        e->pages++;
    }
    return qs_emit_flush(e, err);
}

/* Queue a ZERO record for every page in [p, end) of b (a run of unstored
 * pages).  After the first record of a block every record is CONTINUE and 9
 * bytes long: those are written straight into the arena, as many as fit per
 * reserve(), without the per-record header logic. */
static int zero_run(qs_emit *e, const qs_emit_block *b, uint64_t p, uint64_t end, qs_emit_err *err)
{
    const uint64_t ps = e->page_size;
    const uint64_t flags = QS_RAM_SAVE_FLAG_ZERO | QS_RAM_SAVE_FLAG_CONTINUE;
    while (p < end) {
        int rc = reserve(e, 10 + 255, 1, err);
        if (rc)
            return rc;
        if (e->last_block != (int64_t)b->index) {
            size_t n = put_header(e, b, p, QS_RAM_SAVE_FLAG_ZERO);
            e->arena[e->arena_len + n] = 0; /* fill byte */
            commit(e, n + 1);
            e->zero_pages++;
            p++;
            continue;
        }
        uint64_t room = (QS_EMIT_ARENA - e->arena_len) / 9;
        uint64_t n = end - p < room ? end - p : room;
        uint8_t *q = e->arena + e->arena_len;
        for (uint64_t k = 0; k < n; k++, q += 9) {
            put_be64(q, (p + k) * ps | flags);
            q[8] = 0; /* fill byte */
        }
        commit(e, (size_t)n * 9);
        e->zero_pages += n;
        p += n;
    }
    return QS_EMIT_OK;
}

int qs_emit_zero_range(qs_emit *e, const qs_emit_block *b, uint64_t first, uint64_t end,
                       qs_emit_err *err)
{
    if (b->idlen == 0)
        return set_err(err, QS_EMIT_EINVAL, 0, b->index, 0);
    if (end > b->n_pages)
        end = b->n_pages;
    if (first >= end)
        return QS_EMIT_OK;
    int rc = check_window(b, first, end, e->page_size, 0, err);
    if (rc)
        return rc;
    /* runs of unstored pages, found in the bitmap (whose bit 0 is page state_first) */
    const uint64_t s0 = b->state_first;
    uint64_t i = qs_bits_find(b->bitmap, first - s0, end - s0, 0) + s0;
    while (i < end) {
        uint64_t j = qs_bits_find(b->bitmap, i - s0, end - s0, 1) + s0;
        rc = zero_run(e, b, i, j, err);
        if (rc)
            return rc;
        i = qs_bits_find(b->bitmap, j - s0, end - s0, 0) + s0;
    }
    return QS_EMIT_OK;
}

int qs_emit_page_range(qs_emit *e, const qs_emit_block *b, uint64_t p0, uint64_t p1,
                       const uint8_t *data, qs_emit_err *err)
{
    const uint64_t ps = e->page_size;
    if (b->idlen == 0)
        return set_err(err, QS_EMIT_EINVAL, 0, b->index, 0);
    if (p1 > b->n_pages || p0 > p1)
        return set_err(err, QS_EMIT_EINVAL, 0, p0 * ps, p1);
    int rc = p0 < p1 ? check_window(b, p0, p1, ps, 1, err) : QS_EMIT_OK;
    if (rc)
        return rc;
    rc = verify_pages(b, p0, p1, data, ps, err);
    if (rc)
        return rc;
    for (uint64_t i = p0; i < p1; i++) {
        int rc = reserve(e, 10 + 255, 2, err);
        if (rc)
            return rc;
        if (page_stored(b, i)) {
            commit(e, put_header(e, b, i, QS_RAM_SAVE_FLAG_PAGE));
            e->iov[e->n_iov].iov_base = (void *)(data + (i - p0) * ps);
            e->iov[e->n_iov].iov_len = ps;
            e->n_iov++;
            e->pages++;
        } else {
            size_t n = put_header(e, b, i, QS_RAM_SAVE_FLAG_ZERO);
            e->arena[e->arena_len + n] = 0;
            commit(e, n + 1);
            e->zero_pages++;
        }
    }
    return QS_EMIT_OK;
}

static inline int bit_get(const uint8_t *bits, uint64_t i)
{
    return (bits[i >> 3] >> (i & 7)) & 1;
}

uint64_t qs_bits_find(const uint8_t *bits, uint64_t start, uint64_t end, int value)
{
    /* whole bytes without the wanted bit value are skipped 8 at a time */
    const uint64_t skip8 = value ? 0 : UINT64_MAX;
    const uint8_t skip = value ? 0 : 0xFF;
    uint64_t i = start;
    for (; i < end && (i & 7); i++)
        if (bit_get(bits, i) == value)
            return i;
    while (i + 64 <= end) {
        uint64_t w;
        memcpy(&w, bits + (i >> 3), 8);
        if (w != skip8)
            break;
        i += 64;
    }
    while (i + 8 <= end && bits[i >> 3] == skip)
        i += 8;
    for (; i < end; i++)
        if (bit_get(bits, i) == value)
            return i;
    return end;
}

void qs_bits_set(uint8_t *bits, uint64_t start, uint64_t end)
{
    for (; start < end && (start & 7); start++)
        bits[start >> 3] |= (uint8_t)(1u << (start & 7));
    if (start + 8 <= end) {
        memset(bits + (start >> 3), 0xFF, (end - start) >> 3);
        start += (end - start) & ~(uint64_t)7;
    }
    for (; start < end; start++)
        bits[start >> 3] |= (uint8_t)(1u << (start & 7));
}

int qs_emit_host_pages(qs_emit *e, const qs_emit_block *b, uint8_t *sent, uint64_t tphp,
                       uint64_t hp0, uint64_t hp1, const uint8_t *data, uint64_t data_tp0,
                       uint64_t *count, qs_emit_err *err)
{
    const uint64_t ps = e->page_size;
    uint64_t nhp = tphp ? (b->n_pages + tphp - 1) / tphp : 0;
    if (tphp == 0)
        return set_err(err, QS_EMIT_EINVAL, 0, 0, tphp);
    if (hp1 > nhp)
        hp1 = nhp;
    uint64_t hp = qs_bits_find(sent, hp0, hp1, 0);
    while (hp < hp1) {
        uint64_t j = qs_bits_find(sent, hp, hp1, 1);
        uint64_t tp0 = hp * tphp, tp1 = j * tphp;
        if (tp1 > b->n_pages)
            tp1 = b->n_pages;
        if (data && tp0 < data_tp0)
            return set_err(err, QS_EMIT_EINVAL, 0, tp0 * ps, data_tp0);
        int rc = qs_emit_page_range(e, b, tp0, tp1, data ? data + (tp0 - data_tp0) * ps : NULL, err);
        if (rc)
            return rc;
        if (count)
            *count += j - hp;
        qs_bits_set(sent, hp, j);
        hp = qs_bits_find(sent, j, hp1, 0);
    }
    return QS_EMIT_OK;
}
