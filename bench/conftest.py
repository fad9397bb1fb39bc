"""pytest plumbing for the micro benchmarks in bench/.

    python -m pytest bench -q                 # all micro benchmarks, ~3-5 min
    QSNAP_BENCH_MIB=256 python -m pytest bench -q
    QSNAP_BENCH_NAME=micro-r2 python -m pytest bench -q   # results in micro-r2.{md,json}

Files named ``bench_*.py`` are collected here (the default ``python -m pytest``
run only looks in tests/).  Every benchmark records its bytes and the median
time of its rounds with :func:`record`; at the end of the session a table of
GB/s, with each figure beside its physical reference measured on the same bytes
in the same run, is printed and written to bench/results/micro.{md,json}
(QSNAP_BENCH_NAME: another base name, so that an earlier run stays).
"""
import json
import os
import platform
import statistics
import time
from pathlib import Path

import pytest

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_RESULTS = []


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def record(benchmark, name, nbytes, *, ref=None, target_gbps=None, note=""):
    """Register one result: ``name`` moved ``nbytes`` per round (median of rounds).

    ``ref``: name of the physical reference measured on the same bytes.
    """
    st = benchmark.stats.stats
    sec = st.median
    gbps = nbytes / sec / 1e9
    benchmark.extra_info.update({"bytes": nbytes, "GB/s": round(gbps, 3)})
    _RESULTS.append({"name": name, "bytes": nbytes, "median_s": sec, "min_s": st.min,
                     "rounds": st.rounds, "GB/s": gbps, "ref": ref, "target_GB/s": target_gbps,
                     "note": note})
    return gbps


def _table():
    by_name = {r["name"]: r for r in _RESULTS}
    lines = ["| benchmark | MB | median s | GB/s | reference | ref GB/s | ratio | target | note |",
             "|---|---:|---:|---:|---|---:|---:|---|---|"]
    for r in _RESULTS:
        ref = by_name.get(r["ref"]) if r["ref"] else None
        ratio = f"{r['GB/s'] / ref['GB/s']:.2f}" if ref else ""
        tgt = ""
        if r["target_GB/s"]:
            tgt = f"≥ {r['target_GB/s']} GB/s: {'met' if r['GB/s'] >= r['target_GB/s'] else 'MISSED'}"
        lines.append(f"| {r['name']} | {r['bytes'] / 1e6:.0f} | {r['median_s']:.3f} | {r['GB/s']:.2f} "
                     f"| {r['ref'] or ''} | {ref['GB/s'] if ref else 0:.2f} | {ratio} | {tgt} | {r['note']} |"
                     .replace("| 0.00 |", "|  |"))
    return "\n".join(lines)


def _machine():
    cpu = platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores, {cpu}, Linux {platform.release()}, Python {platform.python_version()}, "
            f"1-min load average at the end {os.getloadavg()[0]:.1f}")


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    table = _table()
    terminalreporter.write_sep("=", "qsnap micro benchmarks (median of rounds, same run)")
    terminalreporter.write_line(table)
    if os.environ.get("QSNAP_BENCH_NO_WRITE"):
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    name = os.environ.get("QSNAP_BENCH_NAME") or "micro"
    (RESULTS_DIR / f"{name}.md").write_text(
        f"# qsnap micro benchmarks\n\n{stamp}; {_machine()}\n\n"
        f"Median of the rounds of each benchmark; ratio = GB/s / reference GB/s, same run.\n\n"
        f"{table}\n")
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(
        {"time": stamp, "machine": _machine(), "results": _RESULTS,
         "median_note": "median_s is the median of rounds"}, indent=1))


@pytest.fixture(scope="session")
def tmpfs_dir(tmp_path_factory):
    """A directory on tmpfs (/dev/shm) if there is one, else a temp dir."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        import tempfile
        import shutil
        d = Path(tempfile.mkdtemp(prefix="qsnap-bench-", dir="/dev/shm"))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("tmpfs")


def median(xs):
    return statistics.median(xs)
