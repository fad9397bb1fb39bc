"""Incremental images: size, save time and load time against full saves, in one run.

    python -m bench.incremental [--mem 2G] [--fill 0.5] [--change 0.05] [--rounds 3]
                                [--dir DIR] [--out bench/results/incremental.json]
    python -m bench.incremental --load-only CHAIN_DIR [--rounds 5] [--out ...]

A blob guest (KVM where available) of --mem RAM, --fill of it random data in
blobs of --change of the data each (the rest zero), is background-snapshotted
into ``exec:cat > s0`` (level 0).  Levels 1..4 are the same guest with one
blob each rewritten with new random data: --change of the non-zero RAM
changed per level.  Their streams are captured the same way.  Then:

  size:  the level 1 child (``qsnap save --parent l0``) against the parent l0
         (target: <= 8 %);
  save:  ``cat s1 | qsnap save full`` and ``cat s1 | qsnap save --parent l0 child``,
         alternated ROUNDS times, fsync'd (target: incremental <= 1.1 x full);
  load:  ``qsnap load l4 > /dev/null`` through the 5-deep chain l0 <- l1 <- ... <- l4
         against the flattened image (``qsnap flatten`` where it exists, else a full
         save of s4: the same RAM in one file), alternated ROUNDS times
         (target: <= 1.1 x).  Needs a reader that follows backing chains.
         Each contender is loaded once untimed first, and the rounds alternate
         which goes first (ABBA): the flattened image, written last, is
         otherwise the one still in the host's cache, and the one loaded
         second in a round follows the other's reads.  CPU seconds (qsnap and
         the cat behind it) are reported beside the wall times.

--load-only CHAIN_DIR runs only the load comparison, on an existing chain
l0.qsnap <- ... <- l4.qsnap in CHAIN_DIR (left in place; the flattened image
goes to --dir and is removed).

The streams and images stay in the page cache (warm: the parent of an
incremental save is normally the image just written).  Streams and blobs go to
--shm (tmpfs); images to --dir.  Everything made is removed at the end.
"""
import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.save_vs_cat import _size, machine, run_timed

MiB = 1 << 20
LEVELS = 5


def log(msg):
    print(f"[incremental] {msg}", file=sys.stderr, flush=True)


def qsnap(*args):
    return " ".join([shlex.quote(sys.executable), "-m", "qsnap"] + [shlex.quote(str(a)) for a in args])


