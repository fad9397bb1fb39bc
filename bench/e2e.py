"""End-to-end benchmark against real QEMU: qsnap save/load vs cat vs savevm.

    python -m bench.e2e --sizes 512M,1G --fill 0,50,100 --rounds 2
    python -m bench.e2e --sizes 3G --fill 67 --rounds 1          # 3 GiB guest, 2 GiB random
    python -m bench.e2e                                          # full matrix (see below)
    python -m bench.e2e --qemu 10.0 --sizes 3G --fill 67 --rounds 2 --no-savevm --postcopy 0

For every guest size x non-zero share, a blob guest (no OS: SeaBIOS halts,
random blobs placed by ``-device loader`` make up the non-zero share) is
started under KVM with two qcow2 drives (``-drive if=none``: savevm writes them,
``qsnap snapshot`` freezes them) and a second QMP socket for ``qsnap snapshot``,
on the QEMU build --qemu names through qsnaptest.builds (7.2: the installed
qemu-system-x86_64; 10.0: the unpacked 10.0.2 with its ``-L`` dirs, the harness's
own or else the one under /tmp/q10/root; or a binary's path; machine type
pc-i440fx-<its major.minor>), and,
alternating the order of the contenders every round:

save (background-snapshot for qsnap and cat; from ``migrate`` to both status
"completed" and the exec child's exit -- QEMU 7.2 waits for the child anyway):
  * ``exec:qsnap save IMG``                 (image durable and renamed at exit)
  * ``exec:sh -c 'cat > raw && sync raw'``  (the same stream, durable)
  * HMP ``savevm`` into the qcow2 drives, then fsync of their top files
  * ``qsnap snapshot --mode=background --disks=overlay --output=json`` (the
    wall time of the command; ``downtime_ms`` from its JSON) and the same with
    ``--disks=none`` (RAM only: QEMU pauses the guest itself), with QEMU's own
    query-migrate ``downtime`` beside them (unless --no-snapshot); with --baseline
    TREE also TREE's ``qsnap snapshot`` with disks (same-run before/after), and
    for every snapshot with disks the harness's STOP, RESUME and MIGRATION events
    in ms after the STOP (the timeline of the pause)
load (fresh ``-incoming defer`` QEMU each time, page cache dropped first;
from ``migrate-incoming`` to status "completed"):
  * ``exec:qsnap load IMG``                 (precopy, O_DIRECT reads)
  * ``exec:cat raw``                        (QEMU's own ingest of the raw stream)
  * ``exec:qsnap load --postcopy=P --stats=F IMG`` for P in --postcopy (0,50)
    when ``qsnap.postcopy`` exists: time to guest running, to completion, and
    page-request service percentiles from the stats file; otherwise the rows
    say "not available".
  * ``qsnap restore --launch --drop-arg=-device IMG`` of the last snapshot, and
    with ``--postcopy=P``: the wall time of the command (QEMU start-up included),
    its JSON ``seconds`` and ``seconds_to_run``; the guest's RAM is checked in
    the launched QEMU, which is then ended. The exec: rows time an already
    started QEMU; its start-up is recorded beside them (``qemu_start_s``).
qsnap's peak RSS and CPU time come from ``/usr/bin/time -f '%e %M %U %S'``
wrapped around the exec command.

Medians of the rounds and ratios (same run) go to bench/results/e2e.{json,md,png}
(--out), together with a description of the machine measured here: cores, CPU
model, disk write (dd + fdatasync), O_DIRECT and buffered read, pipe throughput.

Defaults: --sizes 512M,1G,2G,4G --fill 0,50,100 --rounds 3 --postcopy 0,50.
The full default matrix takes about 20-30 min on the 2-core host of
docs/benchmarks.md (disk 0.5-1.4 GB/s; 4 GiB guests dominate), longer on a
slower disk; 512M,1G,2G x 0,50,100 x 3 rounds took 8 min there.
Cold cache = posix_fadvise DONTNEED on the image and raw stream before each load
(--drop-caches: echo 3 > /proc/sys/vm/drop_caches instead, root; it evicts the
interpreter and numpy too). Needs
qemu-system-x86_64 (7.2), qemu-img, /usr/bin/time, KVM for background-snapshot.
"""
import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import compile_qsnap_once, evict_file
from qsnaptest import builds, guests
from qsnaptest.qemu import BlobGuest, QemuError, ram_ranges, use_build

REPO = Path(__file__).resolve().parents[1]

MiB = 1 << 20
GiB = 1 << 30
TIME_FMT = "%e %M %U %S"
TARGETS = {"save_over_cat": 1.05, "load_over_cat": 1.0, "postcopy_running_s": 0.5,
           "postcopy_completion_over_precopy": 1.2, "postcopy_p99_ms": 2.0, "rss_MiB": 150,
           "snapshot_over_save": 1.05, "launch_over_start_plus_load": 1.05,
           "snapshot_downtime_ms": 50}
# The QEMU build every guest of the run uses (--qemu; see find_qemu)
BUILD = None
# Where QEMU 10.0 was unpacked by hand when qsnaptest.builds has not prepared its own
UNPACKED_10 = os.environ.get("QSNAP_QEMU10_ROOT", "/tmp/q10/root")
DISKS = 2  # qcow2 drives per guest: savevm writes them, qsnap snapshot freezes them
# --baseline: another qsnap tree (with its extension built) whose `qsnap snapshot`
# runs beside this one's, alternating, for same-run before/after figures
BASELINE = None


def parse_size(text):
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper().rstrip("IB"))
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": MiB, "G": GiB}[m.group(2)]


def human(n):
    return f"{n // GiB}G" if n % GiB == 0 else f"{n // MiB}M"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def postcopy_available():
    return importlib.util.find_spec("qsnap.postcopy") is not None


# --- page cache ------------------------------------------------------------------

DROP_ALL = False


def drop_caches(paths=()):
    """Evict the data files from the page cache: posix_fadvise DONTNEED on ``paths``
    (default), or drop the whole page cache (--drop-caches, root; that also evicts the
    interpreter, numpy and qsnap themselves). Returns the method used."""
    os.sync()
    if DROP_ALL:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            pass
    for p in paths:
        evict_file(p)
    return "fadvise"


# Where a Linux guest's free page reporting (virtio-balloon) counts what it handed back
REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")


def settle_memory(quiet=2.5, limit=30.0):
    """Wait until the memory the eviction freed has settled, so that the load after it
    finds the host's memory as every other load does; returns the seconds waited.

    On a VM whose balloon reports free pages to its hypervisor, pages freed a moment
    ago are still backed and fault in 3-4 times faster than reported ones (2 GiB of
    huge pages: 0.4-0.5 s right after evicting 2 GiB of page cache, 1.2-1.5 s once
    it was reported). A load that starts at once would get the just-evicted page
    cache cheaply, one that starts QEMU first (``restore --launch``) only in part.
    The kernel reports 2 s after a free, then a few hundred MiB every 2 s (2 GiB in
    about 15 s here): so, until the reporting counter has stood still for ``quiet``
    s (at most ``limit``), or ``quiet`` s where there is no counter."""
    t0 = time.monotonic()
    if not REPORTED_KIB.exists():
        time.sleep(quiet)
        return time.monotonic() - t0
    last, still_since = REPORTED_KIB.read_text(), t0
    while time.monotonic() - t0 < limit:
        time.sleep(0.1)
        now = REPORTED_KIB.read_text()
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            break
    return time.monotonic() - t0


# --- machine ---------------------------------------------------------------------

