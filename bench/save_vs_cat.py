"""Save throughput against the physical baseline, in one run.

    python -m bench.save_vs_cat [--size 2G] [--rounds 3] [--dir DIR]
    python -m bench.save_vs_cat --capture 3G --fill 0.67     # a real QEMU stream
    python -m bench.save_vs_cat --stream FILE                # a stream captured before

The stream is one of: synthesised (pc.ram of SIZE, 50 % zero pages in 1 MiB runs,
random data); captured from a real QEMU blob guest of --capture RAM whose --fill
share is random data (background snapshot into ``exec:cat > FILE``, KVM or TCG);
or a given file.  Then, alternating ROUNDS times:

  A. ``cat stream > f && sync f``               (the baseline: what the disk costs)
  P. ``cat stream | cat > f && sync f``         (the same through a pipe)
  B. ``cat stream | qsnap save img``            (default --cache=auto: O_DIRECT; fsync'd)
  W. ``cat stream | qsnap save --cache=writeback img``  (through the page cache)
  S. ``cat stream | qsnap save /dev/shm/img``   (no disk: the pipe and CPU floor)
  R. ``cat stream | python -c 'parse it'``       (only the pipe, start-up and parsing)

and reports medians, the ratios B/A, B/P, W/A, S/A and R/A, qsnap's CPU time and peak RSS.  A
second measurement pipes a 4 GiB synthetic stream straight from the generator
into ``qsnap save`` to report peak RSS (target <= 150 MiB).  qsnap reads the
stream through a pipe from a warm page cache, as QEMU would feed it.
"""
import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench import compile_qsnap_once
from qsnap.stream.synth import DEFAULT_BLOCKS, synth_stream


