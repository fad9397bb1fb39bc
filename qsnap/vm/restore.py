"""qsnap restore: bring a snapshot image back into a QEMU.

``restore_into(qmp_path, img)``: into a QEMU the user started with ``-incoming defer``.
``launch(img)``: start QEMU from the command line the image recorded, then restore.

Both check everything they can before the guest's state moves (run state, machine
type, RAM blocks, disks and their frozen images), put each disk on a fresh overlay
of its frozen image (so the snapshot stays untouched and restores any number of
times), then load the image with a ``qsnap load`` started beforehand (while QEMU
starts or is checked) and handed to QEMU over QMP: ``getfd`` + ``migrate-incoming
"fd:NAME"`` (qsnap.vm.savechild.LoadChild).
"""
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

from qsnap.errors import VmError
from qsnap.vm import disks as vmdisks
from qsnap.vm import migration, overlays, vmrecord
from qsnap.vm.savechild import LoadChild, process_cpu

# The QMP session (qsnap.vm.qmp: asyncio and qemu.qmp, ~0.1-0.2 s of imports) is imported
# where it is first used: `restore --launch` imports it while the QEMU it started comes up.

POLL = 0.05                   # waiting for QEMU to exit or a file to appear
SOCKET_POLL = 0.005           # waiting for the launched QEMU's QMP socket: it is on the clock
POSTCOPY_POLL = 0.002         # postcopy-active: query-status until the guest may run
ALIVE_EVERY = 1.0             # between MIGRATION events, ask QEMU this often whether it lives
START_TIMEOUT = 30.0          # QEMU start-up until its QMP socket answers
EXIT_GRACE = 2.0              # after a failed incoming migration, until QEMU has exited
LOAD_TIMEOUT = 24 * 3600.0    # a stalled load ends when QEMU or qsnap load exits
LOAD_EXIT_GRACE = 0.5         # after a failure, for qsnap load to end on its own before SIGTERM
UNIX_PATH_MAX = 107           # sun_path holds 108 bytes with the NUL


# --- what the image says --------------------------------------------------------------

class ImageFacts:
    """What a restore needs to know about an image: machine, RAM blocks, VM record.

    Read from the metadata document alone (qsnap.image.metadata: a few KiB, no NumPy);
    the `qsnap load` the restore starts checks the metadata before its first byte, and
    every page as it sends it."""

    def __init__(self, path):
        from qsnap.image.metadata import read_metadata

        self.path = os.path.abspath(path)
        doc = read_metadata(self.path)
        self.vm = doc.get("vm")
        self.blocks = [(b["idstr"], b["length"]) for b in doc["ram_blocks"]]
        self.machine = (self.vm or {}).get("machine") or doc["machine"]
        self.qemu_version = (self.vm or {}).get("qemu_version")
        self.disks = list((self.vm or {}).get("disks") or [])

    def readahead(self):
        """Have the kernel read what `qsnap load` reads first (qcow2 tables, metadata
        region) while the restore does something else: the load child finds it cached."""
        from qsnap.image.metadata import readahead

        readahead(self.path)

    def origin(self):
        """'saved by QEMU 10.0.2 with machine type pc-i440fx-10.0' (what is known of it)."""
        who = f"QEMU {self.qemu_version}" if self.qemu_version else "a QEMU"
        return f"saved by {who} with machine type {self.machine or 'unknown'}"

    def was_running(self):
        return self.vm is None or bool(self.vm.get("was_running", True))


def check_frozen_disks(facts):
    """Every frozen image is there, unchanged, and written by no process: a destination
    opens it read-only, as the backing file of its overlay (an incoming QEMU takes its
    image locks only when the migration completes)."""
    for d in facts.disks:
        vmdisks.check_frozen(d)
        vmdisks.check_not_written(d)


# --- checks on the destination --------------------------------------------------------

