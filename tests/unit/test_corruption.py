"""Corruption corpus from real QEMU 7.2 streams and images saved from them.

Generated deterministically at test time (nothing large is committed):
truncations at every structure boundary and bit flips in every structure of the
streams (tests/data/*72*.stream.gz) and of images saved
from them.  save/load/info/check must end in a clean QsnapError or a proper
`check` exit code -- never another exception -- and every flipped bit in a
stored page is caught by `check` (exit 2) and by `load` (naming block and page).
"""
import io
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "fuzz"))
import seeds  # noqa: E402

from qsnap.errors import ChecksumError, ImageError, QsnapError  # noqa: E402
from qsnap.image import inspect  # noqa: E402
from qsnap.image.reader import Image  # noqa: E402
from qsnap.load import load  # noqa: E402
from qsnap.save import save  # noqa: E402
from qsnap.stream import events as ev  # noqa: E402
from qsnap.stream.reader import StreamReader  # noqa: E402

from bigcmp import assert_same  # noqa: E402

STREAMS = sorted(p.name for p in seeds.stream_paths(blob=False) if "72" in p.name)
IMAGE_SEEDS = ("pc72", "bg72", "is72")
PREVIOUS = b"an earlier image at this path\n"


def _stream(name):
    if name == "bg72-blob":
        return seeds.load_stream(seeds.BLOB_STREAM)
    return seeds.load_stream(seeds.stream_path(name.split(".")[0]))


def stream_boundaries(data):
    """Offsets where a stream structure starts: events, device-state sections, EOF,
    VMDESCRIPTION, and the end."""
    out = {0, 4, 8, len(data) - 1}
    for e in StreamReader(io.BytesIO(data)):
        off = getattr(e, "offset", None)
        if isinstance(off, int):
            out.add(off)
        if isinstance(e, ev.DeviceState):
            d = e.data
            i = d.find(b"\x7e")
            while i >= 0 and len(out) < 400:   # footers 7E <id> and the section after
                out.update((e.offset + i, e.offset + i + 5))
                i = d.find(b"\x7e", i + 5)
            if e.eof_pos is not None:
                out.update((e.offset + e.eof_pos, e.offset + e.eof_pos + 1, e.offset + e.eof_pos + 5))
        if isinstance(e, ev.MemSize):
            out.update((e.offset + 8, e.offset + 9))
    return sorted(o for o in out if 0 <= o < len(data))


def _save_expect_clean(data, path):
    """save() of ``data``: a clean QsnapError leaving the earlier file intact, or success."""
    path.write_bytes(PREVIOUS)
    fd = os.memfd_create("s")
    os.write(fd, data)
    os.lseek(fd, 0, 0)
    try:
        save(str(path), in_fd=fd, out_fd=-1, quiet=True, cluster_size=1 << 16)
    except QsnapError as e:
        assert str(e) and "\n" not in str(e)
        assert_same(path.read_bytes(), PREVIOUS, "path.read_bytes()")
        return False
    finally:
        os.close(fd)
        leftovers = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.qsnap-")]
        assert leftovers == []
    return True


def _stream_params():
    names = [n.split(".")[0] for n in STREAMS]
    if seeds.BLOB_STREAM.exists():
        names.append("bg72-blob")
    return names


@pytest.fixture(scope="module")
def streams():
    assert STREAMS, f"no *72*.stream.gz in {seeds.DATA_DIR}"
    return {n: _stream(n if n == "bg72-blob" else f"{n}.stream.gz") for n in _stream_params()}


@pytest.mark.parametrize("name", _stream_params())
def test_stream_truncated_at_every_boundary(streams, name, tmp_path):
    data = streams[name]
    cuts = set()
    for b in stream_boundaries(data):
        cuts.update((b, b + 1))
    cuts.discard(len(data))
    for k in sorted(cuts):
        if k >= len(data):
            continue
        ok = _save_expect_clean(data[:k], tmp_path / "img.qsnap")
        # A cut anywhere is an incomplete stream, except right after the EOF byte:
        # a stream may end at EOF without a VMDESCRIPTION.
        eof_end = data[k - 1] == 0 and data[k] == 0x06 and data.rfind(b"\x06") == k
        assert not ok or eof_end, f"{name}: stream cut at 0x{k:x} of 0x{len(data):x} was accepted"


@pytest.mark.parametrize("name", _stream_params())
def test_stream_bit_flips_at_every_structure(streams, name, tmp_path):
    data = streams[name]
    flips = 0
    for i, b in enumerate(stream_boundaries(data)):
        for at in (b, b + 1, b + 4):
            if at >= len(data):
                continue
            bad = bytearray(data)
            bad[at] ^= 1 << ((i + at) % 8)
            _save_expect_clean(bytes(bad), tmp_path / "img.qsnap")
            flips += 1
    assert flips > 50


@pytest.mark.parametrize("name", _stream_params())
def test_stream_oversized_lengths(streams, name, tmp_path):
    """Length fields set to huge values are refused before anything is allocated."""
    data = streams[name]
    dev = next(e for e in StreamReader(io.BytesIO(data)) if isinstance(e, ev.DeviceState))
    p = dev.data.rfind(b"\x06")
    at = dev.offset + p + 1   # VMDESCRIPTION json_length
    for value in (0xFFFFFFFF, 0x7FFFFFFF, len(data)):
        bad = bytearray(data)
        bad[at:at + 4] = value.to_bytes(4, "big")
        assert not _save_expect_clean(bytes(bad), tmp_path / "img.qsnap")


