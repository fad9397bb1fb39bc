"""Image format 2: image_id, the parent record, the backing name and zero-flag primitives,
and reading format 1 images (tests/data/pc72-v1.qsnap.gz, written by the format 1 writer)."""
import gzip
import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from qsnap.errors import ImageError
from qsnap.image import layout, qcow2
from qsnap.image.metadata import read_metadata
from qsnap.image.reader import Image
from qsnap.save import save

from bigcmp import assert_same
from test_image_roundtrip import write_image

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
MiB = 1 << 20


@pytest.fixture(scope="module")
def v1_and_v2(tmp_path_factory):
    """The format 1 image of pc72.stream.gz and a format 2 save of the same stream."""
    d = tmp_path_factory.mktemp("v1")
    v1 = d / "v1.qsnap"
    v1.write_bytes(gzip.decompress((DATA / "pc72-v1.qsnap.gz").read_bytes()))
    stream = d / "pc72.stream"
    stream.write_bytes(gzip.decompress((DATA / "pc72.stream.gz").read_bytes()))
    v2 = d / "v2.qsnap"
    with open(stream, "rb") as f:
        save(str(v2), in_fd=f.fileno(), out_fd=-1, cluster_size=64 * 1024, quiet=True)
    return v1, v2


def test_v1_image_reads_as_before(v1_and_v2):
    v1, v2 = v1_and_v2
    with Image.open(v1) as a, Image.open(v2) as b:
        assert a.ext["format_version"] == 1 and a.meta["format_version"] == 1
        assert a.image_id is None and a.parent is None and a.chain == [a]
        assert "image_id" not in a.meta and "parent" not in a.meta
        assert a.verify_all() == []
        assert [(x.idstr, x.length) for x in a.blocks] == [(x.idstr, x.length) for x in b.blocks]
        for i, blk in enumerate(a.blocks):
            for off in range(0, blk.length, a.target_page_size):
                assert_same(a.read_page(i, off), b.read_page(i, off), f"{blk.idstr} page 0x{off:x}")
        assert_same(a.device_state, b.device_state, "device state")
    assert read_metadata(str(v1))["format_version"] == 1


