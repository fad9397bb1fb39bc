"""load(): synthetic stream -> image -> regenerated stream, page for page."""
import io
import os
import struct
import threading

import numpy as np
import pytest

from qsnap.errors import ChecksumError, IOFailure
from qsnap.image.reader import Image
from qsnap.load import load
from qsnap.save import save
from qsnap.stream import constants as C
from qsnap.stream import events as ev
from qsnap.stream.reader import StreamReader
from qsnap.stream.synth import synth_stream

from bigcmp import assert_same

MiB = 1 << 20
BLOCKS = (
    ("pc.ram", 8 * MiB),
    ("/rom@etc/acpi/tables", 128 * 1024),
    ("pc.bios", 256 * 1024),
    ("pc.rom", 128 * 1024),
    ("/rom@etc/table-loader", 4096),
    ("/rom@etc/acpi/rsdp", 4096),
)


def save_image(stream_path, image_path, cluster_size=MiB):
    """Stream file -> image through the save engine."""
    with open(stream_path, "rb") as f:
        save(str(image_path), in_fd=f.fileno(), out_fd=-1, cluster_size=cluster_size, quiet=True)
    with Image.open(str(image_path)) as img:
        return img.device_state


def check_restored(path, synth, device_state):
    """Every page of every block exactly once with its final content; same device state."""
    seen = set()
    got_state = None
    with open(path, "rb") as f:
        for e in StreamReader(f):
            if isinstance(e, ev.PageBatch):
                for idstr, offset, flags, payload in e.iter_pages():
                    assert (idstr, offset) not in seen, f"page {idstr}:0x{offset:x} sent twice"
                    seen.add((idstr, offset))
                    want = synth.final_page(idstr, offset)
                    got = None if payload is None or not any(payload) else payload
                    assert_same(got, want, f"page {idstr}:0x{offset:x}")
            elif isinstance(e, ev.DeviceState):
                got_state = e.data
    assert len(seen) == sum(b.length // 4096 for b in synth.blocks)
    assert_same(got_state, device_state, "device state")
    return seen


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One image per stream mode, built once."""
    d = tmp_path_factory.mktemp("rt")
    out = {}
    for mode in ("background", "precopy-live", "precopy-stopped"):
        sp = d / f"{mode}.stream"
        with open(sp, "wb") as f:
            synth = synth_stream(f, blocks=BLOCKS, mode=mode, seed=3, zero_share=0.4)
        ip = d / f"{mode}.qsnap"
        state = save_image(sp, ip)
        out[mode] = (sp, ip, synth, state)
    return out


@pytest.mark.parametrize("mode", ["background", "precopy-live", "precopy-stopped"])
@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_roundtrip_every_page_and_device_state(saved, tmp_path, mode, cache):
    sp, ip, synth, state = saved[mode]
    out = tmp_path / "restored.stream"
    log = io.StringIO()
    with open(out, "wb") as f:
        stats = load(ip, out_fd=f.fileno(), cache=cache, log=log)
    check_restored(out, synth, state)
    assert stats["stream_bytes"] == out.stat().st_size
    assert stats["pages"] + stats["zero_pages"] == sum(b.length // 4096 for b in synth.blocks)
    # header, configuration and the RAM START section are the source's bytes
    original = sp.read_bytes()
    restored = out.read_bytes()
    start_len = restored.index(b"\x02\x00\x00\x00\x02")   # first PART
    assert_same(restored[:start_len], original[:start_len], "restored[:start_len]")
    assert restored.endswith(state)
    has_end = b"\x03\x00\x00\x00\x02" + struct.pack(">Q", C.RAM_SAVE_FLAG_EOS) in restored
    assert has_end == (mode != "background")


def test_small_clusters_small_parts_many_threads(tmp_path, saved):
    sp, _, synth, _ = saved["precopy-live"]
    ip = tmp_path / "small.qsnap"
    state = save_image(sp, ip, cluster_size=64 * 1024)
    out = tmp_path / "restored.stream"
    with open(out, "wb") as f:
        stats = load(ip, out_fd=f.fileno(), cache="writeback", quiet=True, part_bytes=256 * 1024,
                     n_bufs=3, n_threads=3)
    check_restored(out, synth, state)
    assert stats["sections"] > 10


def test_no_footers(tmp_path):
    sp = tmp_path / "s"
    with open(sp, "wb") as f:
        synth = synth_stream(f, blocks=BLOCKS[:2], mode="precopy-stopped", machine=None,
                             footers=False, seed=5)
    ip = tmp_path / "i.qsnap"
    state = save_image(sp, ip)
    out = tmp_path / "o"
    with open(out, "wb") as f:
        load(ip, out_fd=f.fileno(), quiet=True)
    check_restored(out, synth, state)
    assert b"\x7e\x00\x00\x00\x02" not in out.read_bytes()[:64]


def test_output_through_a_pipe(saved):
    _, ip, synth, state = saved["background"]
    r, w = os.pipe()
    chunks = []
    t = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 1 << 20), b"")))
    t.start()
    try:
        load(ip, out_fd=w, quiet=True)
    finally:
        os.close(w)
        t.join()
        os.close(r)
    data = b"".join(chunks)
    assert data.endswith(state)
    assert len(data) > 4 * MiB


def test_checksum_mismatch_raises_before_the_page_is_sent(tmp_path, saved):
    sp, ip0, synth, _ = saved["background"]
    ip = tmp_path / "bad.qsnap"
    ip.write_bytes(ip0.read_bytes())
    with Image.open(ip) as img:
        b = img.blocks[0]
        bits = np.unpackbits(b.bitmap, bitorder="little")
        page = int(np.flatnonzero(bits)[len(np.flatnonzero(bits)) // 2])
        host = img.host_offset(b.offset + page * 4096)
    with open(ip, "r+b") as f:
        f.seek(host + 10)
        byte = f.read(1)
        f.seek(host + 10)
        f.write(bytes([byte[0] ^ 1]))
        f.seek(host)
        bad_page = f.read(4096)
    out = tmp_path / "o"
    with open(out, "wb") as f:
        with pytest.raises(ChecksumError, match=rf"block 'pc.ram' page 0x{page * 4096:x}\b"):
            load(ip, out_fd=f.fileno(), quiet=True)
    restored = out.read_bytes()
    assert bad_page not in restored
    assert len(restored) > 0


def test_epipe_exits_promptly_with_io_failure(saved):
    _, ip, _, _ = saved["background"]
    r, w = os.pipe()
    t = threading.Thread(target=lambda: (os.read(r, 100), os.close(r)))
    t.start()
    try:
        with pytest.raises(IOFailure, match="EPIPE"):
            load(ip, out_fd=w, quiet=True)
    finally:
        t.join()
        os.close(w)


def test_o_direct_fallback_note_on_tmpfs(saved, tmp_path):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    _, ip0, synth, state = saved["precopy-stopped"]
    ip = os.path.join(shm, f"qsnap-test-{os.getpid()}.qsnap")
    try:
        with open(ip, "wb") as f:
            f.write(ip0.read_bytes())
        log = io.StringIO()
        out = tmp_path / "o"
        with open(out, "wb") as f:
            stats = load(ip, out_fd=f.fileno(), cache="none", log=log, quiet=True)
        if stats["direct_io"]:
            pytest.skip("this /dev/shm accepts O_DIRECT")
        assert log.getvalue().count("refuses O_DIRECT") == 1
        check_restored(out, synth, state)
    finally:
        os.unlink(ip)


def test_o_direct_refused_falls_back_with_one_note(saved, tmp_path, monkeypatch):
    import qsnap.load as L

    monkeypatch.setattr(L, "_direct_read_works", lambda fd: False)
    _, ip, synth, state = saved["precopy-stopped"]
    log = io.StringIO()
    out = tmp_path / "o"
    with open(out, "wb") as f:
        stats = load(ip, out_fd=f.fileno(), cache="none", log=log, quiet=True)
    assert not stats["direct_io"]
    assert log.getvalue().count("refuses O_DIRECT") == 1
    check_restored(out, synth, state)


def test_cli_load_epipe_is_a_one_line_error(saved):
    import subprocess
    import sys

    _, ip, _, _ = saved["background"]
    p = subprocess.Popen([sys.executable, "-m", "qsnap", "load", str(ip)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.read(100)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=30) != 0
    assert err.startswith("qsnap: error: ") and "EPIPE" in err
    assert "Traceback" not in err
