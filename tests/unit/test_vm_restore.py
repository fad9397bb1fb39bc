"""Restore's overlay files (qsnap.vm.restore.OverlayFiles): made side by side, all gone after a failure."""
import os
import shutil
import subprocess

import pytest

from qsnap.errors import VmError
from qsnap.vm.restore import OverlayFiles

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


def frozen_disk(d, name):
    path = d / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return {"device": name, "qdev": None, "frozen": str(path), "format": "qcow2", "virtual_size": 16 << 20}


def test_made_side_by_side_once_each(tmp_path):
    disks = [frozen_disk(tmp_path, "a"), frozen_disk(tmp_path, "b")]
    work = tmp_path / "work"
    work.mkdir()
    files = OverlayFiles(str(work))
    paths = [files.start(i, d, "qcow2", d["virtual_size"]) for i, d in enumerate(disks)]
    assert files.start(0, disks[0], "qcow2", 1) == paths[0]  # started once: the same file
    files.wait()
    assert sorted(os.listdir(work)) == ["a.overlay.qcow2", "b.overlay.qcow2"]
    files.remove(keep=[paths[1]])
    assert os.listdir(work) == ["b.overlay.qcow2"]


def test_a_failure_names_the_disk_and_leaves_no_file(tmp_path):
    disks = [frozen_disk(tmp_path, "a"), frozen_disk(tmp_path, "b")]
    work = tmp_path / "work"
    work.mkdir()
    files = OverlayFiles(str(work))
    files.start(0, disks[0], "qcow2", 16 << 20)
    files.start(1, disks[1], "qcow2", "not-a-size")
    with pytest.raises(VmError, match=r"qemu-img could not create overlay .*b\.overlay\.qcow2 for disk b"):
        files.wait()
    assert os.listdir(work) == ["a.overlay.qcow2"]  # the other one was made
    files.remove()
    assert os.listdir(work) == []


def test_remove_ends_a_running_qemu_img(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    files = OverlayFiles(str(work))
    files.start(0, frozen_disk(tmp_path, "a"), "qcow2", 16 << 20)
    files.remove()  # at once, whether qemu-img has finished or not
    assert os.listdir(work) == [] and not files.running and not files.made
