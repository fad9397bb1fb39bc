/* Page sink: see sink.h.
 *
 * Cluster writes run on writer threads, so that each write (the kernel's copy
 * into the page cache, or with O_DIRECT the device) overlaps the caller's
 * parsing, zero checks, copies into the slots (streaming stores: the buffers
 * go to the disk, not back to the CPU) and crc32c.  The caller queues jobs
 * (FIFO): a whole cluster (the buffer of a slot freed because its cluster is
 * complete or evicted; it goes back to a pool once written) or one page
 * rewritten in place (a copy in a small page buffer).  A slot's
 * buffer holds the page's data where its bit in the bitmap is set and stale
 * bytes of an earlier cluster elsewhere; those pages are zeroed when the
 * cluster is queued, so a cluster filled with data is never zeroed.  Host
 * offsets are assigned when a job is queued, so host[], the bitmap, crcs and
 * the stats stay the caller's alone; the writer touches only the queued
 * buffers, bytes_written and the first error.
 *
 * With O_DIRECT each write waits for the device, so there are two writers
 * (queue depth 2); without it one, which also owns the writeback state.  Jobs
 * are taken from the head of the queue only.  Clusters go to distinct,
 * append-only host offsets and may be written concurrently; a page rewrite is
 * a barrier: taken only when no job is in flight, and nothing else is taken
 * while it is.  So a rewrite lands after the write of its cluster and before
 * any later job touching the same page.
 *
 * One mutex guards the queue, the pools and the error; the writers sleep on
 * work_cv, the caller on done_cv (a buffer returned, the queue drained). */
#include "sink.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"
#include "xbzrle.h"
#include "zero.h"

#if defined(__x86_64__) || defined(__i386__)
#include <emmintrin.h>
#define HAVE_STREAM_STORES 1
#endif

#define NO_SLOT (-1)
#define IO_ALIGN 4096
/* Cluster buffers beyond one per slot: evicted clusters queued or being
 * written while their slots are already reused. */
#define SPARE_CLUSTERS 16
/* Queued clusters that follow each other in the file go out in one pwritev of
 * up to this many: with O_DIRECT each write waits for the device, and 4 MiB
 * writes keep it busier than 1 MiB ones (dd oflag=direct here: 1.7 GB/s at
 * 1 MiB, 2.1 GB/s at 4 MiB). Fewer than SPARE_CLUSTERS, so that the caller
 * still finds free buffers while a batch is written. */
#define MAX_BATCH 4
/* Page buffers for queued in-place rewrites: this many bytes' worth (4..256). */
#define PAGE_POOL_BYTES (1u << 20)
/* Start writeback of the clusters written so far every this many bytes, so
 * that the final fsync finds little left to do. */
#define WRITEBACK_CHUNK ((uint64_t)32 << 20)
/* Writer threads with O_DIRECT (one without). */
#define MAX_WRITERS 2
/* With O_DIRECT the file is allocated this far ahead of the append position. */
#define PREALLOC_CHUNK ((uint64_t)64 << 20)
/* statfs f_type of the memory filesystems (linux/magic.h) */
#define TMPFS_MAGIC_ 0x01021994
#define RAMFS_MAGIC_ 0x858458f6
#define HUGETLBFS_MAGIC_ 0x958458f6

enum { JOB_CLUSTER, JOB_PAGE };

typedef struct wjob {
    int kind;
    uint8_t *buf;      /* a cluster buffer or a page buffer, back to its pool after */
    uint32_t len;      /* bytes to write; 0: an all-zero cluster, only recycled */
    uint64_t host_off;
    uint64_t voff;     /* virtual offset of the cluster or page, for errors */
} wjob;

/* Buffers of one size, IO_ALIGN aligned, and a stack of the free ones. */
typedef struct bufpool {
    uint8_t *mem;
    uint8_t **free;
    uint32_t n_free;
} bufpool;

/* Per-cluster and per-page state (host offset, open slot, pages seen, stored
 * bits, crc32c) in chunks of CHUNK_PAGES pages: a bounded cache of chunks in
 * memory, the rest in a spill file, so that the sink's memory does not grow
 * with the guest.  A chunk never written to the spill file reads as zeros
 * (the file is sparse).  Without a spill file every chunk stays in memory,
 * allocated on first use.  Layout of a chunk (K clusters, CHUNK_PAGES pages):
 * host u64[K], slot u32[K] (slot + 1, 0 = none), cl_seen u16[K], then
 * (8-aligned) stored bits, seen bits, differs bits (parent mode: the page's
 * content may differ from the parent chain's), crc u32[CHUNK_PAGES]. */
#define CHUNK_PAGES 4096u
/* Chunks kept in memory with a spill file (~4.5 MiB of 4 KiB pages' state);
 * the native tests build with a few, to exercise the spill. */
#ifndef QS_SINK_CACHE_CHUNKS
#define QS_SINK_CACHE_CHUNKS 256u
#endif
#define CACHE_CHUNKS QS_SINK_CACHE_CHUNKS

typedef struct pchunk {
    uint64_t idx;      /* chunk index, UINT64_MAX = empty */
    uint64_t stamp;    /* last use, for LRU */
    int dirty;
    uint8_t *mem;
} pchunk;

typedef struct pstate {
    int fd;              /* spill file, -1 = none */
    uint32_t k;          /* clusters per chunk */
    uint64_t n_chunks;
    size_t bytes;        /* of one chunk */
    size_t off_slot, off_clseen, off_bm, off_seen, off_diff, off_crc;
    uint32_t cap, used;  /* cache entries: allowed, in use */
    pchunk *cache;
    int32_t *where;      /* per chunk: its cache entry or -1 */
    uint64_t clock;
} pstate;

struct qs_sink {
    int fd;
    int direct;
    uint64_t virtual_size;
    uint64_t cluster_size;
    uint32_t cluster_bits;
    uint32_t page_size;
    uint32_t page_bits;
    uint64_t n_clusters;
    uint64_t n_pages;
    pstate ps;         /* per-cluster and per-page state, in chunks */

    uint32_t n_slots;
    uint8_t **slot_buf;     /* the slot's cluster buffer, NULL while free */
    uint64_t *slot_cluster; /* cluster in the slot, UINT64_MAX = free */
    uint64_t *slot_stamp;   /* last use, for LRU */
    uint64_t clock;

    uint8_t *bounce;  /* one page, IO_ALIGN aligned, for reads from the file */
    uint8_t *scratch; /* one page: fill pages, XBZRLE */

    uint32_t n_blocks;
    uint64_t *blk_off;
    uint64_t *blk_len;
    uint64_t *blk_records;

    qs_sink_stats st;  /* the caller's; bytes_written is kept below */

    /* parent mode (the caller's): the chain's files, and per virtual cluster
     * the file holding it (index + 1, 0 = none: zeros) and where */
    int *par_fds;
    uint32_t n_par;
    uint32_t *par_src;
    uint64_t *par_host;

    /* writer thread */
    uint32_t pbuf_size;   /* max(page_size, IO_ALIGN) */
    int sync_ready;       /* mu and the condvars are initialised */
    int n_writers;        /* started */
    pthread_t writer[MAX_WRITERS];
    pthread_mutex_t mu;
    pthread_cond_t work_cv;
    pthread_cond_t done_cv;
    /* guarded by mu */
    bufpool cpool;        /* cluster buffers (not cleared): n_slots + SPARE_CLUSTERS */
    bufpool ppool;        /* page buffers */
    wjob *q;              /* ring of q_cap jobs: one per buffer, never full */
    uint32_t q_cap, q_head, q_len;
    int in_flight;        /* jobs (a batch counts once) taken off the queue, not done */
    int page_in_flight;   /* one of them is a page rewrite: a barrier */
    int stop;
    qs_sink_err werr;     /* the first failed write; set once, before `failed` */
    /* atomics */
    int failed;
    uint64_t bytes_written;
    qs_intr intr;         /* the caller's interrupt hook */
    /* the caller's: with O_DIRECT, the file is allocated (and long) up to
     * here; 0 once preallocation failed or when not direct */
    uint64_t prealloc_end;
    int preallocated;     /* fallocate was called: flush trims the file */
    /* the writer's own (non-direct: a single writer) */
    uint64_t wb_from, wb_to; /* cluster range written since the last writeback start */
};

