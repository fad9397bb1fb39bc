"""Guest RAM collapsed into huge pages before a background snapshot (qsnap.vm.hugepages),
tried on a mapping of this process's own."""
import ctypes
import mmap
import os

import pytest

from qsnap.vm import hugepages

MADV_HUGEPAGE = 14
SIZE = 6 << 20  # a length no other mapping of this process has, most likely


@pytest.fixture
def anon_mapping():
    """A private anonymous read-write mapping (as QEMU's guest RAM), touched: (start, end)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    addr = libc.mmap(None, SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(SIZE), MADV_HUGEPAGE)
    ctypes.memset(addr, 0x5A, SIZE)
    yield addr, addr + SIZE
    libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(SIZE))


def test_finds_the_mapping_of_a_ram_block_by_its_length(anon_mapping):
    assert anon_mapping in hugepages.guest_ram_ranges(os.getpid(), [SIZE])
    assert anon_mapping not in hugepages.guest_ram_ranges(os.getpid(), [SIZE + 4096])
    assert hugepages.guest_ram_ranges(2 ** 22 + 12345, [SIZE]) == []  # no such process


def test_collapse_keeps_every_byte(anon_mapping):
    """Where the kernel collapses (Linux >= 6.1, CAP_SYS_NICE) it says how much; either
    way the memory reads as before."""
    start, end = anon_mapping
    done, error = hugepages.collapse_ranges(os.getpid(), [anon_mapping])
    assert done > 0 or error, (done, error)
    assert ctypes.string_at(start, end - start) == b"\x5a" * (end - start)


def test_every_range_the_process_holds_all_pages_of(anon_mapping):
    start, end = anon_mapping  # every page written by the fixture
    first = -(-start // hugepages.HUGE_PAGE) * hugepages.HUGE_PAGE
    whole = (end - first) // hugepages.HUGE_PAGE * hugepages.HUGE_PAGE
    got = hugepages.populated_huge_ranges(os.getpid(), [anon_mapping])
    assert got == [(first, first + whole)]
    assert hugepages.populated_huge_ranges(2 ** 22 + 12345, [anon_mapping]) is None  # no such process


def test_the_zero_page_holes_and_half_written_ranges_are_left_out():
    """Collapsing those would allocate memory the guest never wrote."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    huge, size = hugepages.HUGE_PAGE, 10 << 20
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    try:
        first = -(-addr // huge) * huge
        for off in range(0, huge, hugepages.PAGE):
            ctypes.c_char.from_address(first + off).value   # read only: the shared zero page
        ctypes.memset(first + huge, 1, huge // 2)           # half written, half a hole
        ctypes.memset(first + 2 * huge, 1, huge)            # all written
        got = hugepages.populated_huge_ranges(os.getpid(), [(addr, addr + size)])
        assert got == [(first + 2 * huge, first + 3 * huge)]
    finally:
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))


def test_an_exhausted_budget_stops_early(anon_mapping):
    done, error = hugepages.collapse_ranges(os.getpid(), [anon_mapping], budget=-1)
    assert done == 0 and "stopped after" in error


def test_a_single_page_not_own_leaves_its_huge_page_out():
    """Every entry of a huge page counts, the last as much as the first, and both bits."""
    from array import array
    per_huge = hugepages.HUGE_PAGE // hugepages.PAGE
    own = hugepages.PM_OWN_PAGE | 0x1234  # a frame number does not matter
    entries = array("Q", [own] * (5 * per_huge))
    entries[2 * per_huge - 1] = hugepages.PM_PRESENT           # huge page 1: last page shared
    entries[2 * per_huge] = hugepages.PM_MMAP_EXCLUSIVE        # huge page 2: first page not present
    entries[4 * per_huge + 7] = 0                              # huge page 4: a hole
    assert hugepages._own_huge_pages(entries.tobytes()) == [0, 3]
    assert hugepages._own_huge_pages(entries.tobytes()[:8 * (per_huge + 3)]) == [0]  # a partial tail
