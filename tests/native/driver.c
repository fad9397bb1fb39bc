/* Native test driver for qsnap/csrc, built with -fsanitize=address,undefined
 * and with -fsanitize=thread by test_native.py. Exits 0 when every check passes. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "aio.h"
#include "crc32c.h"
#include "emit.h"
#include "ramparse.h"
#include "sink.h"
#include "xbzrle.h"
#include "zero.h"

static int failures;
#define CHECK(c)                                                              \
    do {                                                                      \
        if (!(c)) {                                                           \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c); \
            failures++;                                                       \
        }                                                                     \
    } while (0)

/* qs_sink_new, NULL on failure (the status is checked where it matters). */
static qs_sink *sink_new(int fd, uint64_t vsize, uint32_t cs, uint32_t ps, uint32_t n_slots,
                         uint64_t append, int direct)
{
    qs_sink *s = NULL;
    qs_sink_err err;
    memset(&err, 0, sizeof(err));
    int rc = qs_sink_new(&s, fd, vsize, cs, ps, n_slots, append, direct, &err);
    CHECK((rc == QS_SINK_OK) == (s != NULL));
    CHECK(rc == QS_SINK_OK || err.status == rc);
    return s;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void test_crc(void)
{
    CHECK(qs_crc32c(0, "123456789", 9) == 0xe3069283u);
    CHECK(qs_crc32c_sw(0, "123456789", 9) == 0xe3069283u);
    CHECK(qs_crc32c(qs_crc32c(0, "1234", 4), "56789", 5) == 0xe3069283u);
    CHECK(qs_crc32c(0, NULL, 0) == 0);
    for (size_t n = 0; n < 30000; n += (n < 1024 ? 1 : 997)) {
        /* exact-size heap buffer: any overread is an ASan error */
        unsigned char *b = malloc(n ? n : 1);
        for (size_t i = 0; i < n; i++)
            b[i] = (unsigned char)rnd();
        for (size_t a = 0; a < 8 && a <= n; a++)
            CHECK(qs_crc32c(7, b + a, n - a) == qs_crc32c_sw(7, b + a, n - a));
        free(b);
    }
    unsigned char *pages = malloc(3 * 4096);
    uint32_t out[3];
    for (int i = 0; i < 3 * 4096; i++)
        pages[i] = (unsigned char)rnd();
    qs_crc32c_pages(pages, 3, 4096, out);
    for (int i = 0; i < 3; i++)
        CHECK(out[i] == qs_crc32c_sw(0, pages + i * 4096, 4096));
    free(pages);
}

static void test_zero(void)
{
    for (size_t n = 0; n <= 4097; n++) {
        for (size_t a = 0; a < 3; a++) {
            unsigned char *b = calloc(1, n + a ? n + a : 1);
            CHECK(qs_is_zero(b + a, n));
            if (n) {
                size_t pos[3] = {0, n / 2, n - 1};
                for (int k = 0; k < 3; k++) {
                    b[a + pos[k]] = 0x10;
                    CHECK(!qs_is_zero(b + a, n));
                    b[a + pos[k]] = 0;
                }
            }
            free(b);
        }
    }
}

static void test_xbzrle(void)
{
    uint8_t page[4096];
    memset(page, 0xaa, sizeof(page));
    const uint8_t ok[] = {4, 2, 'h', 'i', 1, 1, '!'};
    CHECK(qs_xbzrle_decode(ok, sizeof(ok), page, sizeof(page)) == 8);
    CHECK(page[4] == 'h' && page[5] == 'i' && page[6] == 0xaa && page[7] == '!');
    const uint8_t zero_nz[] = {0, 0};
    CHECK(qs_xbzrle_decode(zero_nz, 2, page, sizeof(page)) < 0);
    const uint8_t overflow[] = {0xff, 0x1f, 2, 1, 2};   /* zrun 4095 + 2 > 4096 */
    CHECK(qs_xbzrle_decode(overflow, sizeof(overflow), page, sizeof(page)) < 0);
    /* random garbage never crashes or overreads */
    for (int it = 0; it < 20000; it++) {
        size_t n = rnd() % 64;
        uint8_t *src = malloc(n ? n : 1);
        for (size_t i = 0; i < n; i++)
            src[i] = (uint8_t)(rnd() % 4 == 0 ? rnd() : rnd() % 8);
        long r = qs_xbzrle_decode(src, n, page, sizeof(page));
        CHECK(r <= 4096);
        free(src);
    }
}

/* Host offsets of all the sink's clusters (malloc'd). */
static uint64_t *host_map_of(qs_sink *s)
{
    qs_sink_err err;
    uint64_t n = qs_sink_n_clusters(s);
    uint64_t *host = malloc((n ? n : 1) * sizeof(uint64_t));
    CHECK(host != NULL);
    CHECK(qs_sink_read_hosts(s, 0, n, host, &err) == QS_SINK_OK);
    return host;
}

static void test_sink(void)
{
    char path[] = "/tmp/qsnap-native-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    const uint32_t cs = 1 << 16, ps = 4096;
    const uint64_t vsize = 16 * (uint64_t)cs;
    uint8_t *hdr = calloc(1, cs);
    CHECK(pwrite(fd, hdr, cs, 0) == (ssize_t)cs);
    free(hdr);
    qs_sink *s = sink_new(fd, vsize, cs, ps, 2, cs, 0);
    CHECK(s != NULL);
    uint64_t offs[2] = {0, 8 * (uint64_t)cs}, lens[2] = {8 * (uint64_t)cs, 3 * (uint64_t)cs};
    qs_sink_err err;
    CHECK(qs_sink_set_blocks(s, offs, lens, 2, &err) == 0);
    uint64_t bad_off = ps;
    CHECK(qs_sink_set_blocks(s, &bad_off, lens, 1, &err) == QS_SINK_EINVAL);
    CHECK(err.status == QS_SINK_EINVAL && err.block == 0 && err.offset == ps);
    uint8_t *model = calloc(1, vsize);
    uint8_t *data = malloc(64 * ps);
    qs_sink_rec recs[64];
    for (int round = 0; round < 200; round++) {
        size_t n = 1 + rnd() % 64;
        memset(recs, 0, sizeof(recs));
        for (size_t i = 0; i < n; i++) {
            uint32_t b = (uint32_t)(rnd() % 2);
            uint64_t np = lens[b] / ps;
            uint64_t off = (rnd() % np) * ps;
            recs[i].block = b;
            recs[i].offset = off;
            uint8_t *m = model + offs[b] + off;
            int kind = (int)(rnd() % 4);
            if (kind == 0) {
                recs[i].flags = QS_RAM_FLAG_ZERO;
                memset(m, 0, ps);
            } else if (kind == 1) {
                recs[i].flags = QS_RAM_FLAG_ZERO | QS_RAM_FLAG_CONTINUE;
                recs[i].fill = 0x5c;
                memset(m, 0x5c, ps);
            } else {
                recs[i].flags = QS_RAM_FLAG_PAGE;
                recs[i].data_pos = i * ps;
                recs[i].data_len = ps;
                uint8_t *d = data + i * ps;
                memset(d, 0, ps);
                d[rnd() % ps] = (uint8_t)(1 + rnd() % 255);
                if (kind == 3)
                    memset(d, 0, ps); /* an all-zero PAGE */
                memcpy(m, d, ps);
            }
        }
        /* data buffer of exactly n pages */
        uint8_t *exact = malloc(n * ps);
        memcpy(exact, data, n * ps);
        CHECK(qs_sink_put_batch(s, recs, n, exact, n * ps, NULL, 0, &err) == 0);
        free(exact);
    }
    /* bad records */
    qs_sink_rec bad = {0};
    bad.flags = QS_RAM_FLAG_PAGE;
    bad.data_pos = 1;
    bad.data_len = ps;
    uint8_t *one = malloc(ps);
    memset(one, 1, ps);
    CHECK(qs_sink_put_batch(s, &bad, 1, one, ps, NULL, 0, &err) == QS_SINK_EDATA);
    bad.data_pos = 0;
    bad.offset = lens[0];
    CHECK(qs_sink_put_batch(s, &bad, 1, one, ps, NULL, 0, &err) == QS_SINK_ERANGE);
    bad.offset = 0;
    bad.block = 5;
    CHECK(qs_sink_put_batch(s, &bad, 1, one, ps, NULL, 0, &err) == QS_SINK_EBLOCK);
    bad.block = 0;
    bad.flags = QS_RAM_FLAG_COMPRESS_PAGE;
    CHECK(qs_sink_put_batch(s, &bad, 1, one, ps, NULL, 0, &err) == QS_SINK_EUNSUPPORTED);
    free(one);

    CHECK(qs_sink_flush(s, &err) == 0);
    uint64_t *host = host_map_of(s);
    uint8_t *buf = malloc(cs);
    for (uint64_t c = 0; c < vsize / cs; c++) {
        if (host[c]) {
            CHECK(pread(fd, buf, cs, (off_t)host[c]) == (ssize_t)cs);
        } else {
            memset(buf, 0, cs);
        }
        CHECK(memcmp(buf, model + c * cs, cs) == 0);
    }
    qs_sink_stats st;
    qs_sink_get_stats(s, &st);
    CHECK(st.append_offset == (uint64_t)lseek(fd, 0, SEEK_END));
    CHECK(st.append_offset % cs == 0);
    free(host);
    free(buf);
    free(model);
    free(data);
    qs_sink_free(s);
    close(fd);
    qs_sink *none = (qs_sink *)1;
    CHECK(qs_sink_new(&none, -1, vsize, cs, ps, 2, cs, 0, &err) == QS_SINK_EINVAL);
    CHECK(none == NULL && err.errnum == EBADF && err.value == (uint64_t)-1);
    CHECK(qs_sink_new(&none, 0, vsize, 3 * cs, ps, 2, cs, 0, &err) == QS_SINK_EINVAL);
    CHECK(none == NULL && err.value == 3 * cs);
    CHECK(qs_sink_new(&none, 0, vsize, cs, ps, 0, cs, 0, &err) == QS_SINK_EINVAL);
    CHECK(err.value == 0);
}

/* A fresh unlinked temporary file, its first cluster taken (as by an image header). */
static int temp_image(uint32_t cs)
{
    char path[] = "/tmp/qsnap-native-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    uint8_t *hdr = calloc(1, cs);
    CHECK(pwrite(fd, hdr, cs, 0) == (ssize_t)cs);
    free(hdr);
    return fd;
}

/* Like temp_image, in $TMPDIR (else /tmp), also opened with O_DIRECT into
 * *direct_fd; -1 there if the filesystem refuses O_DIRECT. */
static int temp_image_direct(uint32_t cs, int *direct_fd)
{
    const char *dir = getenv("TMPDIR");
    char path[4096];
    snprintf(path, sizeof(path), "%s/qsnap-native-XXXXXX", dir && *dir ? dir : "/tmp");
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    uint8_t *hdr = calloc(1, cs);
    CHECK(pwrite(fd, hdr, cs, 0) == (ssize_t)cs);
    free(hdr);
    *direct_fd = open(path, O_RDWR | O_DIRECT);
    CHECK(*direct_fd >= 0 || errno == EINVAL);
    unlink(path);
    return fd;
}

/* The file, read through the host map, equals the model; the counters add up. */
static void check_image(int fd, qs_sink *s, const uint8_t *model, uint64_t vsize, uint32_t cs,
                        uint32_t ps)
{
    uint64_t *host = host_map_of(s);
    uint8_t *buf = malloc(cs);
    uint64_t allocated = 0;
    for (uint64_t c = 0; c < vsize / cs; c++) {
        if (host[c]) {
            allocated++;
            CHECK(pread(fd, buf, cs, (off_t)host[c]) == (ssize_t)cs);
        } else {
            memset(buf, 0, cs);
        }
        CHECK(memcmp(buf, model + c * cs, cs) == 0);
    }
    free(host);
    free(buf);
    qs_sink_stats st;
    qs_sink_get_stats(s, &st);
    CHECK(st.clusters_written == allocated);
    CHECK(st.bytes_written == st.clusters_written * cs + st.page_rewrites * ps);
    CHECK(st.append_offset == (uint64_t)lseek(fd, 0, SEEK_END));
}

/* Many evictions through one or two slots, the writer queue kept full:
 * clusters filled in order, with rewrites, zero and fill pages and XBZRLE
 * deltas landing in clusters already queued or written, and reads of them. */
static void test_sink_queue_stress(uint32_t n_slots, int direct)
{
    const uint32_t cs = 1 << 16, ps = 4096, ppc = cs / ps;
    const uint64_t n_clusters = 1500, vsize = n_clusters * cs;
    /* direct: the sink writes through an O_DIRECT fd (two writers), checks
     * read through the buffered one */
    int dfd = -1;
    int fd = direct ? temp_image_direct(cs, &dfd) : temp_image(cs);
    if (direct && dfd < 0) {
        printf("skipped: O_DIRECT stress (the filesystem refuses O_DIRECT)\n");
        close(fd);
        return;
    }
    qs_sink *s = sink_new(direct ? dfd : fd, vsize, cs, ps, n_slots, cs, direct);
    CHECK(s != NULL);
    uint64_t off0 = 0, len0 = vsize;
    qs_sink_err err;
    int spill = temp_image(cs);   /* page state beyond the few chunks in memory */
    CHECK(qs_sink_set_spill(s, spill, &err) == 0);
    CHECK(qs_sink_set_blocks(s, &off0, &len0, 1, &err) == 0);
    uint8_t *model = calloc(1, vsize);
    uint8_t *data = malloc(8 * ps);
    uint8_t *page = malloc(ps);
    qs_sink_rec recs[8];
    uint64_t written = 0;
    for (uint64_t c = 0; c < n_clusters; c++) {
        size_t n = 0, pos = 0;
        memset(recs, 0, sizeof(recs));
        for (int k = 0, m = 1 + (int)(rnd() % 3); k < m; k++) {
            uint64_t voff = c * cs + (rnd() % ppc) * ps;
            uint8_t *d = data + pos;
            for (uint32_t i = 0; i < ps; i += 8) {
                uint64_t v = rnd() | 1;
                memcpy(d + i, &v, 8);
            }
            memcpy(model + voff, d, ps);
            recs[n++] = (qs_sink_rec){.offset = voff, .data_pos = pos, .data_len = ps,
                                      .flags = QS_RAM_FLAG_PAGE};
            pos += ps;
        }
        if (c > 0) {
            /* one page of an earlier cluster: often one of the last few,
             * likely still queued, else any */
            uint64_t back = rnd() & 1 ? 1 + rnd() % (c < 4 ? c : 4) : 1 + rnd() % c;
            uint64_t voff = (c - back) * cs + (rnd() % ppc) * ps;
            uint8_t *m = model + voff;
            int kind = (int)(rnd() % 4);
            qs_sink_rec *r = &recs[n++];
            r->offset = voff;
            if (kind == 0) {
                r->flags = QS_RAM_FLAG_ZERO;
                memset(m, 0, ps);
            } else if (kind == 1) {
                r->flags = QS_RAM_FLAG_ZERO | QS_RAM_FLAG_CONTINUE;
                r->fill = (uint8_t)(1 + rnd() % 255);
                memset(m, r->fill, ps);
            } else if (kind == 2) {
                r->flags = QS_RAM_FLAG_PAGE;
                r->data_pos = pos;
                r->data_len = ps;
                memset(data + pos, 0, ps);
                data[pos + rnd() % ps] = (uint8_t)(1 + rnd() % 255);
                memcpy(m, data + pos, ps);
                pos += ps;
            } else {
                /* XBZRLE: keep `at` bytes, replace 4: the sink reads the old page back */
                uint8_t at = (uint8_t)(rnd() % 128);
                uint8_t *e = data + pos;
                e[0] = at;
                e[1] = 4;
                for (int i = 0; i < 4; i++)
                    e[2 + i] = m[at + i] = (uint8_t)rnd();
                r->flags = QS_RAM_FLAG_XBZRLE;
                r->data_pos = pos;
                r->data_len = 6;
                pos += 6;
            }
        }
        CHECK(qs_sink_put_batch(s, recs, n, data, pos, NULL, 0, &err) == 0);
        if (c % 8 == 7) {
            /* a page of a cluster just evicted */
            uint64_t voff = (c - rnd() % 2) * cs + (rnd() % ppc) * ps;
            CHECK(qs_sink_get(s, voff, page, &err) == 0);
            CHECK(memcmp(page, model + voff, ps) == 0);
        }
        /* while the writer runs */
        qs_sink_stats st;
        qs_sink_get_stats(s, &st);
        CHECK(st.bytes_written >= written && st.bytes_written <= st.append_offset - cs +
                                                                  st.page_rewrites * ps);
        written = st.bytes_written;
    }
    CHECK(qs_sink_flush(s, &err) == 0);
    qs_sink_stats st;
    qs_sink_get_stats(s, &st);
    CHECK(st.clusters_written > n_clusters - 10);
    CHECK(st.page_rewrites > 100);
    check_image(fd, s, model, vsize, cs, ps);
    free(page);
    free(data);
    free(model);
    qs_sink_free(s);
    close(spill);
    if (dfd >= 0)
        close(dfd);
    close(fd);
}

/* Put one non-zero page into each of clusters first..first+n-1; stops at the
 * first error and returns its status. */
static int fill_clusters(qs_sink *s, uint64_t first, uint64_t n, uint32_t cs, qs_sink_err *err)
{
    uint8_t page[4096];
    memset(page, 0x11, sizeof(page));
    for (uint64_t c = first; c < first + n; c++) {
        int rc = qs_sink_put(s, c * cs, page, 0, err);
        if (rc)
            return rc;
    }
    return 0;
}

static void check_write_error(const qs_sink_err *err, int errnum, uint64_t host_off,
                              uint64_t voff, uint64_t len)
{
    CHECK(err->status == QS_SINK_EWRITE);
    CHECK(err->errnum == errnum);
    CHECK(err->host_off == host_off);
    CHECK(err->voff == voff);
    CHECK(err->value == len);
}

/* A write failing on the writer thread is reported, with the failing job's
 * offsets, by flush and then by every call; nothing hangs. */
/* Parent mode: a child over a parent file (clusters at shuffled-free but
 * offset host positions); a stream sends every page, the same as the parent
 * except in some clusters (one page changed, or all zero), some pages twice.
 * Through the chain the child reads as the model; only changed clusters are
 * written.  direct: the child through O_DIRECT (two writers), the parent
 * buffered. */
static void test_sink_parent(int direct)
{
    const uint32_t cs = 1 << 16, ps = 4096, ppc = cs / ps;
    const uint64_t n_clusters = 300, vsize = n_clusters * cs;
    int dfd = -1;
    int fd = direct ? temp_image_direct(cs, &dfd) : temp_image(cs);
    if (direct && dfd < 0) {
        printf("skipped: O_DIRECT parent mode (the filesystem refuses O_DIRECT)\n");
        close(fd);
        return;
    }
    int pfd = temp_image(cs);
    uint8_t *parent = calloc(1, vsize), *model = calloc(1, vsize);
    uint64_t *virt = malloc(n_clusters * sizeof(uint64_t));
    uint64_t *phost = malloc(n_clusters * sizeof(uint64_t));
    uint32_t *src = calloc(n_clusters, sizeof(uint32_t));
    uint64_t n_par = 0;
    for (uint64_t c = 0; c < n_clusters; c++) {
        if (c % 5 == 4)
            continue;   /* the parent has nothing there */
        for (uint64_t i = 0; i < cs; i += 8) {
            uint64_t v = (i / ps) % 3 == 2 ? 0 : rnd() | 1;   /* some zero pages */
            memcpy(parent + c * cs + i, &v, 8);
        }
        virt[n_par] = c;
        phost[n_par] = (n_clusters - c) * cs;   /* host order is not virtual order */
        CHECK(pwrite(pfd, parent + c * cs, cs, (off_t)phost[n_par]) == (ssize_t)cs);
        n_par++;
    }
    memcpy(model, parent, vsize);
    qs_sink *s = sink_new(direct ? dfd : fd, vsize, cs, ps, 2, cs, direct);
    CHECK(s != NULL);
    qs_sink_err err;
    int spill = temp_image(cs);
    uint64_t off0 = 0, len0 = vsize;
    CHECK(qs_sink_set_spill(s, spill, &err) == 0);
    CHECK(qs_sink_set_blocks(s, &off0, &len0, 1, &err) == 0);
    CHECK(qs_sink_set_parent(s, &pfd, 1, virt, src, phost, n_par, &err) == 0);
    uint64_t changed = 0;
    for (uint64_t c = 0; c < n_clusters; c++) {
        if (c % 7 == 3) {   /* one page changed */
            uint64_t v = rnd() | 1;
            memcpy(model + c * cs + (rnd() % ppc) * ps, &v, 8);
            changed++;
        } else if (c % 11 == 5) {   /* all zero */
            memset(model + c * cs, 0, cs);
        }
        for (uint32_t k = 0; k < ppc; k++) {
            uint64_t voff = c * cs + (uint64_t)k * ps;
            const uint8_t *d = model + voff;
            CHECK(qs_sink_put(s, voff, qs_is_zero(d, ps) ? NULL : d, 0, &err) == 0);
            if (rnd() % 8 == 0 && c) {   /* a page of an earlier cluster again */
                uint64_t back = voff - cs;
                CHECK(qs_sink_put(s, back, qs_is_zero(model + back, ps) ? NULL : model + back,
                                  0, &err) == 0);
            }
        }
    }
    CHECK(qs_sink_flush(s, &err) == 0);
    uint64_t *host = host_map_of(s);
    uint8_t *buf = malloc(cs);
    uint64_t written = 0;
    for (uint64_t c = 0; c < n_clusters; c++) {
        if (host[c] >= cs) {
            CHECK(pread(fd, buf, cs, (off_t)host[c]) == (ssize_t)cs);
            written++;
        } else if (host[c] == QS_SINK_HOST_ZERO) {
            memset(buf, 0, cs);
        } else {
            memcpy(buf, parent + c * cs, cs);
        }
        CHECK(memcmp(buf, model + c * cs, cs) == 0);
    }
    CHECK(written <= changed);
    qs_sink_stats st;
    qs_sink_get_stats(s, &st);
    CHECK(st.clusters_written == written);
    CHECK(st.clusters_inherited > 0 && st.clusters_zeroed > 0);
    qs_sink_free(s);
    free(buf);
    free(host);
    free(parent);
    free(model);
    free(virt);
    free(phost);
    free(src);
    close(spill);
    close(pfd);
    if (dfd >= 0)
        close(dfd);
    close(fd);
}

static void test_sink_write_errors(void)
{
    const uint32_t cs = 1 << 16, ps = 4096;
    const uint64_t vsize = 64 * (uint64_t)cs;
    uint8_t page[4096];
    memset(page, 0x22, sizeof(page));
    qs_sink_err err;

    /* read-only fd: the first cluster write fails EBADF */
    char path[] = "/tmp/qsnap-native-XXXXXX";
    int wfd = mkstemp(path);
    CHECK(wfd >= 0);
    int rofd = open(path, O_RDONLY);
    CHECK(rofd >= 0);
    unlink(path);
    qs_sink *s = sink_new(rofd, vsize, cs, ps, 1, cs, 0);
    CHECK(s != NULL);
    int rc = fill_clusters(s, 0, 64, cs, &err);
    CHECK(rc == 0 || rc == QS_SINK_EWRITE);
    memset(&err, 0, sizeof(err));
    CHECK(qs_sink_flush(s, &err) == QS_SINK_EWRITE);
    check_write_error(&err, EBADF, cs, 0, cs);
    memset(&err, 0, sizeof(err));
    CHECK(qs_sink_put(s, 5 * cs, page, 0, &err) == QS_SINK_EWRITE);
    check_write_error(&err, EBADF, cs, 0, cs);
    CHECK(qs_sink_put(s, 5 * cs, NULL, 0, &err) == QS_SINK_EWRITE);
    CHECK(qs_sink_get(s, 0, page, &err) == QS_SINK_EWRITE);
    qs_sink_rec zero = {.flags = QS_RAM_FLAG_ZERO};
    uint64_t off0 = 0;
    CHECK(qs_sink_put_batch(s, &zero, 1, page, 0, &off0, 1, &err) == QS_SINK_EWRITE);
    memset(&err, 0, sizeof(err));
    CHECK(qs_sink_flush(s, &err) == QS_SINK_EWRITE);
    check_write_error(&err, EBADF, cs, 0, cs);
    qs_sink_stats st;
    qs_sink_get_stats(s, &st);
    CHECK(st.bytes_written == 0);
    qs_sink_free(s);

    /* file size limit: the clusters below it are written, the first one at it
     * fails EFBIG, and an in-place rewrite queued behind it is dropped */
    struct rlimit old_lim, lim;
    CHECK(getrlimit(RLIMIT_FSIZE, &old_lim) == 0);
    signal(SIGXFSZ, SIG_IGN);
    lim = old_lim;
    lim.rlim_cur = 4 * (rlim_t)cs;
    CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0);
    s = sink_new(wfd, vsize, cs, ps, 1, cs, 0);
    CHECK(s != NULL);
    CHECK(fill_clusters(s, 10, 3, cs, &err) == 0);   /* clusters 10, 11 queued: at cs, 2 cs */
    CHECK(qs_sink_flush(s, &err) == 0);                /* 12 at 3 cs */
    CHECK(qs_sink_get(s, 11 * (uint64_t)cs, page, &err) == 0 && page[0] == 0x11);
    rc = fill_clusters(s, 20, 2, cs, &err);            /* 20 at 4 cs: EFBIG */
    CHECK(rc == 0 || rc == QS_SINK_EWRITE);
    if (rc == 0)
        rc = qs_sink_put(s, 10 * (uint64_t)cs + ps, page, 0, &err);   /* rewrite queued */
    CHECK(rc == 0 || rc == QS_SINK_EWRITE);
    memset(&err, 0, sizeof(err));
    CHECK(qs_sink_flush(s, &err) == QS_SINK_EWRITE);
    check_write_error(&err, EFBIG, 4 * (uint64_t)cs, 20 * (uint64_t)cs, cs);
    qs_sink_get_stats(s, &st);
    CHECK(st.bytes_written == 3 * (uint64_t)cs);
    qs_sink_free(s);
    CHECK(setrlimit(RLIMIT_FSIZE, &old_lim) == 0);
    signal(SIGXFSZ, SIG_DFL);

    /* /dev/full: ENOSPC */
    int full = open("/dev/full", O_RDWR);
    if (full >= 0) {
        s = sink_new(full, vsize, cs, ps, 2, cs, 0);
        CHECK(s != NULL);
        CHECK(qs_sink_put(s, 3 * (uint64_t)cs, page, 0, &err) == 0);
        CHECK(qs_sink_flush(s, &err) == QS_SINK_EWRITE);
        check_write_error(&err, ENOSPC, cs, 3 * (uint64_t)cs, cs);
        qs_sink_free(s);
        close(full);
    }
    close(rofd);
    close(wfd);
}

