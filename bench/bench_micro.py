"""Micro benchmarks of the hot paths, each beside a physical reference (pytest-benchmark).

    python -m pytest bench/bench_micro.py -q
    QSNAP_BENCH_MIB=1024 QSNAP_BENCH_ROUNDS=5 python -m pytest bench/bench_micro.py -q

Two synthetic background-snapshot streams of QSNAP_BENCH_MIB MiB guest RAM
(default 512) are built in memory: ``data`` (10 % zero pages: mostly PAGE
records, random payload, the expensive case per stream byte) and ``half``
(50 % zero pages).  Measured, in GB/s of the bytes each step consumes:

  * reference copies of the same bytes: ``bytes(memoryview(buf))`` (allocates,
    faults pages in) and ``numpy.copyto`` into a preallocated array;
  * stream parsing: StreamReader over an in-memory stream (io.BytesIO);
  * zero detection: ``qsnap._core.is_zero`` over an all-zero buffer (full scan);
  * coalescing: ``ClusterSink.put_batch`` of pre-parsed batches into a file on
    tmpfs (no fsync);
  * the combined save hot path: StreamReader -> ClusterSink.put_batch with the
    sink's fd on tmpfs (beside a plain write of the same bytes to a tmpfs file)
    and on /dev/null (CPU only); target >= 2 GB/s of stream on one core;
  * checksums: ``crc32c`` and ``page_crcs`` over random data;
  * the image read path: ``qsnap.load.load`` of an image (page cache warm,
    cache=writeback) to /dev/null beside ``cat IMG > /dev/null`` on the same file.
"""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.conftest import record
from qsnap._core import ClusterSink, crc32c, is_zero, page_crcs
from qsnap.image import layout
from qsnap.load import load
from qsnap.stream import events as ev
from qsnap.stream.reader import StreamReader
from qsnap.stream.synth import synth_stream

MIB = int(os.environ.get("QSNAP_BENCH_MIB", "512"))
ROUNDS = int(os.environ.get("QSNAP_BENCH_ROUNDS", "3"))
TARGET_HOT_GBPS = 2.0
STREAMS = {"data": 0.1, "half": 0.5}


def _bench(benchmark, fn, setup=None):
    if setup is None:
        return benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    return benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, iterations=1)


@pytest.fixture(scope="module", params=list(STREAMS))
def stream(request):
    b = io.BytesIO()
    synth_stream(b, blocks=(("pc.ram", MIB << 20), ("pc.bios", 256 << 10)),
                 zero_share=STREAMS[request.param], data="random", mode="background", seed=1)
    return request.param, b.getvalue()


@pytest.fixture(scope="module")
def random_buf():
    return np.random.default_rng(7).integers(0, 256, size=min(MIB, 256) << 20, dtype=np.uint8)


def _new_sink(fd, mem):
    blocks = [{"idstr": b.idstr, "length": b.length, "page_size": 4096} for b in mem.blocks]
    offs, meta = layout.compute_regions(blocks, 1 << 20)
    return ClusterSink(fd, meta, region_offsets=np.array(offs, np.uint64),
                       block_lengths=np.array([b.length for b in mem.blocks], np.uint64))


# --- references -----------------------------------------------------------------

def test_ref_copy_bytes(benchmark, stream):
    name, data = stream
    _bench(benchmark, lambda: bytes(memoryview(data)))
    record(benchmark, f"copy bytes(memoryview) [{name}]", len(data))


def test_ref_copy_numpy(benchmark, stream):
    name, data = stream
    src = np.frombuffer(data, np.uint8)
    dst = np.empty_like(src)
    _bench(benchmark, lambda: np.copyto(dst, src))
    record(benchmark, f"copy numpy.copyto [{name}]", len(data))


# --- parse, zero detection, coalescing --------------------------------------------

def _parse(data):
    pages = 0
    for e in StreamReader(io.BytesIO(data)):
        if isinstance(e, ev.PageBatch):
            pages += len(e.records)
    return pages


def test_parse(benchmark, stream):
    name, data = stream
    assert _bench(benchmark, lambda: _parse(data)) > 0
    record(benchmark, f"parse StreamReader(BytesIO) [{name}]", len(data),
           ref=f"copy bytes(memoryview) [{name}]")


def test_is_zero(benchmark):
    buf = np.zeros(min(MIB, 256) << 20, np.uint8)
    buf[:] = 0  # fault the pages in
    assert _bench(benchmark, lambda: is_zero(buf))
    record(benchmark, "is_zero (all-zero buffer, full scan)", buf.nbytes, ref="copy numpy.copyto [data]")


def _batches(data):
    """Pre-parsed (MemSize, [(records, data)]) of a stream, copies kept."""
    mem, out = None, []
    for e in StreamReader(io.BytesIO(data)):
        if isinstance(e, ev.PageBatch):
            out.append((e.records.copy(), bytes(e.data)))
        elif isinstance(e, ev.MemSize):
            mem = e
    return mem, out


