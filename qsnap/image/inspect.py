"""`qsnap info` and `qsnap check`: describe and verify an image, for humans or JSON."""
import os
import sys

from qsnap.errors import ImageError, QsnapError
from qsnap.image.reader import Image, peek_header

# Exit statuses of `qsnap check`, as `qemu-img check` uses them.
CHECK_OK = 0
CHECK_NOT_CHECKED = 1
CHECK_CORRUPT = 2
CHECK_LEAKS = 3


def describe(path):
    """The `qsnap info` dictionary of a complete image, or the header facts of an incomplete one."""
    peek = peek_header(path)
    if not peek["qsnap"]:
        raise ImageError(f"{path}: {peek['error']}")
    if not peek["complete"]:
        return {"path": os.fspath(path), "format_version": peek["format_version"], "complete": False,
                "cluster_size": peek["cluster_size"], "file_bytes": peek["file_bytes"]}
    with Image.open(path) as img:
        info = img.info()
    pages = sum(b["length"] // info["page_size"] for b in info["ram_blocks"])
    stored = sum(b["nonzero_pages"] for b in info["ram_blocks"])
    info["density"] = {"pages": pages, "stored_pages": stored,
                       "stored_share": stored / pages if pages else 0.0}
    return info


def _mib(n):
    return f"{n / (1 << 20):.1f} MiB"


def format_info(info):
    lines = [f"image: {info['path']}", "file format: qcow2 (qsnap image)",
             f"format version: {info['format_version']}",
             f"complete: {'yes' if info['complete'] else 'no (the save did not finish)'}",
             f"cluster_size: {info['cluster_size']}",
             f"disk size: {_mib(info['file_bytes'])}"]
    if not info["complete"]:
        return "\n".join(lines)
    d = info["density"]
    lines += [
        f"virtual size: {_mib(info['virtual_size'])}",
        f"machine: {info['machine']}",
        f"created: {info['created']} by qsnap {info['qsnap_version']}",
        f"page size: {info['page_size']}",
        f"checksum: {info['checksum']} per stored page",
        f"device state: {info['device_state_bytes']} bytes",
        f"stored pages: {d['stored_pages']} of {d['pages']} ({100 * d['stored_share']:.1f} %)",
        "RAM blocks:",
        f"  {'idstr':<24} {'length':>12} {'page size':>10} {'offset':>14} {'stored pages':>13}",
    ]
    for b in info["ram_blocks"]:
        lines.append(f"  {b['idstr']:<24} {b['length']:>#12x} {b['page_size']:>10} "
                     f"{b['offset']:>#14x} {b['nonzero_pages']:>13}")
    return "\n".join(lines)


def check_image(path, progress=False):
    """Verify structure and every checksum; the report's exit_code is `qsnap check`'s status."""
    report = {"path": os.fspath(path), "problems": [], "exit_code": CHECK_OK}
    peek = peek_header(path)
    if not peek["qsnap"] or not peek["complete"]:
        why = peek["error"] or "incomplete image (the save did not finish)"
        report.update(exit_code=CHECK_NOT_CHECKED, problems=[why], checked=False)
        return report
    report["checked"] = True
    try:
        with Image.open(path) as img:
            show = _progress_bar if progress else None
            problems = img.verify_all(progress=show)
            if show:
                sys.stderr.write("\n")
            report["stored_pages"] = sum(b.nonzero_pages for b in img.blocks)
    except QsnapError as e:
        problems = [str(e)]
    if problems:
        report.update(exit_code=CHECK_CORRUPT, problems=problems)
    return report


def format_check(report):
    if report["exit_code"] == CHECK_OK:
        return (f"No errors were found on the image: {report['stored_pages']} stored pages, "
                "structure and checksums verified.")
    head = ("The image could not be checked:" if report["exit_code"] == CHECK_NOT_CHECKED
            else f"{len(report['problems'])} errors were found on the image:")
    return "\n".join([head] + [f"  {p}" for p in report["problems"][:100]])


def _progress_bar(done, total):
    width = 40
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} clusters")
    sys.stderr.flush()
