"""The save engine and `qsnap save` on synthetic streams: content, density, crash safety."""
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from qsnap.errors import QsnapError
from qsnap.image.reader import Image
from qsnap.save import save
from qsnap.stream import constants as C
from qsnap.stream.synth import synth_stream

from bigcmp import assert_same

SMALL = [("pc.ram", 8 << 20), ("/rom@etc/acpi/tables", 128 << 10), ("pc.bios", 256 << 10),
         ("pc.rom", 128 << 10), ("/rom@etc/table-loader", 4096), ("/rom@etc/acpi/rsdp", 4096)]


def make_stream(tmp_path, name="s.stream", **kw):
    kw.setdefault("blocks", SMALL)
    path = tmp_path / name
    with open(path, "wb") as f:
        result = synth_stream(f, **kw)
    return path, result


def save_file(stream_path, image_path, **kw):
    with open(stream_path, "rb") as f:
        return save(str(image_path), in_fd=f.fileno(), out_fd=-1, quiet=True, **kw)


def assert_image_matches(image_path, synth):
    with Image.open(str(image_path)) as img:
        assert not img.verify_all()
        by_name = {b.idstr: i for i, b in enumerate(img.blocks)}
        assert set(by_name) == {name for name, _ in SMALL} or set(by_name) >= {"pc.ram"}
        stored = 0
        for bi, b in enumerate(img.blocks):
            for page in range(b.length // 4096):
                expected = synth.final_page(b.idstr, page * 4096)
                bit = (int(b.bitmap[page // 8]) >> (page % 8)) & 1
                if expected is None:
                    assert bit == 0, (b.idstr, page)
                else:
                    assert bit == 1, (b.idstr, page)
                    assert_same(img.read_page(bi, page * 4096), expected, "img.read_page(bi, page * 4096)")
                    stored += 1
        return stored


@pytest.mark.parametrize("mode", ["background", "precopy-live", "precopy-stopped"])
def test_save_holds_final_content(tmp_path, mode):
    stream, synth = make_stream(tmp_path, mode=mode, seed=3)
    img = tmp_path / "vm.qsnap"
    summary = save_file(stream, img)
    stored = assert_image_matches(img, synth)
    assert_same(stored, synth.nonzero_pages, "stored page count")
    assert summary["nonzero_pages"] == synth.nonzero_pages
    with Image.open(str(img)) as image:
        assert_same(image.device_state, synth.device_state, "image.device_state")
        assert image.stream_info["ram_end"] == (mode != "background")
        info = image.info()
    assert info["complete"] is True
    assert info["cluster_size"] == 1 << 20
    assert info["machine"] == "pc-i440fx-7.2"


def test_save_is_dense(tmp_path):
    """Only clusters holding a non-zero page are stored, plus a few of metadata."""
    blocks = [("pc.ram", 64 << 20), ("pc.bios", 256 << 10)]
    stream, synth = make_stream(tmp_path, zero_share=0.995, seed=5, blocks=blocks)
    img = tmp_path / "vm.qsnap"
    save_file(stream, img)
    touched = set()
    for name, length in blocks:
        for page in range(0, length, 4096):
            if synth.final_page(name, page) is not None:
                touched.add((name, page >> 20))
    size = os.path.getsize(img)
    assert size % (1 << 20) == 0
    assert len(touched) << 20 < size <= (len(touched) << 20) + (6 << 20)


@pytest.mark.skipif(shutil.which("qemu-img") is None and os.environ.get("QSNAP_REQUIRE_QEMU") != "1",
                    reason="qemu-img not found")
def test_qemu_img_check_and_convert(tmp_path):
    stream, synth = make_stream(tmp_path, seed=7)
    img = tmp_path / "vm.qsnap"
    save_file(stream, img)
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors" in r.stdout
    raw = tmp_path / "vm.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True)
    with Image.open(str(img)) as image:
        blocks = image.info()["ram_blocks"]
    data = raw.read_bytes()
    for b in blocks:
        for page in range(0, b["length"], 4096 * 7):
            expected = synth.final_page(b["idstr"], page) or bytes(4096)
            assert_same(data[b["offset"] + page:b["offset"] + page + 4096], expected, 'data[b["offset"] + page:b["offset"] + page + 4096]')


def test_truncated_stream_leaves_no_image_and_keeps_old(tmp_path):
    stream, synth = make_stream(tmp_path, seed=9)
    img = tmp_path / "vm.qsnap"
    save_file(stream, img)
    before = img.read_bytes()
    data = stream.read_bytes()
    for cut in (0, 5, 8, 100, len(data) // 3, len(data) // 2, len(data) - 200, len(data) - 1):
        cut_path = tmp_path / "cut.stream"
        cut_path.write_bytes(data[:cut])
        with pytest.raises(QsnapError):
            save_file(cut_path, img)
        assert_same(img.read_bytes(), before, "img.read_bytes()")
        new = tmp_path / "new.qsnap"
        with pytest.raises(QsnapError):
            save_file(cut_path, new)
        assert not new.exists()
    leftovers = [p for p in os.listdir(tmp_path) if "qsnap-" in p]
    assert leftovers == []


def run_cli(args, stdin=None, **kw):
    return subprocess.run([sys.executable, "-m", "qsnap", *args], input=stdin,
                          capture_output=True, **kw)


def test_cli_save_bad_input_one_line_error(tmp_path):
    img = tmp_path / "vm.qsnap"
    r = run_cli(["save", str(img)], stdin=b"QEVM\x00\x00\x00\x03\x42garbage")
    assert r.returncode != 0
    err = r.stderr.decode()
    assert err.startswith("qsnap: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "0x" in err  # names the offset
    assert_same(r.stdout, b"", "stdout")
    assert not img.exists()


def test_cli_save_via_pipe_writes_nothing_to_stdout(tmp_path):
    stream, synth = make_stream(tmp_path, seed=11)
    img = tmp_path / "vm.qsnap"
    r = run_cli(["save", str(img)], stdin=stream.read_bytes())
    assert r.returncode == 0, r.stderr
    assert_same(r.stdout, b"", "stdout")
    assert_image_matches(img, synth)


def test_cli_save_stats(tmp_path):
    """--stats FILE: the summary as JSON, with the time spent waiting for the disk."""
    stream, synth = make_stream(tmp_path, seed=12)
    img, stats = tmp_path / "vm.qsnap", tmp_path / "stats.json"
    r = run_cli(["save", "--stats", str(stats), str(img)], stdin=stream.read_bytes())
    assert r.returncode == 0, r.stderr
    st = json.loads(stats.read_text())
    assert st["nonzero_pages"] == synth.nonzero_pages
    assert st["file_bytes"] == img.stat().st_size
    assert 0 <= st["disk_wait_s"] <= st["seconds"]
    assert st["bytes_written"] == st["clusters_written"] * (1 << 20) + st["page_rewrites"] * 4096
    assert "s waiting for the disk" in r.stderr.decode()


def test_return_path_pong_and_shut_before_stdin_closes(tmp_path):
    """A source with a return path waits for SHUT before closing the pipe."""
    stream, synth = make_stream(tmp_path, seed=13, mode="precopy-stopped", return_path=True)
    img = tmp_path / "vm.qsnap"
    p = subprocess.Popen([sys.executable, "-m", "qsnap", "save", str(img)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(stream.read_bytes())
    p.stdin.flush()
    # stdin stays open, as QEMU keeps it until SHUT arrives
    msgs = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        hdr = p.stdout.read(4)
        if len(hdr) < 4:
            break
        mtype, mlen = struct.unpack(">HH", hdr)
        payload = p.stdout.read(mlen)
        msgs.append((mtype, payload))
        if mtype == C.MIG_RP_MSG_SHUT:
            break
    p.stdin.close()
    assert p.wait(timeout=30) == 0, p.stderr.read()
    assert msgs[0] == (C.MIG_RP_MSG_PONG, struct.pack(">I", 1))
    assert msgs[-1] == (C.MIG_RP_MSG_SHUT, struct.pack(">I", 0))
    assert img.exists()
    assert_image_matches(img, synth)


def test_sigkill_mid_save_leaves_no_image(tmp_path):
    stream, synth = make_stream(tmp_path, seed=15)
    data = stream.read_bytes()
    img = tmp_path / "vm.qsnap"
    img.write_bytes(b"an older image that must survive")
    p = subprocess.Popen([sys.executable, "-m", "qsnap", "save", str(img)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(data[: len(data) // 2])
    p.stdin.flush()
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    assert_same(img.read_bytes(), b"an older image that must survive", "img.read_bytes()")


def test_sigterm_mid_save_cleans_up(tmp_path):
    stream, synth = make_stream(tmp_path, seed=17)
    data = stream.read_bytes()
    img = tmp_path / "vm.qsnap"
    p = subprocess.Popen([sys.executable, "-m", "qsnap", "save", str(img)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(data[: len(data) // 2])
    p.stdin.flush()
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=10)
    assert rc != 0
    assert p.stderr.read().decode().startswith("qsnap: error: terminated")
    assert not img.exists()
    assert [x for x in os.listdir(tmp_path) if "qsnap-" in x] == []


@pytest.mark.parametrize("cache", ["auto", "writeback"])
def test_cli_save_file_size_limit(tmp_path, cache):
    """A file-size limit (ulimit -f) below the image: one clear error naming the
    offset, no image and no temporary file left, an older image kept.  With
    O_DIRECT the file is preallocated ahead of the writes, so the limit stops
    preallocation first and then a write."""
    stream, _ = make_stream(tmp_path, blocks=[("pc.ram", 96 << 20)], zero_share=0.0, seed=13)
    img = tmp_path / "vm.qsnap"
    img.write_bytes(b"an older image")
    limit = 40 << 20

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with stream.open("rb") as f:
        r = subprocess.run([sys.executable, "-m", "qsnap", "save", f"--cache={cache}", str(img)],
                           stdin=f, capture_output=True, preexec_fn=set_limit)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err.startswith("qsnap: error: file too large writing ") and err.count("\n") == 1, err
    off = int(err.rsplit("offset ", 1)[1], 16)
    # the write that crossed the limit stopped at it; with O_DIRECT a second
    # writer may fail first on a later cluster
    if cache == "writeback":
        assert off == limit, err
    else:
        assert limit <= off < limit + (16 << 20), err
    assert_same(img.read_bytes(), b"an older image", "the older image")
    assert [x for x in os.listdir(tmp_path) if "qsnap-" in x] == []
