"""QEMU builds the end-to-end benchmark runs against: ``--qemu 7.2|10.0|PATH``.

"7.2" is the installed ``qemu-system-x86_64``; "10.0" is QEMU 10.0.2 unpacked (never
installed) under /tmp/q10/root (QSNAP_QEMU10_ROOT to move it). An unpacked build
finds its firmware through ``-L``: its own usr/share/qemu first, then the host's
SeaBIOS and QEMU data (Debian's qemu-system-data links bios-256k.bin into
/usr/share/seabios, which dpkg -x does not follow). The machine type is the build's
own newest i440fx one (pc-i440fx-7.2, pc-i440fx-10.0).
"""
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

SYSTEM_BINARY = "qemu-system-x86_64"
HOST_FIRMWARE_DIRS = ("/usr/share/seabios", "/usr/share/qemu")
UNPACKED_ROOTS = {"10.0": os.environ.get("QSNAP_QEMU10_ROOT", "/tmp/q10/root")}


class BuildUnavailable(RuntimeError):
    """The requested QEMU build is not on this host."""


@dataclass(frozen=True)
class Build:
    binary: str
    version: str                        # "7.2.22"
    firmware_dirs: Tuple[str, ...] = ()

    @property
    def major_minor(self):
        return ".".join(self.version.split(".")[:2])

    @property
    def machine(self):
        return f"pc-i440fx-{self.major_minor}"

    def firmware_args(self):
        return [w for d in self.firmware_dirs for w in ("-L", d)]

    def describe(self):
        return {"qemu": self.version, "qemu_binary": self.binary, "machine_type": self.machine,
                "qemu_firmware_dirs": list(self.firmware_dirs)}


def binary_version(binary):
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildUnavailable(f"{binary} --version: {e}") from None
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    if not m:
        raise BuildUnavailable(f"{binary} --version printed no version: {out[:200]!r}")
    return m.group(1)


def _unpacked(root):
    root = Path(root)
    binary = root / "usr" / "bin" / SYSTEM_BINARY
    if not binary.exists():
        raise BuildUnavailable(f"{binary} does not exist")
    return Build(str(binary), binary_version(str(binary)),
                 (str(root / "usr" / "share" / "qemu"),) + HOST_FIRMWARE_DIRS)


def find_build(spec):
    """The build ``spec`` names: '7.2' (installed), '10.0' (unpacked), or a binary path."""
    spec = (spec or "").strip()
    if spec in UNPACKED_ROOTS:
        return _unpacked(UNPACKED_ROOTS[spec])
    if spec in ("", "system") or re.fullmatch(r"\d+\.\d+", spec):
        path = shutil.which(SYSTEM_BINARY)
        if not path:
            raise BuildUnavailable(f"{SYSTEM_BINARY} not found")
        b = Build(path, binary_version(path))
        if spec not in ("", "system") and b.major_minor != spec:
            raise BuildUnavailable(f"the installed {SYSTEM_BINARY} is {b.version}, not {spec}")
        return b
    path = Path(spec)
    # an unpacked tree: <root>/usr/bin/qemu-system-x86_64 beside <root>/usr/share/qemu
    if path.parent.name == "bin" and (path.parent.parent / "share" / "qemu").is_dir() \
            and not str(path.resolve()).startswith("/usr/bin/"):
        return _unpacked(path.parent.parent.parent)
    return Build(str(path), binary_version(str(path)))
