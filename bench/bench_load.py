"""Load throughput against ``cat image > /dev/null``, in the same run.

    python -m pytest bench/bench_load.py [--benchmark-only]
    QSNAP_BENCH_SIZE=4G python -m pytest bench/bench_load.py

Builds one image of about QSNAP_BENCH_SIZE (default 512 MiB guest RAM, 10 % zero
pages, random data), then benchmarks, each round on a cold page cache
(posix_fadvise DONTNEED on the image before the round):

  * ``cat IMG > /dev/null``                   the disk's sequential read rate
  * ``load(IMG)`` to /dev/null, cache=none     O_DIRECT read-ahead ring (default)
  * ``load(IMG)`` to /dev/null, cache=writeback

and reports GB/s of image file read per second in ``extra_info``, plus the
peak RSS of ``python -m qsnap load IMG > /dev/null``.
"""
import os
import subprocess
import sys

import pytest

from bench import evict_file
from bench.conftest import record
from qsnap.load import load
from qsnap.save import save
from qsnap.stream.synth import synth_stream

ROUNDS = int(os.environ.get("QSNAP_BENCH_ROUNDS", "3"))


def _size(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.lower().rstrip("ib")
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def build_image(stream_path, image_path):
    """Stream file -> image through the save engine."""
    with open(stream_path, "rb") as f:
        save(str(image_path), in_fd=f.fileno(), out_fd=-1, quiet=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    size = _size(os.environ.get("QSNAP_BENCH_SIZE", "512M"))
    d = tmp_path_factory.mktemp("bench_load")
    sp, ip = d / "vm.stream", d / "vm.qsnap"
    with open(sp, "wb") as f:
        synth_stream(f, blocks=(("pc.ram", size), ("pc.bios", 256 << 10)), mode="background",
                     zero_share=0.1, seed=1)
    build_image(sp, ip)
    sp.unlink()
    return ip


def _report(benchmark, nbytes, what, ref=None):
    record(benchmark, what, nbytes, ref=ref)


def test_cat_to_devnull(benchmark, image):
    size = image.stat().st_size

    def run():
        subprocess.run(f"cat '{image}' > /dev/null", shell=True, check=True)

    benchmark.pedantic(run, setup=lambda: evict_file(image), rounds=ROUNDS, iterations=1)
    _report(benchmark, size, "cat IMG > /dev/null (cold)")


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_load_to_devnull(benchmark, image, cache):
    size = image.stat().st_size
    out = {}

    def run():
        with open(os.devnull, "wb") as f:
            out.update(load(image, out_fd=f.fileno(), cache=cache, quiet=True))

    benchmark.pedantic(run, setup=lambda: evict_file(image), rounds=ROUNDS, iterations=1)
    _report(benchmark, size, f"load IMG -> /dev/null (cold, cache={cache})",
            ref="cat IMG > /dev/null (cold)")
    benchmark.extra_info["stream_bytes"] = out["stream_bytes"]
    benchmark.extra_info["direct_io"] = out["direct_io"]


def test_load_peak_rss(image):
    """Peak RSS (VmHWM) of a fresh process running load(): ring + bitmaps/checksums + interpreter."""
    evict_file(image)
    code = ("import os, sys; from qsnap.load import load; "
            "load(sys.argv[1], out_fd=os.open(os.devnull, os.O_WRONLY), quiet=True); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    base = ("import os, qsnap.load, qsnap.image.reader; "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    run = lambda *a: int(subprocess.run([sys.executable, "-c", *a], check=True,  # noqa: E731
                                        capture_output=True, text=True).stdout.split()[-1]) / 1024
    rss, idle = run(code, str(image)), run(base)
    print(f"\nload peak RSS: {rss:.0f} MiB ({rss - idle:.0f} MiB over the interpreter with qsnap "
          f"imported, {idle:.0f} MiB)", file=sys.stderr)
    assert rss - idle < 64
