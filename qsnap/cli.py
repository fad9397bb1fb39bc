"""Command line: argument parsing and error reporting only.

Every failure ends as one line ``qsnap: error: <message>`` on stderr and a
non-zero exit status (the QsnapError's own, 70 for anything else, which is a
bug); ``--debug`` shows the traceback instead.
"""
import argparse
import json
import os
import signal
import sys

# NumPy's OpenBLAS starts a busy-waiting thread per core when it is imported;
# qsnap does no linear algebra, and on a small host those threads take CPU from
# the stream. Only the command line sets this: importing qsnap as a library
# leaves the caller's environment alone.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from qsnap import __version__
from qsnap.errors import Interrupted, QsnapError, UsageError

PROG = "qsnap"
EX_SOFTWARE = 70  # sysexits.h: internal software error


def _size(text):
    """Parse '1M', '64K', '2m', '1048576' into bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib")
    try:
        if t and t[-1] in units:
            return int(t[:-1]) * units[t[-1]]
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _percent(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"percentage {text} is outside 0..100")
    return value


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, told the terminal width: without it, HelpFormatter
    imports shutil (and with it bz2 and lzma) for shutil.get_terminal_size, and
    add_argument builds a formatter for every argument; 5-15 ms of `qsnap load`'s
    start-up here.  The width is found as shutil finds it."""

    def __init__(self, prog, **kw):
        kw.setdefault("width", _columns() - 2)
        super().__init__(prog, **kw)


def _columns():
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kw)

    def error(self, message):
        raise UsageError(message)


