"""qsnap.vm.qmp against a small QMP server speaking the protocol's greeting and replies."""
import json
import os
import socket
import threading

import pytest

pytest.importorskip("qemu.qmp")

from qsnap.vm.qmp import Qmp  # noqa: E402


class MiniQmp:
    """A QMP server on a unix socket: the greeting, then ``{"return": {}}`` to every
    command; the names of the commands it ran, in order, in ``ran``."""

    def __init__(self, path):
        self.ran = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, '
                         b'"package": ""}, "capabilities": []}}\r\n')
            for msg in self._messages(conn):
                self.ran.append(msg["execute"])
                conn.sendall(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\r\n")

    @staticmethod
    def _messages(conn):
        """The JSON objects the client sends (not one a line: QMP needs no separator)."""
        decoder, text = json.JSONDecoder(), ""
        while chunk := conn.recv(65536):
            text += chunk.decode()
            while text.strip():
                try:
                    msg, end = decoder.raw_decode(text.lstrip())
                except ValueError:
                    break  # the rest of it is still on its way
                text = text.lstrip()[end:]
                yield msg

    def close(self):
        self.listener.close()


@pytest.fixture
def session(tmp_path):
    server = MiniQmp(tmp_path / "qmp.sock")
    q = Qmp(tmp_path / "qmp.sock").connect()
    yield q, server
    q.close()
    server.close()


def test_cmd_when_readable_runs_once_the_byte_says_so(session):
    q, server = session
    r, w = os.pipe()
    try:
        threading.Timer(0.05, os.write, (w, b"p")).start()
        assert q.cmd_when_readable(r, lambda: os.read(r, 1) == b"p", "cont", 5.0) is True
        assert server.ran[-1] == "cont"
    finally:
        os.close(r)
        os.close(w)


def test_cmd_when_readable_sends_nothing_on_timeout_or_another_byte(session):
    q, server = session
    r, w = os.pipe()
    try:
        assert q.cmd_when_readable(r, lambda: True, "cont", 0.05) is False
        os.write(w, b"x")
        assert q.cmd_when_readable(r, lambda: os.read(r, 1) == b"p", "cont", 5.0) is False
        q.cmd("query-status")  # the session still works, and no cont went before it
        assert "cont" not in server.ran and server.ran[-1] == "query-status"
    finally:
        os.close(r)
        os.close(w)