# --- images ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    assert STREAMS, f"no *72*.stream.gz in {seeds.DATA_DIR}"
    where = tmp_path_factory.mktemp("seed-images")
    out = {}
    for name, buf in seeds.seed_images(IMAGE_SEEDS, blob=True, where=where):
        out[name] = (buf, *seeds.image_map(buf))
    return out


def _all_readers(path, expect_codes):
    """check's exit code is in expect_codes; info/open/load give clean QsnapErrors or work."""
    report = inspect.check_image(path)
    assert report["exit_code"] in expect_codes, report
    try:
        inspect.describe(path)
    except ImageError as e:
        assert "\n" not in str(e)
    try:
        with Image.open(path) as img, open(os.devnull, "wb") as null:
            load(img, null.fileno(), cache="writeback", quiet=True)
    except QsnapError as e:
        assert "\n" not in str(e)
    return report


def _write(tmp_path, buf):
    p = tmp_path / "bad.qsnap"
    p.write_bytes(buf)
    return p


@pytest.mark.parametrize("name", IMAGE_SEEDS + ("bg72-blob",))
def test_image_truncated_at_every_boundary(images, name, tmp_path):
    buf, m, facts = images[name]
    cs = facts["cluster_size"]
    cuts = {0, 1, 103, 104, 4096, cs - 1, cs, len(buf) - cs, len(buf) - 1}
    for regions in m.values():
        for off, n in regions:
            cuts.update((off, off + 1, off + n // 2, off + n - 1, off + n))
    for k in sorted(c for c in cuts if 0 <= c < len(buf)):
        p = _write(tmp_path, buf[:k])
        with pytest.raises(ImageError):
            Image.open(p).close()
        _all_readers(p, {1} if k < 104 else {1, 2})


# Structure -> exit codes a flipped bit in it must give.
FLIP_CODES = {
    "header": {1, 2}, "extension": {1, 2}, "l1": {2}, "l2": {2}, "reftable": {2},
    "refblock": {2, 3}, "meta_head": {2}, "meta_json": {2}, "blobs": {2}, "data": {2},
}


@pytest.mark.parametrize("name", IMAGE_SEEDS + ("bg72-blob",))
@pytest.mark.parametrize("struct", sorted(FLIP_CODES))
def test_image_bit_flips_in_every_structure(images, name, struct, tmp_path):
    buf, m, facts = images[name]
    positions = []
    for off, n in m[struct]:
        positions += [off, off + n // 3, off + n // 2, off + n - 1]
        if struct in ("l1", "l2", "reftable", "refblock"):
            positions += [off + 8 * k + 7 for k in range(4)]
    if struct == "header":
        positions = list(range(0, 104, 3))
    assert positions, struct
    for i, at in enumerate(sorted(set(positions))):
        bad = bytearray(buf)
        bad[at] ^= 1 << (i % 8)
        _all_readers(_write(tmp_path, bytes(bad)), FLIP_CODES[struct])


@pytest.mark.parametrize("name", IMAGE_SEEDS + ("bg72-blob",))
def test_every_page_flip_caught_by_check_and_load(images, name, tmp_path):
    buf, m, facts = images[name]
    with Image.open(_write(tmp_path, buf)) as img:
        stored = [(bi, b.idstr, p * img.target_page_size)
                  for bi, b in enumerate(img.blocks)
                  for p in range(len(b.checksums)) if b.stored(p)]
        hosts = [img.host_offset(img.blocks[bi].offset + off) for bi, _, off in stored]
    assert stored
    step = max(1, len(stored) // 12)
    for i in range(0, len(stored), step):
        bi, idstr, off = stored[i]
        bad = bytearray(buf)
        bad[hosts[i] + (i * 131) % 4096] ^= 1 << (i % 8)
        p = _write(tmp_path, bytes(bad))
        report = inspect.check_image(p)
        assert report["exit_code"] == 2
        assert any(f"block '{idstr}' page 0x{off:x}" in x for x in report["problems"]), report
        with open(os.devnull, "wb") as null, pytest.raises(ChecksumError,
                                                          match=f"block '{idstr}' page 0x{off:x}"):
            load(str(p), null.fileno(), cache="writeback", quiet=True)


def test_cli_exit_codes_and_one_line_errors(images, tmp_path):
    buf, m, facts = images["pc72"]
    bad = bytearray(buf)
    bad[m["data"][0][0] + 100] ^= 0x10
    p = _write(tmp_path, bytes(bad))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "qsnap", *args], capture_output=True, timeout=60)

    r = run("check", str(p))
    assert r.returncode == 2 and b"ERROR" in r.stdout and b"Traceback" not in r.stderr
    r = run("load", "--cache=writeback", str(p))
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.startswith("qsnap: error: ") and "checksum mismatch" in err and "in block" in err
    assert err.count("\n") == 1
    bad = bytearray(buf)
    bad[m["l1"][0][0] + 7] ^= 0x40  # L1 entry off its L2 table
    p = _write(tmp_path, bytes(bad))
    for cmd in ("info", "load"):
        r = run(cmd, str(p))
        assert r.returncode == 1 and r.stderr.decode().startswith("qsnap: error: ")
        assert r.stderr.decode().count("\n") == 1 and "offset 0x" in r.stderr.decode()
    assert run("check", str(p)).returncode == 2