def _sh_time(cmd):
    t = time.monotonic()
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def describe_machine(work, mib=1024):
    """Cores, CPU, memory and the disk/pipe rates of ``work`` measured now."""
    cpu = platform.machine()
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            mem = int(line.split()[1]) * 1024
    virt = ""
    try:
        virt = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    f = Path(work) / "dd.bin"
    n = mib * MiB
    w = _sh_time(f"dd if=/dev/zero of={f} bs=1M count={mib} conv=fdatasync")
    drop_caches([f])
    rd = _sh_time(f"dd if={f} of=/dev/null bs=1M iflag=direct")
    drop_caches([f])
    rb = _sh_time(f"dd if={f} of=/dev/null bs=1M")
    pipe = _sh_time(f"dd if=/dev/zero bs=1M count={mib * 4} | cat > /dev/null")
    f.unlink()
    return {
        "cores": os.cpu_count(), "cpu": cpu, "memory_GiB": round(mem / GiB, 1),
        "virtualization": virt or "unknown", "kernel": platform.release(),
        "python": platform.python_version(), **describe_build(BUILD),
        "disk_dir": str(work),
        "disk_write_fdatasync_MBps": round(n / w / 1e6), "disk_read_odirect_MBps": round(n / rd / 1e6),
        "disk_read_buffered_cold_MBps": round(n / rb / 1e6),
        "pipe_dd_cat_MBps": round(4 * n / pipe / 1e6),
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
    }


# --- guests ----------------------------------------------------------------------

def blob_layout(mem, fill):
    """[(addr, size)] of random blobs covering ``fill`` (0..1) of guest RAM where SeaBIOS
    leaves RAM alone: [16 MiB, safe end of low RAM) and all of the RAM above 4 GiB."""
    want = int(mem * fill) // MiB * MiB
    ranges = ram_ranges(mem)
    areas = [(guests.BLOB_MIN_ADDR, guests.blob_safe_end(ranges[0][2]))]
    if len(ranges) > 1:
        areas.append((ranges[1][0], ranges[1][0] + ranges[1][2]))
    out = []
    for start, end in areas:
        addr = start
        while want > 0 and addr < end:
            n = min(want, end - addr, 512 * MiB)
            out.append((addr, n))
            addr += n
            want -= n
    return out


def make_blob_files(d, layout, seed=0):
    """Random blob files (numpy generator, written in chunks: no copy kept in memory)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i, (addr, size) in enumerate(layout):
        p = d / f"blob{i}-{addr:#x}.bin"
        with open(p, "wb") as f:
            for off in range(0, size, 64 * MiB):
                f.write(rng.bytes(min(64 * MiB, size - off)))
        out.append(guests.Blob(p, addr, b""))
    return out


def check_blobs(vm, blobs, probe=64 << 10):
    """Compare the head and tail of every blob in guest RAM with the file."""
    for b in blobs:
        size = b.path.stat().st_size
        with open(b.path, "rb") as f:
            head = f.read(probe)
            f.seek(size - probe)
            tail = f.read(probe)
        if vm.read_memory(b.addr, probe) != head or vm.read_memory(b.addr + size - probe, probe) != tail:
            raise AssertionError(f"blob at {b.addr:#x} differs after the load")


def find_qemu(spec):
    """The build --qemu names: qsnaptest.builds' 7.2 / 10.0 / binary path; for 10.0
    the tree under UNPACKED_10 when the harness has not unpacked its own."""
    try:
        return builds.find_build(spec)
    except builds.BuildUnavailable:
        binary = Path(UNPACKED_10) / "usr" / "bin" / builds.SYSTEM_BINARY
        if spec != "10.0" or not binary.exists():
            raise
        return builds.find_build(str(binary))


def describe_build(b):
    return {"qemu": b.version, "qemu_binary": b.binary, "machine_type": b.machine("pc"),
            "qemu_firmware_dirs": list(b.firmware_dirs)}


def guest(mem, disks, name, extra=(), **kw):
    """A blob guest of the run's QEMU build (its binary, -L dirs and pc machine type)
    with ``disks`` as drives d0, d1, ..."""
    args = []
    for i, disk in enumerate(disks):
        args += ["-drive", f"file={disk},if=none,id=d{i},format=qcow2,cache=writeback"]
    return BlobGuest(memory=mem, build=BUILD, name=name, args=args + list(extra), **kw)


def top_files(vm):
    """The files the VM's drives write now (the top of each chain: qsnap snapshot
    moves them onto overlays)."""
    return [b["inserted"]["file"] for b in vm.qmp("query-block") if b.get("inserted")]


def read_time_file(path, timeout=60.0):
    """(wall, maxrss MiB, user, sys) from /usr/bin/time's -o file, waiting until it is written."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            text = ""
        fields = text.splitlines()[-1].split() if text else []
        if len(fields) == 4:
            try:
                e, m, u, s = map(float, fields)
                return {"wall_s": e, "rss_MiB": m / 1024, "cpu_s": u + s, "user_s": u, "sys_s": s}
            except ValueError:
                pass
        if time.monotonic() > deadline:
            return {"error": f"no /usr/bin/time output in {path}: {text[-200:]!r}"}
        time.sleep(0.02)


def process_cpu_s(pid):
    """user+sys CPU seconds the process ``pid`` has used so far (/proc/PID/stat), or None."""
    from qsnap.vm.savechild import process_cpu
    cpu = process_cpu(pid) if pid else None
    return None if cpu is None else round(cpu["user_s"] + cpu["sys_s"], 3)


def threads_cpu_s(pid):
    """{thread name: user+sys CPU s} of the process ``pid``, its threads of one name
    summed (/proc/PID/task/*/stat; QEMU names its threads: "CPU 0/KVM", "live_migration",
    "qemu-system-x86"...), or None: where a QEMU's CPU time goes."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (OSError, TypeError):
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode(errors="replace")
        fields = stat[stat.rindex(b")") + 2:].split()
        out[name] = round(out.get(name, 0) + (int(fields[11]) + int(fields[12])) / tick, 3)
    return out


def wait_status(vm, want, t0, timeout, interval=0.01):
    """Poll query-migrate; return seconds since t0 when status is in ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        st = vm.query_migrate().get("status")
        if st in want:
            return time.monotonic() - t0
        if st in ("failed", "cancelled"):
            raise QemuError(f"migration {st}: {vm.query_migrate().get('error-desc')}\n{vm.log_tail()}")
        if not vm.is_running():
            raise QemuError(f"QEMU exited: {vm.log_tail()}")
        if time.monotonic() > deadline:
            raise QemuError(f"migration still {st} after {timeout}s")
        time.sleep(interval)


def qcow2_actual_size(path):
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True).stdout
    try:
        return json.loads(out).get("actual-size")
    except ValueError:
        return None


def wait_file(path, t0, timeout):
    deadline = time.monotonic() + timeout
    while not (Path(path).exists() and Path(path).stat().st_size > 0):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)
    return time.monotonic() - t0


def load_once(who, pct, mem, dst_disks, img, raw, tf, stats, blobs, py, timeout, evict):
    """One timed load into a fresh -incoming defer QEMU, the files ``evict`` out of the
    page cache first; returns the row."""
    t_start = time.monotonic()
    with guest(mem, dst_disks, "dst", incoming=True) as dst:
        qemu_start = time.monotonic() - t_start
        if pct is not None:
            dst.set_capabilities(postcopy_ram=True)
        if who == "cat":
            cmd = f"cat {raw}"
        elif pct is None:
            cmd = f"{py} -m qsnap load -q {img}"
        else:
            cmd = f"{py} -m qsnap load -q --postcopy={pct} --stats={stats} {img}"
        start_cpu = process_cpu_s(dst.proc.pid)  # its start-up, apart from the load's
        how = drop_caches(evict)
        settled = settle_memory()
        t0 = time.monotonic()
        dst.migrate_incoming(f"exec:/usr/bin/time -f '{TIME_FMT}' -o {tf} {cmd}")
        running = None
        if pct is not None:
            deadline = time.monotonic() + timeout
            while dst.status() != "running":
                if time.monotonic() > deadline:
                    raise QemuError("postcopy guest never ran")
                st = dst.query_migrate().get("status")
                if st == "failed":
                    raise QemuError(f"postcopy failed: {dst.log_tail()}")
                time.sleep(0.005)
            running = time.monotonic() - t0
        done = wait_status(dst, ("completed",), t0, timeout)
        qemu_cpu = process_cpu_s(dst.proc.pid)  # before check_blobs' pmemsaves add theirs
        qemu_threads = threads_cpu_s(dst.proc.pid)
        tm = read_time_file(tf) if who != "cat" else {}
        check_blobs(dst, blobs)
        row = {"s": done, "cache": how, "settled_s": settled, "qemu_start_s": qemu_start, "qemu_cpu_s": qemu_cpu,
               "qemu_threads_cpu_s": qemu_threads, "qemu_start_cpu_s": start_cpu,
               "load_cpu_s": tm.get("cpu_s"), **tm}
        if pct is not None:
            row["running_s"] = running
            row["stats"] = json.loads(stats.read_text()) if stats.exists() else None
        log(f"  load {who:10s}  {done:6.2f} s" + (f"  running {running:.3f} s" if running else "")
            + (f"  rss {tm['rss_MiB']:.0f} MiB cpu {tm['cpu_s']:.2f} s" if "rss_MiB" in tm else "")
            + f"  QEMU cpu {qemu_cpu} s")
    return row


