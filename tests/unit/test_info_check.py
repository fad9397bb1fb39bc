"""`qsnap info` and `qsnap check` on images saved from a real QEMU 7.2 stream."""
import json
import pathlib
import struct
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "fuzz"))
import seeds  # noqa: E402

from qsnap.image import inspect  # noqa: E402

INFO_KEYS = {"format_version", "complete", "page_size", "cluster_size", "machine",
             "device_state_bytes", "file_bytes", "ram_blocks", "device_sections", "density", "checksum"}


def qsnap(*args):
    return subprocess.run([sys.executable, "-m", "qsnap", *args], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    assert seeds.stream_paths(("pc72",), blob=False), f"no pc72.stream.gz in {seeds.DATA_DIR}"
    where = tmp_path_factory.mktemp("img")
    (name, buf), = seeds.seed_images(("pc72",), blob=False, where=where)
    return where / "pc72-64k.qsnap", buf


def test_info_json(image):
    r = qsnap("info", "--output=json", str(image[0]))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert INFO_KEYS <= set(info)
    assert info["complete"] is True and info["format_version"] == 2
    assert info["machine"] == "pc-i440fx-7.2" and info["checksum"] == "crc32c"
    assert {"idstr", "length", "page_size", "offset", "nonzero_pages"} <= set(info["ram_blocks"][0])
    assert info["ram_blocks"][0]["idstr"] == "pc.ram"
    names = [(d["name"], d["instance"], d["version"]) for d in info["device_sections"]]
    assert ("timer", 0, 2) in names and ("cpu", 0, 12) in names
    assert info["density"]["stored_pages"] == sum(b["nonzero_pages"] for b in info["ram_blocks"])


def test_info_human(image):
    r = qsnap("info", str(image[0]))
    out = r.stdout.decode()
    assert r.returncode == 0
    for frag in ("image: ", "file format: qcow2", "virtual size: ", "disk size: ", "cluster_size: 65536",
                 "machine: pc-i440fx-7.2", "checksum: crc32c", "density: ", "device sections: 30", "timer"):
        assert frag in out, out


def test_info_incomplete(image, tmp_path):
    buf = bytearray(image[1])
    eo = 104 + 8
    struct.pack_into(">I", buf, eo + 4, 0)  # COMPLETE clear, crc fixed below
    from qsnap._core import crc32c
    struct.pack_into(">I", buf, eo + 36, crc32c(bytes(buf[eo:eo + 36])))
    p = tmp_path / "inc.qsnap"
    p.write_bytes(buf)
    info = json.loads(qsnap("info", "--output=json", str(p)).stdout)
    assert info["complete"] is False and {"format_version", "cluster_size", "file_bytes"} <= set(info)
    r = qsnap("check", str(p))
    assert r.returncode == 1 and r.stderr.decode().startswith("qsnap: error: cannot check")
    assert json.loads(qsnap("check", "--output=json", str(p)).stdout)["exit_code"] == 1


def test_check_clean(image):
    r = qsnap("check", str(image[0]))
    assert r.returncode == 0, r.stdout
    assert b"No errors were found on the image." in r.stdout
    rep = json.loads(qsnap("check", "--output=json", str(image[0])).stdout)
    assert rep["exit_code"] == 0 and rep["stored_pages"] > 0 and rep["leaks"] == 0


def test_check_not_a_qsnap_image(tmp_path):
    p = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "1M"], check=True)
    assert qsnap("check", str(p)).returncode == 1


def _mapped(image, tmp_path, edit):
    buf = bytearray(image[1])
    m, facts = seeds.image_map(bytes(image[1]))
    buf = edit(buf, m, facts) or buf
    p = tmp_path / "x.qsnap"
    p.write_bytes(buf)
    return p


def test_check_leak_exit_3(image, tmp_path):
    def leak(buf, m, facts):
        n = len(buf) // facts["cluster_size"]
        struct.pack_into(">H", buf, m["refblock"][0][0] + 2 * n, 1)
        return buf + bytes(facts["cluster_size"])
    p = _mapped(image, tmp_path, leak)
    r = qsnap("check", str(p))
    assert r.returncode == 3, r.stdout
    assert b"1 leaked clusters were found" in r.stdout
    r = subprocess.run(["qemu-img", "check", str(p)], capture_output=True)
    assert r.returncode == 3  # qemu-img agrees


def test_check_refcount_mismatch_exit_2(image, tmp_path):
    def zero_ref(buf, m, facts):
        struct.pack_into(">H", buf, m["refblock"][0][0] + 2 * (m["l1"][0][0] // facts["cluster_size"]), 0)
    r = qsnap("check", str(_mapped(image, tmp_path, zero_ref)))
    assert r.returncode == 2 and b"refcount of cluster" in r.stdout


def test_check_loop_l2_at_l1(image, tmp_path):
    def loop(buf, m, facts):
        struct.pack_into(">Q", buf, m["l1"][0][0], m["l1"][0][0] | (1 << 63))
    r = qsnap("check", str(_mapped(image, tmp_path, loop)))
    assert r.returncode == 2 and b"is used 3 times" in r.stdout


def test_check_progress_callback(image, capsys):
    rep = inspect.check_image(image[0], progress=True)
    assert rep["exit_code"] == 0
    err = capsys.readouterr().err
    assert "clusters" in err and "100.00/100%" in err
