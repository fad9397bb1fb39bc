"""qsnap's layout inside the qcow2 container (docs/image-format.md, sections 1-3):
block regions, the "qsnap" header extension, the metadata region and the
strict validation of its JSON document."""

import json
import os

from qsnap.errors import ChecksumError, ImageError
from qsnap.image.qcow2 import Struct, align_up
from qsnap.stream.constants import RAM_SECTION_VERSION

FORMAT_VERSION = 2               # what qsnap writes
READ_VERSIONS = (1, 2)           # what it reads: 1 has no image_id, parent or backing chain
QSNAP_EXT_TYPE = 0x51534E50  # "QSNP"
QSNAP_FLAG_COMPLETE = 1 << 0
QSNAP_KNOWN_FLAGS = QSNAP_FLAG_COMPLETE
META_MAGIC = 0x51534D44  # "QSMD"
BLOB_ALIGN = 4096
CHECKSUM_NAME = "crc32c"

# qsnap header extension payload (section 1), 40 bytes
QSNAP_EXT = Struct((
    ("format_version", "I"),
    ("flags", "I"),
    ("meta_offset", "Q"),
    ("meta_length", "Q"),
    ("meta_crc32c", "I"),
    ("reserved", "I"),
    ("target_page_size", "I"),
    ("ext_crc32c", "I"),
))
assert QSNAP_EXT.size == 40

# Metadata region head (section 3)
META_HEAD = Struct((("magic", "I"), ("format_version", "I"), ("json_length", "Q")))


def _crc32c(buf, crc=0):
    from qsnap._core import crc32c
    return crc32c(buf, crc)


# --- header extension -----------------------------------------------------------

def pack_qsnap_ext(*, flags, meta_offset, meta_length, meta_crc32c, target_page_size,
                   format_version=FORMAT_VERSION):
    fields = {"format_version": format_version, "flags": flags, "meta_offset": meta_offset,
              "meta_length": meta_length, "meta_crc32c": meta_crc32c, "reserved": 0,
              "target_page_size": target_page_size, "ext_crc32c": 0}
    body = QSNAP_EXT.pack(fields)[:36]
    fields["ext_crc32c"] = _crc32c(body)
    return QSNAP_EXT.pack(fields)


def unpack_qsnap_ext(payload, image_offset):
    """Unpack and check the qsnap extension (crc, version, flags)."""
    _check_ext_length(payload, image_offset)
    ext = QSNAP_EXT.unpack(payload)
    crc = _crc32c(payload[:36])
    if crc != ext["ext_crc32c"]:
        raise ChecksumError(f"qsnap header extension checksum 0x{ext['ext_crc32c']:08x} does not "
                            f"match its contents (0x{crc:08x}) at image offset 0x{image_offset:x}")
    return _check_ext_fields(ext, image_offset)


def read_qsnap_ext(payload, image_offset):
    """Unpack the qsnap extension and check its version and flags, not its crc
    (qsnap.image.metadata reads an image without the C extension that computes it)."""
    _check_ext_length(payload, image_offset)
    return _check_ext_fields(QSNAP_EXT.unpack(payload), image_offset)


def _check_ext_length(payload, image_offset):
    if len(payload) != QSNAP_EXT.size:
        raise ImageError(f"qsnap header extension of {len(payload)} bytes, expected "
                         f"{QSNAP_EXT.size}, at image offset 0x{image_offset:x}")


def _check_ext_fields(ext, image_offset):
    if ext["format_version"] > FORMAT_VERSION:
        raise ImageError(f"image format version {ext['format_version']} is newer than this qsnap "
                         f"supports ({FORMAT_VERSION})")
    if ext["format_version"] not in READ_VERSIONS:
        raise ImageError(f"unknown image format version {ext['format_version']} "
                         f"at image offset 0x{image_offset:x}")
    if ext["flags"] & ~QSNAP_KNOWN_FLAGS:
        raise ImageError(f"unknown qsnap flags 0x{ext['flags']:x} at image offset 0x{image_offset + 4:x}")
    return ext


