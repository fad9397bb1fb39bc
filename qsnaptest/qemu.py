"""A small real-QEMU harness for the integration tests.

    with Qemu(memory="64M", blobs=blobs) as vm:
        vm.set_capabilities(background_snapshot=True)
        vm.migrate(f"exec:cat > {path}")
        vm.wait_migration()

Each ``Qemu`` owns a temp dir (QMP socket, serial console file, QEMU's
stdout/stderr log) that is removed on exit; QMP goes through ``qemu.qmp``'s
``QMPClient`` driven by its own asyncio loop thread (``qsnap.vm.qmp.LoopThread``), behind a
synchronous ``vm.qmp(cmd, **args)``.
"""

import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from qsnap.vm.qmp import LoopThread
from qsnaptest import builds

# Binary name when no build is found (QSNAP_QEMU picks builds: see builds.py)
QEMU_BINARY = builds.SYSTEM_BINARY
# The 7.2 machine type (the default machine of a 7.2 build; other builds
# default to their own, see Build.machine)
DEFAULT_MACHINE = "pc-i440fx-7.2"
PAGE_SIZE = 4096

# pc-i440fx >= 1.7 (gigabyte_align): with RAM >= 3.5 GiB, low RAM is cut at
# 3 GiB, else all RAM is below 0xe0000000; the rest is mapped at 4 GiB.
# q35: cut at 2 GiB when RAM >= 0xb0000000.
_PC_LOWMEM_LIMIT, _PC_LOWMEM_ALIGNED = 0xE0000000, 0xC0000000
_Q35_LOWMEM_LIMIT, _Q35_LOWMEM = 0xB0000000, 0x80000000


class QemuError(RuntimeError):
    """QEMU failed: QMP error, failed migration, unexpected exit or timeout."""


_current_build: Optional[builds.Build] = None


def current_build() -> builds.Build:
    """The build a ``Qemu()`` starts by default: the one set by use_build(),
    else the first QSNAP_QEMU names (BuildUnavailable if it is missing)."""
    global _current_build
    if _current_build is None:
        _current_build = builds.find_build(builds.requested_specs()[0])
    return _current_build


def use_build(build: Optional[builds.Build]) -> Optional[builds.Build]:
    """Make ``build`` the default of every later ``Qemu()``; return the previous one."""
    global _current_build
    prev, _current_build = _current_build, build
    return prev


def qemu_binary() -> Optional[str]:
    """Full path of the QEMU system emulator, or None."""
    try:
        return current_build().binary
    except builds.BuildUnavailable:
        return None


