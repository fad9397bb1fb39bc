"""Synthetic migration streams for tests, the demo and benchmarks.

``synth_stream(out, ...)`` writes a stream shaped like QEMU 7.2's to any
writable (file object or fd) with bounded memory: page contents are slices of
one fixed random pool chosen by a hash of (seed, block, page, version), so the
expected final RAM can be recomputed cheaply by ``SynthResult.final_page``
without keeping a map of all pages.
"""
from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import numpy as np

from ..errors import UsageError
from .constants import (
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_PART,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
)
from .events import RamBlock
from .writer import StreamWriter

MiB = 1 << 20
KiB = 1 << 10

DEFAULT_BLOCKS = (
    ("pc.ram", 64 * MiB),
    ("/rom@etc/acpi/tables", 128 * KiB),
    ("pc.bios", 256 * KiB),
    ("pc.rom", 128 * KiB),
    ("/rom@etc/table-loader", 4 * KiB),
    ("/rom@etc/acpi/rsdp", 4 * KiB),
)

# (idstr, instance, version, payload size) loosely following pc-i440fx-7.2
DEVICES = (
    ("timer", 0, 2, 25),
    ("cpu_common", 0, 1, 5),
    ("cpu", 0, 12, 1867),
    ("apic", 0, 3, 267),
    ("kvmclock", 0, 1, 9),
    ("fw_cfg", 0, 2, 8),
    ("PCIHost", 0, 1, 4),
    ("PCIBUS", 0, 1, 21),
    ("i440FX", 0, 3, 334),
    ("PIIX3", 0, 3, 300),
    ("mc146818rtc", 0, 3, 101),
    ("hpet", 0, 2, 288),
    ("i8259", 0, 1, 20),
    ("ioapic", 0, 2, 196),
    ("i8254", 0, 3, 168),
    ("dma", 0, 1, 81),
    ("serial", 0, 3, 16),
    ("acpi_build", 0, 1, 1),
    ("globalstate", 0, 1, 21),
)

