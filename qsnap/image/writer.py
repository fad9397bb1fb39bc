"""ImageWriter: writes a qsnap image crash-safely (docs/image-format.md, section 4).

Pages go through a ClusterSink (C) into a temporary file beside the target;
finish() appends the metadata region and the qcow2 tables, sets COMPLETE in
the header as the very last write and renames the file over the target.
"""

import errno
import os
import time
import warnings

import numpy as np

import qsnap
from qsnap._core import HOST_ZERO, ClusterSink, crc32c
from qsnap.atomic import datasync, io_error, publish, pwrite_all
from qsnap.errors import ImageError, IOFailure, UsageError
from qsnap.image import layout, qcow2
from qsnap.image.chain import cluster_sources
from qsnap.image.layout import Blob, StreamBlob, block_field, pages_of

DEFAULT_CLUSTER_SIZE = 1 << 20
# Pages of per-page state (stored bits, checksums) read from the sink at a time
# while the metadata is written: 4 MiB of checksums, whatever the guest's size.
STATE_WINDOW = 1 << 20
# Bytes gathered before one write of the metadata region.
META_WRITE = 4 << 20
# Where data clusters are written: 'writeback' through the page cache; 'none'
# with O_DIRECT (a warning and the page cache where the filesystem refuses it);
# 'auto' with O_DIRECT where the filesystem takes it, silently the page cache
# elsewhere. Header, tables and metadata always go through the page cache.
CACHE_MODES = ("auto", "none", "writeback")


