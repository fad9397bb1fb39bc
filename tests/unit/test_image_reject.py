import os
import struct

import numpy as np
import pytest

from qsnap.errors import ChecksumError, ImageError
from qsnap.image import Image, peek_header
from qsnap.image import layout, qcow2

from test_image_roundtrip import write_image
from bigcmp import assert_same

MiB = 1 << 20
PS = 4096


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "good.qsnap"
    expect, _ = write_image(p)
    return p, expect


@pytest.fixture
def img(good, tmp_path):
    p = tmp_path / "bad.qsnap"
    p.write_bytes(good[0].read_bytes())
    return p


def header(p):
    return qcow2.HEADER.unpack(p.read_bytes()[:qcow2.HEADER.size])


def patch(p, off, data):
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(data)


def set_field(p, name, value):
    off = 0
    for n, code in qcow2.HEADER_FIELDS:
        if n == name:
            patch(p, off, struct.pack(">" + code, value))
            return
        off += struct.calcsize(code)
    raise KeyError(name)


def rewrite_ext(p, **changes):
    buf = p.read_bytes()
    ext_off = qcow2.HEADER_LENGTH_V3 + 8
    ext = layout.QSNAP_EXT.unpack(buf, ext_off)
    ext.update(changes)
    patch(p, ext_off, layout.pack_qsnap_ext(
        flags=ext["flags"], meta_offset=ext["meta_offset"], meta_length=ext["meta_length"],
        meta_crc32c=ext["meta_crc32c"], target_page_size=ext["target_page_size"],
        format_version=ext["format_version"]))


def l2_entries(p):
    h = header(p)
    l1 = np.frombuffer(p.read_bytes()[h["l1_table_offset"]:h["l1_table_offset"] + 8 * h["l1_size"]],
                       dtype=">u8")
    l2_off = int(l1[0]) & qcow2.L1E_OFFSET_MASK
    l2 = np.frombuffer(p.read_bytes()[l2_off:l2_off + MiB], dtype=">u8")
    return h, l2_off, l2


def test_good_opens(good):
    with Image.open(good[0]) as im:
        assert im.verify_all() == []


def test_bad_magic(img):
    patch(img, 0, b"QFI\xfa")
    with pytest.raises(ImageError, match=r"not a qsnap image: bad qcow2 magic 0x514649fa at image offset 0x0"):
        Image.open(img)
    assert not peek_header(img)["qsnap"]


def test_not_qcow2_at_all(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"hello")
    with pytest.raises(ImageError, match="not a qsnap image"):
        Image.open(p)


def test_version_2(img):
    set_field(img, "version", 2)
    with pytest.raises(ImageError, match="unsupported qcow2 version 2"):
        Image.open(img)


def test_incompatible_features(img):
    set_field(img, "incompatible_features", (1 << 0) | (1 << 40))
    with pytest.raises(ImageError, match=r"incompatible features 0x10000000001 \(dirty bit, unknown bit 40\)"):
        Image.open(img)


def test_cluster_bits(img):
    set_field(img, "cluster_bits", 12)
    with pytest.raises(ImageError, match="cluster_bits 12"):
        Image.open(img)


def test_backing_file(img):
    set_field(img, "backing_file_offset", 0x200)
    with pytest.raises(ImageError, match="backing file"):
        Image.open(img)


@pytest.mark.parametrize("bad", ["eof", "unaligned"])
def test_l1_entry_bad(img, bad):
    h = header(img)
    size = os.path.getsize(img)
    value = size + MiB if bad == "eof" else h["l1_table_offset"] - MiB + 512
    patch(img, h["l1_table_offset"], struct.pack(">Q", value | qcow2.QCOW_OFLAG_COPIED))
    with pytest.raises(ImageError, match=r"L2 table offset 0x[0-9a-f]+ \(at image offset 0x[0-9a-f]+\) "
                                         r"is unaligned or outside the file"):
        Image.open(img)


def test_l1_table_past_eof(img):
    set_field(img, "l1_table_offset", os.path.getsize(img))
    with pytest.raises(ImageError, match="L1 table offset"):
        Image.open(img)


@pytest.mark.parametrize("bad", ["eof", "unaligned", "compressed"])
def test_l2_entry_bad(img, bad):
    h, l2_off, l2 = l2_entries(img)
    i = int(np.flatnonzero(l2)[0])
    e = int(l2[i])
    size = os.path.getsize(img)
    if bad == "eof":
        e = size | qcow2.QCOW_OFLAG_COPIED
        msg = "points outside the file"
    elif bad == "unaligned":
        e = e + 4096
        msg = "unaligned"
    else:
        e = e | qcow2.QCOW_OFLAG_COMPRESSED
        msg = "compressed L2 entry"
    patch(img, l2_off + 8 * i, struct.pack(">Q", e))
    with pytest.raises(ImageError, match=msg):
        Image.open(img)


def test_duplicated_host_cluster(img):
    h, l2_off, l2 = l2_entries(img)
    used = np.flatnonzero(l2)
    assert len(used) >= 2
    patch(img, l2_off + 8 * int(used[1]), struct.pack(">Q", int(l2[used[0]])))
    with pytest.raises(ImageError, match=r"host cluster 0x[0-9a-f]+ is mapped twice"):
        Image.open(img)


