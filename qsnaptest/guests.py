"""Guest payloads for the integration tests.

Two kinds of guest:

* blob guests: no kernel at all; ``-device loader`` places random bytes at
  known guest-physical addresses, SeaBIOS finds nothing to boot and halts.
  RAM content is known, so a captured stream can be checked byte for byte.
  See :func:`make_blobs`.
* a live Linux guest: Debian's stock kernel plus a tiny busybox initramfs
  whose /init keeps rewriting a tmpfs file (so RAM is dirtied during a live
  migration) and prints ``tick N`` on ttyS0 every ~0.5 s. See
  :func:`linux_guest_files` and :class:`LinuxGuest` in qemu.py.

Downloads and builds are cached in ``$QSNAP_CACHE`` (default
``~/.cache/qsnap-test``). ``$QSNAP_KERNEL`` may point at an existing bzImage
to skip the apt download.
"""

import gzip
import io
import os
import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

# Debian bookworm kernel flavour used for the live guest (boots under TCG).
KERNEL_PACKAGE_RE = re.compile(r"^linux-image-(6\.1\.0-\d+)-amd64$")
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"

# Blob addresses. Measured with pmemsave on blob-less guests after SeaBIOS
# halted (QEMU 7.2 / SeaBIOS 1.16, pc-i440fx-7.2, -nodefaults, 24M..1G, KVM
# and TCG alike; RAM starts zeroed), SeaBIOS writes to pc.ram only:
#   * below 1 MiB: 0x0-0x1000, 0x6000-0x7000, 0x9f000-0xa0000 (EBDA) and the
#     shadowed ROM area 0xc0000-0x100000;
#   * [top-0x20000, top-0x1e000) (top = end of RAM below 4 GiB);
#   * its relocated "high" zone: [top-0x5e000, top-0x40000) for RAM <= 32 MiB,
#     but [top-16MiB-0x1e000, top-16MiB) for larger guests.
# So blobs go in [16 MiB, blob_safe_end(mem)). test_blobs_survive_boot checks
# both the blobs and that nothing else is written (seabios_areas).
BLOB_MIN_ADDR = 16 << 20


def blob_safe_end(mem_bytes: int) -> int:
    """End of the RAM range that SeaBIOS leaves alone (see above)."""
    return mem_bytes - (1 << 20) if mem_bytes <= (32 << 20) else mem_bytes - (17 << 20)


def seabios_areas(mem_bytes: int):
    """[(start, end)] of pc.ram that SeaBIOS may write, for RAM < 3.5 GiB."""
    top = mem_bytes
    high = top - 0x40000 if top <= (32 << 20) else top - (16 << 20)
    return [(0, 0x100000), (high - 0x1e000, high), (top - 0x20000, top - 0x1e000)]


class GuestUnavailable(RuntimeError):
    """A guest payload cannot be built on this host (e.g. no apt, no busybox)."""


def cache_dir() -> Path:
    d = Path(os.environ.get("QSNAP_CACHE") or Path.home() / ".cache" / "qsnap-test")
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------
# blob guests


@dataclass(frozen=True)
class Blob:
    path: Path
    addr: int
    data: bytes


def blob_bytes(seed: int, index: int, size: int) -> bytes:
    """The deterministic content of blob number ``index`` (regenerable from seed)."""
    return random.Random(f"qsnap-blob-{seed}-{index}").randbytes(size)


def make_blobs(tmpdir, layout: Sequence[Tuple[int, int]], seed: int = 0) -> List[Blob]:
    """Write one random file per ``(addr, size)`` of ``layout`` into ``tmpdir``.

    Returns ``[Blob(path, addr, data), ...]``; pass them to ``Qemu(blobs=...)``
    (each becomes ``-device loader,file=PATH,addr=ADDR``). Content depends only
    on ``(seed, index, size)``, see :func:`blob_bytes`.
    """
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (addr, size) in enumerate(layout):
        data = blob_bytes(seed, i, size)
        p = tmpdir / f"blob{i}-{addr:#x}.bin"
        p.write_bytes(data)
        out.append(Blob(p, addr, data))
    return out


def check_blob_layout(layout: Sequence[Tuple[int, int]], mem_bytes: int) -> None:
    """Raise ValueError if a blob is where SeaBIOS may write (see BLOB_MIN_ADDR)."""
    for addr, size in layout:
        end = blob_safe_end(mem_bytes)
        if addr < BLOB_MIN_ADDR or addr + size > end:
            raise ValueError(f"blob [{addr:#x}, {addr + size:#x}) outside the range "
                             f"SeaBIOS leaves alone [{BLOB_MIN_ADDR:#x}, {end:#x})")


# --------------------------------------------------------------------------
# Linux guest: kernel


