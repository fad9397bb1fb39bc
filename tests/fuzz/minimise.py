#!/usr/bin/env python3
"""Minimise an engine finding and write it as a regression case.

    python tests/fuzz/minimise.py save|load|postcopy INPUT NAME

Removes whole records (save), edits (load) or return-path messages and edits
(postcopy) while the same signature (engine_harness.signature) still comes
out of the harness's run_one, then writes regressions/<harness>/NAME.* in the
form test_fuzz_regressions.py replays through the command line.
"""
import gzip
import importlib
import os
import pathlib
import sys

os.environ.pop("QSNAP_FUZZ_FINDINGS", None)

import engine_harness as H  # noqa: E402
import image_edits  # noqa: E402
import stream_records  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


def outcome(mod, data):
    try:
        mod.run_one(data)
    except Exception as e:  # noqa: BLE001
        return H.signature(e)
    return None


def reduce_list(items, still_fails):
    """Drop items (halves, then one at a time) while ``still_fails(items)``."""
    step = max(len(items) // 2, 1)
    while step >= 1:
        i = 0
        while i < len(items):
            cand = items[:i] + items[i + step:]
            if cand != items and still_fails(cand):
                items = cand
            else:
                i += step
        step //= 2
    return items


def minimise_save(mod, data, sig):
    chunks = stream_records.split(data)
    chunks = reduce_list(chunks, lambda c: outcome(mod, stream_records.join(c)) == sig)
    return stream_records.join(chunks)


def minimise_load(mod, data, sig):
    si, fix, edits = image_edits.decode(data)
    edits = reduce_list(edits, lambda e: outcome(mod, image_edits.encode(si, fix, e)) == sig)
    if fix and outcome(mod, image_edits.encode(si, 0, edits)) == sig:
        fix = 0
    return image_edits.encode(si, fix, edits)


def minimise_postcopy(mod, data, sig):
    prog, upfront, percent, rp = mod.decode(data)
    pct = mod.PERCENTS.index(percent)
    prog = minimise_load(_Prog(mod, upfront, pct, rp), prog, sig)
    msgs = mod.split_messages(rp)

    def fails(m):
        return outcome(mod, mod.encode(prog, min(upfront, len(m)), pct, b"".join(m))) == sig
    msgs = reduce_list(msgs, fails)
    return mod.encode(prog, min(upfront, len(msgs)), pct, b"".join(msgs))


class _Prog:
    """run_one over the image program alone, the rest of the input fixed."""

    def __init__(self, mod, upfront, pct, rp):
        self.mod, self.rest = mod, (upfront, pct, rp)

    def run_one(self, prog):
        self.mod.run_one(self.mod.encode(prog, *self.rest))


def write_case(harness, mod, data, name):
    d = HERE / "regressions" / harness
    d.mkdir(parents=True, exist_ok=True)
    if harness == "save":
        (d / f"{name}.stream").write_bytes(data)
        return
    if harness == "load":
        _seed, buf = image_edits.apply(mod.setup()["seeds"], data)
        (d / f"{name}.qsnap.gz").write_bytes(gzip.compress(bytes(buf), 9, mtime=0))
        return
    prog, upfront, percent, rp = mod.decode(data)
    _seed, buf = image_edits.apply(mod.setup()["seeds"], prog)
    (d / f"{name}-pct{percent}.qsnap.gz").write_bytes(gzip.compress(bytes(buf), 9, mtime=0))
    if rp:
        (d / f"{name}-pct{percent}.rp").write_bytes(rp)


def main():
    harness, path, name = sys.argv[1:4]
    mod = importlib.import_module(f"fuzz_{harness}")
    data = pathlib.Path(path).read_bytes()
    sig = outcome(mod, data)
    if sig is None:
        sys.exit(f"{path} does not fail")
    print("signature:", sig)
    small = globals()[f"minimise_{harness}"](mod, data, sig)
    print(f"{len(data)} -> {len(small)} bytes")
    write_case(harness, mod, small, name)


if __name__ == "__main__":
    main()
