"""A recorded QEMU command line, rewritten so that a restored clone can run beside others.

``rewrite(argv, disks, clone_dir)`` returns the new argv and a list of the changes,
each one line a user can read ("-pidfile /run/vm.pid -> /tmp/clone/qemu.pid").
Disk files named by the command line become the snapshot's frozen images (the
restore then puts a fresh overlay on top of each through QMP); per-instance
resources (sockets, pid file, logs, serial files, VNC displays, host port
forwards) move into the clone's directory or are dropped; ``-daemonize`` goes
(qsnap starts QEMU in its own session itself).  Whatever cannot be rewritten
safely is a VmError naming the option.
"""
import json
import os

from qsnap.errors import VmError

# Options that take no argument (qemu-options.hx: DEF(name, 0, ...)); every other
# option takes exactly one.  The union over QEMU 7.2 .. 10.0.
NO_ARG_OPTIONS = frozenset("""
    S s daemonize nodefaults no-reboot no-shutdown snapshot enable-kvm nographic no-hpet
    full-screen no-user-config no-acpi no-fd-bootchk only-migratable preconfig version help h
    win2k-hack no-quit alt-grab ctrl-grab semihosting xen-attach curses portrait rtc-td-hack
    usb no-frame sdl singlestep enable-fips nodefconfig enable-sync-profile old-param no-kvm
    no-kvm-irqchip no-kvm-pit no-kvm-pit-reinjection localtime std-vga mem-prealloc
    show-cursor async-teardown
""".split())

# Legacy disk options (-hda FILE, ...): the file is the whole argument.
LEGACY_DISK_OPTIONS = frozenset("hda hdb hdc hdd fda fdb cdrom mtdblock sd pflash".split())

# Options whose argument is a chardev description in the legacy "backend:params" syntax
# (chardev/char.c qemu_chr_parse_compat).
LEGACY_CHARDEV_OPTIONS = frozenset("serial parallel monitor qmp qmp-pretty debugcon".split())


class Arg:
    """One option of a QEMU command line: ``-name`` and its value (None for flags).
    A positional argument (a disk image, QEMU's -hda shorthand) has name None."""

    def __init__(self, name, value=None):
        self.name, self.value = name, value

    def words(self):
        out = [] if self.name is None else ["-" + self.name]
        return out + ([] if self.value is None else [self.value])


def parse(argv):
    """[Arg] of a QEMU argv (without argv[0])."""
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-") or word == "-":
            out.append(Arg(None, word))
            i += 1
            continue
        name = word.lstrip("-")
        if name in NO_ARG_OPTIONS:
            out.append(Arg(name))
            i += 1
            continue
        if i + 1 >= len(argv):
            raise VmError(f"recorded command line ends in option {word} without its argument")
        out.append(Arg(name, argv[i + 1]))
        i += 2
    return out


# --- QemuOpts: "key=value,key=value" with ",," for a comma in a value -------------

def split_opts(text, implied=None):
    """[(key, value)] of a QemuOpts string; a first item without '=' gets key ``implied``."""
    items, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "," and text[i + 1:i + 2] == ",":
            cur.append(",")
            i += 2
            continue
        if c == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    out = []
    for n, item in enumerate(items):
        if "=" in item:
            key, value = item.split("=", 1)
        elif n == 0 and implied is not None:
            key, value = implied, item
        else:
            key, value = item, None  # a bare flag ("server", "nowait")
        out.append((key, value))
    return out


def join_opts(pairs, implied=None):
    parts = []
    for n, (key, value) in enumerate(pairs):
        if value is None:
            parts.append(key)
        elif n == 0 and key == implied:
            parts.append(value.replace(",", ",,"))
        else:
            parts.append(f"{key}={value.replace(',', ',,')}")
    return ",".join(parts)


def _get(pairs, key):
    return next((v for k, v in pairs if k == key), None)


def _set(pairs, key, value):
    if any(k == key for k, _ in pairs):
        return [(k, value if k == key else v) for k, v in pairs]
    return pairs + [(key, value)]


def _without(pairs, *keys):
    return [(k, v) for k, v in pairs if k not in keys]


# --- the rewrite -------------------------------------------------------------------

