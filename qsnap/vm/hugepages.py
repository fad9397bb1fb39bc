"""Guest RAM back in transparent huge pages before a background snapshot's pause.

QEMU's background snapshot reads one byte of every host page of guest RAM before it
stops the guest (ram_write_tracking_prepare -> ram_block_populate_read,
migration/ram.c) and write-protects all of it while the guest is stopped
(ram_write_tracking_start: UFFDIO_WRITEPROTECT).  Both walk QEMU's page tables, 512
times fewer entries where guest RAM lies in 2 MiB transparent huge pages (QEMU asks
for them: MADV_HUGEPAGE on guest RAM).  A background snapshot leaves guest RAM in
4 KiB pages: QEMU lifts the write protection a host page (4 KiB) at a time as it saves
(ram_save_release_protection, migration/ram.c), which splits every huge page
(AnonHugePages of a 3 GiB guest: 2066 MiB before the first, 18 MiB after), so every
later snapshot walks 512 times more entries, and with disks both walks are inside
the pause (the disks switch before ``migrate``): 300-600 ms against 45-75 ms measured
on a 3 GiB guest.

``collapse(q)`` asks the kernel to make them huge pages again (process_madvise
MADV_COLLAPSE: Linux >= 6.1, CAP_SYS_NICE) while the guest still runs, before the
``stop``.  It changes no byte of guest RAM, only how QEMU's mappings are backed, so
what the snapshot holds is unchanged.  Only 2 MiB ranges whose every page QEMU holds
already are collapsed: MADV_COLLAPSE fills the holes of a range with new zeroed memory,
and guest RAM the guest never wrote (unmapped, or the shared zero page) would then cost
host memory it did not before (1 GiB more for a 3 GiB guest with 2 GiB in use, seen
when all of it was collapsed).  Best effort: where the kernel refuses (older kernel, no
permission, no free huge pages) the snapshot goes on as before.
"""
import ctypes
import os
import sys
import threading
import time

MADV_COLLAPSE = 25               # include/uapi/asm-generic/mman-common.h
SYS_process_madvise = 440        # the same number on every architecture but alpha
CHUNK = 1 << 30                  # one call advises at most MAX_RW_COUNT (~2 GiB) bytes
HUGE_PAGE = 2 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
# /proc/PID/pagemap: one 64-bit entry a page (Documentation/admin-guide/mm/pagemap.rst)
PM_PRESENT = 1 << 63
PM_MMAP_EXCLUSIVE = 1 << 56      # a page of this process alone: not the shared zero page
PM_OWN_PAGE = PM_PRESENT | PM_MMAP_EXCLUSIVE
BUDGET = 10.0                    # s: a bigger guest gets only what fits (while it runs)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def guest_ram_ranges(pid, lengths):
    """[(start, end)] of QEMU's anonymous private mappings that are guest RAM blocks:
    a RAM block is mapped on its own (qemu_ram_mmap, util/mmap-alloc.c), so its
    mapping is as long as the block's max length; ``lengths`` are those lengths."""
    want = {n for n in lengths if n >= HUGE_PAGE}
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) != 5 or fields[1] != "rw-p":  # a path: not anonymous memory
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if end - start in want:
                    out.append((start, end))
    except OSError:
        return []
    return out


