"""Working sets: the pages a restored guest asked for first, kept in its image.

A postcopy restore can record the guest's page requests (block, page, time
since the switch to postcopy); the record is stored in the image and later
restores send those pages first (docs/image-format.md, section 5).  A working
set is only a hint for ordering: a damaged one is reported and ignored, never
served as pages, and it never makes the rest of the image unusable.
"""
import numpy as np

from qsnap.errors import ImageError
from qsnap.image import layout
from qsnap.image.layout import pages_of

# One entry per host page, little-endian like the per-page checksum arrays.
ENTRY = np.dtype([("block", "<u4"), ("page", "<u4"), ("t_us", "<u4")])
T_US_MAX = (1 << 32) - 1
# meta.working_set: the blob fields plus these
WS_SCHEMA = {"offset": "uint", "length": "uint", "crc32c": "u32", "pages": "uint",
             "recorded": str, "first_recorded": str, "restores": "uint"}


class WorkingSet:
    """Entries in first-seen order plus when and how often they were recorded."""

    def __init__(self, entries, recorded=None, first_recorded=None, restores=0):
        self.entries = np.asarray(entries, dtype=ENTRY)
        self.recorded = recorded
        self.first_recorded = first_recorded
        self.restores = restores

    def __len__(self):
        return len(self.entries)

    def info(self):
        return {"pages": len(self), "recorded": self.recorded,
                "first_recorded": self.first_recorded, "restores": self.restores}


def entries(items):
    """An ENTRY array from (block, page, t_us) tuples."""
    return np.array([tuple(int(v) for v in it) for it in items], dtype=ENTRY)


