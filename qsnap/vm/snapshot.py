"""qsnap snapshot: RAM, devices and disks of a running VM, consistent to the instant.

The RAM and device state go to a ``qsnap save IMG`` started here, before any pause,
whose stdin pipe QEMU migrates into (``getfd`` + ``migrate fd:NAME``, see
qsnap/vm/savechild.py); the disks go on in new qcow2 overlays made in one QMP
transaction while the guest is paused at exactly the instant the RAM snapshot stands
for (libvirt does the same):

- stopped:    stop -> overlays -> migrate -> the save's report -> cont
- live:       migrate (pause-before-switchover) -> status pre-switchover (QEMU has
              stopped the guest) -> overlays -> migrate-continue -> report -> cont
- background: stop -> overlays -> migrate (background-snapshot) -> the guest resumes
              once QEMU saved the device state and write-protected RAM (see
              _resume_background) -> report; on QEMU >= 9.0, which keeps the guest
              paused until qsnap's cont, stop -> migrate -> overlays (during QEMU's
              setup) -> cont when the save reads the first RAM page -> report

A paused VM is saved as stopped and stays paused.  Every migration capability and
parameter changed is put back on every path; a failure after the overlays commits
them back; the VM ends in the run state it had.  The wait is for the save's own
--report, not for QEMU's ``completed``: QEMU 10.0 reports ``completed`` before the
image is renamed into place, and without a return path QEMU never learns of a
failure after the last byte.

Incremental snapshots (``parent``, or ``incremental``: this VM's last snapshot) give
the save ``--parent``: the image stores only what changed since.  The disks chain by
themselves: the VM runs on the overlays the last snapshot made, which this one
freezes.  The last snapshot of a QEMU process is a small record in the state
directory (last_snapshot), written when a snapshot succeeds.
"""
import json
import os
import shutil
import sys
import tempfile
import time

from qsnap.errors import QsnapError, VmError
from qsnap.vm import disks as vmdisks
from qsnap.vm import hugepages, migration, overlays, qemuthreads, vmrecord
from qsnap.vm.progress import Progress
from qsnap.vm.qmp import Qmp
from qsnap.vm.savechild import SaveChild

MODES = ("background", "live", "stopped")
# QEMU >= 9.0 resumes a background snapshot's VM into the run state it found
# (vm_resume(s->vm_old_state) in bg_migration_vm_start_bh, migration/migration.c);
# before, it always started it (vm_start()).
BG_KEEPS_RUNSTATE = (9, 0)
# QEMU before 8.0 writes a background snapshot's header and setup into its stream
# without the BQL, after it read every page of guest RAM and before it stops the
# guest (bg_migration_thread): a full pipe keeps it there while QMP answers
# (_stop_in_setup; seen on 7.2).  8.1 holds the BQL there ("migration: hold the BQL
# during setup"); 8.0 is left out lest one of its stable releases took that fix.
BG_SETUP_UNLOCKED_BEFORE = (8, 0)
SETUP_WAIT = 600.0             # s for QEMU to read guest RAM before its setup (1 TiB: ~5 s)
SETUP_POLL = 0.0005            # s between looks at QEMU's migration thread
SETUP_ASLEEP = 0.05            # s it sleeps before that counts as waiting in its setup
QMP_FREE_TIMEOUT = 5.0         # s for QMP to answer while QEMU waits in its setup
MAX_BANDWIDTH = 16 << 30       # bytes/s: no rate limit for the snapshot's stream
SWITCHOVER_TIMEOUT = 3600.0    # live mode: precopy converging to the switch-over
RESUME_TIMEOUT = 60.0
# s between QMP looks while waiting for the save to see the first RAM page: a query
# sent while QEMU holds the BQL is answered only when it lets go, after the signal
RAM_SIGNAL_WAIT = 0.1
END_TIMEOUT = 600.0
SAVE_START_TIMEOUT = 60.0      # s for the save child to start reading its stream
POLL = 0.02
SETTLE_TIMEOUT = 60.0          # s for QEMU to leave finish-migrate after `completed`
# query-status run states a snapshot can start from; the others (inmigrate,
# postmigrate after a failed switch-over, shutdown, internal-error...) are refused.
STARTABLE = {"running": True, "paused": False, "prelaunch": False, "postmigrate": False}