def check_incoming(q):
    """The QEMU waits for an incoming migration that nobody has started yet.

    QEMU 7.2 reports nothing in query-migrate until the first byte of a stream
    arrives (fill_destination_migration_info, migration/migration.c), so an exec:
    migration already started shows as a child process of QEMU, and a -incoming
    other than defer on its command line."""
    status = q.cmd("query-status")["status"]
    if status != "inmigrate":
        raise VmError(f"the QEMU at {q.path} is {status}, not waiting for an incoming migration: "
                      "start it with -incoming defer")
    mig = migration.status(q)
    if mig not in ("none", "failed", "cancelled"):
        raise VmError(f"the QEMU at {q.path} already has an incoming migration ({mig})")
    argv = vmrecord.read_cmdline(q.pid) or []
    incoming = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-incoming", "--incoming")]
    if incoming and incoming[-1] != "defer":
        raise VmError(f"the QEMU at {q.path} was started with -incoming {incoming[-1]}, not -incoming "
                      "defer: it waits for that migration, and qsnap restore cannot start its own")
    kids = _children(q.pid)
    if kids:
        pid, cmd = kids[0]
        raise VmError(f"the QEMU at {q.path} already has an incoming migration running "
                      f"(its exec: command, pid {pid}: {cmd})")


def autostarts(q):
    """True if the QEMU at ``q`` starts the guest itself after an incoming migration
    (no -S on its command line); None if its command line cannot be read."""
    argv = vmrecord.read_cmdline(q.pid)
    if argv is None:
        return None
    return not any(a in ("-S", "--S") for a in argv[1:])


def _children(pid):
    """[(pid, command line)] of the live child processes of ``pid``."""
    out = []
    if not pid:
        return out
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.append((int(d), " ".join(vmrecord.read_cmdline(int(d)) or ["?"])))
    return out


def machine_type(q):
    """The running machine type: qom-get /machine type minus the "-machine" suffix."""
    t = q.cmd("qom-get", path="/machine", property="type")
    return t[:-len("-machine")] if t.endswith("-machine") else t


def qemu_version(q):
    v = q.cmd("query-version")["qemu"]
    return f"{v['major']}.{v['minor']}.{v['micro']}"


def check_machine(q, facts):
    if not facts.machine:
        return
    have = machine_type(q)
    if have == facts.machine:
        return
    names = {m["name"] for m in q.cmd("query-machines")} | {
        m.get("alias") for m in q.cmd("query-machines") if m.get("alias")}
    if facts.machine not in names:
        raise VmError(f"the image was {facts.origin()}, which QEMU {qemu_version(q)} does not "
                      "provide: restore it with a QEMU that does")
    raise VmError(f"the destination's machine type is {have}, the image's is {facts.machine} "
                  f"({facts.origin()}): start QEMU with -machine {facts.machine}")


_RAMBLOCK_LINE = re.compile(r"^\s*(\S+)\s+\d+\s*\S*B\s+0x([0-9a-fA-F]+)\s+0x([0-9a-fA-F]+)\s+0x([0-9a-fA-F]+)")


def ram_blocks(q):
    """{idstr: (used, max)} from HMP ``info ramblock`` (QMP has no such query)."""
    text = q.cmd("human-monitor-command", {"command-line": "info ramblock"})
    out = {}
    for line in text.splitlines():
        m = _RAMBLOCK_LINE.match(line)
        if m:
            out[m.group(1)] = (int(m.group(3), 16), int(m.group(4), 16))
    if not out:
        raise VmError(f"cannot read the RAM blocks of the QEMU at {q.path} (info ramblock said {text!r})")
    return out


def _mib(n):
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n} bytes"


def check_ram(q, facts):
    """The destination's RAM blocks must be the image's, with sizes QEMU can load.

    A resizable block (ACPI tables: used < max) may take another used length up to
    its max (ram_load_precopy calls qemu_ram_resize, migration/ram.c)."""
    have = ram_blocks(q)
    for idstr, length in facts.blocks:
        if idstr not in have:
            raise VmError(f"the destination has no RAM block {idstr} of {_mib(length)} the image holds "
                          "(started with other devices?)")
        used, most = have[idstr]
        if length != used and not (used < most and length <= most):
            hint = " (started with another -m?)" if idstr.endswith("ram") else ""
            raise VmError(f"RAM block {idstr} is {_mib(length)} in the image, {_mib(used)} on the "
                          f"destination{hint}")
    extra = sorted(set(have) - {i for i, _ in facts.blocks})
    if extra:
        raise VmError(f"the destination has RAM block {extra[0]} ({_mib(have[extra[0]][0])}) that the "
                      "image does not (started with other devices?)")


