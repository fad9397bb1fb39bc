"""qsnap.image.metadata: the metadata document without the page machinery."""
import json
import os
import struct
import subprocess
import sys

import pytest

from qsnap.errors import ImageError, IOFailure
from qsnap.image import Image, layout
from qsnap.image.metadata import read_metadata, readahead

from test_image_reject import header, patch, rewrite_ext, set_field
from test_image_roundtrip import write_image

MiB = 1 << 20


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    p = tmp_path_factory.mktemp("meta") / "good.qsnap"
    write_image(p)
    return p


@pytest.fixture
def img(good, tmp_path):
    p = tmp_path / "bad.qsnap"
    p.write_bytes(good.read_bytes())
    return p


def test_same_document_as_the_reader(good):
    with Image.open(good) as im:
        assert read_metadata(good) == im.meta


def test_imports_neither_numpy_nor_the_extension(good):
    code = ("import sys; from qsnap.image.metadata import read_metadata; "
            f"doc = read_metadata({str(good)!r}); "
            "print(sorted(m for m in ('numpy', 'qsnap._core', 'qsnap.image.reader') if m in sys.modules), "
            "doc['machine'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["[]", "pc-i440fx-7.2"]


def test_document_across_a_cluster_boundary(tmp_path):
    """64 KiB clusters: the JSON of a big VM record spans several clusters."""
    p = tmp_path / "small-clusters.qsnap"
    write_image(p, cluster_size=64 << 10)
    with Image.open(p) as im:
        assert read_metadata(p) == im.meta


def test_vm_record_read(good, tmp_path):
    """A VM record in the document is read as stored (built the way save stores it)."""
    p, region, h, doc = _copy_with_doc(good, tmp_path / "vm.qsnap")
    doc["vm"] = {"qemu_version": "7.2.22", "qemu_package": None, "machine": "pc-i440fx-7.2",
                 "cmdline": ["qemu-system-x86_64", "-m", "128M"], "mode": "stopped", "was_running": True,
                 "downtime_ms": None, "ram_only": True, "disks": []}
    _rewrite_json(p, region, h, doc)
    assert read_metadata(p)["vm"] == doc["vm"]


def _copy_with_doc(good, p):
    """A copy of ``good`` at ``p``: (p, its metadata region, the region's image offset, its document)."""
    with Image.open(good) as im:
        mo, h = im.meta_offset, im.host_offset(im.meta_offset)
        region = bytearray(im._read_virtual(mo, im.meta_length))
    p.write_bytes(good.read_bytes())
    doc, _ = layout.parse_meta_region(bytes(region), len(region), mo)
    return p, region, h, doc


def _rewrite_json(p, region, host, doc):
    jl = struct.unpack(">Q", region[8:16])[0]
    new = json.dumps(doc, separators=(",", ":")).encode()
    assert len(new) <= layout.BLOB_ALIGN - 16  # the blobs start at the next 4 KiB
    region[8:16] = struct.pack(">Q", len(new))
    region[16:16 + max(jl, len(new))] = new.ljust(max(jl, len(new)), b"\0")
    patch(p, host, bytes(region))
    rewrite_ext(p, meta_crc32c=layout._crc32c(bytes(region)))


def test_bad_magic(img):
    patch(img, 0, b"QFI\xfa")
    with pytest.raises(ImageError, match=r"not a qsnap image: bad qcow2 magic 0x514649fa"):
        read_metadata(img)


def test_not_an_image(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"hello")
    with pytest.raises(ImageError, match="not a qsnap image: .* too short"):
        read_metadata(p)
    with pytest.raises(IOFailure, match="no such file"):
        read_metadata(tmp_path / "missing")


def test_missing_extension(img):
    patch(img, 104, bytes(8))
    with pytest.raises(ImageError, match="without the qsnap header extension"):
        read_metadata(img)


def test_incomplete(img):
    rewrite_ext(img, flags=0)
    with pytest.raises(ImageError, match=r"incomplete image .*bad.qsnap \(the save did not finish\)"):
        read_metadata(img)


def test_newer_format(img):
    rewrite_ext(img, format_version=3)
    with pytest.raises(ImageError, match=r"image format version 3 is newer"):
        read_metadata(img)


def test_incompatible_features(img):
    set_field(img, "incompatible_features", 1)
    with pytest.raises(ImageError, match="incompatible features 0x1"):
        read_metadata(img)


def test_metadata_outside_the_image(img):
    rewrite_ext(img, meta_offset=header(img)["size"])
    with pytest.raises(ImageError, match="metadata region 0x[0-9a-f]+\\+0x[0-9a-f]+ lies outside"):
        read_metadata(img)


@pytest.mark.parametrize("bad", ["eof", "unaligned", "reserved"])
def test_bad_l1_entry(img, bad):
    h = header(img)
    at = h["l1_table_offset"] + 8 * (layout.QSNAP_EXT.unpack(img.read_bytes(), 112)["meta_offset"]
                                     >> (2 * 20 - 3))
    e = struct.unpack(">Q", img.read_bytes()[at:at + 8])[0]
    e = {"eof": os.path.getsize(img), "unaligned": (e & ~(1 << 63)) + 512, "reserved": e | 1 << 56}[bad]
    patch(img, at, struct.pack(">Q", e))
    with pytest.raises(ImageError, match="L1 entry .* reserved bits|L2 table offset .* unaligned or outside"):
        read_metadata(img)


def test_json_checked_as_the_reader_checks_it(good, tmp_path):
    p, region, h, doc = _copy_with_doc(good, tmp_path / "badjson.qsnap")
    doc["ram_blocks"][0]["length"] = "big"
    _rewrite_json(p, region, h, doc)
    with pytest.raises(ImageError, match=r"bad image metadata: meta.ram_blocks\[0\].length must be an unsigned"):
        read_metadata(p)


def test_truncated(img):
    os.truncate(img, 3 * MiB)
    with pytest.raises(ImageError):
        read_metadata(img)


def test_readahead_asks_for_the_tables_and_the_metadata(good, tmp_path):
    with Image.open(good) as im:
        cs, meta = im.cluster_size, im.meta_length
    tables = cs + header(good)["refcount_table_clusters"] * cs  # one L2 table, the refcount table
    assert readahead(good) == tables + -(-meta // cs) * cs
    assert readahead(tmp_path / "missing") == 0
    bad = tmp_path / "bad.qsnap"
    bad.write_bytes(good.read_bytes()[:4096])
    assert readahead(bad) == 0  # the reader reports a damaged image, not the readahead
