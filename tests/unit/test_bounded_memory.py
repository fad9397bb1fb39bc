"""save, check, load and export of a guest far larger than the memory they may use.

A 256 GiB guest's per-page state is 264 MiB in the image (1 bit and a 4-byte
crc32c per 4 KiB page).  Holding it whole (and its copies while the metadata is
written or read) needs well over the 640 MiB of address space that each
command gets here beyond what Python and qsnap's imports take; the page state
kept in chunks (csrc/sink.c, a spill file), written and read window by window
(image/writer.py, image/reader.py), needs a few MiB.  Run from another
checkout's root (``cd OTHER && python -m pytest THIS_FILE``) the commands run
that checkout's code (the child's working directory is the current one).
"""
import os
import resource
import struct
import subprocess
import sys
import textwrap

import numpy as np

from qsnap.image.reader import Image
from qsnap.stream import constants as C
from qsnap.stream.events import RamBlock
from qsnap.stream.synth import _device_state
from qsnap.stream.writer import StreamWriter

GiB = 1 << 30
PS = 4096
GUEST = 256 * GiB
HEADROOM = 640 << 20   # address space beyond the imports' own
N_DATA = 64


def sparse_stream(path):
    """A background snapshot of a GUEST-byte block with N_DATA pages of data spread
    over it (QEMU would send the others as ZERO records; their absence changes
    nothing the per-page state costs): (page offsets, page bytes, device state)."""
    offsets = np.linspace(0, GUEST - PS, N_DATA).astype(np.uint64) & ~np.uint64(PS - 1)
    pages = np.random.default_rng(5).integers(1, 256, (N_DATA, PS), dtype=np.uint8)
    tail = _device_state(PS, True, 0, 2, True)
    with open(path, "wb") as f:
        w = StreamWriter(f, page_size=PS, footers=True)
        w.header()
        w.configuration("pc-i440fx-7.2")
        w.section_start(2, "ram", 0, 4)
        w.mem_size([RamBlock("pc.ram", GUEST)])
        w.eos()
        w.footer(2)
        w.section_part(2)
        w.write_pages("pc.ram", offsets, pages.tobytes())
        w.eos()
        w.footer(2)
        w.raw(tail)
    return offsets, pages, tail


def limited(args, headroom=HEADROOM):
    """The command line of ``python -m qsnap ARGS`` with RLIMIT_AS capped ``headroom``
    above its size once the engines' modules are imported."""
    prog = textwrap.dedent(f"""
        import resource, runpy, sys
        import numpy, qsnap.cli, qsnap.save, qsnap.load, qsnap.image.writer, qsnap.image.inspect
        import qsnap.postcopy
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + {headroom}, resource.RLIM_INFINITY))
        sys.argv = ["qsnap"] + {list(args)!r}
        runpy.run_module("qsnap", run_name="__main__", alter_sys=True)
    """)
    return [sys.executable, "-c", prog]


def run_limited(args, **kw):
    return subprocess.run(limited(args), cwd=os.getcwd(), timeout=600, capture_output=True,
                          text=True, **kw)


def load_limited(img, tail_len):
    """`qsnap load` under the cap into a pipe: (exit status, stderr, bytes, last bytes)."""
    out_r, out_w = os.pipe()
    child = subprocess.Popen(limited(["load", "-q", str(img)]), cwd=os.getcwd(), stdout=out_w,
                             stderr=subprocess.PIPE)
    os.close(out_w)
    total, end = 0, b""
    with os.fdopen(out_r, "rb") as src:
        while chunk := src.read(1 << 20):
            total += len(chunk)
            end = (end + chunk)[-tail_len:]
    err = child.stderr.read().decode()
    return child.wait(timeout=600), err, total, end


def saved_sparse_guest(tmp_path):
    """The sparse guest's stream saved under the cap: (image, data page offsets, pages, stream tail)."""
    stream, img = tmp_path / "stream", tmp_path / "vm.qsnap"
    offsets, pages, tail = sparse_stream(stream)
    with open(stream, "rb") as f:
        r = run_limited(["save", "-q", str(img)], stdin=f)
    assert r.returncode == 0, r.stderr
    stream.unlink()
    return img, offsets, pages, tail


