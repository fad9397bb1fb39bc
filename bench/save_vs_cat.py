"""Save throughput against the physical baseline, in one run.

    python -m bench.save_vs_cat [--size 2G] [--rounds 3] [--dir DIR]

Synthesises a background-snapshot stream of SIZE (50 % zero pages in 1 MiB runs, random
data), then alternates, ROUNDS times:

  A. ``cat stream | cat > f; sync f``            (what the disk and pipe cost)
  B. ``cat stream | qsnap save img``            (qsnap durable at exit: fsync'd)

and reports medians, the ratio B/A, qsnap's CPU time and peak RSS.  A second
measurement pipes a 4 GiB synthetic stream straight from the generator into
``qsnap save`` to report peak RSS (target <= 150 MiB).  Both commands read the
stream through a pipe from a warm page cache, as QEMU would feed it.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from qsnap.stream.synth import DEFAULT_BLOCKS, synth_stream


def _size(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.lower().rstrip("ib")
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def run_timed(cmd):
    """Run a shell command; return (wall seconds, child CPU seconds, child max RSS MiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    subprocess.run(cmd, shell=True, check=True)
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss / 1024


def peak_rss_of(cmd):
    """Peak RSS (MiB) of a command run under /usr/bin/time if present, else of all children."""
    out = subprocess.run(["/usr/bin/time", "-f", "%M", "sh", "-c", cmd],
                         capture_output=True, text=True)
    if out.returncode == 0 and out.stderr.strip().splitlines():
        return int(out.stderr.strip().splitlines()[-1]) / 1024
    return None


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Linux {platform.release()}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=_size, default=2 << 30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--rss-size", type=_size, default=4 << 30)
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="qsnap-bench-", dir=args.dir)
    stream = os.path.join(work, "vm.stream")
    blocks = [(n, args.size if n == "pc.ram" else l) for n, l in DEFAULT_BLOCKS]
    with open(stream, "wb") as f:
        synth_stream(f, blocks=blocks, zero_share=0.5, zero_run=256, mode="background", seed=1)
    nbytes = os.path.getsize(stream)
    qsnap = f"{sys.executable} -m qsnap"
    results = {"cat": [], "qsnap": [], "qsnap_cpu": [], "qsnap_rss": []}
    for _ in range(args.rounds):
        out = os.path.join(work, "cat.out")
        w, _, _ = run_timed(f"cat {stream} | cat > {out} && sync {out}")
        results["cat"].append(w)
        os.unlink(out)
        img = os.path.join(work, "vm.qsnap")
        w, cpu, _ = run_timed(f"cat {stream} | {qsnap} save -q {img}")
        results["qsnap"].append(w)
        results["qsnap_cpu"].append(cpu)
        os.unlink(img)
    img = os.path.join(work, "big.qsnap")
    gen = (f"{sys.executable} -c \"import sys; from qsnap.stream.synth import synth_stream, DEFAULT_BLOCKS; "
           f"synth_stream(sys.stdout.buffer, blocks=[(n, {args.rss_size} if n == 'pc.ram' else l) "
           f"for n, l in DEFAULT_BLOCKS], zero_share=0.5, zero_run=256, mode='background', seed=2)\"")
    rss = peak_rss_of(f"{gen} | {qsnap} save -q {img}")
    os.unlink(img)
    os.unlink(stream)
    os.rmdir(work)
    cat_m = statistics.median(results["cat"])
    q_m = statistics.median(results["qsnap"])
    report = {
        "machine": machine(),
        "stream_bytes": nbytes,
        "cat_sync_s": results["cat"],
        "qsnap_save_s": results["qsnap"],
        "median_ratio_qsnap_over_cat": q_m / cat_m,
        "cat_MBps": nbytes / 1e6 / cat_m,
        "qsnap_MBps": nbytes / 1e6 / q_m,
        "qsnap_cpu_s_median": statistics.median(results["qsnap_cpu"]),
        "peak_rss_MiB_4GiB_stream": rss,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