def snapshot_once(sock, img, py, timeout, disks="overlay", tree=None):
    """One timed ``qsnap snapshot`` (background; disks on overlays, or RAM only) through
    the VM's second QMP socket, of this qsnap or of the one in ``tree``: the wall time
    of the command, and its JSON summary."""
    cmd = [py, "-m", "qsnap", "snapshot", "--qmp", str(sock), "--mode=background",
           f"--disks={disks}", "--output=json", str(img)]
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=tree or None)
    dt = time.monotonic() - t0
    if r.returncode:
        raise QemuError(f"qsnap snapshot: exit {r.returncode}: {r.stderr.strip()[-2000:]}")
    out = json.loads(r.stdout)
    hp = out.get("hugepages") or {}
    return {"s": dt, "qsnap_seconds": out["seconds"], "downtime_ms": out["downtime_ms"],
            "disks": len(out["disks"]), "file_bytes": img.stat().st_size, "mode": out["mode"],
            "collapse_s": hp.get("seconds"), "collapse_bytes": hp.get("bytes"),
            "collapse_error": hp.get("error")}


class LaunchedVM:
    """The QEMU ``qsnap restore --launch`` left running: checked over its QMP socket,
    then ended (it is not our child: qsnap started it in a session of its own)."""

    def __init__(self, summary, scratch):
        from qsnap.vm.qmp import Qmp
        self.pid = summary["pid"]
        self.scratch = scratch
        self.q = Qmp(summary["qmp"]).connect()

    def read_memory(self, addr, size):
        path = self.scratch / "pmem.bin"
        self.q.cmd("pmemsave", val=addr, size=size, filename=str(path))
        try:
            return path.read_bytes()
        finally:
            path.unlink()

    def status(self):
        return self.q.cmd("query-status")["status"]

    def end(self, timeout=30.0):
        try:
            self.q.cmd("quit")
        except Exception:
            pass  # QEMU closes the socket as it quits
        self.q.close()
        deadline = time.monotonic() + timeout
        while _alive(self.pid):
            if time.monotonic() > deadline:
                os.kill(self.pid, 9)
                deadline = time.monotonic() + timeout
            time.sleep(0.02)


def timeline(events):
    """[[what, ms after the first STOP]] of STOP, RESUME and MIGRATION events (QEMU's
    timestamps), the migration's by status."""
    def stamp(e):
        return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6

    picked = [e for e in events if e["event"] in ("STOP", "RESUME", "MIGRATION")]
    stops = [stamp(e) for e in picked if e["event"] == "STOP"]
    t0 = stops[0] if stops else (stamp(picked[0]) if picked else 0)
    return [[e["data"]["status"] if e["event"] == "MIGRATION" else e["event"],
             round((stamp(e) - t0) * 1000, 1)] for e in picked]


def _alive(pid):
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] != b"Z"


def launch_once(pct, img, blobs, work, py, timeout, evict):
    """One timed ``qsnap restore --launch`` (precopy, or postcopy after ``pct``%), the
    files ``evict`` out of the page cache first; the guest's RAM is checked afterwards.

    ``--drop-arg=-device`` removes the blob guest's ``-device loader`` options (its only
    devices): they would make the new QEMU read the 2 GiB of blob files at start-up,
    which no real VM's command line does, and the exec: destinations have none."""
    d = work / "launch"
    shutil.rmtree(d, ignore_errors=True)
    cmd = [py, "-m", "qsnap", "restore", "--launch", "--output=json", "--dir", str(d),
           "--drop-arg=-device"] + ([f"--postcopy={pct}"] if pct is not None else []) + [str(img)]
    how = drop_caches(evict)
    settled = settle_memory()
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - t0
    if r.returncode:
        shutil.rmtree(d, ignore_errors=True)
        raise QemuError(f"qsnap restore --launch: exit {r.returncode}: {r.stderr.strip()[-2000:]}")
    if r.stderr.strip():
        log(f"  restore --launch said on stderr: {r.stderr.strip()[-300:]}")
    out = json.loads(r.stdout)
    qemu_cpu_after = process_cpu_s(out.get("pid"))
    qemu_threads = threads_cpu_s(out.get("pid"))
    # the launched QEMU's CPU when its load completed, as the exec: rows' is read; the
    # one read now also has the guest's start and the disks' activation
    qemu_cpu = _load_cpu({"cpu": out.get("qemu_cpu_at_completed")})
    vm = LaunchedVM(out, work)
    try:
        status = vm.status()
        check_blobs(vm, blobs)
    finally:
        vm.end()
        shutil.rmtree(d, ignore_errors=True)
    if status != "running":
        raise QemuError(f"the launched guest is {status}, not running")
    row = {"s": wall, "cache": how, "settled_s": settled, "restore_s": out["seconds"], "running_s": out.get("seconds_to_run"),
           "overlays": len(out["overlays"]), "changes": out.get("changes"),
           "timeline": out.get("timeline"), "launch": out.get("launch"), "qemu_cpu_s": qemu_cpu,
           "qemu_threads_cpu_s": qemu_threads,
           "qemu_start_cpu_s": _load_cpu({"cpu": (out.get("launch") or {}).get("qemu_start_cpu")}),
           "load": out.get("load"), "load_cpu_s": _load_cpu(out.get("load")),
           "qemu_cpu_after_s": qemu_cpu_after}
    log(f"  load {'launch' + ('' if pct is None else f' pc{pct}'):10s}  {wall:6.2f} s  "
        f"(restore {out['seconds']:.2f} s, running after {out.get('seconds_to_run')} s; "
        f"before QMP {out.get('launch')}, after {out.get('timeline')}; CPU s: QEMU {qemu_cpu} (later {qemu_cpu_after}), "
        f"load {row['load_cpu_s']} {out.get('load')})")
    return row


def _load_cpu(load):
    """user+sys s of restore's qsnap load child, from its summary's ``load``, or None."""
    cpu = (load or {}).get("cpu")
    return None if not cpu else round(cpu["user_s"] + cpu["sys_s"], 3)


# --- one case --------------------------------------------------------------------