/* qs_sink_free with writes still queued, after an error or not: no hang, no
 * leak (ASan), nothing written after it returns. */
static void test_sink_free_with_queued_jobs(void)
{
    const uint32_t cs = 1 << 16, ps = 4096;
    const uint64_t vsize = 256 * (uint64_t)cs;
    qs_sink_err err;
    for (int round = 0; round < 20; round++) {
        char path[] = "/tmp/qsnap-native-XXXXXX";
        int fd = mkstemp(path);
        CHECK(fd >= 0);
        int rofd = open(path, O_RDONLY);
        CHECK(rofd >= 0);
        unlink(path);
        int failing = round & 1;
        qs_sink *s = sink_new(failing ? rofd : fd, vsize, cs, ps, 1 + round % 3, cs, 0);
        CHECK(s != NULL);
        int rc = fill_clusters(s, 0, 256, cs, &err);
        CHECK(rc == 0 || (failing && rc == QS_SINK_EWRITE));
        /* in-place rewrites of the first clusters, queued behind them */
        uint8_t page[4096];
        memset(page, 0x33, sizeof(page));
        for (int i = 0; i < 40 && rc == 0; i++)
            rc = qs_sink_put(s, (uint64_t)(i % 8) * cs + ps, page, 0, &err);
        qs_sink_free(s);
        /* the writer is gone: the file no longer grows */
        off_t size = lseek(fd, 0, SEEK_END);
        usleep(1000);
        CHECK(lseek(fd, 0, SEEK_END) == size);
        CHECK(size <= 256 * (off_t)cs + cs);
        close(rofd);
        close(fd);
    }
}