# --- regions ----------------------------------------------------------------------

def block_field(b, name, default=None):
    if isinstance(b, dict):
        return b.get(name, default)
    return getattr(b, name, default)


def pages_of(length, target_page_size):
    return (length + target_page_size - 1) // target_page_size


def compute_regions(blocks, cluster_size):
    """(region offsets, meta_offset): blocks laid out in order, each cluster aligned."""
    offsets = []
    pos = 0
    for b in blocks:
        offsets.append(pos)
        pos += align_up(int(block_field(b, "length")), cluster_size)
    return offsets, pos


# --- metadata region --------------------------------------------------------------

class Blob:
    """Placeholder for binary data in the JSON document while it is laid out."""

    def __init__(self, data):
        self.data = bytes(data)
        self.length = len(self.data)
        self.crc = None

    def checksum(self):
        if self.crc is None:
            self.crc = _crc32c(self.data)
        return self.crc

    def chunks(self):
        yield self.data


class StreamBlob(Blob):
    """A blob too large to hold: its length and crc32c are known beforehand and
    ``chunks()`` (a callable) yields its bytes piece by piece when it is written."""

    def __init__(self, length, crc, chunks):
        self.data = None
        self.length = length
        self.crc = crc
        self._chunks = chunks

    def chunks(self):
        return self._chunks()


