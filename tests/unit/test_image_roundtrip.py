import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from qsnap.errors import ImageError, StreamError, UsageError
from qsnap.image import Image, ImageWriter, peek_header
from qsnap.stream.constants import RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO

from bigcmp import assert_same

PAGE_REC_DTYPE = np.dtype([('offset', 'u8'), ('data_pos', 'u8'), ('data_len', 'u4'),
                           ('block', 'u4'), ('flags', 'u2'), ('fill', 'u1'), ('_pad', 'V5')])
PS = 4096
MiB = 1 << 20
QEMU_IMG = shutil.which("qemu-img")


def need_qemu_img():
    if QEMU_IMG is None:
        if os.environ.get("QSNAP_REQUIRE_QEMU") == "1":
            pytest.fail("qemu-img is missing and QSNAP_REQUIRE_QEMU=1")
        pytest.skip("qemu-img is not installed")


def page_records(block, offsets, data_pos0=0, flags=RAM_SAVE_FLAG_PAGE):
    r = np.zeros(len(offsets), dtype=PAGE_REC_DTYPE)
    r["offset"] = offsets
    r["block"] = block
    r["flags"] = flags
    if flags == RAM_SAVE_FLAG_PAGE:
        r["data_pos"] = data_pos0 + np.arange(len(offsets), dtype=np.uint64) * PS
        r["data_len"] = PS
    return r


BLOCKS = [
    {"idstr": "pc.ram", "length": 16 * MiB, "page_size": 4096},
    {"idstr": "vga.vram", "length": 2 * MiB, "page_size": 4096},
    {"idstr": "/rom@etc/acpi/tables", "length": 128 * 1024, "page_size": 4096},
    {"idstr": "unused", "length": 64 * 1024, "page_size": 4096},
]


def write_image(path, seed=0, **kw):
    """A small image; returns {(block, offset): page bytes} of what was written."""
    rng = np.random.default_rng(seed)
    expect = {}
    with ImageWriter(path, **kw) as w:
        offs = w.start(BLOCKS)
        cs = kw.get("cluster_size", MiB)
        assert list(offs) == [0, 16 * MiB, 18 * MiB, 18 * MiB + max(cs, 128 * 1024)]
        for b, pages in ((0, [0, 1, 2, 100, 1000, 4095, 2048, 2049]), (1, [0, 511]), (2, [3])):
            data = rng.integers(0, 256, size=len(pages) * PS, dtype=np.uint8).tobytes()
            w.sink.put_batch(page_records(b, [p * PS for p in pages]), memoryview(data))
            for i, p in enumerate(pages):
                expect[(b, p * PS)] = data[i * PS:(i + 1) * PS]
        # a zero record over a stored page, and a zero page never stored
        w.sink.put_batch(page_records(0, [100 * PS, 5 * PS], flags=RAM_SAVE_FLAG_ZERO), b"")
        expect[(0, 100 * PS)] = bytes(PS)
        summary = w.finish(header_bytes=b"QEVM\0\0\0\3", pre_ram=b"", device_state=b"\x04dev" * 100,
                           stream_info={"ram_end": True}, commands=[(1, b"")],
                           counts={"stream_bytes": 12345}, machine="pc-i440fx-7.2")
    return expect, summary


