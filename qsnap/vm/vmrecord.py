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


def open_files(pid):
    """The paths of the files the process ``pid`` holds open (/proc/PID/fd), or []."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("/"):
            out.append(target)
    return out


def start_dir(pid, names):
    """The directory QEMU resolved the relative ``names`` of its files against when it
    opened them, or None: its working directory, unless that holds none of them open
    and the files QEMU holds open name one other directory for them.  ``-daemonize``
    makes QEMU chdir to / once its files are open (os_setup_post, os-posix.c), so a
    daemonized QEMU's cwd says nothing about its command line's relative paths."""
    cwd = read_cwd(pid)
    rel = [os.path.normpath(n) for n in names if n and not os.path.isabs(n) and ":" not in n]
    if not rel:
        return cwd
    held = set(open_files(pid))
    if cwd and any(os.path.join(cwd, n) in held for n in rel):
        return cwd
    bases = {t[:-len(n) - 1] or "/" for t in held for n in rel if t.endswith(os.sep + n)}
    return bases.pop() if len(bases) == 1 else cwd


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
