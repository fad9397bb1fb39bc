"""The VM record a snapshot stores in its image (the "vm" key, docs/image-format.md):
which QEMU, machine, command line and working directory, how the snapshot was taken,
and its frozen disks."""
import os

from qsnap import atomic
from qsnap.errors import VmError
from qsnap.vm.disks import fingerprint


def qemu_identity(qmp):
    """(version "major.minor.micro", package or None, machine type) of the QEMU."""
    v = qmp.cmd("query-version")
    q = v["qemu"]
    package = (v.get("package") or "").strip() or None
    machine = qmp.cmd("qom-get", path="/machine", property="type")
    return f"{q['major']}.{q['minor']}.{q['micro']}", package, machine.removesuffix("-machine")


def read_cmdline(pid):
    """QEMU's command line from /proc/PID/cmdline, or None when it cannot be read."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    args = [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]
    return args or None


def read_cwd(pid):
    """QEMU's working directory (/proc/PID/cwd), against which relative paths on its
    command line resolve, or None when it cannot be read."""
    if not pid:
        return None
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def cmdline_file(disk, cmdline, cwd=None):
    """The file of the disk's chain that the command line names (its base as QEMU was
    started), as an absolute path, or None.  The command line may name it relative to
    QEMU's working directory ``cwd``."""
    if not cmdline:
        return None
    text = "\0".join(cmdline)
    for path in reversed(disk.chain):
        if not path:
            continue
        names = [path]
        if cwd and os.path.isabs(path):
            names.append(os.path.relpath(path, cwd))
        if any(name in text for name in names):
            return path if os.path.isabs(path) or not cwd else os.path.normpath(os.path.join(cwd, path))
    return None


def disk_entry(disk, cmdline, cwd=None):
    try:
        fp = fingerprint(disk.image)
    except OSError as e:
        raise VmError(f"cannot read frozen image {disk.image} of disk {disk.name}: {e.strerror}") from None
    return {"device": disk.device, "qdev": disk.qdev, "node_name": disk.node_name,
            "frozen": disk.image, "format": disk.format, "virtual_size": disk.virtual_size,
            "cmdline_file": cmdline_file(disk, cmdline, cwd), "fingerprint": fp}


def build(identity, cmdline, cwd, mode, was_running, disks, downtime_ms=None):
    version, package, machine = identity
    return {"qemu_version": version, "qemu_package": package, "machine": machine,
            "cmdline": cmdline, "cwd": cwd, "mode": mode, "was_running": was_running,
            "downtime_ms": downtime_ms, "ram_only": not disks,
            "disks": [disk_entry(d, cmdline, cwd) for d in disks]}


def write(path, record):
    """Write the record atomically: `qsnap save` may read it at any moment."""
    atomic.write_json(path, record, indent=1)
