"""qcow2 version 3 structures, as described in QEMU's docs/interop/qcow2.txt.

Names follow QEMU's block/qcow2.h so they can be checked against the source.
Every on-disk struct is described once (field, struct code) and packed and
unpacked from that description; all fields are big-endian.
"""

import struct
from collections import namedtuple

# block/qcow2.h
QCOW_MAGIC = 0x514649FB  # "QFI\xfb"
QCOW_VERSION = 3
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
QCOW2_EXT_MAGIC_END = 0
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
# block/qcow2.c qcow2_do_open: "backing_file_size > MIN(1023, ...)" is refused
MAX_BACKING_FILE_SIZE = 1023
BACKING_FORMAT = b"qcow2"
REFCOUNT_ORDER = 4  # 16-bit refcounts
HEADER_LENGTH_V3 = 104

# Header, version 3 (docs/interop/qcow2.txt "Header")
HEADER_FIELDS = (
    ("magic", "I"),
    ("version", "I"),
    ("backing_file_offset", "Q"),
    ("backing_file_size", "I"),
    ("cluster_bits", "I"),
    ("size", "Q"),
    ("crypt_method", "I"),
    ("l1_size", "I"),
    ("l1_table_offset", "Q"),
    ("refcount_table_offset", "Q"),
    ("refcount_table_clusters", "I"),
    ("nb_snapshots", "I"),
    ("snapshots_offset", "Q"),
    ("incompatible_features", "Q"),
    ("compatible_features", "Q"),
    ("autoclear_features", "Q"),
    ("refcount_order", "I"),
    ("header_length", "I"),
)

# Header extension framing: be32 type, be32 length, data padded to 8 bytes
EXT_HEADER_FIELDS = (("type", "I"), ("length", "I"))

# Incompatible feature bits QEMU 7.2 knows (qcow2.txt); qsnap accepts none.
INCOMPAT_FEATURE_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}


class Struct:
    """A big-endian on-disk struct described by (name, struct code) pairs."""

    def __init__(self, fields):
        self.fields = tuple(fields)
        self.names = tuple(n for n, _ in self.fields)
        self._st = struct.Struct(">" + "".join(c for _, c in self.fields))
        self.size = self._st.size

    def pack(self, values):
        """Pack a mapping name -> value (all fields required)."""
        return self._st.pack(*(values[n] for n in self.names))

    def unpack(self, buf, offset=0):
        """Unpack into a dict; ``buf`` must hold ``size`` bytes at ``offset``."""
        return dict(zip(self.names, self._st.unpack_from(buf, offset)))


HEADER = Struct(HEADER_FIELDS)
EXT_HEADER = Struct(EXT_HEADER_FIELDS)
assert HEADER.size == HEADER_LENGTH_V3


def l2_bits(cluster_bits):
    return cluster_bits - 3


def offset_to_l1_index(offset, cluster_bits):
    return offset >> (l2_bits(cluster_bits) + cluster_bits)


def offset_to_l2_index(offset, cluster_bits):
    return (offset >> cluster_bits) & ((1 << l2_bits(cluster_bits)) - 1)


def size_to_clusters(size, cluster_size):
    return (size + cluster_size - 1) // cluster_size


def align_up(n, a):
    return (n + a - 1) // a * a


def l1_size_for(virtual_size, cluster_bits):
    """L1 entries needed to map ``virtual_size`` bytes."""
    return size_to_clusters(virtual_size, 1 << (l2_bits(cluster_bits) + cluster_bits))


def make_header(*, cluster_bits, size, l1_size, l1_table_offset, refcount_table_offset,
                refcount_table_clusters, backing_file_offset=0, backing_file_size=0):
    """A v3 header dict with qsnap's fixed fields (no snapshots, no features)."""
    return {
        "magic": QCOW_MAGIC,
        "version": QCOW_VERSION,
        "backing_file_offset": backing_file_offset,
        "backing_file_size": backing_file_size,
        "cluster_bits": cluster_bits,
        "size": size,
        "crypt_method": 0,
        "l1_size": l1_size,
        "l1_table_offset": l1_table_offset,
        "refcount_table_offset": refcount_table_offset,
        "refcount_table_clusters": refcount_table_clusters,
        "nb_snapshots": 0,
        "snapshots_offset": 0,
        "incompatible_features": 0,
        "compatible_features": 0,
        "autoclear_features": 0,
        "refcount_order": REFCOUNT_ORDER,
        "header_length": HEADER_LENGTH_V3,
    }