class ImageWriter:
    """Write one qsnap image at ``path``.

    Usage::

        with ImageWriter(path) as w:
            w.start(blocks)
            w.sink.put_batch(records, data)     # any number of times
            summary = w.finish(header_bytes=..., device_state=..., ...)

    An exception inside the ``with`` (or abort()) removes the temporary file;
    the file at ``path`` is replaced only by a successful finish().

    ``parent``: an opened Image (with its chain): the image is its child
    (docs/image-format.md, "Backing chains"), storing only the clusters whose
    content differs from the chain's.  The caller keeps it open until the
    writer is finished or aborted.
    """

    def __init__(self, path, *, cluster_size=DEFAULT_CLUSTER_SIZE, cache="writeback",
                 target_page_size=4096, n_slots=32, parent=None):
        if cluster_size & (cluster_size - 1) or not (1 << 16) <= cluster_size <= (1 << 21):
            raise UsageError(f"cluster size {cluster_size} is not a power of two in 64 KiB..2 MiB")
        if target_page_size & (target_page_size - 1) or not 512 <= target_page_size <= 65536:
            raise UsageError(f"target page size {target_page_size} is not a power of two in 512..65536")
        if cache not in CACHE_MODES:
            raise UsageError(f"cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}")
        self.path = os.fspath(path)
        self.cluster_size = cluster_size
        self.cluster_bits = cluster_size.bit_length() - 1
        self.target_page_size = target_page_size
        self.cache = cache
        self.n_slots = n_slots
        self.parent = parent
        self.backing_name = layout.backing_name(parent.path, self.path) if parent else None
        self.sink = None
        self.blocks = None
        self.region_offsets = None
        self.meta_offset = None
        self.direct = False
        self._fd = -1         # buffered fd: header, metadata, tables
        self._dfd = -1        # the sink's fd (O_DIRECT with cache 'none' or 'auto')
        self._done = False
        self._t0 = time.monotonic()
        d, name = os.path.split(os.path.abspath(self.path))
        self.dir = d
        self.tmp_path = None
        try:
            for _ in range(100):
                cand = os.path.join(d, f".{name}.qsnap-{os.urandom(4).hex()[:6]}")
                try:
                    self._fd = os.open(cand, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                except FileExistsError:
                    continue
                self.tmp_path = cand
                break
            else:
                raise IOFailure(f"cannot create a temporary file beside {self.path}")
        except OSError as e:
            raise io_error(e, "creating a temporary file beside", self.path) from None
        try:
            self._dfd = self._open_sink_fd()
            self._write_header(complete=False, size=0, l1_size=0, l1_offset=0, reftable_offset=0,
                               reftable_clusters=0, meta_offset=0, meta_length=0, meta_crc=0)
        except BaseException:
            self.abort()
            raise

    def _open_sink_fd(self):
        """The fd data clusters go to: O_DIRECT for 'none', and for 'auto' where the
        filesystem takes it; otherwise the buffered fd."""
        if self.cache == "writeback":
            return self._fd
        try:
            fd = os.open(self.tmp_path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise io_error(e, "opening", self.tmp_path) from None
            if self.cache == "none":
                warnings.warn(f"the filesystem of {self.dir} refuses O_DIRECT; "
                              "writing through the page cache", RuntimeWarning, stacklevel=3)
            return self._fd
        self.direct = True
        return fd

    # --- low-level writes -------------------------------------------------------

    def _pwrite(self, buf, offset):
        pwrite_all(self._fd, buf, offset, self.tmp_path)

    def _sync(self):
        datasync(self._fd, self.tmp_path)

    def _write_header(self, *, complete, size, l1_size, l1_offset, reftable_offset,
                      reftable_clusters, meta_offset, meta_length, meta_crc,
                      format_version=layout.FORMAT_VERSION):
        hdr = qcow2.make_header(cluster_bits=self.cluster_bits, size=size, l1_size=l1_size,
                                l1_table_offset=l1_offset, refcount_table_offset=reftable_offset,
                                refcount_table_clusters=reftable_clusters)
        ext = layout.pack_qsnap_ext(flags=layout.QSNAP_FLAG_COMPLETE if complete else 0,
                                    meta_offset=meta_offset, meta_length=meta_length,
                                    meta_crc32c=meta_crc, target_page_size=self.target_page_size,
                                    format_version=format_version)
        self._pwrite(qcow2.pack_header_cluster(hdr, [(layout.QSNAP_EXT_TYPE, ext)],
                                               self.cluster_size, backing_name=self.backing_name), 0)

    # --- the save -----------------------------------------------------------------

    def start(self, blocks):
        """Lay out the block regions and create the sink.

        ``blocks``: objects or dicts with ``idstr``, ``length``, ``page_size``
        (optionally ``page_size_on_wire``, ``gpa``), in MEM_SIZE order."""
        if self.sink is not None:
            raise RuntimeError("start() called twice")
        self.blocks = []
        for b in blocks:
            idstr = block_field(b, "idstr")
            if isinstance(idstr, bytes):
                idstr = idstr.decode("utf-8", "replace")
            self.blocks.append({
                "idstr": idstr,
                "length": int(block_field(b, "length")),
                "page_size": int(block_field(b, "page_size", self.target_page_size) or self.target_page_size),
                "page_size_on_wire": bool(block_field(b, "page_size_on_wire", False)),
                "gpa": block_field(b, "gpa", None),
            })
        offsets, self.meta_offset = layout.compute_regions(self.blocks, self.cluster_size)
        self.region_offsets = np.array(offsets, dtype=np.uint64)
        if self.parent is not None:
            self._check_parent_layout()
        lengths = np.array([b["length"] for b in self.blocks], dtype=np.uint64)
        self.sink = ClusterSink(self._dfd, self.meta_offset, cluster_size=self.cluster_size,
                                page_size=self.target_page_size, n_slots=self.n_slots,
                                append_offset=self.cluster_size, direct=self.direct,
                                region_offsets=self.region_offsets, block_lengths=lengths,
                                block_names=[b["idstr"] for b in self.blocks], path=self.tmp_path,
                                spill_dir=self.dir)
        if self.parent is not None:
            self._attach_parent()
        return self.region_offsets

    def _check_parent_layout(self):
        """A child's RAM is laid out as its parent's: the same cluster and target
        page size, the same blocks (idstr, length, page size) at the same regions;
        else a clear error before any page is stored."""
        p = self.parent

        def mismatch(what, mine, theirs):
            raise ImageError(f"cannot save {self.path} onto parent image {p.path}: {what} is "
                             f"{mine} in this stream, {theirs} in the parent (another VM or "
                             f"RAM layout)")

        if p.cluster_size != self.cluster_size:
            mismatch("the cluster size", self.cluster_size, p.cluster_size)
        if p.target_page_size != self.target_page_size:
            mismatch("the target page size", self.target_page_size, p.target_page_size)
        theirs = p.meta["ram_blocks"]
        if len(theirs) != len(self.blocks):
            mismatch("the number of RAM blocks", len(self.blocks), len(theirs))
        for i, (b, q) in enumerate(zip(self.blocks, theirs)):
            mine = {"idstr": b["idstr"], "length": b["length"], "page_size": b["page_size"],
                    "offset": int(self.region_offsets[i])}
            for key, value in mine.items():
                if q[key] != value:
                    show = (lambda v: repr(v)) if key == "idstr" else (lambda v: f"0x{v:x}")
                    mismatch(f"RAM block {i} ({b['idstr']!r}) {key}", show(value), show(q[key]))

    def _attach_parent(self):
        """Give the sink the chain's RAM clusters and files (parent mode)."""
        virt, src, host = (np.asarray(a) for a in cluster_sources(self.parent))
        ram = virt < np.uint64(self.meta_offset // self.cluster_size)
        chain = self.parent.chain
        self.sink.set_parent([img.fd for img in chain], virt[ram], src[ram], host[ram],
                             [img.path for img in chain])

    def finish(self, *, header_bytes=b"", pre_ram=b"", device_state=b"", stream_info=None,
               commands=(), counts=None, machine=None, created=None, vm=None):
        """Write metadata and tables, mark the image COMPLETE, rename it over ``path``.

        ``vm``: the VM record (layout.validate_vm_record) stored as the "vm" key, or None.
        """
        if self.sink is None:
            raise RuntimeError("finish() before start()")
        try:
            return self._finish(header_bytes, pre_ram, device_state, stream_info or {},
                                commands, counts or {}, machine, created, vm)
        except BaseException:
            self.abort()
            raise

    def _finish(self, header_bytes, pre_ram, device_state, stream_info, commands, counts,
                machine, created, vm):
        sink = self.sink
        sink.flush()
        ram_blocks, total_nonzero, n_records, (virt, hosts, zero_virt) = self._ram_blocks()
        full_counts = {"pages": n_records, "nonzero_pages": total_nonzero,
                       "zero_pages": n_records - min(n_records, total_nonzero),
                       "page_records": n_records, "stream_bytes": 0}
        full_counts.update(counts)
        doc = {
            "format_version": layout.FORMAT_VERSION,
            "image_id": layout.new_image_id(),
            "parent": (layout.parent_record(self.parent, self.backing_name)
                       if self.parent is not None else None),
            "qsnap_version": qsnap.__version__,
            "created": created or layout.iso_utc_now(),
            "machine": machine,
            "target_page_size": self.target_page_size,
            "cluster_size": self.cluster_size,
            "checksum": layout.CHECKSUM_NAME,
            "stream": self._stream_doc(header_bytes, pre_ram, commands, stream_info),
            "ram_blocks": ram_blocks,
            "device_state": Blob(device_state),
            "counts": full_counts,
        }
        if vm is not None:
            doc["vm"] = vm
        meta_length, meta_crc, virt, hosts, pos, virtual_size = self._write_metadata(doc, virt, hosts)
        tl, l1_size = self._write_tables(virt, hosts, pos, virtual_size, zero_virt)
        self._write_header(complete=True, size=virtual_size, l1_size=l1_size,
                           l1_offset=tl.l1_offset, reftable_offset=tl.reftable_offset,
                           reftable_clusters=tl.reftable_clusters, meta_offset=self.meta_offset,
                           meta_length=meta_length, meta_crc=meta_crc)
        self._sync()
        counters, n_data = sink.counters(), len(virt) - qcow2.size_to_clusters(meta_length,
                                                                                self.cluster_size)
        sink.close()   # its writer threads go before the fd they write to
        self._put_in_place()
        return {
            "path": self.path,
            "file_bytes": tl.end,
            "virtual_size": virtual_size,
            "cluster_size": self.cluster_size,
            "data_clusters": n_data,
            "meta_offset": self.meta_offset,
            "meta_length": meta_length,
            "nonzero_pages": total_nonzero,
            "blocks": len(self.blocks),
            "direct_io": self.direct,
            "seconds": time.monotonic() - self._t0,
            **counters,
        }

    def _ram_blocks(self):
        """Metadata of every block, pages stored, records seen, and the data clusters
        (virtual cluster indices, host offsets).  The bitmaps and checksums are blobs
        read from the sink window by window (their crc32c now, their bytes when the
        metadata region is written), so they are never held whole."""
        sink, tps = self.sink, self.target_page_size
        records = sink.block_records()
        ram_blocks = []
        total_nonzero = 0
        for i, b in enumerate(self.blocks):
            first = int(self.region_offsets[i]) // tps
            n = pages_of(b["length"], tps)
            bm_crc, crc_crc, nz = 0, 0, 0
            for bm, crcs in self._state_windows(first, n):
                bm_crc = crc32c(bm, bm_crc)
                crc_crc = crc32c(crcs, crc_crc)
                nz += int(np.bitwise_count(np.frombuffer(bm, np.uint8)).sum())
            total_nonzero += nz
            ram_blocks.append({
                **b,
                "offset": int(self.region_offsets[i]),
                "migrated": bool(records[i]) if len(records) else False,
                "nonzero_pages": nz,
                "bitmap": StreamBlob((n + 7) // 8, bm_crc,
                                        lambda f=first, n=n: (w[0] for w in self._state_windows(f, n))),
                "checksums": StreamBlob(4 * n, crc_crc,
                                           lambda f=first, n=n: (w[1] for w in self._state_windows(f, n))),
            })
        n_records = int(records.sum()) if len(records) else 0
        return ram_blocks, total_nonzero, n_records, self._data_clusters()

    def _state_windows(self, first, n):
        """(stored bits, little-endian checksums) bytes of pages first..first+n-1,
        STATE_WINDOW pages at a time (``first`` is cluster aligned, so a multiple of 8)."""
        for at in range(0, n, STATE_WINDOW):
            k = min(STATE_WINDOW, n - at)
            yield (self.sink.nonzero_bitmap(first + at, k).tobytes(),
                   self.sink.checksums(first + at, k).astype("<u4", copy=False).tobytes())

    def _data_clusters(self):
        """(virtual cluster indices, host offsets) of the data clusters written, and
        the virtual clusters that read as zeros whatever the parent chain holds (a
        child only; the sink's other clusters are unallocated: zeros in a
        stand-alone image, the chain's content in a child)."""
        sink = self.sink
        n = sink.n_clusters
        step = STATE_WINDOW
        virt, hosts, zero = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
        for at in range(0, n, step):
            h = sink.host_map(at, min(step, n - at))
            used = np.flatnonzero(h >= np.uint64(self.cluster_size))
            virt.append(used.astype(np.uint64) + np.uint64(at))
            hosts.append(h[used])
            zero.append(np.flatnonzero(h == np.uint64(HOST_ZERO)).astype(np.uint64) + np.uint64(at))
        return np.concatenate(virt), np.concatenate(hosts), np.concatenate(zero)

    def _stream_doc(self, header_bytes, pre_ram, commands, stream_info):
        """meta.stream: what regenerates the stream besides pages and device state."""
        stream = {
            "header": Blob(header_bytes), "pre_ram": Blob(pre_ram),
            "commands": [[int(c), p.hex() if isinstance(p, (bytes, bytearray, memoryview)) else str(p)]
                         for c, p in commands],
            "footers": True, "ram_section": None, "ram_end": True, "switchover_start": False,
            "return_path": False, "postcopy_advise": None, "capabilities": [],
            "mem_size_total": sum(b["length"] for b in self.blocks),
        }
        stream.update({k: v for k, v in stream_info.items() if k not in ("header", "pre_ram", "commands")})
        return stream

    def _write_metadata(self, doc, virt, hosts):
        """The metadata region, streamed to the clusters after the data clusters:
        (its length, its crc32c, data and metadata clusters (virtual, host), next
        offset, virtual size)."""
        cs = self.cluster_size
        pos = self.sink.append_offset
        out = _Appender(self, pos)
        meta_length, meta_crc = layout.write_meta_region(doc, out.write)
        meta_clusters = qcow2.size_to_clusters(meta_length, cs)
        out.write(bytes(meta_clusters * cs - meta_length))
        out.flush()
        virtual_size = self.meta_offset + meta_clusters * cs
        first_meta = self.meta_offset // cs
        virt = np.concatenate([virt, np.arange(first_meta, first_meta + meta_clusters, dtype=np.uint64)])
        hosts = np.concatenate([hosts, pos + np.arange(meta_clusters, dtype=np.uint64) * np.uint64(cs)])
        return meta_length, meta_crc, virt, hosts, pos + meta_clusters * cs, virtual_size

    def _write_tables(self, virt, hosts, pos, virtual_size, zero_virt=None):
        """L2 tables, L1, refcount blocks and table from ``pos`` on, synced: (table layout, l1_size).
        ``virt``/``hosts``: every mapped cluster (virtual cluster index, host offset);
        ``zero_virt``: the clusters that get the bare zero flag."""
        tl, l1_size = qcow2.write_tables(self._pwrite, virt, hosts, self.cluster_bits, pos,
                                         virtual_size, zero_virt)
        self._sync()
        return tl, l1_size

    def _replace_metadata(self, img, doc, tail_off, tail):
        """Copy the data clusters of ``img`` at their host offsets, append the
        metadata region of ``doc`` (streamed: its blobs may read from ``img``),
        ``tail`` at ``tail_off`` from the region's start, new tables; mark COMPLETE."""
        cs = self.cluster_size
        self.meta_offset = img.meta_offset
        virt, hosts, data_end = _data_clusters(img)
        self._copy_range(img.fd, cs, data_end)
        out = _Appender(self, data_end)
        meta_length, meta_crc = layout.write_meta_region(doc, out.write)
        out.write(bytes(tail_off - meta_length))
        out.write(tail)
        n_area = qcow2.size_to_clusters(tail_off + len(tail), cs)
        out.write(bytes(n_area * cs - tail_off - len(tail)))
        out.flush()
        virtual_size = self.meta_offset + n_area * cs
        first = self.meta_offset // cs
        virt = np.concatenate([virt.astype(np.uint64),
                               np.arange(first, first + n_area, dtype=np.uint64)])
        hosts = np.concatenate([hosts, data_end + np.arange(n_area, dtype=np.uint64) * np.uint64(cs)])
        tl, l1_size = self._write_tables(virt, hosts, data_end + n_area * cs, virtual_size)
        self._write_header(complete=True, size=virtual_size, l1_size=l1_size,
                           l1_offset=tl.l1_offset, reftable_offset=tl.reftable_offset,
                           reftable_clusters=tl.reftable_clusters, meta_offset=self.meta_offset,
                           meta_length=meta_length, meta_crc=meta_crc,
                           format_version=doc["format_version"])
        self._sync()
        self._put_in_place()

    def _copy_range(self, src_fd, start, end):
        """Bytes [start, end) of ``src_fd`` to the same offsets of the temporary file
        (copy_file_range: shared extents where the filesystem can)."""
        pos = start
        try:
            while pos < end:
                n = os.copy_file_range(src_fd, self._fd, end - pos, pos, pos)
                if n <= 0:
                    raise IOFailure(f"image file ends at 0x{pos:x} while copying its data clusters")
                pos += n
        except OSError as e:
            raise io_error(e, "copying the data clusters to", self.tmp_path, pos) from None

    def _put_in_place(self):
        """The complete, synced image replaces whatever was at ``path``."""
        self._close_fds()
        publish(self.tmp_path, self.path, self.dir, "the image")
        self._done = True

    def _close_fds(self):
        if self._dfd >= 0 and self._dfd != self._fd:
            os.close(self._dfd)
        self._dfd = -1
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def abort(self):
        """Discard the temporary file; the file at ``path`` is left as it was."""
        self.sink = None if self._done else self.sink
        if self.sink is not None:
            # stop the sink's writer thread before its fd is closed (and its
            # number perhaps reused): queued cluster writes are dropped
            self.sink.close()
        self._close_fds()
        if not self._done and self.tmp_path is not None:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass
            self.tmp_path = None

    close = abort

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._done:
            self.abort()
        return False


class _Appender:
    """Sequential writes to the image from ``pos`` on, gathered into META_WRITE pieces."""

    def __init__(self, writer, pos):
        self.w, self.pos, self.buf = writer, pos, bytearray()

    def write(self, data):
        self.buf += data
        if len(self.buf) >= META_WRITE:
            self.flush()

    def flush(self):
        if self.buf:
            self.w._pwrite(self.buf, self.pos)
            self.pos += len(self.buf)
            self.buf = bytearray()


def _data_clusters(img):
    """(virtual cluster, host offset) arrays of the RAM data clusters and where they end.

    qsnap appends data clusters from cluster 1 on, before any metadata: anything
    else is a layout this rewrite would not preserve, so it is refused."""
    cs, cb = img.cluster_size, img.cluster_bits
    mapped_virt, mapped_host = np.asarray(img._mapped_virt), np.asarray(img._mapped_host)
    sel = mapped_virt < np.uint64(img.meta_offset >> cb)
    virt = mapped_virt[sel].astype(np.int64)
    hosts = mapped_host[sel]
    data_end = int(hosts.max()) + cs if len(hosts) else cs
    if len(hosts) != data_end // cs - 1:
        raise ImageError(f"{img.path}: data clusters are not contiguous from cluster 1 "
                         f"(they end at 0x{data_end:x}); cannot rewrite its metadata")
    return virt, hosts, data_end


def replace_metadata(img, doc, tail_off, tail):
    """Replace the metadata of the opened image ``img`` crash-safely: a complete new
    image (same data clusters, the metadata region of ``doc`` followed by ``tail``
    at ``tail_off`` from its start) is written beside it, synced and renamed over it."""
    w = ImageWriter(img.path, cluster_size=img.cluster_size, cache="writeback",
                    target_page_size=img.target_page_size)
    try:
        w._replace_metadata(img, doc, tail_off, tail)
    except BaseException:
        w.abort()
        raise