def _collect_blobs(obj, out):
    if isinstance(obj, Blob):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_blobs(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_blobs(v, out)


def _substitute(obj, refs):
    if isinstance(obj, Blob):
        return refs[id(obj)]
    if isinstance(obj, dict):
        return {k: _substitute(v, refs) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_substitute(v, refs) for v in obj]
    return obj


def plan_meta_region(doc):
    """Lay out ``doc`` (Blob values inside) as a metadata region without its blobs'
    bytes: (head and JSON bytes, [(offset, blob)], region length)."""
    blobs = []
    _collect_blobs(doc, blobs)
    start = BLOB_ALIGN
    while True:
        refs = {}
        pos = start
        for b in blobs:
            refs[id(b)] = {"offset": pos, "length": b.length, "crc32c": b.checksum()}
            pos = align_up(pos + b.length, BLOB_ALIGN)
        text = json.dumps(_substitute(doc, refs), separators=(",", ":"), sort_keys=False).encode()
        need = align_up(META_HEAD.size + len(text), BLOB_ALIGN)
        if need <= start:
            break
        start = need
    # a rewritten v1 image (its working set recorded) keeps its version throughout
    head = META_HEAD.pack({"magic": META_MAGIC, "format_version": doc.get("format_version", FORMAT_VERSION),
                           "json_length": len(text)}) + text
    length = pos if blobs else align_up(len(head), BLOB_ALIGN)
    return head, [(refs[id(b)]["offset"], b) for b in blobs], length


def write_meta_region(doc, write):
    """Stream the metadata region of ``doc`` to ``write(bytes)`` in order (zero
    padding included), one blob piece at a time: (region length, its crc32c)."""
    head, placed, length = plan_meta_region(doc)
    crc = 0
    pos = 0

    def out(buf):
        nonlocal crc, pos
        write(buf)
        crc = _crc32c(buf, crc)
        pos += len(buf)

    out(head)
    for off, b in placed:
        _zeros_to(out, pos, off)
        for piece in b.chunks():
            out(piece)
        if pos != off + b.length:
            raise AssertionError(f"blob at 0x{off:x} yielded {pos - off} bytes, not {b.length}")
    _zeros_to(out, pos, length)
    return length, crc


def _zeros_to(out, pos, end):
    while pos < end:
        n = min(end - pos, 1 << 20)
        out(bytes(n))
        pos += n


def parse_meta_region(head, region_length, meta_offset):
    """(JSON document, end of the block regions) of a metadata region of
    ``region_length`` bytes whose first bytes (head and JSON at least) are ``head``."""
    n = meta_json_length(head[:META_HEAD.size], region_length, meta_offset)
    if len(head) < META_HEAD.size + n:
        raise ImageError(f"metadata JSON length {n} runs past the region "
                         f"({region_length} bytes) at virtual offset 0x{meta_offset + 8:x}")
    return parse_meta_json(bytes(head[META_HEAD.size:META_HEAD.size + n]), region_length, meta_offset)


def meta_json_length(head, region_length, meta_offset):
    """The length of the JSON document, from the metadata region's head (its first
    META_HEAD.size bytes) in a region of ``region_length`` bytes."""
    if region_length < META_HEAD.size or len(head) < META_HEAD.size:
        raise ImageError(f"metadata region of {region_length} bytes is too short "
                         f"at image offset 0x{meta_offset:x}")
    head = META_HEAD.unpack(head)
    if head["magic"] != META_MAGIC:
        raise ImageError(f"bad metadata magic 0x{head['magic']:08x} at virtual offset 0x{meta_offset:x}")
    if head["format_version"] not in READ_VERSIONS:
        raise ImageError(f"metadata format version {head['format_version']} at virtual offset "
                         f"0x{meta_offset + 4:x}, expected one of {', '.join(map(str, READ_VERSIONS))}")
    if head["json_length"] > region_length - META_HEAD.size:
        raise ImageError(f"metadata JSON length {head['json_length']} runs past the region "
                         f"({region_length} bytes) at virtual offset 0x{meta_offset + 8:x}")
    return head["json_length"]


def parse_meta_json(text, region_length, meta_offset):
    """(JSON document, end of the block regions) of the metadata JSON ``text`` of a region
    of ``region_length`` bytes: parsed and validated (validate_meta)."""
    try:
        doc = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ImageError(f"bad metadata JSON at virtual offset 0x{meta_offset + 16:x}: {e}") from None
    regions_end = validate_meta(doc, region_length, META_HEAD.size + len(text))
    return doc, regions_end


def check_crc(crc, ref, what):
    if crc != ref["crc32c"]:
        raise ChecksumError(f"checksum mismatch in metadata blob {what}: stored 0x{ref['crc32c']:08x}, "
                            f"computed 0x{crc:08x} (metadata offset 0x{ref['offset']:x})")


# --- strict JSON validation -------------------------------------------------------

BLOB = "blob"
UINT = "uint"
U32 = "u32"
NUMBER = "number"  # a non-negative int or float (JSON has one number type)
_MISSING = object()


def _bad(path, msg):
    raise ImageError(f"bad image metadata: {path} {msg}")


def _check(value, kind, path, ctx):
    if isinstance(kind, tuple):  # alternatives, e.g. (str, None)
        errs = []
        for k in kind:
            if k is None and value is None:
                return
            if k is None:
                continue
            try:
                _check(value, k, path, ctx)
                return
            except ImageError as e:
                errs.append(str(e))
        _bad(path, f"has an unexpected value {value!r}")
    if kind == UINT or kind == U32:
        if type(value) is not int or value < 0 or value >= (1 << (32 if kind == U32 else 64)):
            _bad(path, f"must be an unsigned integer, not {value!r}")
    elif kind == NUMBER:
        if type(value) not in (int, float) or not value >= 0 or value == float("inf"):
            _bad(path, f"must be a non-negative number, not {value!r}")
    elif kind is bool:
        if type(value) is not bool:
            _bad(path, f"must be true or false, not {value!r}")
    elif kind is str:
        if type(value) is not str:
            _bad(path, f"must be a string, not {value!r}")
    elif kind is list:
        if type(value) is not list:
            _bad(path, f"must be a list, not {type(value).__name__}")
    elif kind is dict:
        if type(value) is not dict:
            _bad(path, f"must be an object, not {type(value).__name__}")
    elif kind == BLOB:
        if type(value) is not dict:
            _bad(path, f"must be a blob reference, not {value!r}")
        _check_fields(value, BLOB_SCHEMA, path, ctx)
        off, length = value["offset"], value["length"]
        if off % BLOB_ALIGN or off < ctx["blob_start"] or off + length > ctx["region_length"]:
            _bad(path, f"blob at 0x{off:x}+{length} lies outside the metadata region "
                       f"(0x{ctx['blob_start']:x}..0x{ctx['region_length']:x}) or is unaligned")
    elif isinstance(kind, dict):
        if type(value) is not dict:
            _bad(path, f"must be an object, not {type(value).__name__}")
        _check_fields(value, kind, path, ctx)
    else:  # pragma: no cover
        raise AssertionError(kind)


def _check_fields(obj, schema, path, ctx):
    for key, kind in schema.items():
        v = obj.get(key, _MISSING)
        if v is _MISSING:
            _bad(f"{path}.{key}", "is missing")
        _check(v, kind, f"{path}.{key}", ctx)


BLOB_SCHEMA = {"offset": UINT, "length": UINT, "crc32c": U32}
STREAM_SCHEMA = {
    "header": BLOB, "pre_ram": BLOB, "commands": list, "footers": bool,
    "ram_section": ({"section_id": U32, "instance_id": U32, "version_id": U32}, None),
    "ram_end": bool, "switchover_start": bool,
    "return_path": bool, "postcopy_advise": (list, None), "capabilities": list,
    "mem_size_total": UINT,
}
BLOCK_SCHEMA = {
    "idstr": str, "length": UINT, "page_size": UINT, "page_size_on_wire": bool,
    "gpa": (UINT, None), "offset": UINT, "migrated": bool, "nonzero_pages": UINT,
    "bitmap": BLOB, "checksums": BLOB,
}
COUNTS_SCHEMA = {"pages": UINT, "nonzero_pages": UINT, "zero_pages": UINT,
                 "page_records": UINT, "stream_bytes": UINT}
TOP_SCHEMA = {
    "format_version": UINT, "qsnap_version": str, "created": str, "machine": (str, None),
    "target_page_size": UINT, "cluster_size": UINT, "checksum": str, "stream": STREAM_SCHEMA,
    "ram_blocks": list, "device_state": BLOB, "counts": COUNTS_SCHEMA,
}


# The optional "vm" key: what `qsnap snapshot` knew of the VM (docs/image-format.md).
# Images saved by a plain `qsnap save` have none and stay valid.
VM_MODES = ("background", "live", "stopped")
FINGERPRINT_SCHEMA = {"size": UINT, "mtime_ns": UINT, "sha256_4m": str}
DISK_SCHEMA = {
    "device": str, "qdev": (str, None), "node_name": (str, None), "frozen": str, "format": str,
    "virtual_size": UINT, "cmdline_file": (str, None), "fingerprint": FINGERPRINT_SCHEMA,
}
VM_SCHEMA = {
    "qemu_version": (str, None), "qemu_package": (str, None), "machine": (str, None),
    "cmdline": (list, None), "mode": str, "was_running": bool, "downtime_ms": (NUMBER, None),
    "ram_only": bool, "disks": list,
}


def validate_vm_record(vm, path="meta.vm"):
    """Strict check of a VM record (the image's "vm" key, or a --vm-info file)."""
    _check(vm, VM_SCHEMA, path, {})
    if vm["mode"] not in VM_MODES:
        _bad(f"{path}.mode", f"is {vm['mode']!r}, expected one of {', '.join(VM_MODES)}")
    if vm["cmdline"] is not None and (not vm["cmdline"] or any(type(a) is not str for a in vm["cmdline"])):
        _bad(f"{path}.cmdline", "must be null or a non-empty list of strings")
    cwd = vm.get("cwd")  # optional: records written before it existed lack it
    if cwd is not None and (type(cwd) is not str or not cwd.startswith("/")):
        _bad(f"{path}.cwd", f"must be null or an absolute path, not {cwd!r}")
    for i, d in enumerate(vm["disks"]):
        where = f"{path}.disks[{i}]"
        _check(d, DISK_SCHEMA, where, {})
        if not d["frozen"].startswith("/"):
            _bad(f"{where}.frozen", f"{d['frozen']!r} is not an absolute path")
        digest = d["fingerprint"]["sha256_4m"]
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            _bad(f"{where}.fingerprint.sha256_4m", f"{digest!r} is not 64 lowercase hex digits")
    if vm["ram_only"] and vm["disks"]:
        _bad(f"{path}.disks", f"lists {len(vm['disks'])} disks in a RAM-only snapshot")


# v2: the image's identity and its parent record (docs/image-format.md, "Backing chains")
PARENT_SCHEMA = {"backing_file": str, "image_id": (str, None), "created": str,
                 "device_state_crc32c": U32, "ram_blocks": list}
PARENT_BLOCK_SCHEMA = {"idstr": str, "length": UINT, "offset": UINT, "page_size": UINT,
                       "bitmap_crc32c": U32, "checksums_crc32c": U32}
IMAGE_ID_DIGITS = 32
MAX_CHAIN_DEPTH = 64


def is_image_id(value):
    return (type(value) is str and len(value) == IMAGE_ID_DIGITS
            and all(c in "0123456789abcdef" for c in value))


def _validate_identity(doc):
    for key in ("image_id", "parent"):
        if key not in doc:
            _bad(f"meta.{key}", "is missing")
    if not is_image_id(doc["image_id"]):
        _bad("meta.image_id", f"{doc['image_id']!r} is not {IMAGE_ID_DIGITS} lowercase hex digits")
    parent = doc["parent"]
    if parent is None:
        return
    _check(parent, PARENT_SCHEMA, "meta.parent", {})
    try:
        from qsnap.image.qcow2 import check_backing_name
        check_backing_name(parent["backing_file"])
    except ValueError as e:
        _bad("meta.parent.backing_file", str(e))
    if parent["image_id"] is not None and not is_image_id(parent["image_id"]):
        _bad("meta.parent.image_id", f"{parent['image_id']!r} is not {IMAGE_ID_DIGITS} lowercase hex digits")
    for i, b in enumerate(parent["ram_blocks"]):
        _check(b, PARENT_BLOCK_SCHEMA, f"meta.parent.ram_blocks[{i}]", {})


def new_image_id():
    """A fresh image_id: names a snapshot's content (uuid4, 32 lowercase hex digits)."""
    import uuid
    return uuid.uuid4().hex


def backing_name(parent_path, child_path):
    """The name a child's header gives its parent: the parent's basename when both
    are in the same directory (after resolving the directories' symlinks), else
    the parent's absolute path.  QEMU resolves a relative name against the child's
    directory (block.c bdrv_get_full_backing_filename), as qsnap does."""
    parent_path, child_path = os.fspath(parent_path), os.fspath(child_path)
    pdir, pname = os.path.split(os.path.abspath(parent_path))
    cdir = os.path.dirname(os.path.abspath(child_path))
    if os.path.realpath(pdir) == os.path.realpath(cdir):
        return pname
    return os.path.join(pdir, pname)


def resolve_backing(backing, child_path):
    """The path of the file a child at ``child_path`` names as ``backing``."""
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(child_path))), backing)


