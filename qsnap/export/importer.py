"""Import a mapped-ram file QEMU wrote (``migrate "file:IN"`` with the
``mapped-ram`` capability, with or without multifd) as a qsnap image.

The stream reader already follows mapped-ram block headers to their bitmaps
and pages (qsnap.stream.reader), and the save engine turns its events into an
image; this module runs the two on a file instead of a pipe and stores the
stream header without "mapped-ram" in its capabilities, because ``qsnap load``
regenerates an ordinary precopy stream, which a destination with mapped-ram
off must accept (savevm.c configuration_validate_capabilities).
"""
import os
import sys
import time

from qsnap.errors import IOFailure
from qsnap.export.mapped_ram import MAPPED_RAM_CAPABILITY, file_header
from qsnap.image.writer import ImageWriter
from qsnap.save import ReturnPath, _consume, _StreamFacts
from qsnap.stream.reader import StreamReader


def import_mapped_ram(in_path, image, *, cache="auto", cluster_size=1 << 20, quiet=False,
                      log=sys.stderr):
    """Read the migration file ``in_path`` into the image ``image``; returns a summary dict."""
    t0 = time.monotonic()
    try:
        fd = os.open(in_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise IOFailure(f"cannot open {in_path}: {e.strerror}") from None
    with os.fdopen(fd, "rb", buffering=0) as src:
        summary = _import(src, image, cache, cluster_size)
    summary["seconds"] = time.monotonic() - t0
    if not quiet:
        log.write(f"qsnap: imported {in_path} to {image}: {summary.get('nonzero_pages', 0)} pages "
                  f"stored, {summary.get('file_bytes', 0) / 1e6:.1f} MB in {summary['seconds']:.2f} s\n")
        log.flush()
    return summary


def _import(src, image, cache, cluster_size):
    facts = _StreamFacts()
    reader = StreamReader(src)
    rp = ReturnPath(-1)  # a file: stream never opens a return path
    with ImageWriter(image, cluster_size=cluster_size, cache=cache) as img:
        _consume(reader, img, facts, rp)
        info = facts.stream_info(reader)
        caps = [c for c in info["capabilities"] if c != MAPPED_RAM_CAPABILITY]
        header = facts.header
        if facts.configuration is not None and MAPPED_RAM_CAPABILITY in facts.configuration.capabilities:
            header = file_header(facts.header, caps)
        info["capabilities"] = caps
        return img.finish(
            header_bytes=header,
            pre_ram=bytes(facts.pre_ram),
            device_state=facts.device_state,
            stream_info=info,
            commands=facts.commands,
            machine=facts.configuration.machine if facts.configuration else None,
            counts={"stream_bytes": reader.offset},
        )