def test_v1_image_cli_check(v1_and_v2):
    r = subprocess.run([sys.executable, "-m", "qsnap", "check", str(v1_and_v2[0])],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_writer_writes_v2_with_a_fresh_image_id(tmp_path):
    ids = set()
    for name in ("a.qsnap", "b.qsnap"):
        write_image(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.ext["format_version"] == 2 and im.meta["format_version"] == 2
            assert im.meta["parent"] is None and im.parent is None and im.chain == [im]
            assert layout.is_image_id(im.image_id) and im.image_id == im.meta["image_id"]
            ids.add(im.image_id)
        assert read_metadata(str(tmp_path / name))["image_id"] in ids
    assert len(ids) == 2


def test_new_image_id_format():
    a, b = layout.new_image_id(), layout.new_image_id()
    assert a != b and len(a) == 32 and int(a, 16) >= 0 and a == a.lower()


def _doc(tmp_path):
    write_image(tmp_path / "x.qsnap")
    with Image.open(tmp_path / "x.qsnap") as im:
        return im, json.loads(json.dumps(im.meta))


def _validate(doc, im):
    layout.validate_meta(doc, im.meta_length, layout.META_HEAD.size)


@pytest.mark.parametrize("edit, msg", [
    (lambda d: d.pop("image_id"), r"meta\.image_id is missing"),
    (lambda d: d.pop("parent"), r"meta\.parent is missing"),
    (lambda d: d.update(image_id="ABC"), r"meta\.image_id 'ABC' is not 32 lowercase hex digits"),
    (lambda d: d.update(image_id="0" * 31 + "G"), r"meta\.image_id"),
    (lambda d: d.update(parent=[]), r"meta\.parent must be an object, not list"),
    (lambda d: d.update(format_version=3), r"meta\.format_version is 3, expected one of 1, 2"),
])
def test_validate_v2_identity(tmp_path, edit, msg):
    im, doc = _doc(tmp_path)
    _validate(doc, im)
    edit(doc)
    with pytest.raises(ImageError, match=msg):
        _validate(doc, im)


def test_v1_document_needs_no_identity(tmp_path):
    im, doc = _doc(tmp_path)
    doc["format_version"] = 1
    del doc["image_id"], doc["parent"]
    _validate(doc, im)


def test_parent_record_validates_and_is_checked(tmp_path):
    im, doc = _doc(tmp_path)
    rec = layout.parent_record(im, "base.qsnap")
    assert rec["backing_file"] == "base.qsnap" and rec["image_id"] == im.image_id
    assert rec["created"] == im.meta["created"]
    assert rec["device_state_crc32c"] == im.meta["device_state"]["crc32c"]
    assert [b["idstr"] for b in rec["ram_blocks"]] == [b.idstr for b in im.blocks]
    assert rec["ram_blocks"][0]["bitmap_crc32c"] == im.meta["ram_blocks"][0]["bitmap"]["crc32c"]
    assert rec["ram_blocks"][0]["checksums_crc32c"] == im.meta["ram_blocks"][0]["checksums"]["crc32c"]
    doc["parent"] = json.loads(json.dumps(rec))
    _validate(doc, im)
    for edit, msg in [
        (lambda p: p.pop("created"), r"meta\.parent\.created is missing"),
        (lambda p: p.update(backing_file="a\0b"), r"meta\.parent\.backing_file .*NUL"),
        (lambda p: p.update(backing_file="x" * 1024), r"meta\.parent\.backing_file .*1023"),
        (lambda p: p.update(image_id="nope"), r"meta\.parent\.image_id 'nope'"),
        (lambda p: p["ram_blocks"][0].pop("bitmap_crc32c"), r"ram_blocks\[0\]\.bitmap_crc32c is missing"),
    ]:
        bad = json.loads(json.dumps(doc))
        edit(bad["parent"])
        with pytest.raises(ImageError, match=msg):
            _validate(bad, im)
    doc["parent"]["image_id"] = None   # a format 1 parent has none
    _validate(doc, im)


def test_backing_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    a, b = tmp_path / "a", tmp_path / "b"
    assert layout.backing_name(a / "base.qsnap", a / "child.qsnap") == "base.qsnap"
    assert layout.backing_name(tmp_path / "link" / "base.qsnap", a / "child.qsnap") == "base.qsnap"
    assert layout.backing_name(a / "base.qsnap", b / "child.qsnap") == str(a / "base.qsnap")
    assert layout.resolve_backing("base.qsnap", b / "child.qsnap") == str(b / "base.qsnap")
    assert layout.resolve_backing(str(a / "base.qsnap"), b / "c.qsnap") == str(a / "base.qsnap")


def _header_cluster(backing_name):
    hdr = qcow2.make_header(cluster_bits=16, size=1 << 20, l1_size=1, l1_table_offset=1 << 16,
                            refcount_table_offset=2 << 16, refcount_table_clusters=1)
    return qcow2.pack_header_cluster(hdr, [(layout.QSNAP_EXT_TYPE, bytes(40))], 1 << 16,
                                     backing_name=backing_name)


def test_header_cluster_with_backing_name():
    buf = _header_cluster("base.qsnap")
    hdr = qcow2.HEADER.unpack(buf)
    exts = qcow2.unpack_extensions(buf, qcow2.HEADER_LENGTH_V3, len(buf))
    assert [t for t, _, _ in exts] == [layout.QSNAP_EXT_TYPE, qcow2.QCOW2_EXT_MAGIC_BACKING_FORMAT]
    assert exts[1][1] == b"qcow2"
    end_marker = exts[1][2] + 8 + 8   # the backing-format extension, padded to 8, then the end marker
    assert hdr["backing_file_offset"] == end_marker + 8
    assert hdr["backing_file_size"] == len(b"base.qsnap")
    off = hdr["backing_file_offset"]
    assert buf[end_marker:end_marker + 8] == bytes(8)
    assert buf[off:off + hdr["backing_file_size"]] == b"base.qsnap"
    assert len(buf) == 1 << 16 and not any(buf[off + hdr["backing_file_size"]:])


def test_header_cluster_without_backing_name():
    buf = _header_cluster(None)
    hdr = qcow2.HEADER.unpack(buf)
    assert hdr["backing_file_offset"] == 0 and hdr["backing_file_size"] == 0
    exts = qcow2.unpack_extensions(buf, qcow2.HEADER_LENGTH_V3, len(buf))
    assert [t for t, _, _ in exts] == [layout.QSNAP_EXT_TYPE]


@pytest.mark.parametrize("name", ["", "a\0b", "x" * 1024])
def test_header_cluster_refuses_bad_backing_names(name):
    with pytest.raises(ValueError, match="backing file name"):
        _header_cluster(name)


def test_sparse_l2_tables_zero_flag():
    cb = 16
    per_table = 1 << (cb - 3)
    virt = np.array([3, 1], np.uint64)
    host = np.array([0x30000, 0x10000], np.uint64)
    zero = np.array([2, per_table + 5], np.uint64)
    l1, tables = qcow2.sparse_l2_tables(virt, host, cb, zero_virt=zero)
    tables = [np.frombuffer(t, ">u8") for t in tables]
    assert list(l1) == [0, 1] and len(tables) == 2
    assert int(tables[0][1]) == 0x10000 | qcow2.QCOW_OFLAG_COPIED
    assert int(tables[0][3]) == 0x30000 | qcow2.QCOW_OFLAG_COPIED
    assert int(tables[0][2]) == qcow2.QCOW_OFLAG_ZERO
    assert int(tables[1][5]) == qcow2.QCOW_OFLAG_ZERO
    assert np.count_nonzero(tables[0]) == 3 and np.count_nonzero(tables[1]) == 1
    l1, tables = qcow2.sparse_l2_tables(virt, host, cb)
    assert list(l1) == [0] and np.count_nonzero(np.frombuffer(next(tables), ">u8")) == 2


def test_metadata_version_must_match_the_extension(tmp_path):
    p = tmp_path / "x.qsnap"
    write_image(p)
    buf = bytearray(p.read_bytes())
    ext_off = qcow2.HEADER_LENGTH_V3 + 8
    ext = layout.QSNAP_EXT.unpack(buf, ext_off)
    buf[ext_off:ext_off + 40] = layout.pack_qsnap_ext(
        flags=ext["flags"], meta_offset=ext["meta_offset"], meta_length=ext["meta_length"],
        meta_crc32c=ext["meta_crc32c"], target_page_size=ext["target_page_size"], format_version=1)
    p.write_bytes(bytes(buf))
    with pytest.raises(ImageError, match="metadata format_version 2 differs from the header extension's 1"):
        Image.open(p)
    assert struct.unpack(">I", buf[ext_off:ext_off + 4]) == (1,)
