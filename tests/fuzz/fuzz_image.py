#!/usr/bin/env python3
"""atheris harness: the image reader, `info`, `check` and `load` on hostile images.

    python tests/fuzz/fuzz_image.py -max_total_time=3600 [CORPUS_DIR ...]
    python tests/fuzz/fuzz_image.py -fork=1 -ignore_ooms=1 -max_total_time=36000 CORPUS_DIR   # hours

For runs of hours use libFuzzer's fork mode as above: atheris' Python
instrumentation keeps ~35 KB per input in the fuzzing process (a plain loop over
the same inputs without instrumentation stays flat), and fork mode restarts the
worker between short jobs.

A fuzz input is an edit program applied to an image saved from a real QEMU 7.2
stream: bit flips, integer overwrites with boundary values (0, 1, cluster size,
file size, offsets of other structures -> loops and overlaps, huge values),
truncation at structure boundaries, JSON edits, appended junk.  Optionally the
metadata/extension crcs (and the blob crcs) are recomputed afterwards, so the
structural validators behind the checksums are reached too.

Anything other than a QsnapError is a bug, and so is memory beyond RLIMIT_AS (QSNAP_FUZZ_AS_MB, default 3072).
"""
import json
import os
import struct
import sys

import seeds

import atheris

with atheris.instrument_imports(include=["qsnap"]):
    from qsnap.errors import QsnapError
    from qsnap.image import inspect
    from qsnap.image.reader import Image, peek_header
    from qsnap.load import load

STRUCTS = ("header", "extension", "l1", "l2", "reftable", "refblock", "meta_head", "meta_json",
           "blobs", "data")
_SEEDS = None
_PATH = None
_DEVNULL = None


def _setup():
    global _SEEDS, _PATH, _DEVNULL
    if _SEEDS is None:
        _SEEDS = []
        for name, buf in seeds.seed_images():
            m, facts = seeds.image_map(buf)
            _SEEDS.append((name, buf, m, facts))
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else seeds.cache_dir()
        _PATH = os.path.join(shm, f"qsnap-fuzz-image-{os.getpid()}.qsnap")
        _DEVNULL = os.open(os.devnull, os.O_WRONLY)


def interesting(fdp, m, facts):
    cs, size = facts["cluster_size"], facts["file_bytes"]
    pool = [0, 1, cs - 1, cs, cs + 1, size - cs, size, size + cs, 1 << 30, (1 << 56) - cs,
            (1 << 63) | cs, (1 << 63) | 0, (1 << 62), 0xFFFFFFFF, (1 << 64) - 1, 1 << 25]
    for name in STRUCTS:
        for off, _n in m[name][:2]:
            pool.append(off)
            pool.append(off | (1 << 63))
    return pool[fdp.ConsumeIntInRange(0, len(pool) - 1)]


def apply_edits(fdp, buf, m, facts):
    """Mutate ``buf`` (bytearray) following the program in ``fdp``; returns (buf, touched_data)."""
    touched_data = False
    fix = fdp.ConsumeIntInRange(0, 2)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        op = fdp.ConsumeIntInRange(0, 6)
        name = STRUCTS[fdp.ConsumeIntInRange(0, len(STRUCTS) - 1)]
        regions = m[name]
        if not regions:
            continue
        off, n = regions[fdp.ConsumeIntInRange(0, len(regions) - 1)]
        n = max(n, 1)
        at = off + fdp.ConsumeIntInRange(0, n - 1)
        if op == 0:  # bit flip
            if at < len(buf):
                buf[at] ^= 1 << fdp.ConsumeIntInRange(0, 7)
                touched_data |= name == "data"
        elif op == 1:  # 64-bit value at an aligned offset
            at = off + (at - off) // 8 * 8
            if at + 8 <= len(buf):
                struct.pack_into(">Q", buf, at, interesting(fdp, m, facts) & ((1 << 64) - 1))
                touched_data |= name == "data"
        elif op == 2:  # 32-bit value
            at = off + (at - off) // 4 * 4
            if at + 4 <= len(buf):
                struct.pack_into(">I", buf, at, interesting(fdp, m, facts) & 0xFFFFFFFF)
                touched_data |= name == "data"
        elif op == 3:  # truncate at a boundary or inside
            cut = off if fdp.ConsumeBool() else at
            del buf[cut:]
        elif op == 4:  # random bytes
            data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
            end = min(len(buf), at + len(data))
            if end > at:
                buf[at:end] = data[:end - at]
                touched_data |= name == "data"
        elif op == 5:  # JSON edit
            _json_edit(fdp, buf, facts)
        else:  # append junk clusters
            buf += fdp.ConsumeBytes(16) * (facts["cluster_size"] // 16)
    if fix and len(buf) >= facts["meta_host"] + facts["meta_length"]:
        seeds.fix_crcs(buf, facts, blobs=fix == 2)
    return buf, touched_data


def _json_edit(fdp, buf, facts):
    doc = json.loads(json.dumps(facts["doc"]))
    paths = []

    def walk(o, trail):
        if isinstance(o, dict):
            for k, v in o.items():
                paths.append((o, k))
                walk(v, trail + [k])
        elif isinstance(o, list):
            for i, v in enumerate(o):
                paths.append((o, i))
                walk(v, trail + [i])

    walk(doc, [])
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        parent, key = paths[fdp.ConsumeIntInRange(0, len(paths) - 1)]
        choice = fdp.ConsumeIntInRange(0, 9)
        values = [None, True, -1, 0, 1, 1 << 40, (1 << 64) - 1, "x", [], {}]
        if choice == 9 and isinstance(parent, dict):
            parent.pop(key, None)
        elif isinstance(parent, list) and choice == 8:
            parent.append(parent[key])
        else:
            parent[key] = values[choice]
    seeds.set_json(buf, facts, doc)


def _exercise(path):
    peek_header(path)
    try:
        inspect.describe(path)
    except QsnapError:
        pass
    report = inspect.check_image(path)
    assert report["exit_code"] in (0, 1, 2, 3), report
    json.dumps(report)
    try:
        with Image.open(path) as img:
            img.verify_all()
            for bi, b in enumerate(img.blocks[:4]):
                for p in (0, b.length - img.target_page_size):
                    try:
                        img.read_page(bi, max(p, 0))
                    except QsnapError:
                        pass
            load(img, _DEVNULL, cache="writeback", quiet=True)
    except QsnapError:
        pass
    return report


def TestOneInput(data):
    _setup()
    fdp = atheris.FuzzedDataProvider(data)
    name, seed, m, facts = _SEEDS[fdp.ConsumeIntInRange(0, len(_SEEDS) - 1)]
    buf, _ = apply_edits(fdp, bytearray(seed), m, facts)
    with open(_PATH, "wb") as f:
        f.write(buf)
    try:
        _exercise(_PATH)
    except QsnapError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"bad error message {msg!r}"


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    seeds.limit_memory()
    if not any(not a.startswith("-") for a in argv[1:]):
        d = seeds.cache_dir() / "corpus-image"
        d.mkdir(parents=True, exist_ok=True)
        argv.append(str(d))
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append("-max_len=512")
    if not any(a.startswith("-timeout=") for a in argv):
        argv.append("-timeout=30")
    atheris.Setup(argv, TestOneInput)
    try:
        atheris.Fuzz()
    finally:
        if _PATH:
            try:
                os.unlink(_PATH)
            except OSError:
                pass


if __name__ == "__main__":
    main()