def layout(mem, fill, change):
    """[(addr, size)]: blobs of ``change`` x the data each, 1 MiB aligned, in the RAM
    SeaBIOS leaves alone below 4 GiB."""
    from qsnaptest import guests

    total = int(mem * fill) // MiB * MiB
    size = max(MiB, int(total * change) // MiB * MiB)
    addr, end, out = guests.BLOB_MIN_ADDR, guests.blob_safe_end(min(mem, 3 << 30)), []
    while total >= size and addr + size <= end:
        out.append((addr, size))
        addr += size
        total -= size
    return out


def write_blob(path, size, seed):
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for off in range(0, size, 64 * MiB):
            f.write(rng.bytes(min(64 * MiB, size - off)))
    return path


def capture_levels(mem, lay, shm, levels):
    """Stream files of levels 0..levels-1: level k rewrites blob k-1 (seed 100 + k)."""
    from qsnaptest import guests
    from qsnaptest.qemu import BlobGuest, capture_stream

    base = [guests.Blob(write_blob(shm / f"blob{i}.bin", size, i), addr, b"")
            for i, (addr, size) in enumerate(lay)]
    streams, accel = [], None
    for level in range(levels):
        blobs = list(base)
        for k in range(1, level + 1):
            addr, size = lay[k - 1]
            p = shm / f"blob{k - 1}-l{k}.bin"
            if not p.exists():
                write_blob(p, size, 100 + k)
            blobs[k - 1] = guests.Blob(p, addr, b"")
        path = shm / f"s{level}.stream"
        with BlobGuest(memory=f"{mem >> 20}M", blobs=blobs) as vm:
            vm.wait_bios_done(timeout=120)
            accel = vm.accelerator()
            capture_stream(vm, path, "background", timeout=1800)
        streams.append(path)
        log(f"level {level}: stream {path.stat().st_size / MiB:.0f} MiB")
    for p in shm.glob("blob*.bin"):
        p.unlink()
    return streams, accel


def save(stream, img, *opts):
    return run_timed(f"cat {shlex.quote(str(stream))} | {qsnap('save', '-q', *opts, img)}")


def flattened(tip, work):
    """The RAM of ``tip`` in one image (`qsnap flatten`)."""
    out = work / "flat.qsnap"
    subprocess.run(qsnap("flatten", tip, out), shell=True, check=True)
    return out, "qsnap flatten"


def alternate(rounds, contenders):
    """{name: [seconds]}: the contenders run in turn, ROUNDS times."""
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            times[name].append(run()[0])
    return times


def abba(rounds, contenders):
    """({name: [wall s]}, {name: [CPU s]}): one untimed run of each contender, then
    ROUNDS rounds, every other one in reverse order (see the module docstring)."""
    for run in contenders.values():
        run()
    wall = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            w, c, _ = contenders[name]()
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def compare_loads(rounds, tip, flat, how):
    """The load part of the report: ``qsnap load`` of the chain's tip against the
    flattened image."""
    wall, cpu = abba(rounds, {
        "flattened": lambda: run_timed(f"{qsnap('load', flat)} | cat > /dev/null"),
        "chain": lambda: run_timed(f"{qsnap('load', tip)} | cat > /dev/null"),
    })
    med = statistics.median
    return {"flattened_by": how, "load_s": wall, "load_cpu_s": cpu,
            "chain_over_flattened_load": med(wall["chain"]) / med(wall["flattened"]),
            "chain_over_flattened_load_cpu": med(cpu["chain"]) / med(cpu["flattened"]),
            "load_ratio_per_round": [c / f for c, f in zip(wall["chain"], wall["flattened"])]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem", type=_size, default=2 << 30)
    ap.add_argument("--fill", type=float, default=0.5)
    ap.add_argument("--change", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the images go (default: a temp dir)")
    ap.add_argument("--shm", default="/dev/shm", help="where blobs and streams go")
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    ap.add_argument("--load-only", default=None, metavar="CHAIN_DIR",
                    help="only compare loads, of the chain l0..l4.qsnap in CHAIN_DIR")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="qsnap-bench-inc-", dir=args.dir))
    shm = Path(tempfile.mkdtemp(prefix="qsnap-bench-inc-", dir=args.shm))
    t0 = time.monotonic()
    try:
        report = load_only(args, work) if args.load_only else run(args, work, shm)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def run(args, work, shm):
    lay = layout(args.mem, args.fill, args.change)
    levels = LEVELS
    streams, accel = capture_levels(args.mem, lay, shm, levels)
    imgs = [work / f"l{k}.qsnap" for k in range(levels)]
    save(streams[0], imgs[0])
    for k in range(1, levels):
        save(streams[k], imgs[k], "--parent", imgs[k - 1])
    sizes = [p.stat().st_size for p in imgs]
    log(f"chain sizes (MiB): {[round(s / MiB, 1) for s in sizes]}")

    full, child = work / "full.qsnap", work / "child.qsnap"
    save_t = alternate(args.rounds, {
        "full": lambda: save(streams[1], full),
        "incremental": lambda: save(streams[1], child, "--parent", imgs[0]),
    })
    report = {
        "machine": machine(), "accel": accel, "guest_ram": args.mem,
        "nonzero_bytes": sum(s for _, s in lay), "changed_per_level": lay[0][1],
        "changed_share": lay[0][1] / sum(s for _, s in lay),
        "stream_bytes": [p.stat().st_size for p in streams],
        "image_bytes": sizes, "full_save_bytes": full.stat().st_size,
        "child_over_parent": sizes[1] / sizes[0],
        "save_s": save_t,
        "incremental_over_full_save": statistics.median(save_t["incremental"]) /
        statistics.median(save_t["full"]),
    }
    for p in streams[:-1]:
        p.unlink()
    flat, how = flattened(imgs[-1], work)
    report.update(compare_loads(args.rounds, imgs[-1], flat, how))
    return report


def load_only(args, work):
    """The load comparison alone, on the chain in --load-only."""
    imgs = [Path(args.load_only) / f"l{k}.qsnap" for k in range(LEVELS)]
    missing = [str(p) for p in imgs if not p.exists()]
    if missing:
        raise SystemExit(f"bench.incremental: error: no chain image {missing[0]}")
    flat, how = flattened(imgs[-1], work)
    report = {"machine": machine(), "chain": str(args.load_only),
              "image_bytes": [p.stat().st_size for p in imgs]}
    report.update(compare_loads(args.rounds, imgs[-1], flat, how))
    return report


if __name__ == "__main__":
    sys.exit(main())