static int ilog2_exact(uint64_t v)
{
    if (v == 0 || (v & (v - 1)))
        return -1;
    return __builtin_ctzll(v);
}

static void *aligned_alloc_zero(size_t size)
{
    void *p = NULL;
    if (posix_memalign(&p, IO_ALIGN, size ? size : IO_ALIGN) != 0)
        return NULL;
    memset(p, 0, size);
    return p;
}

/* Pool buffers are not cleared: a cluster buffer's pages without data are
 * zeroed when it is queued, a page buffer is filled whole.  Untouched, they
 * take no memory until the writers fall behind far enough to need them.  A
 * pool of 2 MiB or more is 2 MiB aligned and asks for transparent huge pages:
 * fewer page faults and TLB misses in the copies, and an O_DIRECT write pins
 * a few huge pages instead of a page per 4 KiB. */
#define HUGE_ALIGN ((size_t)2 << 20)
static int pool_init(bufpool *p, uint32_t n, size_t size)
{
    void *mem = NULL;
    size_t total = (size_t)n * size;
    size_t align = total >= HUGE_ALIGN ? HUGE_ALIGN : IO_ALIGN;
    total = (total + align - 1) & ~(align - 1);
    p->mem = posix_memalign(&mem, align, total) == 0 ? mem : NULL;
    p->free = malloc(n * sizeof(uint8_t *));
    if (!p->mem || !p->free)
        return -1;
#ifdef MADV_HUGEPAGE
    if (align == HUGE_ALIGN)
        (void)madvise(p->mem, total, MADV_HUGEPAGE);   /* a hint: no THP is fine */
#endif
    for (uint32_t i = 0; i < n; i++)
        p->free[i] = p->mem + (size_t)i * size;
    p->n_free = n;
    return 0;
}

/* Copy a page into a cluster buffer.  The buffer goes to the disk, not back
 * to this CPU: with streaming stores its lines are neither read from memory
 * first nor left in the cache to push out the stream being parsed.  Callers
 * fence (store_fence) before a writer thread may see the buffer. */
static inline void copy_to_cluster(uint8_t *dst, const uint8_t *src, size_t len)
{
#ifdef HAVE_STREAM_STORES
    if (((uintptr_t)dst & 15) == 0 && (len & 63) == 0) {
        for (size_t i = 0; i < len; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
            _mm_stream_si128((__m128i *)(dst + i), a);
            _mm_stream_si128((__m128i *)(dst + i + 16), b);
            _mm_stream_si128((__m128i *)(dst + i + 32), c);
            _mm_stream_si128((__m128i *)(dst + i + 48), d);
        }
        return;
    }
#endif
    memcpy(dst, src, len);
}

static inline void store_fence(void)
{
#ifdef HAVE_STREAM_STORES
    _mm_sfence();
#endif
}

static int fail(qs_sink_err *err, int status, int errnum, uint64_t voff,
                uint64_t host_off, uint64_t value)
{
    if (err) {
        err->status = status;
        err->errnum = errnum;
        err->voff = voff;
        err->host_off = host_off;
        err->value = value;
    }
    return status;
}

/* --- page state ------------------------------------------------------------ */

static int pstate_init(pstate *p, uint64_t n_pages, uint32_t cluster_pages)
{
    p->fd = -1;
    p->k = CHUNK_PAGES / cluster_pages;
    p->n_chunks = (n_pages + CHUNK_PAGES - 1) / CHUNK_PAGES;
    p->off_slot = (size_t)p->k * 8;
    p->off_clseen = p->off_slot + (size_t)p->k * 4;
    p->off_bm = (p->off_clseen + (size_t)p->k * 2 + 7) & ~(size_t)7;
    p->off_seen = p->off_bm + CHUNK_PAGES / 8;
    p->off_diff = p->off_seen + CHUNK_PAGES / 8;
    p->off_crc = p->off_diff + CHUNK_PAGES / 8;
    p->bytes = p->off_crc + (size_t)CHUNK_PAGES * 4;
    if (p->n_chunks > INT32_MAX)
        return -1;
    p->cap = p->n_chunks ? (uint32_t)p->n_chunks : 1;   /* until a spill file is set */
    p->cache = calloc(p->cap, sizeof(pchunk));
    p->where = malloc((p->n_chunks ? p->n_chunks : 1) * sizeof(int32_t));
    if (!p->cache || !p->where)
        return -1;
    for (uint64_t i = 0; i < p->n_chunks; i++)
        p->where[i] = -1;
    return 0;
}

static void pstate_free(pstate *p)
{
    if (p->cache)
        for (uint32_t i = 0; i < p->used; i++)
            free(p->cache[i].mem);
    free(p->cache);
    free(p->where);
}

