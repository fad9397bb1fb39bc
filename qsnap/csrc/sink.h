/* The save hot path: RAM pages -> cluster-sized buffers -> an image file.
 *
 * A qs_sink covers a "virtual RAM space" (the block regions of
 * docs/image-format.md, section 2). It keeps, per virtual cluster, its host
 * offset in the file (0 = unallocated) and the slot buffer it is open in; per
 * target page, a "stored" bit (the page is non-zero) and its crc32c.  That
 * state lives in chunks (4096 pages each): a bounded number in memory, the
 * others in a spill file (qs_sink_set_spill), so the sink's memory does not
 * grow with the guest.
 * Clusters are written whole, at the append position, as soon as every page
 * of theirs has arrived (data or zero), else when their slot is evicted
 * (least recently used) or on qs_sink_flush(); a page that arrives for a
 * cluster already on disk is rewritten in place.
 *
 * Parent mode (qs_sink_set_parent): the image is a child whose clusters
 * may read from a parent chain.  A cluster the chain holds data for is
 * pre-filled from it when its slot opens; each page put is compared with the
 * bytes there while it is still as the parent has it.  At close a cluster
 * with no page that differs is INHERITED (not written), one whose pages are
 * all zero is ZERO, any other is written whole.  The host map then holds
 * QS_SINK_HOST_ZERO / QS_SINK_HOST_INHERIT for those (docs/architecture.md).
 *
 * The writes run on writer threads that the sink starts and stops: a
 * complete or evicted cluster or a rewritten page is queued (its host offset
 * assigned at once) and the caller goes on.  A failed write is reported by the calls that
 * follow it (put, put_batch, get, flush), at the latest by qs_sink_flush(),
 * which waits for every queued write.  One caller thread at a time; the
 * functions may be called without the GIL.  No Python.h. */
#ifndef QSNAP_SINK_H
#define QSNAP_SINK_H
#include <stddef.h>
#include <stdint.h>

#include "intr.h"
#include "ramparse.h"

/* The sink consumes the stream parser's page records as they are. */
typedef qs_page_rec qs_sink_rec;

/* RAM_SAVE_FLAG_* (QEMU migration/ram.c) */
#define QS_RAM_FLAG_ZERO 0x002
#define QS_RAM_FLAG_PAGE 0x008
#define QS_RAM_FLAG_CONTINUE 0x020
#define QS_RAM_FLAG_XBZRLE 0x040
#define QS_RAM_FLAG_COMPRESS_PAGE 0x100
#define QS_RAM_FLAG_MULTIFD_FLUSH 0x200

/* Status codes (negative); errno is saved in qs_sink_err.errnum. */
enum {
    QS_SINK_OK = 0,
    QS_SINK_EWRITE = -1,      /* pwrite failed (errnum); host_off = where; voff = its cluster or page */
    QS_SINK_EREAD = -2,       /* pread failed (errnum); host_off = where */
    QS_SINK_ENOMEM = -3,      /* value = bytes asked for */
    QS_SINK_EBADREC = -4,     /* unknown record type; value = flags */
    QS_SINK_ERANGE = -5,      /* page offset outside its block / the space; value = offset */
    QS_SINK_EDATA = -6,       /* payload outside the data buffer or of a bad length; value = data_len */
    QS_SINK_EXBZRLE = -7,     /* malformed XBZRLE encoding; value = byte position in it */
    QS_SINK_EUNSUPPORTED = -8,/* COMPRESS_PAGE; value = flags */
    QS_SINK_EBLOCK = -9,      /* block index out of range; value = block */
    QS_SINK_EINVAL = -10,     /* bad sink parameters; value = the bad one (block = its index) */
    QS_SINK_ETHREAD = -11,    /* pthread_*_init / pthread_create failed (errnum) */
    QS_SINK_EINTR = -12,      /* a wait for the writers abandoned by the interrupt hook */
    QS_SINK_ESPILL = -13,     /* spill file read/write failed (errnum); host_off = where; value = 1 if writing */
    QS_SINK_EPARENT = -14,    /* reading the parent chain failed (errnum; EIO: it ends early);
                               * value = the file's index, host_off = where, voff = the cluster */
};

/* Host map values below any data cluster's offset (those are >= cluster_size). */
#define QS_SINK_HOST_ZERO 1     /* the cluster reads as zeros, whatever the parent chain holds */
#define QS_SINK_HOST_INHERIT 2  /* the cluster reads from the parent chain (qcow2: unallocated) */

typedef struct qs_sink_err {
    int status;
    int errnum;
    uint64_t voff;      /* virtual offset of the page concerned */
    uint64_t host_off;  /* file offset of a failed read/write */
    uint64_t value;     /* the bad value */
    uint64_t rec_index; /* index of the record in the batch */
    uint32_t block;     /* its block */
    uint64_t offset;    /* its page offset inside the block */
} qs_sink_err;

typedef struct qs_sink_stats {
    uint64_t pages_zero;       /* zero pages put (fill 0 or all-zero data) */
    uint64_t pages_nonzero;    /* non-zero pages put */
    uint64_t clusters_written; /* whole clusters appended (queued for writing) */
    uint64_t page_rewrites;    /* pages written in place into a cluster already on disk (queued) */
    uint64_t bytes_written;    /* bytes the writer thread has written so far */
    uint64_t append_offset;    /* next free host offset (file length after a flush) */
    uint64_t wait_ns;          /* time the caller waited for the writers (buffers, drains) */
    uint64_t clusters_inherited; /* parent mode: closes as INHERITED (a cluster reopened counts again) */
    uint64_t clusters_zeroed;  /* parent mode: closes as ZERO (the chain holds data there; likewise) */
    uint64_t parent_bytes_read; /* parent mode: bytes read from the parent chain */
} qs_sink_stats;

