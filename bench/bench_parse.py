"""Parse throughput of StreamReader on a synthetic 1 GiB stream (pytest-benchmark).

    python -m pytest bench/bench_parse.py --benchmark-only -s

Reports GB/s for parsing from memory (BytesIO) and from the file, and, in the
same run, the time of ``cat file > /dev/null`` on the same bytes.
"""
import io
import os
import subprocess
import time

import pytest

from qsnap.stream.events import PageBatch
from qsnap.stream.reader import StreamReader
from qsnap.stream.synth import synth_stream

SIZE = int(os.environ.get("QSNAP_BENCH_MIB", "1024")) << 20


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("bench") / "synth.stream"
    with open(p, "wb") as f:
        # ~SIZE bytes of stream; zero_share=0.1: mostly PAGE records, i.e. pointer data, as in a busy guest
        synth_stream(f, blocks=(("pc.ram", SIZE * 9 // 8),), zero_share=0.1, data="random", mode="background")
    return p


def parse(src):
    n = pages = 0
    for e in StreamReader(src):
        if isinstance(e, PageBatch):
            pages += len(e.records)
    return pages


def report(name, nbytes, seconds):
    print("\n%-28s %8.1f MiB in %.3f s = %.2f GB/s" % (name, nbytes / 2**20, seconds, nbytes / seconds / 1e9))


def test_parse_memory(benchmark, stream_file):
    data = stream_file.read_bytes()
    pages = benchmark.pedantic(lambda: parse(io.BytesIO(data)), rounds=3, iterations=1)
    assert pages > 0
    report("parse (BytesIO, in memory)", len(data), benchmark.stats.stats.min)


def test_parse_file(benchmark, stream_file):
    def run():
        with open(stream_file, "rb", buffering=0) as f:
            return parse(f)
    benchmark.pedantic(run, rounds=3, iterations=1)
    report("parse (file, page cache)", stream_file.stat().st_size, benchmark.stats.stats.min)


def test_cat_devnull(benchmark, stream_file):
    def run():
        subprocess.run("cat %s > /dev/null" % stream_file, shell=True, check=True)
    benchmark.pedantic(run, rounds=3, iterations=1)
    report("cat file > /dev/null", stream_file.stat().st_size, benchmark.stats.stats.min)


def test_parse_pipe(benchmark, stream_file):
    def run():
        p = subprocess.Popen(["cat", str(stream_file)], stdout=subprocess.PIPE)
        try:
            return parse(p.stdout.fileno())
        finally:
            p.stdout.close()
            p.wait()
    benchmark.pedantic(run, rounds=3, iterations=1)
    report("parse (pipe from cat)", stream_file.stat().st_size, benchmark.stats.stats.min)
