"""Backing chains of format 2 images (docs/image-format.md, "Backing chains").

A child image stores only the clusters that differ from its parent chain; its
header names the parent file and its metadata records what the parent's content
was (the "parent" record).  Opening a child opens every parent, each checked
against the record of the image above it, so that a missing, changed or swapped
parent is one ImageError naming both files and never a wrong restore.

``cluster_sources(img)`` says, for every RAM cluster of the chain's top image,
which file of the chain holds its bytes: the load and postcopy engines read each
file in host order with its own descriptor, the exporters and `qsnap check`
the same way.
"""
import os
from array import array
from bisect import bisect_left

from qsnap._core import argsort_u64, in_sorted, indexes_where, take
from qsnap.errors import ImageError, QsnapError
from qsnap.image import layout


def open_parents(img):
    """Open the backing chain below the opened image ``img``: sets ``parent`` and
    ``chain`` of every image in it.  ImageError for a missing, unreadable,
    mismatched or looping parent, or a chain deeper than MAX_CHAIN_DEPTH."""
    seen = {_file_key(img)}
    cur = img
    chain = [img]
    while cur.backing_name is not None:
        if len(chain) > layout.MAX_CHAIN_DEPTH:
            raise ImageError(f"backing chain of {img.path} is deeper than {layout.MAX_CHAIN_DEPTH} images "
                             f"(at {cur.path})")
        parent = _open_parent(cur)
        cur.parent = parent
        if _file_key(parent) in seen:
            raise ImageError(f"backing chain of {img.path} loops: parent image {parent.path} of "
                             f"{cur.path} is already in the chain")
        seen.add(_file_key(parent))
        check_parent(cur, parent)
        chain.append(parent)
        cur = parent
    for k, im in enumerate(chain):
        im.chain = chain[k:]
    return chain


def _file_key(img):
    st = os.fstat(img.fd)
    return st.st_dev, st.st_ino


def parent_path(img):
    """Where the backing file of ``img`` is: its name resolved against the directory
    of ``img`` (as QEMU resolves it), or None for a stand-alone image."""
    if img.backing_name is None:
        return None
    return layout.resolve_backing(img.backing_name, img.path)


def _open_parent(child):
    from qsnap.image.reader import Image

    path = parent_path(child)
    if not os.path.exists(path):
        raise ImageError(f"parent image {path} of {child.path} is missing")
    try:
        return Image._open_one(path)
    except QsnapError as e:
        raise ImageError(f"parent image {path} of {child.path} cannot be used: {e}") from None


def _differs(child, parent, what, recorded, found):
    return ImageError(f"parent image {parent.path} of {child.path} does not match: {what} "
                      f"{_show(recorded)} recorded, {_show(found)} found")


def _show(v):
    return "none" if v is None else str(v)


def check_parent(child, parent):
    """The opened ``parent`` is the image ``child`` was written against: its identity
    and RAM layout equal the child's parent record, its geometry the child's."""
    rec = child.meta["parent"]
    pm = parent.meta
    if rec["image_id"] is not None and rec["image_id"] != parent.image_id:
        raise _differs(child, parent, "image_id", rec["image_id"], parent.image_id)
    for what, recorded, found in (
            ("created", rec["created"], pm["created"]),
            ("device_state crc32c", rec["device_state_crc32c"], pm["device_state"]["crc32c"]),
            ("cluster_size", child.cluster_size, parent.cluster_size),
            ("target_page_size", child.target_page_size, parent.target_page_size),
            ("machine", child.meta["machine"], pm["machine"]),
            ("number of RAM blocks", len(rec["ram_blocks"]), len(pm["ram_blocks"]))):
        if recorded != found:
            raise _differs(child, parent, what, recorded, found)
    for i, (r, b) in enumerate(zip(rec["ram_blocks"], pm["ram_blocks"])):
        found = {"idstr": b["idstr"], "length": b["length"], "offset": b["offset"],
                 "page_size": b["page_size"], "bitmap_crc32c": b["bitmap"]["crc32c"],
                 "checksums_crc32c": b["checksums"]["crc32c"]}
        for key in layout.PARENT_BLOCK_SCHEMA:
            if r[key] != found[key]:
                raise _differs(child, parent, f"ram_blocks[{i}].{key}", r[key], found[key])
    mine = [(b.idstr, b.length, b.offset, b.page_size) for b in child.blocks]
    theirs = [(b["idstr"], b["length"], b["offset"], b["page_size"]) for b in rec["ram_blocks"]]
    if mine != theirs:
        k = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        raise ImageError(f"parent image {parent.path} of {child.path} does not match: RAM block {k} is "
                         f"{_block(theirs, k)} in the parent, {_block(mine, k)} in the child")


def _block(blocks, k):
    if k >= len(blocks):
        return "none"
    idstr, length, offset, page_size = blocks[k]
    return f"'{idstr}' length 0x{length:x} offset 0x{offset:x} page size {page_size}"


def cluster_sources(img):
    """(virt, src, host): array('Q'), array('I'), array('Q'), one item per RAM virtual
    cluster (an index) whose bytes are in a file of ``img.chain``: ``src`` indexes
    the chain, ``host`` is the byte offset in that file; sorted by (src, host).
    Clusters not listed read as zeros.  The first file of the chain that
    allocates or zero-flags a cluster decides."""
    n_ram = img.meta_offset >> img.cluster_bits
    decided = array("Q")    # ascending, repeats allowed
    virt, src, host = array("Q"), array("I"), array("Q")
    for k, im in enumerate(img.chain):
        v, h = _below(im._mapped_virt, n_ram), _below(im._mapped_virt, n_ram, im._mapped_host)
        if k:
            new = indexes_where(in_sorted(v, decided), False)
            v, h = take(v, new), take(h, new)
        order = argsort_u64(h)
        virt += take(v, order)
        host += take(h, order)
        src += array("I", [k]) * len(v)
        if k + 1 < len(img.chain):
            every = decided + v + _below(im._zero_virt, n_ram)
            decided = take(every, argsort_u64(every))
    return virt, src, host


def _below(clusters, n, values=None):
    """array('Q') of the ascending virtual ``clusters`` below ``n`` (or of the items of
    ``values`` beside them)."""
    return array("Q", (clusters if values is None else values)[:bisect_left(clusters, n)])


def chain_info(img):
    """[{path, image_id, format_version, created, file_bytes}] of every file of the chain,
    ``img`` first (for `qsnap info`)."""
    return [{"path": im.path, "image_id": im.image_id, "format_version": im.ext["format_version"],
             "created": im.meta["created"], "file_bytes": im.file_bytes,
             "backing_file": im.backing_name} for im in img.chain]
