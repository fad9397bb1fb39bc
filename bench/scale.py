"""Peak memory and time of `qsnap save`, `load`, `check`, `info` and `export` against the guest's size.

    python -m bench.scale [--case all-2G ...] [--tree DIR ...] [--dir DIR] [--out NAME]
                          [--repeat N] [--export] [--postcopy] [--margin GIB]
    python -m bench.scale --plan     # load's and check's cluster plans alone, 4 GiB..1 TiB all-data

Each case is a synthetic background-snapshot stream (bench/scale_gen.c, compiled
here: a file header, configuration and MEM_SIZE from qsnap.stream.writer, then
RAM PART sections written by C into a pipe, then synth's device state), so no
stream file of the guest's size is ever written.  Per case and tree (a checkout
with its built extension; default: this one) it runs, under /usr/bin/time:

  save:  scale_gen ... | python -m qsnap save -q IMG
  load:  python -m qsnap load -q IMG > /dev/null
  check: python -m qsnap check IMG
  info:  python -m qsnap info IMG
  export: python -m qsnap export -q --format=F IMG OUT   (with --export: raw, then elf;
          each OUT deleted at once)
  postcopy: python -m qsnap load --postcopy=10 -q IMG   (with --postcopy)

and records the peak RSS (VmHWM, /usr/bin/time's %M), the wall time and the
CPU time (user + system), then deletes the image at once (a 16 GiB all-data
guest makes a 16 GiB image).  With --repeat N the list of cases runs N times,
one case after the other (A B A B: on a shared host the load drifts, and
alternating spreads it over both); the linearity table compares cases of the
same density whose guests differ 16-fold (all-4G / all-64G, sparse-64G /
sparse-1T), per GiB of stream, medians over the repeats.
The postcopy load talks to a simulated destination in this process
(postcopy_peer: page requests spread over the guest, the stream read to its
end and dropped, then SHUT, as tests/unit/test_postcopy.py's FakeDest does),
so its VmHWM is the engine's own.
Case "qemu-64G" is a real QEMU (qsnaptest blob guest under KVM, ``-m 64G``, a
64 MiB random blob; untouched RAM costs the host nothing and QEMU sends it as
ZERO records): ``exec:`` save of a background snapshot, ``exec:`` load into a
fresh ``-incoming defer`` QEMU (the blob checked there), check, info.
--plan builds load's and check's cluster plans of all-data guests up to 1 TiB
from a stand-in for the image reader's cluster map, in a process each, and
reports their peak RSS: no image of that size fits a test host's disk.
Results go to bench/results/scale-NAME.json (rewritten after each row: a long
run cut short keeps what it measured) and, at the end, scale-NAME.md; --plan's
to scale-plan-NAME.json.
"""
import argparse
import datetime
from functools import partial
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import evict_file

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30
PS = 4096
SECTION_ID = 2
PART_PAGES = 4096   # as scale_gen.c

# name -> (guest bytes, every n-th MiB holds data: the image is 1/n of the guest)
CASES = {
    "all-2G": (2 * GiB, 1),
    "all-4G": (4 * GiB, 1),
    "all-8G": (8 * GiB, 1),
    "all-16G": (16 * GiB, 1),
    "all-64G": (64 * GiB, 1),         # a 64 GiB image
    "quarter-64G": (64 * GiB, 4),     # a 64 GiB image (every cluster holds some data)
    "sparse-64G": (64 * GiB, 1024),   # sparse-1T's density at 1/16 of its size
    "sparse-1T": (1024 * GiB, 1024),  # 1 GiB of data, a 2 GiB image
    "qemu-64G": (64 * GiB, None),
    "qemu-2G": (2 * GiB, None),   # a quick check of the real-QEMU harness
}


def build_gen(tmp):
    exe = Path(tmp) / "scale_gen"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "bench" / "scale_gen.c")], check=True)
    return exe


