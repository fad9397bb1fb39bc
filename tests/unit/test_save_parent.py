"""`qsnap save --parent`: an incremental image stores only what differs from its
parent; through its backing chain it reads as a stand-alone save of the same stream."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qsnap.errors import ImageError, UsageError
from qsnap.image import ImageWriter, qcow2
from qsnap.image.reader import Image
from qsnap.save import save
from qsnap.stream.constants import RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO
from qsnap.stream.synth import synth_stream

from bigcmp import assert_same

BLOCKS = [("pc.ram", 16 << 20), ("pc.bios", 256 << 10), ("pc.rom", 128 << 10)]
CS = 1 << 16

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


def stream(tmp_path, name, passes, blocks=BLOCKS, **kw):
    """A precopy stream whose final RAM is the one after ``passes`` passes:
    the same seed with one pass more changes the pages dirtied in that pass."""
    path = tmp_path / name
    with open(path, "wb") as f:
        synth_stream(f, blocks=blocks, mode="precopy-live", passes=passes, seed=11,
                     zero_run=64, dirty_share=0.005, **kw)
    return path


def save_file(stream_path, image_path, **kw):
    with open(stream_path, "rb") as f:
        return save(str(image_path), in_fd=f.fileno(), out_fd=-1, quiet=True, cluster_size=CS, **kw)


def raw(image, tmp_path):
    """The RAM block regions of ``image`` as `qemu-img convert -O raw` reads them
    (the metadata region after them is each image's own)."""
    from qsnap.image.metadata import read_metadata
    end = max(b["offset"] + b["length"] for b in read_metadata(str(image))["ram_blocks"])
    out = tmp_path / (os.path.basename(image) + ".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    with open(out, "rb") as f:
        data = f.read(end)
    out.unlink()
    return data


def header(path):
    with open(path, "rb") as f:
        return qcow2.HEADER.unpack(f.read(qcow2.HEADER.size))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    s2, s3, s4 = (stream(tmp, f"s{n}.stream", n) for n in (2, 3, 4))
    base = tmp / "base.qsnap"
    save_file(s2, base)
    child = tmp / "child.qsnap"
    summary = save_file(s3, child, parent=str(base))
    full = tmp / "full.qsnap"
    save_file(s3, full)
    return tmp, base, child, full, summary, s4


def test_child_reads_as_a_full_save_of_its_stream(chain):
    tmp, base, child, full, summary, _ = chain
    assert_same(raw(child, tmp), raw(full, tmp), "qemu-img convert of the child and of the full save")
    assert summary["clusters_inherited"] > 0
    # a few percent of the pages changed: a small fraction of the clusters is stored
    assert summary["data_clusters"] < 0.5 * (os.path.getsize(full) // CS)
    assert os.path.getsize(child) < 0.5 * os.path.getsize(full)


def test_child_header_names_its_parent(chain):
    tmp, base, child, full, _, _ = chain
    h = header(child)
    with open(child, "rb") as f:
        f.seek(h["backing_file_offset"])
        assert f.read(h["backing_file_size"]) == b"base.qsnap"
    assert header(full)["backing_file_offset"] == 0
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain",
                                      str(child)], capture_output=True, text=True,
                                     check=True).stdout)
    assert [os.path.basename(i["filename"]) for i in info] == ["child.qsnap", "base.qsnap"]
    assert info[0]["backing-filename-format"] == "qcow2"
    r = subprocess.run(["qemu-img", "check", str(child)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_child_metadata_records_the_parent(chain):
    from qsnap.image.metadata import read_metadata
    tmp, base, child, full, _, _ = chain
    doc = read_metadata(str(child))
    pdoc = read_metadata(str(base))
    assert doc["format_version"] == 2 and doc["image_id"] != pdoc["image_id"]
    rec = doc["parent"]
    assert rec["backing_file"] == "base.qsnap"
    assert rec["image_id"] == pdoc["image_id"] and rec["created"] == pdoc["created"]
    assert rec["device_state_crc32c"] == pdoc["device_state"]["crc32c"]
    assert [b["bitmap_crc32c"] for b in rec["ram_blocks"]] == [b["bitmap"]["crc32c"]
                                                             for b in pdoc["ram_blocks"]]
    # the child's state describes its whole RAM, as the full save's does
    fdoc = read_metadata(str(full))
    assert [b["checksums"]["crc32c"] for b in doc["ram_blocks"]] == \
        [b["checksums"]["crc32c"] for b in fdoc["ram_blocks"]]
    assert doc["counts"]["nonzero_pages"] == fdoc["counts"]["nonzero_pages"]


def test_parent_in_another_directory_is_named_by_absolute_path(chain, tmp_path):
    tmp, base, child, full, _, s4 = chain
    grand = tmp_path / "other.qsnap"
    save_file(stream(tmp_path, "s3b.stream", 3), grand, parent=str(base))
    h = header(grand)
    with open(grand, "rb") as f:
        f.seek(h["backing_file_offset"])
        assert f.read(h["backing_file_size"]) == str(base).encode()
    assert_same(raw(grand, tmp_path), raw(full, tmp), "child in another directory")


def test_same_content_stores_no_ram(tmp_path):
    """A stream sending every page once, saved onto a save of itself: every RAM
    cluster is inherited.  (A page sent in several versions differs from the
    parent's while in flight and is stored: conservative, never wrong.)"""
    path = tmp_path / "bg.stream"
    with open(path, "wb") as f:
        synth_stream(f, blocks=BLOCKS, mode="background", seed=5, zero_run=64)
    save_file(path, tmp_path / "base.qsnap")
    summary = save_file(path, tmp_path / "again.qsnap", parent=str(tmp_path / "base.qsnap"))
    assert summary["clusters_written"] == 0
    assert summary["clusters_inherited"] > 0
    assert_same(raw(tmp_path / "again.qsnap", tmp_path), raw(tmp_path / "base.qsnap", tmp_path),
                "the same stream onto its own save")


def test_other_ram_layout_is_refused(chain, tmp_path):
    tmp, base, _, _, _, _ = chain
    other = stream(tmp_path, "o.stream", 2, blocks=[("pc.ram", 8 << 20), ("pc.bios", 256 << 10),
                                                     ("pc.rom", 128 << 10)])
    out = tmp_path / "o.qsnap"
    with pytest.raises(ImageError, match=r"RAM block 0 \('pc.ram'\) length is 0x800000 in this "
                                         r"stream, 0x1000000 in the parent"):
        save_file(other, out, parent=str(base))
    assert not out.exists() and os.listdir(tmp_path) == ["o.stream"]


def test_other_cluster_size_is_refused(chain, tmp_path):
    tmp, base, _, _, _, _ = chain
    out = tmp_path / "c.qsnap"
    with open(stream(tmp_path, "c.stream", 3), "rb") as f:
        with pytest.raises(ImageError, match="cluster size is 1048576 in this stream, 65536"):
            save(str(out), in_fd=f.fileno(), out_fd=-1, quiet=True, cluster_size=1 << 20,
                 parent=str(base))
    assert not out.exists()


def test_saving_over_the_parent_is_refused(chain, tmp_path):
    tmp, base, _, _, _, _ = chain
    before = base.read_bytes()
    with pytest.raises(UsageError, match="is that image"):
        save_file(stream(tmp_path, "x.stream", 3), base, parent=str(base))
    assert base.read_bytes() == before


def test_cli_save_parent_and_missing_parent(chain, tmp_path):
    tmp, base, _, full, _, _ = chain
    s3 = stream(tmp_path, "s3.stream", 3)
    out = tmp_path / "cli.qsnap"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    with open(s3, "rb") as f:
        r = subprocess.run([sys.executable, "-m", "qsnap", "save", "-q", "--parent", str(base),
                            str(out)], stdin=f, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert_same(raw(out, tmp_path), raw(full, tmp), "qsnap save --parent (CLI)")
    with open(s3, "rb") as f:
        r = subprocess.run([sys.executable, "-m", "qsnap", "save", "--parent",
                            str(tmp_path / "nope.qsnap"), str(tmp_path / "n.qsnap")],
                           stdin=f, capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert r.stderr.startswith("qsnap: error: ") and "nope.qsnap" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "n.qsnap").exists()


def _write(path, pages, parent=None):
    """An image of one 4 MiB block (64 KiB clusters): ``pages`` {page: bytes or None}."""
    dtype = np.dtype([('offset', 'u8'), ('data_pos', 'u8'), ('data_len', 'u4'),
                      ('block', 'u4'), ('flags', 'u2'), ('fill', 'u1'), ('_pad', 'V5')])
    par = Image.open(str(parent)) if parent else None
    try:
        with ImageWriter(str(path), cluster_size=CS, parent=par) as w:
            w.start([{"idstr": "pc.ram", "length": 4 << 20, "page_size": 4096}])
            recs = np.zeros(len(pages), dtype)
            data = bytearray()
            for i, (p, content) in enumerate(sorted(pages.items())):
                recs[i]["offset"] = p * 4096
                if content is None:
                    recs[i]["flags"] = RAM_SAVE_FLAG_ZERO
                else:
                    recs[i]["flags"] = RAM_SAVE_FLAG_PAGE
                    recs[i]["data_pos"] = len(data)
                    recs[i]["data_len"] = 4096
                    data += content
            w.sink.put_batch(recs, bytes(data))
            return w.finish(header_bytes=b"QEVM\0\0\0\3", device_state=b"\x04dev" * 10,
                            stream_info={"ram_end": True}, machine="pc-i440fx-7.2")
    finally:
        if par is not None:
            par.close()


def test_cluster_that_became_zero_is_zero_flagged(tmp_path):
    """Clusters 0..3 full of data in the parent; the child's stream zeroes cluster
    1 and changes nothing else: cluster 1 gets the bare zero flag (zeros whatever the
    parent holds), the others are inherited, and the stream's other pages, never
    sent in the parent, stay zero."""
    rnd = np.random.default_rng(1)
    ppc = CS // 4096
    parent = {p: rnd.bytes(4096) for p in range(4 * ppc)}
    _write(tmp_path / "p.qsnap", parent)
    child = dict(parent)
    child.update({p: None for p in range(ppc, 2 * ppc)})
    summary = _write(tmp_path / "c.qsnap", child, parent=tmp_path / "p.qsnap")
    assert summary["clusters_written"] == 0 and summary["clusters_zeroed"] == 1
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(tmp_path / "c.qsnap")],
                                        capture_output=True, text=True, check=True).stdout)
    zero = [e for e in extents if e["depth"] == 0 and e["zero"] and e["start"] < 4 << 20]
    assert [(e["start"], e["length"]) for e in zero] == [(CS, CS)]
    want = b"".join(child.get(p) or bytes(4096) for p in range((4 << 20) // 4096))
    assert_same(raw(tmp_path / "c.qsnap", tmp_path), want, "the child through its parent")