def build_parser(command=None):
    """The argument parser; given a known ``command``, with only that command's parser.

    argparse builds a help formatter for every add_argument (the first one imports
    shutil and asks for the terminal size): all commands' parsers cost `qsnap load`
    several ms before its first byte, for nothing but the other commands' help."""
    p = _Parser(prog=PROG, description="External snapshots of QEMU virtual machines.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, add in _PARSERS.items():
        if command not in _PARSERS or command == name:
            add(sub)
    return p


def _command_word(argv):
    """The command named on the command line (its first word that is not an option:
    the top-level options take no value), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def _add_save(sub):
    s = sub.add_parser(
        "save",
        help="read a migration stream on stdin and write a snapshot image",
        description='Run behind QEMU: migrate "exec:qsnap save IMG". Reads the stream on '
        "stdin, writes IMG atomically; stdout carries only return-path replies.",
    )
    s.add_argument("image", metavar="IMG")
    s.add_argument("--cache", choices=("auto", "none", "writeback"), default="auto",
                   help="how image data is written: none = O_DIRECT, writeback = through "
                   "the page cache, auto (default) = O_DIRECT where the filesystem "
                   "supports it, else the page cache")
    s.add_argument("--cluster-size", type=_size, default=None, metavar="SIZE",
                   help="qcow2 cluster size, 64K..2M (default 1M, with --parent the parent's)")
    s.add_argument("--parent", metavar="PARENT",
                   help="an incremental image: store only the pages whose content differs "
                   "from PARENT's (and its own chain's); IMG's qcow2 header names PARENT as "
                   "its backing file")
    s.add_argument("--stats", metavar="FILE", help="write save statistics as JSON to FILE")
    s.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")
    s.add_argument("--vm-info", metavar="FILE",
                   help="JSON VM record (written by qsnap snapshot) to store in the image; "
                   "read when the image is finished (waiting a few seconds for it to appear)")
    s.add_argument("--report", metavar="FILE",
                   help="when the save ends, write FILE atomically: "
                   '{"ok": true, "summary": ...} or {"ok": false, "error": ...}')
    s.add_argument("--notify-fd", type=int, metavar="FD",
                   help="tell the open file descriptor FD how the save goes: 'r' when it "
                   "starts reading its stream, 'p' when the first RAM section after the "
                   "setup arrives (the source of a background snapshot has then saved its "
                   "device state and write-protected its RAM), then FD is closed")
    s.add_argument("--hold-fd", type=int, metavar="FD",
                   help="with --notify-fd: after 'r', read nothing of the stream until a byte "
                   "or the end arrives on the open file descriptor FD")
    s.add_argument("--early-exit", action="store_true",
                   help="exit (and let QEMU go on) once the whole stream is read, finishing "
                   "the image in a child process; how it ends is only in --report")


def _add_load(sub):
    ld = sub.add_parser(
        "load",
        help="write a migration stream regenerated from an image to stdout",
        description='Run behind QEMU: migrate_incoming "exec:qsnap load IMG" on a QEMU '
        "started with -incoming defer.",
    )
    ld.add_argument("image", metavar="IMG")
    ld.add_argument("--cache", choices=("none", "writeback"), default="none",
                    help="page cache use for reads (none = O_DIRECT); default none")
    ld.add_argument("--postcopy", type=_percent, nargs="?", const=10.0, default=None,
                    metavar="PCT",
                    help="restore through postcopy after PCT%% of the non-zero pages (default 10)")
    ld.add_argument("--record-working-set", action="store_true",
                    help="with --postcopy: merge the pages the guest asks for into IMG's working set")
    ld.add_argument("--record-window", type=float, default=0.0, metavar="SECONDS",
                    help="with --record-working-set: send only requested pages for SECONDS "
                    "after the switch, so the record holds all the guest touches then")
    ld.add_argument("--prefetch", choices=("after", "before", "none"), default="after",
                    help="when IMG's working set is sent: right after the switch to postcopy "
                    "(default), before it, or not first at all (none)")
    ld.add_argument("--stats", metavar="FILE", help="write load statistics as JSON to FILE")
    ld.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")


def _add_info(sub):
    i = sub.add_parser("info", help="describe an image")
    i.add_argument("image", metavar="IMG")
    i.add_argument("--output", choices=("human", "json"), default="human")


def _add_check(sub):
    c = sub.add_parser("check", help="verify an image's structure and checksums")
    c.add_argument("image", metavar="IMG")
    c.add_argument("--output", choices=("human", "json"), default="human")


def _add_flatten(sub):
    f = sub.add_parser("flatten", help="write a stand-alone copy of an image of a backing chain",
                       description="Write OUT, a stand-alone image with IMG's content and image id "
                                   "(no parent). IMG and its chain are not changed; OUT is replaced "
                                   "atomically.")
    f.add_argument("image", metavar="IMG")
    f.add_argument("out", metavar="OUT")
    f.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")


def _add_commit(sub):
    c = sub.add_parser("commit", help="fold an image's parent into it (shortens its chain by one)",
                       description="Rewrite IMG so that it holds what it read from its parent: IMG then "
                                   "backs onto its grandparent, or stands alone. IMG keeps its content "
                                   "and image id (its children stay valid); the parent is not changed. "
                                   "IMG is replaced atomically.")
    c.add_argument("image", metavar="IMG")
    c.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")


def _add_demo(sub):
    d = sub.add_parser("demo", help="save and load a synthetic VM, no QEMU needed")
    d.add_argument("--size", type=_size, default=256 << 20, metavar="SIZE",
                   help="guest RAM size of the synthetic VM (default 256M)")
    d.add_argument("--dir", metavar="DIR", help="work directory (default: a temporary one)")
    d.add_argument("--keep", action="store_true", help="keep the work directory")


def _add_snapshot(sub):
    sn = sub.add_parser(
        "snapshot",
        help="snapshot a running VM (RAM, devices, disks) into an image",
        description="Connects to the VM's QMP socket, saves RAM and device state into IMG "
        "through migrate exec:qsnap save, and (with --disks=overlay) puts every writable disk "
        "on a new overlay at the same instant, so that the old images stay frozen with the RAM.",
    )
    sn.add_argument("image", metavar="IMG")
    sn.add_argument("--qmp", required=True, metavar="SOCK", help="QMP unix socket of the VM")
    sn.add_argument("--mode", choices=("background", "live", "stopped"), default="background",
                    help="background (default): the guest runs while RAM is written; live: "
                    "precopy, paused for the switch-over; stopped: paused for the whole save")
    sn.add_argument("--disks", choices=("overlay", "none"), default="overlay",
                    help="overlay (default): freeze the disks at the snapshot instant; none: RAM only")
    inc = sn.add_mutually_exclusive_group()
    inc.add_argument("--parent", metavar="PARENT",
                     help="incremental: IMG stores only the RAM that differs from PARENT's")
    inc.add_argument("--incremental", action="store_true",
                     help="incremental to this VM's last snapshot (by qsnap snapshot of the "
                     "same QEMU process, its disks still on the overlays it made)")
    sn.add_argument("--output", choices=("human", "json"), default="human")


def _add_restore(sub):
    r = sub.add_parser(
        "restore",
        help="restore a snapshot image into a QEMU (an -incoming defer one, or one it starts)",
        description="--qmp SOCK IMG: restore into the QEMU at SOCK, started with -incoming defer. "
        "--launch IMG: start QEMU from the command line the image recorded (qsnap snapshot), "
        "restore and run it. Disks run on fresh overlays of the snapshot's frozen images. "
        "Arguments after -- are added to the launched QEMU's command line.",
    )
    r.add_argument("image", metavar="IMG")
    r.add_argument("extra", nargs="*", metavar="QEMU_ARG", help=argparse.SUPPRESS)
    r.add_argument("--qmp", metavar="SOCK",
                   help="QMP socket of the destination (with --launch: where to put the new QEMU's)")
    r.add_argument("--launch", action="store_true", help="start QEMU from the recorded command line")
    r.add_argument("--postcopy", type=_percent, nargs="?", const=10.0, default=None, metavar="PCT",
                   help="restore through postcopy after PCT%% of the non-zero pages (default 10)")
    r.add_argument("--paused", action="store_true", help="leave the restored guest paused")
    r.add_argument("--dir", metavar="DIR",
                   help="the restore's directory (overlays, sockets, logs); default: a new one "
                   "under $XDG_RUNTIME_DIR or /tmp")
    r.add_argument("--qemu", metavar="BINARY",
                   help="with --launch: this QEMU binary instead of the recorded one")
    r.add_argument("--drop-arg", action="append", default=[], metavar="OPTION",
                   help="with --launch: remove every OPTION (e.g. -vnc) from the recorded command line")
    r.add_argument("--output", choices=("human", "json"), default="human")


def _add_export(sub):
    from qsnap.export import FORMATS

    e = sub.add_parser(
        "export",
        help="write an image's memory in a format other tools read",
        description="elf: an ELF core as QEMU's dump-guest-memory (paging: false) writes it, "
        "one PT_LOAD per guest-physical RAM range, CPU notes from the device state "
        "(crash, gdb, Volatility). raw: guest-physical memory as one sparse file, "
        "byte N = guest-physical address N (RAM-block offsets are not kept; the PCI hole "
        "and zero pages are holes). mapped-ram: a file QEMU >= 9.0 restores with "
        'migrate_incoming "file:OUT" and the mapped-ram capability on. '
        "OUT appears only when complete; an earlier OUT is replaced atomically.",
    )
    e.add_argument("image", metavar="IMG")
    e.add_argument("output", metavar="OUT")
    e.add_argument("--format", "-f", choices=FORMATS, required=True)
    e.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")


def _add_import(sub):
    m = sub.add_parser(
        "import",
        help="turn a QEMU mapped-ram migration file into an image",
        description='IN: a file written by QEMU >= 9.0 with migrate "file:IN" and the mapped-ram '
        "capability (with or without multifd). IMG restores with qsnap load like any image.",
    )
    m.add_argument("input", metavar="IN")
    m.add_argument("image", metavar="IMG")
    m.add_argument("--cluster-size", type=_size, default=1 << 20, metavar="SIZE",
                   help="qcow2 cluster size, 64K..2M (default 1M)")
    m.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")


def _cmd_save(args):
    on_stream_end = None
    if args.early_exit:
        if not args.report:
            raise UsageError("save --early-exit needs --report FILE (the only way to learn how it ended)")
        from qsnap.detach import fork_early_exit

        on_stream_end = fork_early_exit()  # before qsnap.save starts any thread
    if args.hold_fd is not None and args.notify_fd is None:
        raise UsageError("save --hold-fd needs --notify-fd (whoever holds the save learns there when to let go)")
    notify = _notifier(args.notify_fd, args.hold_fd) if args.notify_fd is not None else None
    from qsnap.save import save

    stats = save(args.image, cache=args.cache, cluster_size=args.cluster_size, quiet=args.quiet,
                 vm_info=args.vm_info, report=args.report, on_stream_end=on_stream_end,
                 parent=args.parent, notify=notify)
    _write_stats(args.stats, stats)
    return 0


def _notifier(fd, hold_fd=None):
    """save --notify-fd: a call that writes an event's byte to ``fd`` ("reading": r,
    "ram pages": p, after which it closes ``fd``; "failed": it only closes ``fd``); with
    --hold-fd it then waits, after "reading", for a byte or the end on ``hold_fd``."""
    for n, what in ((fd, "--notify-fd"), (hold_fd, "--hold-fd")):
        if n is None:
            continue
        try:
            os.fstat(n)
        except (OSError, OverflowError):
            raise UsageError(f"{what} {n}: not an open file descriptor") from None

    def notify(event):
        nonlocal fd
        if fd is None:
            return
        if event != "failed":
            try:
                os.write(fd, {"reading": b"r", "ram pages": b"p"}[event])
            except OSError:
                pass  # nobody listens any more: the save goes on regardless
        if event != "reading":
            os.close(fd)
            fd = None
        elif hold_fd is not None:
            _wait_let_go(hold_fd)

    return notify


def _wait_let_go(fd):
    """Block until a byte or the end arrives on ``fd`` (its holder let go, or is gone)."""
    try:
        os.read(fd, 1)
    except OSError:
        pass  # not readable: nothing to wait for
    os.close(fd)


def _write_stats(path, stats):
    if path:
        with open(path, "w") as f:
            json.dump(stats, f, indent=2)


def _cmd_load(args):
    if args.postcopy is not None:
        from qsnap.postcopy import load_postcopy

        load_postcopy(args.image, percent=args.postcopy, cache=args.cache,
                      stats_path=args.stats, quiet=args.quiet, prefetch=args.prefetch,
                      record_working_set=args.record_working_set,
                      record_window=args.record_window)
        return 0
    if args.record_working_set:
        raise UsageError("--record-working-set needs --postcopy (page requests exist only there)")
    from qsnap.load import load

    stats = load(args.image, cache=args.cache, quiet=args.quiet, prefetch=args.prefetch != "none")
    _write_stats(args.stats, stats)
    return 0


def _cmd_info(args):
    from qsnap.image.inspect import describe

    info = describe(args.image)
    if args.output == "json":
        print(json.dumps(info, indent=2))
    else:
        from qsnap.image.inspect import format_info

        print(format_info(info))
    return 0


def _cmd_check(args):
    from qsnap.errors import ImageError
    from qsnap.image.inspect import CHECK_NOT_CHECKED, check_image

    report = check_image(args.image, progress=sys.stderr.isatty())
    if report["exit_code"] == CHECK_NOT_CHECKED and args.output == "human":
        raise ImageError(f"cannot check {args.image}: {report['problems'][0]}")
    if args.output == "json":
        print(json.dumps(report, indent=2))
    else:
        from qsnap.image.inspect import format_check

        print(format_check(report))
    return report["exit_code"]


def _cmd_flatten(args):
    from qsnap.image.rewrite import flatten

    _rewrite_summary(args, f"flattened {args.image} into", flatten(args.image, args.out))
    return 0


def _cmd_commit(args):
    from qsnap.image.metadata import read_metadata
    from qsnap.image.rewrite import commit

    parent = (read_metadata(args.image).get("parent") or {}).get("backing_file")
    _rewrite_summary(args, f"folded its parent {parent} into", commit(args.image))
    return 0


def _rewrite_summary(args, what, s):
    if args.quiet:
        return
    onto = f"now backed by {s['backing_file']}" if s["backing_file"] else "now stand-alone"
    sys.stderr.write(f"qsnap: {what} {s['path']} ({onto}): "
                     f"{s['clusters_copied']} clusters copied, {s['clusters_inherited']} inherited, "
                     f"{s['clusters_zeroed']} zero, {s['file_bytes'] / 1e6:.1f} MB\n")


def _cmd_snapshot(args):
    from qsnap.vm import snapshot

    out = snapshot.snapshot(args.qmp, args.image, mode=args.mode, disks=args.disks,
                            progress=sys.stderr.isatty(), parent=args.parent,
                            incremental=args.incremental)
    for warning in out["warnings"]:
        print(f"qsnap: warning: {warning}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps(out, indent=2))
    else:
        print(snapshot.format_summary(out))
    return 0


def _cmd_restore(args):
    from qsnap.vm import restore

    if args.launch:
        out = restore.launch(args.image, qmp_path=args.qmp, directory=args.dir, binary=args.qemu,
                             postcopy=args.postcopy, paused=args.paused, drop=args.drop_arg,
                             extra=args.extra)
    else:
        if not args.qmp:
            raise UsageError("restore needs --qmp SOCK (a QEMU started with -incoming defer) or --launch")
        if args.extra or args.qemu or args.drop_arg:
            raise UsageError("QEMU arguments, --qemu and --drop-arg only go with --launch")
        out = restore.restore_into(args.qmp, args.image, postcopy=args.postcopy, paused=args.paused,
                                   directory=args.dir)
    if args.output == "json":
        print(json.dumps(out, indent=2))
    else:
        print(restore.format_summary(out))
    return 0


def _cmd_export(args):
    from qsnap.export import export

    export(args.image, args.output, args.format, quiet=args.quiet)
    return 0


def _cmd_import(args):
    from qsnap.export import import_mapped_ram

    import_mapped_ram(args.input, args.image, cluster_size=args.cluster_size, quiet=args.quiet)
    return 0


def _cmd_demo(args):
    from qsnap.demo import run_demo

    return run_demo(size=args.size, workdir=args.dir, keep=args.keep)


_PARSERS = {  # in the order of `qsnap --help`
    "save": _add_save,
    "load": _add_load,
    "info": _add_info,
    "check": _add_check,
    "flatten": _add_flatten,
    "commit": _add_commit,
    "snapshot": _add_snapshot,
    "restore": _add_restore,
    "export": _add_export,
    "import": _add_import,
    "demo": _add_demo,
}

_COMMANDS = {
    "save": _cmd_save,
    "load": _cmd_load,
    "info": _cmd_info,
    "flatten": _cmd_flatten,
    "commit": _cmd_commit,
    "check": _cmd_check,
    "demo": _cmd_demo,
    "restore": _cmd_restore,
    "snapshot": _cmd_snapshot,
    "export": _cmd_export,
    "import": _cmd_import,
}


class Terminated(Interrupted):
    """A signal asked qsnap to stop (QEMU cancelling a migration sends SIGTERM)."""

    exit_code = 128 + signal.SIGTERM


def _on_sigterm(signum, frame):
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    # SIGTERM (QEMU cancelling a migration) unwinds like an error, so temp files go.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = build_parser(_command_word(argv)).parse_args(argv)
        if args.command is None:
            raise UsageError("no command given (one of: save, load, info, check, restore, demo)")
        return _COMMANDS[args.command](args)
    except QsnapError as e:
        if debug:
            raise
        _report(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _report("interrupted")
        return 130
    except BrokenPipeError as e:
        if debug:
            raise
        _report(f"output closed: {e.strerror}")
        return 1
    except OSError as e:
        if debug:
            raise
        where = f" ({e.filename})" if e.filename else ""
        _report(f"{e.strerror or e}{where}")
        return 1
    except MemoryError as e:
        _report(f"out of memory: {e}" if str(e) else "out of memory")
        return 1
    except Exception as e:  # a bug: still one line, and a status that says so
        if debug:
            raise
        text = " ".join(str(e).splitlines())  # one line, whatever the message holds
        _report(f"internal error: {type(e).__name__}: {text} (run with --debug for the traceback)")
        return EX_SOFTWARE


def _report(message):
    try:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.stderr.flush()
    except OSError:
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
