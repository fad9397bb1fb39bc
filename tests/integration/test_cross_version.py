"""Snapshots across QEMU builds: saved on 7.2, restored into 10.0; 10.0 into 7.2 refused.

Needs both builds (``QSNAP_QEMU=7.2,10.0``, as in CI; skipped when
QSNAP_QEMU does not name both, failed when one of them is missing under
QSNAP_REQUIRE_QEMU=1).

* 7.2 -> 10.0: the live Linux guest, on 7.2 with ``pc-i440fx-7.2`` or
  ``pc-q35-7.2``, is saved by a background snapshot (``exec:tee RAW | qsnap
  save IMG``). A 10.0 destination with the same machine type restores IMG
  with ``qsnap load`` (precopy) or ``qsnap load --postcopy=0``; its RAM must
  be identical to a 10.0 destination that loaded RAW (``exec:cat``), and the
  guest must run on from where it was saved.
* 10.0 -> 7.2: a 7.2 QEMU knows no ``pc-i440fx-10.0`` and does not start with
  the 10.0 command line; a 7.2 destination with ``pc-i440fx-7.2`` refuses the
  stream of a ``pc-i440fx-10.0`` source (configuration section) and exits,
  whether the stream comes from ``cat`` or from ``qsnap load``. A 10.0 source
  with the 7.2 machine type (tests/data/pc100_m72.stream.gz) loads into 7.2.
"""

import gzip
import subprocess
from pathlib import Path

import pytest

from qsnaptest import builds, guests
from qsnaptest.qemu import BlobGuest, LinuxGuest, Qemu, QemuError
from qsnaptest.tools import (blob_guest, compare_ram, error_lines, postcopy_restore, qsnap_cmd,
                             qsnap_env, save_with_tee)
from .conftest import find_build

DATA = Path(__file__).resolve().parents[1] / "data"
OLD, NEW = "7.2", "10.0"


@pytest.fixture(scope="module")
def pair():
    """(7.2 build, 10.0 build)."""
    specs = builds.requested_specs()
    if OLD not in specs or NEW not in specs:
        pytest.skip(f"QSNAP_QEMU={','.join(specs)} does not name both {OLD} and {NEW}")
    return find_build(OLD), find_build(NEW)


def linux(files, build, machine, **kw):
    return LinuxGuest(*files, build=build, machine=machine, env=qsnap_env(), **kw)


@pytest.fixture(scope="module", params=["pc", "q35"])
def saved_on_old(request, pair, linux_guest_files, tmp_path_factory):
    """(machine, IMG, RAW, RAM of 10.0's own restore of RAW, tick before the save)."""
    old, new = pair
    machine = old.machine(request.param)
    d = tmp_path_factory.mktemp(f"from{OLD}-{request.param}")
    img, raw, ref_ram = d / "vm.qsnap", d / "vm.stream", d / "ref.ram"
    with linux(linux_guest_files, old, machine, name="src") as vm:
        vm.wait_ticks(2, timeout=180)
        before = vm.ticks()
        save_with_tee(vm, img, raw)
    with linux(linux_guest_files, new, machine, incoming=True, paused=True, name="ref") as ref:
        ref.migrate_incoming(f"exec:cat {raw}")
        ref.wait_migration(timeout=180)
        ref.ram_dump(ref_ram)
    return machine, img, raw, ref_ram, before


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_old_snapshot_restores_in_new(pair, saved_on_old, linux_guest_files, tmp_path, mode):
    _old, new = pair
    machine, img, _raw, ref_ram, before = saved_on_old
    with linux(linux_guest_files, new, machine, incoming=True, paused=True, name="dst") as dst:
        if mode == "precopy":
            dst.migrate_incoming("exec:" + qsnap_cmd("load", img))
            dst.wait_migration(timeout=180)
            dst.wait_no_descendants(30)
        else:
            seen, _ = postcopy_restore(dst, img, 0, timeout=300)
            assert "postcopy-active" in seen, seen
        assert dst.status() in ("paused", "prelaunch")
        ram = dst.ram_dump(tmp_path / "dst.ram").read_bytes()
        ref = ref_ram.read_bytes()
        assert len(ram) == len(ref) == dst.memory
        if ram != ref:
            compare_ram(ram, ref, f"RAM of qsnap's {mode} restore vs {NEW}'s restore of the stream")
            pytest.fail("RAM differs in [0xa0000, 0x100000) only")
        dst.cont()
        first = dst.wait_ticks(0, timeout=60)
        assert first >= before
        dst.wait_ticks(first + 2, timeout=60)
        assert dst.status() == "running"


def test_new_machine_type_unknown_to_old(pair):
    """The 10.0 command line (machine pc-i440fx-10.0) does not start 7.2 at all."""
    old, new = pair
    r = subprocess.run([old.binary, "-machine", new.machine("pc"), "-nodefaults", "-display", "none",
                        "-m", "32M", "-accel", "tcg", "-S", "-incoming", "defer"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert "unsupported machine type" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def saved_on_new(pair, tmp_path_factory):
    """A blob guest on 10.0 (pc-i440fx-10.0) saved into (IMG, RAW)."""
    _old, new = pair
    d = tmp_path_factory.mktemp(f"from{NEW}")
    blobs = guests.make_blobs(d / "blobs", [(16 << 20, 1 << 20)], 100)
    img, raw = d / "vm.qsnap", d / "vm.stream"
    vm = blob_guest(blobs, "64M", build=new)
    try:
        assert vm.machine == new.machine("pc")
        save_with_tee(vm, img, raw)
    finally:
        vm.shutdown()
    return img, raw


@pytest.mark.parametrize("source", ["cat", "qsnap"])
def test_new_snapshot_refused_by_old(pair, saved_on_new, source):
    """7.2 with pc-i440fx-7.2 rejects a pc-i440fx-10.0 stream and exits: what it prints."""
    old, new = pair
    img, raw = saved_on_new
    uri = f"exec:cat {raw}" if source == "cat" else "exec:" + qsnap_cmd("load", img)
    with Qemu(memory="64M", build=old, incoming=True, paused=True, env=qsnap_env(),
              name="old") as dst:
        assert dst.machine == old.machine("pc")
        dst.migrate_incoming(uri)
        with pytest.raises(QemuError, match=r"QEMU exited \(1\)"):
            dst.wait_migration(timeout=60)
        log = dst.log_tail(20000)
    assert (f"Machine type received is '{new.machine('pc')}' and local is "
            f"'{old.machine('pc')}'") in log, log
    assert "load of migration failed: Invalid argument" in log, log
    # qsnap load sees QEMU go away while it writes: one error line, no traceback
    assert "Traceback" not in log and len(error_lines(log)) <= 1, log


def test_new_build_with_old_machine_loads_in_old(pair, tmp_path):
    """A 10.0 source with pc-i440fx-7.2 sends no SWITCHOVER_START: 7.2 loads its stream."""
    old, _new = pair
    raw = tmp_path / "pc100_m72.stream"
    raw.write_bytes(gzip.decompress((DATA / "pc100_m72.stream.gz").read_bytes()))
    with BlobGuest(memory="32M", build=old, machine=old.machine("pc"), accel="tcg", serial=False,
                   incoming=True, paused=True, name="old") as dst:
        dst.migrate_incoming(f"exec:cat {raw}")
        assert dst.wait_migration(timeout=60)["status"] == "completed"
        assert dst.status() in ("paused", "prelaunch")
