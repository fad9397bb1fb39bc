"""Edit programs over seed images, and a structure-aware mutator of those programs.

An input of the load and postcopy harnesses names a seed image and a list of
edits; applying them gives the image the engine runs on.  Layout:

    u8 seed index, u8 crc mode (0: none, 1: metadata/extension crcs, 2: also blob crcs)
    12-byte edits: u8 op, u8 structure, u8 region, u8 arg, be32 at, be32 value

``at`` is an offset into the chosen region of the chosen structure (header,
extension, L1, L2 tables, refcount table and blocks, metadata head and JSON,
blobs, data clusters), taken modulo the region's length.  A value with its top
bit set picks a boundary value (0, cluster size +-1, file size, offsets of other
structures, huge and flagged offsets); otherwise it is used as it is.  The
mutator adds edits aimed at qcow2 header fields, the qsnap extension fields,
L1/L2 and refcount entries, the metadata JSON and the checksums, drops or
changes edits, and leaves byte-level mutation to libFuzzer.
"""
import json
import random
import struct

import seeds

EDIT = struct.Struct(">BBBBII")
STRUCTS = ("header", "extension", "l1", "l2", "reftable", "refblock", "meta_head", "meta_json",
           "blobs", "data")
OPS = ("flip", "set64", "set32", "set16", "truncate", "bytes", "json", "append")
POOL_FLAG = 0x80000000

# Field offsets of the qcow2 header (docs/interop/qcow2.txt) and of the qsnap
# extension (its 8-byte extension header, then layout.QSNAP_EXT).
FIELDS = {
    "header": ((0, 4), (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8),
               (56, 4), (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4)),
    "extension": ((0, 4), (4, 4), (8, 4), (12, 4), (16, 8), (24, 8), (32, 4), (36, 4), (40, 4), (44, 4),
                  (48, 8)),
    "meta_head": ((0, 4), (4, 4), (8, 8)),
}


class Seed:
    """A seed image with its structure map (seeds.image_map)."""

    def __init__(self, name, buf):
        self.name = name
        self.buf = buf
        self.map, self.facts = seeds.image_map(buf)


def decode(data):
    if len(data) < 2:
        return 0, 0, []
    n = (len(data) - 2) // EDIT.size
    return data[0], data[1], [EDIT.unpack_from(data, 2 + i * EDIT.size) for i in range(n)]


def encode(seed, fix, edits):
    return bytes([seed & 0xFF, fix & 0xFF]) + b"".join(EDIT.pack(*e) for e in edits)


def _pool(seed):
    m, f = seed.map, seed.facts
    cs, size = f["cluster_size"], f["file_bytes"]
    pool = [0, 1, cs - 1, cs, cs + 1, size - cs, size, size + cs, 1 << 30, (1 << 56) - cs,
            (1 << 63) | cs, 1 << 63, 1 << 62, 0xFFFFFFFF, (1 << 64) - 1, 1 << 25, 9, 21, 22, 4, 2, 3]
    for name in STRUCTS:
        for off, _n in m[name][:2]:
            pool += [off, off | (1 << 63)]
    return pool


def _value(seed, v):
    if v & POOL_FLAG:
        pool = _pool(seed)
        return pool[(v & ~POOL_FLAG) % len(pool)]
    return v


def apply(seeds_, data):
    """(seed, image bytes) for the edit program ``data``."""
    si, fix, edits = decode(data)
    seed = seeds_[si % len(seeds_)]
    buf = bytearray(seed.buf)
    for op, sname, region, arg, at, value in edits[:8]:
        regions = seed.map[STRUCTS[sname % len(STRUCTS)]]
        if not regions:
            continue
        off, n = regions[region % len(regions)]
        pos = off + at % max(n, 1)
        _edit(seed, buf, OPS[op % len(OPS)], off, pos, arg, value)
    fix %= 3
    f = seed.facts
    if fix and len(buf) >= f["meta_host"] + f["meta_length"]:
        seeds.fix_crcs(buf, f, blobs=fix == 2)
    return seed, buf


