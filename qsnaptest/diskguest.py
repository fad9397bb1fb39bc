"""A Linux guest with a virtio disk that keeps writing numbered records (TCG).

Its /init loads the virtio modules of the harness's Debian kernel, then loops:

    n = n + 1  ->  write record n to sector n of /dev/vda (O_DIRECT + fsync)
               ->  print ``rec n`` on ttyS0
               ->  read record n-1 back with O_DIRECT and print ``ERR ...`` if it
                   differs from the one it remembers writing

The counter ``n`` and the last record written live only in the shell (guest RAM),
so a snapshot whose RAM and disk agree restores into a guest that goes on with
record K+1 where the disk holds 1..K.  A record carries the host's wall clock
(seconds, read through the emulated RTC, which follows the host clock): a guest
restored from RAM older than its disk rewrites a record with a later time, which
:func:`check_continuation` catches.

    kernel, initrd = diskguest.files()
    disk = diskguest.create_disk(tmp / "disk.qcow2")
    with diskguest.DiskGuest(kernel, initrd, disks=[disk]) as vm:
        vm.wait_record(5)
        diskguest.records(disk)      # {1: (1, stamp), 2: ..., ...}
"""

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Sequence, Tuple

from qsnaptest import guests
from qsnaptest.qemu import LinuxGuest, QemuError

# The modules virtio-blk needs, in load order (Debian 6.1 builds them as modules).
VIRTIO_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
                  "virtio_pci", "virtio_blk")
SECTOR = 512
RECORD_MAGIC = "QSNAPREC"
DISK_SIZE = "16M"
ERROR_MARKER = "QSNAP-DISK-ERROR"
REC_RE = re.compile(r"^rec (\d+)\r?$", re.M)

INIT_SCRIPT = guests.INIT_PREAMBLE + r"""for m in {modules}; do
  insmod /lib/modules/$m.ko || echo "{err} insmod $m failed" > /dev/ttyS0
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
[ -b /dev/vda ] || echo "{err} no /dev/vda" > /dev/ttyS0
echo "diskguest ready" > /dev/ttyS0
n=0
last=""
while :; do
  n=$((n + 1))
  read t < /sys/class/rtc/rtc0/since_epoch
  rec="{magic} $n $t"
  printf "%-511s\n" "$rec" | dd of=/dev/vda bs=512 seek=$n count=1 oflag=direct conv=notrunc,fsync 2>/dev/null \
    || echo "{err} write $n failed" > /dev/ttyS0
  echo "rec $n" > /dev/ttyS0
  if [ $n -gt 1 ]; then
    got=$(dd if=/dev/vda bs=512 skip=$((n - 1)) count=1 iflag=direct 2>/dev/null)
    set -- $got
    [ "$1 $2 $3" = "$last" ] || echo "{err} record $((n - 1)) reads '$1 $2 $3', wrote '$last'" > /dev/ttyS0
  fi
  last=$rec
  usleep {pause_us}
done
"""


def _kernel_release(kernel: Path) -> str:
    m = re.fullmatch(r"vmlinuz-(.+)", Path(kernel).name)
    if not m:
        raise guests.GuestUnavailable(f"cannot tell the kernel release of {kernel} "
                                      "(expected vmlinuz-RELEASE)")
    return m.group(1)


def module_dir(kernel: Path) -> Path:
    """The virtio .ko files of ``kernel``'s package, extracted once into the cache."""
    release = _kernel_release(kernel)
    dest = guests.cache_dir() / f"modules-{release}"
    if all((dest / f"{m}.ko").exists() for m in VIRTIO_MODULES):
        return dest
    pkg = f"linux-image-{release}"
    with tempfile.TemporaryDirectory(dir=guests.cache_dir()) as td:
        try:
            subprocess.run(["apt-get", "download", "-q", pkg], cwd=td, check=True,
                           capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise guests.GuestUnavailable(f"apt-get download {pkg} failed: "
                                          f"{getattr(e, 'stderr', e)}") from None
        deb = next(Path(td).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(td) / "x")], check=True)
        tmp = Path(td) / "mods"
        tmp.mkdir()
        for m in VIRTIO_MODULES:
            found = list((Path(td) / "x" / "lib" / "modules" / release).rglob(f"{m}.ko"))
            if not found:
                raise guests.GuestUnavailable(f"{pkg} has no {m}.ko")
            shutil.copyfile(found[0], tmp / f"{m}.ko")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    return dest


def build_initramfs(dest: Path, modules: Path, pause_us: int = 200000) -> Path:
    """The disk guest's gzip'd newc initramfs: busybox-static, the virtio modules, /init."""
    busybox = shutil.which("busybox")
    if not busybox:
        raise guests.GuestUnavailable("busybox not found (install busybox-static)")
    init = INIT_SCRIPT.format(modules=" ".join(VIRTIO_MODULES), magic=RECORD_MAGIC,
                              err=ERROR_MARKER, pause_us=pause_us)
    d, f = 0o040755, 0o100755
    entries = [("bin", d, None), ("dev", d, None), ("proc", d, None), ("sys", d, None),
               ("lib", d, None), ("lib/modules", d, None),
               ("bin/busybox", f, Path(busybox).read_bytes()), ("init", f, init.encode())]
    entries += [(f"lib/modules/{m}.ko", 0o100644, (modules / f"{m}.ko").read_bytes())
                for m in VIRTIO_MODULES]
    dest = Path(dest)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(guests._cpio_newc(entries), compresslevel=6, mtime=0))
    os.replace(tmp, dest)
    return dest


