"""Backing chains: reading a child through its parents, the parent checks, flatten and commit."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qsnap.errors import ImageError, UsageError
from qsnap.image import layout, qcow2
from qsnap.image import rewrite as rewrite_mod
from qsnap.image.chain import check_parent, cluster_sources
from qsnap.image.metadata import read_metadata
from qsnap.image.reader import Image
from qsnap.image.rewrite import commit, flatten

from _chainutil import CS, PS, PPC, page, rebase, two_generations, write_full
from bigcmp import assert_same

QEMU_IMG = shutil.which("qemu-img")


def qsnap(*args):
    return subprocess.run([sys.executable, "-m", "qsnap", *args], capture_output=True, text=True,
                          timeout=120)


def need_qemu_img():
    if QEMU_IMG is None:
        if os.environ.get("QSNAP_REQUIRE_QEMU") == "1":
            pytest.fail("qemu-img is missing and QSNAP_REQUIRE_QEMU=1")
        pytest.skip("qemu-img is not installed")


@pytest.fixture
def chain(tmp_path):
    """base.qsnap <- child.qsnap, and full2.qsnap: the child's content stand-alone."""
    base, child = two_generations()
    write_full(tmp_path / "base.qsnap", base)
    write_full(tmp_path / "full2.qsnap", child)
    summary = rebase(tmp_path / "full2.qsnap", tmp_path / "base.qsnap", tmp_path / "child.qsnap")
    return tmp_path, base, child, summary


