"""A synchronous QMP session over a unix socket.

``qemu.qmp`` (QEMU's own QMP library) speaks the protocol: greeting, capability
negotiation, replies matched to requests, events.  It is asyncio-only; qsnap's
commands are sequential, so one private event loop runs in a daemon thread and
``Qmp.cmd`` blocks for each reply.

A QMP unix socket serves one client at a time: a second client's connect()
succeeds (the kernel queues it) but QEMU sends it no greeting until the first
client leaves.  A missing greeting therefore means "in use", and says so.
"""
import asyncio
import concurrent.futures
import os
import socket
import stat
import struct
import threading
import time

from qsnap.errors import VmError

GREETING_TIMEOUT = 3.0
COMMAND_TIMEOUT = 60.0
# query-named-block-nodes of a VM with many disks easily exceeds qemu.qmp's
# 64 KiB default line limit.
READ_LIMIT = 16 << 20


class LoopThread:
    """An asyncio loop in a daemon thread; run(coro) blocks for its result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="qsnap-qmp")
        self.thread.start()

    def run(self, coro, timeout):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def close(self):
        # qemu.qmp leaves reader/writer tasks behind after a failed connect;
        # cancel them so that nothing is destroyed pending at exit
        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_all(), 5)
        except Exception:
            pass  # a task that does not end within 5 s is left to the daemon thread
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


def _connect_socket(path):
    """A connected unix socket to ``path``, or a VmError saying what is wrong with it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VmError(f"QMP socket {path} does not exist (start QEMU with -qmp unix:{path},server=on,wait=off)") from None
    except OSError as e:
        raise VmError(f"cannot reach QMP socket {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise VmError(f"{path} is not a socket (expected QEMU's QMP unix socket)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        if isinstance(e, ConnectionRefusedError):
            raise VmError(f"nothing listens on QMP socket {path} (is QEMU running?)") from None
        raise VmError(f"cannot connect to QMP socket {path}: {e.strerror}") from None
    return s


def _peer_pid(sock):
    """The pid of the process at the other end of a unix socket (SO_PEERCRED), or None."""
    try:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", cred)[0]
    return pid or None


class Qmp:
    """One QMP session.  Use as a context manager::

        with Qmp("/run/vm1.qmp") as q:
            q.cmd("query-status")["status"]
            q.cmd("migrate-set-capabilities", capabilities=[...])
    """

    def __init__(self, path, *, greeting_timeout=GREETING_TIMEOUT, timeout=COMMAND_TIMEOUT):
        self.path = str(path)
        self.greeting_timeout = greeting_timeout
        self.timeout = timeout
        self.pid = None
        self._client = None
        self._loop = None
        self._events = []

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def connect(self):
        from qemu.qmp import QMPClient
        sock = _connect_socket(self.path)
        self.pid = _peer_pid(sock)
        self._loop = LoopThread()
        self._client = QMPClient("qsnap")
        self._client.readbuflen = READ_LIMIT
        try:
            self._loop.run(self._client.connect(sock), self.greeting_timeout)
        except concurrent.futures.TimeoutError:
            self.close()
            raise VmError(
                f"QMP socket {self.path} is in use: QEMU sent no greeting within "
                f"{self.greeting_timeout:g} s. A QMP socket serves one client at a time and another "
                "client (libvirt, another tool) holds this one; give QEMU a second monitor for qsnap "
                "(-qmp unix:/run/vm-qsnap.qmp,server=on,wait=off)") from None
        except Exception as e:
            self.close()
            raise VmError(f"{self.path} does not speak QMP: {_describe(e)}") from None
        return self

    def close(self):
        if self._client is not None and self._loop is not None:
            try:
                self._loop.run(self._client.disconnect(), 5)
            except Exception:
                pass  # the peer may already be gone: nothing left to close cleanly
        self._client = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def cmd(self, name, arguments=None, *, timeout=None, **kw):
        """Run one command; its result, or VmError naming the command and QEMU's reason.

        Arguments with dashes go in ``arguments``: ``cmd("migrate-set-parameters", {"max-bandwidth": n})``.
        """
        args = dict(arguments or {}, **kw)
        return self._run(name, lambda client: client.execute(name, args or None), timeout)

    def cmd_chain(self, groups, *, timeout=None):
        """Run ``groups`` of commands, ``[[(name, arguments), ...], ...]``, without a round
        trip through this thread between them: the commands of a group are sent back to
        back, and the next group only once every command of this one succeeded.  QEMU
        runs a monitor's commands one after another, in the order sent (without the
        out-of-band capability it reads the next request only once it has answered this
        one: monitor/qmp.c), so a group still runs in order, only without waiting for us.

        A list with, for every command, its result, its VmError, or None when it was
        not sent (a command of an earlier group failed); VmError only for a lost session."""
        from qemu.qmp import ExecuteError
        flat = [(name, args) for group in groups for name, args in group]

        async def run_group(client, group):
            replies = await asyncio.gather(*(client.execute(name, args or None) for name, args in group),
                                           return_exceptions=True)
            return [VmError(f"QEMU refused {name}: {r}") if isinstance(r, ExecuteError) else r
                    for (name, _), r in zip(group, replies)]

        async def chain(client):
            out = []
            for group in groups:
                if any(isinstance(r, BaseException) for r in out):
                    out += [None] * len(group)
                    continue
                out += await run_group(client, group)
            return out

        out = self._run(" then ".join(name for name, _ in flat), chain, timeout)
        for r in out:
            if isinstance(r, BaseException) and not isinstance(r, VmError):
                raise VmError(f"QMP connection to {self.path} lost during {' then '.join(n for n, _ in flat)}: "
                              f"{_describe(r)}")
        return out

    def cmd_when_readable(self, fd, ready, name, wait):
        """Run ``name`` as soon as ``fd`` turns readable and ``ready()``, which reads it,
        says True: the wait is on this session's own thread, so the command goes out
        from the thread that wakes, where a ``cmd`` after waiting in the caller's thread
        would first wake that one and then hand over to this one (each hop up to ms on a
        busy host, while a paused guest waits for the command).  True once it ran; False
        when ``wait`` s passed or ready() said False, and it was not sent."""
        async def call(client):
            loop = asyncio.get_running_loop()
            woke = loop.create_future()
            loop.add_reader(fd, lambda: woke.done() or woke.set_result(None))
            try:
                await asyncio.wait_for(woke, wait)
            except asyncio.TimeoutError:
                return False
            finally:
                loop.remove_reader(fd)
            if not ready():
                return False
            await client.execute(name)
            return True

        return self._run(name, call, wait + self.timeout)

    def pass_fd(self, fdname, fd, *, timeout=None):
        """Give QEMU a copy of ``fd`` under ``fdname`` (``getfd``): the descriptor travels as
        SCM_RIGHTS ancillary data just before the command, which picks it up
        (qmp_getfd, monitor/fds.c).  QEMU's copy stays until a command takes it
        (``migrate fd:NAME``) or ``closefd`` closes it."""
        async def getfd(client):
            client.send_fd_scm(fd)  # on the loop's thread: the socket's writer lives there
            return await client.execute("getfd", {"fdname": fdname})

        return self._run("getfd", getfd, timeout)

    def _run(self, name, call, timeout):
        """Run ``call(client)`` (a coroutine) on the loop: its result, or VmError."""
        from qemu.qmp import ExecuteError
        if self._client is None:
            raise VmError(f"QMP session to {self.path} is closed")
        client = self._client

        async def run():
            return await call(client)

        try:
            return self._loop.run(run(), timeout or self.timeout)
        except ExecuteError as e:
            raise VmError(f"QEMU refused {name}: {e}") from None
        except concurrent.futures.TimeoutError:
            raise VmError(f"QEMU did not answer {name} within {timeout or self.timeout:g} s "
                          f"(QMP socket {self.path})") from None
        except Exception as e:
            raise VmError(f"QMP connection to {self.path} lost during {name}: {_describe(e)}") from None

    def events(self, name=None):
        """Events received so far (all, or those called ``name``), oldest first; kept for later calls."""
        async def drain():
            return self._client.events.clear()

        if self._client is not None:
            self._events.extend(self._loop.run(drain(), 5))
        return [e for e in self._events if name is None or e["event"] == name]

    def wait_events(self, timeout):
        """Block until QEMU sends an event, or ``timeout`` s pass, without polling;
        events() then returns it with the rest."""
        async def next_event():
            try:
                self._events.append(await asyncio.wait_for(self._client.events.get(), timeout))
            except asyncio.TimeoutError:
                pass

        if self._client is not None:
            self._loop.run(next_event(), timeout + 5)

    def wait_event(self, name, timeout, since=0, poll=0.01):
        """The first event ``name`` after the first ``since`` received; VmError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.events(name)
            if len(got) > since:
                return got[since]
            if time.monotonic() > deadline:
                raise VmError(f"QEMU sent no {name} event within {timeout:g} s")
            time.sleep(poll)


def _describe(e):
    """A one-line description of an exception from qemu.qmp (which wraps the real cause)."""
    inner = getattr(e, "exc", None) or e.__cause__ or e.__context__
    text = str(e) or type(e).__name__
    if inner is not None and str(inner) and str(inner) not in text:
        text += f": {inner}"
    return " ".join(text.split())  # one line: qemu.qmp's messages carry newlines
