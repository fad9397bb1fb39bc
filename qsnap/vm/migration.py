"""Migration capabilities and parameters (changed for one operation, always put back)
and waiting for migration states.

QEMU's names: MigrationCapability, MigrationParameters and MigrationStatus in
qapi/migration.json.
"""
import time

from qsnap.errors import VmError

# MigrationStatus values (qapi/migration.json) in which no migration runs and a new
# one may start.
IDLE_STATUSES = ("none", "completed", "failed", "cancelled")
ENDED_STATUSES = ("completed", "failed", "cancelled")
POLL = 0.002  # query-migrate round trips take ~0.2 ms; a short poll keeps pauses short


def status(qmp):
    return qmp.cmd("query-migrate").get("status", "none")


def require_idle(qmp):
    """VmError when a migration is running on this QEMU (QEMU allows one at a time)."""
    st = status(qmp)
    if st not in IDLE_STATUSES:
        raise VmError(f"a migration is already active on {qmp.path} (status {st!r}); "
                      "wait for it to end or cancel it (migrate_cancel) first")


class Settings:
    """Capabilities and parameters changed for one operation; ``restore()`` puts the
    values found before back (idempotent, safe after a partial change)."""

    def __init__(self, qmp):
        self.qmp = qmp
        self.caps_before = {c["capability"]: c["state"] for c in qmp.cmd("query-migrate-capabilities")}
        self.params_before = qmp.cmd("query-migrate-parameters")
        self.changed_caps = set()
        self.changed_params = set()

    def set_capability(self, name, state):
        if name not in self.caps_before:
            raise VmError(f"QEMU at {self.qmp.path} has no migration capability {name!r}")
        if self.caps_before[name] == state and name not in self.changed_caps:
            return
        self.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": name, "state": state}])
        self.changed_caps.add(name)  # only once QEMU took it: a refusal changed nothing

    def set_parameter(self, name, value):
        if name not in self.params_before:
            raise VmError(f"QEMU at {self.qmp.path} has no migration parameter {name!r}")
        self.qmp.cmd("migrate-set-parameters", {name: value})
        self.changed_params.add(name)

    def restore(self):
        """Put every changed capability and parameter back; VmError naming what could not be."""
        failed = []
        for name in sorted(self.changed_caps):
            try:
                self.qmp.cmd("migrate-set-capabilities",
                             capabilities=[{"capability": name, "state": self.caps_before[name]}])
                self.changed_caps.discard(name)
            except VmError as e:
                failed.append(f"capability {name}: {e}")
        for name in sorted(self.changed_params):
            try:
                self.qmp.cmd("migrate-set-parameters", {name: self.params_before[name]})
                self.changed_params.discard(name)
            except VmError as e:
                failed.append(f"parameter {name}: {e}")
        if failed:
            raise VmError("could not put back migration settings: " + "; ".join(failed))


def probe_capability(qmp, name):
    """VmError with QEMU's reason when ``name`` cannot be switched on here (e.g.
    background-snapshot without userfaultfd write-protect); leaves it as it was."""
    settings = Settings(qmp)
    try:
        settings.set_capability(name, True)
    except VmError as e:
        raise VmError(f"QEMU at {qmp.path} cannot take a {name} snapshot: {e}") from None
    finally:
        settings.restore()


def wait_status(qmp, wanted, timeout, what):
    """The query-migrate info once its status is in ``wanted``; VmError with QEMU's error
    when the migration ends otherwise, or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        info = qmp.cmd("query-migrate")
        st = info.get("status", "none")
        if st in wanted:
            return info
        if st in ENDED_STATUSES:
            raise VmError(f"the migration {st} while {what}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise VmError(f"the migration is still {st!r} after {timeout:g} s while {what}")
        time.sleep(POLL)


def wait_ended(qmp, timeout):
    """The final query-migrate info (status completed, failed or cancelled)."""
    deadline = time.monotonic() + timeout
    while True:
        info = qmp.cmd("query-migrate")
        if info.get("status", "none") in ENDED_STATUSES + ("none",):
            return info
        if time.monotonic() > deadline:
            raise VmError(f"the migration did not end within {timeout:g} s "
                          f"(status {info.get('status')!r})")
        time.sleep(0.02)


def ram_pages_sent(info):
    """Pages the migration has sent so far (normal + zero pages)."""
    ram = info.get("ram") or {}
    return ram.get("normal", 0) + ram.get("duplicate", 0)


def wait_run_state_left(qmp, state, timeout):
    """The VM's run state (query-status) once it is no longer ``state``; VmError after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        status = qmp.cmd("query-status")["status"]
        if status != state:
            return status
        if time.monotonic() > deadline:
            raise VmError(f"the VM is still {state!r} after {timeout:g} s")
        time.sleep(POLL)
