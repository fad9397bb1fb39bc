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


def py_ram_parse(st: PyRamState, buf, cap: int):
    """Parse RAM records from ``buf``; returns (status, records, consumed).

    On QS_RAM_ERR, ``st.err_code/err_offset/err_value`` are set and records is
    empty, consumed 0 (as in C).
    """
    mv = memoryview(buf).cast("B")
    length = len(mv)
    ps = st.page_size
    mask = ps - 1
    bound = ps + ps // 1000 + 64
    out = []
    pos = 0
    status = QS_RAM_NEED_MORE
    st.err_code = QS_RAM_E_NONE
    blocks = st.blocks
    nb = len(blocks)

    def err(code, off, value):
        st.err_code = code
        st.err_offset = off
        st.err_value = value
        return QS_RAM_ERR, np.zeros(0, PAGE_REC_DTYPE), 0

    while True:
        if len(out) >= cap:
            status = QS_RAM_FULL
            break
        if length - pos < 8:
            break
        rec_abs = st.base_offset + pos
        word = int.from_bytes(mv[pos : pos + 8], "big")
        flags = word & mask
        addr = word & ~mask & 0xFFFFFFFFFFFFFFFF
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        p = pos + 8
        if kind == RAM_SAVE_FLAG_EOS:
            pos = p
            status = QS_RAM_EOS
            break
        if kind == RAM_SAVE_FLAG_MEM_SIZE:
            status = QS_RAM_MEMSIZE
            break
        if kind == RAM_SAVE_FLAG_MULTIFD_FLUSH:
            out.append((addr, 0, 0, NO_BLOCK, flags, 0))
            pos = p
            continue
        if kind not in _PAGE_KINDS:
            return err(QS_RAM_E_FLAGS, rec_abs, flags)
        if flags & RAM_SAVE_FLAG_CONTINUE:
            if st.last_block < 0 or st.last_block >= nb:
                return err(QS_RAM_E_NO_BLOCK, rec_abs, flags)
            block = st.last_block
        else:
            if length - p < 1:
                break
            idlen = mv[p]
            if idlen == 0:
                return err(QS_RAM_E_IDLEN_ZERO, rec_abs, 0)
            if length - p - 1 < idlen:
                break
            name = bytes(mv[p + 1 : p + 1 + idlen])
            block = -1
            for i, (bname, _blen) in enumerate(blocks):
                if bname == name:
                    block = i
                    break
            if block < 0:
                return err(QS_RAM_E_UNKNOWN_BLOCK, rec_abs, p)
            p += 1 + idlen
        fill = dpos = dlen = 0
        if kind == RAM_SAVE_FLAG_ZERO:
            if length - p < 1:
                break
            fill = mv[p]
            p += 1
        elif kind == RAM_SAVE_FLAG_PAGE:
            if length - p < ps:
                break
            dpos, dlen = p, ps
            p += ps
        elif kind == RAM_SAVE_FLAG_XBZRLE:
            if length - p < 3:
                break
            if mv[p] != 0x01:
                return err(QS_RAM_E_XBZRLE_ENC, rec_abs, mv[p])
            n = (mv[p + 1] << 8) | mv[p + 2]
            if n > ps:
                return err(QS_RAM_E_XBZRLE_LEN, rec_abs, n)
            p += 3
            if length - p < n:
                break
            dpos, dlen = p, n
            p += n
        else:
            if length - p < 4:
                break
            n = int.from_bytes(mv[p : p + 4], "big")
            if n > bound:
                return err(QS_RAM_E_COMPRESS_LEN, rec_abs, n)
            p += 4
            if length - p < n:
                break
            dpos, dlen = p, n
            p += n
        st.last_block = block
        if addr >= blocks[block][1]:
            return err(QS_RAM_E_OFFSET, rec_abs, addr)
        out.append((addr, dpos, dlen, block, flags, fill))
        pos = p
    recs = np.zeros(len(out), PAGE_REC_DTYPE)
    if out:
        arr = np.array(out, dtype=np.uint64)
        for i, name in enumerate(("offset", "data_pos", "data_len", "block", "flags", "fill")):
            recs[name] = arr[:, i]
    return status, recs, pos


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
