"""Working sets: merge, validation, storage in the image and its crash safety."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qsnap.errors import ImageError
from qsnap.image import Image, workingset as ws
from qsnap.image import writer as writer_mod
from qsnap.image.inspect import check_image

from test_image_roundtrip import PS, need_qemu_img, write_image


class _B:
    def __init__(self, idstr, length, page_size=PS, migrated=True):
        self.idstr, self.length, self.page_size, self.migrated = idstr, length, page_size, migrated


def E(*items):
    return ws.entries(items)


def pairs(ents):
    return [(int(e["block"]), int(e["page"])) for e in ents]


def qsnap(*args):
    return subprocess.run([sys.executable, "-m", "qsnap", *args], capture_output=True, text=True,
                          timeout=60)


# --- merge and validation -------------------------------------------------------------

def test_merge_is_union_in_first_seen_order():
    old = E((0, 5, 10), (0, 1, 20), (1, 3, 30))
    new = E((1, 9, 1), (0, 1, 2), (0, 7, 3), (1, 9, 4))
    m = ws.merge(old, new)
    assert pairs(m) == [(0, 5), (0, 1), (1, 3), (1, 9), (0, 7)]
    assert int(m["t_us"][1]) == 20      # a page seen before keeps its earlier time


def test_from_requests_one_entry_per_host_page_dedup():
    reqs = [(10.5, 0, 8 * PS, 2 * PS), (10.6, 1, 0, 2 << 20), (10.7, 0, 8 * PS, PS), (9.0, 0, 0, PS)]
    e = ws.from_requests(reqs, host_sizes=[PS, 2 << 20], tps=PS, t_switch=10.0)
    assert pairs(e) == [(0, 8), (0, 9), (1, 0), (0, 0)]
    assert list(e["t_us"]) == [500000, 500000, 600000, 0]   # before the switch counts as 0


@pytest.mark.parametrize("bad, what", [
    (E((2, 0, 0)), "names block 2"),
    (E((0, 16, 0)), "outside the block"),
    (E((1, 1, 0)), "not host-page aligned"),
    (E((0, 0, 0), (3, 0, 0)), "not migrated"),
])
def test_validate_rejects(bad, what):
    blocks = [_B("pc.ram", 16 * PS), _B("huge", 4 << 20, page_size=2 << 20), _B("gone", PS, migrated=False),
              _B("x", PS, migrated=False)]
    blocks = blocks[:2] if what == "names block 2" else blocks
    with pytest.raises(ImageError, match=what):
        ws.validate(bad, blocks, PS)


def test_decode_rejects_ragged_length():
    with pytest.raises(ImageError, match="not a multiple of 12"):
        ws.decode(b"\0" * 13, [_B("pc.ram", PS)], PS)


# --- storage ----------------------------------------------------------------------------

def _image(tmp_path):
    p = tmp_path / "vm.qsnap"
    write_image(p)
    return p


def _ram(p):
    with Image.open(p) as img:
        return [img.read_page(0, o) for o in range(0, 4096 * PS, 64 * PS)] + \
               [img.read_page(1, 0), img.read_page(1, 511 * PS), img.device_state]


def test_store_merge_reload_check(tmp_path):
    p = _image(tmp_path)
    before = _ram(p)
    first = ws.store(p, E((0, 2, 5), (0, 100, 6), (1, 0, 7)), now="2026-01-01T00:00:00Z")
    assert first.restores == 1 and len(first) == 3
    second = ws.store(p, E((1, 511, 1), (0, 2, 2)), now="2026-01-02T00:00:00Z")
    with Image.open(p) as img:
        got = img.working_set
        assert img.working_set_problem is None
        assert pairs(got.entries) == [(0, 2), (0, 100), (1, 0), (1, 511)]
        assert (got.restores, got.first_recorded, got.recorded) == \
            (2, "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z")
        assert img.info()["working_set"]["pages"] == 4
    assert len(second) == 4
    assert _ram(p) == before
    report = check_image(p)
    assert report["exit_code"] == 0, report["problems"]
    assert os.listdir(tmp_path) == ["vm.qsnap"]
    info = qsnap("info", str(p))
    assert "working set: 4 pages, recorded 2026-01-02T00:00:00Z" in info.stdout
    assert "2 restores merged" in info.stdout


def test_store_keeps_qemu_img_happy(tmp_path):
    need_qemu_img()
    p = _image(tmp_path)
    ws.store(p, E((0, 1, 0)))
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_store_rejects_out_of_range_and_leaves_image(tmp_path):
    p = _image(tmp_path)
    ws.store(p, E((0, 1, 0)))
    data = p.read_bytes()
    with pytest.raises(ImageError, match="outside the block"):
        ws.store(p, E((0, 4096, 0)))
    assert p.read_bytes() == data and os.listdir(tmp_path) == ["vm.qsnap"]


@pytest.mark.parametrize("step", ["_copy_range", "_write_tables", "_write_header", "_put_in_place"])
def test_interrupted_update_leaves_image_as_it_was(tmp_path, monkeypatch, step):
    p = _image(tmp_path)
    ws.store(p, E((0, 1, 0), (0, 2, 1)))
    data = p.read_bytes()

    def fail(*a, **kw):
        raise OSError(5, "injected failure")
    monkeypatch.setattr(writer_mod.ImageWriter, step, fail)
    with pytest.raises(OSError):
        ws.store(p, E((1, 0, 0)))
    assert p.read_bytes() == data
    assert os.listdir(tmp_path) == ["vm.qsnap"]
    assert check_image(p)["exit_code"] == 0
    with Image.open(p) as img:
        assert pairs(img.working_set.entries) == [(0, 1), (0, 2)]


def test_damaged_working_set_is_ignored_not_fatal(tmp_path):
    p = _image(tmp_path)
    ws.store(p, E((0, 1, 0), (0, 2, 1)))
    with Image.open(p) as img:
        h = img.host_offset(img.meta_offset + img.meta["working_set"]["offset"])
    with open(p, "r+b") as f:
        f.seek(h + 4)
        f.write(b"\xff")
    with Image.open(p) as img:
        assert img.working_set is None
        assert "checksum mismatch" in img.working_set_problem
        assert img.read_page(0, 0) is not None       # the rest of the image is usable
    report = check_image(p)
    assert report["exit_code"] == 2
    assert any("working set" in m for m in report["problems"])
    info = json.loads(qsnap("info", "--output=json", str(p)).stdout)
    assert info["working_set"] is None and "checksum" in info["working_set_problem"]


def test_old_image_has_no_working_set(tmp_path):
    p = _image(tmp_path)
    with Image.open(p) as img:
        assert img.working_set is None and img.working_set_problem is None
    assert "working set: none" in qsnap("info", str(p)).stdout


def test_copy_keeps_fresh_image_layout(tmp_path):
    p = _image(tmp_path)
    q = tmp_path / "copy.qsnap"
    shutil.copy(p, q)
    ws.store(q, np.zeros(0, ws.ENTRY))
    with Image.open(p) as a, Image.open(q) as b:
        assert np.array_equal(a.data_clusters(), b.data_clusters())
        assert b.working_set is not None and len(b.working_set) == 0


def test_cli_record_needs_postcopy(tmp_path):
    p = _image(tmp_path)
    r = qsnap("load", "--record-working-set", str(p))
    assert r.returncode != 0
    assert r.stderr.strip() == "qsnap: error: --record-working-set needs --postcopy (page requests exist only there)"
    r = qsnap("load", "--prefetch=sometimes", str(p))
    assert r.returncode != 0 and r.stderr.startswith("qsnap: error: argument --prefetch")