/* Parse ``len`` bytes copied into an exact-size heap buffer (any overread is an
 * ASan error); the parser must return a status and stay inside the buffer. */
static int parse_exact(qs_ram_state *st, const uint8_t *src, size_t len, size_t *consumed)
{
    uint8_t *b = malloc(len ? len : 1);
    qs_page_rec out[16];
    size_t n = 0;
    memcpy(b, src, len);
    int rc = qs_ram_parse(st, b, len, out, 16, &n, consumed);
    CHECK(*consumed <= len);
    CHECK(n <= 16);
    for (size_t i = 0; i < n; i++)
        CHECK(out[i].data_pos + out[i].data_len <= len);
    free(b);
    return rc;
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (56 - 8 * i));
}

static void test_ramparse(void)
{
    static qs_block blocks[2];
    memset(blocks, 0, sizeof(blocks));
    blocks[0].idlen = 6;
    memcpy(blocks[0].idstr, "pc.ram", 6);
    blocks[0].length = 1 << 20;
    blocks[1].idlen = 7;
    memcpy(blocks[1].idstr, "pc.bios", 7);
    blocks[1].length = 1 << 18;
    const uint32_t ps = 4096;
    uint8_t rec[3 * 4096 + 256];
    size_t len = 0;
    /* PAGE with idstr, ZERO with CONTINUE, XBZRLE, COMPRESS_PAGE, PAGE in block 1, EOS */
    put64(rec + len, 0x3000 | 0x008); len += 8;
    rec[len++] = 6; memcpy(rec + len, "pc.ram", 6); len += 6;
    memset(rec + len, 0xab, ps); len += ps;
    put64(rec + len, 0x4000 | 0x002 | 0x020); len += 8;
    rec[len++] = 0x5a;
    put64(rec + len, 0x5000 | 0x040 | 0x020); len += 8;
    rec[len++] = 1; rec[len++] = 0; rec[len++] = 4;
    memcpy(rec + len, "\x00\x01\x02\x03", 4); len += 4;
    put64(rec + len, 0x6000 | 0x100 | 0x020); len += 8;
    rec[len++] = 0; rec[len++] = 0; rec[len++] = 0; rec[len++] = 5;
    memcpy(rec + len, "zzzzz", 5); len += 5;
    put64(rec + len, 0x1000 | 0x008); len += 8;
    rec[len++] = 7; memcpy(rec + len, "pc.bios", 7); len += 7;
    memset(rec + len, 0xcd, ps); len += ps;
    put64(rec + len, 0x010); len += 8;

    qs_ram_state st;
    size_t consumed;
    memset(&st, 0, sizeof(st));
    st.blocks = blocks; st.n_blocks = 2; st.last_block = -1; st.page_size = ps;
    CHECK(parse_exact(&st, rec, len, &consumed) == QS_RAM_EOS && consumed == len);
    /* every truncation: NEED_MORE (never an error, never past the end) */
    for (size_t k = 0; k < len; k++) {
        memset(&st, 0, sizeof(st));
        st.blocks = blocks; st.n_blocks = 2; st.last_block = -1; st.page_size = ps;
        CHECK(parse_exact(&st, rec, k, &consumed) == QS_RAM_NEED_MORE);
    }
    /* random byte and bit mutations, random lengths, no block list */
    uint8_t *m = malloc(len);
    for (int it = 0; it < 20000; it++) {
        memcpy(m, rec, len);
        for (int j = 0, nm = 1 + (int)(rnd() % 4); j < nm; j++) {
            size_t at = rnd() % len;
            if (rnd() & 1)
                m[at] ^= (uint8_t)(1u << (rnd() % 8));
            else
                m[at] = (uint8_t)rnd();
        }
        memset(&st, 0, sizeof(st));
        st.blocks = blocks; st.n_blocks = (it % 7) ? 2 : 0;
        st.last_block = (it % 5) ? -1 : 7; /* stale index past the list */
        st.page_size = (it % 3) ? ps : 512;
        int rc = parse_exact(&st, m, rnd() % (len + 1), &consumed);
        CHECK(rc >= QS_RAM_ERR && rc <= QS_RAM_MEMSIZE);
    }
    free(m);
}