def pack_extensions(exts):
    """Header extensions [(type, payload)] followed by the end marker."""
    out = bytearray()
    for typ, payload in exts:
        out += EXT_HEADER.pack({"type": typ, "length": len(payload)})
        out += payload
        out += bytes(align_up(len(payload), 8) - len(payload))
    out += EXT_HEADER.pack({"type": QCOW2_EXT_MAGIC_END, "length": 0})
    return bytes(out)


def unpack_extensions(buf, start, limit):
    """Parse extensions from buf[start:limit]; returns [(type, payload, offset)].

    Raises ValueError(message) when an extension runs past ``limit`` or the end
    marker is missing."""
    exts = []
    off = start
    while True:
        if off + EXT_HEADER.size > limit:
            raise ValueError(f"header extensions run past 0x{limit:x} at image offset 0x{off:x}")
        h = EXT_HEADER.unpack(buf, off)
        if h["type"] == QCOW2_EXT_MAGIC_END:
            return exts
        data = off + EXT_HEADER.size
        if data + h["length"] > limit:
            raise ValueError(f"header extension 0x{h['type']:08x} length {h['length']} runs past "
                             f"0x{limit:x} at image offset 0x{off:x}")
        exts.append((h["type"], bytes(buf[data:data + h["length"]]), off))
        off = data + align_up(h["length"], 8)


def check_backing_name(name):
    """The backing file name as header bytes: UTF-8, no NUL, at most 1023 bytes."""
    raw = name.encode() if isinstance(name, str) else bytes(name)
    if not raw or b"\0" in raw or len(raw) > MAX_BACKING_FILE_SIZE:
        raise ValueError(f"backing file name {name!r} is empty, has a NUL byte or is longer than "
                         f"{MAX_BACKING_FILE_SIZE} bytes")
    return raw


def pack_header_cluster(header, exts, cluster_size, backing_name=None):
    """Cluster 0: header, extensions, then (``backing_name`` given) the backing file
    name right after the end marker, zero padding.  A backing name also gets the
    backing-format extension ("qcow2"), so that QEMU never probes the parent's format,
    and sets the header's backing_file_offset/size."""
    header = dict(header)
    exts = list(exts)
    name = b""
    if backing_name is not None:
        name = check_backing_name(backing_name)
        exts.append((QCOW2_EXT_MAGIC_BACKING_FORMAT, BACKING_FORMAT))
    packed_exts = pack_extensions(exts)
    header["backing_file_offset"] = HEADER.size + len(packed_exts) if name else 0
    header["backing_file_size"] = len(name)
    buf = HEADER.pack(header) + packed_exts + name
    if len(buf) > cluster_size:
        raise ValueError("header and extensions do not fit in one cluster")
    return buf + bytes(cluster_size - len(buf))


# --- tables -------------------------------------------------------------------

def sparse_l2_tables(virt, host, cluster_bits, zero_virt=None):
    """L2 tables for a sparse map: host offsets ``host`` of virtual clusters ``virt``
    (uint64 arrays, any order, no cluster twice); the virtual clusters ``zero_virt``
    (none of ``virt``) get the bare zero flag (QCOW_OFLAG_ZERO, no host offset: they
    read as zeros whatever a backing file holds).

    Returns (l1_indices, tables): the L1 indices that need an L2 table, ascending,
    and an iterator of their tables' bytes (big-endian), built one at a time."""
    import numpy as np  # the writer's tables only: reading a header must not import NumPy

    l2b = l2_bits(cluster_bits)
    entries = np.asarray(host, np.uint64) | np.uint64(QCOW_OFLAG_COPIED)
    virt = np.asarray(virt, np.uint64)
    if zero_virt is not None and len(zero_virt):
        virt = np.concatenate([virt, np.asarray(zero_virt, np.uint64)])
        entries = np.concatenate([entries, np.full(len(zero_virt), QCOW_OFLAG_ZERO, np.uint64)])
    order = np.argsort(virt, kind="stable")
    v, h = virt[order], entries[order]
    l1_indices, starts = np.unique(v >> np.uint64(l2b), return_index=True)
    bounds = list(starts) + [len(v)]

    def tables():
        for k, i in enumerate(l1_indices):
            lo, hi = bounds[k], bounds[k + 1]
            t = np.zeros(1 << l2b, dtype=np.uint64)
            t[(v[lo:hi] - (i << np.uint64(l2b))).astype(np.int64)] = h[lo:hi]
            yield t.astype(">u8").tobytes()
    return l1_indices.astype(np.int64), tables()


