"""A tolerant splitter of migration streams into records, and record-level mutations.

The engine harnesses mutate streams a record at a time: insert, delete,
duplicate or move whole records, change RAM flags, section ids, lengths and
block names, truncate inside a record.  ``split`` never fails: whatever it
cannot walk (a mutated length, a device-defined payload) becomes one opaque
chunk, so it splits mutated inputs as well as seeds.

A chunk is ``(kind, bytes)``; joining the bytes of all chunks gives the input
back.  Wire layout: /work/shared/docs/migration-stream.md sections 1-4
(savevm.c, ram.c).
"""
import random
import struct

from qsnap.stream import constants as C

PAGE_SIZE = C.TARGET_PAGE_SIZE_DEFAULT
RAM_KINDS = ("memsize", "page", "zero", "xbzrle", "flush", "eos", "ramword")
SECTION_KINDS = ("start", "part", "end", "footer")


class _Walk:
    def __init__(self, buf):
        self.buf = buf
        self.pos = 0
        self.out = []
        self.ignore_shared = False
        self.footers = True

    def need(self, n):
        if self.pos + n > len(self.buf):
            raise IndexError
        return self.buf[self.pos:self.pos + n]

    def be(self, at, n):
        return int.from_bytes(self.need(at + n)[at:], "big")

    def emit(self, kind, n):
        self.need(n)
        self.out.append((kind, bytes(self.buf[self.pos:self.pos + n])))
        self.pos += n


def split(buf):
    """[(kind, bytes)] of ``buf``; an unwalkable rest is one 'opaque' chunk."""
    w = _Walk(bytes(buf))
    try:
        _walk(w)
    except (IndexError, ValueError):
        pass
    if w.pos < len(w.buf):
        w.out.append(("opaque", w.buf[w.pos:]))
    return w.out


def join(chunks):
    return b"".join(b for _, b in chunks)


def _walk(w):
    w.emit("header", 8)
    if w.need(1)[0] == C.QEMU_VM_CONFIGURATION:
        _configuration(w)
    while w.pos < len(w.buf):
        t = w.need(1)[0]
        if t == C.QEMU_VM_COMMAND:
            n = 5 + w.be(3, 2)
            if w.be(1, 2) == C.MIG_CMD_PACKAGED and n == 9:
                n += w.be(5, 4)
            w.emit("cmd", n)
        elif t == C.QEMU_VM_SECTION_START:
            n = w.be(5, 1)
            idstr = w.need(6 + n)[6:]
            w.emit("start", 14 + n)
            if idstr != C.RAM_SECTION_IDSTR:
                return
            _ram(w)
        elif t in (C.QEMU_VM_SECTION_PART, C.QEMU_VM_SECTION_END):
            w.emit("part" if t == C.QEMU_VM_SECTION_PART else "end", 5)
            _ram(w)
        elif t == C.QEMU_VM_SECTION_FOOTER:
            w.emit("footer", 5)
        else:  # FULL sections and EOF: device-defined payloads, kept whole
            w.emit("tail", len(w.buf) - w.pos)


def _configuration(w):
    start = w.pos
    w.pos += 5 + w.be(1, 4)
    while w.need(1)[0] == C.QEMU_VM_SUBSECTION:
        n = w.be(1, 1)
        name = w.need(2 + n)[2:]
        w.pos += 6 + n
        if name.endswith(b"capabilities"):
            count = w.be(0, 4)
            w.pos += 4
            for _ in range(count):
                cl = w.be(0, 1)
                if w.need(1 + cl)[1:] == b"x-ignore-shared":
                    w.ignore_shared = True
                w.pos += 1 + cl
        elif name.endswith(b"uuid"):
            w.pos += 16
        else:
            w.pos += 4
    w.need(0)
    end, w.pos = w.pos, start
    w.emit("config", end - start)


def _ram(w):
    """RAM records up to and including EOS, then the footer if there is one."""
    while True:
        word = w.be(0, 8)
        flags = word & (PAGE_SIZE - 1)
        kind = flags & ~C.RAM_SAVE_FLAG_CONTINUE
        idlen = 0 if flags & C.RAM_SAVE_FLAG_CONTINUE else 1 + w.be(8, 1)
        if kind == C.RAM_SAVE_FLAG_EOS:
            w.emit("eos", 8)
            break
        if kind == C.RAM_SAVE_FLAG_MEM_SIZE:
            _mem_size(w, word & ~(PAGE_SIZE - 1))
        elif kind == C.RAM_SAVE_FLAG_MULTIFD_FLUSH:
            w.emit("flush", 8)
        elif kind == C.RAM_SAVE_FLAG_PAGE:
            w.emit("page", 8 + idlen + PAGE_SIZE)
        elif kind == C.RAM_SAVE_FLAG_ZERO:
            w.emit("zero", 8 + idlen + 1)
        elif kind == C.RAM_SAVE_FLAG_XBZRLE:
            w.emit("xbzrle", 8 + idlen + 3 + w.be(8 + idlen + 1, 2))
        else:
            raise ValueError("unknown RAM flags")
    if w.pos < len(w.buf) and w.buf[w.pos] == C.QEMU_VM_SECTION_FOOTER:
        w.emit("footer", 5)


