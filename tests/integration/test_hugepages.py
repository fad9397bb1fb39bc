"""A guest whose RAM is a 2 MiB hugetlbfs backend, saved and restored with real QEMU.

The source has postcopy-ram on (precopy completes; the stream then carries
POSTCOPY_ADVISE and the block's page size in MEM_SIZE), so the image records
page size 2 MiB for the backend's block.  Restores by precopy ``qsnap load``
and by ``qsnap load --postcopy`` into destinations with the same backend must
give the same RAM as replaying the raw stream (``exec:cat``).

Needs a mounted hugetlbfs with 2 MiB pages and enough free huge pages (two
64 MiB guests at a time).  As root, for example::

    echo 128 > /proc/sys/vm/nr_hugepages
    mkdir -p /tmp/qsnap-hugetlbfs && mount -t hugetlbfs -o pagesize=2M none /tmp/qsnap-hugetlbfs

``QSNAP_HUGETLBFS=DIR`` picks the mount; otherwise the first 2 MiB hugetlbfs
mount of /proc/mounts is used.  Without one the tests skip and say why.
"""
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigcmp import assert_same

from qsnaptest import guests
from qsnaptest.qemu import BlobGuest, Qemu, parse_size
from qsnaptest.tools import wait_save
from .test_postcopy import assert_same_ram, postcopy_restore, qsnap

ROOT = Path(__file__).resolve().parents[2]
HUGE = 2 << 20
MEMORY = "64M"
LAYOUT = [(16 << 20, 20 << 20), (40 << 20, 0x23456), (44 << 20, 3 << 20)]
BACKEND_ID = "hmem"
BLOCK = BACKEND_ID   # a memory backend's RAM block is named by its id
GUESTS_AT_ONCE = 2


@pytest.fixture(autouse=True)
def _pythonpath(monkeypatch):
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + old if old else ""))


def _hugetlbfs_2m():
    """A writable 2 MiB hugetlbfs mount, or None."""
    want = os.environ.get("QSNAP_HUGETLBFS")
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        f = line.split()
        if len(f) < 4 or f[2] != "hugetlbfs":
            continue
        opts = f[3].split(",")
        size = next((o.split("=", 1)[1] for o in opts if o.startswith("pagesize=")), None)
        if size not in (None, "2M", "2048k", "2048K"):
            continue
        if size is None and _meminfo("Hugepagesize") != 2048:
            continue
        path = f[1].replace("\\040", " ")
        if want and os.path.realpath(want) != os.path.realpath(path):
            continue
        if os.access(path, os.W_OK):
            return path
    return None


