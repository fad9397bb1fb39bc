/* Synthetic RAM page records for bench/scale.py: writes to stdout a migration
 * stream's RAM part (QEMU_VM_SECTION_PART sections of RAM_SAVE_FLAG_PAGE and
 * RAM_SAVE_FLAG_ZERO records, migration/ram.c and migration/savevm.c) between
 * a prefix file (file header, configuration, RAM START with MEM_SIZE) and a
 * suffix file (device state, EOF), both written by bench/scale.py.  So a
 * guest of any size streams through a pipe without a file of its size.
 *
 * usage: scale_gen PREFIX SUFFIX SECTION_ID PAGE_SIZE DATA_EVERY IDSTR:LENGTH...
 * DATA_EVERY: every n-th run of RUN_PAGES pages (1 MiB of 4 KiB pages) holds
 * data (1 = all), the others are ZERO: guests keep data in ranges, so an image
 * allocates 1/n of the clusters. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define QEMU_VM_SECTION_PART 0x02    /* migration/savevm.c */
#define QEMU_VM_SECTION_FOOTER 0x7e
#define RAM_SAVE_FLAG_ZERO 0x02      /* migration/ram.c */
#define RAM_SAVE_FLAG_PAGE 0x08
#define RAM_SAVE_FLAG_EOS 0x10
#define RAM_SAVE_FLAG_CONTINUE 0x20
#define PART_PAGES 4096
#define RUN_PAGES 256
#define OUT_BUF (4u << 20)
#define POOL (1u << 20)

static uint8_t *out;
static size_t out_len;

static void drain(void)
{
    size_t done = 0;
    while (done < out_len) {
        ssize_t r = write(1, out + done, out_len - done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            perror("scale_gen: write");
            exit(1);
        }
        done += (size_t)r;
    }
    out_len = 0;
}

static void put(const void *p, size_t n)
{
    if (out_len + n > OUT_BUF)
        drain();
    memcpy(out + out_len, p, n);
    out_len += n;
}

static void put_be(uint64_t v, int bytes)
{
    uint8_t b[8];
    for (int i = bytes - 1; i >= 0; i--, v >>= 8)
        b[i] = (uint8_t)v;
    put(b, (size_t)bytes);
}

static void put_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(1);
    }
    uint8_t buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0)
        put(buf, n);
    fclose(f);
}

int main(int argc, char **argv)
{
    if (argc < 7) {
        fprintf(stderr, "usage: scale_gen PREFIX SUFFIX SECTION_ID PAGE_SIZE DATA_EVERY IDSTR:LENGTH...\n");
        return 2;
    }
    uint32_t sid = (uint32_t)strtoul(argv[3], NULL, 0);
    uint64_t ps = strtoull(argv[4], NULL, 0), every = strtoull(argv[5], NULL, 0);
    out = malloc(OUT_BUF);
    uint8_t *pool = malloc(POOL + ps);
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < POOL + ps; i++) {   /* xorshift64: incompressible-looking pages */
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        pool[i] = (uint8_t)x;
    }
    put_file(argv[1]);
    for (int a = 6; a < argc; a++) {
        char *colon = strrchr(argv[a], ':');
        if (!colon)
            return 2;
        size_t idlen = (size_t)(colon - argv[a]);
        uint64_t n = strtoull(colon + 1, NULL, 0) / ps;
        for (uint64_t p0 = 0; p0 < n; p0 += PART_PAGES) {
            put_be(QEMU_VM_SECTION_PART, 1);
            put_be(sid, 4);
            for (uint64_t p = p0; p < n && p < p0 + PART_PAGES; p++) {
                int data = every && (p / RUN_PAGES) % every == 0;
                uint64_t word = p * ps | (data ? RAM_SAVE_FLAG_PAGE : RAM_SAVE_FLAG_ZERO);
                put_be(word | (p == p0 ? 0 : RAM_SAVE_FLAG_CONTINUE), 8);
                if (p == p0) {
                    put_be(idlen, 1);
                    put(argv[a], idlen);
                }
                if (data) {
                    uint8_t *page = pool + (p * 7919 * 64) % POOL;
                    uint64_t tag = p + 1;   /* every page differs, none is zero */
                    put(&tag, 8);
                    put(page + 8, ps - 8);
                } else {
                    put_be(0, 1);
                }
            }
            put_be(RAM_SAVE_FLAG_EOS, 8);
            put_be(QEMU_VM_SECTION_FOOTER, 1);
            put_be(sid, 4);
        }
    }
    put_file(argv[2]);
    drain();
    return 0;
}
