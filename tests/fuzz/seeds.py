"""Seeds and structure maps shared by the fuzz harnesses and the corruption tests.

Seeds are real QEMU 7.2 streams (tests/data/*72*.stream.gz, see its README;
../shared/fixtures only where tests/data lacks a name) and images saved from
them with ``qsnap.save.save``.  Images are made on demand in a cache directory.
"""
import gzip
import json
import os
import pathlib
import struct
import sys
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:  # run from a checkout (python tests/fuzz/fuzz_*.py)
    sys.path.insert(0, str(REPO))


DATA_DIR = REPO / "tests" / "data"
FIXTURES_DIR = (REPO / ".." / "shared" / "fixtures").resolve()
BLOB_STREAM = DATA_DIR / "bg72-blob.stream.gz"

# Streams a plain StreamReader over a byte buffer accepts (mapped-ram needs a file).
STREAM_NAMES = ("pc72", "bg72", "rp72", "hp72", "is72", "uuid72", "pc23")


def stream_path(name):
    """tests/data/NAME.stream.gz, else ../shared/fixtures/NAME.stream.gz, else None."""
    for d in (DATA_DIR, FIXTURES_DIR):
        if (d / f"{name}.stream.gz").exists():
            return d / f"{name}.stream.gz"
    return None


def stream_paths(names=STREAM_NAMES, blob=True):
    out = [p for p in map(stream_path, names) if p is not None]
    if blob and BLOB_STREAM.exists():
        out.append(BLOB_STREAM)
    return out


def load_stream(path):
    with gzip.open(path, "rb") as f:
        return f.read()


def save_image(stream, path, cluster_size=1 << 16, out_fd=-1):
    """Save ``stream`` (bytes) as an image at ``path`` through a memfd; return-path
    replies go to ``out_fd``."""
    from qsnap.save import save

    fd = os.memfd_create("qsnap-seed")
    try:
        os.write(fd, stream)
        os.lseek(fd, 0, os.SEEK_SET)
        save(os.fspath(path), in_fd=fd, out_fd=out_fd, quiet=True, cluster_size=cluster_size)
    finally:
        os.close(fd)
    return pathlib.Path(path)


