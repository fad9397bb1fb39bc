"""Start-up cost of `qsnap load` and `qsnap save`: what they import before the first byte.

    python -m bench.startup [--rounds 9] [--tree DIR ...] [--image IMG]
    python -m bench.startup --cold [--size 2G] [--data 0,1536M] [--rounds 3] [--qemu 7.2] [--drop all|files]

Runs ``python -X importtime -m qsnap load -q IMG`` and ``... save -q OUT < STREAM``
(a small image made by ``qsnap demo``) ``--rounds`` times per tree, interleaved
(each ``--tree`` is a checkout with its built extension; default: this one),
and prints per command: the median and minimum of the summed import times, the
part spent in NumPy, and the qsnap modules imported.  Each round also runs
``python -m qsnap load -q IMG > /dev/null`` once per tree without -X importtime
(``--image``: that image, e.g. an empty guest's; default the demo's) and prints
its CPU time (user + sys, of the child) and wall time, median and minimum: on a
shared host the CPU time is the steadier figure.  The trees take turns, the
order reversed every other round.

``--cold``: what the start-up costs a real restore from a cold page cache.  For each
``--data`` size, a blob guest of ``--size`` RAM (KVM, the harness of bench.e2e:
``-device loader`` blobs of random data, none for 0) is saved once, stopped, through
``migrate "exec:tee raw.stream | qsnap save IMG"``; then, alternating the order every
round, ``migrate-incoming "exec:cat raw.stream"`` and ``"exec:qsnap load IMG"`` into a
fresh ``-incoming defer`` QEMU, the whole page cache dropped (``sync; echo 3 >
/proc/sys/vm/drop_caches``, root) after QEMU started and before the migration, timed
from ``migrate-incoming`` to status completed (bench.e2e.load_once; the guest's blobs
are checked after each load).  Each round also runs ``python -X importtime -m qsnap
load --stats`` to /dev/null once after the same drop: its wall time, the import time
and NumPy's part of it, and the engine's own time (open + emission).  Medians go
to stdout and ``bench/results/<--name>.json``.  Needs root, KVM, qemu-system-x86_64.
``--drop files`` evicts only the image and the raw stream (posix_fadvise DONTNEED)
before each load: the start-up of a host that has run Python and qsnap before.
The qsnap measured is the one ``pip install .`` leaves (``--install wheel``, the
default): a wheel built from this tree, installed into a fresh venv under the work
directory and run as ``VENV/bin/python -I -m qsnap``, so that the development
venv's editable-install finder (``site`` imports pathlib, importlib.util and
fnmatch for it, ~25 ms) is not counted; ``--install tree`` runs this checkout
through PYTHONPATH instead.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(tree, args, stdin_path=None, python=(sys.executable,)):
    """(total ms, numpy ms, qsnap modules) of one run's -X importtime report."""
    stdin = open(stdin_path or "/dev/null", "rb")
    with stdin:
        r = subprocess.run([*python, "-X", "importtime", "-m", "qsnap", *args], cwd=tree,
                           stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = [ln[len("import time:"):].split("|") for ln in r.stderr.splitlines()
            if ln.startswith("import time:") and "self [us]" not in ln]
    total = sum(int(re.sub(r"\D", "", a)) for a, _, _ in rows) / 1e3
    numpy = next((int(b) / 1e3 for _, b, c in rows if c.strip() == "numpy"), 0.0)
    return total, numpy, [c.strip() for _, _, c in rows if c.strip().startswith("qsnap")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="default 9 (--cold: 3)")
    p.add_argument("--tree", action="append", help="a qsnap checkout (default: this one)")
    p.add_argument("--cold", action="store_true", help="real QEMU loads from a dropped page cache")
    p.add_argument("--size", default="2G", help="--cold: guest RAM (default 2G)")
    p.add_argument("--data", default="0,1536M", help="--cold: random data in the guest, one case "
                   "each (default 0,1536M)")
    p.add_argument("--qemu", default="7.2", help="--cold: QEMU build (bench.e2e --qemu)")
    p.add_argument("--drop", choices=("all", "files"), default="all",
                   help="--cold: before each load drop the whole page cache (all: the interpreter "
                        "and qsnap's modules are read from disk too) or only the image and the raw "
                        "stream (files: a host that has run Python and qsnap before)")
    p.add_argument("--dir", default="/var/tmp", help="--cold: work directory on the disk to measure")
    p.add_argument("--name", default="startup-cold", help="--cold: results file name")
    p.add_argument("--install", choices=("wheel", "tree"), default="wheel",
                   help="--cold: run qsnap installed from a wheel of this tree into a fresh venv "
                        "(wheel: what `pip install .` leaves) or from this checkout (tree)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--image", help="the image the CPU-time runs load (default: the demo's)")
    a = p.parse_args(argv)
    if a.cold:
        return cold(a)
    a.rounds = a.rounds or 9
    trees = a.tree or [str(ROOT)]
    work = Path(tempfile.mkdtemp(prefix="qsnap-startup-"))
    from bench import compile_qsnap_once

    compile_qsnap_once(work / "pycache", ["qsnap.cli"])  # bytecode, as an install has it, for every tree:
    for t in trees:
        subprocess.run([sys.executable, "-c", "import qsnap.cli, qsnap.load, qsnap.save, qsnap.image.reader"],
                       cwd=t, check=True)
    subprocess.run([sys.executable, "-m", "qsnap", "demo", "--size", "32M", "--dir", str(work),
                    "--keep"], cwd=trees[0], check=True, capture_output=True)
    cmds = {"load": (["load", "-q", str(work / "vm.qsnap")], None),
            "save": (["save", "-q", str(work / "out.qsnap")], work / "vm.stream")}
    image = a.image or str(work / "vm.qsnap")
    runs = {(t, c): [] for t in trees for c in cmds}
    times = {t: [] for t in trees}
    for r in range(a.rounds):
        for t in (trees if r % 2 == 0 else trees[::-1]):
            for c, (args, stdin) in cmds.items():
                runs[(t, c)].append(imports(t, args, stdin))
            times[t].append(cpu_time(t, ["load", "-q", image]))
    for (t, c), rs in runs.items():
        tot = [r[0] for r in rs]
        npy = [r[1] for r in rs]
        print(f"{t} {c}: imports median {statistics.median(tot):.0f} ms (min {min(tot):.0f}), "
              f"numpy median {statistics.median(npy):.0f} ms (min {min(npy):.0f}); "
              f"{len(rs[-1][2])} qsnap modules: {' '.join(rs[-1][2])}")
    for t, rs in times.items():
        cpu, wall = [r[0] * 1e3 for r in rs], [r[1] * 1e3 for r in rs]
        print(f"{t} load -q {image} > /dev/null: CPU median {statistics.median(cpu):.0f} ms "
              f"(min {min(cpu):.0f}), wall median {statistics.median(wall):.0f} ms (min {min(wall):.0f}); "
              f"CPU ms by round {[round(v) for v in cpu]}")
    shutil.rmtree(work, ignore_errors=True)


def cpu_time(tree, args):
    """(CPU s: user + sys, wall s) of one ``python -m qsnap ARGS > /dev/null`` in ``tree``."""
    with open(os.devnull, "wb") as null:
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, "-m", "qsnap", *args], cwd=tree, stdin=subprocess.DEVNULL,
                             stdout=null)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"qsnap {' '.join(args)} in {tree} exited with {p.returncode}")
    return ru.ru_utime + ru.ru_stime, wall


