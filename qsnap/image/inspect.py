"""`qsnap info` and `qsnap check`: describe and verify an image, for humans or JSON.

`check` walks the qcow2 structure itself, collecting every problem instead of
stopping at the first: header fields, L1/L2 entries (inside the file, cluster
aligned), refcounts recomputed from the header, L1/L2 tables, refcount
structures and data clusters and compared with the refcount table and blocks
(a cluster used twice is corruption, a refcount above its references a leak,
as in QEMU's qcow2_check_refcounts), then opens the image with the strict
reader and verifies every checksum with large cluster-aligned reads.
"""
import os
import sys

import numpy as np

from qsnap.errors import ImageError, IOFailure, StreamError
from qsnap.image import layout, qcow2
from qsnap.image.qcow2 import L1E_OFFSET_MASK, L2E_OFFSET_MASK, REFT_OFFSET_MASK, REFCOUNT_ORDER
from qsnap.image.reader import Image, peek_header, pread_exact, read_header
from qsnap.stream.tail import parse_tail

# Exit statuses of `qsnap check`, as `qemu-img check` uses them.
CHECK_OK = 0
CHECK_NOT_CHECKED = 1
CHECK_CORRUPT = 2
CHECK_LEAKS = 3

MAX_LISTED = 100          # problems listed in a report


# --- info -------------------------------------------------------------------------

def device_sections(device_state, footers):
    """[{name, instance, version}] from the VMDESCRIPTION at the end of the saved
    device state, or None when there is none or the tail does not parse."""
    try:
        _, desc = parse_tail(bytes(device_state), 0, footers)
    except StreamError:
        return None
    devices = desc.get("devices") if desc is not None else None
    if not isinstance(devices, list):
        return None
    out = []
    for d in devices:
        if isinstance(d, dict):
            out.append({"name": d.get("name"), "instance": d.get("instance_id"),
                        "version": d.get("version")})
    return out


