"""The load path's emitter calls (read-ahead ring, windowed page state, ZERO
records) made with plain buffers: array.array, bytearray, memoryview.

Run as a script (``python _emit_plain.py CASE.json OUT``) it blocks NumPy
first, so that importing qsnap._core or calling the emitter fails if either
needs it.  test_load_emit.py compares its output with the same calls made with
NumPy arrays (``run`` with other inputs).
"""
import json
import os
import sys
from array import array

PAGE = 4096
CLUSTER = 64 * 1024
REGION = 1 << 20
STATE_BATCH = 2          # clusters per state(k0) call: more than one call


def run(case, out_path, host, virt, blk, state, window, extents):
    """Emit the case's clusters and zero pages to out_path; returns (sections, ring bytes)."""
    from qsnap import _core

    fd = os.open(case["image"], os.O_RDONLY)
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with _core.AioRing(fd, extents, buf_size=CLUSTER) as ring:
            ring_bytes = b"".join(data for *_, data in ring)
        em = _core.PageEmitter(out, PAGE)
        em.set_blocks([("pc.ram", REGION, case["n_pages"] * PAGE, None, None)])
        parts = em.send_clusters(fd, host, virt, blk, CLUSTER, b"<", b">", part_bytes=2 * CLUSTER,
                                 buf_size=2 * CLUSTER, n_bufs=2, n_threads=1, state=state)
        em.zero_range(0, 0, case["n_pages"], bitmap=window)
        em.flush()
    finally:
        os.close(out)
        os.close(fd)
    return parts, ring_bytes


def plain_inputs(case):
    """run()'s arguments as array.array, bytearray and memoryview."""
    bitmap = bytes.fromhex(case["bitmap"])
    crcs = array("I", case["crcs"])
    wp = case["window_pages"]
    n = len(case["host"])

    def state(k0):
        k1 = min(k0 + STATE_BATCH, n)
        bits, sums = bytearray(), array("I")
        for v in case["virt"][k0:k1]:
            first = (v - REGION) // PAGE // 8 * 8
            bits += bitmap[first // 8:(first + wp) // 8].ljust(wp // 8, b"\0")
            row = crcs[first:first + wp]
            sums += row + array("I", bytes(4 * (wp - len(row))))
        return k1, bits, sums

    extents = array("Q", [x for h in case["host"] for x in (h, CLUSTER)])
    return (array("Q", case["host"]), array("Q", case["virt"]), array("I", bytes(4 * n)), state,
            memoryview(bitmap), extents)


def main(case_path, out_path):
    sys.modules["numpy"] = None          # any import of NumPy now raises ImportError
    with open(case_path) as f:
        case = json.load(f)
    parts, ring_bytes = run(case, out_path, *plain_inputs(case))
    sys.stdout.write(json.dumps({"parts": parts, "ring_bytes": ring_bytes.hex()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
