"""Pure-Python twin of csrc/ramparse.c (same contract, same results).

Used by the reader when ``QSNAP_PUREPYTHON=1`` (or ``pure=True``) and as the
reference the C parser is tested against.  Also holds the helpers shared by both
paths: the error-message builder and the "how many bytes does this record need"
calculation used for truncation messages.
"""
from __future__ import annotations

import numpy as np

from .constants import (
    RAM_FLAG_NAMES,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
)
from .events import NO_BLOCK, PAGE_REC_DTYPE

# Status codes and error codes: same values as ramparse.h
QS_RAM_ERR = -1
QS_RAM_NEED_MORE = 0
QS_RAM_EOS = 1
QS_RAM_FULL = 2
QS_RAM_MEMSIZE = 3

QS_RAM_E_NONE = 0
QS_RAM_E_FLAGS = 1
QS_RAM_E_NO_BLOCK = 2
QS_RAM_E_IDLEN_ZERO = 3
QS_RAM_E_UNKNOWN_BLOCK = 4
QS_RAM_E_OFFSET = 5
QS_RAM_E_XBZRLE_ENC = 6
QS_RAM_E_XBZRLE_LEN = 7
QS_RAM_E_COMPRESS_LEN = 8

_PAGE_KINDS = (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_COMPRESS_PAGE)


class PyRamState:
    """Mirror of qs_ram_state.  ``blocks`` is a list of (idstr bytes, length)."""

    __slots__ = ("blocks", "last_block", "page_size", "base_offset", "err_code", "err_offset", "err_value")

    def __init__(self, blocks=(), page_size=4096, last_block=-1, base_offset=0):
        self.blocks = list(blocks)
        self.last_block = last_block
        self.page_size = page_size
        self.base_offset = base_offset
        self.err_code = QS_RAM_E_NONE
        self.err_offset = 0
        self.err_value = 0


class _RamError(Exception):
    """A record the C parser would fail with QS_RAM_ERR (code, offset, value)."""


def py_ram_parse(st: PyRamState, buf, cap: int):
    """Parse RAM records from ``buf``; returns (status, records, consumed).

    On QS_RAM_ERR, ``st.err_code/err_offset/err_value`` are set and records is
    empty, consumed 0 (as in C).
    """
    mv = memoryview(buf).cast("B")
    length = len(mv)
    mask = st.page_size - 1
    out = []
    pos = 0
    status = QS_RAM_NEED_MORE
    st.err_code = QS_RAM_E_NONE
    try:
        while True:
            if len(out) >= cap:
                status = QS_RAM_FULL
                break
            if length - pos < 8:
                break
            word = int.from_bytes(mv[pos : pos + 8], "big")
            flags = word & mask
            addr = word & ~mask & 0xFFFFFFFFFFFFFFFF
            kind = flags & ~RAM_SAVE_FLAG_CONTINUE
            if kind == RAM_SAVE_FLAG_EOS:
                pos += 8
                status = QS_RAM_EOS
                break
            if kind == RAM_SAVE_FLAG_MEM_SIZE:
                status = QS_RAM_MEMSIZE
                break
            if kind == RAM_SAVE_FLAG_MULTIFD_FLUSH:
                out.append((addr, 0, 0, NO_BLOCK, flags, 0))
                pos += 8
                continue
            if kind not in _PAGE_KINDS:
                raise _RamError(QS_RAM_E_FLAGS, st.base_offset + pos, flags)
            rec = _page_record(st, mv, pos, addr, flags, kind)
            if rec is None:
                break
            pos, record = rec
            out.append(record)
    except _RamError as e:
        st.err_code, st.err_offset, st.err_value = e.args
        return QS_RAM_ERR, np.zeros(0, PAGE_REC_DTYPE), 0
    return status, _records(out), pos


def _page_record(st, mv, pos, addr, flags, kind):
    """(end, record tuple) of the ZERO/PAGE/XBZRLE/COMPRESS_PAGE record at ``pos``,
    or None when ``mv`` ends inside it."""
    length = len(mv)
    rec_abs = st.base_offset + pos
    p = pos + 8
    if flags & RAM_SAVE_FLAG_CONTINUE:
        if st.last_block < 0 or st.last_block >= len(st.blocks):
            raise _RamError(QS_RAM_E_NO_BLOCK, rec_abs, flags)
        block = st.last_block
    else:
        if length - p < 1:
            return None
        idlen = mv[p]
        if idlen == 0:
            raise _RamError(QS_RAM_E_IDLEN_ZERO, rec_abs, 0)
        if length - p - 1 < idlen:
            return None
        block = _block_index(st.blocks, bytes(mv[p + 1 : p + 1 + idlen]))
        if block < 0:
            raise _RamError(QS_RAM_E_UNKNOWN_BLOCK, rec_abs, p)
        p += 1 + idlen
    payload = _payload(mv, p, kind, st.page_size, rec_abs)
    if payload is None:
        return None
    end, dpos, dlen, fill = payload
    st.last_block = block
    if addr >= st.blocks[block][1]:
        raise _RamError(QS_RAM_E_OFFSET, rec_abs, addr)
    return end, (addr, dpos, dlen, block, flags, fill)


def _block_index(blocks, name):
    for i, (bname, _blen) in enumerate(blocks):
        if bname == name:
            return i
    return -1


