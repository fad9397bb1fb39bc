"""Files that appear whole or not at all, and how OS errors about them read.

Every output qsnap writes (images, exports, reports, VM records) is written
beside its target and renamed over it, so a reader sees the old file or the
complete new one, never a part.
"""
import json
import os

from qsnap.errors import IOFailure


def io_error(e, what, path, offset=None):
    """IOFailure for OSError ``e``: '<errno text> <what> <path>[ at offset 0x..]'."""
    text = os.strerror(e.errno) if e.errno else str(e)
    text = text[:1].lower() + text[1:]
    where = f" at offset 0x{offset:x}" if offset is not None else ""
    return IOFailure(f"{text} {what} {path}{where}")


def pwrite_all(fd, buf, offset, path):
    """Write all of ``buf`` at ``offset`` of ``fd`` (the file ``path``, for the error)."""
    view = memoryview(buf)
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as e:
        raise io_error(e, "writing", path, offset + done) from None


def datasync(fd, path):
    """fdatasync ``fd`` (the file ``path``, for the error)."""
    try:
        os.fdatasync(fd)
    except OSError as e:
        raise io_error(e, "syncing", path) from None


def fsync_dir(directory):
    """Make a rename in ``directory`` durable (best effort: not every filesystem can)."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def publish(tmp_path, path, directory, what):
    """Rename the complete, synced ``tmp_path`` over ``path`` and make the rename durable:
    the last step of every crash-safe output.  ``what`` names the output in the error."""
    try:
        os.rename(tmp_path, path)
    except OSError as e:
        raise io_error(e, f"renaming {what} to", path) from None
    fsync_dir(directory)


def write_json(path, doc, **dump_kw):
    """Write ``doc`` as JSON to ``path`` through a temporary file and a rename.

    Raises OSError; the temporary file is gone either way."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, **dump_kw)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # never created
        raise


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
        pwrite_all(self.fd, buf, offset, self.tmp_path)

    def sync(self):
        """fdatasync: what is written so far is durable (before a header that says so)."""
        datasync(self.fd, self.tmp_path)

    def commit(self):
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise io_error(e, "syncing", self.tmp_path) from None
        os.close(self.fd)
        self.fd = -1
        publish(self.tmp_path, self.path, self.dir, "the output")
        self._committed = True

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