def _meminfo(key):
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@pytest.fixture(scope="module")
def hugetlbfs(qemu_bin):
    path = _hugetlbfs_2m()
    if path is None:
        pytest.skip("no writable 2 MiB hugetlbfs mount (mount -t hugetlbfs -o pagesize=2M none DIR; "
                    "QSNAP_HUGETLBFS=DIR)")
    free = _meminfo("HugePages_Free") or 0
    need = GUESTS_AT_ONCE * (parse_size(MEMORY) // HUGE)
    if free < need:
        pytest.skip(f"{free} free 2 MiB huge pages, {need} needed "
                    f"(echo {need} > /proc/sys/vm/nr_hugepages as root)")
    return path


def huge_args(path):
    return ["-object", f"memory-backend-file,id={BACKEND_ID},size={MEMORY},mem-path={path},"
            f"share=off,prealloc=off", "-numa", f"node,memdev={BACKEND_ID}"]


@pytest.fixture(scope="module")
def huge_saved(hugetlbfs, tmp_path_factory):
    d = tmp_path_factory.mktemp("huge")
    guests.check_blob_layout(LAYOUT, parse_size(MEMORY))
    blobs = guests.make_blobs(d, LAYOUT, 21)
    img, raw = d / "huge.qsnap", d / "huge.stream"
    with BlobGuest(memory=MEMORY, blobs=blobs, args=huge_args(hugetlbfs), name="hsrc") as vm:
        vm.wait_bios_done()
        vm.set_parameters(max_bandwidth=16 << 30)
        # postcopy-ram on the source: ADVISE + per-block page size on the wire; precopy completes
        vm.set_capabilities(postcopy_ram=True)
        vm.migrate(f"exec:tee {shlex.quote(str(raw))} | {qsnap('save', '-q', img)}")
        wait_save(vm, timeout=120)
    return blobs, img, raw


def dest(hugetlbfs, name):
    return Qemu(memory=MEMORY, incoming=True, paused=True, name=name, args=huge_args(hugetlbfs))


@pytest.mark.all_qemu
def test_info_shows_huge_page_size(huge_saved):
    _blobs, img, _raw = huge_saved
    out = subprocess.run([sys.executable, "-m", "qsnap", "info", "--output", "json", str(img)],
                         check=True, capture_output=True, text=True).stdout
    blocks = {b["idstr"]: b for b in json.loads(out)["ram_blocks"]}
    assert BLOCK in blocks, sorted(blocks)
    assert blocks[BLOCK]["page_size"] == HUGE
    assert blocks[BLOCK]["length"] == parse_size(MEMORY)
    assert all(b["page_size"] == 4096 for n, b in blocks.items() if n != BLOCK)


@pytest.mark.all_qemu
@pytest.mark.parametrize("mode", ["precopy", "postcopy=0", "postcopy=50"])
def test_huge_restore_matches_cat(huge_saved, hugetlbfs, tmp_path, mode):
    blobs, img, raw = huge_saved
    stats = tmp_path / "stats.json"
    with dest(hugetlbfs, "hcat") as a:
        # the raw stream is a postcopy-ram source's: the destination needs postcopy-ram too
        a.set_capabilities(postcopy_ram=True)
        a.migrate_incoming(f"exec:cat {shlex.quote(str(raw))}")
        a.wait_migration(timeout=120)
        with dest(hugetlbfs, "hq") as b:
            if mode == "precopy":
                b.migrate_incoming("exec:" + qsnap("load", img))
                b.wait_migration(timeout=120)
            else:
                pct = int(mode.split("=")[1])
                # 64 MiB is too quick to see postcopy-active reliably; the stats tell
                postcopy_restore(b, img, pct, stats=stats, timeout=120)
            for bl in blobs:
                assert_same(b.read_memory(bl.addr, len(bl.data)), bl.data, "b.read_memory(bl.addr, len(bl.data))")
            assert_same_ram(a, b, tmp_path)
    if mode != "precopy":
        s = json.loads(stats.read_text())
        assert s["shut"] == 0 and sorted(s["pongs"]) == [1, 2, 3, 4]
        assert s["pages_postcopy"] > 0
        assert (s["pages_precopy"] > 1000) == (mode == "postcopy=50")


SLOW = (f"{shlex.quote(sys.executable)} -c " + shlex.quote(
    "import os,time\n"
    "while True:\n"
    "  b=os.read(0,262144)\n"
    "  if not b: break\n"
    "  os.write(1,b); time.sleep(0.01)\n"))


def test_huge_pages_requested_during_postcopy(huge_saved, hugetlbfs, tmp_path):
    """Reading guest memory during postcopy faults huge pages in: QEMU requests whole
    2 MiB pages over the return path and qsnap serves them ahead of the stream."""
    blobs, img, raw = huge_saved
    stats, errf = tmp_path / "stats.json", tmp_path / "err"
    with dest(hugetlbfs, "hcat") as a:
        a.set_capabilities(postcopy_ram=True)
        a.migrate_incoming(f"exec:cat {shlex.quote(str(raw))}")
        a.wait_migration(timeout=120)
        with dest(hugetlbfs, "hq") as b:
            b.set_capabilities(postcopy_ram=True)
            b.migrate_incoming("exec:" + qsnap("load", "--postcopy=0", "--stats", stats, img)
                               + f" 2> {shlex.quote(str(errf))} | {SLOW}")
            deadline = time.monotonic() + 60
            while b.query_migrate().get("status") != "postcopy-active":
                assert b.query_migrate().get("status") != "completed", "postcopy ended too soon"
                assert time.monotonic() < deadline, errf.read_text() if errf.exists() else ""
                time.sleep(0.005)
            last = blobs[-1]
            # the blob's huge pages come last in the background order; this read faults them
            assert_same(b.read_memory(last.addr, len(last.data)), last.data, "b.read_memory(last.addr, len(last.data))")
            assert b.query_migrate().get("status") == "postcopy-active"
            b.wait_migration(timeout=120)
            assert_same_ram(a, b, tmp_path)
    s = json.loads(stats.read_text())
    # host pages: the 3 MiB blob at 44 MiB spans two 2 MiB pages
    assert s["pages_requested"] >= 1 and s["requests"] >= 1, s
    assert s["shut"] == 0, s
