"""Pieces of `qsnap snapshot` that need no QEMU: naming, settings put back, output."""
import json
import os
import sys
import time

import pytest

from qsnap.errors import VmError
from qsnap.vm import migration, overlays, progress, savechild, snapshot, vmrecord


class FakeQmp:
    """Answers the migration settings commands like QEMU does; can refuse one."""

    path = "/run/fake.qmp"

    def __init__(self, refuse=None):
        self.caps = {"background-snapshot": False, "pause-before-switchover": False, "events": True}
        self.params = {"max-bandwidth": 33554432, "downtime-limit": 300}
        self.refuse = refuse

    def cmd(self, name, arguments=None, **kw):
        args = dict(arguments or {}, **kw)
        if name == self.refuse:
            raise VmError(f"QEMU refused {name}: no")
        if name == "query-migrate-capabilities":
            return [{"capability": k, "state": v} for k, v in self.caps.items()]
        if name == "query-migrate-parameters":
            return dict(self.params)
        if name == "migrate-set-capabilities":
            for c in args["capabilities"]:
                self.caps[c["capability"]] = c["state"]
            return {}
        if name == "migrate-set-parameters":
            self.params.update(args)
            return {}
        raise AssertionError(name)


def test_settings_put_back_what_changed():
    q = FakeQmp()
    before = (dict(q.caps), dict(q.params))
    s = migration.Settings(q)
    s.set_capability("background-snapshot", True)
    s.set_parameter("max-bandwidth", 16 << 30)
    assert q.caps["background-snapshot"] is True and q.params["max-bandwidth"] == 16 << 30
    s.restore()
    assert (q.caps, q.params) == before
    s.restore()  # idempotent
    assert (q.caps, q.params) == before


def test_settings_refuse_unknown_names():
    s = migration.Settings(FakeQmp())
    with pytest.raises(VmError, match="no migration capability 'x-nope'"):
        s.set_capability("x-nope", True)
    with pytest.raises(VmError, match="no migration parameter 'x-nope'"):
        s.set_parameter("x-nope", 1)


def test_probe_capability_says_why_and_changes_nothing():
    q = FakeQmp(refuse="migrate-set-capabilities")
    with pytest.raises(VmError, match="cannot take a background-snapshot snapshot: QEMU refused"):
        migration.probe_capability(q, "background-snapshot")
    assert q.caps["background-snapshot"] is False


def test_overlay_named_after_the_snapshot_beside_the_disk():
    assert overlays.overlay_path("/vm/disk.qcow2", "/snap/monday.qsnap") == "/vm/disk.monday.qcow2"
    assert overlays.overlay_path("/vm/disk.monday.qcow2", "tue.qsnap") == "/vm/disk.monday.tue.qcow2"


def test_plan_refuses_an_existing_overlay_and_non_files(tmp_path):
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"x")
    d = overlays.Disk(device="d0", qdev=None, node_name="#b1", image=str(disk), format="qcow2",
                      virtual_size=1 << 20, chain=[str(disk)])
    overlays.plan([d], str(tmp_path / "s.qsnap"))
    assert d.overlay == str(tmp_path / "d.s.qcow2")
    (tmp_path / "d.s.qcow2").write_bytes(b"")
    with pytest.raises(VmError, match=r"overlay .*d\.s\.qcow2 for disk d0 already exists"):
        overlays.plan([d], str(tmp_path / "s.qsnap"))
    nbd = overlays.Disk(device="d1", qdev=None, node_name="#b2", image="nbd://host/x", format="raw",
                        virtual_size=1, chain=[])
    with pytest.raises(VmError, match="not a local image file"):
        overlays.plan([nbd], str(tmp_path / "s.qsnap"))


def test_progress_line():
    assert progress.line("saving", 64 << 20, 256 << 20, 96e6) == \
        "saving: 64.0 of 256.0 MiB RAM, 96.0 MB/s, ETA 2 s"
    assert progress.line("saving", 0, 256 << 20, 0.0) == "saving: 0.0 of 256.0 MiB RAM, 0.0 MB/s"


def test_save_child_runs_this_qsnap(tmp_path):
    import qsnap
    argv = savechild.save_argv(["--report", "/tmp/a b/r.json", "/img/x.qsnap"])
    assert argv[0] == sys.executable
    assert argv[1:] == ["-m", "qsnap", "save", "--report", "/tmp/a b/r.json", "/img/x.qsnap"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(qsnap.__file__)))
    assert savechild.save_env()["PYTHONPATH"].split(os.pathsep)[0] == root