/* --- interrupt hooks (intr.h) ------------------------------------------------ */

typedef struct hook_state {
    int calls;
    int stop_every;   /* 0: never stop */
} hook_state;

static int count_hook(void *ctx)
{
    hook_state *h = ctx;
    h->calls++;
    return h->stop_every && h->calls % h->stop_every == 0;
}

/* A slice of 0: the hook is asked whenever a wait would block. */
static qs_intr hook(hook_state *h)
{
    qs_intr i = {count_hook, h, 0};
    return i;
}

/* --- aio: the ordered read-ahead ring ------------------------------------------- */

/* An unlinked temporary file of `size` random bytes; a copy in *model. */
static int temp_data(size_t size, uint8_t **model)
{
    char path[] = "/tmp/qsnap-native-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    *model = malloc(size);
    for (size_t i = 0; i < size; i++)
        (*model)[i] = (uint8_t)rnd();
    CHECK(pwrite(fd, *model, size, 0) == (ssize_t)size);
    return fd;
}

/* Read every extent through a ring, resuming after each QS_AIO_EINTR; the
 * chunks come in extent order with the file's bytes. */
static void read_ring(int fd, const qs_extent *ext, size_t n, const uint8_t *model,
                      unsigned n_bufs, unsigned n_threads)
{
    qs_aio *a = NULL;
    qs_aio_err err;
    memset(&err, 0, sizeof(err));
    CHECK(qs_aio_open(&a, fd, ext, n, 1 << 18, n_bufs, n_threads, &err) == QS_AIO_OK);
    if (!a)
        return;
    hook_state h = {0, 2};
    qs_intr in = hook(&h);
    qs_aio_set_intr(a, &in);
    size_t next = 0;
    int stops = 0;
    for (;;) {
        qs_aio_chunk c;
        memset(&err, 0, sizeof(err));
        int rc = qs_aio_next(a, &c, &err);
        if (rc == QS_AIO_EINTR) {
            CHECK(err.sys_errno == EINTR && err.offset == ext[next].offset);
            stops++;
            continue;
        }
        if (rc == QS_AIO_END)
            break;
        CHECK(rc == QS_AIO_OK);
        if (rc != QS_AIO_OK)
            break;
        CHECK(c.first_extent == next && c.offset == ext[next].offset);
        size_t pos = 0;
        for (size_t j = 0; j < c.n_extents; j++) {
            const qs_extent *x = &ext[c.first_extent + j];
            CHECK(memcmp(c.data + pos, model + x->offset, x->length) == 0);
            pos += x->length;
        }
        CHECK(pos == c.length);
        next += c.n_extents;
        CHECK(qs_aio_release(a, &err) == QS_AIO_OK);
    }
    CHECK(next == n);
    CHECK(stops == h.calls / 2);
    printf("aio %u bufs %u threads: %d waits cut short by the hook\n", n_bufs, n_threads, stops);
    qs_aio_close(a);
}