def snapshot(qmp_path, image, *, mode="background", disks="overlay", progress=None,
             parent=None, incremental=False):
    """Snapshot the VM whose QMP socket is ``qmp_path`` into ``image``; the summary dict.

    ``parent``: an image the new one is incremental to; ``incremental``: the
    VM's last snapshot (taken by qsnap snapshot of this QEMU process)."""
    if mode not in MODES:
        raise VmError(f"unknown snapshot mode {mode!r} (one of {', '.join(MODES)})")
    if parent and incremental:
        raise VmError("--parent and --incremental exclude each other")
    snap = _Snapshot(qmp_path, os.path.abspath(image), mode, disks == "overlay", progress)
    snap.parent = os.path.abspath(parent) if parent else None
    snap.incremental = incremental
    return snap.run()


class _Snapshot:
    def __init__(self, qmp_path, image, mode, with_disks, progress):
        self.qmp_path = qmp_path
        self.image = image
        self.mode = mode
        self.with_disks = with_disks
        self.progress = progress
        self.q = None
        self.disks = []
        self.was_running = False
        self.record = None
        self.workdir = None
        self.migrating = False
        self.events_before = {}
        self.downtime_ms = None
        self.resumed = False
        self.identity = None  # (QEMU version, package, machine type)
        self.cmdline = None
        self.cwd = None
        self.child = None     # the SaveChild
        self.fd_named = False  # QEMU may hold the pipe under fd_name
        self.fd_name = f"qsnap-snapshot-{os.getpid()}"
        self.parent = None       # the image the save is incremental to
        self.incremental = False  # parent = the VM's last snapshot
        self.hugepages = None  # background: guest RAM collapsed into huge pages first
        self.collapsing = None  # ... by this hugepages.Collapse, while the rest gets ready
        self.holding = False   # QEMU < 8.0: the save's pipe holds QEMU in its setup

    # -- the whole operation ------------------------------------------------------------

    def run(self):
        t0 = time.monotonic()
        with Qmp(self.qmp_path) as q:
            self.q = q
            self._preflight()
            settings = migration.Settings(q)
            self.workdir = tempfile.mkdtemp(prefix="qsnap-snapshot-")
            try:
                try:
                    report = self._take(settings)
                except BaseException as e:
                    self._undo(e)
                    raise
                finally:
                    settings.restore()
            finally:
                if self.child:
                    self.child.stop()
                shutil.rmtree(self.workdir, ignore_errors=True)
            remember_snapshot(q.pid, self.image, self.disks)
        return self._summary(report, time.monotonic() - t0)

    def _warnings(self):
        """What the operator should know of a snapshot that succeeded: frozen images the
        VM's QEMU still holds open for writing.  QEMU reopens the old top read-only after
        the overlay (external_snapshot_commit, blockdev.c) and ignores a failed reopen;
        one opened by a relative name before -daemonize moved QEMU to / fails it."""
        return [f"QEMU still holds disk {d.name}'s frozen image {d.image} open for writing "
                "(it could not reopen it read-only: a relative disk path and -daemonize?); "
                "VMs restored from this snapshot start only once that QEMU has stopped"
                for d in self.disks if vmdisks.write_locked(d.image)]

    # -- before touching the VM ---------------------------------------------------------

    def _preflight(self):
        q = self.q
        _check_image_dir(self.image)
        migration.require_idle(q)
        status = q.cmd("query-status")["status"]
        if status not in STARTABLE:
            raise VmError(f"the VM at {q.path} is {status!r}: a snapshot needs a running or paused VM")
        self.was_running = STARTABLE[status]
        if not self.was_running:
            self.mode = "stopped"  # its RAM cannot change: the plain stopped save is exact
        if self.mode == "background":
            migration.probe_capability(q, "background-snapshot")
        blocks = q.cmd("query-block")
        # where QEMU's relative paths point (a daemonized QEMU's cwd is /)
        self.cwd = vmrecord.start_dir(q.pid, overlays.file_names(blocks))
        writable = overlays.writable_disks(blocks, self.cwd)
        if self.with_disks:
            self.disks = overlays.plan(writable, self.image)
        self.identity = vmrecord.qemu_identity(q)
        self.cmdline = vmrecord.read_cmdline(q.pid)
        if self.incremental:
            self.parent = last_snapshot(q.pid, writable, q.path)
        if self.parent and not os.path.isfile(self.parent):
            raise VmError(f"parent image {self.parent} does not exist")

    # -- taking it ----------------------------------------------------------------------

    def _take(self, settings):
        self.events_before = {n: len(self.q.events(n)) for n in ("STOP", "RESUME")}
        if self.mode == "background":
            settings.set_capability("background-snapshot", True)
        else:
            settings.set_parameter("max-bandwidth", MAX_BANDWIDTH)
        if self.mode == "live" and self.disks:
            settings.set_capability("pause-before-switchover", True)
        if self.mode == "background":
            # QEMU walks guest RAM's page tables twice, with disks both times in the
            # pause: fewer entries to walk, made while the guest still runs, and while
            # the overlays and the save are made ready (qsnap/vm/hugepages.py)
            self.collapsing = hugepages.Collapse(self.q)
        overlays.prepare(self.disks)
        self._start_save()
        {"stopped": self._stopped, "live": self._live, "background": self._background}[self.mode]()
        report = self._wait_save()
        self._wait_completed()
        self._resume_when_streamed()
        self.downtime_ms = self._downtime_ms()
        return report

    def _stopped(self):
        if self.was_running:
            self.q.cmd("stop")
        overlays.take(self.q, self.disks)
        if not self.was_running:
            self._write_record()  # it stays paused: no downtime to wait for
        self._migrate()

    def _live(self):
        self._migrate()
        if not self.disks:
            return
        migration.wait_status(self.q, ("pre-switchover",), SWITCHOVER_TIMEOUT,
                              "waiting for the switch-over")
        overlays.take(self.q, self.disks)
        self.q.cmd("migrate-continue", state="pre-switchover")

    def _background(self):
        self.hugepages = self.collapsing.result()
        if not self.disks:
            self._write_record()
            self._migrate()  # QEMU stops and resumes the guest itself
            return
        if self.holding:
            self._stop_in_setup()
        else:
            self._stop_and_migrate()
        # fingerprinting the frozen images takes milliseconds: do it while QEMU sets
        # up the stream rather than while the guest waits (qsnap save waits for it)
        self._write_record()
        self._resume_background()
        self._write_record()  # with the downtime, if the save has not finished yet

    def _stop_and_migrate(self):
        """``stop``, the overlay transaction and ``migrate``, with no round trip through us
        between them: QEMU runs a monitor's commands in the order sent, each as soon as it
        answered the one before.

        QEMU < 9.0 resumes the guest itself at the end of the migration's setup, so the
        transaction goes before ``migrate``; were it refused, the migration runs all the
        same, of a guest QEMU resumes on its old disks: _undo waits for the end of the
        stream (cancelling a background snapshot wedges QEMU 7.2) and drops the image.
        QEMU >= 9.0 keeps the VM paused until our ``cont`` (_resume_background), so the
        guest is paused from ``stop`` on and disks and RAM stand for that instant
        whatever the order: the transaction follows ``migrate`` (once it succeeded) and
        runs in QEMU's main loop while the migration thread reads every page of guest
        RAM (14-24 ms of a 3 GiB guest), not before it; a refused one cancels the
        migration (_undo: such a QEMU cancels a background snapshot cleanly)."""
        stop = ("stop", None)
        take = ("transaction", {"actions": overlays.actions(self.disks)})
        migrate = ("migrate", {"uri": "fd:" + self.fd_name})
        groups = [[stop, migrate], [take]] if self._qemu_keeps_paused() else [[stop, take, migrate]]
        self.migrating = True  # as in _migrate: an interrupt must still find it to end
        self._chain_in_pause(groups)

    def _chain_in_pause(self, groups):
        """Run ``groups`` of commands (Qmp.cmd_chain) around the pause: {name: reply},
        once the overlays are noted as made if the transaction went through and the
        pipe's name as taken if ``migrate`` did; VmError, the first failure in the
        order sent."""
        replies = dict(zip([name for group in groups for name, _ in group], self.q.cmd_chain(groups)))
        if _went_through(replies.get("transaction")):
            overlays.mark_made(self.disks)
        if _went_through(replies.get("migrate")):
            self.fd_named = False  # migrate took it (monitor_get_fd, monitor/fds.c)
        for reply in replies.values():
            if isinstance(reply, VmError):
                raise reply
        return replies

    def _stop_in_setup(self):
        """QEMU < 8.0: ``migrate`` first, then ``stop`` and the transaction once QEMU's
        migration thread has read every page of guest RAM (ram_write_tracking_prepare,
        12-22 ms of a 3 GiB guest) with the guest still running, as QEMU's own background
        snapshot does.

        Before it stops the guest itself, that thread writes the stream's setup into the
        save's pipe, without the BQL (BG_SETUP_UNLOCKED_BEFORE), and the pipe is full of
        our filler (SaveChild.fill_pipe): it waits there, in the setup state, with QMP
        still answering, until release() takes the filler out, after our ``stop`` and
        the transaction.  So QEMU stops the guest (and takes RAM's instant) after us,
        whenever its thread gets there; the wait for it to sleep in the pipe only
        keeps its reading of guest RAM out of the pause.  query-migrate after the
        transaction checks that QEMU was still in its setup (were it not, _undo would
        commit the overlays back)."""
        pid = self.q.pid
        before = qemuthreads.tasks(pid)
        self._migrate()
        self._wait_in_setup(pid, before)
        self.q.cmd("query-status", timeout=QMP_FREE_TIMEOUT)  # QEMU holds no lock while it waits
        take = ("transaction", {"actions": overlays.actions(self.disks)})
        status = self._chain_in_pause([[("stop", None), take, ("query-migrate", None)]])["query-migrate"]
        if status.get("status") != "setup":
            raise VmError(f"QEMU left its migration setup ({status.get('status')!r}) before the "
                          "pause: the disks would not match the RAM; nothing was saved")
        self.child.release()

    def _wait_in_setup(self, pid, before):
        """Until a thread ``migrate`` started sleeps writing to the save's pipe (QEMU read
        guest RAM and wrote its setup) or, where the kernel does not say where threads
        sleep, has slept for SETUP_ASLEEP s; or the migration failed, or SETUP_WAIT s
        passed.  An early end only lets the pause begin sooner: QEMU cannot get past
        its setup before release()."""
        deadline = time.monotonic() + SETUP_WAIT
        next_look = asleep_since = 0.0
        while True:
            new = qemuthreads.tasks(pid) - before
            if qemuthreads.writing_pipe(pid, new):
                return
            now = time.monotonic()
            asleep_since = (asleep_since or now) if qemuthreads.sleeping(pid, new) else 0.0
            if (asleep_since and now - asleep_since > SETUP_ASLEEP) or now > deadline:
                return
            if now > next_look:  # now and then: a failed migration ends the wait
                if migration.status(self.q) != "setup":
                    return
                next_look = now + RAM_SIGNAL_WAIT
            time.sleep(SETUP_POLL)

    def _holds_setup(self):
        """True when _stop_in_setup can keep QEMU's reading of guest RAM out of the pause:
        a background snapshot with disks, a QEMU that writes its setup without the BQL,
        and QEMU's threads in sight (/proc/PID/task)."""
        return (self.mode == "background" and bool(self.disks)
                and self._qemu_version() < BG_SETUP_UNLOCKED_BEFORE
                and self.q.pid is not None and bool(qemuthreads.tasks(self.q.pid)))

    def _resumes_on_first_page(self):
        """True when our ``cont`` ends the pause: a background snapshot with disks (which
        pauses the guest itself) on a QEMU that keeps a paused VM paused."""
        return self.mode == "background" and bool(self.disks) and self._qemu_keeps_paused()

    def _qemu_keeps_paused(self):
        """True for a QEMU whose background snapshot leaves a paused VM paused."""
        return self._qemu_version() >= BG_KEEPS_RUNSTATE

    def _qemu_version(self):
        return tuple(int(x) for x in self.identity[0].split(".")[:2])

    def _resume_background(self):
        """Let the guest run again once QEMU has saved the device state.

        QEMU < 9.0 starts the VM itself (a RESUME event).  QEMU >= 9.0 puts back the
        run state it found, paused, so we ``cont``, but only after its bg thread has
        saved the device state and write-protected RAM under the BQL: it sends RAM
        pages only after that (bg_migration_thread, migration/migration.c), so the
        first RAM section the save reads is the signal (_cont_on_first_ram_page)."""
        if not self._qemu_keeps_paused():
            self.q.wait_event("RESUME", RESUME_TIMEOUT, since=self.events_before["RESUME"])
            return
        self._cont_on_first_ram_page()

    def _cont_on_first_ram_page(self):
        """``cont`` as soon as QEMU sends RAM pages; nothing when the migration failed
        (_undo resumes the VM).  The save tells at once (save --notify-fd), and the
        ``cont`` leaves from the QMP session's thread as it wakes on that byte, without a
        round trip through this one.  query-migrate now and then covers a save that
        cannot tell (it failed and only drains the stream, or exited) and a migration
        that failed.  A query sent while QEMU's thread holds the BQL is answered once
        it lets go.  The VM is paused (`stop`, and QEMU keeps it so); were it resumed
        by someone else meanwhile, `cont` would only send a STOP/RESUME pair."""
        deadline = time.monotonic() + RESUME_TIMEOUT
        while True:
            fd = self.child.ram_fd
            if fd is None:  # the save ended: it can no longer tell
                time.sleep(RAM_SIGNAL_WAIT)
            elif self.q.cmd_when_readable(fd, self.child.ram_pages_flowing, "cont", RAM_SIGNAL_WAIT):
                return
            info = self.q.cmd("query-migrate")
            if info.get("status") in ("failed", "cancelled"):
                return
            if migration.ram_pages_sent(info) > 0 or info.get("status") == "completed":
                self.q.cmd("cont")
                return
            if time.monotonic() > deadline:
                raise VmError(f"QEMU sent no RAM page within {RESUME_TIMEOUT:g} s of the "
                              "background snapshot's start")

    def _write_record(self):
        """Write (again) the VM record the save stores, with the downtime known so far.

        The save reads it once, when the stream has ended (waiting up to a few seconds
        for it: qsnap.save.VM_INFO_WAIT).  A background snapshot's guest resumes long
        before that; a running live or stopped one only once QEMU has sent the whole
        stream, so for those it is first written after that resume, downtime included."""
        if self.record is None:
            self.record = vmrecord.build(self.identity, self.cmdline, self.cwd, self.mode,
                                         self.was_running, self.disks)
        self.record["downtime_ms"] = self._downtime_ms()
        vmrecord.write(self._path("vm.json"), self.record)

    def _start_save(self):
        """Start the save and give QEMU its stdin pipe, before the guest is paused."""
        parent = ["--parent", self.parent] if self.parent else []
        self.holding = self._holds_setup()
        self.child = SaveChild(["--quiet", "--vm-info", self._path("vm.json"),
                                "--report", self._path("report.json"), *parent, self.image],
                               self._path("save.stderr"),
                               notify=self._resumes_on_first_page() or self.holding,
                               hold=self.holding)
        self.fd_named = True  # first: an interrupt during getfd must still close it
        try:
            self.q.pass_fd(self.fd_name, self.child.qemu_fd)
            # the pause ends when the save reads the first RAM section, or begins once
            # it holds QEMU: its interpreter and imports (0.1-0.3 s) must be behind it
            if self.child.ram_fd is not None and not self.child.wait_reading(SAVE_START_TIMEOUT):
                if self.child.ram_fd is None:  # it told us it ended
                    raise VmError(f"qsnap save failed before it read its stream: "
                                  f"{self.child.last_error() or self.child.describe_status()}")
                raise VmError(f"qsnap save did not start reading within {SAVE_START_TIMEOUT:g} s: "
                              f"it {self.child.describe_end()}")
            # after the save made its pipe larger, before QEMU writes
            if self.holding and not self.child.fill_pipe():
                self.child.release()
                self.holding = False
        finally:
            self.child.close_qemu_end()  # QEMU's copy is the only writer now

    def _migrate(self):
        # set first: an interrupt while QEMU's reply is on its way must still find the
        # migration to end before the capabilities can be put back
        self.migrating = True
        self.q.cmd("migrate", uri="fd:" + self.fd_name)
        self.fd_named = False  # migrate took it (monitor_get_fd, monitor/fds.c)

    def _close_fd_name(self):
        """closefd the pipe's name unless migrate took it, so that QEMU holds no writer
        and the save sees the end of its stream."""
        if not self.fd_named:
            return
        try:
            self.q.cmd("closefd", fdname=self.fd_name)
        except VmError as e:
            if "not found" not in str(e):  # a migrate that failed after taking it
                raise
        self.fd_named = False

    # -- waiting for the save -----------------------------------------------------------

    def _wait_save(self):
        """The save's report; VmError with its error when it failed (after QEMU ended
        the migration, so that nothing is left running)."""
        shown = Progress(sys.stderr, f"qsnap: saving {self.image}") if self.progress else None
        path = self._path("report.json")
        try:
            while not os.path.exists(path):
                if not self.child.running():
                    self._no_report(path)
                    break
                self._resume_when_streamed()
                self._record_downtime()
                if shown:
                    shown.tick(self.q)
                time.sleep(POLL)
        finally:
            if shown:
                shown.done()
        with open(path) as f:
            report = json.load(f)
        if not report.get("ok"):
            self._cancel_migration()
            raise VmError(f"saving {self.image} failed: {report.get('error')}")
        return report

    def _resume_when_streamed(self):
        """live/stopped: the guest runs again as soon as QEMU has sent the whole stream
        (``completed``), while the save still finishes the image."""
        if self.mode == "background" or not self.was_running or self.resumed:
            return
        if migration.status(self.q) == "completed":
            self._cont()
            self.resumed = True
            self._write_record()  # the save waits for it: see _write_record

    def _record_downtime(self):
        """Background: the record again once the downtime is known (the save reads it
        only at the end of the stream)."""
        if self.record is not None and self.record["downtime_ms"] is None \
                and self._downtime_ms() is not None:
            self._write_record()

    def _cont(self):
        """``cont`` unless running.  QEMU reports a precopy ``completed`` before its
        migration thread takes the run state from finish-migrate to postmigrate
        (migration_iteration_finish, migration/migration.c) and refuses ``cont`` in
        between ("Migration is not finalized yet", qmp_cont, monitor/qmp-cmds.c): a
        window a loaded host makes wide enough to hit."""
        status = migration.wait_run_state_left(self.q, "finish-migrate", SETTLE_TIMEOUT)
        if status != "running":
            self.q.cmd("cont")

    def _no_report(self, path):
        """The save is gone: its report must be there, else VmError with QEMU's view."""
        if os.path.exists(path):
            return
        info = migration.wait_ended(self.q, END_TIMEOUT)
        if not os.path.exists(path):
            self.migrating = False
            raise VmError(f"qsnap save {self.child.describe_end()}, without a report (migration "
                          f"{info.get('status')}: {info.get('error-desc', 'no reason given')})")

    def _wait_completed(self):
        info = migration.wait_ended(self.q, END_TIMEOUT)
        self.migrating = False
        if info.get("status") != "completed":
            _unlink_quiet(self.image)  # QEMU failed it: the image does not stand for the VM
            raise VmError(f"the migration {info.get('status')} after qsnap save finished: "
                          f"{info.get('error-desc', 'no reason given')}")

    # -- failure ------------------------------------------------------------------------

    def _undo(self, error):
        """Put the VM back as it was: no migration, old disk chain, old run state."""
        problems = []
        # the pipe's name first: a migrate that never ran leaves QEMU holding the save's
        # stream open.  The run state before the disks: `cont` also reactivates disks a
        # completed migration left inactive, and block-commit needs them active
        for step in (self._close_fd_name, self._cancel_migration, self._restore_run_state,
                     self._roll_back_disks, self._discard_overlays):
            try:
                step()
            except Exception as e:  # keep undoing: each step stands alone
                problems.append(str(e))
        if problems and isinstance(error, VmError):
            error.args = (f"{error}; and while undoing it: {'; '.join(problems)}",)

    def _cancel_migration(self):
        """End our migration, and make sure no image of it appears afterwards."""
        if self.child:
            self.child.release()  # a QEMU held in its setup goes on, and the save reads
        if not self.migrating:
            return
        if self.mode == "background" and not self._qemu_keeps_paused():
            # QEMU 7.2 wedges (QMP `quit` never answers) after migrate_cancel of a
            # background snapshot: let it finish the stream; the save (failed or not)
            # reads it to the end.  Its completion leaves the disks active
            # (bg_migration_completion, migration/migration.c).  QEMU >= 9.0 cancels
            # one cleanly, in setup or active, and must: it keeps the VM paused
            # until the `cont` that follows.
            migration.wait_ended(self.q, END_TIMEOUT)
        elif migration.status(self.q) not in migration.IDLE_STATUSES:
            # cancel before QEMU completes: a completed precopy inactivates the disks,
            # and no overlay can be committed back then (and a background snapshot on
            # QEMU >= 9.0 keeps the VM paused while its setup lasts)
            self.q.cmd("migrate_cancel")
            migration.wait_ended(self.q, END_TIMEOUT)
        self.migrating = False
        self._drop_finished_image()

    def _drop_finished_image(self):
        """An interrupted snapshot must not leave an image: wait for the save to end
        (it may still finish successfully) and remove what it made."""
        path = self._path("report.json")
        if self.child:
            self.child.wait(END_TIMEOUT)
        try:
            with open(path) as f:
                finished = json.load(f).get("ok")
        except (OSError, ValueError):
            finished = False
        if finished:
            _unlink_quiet(self.image)

    def _roll_back_disks(self):
        if any(d.made for d in self.disks) and self.q.cmd("query-status")["status"] == "postmigrate":
            raise VmError("the migration completed before the failure was known, which left the "
                          "paused VM's disks inactive; they are activated again by `cont`, after "
                          "which the overlays " + ", ".join(d.overlay for d in self.disks if d.made)
                          + " can be committed (block-commit)")
        overlays.roll_back(self.q, self.disks)

    def _discard_overlays(self):
        overlays.discard(self.disks)

    def _restore_run_state(self):
        if self.was_running:
            self._cont()

    # -- results ------------------------------------------------------------------------

    def _downtime_ms(self):
        """Guest-visible pause: QEMU's STOP event -> the next RESUME event, or None."""
        stops = self.q.events("STOP")[self.events_before.get("STOP", 0):]
        resumes = self.q.events("RESUME")[self.events_before.get("RESUME", 0):]
        if not stops or not resumes:
            return None
        t0, t1 = _stamp(stops[0]), _stamp(resumes[-1])
        return round((t1 - t0) * 1000, 3) if t1 >= t0 else None

    def _summary(self, report, seconds):
        return {"image": self.image, "parent": self.parent, "mode": self.mode,
                "was_running": self.was_running,
                "downtime_ms": self.downtime_ms, "seconds": round(seconds, 3),
                "ram_only": not self.disks,
                "disks": [{"device": d.device, "qdev": d.qdev, "frozen": d.image, "overlay": d.overlay}
                          for d in self.disks],
                "image_bytes": report.get("summary", {}).get("file_bytes"),
                "hugepages": self.hugepages, "warnings": self._warnings()}

    def _path(self, name):
        return os.path.join(self.workdir, name)


