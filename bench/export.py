"""Export throughput against ``qemu-img convert -O raw`` of the same image, in one run.

    python -m bench.export [--size 1G] [--rounds 3] [--dir DIR] [--json FILE]

An image of a synthetic guest (pc.ram of SIZE, 50 % zero pages in 1 MiB runs,
random data) is saved once; then, alternating ROUNDS times, each writes its
output next to the image and makes it durable:

  Q. ``qemu-img convert -O raw IMG out && sync out``   (the baseline: qcow2 -> sparse raw)
  R. ``qsnap export --format=raw IMG out``              (guest-physical raw, fsync'd)
  E. ``qsnap export --format=elf IMG out``              (ELF core, fsync'd)
  M. ``qsnap export --format=mapped-ram IMG out``       (QEMU mapped-ram file, fsync'd)

and reports the medians and the ratios R/Q, E/Q and M/Q (lower is faster; the
data written is the same non-zero pages in all four). The image is in the page
cache for every contender, as it is right after a save.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from bench import compile_qsnap_once
from qsnap.save import save
from qsnap.stream.synth import synth_stream

FORMATS = ("raw", "elf", "mapped-ram")


def _size(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.lower().rstrip("ib")
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def make_image(d, size):
    stream = os.path.join(d, "bench.stream")
    with open(stream, "wb") as f:
        synth_stream(f, blocks=(("pc.ram", size), ("pc.bios", 256 << 10)), zero_share=0.5,
                     zero_run=256, mode="precopy-stopped", seed=7)
    img = os.path.join(d, "bench.qsnap")
    with open(stream, "rb") as f, open(os.devnull, "wb") as null:
        summary = save(img, in_fd=f.fileno(), out_fd=null.fileno(), quiet=True)
    os.unlink(stream)
    return img, summary["nonzero_pages"] * 4096


def timed(cmd, out):
    if os.path.exists(out):
        os.unlink(out)
    t = time.monotonic()
    subprocess.run(cmd, shell=True, check=True)
    return time.monotonic() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=_size, default=1 << 30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one in /var/tmp)")
    ap.add_argument("--json", default=None, help="write the report to this file too")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir or "/var/tmp", prefix="qsnap-bench-export-") as d:
        compile_qsnap_once(os.path.join(d, "pycache"), ["qsnap.export.elf", "qsnap.export.mapped_ram"])
        img, data = make_image(d, a.size)
        out = os.path.join(d, "out")
        q = shlex.quote
        cmds = {"qemu-img": f"qemu-img convert -O raw {q(img)} {q(out)} && sync {q(out)}"}
        for fmt in FORMATS:
            cmds[fmt] = f"{q(sys.executable)} -m qsnap export -q --format={fmt} {q(img)} {q(out)}"
        times = {k: [] for k in cmds}
        for _ in range(a.rounds):
            for k, cmd in cmds.items():
                times[k].append(timed(cmd, out))
        base = statistics.median(times["qemu-img"])
        report = {"size": a.size, "data_bytes": data, "rounds": a.rounds, "times_s": times,
                  "median_s": {k: statistics.median(v) for k, v in times.items()},
                  "data_MBps": {k: data / 1e6 / statistics.median(v) for k, v in times.items()},
                  "ratio_over_qemu_img": {k: statistics.median(times[k]) / base for k in FORMATS},
                  "loadavg": os.getloadavg()}
    print(json.dumps(report, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