def test_data_cluster_over_metadata(img):
    h, l2_off, l2 = l2_entries(img)
    i = int(np.flatnonzero(l2)[0])
    patch(img, l2_off + 8 * i, struct.pack(">Q", h["l1_table_offset"] | qcow2.QCOW_OFLAG_COPIED))
    with pytest.raises(ImageError, match="overlaps qcow2 metadata"):
        Image.open(img)


def test_missing_qsnap_extension(img):
    patch(img, qcow2.HEADER_LENGTH_V3, bytes(8))  # end marker where the extension was
    with pytest.raises(ImageError, match="not a qsnap image: .* without the qsnap header extension"):
        Image.open(img)


def test_complete_clear(img):
    rewrite_ext(img, flags=0)
    with pytest.raises(ImageError, match=r"^incomplete image \(the save did not finish\)$"):
        Image.open(img)
    assert peek_header(img)["complete"] is False


def test_newer_format_version(img):
    rewrite_ext(img, format_version=3)
    with pytest.raises(ImageError, match=r"image format version 3 is newer than this qsnap supports \(2\)"):
        Image.open(img)


def test_ext_crc(img):
    patch(img, qcow2.HEADER_LENGTH_V3 + 8 + 8, b"\x00\x00\x00\x00\x00\x00\x10\x00")
    with pytest.raises(ChecksumError, match="qsnap header extension checksum"):
        Image.open(img)


def test_flipped_bit_in_metadata(img):
    with Image.open(img) as im:
        h = im.host_offset(im.meta_offset + 40)
    data = bytearray(img.read_bytes()[h:h + 1])
    patch(img, h, bytes([data[0] ^ 0x04]))
    with pytest.raises(ChecksumError, match="metadata region checksum mismatch"):
        Image.open(img)


def test_bad_json_rejected_even_with_valid_crc(img):
    # rewrite the metadata with a wrong bitmap length and a fixed-up crc
    with Image.open(img) as im:
        region = bytearray(im._read_virtual(im.meta_offset, im.meta_length))
        mo = im.meta_offset
        h = im.host_offset(mo)
    jl = struct.unpack(">Q", region[8:16])[0]
    text = region[16:16 + jl].decode()
    import json
    doc = json.loads(text)
    doc["ram_blocks"][0]["bitmap"]["length"] += 1
    doc["counts"]["pages"] = -1
    new = json.dumps(doc, separators=(",", ":")).encode()
    assert len(new) <= layout.BLOB_ALIGN - 16
    region[8:16] = struct.pack(">Q", len(new))
    region[16:16 + max(jl, len(new))] = new.ljust(max(jl, len(new)), b"\0")
    patch(img, h, bytes(region))
    rewrite_ext(img, meta_crc32c=layout._crc32c(bytes(region)))
    with pytest.raises(ImageError, match=r"bad image metadata: meta.counts.pages must be an unsigned integer"):
        Image.open(img)


@pytest.mark.parametrize("field,value", [("instance_id", 4096), ("version_id", 0)])
def test_ram_section_other_than_qemus_rejected(good, field, value):
    # load sends these in the RAM SECTION_START, which QEMU takes only as instance 0, version 4
    with Image.open(good[0]) as im:
        region = im._read_virtual(im.meta_offset, im.meta_length)
        doc, _ = layout.parse_meta_region(region, len(region), im.meta_offset)
    jl = struct.unpack(">Q", region[8:16])[0]
    doc["stream"]["ram_section"] = {"section_id": 2, "instance_id": 0, "version_id": 4}
    layout.validate_meta(doc, len(region), 16 + jl)
    doc["stream"]["ram_section"][field] = value
    with pytest.raises(ImageError, match=r"meta.stream.ram_section instance \d+ version \d+ is not QEMU's"):
        layout.validate_meta(doc, len(region), 16 + jl)


def test_flipped_bit_in_data_cluster(img, good):
    expect = good[1]
    with Image.open(img) as im:
        h = im.host_offset(im.blocks[0].offset + 0x2000)
    patch(img, h + 100, bytes([img.read_bytes()[h + 100] ^ 1]))
    with Image.open(img) as im:
        assert_same(im.read_page(0, 0x1000), expect[(0, 0x1000)], "im.read_page(0, 0x1000)")
        with pytest.raises(ChecksumError, match=r"checksum mismatch in block 'pc.ram' page 0x2000 "
                                                rf"\(image offset 0x{h:x}\)"):
            im.read_page(0, 0x2000)
        problems = im.verify_all()
        assert problems == [f"checksum mismatch in block 'pc.ram' page 0x2000 (image offset 0x{h:x})"]


def test_nonzero_data_in_unstored_page_reported(img):
    with Image.open(img) as im:
        h = im.host_offset(im.blocks[0].offset + 0x3000)
    patch(img, h + 5, b"\x01")
    with Image.open(img) as im:
        assert im.verify_all() == [f"page 0x3000 of block 'pc.ram' is not marked stored but is not "
                                   f"zero (image offset 0x{h:x})"]


def test_truncated(img):
    size = os.path.getsize(img)
    os.truncate(img, size - MiB)
    with pytest.raises(ImageError):
        Image.open(img)