static int spill_io(pstate *p, int wr, uint8_t *buf, uint64_t idx, qs_sink_err *err)
{
    size_t done = 0;
    off_t at = (off_t)(idx * p->bytes);
    while (done < p->bytes) {
        ssize_t r = wr ? pwrite(p->fd, buf + done, p->bytes - done, at + (off_t)done)
                       : pread(p->fd, buf + done, p->bytes - done, at + (off_t)done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return fail(err, QS_SINK_ESPILL, errno, 0, (uint64_t)at + done, wr);
        if (r == 0) {
            if (wr)
                return fail(err, QS_SINK_ESPILL, EIO, 0, (uint64_t)at + done, wr);
            memset(buf + done, 0, p->bytes - done);   /* never written: zeros */
            break;
        }
        done += (size_t)r;
    }
    return QS_SINK_OK;
}

/* *out = the chunk of chunk index idx, loaded (and the least recently used
 * one written back) if needed; a status (ENOMEM, ESPILL) on failure.  The
 * pointer stays valid until the next call for another chunk that misses
 * while this one is the least recently used of a full cache: callers look a
 * chunk up again after anything that may load others. */
static int pstate_chunk(pstate *p, uint64_t idx, int dirty, uint8_t **out, qs_sink_err *err)
{
    int rc;
    int32_t e = p->where[idx];
    *out = NULL;
    if (e < 0) {
        if (p->used < p->cap) {
            uint8_t *mem = calloc(1, p->bytes);
            if (!mem)
                return fail(err, QS_SINK_ENOMEM, ENOMEM, 0, 0, p->bytes);
            e = (int32_t)p->used++;
            p->cache[e].mem = mem;
        } else {
            e = 0;
            for (uint32_t i = 1; i < p->used; i++)
                if (p->cache[i].stamp < p->cache[e].stamp)
                    e = (int32_t)i;
            pchunk *v = &p->cache[e];
            if (v->dirty && (rc = spill_io(p, 1, v->mem, v->idx, err)))
                return rc;
            p->where[v->idx] = -1;
            v->dirty = 0;
        }
        pchunk *c = &p->cache[e];
        c->idx = idx;
        if (p->fd >= 0 && (rc = spill_io(p, 0, c->mem, idx, err))) {
            c->idx = UINT64_MAX;
            c->stamp = 0;
            return rc;
        }
        p->where[idx] = e;
    }
    pchunk *c = &p->cache[e];
    c->stamp = ++p->clock;
    c->dirty |= dirty;
    *out = c->mem;
    return QS_SINK_OK;
}

static inline uint64_t *ch_host(const pstate *p, uint8_t *m) { (void)p; return (uint64_t *)m; }
static inline uint32_t *ch_slot(const pstate *p, uint8_t *m) { return (uint32_t *)(m + p->off_slot); }
static inline uint16_t *ch_clseen(const pstate *p, uint8_t *m) { return (uint16_t *)(m + p->off_clseen); }
static inline uint8_t *ch_bm(const pstate *p, uint8_t *m) { return m + p->off_bm; }
static inline uint8_t *ch_seen(const pstate *p, uint8_t *m) { return m + p->off_seen; }
static inline uint8_t *ch_diff(const pstate *p, uint8_t *m) { return m + p->off_diff; }
static inline uint32_t *ch_crc(const pstate *p, uint8_t *m) { return (uint32_t *)(m + p->off_crc); }

static void *writer_main(void *arg);

/* Start the writer threads (two with O_DIRECT, else one); they take no
 * signals (they stay with the caller's thread).  0 or the pthread error. */
static int writer_start(qs_sink *s)
{
    int rc = pthread_mutex_init(&s->mu, NULL);
    if (rc)
        return rc;
    rc = pthread_cond_init(&s->work_cv, NULL);
    if (rc) {
        pthread_mutex_destroy(&s->mu);
        return rc;
    }
    pthread_condattr_t ca;   /* done_cv: timed waits on the monotonic clock */
    rc = pthread_condattr_init(&ca);
    if (rc == 0) {
        rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        if (rc == 0)
            rc = pthread_cond_init(&s->done_cv, &ca);
        pthread_condattr_destroy(&ca);
    }
    if (rc) {
        pthread_cond_destroy(&s->work_cv);
        pthread_mutex_destroy(&s->mu);
        return rc;
    }
    s->sync_ready = 1;
    sigset_t all, old;
    sigfillset(&all);
    rc = pthread_sigmask(SIG_SETMASK, &all, &old);
    if (rc)
        return rc;
    int want = s->direct ? MAX_WRITERS : 1;
    while (s->n_writers < want) {
        rc = pthread_create(&s->writer[s->n_writers], NULL, writer_main, s);
        if (rc)
            break;
        s->n_writers++;
    }
    int mrc = pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc ? rc : mrc;
}

/* Whether preallocating the file is cheap: not on memory filesystems, where
 * fallocate clears every page it allocates. */
static int prealloc_helps(int fd)
{
    struct statfs st;
    if (fstatfs(fd, &st))
        return 0;
    return st.f_type != TMPFS_MAGIC_ && st.f_type != RAMFS_MAGIC_ &&
           st.f_type != HUGETLBFS_MAGIC_;
}

/* The sizes of what qs_sink_new allocates, for an ENOMEM report. */
static uint64_t sink_bytes(const qs_sink *s, uint32_t n_cbufs, uint32_t n_pbufs)
{
    uint64_t nch = s->ps.n_chunks;
    return sizeof(*s) + nch * (sizeof(int32_t) + sizeof(pchunk)) + s->ps.bytes +
           (uint64_t)s->q_cap * sizeof(wjob) +
           (uint64_t)n_cbufs * s->cluster_size + (uint64_t)n_pbufs * s->pbuf_size;
}

int qs_sink_new(qs_sink **out, int fd, uint64_t virtual_size, uint32_t cluster_size,
                uint32_t page_size, uint32_t n_slots, uint64_t append_offset, int direct,
                qs_sink_err *err)
{
    *out = NULL;
    int cbits = ilog2_exact(cluster_size), pbits = ilog2_exact(page_size);
    if (fd < 0)
        return fail(err, QS_SINK_EINVAL, EBADF, 0, 0, (uint64_t)(int64_t)fd);
    if (cbits < 16 || cbits > 21)
        return fail(err, QS_SINK_EINVAL, EINVAL, 0, 0, cluster_size);
    if (pbits < 9 || pbits > cbits)
        return fail(err, QS_SINK_EINVAL, EINVAL, 0, 0, page_size);
    if (n_slots == 0 || n_slots > 4096)
        return fail(err, QS_SINK_EINVAL, EINVAL, 0, 0, n_slots);
    if (virtual_size % cluster_size)
        return fail(err, QS_SINK_EINVAL, EINVAL, 0, 0, virtual_size);
    if (append_offset == 0 || append_offset % cluster_size)
        return fail(err, QS_SINK_EINVAL, EINVAL, 0, 0, append_offset);
    qs_sink *s = calloc(1, sizeof(*s));
    if (!s)
        return fail(err, QS_SINK_ENOMEM, ENOMEM, 0, 0, sizeof(*s));
    s->fd = fd;
    s->direct = direct;
    s->virtual_size = virtual_size;
    s->cluster_size = cluster_size;
    s->cluster_bits = (uint32_t)cbits;
    s->page_size = page_size;
    s->page_bits = (uint32_t)pbits;
    s->n_clusters = virtual_size >> cbits;
    s->n_pages = virtual_size >> pbits;
    s->n_slots = n_slots;
    s->st.append_offset = append_offset;
    s->wb_from = s->wb_to = append_offset;
    s->prealloc_end = direct && prealloc_helps(fd) ? append_offset : 0;

    uint32_t n_cbufs = n_slots + SPARE_CLUSTERS;
    s->pbuf_size = page_size < IO_ALIGN ? IO_ALIGN : page_size;
    uint32_t n_pbufs = PAGE_POOL_BYTES / s->pbuf_size;
    n_pbufs = n_pbufs < 4 ? 4 : n_pbufs > 256 ? 256 : n_pbufs;
    s->q_cap = n_cbufs + n_pbufs;

    int pst = pstate_init(&s->ps, s->n_pages, 1u << (cbits - pbits));
    s->slot_buf = calloc(n_slots, sizeof(uint8_t *));
    s->slot_cluster = malloc(n_slots * sizeof(uint64_t));
    s->slot_stamp = calloc(n_slots, sizeof(uint64_t));
    s->bounce = aligned_alloc_zero(s->pbuf_size);
    s->scratch = aligned_alloc_zero(page_size);
    s->q = calloc(s->q_cap, sizeof(wjob));
    int pools = pool_init(&s->cpool, n_cbufs, cluster_size) |
                pool_init(&s->ppool, n_pbufs, s->pbuf_size);
    if (pools || pst || !s->slot_buf ||
        !s->slot_cluster || !s->slot_stamp || !s->bounce || !s->scratch || !s->q) {
        uint64_t want = sink_bytes(s, n_cbufs, n_pbufs);
        qs_sink_free(s);
        return fail(err, QS_SINK_ENOMEM, ENOMEM, 0, 0, want);
    }
    for (uint32_t i = 0; i < n_slots; i++)
        s->slot_cluster[i] = UINT64_MAX;
    int rc = writer_start(s);
    if (rc) {
        qs_sink_free(s);
        return fail(err, QS_SINK_ETHREAD, rc, 0, 0, 0);
    }
    *out = s;
    return QS_SINK_OK;
}

/* Stop the writers (queued jobs are dropped: only those being written
 * finish) and free everything; fine after an error or halfway through qs_sink_new. */
void qs_sink_free(qs_sink *s)
{
    if (!s)
        return;
    if (s->n_writers) {
        pthread_mutex_lock(&s->mu);
        s->stop = 1;
        pthread_cond_broadcast(&s->work_cv);
        pthread_mutex_unlock(&s->mu);
        for (int i = 0; i < s->n_writers; i++)
            pthread_join(s->writer[i], NULL);
    }
    if (s->sync_ready) {
        pthread_cond_destroy(&s->done_cv);
        pthread_cond_destroy(&s->work_cv);
        pthread_mutex_destroy(&s->mu);
    }
    pstate_free(&s->ps);
    free(s->slot_buf);
    free(s->slot_cluster);
    free(s->slot_stamp);
    free(s->bounce);
    free(s->scratch);
    free(s->q);
    free(s->cpool.mem);
    free(s->cpool.free);
    free(s->ppool.mem);
    free(s->ppool.free);
    free(s->blk_off);
    free(s->blk_len);
    free(s->blk_records);
    free(s->par_fds);
    free(s->par_src);
    free(s->par_host);
    free(s);
}

void qs_sink_set_intr(qs_sink *s, const qs_intr *intr)
{
    if (intr)
        s->intr = *intr;
    else
        s->intr.fn = NULL;
}

int qs_sink_set_spill(qs_sink *s, int fd, qs_sink_err *err)
{
    pstate *p = &s->ps;
    if (fd < 0 || p->used)
        return fail(err, QS_SINK_EINVAL, EINVAL, 0, 0, (uint64_t)(int64_t)fd);
    uint32_t cap = p->n_chunks < CACHE_CHUNKS ? (uint32_t)p->n_chunks : CACHE_CHUNKS;
    cap = cap ? cap : 1;
    pchunk *c = realloc(p->cache, cap * sizeof(pchunk));
    if (c) {   /* shrinking: a failure keeps the larger array, which works as well */
        p->cache = c;
    }
    p->cap = cap;
    p->fd = fd;
    return QS_SINK_OK;
}

int qs_sink_set_parent(qs_sink *s, const int *fds, uint32_t n_fds, const uint64_t *virt,
                       const uint32_t *src, const uint64_t *host, uint64_t n,
                       qs_sink_err *err)
{
    if (s->ps.used || s->par_src || n_fds == 0)
        return fail(err, QS_SINK_EINVAL, EINVAL, 0, 0, n_fds);
    int *f = malloc(n_fds * sizeof(int));
    uint32_t *ps = calloc(s->n_clusters ? s->n_clusters : 1, sizeof(uint32_t));
    uint64_t *ph = calloc(s->n_clusters ? s->n_clusters : 1, sizeof(uint64_t));
    if (!f || !ps || !ph) {
        free(f);
        free(ps);
        free(ph);
        return fail(err, QS_SINK_ENOMEM, ENOMEM, 0, 0, s->n_clusters * 12 + n_fds * sizeof(int));
    }
    for (uint64_t i = 0; i < n; i++) {
        if (virt[i] >= s->n_clusters || src[i] >= n_fds || ps[virt[i]]) {
            free(f);
            free(ps);
            free(ph);
            return fail(err, QS_SINK_EINVAL, EINVAL, 0, 0, i);
        }
        ps[virt[i]] = src[i] + 1;
        ph[virt[i]] = host[i];
    }
    for (uint32_t i = 0; i < n_fds; i++) {
        f[i] = fds[i];
        /* clusters are mostly asked for in the order they were written:
         * a larger readahead window; a hint, so its failure does not matter */
        (void)posix_fadvise(fds[i], 0, 0, POSIX_FADV_SEQUENTIAL);
    }
    s->par_fds = f;
    s->n_par = n_fds;
    s->par_src = ps;
    s->par_host = ph;
    return QS_SINK_OK;
}

int qs_sink_set_blocks(qs_sink *s, const uint64_t *offsets,
                       const uint64_t *lengths, uint32_t n, qs_sink_err *err)
{
    for (uint32_t i = 0; i < n; i++) {
        if (offsets[i] % s->cluster_size || offsets[i] > s->virtual_size ||
            lengths[i] > s->virtual_size - offsets[i]) {
            fail(err, QS_SINK_EINVAL, EINVAL, offsets[i], 0, lengths[i]);
            if (err) {
                err->block = i;
                err->offset = offsets[i];
            }
            return QS_SINK_EINVAL;
        }
    }
    uint64_t *o = malloc((n ? n : 1) * sizeof(uint64_t));
    uint64_t *l = malloc((n ? n : 1) * sizeof(uint64_t));
    uint64_t *r = calloc(n ? n : 1, sizeof(uint64_t));
    if (!o || !l || !r) {
        free(o);
        free(l);
        free(r);
        return fail(err, QS_SINK_ENOMEM, ENOMEM, 0, 0, 3 * (uint64_t)(n ? n : 1) * sizeof(uint64_t));
    }
    if (n) {
        memcpy(o, offsets, n * sizeof(uint64_t));
        memcpy(l, lengths, n * sizeof(uint64_t));
    }
    free(s->blk_off);
    free(s->blk_len);
    free(s->blk_records);
    s->blk_off = o;
    s->blk_len = l;
    s->blk_records = r;
    s->n_blocks = n;
    return QS_SINK_OK;
}

/* Write n jobs that are contiguous in the file (one, or a batch of clusters)
 * with pwritev, on a writer thread.  bytes_written counts the jobs written
 * whole; a failure names the job it hit: its virtual offset, the file offset
 * reached and the job's length. */
static int write_jobs(qs_sink *s, const wjob *jobs, int n, qs_sink_err *err)
{
    struct iovec iov[MAX_BATCH];
    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        iov[i].iov_base = jobs[i].buf;
        iov[i].iov_len = jobs[i].len;
        total += jobs[i].len;
    }
    uint64_t off = jobs[0].host_off, done = 0;
    int first = 0;
    while (done < total) {
        ssize_t w = pwritev(s->fd, iov + first, n - first, (off_t)(off + done));
        if (w <= 0) {
            if (w < 0 && errno == EINTR)
                continue;
            int e = w < 0 ? errno : ENOSPC;
            const wjob *j = &jobs[first];
            uint64_t whole = done - (j->len - iov[first].iov_len);
            __atomic_fetch_add(&s->bytes_written, whole, __ATOMIC_RELAXED);
            return fail(err, QS_SINK_EWRITE, e, j->voff, off + done, j->len);
        }
        done += (uint64_t)w;
        while (first < n && (size_t)w >= iov[first].iov_len) {
            w -= (ssize_t)iov[first].iov_len;
            first++;
        }
        if (first < n) {
            iov[first].iov_base = (uint8_t *)iov[first].iov_base + w;
            iov[first].iov_len -= (size_t)w;
        }
    }
    __atomic_fetch_add(&s->bytes_written, total, __ATOMIC_RELAXED);
    return QS_SINK_OK;
}

