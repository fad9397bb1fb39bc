"""Postcopy page-request service time against a live Linux guest (real QEMU 7.2).

    python -m bench.postcopy_requests [--rounds 3]

The blob guests of ``bench.e2e`` run no code, so they fault in no pages; this
boots the busybox Linux guest of the integration tests (TCG), saves it with
``qsnap save`` (background snapshot), then restores it ROUNDS times with
``qsnap load --postcopy=0 --stats=F`` into a running (not ``-S``) destination
and reports, per round, time to hand-over, pages requested and the service
time percentiles (request read -> page written) from qsnap's own stats.
Results: bench/results/postcopy-requests.{json,md}.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    from qsnaptest import guests
    from qsnaptest.qemu import LinuxGuest
    from qsnaptest.tools import postcopy_restore, save_with_tee

    files = guests.linux_guest_files()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="qsnap-pcreq-") as d:
        img, raw = Path(d) / "linux.qsnap", Path(d) / "linux.stream"
        with LinuxGuest(*files) as vm:
            vm.wait_ticks(2, timeout=180)
            save_with_tee(vm, img, raw)
        for r in range(args.rounds):
            stats = Path(d) / f"stats{r}.json"
            with LinuxGuest(*files, incoming=True, name=f"pc{r}") as b:
                t = time.monotonic()
                postcopy_restore(b, img, 0, stats=stats)
                done = time.monotonic() - t
                b.wait_ticks(1, timeout=60)
            s = json.loads(stats.read_text())
            rounds.append({"handover_s": s["handover_seconds"], "completion_s": done,
                           "requests": s["requests"], "pages_requested": s["pages_requested"],
                           **{f"{k}_ms": v for k, v in s["service_ms"].items()}})
            print(json.dumps(rounds[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "postcopy-requests.json"), "w") as f:
        json.dump({"rounds": rounds, "loadavg": os.getloadavg()}, f, indent=2)
    keys = [k for k in rounds[0] if k.endswith("_ms")]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    def med(k):
        vals = [r[k] for r in rounds if r[k] is not None]
        return statistics.median(vals) if vals else None
    lines = ["# Postcopy request service time, live Linux guest (256 MiB, TCG, --postcopy=0)", "",
             f"`python -m bench.postcopy_requests --rounds {args.rounds}`; load average "
             f"{os.getloadavg()[0]:.1f} at the end.", "",
             "| round | hand-over s | completion s | requests | " + " | ".join(keys) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(keys)]
    for i, r in enumerate(rounds):
        lines.append(f"| {i} | {r['handover_s']:.3f} | {r['completion_s']:.2f} | {r['requests']} | "
                     + " | ".join(fmt(r[k], ".2f") for k in keys) + " |")
    lines.append(f"| median | {statistics.median(r['handover_s'] for r in rounds):.3f} | "
                 f"{statistics.median(r['completion_s'] for r in rounds):.2f} | "
                 f"{statistics.median(r['requests'] for r in rounds):.0f} | "
                 + " | ".join(fmt(med(k), ".2f") for k in keys) + " |")
    with open(os.path.join(args.out, "postcopy-requests.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
