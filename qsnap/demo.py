"""``qsnap demo``: save and restore a synthetic VM end to end, no QEMU needed.

It synthesises a background-snapshot migration stream of a pc machine (pc.ram
with a mix of zero and random pages, BIOS/option ROM/ACPI blocks, a device-state
tail), parses it, saves it as an image, checks the image, regenerates the
stream with ``qsnap load`` and verifies every page and the device state against
what was synthesised.  It prints what it did and how fast.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

from qsnap.errors import QsnapError


def _rate(nbytes, seconds):
    return f"{nbytes / 1e6 / max(seconds, 1e-9):,.0f} MB/s"


def _say(msg):
    print(msg, flush=True)


def run_demo(size=256 << 20, workdir=None, keep=False, seed=1):
    from qsnap.image.reader import Image
    from qsnap.load import load
    from qsnap.save import save
    from qsnap.stream import events as ev
    from qsnap.stream.reader import StreamReader
    from qsnap.stream.synth import DEFAULT_BLOCKS, synth_stream

    if size < 4 << 20 or size % (1 << 20):
        raise QsnapError(f"demo size {size} must be a whole number of MiB, at least 4 MiB")
    own_dir = workdir is None
    workdir = tempfile.mkdtemp(prefix="qsnap-demo-") if own_dir else workdir
    os.makedirs(workdir, exist_ok=True)
    stream_path = os.path.join(workdir, "vm.stream")
    image_path = os.path.join(workdir, "vm.qsnap")
    restored_path = os.path.join(workdir, "restored.stream")
    blocks = [(name, size if name == "pc.ram" else length) for name, length in DEFAULT_BLOCKS]
    try:
        _say(f"qsnap demo: synthetic pc-i440fx-7.2 guest with {size >> 20} MiB of RAM, "
             f"half of it zero in 1 MiB runs, in {workdir}")

        t = time.monotonic()
        with open(stream_path, "wb") as f:
            synth = synth_stream(f, blocks=blocks, zero_share=0.5, zero_run=256, mode="background",
                                 seed=seed)
        stream_bytes = os.path.getsize(stream_path)
        _say(f"  1. synthesised a background-snapshot stream: {stream_bytes / 1e6:.1f} MB, "
             f"{synth.pages} pages ({synth.nonzero_pages} non-zero) in {time.monotonic() - t:.2f} s")

        t = time.monotonic()
        pages = 0
        with open(stream_path, "rb") as f:
            for e in StreamReader(f):
                if isinstance(e, ev.PageBatch):
                    pages += len(e.records)
        dt = time.monotonic() - t
        _say(f"  2. parsed it: {pages} page records in {dt:.2f} s ({_rate(stream_bytes, dt)})")

        t = time.monotonic()
        with open(stream_path, "rb") as f:
            summary = save(image_path, in_fd=f.fileno(), out_fd=-1, quiet=True)
        dt = time.monotonic() - t
        file_bytes = os.path.getsize(image_path)
        _say(f"  3. qsnap save: {file_bytes / 1e6:.1f} MB image "
             f"({summary.get('nonzero_pages', '?')} pages stored) in {dt:.2f} s ({_rate(stream_bytes, dt)})")

        with Image.open(image_path) as img:
            problems = img.verify_all()
        if problems:
            raise QsnapError(f"demo image failed verification: {problems[0]}")
        qemu_img = shutil.which("qemu-img")
        if qemu_img:
            r = subprocess.run([qemu_img, "check", image_path], capture_output=True, text=True)
            if r.returncode != 0:
                raise QsnapError(f"qemu-img check failed on the demo image: {r.stdout}{r.stderr}")
            _say("  4. checked the image: all page checksums match; qemu-img check: no errors")
        else:
            _say("  4. checked the image: all page checksums match (qemu-img not installed)")

        t = time.monotonic()
        with open(restored_path, "wb") as out:
            load(image_path, out_fd=out.fileno(), cache="writeback", quiet=True)
        dt = time.monotonic() - t
        restored_bytes = os.path.getsize(restored_path)
        _say(f"  5. qsnap load: regenerated a {restored_bytes / 1e6:.1f} MB migration stream "
             f"in {dt:.2f} s ({_rate(restored_bytes, dt)})")

        t = time.monotonic()
        checked = _verify(restored_path, synth)
        _say(f"  6. verified the restored stream: {checked} pages byte-identical to the "
             f"synthesised guest, device state identical ({time.monotonic() - t:.2f} s)")
        _say("demo passed")
        return 0
    finally:
        if own_dir and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif keep:
            _say(f"kept {workdir}")


def _verify(path, synth):
    """Rebuild RAM from the restored stream and compare with the synthesised guest."""
    from qsnap.stream import events as ev
    from qsnap.stream.reader import StreamReader

    seen = {}
    device_state = None
    with open(path, "rb") as f:
        for e in StreamReader(f):
            if isinstance(e, ev.PageBatch):
                for idstr, offset, flags, payload in e.iter_pages():
                    expected = synth.final_page(idstr, offset)
                    got = None if payload is None or not any(payload) else payload
                    if got != expected:
                        raise QsnapError(f"demo: restored page {idstr}:0x{offset:x} differs")
                    seen[(idstr, offset)] = True
            elif isinstance(e, ev.DeviceState):
                device_state = e.data
    if len(seen) != synth.pages:
        raise QsnapError(f"demo: restored stream has {len(seen)} pages, expected {synth.pages}")
    if device_state != synth.device_state:
        raise QsnapError("demo: restored device state differs")
    return len(seen)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