def test_sink_put_batch(benchmark, stream, tmpfs_dir):
    name, data = stream
    mem, batches = _batches(data)
    path = tmpfs_dir / "sink.img"
    state = {}

    def setup():
        state["fd"] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def run():
        fd = state["fd"]
        sink = _new_sink(fd, mem)
        for recs, d in batches:
            sink.put_batch(recs, d)
        sink.flush()
        os.close(fd)

    _bench(benchmark, run, setup)
    path.unlink()
    record(benchmark, f"coalesce ClusterSink.put_batch -> tmpfs [{name}]", len(data),
           ref=f"copy bytes(memoryview) [{name}]",
           note=f"{((MIB << 20) + (256 << 10)) / benchmark.stats.stats.median / 1e9:.2f} GB/s of guest RAM")


def test_ref_write_tmpfs(benchmark, stream, tmpfs_dir):
    """The physical cost of putting the stream's bytes into a fresh tmpfs file (1 MiB writes)."""
    name, data = stream
    path = tmpfs_dir / "ref.img"
    mv = memoryview(data)
    state = {}

    def setup():
        state["fd"] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def run():
        fd = state["fd"]
        for i in range(0, len(mv), 1 << 20):
            os.write(fd, mv[i:i + (1 << 20)])
        os.close(fd)

    _bench(benchmark, run, setup)
    path.unlink()
    record(benchmark, f"write stream bytes -> tmpfs file [{name}]", len(data))


def _hot_path(data, fd):
    sink = None
    for e in StreamReader(io.BytesIO(data)):
        if isinstance(e, ev.PageBatch):
            sink.put_batch(e.records, e.data)
        elif isinstance(e, ev.MemSize):
            sink = _new_sink(fd, e)
    sink.flush()


@pytest.mark.parametrize("target", ["tmpfs", "devnull"])
def test_save_hot_path(benchmark, stream, tmpfs_dir, target):
    """StreamReader over the in-memory stream feeding ClusterSink.put_batch, no fsync.

    tmpfs: the sink's fd is a fresh file on tmpfs (the kernel allocates, zeroes
    and copies every written page); devnull: the fd is /dev/null (CPU of
    parse + zero detection + crc + coalescing alone)."""
    name, data = stream
    path = tmpfs_dir / "hot.img"
    state = {}

    def setup():
        if target == "tmpfs":
            state["fd"] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        else:
            state["fd"] = os.open(os.devnull, os.O_RDWR)

    def run():
        _hot_path(data, state["fd"])
        os.close(state["fd"])

    _bench(benchmark, run, setup)
    if path.exists():
        path.unlink()
    ref = (f"write stream bytes -> tmpfs file [{name}]" if target == "tmpfs"
           else f"copy bytes(memoryview) [{name}]")
    ram = (MIB << 20) + (256 << 10)
    record(benchmark, f"save hot path parse+zero+coalesce -> {target} [{name}]", len(data),
           ref=ref, target_gbps=TARGET_HOT_GBPS,
           note=f"{ram / benchmark.stats.stats.median / 1e9:.2f} GB/s of guest RAM")


# --- checksums ------------------------------------------------------------------

def test_ref_copy_random(benchmark, random_buf):
    dst = np.empty_like(random_buf)
    _bench(benchmark, lambda: np.copyto(dst, random_buf))
    record(benchmark, "copy numpy.copyto [random]", random_buf.nbytes)


def test_crc32c(benchmark, random_buf):
    _bench(benchmark, lambda: crc32c(random_buf))
    record(benchmark, "crc32c (one buffer)", random_buf.nbytes, ref="copy numpy.copyto [random]")


def test_page_crcs(benchmark, random_buf):
    _bench(benchmark, lambda: page_crcs(random_buf))
    record(benchmark, "page_crcs (4 KiB pages)", random_buf.nbytes, ref="copy numpy.copyto [random]")


# --- image read path ----------------------------------------------------------------

@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """An image written by ``qsnap save`` from a synthetic stream (10 % zero pages)."""
    d = tmp_path_factory.mktemp("bench_micro_img")
    sp, p = d / "vm.stream", d / "vm.qsnap"
    with open(sp, "wb") as f:
        synth_stream(f, blocks=(("pc.ram", MIB << 20), ("pc.bios", 256 << 10)),
                     zero_share=0.1, data="random", mode="background", seed=3)
    with open(sp, "rb") as f:
        subprocess.run([sys.executable, "-m", "qsnap", "save", "-q", str(p)], stdin=f, check=True,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    sp.unlink()
    subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)  # warm
    return p


def test_ref_cat_image(benchmark, image):
    _bench(benchmark, lambda: subprocess.run(f"cat '{image}' > /dev/null", shell=True, check=True))
    record(benchmark, "cat IMG > /dev/null (warm)", image.stat().st_size)


def test_load_devnull(benchmark, image):
    out = {}

    def run():
        with open(os.devnull, "wb") as f:
            out.update(load(image, out_fd=f.fileno(), cache="writeback", quiet=True))

    _bench(benchmark, run)
    record(benchmark, "load IMG -> /dev/null (warm, writeback)", image.stat().st_size,
           ref="cat IMG > /dev/null (warm)",
           note=f"stream {out['stream_bytes'] / 1e6:.0f} MB")
