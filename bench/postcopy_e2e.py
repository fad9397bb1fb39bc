"""End-to-end restore timings with real QEMU: postcopy vs precopy qsnap load vs cat.

    python -m bench.postcopy_e2e [--memory 3G] [--data 2G] [--percent 0] [--dir DIR]

A blob guest (no OS) with DATA bytes of random data is saved once with
``qsnap save`` (background snapshot) while the raw stream is teed to a file.
Then, in the same run, three destinations (not paused, postcopy-ram on for
the postcopy one) restore it: ``exec:cat raw``, ``exec:qsnap load IMG`` and
``exec:qsnap load --postcopy=PCT IMG``.  For each: seconds from
migrate-incoming to the guest running and to migration completed.  Prints JSON.
"""
import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from qsnaptest import guests
from qsnaptest.qemu import BlobGuest, Qemu, QemuError, parse_size

ROOT = Path(__file__).resolve().parents[1]

PY = shlex.quote(sys.executable)


def qsnap(*a):
    return f"{PY} -m qsnap " + " ".join(shlex.quote(str(x)) for x in a)


def restore(memory, uri, postcopy=False, timeout=600):
    with Qemu(memory=memory, incoming=True, name="dst", qmp_timeout=120) as d:
        if postcopy:
            d.set_capabilities(postcopy_ram=True)
        t0 = time.monotonic()
        d.migrate_incoming(uri)
        t_run = t_done = None
        statuses = []
        while t_done is None:
            if not d.is_running():
                raise QemuError(f"destination died:\n{d.log_tail()}")
            info = d.query_migrate()
            st = info.get("status")
            if not statuses or statuses[-1] != st:
                statuses.append(st)
            if t_run is None and d.status() == "running":
                t_run = time.monotonic() - t0
            if st == "completed":
                t_done = time.monotonic() - t0
            elif st in ("failed", "cancelled"):
                raise QemuError(f"migration {st}: {info.get('error-desc')}")
            if time.monotonic() - t0 > timeout:
                raise QemuError("timeout")
        if t_run is None:
            deadline = time.monotonic() + 10
            while d.status() != "running" and time.monotonic() < deadline:
                time.sleep(0.005)
            t_run = time.monotonic() - t0
        ram = info.get("ram", {})
        return {"running_s": round(t_run, 4), "completed_s": round(t_done, 4),
                "statuses": statuses, "postcopy_requests": ram.get("postcopy-requests")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default="3G", help="guest RAM (default 3G)")
    ap.add_argument("--data", default="2G", help="random blob data in the guest (default 2G)")
    ap.add_argument("--percent", type=float, default=0, help="postcopy PCT (default 0)")
    ap.add_argument("--dir", help="work directory (default: a temporary one under /tmp)")
    args = ap.parse_args(argv)
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"]
                                            if os.environ.get("PYTHONPATH") else "")
    mem = parse_size(args.memory)
    data = parse_size(args.data)
    end = guests.blob_safe_end(mem)
    if mem >= 0xE0000000:
        end = min(end, 0xC0000000 - (17 << 20))
    chunk = 128 << 20   # random.randbytes limit
    layout = []
    addr = guests.BLOB_MIN_ADDR
    left = data
    while left:
        n = min(chunk, left)
        if addr + n > end:
            raise SystemExit(f"--data {args.data} does not fit below {end:#x} in a {args.memory} guest")
        layout.append((addr, n))
        addr += n
        left -= n
    work = Path(args.dir or tempfile.mkdtemp(prefix="qsnap-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    blobs = guests.make_blobs(work / "blobs", layout, seed=1)
    img, raw, stats = work / "guest.qsnap", work / "guest.stream", work / "stats.json"
    with BlobGuest(memory=args.memory, blobs=blobs, name="src") as vm:
        vm.wait_bios_done(timeout=120)
        vm.set_parameters(max_bandwidth=16 << 30)
        vm.set_capabilities(background_snapshot=True)
        t = time.monotonic()
        vm.migrate(f"exec:tee {shlex.quote(str(raw))} | {qsnap('save', '-q', img)}")
        vm.wait_migration(timeout=1800)
        save_s = time.monotonic() - t
    for p in (img, raw):   # warm the page cache the same way for every contender
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    out = {"memory": args.memory, "data": args.data, "percent": args.percent,
           "save_s": round(save_s, 3), "image_bytes": img.stat().st_size,
           "stream_bytes": raw.stat().st_size}
    out["cat"] = restore(args.memory, f"exec:cat {shlex.quote(str(raw))}")
    out["precopy"] = restore(args.memory, "exec:" + qsnap("load", "-q", img))
    out["postcopy"] = restore(args.memory, "exec:" + qsnap(
        "load", "-q", f"--postcopy={args.percent:g}", "--stats", stats, img), postcopy=True)
    out["postcopy"]["qsnap_stats"] = json.loads(stats.read_text())
    out["postcopy_vs_precopy_completion"] = round(
        out["postcopy"]["completed_s"] / out["precopy"]["completed_s"], 3)
    print(json.dumps(out, indent=2))
    if not args.dir:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
