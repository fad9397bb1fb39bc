"""Time to useful work after a restore, with and without a recorded working set.

    python -m bench.working_set [--rounds 3] [--data-mb 64] [--memory 256M] [--dir DIR]

A live Linux guest (busybox initramfs, TCG) keeps DATA_MB of random bytes in
tmpfs (and, with ``--cold-mb``, that much more that it never reads again) and
loops "md5sum the file; print ``ws-mark N`` on ttyS0; sleep 0.2".  It is saved
once (background snapshot, raw stream teed to a file) right after a mark.  One
postcopy restore with ``--record-working-set --record-window=S`` records the pages
the guest touches in its first S seconds (never throttled: a rate limiter that
sleeps per chunk would make every requested page wait for it).  Then, in each
round and in the same run, fresh destinations (running, not paused) restore the
snapshot:

    cat            exec:cat RAW                       (QEMU's own stream, baseline)
    precopy        exec:qsnap load IMG
    postcopy       exec:qsnap load --postcopy=0 --prefetch=none IMG
    postcopy+ws    exec:qsnap load --postcopy=0 IMG   (working set right after the switch)
    postcopy+ws-before  ... --prefetch=before         (working set before the switch)

For each: seconds from ``migrate_incoming`` to the guest running (query-status),
to the first ``ws-mark`` on the destination's console (the guest finished
checksumming its file), and to the migration's completion.  The variants take
turns, the order reversed every other round.  With ``--throttle MB/s`` every stream (cat's too)
passes through a rate limiter: a slow disk or link, where the background pass
cannot outrun the guest and the order of the pages matters.  Prints JSON (and
writes it to --out).
"""
import argparse
import gzip
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qsnaptest import guests
from qsnaptest.qemu import LinuxGuest
from qsnaptest.tools import qsnap_env, save_with_tee, slow_pipe

ROOT = Path(__file__).resolve().parents[1]
PY = shlex.quote(sys.executable)
MARK = "ws-mark"

# /init of the benchmark guest: like the test guest's, but its loop reads the
# whole file (a task touching a known amount of memory) and prints a mark.
INIT = guests.INIT_PREAMBLE + r"""mount -t tmpfs -o size={tmpfs_mb}m tmp /tmp
dd if=/dev/urandom of=/tmp/data bs=1M count={data_mb} 2>/dev/null
[ {cold_mb} -gt 0 ] && dd if=/dev/urandom of=/tmp/cold bs=1M count={cold_mb} 2>/dev/null
echo "qsnap-guest ready" > /dev/ttyS0
n=0
while :; do
  s=$(md5sum /tmp/data)
  echo "{mark} $n ${{s%% *}}" > /dev/ttyS0
  n=$((n + 1))
  usleep 200000
done
"""

VARIANTS = {
    "cat": None,
    "precopy": ["load", "-q"],
    "postcopy": ["load", "-q", "--postcopy=0", "--prefetch=none"],
    "postcopy+ws": ["load", "-q", "--postcopy=0", "--prefetch=after"],
    "postcopy+ws-before": ["load", "-q", "--postcopy=0", "--prefetch=before"],
}


def qsnap(*a):
    return f"{PY} -m qsnap " + " ".join(shlex.quote(str(x)) for x in a)


def build_initrd(dest, data_mb, cold_mb=0):
    """The benchmark guest's initramfs (busybox-static + the /init above); ``cold_mb``
    of random data it keeps in tmpfs beside the task's file and never reads again."""
    busybox = shutil.which("busybox")
    if not busybox:
        raise SystemExit("busybox not found (install busybox-static)")
    init = INIT.format(data_mb=data_mb, cold_mb=cold_mb, tmpfs_mb=data_mb + cold_mb + 8, mark=MARK)
    d, f = 0o040755, 0o100755
    entries = [("bin", d, None), ("dev", d, None), ("proc", d, None), ("sys", d, None),
               ("tmp", d, None), ("bin/busybox", f, Path(busybox).read_bytes()),
               ("init", f, init.encode())]
    dest.write_bytes(gzip.compress(guests._cpio_newc(entries), compresslevel=6, mtime=0))
    return dest


def marks(vm):
    return [ln for ln in vm.console().splitlines() if ln.startswith(MARK)]


def wait_mark(vm, after, timeout):
    deadline = time.monotonic() + timeout
    while len(marks(vm)) <= after:
        if not vm.is_running() or time.monotonic() > deadline:
            raise SystemExit(f"no {MARK} from {vm.name}; console:\n{vm.console()[-2000:]}")
        time.sleep(0.01)
    return marks(vm)[after]