def from_requests(requests, host_sizes, tps, t_switch):
    """Entries of recorded page requests ``(t, block, start, length)``, one per
    host page, first-seen order, time in microseconds since ``t_switch``."""
    out = []
    for t, bi, start, length in requests:
        hps = host_sizes[bi]
        t_us = min(T_US_MAX, max(0, int(round((t - t_switch) * 1e6))))
        for off in range(start, start + length, hps):
            out.append((bi, off // tps, t_us))
    return dedup(entries(out))


def dedup(ents):
    """The first occurrence of every (block, page), order kept."""
    if not len(ents):
        return ents
    key = (ents["block"].astype(np.uint64) << np.uint64(32)) | ents["page"].astype(np.uint64)
    _, first = np.unique(key, return_index=True)
    return ents[np.sort(first)]


def merge(old, new):
    """Union of two entry arrays keeping first-seen order: ``old`` first, then what
    ``new`` adds (a page already in ``old`` keeps its earlier time)."""
    return dedup(np.concatenate([np.asarray(old, ENTRY), np.asarray(new, ENTRY)]))


def validate(ents, blocks, tps):
    """Raise ImageError unless every entry names a host page inside a migrated block."""
    if not len(ents):
        return
    bi = ents["block"]
    if int(bi.max()) >= len(blocks):
        k = int(np.flatnonzero(bi >= len(blocks))[0])
        raise ImageError(f"working-set entry {k} names block {int(bi[k])}, the image has "
                         f"{len(blocks)}")
    for i, b in enumerate(blocks):
        pages = ents["page"][bi == i]
        if not len(pages):
            continue
        hp = max(b.page_size, tps) // tps
        bad = np.flatnonzero((pages >= pages_of(b.length, tps)) | (pages % hp != 0))
        if not b.migrated or len(bad):
            p = int(pages[bad[0]]) if len(bad) else int(pages[0])
            raise ImageError(f"working-set page 0x{p * tps:x} of block '{b.idstr}' is outside "
                             f"the block (length 0x{b.length:x}), not host-page aligned or the "
                             f"block was not migrated")


def decode(data, blocks, tps):
    """Checked entries from the stored bytes."""
    if len(data) % ENTRY.itemsize:
        raise ImageError(f"working-set length {len(data)} is not a multiple of {ENTRY.itemsize}")
    ents = np.frombuffer(data, dtype=ENTRY).copy()
    validate(ents, blocks, tps)
    return ents


def read(img):
    """(WorkingSet or None, problem or None) of an opened Image.

    The working set lies after the metadata region (its own clusters, its own
    crc32c), so damage to it leaves the rest of the image usable."""
    ref = img.meta.get("working_set")
    if ref is None:
        return None, None
    try:
        return _read(img, ref), None
    except ImageError as e:
        return None, str(e)


def _read(img, ref):
    if not isinstance(ref, dict):
        raise ImageError("meta.working_set is not an object")
    for key, kind in WS_SCHEMA.items():
        v = ref.get(key)
        ok = (isinstance(v, str) if kind is str else
              type(v) is int and v >= 0 and (kind != "u32" or v < 1 << 32))
        if not ok:
            raise ImageError(f"meta.working_set.{key} is missing or not a {kind}: {v!r}")
    start = layout.align_up(img.meta_length, layout.BLOB_ALIGN)
    if ref["offset"] < start or img.meta_offset + ref["offset"] + ref["length"] > img.virtual_size:
        raise ImageError(f"working set 0x{ref['offset']:x}+0x{ref['length']:x} lies outside the "
                         f"space after the metadata region")
    data = img._read_virtual(img.meta_offset + ref["offset"], ref["length"])
    crc = layout._crc32c(data)
    if crc != ref["crc32c"]:
        raise ImageError(f"working-set checksum mismatch: stored 0x{ref['crc32c']:08x}, "
                         f"computed 0x{crc:08x}")
    ents = decode(data, img.blocks, img.target_page_size)
    if len(ents) != ref["pages"]:
        raise ImageError(f"working set holds {len(ents)} pages, meta.working_set.pages says "
                         f"{ref['pages']}")
    return WorkingSet(ents, ref["recorded"], ref["first_recorded"], ref["restores"])


def usable(img, log):
    """The working set a restore of ``img`` may use, or None; a damaged one is
    reported with one warning line on ``log`` (images from tests may lack both)."""
    problem = getattr(img, "working_set_problem", None)
    if problem:
        log.write(f"qsnap: warning: ignoring the working set of {img.path}: {problem}\n")
        log.flush()
    return getattr(img, "working_set", None)


def clusters_first(entries, blocks, host, virt, cluster_size, tps):
    """A permutation of a cluster plan (``host``/``virt`` arrays, host order) that
    puts the data clusters holding working-set pages first, in the order their
    first page was recorded; the others keep their order."""
    if not len(entries) or not len(virt):
        return np.arange(len(virt))
    offs = np.array([b.offset for b in blocks], np.uint64)
    v = offs[entries["block"].astype(np.int64)] + entries["page"].astype(np.uint64) * np.uint64(tps)
    v -= v % np.uint64(cluster_size)
    _, first = np.unique(v, return_index=True)
    wanted = v[np.sort(first)]
    rank = np.full(len(virt), len(wanted), np.int64)
    by_virt = np.argsort(virt, kind="stable")
    pos = np.searchsorted(virt[by_virt], wanted)
    ok = pos < len(virt)
    ok[ok] &= virt[by_virt[pos[ok]]] == wanted[ok]        # an all-zero cluster is not in the plan
    rank[by_virt[pos[ok]]] = np.flatnonzero(ok)
    return np.argsort(rank, kind="stable")


# --- storing --------------------------------------------------------------------------

def _rebuild_doc(img):
    """The image's metadata document with every blob reference replaced by a blob
    that reads its bytes from the image as the new region is written, a window
    at a time (their crc32c were checked when the image was opened)."""
    def walk(obj, path):
        if isinstance(obj, dict):
            if set(obj) == {"offset", "length", "crc32c"}:
                return layout.StreamBlob(obj["length"], obj["crc32c"],
                                         lambda ref=obj: img.blob_chunks(ref))
            return {k: walk(v, f"{path}.{k}") for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return obj
    doc = {k: v for k, v in img.meta.items() if k != "working_set"}
    return walk(doc, "meta")


def metadata_with(doc, ws, data, cluster_size):
    """(document, working-set offset relative to the region, region length): ``doc``
    plus a ``working_set`` reference to ``data`` at the first cluster boundary
    after the region (it depends on the JSON's length: iterate to the fixed point)."""
    crc = layout._crc32c(data)
    off = cluster_size
    while True:
        ref = {"offset": off, "length": len(data), "crc32c": crc, "pages": len(ws),
               "recorded": ws.recorded, "first_recorded": ws.first_recorded,
               "restores": ws.restores}
        full = {**doc, "working_set": ref}
        length = layout.plan_meta_region(full)[2]
        if layout.align_up(length, cluster_size) <= off:
            return full, off, length
        off = layout.align_up(length, cluster_size)


def store(path, new_entries, log=None, now=None):
    """Merge ``new_entries`` into the working set of the image at ``path`` (crash
    safe: a complete new image replaces the old one by rename).  Returns the
    stored WorkingSet."""
    from qsnap.image.reader import Image
    from qsnap.image.writer import replace_metadata

    now = now or layout.iso_utc_now()
    with Image.open(path) as img:
        old, problem = read(img)
        if problem and log is not None:
            log.write(f"qsnap: warning: replacing the damaged working set of {path}: {problem}\n")
        validate(np.asarray(new_entries, ENTRY), img.blocks, img.target_page_size)
        if old is None:
            ws = WorkingSet(dedup(np.asarray(new_entries, ENTRY)), now, now, 1)
        else:
            ws = WorkingSet(merge(old.entries, new_entries), now, old.first_recorded,
                            old.restores + 1)
        if img.parent is not None:
            # a child keeps its backing file, zero flags and parent record: it is
            # rewritten onto the same parent (qsnap.image.rewrite), crash-safely too
            from qsnap.image.rewrite import rewrite
            rewrite(img, img.path, img.parent, working_set=ws, compare_own=False)
            return ws
        data = ws.entries.tobytes()
        doc, off, _ = metadata_with(_rebuild_doc(img), ws, data, img.cluster_size)
        replace_metadata(img, doc, off, data)
    return ws
