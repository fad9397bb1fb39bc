"""The qsnap engines behind qsnap's VM commands, started by those commands themselves.

``SaveChild``: the ``qsnap save`` behind ``qsnap snapshot``.  QEMU gets the write end
of the save's stdin pipe over QMP (``getfd``) and migrates into it (``migrate
fd:NAME``, migration/fd.c; a pipe is accepted as such on 7.2 and 10.0).  Unlike
``exec:``, QEMU forks nothing: forking the command from a 3 GiB QEMU took 221-355 ms,
and it happened inside the guest's pause.  The save starts before the pause, and its
exit status is ours to see.

``LoadChild``: the ``qsnap load`` behind ``qsnap restore``, handed to QEMU the same
way (``getfd``, then ``migrate-incoming fd:NAME``): it starts while QEMU starts or is
checked, so its own start-up (interpreter, imports, opening the image) is off the
clock, and no shell runs between them.
"""
import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import qsnap
from qsnap.errors import VmError

STOP_GRACE = 10.0  # s for a child whose stream has ended to exit before it is stopped
RELAY_POLL = 0.2   # s between the return-path relay's looks at whether the load still runs
RELAY_CHUNK = 65536
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class EngineChild:
    """``qsnap COMMAND ARGS`` with the given stdin and stdout, its stderr in
    ``stderr_path`` (the operator sees one error line: the VM command's), in its own
    process group (a terminal's ^C goes to the VM command alone, which ends the
    migration in order; the child then sees its stream end)."""

    def __init__(self, command, args, stderr_path, *, stdin, stdout, pass_fds=()):
        self.command = command
        self.qemu_fd = None   # the stream's end QEMU gets (getfd), ours until close_qemu_end()
        self.stderr_path = stderr_path
        self.started = time.monotonic()
        self.ended = None     # time.monotonic() when wait() saw it exit
        self.cpu = None       # {"user_s", "sys_s"} it used, when wait() could read them
        try:
            with open(stderr_path, "ab") as err:
                self.proc = subprocess.Popen(engine_argv(command, args), stdin=stdin, stdout=stdout,
                                             stderr=err, env=engine_env(), process_group=0,
                                             pass_fds=pass_fds)
        except OSError as e:
            raise VmError(f"cannot start qsnap {command} ({sys.executable}): {e.strerror}") from None

    def running(self):
        return self.poll() is None

    def poll(self):
        """Its exit status, or None while it runs (Popen.poll), with its CPU time and end
        noted first, before reaping it loses them (_await_exit)."""
        if self.proc.returncode is None and self.ended is None:
            self._await_exit(0)
        return self.proc.poll()

    def wait(self, timeout):
        """True once the child has exited (within ``timeout`` s)."""
        if self.proc.returncode is None and self.ended is None:
            self._await_exit(timeout)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _await_exit(self, timeout):
        """Wait up to ``timeout`` s for the child to exit, without reaping it: its CPU
        time is in /proc/PID/stat until it is reaped (a zombie keeps it), and the time
        it ended is noted (the restore's summary reports both)."""
        try:
            pidfd = os.pidfd_open(self.proc.pid)
        except OSError:
            return  # reaped already (or no pidfd): nothing to note
        try:
            if not select.select([pidfd], [], [], timeout)[0]:
                return
        finally:
            os.close(pidfd)
        self.ended = time.monotonic()
        self.cpu = process_cpu(self.proc.pid)

    def close_qemu_end(self):
        """Once QEMU holds its copy (or will not get one): the child sees the stream end
        when QEMU closes it, or at once if QEMU never took it."""
        if self.qemu_fd is not None:
            os.close(self.qemu_fd)
            self.qemu_fd = None

    def stop(self, grace=STOP_GRACE):
        """Make sure the child is gone: it has ``grace`` s to end on its own (its stream
        is closed by now), then SIGTERM (a save removes its temporary file), then SIGKILL.
        Always reaped: no zombie is left."""
        self.close_qemu_end()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                try:
                    self.proc.send_signal(sig)
                except ProcessLookupError:
                    pass
            if self.wait(grace if sig is None else STOP_GRACE):
                return

    def last_error(self):
        """The child's last line on stderr without "qsnap: error: ", or None."""
        try:
            with open(self.stderr_path, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            lines = []
        return lines[-1].removeprefix("qsnap: error: ") if lines else None

    def describe_status(self):
        """'exited with status 2', 'was killed by signal 9' or 'is still running'."""
        status = self.poll()
        return "is still running" if status is None else (
            f"was killed by signal {-status}" if status < 0 else f"exited with status {status}")

    def describe_end(self):
        """How the child ended, for an error message: its status and last error line."""
        what, last = self.describe_status(), self.last_error()
        return f"{what}: {last}" if last else what


class SaveChild(EngineChild):
    """``qsnap save ARGS`` reading a pipe whose write end is ``qemu_fd`` until
    ``close_qemu_end()``.  With ``notify`` it tells over ``ram_fd`` (``save
    --notify-fd``) when it reads its stream (``wait_reading``) and when the stream's
    first RAM section after the setup is in (``ram_pages_flowing``, once ``ram_fd`` is
    readable).

    With ``hold`` (and ``notify``) the save, once it said it reads, reads nothing until
    ``release()``; ``fill_pipe()`` meanwhile fills the pipe with filler of our own, so
    that QEMU's first write blocks until ``release()`` has taken that filler out again
    (snapshot._stop_in_setup)."""

    def __init__(self, args, stderr_path, *, notify=False, hold=False):
        r, w = os.pipe()
        sig_r, sig_w = os.pipe() if notify else (None, None)
        hold_r, hold_w = os.pipe() if hold else (None, None)
        extra = [f"--notify-fd={sig_w}"] if notify else []
        extra += [f"--hold-fd={hold_r}"] if hold else []
        ours = [fd for fd in (sig_w, hold_r) if fd is not None]
        try:
            super().__init__("save", extra + list(args), stderr_path, stdin=r,
                             stdout=subprocess.DEVNULL, pass_fds=ours)
        except VmError:
            for fd in (r, w, sig_r, hold_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in ours:
                os.close(fd)
        self.stream_fd = r if hold else None  # where release() takes the filler out
        if not hold:
            os.close(r)
        self.qemu_fd = w
        self.ram_fd = sig_r
        self.hold_fd = hold_w
        self.filler = 0  # bytes of filler in the pipe
        self.pipe_size = None  # the size fill_pipe() found, given back by release()

    def wait_reading(self, timeout):
        """Until the save reads its stream (its interpreter started, its image open):
        True, or False when it exited first or ``timeout`` s passed."""
        return self._next_event(timeout) == b"r"

    def ram_pages_flowing(self):
        """True when the save's next --notify-fd byte, already there to read, says it
        has read the first RAM section; False for anything else, its end included (call
        it once ``ram_fd`` is readable)."""
        return self._next_event(0) == b"p"

    def _next_event(self, timeout):
        """The save's next --notify-fd byte, or None after ``timeout`` s or at its end."""
        if self.ram_fd is None or not _readable(self.ram_fd, timeout):
            return None
        event = os.read(self.ram_fd, 1)
        if not event:
            os.close(self.ram_fd)  # the save ended: no more to wait for here
            self.ram_fd = None
        return event or None

    def fill_pipe(self):
        """Shrink the held save's pipe to its least and fill it (while we still hold its
        write end and the save, which made it larger, reads nothing), so that QEMU's
        first write waits for release(): True, or False when the pipe could not be made
        full (release() then lets the save go as if never held)."""
        try:
            self.pipe_size = fcntl.fcntl(self.qemu_fd, F_GETPIPE_SZ)
            size = fcntl.fcntl(self.qemu_fd, F_SETPIPE_SZ, 0)  # the kernel's least: a page
            self.filler = os.write(self.qemu_fd, bytes(size))
        except OSError:
            return False
        return self.filler == size

    def release(self):
        """Take the filler out of the pipe (QEMU's first write goes through), give the
        pipe its size back and let the save read: at once, and once only."""
        if self.stream_fd is not None:
            while self.filler:  # counted down as read: an interrupted release resumes
                self.filler -= len(os.read(self.stream_fd, self.filler))
            if self.pipe_size is not None:
                try:
                    fcntl.fcntl(self.stream_fd, F_SETPIPE_SZ, self.pipe_size)
                except OSError:
                    pass  # a smaller pipe: slower, not wrong
            os.close(self.stream_fd)
            self.stream_fd = None
        if self.hold_fd is not None:
            try:
                os.write(self.hold_fd, b"g")
            except OSError:
                pass  # the save is gone: nobody to let go
            os.close(self.hold_fd)
            self.hold_fd = None

    def stop(self, grace=STOP_GRACE):
        if self.hold_fd is not None:
            os.close(self.hold_fd)  # a held save must not wait for us any more
            self.hold_fd = None
        if self.stream_fd is not None:
            os.close(self.stream_fd)
            self.stream_fd = None
        super().stop(grace)
        if self.ram_fd is not None:
            os.close(self.ram_fd)
            self.ram_fd = None


class LoadChild(EngineChild):
    """``qsnap load ARGS`` writing the stream into ``qemu_fd``, the end QEMU gets
    (``getfd``) until ``close_qemu_end()``.

    Precopy: a pipe, QEMU's end its read end (``qsnap load`` makes it larger).

    Postcopy (``return_path``): QEMU's fd: incoming side reads the stream and writes
    its return path on one descriptor (qemu_file_get_return_path, migration/qemu-file.c:
    a second QEMUFile on the same channel), so QEMU's end is one end of a socketpair;
    the child writes the stream straight into the other (its stdout).  Its stdin, where
    ``qsnap load --postcopy`` reads the return path, is a pipe that a ReturnPathRelay
    fills from that socket: the load switches its stdout to O_NONBLOCK (csrc/emit.c),
    a flag of the open file that any other descriptor of the same socket would share,
    and its return-path reader expects a blocking stdin."""

    def __init__(self, args, stderr_path, *, return_path=False):
        self.relay = None
        if return_path:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            qemu_fd, child_out = ours.detach(), theirs.detach()
            child_in, relay_w = os.pipe()
        else:
            qemu_fd, child_out = os.pipe()
            child_in, relay_w = subprocess.DEVNULL, None
        try:
            super().__init__("load", args, stderr_path, stdin=child_in, stdout=child_out)
        except VmError:
            for fd in (qemu_fd, child_out, relay_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            if relay_w is not None:
                os.close(child_in)
        if relay_w is None:
            os.close(child_out)  # the child holds its own copy
        else:
            self.relay = ReturnPathRelay(child_out, relay_w, self.proc)
        self.qemu_fd = qemu_fd

    def stop(self, grace=STOP_GRACE):
        super().stop(grace)
        if self.relay is not None:
            self.relay.join()


class ReturnPathRelay:
    """A thread that copies what QEMU writes on the socket ``sock_fd`` (its return
    path) into the pipe ``pipe_fd``, the load's stdin, until QEMU closes the socket or
    the load exits; then it closes both (QEMU sees the stream end once the load's own
    copy is gone too).  The return path is a few bytes a page request."""

    def __init__(self, sock_fd, pipe_fd, proc):
        self.sock = socket.socket(fileno=sock_fd)  # closes sock_fd when the relay ends
        self.pipe_fd, self.proc = pipe_fd, proc
        self.thread = threading.Thread(target=self._run, daemon=True, name="qsnap-return-path")
        self.thread.start()

    def _run(self):
        try:
            self._copy()
        finally:
            os.close(self.pipe_fd)
            self.sock.close()

    def _copy(self):
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while self.proc.poll() is None:
            if not poller.poll(RELAY_POLL * 1000):
                continue
            try:
                # MSG_DONTWAIT: the load's O_NONBLOCK on this socket is not ours to rely on
                data = self.sock.recv(RELAY_CHUNK, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return  # the load then sees its return path end and says so
            if not data:
                return
            try:
                os.write(self.pipe_fd, data)  # a pipe: all of it, or EPIPE
            except OSError:
                return  # the load is gone

    def join(self):
        self.thread.join(STOP_GRACE)


def _readable(fd, timeout):
    """True when ``fd`` has data or its end (within ``timeout`` s)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def process_cpu(pid):
    """{"user_s", "sys_s"} the process ``pid`` has used (/proc/PID/stat utime and stime,
    fields 14 and 15, in clock ticks), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return {"user_s": int(fields[11]) / tick, "sys_s": int(fields[12]) / tick}


def engine_argv(command, args):
    """This qsnap's ``command``, with this interpreter."""
    return [sys.executable, "-m", "qsnap", command] + [str(a) for a in args]


def save_argv(args):
    return engine_argv("save", args)


def save_env():
    return engine_env()


def engine_env():
    """The environment with this qsnap first on PYTHONPATH (it may not be installed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(qsnap.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
