"""The restore's qsnap load child (qsnap.vm.savechild.LoadChild): the end QEMU gets,
the postcopy return path relayed to a blocking stdin, the end seen when the load ends."""
import os
import socket
import sys

import pytest

from qsnap.vm import savechild
from qsnap.vm.savechild import LoadChild


@pytest.fixture
def fake_load(monkeypatch):
    """LoadChild runs ``python -c CODE`` instead of qsnap load."""
    def use(code):
        monkeypatch.setattr(savechild, "engine_argv", lambda command, args: [sys.executable, "-c", code])
    return use


def read_all(fd, timeout=30):
    sock = socket.socket(fileno=os.dup(fd))
    sock.settimeout(timeout)
    out = b""
    with sock:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_a_missing_image_ends_the_load_with_its_error(tmp_path):
    child = LoadChild(["-q", str(tmp_path / "missing.qsnap")], str(tmp_path / "load.log"))
    with os.fdopen(os.dup(child.qemu_fd), "rb") as qemu_end:
        assert qemu_end.read() == b""  # the stream ends: the load is gone
    assert child.wait(60)
    end = child.describe_end()
    assert end.startswith("exited with status ") and "missing.qsnap" in end, end
    child.stop()
    assert child.qemu_fd is None


def test_postcopy_return_path_reaches_a_blocking_stdin(tmp_path, fake_load):
    """The load switches its stdout (the socket) to O_NONBLOCK, as qsnap load's emitter
    does; its stdin must stay blocking and carry what QEMU writes on the socket."""
    fake_load("import os; os.set_blocking(1, False); assert os.get_blocking(0); "
              "d = os.read(0, 5); os.set_blocking(1, True); os.write(1, d.upper())")
    child = LoadChild(["x"], str(tmp_path / "load.log"), return_path=True)
    qemu = socket.socket(fileno=os.dup(child.qemu_fd))
    with qemu:
        qemu.sendall(b"hello")  # QEMU's return path
        child.close_qemu_end()
        assert read_all(qemu.fileno()) == b"HELLO"  # the stream, then its end
    assert child.wait(30) and child.proc.returncode == 0, (tmp_path / "load.log").read_text()
    child.stop()
    assert not child.relay.thread.is_alive()


def test_a_postcopy_load_that_dies_ends_the_stream(tmp_path, fake_load):
    """QEMU sees its end close when the load dies, though the relay holds the load's
    socket: it lets go once the load has exited."""
    fake_load("import os; os.write(1, b'partial'); os._exit(3)")
    child = LoadChild(["x"], str(tmp_path / "load.log"), return_path=True)
    assert read_all(child.qemu_fd) == b"partial"
    assert child.wait(30) and child.proc.returncode == 3
    child.stop()
    assert not child.relay.thread.is_alive()


class Facts:
    path = "/img/x.qsnap"

    def origin(self):
        return "saved by QEMU 7.2.22 with machine type pc-i440fx-7.2"


def test_a_load_that_failed_ends_a_migration_qemu_still_waits_for(tmp_path, fake_load):
    """A postcopy destination whose load died waits in postcopy-paused for a recovery:
    the restore says why instead of waiting for ever."""
    from qsnap.errors import VmError
    from qsnap.vm.restore import Restore

    fake_load("import sys; sys.stderr.write('qsnap: error: image went away\\n'); sys.exit(2)")
    child = LoadChild(["x"], str(tmp_path / "load.log"), return_path=True)
    assert child.wait(30)
    job = Restore(None, Facts(), str(tmp_path), child, postcopy=10)
    assert job._check_load("completed") == "completed"
    with pytest.raises(VmError) as e:
        job._check_load("postcopy-paused")
    assert str(e.value) == ("qsnap load exited with status 2 while the incoming migration was postcopy-paused "
                            "(qsnap load: image went away); the image was saved by QEMU 7.2.22 with "
                            "machine type pc-i440fx-7.2")
    child.stop()