def stream_ends(tmp, size):
    """Prefix (header, configuration, RAM START + MEM_SIZE) and suffix (device state) files."""
    sys.path.insert(0, str(ROOT))
    from qsnap.stream.events import RamBlock
    from qsnap.stream.synth import _device_state
    from qsnap.stream.writer import StreamWriter

    pre, suf = Path(tmp) / "prefix", Path(tmp) / "suffix"
    with open(pre, "wb") as f:
        w = StreamWriter(f, page_size=PS, footers=True)
        w.header()
        w.configuration("pc-i440fx-7.2")
        w.section_start(SECTION_ID, "ram", 0, 4)
        w.mem_size([RamBlock("pc.ram", size)])
        w.eos()
        w.footer(SECTION_ID)
    suf.write_bytes(_device_state(PS, True, 0, SECTION_ID, True))
    return pre, suf


def stream_bytes(pre, suf, size, every):
    """Bytes scale_gen writes for this guest (to report time per GiB of stream)."""
    n = size // PS
    data = sum(min(256, n - p) for p in range(0, n, 256 * every))   # scale_gen's RUN_PAGES
    sections = (n + PART_PAGES - 1) // PART_PAGES
    records = n * 8 + data * PS + (n - data) + sections * (1 + len("pc.ram"))
    return pre.stat().st_size + suf.stat().st_size + records + sections * (5 + 8 + 5)


def timed(cmd, tree, stdin=None, stdout=subprocess.DEVNULL):
    """(peak RSS MiB, wall seconds, CPU seconds) of one command under /usr/bin/time."""
    r = subprocess.run(time_cmd(cmd), cwd=tree, env=tree_env(tree), stdin=stdin,
                       stdout=stdout, stderr=subprocess.PIPE, text=True)
    return time_result(cmd, tree, r.returncode, r.stderr)


def time_cmd(cmd):
    return ["/usr/bin/time", "-f", TIME_FORMAT, *cmd]


def tree_env(tree):
    return dict(os.environ, PYTHONPATH=str(tree))


TIME_FORMAT = "%M %e %U %S"   # peak RSS KiB, wall, user and system seconds