def _payload(mv, p, kind, ps, rec_abs):
    """(end, data_pos, data_len, fill) of the payload at ``p``, or None when incomplete."""
    length = len(mv)
    if kind == RAM_SAVE_FLAG_ZERO:
        if length - p < 1:
            return None
        return p + 1, 0, 0, mv[p]
    if kind == RAM_SAVE_FLAG_PAGE:
        if length - p < ps:
            return None
        return p + ps, p, ps, 0
    if kind == RAM_SAVE_FLAG_XBZRLE:
        if length - p < 3:
            return None
        if mv[p] != 0x01:
            raise _RamError(QS_RAM_E_XBZRLE_ENC, rec_abs, mv[p])
        n = (mv[p + 1] << 8) | mv[p + 2]
        if n > ps:
            raise _RamError(QS_RAM_E_XBZRLE_LEN, rec_abs, n)
        p += 3
    else:  # COMPRESS_PAGE: be32 length, at most compressBound(page size)
        if length - p < 4:
            return None
        n = int.from_bytes(mv[p : p + 4], "big")
        if n > ps + ps // 1000 + 64:
            raise _RamError(QS_RAM_E_COMPRESS_LEN, rec_abs, n)
        p += 4
    if length - p < n:
        return None
    return p + n, p, n, 0


def _records(out):
    recs = np.zeros(len(out), PAGE_REC_DTYPE)
    if out:
        arr = np.array(out, dtype=np.uint64)
        for i, name in enumerate(("offset", "data_pos", "data_len", "block", "flags", "fill")):
            recs[name] = arr[:, i]
    return recs


def flag_names(flags: int) -> str:
    """``0x41`` -> ``XBZRLE|FULL`` (highest bit first; unknown bits in hex)."""
    names = []
    rest = flags
    for bit in sorted(RAM_FLAG_NAMES, reverse=True):
        if flags & bit:
            names.append(RAM_FLAG_NAMES[bit])
            rest &= ~bit
    if rest:
        names.insert(0, "0x%x" % rest)
    return "|".join(names) if names else "none"


def ram_error_message(code, err_offset, err_value, blocks, buf, last_block) -> str:
    """Message for a parser error; ``blocks`` is a list of (idstr bytes, length)."""
    where = "at stream offset 0x%x" % err_offset
    if code == QS_RAM_E_FLAGS:
        return "unknown RAM record flags 0x%x (%s) %s" % (err_value, flag_names(err_value), where)
    if code == QS_RAM_E_NO_BLOCK:
        return "RAM record with CONTINUE (flags 0x%x) but no previous block %s" % (err_value, where)
    if code == QS_RAM_E_IDLEN_ZERO:
        return "RAM block idstr of length 0 %s" % where
    if code == QS_RAM_E_UNKNOWN_BLOCK:
        p = int(err_value)
        n = buf[p]
        name = bytes(buf[p + 1 : p + 1 + n]).decode("utf-8", "backslashreplace")
        return "unknown RAM block %r %s" % (name, where)
    if code == QS_RAM_E_OFFSET:
        name, length = blocks[last_block]
        return "page offset 0x%x outside block %r (length 0x%x) %s" % (
            err_value,
            name.decode("utf-8", "backslashreplace"),
            length,
            where,
        )
    if code == QS_RAM_E_XBZRLE_ENC:
        return "unknown XBZRLE encoding byte 0x%x %s" % (err_value, where)
    if code == QS_RAM_E_XBZRLE_LEN:
        return "XBZRLE length 0x%x larger than the page size %s" % (err_value, where)
    if code == QS_RAM_E_COMPRESS_LEN:
        return "COMPRESS_PAGE length 0x%x larger than compressBound %s" % (err_value, where)
    return "RAM parser error %d (value 0x%x) %s" % (code, err_value, where)


def record_need(buf, page_size: int) -> int:
    """Bytes the (incomplete) RAM record at buf[0] needs, as far as can be known."""
    mv = memoryview(buf).cast("B")
    n = len(mv)
    if n < 8:
        return 8
    word = int.from_bytes(mv[:8], "big")
    flags = word & (page_size - 1)
    kind = flags & ~RAM_SAVE_FLAG_CONTINUE
    p = 8
    if not flags & RAM_SAVE_FLAG_CONTINUE and kind in _PAGE_KINDS:
        if n < 9:
            return 9
        p = 9 + mv[8]
    if kind == RAM_SAVE_FLAG_ZERO:
        return p + 1
    if kind == RAM_SAVE_FLAG_PAGE:
        return p + page_size
    if kind == RAM_SAVE_FLAG_XBZRLE:
        if n < p + 3:
            return p + 3
        return p + 3 + ((mv[p + 1] << 8) | mv[p + 2])
    if kind == RAM_SAVE_FLAG_COMPRESS_PAGE:
        if n < p + 4:
            return p + 4
        return p + 4 + int.from_bytes(mv[p : p + 4], "big")
    return p


class PyRamParser:
    """Same interface as ``qsnap._core.RamParser``, built on :func:`py_ram_parse`."""

    def __init__(self, cap=8192, page_size=4096):
        if cap <= 0:
            raise ValueError("cap must be positive")
        if page_size < 512 or page_size & (page_size - 1):
            raise ValueError("page size must be a power of two >= 512")
        self.cap = cap
        self.st = PyRamState(page_size=page_size)

    def set_blocks(self, blocks):
        self.st.blocks = [(bytes(n), int(l)) for n, l in blocks]

    @property
    def last_block(self):
        return self.st.last_block

    @last_block.setter
    def last_block(self, v):
        self.st.last_block = v

    @property
    def page_size(self):
        return self.st.page_size

    def parse(self, buf, base_offset=0):
        from ..errors import StreamError

        self.st.base_offset = base_offset
        status, recs, consumed = py_ram_parse(self.st, buf, self.cap)
        if status == QS_RAM_ERR:
            st = self.st
            raise StreamError(
                ram_error_message(st.err_code, st.err_offset, st.err_value, st.blocks, memoryview(buf).cast("B"), st.last_block)
            )
        return status, recs, consumed
