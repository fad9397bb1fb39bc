"""`qsnap save --vm-info FILE` (the image's VM record) and `--report FILE`, and a failed
save draining its stdin so that the writer (QEMU) never blocks or gets EPIPE."""
import json
import subprocess
import sys
import threading
import time

import pytest

from qsnap.errors import ImageError
from qsnap.image.reader import Image
from qsnap.image.writer import ImageWriter
from qsnap.stream.synth import synth_stream

BLOCKS = [("pc.ram", 4 << 20), ("pc.bios", 256 << 10)]


def vm_record(**over):
    rec = {
        "qemu_version": "7.2.22", "qemu_package": "Debian 1:7.2+dfsg-7+deb12u18+b3",
        "machine": "pc-i440fx-7.2",
        "cmdline": ["qemu-system-x86_64", "-m", "256M", "-drive", "file=/d/disk.qcow2,if=none,id=d0"],
        "mode": "background", "was_running": True, "downtime_ms": 12.3, "ram_only": False,
        "disks": [{
            "device": "", "qdev": "/machine/peripheral/vd0/virtio-backend", "node_name": "#block123",
            "frozen": "/d/disk.qcow2", "format": "qcow2", "virtual_size": 1 << 30,
            "cmdline_file": "/d/disk.qcow2",
            "fingerprint": {"size": 196616, "mtime_ns": 1764400000123456789, "sha256_4m": "ab" * 32},
        }],
    }
    rec.update(over)
    return rec


def qsnap(*args, **kw):
    return subprocess.run([sys.executable, "-m", "qsnap", *map(str, args)], capture_output=True,
                          timeout=120, **kw)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "s.stream"
    with open(path, "wb") as f:
        synth_stream(f, blocks=BLOCKS, mode="background", seed=5)
    return path


def save_cli(stream, img, *args):
    with open(stream, "rb") as f:
        return qsnap("save", "-q", *args, img, stdin=f)


def test_vm_record_round_trips_into_info_json(stream, tmp_path):
    info_file = tmp_path / "vm.json"
    info_file.write_text(json.dumps(vm_record()))
    img = tmp_path / "vm.qsnap"
    r = save_cli(stream, img, "--vm-info", info_file)
    assert r.returncode == 0, r.stderr
    r = qsnap("info", "--output=json", img)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vm"] == vm_record()
    human = qsnap("info", img).stdout.decode()
    for frag in ("VM:", "QEMU: 7.2.22", "snapshot mode: background, running before, downtime 12.3 ms",
                 "disk /machine/peripheral/vd0/virtio-backend: /d/disk.qcow2 (qcow2, 1 GiB)"):
        assert frag in human, human


def test_image_without_vm_record_is_valid(stream, tmp_path):
    img = tmp_path / "plain.qsnap"
    assert save_cli(stream, img).returncode == 0
    info = json.loads(qsnap("info", "--output=json", img).stdout)
    assert info["vm"] is None
    assert "VM:" not in qsnap("info", img).stdout.decode()


@pytest.mark.parametrize("bad, where", [
    (vm_record(mode="fast"), "vm.mode"),
    ({k: v for k, v in vm_record().items() if k != "was_running"}, "vm.was_running is missing"),
    (vm_record(downtime_ms="12"), "vm.downtime_ms"),
    (vm_record(cmdline=["qemu", 3]), "vm.cmdline"),
    (vm_record(disks=[dict(vm_record()["disks"][0], frozen="disk.qcow2")]), "vm.disks[0].frozen"),
    (vm_record(disks=[dict(vm_record()["disks"][0], fingerprint={"size": 1, "mtime_ns": 2,
                                                                  "sha256_4m": "xyz"})]),
     "vm.disks[0].fingerprint.sha256_4m"),
    (vm_record(ram_only=True), "vm.disks"),
    ([1, 2], "vm must be an object"),
])
def test_malformed_vm_record_is_refused(stream, tmp_path, bad, where):
    info_file = tmp_path / "vm.json"
    info_file.write_text(json.dumps(bad))
    img = tmp_path / "vm.qsnap"
    img.write_bytes(b"an older image")
    report = tmp_path / "report.json"
    r = save_cli(stream, img, "--vm-info", info_file, "--report", report)
    assert r.returncode != 0
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qsnap: error: bad VM record in --vm-info {info_file}: "), lines
    assert where in lines[0]
    assert img.read_bytes() == b"an older image"
    assert json.loads(report.read_text()) == {"ok": False, "error": lines[0].removeprefix("qsnap: error: ")}


