"""Start-up cost of `qsnap load` and `qsnap save`: what they import before the first byte.

    python -m bench.startup [--rounds 9] [--tree DIR ...]

Runs ``python -X importtime -m qsnap load -q IMG`` and ``... save -q OUT < STREAM``
(a small image made by ``qsnap demo``) ``--rounds`` times per tree, interleaved
(each ``--tree`` is a checkout with its built extension; default: this one),
and prints per command: the median and minimum of the summed import times, the
part spent in NumPy, and the qsnap modules imported.
"""
import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(tree, args, stdin_path=None):
    """(total ms, numpy ms, qsnap modules) of one run's -X importtime report."""
    stdin = open(stdin_path or "/dev/null", "rb")
    with stdin:
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "qsnap", *args], cwd=tree,
                           stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = [ln[len("import time:"):].split("|") for ln in r.stderr.splitlines()
            if ln.startswith("import time:") and "self [us]" not in ln]
    total = sum(int(re.sub(r"\D", "", a)) for a, _, _ in rows) / 1e3
    numpy = next((int(b) / 1e3 for _, b, c in rows if c.strip() == "numpy"), 0.0)
    return total, numpy, [c.strip() for _, _, c in rows if c.strip().startswith("qsnap")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--tree", action="append", help="a qsnap checkout (default: this one)")
    a = p.parse_args(argv)
    trees = a.tree or [str(ROOT)]
    work = Path(tempfile.mkdtemp(prefix="qsnap-startup-"))
    subprocess.run([sys.executable, "-m", "qsnap", "demo", "--size", "32M", "--dir", str(work),
                    "--keep"], cwd=trees[0], check=True, capture_output=True)
    cmds = {"load": (["load", "-q", str(work / "vm.qsnap")], None),
            "save": (["save", "-q", str(work / "out.qsnap")], work / "vm.stream")}
    runs = {(t, c): [] for t in trees for c in cmds}
    for _ in range(a.rounds):
        for t in trees:
            for c, (args, stdin) in cmds.items():
                runs[(t, c)].append(imports(t, args, stdin))
    for (t, c), rs in runs.items():
        tot = [r[0] for r in rs]
        npy = [r[1] for r in rs]
        print(f"{t} {c}: imports median {statistics.median(tot):.0f} ms (min {min(tot):.0f}), "
              f"numpy median {statistics.median(npy):.0f} ms (min {min(npy):.0f}); "
              f"{len(rs[-1][2])} qsnap modules: {' '.join(rs[-1][2])}")


if __name__ == "__main__":
    main()
