"""AtomicOutput: an export file appears at its path whole, or not at all.

Data goes to a temporary file beside the target (same directory, so the
rename cannot cross filesystems); commit() fsyncs it, renames it over the
target and fsyncs the directory. Any failure before that removes the
temporary file and leaves an older file at the target as it was.
"""
import os

from qsnap.atomic import fsync_dir, io_error
from qsnap.errors import IOFailure


class AtomicOutput:
    """A sparse output file written with pwrite; use as a context manager.

    ``size(n)`` sets the file length (unwritten ranges stay holes), ``pwrite``
    writes at an offset, ``commit()`` makes the file appear at ``path``."""

    def __init__(self, path):
        self.path = os.fspath(path)
        d, name = os.path.split(os.path.abspath(self.path))
        self.dir = d
        self.tmp_path = None
        self.fd = -1
        self._committed = False
        if os.path.isdir(self.path):
            raise IOFailure(f"output {self.path} is a directory")
        for _ in range(100):
            cand = os.path.join(d, f".{name}.qsnap-{os.urandom(3).hex()}")
            try:
                self.fd = os.open(cand, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                continue
            except OSError as e:
                raise io_error(e, "creating a temporary file beside", self.path) from None
            self.tmp_path = cand
            return
        raise IOFailure(f"cannot create a temporary file beside {self.path}")

    def size(self, length):
        try:
            os.ftruncate(self.fd, length)
        except OSError as e:
            raise io_error(e, "sizing", self.tmp_path) from None

    def pwrite(self, buf, offset):
        view = memoryview(buf)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as e:
            raise io_error(e, "writing", self.tmp_path, offset + done) from None

    def commit(self):
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise io_error(e, "syncing", self.tmp_path) from None
        os.close(self.fd)
        self.fd = -1
        try:
            os.rename(self.tmp_path, self.path)
        except OSError as e:
            raise io_error(e, "renaming the output to", self.path) from None
        self._committed = True
        fsync_dir(self.dir)

    def abort(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self._committed and self.tmp_path is not None:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass
            self.tmp_path = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort()
        return False