def populated_huge_ranges(pid, ranges):
    """[(start, end)] runs of the 2 MiB-aligned huge-page ranges inside ``ranges`` whose
    every page is present and QEMU's alone (pagemap), or None if pagemap is unreadable."""
    out = []
    try:
        with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
            for start, end in ranges:
                first = -(-start // HUGE_PAGE) * HUGE_PAGE
                last = end // HUGE_PAGE * HUGE_PAGE
                for window in range(first, last, CHUNK):
                    f.seek(window // PAGE * 8)
                    entries = f.read(min(CHUNK, last - window) // PAGE * 8)
                    for i in _own_huge_pages(entries):
                        addr = window + i * HUGE_PAGE
                        if out and out[-1][1] == addr:
                            out[-1] = (out[-1][0], addr + HUGE_PAGE)
                        else:
                            out.append((addr, addr + HUGE_PAGE))
    except OSError:
        return None
    return out


# PM_PRESENT (bit 63) and PM_MMAP_EXCLUSIVE (bit 56) both lie in an entry's most
# significant byte: a page is the process's own when that byte has both bits.
_TOP_BYTE = 7 if sys.byteorder == "little" else 0
_OWN_BYTE = bytes(0 if b << 56 & PM_OWN_PAGE == PM_OWN_PAGE else 1 for b in range(256))


def _own_huge_pages(entries):
    """Indices of the huge pages, 2 MiB of pagemap ``entries`` (bytes) each, that hold
    only own pages.  A snapshot waits for this (a 3 GiB guest: 786 432 entries), so it
    runs in bytes' C loops: 0 marks an own page, and a huge page is own when it holds
    no 1."""
    per_huge = HUGE_PAGE // PAGE
    marks = entries[_TOP_BYTE::8].translate(_OWN_BYTE)
    return [i for i in range(len(marks) // per_huge)
            if marks.find(1, i * per_huge, (i + 1) * per_huge) < 0]


def collapse_ranges(pid, ranges, budget=BUDGET):
    """process_madvise(MADV_COLLAPSE) over ``ranges`` of process ``pid``, a chunk at a
    time until ``budget`` s are spent: (bytes advised, the first error or None)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        return 0, e.strerror
    libc = ctypes.CDLL(None, use_errno=True)
    deadline = time.monotonic() + budget
    done, error = 0, None
    try:
        for start, end in ranges:
            for off in range(start, end, CHUNK):
                if time.monotonic() > deadline:
                    return done, error or f"stopped after {budget:g} s"
                iov = _IoVec(off, min(CHUNK, end - off))
                n = libc.syscall(SYS_process_madvise, pidfd, ctypes.byref(iov), 1, MADV_COLLAPSE, 0)
                if n < 0:
                    # EAGAIN / ENOMEM: some huge pages could not be made; the rest were
                    error = error or os.strerror(ctypes.get_errno())
                    continue
                done += n
    finally:
        os.close(pidfd)
    return done, error


def collapse(q):
    """Collapse the guest RAM of the QEMU at ``q`` into huge pages: a summary dict for the
    snapshot's summary (bytes collapsed, seconds, error or None, guest_ram_bytes: the
    mappings found); never raises for the kernel's no."""
    return Collapse(q).result()


class Collapse:
    """collapse(q) in a thread of its own: QMP is asked here, the kernel in the thread,
    so the snapshot's other preparation (the overlay files, the save's start) goes on
    meanwhile; ``result()`` waits for it and gives collapse's summary."""

    def __init__(self, q):
        from qsnap.vm.restore import ram_blocks

        self.t0 = time.monotonic()
        self.out = {"bytes": 0, "seconds": 0.0, "error": None, "guest_ram_bytes": 0}
        self.pid = q.pid
        self.lengths = [most for _used, most in ram_blocks(q).values()] if q.pid else []
        self.thread = threading.Thread(target=self._run, daemon=True, name="qsnap-collapse")
        self.thread.start()

    def _run(self):
        out = self.out
        try:
            ranges = guest_ram_ranges(self.pid, self.lengths) if self.pid else []
            out["guest_ram_bytes"] = sum(e - s for s, e in ranges)
            full = populated_huge_ranges(self.pid, ranges) if ranges else None
            if not ranges:
                out["error"] = "no guest RAM mapping found"
            elif full is None:
                out["error"] = "cannot read QEMU's pagemap"
            else:
                out["bytes"], out["error"] = collapse_ranges(self.pid, full)
        except Exception as e:  # best effort, as the kernel's no: never the snapshot's end
            out["error"] = str(e)
        out["seconds"] = round(time.monotonic() - self.t0, 3)

    def result(self):
        self.thread.join()
        return self.out