def test_vm_info_written_after_the_stream_ended_is_waited_for(stream, tmp_path):
    """qsnap snapshot writes the record while QEMU streams; the save waits for it a while."""
    info_file, img = tmp_path / "vm.json", tmp_path / "vm.qsnap"
    timer = threading.Timer(1.0, lambda: info_file.write_text(json.dumps(vm_record())))
    timer.start()
    r = save_cli(stream, img, "--vm-info", info_file)
    timer.join()
    assert r.returncode == 0, r.stderr
    assert json.loads(qsnap("info", "--output=json", img).stdout)["vm"] == vm_record()


def test_vm_info_not_json_or_missing(stream, tmp_path):
    info_file = tmp_path / "vm.json"
    info_file.write_text("{not json")
    r = save_cli(stream, tmp_path / "a.qsnap", "--vm-info", info_file)
    assert r.returncode != 0 and b"not JSON" in r.stderr
    r = save_cli(stream, tmp_path / "b.qsnap", "--vm-info", tmp_path / "missing.json")
    assert r.returncode != 0 and b"cannot read the VM record" in r.stderr
    assert not (tmp_path / "a.qsnap").exists() and not (tmp_path / "b.qsnap").exists()


def test_malformed_vm_key_in_an_image_is_refused(stream, tmp_path):
    """A reader validates the "vm" key when it is there (written here past save's check)."""
    img = tmp_path / "bad.qsnap"
    w = ImageWriter(str(img), cluster_size=1 << 16)
    w.start([{"idstr": "pc.ram", "length": 1 << 20, "page_size": 4096, "page_size_on_wire": False,
              "gpa": None}])
    w.finish(vm=vm_record(disks=[{"device": "virtio0"}]))
    with pytest.raises(ImageError, match=r"meta\.vm\.disks\[0\]\.qdev is missing"):
        Image.open(str(img))
    r = qsnap("info", img)
    assert r.returncode != 0 and r.stderr.decode().startswith("qsnap: error: bad image metadata: meta.vm.disks[0]")


def test_report_ok(stream, tmp_path):
    img, report = tmp_path / "vm.qsnap", tmp_path / "report.json"
    r = save_cli(stream, img, "--report", report)
    assert r.returncode == 0, r.stderr
    doc = json.loads(report.read_text())
    assert doc["ok"] is True and doc["summary"]["pages"] > 0 and "error" not in doc
    assert not list(tmp_path.glob("report.json.tmp*"))


def test_report_failed_names_the_error(tmp_path):
    img, report = tmp_path / "vm.qsnap", tmp_path / "report.json"
    r = qsnap("save", img, "--report", report, input=b"QEVM\x00\x00\x00\x09garbage")
    assert r.returncode != 0
    err = r.stderr.decode().strip()
    assert err.startswith("qsnap: error: ") and len(err.splitlines()) == 1
    assert json.loads(report.read_text()) == {"ok": False, "error": err.removeprefix("qsnap: error: ")}
    assert not img.exists()