def parent_record(parent_img, backing_name):
    """The "parent" record a child stores of the opened image ``parent_img``: what
    identifies the parent's content (image_id and created of the snapshot, its blobs'
    crc32c as a fingerprint of its RAM and device state), not its metadata region's
    crc32c, which recording a working set changes."""
    m = parent_img.meta
    return {
        "backing_file": backing_name,
        "image_id": m.get("image_id"),
        "created": m["created"],
        "device_state_crc32c": m["device_state"]["crc32c"],
        "ram_blocks": [{"idstr": b["idstr"], "length": b["length"], "offset": b["offset"],
                        "page_size": b["page_size"], "bitmap_crc32c": b["bitmap"]["crc32c"],
                        "checksums_crc32c": b["checksums"]["crc32c"]} for b in m["ram_blocks"]],
    }


def _pow2(n):
    return n > 0 and n & (n - 1) == 0


def validate_meta(doc, region_length, json_end):
    """Strict check of the metadata JSON (types, ranges, blob bounds, block layout)."""
    ctx = {"region_length": region_length, "blob_start": align_up(json_end, BLOB_ALIGN)}
    _check(doc, TOP_SCHEMA, "meta", ctx)
    if "vm" in doc:
        validate_vm_record(doc["vm"])
    if doc["format_version"] not in READ_VERSIONS:
        _bad("meta.format_version", f"is {doc['format_version']}, expected one of "
                                    f"{', '.join(map(str, READ_VERSIONS))}")
    if doc["format_version"] >= 2:
        _validate_identity(doc)
    if doc["checksum"] != CHECKSUM_NAME:
        _bad("meta.checksum", f"is {doc['checksum']!r}, expected {CHECKSUM_NAME!r}")
    tps = doc["target_page_size"]
    if not _pow2(tps) or not 512 <= tps <= 65536:
        _bad("meta.target_page_size", f"{tps} is not a power of two in 512..65536")
    cs = doc["cluster_size"]
    if not _pow2(cs) or not (1 << 16) <= cs <= (1 << 21):
        _bad("meta.cluster_size", f"{cs} is not a power of two in 64 KiB..2 MiB")
    for i, cmd in enumerate(doc["stream"]["commands"]):
        if (type(cmd) is not list or len(cmd) != 2 or type(cmd[0]) is not int
                or type(cmd[1]) is not str):
            _bad(f"meta.stream.commands[{i}]", f"must be [cmd, hex payload], not {cmd!r}")
    pa = doc["stream"]["postcopy_advise"]
    if pa is not None and (len(pa) != 2 or any(type(v) is not int or not 0 <= v < 1 << 64 for v in pa)):
        _bad("meta.stream.postcopy_advise", f"must be [page-size summary, target page size], not {pa!r}")
    if any(type(c) is not str for c in doc["stream"]["capabilities"]):
        _bad("meta.stream.capabilities", "must be a list of strings")
    rs = doc["stream"]["ram_section"]
    # load sends these in the RAM SECTION_START; QEMU's ram_load() (ram.c) takes only
    # instance 0 and version 4, as the stream reader does when saving
    if rs is not None and (rs["instance_id"], rs["version_id"]) != (0, RAM_SECTION_VERSION):
        _bad("meta.stream.ram_section", f"instance {rs['instance_id']} version {rs['version_id']} "
                                        f"is not QEMU's RAM section (instance 0, version "
                                        f"{RAM_SECTION_VERSION})")
    end = 0
    for i, b in enumerate(doc["ram_blocks"]):
        path = f"meta.ram_blocks[{i}]"
        _check(b, BLOCK_SCHEMA, path, ctx)
        if not 0 < len(b["idstr"].encode()) <= 255:
            _bad(f"{path}.idstr", f"{b['idstr']!r} must have 1..255 bytes")
        if not _pow2(b["page_size"]):
            _bad(f"{path}.page_size", f"{b['page_size']} is not a power of two")
        if b["offset"] % cs:
            _bad(f"{path}.offset", f"0x{b['offset']:x} is not cluster aligned")
        if b["offset"] < end:
            _bad(f"{path}.offset", f"0x{b['offset']:x} overlaps the previous block's region "
                                   f"(ends at 0x{end:x})")
        end = b["offset"] + align_up(b["length"], cs)
        n = pages_of(b["length"], tps)
        if b["bitmap"]["length"] != (n + 7) // 8:
            _bad(f"{path}.bitmap", f"length {b['bitmap']['length']} does not match {n} pages "
                                   f"(expected {(n + 7) // 8})")
        if b["checksums"]["length"] != 4 * n:
            _bad(f"{path}.checksums", f"length {b['checksums']['length']} does not match {n} pages "
                                      f"(expected {4 * n})")
        if b["nonzero_pages"] > n:
            _bad(f"{path}.nonzero_pages", f"{b['nonzero_pages']} exceeds the block's {n} pages")
    return end


def iso_utc_now():
    import datetime
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