class Case:
    """One guest size x non-zero share: its files, its blobs and the raw samples."""

    def __init__(self, mem, fill, rounds, work, timeout, postcopy_pcts, do_savevm, do_snapshot):
        self.mem, self.fill, self.rounds, self.timeout = mem, fill, rounds, timeout
        self.pcts, self.do_savevm, self.do_snapshot = postcopy_pcts, do_savevm, do_snapshot
        self.dir = work / f"{human(mem)}-{round(fill * 100)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.py = sys.executable
        self.img, self.raw = self.dir / "vm.qsnap", self.dir / "raw.stream"
        self.snap_img = None  # the last qsnap snapshot image (restored by --launch)
        self.snap_sock = self.dir / "snap.qmp"

    def prepare(self):
        layout = blob_layout(self.mem, self.fill)
        t = time.monotonic()
        self.blobs = make_blob_files(self.dir / "blobs", layout, seed=round(self.fill * 100))
        nonzero = sum(s for _, s in layout)
        log(f"{human(self.mem)} fill {self.fill:.0%}: {len(self.blobs)} blobs, {nonzero / MiB:.0f} MiB random "
            f"({time.monotonic() - t:.1f} s to write); QEMU {BUILD.version} {BUILD.machine('pc')}")
        self.src_disks = [self.dir / f"src{i}.qcow2" for i in range(DISKS)]
        self.dst_disks = [self.dir / f"dst{i}.qcow2" for i in range(DISKS)]
        for d in self.src_disks + self.dst_disks:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d), "8G"], check=True)
        self.res = {"mem": self.mem, "fill": self.fill, "nonzero_bytes": nonzero, "rounds": self.rounds,
                    "qemu": BUILD.version, "machine_type": BUILD.machine("pc"), "disks": DISKS,
                    "loadavg_1min": round(os.getloadavg()[0], 2),
                    "save": {"qsnap": [], "cat": [], "savevm": [], "snapshot": [], "snapshotram": [],
                             "snapshotbase": []},
                    "load": {"qsnap": [], "cat": [], "launch": [], "snapload": []}, "postcopy": {},
                    "launch_postcopy": {}}

    # -- save ----------------------------------------------------------------------
    def run_saves(self):
        # a second QMP monitor for qsnap snapshot: the harness holds the first
        extra = ["-qmp", f"unix:{self.snap_sock},server=on,wait=off"]
        with guest(self.mem, self.src_disks, "src", extra, blobs=self.blobs) as vm:
            vm.wait_bios_done(timeout=120)
            self.res["accel"] = vm.accelerator()
            vm.set_parameters(max_bandwidth=64 << 30)
            vm.set_capabilities(events=True)  # MIGRATION events: the snapshot's timeline
            # One untimed background snapshot first: the first one after boot is slower
            # (userfaultfd write protection of freshly populated RAM), whoever reads it.
            vm.set_capabilities(background_snapshot=True)
            vm.migrate("exec:cat > /dev/null")
            wait_status(vm, ("completed",), time.monotonic(), self.timeout)
            kinds = ["qsnap", "cat"] + (["snapshot", "snapshotram"] if self.do_snapshot else []) \
                + (["snapshotbase"] if self.do_snapshot and BASELINE else []) \
                + (["savevm"] if self.do_savevm else [])
            for r in range(self.rounds):
                for who in (kinds if r % 2 == 0 else kinds[::-1]):
                    os.sync()
                    row = {"savevm": self.save_savevm, "snapshot": self.save_snapshot,
                           "snapshotbase": self.save_snapshot,
                           "snapshotram": self.save_snapshot_ram}.get(
                        who, self.save_exec)(vm, who, r)
                    self.res["save"][who].append(row)
                    if vm.status() != "running":
                        vm.cont()
        self.res["stream_bytes"] = self.raw.stat().st_size
        self.res["image_bytes"] = self.img.stat().st_size

    def save_savevm(self, vm, who, r):
        vm.set_capabilities(background_snapshot=False)
        tops = top_files(vm)
        t0 = time.monotonic()
        out = vm.hmp("savevm bench")
        for path in tops:
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        dt = time.monotonic() - t0
        if out.strip():
            raise QemuError(f"savevm: {out.strip()}")
        size = qcow2_actual_size(tops[0])
        vm.hmp("delvm bench")
        log(f"  save savevm    {dt:6.2f} s")
        return {"s": dt, "qcow2_actual_bytes": size}

    def save_snapshot(self, vm, who, r):
        vm.set_capabilities(background_snapshot=True)
        base = who == "snapshotbase"
        img = self.dir / f"{'base' if base else 'snap'}{r}.qsnap"
        if self.snap_img is not None:
            self.snap_img.unlink()  # its frozen disks stay: they back the VM's overlays
        seen = len(vm.events())
        row = snapshot_once(self.snap_sock, img, self.py, self.timeout,
                            tree=BASELINE if base else None)
        row["qemu_downtime_ms"] = vm.query_migrate().get("downtime")
        row["timeline_ms"] = timeline(vm.events()[seen:])
        self.snap_img = img
        log(f"  save {'snap-base' if base else 'snapshot':9s} {row['s']:6.2f} s  downtime "
            f"{row['downtime_ms']} ms  {row['disks']} disks  {row['file_bytes'] / MiB:.0f} MiB  "
            f"collapse {row['collapse_s']} s  {row['timeline_ms']}")
        return row

    def save_snapshot_ram(self, vm, who, r):
        """--disks=none: QEMU stops and resumes the guest itself; its downtime is the
        floor under the one with disks."""
        vm.set_capabilities(background_snapshot=True)
        img = self.dir / f"ram{r}.qsnap"
        row = snapshot_once(self.snap_sock, img, self.py, self.timeout, disks="none")
        row["qemu_downtime_ms"] = vm.query_migrate().get("downtime")
        img.unlink()
        log(f"  save snap-ram  {row['s']:6.2f} s  downtime {row['downtime_ms']} ms  "
            f"collapse {row['collapse_s']} s")
        return row

    def save_exec(self, vm, who, r):
        vm.set_capabilities(background_snapshot=True)
        tf = self.dir / f"time-save-{who}.txt"
        target = self.img if who == "qsnap" else self.raw
        for f in (tf, target):
            if f.exists():
                f.unlink()
        cmd = f"{self.py} -m qsnap save -q {target}" if who == "qsnap" \
            else f"sh -c 'cat > {target} && sync {target}'"
        t0 = time.monotonic()
        vm.migrate(f"exec:/usr/bin/time -f '{TIME_FMT}' -o {tf} {cmd}")
        done = wait_status(vm, ("completed",), t0, self.timeout)
        exited = wait_file(tf, t0, self.timeout)
        dt = max(done, exited or 0)
        tm = read_time_file(tf)
        info = vm.query_migrate()
        row = {"s": dt, "completed_s": done, "child_exit_s": exited,
               "file_bytes": target.stat().st_size, **tm, "qemu_total_ms": info.get("total-time"),
               "qemu_downtime_ms": info.get("downtime")}
        log(f"  save {who:9s} {dt:6.2f} s  rss {tm.get('rss_MiB', 0):5.0f} MiB "
            f"cpu {tm.get('cpu_s', 0):5.2f} s  {target.stat().st_size / MiB:.0f} MiB")
        return row

    # -- load ----------------------------------------------------------------------
    def run_loads(self):
        have_pc = postcopy_available()
        for p in self.pcts:
            self.res["postcopy"][str(p)] = [] if have_pc else "not available"
            if self.snap_img is not None:
                self.res["launch_postcopy"][str(p)] = [] if have_pc else "not available"
        for r in range(self.rounds):
            order = [who for who in load_order(self.pcts, self.snap_img is not None, r)
                     if have_pc or "pc" not in who]
            self.res.setdefault("load_orders", []).append(order)
            for who in order:
                self.load(who)

    def data_files(self):
        """Every image and stream a load reads: all out of the page cache before each load,
        so that no load finds what the one before it read (the exec: loads read the
        exec:qsnap save image, the launches the qsnap snapshot one)."""
        return [self.img, self.raw] + ([self.snap_img] if self.snap_img is not None else [])

    def load(self, who):
        pct = re.sub(r"^(postcopy|launchpc)", "", who) if re.match(r"postcopy|launchpc", who) else None
        if who.startswith("launch"):
            try:
                row = launch_once(pct, self.snap_img, self.blobs, self.dir, self.py, self.timeout,
                                  self.data_files())
            except (QemuError, AssertionError, OSError, ValueError, subprocess.TimeoutExpired) as e:
                row = {"error": str(e)[:2000]}
                log(f"  load {who:10s}  FAILED: {str(e).splitlines()[0][:300]}")
            (self.res["launch_postcopy"][pct] if pct is not None else self.res["load"]["launch"]).append(row)
            return
        tf = self.dir / f"time-load-{who}.txt"
        stats = self.dir / f"stats-{who}.json"
        for f in (tf, stats):
            if f.exists():
                f.unlink()
        try:
            img = self.snap_img if who == "snapload" else self.img
            row = load_once(who, pct, self.mem, self.dst_disks, img, self.raw, tf, stats, self.blobs,
                            self.py, self.timeout, self.data_files())
        except (QemuError, AssertionError, OSError) as e:
            if pct is None:
                raise
            # a postcopy engine still in the works must not sink the rest of the matrix
            row = {"error": str(e)[:2000]}
            log(f"  load {who:10s}  FAILED: {str(e).splitlines()[0][:200]}")
        (self.res["postcopy"][pct] if pct is not None else self.res["load"][who]).append(row)