def plan_disks(q, facts):
    """[(query-block entry, recorded disk, "overlay" | "keep")] or VmError."""
    if not facts.disks:
        return []
    blocks = q.cmd("query-block")
    plan = []
    for d in facts.disks:
        b = vmdisks.find_device(blocks, d)
        plan.append((b, d, vmdisks.plan_overlay(b, d)))
    return plan


# --- the restore -----------------------------------------------------------------------

class OverlayFiles:
    """The restore's overlay files (<dir>/<frozen stem>.overlay.qcow2), each made by a
    qemu-img that runs beside the others and beside whatever the restore does meanwhile:
    `restore --launch` starts them with QEMU (it knows then that every recorded disk gets
    one), and the transaction waits for them (overlays.start_overlay)."""

    def __init__(self, directory):
        self.dir = directory
        self.used = set(os.listdir(directory))
        self.made = {}     # index of the disk in the VM record -> overlay path
        self.running = {}  # index -> (qemu-img process, what)

    def start(self, index, disk, backing_format, size):
        """Start making disk ``index``'s overlay (once); its path."""
        if index not in self.made:
            path = vmdisks.overlay_path(self.dir, disk, self.used)
            what = f"disk {vmdisks.disk_name(disk)}"
            self.running[index] = (overlays.start_overlay(path, disk["frozen"], backing_format, size, what),
                                   what)
            self.made[index] = path
        return self.made[index]

    def wait(self):
        """Until every started overlay is made; VmError (the first failure) otherwise."""
        failure = None
        for index, (proc, what) in list(self.running.items()):
            try:
                overlays.finish_overlay(proc, self.made[index], what)
            except VmError as e:
                failure = failure or e
                del self.made[index]  # finish_overlay left no file
            del self.running[index]
        if failure:
            raise failure

    def remove(self, keep=()):
        """End the qemu-img still running, remove every file made but those in ``keep``
        (those the QEMU's block graph uses)."""
        for proc, _ in self.running.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.running.clear()
        for index, path in list(self.made.items()):
            if path not in keep:
                _unlink(path)
                del self.made[index]


LOAD_LOG = "load.log"


def start_load(facts, workdir, postcopy=None):
    """The restore's ``qsnap load``, started now (it opens the image and waits for its
    reader): a LoadChild, its stderr in <workdir>/load.log."""
    args = ["-q"] + ([f"--postcopy={postcopy:g}"] if postcopy is not None else []) + [facts.path]
    return LoadChild(args, os.path.join(workdir, LOAD_LOG), return_path=postcopy is not None)