def assert_content(path, pages, blocks=(0, 1)):
    """Every page of the image at ``path`` reads as ``pages`` (absent: zeros)."""
    with Image.open(path) as im:
        for bi in blocks:
            b = im.blocks[bi]
            for i in range(b.length // PS):
                assert_same(im.read_page(bi, i * PS), pages.get((bi, i), bytes(PS)), f"{b.idstr} page {i}")
        assert im.verify_all() == []


def test_child_stores_only_what_differs(chain):
    d, base, child, s = chain
    # cluster 0 (a changed page), 1 (a zeroed page), the new cluster and vga.vram's are copied,
    # the clusters of pages 100, 200 and 300 inherited, cluster 2 (all zero now) zero-flagged
    assert (s["clusters_copied"], s["clusters_inherited"], s["clusters_zeroed"]) == (4, 3, 1)
    assert s["backing_file"] == "base.qsnap"
    with Image.open(d / "child.qsnap") as im, Image.open(d / "full2.qsnap") as full:
        assert im.backing_name == "base.qsnap" and im.parent.path == str(d / "base.qsnap")
        assert im.chain == [im, im.parent] and im.parent.chain == [im.parent]
        assert im.image_id == full.image_id and im.parent.image_id != im.image_id
        assert im.meta["parent"]["image_id"] == im.parent.image_id
        assert list(im._zero_virt) == [2]
        virt, src, host = (np.asarray(a) for a in cluster_sources(im))
        assert virt.dtype == np.uint64 and src.dtype == np.uint32 and host.dtype == np.uint64
        rows = sorted(zip(src.tolist(), host.tolist()))
        assert rows == list(zip(src.tolist(), host.tolist()))
        assert sorted(virt[src == 1].tolist()) == [100 // PPC, 200 // PPC, 300 // PPC]
        assert sorted(virt[src == 0].tolist()) == [0, 1, 400 // PPC, (2 << 20) // CS]
        assert im.info()["chain"][1]["path"] == str(d / "base.qsnap")
        assert os.path.getsize(d / "child.qsnap") < os.path.getsize(d / "full2.qsnap")
    assert_content(d / "child.qsnap", child)


def test_child_with_qemu_img(chain):
    need_qemu_img()
    d, _, _, _ = chain
    r = subprocess.run([QEMU_IMG, "check", str(d / "child.qsnap")], capture_output=True, text=True)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    info = json.loads(subprocess.run([QEMU_IMG, "info", "--backing-chain", "--output=json",
                                      str(d / "child.qsnap")], capture_output=True, text=True,
                                     check=True).stdout)
    assert [i["filename"] for i in info] == [str(d / "child.qsnap"), str(d / "base.qsnap")]
    assert info[0]["backing-filename-format"] == "qcow2"
    with Image.open(d / "child.qsnap") as im:
        ram = im.meta_offset
    for name in ("child", "full2"):
        subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(d / f"{name}.qsnap"), str(d / f"{name}.raw")],
                       check=True)
    with open(d / "child.raw", "rb") as a, open(d / "full2.raw", "rb") as b:
        assert_same(a.read(ram), b.read(ram), "the RAM clusters of child and full image")


def test_check_and_info_cli(chain):
    d = chain[0]
    r = qsnap("check", str(d / "child.qsnap"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 parent image(s) of the backing chain checked too." in r.stdout
    r = qsnap("info", str(d / "child.qsnap"))
    assert r.returncode == 0, r.stderr
    assert "backing chain: 2 images" in r.stdout
    assert f"1: {d / 'base.qsnap'} (" in r.stdout
    info = json.loads(qsnap("info", "--output=json", str(d / "child.qsnap")).stdout)
    assert [c["file_bytes"] for c in info["chain"]] == [os.path.getsize(d / "child.qsnap"),
                                                       os.path.getsize(d / "base.qsnap")]
    assert info["backing_file"] == "base.qsnap"


def test_check_finds_a_damaged_parent(chain):
    d = chain[0]
    with Image.open(d / "base.qsnap") as b:
        h = b.host_offset(b.blocks[0].offset + 100 * PS)   # an inherited page
    with open(d / "base.qsnap", "r+b") as f:
        f.seek(h + 17)
        f.write(b"\x00")
    r = qsnap("check", str(d / "child.qsnap"))
    assert r.returncode == 2
    assert f"checksum mismatch in block 'pc.ram' page 0x{100 * PS:x}" in r.stdout
    assert f"of {d / 'base.qsnap'})" in r.stdout                       # found through the child
    assert f"parent image {d / 'base.qsnap'}: checksum mismatch" in r.stdout   # and in the parent


def test_stored_page_outside_every_cluster_is_found(chain):
    d = chain[0]
    with Image.open(d / "child.qsnap") as im:
        im.parent._mapped_virt = np.zeros(0, np.uint64)   # as if the parent held nothing
        im.parent._mapped_host = np.zeros(0, np.uint64)
        problems = im.verify_all()
    assert problems == ["block 'pc.ram': 3 stored pages lie in no data cluster of the image chain"]


# --- parent checks -------------------------------------------------------------------

def _one_error(r):
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_missing_parent(chain):
    d = chain[0]
    os.unlink(d / "base.qsnap")
    with pytest.raises(ImageError, match=f"^parent image {d / 'base.qsnap'} of {d / 'child.qsnap'} is missing$"):
        Image.open(d / "child.qsnap")
    with pytest.raises(ImageError, match="is missing"):
        read_metadata(str(d / "child.qsnap"))
    for cmd in (("info",), ("load",), ("export", "--format", "raw")):
        args = [*cmd, str(d / "child.qsnap")] + ([str(d / "out.raw")] if cmd[0] == "export" else [])
        r = qsnap(*args)
        assert r.returncode == 1, (cmd, r.stderr)
        assert _one_error(r) == f"qsnap: error: parent image {d / 'base.qsnap'} of {d / 'child.qsnap'} is missing"
    r = qsnap("check", str(d / "child.qsnap"))
    assert r.returncode == 2 and "is missing" in r.stdout


def test_swapped_parent(chain):
    d, base, _, _ = chain
    write_full(d / "other.qsnap", base)        # the same pages, another snapshot
    os.replace(d / "other.qsnap", d / "base.qsnap")
    r = qsnap("info", str(d / "child.qsnap"))
    assert r.returncode == 1
    assert _one_error(r).startswith(f"qsnap: error: parent image {d / 'base.qsnap'} of {d / 'child.qsnap'} "
                                    "does not match: image_id ")
    with pytest.raises(ImageError, match="does not match: image_id"):
        read_metadata(str(d / "child.qsnap"))


@pytest.mark.parametrize("field, edit, msg", [
    ("created", lambda m: m.update(created="2000-01-01T00:00:00Z"), "created"),
    ("device state", lambda m: m["device_state"].update(crc32c=1), "device_state crc32c"),
    ("machine", lambda m: m.update(machine="pc-q35-7.2"), "machine pc-i440fx-7.2 recorded, pc-q35-7.2 found"),
    ("blocks", lambda m: m["ram_blocks"].pop(), "number of RAM blocks 2 recorded, 1 found"),
    ("length", lambda m: m["ram_blocks"][1].update(length=1 << 20), r"ram_blocks\[1\]\.length"),
    ("page size", lambda m: m["ram_blocks"][0].update(page_size=1 << 21), r"ram_blocks\[0\]\.page_size"),
    ("bitmap", lambda m: m["ram_blocks"][0]["bitmap"].update(crc32c=7), r"ram_blocks\[0\]\.bitmap_crc32c"),
    ("checksums", lambda m: m["ram_blocks"][0]["checksums"].update(crc32c=7),
     r"ram_blocks\[0\]\.checksums_crc32c"),
])
def test_parent_record_mismatch(chain, field, edit, msg):
    d = chain[0]
    with Image.open(d / "child.qsnap") as im:
        parent = im.parent
        check_parent(im, parent)
        parent.meta = json.loads(json.dumps(parent.meta))
        edit(parent.meta)
        with pytest.raises(ImageError, match=f"^parent image {parent.path} of {im.path} does not match: {msg}"):
            check_parent(im, parent)


def test_cluster_and_page_size_mismatch(chain):
    d = chain[0]
    with Image.open(d / "child.qsnap") as im:
        im.parent.cluster_size *= 2
        with pytest.raises(ImageError, match="does not match: cluster_size 65536 recorded, 131072 found"):
            check_parent(im, im.parent)
        im.parent.cluster_size //= 2
        im.parent.target_page_size = 8192
        with pytest.raises(ImageError, match="does not match: target_page_size 4096 recorded, 8192 found"):
            check_parent(im, im.parent)


def test_loop(chain):
    d = chain[0]
    os.unlink(d / "base.qsnap")
    os.symlink(d / "child.qsnap", d / "base.qsnap")
    r = qsnap("info", str(d / "child.qsnap"))
    assert r.returncode == 1
    assert _one_error(r) == (f"qsnap: error: backing chain of {d / 'child.qsnap'} loops: parent image "
                             f"{d / 'base.qsnap'} of {d / 'child.qsnap'} is already in the chain")
    with pytest.raises(ImageError, match="loops"):
        read_metadata(str(d / "child.qsnap"))


def test_parent_not_an_image(chain):
    d = chain[0]
    (d / "base.qsnap").write_bytes(b"hello" * 100)
    r = qsnap("info", str(d / "child.qsnap"))
    assert r.returncode == 1
    assert _one_error(r).startswith(f"qsnap: error: parent image {d / 'base.qsnap'} of {d / 'child.qsnap'} "
                                    "cannot be used: not a qsnap image")


def test_backing_name_in_another_directory(chain, tmp_path_factory):
    d, base, child, _ = chain
    other = tmp_path_factory.mktemp("elsewhere")
    rebase(d / "full2.qsnap", d / "base.qsnap", other / "child.qsnap")
    with Image.open(other / "child.qsnap") as im:
        assert im.backing_name == str(d / "base.qsnap")
    assert_content(other / "child.qsnap", child)


def test_header_and_record_must_agree(chain):
    d = chain[0]
    buf = bytearray((d / "child.qsnap").read_bytes())
    hdr = qcow2.HEADER.unpack(buf)
    off = hdr["backing_file_offset"]
    buf[off:off + 4] = b"BASE"
    (d / "child.qsnap").write_bytes(bytes(buf))
    with pytest.raises(ImageError, match=r"metadata parent\.backing_file 'base\.qsnap' differs from the "
                                         r"header's backing file 'BASE\.qsnap'"):
        Image.open(d / "child.qsnap")


def test_v1_image_with_backing_file_refused(tmp_path):
    import gzip
    from test_image_format2 import DATA
    p = tmp_path / "v1.qsnap"
    buf = bytearray(gzip.decompress((DATA / "pc72-v1.qsnap.gz").read_bytes()))
    buf[8:20] = (0x200).to_bytes(8, "big") + (4).to_bytes(4, "big")
    buf[0x200:0x204] = b"base"
    p.write_bytes(bytes(buf))
    with pytest.raises(ImageError, match=r"format version 1 has no backing chains"):
        Image.open(p)


def test_chain_too_deep(tmp_path, monkeypatch):
    base, child = two_generations()
    write_full(tmp_path / "g0.qsnap", base)
    write_full(tmp_path / "full.qsnap", child)
    for k in (1, 2, 3):
        rebase(tmp_path / "full.qsnap", tmp_path / f"g{k - 1}.qsnap", tmp_path / f"g{k}.qsnap")
    with Image.open(tmp_path / "g3.qsnap") as im:
        assert len(im.chain) == 4
    monkeypatch.setattr(layout, "MAX_CHAIN_DEPTH", 2)
    with pytest.raises(ImageError, match=r"deeper than 2 images"):
        Image.open(tmp_path / "g3.qsnap")
    with pytest.raises(ImageError, match=r"deeper than 2 images"):
        read_metadata(str(tmp_path / "g3.qsnap"))


# --- flatten and commit ------------------------------------------------------------------

def test_flatten(chain):
    d, base, child, _ = chain
    before = (d / "child.qsnap").read_bytes()
    s = flatten(str(d / "child.qsnap"), str(d / "flat.qsnap"))
    assert s["backing_file"] is None and s["clusters_inherited"] == 0 and s["clusters_zeroed"] == 0
    assert (d / "child.qsnap").read_bytes() == before
    with Image.open(d / "flat.qsnap") as f, Image.open(d / "child.qsnap") as c:
        assert f.parent is None and f.backing_name is None and f.meta["parent"] is None
        assert f.image_id == c.image_id
        assert f.meta["ram_blocks"] == c.meta["ram_blocks"]
        assert len(f._zero_virt) == 0
    assert_content(d / "flat.qsnap", child)
    assert sorted(os.listdir(d)) == ["base.qsnap", "child.qsnap", "flat.qsnap", "full2.qsnap"]


def test_commit_three_generations(tmp_path):
    base, mid = two_generations(seed=1)
    top = dict(mid)
    top[(0, 100)] = page(9, 0, 100)     # a cluster the mid inherited from the base
    top[(0, 7)] = page(9, 0, 7)         # a cluster the mid copied
    write_full(tmp_path / "base.qsnap", base)
    write_full(tmp_path / "mid-full.qsnap", mid)
    write_full(tmp_path / "top-full.qsnap", top)
    rebase(tmp_path / "mid-full.qsnap", tmp_path / "base.qsnap", tmp_path / "mid.qsnap")
    rebase(tmp_path / "top-full.qsnap", tmp_path / "mid.qsnap", tmp_path / "top.qsnap")
    mid_bytes, base_bytes = (tmp_path / "mid.qsnap").read_bytes(), (tmp_path / "base.qsnap").read_bytes()
    with Image.open(tmp_path / "top.qsnap") as t:
        top_id = t.image_id
        assert len(t.chain) == 3
    s = commit(str(tmp_path / "top.qsnap"))
    assert s["backing_file"] == "base.qsnap"
    assert (tmp_path / "mid.qsnap").read_bytes() == mid_bytes          # the parent is not touched
    assert (tmp_path / "base.qsnap").read_bytes() == base_bytes
    with Image.open(tmp_path / "top.qsnap") as t:
        assert t.image_id == top_id and len(t.chain) == 2
        assert t.parent.path == str(tmp_path / "base.qsnap")
        assert t.meta["parent"]["image_id"] == t.parent.image_id
    assert_content(tmp_path / "top.qsnap", top)
    assert_content(tmp_path / "mid.qsnap", mid)                         # still valid on its own
    s = commit(str(tmp_path / "top.qsnap"))
    assert s["backing_file"] is None
    with Image.open(tmp_path / "top.qsnap") as t:
        assert t.parent is None and t.image_id == top_id
    assert_content(tmp_path / "top.qsnap", top)
    with pytest.raises(UsageError, match="has no parent image to commit"):
        commit(str(tmp_path / "top.qsnap"))


def test_commit_keeps_children_valid(chain):
    d, base, child, _ = chain
    grand = dict(child)
    grand[(0, 2)] = page(5, 0, 2)
    write_full(d / "grand-full.qsnap", grand)
    rebase(d / "grand-full.qsnap", d / "child.qsnap", d / "grand.qsnap")
    commit(str(d / "child.qsnap"))            # the child now stands alone, same image_id
    assert_content(d / "grand.qsnap", grand)


def test_cli_flatten_commit(chain):
    d = chain[0]
    r = qsnap("flatten", str(d / "child.qsnap"), str(d / "flat.qsnap"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"qsnap: flattened {d / 'child.qsnap'} into {d / 'flat.qsnap'} "
                               "(now stand-alone)")
    r = qsnap("commit", str(d / "child.qsnap"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"qsnap: folded its parent base.qsnap into {d / 'child.qsnap'} "
                               "(now stand-alone)")
    r = qsnap("commit", str(d / "child.qsnap"))
    assert r.returncode == 2
    assert _one_error(r) == f"qsnap: error: {d / 'child.qsnap'} has no parent image to commit (it stands alone)"
    r = qsnap("flatten", str(d / "nothing.qsnap"), str(d / "x.qsnap"))
    assert r.returncode == 1 and "no such file or directory" in _one_error(r)
    assert not (d / "x.qsnap").exists()


def test_flatten_refuses_to_overwrite_a_parent(chain):
    d = chain[0]
    before = (d / "base.qsnap").read_bytes()
    r = qsnap("flatten", str(d / "child.qsnap"), str(d / "base.qsnap"))
    assert r.returncode == 2
    assert "is the parent image" in _one_error(r)
    assert (d / "base.qsnap").read_bytes() == before


@pytest.mark.parametrize("op", ["flatten", "commit"])
def test_failure_leaves_the_output_untouched(chain, monkeypatch, op):
    d = chain[0]
    (d / "flat.qsnap").write_bytes(b"an earlier file")
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}

    def fail(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(rewrite_mod._Output, "commit", fail)   # the last step: sync, rename
    with pytest.raises(OSError):
        if op == "flatten":
            flatten(str(d / "child.qsnap"), str(d / "flat.qsnap"))
        else:
            commit(str(d / "child.qsnap"))
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before   # no temporary file left


def test_signal_during_commit_leaves_no_trace(chain):
    """SIGTERM while the clusters are copied: the temporary file goes, the image stays."""
    d = chain[0]
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}
    code = ("import os, signal, sys\n"
            "from qsnap import cli\n"
            "from qsnap.image import rewrite\n"
            "real = rewrite._Output.append_cluster\n"
            "def slow(self, data):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(self, data)\n"
            "rewrite._Output.append_cluster = slow\n"
            f"sys.exit(cli.main(['commit', {str(d / 'child.qsnap')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + 15, r.stderr
    assert _one_error(r) == "qsnap: error: terminated by signal SIGTERM"
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before


def test_readahead_covers_the_chain(chain):
    from qsnap.image.metadata import readahead
    d = chain[0]
    whole, base = readahead(str(d / "child.qsnap")), readahead(str(d / "base.qsnap"))
    os.unlink(d / "base.qsnap")
    own = readahead(str(d / "child.qsnap"))     # a missing parent is left to the reader to report
    assert own > 0 and base > 0 and whole == own + base


def _forced_child(tmp_path, monkeypatch, **full_kw):
    """A child written onto a base of another machine or RAM layout (rewrite refuses that
    itself: the check is switched off to make the image a reader must refuse)."""
    base, child = two_generations()
    write_full(tmp_path / "base.qsnap", base)
    write_full(tmp_path / "full.qsnap", child, **full_kw)
    with pytest.raises(ImageError, match="has another machine or RAM layout than"):
        rebase(tmp_path / "full.qsnap", tmp_path / "base.qsnap", tmp_path / "child.qsnap")
    monkeypatch.setattr(rewrite_mod, "_check_same_layout", lambda src, base: None)
    rebase(tmp_path / "full.qsnap", tmp_path / "base.qsnap", tmp_path / "child.qsnap")
    return tmp_path / "child.qsnap"


def test_cli_mismatched_machine(tmp_path, monkeypatch):
    p = _forced_child(tmp_path, monkeypatch, machine="pc-q35-7.2")
    for cmd in ("info", "load"):
        r = qsnap(cmd, str(p))
        assert r.returncode == 1
        assert _one_error(r) == (f"qsnap: error: parent image {tmp_path / 'base.qsnap'} of {p} does not "
                                 "match: machine pc-q35-7.2 recorded, pc-i440fx-7.2 found")


def test_cli_mismatched_blocks(tmp_path, monkeypatch):
    from _chainutil import BLOCKS
    blocks = [BLOCKS[0], {**BLOCKS[1], "length": 128 * 1024}]
    p = _forced_child(tmp_path, monkeypatch, blocks=blocks)
    r = qsnap("info", str(p))
    assert r.returncode == 1
    assert _one_error(r) == (f"qsnap: error: parent image {tmp_path / 'base.qsnap'} of {p} does not match: "
                             "RAM block 1 is 'vga.vram' length 0x40000 offset 0x200000 page size 4096 in the "
                             "parent, 'vga.vram' length 0x20000 offset 0x200000 page size 4096 in the child")


@pytest.mark.parametrize("offset, size", [(16, 10), (CS - 4, 10), (0x200, 0), (0x200, 1024)])
def test_backing_name_out_of_place(chain, offset, size):
    d = chain[0]
    buf = bytearray((d / "child.qsnap").read_bytes())
    buf[8:20] = offset.to_bytes(8, "big") + size.to_bytes(4, "big")
    (d / "child.qsnap").write_bytes(bytes(buf))
    with pytest.raises(ImageError, match=f"backing file name of {size} bytes at image offset 0x{offset:x}"):
        Image.open(d / "child.qsnap")
    r = qsnap("check", str(d / "child.qsnap"))
    assert r.returncode == 2 and "backing file name" in r.stdout


def test_working_set_recorded_into_the_parent_keeps_the_child_valid(chain):
    from qsnap.image import workingset
    d, _, child, _ = chain
    workingset.store(str(d / "base.qsnap"), workingset.entries([(0, 3, 1), (0, 100, 2)]))
    with Image.open(d / "child.qsnap") as im:
        assert len(im.parent.working_set) == 2
    assert_content(d / "child.qsnap", child)