def _size(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.lower().rstrip("ib")
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


# Read and parse a stream from stdin as save does, and store nothing: the floor
# of any save that has to read its stream from a pipe.
PARSE_ONLY = shlex.quote(
    "import os\n"
    "from qsnap.stream.reader import StreamReader\n"
    "for _ in StreamReader(os.fdopen(0, 'rb', buffering=0), stop_at_logical_end=True):\n"
    "    pass\n")


def _figures(label, times, cpu, cat_m, nbytes):
    """Report entries of one optional contender: its times, median ratio to cat, MB/s, CPU."""
    m = statistics.median(times)
    return {f"{label}_s": times, f"median_ratio_{label}_over_cat": m / cat_m,
            f"{label}_MBps": nbytes / 1e6 / m, f"{label}_cpu_s_median": statistics.median(cpu),
            f"min_s_{label}": min(times)}


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


def capture(mem, fill, path, work):
    """Background-snapshot a blob guest of ``mem`` bytes, ``fill`` of it random, into path."""
    from pathlib import Path

    from bench.e2e import blob_layout, make_blob_files
    from qsnaptest.qemu import BlobGuest, capture_stream

    blobs = make_blob_files(Path(work) / "blobs", blob_layout(mem, fill), seed=3)
    try:
        with BlobGuest(memory=f"{mem >> 20}M", blobs=blobs) as vm:
            vm.wait_bios_done(timeout=120)
            accel = vm.accelerator()
            info = capture_stream(vm, path, "background", timeout=1800)
    finally:
        for b in blobs:
            b.path.unlink()
    return {"guest_ram": mem, "random_share": fill, "accel": accel,
            "capture_s": info.get("total-time", 0) / 1000}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=_size, default=2 << 30, help="pc.ram of the synthetic stream")
    ap.add_argument("--capture", type=_size, metavar="RAM",
                    help="capture a real stream from a QEMU blob guest with this much RAM")
    ap.add_argument("--fill", type=float, default=0.67, help="random share of --capture's guest")
    ap.add_argument("--stream", help="use this stream file (kept)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-shm", action="store_true",
                    help="do not also time the floors: qsnap save into /dev/shm, and parsing alone")
    ap.add_argument("--no-writeback", action="store_true",
                    help="do not also time 'qsnap save --cache=writeback'")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds of quiet (after a sync) between two timed commands")
    ap.add_argument("--rss-size", type=_size, default=4 << 30)
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="qsnap-bench-", dir=args.dir)
    source = {}
    if args.stream:
        stream = args.stream
        source["kind"] = f"file {stream}"
    else:
        stream = os.path.join(work, "vm.stream")
        if args.capture:
            source = capture(args.capture, args.fill, stream, work)
            source["kind"] = "captured from QEMU (background snapshot)"
        else:
            blocks = [(n, args.size if n == "pc.ram" else l) for n, l in DEFAULT_BLOCKS]
            with open(stream, "wb") as f:
                synth_stream(f, blocks=blocks, zero_share=0.5, zero_run=256, mode="background", seed=1)
            source["kind"] = "synthetic"
    nbytes = os.path.getsize(stream)
    subprocess.run(f"cat {stream} > /dev/null", shell=True, check=True)  # warm the page cache
    compile_qsnap_once(os.path.join(work, "pycache"), ["qsnap.cli", "qsnap.save", "qsnap.stream.reader"])
    qsnap = f"{sys.executable} -m qsnap"
    results = {"cat": [], "cat_pipe": [], "qsnap": [], "qsnap_cpu": [],
               "qsnap_wb": [], "qsnap_wb_cpu": [], "qsnap_shm": [], "qsnap_shm_cpu": [],
               "parse_only": [], "parse_only_cpu": []}
    out = os.path.join(work, "cat.out")
    img = os.path.join(work, "vm.qsnap")
    for r in range(args.rounds):
        contenders = [
            ("cat", f"cat {stream} > {out} && sync {out}", out),
            ("cat_pipe", f"cat {stream} | cat > {out} && sync {out}", out),
            ("qsnap", f"cat {stream} | {qsnap} save -q {img}", img),
        ]
        if os.path.isdir("/dev/shm") and not args.no_shm:
            contenders.append(("qsnap_shm", f"cat {stream} | {qsnap} save -q /dev/shm/qsnap-bench.img",
                               "/dev/shm/qsnap-bench.img"))
        if not args.no_shm:
            contenders.append(("parse_only", f"cat {stream} | {sys.executable} -c {PARSE_ONLY}", None))
        if not args.no_writeback:
            contenders.append(("qsnap_wb", f"cat {stream} | {qsnap} save -q --cache=writeback {img}", img))
        if r % 2:
            contenders.reverse()
        for name, cmd, path in contenders:
            w, cpu, _ = run_timed(cmd)
            results[name].append(w)
            if name != "cat" and name != "cat_pipe":
                results[name + "_cpu"].append(cpu)
            if path:
                os.unlink(path)
            # Let the disk settle: the unlink's discards (ext4 -o discard) and any
            # writeback would otherwise land on the next contender's clock.
            os.sync()
            time.sleep(args.settle)
    img = os.path.join(work, "big.qsnap")
    gen = (f"{sys.executable} -c \"import sys; from qsnap.stream.synth import synth_stream, DEFAULT_BLOCKS; "
           f"synth_stream(sys.stdout.buffer, blocks=[(n, {args.rss_size} if n == 'pc.ram' else l) "
           f"for n, l in DEFAULT_BLOCKS], zero_share=0.5, zero_run=256, mode='background', seed=2)\"")
    rss = peak_rss_of(f"{gen} | {qsnap} save -q {img}")
    os.unlink(img)
    if not args.stream:
        os.unlink(stream)
    shutil.rmtree(work, ignore_errors=True)
    cat_m = statistics.median(results["cat"])
    pipe_m = statistics.median(results["cat_pipe"])
    q_m = statistics.median(results["qsnap"])
    report = {
        "machine": machine(),
        "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
        "stream": source,
        "stream_bytes": nbytes,
        "cat_sync_s": results["cat"],
        "cat_pipe_sync_s": results["cat_pipe"],
        "qsnap_save_s": results["qsnap"],
        "median_ratio_qsnap_over_cat": q_m / cat_m,
        "median_ratio_qsnap_over_cat_pipe": q_m / pipe_m,
        "cat_MBps": nbytes / 1e6 / cat_m,
        "cat_pipe_MBps": nbytes / 1e6 / pipe_m,
        "qsnap_MBps": nbytes / 1e6 / q_m,
        "qsnap_cpu_s_median": statistics.median(results["qsnap_cpu"]),
        "peak_rss_MiB_4GiB_stream": rss,
    }
    for k in ("cat", "cat_pipe", "qsnap"):
        report[f"min_s_{k}"] = min(results[k])
    for key, label in (("parse_only", "parse_only"), ("qsnap_shm", "qsnap_into_dev_shm"),
                       ("qsnap_wb", "qsnap_writeback")):
        if results[key]:
            report.update(_figures(label, results[key], results[key + "_cpu"], cat_m, nbytes))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