class Restore:
    """One restore into a connected ``-incoming defer`` QEMU, from the ``qsnap load``
    ``child`` (start_load); ``run()`` returns its summary."""

    def __init__(self, q, facts, workdir, child, *, postcopy=None, paused=False, files=None):
        self.q, self.facts, self.dir, self.child = q, facts, workdir, child
        self.postcopy, self.paused = postcopy, paused
        self.files = files or OverlayFiles(workdir)
        self.overlays = []        # the overlays put under the disks
        self.overlays_live = False  # QEMU's block graph uses them
        self.settings = None
        self.t0 = time.monotonic()
        self.seconds_to_run = None
        self.events_seen = 0      # MIGRATION events _wait has followed
        self.timeline = {}
        self.qemu_cpu = None      # QEMU's CPU time when the load completed (process_cpu)

    @property
    def load_log(self):
        return self.child.stderr_path

    def preflight(self):
        check_incoming(self.q)
        if self.paused and autostarts(self.q):
            raise VmError(f"--paused needs a destination started with -S: the QEMU at {self.q.path} "
                          "starts the guest itself when the restore completes")
        check_machine(self.q, self.facts)
        check_ram(self.q, self.facts)
        return plan_disks(self.q, self.facts)

    def run(self):
        plan = self.preflight()
        self._set_caps()
        self._mark("checked")
        try:
            self._put_overlays(plan)
            self._mark("overlays")
            self._start_load()
            self._mark("load started")
            self._wait()
        finally:
            self._put_back_caps()
        self.child.stop()  # its stream is complete: it ends on its own
        return self.summary()

    def _mark(self, what):
        """Note when a step ended (seconds since QMP connected): the summary's "timeline"."""
        self.timeline.setdefault(what, round(time.monotonic() - self.t0, 3))

    def _set_caps(self):
        """postcopy-ram for a postcopy restore; events, so that the MIGRATION events tell
        which states the restore went through.  Both put back by _put_back_caps."""
        self.settings = migration.Settings(self.q)
        self.settings.set_capability("events", True)
        if self.postcopy is not None:
            self.settings.set_capability("postcopy-ram", True)

    def _put_back_caps(self):
        if self.settings is None:
            return
        try:
            self.settings.restore()
        except VmError:
            if self.q_alive():
                raise

    def _put_overlays(self, plan):
        """All overlays in one transaction: either every disk gets one, or none does.
        The files are made first (qemu-img create -u), so QEMU only opens them."""
        actions = []
        tag = os.urandom(4).hex()  # node names unique in the QEMU's block graph
        for i, (block, disk, what) in enumerate(plan):
            if what != "overlay":
                continue
            image = block["inserted"].get("image") or {}
            path = self.files.start(i, disk, block["inserted"].get("drv") or disk["format"],
                                    image.get("virtual-size", disk["virtual_size"]))
            actions.append(vmdisks.overlay_action(block, path, f"qsnap-{tag}-{len(actions)}"))
            self.overlays.append(path)
        self.files.wait()
        self.files.remove(keep=self.overlays)  # made early for a disk that needs none
        if not actions:
            return
        try:
            self.q.cmd("transaction", actions=actions)
        except VmError as e:
            raise VmError(f"cannot put the disks on fresh overlays: {e}") from None
        self.overlays_live = True

    def _start_load(self):
        """QEMU gets the load's end of the stream (getfd) and migrates from it: QEMU 7.2
        and 10.0 look the name of an fd: incoming URI up among the monitor's fds
        (fd_start_incoming_migration: monitor_fd_param, migration/fd.c) and take a
        pipe or a socket (10.0: migration_fd_valid)."""
        self.events_seen = len(self.q.events("MIGRATION"))
        name = f"qsnap-load-{os.urandom(4).hex()}"
        self.q.pass_fd(name, self.child.qemu_fd)
        self.child.close_qemu_end()  # QEMU's copy is the only one now
        try:
            self.q.cmd("migrate-incoming", uri=f"fd:{name}")
        except VmError:
            self._close_fd(name)
            raise

    def _close_fd(self, name):
        """QEMU closes the fd a refused migrate-incoming left under ``name`` (if it did)."""
        try:
            self.q.cmd("closefd", fdname=name)
        except VmError:
            pass  # the command took it before it failed, or QEMU is gone

    def _wait(self):
        """Until the incoming migration completes, following its MIGRATION events (the
        "events" capability is on); the guest runs as soon as QEMU lets it."""
        want_running = not self.paused and self.facts.was_running()
        deadline = time.monotonic() + LOAD_TIMEOUT
        status = self._migration_status()
        while True:
            self._mark(status)
            if status == "completed" and self.qemu_cpu is None:
                self.qemu_cpu = process_cpu(self.q.pid)  # the load's, before the guest runs
            if status in ("postcopy-active", "completed") and want_running and self.seconds_to_run is None:
                self._run_guest()
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise VmError(self._failure(status))
            if time.monotonic() > deadline:
                raise VmError(f"the restore is still {status} after {LOAD_TIMEOUT:g} s")
            status = self._next_status(status, want_running)

    def _failure(self, status):
        """Why the incoming migration ended in ``status``.  QEMU 7.2 exits right after it
        fails (process_incoming_migration_co, migration/migration.c; later QEMUs unless
        exit-on-error is off); the event may come just before that, so wait a moment."""
        deadline = time.monotonic() + EXIT_GRACE
        while time.monotonic() < deadline:
            if not self.q_alive():
                return self._load_failure("the destination QEMU exited during the restore")
            time.sleep(POLL)
        return self._load_failure(f"the incoming migration {status}")

    def _next_status(self, status, want_running):
        """The migration's status after the next MIGRATION event, or after ALIVE_EVERY s
        without one (then from query-migrate, which also notices a QEMU that exited).

        In postcopy-active a guest that should run is waited for with query-status: QEMU
        leaves "inmigrate" at the postcopy RUN command, which sends no event when the
        destination was started with -S (loadvm_postcopy_handle_run_bh, migration/savevm.c)."""
        if status == "postcopy-active" and want_running and self.seconds_to_run is None:
            time.sleep(POSTCOPY_POLL)
            return self._migration_status()
        deadline = time.monotonic() + ALIVE_EVERY
        while True:
            got = self.q.events("MIGRATION")
            if len(got) > self.events_seen:
                self.events_seen += 1
                return got[self.events_seen - 1]["data"]["status"]
            left = deadline - time.monotonic()
            if left <= 0:
                return self._check_load(self._migration_status())
            self.q.wait_events(left)

    def _check_load(self, status):
        """``status``, unless qsnap load failed while QEMU still waits for more of its
        stream: a postcopy destination then goes to postcopy-paused and waits for a
        recovery that will not come (QEMU notices a failed precopy load itself)."""
        code = self.child.poll()
        if code and status not in ("completed", "failed", "cancelled"):
            raise VmError(self._load_failure(f"qsnap load {self.child.describe_status()} "
                                             f"while the incoming migration was {status}"))
        return status

    def _migration_status(self):
        try:
            return self.q.cmd("query-migrate").get("status", "none")
        except VmError:
            if self.q_alive():
                raise
            raise VmError(self._load_failure("the destination QEMU exited during the restore")) from None

    def _run_guest(self):
        """cont once QEMU has left "inmigrate" (postcopy: after the RUN command): a cont
        during inmigrate would activate the disks before the device state is loaded
        (qmp_cont calls bdrv_activate_all first, monitor/qmp-cmds.c)."""
        status = self.q.cmd("query-status")["status"]
        if status == "inmigrate":
            return
        if status != "running":
            self.q.cmd("cont")
        self.seconds_to_run = time.monotonic() - self.t0
        self._mark("running")

    def q_alive(self):
        try:
            self.q.cmd("query-status", timeout=5)
            return True
        except VmError:
            return False

    def _load_failure(self, what):
        """One line: what happened, qsnap load's own error if it gave one, where the image came from."""
        why = ""
        try:
            with open(self.load_log, errors="replace") as f:
                lines = [ln[len("qsnap: error:"):].strip() for ln in f if ln.startswith("qsnap: error:")]
            if lines:
                why = f" (qsnap load: {lines[-1]})"
        except OSError:
            pass
        return f"{what}{why}; the image was {self.facts.origin()}"

    def summary(self):
        status = self.q.cmd("query-status")["status"]
        total = time.monotonic() - self.t0
        return {"image": self.facts.path, "pid": self.q.pid, "qmp": self.q.path, "status": status,
                "seconds": round(total, 3),
                "seconds_to_run": None if self.seconds_to_run is None else round(self.seconds_to_run, 3),
                "postcopy": self.postcopy, "dir": self.dir, "overlays": list(self.overlays),
                "migration_statuses": [e["data"]["status"] for e in self.q.events("MIGRATION")],
                "timeline": dict(self.timeline), "load": self._load_facts(),
                "qemu_cpu_at_completed": self.qemu_cpu}

    def _load_facts(self):
        """The qsnap load child: when it started and when the restore saw it had ended
        (s since QMP connected; it starts before, and may end a little before it is
        seen to), and the CPU time it used, where known."""
        c = self.child
        return {"started_s": round(c.started - self.t0, 3),
                "ended_s": None if c.ended is None else round(c.ended - self.t0, 3),
                "cpu": c.cpu}

    def undo_files(self):
        """After a failure: remove the overlays this restore made if no QEMU uses them.
        Returns the overlays left behind (a live QEMU still has them open)."""
        if self.overlays_live and self.q_alive():
            self.files.remove(keep=self.overlays)
            return list(self.overlays)
        self.files.remove()
        self.overlays_live = False
        _unlink(self.load_log)
        return []


