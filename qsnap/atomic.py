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
