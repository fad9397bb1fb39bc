"""Where the pause of ``qsnap snapshot --mode=background`` with disks goes, from QEMU's
own trace events.

    python -m bench.pause_trace --qemu 7.2 --size 3G --fill 67 --snapshots 3

A blob guest of bench.e2e's kind (KVM, ``--fill`` % of its RAM random, two qcow2
drives, a second QMP socket) is started with QEMU's trace events on (``-trace
events=FILE,file=LOG``: the QMP commands' dispatch, run-state changes, the migration's
states, savevm's sections, the write protection's start, and on QEMU >= 10.0
``vmstate_downtime_checkpoint``).  After one untimed background snapshot (as in
bench.e2e: the first after boot differs), qsnap snapshots it ``--snapshots`` times,
in this process, with the wall time of each of qsnap's QMP round trips recorded.
For each the pause is cut into its steps, in ms, from the trace's timestamps (the
same wall clock as QMP's event timestamps):

    stop          STOP event -> the end of ``stop`` (its drain and flush of the disks)
    to transaction  -> QEMU starts the transaction (its reply to ``stop`` and reading the
                  next command; qsnap sends both at once)
    transaction   the overlay transaction (drain, flush, the overlays' open)
    to migrate    -> QEMU starts ``migrate`` (its reply, qsnap's turn, the request)
                  (>= 9.0: ``stop`` and ``migrate`` go at once and the transaction
                  follows, beside the setup: its own line)
                  (QEMU < 8.0: ``migrate`` goes first, and the pause begins once QEMU
                  waits in its setup, snapshot._stop_in_setup: then "release+setup"
                  -> migration_thread_setup_complete, and the thread's start and
                  read of guest RAM, before the pause, are given apart)
    thread start+populate  ``migrate`` -> ``savevm_state_setup``: the migration thread
                  starts and reads a byte of every host page of guest RAM
                  (ram_write_tracking_prepare, migration/migration.c bg_migration_thread)
    setup         -> migration_thread_setup_complete (savevm setup, state active)
    device state  -> the last device section saved
    write-protect -> ram_write_tracking_ramblock_start of the last RAM block (UFFDIO_REGISTER
                  and UFFDIO_WRITEPROTECT over all of it, ram_write_tracking_start)
    to resume     -> RESUME (7.2: QEMU's bottom half)
    to cont       >= 9.0: -> QEMU starts qsnap's ``cont``, sent after the first RAM page
                  (snapshot._resume_background)
    cont          -> RESUME

Prints one JSON document (also written to --out).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import e2e

TRACE_EVENTS = ["qmp_enter_stop", "qmp_exit_stop", "qmp_enter_transaction", "qmp_exit_transaction",
                "qmp_enter_migrate", "qmp_exit_migrate", "qmp_enter_cont",
                "runstate_set", "migrate_set_state", "savevm_state_setup", "savevm_section_end",
                "migration_thread_setup_complete", "ram_write_tracking_ramblock_start",
                "vmstate_downtime_checkpoint"]
LINE = re.compile(r"\d+@(\d+)\.(\d+):(\S+) ?(.*)")


def parse_trace(text):
    """[(wall-clock s, event, rest of the line)] of a trace log (the log backend's
    ``PID@SECONDS.MICROSECONDS:event args`` lines)."""
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            out.append((int(m.group(1)) + int(m.group(2)) / 1e6, m.group(3), m.group(4)))
    return out


def _first(trace, event, after):
    return next((t for t, e, _ in trace if e == event and t >= after), None)


def _last_before(trace, event, before, after):
    hits = [t for t, e, _ in trace if e == event and after <= t <= before]
    return hits[-1] if hits else None


def decompose(trace, stop_t, resume_t):
    """{step: ms} of one pause, STOP at ``stop_t`` and RESUME at ``resume_t`` (seconds):
    the steps of its critical path in the order they ran.  The transaction is one of
    them when it runs before ``migrate`` (QEMU < 9.0); after it (>= 9.0) it runs in
    QEMU's main loop beside the migration thread's setup and is given apart, as
    "transaction beside the setup"."""
    tx = (_first(trace, "qmp_enter_transaction", stop_t), _first(trace, "qmp_exit_transaction", stop_t))
    migrate = _first(trace, "qmp_enter_migrate", stop_t)
    held = migrate is None  # QEMU < 8.0: migrate went first, QEMU waits in its setup
    before = tx[0] is not None and (held or migrate is not None and tx[0] < migrate)
    marks = [("stop", _first(trace, "qmp_exit_stop", stop_t))]
    if before:
        marks += [("to transaction", tx[0]), ("transaction", tx[1])]
    if held:
        marks += [("release+setup", _first(trace, "migration_thread_setup_complete", stop_t))]
    else:
        marks += [("to migrate", migrate),
                  ("thread start+populate", _first(trace, "savevm_state_setup", stop_t)),
                  ("setup", _first(trace, "migration_thread_setup_complete", stop_t))]
    wp = _last_before(trace, "ram_write_tracking_ramblock_start", resume_t, stop_t)
    marks += [("device state", _last_before(trace, "savevm_section_end", wp or resume_t, stop_t)),
              ("write-protect", wp)]
    cont = _last_before(trace, "qmp_enter_cont", resume_t, wp or stop_t)
    if cont is not None:  # >= 9.0: qsnap's cont
        marks += [("to cont", cont), ("cont", resume_t)]
    else:
        marks += [("to resume", resume_t)]
    out, prev = {}, stop_t
    for what, t in marks:
        out[what] = None if t is None else round((t - prev) * 1000, 2)
        prev = t if t is not None else prev
    if not before and None not in tx:
        out["transaction beside the setup"] = round((tx[1] - tx[0]) * 1000, 2)
    if held:  # what QEMU did before the pause: start its thread, read guest RAM
        start = _last_before(trace, "qmp_exit_migrate", stop_t, stop_t - 600)
        setup = _last_before(trace, "savevm_state_setup", stop_t, start or stop_t)
        out["before the pause: thread start+populate"] = \
            None if None in (start, setup) else round((setup - start) * 1000, 2)
    out["downtime"] = round((resume_t - stop_t) * 1000, 2)
    return out


def _stamp(event):
    return event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6


def run(args):
    from qsnap.vm import qmp as qmpmod
    from qsnap.vm import snapshot as vm_snapshot

    e2e.BUILD = e2e.find_qemu(args.qemu)
    work = Path(args.dir) / f"qsnap-pause-trace-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        events = work / "events"
        events.write_text("\n".join(TRACE_EVENTS) + "\n")
        trace = work / "trace.log"
        blobs = e2e.make_blob_files(work / "blobs", e2e.blob_layout(args.size, args.fill / 100))
        disks = [work / f"d{i}.qcow2" for i in range(e2e.DISKS)]
        for d in disks:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d), "8G"], check=True)
        sock = work / "snap.qmp"
        # -msg timestamp=on: the log backend then starts each line with PID@SECONDS.MICROSECONDS
        extra = ["-qmp", f"unix:{sock},server=on,wait=off", "-trace", f"events={events},file={trace}",
                 "-msg", "timestamp=on"]
        rounds = []
        calls = []
        real_cmd = qmpmod.Qmp.cmd

        def timed_cmd(self, name, arguments=None, **kw):
            t0 = time.time()
            try:
                return real_cmd(self, name, arguments, **kw)
            finally:
                calls.append([name, t0, time.time()])

        real_chain = qmpmod.Qmp.cmd_chain

        def timed_chain(self, groups, **kw):
            t0 = time.time()
            try:
                return real_chain(self, groups, **kw)
            finally:
                calls.append([" then ".join(n for g in groups for n, _ in g), t0, time.time()])

        qmpmod.Qmp.cmd = timed_cmd
        qmpmod.Qmp.cmd_chain = timed_chain
        with e2e.guest(args.size, disks, "src", extra, blobs=blobs) as vm:
            vm.wait_bios_done(timeout=120)
            vm.set_capabilities(events=True, background_snapshot=True)
            vm.migrate("exec:cat > /dev/null")  # the untimed first one
            e2e.wait_status(vm, ("completed",), time.monotonic(), args.timeout)
            for i in range(args.snapshots):
                os.sync()
                img = work / f"snap{i}.qsnap"
                seen = len(vm.events())
                calls.clear()
                trace.write_text("")
                out = vm_snapshot.snapshot(str(sock), str(img), mode="background", disks="overlay")
                new = vm.events()[seen:]
                stop_t = _stamp(next(e for e in new if e["event"] == "STOP"))
                resume_t = _stamp([e for e in new if e["event"] == "RESUME"][-1])
                rounds.append({"downtime_ms": out["downtime_ms"], "hugepages": out["hugepages"],
                               "steps_ms": decompose(parse_trace(trace.read_text()), stop_t, resume_t),
                               "qmp_ms": [[n, round((a - stop_t) * 1000, 2), round((b - a) * 1000, 2)]
                                          for n, a, b in calls if -1 < a - stop_t < 1]})
                print(f"snapshot {i}: {rounds[-1]['steps_ms']}", file=sys.stderr, flush=True)
                img.unlink()
        return {"qemu": e2e.BUILD.version, "size": args.size, "fill": args.fill,
                "loadavg_1min": os.getloadavg()[0], "rounds": rounds}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qemu", default="7.2", help="7.2, 10.0 or a binary (bench.e2e's --qemu)")
    ap.add_argument("--size", type=e2e.parse_size, default=e2e.parse_size("3G"))
    ap.add_argument("--fill", type=int, default=67, help="non-zero share of guest RAM, %%")
    ap.add_argument("--snapshots", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp", help="work directory")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args(argv)
    doc = run(args)
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