def test_failed_save_drains_stdin_until_eof(tmp_path):
    """The writer of a pipe into a failed save neither blocks nor sees EPIPE: qsnap reads on
    (after it has written its report) until the writer closes, then exits non-zero."""
    img, report = tmp_path / "vm.qsnap", tmp_path / "report.json"
    p = subprocess.Popen([sys.executable, "-m", "qsnap", "save", str(img), "--report", str(report)],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    outcome = {}

    def writer():
        try:
            p.stdin.write(b"QEVM\x00\x00\x00\x09")  # unsupported stream version: fails at once
            p.stdin.flush()
            chunk = bytes(1 << 20)
            for _ in range(64):  # far more than a pipe buffer
                p.stdin.write(chunk)
            p.stdin.close()
            outcome["ok"] = True
        except OSError as e:
            outcome["error"] = e

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the writer blocked: the failed save stopped reading"
    assert outcome == {"ok": True}
    assert p.wait(timeout=30) != 0
    assert json.loads(report.read_text())["ok"] is False
    assert p.stderr.read().decode().startswith("qsnap: error: ")
    assert not img.exists()


def test_early_exit_returns_once_the_stream_is_read(stream, tmp_path):
    """--early-exit: the process QEMU waits for exits as soon as the stream is consumed;
    a child finishes the image and writes the report."""
    img, report = tmp_path / "vm.qsnap", tmp_path / "report.json"
    with open(stream, "rb") as f:
        r = qsnap("save", "-q", "--early-exit", "--report", report, img, stdin=f)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 60
    while not report.exists():
        assert time.monotonic() < deadline, "no report from the finishing child"
        time.sleep(0.02)
    assert json.loads(report.read_text())["ok"] is True
    assert qsnap("info", img).returncode == 0


def test_early_exit_fails_when_the_stream_is_bad(tmp_path):
    img, report = tmp_path / "vm.qsnap", tmp_path / "report.json"
    r = qsnap("save", "--early-exit", "--report", report, img, input=b"QEVM\x00\x00\x00\x09garbage")
    assert r.returncode == 1
    assert r.stderr.decode().startswith("qsnap: error: ")
    assert json.loads(report.read_text())["ok"] is False and not img.exists()


def test_early_exit_needs_a_report(stream, tmp_path):
    r = qsnap("save", "--early-exit", tmp_path / "vm.qsnap", input=b"")
    assert r.returncode == 2 and b"needs --report" in r.stderr


def first_ram_part_offset(path):
    """The stream offset of the first RAM SECTION_PART of the stream file ``path``."""
    from qsnap.stream import constants as C
    from qsnap.stream import events as ev
    from qsnap.stream.reader import StreamReader

    with open(path, "rb") as f:
        for e in StreamReader(f, stop_at_logical_end=True):
            if isinstance(e, ev.SectionHeader) and e.type == C.QEMU_VM_SECTION_PART:
                return e.offset
    raise AssertionError("no SECTION_PART in the stream")


def test_notify_fd_tells_of_reading_and_of_the_first_ram_section(stream, tmp_path):
    """--notify-fd: "r" before the save reads its stream (none of which is written until it
    came), "p" as soon as the first RAM section after the setup is read (the rest of the
    stream is not written until it came), then the end of the descriptor."""
    import os
    import select

    data = stream.read_bytes()
    cut = first_ram_part_offset(stream) + 5  # the section's type and id
    sig_r, sig_w = os.pipe()
    img = tmp_path / "n.qsnap"
    p = subprocess.Popen([sys.executable, "-m", "qsnap", "save", "-q", f"--notify-fd={sig_w}", str(img)],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(sig_w,))
    os.close(sig_w)
    try:
        assert select.select([sig_r], [], [], 30)[0], "no notification that the save reads"
        assert os.read(sig_r, 16) == b"r"
        p.stdin.write(data[:cut])
        p.stdin.flush()
        assert select.select([sig_r], [], [], 30)[0], "no notification with the first RAM section in"
        assert os.read(sig_r, 16) == b"p"
        p.stdin.write(data[cut:])
        p.stdin.close()
        assert p.wait(60) == 0, p.stderr.read()
        assert os.read(sig_r, 16) == b""  # closed after the one byte
    finally:
        os.close(sig_r)
        if p.poll() is None:
            p.kill()
    assert qsnap("check", img).returncode == 0


def test_notify_fd_ends_at_once_when_the_save_fails(stream, tmp_path):
    """A save that fails before it reads (its image directory is missing) closes the
    descriptor at once, without "r", though it then drains its stream to the end."""
    import os
    import select

    sig_r, sig_w = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "qsnap", "save", "-q", f"--notify-fd={sig_w}",
                          str(tmp_path / "no" / "n.qsnap")],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(sig_w,))
    os.close(sig_w)
    try:
        assert select.select([sig_r], [], [], 30)[0], "no word from a failed save"
        assert os.read(sig_r, 16) == b""
        assert p.poll() is None  # still draining: the writer holds the stream open
        p.stdin.write(stream.read_bytes())
        p.stdin.close()
        assert p.wait(60) != 0
        assert b"qsnap: error:" in p.stderr.read()
    finally:
        os.close(sig_r)
        if p.poll() is None:
            p.kill()


def test_notify_fd_that_is_not_open(stream, tmp_path):
    r = save_cli(stream, tmp_path / "n.qsnap", "--notify-fd", "987")
    assert r.returncode != 0
    assert r.stderr.decode().strip().splitlines() == [
        "qsnap: error: --notify-fd 987: not an open file descriptor"]
    assert not (tmp_path / "n.qsnap").exists()


@pytest.mark.parametrize("args, error", [
    (["--hold-fd", "0"], "qsnap: error: save --hold-fd needs --notify-fd (whoever holds the save "
                         "learns there when to let go)"),
    (["--notify-fd", "2", "--hold-fd", "987"], "qsnap: error: --hold-fd 987: not an open file descriptor"),
])
def test_hold_fd_without_notify_or_not_open(stream, tmp_path, args, error):
    r = save_cli(stream, tmp_path / "h.qsnap", *args)
    assert r.returncode != 0
    assert r.stderr.decode().strip().splitlines() == [error]
    assert not (tmp_path / "h.qsnap").exists()
