#!/usr/bin/env python3
"""atheris harness: the whole load engine (qsnap.load.load) on hostile images.

    python tests/fuzz/fuzz_load.py -max_total_time=600 [CORPUS_DIR ...]
    QSNAP_FUZZ_FINDINGS=DIR python tests/fuzz/fuzz_load.py -fork=1 -ignore_ooms=1 -max_total_time=36000

A fuzz input is an edit program (image_edits.py) over small images that
``qsnap save`` writes at start-up from the engine seed streams; the custom
mutator adds edits aimed at qcow2 header fields, L1/L2 and refcount entries,
the qsnap extension, the metadata JSON and the checksums.  The image lives on
tmpfs and is read with cache='writeback'; the stream goes to a memfd.

The contract (engine_harness.py): load returns or raises a QsnapError with a
one-line message, and leaves no file beside the image; what a successful load
wrote is a stream qsnap's own reader accepts (unless the edit program forged
the blob checksums: load sends the stream header and device state verbatim).
"""
import io
import os
import sys

import engine_harness as H
import seeds

import atheris

with atheris.instrument_imports(include=["qsnap"]):
    from qsnap.errors import QsnapError
    from qsnap.image import layout, qcow2, reader
    from qsnap.load import load
    from qsnap.stream.reader import StreamReader

# Imported above so they are instrumented: load() imports the reader lazily.
_INSTRUMENTED = (layout, qcow2, reader)

import image_edits

_state = {}


def setup():
    if not _state:
        d = H.work_dir("load")
        _state.update(dir=d, path=str(d / "image.qsnap"), name="image.qsnap",
                      seeds=[image_edits.Seed(n, b) for n, b in seeds.engine_images(d / "seeds")],
                      outfd=os.memfd_create("fuzz-load-out"))
        os.rmdir(d / "seeds")
    return _state


def write_image(st, data):
    _seed, buf = image_edits.apply(st["seeds"], data)
    with open(st["path"], "wb") as f:
        f.write(buf)


def check_stream(st):
    """What load wrote is a stream qsnap's own reader accepts."""
    out = os.pread(st["outfd"], os.fstat(st["outfd"]).st_size, 0)
    try:
        for _ in StreamReader(io.BytesIO(out), buffer_size=1 << 18):
            pass
    except QsnapError as e:
        raise H.ContractViolation(f"load succeeded but wrote a stream the reader rejects: {e}") from None


def run_one(data):
    st = setup()
    write_image(st, data)
    os.ftruncate(st["outfd"], 0)
    os.lseek(st["outfd"], 0, os.SEEK_SET)
    try:
        load(st["path"], st["outfd"], cache="writeback", quiet=True)
    except QsnapError as e:
        H.check_message(e)
    else:
        if image_edits.decode(data)[1] % 3 != 2:
            # With blob checksums forged (crc mode 2) an edited header or device
            # state passes every check: load sends those blobs verbatim, by design.
            check_stream(st)
    H.check_no_leftovers(st["dir"], [st["name"]])


def TestOneInput(data):
    try:
        run_one(data)
    except Exception as e:  # noqa: BLE001  every non-QsnapError is a finding
        H.finding(e, data)


_mutator = None


def CustomMutator(data, max_size, seed):
    global _mutator
    if _mutator is None:
        _mutator = image_edits.Mutator(setup()["seeds"], atheris.Mutate)
    return _mutator.mutate(data, max_size, seed)


def seed_programs(n_seeds):
    """Each seed image unchanged and with its checksums recomputed."""
    return [(f"seed{i}-fix{fix}", image_edits.encode(i, fix, [])) for i in range(n_seeds) for fix in (0, 1)]


def seed_dir():
    return H.write_seed_dir("load", seed_programs(len(setup()["seeds"])))


def main(argv=None):
    H.run(sys.argv if argv is None else argv, "load", TestOneInput, seed_dir, CustomMutator, max_len=256)


if __name__ == "__main__":
    main()