def describe(path):
    """The `qsnap info` dictionary of a complete image, or the header facts of an incomplete one."""
    peek = peek_header(path)
    if not peek["qsnap"]:
        raise ImageError(f"{path}: {peek['error']}")
    if not peek["complete"]:
        return {"path": os.fspath(path), "format_version": peek["format_version"], "complete": False,
                "page_size": None, "cluster_size": peek["cluster_size"], "machine": None,
                "device_state_bytes": None, "file_bytes": peek["file_bytes"], "ram_blocks": [],
                "device_sections": None, "vm": None}
    with Image.open(path) as img:
        info = img.info()
        info["device_sections"] = device_sections(img.device_state,
                                                   bool(img.stream_info.get("footers", True)))
    tps = info["page_size"]
    pages = sum((b["length"] + tps - 1) // tps for b in info["ram_blocks"])
    stored = sum(b["nonzero_pages"] for b in info["ram_blocks"])
    info["density"] = {"pages": pages, "stored_pages": stored,
                       "stored_share": stored / pages if pages else 0.0}
    return info


def _size(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    return f"{n} B"


def _ws_line(info):
    ws = info.get("working_set")
    if info.get("working_set_problem"):
        return f"damaged, ignored ({info['working_set_problem']})"
    if ws is None:
        return "none"
    return (f"{ws['pages']} pages, recorded {ws['recorded']} (first {ws['first_recorded']}), "
            f"{ws['restores']} restore{'s' if ws['restores'] != 1 else ''} merged")


def format_info(info):
    lines = [f"image: {info['path']}", "file format: qcow2 (qsnap image)",
             f"format version: {info['format_version']}",
             f"complete: {'yes' if info['complete'] else 'no (the save did not finish)'}",
             f"cluster_size: {info['cluster_size']}",
             f"disk size: {_size(info['file_bytes'])}"]
    if not info["complete"]:
        return "\n".join(lines)
    d = info["density"]
    lines += [
        f"virtual size: {_size(info['virtual_size'])} ({info['virtual_size']} bytes)",
        f"machine: {info['machine']}",
        f"created: {info['created']} by qsnap {info['qsnap_version']}",
        f"page size: {info['page_size']}",
        f"checksum: {info['checksum']} per stored page",
        f"density: {d['stored_pages']} of {d['pages']} pages stored ({100 * d['stored_share']:.1f} %)",
        f"device state: {info['device_state_bytes']} bytes",
        f"working set: {_ws_line(info)}",
        f"image id: {info.get('image_id') or 'none (format 1)'}",
    ]
    lines += _chain_lines(info.get("chain") or [])
    lines += [
        "RAM blocks:",
        f"    {'idstr':<24} {'length':>12} {'page size':>10} {'offset':>14} {'stored pages':>13}",
    ]
    for b in info["ram_blocks"]:
        lines.append(f"    {b['idstr']:<24} {b['length']:>#12x} {b['page_size']:>10} "
                     f"{b['offset']:>#14x} {b['nonzero_pages']:>13}")
    secs = info.get("device_sections")
    if secs is None:
        lines.append("device sections: (no VMDESCRIPTION in the stream)")
    else:
        lines.append(f"device sections: {len(secs)}")
        lines.append(f"    {'name':<32} {'instance':>8} {'version':>8}")
        for s in secs:
            lines.append(f"    {str(s['name']):<32} {str(s['instance']):>8} {str(s['version']):>8}")
    if info.get("vm"):
        lines += _format_vm(info["vm"])
    return "\n".join(lines)


def _chain_lines(chain):
    """The backing chain, the image first, each file with its own size."""
    if len(chain) <= 1:
        return ["backing file: none (a stand-alone image)"]
    lines = [f"backing chain: {len(chain)} images, {_size(sum(c['file_bytes'] for c in chain))} in all"]
    for depth, c in enumerate(chain):
        lines.append(f"    {depth}: {c['path']} ({_size(c['file_bytes'])}, created {c['created']}, "
                     f"image id {c['image_id'] or 'none'})")
    return lines


def _format_vm(vm):
    """The VM record of a `qsnap snapshot` image, for humans."""
    downtime = "unknown" if vm["downtime_ms"] is None else f"{vm['downtime_ms']:.1f} ms"
    lines = ["VM:",
             f"    QEMU: {vm['qemu_version'] or 'unknown'} ({vm['qemu_package'] or 'no package'})",
             f"    machine: {vm['machine'] or 'unknown'}",
             f"    snapshot mode: {vm['mode']}, {'running' if vm['was_running'] else 'paused'} "
             f"before, downtime {downtime}",
             f"    command line: {' '.join(vm['cmdline']) if vm['cmdline'] else 'unknown'}"]
    if vm["ram_only"]:
        lines.append("    disks: none (RAM only)")
    for d in vm["disks"]:
        name = d["device"] or d["qdev"] or d["node_name"]
        lines.append(f"    disk {name}: {d['frozen']} ({d['format']}, {_size(d['virtual_size'])})")
    return lines


# --- check ------------------------------------------------------------------------

class _Walk:
    """Structure walk of one image: problems (corruption), leaks, reference counts."""

    def __init__(self, fd, path, size, hdr, ext_end, format_version):
        self.fd, self.path, self.size, self.hdr = fd, path, size, hdr
        self.ext_end = ext_end  # end of the header extensions (after the end marker)
        self.format_version = format_version
        self.cb = hdr["cluster_bits"]
        self.cs = 1 << self.cb
        self.n = (size + self.cs - 1) // self.cs     # host clusters in the file
        self.refs = np.zeros(self.n, dtype=np.uint32)
        self.errors = []
        self.leaks = []
        self.data_clusters = 0
        self.n_beyond = 0   # non-zero refcounts of clusters past the end of the file

    def error(self, msg):
        self.errors.append(msg)

    def ref(self, what, off, nbytes, at):
        """Count a reference to the clusters of [off, off+nbytes); False if it is bad."""
        cs = self.cs
        if off % cs or off == 0 and what != "header":
            self.error(f"{what} offset 0x{off:x} (at image offset 0x{at:x}) is not cluster aligned "
                       f"or is 0")
            return False
        end = off + max(nbytes, 1)
        if end > self.n * cs:
            self.error(f"{what} at 0x{off:x}+0x{nbytes:x} (at image offset 0x{at:x}) lies outside "
                       f"the file (0x{self.size:x} bytes)")
            return False
        self.refs[off // cs:(end + cs - 1) // cs] += 1
        return True

    def run(self):
        hdr, cs, fd, path = self.hdr, self.cs, self.fd, self.path
        if self.size % cs:
            self.error(f"file length 0x{self.size:x} is not a multiple of the cluster size {cs}")
        self.ref("header", 0, cs, 0)
        for name, at in (("compatible_features", 0x50), ("autoclear_features", 0x58)):
            if hdr[name]:
                self.error(f"{name} 0x{hdr[name]:x} at image offset 0x{at:x} (qsnap writes 0)")
        if hdr["header_length"] != qcow2.HEADER_LENGTH_V3:
            self.error(f"header_length {hdr['header_length']} at image offset 0x64 (qsnap writes 104)")
        self._zero_tail("header cluster", self.ext_end - 8, self.ext_end)  # the end marker
        # padding after it (or after the backing file name, format 2)
        self._zero_tail("header cluster", self.ext_end + hdr["backing_file_size"], cs)
        vsize = hdr["size"]
        if vsize % cs:
            self.error(f"virtual size 0x{vsize:x} at image offset 0x18 is not cluster aligned")
        l1_size, l1_off = hdr["l1_size"], hdr["l1_table_offset"]
        l2_entries = cs // 8
        n_virt = vsize // cs
        if l1_size != qcow2.l1_size_for(vsize, self.cb):
            self.error(f"L1 size {l1_size} at image offset 0x24 does not match virtual size 0x{vsize:x}")
        elif self.ref("L1 table", l1_off, l1_size * 8, 0x28):
            l1 = np.frombuffer(pread_exact(fd, l1_size * 8, l1_off, path), ">u8").astype(np.uint64)
            self._zero_tail("L1 table", l1_off + l1_size * 8, qcow2.align_up(l1_off + l1_size * 8, cs))
            for i in np.flatnonzero(l1).tolist():
                e, at = int(l1[i]), l1_off + 8 * i
                if e & qcow2.L1E_RESERVED_MASK:
                    self.error(f"L1 entry 0x{e:016x} has reserved bits set at image offset 0x{at:x}")
                    continue
                l2_off = e & L1E_OFFSET_MASK
                if not e & qcow2.QCOW_OFLAG_COPIED:
                    self.error(f"L1 entry 0x{e:016x} at image offset 0x{at:x} lacks OFLAG_COPIED "
                               "(its refcount is 1)")
                if not self.ref("L2 table", l2_off, cs, at):
                    continue
                self._l2(l2_off, i * l2_entries, n_virt)
        rt_off, rt_clusters = hdr["refcount_table_offset"], hdr["refcount_table_clusters"]
        if not self.ref("refcount table", rt_off, rt_clusters * cs, 0x30):
            return
        rt = np.frombuffer(pread_exact(fd, rt_clusters * cs, rt_off, path), ">u8").astype(np.uint64)
        per_block = cs * 8 // (1 << REFCOUNT_ORDER)
        stored = np.zeros(self.n, dtype=np.uint32)
        for i in np.flatnonzero(rt).tolist():
            e, at = int(rt[i]), rt_off + 8 * i
            if e & ~REFT_OFFSET_MASK:
                self.error(f"refcount table entry 0x{e:016x} has reserved bits set at image offset 0x{at:x}")
                continue
            rb_off = e & REFT_OFFSET_MASK
            if not self.ref("refcount block", rb_off, cs, at):
                continue
            counts = np.frombuffer(pread_exact(fd, cs, rb_off, path), ">u2").astype(np.uint32)
            first = i * per_block
            if first >= self.n:
                beyond = np.flatnonzero(counts)
            else:
                k = min(per_block, self.n - first)
                stored[first:first + k] = counts[:k]
                beyond = np.flatnonzero(counts[k:]) + k
            self.n_beyond += len(beyond)
            for j in beyond[:MAX_LISTED].tolist():
                self.leaks.append(f"leaked cluster {first + j} (past the end of the file) "
                                  f"refcount={int(counts[j])} reference=0")
        self._compare(stored)

    def _zero_tail(self, what, start, end):
        """Unused bytes [start, end) of a qsnap-written cluster must be zero."""
        if start >= end or end > self.size:
            return
        buf = pread_exact(self.fd, end - start, start, self.path)
        nz = np.flatnonzero(np.frombuffer(buf, np.uint8))
        if len(nz):
            self.error(f"non-zero byte in the unused part of the {what} at image offset "
                       f"0x{start + int(nz[0]):x}")

    def _l2(self, l2_off, first_virt, n_virt):
        cs = self.cs
        l2 = np.frombuffer(pread_exact(self.fd, cs, l2_off, self.path), ">u8").astype(np.uint64)
        for j in np.flatnonzero(l2).tolist():
            e, at = int(l2[j]), l2_off + 8 * j
            if e & qcow2.QCOW_OFLAG_COMPRESSED:
                self.error(f"compressed L2 entry 0x{e:016x} at image offset 0x{at:x}")
                continue
            if e == qcow2.QCOW_OFLAG_ZERO and self.format_version >= 2:
                continue   # reads as zeros, whatever a backing file holds: no cluster
            if e & (qcow2.L2E_STD_RESERVED_MASK | qcow2.QCOW_OFLAG_ZERO):
                self.error(f"L2 entry 0x{e:016x} has reserved or zero-flag bits at image offset 0x{at:x}")
                continue
            if not e & qcow2.QCOW_OFLAG_COPIED:
                self.error(f"L2 entry 0x{e:016x} at image offset 0x{at:x} lacks OFLAG_COPIED "
                           "(its refcount is 1)")
            if first_virt + j >= n_virt:
                self.error(f"L2 entry at image offset 0x{at:x} maps virtual offset "
                           f"0x{(first_virt + j) * cs:x}, past the virtual size")
                continue
            if self.ref("data cluster", e & L2E_OFFSET_MASK, cs, at):
                self.data_clusters += 1

    def _compare(self, stored):
        refs = self.refs
        for c in np.flatnonzero(refs > 1)[:MAX_LISTED].tolist():
            self.error(f"cluster 0x{c * self.cs:x} is used {int(refs[c])} times (overlapping "
                       "structures or data)")
        low = np.flatnonzero(stored < refs)
        for c in low[:MAX_LISTED].tolist():
            self.error(f"refcount of cluster 0x{c * self.cs:x} is {int(stored[c])}, "
                       f"but it is referenced {int(refs[c])} times")
        high = np.flatnonzero(stored > refs)
        for c in high[:MAX_LISTED].tolist():
            self.leaks.append(f"leaked cluster 0x{c * self.cs:x} refcount={int(stored[c])} "
                              f"reference={int(refs[c])}")
        self.n_leaks = len(high) + self.n_beyond


def _foreign(fd, path, size):
    """Why the file is not a qsnap image at all (wrong magic, no qsnap extension), or None."""
    head = pread_exact(fd, min(size, 4096), 0, path) if size else b""
    if len(head) < qcow2.HEADER.size:
        return f"not a qsnap image: {path} is too short for a qcow2 header ({size} bytes)"
    hdr = qcow2.HEADER.unpack(head)
    if hdr["magic"] != qcow2.QCOW_MAGIC:
        return f"not a qsnap image: bad qcow2 magic 0x{hdr['magic']:08x} at image offset 0x0"
    if layout.QSNAP_EXT_TYPE.to_bytes(4, "big") not in head[qcow2.HEADER.size:]:
        return f"not a qsnap image: {path} is a qcow2 file without the qsnap header extension"
    return None


def _extensions_end(fd, path, size, hdr):
    """The image offset just after the header extensions' end marker."""
    cs = 1 << hdr["cluster_bits"]
    head = pread_exact(fd, min(size, cs), 0, path)
    exts = qcow2.unpack_extensions(head, hdr["header_length"], len(head))
    if not exts:
        return hdr["header_length"] + qcow2.EXT_HEADER.size
    _, payload, at = exts[-1]
    return at + qcow2.EXT_HEADER.size + qcow2.align_up(len(payload), 8) + qcow2.EXT_HEADER.size


def check_image(path, progress=False):
    """Verify structure, refcounts and every checksum of the image and of every
    parent in its backing chain (each parent's pages against its own checksums);
    the report's exit_code is `qsnap check`'s status (0 clean, 1 not checked,
    2 corrupt, 3 leaks only)."""
    report = _check_one(os.fspath(path), progress)
    report["parents_checked"] = len(report.get("parents", []))
    for parent in report.pop("parents", []):
        sub = _check_one(parent, False)
        sub.pop("parents", None)
        if sub["exit_code"] == CHECK_NOT_CHECKED:
            sub["corruptions"] = max(1, sub["corruptions"])
        report["corruptions"] += sub["corruptions"]
        report["leaks"] += sub["leaks"]
        report["checksum_errors"] += sub["checksum_errors"]
        report["problems"] = (report["problems"]
                              + [f"parent image {parent}: {p}" for p in sub["problems"]])[:MAX_LISTED]
        report["exit_code"] = max(report["exit_code"], sub["exit_code"], key=_severity)
    return report


def _severity(code):
    return {CHECK_OK: 0, CHECK_LEAKS: 1, CHECK_NOT_CHECKED: 2, CHECK_CORRUPT: 3}[code]


def _check_one(path, progress):
    """check_image of one file; report["parents"]: the paths of its parents."""
    report = {"path": path, "checked": False, "exit_code": CHECK_OK, "problems": [],
              "corruptions": 0, "leaks": 0, "leaked_clusters": [], "checksum_errors": 0}
    errors, leaks = [], []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise IOFailure(f"{os.strerror(e.errno).lower()} opening {path}") from None
    try:
        size = os.fstat(fd).st_size
        foreign = _foreign(fd, path, size)
        if foreign:
            report.update(exit_code=CHECK_NOT_CHECKED, problems=[foreign])
            return report
        try:
            hdr, ext, ext_off = read_header(fd, path, size)
        except ImageError as e:  # a qsnap image whose header is damaged
            report.update(checked=True, exit_code=CHECK_CORRUPT, problems=[str(e)], corruptions=1)
            return report
        if not ext["flags"] & layout.QSNAP_FLAG_COMPLETE:
            report.update(exit_code=CHECK_NOT_CHECKED,
                          problems=["incomplete image (the save did not finish)"])
            return report
        report["checked"] = True
        ext_end = _extensions_end(fd, path, size, hdr)
        w = _Walk(fd, path, size, hdr, ext_end, ext["format_version"])
        try:
            w.run()
        except ImageError as e:  # e.g. a table that is cut short
            w.error(str(e))
        errors += w.errors
        leaks += w.leaks
        report["leaks"] = getattr(w, "n_leaks", len(w.leaks))
        report["leaked_clusters"] = w.leaks[:MAX_LISTED]
        report["allocated_clusters"] = w.data_clusters
        report["image_end_offset"] = size
    except ImageError as e:
        errors.append(str(e))
    finally:
        os.close(fd)
    try:
        with Image.open(path) as img:
            report["parents"] = [im.path for im in img.chain[1:]]
            report["virtual_clusters"] = img.virtual_size // img.cluster_size
            show = _progress_bar if progress else None
            bad = img.verify_all(progress=show)
            if show:
                sys.stderr.write("\n")
            end = img.meta_offset + img.meta_length
            tail = qcow2.align_up(end, img.cluster_size) - end
            h = img.host_offset(end - 1) + 1
            if tail and h > 1 and any(pread_exact(img.fd, tail, h, path)):
                bad.append(f"non-zero bytes after the metadata region at image offset 0x{h:x}")
            if img.working_set_problem:
                bad.append(f"working set: {img.working_set_problem}")
            report["checksum_errors"] = len(bad)
            errors += bad
            report["stored_pages"] = sum(b.nonzero_pages for b in img.blocks)
    except ImageError as e:
        if str(e) not in errors:
            errors.append(str(e))
    report["corruptions"] = len(errors)
    report["problems"] = (errors + leaks)[:MAX_LISTED]
    if errors:
        report["exit_code"] = CHECK_CORRUPT
    elif report["leaks"]:
        report["exit_code"] = CHECK_LEAKS
    return report


def format_check(report):
    """`qemu-img check`-like text."""
    code = report["exit_code"]
    if code == CHECK_NOT_CHECKED:
        return "\n".join(["The image could not be checked:"] + [f"  {p}" for p in report["problems"]])
    lines = []
    shown = report["problems"]
    for p in shown:
        lines.append(p[:1].upper() + p[1:] if p.startswith("leaked") else "ERROR " + p)
    if report["corruptions"]:
        lines += ["", f"{report['corruptions']} errors were found on the image.",
                  "Data may be corrupted, or a load from this image would be refused."]
    if report["leaks"]:
        lines += ["", f"{report['leaks']} leaked clusters were found on the image.",
                  "This means waste of disk space, but no harm to data."]
    if code == CHECK_OK:
        lines.append("No errors were found on the image.")
        if "stored_pages" in report:
            lines.append(f"{report['stored_pages']} stored pages verified against their crc32c checksums.")
        if report.get("parents_checked"):
            lines.append(f"{report['parents_checked']} parent image(s) of the backing chain checked too.")
    if "allocated_clusters" in report and report.get("virtual_clusters"):
        a, v = report["allocated_clusters"], report["virtual_clusters"]
        lines.append(f"{a}/{v} = {100 * a / v:.2f}% allocated")
    if "image_end_offset" in report:
        lines.append(f"Image end offset: {report['image_end_offset']}")
    return "\n".join(lines).lstrip("\n")


def _progress_bar(done, total):
    width = 40
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r    ({100 * done / max(total, 1):6.2f}/100%) [{'#' * filled}{'.' * (width - filled)}] "
                     f"{done}/{total} clusters")
    sys.stderr.flush()
