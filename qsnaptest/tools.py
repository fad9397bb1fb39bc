"""Running qsnap behind real QEMU: exec: command lines, environment, image checks.

QEMU runs ``exec:`` URIs with ``/bin/sh -c``; the commands here run qsnap as
``<this python> -m qsnap`` with PYTHONPATH pointing at this checkout, so the
tests exercise the tree under test, not an installed copy.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qsnaptest.qemu import PAGE_SIZE, BlobGuest, QemuError

ROOT = Path(__file__).resolve().parents[1]


def qsnap_env() -> dict:
    """Environment for QEMU (and so for its exec: children) that finds this qsnap."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def blob_guest(blobs, memory, **kw):
    """A started blob guest whose SeaBIOS has halted, so its RAM holds just the blobs."""
    kw.setdefault("accel", "tcg")  # SeaBIOS halts at once under TCG (KVM: ~4 s of probing)
    vm = BlobGuest(memory=memory, blobs=blobs, env=qsnap_env(), **kw).start()
    try:
        vm.wait_bios_done()
    except BaseException:
        vm.shutdown()
        raise
    return vm


def qsnap_cmd(*args) -> str:
    """Shell command line running qsnap with ``args`` (for exec: URIs)."""
    return " ".join([shlex.quote(sys.executable), "-m", "qsnap"] + [shlex.quote(str(a)) for a in args])


def run_qsnap(*args, stdin=None, check=False, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qsnap", *map(str, args)], stdin=stdin,
                          capture_output=True, env=qsnap_env(), timeout=timeout, check=check)


def qsnap_info(img) -> dict:
    r = run_qsnap("info", "--output=json", img, check=True)
    return json.loads(r.stdout)


def error_lines(stderr) -> list:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    return [ln for ln in text.splitlines() if ln.startswith("qsnap: error:")]


def wait_save_done(vm, timeout=120.0):
    """After QEMU reported 'completed': wait until the exec: command exited.

    Without a return path QEMU marks the migration completed as soon as it has
    written the stream and closes the pipe and reaps the command only later,
    in migration_cleanup(), a bottom half of the main loop: qemu_fclose() ->
    qio_channel_command_close() closes both pipe ends, then blocks in
    waitpid() (io/channel-command.c). QEMU 10.0 sets COMPLETED in
    migration_completion_end() with the BQL held, drops it, and takes it again
    in (bg_)migration_iteration_finish() to schedule that bottom half
    (migration/migration.c): a query-migrate waiting for the BQL runs in
    between and says 'completed' while qsnap still writes its tables (the
    image appeared 20-600 ms later in 3 of 6 background snapshots; never on
    7.2, which sets the state right before scheduling the cleanup). Once the
    bottom half runs, the monitor waits for the command. The image is in place
    (or the save failed) when the command has exited.
    """
    vm.wait_no_descendants(timeout)


def wait_save(vm, timeout=120.0) -> dict:
    """Wait for a save through ``exec:`` to end: 'completed', then the command's exit.

    Returns the final query-migrate (QemuError if the migration failed)."""
    info = vm.wait_migration(timeout=timeout)
    wait_save_done(vm, timeout)
    return info


def qemu_img_check(img):
    r = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, f"qemu-img check {img}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    rep = json.loads(r.stdout)
    for key in ("corruptions", "leaks", "check-errors"):
        assert rep.get(key, 0) == 0, f"qemu-img check {img}: {key}={rep.get(key)}: {rep}"
    return rep


def qemu_img_raw(img, raw):
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True,
                   capture_output=True)
    return Path(raw)


def qemu_img_map(img) -> list:
    r = subprocess.run(["qemu-img", "map", "--output=json", str(img)], check=True,
                       capture_output=True, text=True)
    return json.loads(r.stdout)


def host_offset(img, voff) -> int:
    """Host file offset of virtual offset ``voff`` (which must be allocated)."""
    for ext in qemu_img_map(img):
        if ext["start"] <= voff < ext["start"] + ext["length"] and ext.get("data"):
            return ext["offset"] + voff - ext["start"]
    raise AssertionError(f"virtual offset {voff:#x} of {img} is not allocated")