def test_save_child_that_fails_says_how(tmp_path):
    """A save whose stream is empty ends with its error, which describe_end() carries."""
    child = savechild.SaveChild([str(tmp_path / "x.qsnap")], str(tmp_path / "err"))
    child.close_qemu_end()  # no writer left: the stream is empty
    assert child.wait(60)
    end = child.describe_end()
    assert end.startswith("exited with status ") and "qsnap: error:" not in end
    assert len(end) > len("exited with status 1: "), end
    assert not (tmp_path / "x.qsnap").exists()


class RunStateQmp:
    """query-migrate says completed while the run state is still finish-migrate for a
    few queries; cont is refused there, as QEMU does."""

    path = "/run/fake.qmp"

    def __init__(self, finishing=3):
        self.finishing = finishing
        self.status = "finish-migrate"
        self.conts = 0

    def cmd(self, name, arguments=None, **kw):
        if name == "query-migrate":
            return {"status": "completed"}
        if name == "query-status":
            if self.status == "finish-migrate":
                self.finishing -= 1
                if self.finishing < 0:
                    self.status = "postmigrate"
            return {"status": self.status}
        if name == "cont":
            if self.status == "finish-migrate":
                raise VmError("QEMU refused cont: Migration is not finalized yet")
            self.status = "running"
            self.conts += 1
            return {}
        raise AssertionError(name)

    def events(self, name=None):
        stamp = {"seconds": 100, "microseconds": 0}
        if name == "STOP":
            return [{"event": "STOP", "timestamp": stamp}]
        if name == "RESUME" and self.conts:
            return [{"event": "RESUME", "timestamp": dict(stamp, microseconds=25000)}]
        return []


def test_resume_after_completed_waits_for_postmigrate(tmp_path):
    """...and only then writes the VM record, with the downtime (the save waits for it)."""
    s = snapshot._Snapshot("/run/fake.qmp", "/tmp/x.qsnap", "live", True, None)
    s.q, s.was_running = RunStateQmp(), True
    s.identity, s.workdir = ("7.2.22", None, "pc-i440fx-7.2"), str(tmp_path)
    s._resume_when_streamed()
    assert s.resumed and s.q.status == "running" and s.q.conts == 1
    assert json.loads((tmp_path / "vm.json").read_text())["downtime_ms"] == 25.0
    s._restore_run_state()  # already running: no second cont
    assert s.q.conts == 1


def test_human_summary():
    s = {"image": "/s/x.qsnap", "mode": "background", "was_running": True, "downtime_ms": 12.34,
         "seconds": 3.2, "ram_only": False,
         "disks": [{"device": "d0", "qdev": None, "frozen": "/vm/d.qcow2", "overlay": "/vm/d.x.qcow2"}]}
    assert snapshot.format_summary(s) == (
        "snapshot /s/x.qsnap: mode background, downtime 12.3 ms, 3.20 s\n"
        "disk d0: frozen /vm/d.qcow2, VM now on /vm/d.x.qcow2")


def test_unknown_mode_is_refused():
    with pytest.raises(VmError, match="unknown snapshot mode 'fast'"):
        snapshot.snapshot("/nonexistent.qmp", "/tmp/x.qsnap", mode="fast")


def test_cmdline_file_relative_to_qemus_directory():
    d = overlays.Disk(device="d0", qdev=None, node_name="#b1", image="/srv/vm1/d0.qcow2",
                      format="qcow2", virtual_size=1 << 20, chain=["/srv/vm1/d0.qcow2"])
    argv = ["qemu-system-x86_64", "-drive", "file=d0.qcow2,if=none,id=d0"]
    assert vmrecord.cmdline_file(d, argv, "/srv/vm1") == "/srv/vm1/d0.qcow2"
    assert vmrecord.cmdline_file(d, argv, None) is None  # where QEMU ran is unknown
    absolute = ["qemu-system-x86_64", "-drive", "file=/srv/vm1/d0.qcow2,if=none"]
    assert vmrecord.cmdline_file(d, absolute, "/elsewhere") == "/srv/vm1/d0.qcow2"