# --- --cold: qsnap load against exec:cat from a dropped page cache -------------------------

def cold(a):
    from bench import compile_qsnap_once, e2e
    from qsnaptest.qemu import use_build

    if os.geteuid() != 0:
        sys.exit("bench.startup --cold drops the page cache: run it as root")
    e2e.DROP_ALL = a.drop == "all"
    e2e.BUILD = e2e.find_qemu(a.qemu)
    use_build(e2e.BUILD)
    work = Path(tempfile.mkdtemp(prefix="qsnap-startup-", dir=a.dir))
    mem = e2e.parse_size(a.size)
    out = {"time": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:], "drop": a.drop,
           "install": a.install, "qemu": e2e.BUILD.version,
           "machine_type": e2e.BUILD.machine("pc"), "cases": []}
    try:
        if a.install == "wheel":
            python = install_wheel(work)
        else:
            python = (sys.executable,)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
            compile_qsnap_once(work / "pycache", ["qsnap.cli", "qsnap.load", "qsnap.image.reader"])
        for data in (e2e.parse_size(d) for d in a.data.split(",") if d):
            out["cases"].append(_cold_case(mem, data, a.rounds or 3, work, a.timeout, python))
            _report_cold(out, a.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def install_wheel(work):
    """A wheel of this tree installed into a fresh venv under ``work``, as ``pip install .``
    leaves it (bytecode compiled by pip): the command that runs its Python, isolated (-I:
    neither the current directory nor PYTHON* variables reach its sys.path)."""
    wheels, venv = work / "wheel", work / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, cwd=work)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = (str(venv / "bin" / "python"), "-I")
    purelib = subprocess.run([*python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", purelib, *map(str, wheels.glob("qsnap-*.whl"))], check=True)
    subprocess.run([*python, "-c", "import qsnap.cli, qsnap.load, qsnap.image.reader"], check=True)
    return python


def _cold_case(mem, data, rounds, work, timeout, python):
    from bench import e2e

    d = work / f"{e2e.human(mem)}-{data >> 20}M"
    blobs = e2e.make_blob_files(d / "blobs", e2e.blob_layout(mem, data / mem), seed=data >> 20)
    img, raw = d / "vm.qsnap", d / "raw.stream"
    with e2e.guest(mem, [], "src", blobs=blobs) as vm:
        vm.wait_bios_done(timeout=120)
        vm.stop()
        vm.set_parameters(max_bandwidth=64 << 30)
        # the save is not measured: this tree's (a wheel's venv has no NumPy)
        vm.migrate(f"exec:tee {raw} | env PYTHONPATH={ROOT} {sys.executable} -m qsnap save -q {img}")
        e2e.wait_status(vm, ("completed",), time.monotonic(), timeout)
        vm.wait_no_descendants(timeout)
    case = {"mem": mem, "data": data, "stream_bytes": raw.stat().st_size, "image_bytes": img.stat().st_size,
            "loadavg_1min": round(os.getloadavg()[0], 2), "cat": [], "qsnap": [], "imports": []}
    e2e.log(f"{e2e.human(mem)} guest, {data >> 20} MiB data: stream {case['stream_bytes'] >> 20} MiB, "
            f"image {case['image_bytes'] >> 20} MiB")
    for r in range(rounds):
        for who in (("cat", "qsnap") if r % 2 == 0 else ("qsnap", "cat")):
            tf = d / f"time-{who}.txt"
            tf.unlink(missing_ok=True)
            case[who].append(e2e.load_once(who, None, mem, [], img, raw, tf, d / "stats.json", blobs, " ".join(python),
                                           timeout, [img, raw]))
        e2e.drop_caches([img, raw])
        ph = load_phases(img, d / "load-stats.json", python)
        case["imports"].append(ph)
        e2e.log(f"  qsnap load > /dev/null {ph['wall_s']:.3f} s: {'cold' if e2e.DROP_ALL else 'warm'} "
                f"imports {ph['total_ms']:.0f} ms (numpy {ph['numpy_ms']:.0f} ms), open + emission "
                f"{ph['load_s'] * 1e3:.0f} ms (page clusters {ph['page_s'] * 1e3:.0f} ms)")
    shutil.rmtree(d, ignore_errors=True)
    return case


def load_phases(img, stats_path, python):
    """Where one ``qsnap load IMG > /dev/null`` spends its time (-X importtime and
    --stats): wall s, summed imports and NumPy's part ms, the engine's own time
    from the image's open to the last byte s (load_s) and of it the page clusters
    (page_s); the rest of the wall time is the interpreter's start (site) and exit."""
    stats_path.unlink(missing_ok=True)
    t0 = time.monotonic()
    total, numpy, _ = imports(str(ROOT), ["load", "-q", "--stats", str(stats_path), str(img)],
                              python=python)
    wall = time.monotonic() - t0
    st = json.loads(stats_path.read_text())
    return {"wall_s": wall, "total_ms": total, "numpy_ms": numpy, "load_s": st["seconds"],
            "page_s": st["page_seconds"]}


def _report_cold(out, name):
    def med(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    for c in out["cases"]:
        cat, qs = med(c["cat"], "s"), med(c["qsnap"], "s")
        c["summary"] = {"cat_s": cat, "qsnap_s": qs, "qsnap_over_cat": qs / cat if cat and qs else None,
                        "cat_all": [r["s"] for r in c["cat"]], "qsnap_all": [r["s"] for r in c["qsnap"]],
                        "qsnap_cpu_s": med(c["qsnap"], "cpu_s"), "qsnap_rss_MiB": med(c["qsnap"], "rss_MiB"),
                        "imports_cold_ms": med(c["imports"], "total_ms"),
                        "numpy_cold_ms": med(c["imports"], "numpy_ms"),
                        "devnull_wall_s": med(c["imports"], "wall_s"),
                        "devnull_load_s": med(c["imports"], "load_s")}
        s = c["summary"]
        print(f"{c['mem'] >> 30} GiB guest, {c['data'] >> 20} MiB data: exec:cat {s['cat_s']:.3f} s "
              f"{[round(v, 3) for v in s['cat_all']]}, exec:qsnap load {s['qsnap_s']:.3f} s "
              f"{[round(v, 3) for v in s['qsnap_all']]}: ratio {s['qsnap_over_cat']:.2f}; "
              f"{'cold' if out['drop'] == 'all' else 'warm'} imports {s['imports_cold_ms']:.0f} ms "
              f"(numpy {s['numpy_cold_ms']:.0f} ms)")
        if s["devnull_wall_s"] is not None:
            print(f"  qsnap load > /dev/null {s['devnull_wall_s']:.3f} s: imports {s['imports_cold_ms']:.0f} ms, "
                  f"open + emission {s['devnull_load_s'] * 1e3:.0f} ms, interpreter start and exit "
                  f"{(s['devnull_wall_s'] - s['devnull_load_s']) * 1e3 - s['imports_cold_ms']:.0f} ms (medians)")
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
