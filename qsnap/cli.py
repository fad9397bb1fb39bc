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
from qsnap.errors import QsnapError, UsageError

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


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = _Parser(prog=PROG, description="External snapshots of QEMU virtual machines.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

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
    s.add_argument("--cluster-size", type=_size, default=1 << 20, metavar="SIZE",
                   help="qcow2 cluster size, 64K..2M (default 1M)")
    s.add_argument("--stats", metavar="FILE", help="write save statistics as JSON to FILE")
    s.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")

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

    i = sub.add_parser("info", help="describe an image")
    i.add_argument("image", metavar="IMG")
    i.add_argument("--output", choices=("human", "json"), default="human")

    c = sub.add_parser("check", help="verify an image's structure and checksums")
    c.add_argument("image", metavar="IMG")
    c.add_argument("--output", choices=("human", "json"), default="human")

    d = sub.add_parser("demo", help="save and load a synthetic VM, no QEMU needed")
    d.add_argument("--size", type=_size, default=256 << 20, metavar="SIZE",
                   help="guest RAM size of the synthetic VM (default 256M)")
    d.add_argument("--dir", metavar="DIR", help="work directory (default: a temporary one)")
    d.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


def _cmd_save(args):
    from qsnap.save import save

    stats = save(args.image, cache=args.cache, cluster_size=args.cluster_size, quiet=args.quiet)
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(stats, f, indent=2)
    return 0


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
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(stats, f, indent=2)
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


def _cmd_demo(args):
    from qsnap.demo import run_demo

    return run_demo(size=args.size, workdir=args.dir, keep=args.keep)


_COMMANDS = {
    "save": _cmd_save,
    "load": _cmd_load,
    "info": _cmd_info,
    "check": _cmd_check,
    "demo": _cmd_demo,
}


class Terminated(QsnapError):
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
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("no command given (one of: save, load, info, check, demo)")
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