static int pread_full(qs_sink *s, uint8_t *buf, size_t len, uint64_t off,
                      uint64_t voff, qs_sink_err *err)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(s->fd, buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return fail(err, QS_SINK_EREAD, errno, voff, off + done, len);
        }
        if (r == 0)
            return fail(err, QS_SINK_EREAD, EIO, voff, off + done, len);
        done += (size_t)r;
    }
    return QS_SINK_OK;
}

/* Read len bytes of the parent chain's content of cluster c from byte `in`
 * of it (the chain holds data for c). */
static int parent_read(qs_sink *s, uint64_t c, uint64_t in, uint8_t *buf, size_t len,
                       qs_sink_err *err)
{
    uint32_t f = s->par_src[c] - 1;
    uint64_t off = s->par_host[c] + in;
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(s->par_fds[f], buf + done, len - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return fail(err, QS_SINK_EPARENT, r < 0 ? errno : EIO, c << s->cluster_bits,
                        off + done, f);
        done += (size_t)r;
    }
    s->st.parent_bytes_read += len;
    return QS_SINK_OK;
}

/* --- the writer thread ------------------------------------------------------ */

/* The writer's first error, for the caller; `failed` is read with acquire
 * ordering first, and werr never changes after it is set. */
static int write_error(const qs_sink *s, qs_sink_err *err)
{
    if (err) {
        err->status = s->werr.status;
        err->errnum = s->werr.errnum;
        err->voff = s->werr.voff;
        err->host_off = s->werr.host_off;
        err->value = s->werr.value;
    }
    return s->werr.status;
}

