"""`qsnap load` imports no NumPy: the stream of a child process in which importing
NumPy fails is byte for byte the stream of an ordinary `qsnap load` — a stand-alone
image and a backing chain, each with and without a working set."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qsnap.image import workingset
from qsnap.image.reader import Image
from qsnap.save import save
from qsnap.stream.synth import synth_stream

from _chainutil import rebase
from bigcmp import assert_same
from test_postcopy import BLOCKS

REPO = Path(__file__).resolve().parents[2]

# `python -m qsnap load -q IMG` with NumPy made unimportable first (an import of it
# raises ImportError), and a check at exit that nothing imported it after all
NO_NUMPY = """
import runpy, sys
sys.modules["numpy"] = None
sys.argv = ["qsnap", "load", "-q", sys.argv[1]]
try:
    runpy.run_module("qsnap", run_name="__main__", alter_sys=True)
finally:
    assert sys.modules.get("numpy") is None, "numpy was imported"
"""


def _run(image, block_numpy):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    args = ["-c", NO_NUMPY, str(image)] if block_numpy else ["-m", "qsnap", "load", "-q", str(image)]
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, cwd=REPO)


def _load(image, block_numpy):
    r = _run(image, block_numpy)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    assert r.stderr == b""
    return r.stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """base.qsnap, full.qsnap and child.qsnap (full rebased onto base), and copies of
    full and child with a working set (ws/full.qsnap, ws/child.qsnap + ws/base.qsnap)."""
    d = tmp_path_factory.mktemp("nonumpy")
    for name, passes in (("base", 2), ("full", 3)):      # full: some pages dirtied again
        with open(d / f"{name}.stream", "wb") as f:
            synth_stream(f, blocks=BLOCKS, mode="precopy-live", passes=passes, seed=5, zero_share=0.4,
                         zero_run=64)
        with open(d / f"{name}.stream", "rb") as f:
            save(str(d / f"{name}.qsnap"), in_fd=f.fileno(), out_fd=-1, cluster_size=64 * 1024, quiet=True)
        os.unlink(d / f"{name}.stream")
    s = rebase(d / "full.qsnap", d / "base.qsnap", d / "child.qsnap")
    assert s["clusters_inherited"] > 10 and s["clusters_copied"] > 10, s
    (d / "ws").mkdir()
    for name in ("base.qsnap", "full.qsnap", "child.qsnap"):
        (d / "ws" / name).write_bytes((d / name).read_bytes())
    # pages of both blocks, in both files of the chain, the later ones first
    entries = workingset.entries([(0, 400, 1), (1, 5, 2), (0, 100, 3), (0, 3, 4)])
    for name in ("full.qsnap", "child.qsnap"):
        workingset.store(str(d / "ws" / name), entries)
    return d


@pytest.mark.parametrize("name", ["full.qsnap", "child.qsnap", "ws/full.qsnap", "ws/child.qsnap"])
def test_load_without_numpy_is_the_same_stream(images, name):
    image = images / name
    with Image.open(image) as im:     # the case is what its name says
        assert (im.parent is not None) == name.endswith("child.qsnap")
        assert (im.working_set is not None) == name.startswith("ws/")
    plain = _load(image, block_numpy=True)
    assert len(plain) > 50 * 4096
    assert_same(plain, _load(image, block_numpy=False), f"stream of {name} without NumPy")


def test_load_without_numpy_refuses_a_damaged_image(images, tmp_path):
    """The checks that need no NumPy still run: a page that fails its checksum."""
    bad = tmp_path / "full.qsnap"
    data = bytearray((images / "full.qsnap").read_bytes())
    with Image.open(images / "full.qsnap") as im:
        b = im.blocks[0]
        page = next(p for p in range(b.n_pages) if b.stored(p))
        at = im.locate(b.offset + page * 4096)[1]
    data[at + 17] ^= 0xFF
    bad.write_bytes(bytes(data))
    r, ordinary = (_run(bad, block_numpy) for block_numpy in (True, False))
    assert r.returncode == ordinary.returncode == 1
    assert r.stderr == ordinary.stderr
    assert r.stderr.startswith(b"qsnap: error: page checksum mismatch (stored 0x")
    assert r.stderr.endswith(f" in block 'pc.ram' page 0x{page * 4096:x}\n".encode()), r.stderr