def files() -> Tuple[Path, Path]:
    """(kernel, initramfs) of the disk guest, cached."""
    kernel = guests.kernel_path()
    modules = module_dir(kernel)
    busybox = shutil.which("busybox") or ""
    key = hashlib.sha256(INIT_SCRIPT.encode() + busybox.encode() + str(kernel).encode())
    p = guests.cache_dir() / f"initramfs-disk-{key.hexdigest()[:12]}.cpio.gz"
    if not p.exists():
        build_initramfs(p, modules)
    return kernel, p


# -- disks --------------------------------------------------------------------------

def create_disk(path, size: str = DISK_SIZE) -> Path:
    """A new empty qcow2 disk image."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size],
                   check=True, capture_output=True)
    return Path(path)


def create_overlay(path, backing) -> Path:
    """A new qcow2 overlay on ``backing`` (absolute path), as a restored VM's disk."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(Path(backing).resolve()),
                    "-F", "qcow2", str(path)], check=True, capture_output=True)
    return Path(path)


def drive_args(disks: Sequence) -> list:
    """QEMU arguments attaching each disk image as a virtio-blk device vd<i> (drive d<i>)."""
    args = []
    for i, disk in enumerate(disks):
        args += ["-drive", f"file={disk},if=none,id=d{i},format=qcow2",
                 "-device", f"virtio-blk-pci,drive=d{i},id=vd{i}"]
    return args


def raw_bytes(image) -> bytes:
    """The guest-visible content of a disk image (its whole backing chain), read with -U
    so that a disk in use by a running QEMU can be read too."""
    with tempfile.TemporaryDirectory() as td:
        raw = Path(td) / "disk.raw"
        r = subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)],
                           capture_output=True, text=True)
        if r.returncode:
            raise QemuError(f"qemu-img convert {image}: {r.stderr.strip()}")
        return raw.read_bytes()


def parse_records(raw: bytes) -> Dict[int, Tuple[int, int]]:
    """{N: (N, stamp)} of the sectors holding a record; AssertionError on a sector holding
    a record of another number or a damaged one."""
    out = {}
    magic = RECORD_MAGIC.encode()
    for n in range(1, len(raw) // SECTOR):
        sector = raw[n * SECTOR:(n + 1) * SECTOR]
        if not sector.startswith(magic):
            if any(sector):
                raise AssertionError(f"sector {n} holds no record but {sector[:40]!r}")
            continue
        fields = sector.split()
        if len(fields) != 3 or int(fields[1]) != n:
            raise AssertionError(f"sector {n} holds a bad record {sector[:60]!r}")
        out[n] = (n, int(fields[2]))
    return out


def records(image) -> Dict[int, Tuple[int, int]]:
    """The records a disk image (with its backing chain) holds, see parse_records."""
    return parse_records(raw_bytes(image))


def contiguous_top(recs: Dict[int, tuple]) -> int:
    """K when ``recs`` holds exactly records 1..K; AssertionError on a gap."""
    k = max(recs, default=0)
    missing = sorted(set(range(1, k + 1)) - set(recs))
    if missing:
        raise AssertionError(f"records {missing[:10]} missing below record {k}")
    return k


def check_continuation(frozen: Dict[int, tuple], restored: Dict[int, tuple]) -> Tuple[int, int]:
    """(K, M): the restored disk holds the frozen records 1..K unchanged (none rewritten)
    and its own K+1..M with no gap; AssertionError otherwise."""
    k = contiguous_top(frozen)
    m = contiguous_top(restored)
    changed = [n for n in range(1, k + 1) if restored.get(n) != frozen[n]]
    if changed:
        raise AssertionError(f"the restored guest rewrote records {changed[:10]} of the frozen disk "
                             f"(it holds 1..{k}): its RAM is older than its disk")
    return k, m


# -- the guest ------------------------------------------------------------------------

class DiskGuest(LinuxGuest):
    """The record-writing guest; ``disks`` become virtio-blk devices (first = /dev/vda)."""

    def __init__(self, kernel, initrd, *, disks: Sequence = (), args: Sequence = (), **kw):
        kw.setdefault("name", "disk")
        self.disks = [Path(d) for d in disks]
        super().__init__(kernel, initrd, args=list(drive_args(self.disks)) + list(args), **kw)

    def recs(self) -> list:
        """The record numbers printed on the console so far."""
        return [int(x) for x in REC_RE.findall(self.console())]

    def last_record(self) -> int:
        found = self.recs()
        return found[-1] if found else 0

    def errors(self) -> list:
        return [ln for ln in self.console().splitlines() if ERROR_MARKER in ln]

    def wait_record(self, n: int, timeout: float = 180.0) -> int:
        """Wait until the guest printed ``rec M`` with M >= n; return M.  QemuError on an
        error marker on the console, a dead QEMU or the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.errors():
                raise QemuError(f"disk guest reports: {self.errors()}")
            m = self.last_record()
            if m >= n:
                return m
            if not self.is_running():
                raise QemuError(f"disk guest died (QEMU exit {self.proc.returncode}); console:\n"
                                f"{self.console()[-3000:]}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise QemuError(f"no rec >= {n} after {timeout}s; console:\n{self.console()[-3000:]}")
            time.sleep(0.1)