# --- work directories ----------------------------------------------------------------------

class WorkDir:
    """The per-restore directory: ``--dir`` or a fresh one under $XDG_RUNTIME_DIR or /tmp."""

    def __init__(self, path, stem):
        self.created = False
        if path is None:
            base = os.environ.get("XDG_RUNTIME_DIR")
            base = base if base and os.path.isdir(base) else tempfile.gettempdir()
            self.path = tempfile.mkdtemp(prefix=f"qsnap-{stem}-", dir=base)
            self.created = True
            return
        self.path = os.path.abspath(path)
        try:
            os.mkdir(self.path, 0o700)
            self.created = True
        except FileExistsError:
            if not os.path.isdir(self.path):
                raise VmError(f"--dir {self.path} exists and is not a directory") from None
            if os.listdir(self.path):
                raise VmError(f"--dir {self.path} is not empty: each restore needs its own directory")
        except OSError as e:
            raise VmError(f"cannot create --dir {self.path}: {e.strerror}") from None

    def remove(self):
        """Remove what the restore put there (and the directory if the restore made it)."""
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for name in os.listdir(self.path):
            p = os.path.join(self.path, name)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else _unlink(p)

    def remove_if_empty(self):
        if self.created:
            try:
                os.rmdir(self.path)
            except OSError:
                pass  # overlays live there


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _stem(img):
    return os.path.splitext(os.path.basename(img))[0] or "vm"


