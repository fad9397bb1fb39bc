"""Disks of a VM: fingerprints of frozen images, finding a recorded disk on a QEMU,
fresh overlays on top of frozen images.

A frozen image is the disk layer a snapshot left behind (the guest's disk at the
snapshot instant).  It must never be written again, so a restored VM always runs
on a fresh qcow2 overlay whose backing file is the frozen image; the same
snapshot can then be restored again and again, and as several clones at once.
"""
import fcntl
import hashlib
import os
import struct
import time

from qsnap.errors import VmError

FINGERPRINT_HEAD = 4 << 20  # bytes hashed at the start of a frozen image
# QEMU's image locking (raw_apply_lock_bytes, block/file-posix.c): a process allowed to
# write an image holds a shared lock on byte RAW_LOCK_PERM_BASE (100) + bit number of
# BLK_PERM_WRITE (1) of its file, as an open file description lock
QEMU_WRITE_LOCK_BYTE = 101
_FLOCK = "hhqqi4x"  # struct flock on x86-64: type, whence, start, len, pid


def fingerprint(path):
    """{"size", "mtime_ns", "sha256_4m"} of a file: detects a frozen image changed after the snapshot."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        left = FINGERPRINT_HEAD
        while left:
            buf = f.read(min(left, 1 << 20))
            if not buf:
                break
            h.update(buf)
            left -= len(buf)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_4m": h.hexdigest()}


def _when(ns):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns // 10**9)) + f".{ns % 10**9:09d}"


def disk_name(disk):
    return disk.get("device") or disk.get("qdev") or disk.get("node_name") or "?"


def check_frozen(disk):
    """VmError unless the disk's frozen image exists and still has its recorded fingerprint."""
    path, want = disk["frozen"], disk["fingerprint"]
    try:
        got = fingerprint(path)
    except FileNotFoundError:
        raise VmError(f"frozen image {path} of disk {disk_name(disk)} is missing: "
                      "the snapshot cannot be restored without it") from None
    except OSError as e:
        raise VmError(f"cannot read frozen image {path} of disk {disk_name(disk)}: {e.strerror}") from None
    changed = []
    if got["size"] != want["size"]:
        changed.append(f"size {want['size']} -> {got['size']} bytes")
    if got["mtime_ns"] != want["mtime_ns"]:
        changed.append(f"modified {_when(got['mtime_ns'])}, recorded {_when(want['mtime_ns'])}")
    if got["sha256_4m"] != want["sha256_4m"]:
        changed.append("content of its first 4 MiB")
    if changed:
        what = "; ".join(changed)
        raise VmError(f"frozen image {path} of disk {disk_name(disk)} changed after the snapshot "
                      f"({what}): restoring it would give the guest a disk that does not match its RAM")


def write_locked(path):
    """True when some process holds QEMU's write lock on ``path``; False when none does,
    or when the file or its filesystem cannot tell (no OFD locks)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, QEMU_WRITE_LOCK_BYTE, 1, 0)
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
    except (OSError, AttributeError):
        return False
    finally:
        os.close(fd)
    return struct.unpack(_FLOCK, got)[0] != fcntl.F_UNLCK


def check_not_written(disk):
    """VmError when a process (a QEMU) may still write the disk's frozen image: a VM started
    on it could not take it as a read-only backing file ("Failed to get shared 'write'
    lock"), and the image would not stay the snapshot's disk."""
    if write_locked(disk["frozen"]):
        raise VmError(f"frozen image {disk['frozen']} of disk {disk_name(disk)} is open for writing "
                      "in another process: is a QEMU still running on it? (a QEMU started with "
                      "-daemonize that named its disks by relative paths keeps its snapshots' "
                      "frozen images open for writing: see README)")


def chain(image):
    """Filenames of a query-block ``inserted.image`` and its backing images, top first."""
    out = []
    while image:
        out.append(image.get("filename"))
        image = image.get("backing-image")
    return out


def find_device(blocks, disk):
    """The query-block entry of the recorded ``disk`` on a QEMU, or VmError.

    Matched by qdev path (stable across QEMUs started from the same command line),
    else by the -drive id."""
    for key in ("qdev", "device"):
        want = disk.get(key)
        if not want:
            continue
        for b in blocks:
            if b.get(key) == want:
                return b
    raise VmError(f"the destination QEMU has no disk device {disk_name(disk)} "
                  f"(qdev {disk.get('qdev') or '-'}): start it with the snapshot's devices")


def same_path(a, b):
    if not a or not b:
        return False
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def plan_overlay(block, disk):
    """What the restore does for one disk: "overlay" (its image is the frozen one),
    "keep" (it already runs on an overlay of the frozen image), or VmError."""
    inserted = block.get("inserted")
    if not inserted:
        raise VmError(f"disk {disk_name(disk)} of the destination has no medium")
    files = chain(inserted.get("image"))
    if same_path(files[0], disk["frozen"]):
        return "overlay"
    if any(same_path(f, disk["frozen"]) for f in files[1:]):
        return "keep"
    raise VmError(f"disk {disk_name(disk)} of the destination uses {files[0]}, not the snapshot's "
                  f"frozen image {disk['frozen']} (or an overlay of it): start QEMU with that disk "
                  f"on {disk['frozen']}")


def overlay_path(directory, disk, used):
    """<directory>/<frozen stem>.overlay.qcow2, unique within ``used``."""
    stem = os.path.splitext(os.path.basename(disk["frozen"]))[0] or "disk"
    name, n = f"{stem}.overlay.qcow2", 1
    while name in used:
        n += 1
        name = f"{stem}.{n}.overlay.qcow2"
    used.add(name)
    return os.path.join(directory, name)


def overlay_action(block, path, node_name):
    """The transaction action putting the qcow2 overlay already made at ``path``
    (overlays.create_overlay) on top of the device's image, as node ``node_name``.

    On an incoming QEMU the block graph is still inactive; QEMU accepts
    blockdev-snapshot-sync there, writes nothing to the old image and reopens it
    read-only as the overlay's backing file, so the frozen image is never written.
    With mode "existing" QEMU only opens the file (as qsnap snapshot does: 13 ms
    instead of 60-340 ms for QEMU creating it, mode "absolute-paths").
    Naming the old node by node-name (the device name is "" with -blockdev) makes
    QEMU require a node name for the new one (blockdev.c external_snapshot_action)."""
    return {"type": "blockdev-snapshot-sync", "data": {
        "node-name": block["inserted"]["node-name"], "snapshot-node-name": node_name,
        "snapshot-file": path, "format": "qcow2", "mode": "existing"}}