def test_roundtrip_reader(tmp_path):
    p = tmp_path / "vm.qsnap"
    expect, summary = write_image(p)
    assert summary["file_bytes"] == os.path.getsize(p)
    assert os.path.getsize(p) % MiB == 0
    assert [f for f in os.listdir(tmp_path)] == ["vm.qsnap"]
    with Image.open(p) as im:
        assert im.cluster_size == MiB and im.target_page_size == PS
        assert [b.idstr for b in im.blocks] == [b["idstr"] for b in BLOCKS]
        assert [b.migrated for b in im.blocks] == [True, True, True, False]
        assert im.blocks[0].nonzero_pages == 7
        for (b, off), page in expect.items():
            assert_same(im.read_page(b, off), page, "im.read_page(b, off)")
        assert_same(im.read_page(0, 7 * PS), bytes(PS), "im.read_page(0, 7 * PS)")
        assert im.host_offset(0) != 0 and im.host_offset(5 * MiB) == 0
        dc = im.data_clusters()
        assert dc.dtype == np.uint64 and list(dc[:, 0]) == sorted(dc[:, 0])
        assert_same(im.device_state, b"\x04dev" * 100, "im.device_state")
        assert im.header_bytes == b"QEVM\0\0\0\3"
        assert im.stream_info["commands"] == [[1, ""]]
        info = im.info()
        json.dumps(info)
        assert info["format_version"] == 2 and info["complete"] and info["machine"] == "pc-i440fx-7.2"
        assert info["counts"]["stream_bytes"] == 12345
        assert im.verify_all() == []
    pk = peek_header(p)
    assert pk["qsnap"] and pk["complete"] and pk["format_version"] == 2


def test_qemu_img_check_info_convert(tmp_path):
    need_qemu_img()
    p = tmp_path / "vm.qsnap"
    expect, _ = write_image(p)
    r = subprocess.run([QEMU_IMG, "check", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout and "leaked" not in r.stdout
    info = json.loads(subprocess.run([QEMU_IMG, "info", "--output=json", str(p)],
                                     capture_output=True, text=True, check=True).stdout)
    with Image.open(p) as im:
        assert info["virtual-size"] == im.virtual_size
        assert info["cluster-size"] == MiB
        assert info["format"] == "qcow2"
        regions = [b.offset for b in im.blocks]
    raw = tmp_path / "vm.raw"
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(p), str(raw)], check=True)
    with open(raw, "rb") as f:
        for (b, off), page in expect.items():
            f.seek(regions[b] + off)
            assert_same(f.read(PS), page, "f.read(PS)")


def test_cluster_size_and_cache_none(tmp_path):
    p = tmp_path / "vm.qsnap"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # tmpfs refuses O_DIRECT
        expect, summary = write_image(p, cluster_size=64 * 1024, cache="none")
    with Image.open(p) as im:
        assert im.cluster_size == 64 * 1024
        for (b, off), page in expect.items():
            assert_same(im.read_page(b, off), page, "im.read_page(b, off)")
    if QEMU_IMG:
        assert subprocess.run([QEMU_IMG, "check", str(p)], capture_output=True).returncode == 0


def _refuse_o_direct(monkeypatch):
    """Make os.open fail with EINVAL for O_DIRECT, as tmpfs before Linux 6.6 does."""
    import errno
    real_open = os.open

    def fake_open(path, flags, *a, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *a, **kw)
    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.parametrize("cache,direct", [("auto", True), ("none", True), ("writeback", False)])
def test_cache_modes_pick_o_direct(tmp_path, cache, direct):
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    p = tmp_path / "vm.qsnap"
    with ImageWriter(p, cache=cache) as w:
        w.start(BLOCKS)
        assert w.direct is direct
        w.abort()
    with pytest.raises(UsageError, match="auto, none, writeback"):
        ImageWriter(p, cache="direct")


@pytest.mark.parametrize("cache,warns", [("auto", False), ("none", True)])
def test_o_direct_refused(tmp_path, monkeypatch, cache, warns):
    """'auto' falls back to the page cache silently, 'none' with a warning; both save."""
    import warnings
    _refuse_o_direct(monkeypatch)
    p = tmp_path / "vm.qsnap"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        expect, _ = write_image(p, cache=cache)
    assert any("refuses O_DIRECT" in str(w.message) for w in seen) is warns
    with Image.open(p) as im:
        for (b, off), page in expect.items():
            assert_same(im.read_page(b, off), page, "im.read_page(b, off)")


