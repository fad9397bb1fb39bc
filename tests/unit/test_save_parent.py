"""`qsnap save --parent`: an incremental image stores only what differs from its
parent; through its backing chain it reads as a stand-alone save of the same stream."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from qsnap.errors import ImageError, UsageError
from qsnap.image import qcow2
from qsnap.save import save
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