def _newest_kernel_package() -> str:
    try:
        names = subprocess.run(["apt-cache", "pkgnames", "linux-image-6.1.0-"],
                               check=True, capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise GuestUnavailable(f"apt-cache not usable: {e}") from None
    cands = []
    for n in names:
        m = KERNEL_PACKAGE_RE.match(n)
        if m:
            cands.append((tuple(int(x) for x in re.split(r"[.-]", m.group(1))), n))
    # pkgnames also lists virtual/unavailable names; keep those with a candidate
    for _, name in sorted(cands, reverse=True):
        pol = subprocess.run(["apt-cache", "policy", name], capture_output=True, text=True).stdout
        m = re.search(r"Candidate:\s*(\S+)", pol)
        if m and m.group(1) != "(none)":
            return name
    raise GuestUnavailable("no linux-image-6.1.0-*-amd64 package known to apt")


def kernel_path() -> Path:
    """Path of a Debian 6.1 bzImage, downloading it once into the cache."""
    env = os.environ.get("QSNAP_KERNEL")
    if env:
        return Path(env)
    cache = cache_dir()
    found = sorted(cache.glob("vmlinuz-6.1.0-*-amd64"))
    if found:
        return found[-1]
    pkg = _newest_kernel_package()
    with tempfile.TemporaryDirectory(dir=cache) as td:
        try:
            subprocess.run(["apt-get", "download", "-q", pkg], cwd=td, check=True,
                           capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise GuestUnavailable(f"apt-get download {pkg} failed: "
                                   f"{getattr(e, 'stderr', e)}") from None
        debs = list(Path(td).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(td) / "x")], check=True)
        vmlinuz = sorted((Path(td) / "x" / "boot").glob("vmlinuz-*"))[0]
        dst = cache / vmlinuz.name
        shutil.copyfile(vmlinuz, dst.with_suffix(".tmp"))
        os.replace(dst.with_suffix(".tmp"), dst)
    return dst


# --------------------------------------------------------------------------
# Linux guest: initramfs

# /init of the live guest. DATA_MB of random bytes live in tmpfs (guest RAM);
# every tick rewrites CHUNK_MB of it at a rotating offset, so a live
# migration always has freshly dirtied pages. The counter goes to ttyS0.
# The start of every busybox /init of the test and bench guests: applets, PATH and
# the kernel's filesystems.
INIT_PREAMBLE = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
"""

INIT_SCRIPT = INIT_PREAMBLE + r"""mount -t tmpfs -o size={tmpfs_mb}m tmp /tmp
dd if=/dev/urandom of=/tmp/data bs=1M count={data_mb} 2>/dev/null
echo "qsnap-guest ready" > /dev/ttyS0
n=0
chunks=$(({data_mb} / {chunk_mb}))
while :; do
  dd if=/dev/urandom of=/tmp/data bs=1M count={chunk_mb} seek=$((n % chunks * {chunk_mb})) conv=notrunc 2>/dev/null
  echo "tick $n" > /dev/ttyS0
  n=$((n + 1))
  usleep 500000
done
"""


def _cpio_newc(entries) -> bytes:
    """Pack ``[(name, mode, data_bytes_or_None), ...]`` as a cpio "newc" archive."""
    out = io.BytesIO()

    def put(ino, name, mode, data):
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out.write(hdr.encode() + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        put(ino, name, mode, data or b"")
    put(0, "TRAILER!!!", 0, b"")
    return out.getvalue()


def build_initramfs(dest: Path, data_mb: int = 32, chunk_mb: int = 4) -> Path:
    """Build the live guest's gzip'd newc initramfs (busybox-static + /init)."""
    busybox = shutil.which("busybox")
    if not busybox:
        raise GuestUnavailable("busybox not found (install busybox-static)")
    bb = Path(busybox).read_bytes()
    if b"\x7fELF" != bb[:4] or b"ld-linux" in bb[:4096]:
        raise GuestUnavailable(f"{busybox} is not a static binary (install busybox-static)")
    init = INIT_SCRIPT.format(data_mb=data_mb, chunk_mb=chunk_mb, tmpfs_mb=data_mb + 8)
    d, f = 0o040755, 0o100755
    entries = [("bin", d, None), ("dev", d, None), ("proc", d, None), ("sys", d, None),
               ("tmp", d, None), ("bin/busybox", f, bb), ("init", f, init.encode())]
    dest = Path(dest)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=6, mtime=0))
    os.replace(tmp, dest)
    return dest


def initramfs_path() -> Path:
    """The cached live-guest initramfs (rebuilt when /init or busybox changes)."""
    import hashlib
    busybox = shutil.which("busybox") or ""
    key = hashlib.sha256(INIT_SCRIPT.encode() + busybox.encode()
                         + str(os.stat(busybox).st_mtime_ns if busybox else 0).encode())
    p = cache_dir() / f"initramfs-{key.hexdigest()[:12]}.cpio.gz"
    if not p.exists():
        build_initramfs(p)
    return p


def linux_guest_files() -> Tuple[Path, Path]:
    """(kernel, initramfs) for the live Linux guest, cached."""
    return kernel_path(), initramfs_path()
