"""Working sets: the pages a restored guest asked for first, kept in its image.

A postcopy restore can record the guest's page requests (block, page, time
since the switch to postcopy); the record is stored in the image and later
restores send those pages first (docs/image-format.md, section 5).  A working
set is only a hint for ordering: a damaged one is reported and ignored, never
served as pages, and it never makes the rest of the image unusable.

Reading, checking and ordering by a working set (what `qsnap load` does) needs
no NumPy: entries are read as array.array; the NumPy record array ``ENTRY``
(``WorkingSet.entries``, made on first use) is for recording and storing them.
"""
import functools
from array import array

from qsnap.errors import ImageError
from qsnap.image import layout
from qsnap.image.layout import pages_of

# One entry per host page: block, page, t_us, each a little-endian uint32 like the
# per-page checksum arrays.
ENTRY_FIELDS = ("block", "page", "t_us")
ENTRY_SIZE = 4 * len(ENTRY_FIELDS)
T_US_MAX = (1 << 32) - 1
# meta.working_set: the blob fields plus these
WS_SCHEMA = {"offset": "uint", "length": "uint", "crc32c": "u32", "pages": "uint",
             "recorded": str, "first_recorded": str, "restores": "uint"}


@functools.cache
def _entry_dtype():
    import numpy as np

    return np.dtype([(name, "<u4") for name in ENTRY_FIELDS])


def __getattr__(name):
    """ENTRY, the NumPy dtype of an entry, made when first asked for (PEP 562)."""
    if name == "ENTRY":
        return _entry_dtype()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class WorkingSet:
    """Entries in first-seen order plus when and how often they were recorded.

    ``entries``: an ENTRY array (or anything np.asarray makes one of), or the
    stored bytes (bytes, as read from an image: converted on first use of
    ``entries``)."""

    def __init__(self, entries, recorded=None, first_recorded=None, restores=0):
        if isinstance(entries, bytes):
            self._data, self._entries = entries, None
        else:
            import numpy as np

            self._entries = np.asarray(entries, dtype=_entry_dtype())
            self._data = None
        self.recorded = recorded
        self.first_recorded = first_recorded
        self.restores = restores

    @property
    def entries(self):
        """The entries as an ENTRY array."""
        if self._entries is None:
            import numpy as np

            self._entries = np.frombuffer(self._data, dtype=_entry_dtype()).copy()
        return self._entries

    @property
    def data(self):
        """The entries as stored (bytes)."""
        return self._data if self._data is not None else self._entries.tobytes()

    def __len__(self):
        return len(self.data) // ENTRY_SIZE

    def info(self):
        return {"pages": len(self), "recorded": self.recorded,
                "first_recorded": self.first_recorded, "restores": self.restores}


def entries(items):
    """An ENTRY array from (block, page, t_us) tuples."""
    import numpy as np

    return np.array([tuple(int(v) for v in it) for it in items], dtype=_entry_dtype())


