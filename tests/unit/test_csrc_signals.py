"""Signals reach Python while C waits (csrc/intr.h): a blocked `qsnap load`
ends on SIGTERM/SIGINT with one error line, a handler that returns lets the
write go on, and an engine check ends a write that waits for a reader."""
import fcntl
import os
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest

from qsnap import _core
from qsnap.errors import IOFailure
from qsnap.save import save
from qsnap.stream.synth import synth_stream

F_GETPIPE_SZ = 1032
MiB = 1 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """An image whose stream is several times the largest pipe."""
    d = tmp_path_factory.mktemp("sig")
    sp = d / "vm.stream"
    with open(sp, "wb") as f:
        synth_stream(f, blocks=(("pc.ram", 16 * MiB),), seed=5, zero_share=0.1)
    ip = d / "vm.qsnap"
    with open(sp, "rb") as f:
        save(str(ip), in_fd=f.fileno(), out_fd=-1, quiet=True)
    return ip


def _wait_pipe_full(r, proc):
    """Return once the writer has filled the pipe (it then waits in C for a reader)."""
    size = fcntl.fcntl(r, F_GETPIPE_SZ)
    buf = bytearray(4)
    while True:
        fcntl.ioctl(r, termios.FIONREAD, buf)
        if int.from_bytes(buf, "little") >= size:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)    # no event says "pipe full"; the writer fills it within a second


@pytest.mark.parametrize("sig,code,message", [
    (signal.SIGTERM, 128 + signal.SIGTERM, "qsnap: error: terminated by signal SIGTERM\n"),
    (signal.SIGINT, 130, "qsnap: error: interrupted\n"),
])
def test_load_blocked_on_a_full_pipe_ends_on_signal(image, sig, code, message):
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "qsnap", "load", str(image)], stdout=w,
                                stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
        os.close(w)
        w = -1
        _wait_pipe_full(r, proc)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"qsnap load did not end on {sig.name} while blocked writing")
        err = proc.stderr.read()
        proc.stderr.close()
        assert proc.returncode == code, err
        assert err == message
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _drain_later(r, start, got):
    start.wait()
    while True:
        b = os.read(r, 65536)
        if not b:
            return
        got.extend(b)


def test_signal_whose_handler_returns_does_not_cut_the_stream():
    data = os.urandom(4 * MiB)
    r, w = os.pipe()
    got = bytearray()
    start = threading.Event()
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: (seen.append(s), start.set()))
    reader = threading.Thread(target=_drain_later, args=(r, start, got))
    reader.start()
    main = threading.get_ident()
    # the pipe is full long before 4 MiB: the emitter waits in C when the signal comes
    kicker = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGUSR1))
    kicker.start()
    try:
        em = _core.PageEmitter(w, 4096)
        em.bytes(data)
        em.flush()
        assert em.bytes_out == len(data)
    finally:
        start.set()
        kicker.cancel()
        os.close(w)
        reader.join()
        os.close(r)
        signal.signal(signal.SIGUSR1, old)
    assert seen == [signal.SIGUSR1]
    assert got == data


def test_interrupt_check_ends_a_write_waiting_for_the_reader():
    r, w = os.pipe()
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise IOFailure("the reader went away")

    try:
        em = _core.PageEmitter(w, 4096)
        assert not os.get_blocking(w)          # a pipe: non-blocking while the emitter lives
        em.interrupt_check = check
        with pytest.raises(IOFailure, match="^the reader went away$"):
            em.bytes(b"x" * (4 * MiB))     # written at once: larger than the arena
            em.flush()
        assert len(calls) == 2
        del em
        assert os.get_blocking(w)              # the fd's flags are given back
    finally:
        os.close(r)
        os.close(w)


def test_postcopy_writer_waiting_for_a_reader_sees_qemu_go_away(image):
    """QEMU gone (return path closed) while the stream's reader, still there,
    reads nothing: the postcopy writer ends with the return path's error."""
    from qsnap.postcopy import load_postcopy

    rp_r, rp_w = os.pipe()
    out_r, out_w = os.pipe()
    result = []

    def run():
        try:
            load_postcopy(str(image), percent=100, in_fd=rp_r, out_fd=out_w, quiet=True)
        except BaseException as e:   # noqa: B036 - handed to the test thread
            result.append(e)
        else:
            result.append(None)

    # the pipe's size before the engine sets its own (which it grows, then shrinks
    # to POSTCOPY_PIPE_SIZE): read once it could be the passing larger size, which
    # the pipe then never holds
    size = fcntl.fcntl(out_r, F_GETPIPE_SZ)
    t = threading.Thread(target=run)
    t.start()
    try:
        buf = bytearray(4)
        while True:
            fcntl.ioctl(out_r, termios.FIONREAD, buf)
            if int.from_bytes(buf, "little") >= size or not t.is_alive():
                break
            time.sleep(0.01)   # no event says "pipe full"
        os.close(rp_w)         # QEMU goes away; the reader of the stream stays
        rp_w = -1
        t.join(20)
        assert not t.is_alive(), "the postcopy writer did not notice the closed return path"
    finally:
        if rp_w >= 0:
            os.close(rp_w)
        if t.is_alive():
            os.close(out_r)    # unblock it in any case
            out_r = -1
            t.join()
        for fd in (rp_r, out_w, out_r):
            if fd >= 0:
                os.close(fd)
    assert isinstance(result[0], IOFailure), result
    assert str(result[0]) == "QEMU closed the return path before the migration completed"