def cache_dir():
    d = pathlib.Path(os.environ.get("QSNAP_FUZZ_WORKDIR") or
                     pathlib.Path(tempfile.gettempdir()) / f"qsnap-fuzz-{os.getuid()}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def seed_images(names=("pc72", "bg72", "is72"), blob=True, cluster_size=1 << 16, where=None):
    """[(name, bytes)] of images saved from real streams (made once, cached)."""
    where = pathlib.Path(where) if where else cache_dir() / "images"
    where.mkdir(parents=True, exist_ok=True)
    out = []
    for p in stream_paths(names, blob=blob):
        name = p.name.split(".")[0]
        img = where / f"{name}-{cluster_size >> 10}k.qsnap"
        if not img.exists():
            tmp = where / f".{img.name}.new"
            save_image(load_stream(p), tmp, cluster_size)
            os.replace(tmp, img)
        out.append((name, img.read_bytes()))
    return out


# --- structure map of an image -----------------------------------------------------

def image_map(buf):
    """Where each structure of a (valid) image lies: {name: [(offset, length)]} in host
    offsets, plus 'meta_host' (host offset of the metadata region) and facts."""
    from qsnap.image import layout, qcow2

    hdr = qcow2.HEADER.unpack(buf)
    cs = 1 << hdr["cluster_bits"]
    ext_off = qcow2.HEADER_LENGTH_V3 + 8
    ext = layout.QSNAP_EXT.unpack(buf, ext_off)
    l1_off, l1_size = hdr["l1_table_offset"], hdr["l1_size"]
    l1 = np.frombuffer(buf, ">u8", l1_size, l1_off)
    host = {}
    l2s = []
    for i, e in enumerate(l1.tolist()):
        if not e:
            continue
        l2_off = e & qcow2.L1E_OFFSET_MASK
        l2s.append((l2_off, cs))
        l2 = np.frombuffer(buf, ">u8", cs // 8, l2_off)
        for j in np.flatnonzero(l2).tolist():
            host[i * (cs // 8) + j] = int(l2[j]) & qcow2.L2E_OFFSET_MASK
    rt_off = hdr["refcount_table_offset"]
    rt = np.frombuffer(buf, ">u8", hdr["refcount_table_clusters"] * cs // 8, rt_off)
    rbs = [(int(x) & qcow2.REFT_OFFSET_MASK, cs) for x in rt.tolist() if x]
    mo, ml = ext["meta_offset"], ext["meta_length"]
    meta_host = host[mo // cs]
    region = buf[meta_host:meta_host + ml]
    jl = struct.unpack_from(">Q", region, 8)[0]
    doc = json.loads(region[16:16 + jl])
    blobs = []

    def walk(o, path):
        if isinstance(o, dict):
            if set(o) == {"offset", "length", "crc32c"}:
                blobs.append((path, meta_host + o["offset"], o["length"]))
                return
            for k, v in o.items():
                walk(v, f"{path}.{k}")
        elif isinstance(o, list):
            for i, v in enumerate(o):
                walk(v, f"{path}[{i}]")

    walk(doc, "meta")
    n_ram = mo // cs
    data = sorted((h, cs) for v, h in host.items() if v < n_ram)
    m = {
        "header": [(0, qcow2.HEADER_LENGTH_V3)],
        "extension": [(qcow2.HEADER_LENGTH_V3, 8 + layout.QSNAP_EXT.size + 8)],
        "l1": [(l1_off, l1_size * 8)],
        "l2": l2s,
        "reftable": [(rt_off, hdr["refcount_table_clusters"] * cs)],
        "refblock": rbs,
        "meta_head": [(meta_host, 16)],
        "meta_json": [(meta_host + 16, jl)],
        "blobs": [(o, n) for _, o, n in blobs if n],
        "data": data,
    }
    facts = {"cluster_size": cs, "meta_host": meta_host, "meta_length": ml, "ext_off": ext_off,
             "json_length": jl, "doc": doc, "blob_paths": blobs, "hdr": hdr, "ext": ext,
             "file_bytes": len(buf), "host": host,
             "blob_start": min((o - meta_host for _, o, _n in blobs), default=layout.BLOB_ALIGN)}
    return m, facts


def fix_crcs(buf, facts, blobs=False):
    """Recompute the metadata-region crc (and blob crcs in the JSON when ``blobs``) and the
    extension crc of a mutated image in place (bytearray), so mutations reach the
    validators behind the checksums."""
    mh, ml = facts["meta_host"], facts["meta_length"]
    from qsnap._core import crc32c

    if blobs:
        jl = struct.unpack_from(">Q", buf, mh + 8)[0]
        if 16 + jl <= ml:
            try:
                doc = json.loads(bytes(buf[mh + 16:mh + 16 + jl]))
            except ValueError:
                doc = None
            if doc is not None:
                def walk(o):
                    if isinstance(o, dict):
                        if set(o) == {"offset", "length", "crc32c"}:
                            off, n = o["offset"], o["length"]
                            if isinstance(off, int) and isinstance(n, int) and 0 <= off and 0 <= n \
                                    and off + n <= ml:
                                o["crc32c"] = crc32c(bytes(buf[mh + off:mh + off + n]))
                            return
                        for v in o.values():
                            walk(v)
                    elif isinstance(o, list):
                        for v in o:
                            walk(v)
                walk(doc)
                set_json(buf, facts, doc)
    if mh + ml <= len(buf):
        crc = crc32c(bytes(buf[mh:mh + ml]))
    else:
        crc = 0
    eo = facts["ext_off"]
    if eo + 40 <= len(buf):
        struct.pack_into(">I", buf, eo + 24, crc)
        struct.pack_into(">I", buf, eo + 36, crc32c(bytes(buf[eo:eo + 36])))


def set_json(buf, facts, doc):
    """Write ``doc`` as the metadata JSON if it fits before the first blob; False if not."""

    text = json.dumps(doc, separators=(",", ":")).encode()
    mh = facts["meta_host"]
    room = facts["blob_start"] - 16
    if len(text) > room or mh + 16 + room > len(buf):
        return False
    struct.pack_into(">Q", buf, mh + 8, len(text))
    buf[mh + 16:mh + 16 + room] = text + bytes(room - len(text))
    return True


def limit_memory():
    """Cap the address space (QSNAP_FUZZ_AS_MB, default 3072): a huge allocation
    from a forged length then fails with MemoryError, which the harnesses report."""
    import resource

    mb = int(os.environ.get("QSNAP_FUZZ_AS_MB", "3072"))
    resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))


def stream_corpus():
    """A seed corpus directory of real streams and their heads (made once)."""
    d = cache_dir() / "corpus-stream"
    if not d.exists():
        tmp = cache_dir() / ".corpus-stream.new"
        tmp.mkdir(parents=True, exist_ok=True)
        for p in stream_paths():
            data = load_stream(p)
            name = p.name.split(".")[0]
            (tmp / name).write_bytes(data)
            for n in (64, 512, 4096, 65536):  # short heads reach the early structures quickly
                (tmp / f"{name}-head{n}").write_bytes(data[:n])
        os.replace(tmp, d)
    return d


# --- small seeds for the engine harnesses (one run about a millisecond) -------------

ENGINE_BLOCKS = (("pc.ram", 64 << 10), ("/rom@etc/acpi/tables", 8 << 10), ("pc.bios", 8 << 10))
ENGINE_SYNTH = (  # pattern pages: regression images made from them compress to a few KB
    dict(mode="background", data="pattern"),
    dict(mode="precopy-live", return_path=True),
    dict(mode="precopy-stopped", footers=False, data="pattern"),
    dict(mode="precopy-live", vmdescription=False, zero_page_share=0.5, data="pattern"),
)


def _extra_fixtures_dir():
    """Optional real streams beside the checkout or named by QSNAP_FUZZ_FIXTURES."""
    d = os.environ.get("QSNAP_FUZZ_FIXTURES")
    return pathlib.Path(d) if d else FIXTURES_DIR


def engine_streams(keep_pages=24):
    """[(name, bytes)] of small streams: synthetic guests of 80 KiB and real
    streams cut down to their first ``keep_pages`` RAM records."""
    import io

    import stream_records
    from qsnap.stream.synth import synth_stream

    out = []
    for i, kw in enumerate(ENGINE_SYNTH):
        buf = io.BytesIO()
        synth_stream(buf, blocks=ENGINE_BLOCKS, seed=i, part_pages=8, **kw)
        out.append((f"synth-{kw['mode']}-{i}", buf.getvalue()))
    fixtures = _extra_fixtures_dir()
    paths = sorted(fixtures.glob("*72*.stream.gz")) if fixtures.is_dir() else []
    paths = [p for p in paths if not p.name.startswith("mr")] + [BLOB_STREAM]
    for p in paths:
        if p.exists():
            chunks = stream_records.trim(stream_records.split(load_stream(p)), keep_pages)
            out.append((p.name.split(".")[0], stream_records.join(chunks)))
    return out


def engine_images(where, cluster_size=1 << 16):
    """[(name, bytes)] of images saved from ``engine_streams()`` (those save accepts)."""
    from qsnap.errors import QsnapError

    where = pathlib.Path(where)
    where.mkdir(parents=True, exist_ok=True)
    out = []
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for name, stream in engine_streams():
            img = where / f"{name}.qsnap"
            try:
                save_image(stream, img, cluster_size, out_fd=devnull)
            except QsnapError:
                continue
            out.append((name, img.read_bytes()))
            img.unlink()
    finally:
        os.close(devnull)
    return out