typedef struct qs_sink qs_sink;

/* fd: open for read and write; direct: the fd has O_DIRECT (all I/O aligned).
 * virtual_size: multiple of cluster_size. cluster_size: power of two,
 * 64 KiB .. 2 MiB. page_size: target page size (power of two, 512 ..
 * cluster_size). append_offset: first host offset for data clusters
 * (cluster aligned, > 0). Starts the writer thread; the fd must stay open
 * until qs_sink_free(). On success *out is the sink and QS_SINK_OK returned;
 * else *out is NULL and *err says why (EINVAL: value = the bad parameter;
 * ENOMEM: value = bytes; ETHREAD: errnum). */
int qs_sink_new(qs_sink **out, int fd, uint64_t virtual_size, uint32_t cluster_size,
                uint32_t page_size, uint32_t n_slots, uint64_t append_offset, int direct,
                qs_sink_err *err);
/* Stops the writer thread: writes still queued are dropped (flush first to
 * keep them). */
void qs_sink_free(qs_sink *s);

/* The hook called every slice the caller waits for the writers
 * (intr.h); copied.  When it says stop, the call returns QS_SINK_EINTR with
 * the page it was putting not stored; the sink may be used or freed. */
void qs_sink_set_intr(qs_sink *s, const qs_intr *intr);

/* The page-state spill file (open read-write, empty, owned by the caller, open
 * until qs_sink_free): from now on at most a few MiB of page state stay in
 * memory.  Only before the first page is put (EINVAL otherwise, or for fd < 0).
 * Without one, all page state stays in memory (allocated as it is touched). */
int qs_sink_set_spill(qs_sink *s, int fd, qs_sink_err *err);

/* Parent mode: fds[0..n_fds) are the parent chain's files (open for reading,
 * until qs_sink_free; not closed by the sink); virt[i] (a virtual cluster
 * index < n_clusters, each listed once) reads from file src[i] at host[i].
 * Clusters not listed read as zeros in the chain.  Only before the first page
 * is put; EINVAL names the bad row (value = its index).  ~12 bytes per cluster. */
int qs_sink_set_parent(qs_sink *s, const int *fds, uint32_t n_fds, const uint64_t *virt,
                       const uint32_t *src, const uint64_t *host, uint64_t n,
                       qs_sink_err *err);

/* Block regions: offsets[i] (cluster aligned) and lengths[i] (used_length);
 * records address pages by (block, offset). Copies the arrays.  EINVAL names
 * the block (block, offset = its region offset, value = its length). */
int qs_sink_set_blocks(qs_sink *s, const uint64_t *offsets,
                       const uint64_t *lengths, uint32_t n, qs_sink_err *err);

/* One page at virtual offset voff (page aligned): data (page_size bytes) or
 * NULL for a ZERO record filled with `fill`. Last write wins. */
int qs_sink_put(qs_sink *s, uint64_t voff, const uint8_t *data, uint8_t fill,
                qs_sink_err *err);

/* n records whose payloads live in data[0..data_len). region_offsets: NULL
 * to use those of qs_sink_set_blocks, else n_blocks offsets. */
int qs_sink_put_batch(qs_sink *s, const qs_sink_rec *recs, size_t n,
                      const uint8_t *data, size_t data_len,
                      const uint64_t *region_offsets, uint32_t n_blocks,
                      qs_sink_err *err);

/* Write every open cluster (in virtual order) and close its slot; returns
 * once every queued write is done, with the first write error if one failed.
 * Parent mode: a cluster the chain holds data for that no page was put to
 * becomes ZERO (an unsent page is zero). */
int qs_sink_flush(qs_sink *s, qs_sink_err *err);

/* Read the current content of one page (from a slot, the file or zeros);
 * a read from the file first waits for the queued writes. */
int qs_sink_get(qs_sink *s, uint64_t voff, uint8_t *out, qs_sink_err *err);

void qs_sink_get_stats(const qs_sink *s, qs_sink_stats *out);
uint64_t qs_sink_n_clusters(const qs_sink *s);
uint64_t qs_sink_n_pages(const qs_sink *s);
/* Host offsets of virtual clusters first..first+n-1 into out (0 = unallocated;
 * parent mode: QS_SINK_HOST_ZERO, QS_SINK_HOST_INHERIT, see above). */
int qs_sink_read_hosts(qs_sink *s, uint64_t first, uint64_t n, uint64_t *out, qs_sink_err *err);
/* Pages first..first+n-1 (first a multiple of 8): stored bits into bitmap
 * (ceil(n/8) bytes, LSB first; bits past n undefined) and crcs into crcs
 * (n entries, native endianness); either may be NULL.  ERANGE: value = first. */
int qs_sink_read_pages(qs_sink *s, uint64_t first, uint64_t n, uint8_t *bitmap,
                       uint32_t *crcs, qs_sink_err *err);
const uint64_t *qs_sink_block_records(const qs_sink *s); /* records per block */

#endif