# --- qsnap restore --qmp SOCK IMG ---------------------------------------------------------

def restore_into(qmp_path, img, *, postcopy=None, paused=False, directory=None):
    """Restore ``img`` into the ``-incoming defer`` QEMU at ``qmp_path``; the summary dict."""
    from qsnap.vm.qmp import Qmp

    facts = ImageFacts(img)
    check_frozen_disks(facts)
    work = WorkDir(directory, _stem(img))
    job = child = None
    facts.readahead()
    try:
        child = start_load(facts, work.path, postcopy)  # starts up while the destination is checked
        with Qmp(qmp_path) as q:
            job = Restore(q, facts, work.path, child, postcopy=postcopy, paused=paused)
            try:
                out = job.run()
            except BaseException as e:
                child.stop(LOAD_EXIT_GRACE)
                left = job.undo_files()
                if left and isinstance(e, VmError):
                    raise VmError(f"{e}; the destination QEMU now runs its disks on {', '.join(left)}") from None
                raise
        _unlink(child.stderr_path)
        work.remove_if_empty()
        if not os.path.isdir(work.path):
            out["dir"] = None
        out["changes"] = []
        return out
    except BaseException:
        if child is not None:
            child.stop(LOAD_EXIT_GRACE)
        if job is None or not job.overlays_live:
            work.remove()
        raise


# --- qsnap restore --launch IMG --------------------------------------------------------------

def launch(img, *, qmp_path=None, directory=None, binary=None, postcopy=None, paused=False,
           drop=(), extra=()):
    """Start QEMU from the command line ``img`` recorded, restore into it; the summary dict."""
    from qsnap.vm.cmdline import rewrite_for_clone

    t0 = time.monotonic()
    facts = ImageFacts(img)
    argv = (facts.vm or {}).get("cmdline")
    if not argv:
        why = "has no VM record (saved by plain qsnap save)" if facts.vm is None else "recorded no command line"
        raise VmError(f"image {facts.path} {why}: start QEMU yourself with the VM's command line plus "
                      "-incoming defer and restore with qsnap restore --qmp SOCK IMG")
    check_frozen_disks(facts)
    work = WorkDir(directory, _stem(img))
    proc = files = child = None
    try:
        qmp = os.path.abspath(qmp_path) if qmp_path else os.path.join(work.path, "qmp.sock")
        _check_socket_path(qmp)
        # relative paths on the recorded command line are QEMU's working directory's
        cwd = facts.vm.get("cwd") or os.getcwd()
        words, changes = rewrite_for_clone(argv, facts.disks, work.path, qmp_path=qmp,
                                           binary=binary, cwd=cwd, drop=drop)
        words += list(extra)
        log_path = os.path.join(work.path, "qemu.log")
        started = time.monotonic()
        proc = _start_qemu(words, log_path)
        # while QEMU starts: the load (the interpreter, its imports, the image opened;
        # the kernel reads the image's tables ahead for it) and the overlays (the command
        # line opens every recorded disk on its frozen image, so each gets one)
        facts.readahead()
        child = start_load(facts, work.path, postcopy)
        files = OverlayFiles(work.path)
        for i, d in enumerate(facts.disks):
            files.start(i, d, d["format"], d["virtual_size"])
        q = _connect(qmp, proc, facts, words[0], log_path)
        up = time.monotonic()
        start_cpu = process_cpu(proc.pid)  # QEMU's start-up, apart from the load's
        try:
            out = Restore(q, facts, work.path, child, postcopy=postcopy, paused=paused, files=files).run()
        finally:
            q.close()
        # before QMP connected: the image read and checked, and QEMU's start-up
        out["launch"] = {"checked_s": round(started - t0, 3), "qemu_start_s": round(up - started, 3),
                         "qemu_start_cpu": start_cpu}
        out["changes"] = changes
        out["pid"] = proc.pid
        out["qemu_log"] = log_path
        return out
    except BaseException:
        if proc is not None:
            _kill(proc)
        if child is not None:
            child.stop(LOAD_EXIT_GRACE)  # QEMU's end is closed now: it ends on EPIPE
        if files is not None:
            files.remove()  # before the directory goes: a qemu-img may still be writing there
        if qmp_path:
            _unlink(os.path.abspath(qmp_path))
        work.remove()
        raise


