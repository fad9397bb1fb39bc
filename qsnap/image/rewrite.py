"""Rewrite an image's logical content on top of another backing chain: `qsnap flatten`
and `qsnap commit` (docs/image-format.md, "Backing chains").

``rewrite(src, out_path, base)`` writes at ``out_path`` an image whose every page
reads as in ``src`` (an opened Image, its whole chain), backed by the opened chain
``base`` (None: stand-alone).  Per RAM cluster: inherited (no entry) where the base
chain's bytes are equal, compared byte for byte (never by checksum: a crc32c is 32
bits and a guest controls its pages); the bare zero flag where ``src`` reads all
zeros but the base holds data; else the cluster is copied.  The metadata (bitmaps,
checksums, device state, VM record, working set) is copied with the parent record
replaced; the image_id is kept, the content being the same.

Crash safety as `qsnap save` (docs/image-format.md section 4): a temporary file
beside ``out_path``, the COMPLETE header last, fdatasync, rename, fsync of the
directory; on any error or signal the temporary file is removed and whatever was
at ``out_path`` is untouched.
"""
import os
from array import array

import numpy as np

from qsnap._core import is_zero
from qsnap.atomic import AtomicOutput
from qsnap.errors import ImageError, UsageError
from qsnap.image import layout, qcow2, workingset
from qsnap.image.chain import cluster_sources
from qsnap.image.reader import pread_exact

COPY_BATCH = 8 << 20     # bytes of copied clusters gathered before one write


def flatten(path, out_path):
    """`qsnap flatten IMG OUT`: OUT becomes a stand-alone image of IMG's content."""
    from qsnap.image.reader import Image

    with Image.open(path) as img:
        _refuse_chain_member(img, out_path, keep_top=True)
        return rewrite(img, out_path, None)


def commit(path):
    """`qsnap commit IMG`: fold IMG's parent into IMG, which then backs onto its
    grandparent (or stands alone).  The parent file is not touched."""
    from qsnap.image.reader import Image

    with Image.open(path) as img:
        if img.parent is None:
            raise UsageError(f"{path} has no parent image to commit (it stands alone)")
        return rewrite(img, path, img.parent.parent)


def _refuse_chain_member(img, out_path, keep_top):
    """Writing over a parent of ``img`` would change what its children read."""
    try:
        st = os.stat(out_path)
    except OSError:
        return
    for k, im in enumerate(img.chain):
        own = os.fstat(im.fd)
        if (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino) and (k or not keep_top):
            raise UsageError(f"{out_path} is the parent image {im.path} in the backing chain of "
                             f"{img.path}: writing it would change the content of its children")


def rewrite(src, out_path, base, working_set=None, compare_own=True):
    """Write ``src``'s content on top of the chain ``base`` (or stand-alone) at
    ``out_path``; returns a summary dict.  ``working_set``: a WorkingSet to store
    instead of ``src``'s.  ``compare_own=False`` copies the clusters of ``src``'s
    own file without comparing them with the base (``base`` is ``src``'s parent:
    they were stored because they differ)."""
    out_path = os.fspath(out_path)
    name = layout.backing_name(base.path, out_path) if base is not None else None
    if name is not None:
        try:
            qcow2.check_backing_name(name)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if base is not None:
        _check_same_layout(src, base)
    out = _Output(out_path, src.cluster_size)
    try:
        plan = _plan_clusters(src, base)
        virt, hosts, zero_virt, counts = _write_clusters(out, src, base, plan, compare_own)
        doc, ws_off, ws_data = _metadata(src, base, name, working_set or src.working_set)
        summary = out.finish(src, doc, ws_off, ws_data, virt, hosts, zero_virt, name)
    except BaseException:
        out.abort()
        raise
    summary.update(counts)
    summary["backing_file"] = name
    return summary


def _check_same_layout(src, base):
    """The base chain holds the same machine and RAM layout (it is src's ancestry)."""
    mine = [(b.idstr, b.length, b.offset, b.page_size) for b in src.blocks]
    theirs = [(b.idstr, b.length, b.offset, b.page_size) for b in base.blocks]
    if mine != theirs or src.cluster_size != base.cluster_size \
            or src.target_page_size != base.target_page_size or src.meta["machine"] != base.meta["machine"]:
        raise ImageError(f"{base.path} has another machine or RAM layout than {src.path}")


def _plan_clusters(src, base):
    """(virt, chain index, host, base file or None, base host) of every RAM cluster
    with data in ``src``'s chain, in (file, host) order, and the base's clusters
    that ``src`` reads as zeros (they get the zero flag)."""
    virt, srcidx, host = (np.asarray(a) for a in cluster_sources(src))
    n = len(virt)
    b_img = np.full(n, -1, np.int64)
    b_host = np.zeros(n, np.uint64)
    zero_virt = np.zeros(0, np.uint64)
    if base is not None:
        bv, bs, bh = (np.asarray(a) for a in cluster_sources(base))
        order = np.argsort(bv, kind="stable")
        bv, bs, bh = bv[order], bs[order], bh[order]
        pos = np.searchsorted(bv, virt)
        hit = pos < len(bv)
        hit[hit] &= bv[pos[hit]] == virt[hit]
        b_img[hit] = bs[pos[hit]]
        b_host[hit] = bh[pos[hit]]
        zero_virt = bv[~np.isin(bv, virt, assume_unique=True)]
    return virt, srcidx, host, b_img, b_host, zero_virt