class Rewriter:
    """Rewrites one command line for a clone in ``clone_dir``.

    ``disks``: the image's VM record disks (``cmdline_file``, ``frozen``, ``format``);
    ``cwd``: the directory relative paths of the recorded command line are taken from.
    """

    def __init__(self, disks, clone_dir, cwd=None):
        self.disks = list(disks)
        self.dir = clone_dir
        self.cwd = cwd
        self.changes = []
        self.found = set()  # indices of disks the command line named
        self.used_names = set()
        self.vnc_done = False
        self.protocol_nodes = {}  # node-name of a rewritten -blockdev protocol node -> disk index
        self.unsnapped = []       # writable -drive/-hda disks the snapshot did not freeze

    # paths --------------------------------------------------------------------------
    def clone_path(self, old, default):
        """A fresh path in the clone directory named after ``old`` (or ``default``)."""
        base = os.path.basename(old.rstrip("/")) if old else default
        base = base or default
        name, n = base, 1
        while name in self.used_names:
            n += 1
            name = f"{n}-{base}"
        self.used_names.add(name)
        return os.path.join(self.dir, name)

    def disk_for(self, path):
        """Index of the recorded disk whose command-line file is ``path``, or None."""
        if not path or path.startswith(("/dev/fd/", "fd:")):
            return None
        for i, d in enumerate(self.disks):
            want = d.get("cmdline_file")
            if want and _same_file(path, want, self.cwd):
                return i
        return None

    def note(self, text):
        self.changes.append(text)

    # one option at a time ------------------------------------------------------------
    def rewrite(self, args):
        out = []
        for a in args:
            out.extend(self.one(a))
        return self.finish_blockdevs(out)

    def one(self, a):
        n = a.name
        if n is None:
            return [self.legacy_disk(a)]
        if n == "daemonize":
            self.note("removed -daemonize (qsnap starts QEMU in its own session)")
            return []
        if n == "incoming":
            self.note(f"removed -incoming {a.value} (the restore adds -incoming defer)")
            return []
        if n == "pidfile":
            new = self.clone_path(a.value, "qemu.pid")
            self.note(f"-pidfile {a.value} -> {new}")
            return [Arg(n, new)]
        if n == "D":
            new = self.clone_path(a.value, "qemu-debug.log")
            self.note(f"-D {a.value} -> {new}")
            return [Arg(n, new)]
        if n in LEGACY_DISK_OPTIONS:
            return [self.legacy_disk(a)]
        if n == "drive":
            return [self.drive(a)]
        if n == "blockdev":
            return [self.blockdev(a)]
        if n == "chardev":
            return self.chardev(a)
        if n in LEGACY_CHARDEV_OPTIONS:
            return self.legacy_chardev(a)
        if n == "vnc":
            return self.vnc(a)
        if n == "spice":
            self.note(f"removed -spice {a.value} (its host port would collide between clones)")
            return []
        if n in ("netdev", "nic", "net"):
            return [self.net(a)]
        if n == "display" and a.value.startswith("vnc"):
            raise VmError(f"cannot give each clone its own display for -display {a.value}: "
                          "drop it (--drop-arg=-display) and add -vnc after --")
        return [a]

    # disks -------------------------------------------------------------------------
    def substitute(self, i, old, what):
        d = self.disks[i]
        self.found.add(i)
        if _same_file(old, d["frozen"], self.cwd):
            self.note(f"{what}{old}: the snapshot's frozen image, under a new overlay")
        else:
            self.note(f"{what}{old} -> {d['frozen']} (the snapshot's frozen image, under a new overlay)")
        return d["frozen"]

    def legacy_disk(self, a):
        i = self.disk_for(a.value)
        if i is None:
            if a.name != "cdrom":
                self.unsnapped.append(a)
            return a
        return Arg(a.name, self.substitute(i, a.value, "-" + (a.name or "hda") + " "))

    def drive(self, a):
        pairs = split_opts(a.value)
        i = self.disk_for(_get(pairs, "file"))
        if i is None:
            nested = [k for k, _ in pairs if k.startswith(("file.", "backing"))]
            for k in nested:
                if k == "file.filename" and self.disk_for(_get(pairs, k)) is not None:
                    raise VmError(f"cannot rewrite -drive {a.value}: it names its file with "
                                  "file.filename=; use file=")
            if _get(pairs, "readonly") not in ("on", "yes", "true") and _get(pairs, "media") != "cdrom":
                self.unsnapped.append(a)
            return a
        for k, v in pairs:
            if k == "snapshot" and v in ("on", "yes", "true", None):
                raise VmError(f"cannot restore onto -drive {a.value}: snapshot=on puts the disk "
                              "on a temporary overlay QEMU deletes")
            if k.startswith("backing"):
                raise VmError(f"cannot rewrite -drive {a.value}: it sets its backing chain "
                              f"({k}=) while the frozen image brings its own")
        new = self.substitute(i, _get(pairs, "file"), "-drive file=")
        pairs = _set(_set(pairs, "file", new), "format", self.disks[i]["format"])
        return Arg(a.name, join_opts(pairs))

    def blockdev(self, a):
        """A -blockdev whose protocol node names a recorded disk's file now names the frozen
        image; the format node over it (nested, or another -blockdev naming it by node-name,
        fixed in finish_blockdevs) reads the frozen image's format."""
        tree = _blockdev_tree(a.value)
        disk = self._blockdev_walk(tree, a.value)
        if disk is None:
            return a
        if isinstance(tree.get("node-name"), str) and tree.get("filename") is not None:
            self.protocol_nodes[tree["node-name"]] = disk
        return _BlockdevArg(a.name, tree, a.value)

    def _blockdev_walk(self, node, text):
        """Rewrite a -blockdev tree in place; the index of the disk it names, or None."""
        child = node.get("file")
        if isinstance(child, dict):
            i = self._blockdev_walk(child, text)
            if i is not None:
                self._set_format(node, i, text)
                return i
        i = self.disk_for(node.get("filename"))
        if i is not None:
            if node.get("driver") not in ("file", "host_device", None):
                raise VmError(f"cannot rewrite -blockdev {text}: driver {node.get('driver')} "
                              "for a disk file")
            node["filename"] = self.substitute(i, node["filename"], "-blockdev filename=")
        return i

    def _set_format(self, node, i, text):
        if "backing" in node:
            raise VmError(f"cannot rewrite -blockdev {text}: it sets its backing chain "
                          "while the frozen image brings its own")
        node["driver"] = self.disks[i]["format"]

    def finish_blockdevs(self, args):
        """Format nodes naming a rewritten protocol node by node-name read the frozen format."""
        out = []
        for a in args:
            if a.name == "blockdev" and not isinstance(a, _BlockdevArg):
                tree = _blockdev_tree(a.value)
                ref = tree.get("file")
                if isinstance(ref, str) and ref in self.protocol_nodes:
                    self._set_format(tree, self.protocol_nodes[ref], a.value)
                    a = _BlockdevArg(a.name, tree, a.value)
            out.append(Arg(a.name, json.dumps(a.tree, separators=(",", ":")))
                       if isinstance(a, _BlockdevArg) else a)
        return out

    # chardevs ------------------------------------------------------------------------
    def chardev(self, a):
        pairs = split_opts(a.value, implied="backend")
        backend, cid = _get(pairs, "backend"), _get(pairs, "id") or "chardev"
        server = _is_server(pairs)
        if backend in ("socket",) and _get(pairs, "path") and server:
            new = self.clone_path(_get(pairs, "path"), f"{cid}.sock")
            self.note(f"-chardev {cid}: socket {_get(pairs, 'path')} -> {new}")
            return [Arg(a.name, join_opts(_set(pairs, "path", new), "backend"))]
        if backend in ("socket",) and _get(pairs, "port") and server:
            new = self.clone_path(None, f"{cid}.sock")
            self.note(f"-chardev {cid}: TCP port {_get(pairs, 'port')} -> unix socket {new}")
            pairs = _without(pairs, "host", "port", "to", "ipv4", "ipv6", "telnet", "tn3270",
                             "websocket")
            return [Arg(a.name, join_opts(_set(pairs, "path", new), "backend"))]
        if backend in ("file",) and _get(pairs, "path"):
            new = self.clone_path(_get(pairs, "path"), f"{cid}.log")
            self.note(f"-chardev {cid}: file {_get(pairs, 'path')} -> {new}")
            return [Arg(a.name, join_opts(_set(pairs, "path", new), "backend"))]
        if _get(pairs, "logfile"):
            new = self.clone_path(_get(pairs, "logfile"), f"{cid}.log")
            self.note(f"-chardev {cid}: logfile {_get(pairs, 'logfile')} -> {new}")
            return [Arg(a.name, join_opts(_set(pairs, "logfile", new), "backend"))]
        return [a]

    def legacy_chardev(self, a):
        """-serial/-monitor/-qmp/... in the "backend:params" syntax (qemu_chr_parse_compat)."""
        value, prefix = a.value, ""
        if value.startswith("mon:"):
            prefix, value = "mon:", value[4:]
        backend, _, rest = value.partition(":")
        what = f"-{a.name} {a.value}"
        if backend == "unix":
            parts = split_opts(rest)
            path = parts[0][0] if parts[0][1] is None else None
            if path and _is_server(parts[1:]):
                new = self.clone_path(path, f"{a.name}.sock")
                self.note(f"{what}: socket -> {new}")
                return [Arg(a.name, f"{prefix}unix:{join_opts([(new, None)] + parts[1:])}")]
        elif backend in ("tcp", "telnet"):
            parts = split_opts(rest)
            if _is_server(parts[1:]):
                new = self.clone_path(None, f"{a.name}.sock")
                self.note(f"{what}: TCP port -> unix socket {new}")
                opts = [(k, v) for k, v in parts[1:] if k in ("server", "wait", "nowait")]
                return [Arg(a.name, f"{prefix}unix:{join_opts([(new, None)] + opts)}")]
        elif backend == "file" and rest:
            new = self.clone_path(rest, f"{a.name}.log")
            self.note(f"{what}: file -> {new}")
            return [Arg(a.name, f"{prefix}file:{new}")]
        return [a]

    # displays and network -------------------------------------------------------------
    def vnc(self, a):
        pairs = split_opts(a.value, implied="display")
        display = _get(pairs, "display") or ""
        if display == "none" or self.vnc_done:
            return [a] if display == "none" else []
        self.vnc_done = True
        new = self.clone_path(None, "vnc.sock")
        self.note(f"-vnc {display} -> unix socket {new} (a TCP display would collide between clones)")
        pairs = [(k, v) for k, v in pairs if k not in ("display", "to", "ipv4", "ipv6", "websocket")]
        return [Arg(a.name, join_opts([("display", f"unix:{new}")] + pairs, "display"))]

    def net(self, a):
        """Host port forwards (user networking hostfwd=) collide between clones: dropped."""
        pairs = split_opts(a.value, implied="type")
        fwd = [v for k, v in pairs if k == "hostfwd"]
        if not fwd:
            return a
        self.note(f"-{a.name}: dropped hostfwd={', hostfwd='.join(fwd)} (host ports would collide "
                  "between clones; add your own after --)")
        return Arg(a.name, join_opts(_without(pairs, "hostfwd"), "type"))