def save(kernel, initrd, memory, img, raw):
    with LinuxGuest(kernel, initrd, memory=memory, env=qsnap_env(), name="src") as vm:
        n = len(marks(vm))
        wait_mark(vm, n + 1, 600)
        save_with_tee(vm, img, raw, timeout=600)
        return marks(vm)[-1]


def restore(kernel, initrd, memory, uri, postcopy, timeout=900):
    """(seconds to the first mark, seconds to completion, the mark, seconds to the guest
    running) of one restore; console, run state and migration status are polled together."""
    with LinuxGuest(kernel, initrd, memory=memory, incoming=True, env=qsnap_env(),
                    name="dst", qmp_timeout=120) as d:
        if postcopy:
            d.set_capabilities(postcopy_ram=True)
        t0 = time.monotonic()
        d.migrate_incoming(uri)
        t_mark = t_done = t_run = None
        while t_mark is None or t_done is None:
            t = time.monotonic() - t0
            if t > timeout or not d.is_running():
                raise SystemExit(f"restore stuck or failed; console:\n{d.console()[-2000:]}\n"
                                 f"{d.log_tail()}")
            if t_run is None and d.status() == "running":
                t_run = t
            if t_mark is None and marks(d):
                t_mark = t
            if t_done is None:
                st = d.query_migrate().get("status")
                if st == "completed":
                    t_done = t
                elif st == "failed":
                    raise SystemExit(f"restore failed:\n{d.log_tail()}")
            time.sleep(0.01)
        mark = marks(d)[0]
        d.wait_no_descendants(timeout=120)
    return t_mark, t_done, mark, t_run


def run(args):
    work = Path(args.dir or tempfile.mkdtemp(prefix="qsnap-ws-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    kernel = guests.kernel_path()
    initrd = build_initrd(work / "ws-initrd.cpio.gz", args.data_mb, args.cold_mb)
    img, raw = work / "ws.qsnap", work / "ws.stream"
    src_mark = save(kernel, initrd, args.memory, img, raw)
    pipe = ""
    if args.throttle:
        chunk = 256 << 10
        pipe = " | " + slow_pipe(chunk, chunk / (args.throttle * 1e6))
    rec = restore(kernel, initrd, args.memory,
                  "exec:" + qsnap("load", "-q", "--postcopy=0", "--record-working-set",
                                  f"--record-window={args.record_window}", img),
                  True)
    info = json.loads(os.popen(qsnap("info", "--output=json", img)).read())
    results = {k: [] for k in VARIANTS}
    for r in range(args.rounds):
        for name, opts in list(VARIANTS.items())[::(-1 if r % 2 else 1)]:
            uri = (f"exec:cat {shlex.quote(str(raw))}" if opts is None
                   else "exec:" + qsnap(*opts, img)) + pipe
            t_mark, t_done, mark, t_run = restore(kernel, initrd, args.memory, uri, "--postcopy" in str(opts))
            results[name].append({"to_mark": t_mark, "to_completed": t_done, "mark": mark,
                                  "to_running": t_run})
            print(f"round {r + 1} {name:20s} running {t_run:.3f} s, mark {t_mark:.2f} s, "
                  f"completed {t_done:.2f} s", file=sys.stderr, flush=True)
    med = {k: statistics.median(r["to_mark"] for r in v) for k, v in results.items()}
    out = {
        "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname()),
                    "load_avg_at_end": os.getloadavg()},
        "guest": {"memory": args.memory, "data_mb": args.data_mb, "cold_mb": args.cold_mb, "accel": "tcg"},
        "throttle_mb_s": args.throttle, "record_window": args.record_window,
        "source_mark": src_mark, "working_set": info["working_set"],
        "recording_restore": {"to_mark": rec[0], "to_completed": rec[1]},
        "rounds": args.rounds, "results": results,
        "median_to_mark": med,
        "median_to_running": {k: statistics.median(r["to_running"] for r in v) for k, v in results.items()},
        "ratio_to_cat": {k: v / med["cat"] for k, v in med.items()},
        "ratio_to_postcopy": {k: v / med["postcopy"] for k, v in med.items()},
        "ratio_to_precopy": {k: v / med["precopy"] for k, v in med.items()},
    }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-mb", type=int, default=64)
    p.add_argument("--cold-mb", type=int, default=0,
                   help="MiB of random data the guest also keeps in tmpfs and never reads "
                        "during its task: the cold memory any long-running VM has (default 0)")
    p.add_argument("--memory", default="256M")
    p.add_argument("--throttle", type=float, default=0.0, metavar="MB/s",
                   help="pass every stream through a rate limiter (0: none)")
    p.add_argument("--record-window", type=float, default=10.0, metavar="SECONDS",
                   help="--record-window of the recording restore (default 10)")
    p.add_argument("--dir")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    out = run(args)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
