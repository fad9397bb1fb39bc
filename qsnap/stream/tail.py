"""The device-state tail: FULL sections, EOF, then an optional VMDESCRIPTION.

Device sections (SECTION_FULL) are not self-delimiting, so the tail is checked
rather than interpreted: with section footers, by walking the FULL sections
from footer to footer (``7E <be32 id>`` followed by 0x04 or 0x00); without,
by finding the EOF that the trailing VMDESCRIPTION (``06 be32 len json``,
reaching exactly the end) or the end of input follows.  Layout of QEMU
migration/savevm.c (qemu_savevm_state_complete_precopy_non_iterable,
qemu_savevm_maybe_send_switchover_start, the vmdesc writer).  Used by the
reader, by the postcopy engine (device state without EOF) and by `qsnap info`.
"""
from __future__ import annotations

import json

from ..errors import StreamError
from .constants import (
    QEMU_VM_EOF,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_VMDESCRIPTION,
)

# Without footers, how many "00 06" candidates for EOF + VMDESCRIPTION are tried
# from the end before the tail is taken to end with a bare EOF.
_VMDESC_CANDIDATES = 16


def truncated(n, what, offset):
    return StreamError(
        "truncated stream: expected %d more bytes for %s at stream offset 0x%x" % (n, what, offset)
    )


def parse_tail(data, off, uses_footers):
    """(eof_pos, vmdesc) of the tail ``data`` found at stream offset ``off``.

    ``eof_pos`` indexes the EOF byte in ``data``; ``vmdesc`` is the parsed
    VMDESCRIPTION (a dict) or None.  Raises StreamError naming the offset.
    """
    if uses_footers:
        eof_pos = _walk_full_sections(data, off)
    else:
        eof_pos = _eof_without_footers(data, off)
    return eof_pos, _vmdescription(data, eof_pos + 1, off)


def device_sections(data, uses_footers):
    """The FULL sections of a tail, without its EOF and VMDESCRIPTION."""
    eof_pos, _ = parse_tail(data, 0, uses_footers)
    return data[:eof_pos]


def _walk_full_sections(data, off):
    """Index of the EOF after the FULL sections, walked footer to footer."""
    n = len(data)
    i = 0
    while True:
        if i >= n:
            raise truncated(1, "section type", off + i)
        t = data[i]
        if t == QEMU_VM_EOF:
            return i
        if t != QEMU_VM_SECTION_FULL:
            raise StreamError(
                "unexpected section type 0x%02x in device state at stream offset 0x%x" % (t, off + i)
            )
        if n - i < 6:
            raise truncated(6 - (n - i), "SECTION_FULL header", off + i)
        i = _section_end(data, i, off)


def _section_end(data, i, off):
    """Index after the footer of the FULL section at data[i]."""
    n = len(data)
    sid = int.from_bytes(data[i + 1 : i + 5], "big")
    pat = bytes([QEMU_VM_SECTION_FOOTER]) + sid.to_bytes(4, "big")
    j = i + 6 + data[i + 5]
    while True:
        j = data.find(pat, j)
        if j < 0 or j + 5 >= n:
            raise truncated(1, "footer of SECTION_FULL id %d" % sid, off + n)
        nxt = data[j + 5]
        if nxt == QEMU_VM_SECTION_FULL and _plausible_full(data, j + 5):
            return j + 5
        if nxt == QEMU_VM_EOF and _plausible_end(data, j + 5):
            return j + 5
        j += 1


def _eof_without_footers(data, off):
    """Index of the EOF: the one a VMDESCRIPTION reaching the end follows, else the last byte."""
    n = len(data)
    end = n
    for _ in range(_VMDESC_CANDIDATES):
        p = data.rfind(b"\x00\x06", 0, end)
        if p < 0:
            break
        if p + 6 <= n and int.from_bytes(data[p + 2 : p + 6], "big") == n - p - 6:
            return p
        end = p + 1
    if n == 0 or data[-1] != QEMU_VM_EOF:
        raise StreamError("device state at stream offset 0x%x does not end with EOF" % off)
    return n - 1


def _vmdescription(data, rest_start, off):
    """The VMDESCRIPTION JSON after the EOF (None when the tail ends at EOF)."""
    rest = data[rest_start:]
    if not rest:
        return None
    if rest[0] != QEMU_VM_VMDESCRIPTION:
        raise StreamError(
            "unexpected byte 0x%02x after EOF at stream offset 0x%x" % (rest[0], off + rest_start)
        )
    if len(rest) < 5:
        raise truncated(5 - len(rest), "VMDESCRIPTION", off + rest_start)
    jl = int.from_bytes(rest[1:5], "big")
    if jl > len(rest) - 5:
        raise truncated(jl - (len(rest) - 5), "VMDESCRIPTION JSON", off + rest_start)
    if jl < len(rest) - 5:
        raise StreamError(
            "%d unexpected bytes after VMDESCRIPTION at stream offset 0x%x"
            % (len(rest) - 5 - jl, off + rest_start + 5 + jl)
        )
    try:
        vmdesc = json.loads(rest[5:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise StreamError("bad VMDESCRIPTION JSON at stream offset 0x%x: %s" % (off + rest_start, e)) from None
    if not isinstance(vmdesc, dict):
        raise StreamError("VMDESCRIPTION is not a JSON object at stream offset 0x%x" % (off + rest_start))
    return vmdesc


def _plausible_full(data, i):
    """A SECTION_FULL header at data[i]: id, idstr of printable ASCII."""
    n = len(data)
    if i + 6 > n:
        return True  # truncated: let the walk report it
    ln = data[i + 5]
    if ln == 0:
        return False
    name = data[i + 6 : i + 6 + ln]
    return all(0x20 < c < 0x7F for c in name)


def _plausible_end(data, i):
    """EOF at data[i]: end of input, or a VMDESCRIPTION reaching exactly the end."""
    n = len(data)
    if i + 1 == n:
        return True
    if data[i + 1] != QEMU_VM_VMDESCRIPTION:
        return False
    if i + 6 > n:
        return True  # truncated VMDESCRIPTION: reported later
    jl = int.from_bytes(data[i + 2 : i + 6], "big")
    return i + 6 + jl >= n - 0 and data[i + 6 : i + 7] in (b"{", b"")