class _BlockdevArg(Arg):
    """A -blockdev being rewritten: its tree, serialised as JSON at the end."""

    def __init__(self, name, tree, original):
        super().__init__(name, original)
        self.tree = tree


def _is_server(pairs):
    for k, v in pairs:
        if k == "server" and v in (None, "on", "yes", "true"):
            return True
    return False


def _same_file(path, want, cwd):
    """True if command-line ``path`` names the file ``want`` (an absolute path)."""
    if not os.path.isabs(path):
        if cwd is None:
            return want == path or want.endswith("/" + os.path.normpath(path))
        path = os.path.join(cwd, path)
    if os.path.normpath(path) == os.path.normpath(want):
        return True
    try:
        return os.path.samefile(path, want)
    except OSError:
        return False


def _blockdev_tree(text):
    """A -blockdev argument (JSON or dotted keyval) as a nested dict."""
    if text.lstrip().startswith("{"):
        try:
            tree = json.loads(text)
        except ValueError as e:
            raise VmError(f"cannot parse -blockdev {text}: {e}") from None
        if not isinstance(tree, dict):
            raise VmError(f"cannot parse -blockdev {text}: not a JSON object")
        return tree
    tree = {}
    for key, value in split_opts(text):
        node, parts = tree, key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise VmError(f"cannot parse -blockdev {text}: {key} inside a string value")
            node = nxt
        node[parts[-1]] = value
    return tree