def _check_socket_path(path):
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise VmError(f"QMP socket path {path} is longer than a unix socket allows "
                      f"({UNIX_PATH_MAX} bytes): use a shorter --dir or --qmp")
    if os.path.lexists(path):
        raise VmError(f"QMP socket path {path} already exists")


def _start_qemu(words, log_path):
    """QEMU in its own session (it outlives qsnap), its output in ``log_path``."""
    try:
        with open(log_path, "ab") as log:
            return subprocess.Popen(words, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
    except OSError as e:
        raise VmError(f"cannot start {words[0]}: {e.strerror}") from None


def _connect(path, proc, facts, binary, log_path):
    """A Qmp session to the QEMU just started, or VmError saying why QEMU did not come up.
    Called right after the start: the QMP modules are imported while QEMU starts."""
    from qsnap.vm.qmp import Qmp

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise VmError(_start_failure(proc, facts, binary, log_path))
        if os.path.exists(path):
            try:
                return Qmp(path).connect()  # the caller closes it
            except VmError:
                if proc.poll() is not None:
                    raise VmError(_start_failure(proc, facts, binary, log_path)) from None
                if time.monotonic() > deadline:
                    raise
        if time.monotonic() > deadline:
            raise VmError(f"QEMU (pid {proc.pid}) did not open its QMP socket {path} within "
                          f"{START_TIMEOUT:g} s")
        time.sleep(SOCKET_POLL)


def _start_failure(proc, facts, binary, log_path):
    """Why QEMU exited at start-up: its own last error line, and whether it knows the machine."""
    try:
        text = _tail(log_path).strip()
    except OSError:
        text = ""
    # QEMU's own error lines start with its program name ("qemu-system-x86_64: -machine ...")
    own = [ln for ln in text.splitlines() if ln.startswith(os.path.basename(binary) + ":")]
    last = (own or text.splitlines() or [f"exit status {proc.returncode}"])[-1]
    msg = f"QEMU exited at start-up: {last}; the image was {facts.origin()}"
    known = _binary_machines(binary)
    if facts.machine and known is not None and facts.machine not in known:
        msg += f", which {binary} ({_binary_version(binary)}) does not provide"
    return msg


def _tail(path, n=4096):
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - n))
        return f.read().decode(errors="replace")


def _binary_machines(binary):
    try:
        r = subprocess.run([binary, "-machine", "help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {ln.split()[0] for ln in r.stdout.splitlines()[1:] if ln.strip()}


def _binary_version(binary):
    try:
        r = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown version"
    m = re.search(r"version (\S+)", r.stdout)
    return f"QEMU {m.group(1)}" if m else "unknown version"


def _kill(proc):
    """End the QEMU this restore started (its whole session: exec: children too)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def format_summary(out):
    """The human summary of a restore."""
    lines = [f"restored {out['image']} in {out['seconds']:.2f} s: QEMU pid {out['pid']}, "
             f"QMP {out['qmp']}, guest {out['status']}"]
    lines += [f"  disk overlay: {p}" for p in out["overlays"]]
    if out.get("qemu_log"):
        lines.append(f"  QEMU output: {out['qemu_log']}")
    lines += [f"  changed: {c}" for c in out.get("changes", ())]
    return "\n".join(lines)