def _mem_size(w, total):
    start = w.pos
    w.pos += 8
    while total > 0:
        n = w.be(0, 1)
        length = w.be(1 + n, 8)
        if not n or length > total:
            raise ValueError("bad block list")
        w.pos += 9 + n + (8 if w.ignore_shared else 0)
        total -= length
    w.need(0)
    end, w.pos = w.pos, start
    w.emit("memsize", end - start)


# --- records the mutator can insert -----------------------------------------------

def _cmd(cmd, payload=b""):
    return struct.pack(">BHH", C.QEMU_VM_COMMAND, cmd, len(payload)) + payload


def _ram_word(offset, flags, idstr=b"pc.ram"):
    word = struct.pack(">Q", offset | flags)
    if flags & C.RAM_SAVE_FLAG_CONTINUE:
        return word
    return word + bytes([len(idstr)]) + idstr


SYNTHETIC = [
    ("flush", struct.pack(">Q", C.RAM_SAVE_FLAG_MULTIFD_FLUSH)),
    ("eos", struct.pack(">Q", C.RAM_SAVE_FLAG_EOS)),
    ("memsize", struct.pack(">Q", 0x2000 | C.RAM_SAVE_FLAG_MEM_SIZE) + b"\x06pc.ram" + struct.pack(">Q", 0x2000)),
    ("zero", _ram_word(0, C.RAM_SAVE_FLAG_ZERO) + b"\0"),
    ("zero", _ram_word(0x1000, C.RAM_SAVE_FLAG_ZERO | C.RAM_SAVE_FLAG_CONTINUE) + b"\x01"),
    ("zero", _ram_word(1 << 40, C.RAM_SAVE_FLAG_ZERO) + b"\0"),
    ("zero", _ram_word(0, C.RAM_SAVE_FLAG_ZERO, b"nosuchblock") + b"\0"),
    ("page", _ram_word(0, C.RAM_SAVE_FLAG_PAGE) + bytes(range(256)) * 16),
    ("page", _ram_word(0x3000, C.RAM_SAVE_FLAG_PAGE, b"pc.bios") + b"\xff" * PAGE_SIZE),
    ("xbzrle", _ram_word(0, C.RAM_SAVE_FLAG_XBZRLE) + b"\x01\x00\x03\x01\x01\x7f"),
    ("ramword", _ram_word(0, C.RAM_SAVE_FLAG_FULL)),
    ("ramword", _ram_word(0, C.RAM_SAVE_FLAG_HOOK)),
    ("ramword", _ram_word(0, C.RAM_SAVE_FLAG_COMPRESS_PAGE) + b"\0\0\0\x08" + b"x\x9c\x03\x00\x00\x00\x00\x01"),
    ("start", bytes([C.QEMU_VM_SECTION_START]) + struct.pack(">I", 2) + b"\x03ram" + struct.pack(">II", 0, 4)),
    ("start", bytes([C.QEMU_VM_SECTION_START]) + struct.pack(">I", 9) + b"\x05block" + struct.pack(">II", 0, 1)),
    ("part", bytes([C.QEMU_VM_SECTION_PART]) + struct.pack(">I", 2)),
    ("part", bytes([C.QEMU_VM_SECTION_PART]) + struct.pack(">I", 77)),
    ("end", bytes([C.QEMU_VM_SECTION_END]) + struct.pack(">I", 2)),
    ("footer", bytes([C.QEMU_VM_SECTION_FOOTER]) + struct.pack(">I", 2)),
    ("cmd", _cmd(C.MIG_CMD_OPEN_RETURN_PATH)),
    ("cmd", _cmd(C.MIG_CMD_PING, struct.pack(">I", 7))),
    ("cmd", _cmd(C.MIG_CMD_POSTCOPY_ADVISE, struct.pack(">QQ", 0x1000, 0x1000))),
    ("cmd", _cmd(C.MIG_CMD_POSTCOPY_ADVISE)),
    ("cmd", _cmd(C.MIG_CMD_POSTCOPY_LISTEN)),
    ("cmd", _cmd(C.MIG_CMD_POSTCOPY_RUN)),
    ("cmd", _cmd(C.MIG_CMD_POSTCOPY_RAM_DISCARD, b"\x00\x06pc.ram\x00" + struct.pack(">QQ", 0, 0x1000))),
    ("cmd", _cmd(C.MIG_CMD_PACKAGED, struct.pack(">I", 5)) + _cmd(C.MIG_CMD_POSTCOPY_RUN)),
    ("cmd", _cmd(C.MIG_CMD_ENABLE_COLO)),
    ("cmd", _cmd(C.MIG_CMD_POSTCOPY_RESUME)),
    ("cmd", _cmd(C.MIG_CMD_RECV_BITMAP, b"\x06pc.ram")),
    ("cmd", _cmd(C.MIG_CMD_SWITCHOVER_START)),
    ("tail", bytes([C.QEMU_VM_SECTION_FULL]) + struct.pack(">I", 40) + b"\x05timer" + struct.pack(">II", 0, 2)
     + b"\x01\x02\x03" + bytes([C.QEMU_VM_SECTION_FOOTER]) + struct.pack(">I", 40)),
    ("tail", bytes([C.QEMU_VM_EOF])),
    ("tail", bytes([C.QEMU_VM_EOF, C.QEMU_VM_VMDESCRIPTION]) + struct.pack(">I", 2) + b"{}"),
]

