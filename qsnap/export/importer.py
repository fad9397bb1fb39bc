"""Import a mapped-ram file QEMU wrote (``migrate "file:IN"`` with the
``mapped-ram`` capability, with or without multifd) as a qsnap image.

The stream reader follows mapped-ram block headers to their bitmaps and pages
when it reads a file (qsnap.stream.reader), and the save engine stores the
configuration without the mapped-ram capability, since ``qsnap load``
regenerates an ordinary precopy stream (qsnap.save); so an import is a save
whose input is the file instead of QEMU's pipe, with no return path.
"""
import os
import sys

from qsnap.errors import IOFailure
from qsnap.save import save


def import_mapped_ram(in_path, image, *, cache="auto", cluster_size=1 << 20, quiet=False,
                      log=sys.stderr):
    """Read the migration file ``in_path`` into the image ``image``; returns a summary dict."""
    try:
        fd = os.open(in_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise IOFailure(f"cannot open {in_path}: {e.strerror}") from None
    try:
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)  # a file: stream opens no return path
        try:
            summary = save(image, in_fd=fd, out_fd=null, cache=cache, cluster_size=cluster_size,
                           quiet=True)
        finally:
            os.close(null)
    finally:
        os.close(fd)
    if not quiet:
        log.write(f"qsnap: imported {in_path} to {image}: {summary.get('nonzero_pages', 0)} of "
                  f"{summary.get('pages', 0)} pages stored, {summary.get('file_bytes', 0) / 1e6:.1f} MB "
                  f"in {summary['seconds']:.2f} s\n")
        log.flush()
    return summary