def test_read_cwd_of_a_process():
    assert vmrecord.read_cwd(os.getpid()) == os.getcwd()
    assert vmrecord.read_cwd(None) is None
    assert vmrecord.read_cwd(1 << 30) is None  # no such process


def test_vm_record_cwd_is_optional_and_absolute():
    from qsnap.errors import ImageError
    from qsnap.image import layout
    rec = {"qemu_version": "7.2.22", "qemu_package": None, "machine": "pc-i440fx-7.2",
           "cmdline": ["qemu-system-x86_64"], "mode": "background", "was_running": True,
           "downtime_ms": None, "ram_only": True, "disks": []}
    layout.validate_vm_record(rec)  # written before cwd existed
    layout.validate_vm_record(dict(rec, cwd=None))
    layout.validate_vm_record(dict(rec, cwd="/srv/vm1"))
    with pytest.raises(ImageError, match=r"vm\.cwd.*absolute"):
        layout.validate_vm_record(dict(rec, cwd="vm1"), path="vm")


def test_disk_files_as_plain_absolute_paths():
    json_name = ('json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": '
                 '"../d0.qcow2"}}, "driver": "qcow2", "file": {"driver": "file", "filename": '
                 '"/vm/d0.snap.qcow2"}}')
    assert overlays._local_file(json_name, "/vm/run") == "/vm/d0.snap.qcow2"
    assert overlays._local_file("../d0.qcow2", "/vm/run") == "/vm/d0.qcow2"
    assert overlays._local_file("d0.qcow2", None) == "d0.qcow2"  # refused later by plan()
    nbd = 'json:{"driver": "qcow2", "file": {"driver": "nbd", "server": {}}}'
    assert overlays._local_file(nbd, "/vm") == nbd
    assert overlays._local_file("nbd://host/x", "/vm") == "nbd://host/x"


class FdQmp:
    """Refuses migrate; closefd answers ``closefd_error`` when given."""

    path = "/run/fake.qmp"

    def __init__(self, closefd_error=None):
        self.calls, self.closefd_error = [], closefd_error

    def cmd(self, name, arguments=None, **kw):
        self.calls.append((name, dict(arguments or {}, **kw)))
        if name == "migrate":
            raise VmError("QEMU refused migrate: no")
        if name == "closefd" and self.closefd_error:
            raise VmError(f"QEMU refused closefd: {self.closefd_error}")
        return {}


@pytest.mark.parametrize("answer", [None, "File descriptor named 'x' not found"])
def test_pipe_name_closed_when_migrate_did_not_take_it(answer):
    s = snapshot._Snapshot("/run/fake.qmp", "/tmp/x.qsnap", "background", True, None)
    s.q, s.fd_named = FdQmp(answer), True
    with pytest.raises(VmError, match="refused migrate"):
        s._migrate()
    assert s.fd_named  # QEMU may still hold it
    s._close_fd_name()
    assert s.q.calls[-1] == ("closefd", {"fdname": s.fd_name}) and not s.fd_named
    s._close_fd_name()  # once is enough
    assert len(s.q.calls) == 2


def test_pipe_name_close_failure_is_reported():
    s = snapshot._Snapshot("/run/fake.qmp", "/tmp/x.qsnap", "background", True, None)
    s.q, s.fd_named = FdQmp("QMP connection lost"), True
    with pytest.raises(VmError, match="connection lost"):
        s._close_fd_name()


# --- the last snapshot of a VM (--incremental) -------------------------------------------

def _saved_image(tmp_path, name, seed):
    from qsnap.save import save
    from qsnap.stream.synth import synth_stream
    stream = tmp_path / f"{name}.stream"
    with open(stream, "wb") as f:
        synth_stream(f, blocks=[("pc.ram", 1 << 20)], seed=seed)
    with open(stream, "rb") as f:
        save(str(tmp_path / name), in_fd=f.fileno(), out_fd=-1, quiet=True)
    return str(tmp_path / name)