# Where the qcow2 tables go, appended after the data and metadata clusters:
# l2_offset the first L2 table (table i at l2_offset + i * cluster_size), l1_size in
# entries, refblock_offset the first refcount block, end the file length.  (A
# namedtuple, not a dataclass: dataclasses imports inspect, ~15 ms of `qsnap load`'s
# start, which imports this module for the header.)
TableLayout = namedtuple("TableLayout", "cluster_size l2_offset l1_offset l1_size l1_clusters refblock_offset "
                                        "n_refblocks reftable_offset reftable_clusters end")


def plan_tables(append_offset, n_l2_tables, l1_size, cluster_size):
    """Place L2 tables, the L1 table, refcount blocks and the refcount table at
    ``append_offset`` so that the refcount blocks also cover themselves and the
    refcount table (the smallest fixed point)."""
    cs = cluster_size
    l2_offset = append_offset
    l1_offset = l2_offset + n_l2_tables * cs
    l1_clusters = max(1, size_to_clusters(l1_size * 8, cs))
    refblock_offset = l1_offset + l1_clusters * cs
    before = refblock_offset // cs           # clusters 0 .. before-1 exist already
    per_block = cs * 8 // (1 << REFCOUNT_ORDER)
    rb, rt = 1, 1
    while True:
        total = before + rb + rt
        need_rb = size_to_clusters(total, per_block)
        need_rt = max(1, size_to_clusters(need_rb * 8, cs))
        if need_rb == rb and need_rt == rt:
            break
        rb, rt = max(rb, need_rb), max(rt, need_rt)
    reftable_offset = refblock_offset + rb * cs
    return TableLayout(cs, l2_offset, l1_offset, l1_size, l1_clusters, refblock_offset, rb,
                       reftable_offset, rt, reftable_offset + rt * cs)


def build_l1_table(l1_size, l1_indices, l2_offset, cluster_size, l1_clusters):
    """L1 table bytes (padded to whole clusters) pointing at consecutive L2 tables."""
    import numpy as np
    l1 = np.zeros(l1_clusters * cluster_size // 8, dtype=np.uint64)
    idx = np.asarray(l1_indices, dtype=np.int64)
    l1[idx] = (np.uint64(l2_offset) + np.arange(len(idx), dtype=np.uint64) * np.uint64(cluster_size)) \
        | np.uint64(QCOW_OFLAG_COPIED)
    return l1.astype(">u8").tobytes()


def build_refcounts(layout):
    """Refcount blocks and table bytes: refcount 1 for every cluster below layout.end."""
    import numpy as np
    cs = layout.cluster_size
    n_clusters = layout.end // cs
    per_block = cs * 8 // (1 << REFCOUNT_ORDER)
    blocks = np.zeros(layout.n_refblocks * per_block, dtype=">u2")
    blocks[:n_clusters] = 1
    table = np.zeros(layout.reftable_clusters * cs // 8, dtype=np.uint64)
    table[:layout.n_refblocks] = np.uint64(layout.refblock_offset) + \
        np.arange(layout.n_refblocks, dtype=np.uint64) * np.uint64(cs)
    return blocks.tobytes(), table.astype(">u8").tobytes()


def write_tables(pwrite, virt, hosts, cluster_bits, pos, virtual_size, zero_virt=None):
    """The L2 tables, L1 table, refcount blocks and refcount table of a sparse map, written
    with ``pwrite(buf, offset)`` from host offset ``pos`` on: (table layout, l1_size).
    ``virt``/``hosts``: every mapped cluster (virtual cluster index, host offset);
    ``zero_virt``: the clusters that get the bare zero flag."""
    cs = 1 << cluster_bits
    l1_indices, l2_tables = sparse_l2_tables(virt, hosts, cluster_bits, zero_virt)
    l1_size = l1_size_for(virtual_size, cluster_bits)
    tl = plan_tables(pos, len(l1_indices), l1_size, cs)
    for k, table in enumerate(l2_tables):
        pwrite(table, tl.l2_offset + k * cs)
    pwrite(build_l1_table(l1_size, l1_indices, tl.l2_offset, cs, tl.l1_clusters), tl.l1_offset)
    refblocks, reftable = build_refcounts(tl)
    pwrite(refblocks, tl.refblock_offset)
    pwrite(reftable, tl.reftable_offset)
    return tl, l1_size