def columns(ents):
    """(block, page): array('I') each, of an ENTRY array, its stored bytes or a WorkingSet."""
    from qsnap.image.reader import le_u32

    data = ents.data if isinstance(ents, WorkingSet) else \
        ents.tobytes() if hasattr(ents, "tobytes") else bytes(ents)
    words = le_u32(data[:len(data) // ENTRY_SIZE * ENTRY_SIZE])
    return words[0::3], words[1::3]


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
    import numpy as np

    if not len(ents):
        return ents
    key = (ents["block"].astype(np.uint64) << np.uint64(32)) | ents["page"].astype(np.uint64)
    _, first = np.unique(key, return_index=True)
    return ents[np.sort(first)]


def merge(old, new):
    """Union of two entry arrays keeping first-seen order: ``old`` first, then what
    ``new`` adds (a page already in ``old`` keeps its earlier time)."""
    import numpy as np

    return dedup(np.concatenate([np.asarray(old, _entry_dtype()), np.asarray(new, _entry_dtype())]))


def validate(ents, blocks, tps):
    """Raise ImageError unless every entry (of an ENTRY array or stored bytes) names a
    host page inside a migrated block."""
    bi, pg = columns(ents)
    if not len(bi):
        return
    if max(bi) >= len(blocks):
        k = next(k for k, x in enumerate(bi) if x >= len(blocks))
        raise ImageError(f"working-set entry {k} names block {bi[k]}, the image has "
                         f"{len(blocks)}")
    for i, b in enumerate(blocks):
        pages = [p for x, p in zip(bi, pg) if x == i]
        if not pages:
            continue
        hp = max(b.page_size, tps) // tps
        n = pages_of(b.length, tps)
        bad = [p for p in pages if p >= n or p % hp]
        if not b.migrated or bad:
            p = bad[0] if bad else pages[0]
            raise ImageError(f"working-set page 0x{p * tps:x} of block '{b.idstr}' is outside "
                             f"the block (length 0x{b.length:x}), not host-page aligned or the "
                             f"block was not migrated")


def decode(data, blocks, tps):
    """The stored bytes (bytes), checked."""
    if len(data) % ENTRY_SIZE:
        raise ImageError(f"working-set length {len(data)} is not a multiple of {ENTRY_SIZE}")
    data = bytes(data)
    validate(data, blocks, tps)
    return data


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
    ws = WorkingSet(decode(data, img.blocks, img.target_page_size), ref["recorded"],
                    ref["first_recorded"], ref["restores"])
    if len(ws) != ref["pages"]:
        raise ImageError(f"working set holds {len(ws)} pages, meta.working_set.pages says "
                         f"{ref['pages']}")
    return ws


def usable(img, log):
    """The working set a restore of ``img`` may use, or None; a damaged one is
    reported with one warning line on ``log`` (images from tests may lack both)."""
    problem = getattr(img, "working_set_problem", None)
    if problem:
        log.write(f"qsnap: warning: ignoring the working set of {img.path}: {problem}\n")
        log.flush()
    return getattr(img, "working_set", None)


def cluster_offsets(entries, blocks, cluster_size, tps):
    """Virtual offsets of the data clusters holding the pages of ``entries`` (an
    ENTRY array, stored bytes or a WorkingSet), each once, in the order their first
    page was recorded."""
    offs = [b.offset for b in blocks]
    seen = {}
    for bi, p in zip(*columns(entries)):
        v = offs[bi] + p * tps
        seen.setdefault(v - v % cluster_size, None)
    return list(seen)


def clusters_first(entries, blocks, host, virt, cluster_size, tps):
    """A permutation (array('Q')) of a cluster plan (``host``/``virt``, host order)
    that puts the data clusters holding working-set pages first, in the order their
    first page was recorded; the others keep their order."""
    if not len(virt):
        return array("Q")
    wanted = cluster_offsets(entries, blocks, cluster_size, tps)
    at = {}
    for k, v in enumerate(virt):
        at.setdefault(int(v), k)
    rank = [len(wanted)] * len(virt)
    for r, v in enumerate(wanted):
        k = at.get(v)      # an all-zero cluster is not in the plan
        if k is not None:
            rank[k] = r
    return array("Q", sorted(range(len(virt)), key=rank.__getitem__))


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
    import numpy as np

    from qsnap.image.reader import Image
    from qsnap.image.writer import replace_metadata

    now = now or layout.iso_utc_now()
    with Image.open(path) as img:
        old, problem = read(img)
        if problem and log is not None:
            log.write(f"qsnap: warning: replacing the damaged working set of {path}: {problem}\n")
        validate(np.asarray(new_entries, _entry_dtype()), img.blocks, img.target_page_size)
        if old is None:
            ws = WorkingSet(dedup(np.asarray(new_entries, _entry_dtype())), now, now, 1)
        else:
            ws = WorkingSet(merge(old.entries, new_entries), now, old.first_recorded,
                            old.restores + 1)
        if img.parent is not None:
            # a child keeps its backing file, zero flags and parent record: it is
            # rewritten onto the same parent (qsnap.image.rewrite), crash-safely too
            from qsnap.image.rewrite import rewrite
            rewrite(img, img.path, img.parent, working_set=ws, compare_own=False)
            return ws
        data = ws.data
        doc, off, _ = metadata_with(_rebuild_doc(img), ws, data, img.cluster_size)
        replace_metadata(img, doc, off, data)
    return ws
