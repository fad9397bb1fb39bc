"""Capture the small real stream committed as tests/data/bg72-blob.stream.gz.

    python -m tests.integration.capture_data [OUT.gz]

A 32 MiB blob guest (pc-i440fx-7.2 under TCG, so that the stream carries no
KVM-only section such as kvmclock and loads under either accelerator; SeaBIOS
halted with no boot device) with DATA_LAYOUT blobs of seed DATA_SEED is saved by a
background-snapshot migration to ``exec:cat > FILE``; the file is checked
by loading it into a fresh QEMU and comparing the blobs, then gzip'd -9.
Regenerate the expected bytes with ``guests.make_blobs(dir, DATA_LAYOUT, DATA_SEED)``.
"""

import gzip
import sys
import tempfile
from pathlib import Path

from qsnaptest import guests
from qsnaptest.qemu import Qemu, BlobGuest, capture_stream, qemu_version

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "bg72-blob.stream.gz"
DATA_MEMORY = "32M"
DATA_SEED = 72
DATA_LAYOUT = [(0x1000000, 0x100000), (0x1400123, 0x2345), (0x1e00000, 0x10000)]


def capture(out_gz: Path = DATA_FILE) -> dict:
    with tempfile.TemporaryDirectory(prefix="qsnap-capture-") as td:
        td = Path(td)
        blobs = guests.make_blobs(td, DATA_LAYOUT, DATA_SEED)
        raw = td / "bg72-blob.stream"
        with BlobGuest(memory=DATA_MEMORY, blobs=blobs, accel="tcg") as vm:
            vm.wait_bios_done()
            vm.verify_blobs()
            cmdline = vm.command_line()
            accel = vm.accelerator()
            capture_stream(vm, raw, "background", timeout=60)
        # default accelerators: KVM where the host has it
        with Qemu(memory=DATA_MEMORY, incoming=True, paused=True, name="dst") as dst:
            dst.migrate_incoming(f"exec:cat {raw}")
            dst.wait_migration(timeout=60)
            BlobGuest.verify_blobs(dst, blobs)
        data = raw.read_bytes()
        out_gz.parent.mkdir(parents=True, exist_ok=True)
        out_gz.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    return {"qemu": qemu_version(), "accel": accel, "cmdline": cmdline,
            "raw_size": len(data), "gz_size": out_gz.stat().st_size}


if __name__ == "__main__":
    info = capture(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA_FILE)
    for k, v in info.items():
        print(f"{k}: {' '.join(v) if isinstance(v, list) else v}")
