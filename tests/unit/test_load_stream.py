"""load(): the stream framing around the pages, on a hand-made image object."""
import io
import os
import struct
from array import array
from types import SimpleNamespace

import numpy as np
import pytest

from qsnap import _core
from qsnap.errors import ImageError
from qsnap.load import load, mem_size_record
from qsnap.stream import constants as C
from qsnap.stream import events as ev
from qsnap.stream.reader import StreamReader

from bigcmp import assert_same

PAGE = 4096
CS = 64 * 1024


def be32(v):
    return struct.pack(">I", v)


def be64(v):
    return struct.pack(">Q", v)


def counted(s):
    return bytes([len(s)]) + s


def header_bytes(caps=()):
    h = be32(C.QEMU_VM_FILE_MAGIC) + be32(C.QEMU_VM_FILE_VERSION)
    h += b"\x07" + be32(13) + b"pc-i440fx-7.2"
    if caps:
        h += b"\x05" + counted(b"configuration/capabilities") + be32(1) + be32(len(caps))
        h += b"".join(counted(c.encode()) for c in caps)
    return h


DEVICE_STATE = (b"\x04" + be32(7) + counted(b"timer") + be32(0) + be32(2) + bytes(25)
                + b"\x7e" + be32(7) + b"\x00")


def fake_image(tmp_path, *, caps=(), ram_end=True, switchover=False, footers=True):
    """Block 'pc.ram' (3 clusters, some pages stored) migrated; 'shared' (GPA, not migrated)."""
    rnd = np.random.default_rng(4)
    n = 3 * CS // PAGE
    stored = np.zeros(n, bool)
    stored[[0, 1, 5, 17, 18, 40]] = True
    data = np.zeros(n * PAGE, np.uint8)
    crcs = np.zeros(n, np.uint32)
    for p in np.flatnonzero(stored):
        page = rnd.integers(0, 256, PAGE, dtype=np.uint8)
        data[p * PAGE:(p + 1) * PAGE] = page
        crcs[p] = _core.crc32c(page.tobytes())
    # clusters 0 and 2 allocated (cluster 1's stored pages 17, 18 -> cluster 1 too)
    used = sorted({p * PAGE // CS for p in np.flatnonzero(stored)})
    host = {c: (1 + i) * CS for i, c in enumerate(reversed(used))}   # reversed on disk
    f = bytearray((1 + len(used)) * CS)
    for c, h in host.items():
        f[h:h + CS] = data[c * CS:(c + 1) * CS].tobytes()
    path = tmp_path / "fake.img"
    path.write_bytes(bytes(f))
    pairs = np.array(sorted((h, c * CS) for c, h in host.items()), np.uint64)
    blocks = [
        FakeBlock(idstr="pc.ram", length=n * PAGE, offset=0, migrated=True, gpa=0,
                        bitmap=np.packbits(stored, bitorder="little"), checksums=crcs),
        FakeBlock(idstr="shared", length=2 * PAGE, offset=3 * CS, migrated=False,
                        gpa=0xFFFC0000, bitmap=np.zeros(1, np.uint8), checksums=np.zeros(2, np.uint32)),
    ]
    info = {"footers": footers, "ram_section": {"section_id": 2, "instance_id": 0, "version_id": 4},
            "ram_end": ram_end, "switchover_start": switchover, "capabilities": list(caps),
            "mem_size_total": n * PAGE + 2 * PAGE}
    img = SimpleNamespace(path=str(path), blocks=blocks, cluster_size=CS, target_page_size=PAGE,
                          stream_info=info, header_bytes=header_bytes(caps), pre_ram=b"",
                          device_state=DEVICE_STATE if footers else DEVICE_STATE.replace(
                              b"\x7e" + be32(7), b""),
                          ram_clusters=lambda: (array("Q", pairs[:, 0]), array("Q", pairs[:, 1])))
    return img, data.tobytes(), stored


class FakeBlock(SimpleNamespace):
    """A block as the engines read it: page state by window (BlockInfo.bit_bytes/crc_array)."""

    def bit_bytes(self, first, n):
        return self.bitmap[first // 8:(first + n + 7) // 8].tobytes()

    def crc_array(self, first, n):
        return array("I", self.checksums[first:first + n].astype(np.uint32))


def run(img, tmp_path, **kw):
    out = tmp_path / "out.stream"
    with open(out, "wb") as f:
        stats = load(img, out_fd=f.fileno(), quiet=True, **kw)
    return out.read_bytes(), stats


def test_x_ignore_shared_gpa_and_unmigrated_block(tmp_path):
    img, data, stored = fake_image(tmp_path, caps=("x-ignore-shared",))
    raw, stats = run(img, tmp_path)
    start = (b"\x01" + be32(2) + counted(b"ram") + be32(0) + be32(4)
             + be64((48 * PAGE + 2 * PAGE) | C.RAM_SAVE_FLAG_MEM_SIZE)
             + counted(b"pc.ram") + be64(48 * PAGE) + be64(0)
             + counted(b"shared") + be64(2 * PAGE) + be64(0xFFFC0000)
             + be64(C.RAM_SAVE_FLAG_EOS) + b"\x7e" + be32(2))
    assert raw[len(img.header_bytes):].startswith(start)
    pages, zeros = {}, set()
    mem = None
    for e in StreamReader(io.BytesIO(raw)):
        if isinstance(e, ev.MemSize):
            mem = e
        elif isinstance(e, ev.PageBatch):
            for idstr, off, flags, payload in e.iter_pages():
                assert idstr == "pc.ram"            # nothing for the unmigrated block
                if payload is None:
                    zeros.add(off)
                else:
                    pages[off] = payload
    assert [(b.idstr, b.gpa) for b in mem.blocks] == [("pc.ram", 0), ("shared", 0xFFFC0000)]
    assert_same(sorted(pages), [p * PAGE for p in np.flatnonzero(stored)], "stored page offsets")
    for off, payload in pages.items():
        assert_same(payload, data[off:off + PAGE], f"page {off:#x}")
    assert zeros == {p * PAGE for p in np.flatnonzero(~stored)}
    assert stats["pages"] == 6 and stats["zero_pages"] == 42
    # the ZERO records go first (QEMU works on them while the data clusters are read),
    # then the pages in host-file order: cluster 2 is first on disk
    cont = C.RAM_SAVE_FLAG_PAGE | C.RAM_SAVE_FLAG_CONTINUE
    first_page = raw.index(be64(40 * PAGE | cont))
    assert first_page < raw.index(be64(0 | cont))
    assert raw.index(be64(3 * PAGE | C.RAM_SAVE_FLAG_ZERO | C.RAM_SAVE_FLAG_CONTINUE)) < first_page


def test_switchover_then_end_then_device_state(tmp_path):
    img, _, _ = fake_image(tmp_path, switchover=True, ram_end=True)
    raw, _ = run(img, tmp_path)
    tail = (b"\x08\x00\x0b\x00\x00" + b"\x03" + be32(2) + be64(C.RAM_SAVE_FLAG_EOS) + b"\x7e" + be32(2)
            + DEVICE_STATE)
    assert raw.endswith(tail)


def test_background_snapshot_has_no_end(tmp_path):
    img, _, _ = fake_image(tmp_path, ram_end=False)
    raw, stats = run(img, tmp_path)
    assert raw.endswith(be64(C.RAM_SAVE_FLAG_EOS) + b"\x7e" + be32(2) + DEVICE_STATE)
    assert b"\x08\x00\x0b\x00\x00" not in raw
    assert b"\x03" + be32(2) + be64(C.RAM_SAVE_FLAG_EOS) not in raw


def test_no_footers_no_capabilities(tmp_path):
    img, _, _ = fake_image(tmp_path, footers=False)
    raw, _ = run(img, tmp_path)
    assert b"\x7e" + be32(2) not in raw
    assert raw[len(img.header_bytes):].startswith(
        b"\x01" + be32(2) + counted(b"ram") + be32(0) + be32(4)
        + be64(50 * PAGE | C.RAM_SAVE_FLAG_MEM_SIZE) + counted(b"pc.ram") + be64(48 * PAGE)
        + counted(b"shared") + be64(2 * PAGE) + be64(C.RAM_SAVE_FLAG_EOS) + b"\x02" + be32(2))
    events = list(StreamReader(io.BytesIO(raw)))
    assert isinstance(events[-1], ev.EndOfStream)


def test_mem_size_total_must_match(tmp_path):
    img, _, _ = fake_image(tmp_path)
    img.stream_info["mem_size_total"] += PAGE
    with pytest.raises(ImageError, match="mem_size_total"):
        mem_size_record(img.blocks, img.stream_info)


def test_truncated_image_file_is_an_image_error(tmp_path):
    img, _, _ = fake_image(tmp_path)
    os.truncate(img.path, os.path.getsize(img.path) - CS)
    with pytest.raises(ImageError, match="truncated"):
        run(img, tmp_path, cache="writeback")


def test_bad_cache_mode(tmp_path):
    from qsnap.errors import UsageError

    img, _, _ = fake_image(tmp_path)
    with pytest.raises(UsageError):
        run(img, tmp_path, cache="bogus")