def load_order(pcts, launches, r):
    """The loads of round ``r``: exec:cat, then each exec: load beside its launch
    (precopy, then each postcopy percentage); in odd rounds the pairs and the order
    within each are reversed, so that neither the launch nor the exec: load always
    goes first, nor always follows the same row.  "snapload" is exec:qsnap load of
    the launch's image (qsnap snapshot's, where "qsnap" loads exec:qsnap save's): it
    tells the image's share of a difference from the launch's."""
    pairs = [("qsnap", "snapload", "launch")] + [(f"postcopy{p}", f"launchpc{p}") for p in pcts]
    if not launches:
        pairs = [(p[0],) for p in pairs]
    if r % 2:
        pairs = [p[::-1] for p in pairs[::-1]]
    return ["cat"] + [who for p in pairs for who in p]


def run_case(mem, fill, rounds, work, postcopy_pcts, timeout, do_savevm=True, do_snapshot=True):
    """All save and load measurements of one guest; returns a dict of raw samples."""
    case = Case(mem, fill, rounds, work, timeout, postcopy_pcts, do_savevm, do_snapshot)
    case.prepare()
    try:
        case.run_saves()
        case.run_loads()
    finally:
        shutil.rmtree(case.dir, ignore_errors=True)
    return case.res


# --- summary -----------------------------------------------------------------------

