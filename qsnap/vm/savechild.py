"""The `qsnap save` behind a snapshot, started by `qsnap snapshot` itself.

QEMU gets the write end of the save's stdin pipe over QMP (``getfd``) and migrates
into it (``migrate fd:NAME``, migration/fd.c; a pipe is accepted as such on 7.2 and
10.0).  Unlike ``exec:``, QEMU forks nothing: forking the command from a 3 GiB QEMU
took 221-355 ms, and it happened inside the guest's pause.  The save starts before
the pause, and its exit status is ours to see.
"""
import os
import signal
import subprocess
import sys

import qsnap
from qsnap.errors import VmError

STOP_GRACE = 10.0  # s for a save whose stream has ended to exit before it is stopped


class SaveChild:
    """``qsnap save ARGS`` reading a pipe whose write end is ``write_fd`` until
    ``close_write_end()``; its stderr goes to ``stderr_path`` (the operator sees one
    error line, qsnap snapshot's)."""

    def __init__(self, args, stderr_path):
        self.stderr_path = stderr_path
        r, w = os.pipe()
        try:
            with open(stderr_path, "wb") as err:
                # its own process group: a terminal's ^C goes to qsnap snapshot alone,
                # which ends the migration in order; the save then sees the stream end
                self.proc = subprocess.Popen(save_argv(args), stdin=r, stdout=subprocess.DEVNULL,
                                             stderr=err, env=save_env(), process_group=0)
        except OSError as e:
            os.close(w)
            raise VmError(f"cannot start qsnap save ({sys.executable}): {e.strerror}") from None
        finally:
            os.close(r)
        self.write_fd = w

    def close_write_end(self):
        """Once QEMU holds its copy: the save sees the end of the stream when QEMU closes it."""
        if self.write_fd is not None:
            os.close(self.write_fd)
            self.write_fd = None

    def running(self):
        return self.proc.poll() is None

    def wait(self, timeout):
        """True once the save has exited (within ``timeout`` s)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self):
        """Make sure the save is gone: it has STOP_GRACE s to end on its own (its stream
        is closed by now), then SIGTERM (it removes its temporary file), then SIGKILL."""
        self.close_write_end()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                try:
                    self.proc.send_signal(sig)
                except ProcessLookupError:
                    pass
            if self.wait(STOP_GRACE):
                return

    def describe_end(self):
        """How the save ended, for an error message: its status and last error line."""
        status = self.proc.poll()
        what = "is still running" if status is None else (
            f"was killed by signal {-status}" if status < 0 else f"exited with status {status}")
        try:
            with open(self.stderr_path, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            lines = []
        if lines:
            what += ": " + lines[-1].removeprefix("qsnap: error: ")
        return what


def save_argv(args):
    """This qsnap's save, with this interpreter."""
    return [sys.executable, "-m", "qsnap", "save"] + [str(a) for a in args]


def save_env():
    """The environment with this qsnap first on PYTHONPATH (it may not be installed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(qsnap.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