def time_result(cmd, tree, status, stderr):
    """(peak RSS MiB, wall seconds, CPU seconds) from /usr/bin/time's last line of ``stderr``."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if status != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} in {tree} failed: {stderr.strip()[-2000:]}")
    return parse_time(last)


def parse_time(line):
    kib, wall, user, system = line.split()[-4:]
    return int(kib) / 1024, float(wall), float(user) + float(system)


PEER_REQUESTS = 16   # page requests the simulated destination makes, spread over the guest


def rp_message(typ, payload):
    """A return-path message (migration.c: migrate_send_rp_message)."""
    return struct.pack(">HH", typ, len(payload)) + payload


def postcopy_peer(size):
    """The simulated destination of a postcopy load of a one-block ``size``-byte guest:
    (run(stream_fd, return_path_fd), stream bytes read).  It asks for PEER_REQUESTS
    pages up front (served first after the switch), reads the stream to its end,
    then sends SHUT(0) as QEMU does when the migration completed."""
    sys.path.insert(0, str(ROOT))
    from qsnap.stream import constants as C

    got = [0]

    def run(stream_fd, rp_fd):
        name = b"pc.ram"
        for k in range(PEER_REQUESTS):
            start = size // PEER_REQUESTS * k + size // (2 * PEER_REQUESTS)
            start -= start % PS
            os.write(rp_fd, rp_message(C.MIG_RP_MSG_REQ_PAGES_ID,
                                       struct.pack(">QIB", start, PS, len(name)) + name))
        while chunk := os.read(stream_fd, 1 << 20):
            got[0] += len(chunk)
        os.write(rp_fd, rp_message(C.MIG_RP_MSG_SHUT, struct.pack(">I", 0)))
    return run, got


def timed_postcopy(py, img, tree, size):
    """(peak RSS MiB, wall seconds, CPU seconds) of a postcopy load of ``img`` against postcopy_peer,
    run here.  Not under /usr/bin/time: it would hold the stream pipe open, and
    the peer must see the stream's end; wait4's ru_maxrss is the same VmHWM."""
    s_r, s_w = os.pipe()
    rp_r, rp_w = os.pipe()
    run, got = postcopy_peer(size)
    cmd = [*py, "load", "--postcopy=10", "-q", str(img)]
    t = time.monotonic()
    child = subprocess.Popen(cmd, cwd=tree, env=tree_env(tree), stdin=rp_r, stdout=s_w,
                             stderr=subprocess.PIPE, text=True)
    os.close(s_w)
    os.close(rp_r)
    try:
        run(s_r, rp_w)
    except BrokenPipeError:
        pass   # the load failed: its status says why
    finally:
        os.close(s_r)
        os.close(rp_w)
    err = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} in {tree} failed: {err.strip()[-2000:]}")
    if got[0] < size // PS * 9:   # every page as a record: header + data or fill byte
        raise RuntimeError(f"postcopy load of {img} wrote only {got[0]} bytes")
    return usage.ru_maxrss / 1024, time.monotonic() - t, usage.ru_utime + usage.ru_stime


def put(row, what, measured):
    row[f"{what}_mib"], row[f"{what}_s"], row[f"{what}_cpu"] = measured


def run_case(gen, name, tree, workdir, postcopy=False, export=False, cold=False):
    size, every = CASES[name]
    with tempfile.TemporaryDirectory(dir=workdir, prefix="qsnap-scale-") as tmp:
        pre, suf = stream_ends(tmp, size)
        img = Path(tmp) / "vm.qsnap"
        py = [sys.executable, "-m", "qsnap"]
        g = subprocess.Popen([str(gen), str(pre), str(suf), str(SECTION_ID), str(PS), str(every),
                              f"pc.ram:{size}"], stdout=subprocess.PIPE)
        try:
            save = timed([*py, "save", "-q", str(img)], tree, stdin=g.stdout)
        finally:
            g.stdout.close()
            g.wait()
        row = {"case": name, "tree": str(tree), "guest_gib": size / GiB, "data_every": every,
               "stream_gib": stream_bytes(pre, suf, size, every) / GiB,
               "image_gib": img.stat().st_size / GiB, "load_avg": os.getloadavg()[0]}
        put(row, "save", save)
        row["evicted"] = cold
        if cold:   # the disk's own rate, the baseline of this image's reads
            evict_file(img)
            put(row, "read", timed(["dd", f"if={img}", "of=/dev/null", "bs=8M", "iflag=direct"], tree))
        for what, args in (("load", ["-q"]), ("check", []), ("info", [])):
            if cold:
                evict_file(img)   # small and large images alike from the disk
            put(row, what, timed([*py, what, *args, str(img)], tree))
        if postcopy:
            put(row, "postcopy", timed_postcopy(py, img, tree, size))
        for fmt in EXPORT_FORMATS if export else ():
            out = Path(tmp) / f"vm.{fmt}"
            put(row, f"export_{fmt}", timed([*py, "export", "-q", f"--format={fmt}", str(img), str(out)],
                                            tree))
            out.unlink()
        img.unlink()
    return row


EXPORT_FORMATS = ("raw", "elf")


def run_qemu_case(name, tree, workdir):
    """The real-QEMU case: save and load through exec:, check; peak RSS from /usr/bin/time -o."""
    sys.path.insert(0, str(ROOT))
    from qsnaptest.guests import make_blobs
    from qsnaptest.qemu import BlobGuest

    size = CASES[name][0]
    env = dict(os.environ, PYTHONPATH=str(tree))
    py = f"{sys.executable} -m qsnap"
    with tempfile.TemporaryDirectory(dir=workdir, prefix="qsnap-scale-") as tmp:
        blobs = make_blobs(tmp, [(16 << 20, 64 << 20)])
        img, t_save, t_load = Path(tmp) / "vm.qsnap", Path(tmp) / "save.time", Path(tmp) / "load.time"
        timed_exec = f"cd {{}} && /usr/bin/time -f '{TIME_FORMAT}' -o {{}} {{}} {{}}"
        # MAP_NORESERVE: a guest larger than the host's RAM starts (Linux's
        # overcommit heuristic refuses a 64 GiB reservation on a 24 GiB host)
        ram = ["-object", f"memory-backend-ram,id=pc.ram,size={size},reserve=off",
               "-machine", "memory-backend=pc.ram"]
        with BlobGuest(memory=size, blobs=blobs, env=env, accel="kvm", args=ram) as vm:
            vm.wait_bios_done()
            vm.set_parameters(max_bandwidth=16 << 30)
            vm.set_capabilities(background_snapshot=True)
            vm.migrate("exec:" + timed_exec.format(tree, t_save, py, f"save -q {img}"))
            vm.wait_migration(timeout=1800)
            vm.wait_no_descendants(1800)
        with BlobGuest(memory=size, incoming=True, env=env, accel="kvm", args=ram) as dst:
            dst.migrate_incoming("exec:" + timed_exec.format(tree, t_load, py, f"load -q {img}"))
            dst.wait_migration(timeout=1800)
            dst.verify_blobs(blobs)
        info = json.loads(subprocess.run([sys.executable, "-m", "qsnap", "info", "--output=json",
                                          str(img)], cwd=tree, env=env, capture_output=True,
                                         check=True).stdout)
        row = {"case": name, "tree": str(tree), "guest_gib": size / GiB, "data_every": None,
               "stream_gib": info["counts"]["stream_bytes"] / GiB,
               "image_gib": img.stat().st_size / GiB}
        for what, path in (("save", t_save), ("load", t_load)):
            put(row, what, parse_time(path.read_text()))
        for what in ("check", "info"):
            put(row, what, timed([sys.executable, "-m", "qsnap", what, str(img)], tree))
        img.unlink()
    return row


PLAN_PROBE = """
import resource, sys
from array import array
from qsnap.image.pages import ClusterState, chain_plan
from qsnap.image.reader import Image
from qsnap.load import file_passes