static void test_aio(void)
{
    const size_t size = 4 << 20;
    uint8_t *model;
    int fd = temp_data(size, &model);
    /* 48 extents: runs of adjacent ones (coalesced), gaps and jumps back */
    qs_extent ext[48];
    uint64_t off = 0;
    for (int i = 0; i < 48; i++) {
        uint64_t len = 4096 * (1 + rnd() % 32);
        if (i % 4 == 0)
            off = (rnd() % (size / 4096 - 64)) * 4096;
        ext[i].offset = off;
        ext[i].length = len;
        off += len;
        if (off + 32 * 4096 > size)
            off = 0;
    }
    read_ring(fd, ext, 48, model, 1, 1);
    read_ring(fd, ext, 48, model, 4, 3);
    read_ring(fd, ext, 48, model, 16, 8);

    qs_aio *a = NULL;
    qs_aio_err err;
    qs_aio_chunk c;
    /* a read past the end fails after the reads before it, in order */
    qs_extent past[2] = {{0, 4096}, {size - 4096, 8192}};
    CHECK(qs_aio_open(&a, fd, past, 2, 1 << 16, 2, 2, &err) == QS_AIO_OK);
    CHECK(qs_aio_next(a, &c, &err) == QS_AIO_OK && memcmp(c.data, model, 4096) == 0);
    CHECK(qs_aio_release(a, &err) == QS_AIO_OK);
    memset(&err, 0, sizeof(err));
    CHECK(qs_aio_next(a, &c, &err) == QS_AIO_ESHORT);
    CHECK(err.offset == size && err.value == 4096);
    qs_aio_close(a);
    /* a closed descriptor: EIO with EBADF at the first offset */
    int gone = dup(fd);
    close(gone);
    CHECK(qs_aio_open(&a, gone, past, 1, 1 << 16, 2, 2, &err) == QS_AIO_OK);
    memset(&err, 0, sizeof(err));
    CHECK(qs_aio_next(a, &c, &err) == QS_AIO_EIO);
    CHECK(err.sys_errno == EBADF && err.offset == 0);
    qs_aio_close(a);
    /* misuse, cancel, bad parameters */
    CHECK(qs_aio_open(&a, fd, ext, 48, 1 << 18, 4, 2, &err) == QS_AIO_OK);
    CHECK(qs_aio_release(a, &err) == QS_AIO_ESTATE);
    CHECK(qs_aio_next(a, &c, &err) == QS_AIO_OK);
    CHECK(qs_aio_next(a, &c, &err) == QS_AIO_ESTATE);
    qs_aio_cancel(a);
    CHECK(qs_aio_release(a, &err) == QS_AIO_OK);
    CHECK(qs_aio_next(a, &c, &err) == QS_AIO_ECANCELED);
    qs_aio_close(a);
    CHECK(qs_aio_open(&a, fd, ext, 48, 100, 4, 2, &err) == QS_AIO_EINVAL && err.value == 100);
    CHECK(a == NULL);
    qs_extent big = {0, 1 << 20};
    CHECK(qs_aio_open(&a, fd, &big, 1, 1 << 16, 4, 2, &err) == QS_AIO_EINVAL);
    CHECK(err.value == big.length);
    free(model);
    close(fd);
}