static inline int has_failed(const qs_sink *s)
{
    return __atomic_load_n(&s->failed, __ATOMIC_ACQUIRE);
}

/* Ask the kernel to start writing back the clusters written since the last
 * call once they add up to WRITEBACK_CHUNK.  Data clusters are appended, so
 * the range is contiguous.  Errors are left to the final fsync. */
static void start_writeback(qs_sink *s, const wjob *j)
{
#ifdef SYNC_FILE_RANGE_WRITE
    if (s->direct)
        return;
    if (j->host_off != s->wb_to)
        s->wb_from = j->host_off;
    s->wb_to = j->host_off + j->len;
    if (s->wb_to - s->wb_from >= WRITEBACK_CHUNK) {
        (void)sync_file_range(s->fd, (off_t)s->wb_from, (off_t)(s->wb_to - s->wb_from),
                              SYNC_FILE_RANGE_WRITE);
        s->wb_from = s->wb_to;
    }
#else
    (void)s;
    (void)j;
#endif
}

/* One job, or n > 1 cluster jobs contiguous in the file. */
static int run_jobs(qs_sink *s, const wjob *j, int n, qs_sink_err *err)
{
    if (!j->len)
        return QS_SINK_OK;
    int rc = write_jobs(s, j, n, err);
    if (rc == QS_SINK_OK && j->kind == JOB_CLUSTER)
        for (int i = 0; i < n; i++)
            start_writeback(s, &j[i]);
    return rc;
}

/* Take the job at the head of the queue (mu held). */
static wjob pop_job(qs_sink *s)
{
    wjob j = s->q[s->q_head];
    s->q_head = (s->q_head + 1) % s->q_cap;
    s->q_len--;
    return j;
}

/* The head of the queue may be taken now (mu held): there is one, no page
 * rewrite is in flight, and a page rewrite waits until nothing is. */
static int can_take(const qs_sink *s)
{
    if (!s->q_len || s->page_in_flight)
        return 0;
    return s->q[s->q_head].kind != JOB_PAGE || s->in_flight == 0;
}

