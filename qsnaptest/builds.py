"""The QEMU builds the tests run against: the installed one and Debian's 10.0.

    QSNAP_QEMU=7.2,10.0      # both (CI); default: the installed qemu-system-x86_64
    QSNAP_QEMU=/opt/q/bin/qemu-system-x86_64   # any other binary

"7.2" is the installed ``qemu-system-x86_64`` when that is a 7.2 (Debian 12).
"10.0" is QEMU 10.0.2 from Debian's bookworm-backports, unpacked (never
installed) into ``$QSNAP_CACHE/qemu-10.0.2`` by :func:`unpack_debian_build`
(``python -m qsnaptest.builds prepare 10.0``, run by .ci/run). An unpacked
build finds its firmware through ``-L``: its own ``usr/share/qemu`` first,
then the host's SeaBIOS and QEMU data (Debian's qemu-system-data links
bios-256k.bin to /usr/share/seabios, which dpkg -x does not follow).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

SYSTEM_BINARY = "qemu-system-x86_64"
HOST_FIRMWARE_DIRS = ("/usr/share/seabios", "/usr/share/qemu")

# Debian's QEMU 10.0 for bookworm (packages and the one version tested).
DEBIAN_BUILDS = {
    "10.0": ("1:10.0.2+ds-2+deb13u1~bpo12+1", "bookworm-backports",
             ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "qemu-utils")),
}


class BuildUnavailable(RuntimeError):
    """A requested QEMU build is not on this host."""


@dataclass(frozen=True)
class Build:
    """One QEMU build: how to start it and which machine types it calls its own."""
    binary: str
    version: str                     # "7.2.22", "10.0.2"
    firmware_dirs: Tuple[str, ...] = ()
    qemu_img: str = "qemu-img"

    @property
    def major_minor(self) -> str:
        return ".".join(self.version.split(".")[:2])

    @property
    def id(self) -> str:
        """Test id: ``qemu7.2``."""
        return f"qemu{self.major_minor}"

    @property
    def version_tuple(self) -> Tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", self.version)[:3])

    def machine(self, kind: str = "pc") -> str:
        """This build's newest machine type of ``kind`` ('pc' or 'q35')."""
        return {"pc": "pc-i440fx-", "q35": "pc-q35-"}[kind] + self.major_minor

    def firmware_args(self) -> List[str]:
        out = []
        for d in self.firmware_dirs:
            out += ["-L", d]
        return out


def binary_version(binary: str) -> str:
    """'7.2.22' from ``binary --version``; BuildUnavailable if it does not run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildUnavailable(f"{binary} --version: {e}") from None
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    if not m:
        raise BuildUnavailable(f"{binary} --version printed no version: {out[:200]!r}")
    return m.group(1)


def cache_root() -> Path:
    return Path(os.environ.get("QSNAP_CACHE") or Path.home() / ".cache" / "qsnap-test")


def debian_build_dir(name: str) -> Path:
    version = DEBIAN_BUILDS[name][0]
    upstream = version.split(":")[-1].split("+")[0]
    return cache_root() / f"qemu-{upstream}"


def _unpacked_build(root: Path) -> Build:
    binary = root / "usr" / "bin" / "qemu-system-x86_64"
    if not binary.exists():
        raise BuildUnavailable(f"{binary} does not exist (run: python -m qsnaptest.builds "
                               f"prepare 10.0)")
    return Build(str(binary), binary_version(str(binary)),
                 (str(root / "usr" / "share" / "qemu"),) + HOST_FIRMWARE_DIRS,
                 str(root / "usr" / "bin" / "qemu-img"))


def system_build(binary: str = SYSTEM_BINARY) -> Build:
    path = shutil.which(binary)
    if not path:
        raise BuildUnavailable(f"{binary} not found")
    img = Path(path).with_name("qemu-img")
    return Build(path, binary_version(path), (), str(img) if img.exists() else "qemu-img")


def find_build(spec: str) -> Build:
    """The build ``spec`` names: '7.2', '10.0', 'system' or a binary's name or path."""
    spec = spec.strip()
    if spec in DEBIAN_BUILDS:
        return _unpacked_build(debian_build_dir(spec) / "root")
    if re.fullmatch(r"\d+\.\d+", spec):
        b = system_build()
        if b.major_minor != spec:
            raise BuildUnavailable(f"the installed {SYSTEM_BINARY} is {b.version}, not {spec}")
        return b
    if spec in ("", "system"):
        return system_build()
    path = Path(spec)
    if path.parent.name == "bin" and (path.parent.parent / "share" / "qemu").is_dir() \
            and not str(path).startswith("/usr/bin/"):
        return _unpacked_build(path.parent.parent.parent)
    return system_build(spec)


def requested_specs() -> List[str]:
    """The builds QSNAP_QEMU asks for, in order ('system' when unset)."""
    specs = [s.strip() for s in os.environ.get("QSNAP_QEMU", "").split(",") if s.strip()]
    return specs or ["system"]


def unpack_debian_build(name: str = "10.0") -> Build:
    """Download Debian's packages of build ``name`` with apt and dpkg -x them into the cache.

    apt must know the suite (bookworm-backports; .ci/run adds it). Idempotent.
    """
    version, suite, packages = DEBIAN_BUILDS[name]
    dest = debian_build_dir(name)
    if (dest / "root" / "usr" / "bin" / "qemu-system-x86_64").exists():
        return _unpacked_build(dest / "root")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as td:
        try:
            subprocess.run(["apt-get", "download", "-q"] + [f"{p}={version}" for p in packages],
                           cwd=td, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise BuildUnavailable(f"apt-get download of QEMU {version} ({suite}) failed: "
                                   f"{getattr(e, 'stderr', e)}") from None
        root = Path(td) / "root"
        for deb in sorted(Path(td).glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        staged = Path(td) / "build"
        staged.mkdir()
        root.rename(staged / "root")
        shutil.rmtree(dest, ignore_errors=True)
        staged.rename(dest)  # whole or absent: a half-unpacked tree is never found
    return _unpacked_build(dest / "root")


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 1 or args[0] not in ("prepare", "show"):
        print("usage: python -m qsnaptest.builds prepare|show [BUILD...]", file=sys.stderr)
        return 2
    names = args[1:] or requested_specs()
    for n in names:
        try:
            b = unpack_debian_build(n) if args[0] == "prepare" and n in DEBIAN_BUILDS \
                else find_build(n)
        except BuildUnavailable as e:
            print(f"qsnaptest.builds: {n}: {e}", file=sys.stderr)
            return 1
        print(f"{n}: QEMU {b.version} {b.binary} {' '.join(b.firmware_args())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
