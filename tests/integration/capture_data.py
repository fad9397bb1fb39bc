"""Capture the real QEMU streams committed under tests/data/ (see its README).

    python -m tests.integration.capture_data [NAME ...] [--out DIR]

Every case is a 32 MiB guest with no OS under TCG (so that no KVM-only
section such as kvmclock is in the stream and it loads under either
accelerator), ``-nodefaults``, migrated into a file by an unmodified QEMU:
``exec:cat > FILE`` (or ``file:FILE`` for mapped-ram). Precopy cases start
paused (``-S``: SeaBIOS never ran, pc.ram is all zero, every page is sent
exactly once); background cases let SeaBIOS halt first. Each capture is then
checked without qsnap: loaded into a fresh QEMU of the same build and
configuration, which must complete the migration (and hold the blobs
byte for byte where there are any). A source that opens a return path
(return-path, postcopy-ram) streams through a relay into that destination
while the bytes are written to the file, so the destination answers on the
return path as it would in a real migration. The 10.0 cases need the 10.0
build (``python -m qsnaptest.builds prepare 10.0``); the hugetlbfs case a
2 MiB hugetlbfs mount (``QSNAP_HUGETLBFS``, default /tmp/qsnap-hugetlbfs).
"""

import argparse
import gzip
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

from qsnaptest import builds, guests
from qsnaptest.qemu import BlobGuest, capture_stream

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DATA_FILE = DATA_DIR / "bg72-blob.stream.gz"
DATA_MEMORY = "32M"
DATA_SEED = 72
DATA_LAYOUT = [(0x1000000, 0x100000), (0x1400123, 0x2345), (0x1e00000, 0x10000)]
UUID = "5c6f8b4e-7a1d-4f0e-9d2c-3b8a1e6f7d90"
HUGE_BACKEND = "m"


@dataclass(frozen=True)
class Case:
    name: str
    build: str                       # "7.2" or "10.0" (qsnaptest.builds)
    kind: str                        # "precopy-paused", "background" or "mapped-ram"
    machine: str = "pc-i440fx-7.2"
    caps: Tuple[str, ...] = ()       # source capabilities (the destination gets them too)
    args: Tuple[str, ...] = ()       # extra QEMU arguments of source and destination
    blobs: bool = False
    hugetlbfs: bool = False          # main RAM is a 2 MiB hugetlbfs backend named "m"


CASES = {c.name: c for c in (
    Case("bg72-blob", "7.2", "background", blobs=True),
    Case("pc72", "7.2", "precopy-paused"),
    Case("bg72", "7.2", "background"),
    Case("rp72", "7.2", "precopy-paused", caps=("return-path",)),
    Case("hp72", "7.2", "precopy-paused", caps=("postcopy-ram",), hugetlbfs=True),
    Case("is72", "7.2", "precopy-paused", caps=("x-ignore-shared",)),
    Case("uuid72", "7.2", "precopy-paused", caps=("validate-uuid",), args=("-uuid", UUID)),
    Case("pc23", "7.2", "precopy-paused", machine="pc-i440fx-2.3"),
    Case("pc100", "10.0", "precopy-paused", machine="pc-i440fx-10.0"),
    Case("bg100", "10.0", "background", machine="pc-i440fx-10.0"),
    Case("pc100_m72", "10.0", "precopy-paused"),
    Case("mr100", "10.0", "mapped-ram", machine="pc-i440fx-10.0", caps=("mapped-ram",)),
)}

# Copies stdin to FILE and to the destination's unix socket, and the
# destination's return path back to stdout (QEMU reads it from the exec: child).
RELAY = r"""
import os, socket, sys, threading
path, addr = sys.argv[1:3]
s = socket.socket(socket.AF_UNIX)
s.connect(addr)
def back():
    while True:
        b = s.recv(1 << 16)
        if not b:
            break
        while b:
            b = b[os.write(1, b):]
    os.close(1)
t = threading.Thread(target=back)
t.start()
with open(path, "wb") as f:
    while True:
        b = os.read(0, 1 << 20)
        if not b:
            break
        f.write(b)
        s.sendall(b)
s.shutdown(socket.SHUT_WR)
t.join()
"""