def test_density(tmp_path):
    p = tmp_path / "big.qsnap"
    rng = np.random.default_rng(5)
    blocks = [{"idstr": "pc.ram", "length": 64 * MiB, "page_size": 4096},
              {"idstr": "pc.bios", "length": 256 * 1024, "page_size": 4096},
              {"idstr": "pc.rom", "length": 128 * 1024, "page_size": 4096},
              {"idstr": "vga.vram", "length": 8 * MiB, "page_size": 4096}]
    nonzero = 0
    with ImageWriter(p) as w:
        w.start(blocks)
        # 48 MiB of random data in a few runs, sent in batches of 1 MiB, out of order
        runs = [(0, 20 * MiB), (24 * MiB, 12 * MiB), (40 * MiB, 16 * MiB)]
        for start, length in reversed(runs):
            for off in range(start, start + length, MiB):
                data = rng.integers(0, 256, size=MiB, dtype=np.uint8).tobytes()
                w.sink.put_batch(page_records(0, list(range(off, off + MiB, PS))), data)
                nonzero += MiB
        for b, n in ((1, 64), (2, 32), (3, 16)):
            data = rng.integers(1, 256, size=n * PS, dtype=np.uint8).tobytes()
            w.sink.put_batch(page_records(b, [i * PS for i in range(n)]), data)
            nonzero += n * PS
        zeros = page_records(0, list(range(60 * MiB, 64 * MiB, PS)), flags=RAM_SAVE_FLAG_ZERO)
        w.sink.put_batch(zeros, b"")
        w.finish()
    size = os.path.getsize(p)
    assert size <= 1.15 * nonzero + 4 * MiB, (size, nonzero)
    with Image.open(p) as im:
        assert im.verify_all() == []


def test_abort_and_exception_leave_target_alone(tmp_path):
    p = tmp_path / "vm.qsnap"
    p.write_bytes(b"precious")
    with pytest.raises(RuntimeError):
        with ImageWriter(p) as w:
            w.start(BLOCKS)
            w.sink.put_batch(page_records(0, [0]), bytes(range(256)) * 16)
            raise RuntimeError("stream broke")
    assert_same(p.read_bytes(), b"precious", "p.read_bytes()")
    assert sorted(os.listdir(tmp_path)) == ["vm.qsnap"]
    w = ImageWriter(p)
    w.start(BLOCKS)
    w.abort()
    assert sorted(os.listdir(tmp_path)) == ["vm.qsnap"]
    # a bad record inside the batch: StreamError, nothing left behind
    q = tmp_path / "new.qsnap"
    with pytest.raises(StreamError):
        with ImageWriter(q) as w:
            w.start(BLOCKS)
            w.sink.put_batch(page_records(9, [0]), bytes(PS))
    assert sorted(os.listdir(tmp_path)) == ["vm.qsnap"]


def test_abort_stops_the_sink_writer_before_closing_its_fd(tmp_path):
    """Cluster writes still queued when a save fails must not reach the fd
    after abort() closes it (its number may be reused by then)."""
    p = tmp_path / "vm.qsnap"
    keep = None
    with pytest.raises(RuntimeError):
        with ImageWriter(p, n_slots=1) as w:
            w.start(BLOCKS)
            keep = w.sink            # a traceback may keep the sink alive like this
            data = bytes(range(256)) * 16 * 64
            for i in range(16):     # 16 clusters, each evicting the one before
                w.sink.put_batch(page_records(0, [i * MiB + k * PS for k in range(64)]), data)
            raise RuntimeError("stream broke")
    with pytest.raises(ValueError, match="closed"):
        keep.flush()
    assert os.listdir(tmp_path) == []


def test_temp_file_is_incomplete_until_finish(tmp_path):
    p = tmp_path / "vm.qsnap"
    with ImageWriter(p) as w:
        w.start(BLOCKS)
        w.sink.put_batch(page_records(0, [0]), b"\x01" * PS)
        w.sink.flush()
        pk = peek_header(w.tmp_path)
        assert pk["qsnap"] and not pk["complete"]
        with pytest.raises(ImageError, match=r"incomplete image \(the save did not finish\)"):
            Image.open(w.tmp_path)
        assert not p.exists()
        w.finish()
    assert peek_header(p)["complete"]