def qemu_available() -> bool:
    """True if qemu-system-x86_64 is installed and runs."""
    b = qemu_binary()
    if not b:
        return False
    try:
        return subprocess.run([b, "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def qemu_version() -> str:
    try:
        return current_build().version
    except builds.BuildUnavailable as e:
        return f"unavailable ({e})"


def parse_size(size) -> int:
    """'512M' / '1G' / 4096 -> bytes (QEMU's -m suffix rules, default MiB)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", str(size).strip().upper())
    if not m:
        raise ValueError(f"bad size {size!r}")
    mult = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)]
    return int(m.group(1)) * mult


def ram_ranges(mem_bytes: int, machine: str = DEFAULT_MACHINE):
    """Guest-physical ranges ``[(gpa, ram_offset, size)]`` of the main RAM block."""
    if machine.startswith("q35") or "q35" in machine:
        low = _Q35_LOWMEM if mem_bytes >= _Q35_LOWMEM_LIMIT else mem_bytes
    else:
        low = _PC_LOWMEM_ALIGNED if mem_bytes >= _PC_LOWMEM_LIMIT else mem_bytes
    ranges = [(0, 0, low)]
    if mem_bytes > low:
        ranges.append((1 << 32, low, mem_bytes - low))
    return ranges


class Qemu:
    """One qemu-system-x86_64 process, driven over QMP. Use as a context manager.

    accel: None -> ``-accel kvm -accel tcg`` (KVM, TCG fallback; QSNAP_TEST_ACCEL
    overrides it, e.g. ``tcg``); 'tcg' or 'kvm' to force one; or a sequence of
    accelerator options.
    blobs: ``guests.Blob``s, each loaded with ``-device loader``.
    """

    def __init__(self, *, memory="64M", machine: Optional[str] = None, accel=None,
                 paused: bool = False, incoming: bool = False, blobs: Iterable = (),
                 kernel=None, initrd=None, append: Optional[str] = None,
                 no_reboot: bool = False, args: Sequence[str] = (), name: str = "vm",
                 qmp_timeout: float = 60.0, binary: Optional[str] = None,
                 env: Optional[dict] = None, firmware_dirs: Optional[Sequence[str]] = None,
                 build: Optional[builds.Build] = None, serial: bool = True):
        self.memory = parse_size(memory)
        if build is None and (binary is None or machine is None):
            try:
                build = current_build()
            except builds.BuildUnavailable:
                build = None  # start() then fails on the missing binary
        self.build = build
        self.machine = machine or (build.machine("pc") if build else DEFAULT_MACHINE)
        if accel is None:
            # QSNAP_TEST_ACCEL=tcg (or kvm) overrides the KVM-then-TCG default
            accel = tuple(a for a in os.environ.get("QSNAP_TEST_ACCEL", "kvm,tcg").split(",") if a)
        elif isinstance(accel, str):
            accel = (accel,)
        self.accel = tuple(accel)
        self.paused = paused
        self.incoming = incoming
        self.blobs = list(blobs)
        self.kernel, self.initrd, self.append = kernel, initrd, append
        self.no_reboot = no_reboot
        self.extra_args = list(args)
        self.name = name
        self.qmp_timeout = qmp_timeout
        self.binary = binary or (build.binary if build else QEMU_BINARY)
        if firmware_dirs is None:
            # a build's -L dirs go with its binary, not with another one
            firmware_dirs = build.firmware_dirs if build and self.binary == build.binary else ()
        self.firmware_dirs = tuple(str(d) for d in firmware_dirs)
        self.serial = serial  # False: no serial port (and no "serial" device state)
        self.env = env
        self.tmpdir: Optional[Path] = None
        self.proc: Optional[subprocess.Popen] = None
        self._loop: Optional[LoopThread] = None
        self._client = None

    # -- paths -----------------------------------------------------------
    @property
    def qmp_path(self) -> Path:
        return self.tmpdir / "qmp.sock"

    @property
    def console_path(self) -> Path:
        return self.tmpdir / "console.log"

    @property
    def log_path(self) -> Path:
        return self.tmpdir / "qemu.log"

    def command_line(self) -> list:
        cmd = [self.binary]
        for d in self.firmware_dirs:
            cmd += ["-L", d]
        cmd += ["-name", self.name, "-nodefaults", "-display", "none",
               "-machine", self.machine, "-m", f"{self.memory >> 20}M"]
        for a in self.accel:
            cmd += ["-accel", a]
        cmd += ["-chardev", f"socket,id=qmp,path={self.qmp_path},server=on,wait=off",
                "-mon", "chardev=qmp,mode=control"]
        if self.serial:
            cmd += ["-serial", f"file:{self.console_path}"]
        if self.paused:
            cmd.append("-S")
        if self.incoming:
            cmd += ["-incoming", "defer"]
        if self.no_reboot:
            cmd.append("-no-reboot")
        if self.kernel:
            cmd += ["-kernel", str(self.kernel)]
        if self.initrd:
            cmd += ["-initrd", str(self.initrd)]
        if self.append is not None:
            cmd += ["-append", self.append]
        for b in self.blobs:
            cmd += ["-device", f"loader,file={b.path},addr={b.addr:#x},force-raw=on"]
        return cmd + self.extra_args

    # -- lifecycle -------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def start(self):
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"qsnap-{self.name}-"))
        try:
            self.console_path.touch()
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(self.command_line(), stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, env=self.env)
            self._loop = LoopThread()
            self._connect()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _connect(self, timeout=30.0):
        from qemu.qmp import QMPClient
        self._client = QMPClient(self.name)
        self._event_log = []
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise QemuError(f"QEMU exited with {self.proc.returncode} before QMP "
                                f"came up:\n{self.log_tail()}")
            if self.qmp_path.exists():
                try:
                    self._loop.run(self._client.connect(str(self.qmp_path)), 10)
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
            if time.monotonic() > deadline:
                raise QemuError(f"QMP socket did not appear:\n{self.log_tail()}")
            time.sleep(0.02)

    def shutdown(self, timeout: float = 10.0):
        """quit over QMP, then SIGTERM, then SIGKILL; always removes the temp dir."""
        try:
            if self.proc and self.proc.poll() is None and self._client is not None:
                try:
                    self._loop.run(self._client.execute("quit"), 5)
                except Exception:
                    pass  # the connection often drops before the reply
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            if self._client is not None:
                try:
                    self._loop.run(self._client.disconnect(), 5)
                except Exception:
                    pass
            self.kill()
        finally:
            self._client = None
            if self._loop is not None:
                self._loop.close()
                self._loop = None
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None

    def kill(self):
        p = self.proc
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(p.pid, sig)  # QEMU leads its own session: exec: children too
            except ProcessLookupError:
                return
            try:
                p.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def descendants(self) -> list:
        """[(pid, argv)] of QEMU's live descendant processes (exec: migration commands)."""
        if not self.is_running():
            return []
        parent = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2:].split()
            if fields[0] != b"Z":
                parent[int(d)] = int(fields[1])
        out, todo = [], [self.proc.pid]
        while todo:
            p = todo.pop()
            for c, pp in parent.items():
                if pp == p:
                    todo.append(c)
                    try:
                        with open(f"/proc/{c}/cmdline", "rb") as f:
                            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
                    except OSError:
                        continue
                    out.append((c, argv))
        return out

    def wait_no_descendants(self, timeout: float = 60.0):
        """Wait until QEMU's exec: commands have exited (QEMU reports 'completed'
        before it closes the channel and reaps the command)."""
        deadline = time.monotonic() + timeout
        while self.descendants():
            if time.monotonic() > deadline:
                raise QemuError(f"exec: commands still running after {timeout}s: "
                                f"{self.descendants()}")
            time.sleep(0.05)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except (OSError, TypeError):
            return ""

    # -- QMP -------------------------------------------------------------
    def events(self, name: Optional[str] = None) -> list:
        """QMP events received so far (all, or those called ``name``), oldest first."""
        if self._client is None:
            raise QemuError("QEMU is not running")

        async def drain():
            return self._client.events.clear()

        self._event_log.extend(self._loop.run(drain(), 5))
        return [e for e in self._event_log if name is None or e["event"] == name]

    def migration_statuses(self) -> list:
        """Statuses announced by MIGRATION events (needs the ``events`` capability)."""
        return [e["data"]["status"] for e in self.events("MIGRATION")]

    def qmp(self, cmd: str, arguments: Optional[dict] = None, **args):
        """Execute one QMP command and return its result; raise QemuError on error.

        Arguments with dashes go in ``arguments``: ``qmp("x", {"command-line": ...})``.
        """
        from qemu.qmp import ExecuteError
        if self._client is None:
            raise QemuError("QEMU is not running")
        a = dict(arguments or {}, **args)
        try:
            return self._loop.run(self._client.execute(cmd, a or None), self.qmp_timeout)
        except ExecuteError as e:
            raise QemuError(f"QMP {cmd} {a}: {e}") from None
        except concurrent.futures.TimeoutError:
            raise QemuError(f"QMP {cmd} timed out after {self.qmp_timeout}s") from None
        except Exception as e:
            # QMP may see the socket close a moment before the process is gone
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                raise e from None
            raise QemuError(f"QEMU exited ({self.proc.returncode}) during {cmd}:\n"
                            f"{self.log_tail()}") from e

    def hmp(self, command_line: str) -> str:
        return self.qmp("human-monitor-command", {"command-line": command_line})

    def status(self) -> str:
        """Run state: 'running', 'paused', 'prelaunch', 'inmigrate', 'postmigrate', ..."""
        return self.qmp("query-status")["status"]

    def accelerator(self) -> str:
        return "kvm" if self.qmp("query-kvm")["enabled"] else "tcg"

    def cont(self):
        self.qmp("cont")

    def stop(self):
        self.qmp("stop")

    def set_capabilities(self, caps: Optional[dict] = None, **kw):
        """set_capabilities(background_snapshot=True) (underscores become dashes)."""
        d = dict(caps or {})
        d.update({k.replace("_", "-"): v for k, v in kw.items()})
        self.qmp("migrate-set-capabilities",
                 capabilities=[{"capability": k, "state": bool(v)} for k, v in d.items()])

    def set_parameters(self, params: Optional[dict] = None, **kw):
        d = dict(params or {})
        d.update({k.replace("_", "-"): v for k, v in kw.items()})
        self.qmp("migrate-set-parameters", d)

    def migrate(self, uri: str):
        self.qmp("migrate", uri=uri)

    def migrate_incoming(self, uri: str):
        self.qmp("migrate-incoming", uri=uri)

    def query_migrate(self) -> dict:
        return self.qmp("query-migrate")

    def wait_migration(self, statuses=("completed",), timeout: float = 120.0,
                       interval: float = 0.05) -> dict:
        """Poll query-migrate until its status is in ``statuses``; return the info.

        Raises QemuError with QEMU's error text if the migration fails, QEMU
        exits, or ``timeout`` passes.
        """
        if isinstance(statuses, str):
            statuses = (statuses,)
        deadline = time.monotonic() + timeout
        info = {}
        while True:
            if not self.is_running():
                raise QemuError(f"QEMU exited ({self.proc.returncode}) during migration:\n"
                                f"{self.log_tail()}")
            info = self.query_migrate()
            st = info.get("status")
            if st in statuses:
                return info
            if st in ("failed", "cancelled"):
                raise QemuError(f"migration {st}: {info.get('error-desc', '?')}\n"
                                f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise QemuError(f"migration still {st!r} after {timeout}s: {info}")
            time.sleep(interval)

    # -- memory ----------------------------------------------------------
    def pmemsave(self, addr: int, size: int, path, chunk: int = 256 << 20):
        """Save guest-physical [addr, addr+size) to ``path`` (QMP pmemsave, chunked)."""
        path = Path(path)
        if size <= chunk:
            self.qmp("pmemsave", val=addr, size=size, filename=str(path))
            return path
        part = self.tmpdir / "pmem.part"
        with open(path, "wb") as out:
            for off in range(0, size, chunk):
                n = min(chunk, size - off)
                self.qmp("pmemsave", val=addr + off, size=n, filename=str(part))
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        part.unlink()
        return path

    def read_memory(self, addr: int, size: int) -> bytes:
        """Guest-physical memory as bytes (via pmemsave into the temp dir)."""
        p = self.pmemsave(addr, size, self.tmpdir / "pmem.bin")
        try:
            return p.read_bytes()
        finally:
            p.unlink()

    def ram_dump(self, path):
        """Write the main RAM (pc.ram) in RAM-offset order to ``path``.

        Read through the guest-physical view: RAM above the PCI hole is read
        from 4 GiB. Below 1 MiB the view shows VGA/ROM/PAM windows, so
        [0xa0000, 0x100000) may differ from the pc.ram block content.
        """
        path = Path(path)
        with open(path, "wb") as out:
            for gpa, _off, size in ram_ranges(self.memory, self.machine):
                part = self.pmemsave(gpa, size, self.tmpdir / "ram.part")
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
                part.unlink()
        return path

    # -- console ---------------------------------------------------------
    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def wait_console(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Wait until the serial console output matches ``pattern`` (regex)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.console())
            if m:
                return m
            if not self.is_running():
                raise QemuError(f"QEMU exited ({self.proc.returncode}) waiting for "
                                f"{pattern!r}; console:\n{self.console()[-2000:]}\n"
                                f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise QemuError(f"no {pattern!r} on the console after {timeout}s:\n"
                                f"{self.console()[-2000:]}")
            time.sleep(0.1)


class BlobGuest(Qemu):
    """A guest with no OS: SeaBIOS halts, ``blobs`` sit at known addresses."""

    def wait_bios_done(self, timeout: float = 60.0):
        """Wait until SeaBIOS has given up booting and sits in HLT.

        Under KVM SeaBIOS busy-waits for ~4 s (device probe timeouts) before
        it halts; under TCG it halts within ~0.1 s.
        """
        deadline = time.monotonic() + timeout
        while "HLT=1" not in self.hmp("info registers"):
            if time.monotonic() > deadline:
                raise QemuError(f"SeaBIOS did not halt within {timeout}s")
            time.sleep(0.05)

    def verify_blobs(self, blobs=None):
        """Raise AssertionError unless every blob is byte-exact in guest RAM."""
        for b in blobs if blobs is not None else self.blobs:
            got = self.read_memory(b.addr, len(b.data))
            if got != b.data:
                bad = next(i for i in range(len(got)) if got[i] != b.data[i])
                raise AssertionError(f"blob at {b.addr:#x} differs at +{bad:#x}")


TICK_RE = re.compile(r"tick (\d+)")


class LinuxGuest(Qemu):
    """The live busybox guest (see guests.py); TCG only, prints ``tick N`` on ttyS0."""

    def __init__(self, kernel, initrd, *, memory="256M", append=None, **kw):
        from qsnaptest.guests import KERNEL_CMDLINE
        kw.setdefault("accel", "tcg")
        kw.setdefault("no_reboot", True)
        kw.setdefault("name", "linux")
        super().__init__(memory=memory, kernel=kernel, initrd=initrd,
                         append=append if append is not None else KERNEL_CMDLINE, **kw)

    def ticks(self) -> int:
        """The last counter the guest printed, or -1."""
        found = TICK_RE.findall(self.console())
        return int(found[-1]) if found else -1

    def wait_ticks(self, n: int = 0, timeout: float = 120.0) -> int:
        """Wait until the guest printed ``tick M`` with M >= n; return M."""
        deadline = time.monotonic() + timeout
        while True:
            t = self.ticks()
            if t >= n:
                return t
            if not self.is_running():
                raise QemuError(f"guest died (QEMU exit {self.proc.returncode}); console:\n"
                                f"{self.console()[-3000:]}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise QemuError(f"no tick >= {n} after {timeout}s; console:\n"
                                f"{self.console()[-3000:]}")
            time.sleep(0.1)


# -- capturing streams -------------------------------------------------------

CAPTURE_KINDS = ("background", "precopy-live", "precopy-stopped")
QEVM_MAGIC = b"QEVM"
QEVM_VERSION = 3


class CaptureUnsupported(QemuError):
    """The host cannot do this kind of capture (e.g. no userfaultfd write-protect)."""


def capture_stream(vm: Qemu, path, kind: str = "background", timeout: float = 120.0,
                   max_bandwidth: Optional[int] = None) -> dict:
    """Migrate ``vm`` into ``path`` with ``exec:cat > path``; return the final query-migrate.

    kind: 'background' (background-snapshot; the VM keeps running),
    'precopy-live' (plain precopy of the running VM) or 'precopy-stopped'
    (``stop`` first). No return path is used, so ``cat`` is a complete sink.
    max_bandwidth (bytes/s): None for no limit (7.2's default is 32 MiB/s);
    a limit stretches a live capture so the guest dirties RAM meanwhile.
    """
    if kind not in CAPTURE_KINDS:
        raise ValueError(f"kind must be one of {CAPTURE_KINDS}")
    path = Path(path)
    vm.set_parameters(max_bandwidth=max_bandwidth or 16 << 30)
    if kind == "background":
        try:
            vm.set_capabilities(background_snapshot=True)
        except QemuError as e:
            if "not supported" in str(e):
                raise CaptureUnsupported(str(e)) from None
            raise
    elif kind == "precopy-stopped":
        vm.stop()
    vm.migrate(f"exec:cat > {path}")
    info = vm.wait_migration(timeout=timeout)
    # 'completed' may come before cat has written the last bytes (see
    # wait_no_descendants): the file is whole once cat has exited
    vm.wait_no_descendants(timeout)
    return info


def stream_header(path) -> tuple:
    """(magic, version) of a migration stream file."""
    with open(path, "rb") as f:
        head = f.read(8)
    return head[:4], int.from_bytes(head[4:8], "big")