def _edit(seed, buf, op, off, pos, arg, value):
    width = {"set64": 8, "set32": 4, "set16": 2}.get(op)
    if op == "flip":
        if pos < len(buf):
            buf[pos] ^= 1 << (arg & 7)
    elif width:
        pos = off + (pos - off) // width * width
        if pos + width <= len(buf):
            v = _value(seed, value) & ((1 << (8 * width)) - 1)
            buf[pos:pos + width] = v.to_bytes(width, "big")
    elif op == "truncate":
        del buf[off if arg & 1 else pos:]
    elif op == "bytes":
        raw = struct.pack(">I", value) * (1 + arg % 16)
        buf[pos:pos + len(raw)] = raw[:max(0, len(buf) - pos)]
    elif op == "json":
        _json_edit(seed, buf, arg, value)
    else:  # append junk clusters
        buf += struct.pack(">I", value) * (seed.facts["cluster_size"] // 4 * (1 + arg % 2))


def _json_edit(seed, buf, arg, value):
    doc = json.loads(json.dumps(seed.facts["doc"]))
    paths = []

    def walk(o):
        items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
        for k, v in items:
            paths.append((o, k))
            walk(v)

    walk(doc)
    if not paths:
        return
    parent, key = paths[value % len(paths)]
    values = [None, True, -1, 0, 1, 1 << 40, (1 << 64) - 1, "x", [], {}, 4096, 0.5]
    choice = arg % (len(values) + 2)
    if choice == len(values) and isinstance(parent, dict):
        parent.pop(key, None)
    elif choice == len(values) + 1 and isinstance(parent, list):
        parent.append(parent[key])
    elif choice < len(values):
        parent[key] = values[choice]
    seeds.set_json(buf, seed.facts, doc)


class Mutator:
    """Structure-aware mutations of edit programs (see the module docstring)."""

    def __init__(self, seeds_, byte_mutate):
        self.seeds = seeds_
        self.byte_mutate = byte_mutate

    def mutate(self, data, max_size, rseed):
        rng = random.Random(rseed)
        if rng.random() < 0.2:
            return self.byte_mutate(data, max_size)
        si, fix, edits = decode(data)
        seed = self.seeds[si % len(self.seeds)]
        r = rng.random()
        if r < 0.5 or not edits:
            edits.insert(rng.randrange(len(edits) + 1), self.new_edit(rng, seed))
        elif r < 0.65:
            del edits[rng.randrange(len(edits))]
        elif r < 0.85:
            i = rng.randrange(len(edits))
            e = list(edits[i])
            e[5] = rng.choice((POOL_FLAG | rng.randrange(64), rng.getrandbits(32), e[5] ^ (1 << rng.randrange(32))))
            edits[i] = tuple(e)
        elif r < 0.93:
            fix = rng.randrange(3)
        else:
            si = rng.randrange(len(self.seeds))
        return encode(si, fix, edits[:8])[:max_size]

    def new_edit(self, rng, seed):
        """An edit aimed at a field or entry of a structure."""
        sname = rng.randrange(len(STRUCTS))
        name = STRUCTS[sname]
        regions = seed.map[name]
        region = rng.randrange(max(len(regions), 1))
        n = regions[region][1] if regions else 1
        value = POOL_FLAG | rng.randrange(64) if rng.random() < 0.7 else rng.getrandbits(32)
        if name in FIELDS:
            at, width = rng.choice(FIELDS[name])
            op = {8: 1, 4: 2, 2: 3}[width] if rng.random() < 0.8 else 0
        elif name in ("l1", "l2", "reftable"):
            at, op = rng.randrange(max(n // 8, 1)) * 8, rng.choice((1, 1, 0))
        elif name == "refblock":
            at, op = rng.randrange(max(n // 2, 1)) * 2, rng.choice((3, 3, 0))
        elif name == "meta_json":
            at, op = 0, rng.choice((6, 6, 6, 0, 5))
        else:
            at, op = rng.randrange(max(n, 1)), rng.choice((0, 2, 4, 5, 7))
        return (op, sname, region, rng.randrange(256), at, value)
