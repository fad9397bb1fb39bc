"""Equality checks for large values that explain a difference cheaply.

pytest explains a failed ``assert a == b`` between bytes or lists by diffing
their pretty-printed reprs with difflib, and when ``CI`` is set in the
environment it does so at any verbosity.  For a few MiB of RAM that takes
longer than any test limit.  Tests compare RAM dumps, images, pages and page
lists with :func:`assert_same`, which says where the first difference is and
how much differs, in time linear in the size.

This module is not a test module, so pytest does not rewrite its asserts.
"""

import reprlib

import numpy as np

PAGE = 4096

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxtuple = 4


def _is_bytes(v):
    return isinstance(v, (bytes, bytearray, memoryview))


def _u8(v):
    return np.frombuffer(memoryview(v).cast("B"), np.uint8)


def _bytes_difference(got, want):
    g, w = _u8(got), _u8(want)
    n = min(g.size, w.size)
    diff = np.flatnonzero(g[:n] != w[:n])
    parts = [f"{g.size} bytes, expected {w.size}"] if g.size != w.size else [f"{n} bytes"]
    if diff.size:
        first = int(diff[0])
        pages = np.unique(diff // PAGE).size
        parts.append(f"first difference at byte {first:#x} (page {first // PAGE:#x}): "
                     f"{int(g[first]):#04x}, expected {int(w[first]):#04x}")
        parts.append(f"{diff.size} bytes differ in {pages} of {-(-n // PAGE)} 4 KiB pages")
    else:
        parts.append(f"identical over the first {n} bytes")
    return "; ".join(parts)


def _sequence_difference(got, want):
    n = min(len(got), len(want))
    first = next((i for i in range(n) if got[i] != want[i]), n)
    parts = [f"{len(got)} items, expected {len(want)}"] if len(got) != len(want) else [f"{n} items"]
    if first < n:
        parts.append(f"first difference at index {first}: "
                     f"{_short.repr(got[first])}, expected {_short.repr(want[first])}")
    elif len(got) > n:
        parts.append(f"extra from index {n}: {_short.repr(got[n])}")
    else:
        parts.append(f"missing from index {n}: {_short.repr(want[n])}")
    return "; ".join(parts)


def assert_same(got, want, what="value"):
    """Raise AssertionError naming the first difference unless got == want."""
    if _is_bytes(got) and _is_bytes(want):
        g, w = _u8(got), _u8(want)
        if g.size == w.size and np.array_equal(g, w):
            return
        raise AssertionError(f"{what} differs: {_bytes_difference(got, want)}")
    if got == want:
        return
    if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
        raise AssertionError(f"{what} differs: {_sequence_difference(got, want)}")
    raise AssertionError(f"{what} differs: {_short.repr(got)}, expected {_short.repr(want)}")


def assert_same_files(got, want, what="files", window=64 << 20):
    """assert_same over two files' contents, ``window`` bytes at a time, so that
    comparing two multi-GiB sparse exports costs a window of memory, not the files.
    The first differing window is explained as assert_same would, with its offsets
    counted from the window's start, which the message gives."""
    with open(got, "rb") as g, open(want, "rb") as w:
        at = 0
        while True:
            a, b = g.read(window), w.read(window)
            if a != b:
                try:
                    assert_same(a, b, what)
                except AssertionError as e:
                    raise AssertionError(f"{e} (in the window at byte {at:#x})") from None
                raise AssertionError(f"{what} differ in the window at byte {at:#x}")
            if not a:
                return
            at += len(a)