/* --- emit: PAGE/ZERO records written with writev -------------------------------- */

typedef struct sink_reader {
    int fd;
    uint8_t *buf;
    size_t len, cap;
} sink_reader;

/* Read the pipe to its end in odd sizes, pausing now and then so the
 * writer finds it full. */
static void *read_slowly(void *arg)
{
    sink_reader *r = arg;
    for (int i = 0;; i++) {
        if (r->len + 7000 > r->cap) {
            r->cap = r->cap * 2 + 7000;
            r->buf = realloc(r->buf, r->cap);
        }
        ssize_t n = read(r->fd, r->buf + r->len, 7000);
        if (n <= 0)
            break;
        r->len += (size_t)n;
        if (i % 64 == 0)
            usleep(2000);
    }
    return NULL;
}

static size_t put_rec_header(uint8_t *p, uint64_t word, int with_id)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(word >> (56 - 8 * i));
    if (!with_id)
        return 8;
    p[8] = 6;
    memcpy(p + 9, "pc.ram", 6);
    return 15;
}

static void test_emit(void)
{
    const uint32_t ps = 4096, np = 64;
    uint8_t *data = calloc(np, ps), bm[8] = {0};
    uint32_t crcs[64] = {0};
    for (uint32_t i = 0; i < np; i++) {
        if (rnd() % 3 == 0)
            continue;
        bm[i / 8] |= (uint8_t)(1u << (i % 8));
        for (uint32_t k = 0; k < ps; k++)
            data[(size_t)i * ps + k] = (uint8_t)rnd();
        crcs[i] = qs_crc32c(0, data + (size_t)i * ps, ps);
    }
    qs_emit_block b = {0, 6, (const uint8_t *)"pc.ram", 0, (uint64_t)np * ps, np, bm, crcs, 0, 0};

    /* the expected stream: "HDR", PAGE records of stored pages, ZERO records of the others */
    uint8_t *want = malloc(3 + (size_t)np * (15 + ps));
    size_t wl = 0;
    memcpy(want, "HDR", 3);
    wl = 3;
    int first = 1;
    for (uint32_t i = 0; i < np; i++) {
        if (!(bm[i / 8] >> (i % 8) & 1))
            continue;
        wl += put_rec_header(want + wl, (uint64_t)i * ps | QS_RAM_SAVE_FLAG_PAGE |
                             (first ? 0 : QS_RAM_SAVE_FLAG_CONTINUE), first);
        first = 0;
        memcpy(want + wl, data + (size_t)i * ps, ps);
        wl += ps;
    }
    for (uint32_t i = 0; i < np; i++) {
        if (bm[i / 8] >> (i % 8) & 1)
            continue;
        wl += put_rec_header(want + wl, (uint64_t)i * ps | QS_RAM_SAVE_FLAG_ZERO |
                             QS_RAM_SAVE_FLAG_CONTINUE, 0);
        want[wl++] = 0;
    }

    /* through a pipe read slowly: non-blocking while the emitter lives, the
     * hook asked while it waits for the reader, nothing lost or reordered */
    int p[2];
    CHECK(pipe(p) == 0);
    sink_reader rd = {p[0], NULL, 0, 0};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, read_slowly, &rd) == 0);
    qs_emit e;
    qs_emit_err err;
    memset(&err, 0, sizeof(err));
    CHECK(qs_emit_init(&e, p[1], ps, &err) == QS_EMIT_OK);
    CHECK(fcntl(p[1], F_GETFL) & O_NONBLOCK);
    hook_state h = {0, 0};
    qs_intr in = hook(&h);
    qs_emit_set_intr(&e, &in);
    CHECK(qs_emit_bytes(&e, "HDR", 3, &err) == QS_EMIT_OK);
    for (uint32_t c = 0; c < np; c += 16) {
        /* odd clusters through a window of the state holding only their pages */
        qs_emit_block w = b;
        if (c / 16 % 2) {
            w.state_first = c;
            w.state_end = c + 16;
            w.bitmap = bm + c / 8;
            w.crcs = crcs + c;
            uint64_t out_before = e.bytes_out;
            CHECK(qs_emit_cluster(&e, &w, (uint64_t)(c - 16) * ps, data, 16 * ps, &err) ==
                  QS_EMIT_EINVAL);   /* pages outside the window */
            CHECK(e.bytes_out == out_before);
        }
        CHECK(qs_emit_cluster(&e, &w, (uint64_t)c * ps, data + (size_t)c * ps, 16 * ps, &err) == QS_EMIT_OK);
    }
    qs_emit_block half = b;   /* zero records from two windows of the bitmap */
    half.state_first = 0;
    half.state_end = np / 2;
    CHECK(qs_emit_zero_range(&e, &half, 0, np / 2, &err) == QS_EMIT_OK);
    half.state_first = np / 2;
    half.state_end = np;
    half.bitmap = bm + np / 16;
    half.crcs = NULL;
    CHECK(qs_emit_zero_range(&e, &half, np / 2, np, &err) == QS_EMIT_OK);
    CHECK(qs_emit_flush(&e, &err) == QS_EMIT_OK);
    CHECK(e.bytes_out == wl);
    printf("emit: %d waits for the reader went to the hook\n", h.calls);
    /* a stored page that fails its checksum: nothing of its cluster goes out */
    uint32_t bad = 0;
    while (!(bm[bad / 8] >> (bad % 8) & 1))
        bad++;
    crcs[bad] ^= 1;
    uint64_t before = e.bytes_out;
    memset(&err, 0, sizeof(err));
    CHECK(qs_emit_cluster(&e, &b, 0, data, 16 * ps, &err) == QS_EMIT_ECRC);
    CHECK(err.block == 0 && err.offset == (uint64_t)bad * ps);
    CHECK(err.expected == (crcs[bad]) && err.actual == (crcs[bad] ^ 1));
    CHECK(e.bytes_out == before);
    crcs[bad] ^= 1;
    qs_emit_free(&e);
    CHECK(!(fcntl(p[1], F_GETFL) & O_NONBLOCK));   /* the fd's flags given back */
    close(p[1]);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(rd.len == wl && memcmp(rd.buf, want, wl) == 0);
    free(rd.buf);
    close(p[0]);

    /* nobody reads: the hook ends the wait, the status says how far it got */
    CHECK(pipe(p) == 0);
    CHECK(qs_emit_init(&e, p[1], ps, &err) == QS_EMIT_OK);
    hook_state stop = {0, 3};
    in = hook(&stop);
    qs_emit_set_intr(&e, &in);
    uint8_t *big = calloc(1, 4 << 20);
    memset(&err, 0, sizeof(err));
    CHECK(qs_emit_write_all(&e, big, 4 << 20, &err) == QS_EMIT_EINTR);
    CHECK(err.sys_errno == EINTR && err.value == e.bytes_out && stop.calls == 3);
    CHECK(e.bytes_out > 0 && e.bytes_out < (4u << 20));
    qs_emit_free(&e);
    /* the reader gone: EPIPE (SIGPIPE ignored, as by Python) */
    close(p[0]);
    signal(SIGPIPE, SIG_IGN);
    CHECK(qs_emit_init(&e, p[1], ps, &err) == QS_EMIT_OK);
    CHECK(qs_emit_bytes(&e, "x", 1, &err) == QS_EMIT_OK);
    memset(&err, 0, sizeof(err));
    CHECK(qs_emit_flush(&e, &err) == QS_EMIT_EPIPE && err.sys_errno == EPIPE);
    qs_emit_free(&e);
    signal(SIGPIPE, SIG_DFL);
    close(p[1]);
    free(big);

    /* a regular file: the same bytes, written blocking */
    char path[] = "/tmp/qsnap-native-XXXXXX";
    int fd = mkstemp(path);
    unlink(path);
    CHECK(qs_emit_init(&e, fd, ps, &err) == QS_EMIT_OK);
    CHECK(qs_emit_bytes(&e, "HDR", 3, &err) == QS_EMIT_OK);
    CHECK(qs_emit_cluster(&e, &b, 0, data, (size_t)np * ps, &err) == QS_EMIT_OK);
    CHECK(qs_emit_zero_range(&e, &b, 0, np, &err) == QS_EMIT_OK);
    CHECK(qs_emit_flush(&e, &err) == QS_EMIT_OK);
    qs_emit_free(&e);
    uint8_t *got = malloc(wl);
    CHECK(pread(fd, got, wl, 0) == (ssize_t)wl && memcmp(got, want, wl) == 0);
    CHECK(lseek(fd, 0, SEEK_END) == (off_t)wl);
    free(got);
    close(fd);
    /* bad arguments */
    CHECK(qs_emit_init(&e, 1, 1000, &err) == QS_EMIT_EINVAL && err.value == 1000);
    qs_emit_free(&e);
    free(want);
    free(data);
}