def test_last_snapshot_is_recorded_per_qemu_process_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("QSNAP_STATE_DIR", str(tmp_path / "state"))
    pid = os.getpid()   # stands for the QEMU process
    with pytest.raises(VmError, match="has no earlier snapshot by qsnap snapshot"):
        snapshot.last_snapshot(pid, [], "/run/vm.qmp")
    img = _saved_image(tmp_path, "a.qsnap", 1)
    disk = overlays.Disk(device="d0", qdev=None, node_name="n", image="/d/disk.qcow2",
                         format="qcow2", virtual_size=1, chain=[], overlay="/d/disk.a.qcow2")
    snapshot.remember_snapshot(pid, img, [disk])
    on_overlay = overlays.Disk(device="d0", qdev=None, node_name="n2", image="/d/disk.a.qcow2",
                               format="qcow2", virtual_size=1, chain=[])
    assert snapshot.last_snapshot(pid, [on_overlay], "/run/vm.qmp") == img
    with pytest.raises(VmError, match=r"no longer on the overlays .*/d/disk.a.qcow2; now on /d/disk.qcow2"):
        snapshot.last_snapshot(pid, [disk], "/run/vm.qmp")
    os.replace(_saved_image(tmp_path, "b.qsnap", 2), img)   # another snapshot at its path
    with pytest.raises(VmError, match="no longer matches: it was replaced"):
        snapshot.last_snapshot(pid, [on_overlay], "/run/vm.qmp")
    os.unlink(img)
    with pytest.raises(VmError, match="last snapshot .*a.qsnap cannot be used"):
        snapshot.last_snapshot(pid, [on_overlay], "/run/vm.qmp")


def test_parent_and_incremental_exclude_each_other():
    with pytest.raises(VmError, match="exclude each other"):
        snapshot.snapshot("/nonexistent.qmp", "/tmp/x.qsnap", parent="/tmp/p.qsnap", incremental=True)


def test_a_held_save_keeps_the_writer_waiting_until_released(tmp_path):
    """The pipe a held save reads is full of filler: the stream's first write sleeps
    (as QEMU's thread in its setup) until release() takes the filler out; the save
    then reads the stream alone, from its first byte, and the image is whole."""
    import threading
    from qsnap.stream.synth import synth_stream
    from qsnap.vm import qemuthreads

    stream = tmp_path / "s.stream"
    with open(stream, "wb") as f:
        synth_stream(f, blocks=(("pc.ram", 4 << 20),), seed=7)
    img = tmp_path / "x.qsnap"
    child = savechild.SaveChild(["--report", str(tmp_path / "r.json"), str(img)],
                                str(tmp_path / "err"), notify=True, hold=True)
    writer_fd = os.dup(child.qemu_fd)  # "QEMU"'s copy of the write end
    try:
        assert child.wait_reading(60)
        assert child.fill_pipe() and child.filler > 0
        child.close_qemu_end()
        data = stream.read_bytes()
        first_written = threading.Event()

        def write():  # a first write smaller than the pipe, as QEMU's setup
            os.write(writer_fd, data[:512])
            first_written.set()
            os.write(writer_fd, data[512:])
            os.close(writer_fd)

        tids = qemuthreads.tasks(os.getpid())
        writer = threading.Thread(target=write)
        writer.start()
        new = qemuthreads.tasks(os.getpid()) - tids
        deadline = time.monotonic() + 10
        while not qemuthreads.writing_pipe(os.getpid(), new) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert qemuthreads.writing_pipe(os.getpid(), new) or qemuthreads.sleeping(os.getpid(), new)
        assert not first_written.wait(0.2)  # not even 512 bytes went through
        child.release()
        writer.join(30)
        assert not writer.is_alive()
        assert child.wait(60) and child.proc.returncode == 0, child.describe_end()
        assert json.loads((tmp_path / "r.json").read_text())["ok"]
    finally:
        child.stop()


def test_releasing_a_save_that_is_gone_is_quiet(tmp_path):
    """An undo releases the save whatever became of it: a save that exited first (its
    image directory is missing) leaves nothing to let go, and no error."""
    child = savechild.SaveChild([str(tmp_path / "no" / "x.qsnap")], str(tmp_path / "err"), notify=True, hold=True)
    try:
        t0 = time.monotonic()
        assert not child.wait_reading(60)  # it failed without reading ...
        assert child.ram_fd is None and time.monotonic() - t0 < 30  # ... and said so at once
        child.close_qemu_end()  # the failed save drains its stream to the end
        assert child.wait(60)
        child.release()
        child.release()  # once only: the second does nothing
        assert child.hold_fd is None and child.stream_fd is None
    finally:
        child.stop()