n, cs = int(sys.argv[1]), 1 << 20


class Block:
    idstr, offset, length = "pc.ram", 0, n * cs


class FakeImage:
    # an all-data image of n clusters as the reader holds it: the mapped (virtual,
    # host) cluster arrays, array('Q'), 16 B per cluster; the reader's own ram_clusters
    cluster_size, cluster_bits, target_page_size, chain, blocks = cs, 20, 4096, None, [Block()]
    meta_offset = n * cs
    _mapped_virt = array("Q", range(n))
    _mapped_host = array("Q", range(cs, (n + 1) * cs, cs))
    ram_clusters = Image.ram_clusters


before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img = FakeImage()
src, host, virt, bidx = chain_plan(img, img.blocks)
ws_passes, passes = file_passes(img, src, host, virt, bidx, False, sys.stderr)
state = ClusterState(img, img.blocks, virt, bidx, 256)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


# check's plan: verify_all's cluster_sources and its per-file (host, virtual) pairs
CHECK_PROBE = """
import resource, sys
from array import array
import numpy as np
from qsnap.image.chain import cluster_sources

n = int(sys.argv[1])


class FakeImage:
    # as the reader holds it: array('Q') of the mapped clusters, no zero-flagged ones
    cluster_bits, cluster_size, meta_offset = 20, 1 << 20, n << 20
    _mapped_virt = array("Q", range(n))
    _mapped_host = array("Q", range(4 << 20, (n + 4) << 20, 1 << 20))
    _zero_virt = array("Q")


img = FakeImage()
img.chain = [img]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
virt, src, host = (np.asarray(a) for a in cluster_sources(img))
rows = np.flatnonzero(src == 0)
pairs = np.empty((len(rows), 2), dtype=np.uint64)
pairs[:, 0] = host[rows]
pairs[:, 1] = virt[rows] << np.uint64(20)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def plan_memory(tree, guest, probe=PLAN_PROBE):
    """(MiB before, MiB after) peak RSS around load's cluster plan (``probe``: or check's)
    of an all-data ``guest`` (bytes) of 1 MiB clusters, built in a process of its own from
    an image as the reader holds it (no image is written: a 1 TiB all-data one would not
    fit the disk)."""
    r = subprocess.run([sys.executable, "-c", probe, str(guest >> 20)], cwd=tree, env=tree_env(tree),
                       capture_output=True, text=True, check=True)
    before, after = r.stdout.split()
    return int(before) / 1024, int(after) / 1024


PLAN_SIZES = (4 * GiB, 64 * GiB, 1024 * GiB)


def plan_main(trees, out):
    rows = [{"tree": str(t), "guest_gib": g / GiB, "clusters": g >> 20,
             **dict(zip(("before_mib", "after_mib"), plan_memory(t, g))),
             **dict(zip(("check_before_mib", "check_after_mib"), plan_memory(t, g, CHECK_PROBE))),
             "load_avg": os.getloadavg()[0]}
            for t in trees for g in PLAN_SIZES]
    write_rows(f"plan-{out}", rows)
    text = "\n".join(["| tree | all-data guest GiB | data clusters | load: RSS MiB before the plan | after "
                       "| check: before | after |",
                       "|---|---:|---:|---:|---:|---:|---:|"]
                      + [f"| {Path(r['tree']).name} | {r['guest_gib']:g} | {r['clusters']} "
                         f"| {r['before_mib']:.1f} | {r['after_mib']:.1f} "
                         f"| {r['check_before_mib']:.1f} | {r['check_after_mib']:.1f} |" for r in rows])
    print(text)


def machine():
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    mem = next(int(ln.split()[1]) // 1024 for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
    return f"{os.cpu_count()} x {cpu}, {mem} MiB RAM, Linux {platform.release()}"


def postcopy_table(rows):
    out = ["| case | tree | guest GiB | postcopy load MiB | postcopy load s |", "|---|---|---:|---:|---:|"]
    out += [f"| {r['case']} | {Path(r['tree']).name} | {r['guest_gib']:g} | {r['postcopy_mib']:.0f} "
            f"| {r['postcopy_s']:.1f} |" for r in rows if "postcopy_mib" in r]
    return "\n".join(out)


def export_table(rows):
    out = ["| case | tree | guest GiB | export raw MiB | raw s (CPU s) | export elf MiB | elf s (CPU s) |",
           "|---|---|---:|---:|---:|---:|---:|"]
    out += [f"| {r['case']} | {Path(r['tree']).name} | {r['guest_gib']:g} "
            + " ".join(f"| {r[f'export_{f}_mib']:.0f} | {r[f'export_{f}_s']:.1f} ({r[f'export_{f}_cpu']:.1f})"
                       for f in EXPORT_FORMATS) + " |"
            for r in rows if "export_raw_mib" in r]
    return "\n".join(out)


def table(rows):
    out = ["| case | tree | guest GiB | stream GiB | save MiB | save s/GiB (CPU) | load MiB "
           "| load s/GiB (CPU) | check MiB | check s/GiB (CPU) | info MiB | info s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sg = r["stream_gib"]
        per = lambda w: f"{r[w + '_s'] / sg:.2f} ({r.get(w + '_cpu', float('nan')) / sg:.2f})"  # noqa: E731
        info = f"{r['info_mib']:.0f} | {r['info_s']:.1f}" if "info_mib" in r else "- | -"
        out.append(f"| {r['case']} | {Path(r['tree']).name} | {r['guest_gib']:g} | {sg:.2f} "
                   f"| {r['save_mib']:.0f} | {per('save')} | {r['load_mib']:.0f} | {per('load')} "
                   f"| {r['check_mib']:.0f} | {per('check')} | {info} |")
    return "\n".join(out)


# (smaller, 16 x larger) cases of one density: time per stream byte should stay within 10 %
LINEAR_PAIRS = (("all-4G", "all-64G"), ("sparse-64G", "sparse-1T"))


def linearity_table(rows):
    """Per op: median seconds per GiB of stream (wall and CPU) of each pair's cases
    and their ratio (large / small; the target is <= 1.1).  ``read`` (--evict) is
    dd reading the image with O_DIRECT: the disk's own ratio, for comparison."""
    out = ["| pair | op | runs | small s/GiB wall (CPU) | large s/GiB wall (CPU) | ratio wall | ratio CPU |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for small, large in LINEAR_PAIRS:
        a = [r for r in rows if r["case"] == small]
        b = [r for r in rows if r["case"] == large]
        if not a or not b:
            continue
        for op in ("save", "load", "check", "read"):
            if not all(f"{op}_s" in r for r in a + b):   # read: only with --evict
                continue
            med = lambda rs, k: statistics.median(r[f"{op}_{k}"] / r["stream_gib"] for r in rs)  # noqa: E731
            sw, sc, lw, lc = med(a, "s"), med(a, "cpu"), med(b, "s"), med(b, "cpu")
            out.append(f"| {small} / {large} | {op} | {len(a)} / {len(b)} | {sw:.3f} ({sc:.3f}) "
                       f"| {lw:.3f} ({lc:.3f}) | {lw / sw:.2f} | {lc / sc:.2f} |")
    return "\n".join(out)


RESULTS = ROOT / "bench" / "results"


def write_rows(name, rows):
    (RESULTS / f"scale-{name}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


def image_need(size, every):
    """Disk bytes an image of the case takes: its data clusters and the 4-byte checksums."""
    return size // (every or 1024) + size // PS * 4


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", choices=sorted(CASES))
    p.add_argument("--tree", action="append", help="a qsnap checkout (default: this one)")
    p.add_argument("--dir", default="/var/tmp", help="where images are written (and deleted)")
    p.add_argument("--out", default=datetime.date.today().isoformat())
    p.add_argument("--repeat", type=int, default=1, help="run the list of cases this many times")
    p.add_argument("--margin", type=float, default=20, help="GiB to leave free on --dir beside the image")
    p.add_argument("--postcopy", action="store_true",
                   help="also a postcopy load of each synthetic image (simulated destination)")
    p.add_argument("--export", action="store_true",
                   help="also export each synthetic image as raw and as elf (each file deleted at once)")
    p.add_argument("--evict", action="store_true",
                   help="drop each synthetic image from the page cache before load, check and info")
    p.add_argument("--plan", action="store_true",
                   help="only the peak RSS of load's cluster plan of all-data guests (PLAN_SIZES), no image")
    a = p.parse_args(argv)
    trees = [Path(t).resolve() for t in (a.tree or [ROOT])]
    if a.plan:
        return plan_main(trees, a.out)
    cases = a.case or [c for c in CASES if c != "qemu-2G"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="qsnap-scale-gen-") as tmp:
        gen = build_gen(tmp)
        for name in cases * a.repeat:
            size, every = CASES[name]
            need = image_need(size, every) * (2.1 if a.export else 1.1)   # image + the export's file
            if shutil.disk_usage(a.dir).free < need + a.margin * GiB:
                print(f"skipping {name}: {a.dir} has less than {need / GiB + a.margin:.0f} GiB free",
                      file=sys.stderr)
                continue
            for tree in trees:
                try:
                    run = run_qemu_case if CASES[name][1] is None else \
                        partial(run_case, gen, postcopy=a.postcopy, export=a.export, cold=a.evict)
                    rows.append(run(name, tree, a.dir))
                except RuntimeError as e:   # e.g. out of memory on an old tree: a row saying so
                    rows.append({"case": name, "tree": str(tree), "error": str(e)[-500:]})
                print(json.dumps(rows[-1]), flush=True)
                write_rows(a.out, rows)   # after each row: a long run cut short keeps what it measured
    ok = [r for r in rows if "error" not in r]
    text = "\n\n".join([table(ok)] + ([postcopy_table(ok)] if a.postcopy else [])
                        + ([export_table(ok)] if a.export else []) + [linearity_table(ok)])
    (RESULTS / f"scale-{a.out}.md").write_text(f"Machine: {machine()}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
