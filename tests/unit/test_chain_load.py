"""load, load --postcopy, export and the working set of a child image read through its chain."""

import pytest

from qsnap.export import export
from qsnap.image import workingset
from qsnap.image.reader import Image
from qsnap.load import load
from qsnap.save import save
from qsnap.stream.synth import synth_stream

from _chainutil import rebase
from bigcmp import assert_same, assert_same_files
from test_load_roundtrip import check_restored
from test_postcopy import BLOCKS, FakeDest, check_pages, req_id

PS = 4096


def _save(stream, image):
    with open(stream, "rb") as f:
        save(str(image), in_fd=f.fileno(), out_fd=-1, cluster_size=64 * 1024, quiet=True)


@pytest.fixture(scope="module")
def generations(tmp_path_factory):
    """A precopy stream after 2 passes (the base) and after 3 (full): the third pass
    dirties some pages, the others keep their content; child = full rebased on base."""
    d = tmp_path_factory.mktemp("gen")
    synth = {}
    for name, passes in (("base", 2), ("full", 3)):
        with open(d / f"{name}.stream", "wb") as f:
            synth[name] = synth_stream(f, blocks=BLOCKS, mode="precopy-live", passes=passes, seed=3,
                                       zero_share=0.4, zero_run=64)
        _save(d / f"{name}.stream", d / f"{name}.qsnap")
    s = rebase(d / "full.qsnap", d / "base.qsnap", d / "child.qsnap")
    assert s["clusters_inherited"] > 10 and s["clusters_copied"] > 10, s
    with Image.open(d / "full.qsnap") as im:
        state = im.device_state
    return d, synth["full"], state


def test_precopy_load_of_a_child(generations, tmp_path):
    """Every page once with the full image's content, read from both files."""
    d, synth, state = generations
    out = tmp_path / "child.stream"
    with open(out, "wb") as f:
        load(str(d / "child.qsnap"), out_fd=f.fileno(), cache="writeback", quiet=True)
    check_restored(out, synth, state)


@pytest.mark.parametrize("percent", [0, 50, 100])
def test_postcopy_load_of_a_child(generations, percent):
    d, synth, state = generations
    with Image.open(d / "child.qsnap") as im:
        b = im.blocks[0]
        inherited = next(p * PS for p in range(b.length // PS - 1, -1, -1)
                         if b.stored(p) and im.locate(b.offset + p * PS)[0] is im.parent)

    def on_packaged(dest):
        dest.send(req_id("pc.ram", inherited))

    dest = FakeDest(str(d / "child.qsnap"), percent, on_packaged=on_packaged).drive()
    assert dest.exc is None, dest.exc
    check_pages(dest, synth)
    assert dest.device_state is not None


def test_export_raw_of_a_child(generations, tmp_path):
    d = generations[0]
    export(str(d / "child.qsnap"), str(tmp_path / "child.raw"), "raw", quiet=True)
    export(str(d / "full.qsnap"), str(tmp_path / "full.raw"), "raw", quiet=True)
    assert_same_files(tmp_path / "child.raw", tmp_path / "full.raw", "raw exports")


def test_working_set_recorded_into_a_child(generations, tmp_path):
    d, synth, state = generations
    for name in ("base.qsnap", "child.qsnap"):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    p = tmp_path / "child.qsnap"
    with Image.open(p) as im:
        entries = workingset.entries([(0, 5, 10), (0, 300, 20), (1, 2, 30)])
        zero_before = list(im._zero_virt)
        image_id = im.image_id
    workingset.store(str(p), entries)
    with Image.open(p) as im:
        assert im.parent is not None and im.backing_name == "base.qsnap" and im.image_id == image_id
        assert list(im._zero_virt) == zero_before
        assert len(im.working_set) == 3
        assert im.verify_all() == []
    out = tmp_path / "child.stream"
    with open(out, "wb") as f:
        load(str(p), out_fd=f.fileno(), cache="writeback", quiet=True)
    check_restored(out, synth, state)