def rewrite_for_clone(argv, disks, clone_dir, *, qmp_path, binary=None, cwd=None, drop=()):
    """(new argv, [change]) of a recorded argv for a clone restored in ``clone_dir``.

    Adds QMP at ``qmp_path``, ``-incoming defer`` and ``-S`` (qsnap decides when the
    guest runs); ``drop``: option names (``-vnc``) to remove entirely."""
    if not argv:
        raise VmError("the recorded command line is empty")
    args = parse(argv[1:])
    dropped = {d.lstrip("-") for d in drop}
    kept = [a for a in args if a.name not in dropped]
    rw = Rewriter(disks, clone_dir, cwd)
    for name in sorted(dropped):
        if any(a.name == name for a in args):
            rw.note(f"dropped every -{name} (--drop-arg)")
    rw.used_names.update({"qmp.sock", "qemu.log", "load.log"})
    new = rw.rewrite(kept)
    if rw.unsnapped:
        a = rw.unsnapped[0]
        raise VmError(f"cannot launch: the recorded command line opens {' '.join(a.words())} writable "
                      "but the snapshot did not freeze that disk, so the clone would write it; "
                      "drop it (--drop-arg), or start QEMU yourself with -incoming defer and restore with --qmp")
    missing = [d for i, d in enumerate(disks) if i not in rw.found]
    if missing:
        d = missing[0]
        where = d.get("cmdline_file")
        raise VmError(f"cannot launch: the recorded command line does not name disk "
                      f"{d.get('device') or d.get('qdev')} ({where or 'hot-plugged, no file recorded'}); "
                      "start QEMU yourself with -incoming defer and restore with --qmp")
    words = [binary or argv[0]]
    for a in new:
        words.extend(a.words())
    if not any(a.name == "S" for a in new):
        words.append("-S")
    qmp = str(qmp_path).replace(",", ",,")
    words += ["-qmp", f"unix:{qmp},server=on,wait=off", "-incoming", "defer"]
    return words, rw.changes