def _write_clusters(out, src, base, plan, compare_own):
    """Decide and write every RAM cluster: (virtual clusters copied, their host
    offsets in the output, zero-flagged virtual clusters, counts)."""
    virt, srcidx, host, b_img, b_host, zero_virt = plan
    cs = src.cluster_size
    shared = {k for k, im in enumerate(src.chain) if base is not None and im in base.chain}
    copied_v, copied_h, zeros = array("Q"), array("Q"), array("Q")   # 8 bytes per cluster
    counts = {"clusters_copied": 0, "clusters_inherited": 0, "clusters_zeroed": len(zero_virt)}
    for k in range(len(virt)):
        si, bi = int(srcidx[k]), int(b_img[k])
        if si in shared and bi >= 0 and base.chain[bi] is src.chain[si] and b_host[k] == host[k]:
            counts["clusters_inherited"] += 1      # the very cluster of the base chain
            continue
        f = src.chain[si]
        data = pread_exact(f.fd, cs, int(host[k]), f.path)
        if is_zero(data):
            if bi >= 0:
                zeros.append(int(virt[k]))
                counts["clusters_zeroed"] += 1
            else:
                counts["clusters_inherited"] += 1
            continue
        if bi >= 0 and (compare_own or si):
            g = base.chain[bi]
            if pread_exact(g.fd, cs, int(b_host[k]), g.path) == data:
                counts["clusters_inherited"] += 1
                continue
        copied_v.append(int(virt[k]))
        copied_h.append(out.append_cluster(data))
        counts["clusters_copied"] += 1
    out.flush()
    return (np.frombuffer(copied_v, np.uint64), np.frombuffer(copied_h, np.uint64),
            np.concatenate([zero_virt, np.frombuffer(zeros, np.uint64)]).astype(np.uint64), counts)


def _metadata(src, base, name, ws):
    """(document, working-set offset or None, working-set bytes) of the output."""
    doc = workingset._rebuild_doc(src)
    doc["format_version"] = layout.FORMAT_VERSION
    doc["image_id"] = src.image_id or layout.new_image_id()
    doc["parent"] = layout.parent_record(base, name) if base is not None else None
    doc = {"format_version": doc.pop("format_version"), "image_id": doc.pop("image_id"),
           "parent": doc.pop("parent"), **doc}
    if ws is None:
        return doc, None, b""
    data = ws.entries.tobytes()
    doc, off, _ = workingset.metadata_with(doc, ws, data, src.cluster_size)
    return doc, off, data


class _Output(AtomicOutput):
    """The temporary file beside the output, written a cluster at a time."""

    def __init__(self, path, cluster_size):
        super().__init__(path)
        self.cs = cluster_size
        self.pos = cluster_size            # data clusters from cluster 1 on
        self.buf, self.buf_at = bytearray(), self.pos
        try:
            self.pwrite(bytes(cluster_size), 0)  # the header cluster: no qsnap image until finish
        except BaseException:
            self.abort()
            raise

    def append_cluster(self, data):
        at = self.pos
        self.buf += data
        self.pos += len(data)
        if len(self.buf) >= COPY_BATCH:
            self.flush()
        return at

    def flush(self):
        if self.buf:
            self.pwrite(self.buf, self.buf_at)
        self.buf_at += len(self.buf)
        self.buf = bytearray()

    def finish(self, src, doc, ws_off, ws_data, virt, hosts, zero_virt, name):
        """Metadata region (and working set), tables, synced; then the COMPLETE header,
        synced; rename over the output; fsync of the directory."""
        cs, cb = self.cs, src.cluster_bits
        meta_at = self.pos
        meta_length, meta_crc = layout.write_meta_region(doc, self.append_bytes)
        area = meta_length if ws_off is None else ws_off + len(ws_data)
        if ws_off is not None:
            self.append_bytes(bytes(ws_off - meta_length))
            self.append_bytes(ws_data)
        n_area = qcow2.size_to_clusters(area, cs)
        self.append_bytes(bytes(n_area * cs - area))
        self.flush()
        first = src.meta_offset >> cb
        virt = np.concatenate([virt, np.arange(first, first + n_area, dtype=np.uint64)])
        hosts = np.concatenate([hosts, meta_at + np.arange(n_area, dtype=np.uint64) * np.uint64(cs)])
        virtual_size = src.meta_offset + n_area * cs
        tl, l1_size = qcow2.write_tables(self.pwrite, virt, hosts, cb, self.pos, virtual_size,
                                         zero_virt)
        self.sync()
        hdr = qcow2.make_header(cluster_bits=cb, size=virtual_size, l1_size=l1_size,
                                l1_table_offset=tl.l1_offset, refcount_table_offset=tl.reftable_offset,
                                refcount_table_clusters=tl.reftable_clusters)
        ext = layout.pack_qsnap_ext(flags=layout.QSNAP_FLAG_COMPLETE, meta_offset=src.meta_offset,
                                    meta_length=meta_length, meta_crc32c=meta_crc,
                                    target_page_size=src.target_page_size)
        self.pwrite(qcow2.pack_header_cluster(hdr, [(layout.QSNAP_EXT_TYPE, ext)], cs,
                                              backing_name=name), 0)
        self.commit()
        return {"path": self.path, "file_bytes": tl.end, "virtual_size": virtual_size,
                "image_id": doc["image_id"]}

    def append_bytes(self, data):
        self.buf += data
        self.pos += len(data)
        if len(self.buf) >= COPY_BATCH:
            self.flush()

