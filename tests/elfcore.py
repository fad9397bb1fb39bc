"""A small, independent reader of x86 ELF cores (QEMU dump-guest-memory's and qsnap's).

Written from the ELF specification and QEMU's target/i386/arch_dump.c, not
from qsnap's writer, so the tests compare two readings rather than one
module with itself. Reads ELF32 and ELF64, little-endian.
"""
import struct
from dataclasses import dataclass, field

PT_LOAD, PT_NOTE = 1, 4
NT_PRSTATUS = 1
EM_386, EM_X86_64 = 3, 62
GPR64 = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
         "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base",
         "ds", "es", "fs", "gs")
GPR32 = ("ebx", "ecx", "edx", "esi", "edi", "ebp", "eax")


@dataclass
class Segment:
    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass
class Core:
    path: str
    elf_class: int
    machine: int
    loads: list = field(default_factory=list)
    notes: list = field(default_factory=list)   # (name, type, desc)

    def read_gpa(self, gpa, n):
        """Bytes at guest-physical ``gpa`` (must lie in one PT_LOAD)."""
        for s in self.loads:
            if s.paddr <= gpa and gpa + n <= s.paddr + s.memsz:
                with open(self.path, "rb") as f:
                    f.seek(s.offset + gpa - s.paddr)
                    return f.read(n)
        raise KeyError(f"{gpa:#x}+{n:#x} is in no PT_LOAD of {self.path}")

    def prstatus(self):
        """[{register: value}] of every NT_PRSTATUS note, in order."""
        out = []
        for name, t, desc in self.notes:
            if name != b"CORE" or t != NT_PRSTATUS:
                continue
            if len(desc) == 336:  # x86_64_elf_prstatus
                pid = struct.unpack_from("<I", desc, 32)[0]
                regs = dict(zip(GPR64, struct.unpack_from("<27Q", desc, 112)))
            elif len(desc) == 144:  # x86_elf_prstatus
                pid = struct.unpack_from("<I", desc, 24)[0]
                regs = dict(zip(GPR32, struct.unpack_from("<7I", desc, 72)))
                regs["eip"], = struct.unpack_from("<I", desc, 72 + 28 + 16 + 4)
                regs["esp"], = struct.unpack_from("<I", desc, 72 + 28 + 16 + 4 + 4 + 4 + 4)
            else:
                raise ValueError(f"NT_PRSTATUS of {len(desc)} bytes")
            regs["pid"] = pid
            out.append(regs)
        return out

    def qemu_notes(self):
        return [desc for name, t, desc in self.notes if name == b"QEMU"]


def read_core(path):
    with open(path, "rb") as f:
        ident = f.read(16)
        assert ident[:4] == b"\x7fELF", f"{path} is not ELF"
        cls = ident[4]
        if cls == 2:
            f.seek(16)
            _t, machine, _v, _e, phoff, _sh, _fl, _eh, phentsize, phnum = struct.unpack("<HHIQQQIHHH", f.read(42))
            fmt = "<IIQQQQQQ"
        else:
            f.seek(16)
            _t, machine, _v, _e, phoff, _sh, _fl, _eh, phentsize, phnum = struct.unpack("<HHIIIIIHHH", f.read(30))
            fmt = "<IIIIIIII"
        core = Core(str(path), cls, machine)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            v = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
            if cls == 2:
                ptype, _flags, off, vaddr, paddr, filesz, memsz, _align = v
            else:
                ptype, off, vaddr, paddr, filesz, memsz, _flags, _align = v
            if ptype == PT_LOAD:
                core.loads.append(Segment(paddr, vaddr, off, filesz, memsz))
            elif ptype == PT_NOTE:
                f.seek(off)
                core.notes += _notes(f.read(filesz))
    return core


def _notes(buf):
    out, i = [], 0
    while i + 12 <= len(buf):
        namesz, descsz, t = struct.unpack_from("<III", buf, i)
        i += 12
        name = buf[i:i + namesz].rstrip(b"\0")
        i += -(-namesz // 4) * 4
        out.append((name, t, buf[i:i + descsz]))
        i += -(-descsz // 4) * 4
    return out