def test_save_check_load_of_a_256g_guest_in_bounded_memory(tmp_path):
    img, offsets, pages, tail = saved_sparse_guest(tmp_path)
    r = run_limited(["check", str(img)])
    assert r.returncode == 0, r.stderr + r.stdout
    with Image.open(img) as im:
        assert im.blocks[0].length == GUEST and im.blocks[0].nonzero_pages == N_DATA
        for off, page in zip(offsets.tolist(), pages):
            assert im.read_page(0, off) == page.tobytes()
    status, err, total, end = load_limited(img, len(tail))
    assert status == 0, err
    # every page of the guest as a record: an 8-byte header and data or a fill byte
    assert total > GUEST // PS * 9
    assert end == tail


def guest_physical(offset):
    """GPA of byte ``offset`` of pc.ram on pc-i440fx: 3 GiB below the PCI hole, the rest
    from 4 GiB (qsnap/export/memmap.py)."""
    low = 3 * GiB
    return offset if offset < low else offset - low + 4 * GiB


def test_export_of_a_256g_guest_in_bounded_memory(tmp_path):
    """raw and elf read the page state a window at a time (a whole block's checksums are
    256 MiB here); their files are sparse, each page at its guest-physical address."""
    from elfcore import read_core

    img, offsets, pages, tail = saved_sparse_guest(tmp_path)
    for fmt in ("raw", "elf"):
        out = tmp_path / f"vm.{fmt}"
        r = run_limited(["export", "-q", f"--format={fmt}", str(img), str(out)])
        assert r.returncode == 0, r.stderr
        core = read_core(out) if fmt == "elf" else None
        with open(out, "rb") as f:
            for off, page in zip(offsets.tolist(), pages):
                if core is not None:
                    got = core.read_gpa(guest_physical(off), PS)
                else:
                    f.seek(guest_physical(off))
                    got = f.read(PS)
                assert got == page.tobytes(), (fmt, hex(off))
        assert os.stat(out).st_blocks * 512 < 64 << 20   # only the data pages take space
        out.unlink()


# A postcopy load keeps its sent state at 1 bit per host page (8 MiB for this
# guest) where a byte per page would take 64 MiB, above the cap: the cap
# leaves room for the load's threads (their stacks count as address space)
# and read-ahead buffers, not for a table of the guest's size.
PC_HEADROOM = int(os.environ.get("QSNAP_PC_HEADROOM", 56 << 20))
PC_STACK = 2 << 20
PC_HEAD = 4 << 20   # requested pages go out first after the switch: within this much of the stream


def rp_message(typ, payload):
    return struct.pack(">HH", typ, len(payload)) + payload


def small_stacks():
    """Threads get RLIMIT_STACK-sized stacks, address space the cap counts: 2 MiB each."""
    resource.setrlimit(resource.RLIMIT_STACK, (PC_STACK, resource.getrlimit(resource.RLIMIT_STACK)[1]))


def postcopy_limited(img, requests):
    """`qsnap load --postcopy` under PC_HEADROOM against a simulated destination that
    asks for the pages at byte offsets ``requests`` of pc.ram, reads the stream to
    its end, then sends SHUT: (exit status, stderr, bytes, the first PC_HEAD bytes)."""
    rp_r, rp_w = os.pipe()
    out_r, out_w = os.pipe()
    child = subprocess.Popen(limited(["load", "--postcopy=10", "-q", str(img)], PC_HEADROOM),
                             cwd=os.getcwd(), stdin=rp_r, stdout=out_w, stderr=subprocess.PIPE,
                             preexec_fn=small_stacks)
    os.close(rp_r)
    os.close(out_w)
    name = b"pc.ram"
    with os.fdopen(rp_w, "wb", buffering=0) as rp:
        for off in requests:
            rp.write(rp_message(C.MIG_RP_MSG_REQ_PAGES_ID,
                                struct.pack(">QIB", off, PS, len(name)) + name))
        total, head = 0, b""
        with os.fdopen(out_r, "rb") as src:
            while chunk := src.read(1 << 20):
                total += len(chunk)
                if len(head) < PC_HEAD:
                    head += chunk[:PC_HEAD - len(head)]
        try:
            rp.write(rp_message(C.MIG_RP_MSG_SHUT, struct.pack(">I", 0)))
        except BrokenPipeError:
            pass   # it failed already: its status says so
    err = child.stderr.read().decode()
    return child.wait(timeout=600), err, total, head


def test_postcopy_load_of_a_256g_guest_in_bounded_memory(tmp_path):
    img, offsets, pages, tail = saved_sparse_guest(tmp_path)
    status, err, total, head = postcopy_limited(img, offsets.tolist())
    assert status == 0, err
    assert err == ""
    assert total > GUEST // PS * 9   # every page as a record
    for off, page in zip(offsets.tolist(), pages):
        assert page.tobytes() in head, f"requested page 0x{off:x} not served first"