# --- the last snapshot of a VM ---------------------------------------------------------

def state_dir():
    """Where the last-snapshot records live: $QSNAP_STATE_DIR, else
    $XDG_RUNTIME_DIR/qsnap, else /tmp/qsnap-UID (per user, like a runtime dir)."""
    d = os.environ.get("QSNAP_STATE_DIR")
    if not d:
        run = os.environ.get("XDG_RUNTIME_DIR")
        d = os.path.join(run, "qsnap") if run else f"/tmp/qsnap-{os.getuid()}"
    return d


def _vm_key(pid):
    """A QEMU process, across pid reuse: its pid and start time (/proc/PID/stat
    field 22, clock ticks since boot), or None when they cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except (OSError, IndexError, TypeError):
        return None
    return f"{boot}-{pid}-{fields[19]}"


def _record_path(pid):
    key = _vm_key(pid)
    return os.path.join(state_dir(), f"last-snapshot-{key}.json") if key else None


def remember_snapshot(pid, image, disks):
    """Record ``image`` (its image_id) as the last snapshot of the QEMU ``pid``, and
    the overlays its disks now run on.  Best effort: a snapshot that succeeded is
    not failed by a record that cannot be written (--incremental then says so)."""
    from qsnap.image.metadata import read_metadata

    path = _record_path(pid)
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        doc = {"image": image, "image_id": read_metadata(image).get("image_id"),
               "overlays": sorted(d.overlay for d in disks)}
        from qsnap import atomic
        atomic.write_json(path, doc, indent=1)
    except (OSError, QsnapError):
        pass


def last_snapshot(pid, disks, qmp_path):
    """The image of the last snapshot of the QEMU ``pid`` (for --incremental), checked:
    it still exists with the content it had, and the VM's writable disks are on the
    overlays it left them on.  VmError saying what does not hold."""
    from qsnap.image.metadata import read_metadata

    path = _record_path(pid)
    try:
        with open(path or "") as f:
            doc = json.load(f)
        image = doc["image"]
    except (OSError, ValueError, KeyError, TypeError):
        raise VmError(f"the VM at {qmp_path} has no earlier snapshot by qsnap snapshot to be "
                      "incremental to (take a full one first, or name one with --parent)") from None
    try:
        image_id = read_metadata(image).get("image_id")
    except QsnapError as e:
        raise VmError(f"the VM's last snapshot {image} cannot be used: {e}") from None
    if image_id != doc.get("image_id"):
        raise VmError(f"the VM's last snapshot {image} no longer matches: it was replaced "
                      f"(image_id {doc.get('image_id')} recorded, {image_id} found)")
    now = sorted(d.image for d in disks)
    if doc.get("overlays") and now != doc["overlays"]:   # none: a RAM-only snapshot
        raise VmError(f"the VM's disks are no longer on the overlays its last snapshot {image} "
                      f"made ({', '.join(doc.get('overlays') or ['none'])}; now on "
                      f"{', '.join(now) or 'none'}): name the parent with --parent")
    return image


def _check_image_dir(image):
    d = os.path.dirname(image)
    if not os.path.isdir(d):
        raise VmError(f"cannot save {image}: directory {d} does not exist")
    if os.path.isdir(image):
        raise VmError(f"cannot save {image}: it is a directory")
    try:  # the real test: access() says yes to root even on a read-only mount... sometimes
        fd, probe = tempfile.mkstemp(prefix=".qsnap-probe-", dir=d)
    except OSError as e:
        raise VmError(f"cannot save {image}: cannot create files in {d}: {e.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def _went_through(reply):
    """True for the reply of a command QEMU ran (not refused, and sent at all)."""
    return reply is not None and not isinstance(reply, VmError)


def _stamp(event):
    ts = event["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def format_summary(s):
    """Human lines of a snapshot summary."""
    downtime = "n/a" if s["downtime_ms"] is None else f"{s['downtime_ms']:.1f} ms"
    state = "" if s["was_running"] else " (VM paused, left paused)"
    lines = [f"snapshot {s['image']}: mode {s['mode']}{state}, downtime {downtime}, "
             f"{s['seconds']:.2f} s"]
    if s.get("parent"):
        lines.append(f"incremental to {s['parent']}")
    if s["ram_only"]:
        lines.append("disks: none (RAM only)")
    for d in s["disks"]:
        lines.append(f"disk {d['device'] or d['qdev']}: frozen {d['frozen']}, VM now on {d['overlay']}")
    return "\n".join(lines)
