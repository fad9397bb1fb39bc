#!/usr/bin/env python3
"""atheris harness: the stream reader (C RAM parser and its pure-Python twin) on hostile input.

    python tests/fuzz/fuzz_stream.py -max_total_time=3600 [CORPUS_DIR ...]
    python tests/fuzz/fuzz_stream.py -fork=1 -ignore_ooms=1 -max_total_time=36000 CORPUS_DIR   # hours

For runs of hours use libFuzzer's fork mode as above: atheris' Python
instrumentation keeps ~35 KB per input in the fuzzing process (a plain loop over
the same inputs without instrumentation stays flat), and fork mode restarts the
worker between short jobs.

Seeded from real QEMU 7.2 streams.  Anything other than a QsnapError leaving the
reader is a bug, and so is the C parser and the pure twin disagreeing on an input
(one accepts what the other rejects, or they yield different pages).  A single
input may not push memory past RLIMIT_AS (QSNAP_FUZZ_AS_MB, default 3072): oversized
lengths must be rejected before anything is allocated.
"""
import io
import sys

import seeds  # noqa: F401  (puts the checkout on sys.path)

import atheris

with atheris.instrument_imports(include=["qsnap"]):
    from qsnap.errors import QsnapError
    from qsnap.stream.events import DeviceState, PageBatch
    from qsnap.stream.reader import StreamReader

# Bounds a fuzz input runs under (small, so that rejections of big items show).
LIMITS = dict(buffer_size=1 << 16, max_batch=512, max_device_state=4 << 20)


def _run(data, pure):
    """('ok', pages, device bytes) or ('err', message) for one parser."""
    pages = 0
    digest = 0
    dev = -1
    try:
        for e in StreamReader(io.BytesIO(data), pure=pure, **LIMITS):
            if isinstance(e, PageBatch):
                r = e.records
                pages += len(r)
                if len(r):
                    digest = (digest * 1000003 + int(r["offset"].sum()) + int(r["block"].sum())
                              + int(r["data_len"].sum())) & 0xFFFFFFFFFFFF
            elif isinstance(e, DeviceState):
                dev = len(e.data)
    except QsnapError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"bad error message {msg!r}"
        return ("err", type(e).__name__)
    return ("ok", pages, digest, dev)


def TestOneInput(data):
    c = _run(data, pure=False)
    py = _run(data, pure=True)
    if c[0] != py[0] or (c[0] == "ok" and c != py):
        raise AssertionError(f"C parser and pure twin disagree: {c} vs {py}")


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    seeds.limit_memory()
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(str(seeds.stream_corpus()))
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append("-max_len=2000000")
    if not any(a.startswith("-timeout=") for a in argv):
        argv.append("-timeout=30")
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