static void *writer_main(void *arg)
{
    qs_sink *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->stop && !can_take(s))
            pthread_cond_wait(&s->work_cv, &s->mu);
        if (s->stop)
            break;
        wjob j[MAX_BATCH];
        int n = 0;
        j[n++] = pop_job(s);
        /* whole clusters that follow it in the file join it (FIFO order kept:
         * only the head of the queue is ever taken) */
        while (n < MAX_BATCH && s->q_len && j[0].kind == JOB_CLUSTER && j[0].len) {
            const wjob *nx = &s->q[s->q_head];
            if (nx->kind != JOB_CLUSTER || nx->len != j[n - 1].len ||
                nx->host_off != j[n - 1].host_off + j[n - 1].len)
                break;
            j[n++] = pop_job(s);
        }
        s->in_flight++;
        if (j[0].kind == JOB_PAGE)
            s->page_in_flight = 1;
        /* after a failure, jobs only give their buffers back */
        int skip = has_failed(s);
        pthread_mutex_unlock(&s->mu);

        qs_sink_err e;
        int rc = skip ? QS_SINK_OK : run_jobs(s, j, n, &e);

        pthread_mutex_lock(&s->mu);
        if (rc && !has_failed(s)) {
            s->werr = e;
            __atomic_store_n(&s->failed, 1, __ATOMIC_RELEASE);
        }
        for (int i = 0; i < n; i++) {
            bufpool *p = j[i].kind == JOB_CLUSTER ? &s->cpool : &s->ppool;
            p->free[p->n_free++] = j[i].buf;
        }
        s->in_flight--;
        if (j[0].kind == JOB_PAGE)
            s->page_in_flight = 0;
        pthread_cond_broadcast(&s->done_cv);
        /* another writer may wait for this job to finish (the barrier) */
        pthread_cond_broadcast(&s->work_cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Hand a job (and its buffer) to the writer.  After a failure the job is
 * still queued, to give the buffer back, and the error is returned. */
static int enqueue(qs_sink *s, const wjob *j, qs_sink_err *err)
{
    pthread_mutex_lock(&s->mu);
    s->q[(s->q_head + s->q_len) % s->q_cap] = *j;
    s->q_len++;
    pthread_cond_broadcast(&s->work_cv);
    pthread_mutex_unlock(&s->mu);
    return has_failed(s) ? write_error(s, err) : QS_SINK_OK;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Wait on done_cv until cond holds (mu held), counting the time waited: one
 * slice at a time, asking the interrupt hook (without mu) after each.
 * `stop` becomes non-zero when the hook says stop (cond may not hold). */
#define WAIT_WRITERS(s, cond, stop)                                                 \
    do {                                                                            \
        (stop) = 0;                                                                 \
        if (!(cond)) {                                                              \
            uint64_t t0_ = now_ns();                                                \
            while (!(cond)) {                                                       \
                if (qs_intr_cond_wait(&(s)->intr, &(s)->done_cv, &(s)->mu) != ETIMEDOUT \
                    || (cond))                                                      \
                    continue;                                                       \
                pthread_mutex_unlock(&(s)->mu);                                     \
                (stop) = qs_intr_check(&(s)->intr);                                 \
                pthread_mutex_lock(&(s)->mu);                                       \
                if (stop)                                                           \
                    break;                                                          \
            }                                                                       \
            (s)->st.wait_ns += now_ns() - t0_;                                      \
        }                                                                           \
    } while (0)

static int interrupted(qs_sink_err *err, uint64_t voff)
{
    return fail(err, QS_SINK_EINTR, EINTR, voff, 0, 0);
}

/* A free buffer of the pool, waiting for the writer to give one back. There
 * is always one to come: the buffers not free are queued, being written, or
 * (cluster buffers) held by the other slots, of which there are fewer.
 * QS_SINK_EINTR (nothing taken) when the interrupt hook stops the wait. */
static int take_buf(qs_sink *s, bufpool *p, uint8_t **out, uint64_t voff, qs_sink_err *err)
{
    int stop;
    pthread_mutex_lock(&s->mu);
    WAIT_WRITERS(s, p->n_free, stop);
    *out = stop ? NULL : p->free[--p->n_free];
    pthread_mutex_unlock(&s->mu);
    return stop ? interrupted(err, voff) : QS_SINK_OK;
}

/* Wait until the writers have done every queued job; the first write error,
 * if any, or QS_SINK_EINTR when the interrupt hook stops the wait. */
static int drain(qs_sink *s, qs_sink_err *err)
{
    int stop;
    pthread_mutex_lock(&s->mu);
    WAIT_WRITERS(s, !s->q_len && !s->in_flight, stop);
    pthread_mutex_unlock(&s->mu);
    if (stop)
        return interrupted(err, 0);
    return has_failed(s) ? write_error(s, err) : QS_SINK_OK;
}

/* --- slots ------------------------------------------------------------------ */

static inline int bit_get(const uint8_t *bm, uint64_t i)
{
    return (bm[i >> 3] >> (i & 7)) & 1;
}

static inline void bit_set(uint8_t *bm, uint64_t i, int v)
{
    if (v)
        bm[i >> 3] |= (uint8_t)(1u << (i & 7));
    else
        bm[i >> 3] &= (uint8_t)~(1u << (i & 7));
}

/* Pages per cluster (at most 4096: clusters <= 2 MiB, pages >= 512 bytes). */
static inline uint32_t cluster_pages(const qs_sink *s)
{
    return 1u << (s->cluster_bits - s->page_bits);
}

/* Zero the pages of cluster c's buffer that hold no data (bm: the stored
 * bits of its chunk); return how many pages do. */
static uint64_t clear_holes(const qs_sink *s, uint64_t c, const uint8_t *bm, uint8_t *buf)
{
    uint64_t n = cluster_pages(s);
    uint64_t first = (c % s->ps.k) * n;
    uint64_t stored = 0;
    for (uint64_t i = 0; i < n; i++) {
        /* a cluster of 8 pages or more starts on a bitmap byte: take whole
         * bytes of stored pages at a time */
        if (i % 8 == 0 && n - i >= 8 && bm[(first + i) / 8] == 0xff) {
            stored += 8;
            i += 7;
        } else if (bit_get(bm, first + i)) {
            stored++;
        } else {
            memset(buf + (i << s->page_bits), 0, s->page_size);
        }
    }
    return stored;
}

/* With O_DIRECT, allocate the file in PREALLOC_CHUNK steps ahead of `end`:
 * ext4 serialises direct writes that extend the file, and runs those inside
 * it side by side.  A failure (no support, or no room for a whole chunk) ends
 * preallocation; the writes themselves then report a full disk. */
static void preallocate(qs_sink *s, uint64_t end)
{
    if (!s->prealloc_end || end <= s->prealloc_end)
        return;
    s->preallocated = 1;
    if (fallocate(s->fd, 0, (off_t)s->prealloc_end, (off_t)PREALLOC_CHUNK) == 0)
        s->prealloc_end += PREALLOC_CHUNK;
    else
        s->prealloc_end = 0;
}

/* Parent mode: the chain holds data for cluster c. */
static inline int parent_has(const qs_sink *s, uint64_t c)
{
    return s->par_src && s->par_src[c];
}

/* Whether cluster c (the chain holds data for it; open in `buf`) differs from
 * the chain's: a page marked differs, or (`final`: no more pages come) a
 * page never put (it is zero) where the buffer still holds the chain's bytes
 * and they are not zero.  An evicted cluster is not final: its missing pages
 * may still come, and qs_sink_flush looks at it again. */
static int cluster_differs(const qs_sink *s, uint64_t c, uint8_t *m, const uint8_t *buf,
                           int final)
{
    uint64_t n = cluster_pages(s);
    uint64_t first = (c % s->ps.k) * n;
    const uint8_t *diff = ch_diff(&s->ps, m), *seen = ch_seen(&s->ps, m);
    for (uint64_t i = 0; i < n; i++) {
        if (bit_get(diff, first + i))
            return 1;
        if (final && !bit_get(seen, first + i) &&
            !qs_is_zero(buf + (i << s->page_bits), s->page_size))
            return 1;
    }
    return 0;
}

/* Mark every page of cluster c as differing from the chain: once ZERO, the
 * cluster's content is no longer the chain's, and a reopened slot starts from
 * zeros, which are not what the chain holds. */
static void mark_differs(const qs_sink *s, uint64_t c, uint8_t *m)
{
    uint64_t n = cluster_pages(s);
    uint64_t first = (c % s->ps.k) * n;
    for (uint64_t i = 0; i < n; i++)
        bit_set(ch_diff(&s->ps, m), first + i, 1);
}

/* Queue the cluster open in `slot` for writing at the append position (unless
 * it became all zero, or in parent mode is as the chain has it) and free the
 * slot.  Its buffer goes with the job (len 0: only recycled).  `final`: no
 * more pages come (cluster_differs). */
static int slot_write_out(qs_sink *s, int32_t slot, int final, qs_sink_err *err)
{
    uint64_t c = s->slot_cluster[slot];
    if (c == UINT64_MAX)
        return QS_SINK_OK;
    uint8_t *m;
    int rc = pstate_chunk(&s->ps, c / s->ps.k, 1, &m, err);
    if (rc)
        return rc;
    wjob j = {JOB_CLUSTER, s->slot_buf[slot], 0, 0, c << s->cluster_bits};
    int par = parent_has(s, c);
    if (par && !cluster_differs(s, c, m, j.buf, final)) {
        ch_host(&s->ps, m)[c % s->ps.k] = QS_SINK_HOST_INHERIT;
        s->st.clusters_inherited++;
    } else if (clear_holes(s, c, ch_bm(&s->ps, m), j.buf)) {
        j.len = (uint32_t)s->cluster_size;
        j.host_off = s->st.append_offset;
        ch_host(&s->ps, m)[c % s->ps.k] = j.host_off;
        s->st.append_offset += s->cluster_size;
        s->st.clusters_written++;
        preallocate(s, s->st.append_offset);
    } else if (par) {
        ch_host(&s->ps, m)[c % s->ps.k] = QS_SINK_HOST_ZERO;
        mark_differs(s, c, m);
        s->st.clusters_zeroed++;
    }
    s->slot_buf[slot] = NULL;
    ch_slot(&s->ps, m)[c % s->ps.k] = 0;
    s->slot_cluster[slot] = UINT64_MAX;
    store_fence();   /* the copies' streaming stores, before a writer sees the buffer */
    return enqueue(s, &j, err);
}

static int slot_open(qs_sink *s, uint64_t c, int32_t *out, qs_sink_err *err)
{
    int32_t victim = 0;
    int rc;
    for (uint32_t i = 0; i < s->n_slots; i++) {
        if (s->slot_cluster[i] == UINT64_MAX) {
            victim = (int32_t)i;
            goto found;
        }
        if (s->slot_stamp[i] < s->slot_stamp[victim])
            victim = (int32_t)i;
    }
    rc = slot_write_out(s, victim, 0, err);
    if (rc)
        return rc;
found:
    rc = take_buf(s, &s->cpool, &s->slot_buf[victim], c << s->cluster_bits, err);
    if (rc)
        return rc;
    uint8_t *m;
    rc = pstate_chunk(&s->ps, c / s->ps.k, 1, &m, err);
    if (rc) {   /* the buffer goes back to the pool: the slot stays free */
        pthread_mutex_lock(&s->mu);
        s->cpool.free[s->cpool.n_free++] = s->slot_buf[victim];
        pthread_mutex_unlock(&s->mu);
        s->slot_buf[victim] = NULL;
        return rc;
    }
    s->slot_cluster[victim] = c;
    ch_slot(&s->ps, m)[c % s->ps.k] = (uint32_t)victim + 1;
    *out = victim;
    return QS_SINK_OK;
}

/* Parent mode: open a slot for cluster c (the chain holds data for it; not
 * on disk, not open), its buffer holding the cluster's current content: the
 * chain's bytes (never opened, or INHERITED) or zeros (ZERO). */
static int slot_reopen(qs_sink *s, uint64_t c, uint64_t host, int32_t *out, qs_sink_err *err)
{
    int rc = slot_open(s, c, out, err);
    if (rc)
        return rc;
    uint8_t *buf = s->slot_buf[*out];
    if (host == QS_SINK_HOST_ZERO) {
        memset(buf, 0, s->cluster_size);
        return QS_SINK_OK;
    }
    rc = parent_read(s, c, 0, buf, s->cluster_size, err);
    if (rc) {   /* the buffer goes back to the pool: the slot stays free */
        uint8_t *m;
        pthread_mutex_lock(&s->mu);
        s->cpool.free[s->cpool.n_free++] = buf;
        pthread_mutex_unlock(&s->mu);
        s->slot_buf[*out] = NULL;
        s->slot_cluster[*out] = UINT64_MAX;
        if (pstate_chunk(&s->ps, c / s->ps.k, 1, &m, NULL) == QS_SINK_OK)
            ch_slot(&s->ps, m)[c % s->ps.k] = 0;
    }
    return rc;
}

/* Parent mode: note whether the page at byte `in` of the cluster open in
 * `slot` changes with this put (data, or NULL for zeros) while it is still as
 * the chain has it; the buffer holds the page's current content there.  A
 * page once marked stays marked (a page changed and changed back costs a
 * write, never a wrong inherit). */
static void note_differs(qs_sink *s, int32_t slot, uint64_t in, uint8_t *m, uint64_t pj,
                         const uint8_t *data)
{
    uint8_t *diff = ch_diff(&s->ps, m);
    if (bit_get(diff, pj))
        return;
    const uint8_t *cur = s->slot_buf[slot] + in;
    int same = data ? memcmp(cur, data, s->page_size) == 0 : qs_is_zero(cur, s->page_size);
    if (!same)
        bit_set(diff, pj, 1);
}

/* Queue an in-place write of one page (data, or zeros if NULL) of a cluster on disk. */
static int queue_page(qs_sink *s, uint64_t host_off, uint64_t voff, const uint8_t *data,
                      qs_sink_err *err)
{
    wjob j = {JOB_PAGE, NULL, s->page_size, host_off, voff};
    int rc = take_buf(s, &s->ppool, &j.buf, voff, err);
    if (rc)
        return rc;
    if (data)
        memcpy(j.buf, data, s->page_size);
    else
        memset(j.buf, 0, s->page_size);
    return enqueue(s, &j, err);
}

int qs_sink_put(qs_sink *s, uint64_t voff, const uint8_t *data, uint8_t fill,
                qs_sink_err *err)
{
    uint32_t ps = s->page_size;
    if (has_failed(s))
        return write_error(s, err);
    if (voff & (ps - 1) || voff >= s->virtual_size)
        return fail(err, QS_SINK_ERANGE, 0, voff, 0, voff);
    uint64_t pi = voff >> s->page_bits;
    uint64_t c = voff >> s->cluster_bits;
    uint64_t in = voff & (s->cluster_size - 1);
    int zero;

    if (data) {
        zero = qs_is_zero(data, ps);
    } else if (fill) {
        memset(s->scratch, fill, ps);
        data = s->scratch;
        zero = 0;
    } else {
        zero = 1;
    }
    const pstate *p = &s->ps;
    uint64_t ci = c % p->k, pj = pi % CHUNK_PAGES;
    uint8_t *m;
    int rc = pstate_chunk(&s->ps, c / p->k, 1, &m, err);
    if (rc)
        return rc;
    int32_t slot = (int32_t)ch_slot(p, m)[ci] - 1;
    uint64_t host = ch_host(p, m)[ci];
    int par = parent_has(s, c);

    /* parent mode: a cluster the chain holds data for opens with its current
     * content (a zero put to a ZERO cluster changes nothing) */
    if (par && slot == NO_SLOT && host <= QS_SINK_HOST_INHERIT &&
        !(zero && host == QS_SINK_HOST_ZERO)) {
        rc = slot_reopen(s, c, host, &slot, err);
        if (rc)
            return rc;
        rc = pstate_chunk(&s->ps, c / p->k, 1, &m, err);
        if (rc)
            return rc;
    }
    int was = bit_get(ch_bm(p, m), pj);

    if (slot != NO_SLOT) {
        if (par)
            note_differs(s, slot, in, m, pj, zero ? NULL : data);
        /* a page that becomes zero only loses its bit: the bytes left in
         * the buffer are cleared when the cluster is queued */
        if (!zero)
            copy_to_cluster(s->slot_buf[slot] + in, data, ps);
        s->slot_stamp[slot] = ++s->clock;
    } else if (host > QS_SINK_HOST_INHERIT) {
        if (!zero || was) {
            rc = queue_page(s, host + in, voff, zero ? NULL : data, err);
            if (rc)
                return rc;
            s->st.page_rewrites++;
        }
    } else if (!zero) {
        rc = slot_open(s, c, &slot, err);
        if (rc)
            return rc;
        copy_to_cluster(s->slot_buf[slot] + in, data, ps);
        s->slot_stamp[slot] = ++s->clock;
    }
    /* slot_open may have loaded another chunk: look this one up again */
    rc = pstate_chunk(&s->ps, c / p->k, 1, &m, err);
    if (rc)
        return rc;

    if (zero) {
        bit_set(ch_bm(p, m), pj, 0);
        ch_crc(p, m)[pj] = 0;
        s->st.pages_zero++;
    } else {
        bit_set(ch_bm(p, m), pj, 1);
        ch_crc(p, m)[pj] = qs_crc32c(0, data, ps);
        s->st.pages_nonzero++;
    }

    /* Once every page of a cluster has arrived, the cluster is queued at
     * once instead of when the LRU evicts it: a stream in page order keeps a
     * slot or two busy, not all of them, and so touches few buffers and
     * keeps them in the cache.  A later re-send of one of its pages (live
     * precopy) is a rewrite in place. */
    if (!bit_get(ch_seen(p, m), pj)) {
        bit_set(ch_seen(p, m), pj, 1);
        slot = (int32_t)ch_slot(p, m)[ci] - 1;
        if (++ch_clseen(p, m)[ci] == cluster_pages(s) && slot != NO_SLOT)
            return slot_write_out(s, slot, 0, err);
    }
    return QS_SINK_OK;
}

int qs_sink_get(qs_sink *s, uint64_t voff, uint8_t *out, qs_sink_err *err)
{
    uint32_t ps = s->page_size;
    if (has_failed(s))
        return write_error(s, err);
    if (voff & (ps - 1) || voff >= s->virtual_size)
        return fail(err, QS_SINK_ERANGE, 0, voff, 0, voff);
    uint64_t c = voff >> s->cluster_bits;
    uint64_t in = voff & (s->cluster_size - 1);
    const pstate *p = &s->ps;
    uint8_t *m;
    int rc = pstate_chunk(&s->ps, c / p->k, 0, &m, err);
    if (rc)
        return rc;
    int32_t slot = (int32_t)ch_slot(p, m)[c % p->k] - 1;
    uint64_t host = ch_host(p, m)[c % p->k];
    int stored = bit_get(ch_bm(p, m), (voff >> s->page_bits) % CHUNK_PAGES);
    if (slot != NO_SLOT && stored) {
        memcpy(out, s->slot_buf[slot] + in, ps);
    } else if (slot != NO_SLOT) {
        memset(out, 0, ps);   /* the buffer may hold stale bytes there */
    } else if (host == QS_SINK_HOST_INHERIT && stored) {
        rc = parent_read(s, c, in, out, ps, err);
        if (rc)
            return rc;
    } else if (host > QS_SINK_HOST_INHERIT && stored) {
        /* the cluster, or a rewrite of this page, may still be queued */
        rc = drain(s, err);
        if (rc)
            return rc;
        rc = pread_full(s, s->bounce, ps, host + in, voff, err);
        if (rc)
            return rc;
        memcpy(out, s->bounce, ps);
    } else {
        memset(out, 0, ps);
    }
    return QS_SINK_OK;
}

int qs_sink_put_batch(qs_sink *s, const qs_sink_rec *recs, size_t n,
                      const uint8_t *data, size_t data_len,
                      const uint64_t *region_offsets, uint32_t n_blocks,
                      qs_sink_err *err)
{
    const uint64_t *offs = region_offsets ? region_offsets : s->blk_off;
    uint32_t nb = region_offsets ? n_blocks : s->n_blocks;
    uint32_t ps = s->page_size;
    int rc;

    if (has_failed(s))
        return write_error(s, err);
    for (size_t i = 0; i < n; i++) {
        const qs_sink_rec *r = &recs[i];
        uint16_t type = r->flags & (uint16_t)~QS_RAM_FLAG_CONTINUE;
        if (err) {
            err->rec_index = i;
            err->block = r->block;
            err->offset = r->offset;
        }
        if (type == QS_RAM_FLAG_MULTIFD_FLUSH)
            continue;
        if (type == QS_RAM_FLAG_COMPRESS_PAGE)
            return fail(err, QS_SINK_EUNSUPPORTED, 0, 0, 0, r->flags);
        if (type != QS_RAM_FLAG_ZERO && type != QS_RAM_FLAG_PAGE &&
            type != QS_RAM_FLAG_XBZRLE)
            return fail(err, QS_SINK_EBADREC, 0, 0, 0, r->flags);
        if (r->block >= nb)
            return fail(err, QS_SINK_EBLOCK, 0, 0, 0, r->block);
        uint64_t base = offs[r->block];
        uint64_t limit = s->virtual_size - (base < s->virtual_size ? base : s->virtual_size);
        if (s->blk_len && r->block < s->n_blocks && s->blk_len[r->block] < limit)
            limit = s->blk_len[r->block];
        if (r->offset & (ps - 1) || r->offset >= limit || limit - r->offset < ps)
            return fail(err, QS_SINK_ERANGE, 0, base + r->offset, 0, r->offset);
        uint64_t voff = base + r->offset;
        const uint8_t *payload = NULL;
        if (type != QS_RAM_FLAG_ZERO) {
            if (r->data_pos > data_len || r->data_len > data_len - r->data_pos ||
                (type == QS_RAM_FLAG_PAGE ? r->data_len != ps : r->data_len > ps))
                return fail(err, QS_SINK_EDATA, 0, voff, 0, r->data_len);
            payload = data + r->data_pos;
        }
        if (s->blk_records && r->block < s->n_blocks)
            s->blk_records[r->block]++;
        if (type == QS_RAM_FLAG_ZERO) {
            rc = qs_sink_put(s, voff, NULL, r->fill, err);
        } else if (type == QS_RAM_FLAG_PAGE) {
            rc = qs_sink_put(s, voff, payload, 0, err);
        } else {
            uint8_t *page = s->scratch;
            rc = qs_sink_get(s, voff, page, err);
            if (rc)
                return rc;
            long d = qs_xbzrle_decode(payload, r->data_len, page, ps);
            if (d < 0)
                return fail(err, QS_SINK_EXBZRLE, 0, voff, 0, (uint64_t)(-1 - d));
            /* put() only uses scratch for fill pages, never for data pages */
            rc = qs_sink_put(s, voff, page, 0, err);
        }
        if (rc)
            return rc;
    }
    return QS_SINK_OK;
}

/* Parent mode, once every slot is closed: a cluster the chain holds data
 * for that no put opened becomes ZERO (an unsent page is zero); one INHERITED
 * when it was evicted with pages missing is opened and closed again, now
 * with its missing pages zero. */
static int settle_parent(qs_sink *s, qs_sink_err *err)
{
    if (!s->par_src)
        return QS_SINK_OK;
    for (uint64_t c = 0; c < s->n_clusters; c++) {
        if (!s->par_src[c])
            continue;
        uint8_t *m;
        int rc = pstate_chunk(&s->ps, c / s->ps.k, 0, &m, err);
        if (rc)
            return rc;
        uint64_t host = ch_host(&s->ps, m)[c % s->ps.k];
        if (host == QS_SINK_HOST_INHERIT && ch_clseen(&s->ps, m)[c % s->ps.k] < cluster_pages(s)) {
            int32_t slot;
            rc = slot_reopen(s, c, host, &slot, err);
            if (rc == QS_SINK_OK)
                rc = slot_write_out(s, slot, 1, err);
            if (rc)
                return rc;
        } else if (host == 0) {
            rc = pstate_chunk(&s->ps, c / s->ps.k, 1, &m, err);
            if (rc)
                return rc;
            ch_host(&s->ps, m)[c % s->ps.k] = QS_SINK_HOST_ZERO;
            mark_differs(s, c, m);
            s->st.clusters_zeroed++;
        }
    }
    return QS_SINK_OK;
}

int qs_sink_flush(qs_sink *s, qs_sink_err *err)
{
    int rc = QS_SINK_OK;
    for (;;) {
        int32_t best = NO_SLOT;
        for (uint32_t i = 0; i < s->n_slots; i++) {
            if (s->slot_cluster[i] == UINT64_MAX)
                continue;
            if (best == NO_SLOT || s->slot_cluster[i] < s->slot_cluster[best])
                best = (int32_t)i;
        }
        if (best == NO_SLOT || (rc = slot_write_out(s, best, 1, err)))
            break;
    }
    if (rc == QS_SINK_OK)
        rc = settle_parent(s, err);
    /* on an error too: when flush returns, the writer leaves the fd alone */
    qs_sink_err derr = err ? *err : (qs_sink_err){0};
    int drc = drain(s, &derr);
    if (drc && (drc == QS_SINK_EINTR || rc == QS_SINK_OK)) {
        rc = drc;
        if (err)
            *err = derr;
    }
    if (rc == QS_SINK_EINTR)
        return rc;   /* writes still in flight: the file is trimmed by the next flush */
    /* the file ends at the append position again (written clusters only) */
    if (s->preallocated && ftruncate(s->fd, (off_t)s->st.append_offset) && rc == QS_SINK_OK)
        rc = fail(err, QS_SINK_EWRITE, errno, 0, s->st.append_offset, 0);
    s->prealloc_end = s->prealloc_end ? s->st.append_offset : 0;
    return rc;
}

void qs_sink_get_stats(const qs_sink *s, qs_sink_stats *out)
{
    *out = s->st;
    out->bytes_written = __atomic_load_n(&s->bytes_written, __ATOMIC_RELAXED);
}

uint64_t qs_sink_n_clusters(const qs_sink *s) { return s->n_clusters; }
uint64_t qs_sink_n_pages(const qs_sink *s) { return s->n_pages; }

int qs_sink_read_hosts(qs_sink *s, uint64_t first, uint64_t n, uint64_t *out, qs_sink_err *err)
{
    const pstate *p = &s->ps;
    if (first > s->n_clusters || n > s->n_clusters - first)
        return fail(err, QS_SINK_ERANGE, 0, 0, 0, first);
    for (uint64_t c = first; c < first + n;) {
        uint8_t *m;
        int rc = pstate_chunk(&s->ps, c / p->k, 0, &m, err);
        if (rc)
            return rc;
        uint64_t ci = c % p->k, take = p->k - ci;
        take = take < first + n - c ? take : first + n - c;
        memcpy(out + (c - first), ch_host(p, m) + ci, take * sizeof(uint64_t));
        c += take;
    }
    return QS_SINK_OK;
}

int qs_sink_read_pages(qs_sink *s, uint64_t first, uint64_t n, uint8_t *bitmap,
                       uint32_t *crcs, qs_sink_err *err)
{
    const pstate *p = &s->ps;
    if (first % 8 || first > s->n_pages || n > s->n_pages - first)
        return fail(err, QS_SINK_ERANGE, 0, 0, 0, first);
    for (uint64_t i = first; i < first + n;) {
        uint8_t *m;
        int rc = pstate_chunk(&s->ps, i / CHUNK_PAGES, 0, &m, err);
        if (rc)
            return rc;
        uint64_t pj = i % CHUNK_PAGES, take = CHUNK_PAGES - pj;
        take = take < first + n - i ? take : first + n - i;
        if (bitmap)
            memcpy(bitmap + (i - first) / 8, ch_bm(p, m) + pj / 8, (take + 7) / 8);
        if (crcs)
            memcpy(crcs + (i - first), ch_crc(p, m) + pj, take * sizeof(uint32_t));
        i += take;
    }
    return QS_SINK_OK;
}
const uint64_t *qs_sink_block_records(const qs_sink *s) { return s->blk_records; }