def _med(rows, key="s"):
    vals = [r[key] for r in rows if isinstance(r, dict) and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _percentiles(stats):
    """p50/p99/max request service times (ms) from a postcopy --stats JSON, whatever its nesting."""
    found = {}

    def walk(o, path=""):
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(o, (int, float)):
            key = path.lower()
            if "request" in key or "fault" in key or "latency" in key or "service" in key:
                m = re.search(r"p(50|90|99|999)(?![0-9])|max", key.split(".")[-1])
                if m:
                    scale = 1e-3 if "_us" in key or key.endswith("us") else (1e3 if key.endswith("_s") else 1)
                    found[m.group(0)] = o * scale
    walk(stats)
    return found


def summarize(res):
    s, l = res["save"], res["load"]
    out = {"guest": human(res["mem"]), "fill_pct": round(res["fill"] * 100),
           "nonzero_MiB": res["nonzero_bytes"] / MiB, "stream_MiB": res["stream_bytes"] / MiB,
           "image_MiB": res["image_bytes"] / MiB, "loadavg_1min": res.get("loadavg_1min")}
    for who in ("qsnap", "cat", "savevm"):
        out[f"save_{who}_s"] = _med(s[who])
        out[f"save_{who}_all"] = [r["s"] for r in s[who]]
    for who in ("qsnap", "cat"):
        out[f"load_{who}_s"] = _med(l[who])
        out[f"load_{who}_all"] = [r["s"] for r in l[who]]
    if out["save_cat_s"] and out["save_qsnap_s"]:
        out["save_qsnap_over_cat"] = out["save_qsnap_s"] / out["save_cat_s"]
    if out["save_savevm_s"] and out["save_qsnap_s"]:
        out["save_qsnap_over_savevm"] = out["save_qsnap_s"] / out["save_savevm_s"]
    if out["load_cat_s"] and out["load_qsnap_s"]:
        out["load_qsnap_over_cat"] = out["load_qsnap_s"] / out["load_cat_s"]
    out["save_rss_MiB"] = max((r.get("rss_MiB", 0) for r in s["qsnap"]), default=None)
    out["save_cpu_s"] = _med(s["qsnap"], "cpu_s")
    out["load_rss_MiB"] = max((r.get("rss_MiB", 0) for r in l["qsnap"]), default=None)
    out["load_cpu_s"] = _med(l["qsnap"], "cpu_s")
    pcs = {}
    for pct, rows in res["postcopy"].items():
        if not isinstance(rows, list):
            pcs[pct] = rows
            continue
        p = {"running_s": _med(rows, "running_s"), "completed_s": _med(rows),
             "rss_MiB": max((r.get("rss_MiB", 0) for r in rows), default=None),
             "errors": [r["error"] for r in rows if "error" in r]}
        if p["completed_s"] and out["load_qsnap_s"]:
            p["completion_over_precopy"] = p["completed_s"] / out["load_qsnap_s"]
        lat = [_percentiles(r.get("stats") or {}) for r in rows]
        for k in ("p50", "p99", "max"):
            v = [x[k] for x in lat if k in x]
            if v:
                p[f"{k}_ms"] = statistics.median(v)
        pcs[pct] = p
    out["postcopy"] = pcs
    out.update(summarize_orchestration(res, out))
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarize_orchestration(res, out):
    """qsnap snapshot beside exec:qsnap save, qsnap restore --launch beside exec:qsnap load
    (and their postcopy forms): medians and same-run ratios."""
    snaps = res["save"].get("snapshot") or []
    bases = res["save"].get("snapshotbase") or []
    rams = res["save"].get("snapshotram") or []
    launches = res["load"].get("launch") or []
    qemu_start = _med(res["load"]["qsnap"], "qemu_start_s")
    s = {"qemu": res.get("qemu"), "machine_type": res.get("machine_type"),
         "save_snapshot_s": _med(snaps), "save_snapshot_all": [r["s"] for r in snaps],
         "snapshot_own_s": _med(snaps, "qsnap_seconds"),
         "snapshot_downtime_ms": _med(snaps, "downtime_ms"),
         "snapshot_downtime_all": [r.get("downtime_ms") for r in snaps],
         "snapshot_ram_s": _med(rams), "snapshot_ram_downtime_ms": _med(rams, "downtime_ms"),
         "snapshot_timelines": [r.get("timeline_ms") for r in snaps],
         "base_snapshot_s": _med(bases), "base_downtime_ms": _med(bases, "downtime_ms"),
         "base_downtime_all": [r.get("downtime_ms") for r in bases],
         "base_timelines": [r.get("timeline_ms") for r in bases],
         # QEMU's own query-migrate "downtime": its vm_stop_force_state to vm_start
         "qemu_downtime_ms": {"snapshot": _med(snaps, "qemu_downtime_ms"),
                              "snapshot_ram": _med(rams, "qemu_downtime_ms"),
                              "exec_save": _med(res["save"]["qsnap"], "qemu_downtime_ms")},
         "snapshot_ram_downtime_all": [r.get("downtime_ms") for r in rams],
         "load_launch_s": _med(launches), "load_launch_all": [r.get("s") for r in launches],
         "launch_restore_s": _med(launches, "restore_s"), "launch_errors": [r["error"] for r in launches
                                                                            if "error" in r],
         "dst_qemu_start_s": qemu_start,
         # guest RAM collapsed into huge pages before the pause (qsnap/vm/hugepages.py),
         # in a thread beside the rest of the preparation: part of "snapshot s"
         "snapshot_collapse_s": _med(snaps, "collapse_s"),
         "snapshot_collapse_all": [r.get("collapse_s") for r in snaps],
         "snapshot_ram_collapse_s": _med(rams, "collapse_s"),
         # CPU (user+sys) of the destination QEMU and of the qsnap load, per load row
         "load_cpu": {who: {"qemu_cpu_s": _med(rows, "qemu_cpu_s"), "load_cpu_s": _med(rows, "load_cpu_s"),
                            "qemu_cpu_all": [r.get("qemu_cpu_s") for r in rows],
                            "load_cpu_all": [r.get("load_cpu_s") for r in rows]}
                      for who, rows in (("exec", res["load"]["qsnap"]), ("launch", launches),
                                        ("snapload", res["load"].get("snapload") or []))}}
    s["snapshot_over_save"] = _ratio(s["save_snapshot_s"], out["save_qsnap_s"])
    s["downtime_over_base"] = _ratio(s["snapshot_downtime_ms"], s["base_downtime_ms"])
    s["snapshot_ram_over_save"] = _ratio(s["snapshot_ram_s"], out["save_qsnap_s"])
    s["launch_over_load"] = _ratio(s["load_launch_s"], out["load_qsnap_s"])
    snaploads = res["load"].get("snapload") or []
    s["load_snapimg_s"] = _med(snaploads)
    s["load_snapimg_all"] = [r.get("s") for r in snaploads]
    s["launch_over_snapimg_load"] = _ratio(s["load_launch_s"], s["load_snapimg_s"])
    # round by round, with which of the two went first (load_order)
    s["launch_rounds"] = [
        {"launch_s": a.get("s"), "exec_s": b.get("s"), "ratio": _ratio(a.get("s"), b.get("s")),
         "snapimg_s": c.get("s"), "first": next((w for w in order if w in ("launch", "qsnap")), None),
         "launch_qemu_cpu_s": a.get("qemu_cpu_s"), "launch_load_cpu_s": a.get("load_cpu_s"),
         "exec_qemu_cpu_s": b.get("qemu_cpu_s"), "exec_load_cpu_s": b.get("load_cpu_s"),
         "launch_load_s": _launch_load_s(a), "load_child": a.get("load")}
        for a, b, c, order in zip(launches, res["load"]["qsnap"], snaploads or [{}] * len(launches),
                                  res.get("load_orders") or [])]
    s["launch_restore_over_load"] = _ratio(s["launch_restore_s"], out["load_qsnap_s"])
    if qemu_start is not None and out["load_qsnap_s"]:
        s["launch_over_start_plus_load"] = _ratio(s["load_launch_s"], out["load_qsnap_s"] + qemu_start)
    lpc = {}
    for pct, rows in (res.get("launch_postcopy") or {}).items():
        if not isinstance(rows, list):
            lpc[pct] = rows
            continue
        base = out["postcopy"].get(pct) if isinstance(out["postcopy"].get(pct), dict) else {}
        p = {"completed_s": _med(rows), "restore_s": _med(rows, "restore_s"),
             "running_s": _med(rows, "running_s"), "errors": [r["error"] for r in rows if "error" in r]}
        p["completed_over_exec"] = _ratio(p["completed_s"], base.get("completed_s"))
        p["running_over_exec"] = _ratio(p["running_s"], base.get("running_s"))
        lpc[pct] = p
    s["launch_postcopy"] = lpc
    return s


def _launch_load_s(row):
    """The launch's load alone: its timeline's `setup` (or `active`) to `completed`, s."""
    t = row.get("timeline") or {}
    start = t.get("setup", t.get("active"))
    return None if start is None or t.get("completed") is None else round(t["completed"] - start, 3)


def _f(v, fmt="{:.2f}"):
    return "" if v is None else fmt.format(v)


def markdown(summaries, machine, args, elapsed, stamp):
    lines = ["# qsnap end-to-end benchmark", "",
             f"{stamp}; `python -m bench.e2e {' '.join(args)}`; "
             f"{elapsed / 60:.1f} min", "",
             ("Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) if machine
              else "Machine: not measured in this run (--skip-machine)"), "",
             "Medians of the rounds; ratios are qsnap / baseline within this run "
             "(< 1: qsnap faster). Save: background-snapshot for qsnap and cat "
             "(`cat > f && sync f`), HMP `savevm` (stops the VM) into a qcow2 drive + fsync. "
             "Load: every image and raw stream evicted from the page cache (fadvise DONTNEED) before each load, `migrate-incoming` to status completed.", "",
             "## Save", "",
             "| guest | non-zero | stream MiB | image MiB | qsnap s | cat+sync s | savevm s "
             "| qsnap/cat | qsnap/savevm | qsnap RSS MiB | qsnap CPU s | host load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        lines.append(f"| {s['guest']} | {s['fill_pct']}% | {s['stream_MiB']:.0f} | {s['image_MiB']:.0f} "
                     f"| {_f(s['save_qsnap_s'])} | {_f(s['save_cat_s'])} | {_f(s['save_savevm_s'])} "
                     f"| {_f(s.get('save_qsnap_over_cat'))} | {_f(s.get('save_qsnap_over_savevm'))} "
                     f"| {_f(s['save_rss_MiB'], '{:.0f}')} | {_f(s['save_cpu_s'])} "
                     f"| {_f(s.get('loadavg_1min'), '{:.1f}')} |")
    lines += ["", "## Load", "",
              "| guest | non-zero | qsnap precopy s | cat raw s | qsnap/cat | qsnap RSS MiB "
              "| qsnap CPU s | postcopy 0%: running / completed s | postcopy 50%: running / completed s "
              "| postcopy p50 / p99 ms |",
              "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for s in summaries:
        pcol = []
        lat = ""
        for pct in ("0", "50"):
            p = s["postcopy"].get(pct)
            if isinstance(p, dict):
                pcol.append(f"{_f(p['running_s'], '{:.3f}')} / {_f(p['completed_s'])}"
                            + (f" ({p['completion_over_precopy']:.2f}x)" if p.get("completion_over_precopy") else ""))
                if "p99_ms" in p:
                    lat += f"{pct}%: {_f(p.get('p50_ms'))} / {_f(p['p99_ms'])} "
            else:
                pcol.append(p or "not run")
        lines.append(f"| {s['guest']} | {s['fill_pct']}% | {_f(s['load_qsnap_s'])} | {_f(s['load_cat_s'])} "
                     f"| {_f(s.get('load_qsnap_over_cat'))} | {_f(s['load_rss_MiB'], '{:.0f}')} "
                     f"| {_f(s['load_cpu_s'])} | {pcol[0]} | {pcol[1]} | {lat or 'n/a'} |")
    lines += orchestration_markdown(summaries)
    lines += ["", "## Targets", ""] + targets(summaries)
    return "\n".join(lines) + "\n"


def targets(summaries):
    out = []

    def check(name, vals, limit, fmt="{:.2f}"):
        vals = [v for v in vals if v is not None]
        if not vals:
            out.append(f"- {name} ≤ {limit}: not measured")
            return
        worst = max(vals)
        out.append(f"- {name} ≤ {limit}: {'met' if worst <= limit else 'MISSED'} "
                   f"(worst {fmt.format(worst)}, best {fmt.format(min(vals))})")

    check("save qsnap / cat+sync", [s.get("save_qsnap_over_cat") for s in summaries], TARGETS["save_over_cat"])
    check("precopy load qsnap / cat", [s.get("load_qsnap_over_cat") for s in summaries], TARGETS["load_over_cat"])
    pcs = [p for s in summaries for p in s["postcopy"].values() if isinstance(p, dict)]
    check("peak RSS MiB (save, load, postcopy load)", [s.get("save_rss_MiB") for s in summaries]
          + [s.get("load_rss_MiB") for s in summaries] + [p.get("rss_MiB") for p in pcs],
          TARGETS["rss_MiB"], "{:.0f}")
    if not pcs:
        out.append("- postcopy (running ≤ 0.5 s, completion ≤ 1.2 × precopy, p99 ≤ 2 ms): "
                   "not available (no qsnap.postcopy in this build)")
    else:
        check("postcopy running s", [p.get("running_s") for p in pcs], TARGETS["postcopy_running_s"], "{:.3f}")
        check("postcopy completion / precopy", [p.get("completion_over_precopy") for p in pcs],
              TARGETS["postcopy_completion_over_precopy"])
        check("postcopy request p99 ms", [p.get("p99_ms") for p in pcs], TARGETS["postcopy_p99_ms"])
    check("qsnap snapshot / exec:qsnap save", [s.get("snapshot_over_save") for s in summaries],
          TARGETS["snapshot_over_save"])
    check(f"background snapshot downtime ms ({DISKS} disks)", [s.get("snapshot_downtime_ms") for s in summaries],
          TARGETS["snapshot_downtime_ms"], "{:.1f}")
    # what the orchestration adds to the restore a user makes by hand: a QEMU started with
    # -incoming defer, then migrate-incoming "exec:qsnap load IMG" (the exec: rows time
    # the load alone; restore --launch starts its QEMU itself)
    check("qsnap restore --launch / (QEMU start + exec:qsnap load)",
          [s.get("launch_over_start_plus_load") for s in summaries], TARGETS["launch_over_start_plus_load"])
    return out


def orchestration_markdown(summaries):
    if not any(s.get("save_snapshot_s") or s.get("load_launch_s") for s in summaries):
        return []
    lines = ["", "## qsnap snapshot and qsnap restore --launch", "",
             f"`qsnap snapshot --mode=background --disks=overlay` ({DISKS} qcow2 drives) through a second "
             "QMP socket, wall time of the command, beside `exec:qsnap save` on the same guest; "
             "downtime is the command's own `downtime_ms` (QEMU's STOP to RESUME events). "
             "`qsnap restore --launch --drop-arg=-device` of the last snapshot (wall time of the "
             "command: QEMU start-up included; \"restore\" is its JSON `seconds`, from QMP connected), "
             "beside `exec:qsnap load` (from `migrate-incoming` on an already started QEMU; "
             "\"QEMU start\" is that QEMU's start-up to QMP ready).", "",
             "| QEMU | guest | non-zero | snapshot s | its own s | exec save s | snapshot/save "
             "| downtime ms (rounds) | launch s | restore s | exec load s | QEMU start s "
             "| launch/load | restore/load | launch/(start+load) |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        downs = ", ".join(_f(v, "{:.0f}") for v in s.get("snapshot_downtime_all") or [])
        lines.append(
            f"| {s.get('qemu')} | {s['guest']} | {s['fill_pct']}% | {_f(s.get('save_snapshot_s'))} "
            f"| {_f(s.get('snapshot_own_s'))} | {_f(s['save_qsnap_s'])} | {_f(s.get('snapshot_over_save'))} "
            f"| {_f(s.get('snapshot_downtime_ms'), '{:.0f}')} ({downs}) | {_f(s.get('load_launch_s'))} "
            f"| {_f(s.get('launch_restore_s'))} | {_f(s['load_qsnap_s'])} | {_f(s.get('dst_qemu_start_s'))} "
            f"| {_f(s.get('launch_over_load'))} | {_f(s.get('launch_restore_over_load'))} "
            f"| {_f(s.get('launch_over_start_plus_load'))} |")
    rounds = [(s, i, r) for s in summaries for i, r in enumerate(s.get("launch_rounds") or [])]
    if rounds:
        lines += ["", "Round by round (each load after the images and streams were evicted from the "
                  "page cache; \"first\" is which of the two ran first in that round):", "",
                  "| QEMU | guest | round | first | launch s | its load s | exec load s | launch/load "
                  "| exec load of the launch's image s | CPU s launch: QEMU / load | CPU s exec: QEMU / load |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
        for s, i, r in rounds:
            first = {"qsnap": "exec", "launch": "launch"}.get(r["first"], "")
            lines.append(f"| {s.get('qemu')} | {s['guest']} | {i + 1} | {first} | {_f(r['launch_s'])} "
                         f"| {_f(r.get('launch_load_s'))} | {_f(r['exec_s'])} | {_f(r['ratio'])} "
                         f"| {_f(r.get('snapimg_s'))} | {_f(r.get('launch_qemu_cpu_s'))} / "
                         f"{_f(r.get('launch_load_cpu_s'))} | {_f(r.get('exec_qemu_cpu_s'))} / "
                         f"{_f(r.get('exec_load_cpu_s'))} |")
    if any(s.get("snapshot_collapse_s") is not None for s in summaries):
        lines += ["", "Guest RAM collapsed into huge pages before the pause (`hugepages.seconds` of the "
                  "summary; in a thread beside the overlays' and the save's start, part of snapshot s):", "",
                  "| QEMU | guest | collapse s, with disks (rounds) | collapse s, RAM only |", "|---|---|---|---:|"]
        for s in summaries:
            rounds_ = ", ".join(_f(v) for v in s.get("snapshot_collapse_all") or [])
            lines.append(f"| {s.get('qemu')} | {s['guest']} | {_f(s.get('snapshot_collapse_s'))} ({rounds_}) "
                         f"| {_f(s.get('snapshot_ram_collapse_s'))} |")
    if any(s.get("snapshot_ram_s") for s in summaries):
        lines += ["", "RAM only (`--disks=none`: QEMU stops and resumes the guest itself, no QMP "
                  "round trips while it is paused):", "",
                  "| QEMU | guest | snapshot --disks=none s | snapshot/save | downtime ms (rounds) |",
                  "|---|---|---:|---:|---|"]
        for s in summaries:
            downs = ", ".join(_f(v, "{:.0f}") for v in s.get("snapshot_ram_downtime_all") or [])
            lines.append(f"| {s.get('qemu')} | {s['guest']} | {_f(s.get('snapshot_ram_s'))} "
                         f"| {_f(s.get('snapshot_ram_over_save'))} "
                         f"| {_f(s.get('snapshot_ram_downtime_ms'), '{:.0f}')} ({downs}) |")
    if any(s.get("base_downtime_ms") for s in summaries):
        lines += ["", "Before/after in the same run (--baseline: the other tree's `qsnap snapshot` "
                  "with disks, alternating with this one's):", "",
                  "| QEMU | guest | downtime ms, this tree (rounds) | downtime ms, baseline (rounds) "
                  "| this/baseline | snapshot s, this / baseline |", "|---|---|---|---|---:|---|"]
        for s in summaries:
            this = ", ".join(_f(v, "{:.0f}") for v in s.get("snapshot_downtime_all") or [])
            base = ", ".join(_f(v, "{:.0f}") for v in s.get("base_downtime_all") or [])
            lines.append(f"| {s.get('qemu')} | {s['guest']} | {_f(s.get('snapshot_downtime_ms'), '{:.0f}')} "
                         f"({this}) | {_f(s.get('base_downtime_ms'), '{:.0f}')} ({base}) "
                         f"| {_f(s.get('downtime_over_base'))} | {_f(s.get('save_snapshot_s'))} / "
                         f"{_f(s.get('base_snapshot_s'))} |")
    tls = [(s, who, t) for s in summaries for who, key in (("this", "snapshot_timelines"),
                                                           ("baseline", "base_timelines"))
           for t in s.get(key) or [] if t]
    if tls:
        lines += ["", "Timelines of the snapshots with disks (the harness's QMP events, ms after the STOP):",
                  ""]
        for s, who, t in tls:
            lines.append(f"* {s.get('qemu')} {s['guest']} {who}: "
                         + ", ".join(f"{what} {ms:g}" for what, ms in t))
    qd = [(s, s.get("qemu_downtime_ms") or {}) for s in summaries]
    if any(v is not None for _, d in qd for v in d.values()):
        lines += ["", "QEMU's own `downtime` (query-migrate after completion: from its stop of the VM "
                  "in the background-snapshot thread to its vm_start; when qsnap has paused the guest "
                  "before `migrate`, QEMU's stop finds it paused already):", "",
                  "| QEMU | guest | exec:qsnap save | snapshot --disks=none | snapshot --disks=overlay |",
                  "|---|---|---:|---:|---:|"]
        for s, d in qd:
            lines.append(f"| {s.get('qemu')} | {s['guest']} | {_f(d.get('exec_save'), '{:.0f}')} "
                         f"| {_f(d.get('snapshot_ram'), '{:.0f}')} | {_f(d.get('snapshot'), '{:.0f}')} |")
    pcs = [(s, pct, p) for s in summaries for pct, p in (s.get("launch_postcopy") or {}).items()]
    if pcs:
        lines += ["", "| QEMU | guest | postcopy | launch: running / completed s | exec: running / completed s "
                  "| running launch/exec | completed launch/exec |", "|---|---|---:|---|---|---:|---:|"]
        for s, pct, p in pcs:
            if not isinstance(p, dict):
                lines.append(f"| {s.get('qemu')} | {s['guest']} | {pct}% | {p} | | | |")
                continue
            e = s["postcopy"].get(pct) if isinstance(s["postcopy"].get(pct), dict) else {}
            lines.append(f"| {s.get('qemu')} | {s['guest']} | {pct}% | {_f(p['running_s'], '{:.3f}')} / "
                         f"{_f(p['completed_s'])} | {_f(e.get('running_s'), '{:.3f}')} / {_f(e.get('completed_s'))} "
                         f"| {_f(p.get('running_over_exec'))} | {_f(p.get('completed_over_exec'))} |")
    errs = [e for s in summaries for e in s.get("launch_errors") or []]
    errs += [e for s in summaries for p in (s.get("launch_postcopy") or {}).values()
             if isinstance(p, dict) for e in p["errors"]]
    if errs:
        lines += ["", "Failed rounds: " + "; ".join(e.splitlines()[0][:200] for e in errs)]
    return lines


def plot(summaries, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (pip install 'qsnap[bench]'): no plot")
        return False
    labels = [f"{s['guest']}\n{s['fill_pct']}%" for s in summaries]
    x = np.arange(len(summaries))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(summaries) + 4), 4.8))
    series = [("save", [("qsnap save", "save_qsnap_s"), ("cat > f; sync", "save_cat_s"),
                        ("HMP savevm", "save_savevm_s")]),
              ("load (cold cache)", [("qsnap load", "load_qsnap_s"), ("cat raw", "load_cat_s")])]
    pcts = sorted({k for s in summaries for k, v in s["postcopy"].items() if isinstance(v, dict)})
    for pct in pcts:
        series[1][1].append((f"postcopy {pct}% completed", ("pc", pct, "completed_s")))
        series[1][1].append((f"postcopy {pct}% running", ("pc", pct, "running_s")))
    for ax, (title, ss) in zip(axes, series):
        w = 0.8 / len(ss)
        for i, (name, key) in enumerate(ss):
            if isinstance(key, tuple):
                vals = [(s["postcopy"].get(key[1]) or {}).get(key[2]) if isinstance(s["postcopy"].get(key[1]), dict)
                        else None for s in summaries]
                err = None
            else:
                vals = [s.get(key) for s in summaries]
                alls = [s.get(key[:-2] + "_all") or [] for s in summaries]
                err = [[max(0, (v or 0) - min(a, default=v or 0)) for v, a in zip(vals, alls)],
                       [max(0, max(a, default=v or 0) - (v or 0)) for v, a in zip(vals, alls)]]
            ax.bar(x + (i - (len(ss) - 1) / 2) * w, [v or 0 for v in vals], w, label=name,
                   yerr=err, capsize=2, error_kw={"elinewidth": 0.8})
        ax.set_xticks(x, labels)
        ax.set_ylabel("seconds (median; bars: min-max of rounds)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("qsnap vs baselines, QEMU blob guests (guest size, non-zero share)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512M,1G,2G,4G", help="guest RAM sizes (default 512M,1G,2G,4G)")
    ap.add_argument("--fill", default="0,50,100", help="non-zero shares in %% (default 0,50,100)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--postcopy", default="0,50", help="postcopy percentages (when available)")
    ap.add_argument("--dir", default="/var/tmp", help="work directory on the disk to measure")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="results directory")
    ap.add_argument("--name", default="e2e", help="base name of the result files")
    ap.add_argument("--no-savevm", action="store_true")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="leave out qsnap snapshot and qsnap restore --launch")
    ap.add_argument("--qemu", default="7.2", metavar="PATH_OR_VERSION",
                    help="7.2 (the installed qemu-system-x86_64), 10.0 (unpacked: qsnaptest.builds', "
                    "else /tmp/q10/root) or a binary's path; machine type pc-i440fx-<its version>")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--drop-caches", action="store_true",
                    help="echo 3 > drop_caches before each load instead of fadvise on the files")
    ap.add_argument("--skip-machine", action="store_true", help="do not measure disk and pipe")
    ap.add_argument("--baseline", metavar="TREE",
                    help="another qsnap tree (extension built) whose qsnap snapshot runs beside "
                    "this one's, alternating: same-run before/after")
    ap.add_argument("--replot", metavar="JSON", help="rebuild .md/.png from a results JSON, no run")
    args = ap.parse_args(argv)
    if args.replot:
        d = json.loads(Path(args.replot).read_text())
        summaries = [summarize(r) for r in d["raw"]]
        args.stamp = d.get("time") or time.strftime("%Y-%m-%d %H:%M", time.localtime(Path(args.replot).stat().st_mtime))
        md = _write(args, d["machine"], d["raw"], summaries, d["argv"], d["elapsed_s"])
        print(md)
        return 0
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    fills = [float(f) / 100 for f in args.fill.split(",") if f]
    pcts = [p for p in args.postcopy.split(",") if p]
    global DROP_ALL, BUILD, BASELINE
    DROP_ALL = args.drop_caches
    BASELINE = os.path.abspath(args.baseline) if args.baseline else None
    try:
        BUILD = find_qemu(args.qemu)
    except builds.BuildUnavailable as e:
        ap.error(f"--qemu {args.qemu}: {e}")
    use_build(BUILD)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    work = Path(tempfile.mkdtemp(prefix="qsnap-e2e-", dir=args.dir))
    compile_qsnap_once(work / "pycache", ["qsnap.cli", "qsnap.save", "qsnap.load", "qsnap.image.reader",
                                          "qsnap.image.writer", "qsnap.stream.reader",
                                          "qsnap.vm.snapshot", "qsnap.vm.restore", "qsnap.vm.cmdline"])
    if postcopy_available():
        subprocess.run([sys.executable, "-c", "import qsnap.postcopy"], check=True)
    t_start = time.monotonic()
    try:
        machine = {} if args.skip_machine else describe_machine(work)
        log(f"machine: {machine}")
        raw, summaries = [], []
        for mem in sizes:
            for fill in fills:
                res = run_case(mem, fill, args.rounds, work, pcts, args.timeout, not args.no_savevm,
                               not args.no_snapshot)
                raw.append(res)
                summaries.append(summarize(res))
                _write(args, machine, raw, summaries, argv, time.monotonic() - t_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = _write(args, machine, raw, summaries, argv, time.monotonic() - t_start)
    print(md)
    return 0


def _write(args, machine, raw, summaries, argv, elapsed):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = getattr(args, "stamp", None) or time.strftime("%Y-%m-%d %H:%M")
    md = markdown(summaries, machine, argv, elapsed, stamp)
    (out / f"{args.name}.md").write_text(md)
    (out / f"{args.name}.json").write_text(json.dumps(
        {"time": stamp, "argv": argv, "elapsed_s": elapsed, "machine": machine, "targets": TARGETS,
         "postcopy_available": postcopy_available(), "summaries": summaries, "raw": raw}, indent=1))
    plot(summaries, out / f"{args.name}.png")
    return md


if __name__ == "__main__":
    sys.exit(main())