POOL_SIZE = 1 * MiB
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(*parts):
    """splitmix64-style hash of uint64 arrays/scalars (vectorised, wrapping)."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for p in parts:
            x = (np.asarray(p, dtype=np.uint64) + h) * np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(31)
            x = x * np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(29)
            h = x
        return h


def _unit(h):
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class SynthResult:
    total: int = 0
    zero_records: int = 0
    page_records: int = 0
    zero_payload_pages: int = 0
    blocks: List[RamBlock] = field(default_factory=list)
    _params: tuple = ()
    device_state: bytes = b""

    @property
    def pages(self):
        """Target pages in all blocks."""
        return sum(b.length // self._gen.ps for b in self.blocks)

    @property
    def nonzero_pages(self):
        """Pages whose final content is not all zero."""
        g = self._gen
        n = 0
        for bi, b in enumerate(self.blocks):
            pages = b.length // g.ps
            for c in range(0, pages, 1 << 20):
                idx = np.arange(c, min(pages, c + (1 << 20)), dtype=np.uint64)
                n += int(np.count_nonzero(g.final_state(bi, idx) >= 0))
        return n

    @property
    def page_counts(self):
        return {"zero": self.zero_records, "page": self.page_records}

    def final_page(self, idstr, offset) -> Optional[bytes]:
        """Expected final content of a page (None = all zero)."""
        g = self._gen
        bi = g.block_index[idstr]
        st = g.final_state(bi, np.array([offset // g.ps], np.uint64))
        v = int(st[0])
        return None if v < 0 else g.content(bi, offset // g.ps, v)

    def iter_nonzero(self) -> Iterator[Tuple[str, int, bytes]]:
        g = self._gen
        for bi, b in enumerate(self.blocks):
            n = b.length // g.ps
            for c in range(0, n, 65536):
                idx = np.arange(c, min(n, c + 65536), dtype=np.uint64)
                st = g.final_state(bi, idx)
                for i, v in zip(idx[st >= 0].tolist(), st[st >= 0].tolist()):
                    yield b.idstr, i * g.ps, g.content(bi, i, v)


class _Gen:
    def __init__(self, blocks, ps, seed, zero_share, data, mode, passes, dirty_share, rezero_share, zero_page_share,
                 zero_run=1):
        self.blocks = blocks
        self.zero_run = max(1, int(zero_run))
        self.ps = ps
        self.seed = seed
        self.zero_share = zero_share
        self.data = data
        self.mode = mode
        self.passes = passes
        self.dirty_share = dirty_share
        self.rezero_share = rezero_share
        self.zero_page_share = zero_page_share
        self.block_index = {b.idstr: i for i, b in enumerate(blocks)}
        rng = np.random.default_rng(seed)
        self.pool = rng.integers(0, 256, POOL_SIZE + ps, dtype=np.uint8)
        self.pool_b = self.pool.tobytes()

    # per-page decisions (vectorised over page indices)
    def zero0(self, bi, idx):
        return _unit(_mix(self.seed, 1, bi, idx // np.uint64(self.zero_run))) < self.zero_share

    def dirty(self, bi, idx, k):
        return _unit(_mix(self.seed, 2, bi, idx, k)) < self.dirty_share

    def rezero(self, bi, idx, k):
        return _unit(_mix(self.seed, 3, bi, idx, k)) < self.rezero_share

    def as_page(self, bi, idx, k):
        return _unit(_mix(self.seed, 4, bi, idx, k)) < self.zero_page_share

    def n_passes_sent(self):
        return self.passes if self.mode == "precopy-live" else 1

    def final_state(self, bi, idx):
        """Version of the final content per page, -1 for zero."""
        st = np.where(self.zero0(bi, idx), -1, 0).astype(np.int64)
        for k in range(1, self.n_passes_sent()):
            d = self.dirty(bi, idx, k)
            rz = self.rezero(bi, idx, k)
            st = np.where(d, np.where(rz, -1, k), st)
        return st

    def pool_offset(self, bi, i, v):
        return int(_mix(self.seed, 5, bi, i, v) % np.uint64(POOL_SIZE)) & ~7

    def content(self, bi, i, v):
        if self.data == "pattern":
            word = struct.pack(">Q", (bi << 48) | (int(i) << 8) | (v & 0xFF) | 1)
            return word * (self.ps // 8)
        o = self.pool_offset(bi, i, v)
        page = bytearray(self.pool_b[o : o + self.ps])
        page[0] |= 1
        return bytes(page)


def synth_stream(out, *, blocks=DEFAULT_BLOCKS, zero_share=0.5, data="random", mode="background", passes=3,
                 dirty_share=0.05, rezero_share=0.2, zero_page_share=0.0, seed=0, machine="pc-i440fx-7.2",
                 footers=True, section_id=2, return_path=False, page_size=4096, part_pages=4096,
                 vmdescription=True, zero_run=1) -> SynthResult:
    """Write a synthetic stream to ``out``; see the module docstring.

    ``mode``: 'background' (START, PARTs sending each page once, some out of
    order, no END, then device state), 'precopy-live' (``passes`` passes, dirty
    pages re-sent, ``rezero_share`` of them as ZERO; last pass in END) or
    'precopy-stopped' (one pass in PARTs, END with EOS only).
    ``zero_page_share``: share of zero pages sent as all-zero PAGE records.
    ``zero_run``: pages are zero or not in aligned runs of this many pages, as
    real guests keep free memory in large ranges (1 = each page on its own).
    """
    if mode not in ("background", "precopy-live", "precopy-stopped"):
        raise UsageError("unknown synth mode %r" % mode)
    if data not in ("random", "pattern"):
        raise UsageError("unknown synth data %r" % data)
    ps = page_size
    rblocks = [b if isinstance(b, RamBlock) else RamBlock(b[0], b[1]) for b in blocks]
    for b in rblocks:
        if b.length % ps:
            raise UsageError("block %r length is not page aligned" % b.idstr)
    g = _Gen(rblocks, ps, seed, zero_share, data, mode, passes, dirty_share, rezero_share, zero_page_share,
             zero_run)
    w = StreamWriter(out, page_size=ps, footers=footers)
    res = SynthResult(blocks=rblocks)
    res._gen = g

    w.header()
    if machine is not None:
        w.configuration(machine)
    if return_path:
        w.open_return_path()
        w.ping(1)
    w.section_start(section_id, "ram", 0, 4)
    w.mem_size(rblocks)
    w.eos()
    w.footer(section_id)
    _RamWriter(w, g, res, section_id, part_pages, seed).sections(mode, passes)
    res.device_state = _device_state(ps, footers, seed, section_id, vmdescription)
    w.raw(res.device_state)
    res.total = w.bytes_written
    return res


class _RamWriter:
    """The RAM PART/END sections of a synthetic stream, records batched into large writes."""

    def __init__(self, w, g, res, section_id, part_pages, seed):
        self.w = w
        self.g = g
        self.res = res
        self.section_id = section_id
        self.part_pages = part_pages
        self.seed = seed
        self.ps = w.page_size
        self.zero_page = bytes(self.ps)
        self.pending = []
        self.pending_len = 0

    def sections(self, mode, passes):
        w, section_id = self.w, self.section_id
        if mode == "background":
            self.part_pass(0, QEMU_VM_SECTION_PART, mode)
        elif mode == "precopy-stopped":
            self.part_pass(0, QEMU_VM_SECTION_PART, mode)
            w.section_end(section_id)
            w.eos()
            w.footer(section_id)
        else:
            for k in range(passes - 1):
                self.part_pass(k, QEMU_VM_SECTION_PART, mode)
            w.section_end(section_id)
            if passes >= 1:
                self.part_pass(passes - 1, QEMU_VM_SECTION_END, mode)
            self.flush()
            w.eos()
            w.footer(section_id)
        self.flush()

    def flush(self):
        if self.pending:
            self.w.raw(b"".join(self.pending))
            self.pending.clear()
            self.pending_len = 0

    def emit(self, bi, idx, k):
        """Records for pages ``idx`` of block bi in pass k, in that order."""
        w, g, res, ps = self.w, self.g, self.res, self.ps
        idb = g.blocks[bi].idstr.encode()
        zero = g.zero0(bi, idx) if k == 0 else g.rezero(bi, idx, k)
        as_page = g.as_page(bi, idx, k) & zero
        for i, z, ap in zip(idx.tolist(), zero.tolist(), as_page.tolist()):
            off = i * ps
            flag = RAM_SAVE_FLAG_ZERO if z and not ap else RAM_SAVE_FLAG_PAGE
            head = w.record_head(idb, off, flag)
            if z and not ap:
                self.pending.append(head + b"\0")
                res.zero_records += 1
                self.pending_len += 9
            else:
                self.pending.append(head)
                self.pending.append(self.zero_page if z else g.content(bi, i, k))
                res.page_records += 1
                res.zero_payload_pages += bool(z)
                self.pending_len += 8 + ps
            if self.pending_len >= 4 * MiB:
                self.flush()

    def pages_of_pass(self, k, mode):
        """Yield (bi, idx) chunks of pages sent in pass k."""
        g, ps, part_pages = self.g, self.ps, self.part_pages
        for bi, b in enumerate(g.blocks):
            n = b.length // ps
            for c in range(0, n, part_pages):
                idx = np.arange(c, min(n, c + part_pages), dtype=np.uint64)
                if k > 0:
                    idx = idx[g.dirty(bi, idx, k)]
                elif mode == "background" and len(idx) > 4:
                    # faulted pages first: move ~3% to the front
                    h = _unit(_mix(self.seed, 6, bi, idx)) < 0.03
                    idx = np.concatenate((idx[h][::-1], idx[~h]))
                if len(idx):
                    yield bi, idx

    def part_pass(self, k, kind, mode):
        w, section_id = self.w, self.section_id
        for bi, idx in self.pages_of_pass(k, mode):
            if kind == QEMU_VM_SECTION_PART:
                w.section_part(section_id)
            self.emit(bi, idx, k)
            if kind == QEMU_VM_SECTION_PART:
                self.flush()
                w.eos()
                w.footer(section_id)


def _device_state(ps, footers, seed, section_id, vmdescription):
    """FULL sections of DEVICES (random payloads), EOF, VMDESCRIPTION."""
    tail = io.BytesIO()
    tw = StreamWriter(tail, page_size=ps, footers=footers)
    rng = np.random.default_rng(seed + 1)
    desc = []
    sid = 0
    for name, inst, ver, size in DEVICES:
        if sid == section_id:
            sid += 1
        payload = rng.integers(0, 256, size, dtype=np.uint8)
        payload[payload == 0x7E] = 0x7F
        tw.section_full(sid, name, inst, ver, payload.tobytes())
        desc.append({"name": name, "instance_id": inst, "vmsd_name": name, "version": ver,
                     "fields": [{"name": "data", "type": "buffer", "size": size}]})
        sid += 1
    tw.eof()
    if vmdescription:
        tw.vmdescription(json.dumps({"page_size": ps, "devices": desc}, separators=(",", ":")).encode())
    return tail.getvalue()