def nonzero_pages(raw_path, start, length) -> int:
    """Number of non-zero target pages in ``[start, start+length)`` of a raw file."""
    n = 0
    step = 64 << 20
    with open(raw_path, "rb") as f:
        for off in range(start, start + length, step):
            f.seek(off)
            buf = f.read(min(step, start + length - off))
            buf += bytes(-len(buf) % PAGE_SIZE)
            a = np.frombuffer(buf, np.uint64).reshape(-1, PAGE_SIZE // 8)
            n += int(np.count_nonzero(a.any(axis=1)))
    return n


def check_blobs_in_raw(raw_path, block_offset, blobs):
    with open(raw_path, "rb") as f:
        for b in blobs:
            f.seek(block_offset + b.addr)
            got = f.read(len(b.data))
            if got != b.data:
                bad = next((i for i in range(min(len(got), len(b.data))) if got[i] != b.data[i]), len(got))
                raise AssertionError(f"blob at {b.addr:#x} differs in the image at +{bad:#x}")


def block(info, idstr="pc.ram") -> dict:
    for b in info["ram_blocks"]:
        if b["idstr"] == idstr:
            return b
    raise AssertionError(f"no block {idstr!r} in {[b['idstr'] for b in info['ram_blocks']]}")


def temp_leftovers(img) -> list:
    img = Path(img)
    return sorted(img.parent.glob(f".{img.name}.qsnap-*"))


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise QemuError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def compare_ram(a: bytes, b: bytes, what="RAM"):
    """Assert two pc.ram dumps are identical outside the VGA/ROM window."""
    assert len(a) == len(b), f"{what}: sizes {len(a)} != {len(b)}"
    mem = len(a)
    for lo, hi in ((0, 0xa0000), (0x100000, mem)):
        if a[lo:hi] != b[lo:hi]:
            bad = next(i for i in range(lo, hi, PAGE_SIZE) if a[i:i + PAGE_SIZE] != b[i:i + PAGE_SIZE])
            raise AssertionError(f"{what} differs at page {bad:#x}")


# --- postcopy restores (tests and bench) ---

def save_with_tee(vm, img, raw, timeout=300):
    """Background snapshot of ``vm`` into ``img`` (qsnap save) and ``raw`` (tee)."""
    vm.set_parameters(max_bandwidth=16 << 30)
    vm.set_capabilities(background_snapshot=True)
    vm.migrate(f"exec:tee {shlex.quote(str(raw))} | {qsnap_cmd('save', '-q', img)}")
    wait_save(vm, timeout=timeout)
    assert img.exists() and raw.exists()


def wait_postcopy(dst, timeout=300, on_postcopy=None):
    """Poll query-migrate as fast as QMP allows; return (statuses seen, final info).

    The statuses come from polling and from QEMU's MIGRATION events, so a short
    postcopy-active phase between two polls is not missed."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        if not dst.is_running():
            raise QemuError(f"destination exited:\n{dst.log_tail()}")
        info = dst.query_migrate()
        st = info.get("status")
        if not seen or seen[-1] != st:
            seen.append(st)
            if st == "postcopy-active" and on_postcopy:
                on_postcopy(info)
        if st == "completed":
            for ev in dst.migration_statuses():
                if ev not in seen:
                    seen.append(ev)
            return seen, info
        if st in ("failed", "cancelled"):
            raise QemuError(f"migration {st}: {info.get('error-desc')}\n{dst.log_tail()}")
        if time.monotonic() > deadline:
            raise QemuError(f"migration still {st} after {timeout}s")


def slow_pipe(chunk=256 << 10, pause=0.01):
    """A command that passes stdin to stdout at about chunk/pause bytes per second."""
    return f"{shlex.quote(sys.executable)} -c " + shlex.quote(
        "import os,time\n"
        "while True:\n"
        f"  b=os.read(0,{chunk})\n"
        "  if not b: break\n"
        "  while b: b=b[os.write(1,b):]\n"
        f"  time.sleep({pause})\n")


def postcopy_restore(dst, img, pct, stats=None, blocktime=False, throttle=None, **kw):
    """throttle: a command qsnap's output goes through on its way to QEMU."""
    dst.set_capabilities(postcopy_ram=True, postcopy_blocktime=blocktime, events=True)
    extra = ["--stats", stats] if stats else []
    cmd = qsnap_cmd("load", f"--postcopy={pct}", *extra, img)
    dst.migrate_incoming("exec:" + cmd + (f" | {throttle}" if throttle else ""))
    return wait_postcopy(dst, **kw)


def assert_same_vm_ram(a, b, tmp_path):
    """The RAM of two running QEMUs (``ram_dump``) is byte-identical; else the first page that differs."""
    ra = a.ram_dump(tmp_path / "a.ram").read_bytes()
    rb = b.ram_dump(tmp_path / "b.ram").read_bytes()
    assert len(ra) == len(rb), f"RAM sizes {len(ra)} != {len(rb)}"
    if ra != rb:
        bad = next(i for i in range(0, len(ra), PAGE_SIZE) if ra[i:i + PAGE_SIZE] != rb[i:i + PAGE_SIZE])
        raise AssertionError(f"RAM differs at page {bad:#x}")