# RAM flag values a record word may be rewritten to (ram.c RAM_SAVE_FLAG_*).
FLAG_POOL = (C.RAM_SAVE_FLAG_ZERO, C.RAM_SAVE_FLAG_PAGE, C.RAM_SAVE_FLAG_XBZRLE, C.RAM_SAVE_FLAG_EOS,
             C.RAM_SAVE_FLAG_MEM_SIZE, C.RAM_SAVE_FLAG_MULTIFD_FLUSH, C.RAM_SAVE_FLAG_FULL,
             C.RAM_SAVE_FLAG_HOOK, C.RAM_SAVE_FLAG_COMPRESS_PAGE,
             C.RAM_SAVE_FLAG_ZERO | C.RAM_SAVE_FLAG_PAGE, 0, 0xFFF)
INTERESTING = (0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF,
               0x1000, 0x2000, 1 << 32, 1 << 40, (1 << 63), (1 << 64) - 1, (1 << 64) - 0x1000)


# --- mutations ----------------------------------------------------------------------

class Mutator:
    """Record-level mutations of a stream; ``byte_mutate(data, max_size)`` is libFuzzer's."""

    def __init__(self, seed_chunks, byte_mutate):
        self.pool = list(SYNTHETIC)
        for chunks in seed_chunks:
            self.pool += [c for c in chunks if c[0] != "tail" and len(c[1]) <= 2 * PAGE_SIZE]
        self.seed_chunks = [c for c in seed_chunks if c]
        self.byte_mutate = byte_mutate
        self.ops = (self.delete, self.duplicate, self.move, self.swap, self.insert, self.flags,
                    self.offset, self.field, self.truncate, self.bytes_in_chunk, self.splice)

    def mutate(self, data, max_size, seed):
        rng = random.Random(seed)
        chunks = split(data)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            if not chunks:
                chunks = list(rng.choice(self.seed_chunks))
            rng.choice(self.ops)(rng, chunks)
        out = join(chunks)
        return out[:max_size]

    def delete(self, rng, chunks):
        del chunks[rng.randrange(len(chunks))]

    def duplicate(self, rng, chunks):
        i = rng.randrange(len(chunks))
        chunks.insert(rng.choice((i + 1, self._position(rng, chunks))), chunks[i])

    def move(self, rng, chunks):
        c = chunks.pop(rng.randrange(len(chunks)))
        chunks.insert(self._position(rng, chunks) if chunks else 0, c)

    def swap(self, rng, chunks):
        i, j = rng.randrange(len(chunks)), rng.randrange(len(chunks))
        chunks[i], chunks[j] = chunks[j], chunks[i]

    def _position(self, rng, chunks):
        """Anywhere, or (as often) right before or after a record of a random kind, so
        rare kinds such as MEM_SIZE get neighbours as often as page records do."""
        if rng.random() < 0.5:
            return rng.randrange(len(chunks) + 1)
        kind = rng.choice(sorted({k for k, _ in chunks}))
        i = rng.choice([i for i, (k, _) in enumerate(chunks) if k == kind])
        return i + rng.randrange(2)

    def insert(self, rng, chunks):
        new = rng.choice(SYNTHETIC if rng.random() < 0.5 else self.pool)
        chunks.insert(self._position(rng, chunks), new)

    def _pick(self, rng, chunks, kinds):
        idx = [i for i, (k, _) in enumerate(chunks) if k in kinds]
        return rng.choice(idx) if idx else None

    def flags(self, rng, chunks):
        """Rewrite a RAM record's flags, or toggle CONTINUE."""
        i = self._pick(rng, chunks, RAM_KINDS)
        if i is None:
            return
        kind, b = chunks[i]
        if len(b) < 8:
            return
        word = int.from_bytes(b[:8], "big")
        if rng.random() < 0.3:
            word ^= C.RAM_SAVE_FLAG_CONTINUE
        else:
            word = (word & ~(PAGE_SIZE - 1)) | rng.choice(FLAG_POOL) | (word & C.RAM_SAVE_FLAG_CONTINUE)
        chunks[i] = ("ramword", word.to_bytes(8, "big") + b[8:])

    def offset(self, rng, chunks):
        """Move a RAM record to another page offset (past a block, unaligned, huge)."""
        i = self._pick(rng, chunks, ("page", "zero", "xbzrle", "ramword"))
        if i is None:
            return
        kind, b = chunks[i]
        word = int.from_bytes(b[:8], "big")
        flags = word & (PAGE_SIZE - 1)
        addr = rng.choice(INTERESTING + (word + PAGE_SIZE, word - PAGE_SIZE, word * 2))
        chunks[i] = (kind, ((addr & ~(PAGE_SIZE - 1) | flags) & ((1 << 64) - 1)).to_bytes(8, "big") + b[8:])

    def field(self, rng, chunks):
        """Overwrite an id or length field (section id, command length, idstr length,
        MEM_SIZE total and block lengths) with a boundary value."""
        i = rng.randrange(len(chunks))
        kind, b = chunks[i]
        b = bytearray(b)
        spots = {"start": [(1, 4), (5, 1), (len(b) - 8, 4), (len(b) - 4, 4)],
                 "part": [(1, 4)], "end": [(1, 4)], "footer": [(1, 4)],
                 "cmd": [(1, 2), (3, 2), (5, 4)], "memsize": [(0, 8), (8, 1), (9 + (b[8] if len(b) > 8 else 0), 8)],
                 "page": [(8, 1)], "zero": [(8, 1), (len(b) - 1, 1)], "xbzrle": [(len(b) - 3, 2)],
                 "config": [(1, 4)], "header": [(0, 4), (4, 4)],
                 "tail": [(1, 4), (5, 1), (len(b) - 1, 1)]}.get(kind, [(0, 1)])
        at, width = rng.choice(spots)
        if at < 0 or at + width > len(b):
            return
        v = rng.choice(INTERESTING + (int.from_bytes(b[at:at + width], "big") + rng.choice((-1, 1)),))
        b[at:at + width] = (v & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
        chunks[i] = (kind, bytes(b))

    def truncate(self, rng, chunks):
        """Cut the stream inside (or at the start of) a record."""
        i = rng.randrange(len(chunks))
        kind, b = chunks[i]
        del chunks[i + 1:]
        chunks[i] = (kind, b[:rng.randrange(len(b) + 1)])

    def bytes_in_chunk(self, rng, chunks):
        i = rng.randrange(len(chunks))
        kind, b = chunks[i]
        if len(b) > 4 * PAGE_SIZE:   # a big tail: mutate a window of it
            at = rng.randrange(len(b))
            window = b[at:at + 64]
            chunks[i] = (kind, b[:at] + self.byte_mutate(window, len(window) + 16) + b[at + 64:])
        else:
            chunks[i] = (kind, self.byte_mutate(b, len(b) + 32))

    def splice(self, rng, chunks):
        """Continue the stream from a point of another seed."""
        other = rng.choice(self.seed_chunks)
        i = rng.randrange(len(chunks) + 1)
        j = rng.randrange(len(other))
        chunks[i:] = other[j:]


def trim(chunks, keep_pages=24):
    """A real stream cut down to its structure: every record but RAM page records
    after the first ``keep_pages`` (so one run takes about a millisecond)."""
    out = []
    pages = 0
    for kind, b in chunks:
        if kind in ("page", "zero", "xbzrle"):
            pages += 1
            if pages > keep_pages:
                continue
        out.append((kind, b))
    return out
