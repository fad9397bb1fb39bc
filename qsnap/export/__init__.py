"""Exports of a qsnap image to formats other tools read, and the import of
QEMU's mapped-ram files (docs/export.md).

    export(IMG, OUT, "elf")          ELF core as dump-guest-memory writes it (elf.py)
    export(IMG, OUT, "raw")          guest-physical memory, one sparse file (raw.py)
    export(IMG, OUT, "mapped-ram")   a file: stream QEMU >= 9.0 restores (mapped_ram.py)
    import_mapped_ram(IN, IMG)       QEMU's mapped-ram file -> qsnap image (importer.py)

Every output is written beside its target and renamed over it when complete
(output.py); pages are read in large runs and checked against their crc32c
(pages.py).
"""
import os
import sys
import time

from qsnap.errors import UsageError

FORMATS = ("elf", "raw", "mapped-ram")


def export(image, out_path, fmt, *, log=sys.stderr, quiet=False):
    """Write ``image`` as ``fmt`` to ``out_path``; returns a summary dict."""
    from qsnap.atomic import AtomicOutput
    from qsnap.export.pages import PageSource
    from qsnap.image.reader import Image

    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r} (one of: {', '.join(FORMATS)})")
    _refuse_same_file(image, out_path)
    t0 = time.monotonic()
    with Image.open(image) as img, PageSource(img) as pages, AtomicOutput(out_path) as out:
        size, missing = _WRITERS[fmt](img, pages, out, log)
        out.commit()
        stored = sum(b.nonzero_pages for b in img.blocks) * img.target_page_size
    summary = {"path": str(out_path), "format": fmt, "file_bytes": size, "data_bytes": stored,
               "seconds": time.monotonic() - t0, "notes_missing": missing}
    if not quiet:
        log.write(f"qsnap: exported {image} as {fmt} to {out_path}: {size / 1e6:.1f} MB "
                  f"({stored / 1e6:.1f} MB of data) in {summary['seconds']:.2f} s\n")
        log.flush()
    return summary


def _elf(img, pages, out, log):
    """The core, with CPU notes when the device state can be decoded, else a warning."""
    from qsnap.export.cpustate import NotesUnavailable, cpu_states
    from qsnap.export.elf import write_elf

    missing = None
    try:
        cpus = cpu_states(img.device_state, img.stream_info.get("footers", True))
    except NotesUnavailable as e:
        cpus, missing = [], str(e)
        _warn(log, f"{img.path}: the core has no CPU notes (NT_PRSTATUS, QEMU): {e}")
    return write_elf(img, pages, out, cpus), missing


def _raw(img, pages, out, log):
    from qsnap.export.raw import write_raw

    return write_raw(img, pages, out), None


def _mapped_ram(img, pages, out, log):
    from qsnap.export.mapped_ram import write_mapped_ram

    return write_mapped_ram(img, pages, out), None


_WRITERS = {"elf": _elf, "raw": _raw, "mapped-ram": _mapped_ram}


def _refuse_same_file(src, out_path):
    """Renaming the output over its own source would destroy the source."""
    try:
        same = os.path.samefile(src, out_path)
    except OSError:
        return  # one of them does not exist yet: nothing to destroy
    if same:
        raise UsageError(f"the output {out_path} is the input {src} itself")


def _warn(log, message):
    log.write(f"qsnap: warning: {message}\n")
    log.flush()


def import_mapped_ram(in_path, image, **kw):
    from qsnap.export.importer import import_mapped_ram as run

    _refuse_same_file(in_path, image)
    return run(in_path, image, **kw)