def hugetlbfs_dir() -> str:
    return os.environ.get("QSNAP_HUGETLBFS", "/tmp/qsnap-hugetlbfs")


def case_args(case: Case) -> list:
    args = list(case.args)
    if case.hugetlbfs:
        args += ["-object", f"memory-backend-file,id={HUGE_BACKEND},size={DATA_MEMORY},"
                 f"mem-path={hugetlbfs_dir()},share=off",
                 "-machine", f"memory-backend={HUGE_BACKEND}"]
    return args


def _vm(case, build, td, **kw):
    blobs = guests.make_blobs(td, DATA_LAYOUT, DATA_SEED) if case.blobs else ()
    # bg72-blob was captured with a serial port, the others without one
    return BlobGuest(memory=DATA_MEMORY, machine=case.machine, accel="tcg", build=build,
                     blobs=blobs, args=case_args(case), serial=case.blobs, **kw)


def _caps(vm, case):
    if case.caps:
        vm.set_capabilities({c: True for c in case.caps})


def _migrate(case, src, dst, raw: Path, td: Path):
    """Send ``src`` into ``raw`` and into ``dst`` (started with -incoming defer)."""
    if case.kind == "mapped-ram":
        src.set_parameters(max_bandwidth=16 << 30)
        src.migrate(f"file:{raw}")
        src.wait_migration(timeout=60)
        dst.migrate_incoming(f"file:{raw}")
    elif "return-path" in case.caps or "postcopy-ram" in case.caps:
        sock = td / "dst.sock"
        dst.migrate_incoming(f"unix:{sock}")
        src.set_parameters(max_bandwidth=16 << 30)
        relay = " ".join(shlex.quote(a) for a in (sys.executable, "-c", RELAY, str(raw), str(sock)))
        src.migrate(f"exec:{relay}")
        src.wait_migration(timeout=60)
        src.wait_no_descendants()
    else:
        kind = "background" if case.kind == "background" else "precopy-live"
        capture_stream(src, raw, kind, timeout=60)
        dst.migrate_incoming(f"exec:cat {shlex.quote(str(raw))}")
    dst.wait_migration(timeout=60)


def capture(case: Case, out_dir: Path = DATA_DIR) -> dict:
    build = builds.find_build(case.build)
    with tempfile.TemporaryDirectory(prefix="qsnap-capture-") as td:
        td = Path(td)
        raw = td / f"{case.name}.stream"
        with _vm(case, build, td, name="src", paused=case.kind != "background") as src, \
                _vm(case, build, td, name="dst", paused=True, incoming=True) as dst:
            if case.kind == "background":
                src.wait_bios_done()
            cmdline = src.command_line()
            _caps(src, case)
            _caps(dst, case)
            _migrate(case, src, dst, raw, td)
            if case.blobs:
                dst.verify_blobs()
        data = raw.read_bytes()
        out_gz = out_dir / f"{case.name}.stream.gz"
        out_dir.mkdir(parents=True, exist_ok=True)
        out_gz.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    return {"qemu": build.version, "cmdline": cmdline, "caps": case.caps,
            "raw_size": len(data), "gz_size": out_gz.stat().st_size}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"cases (default all): {' '.join(CASES)}")
    ap.add_argument("--out", type=Path, default=DATA_DIR)
    a = ap.parse_args(argv)
    for n in a.names or CASES:
        info = capture(CASES[n], a.out)
        print(f"{n}:")
        for k, v in info.items():
            print(f"  {k}: {' '.join(v) if isinstance(v, (list, tuple)) else v}")


if __name__ == "__main__":
    main()