/* A sink whose caller's waits for the writers are cut short by the hook:
 * each interrupted put is simply put again, and the image comes out whole. */
static void test_sink_interrupted_waits(void)
{
    const uint32_t cs = 1 << 16, ps = 4096;
    const uint64_t n_clusters = 96, vsize = n_clusters * cs;
    /* O_DIRECT where the filesystem takes it: the writers then fall behind */
    int dfd, fd = temp_image_direct(cs, &dfd);
    qs_sink *s = sink_new(dfd >= 0 ? dfd : fd, vsize, cs, ps, 1, cs, dfd >= 0);
    CHECK(s != NULL);
    if (!s)
        return;
    hook_state h = {0, 2};
    qs_intr in = hook(&h);
    qs_sink_set_intr(s, &in);
    uint8_t *model = calloc(1, vsize);
    qs_sink_err err;
    int stops = 0;
    for (uint64_t p = 0; p < vsize / ps; p++) {
        uint8_t *m = model + p * ps;
        m[rnd() % ps] = (uint8_t)(1 + rnd() % 255);
        int rc;
        while ((rc = qs_sink_put(s, p * ps, m, 0, &err)) == QS_SINK_EINTR) {
            CHECK(err.errnum == EINTR && err.voff == (p * ps & ~(uint64_t)(cs - 1)));
            stops++;
        }
        CHECK(rc == QS_SINK_OK);
        if ((p + 1) % (cs / ps) == 0) {
            /* the cluster just completed is queued: reading it back waits for the writer */
            uint64_t c0 = (p + 1) * ps - cs;
            uint8_t back[4096];
            while ((rc = qs_sink_get(s, c0, back, &err)) == QS_SINK_EINTR)
                stops++;
            CHECK(rc == QS_SINK_OK && memcmp(back, model + c0, ps) == 0);
        }
    }
    int rc;
    while ((rc = qs_sink_flush(s, &err)) == QS_SINK_EINTR)
        stops++;
    CHECK(rc == QS_SINK_OK);
    CHECK(stops == h.calls / 2);
    printf("sink: %d of %d hook calls cut a wait for the writers short\n", stops, h.calls);
    check_image(fd, s, model, vsize, cs, ps);
    free(model);
    qs_sink_free(s);
    if (dfd >= 0)
        close(dfd);
    close(fd);
}

int main(void)
{
    test_ramparse();
    test_crc();
    test_zero();
    test_xbzrle();
    test_sink();
    test_sink_queue_stress(1, 0);
    test_sink_queue_stress(2, 0);
    test_sink_queue_stress(1, 1);
    test_sink_queue_stress(2, 1);
    test_sink_parent(0);
    test_sink_parent(1);
    test_sink_write_errors();
    test_sink_free_with_queued_jobs();
    test_sink_interrupted_waits();
    test_aio();
    test_emit();
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("native csrc tests passed\n");
    return 0;
}
