"""ELF core export, laid out as QEMU's ``dump-guest-memory`` (paging: false) writes it.

dump/dump.c and target/i386/arch_dump.c are the authority:

    Elf64_Ehdr                      ET_CORE; EM_X86_64 when the first CPU is in
                                    long mode (HF_LMA), else EM_386 (cpu_get_dump_info)
    Elf64_Phdr PT_NOTE              the notes below
    Elf64_Phdr PT_LOAD x N          one per guest-physical range (memmap.py),
                                    p_paddr = p_vaddr = GPA, p_filesz = p_memsz
    notes                           NT_PRSTATUS "CORE" per CPU (x86_64_elf_prstatus,
                                    or x86_elf_prstatus for EM_386), then a
                                    "QEMU" note (QEMUCPUState) per CPU
    memory                          the PT_LOAD contents, in segment order

Two differences from QEMU's file, neither visible to a reader of the segments:
the memory starts on a page boundary (QEMU packs it right after the notes), so
that pages not stored in the image (zero pages) are left as holes of a sparse
file instead of written zeros; and no section header table is written (QEMU
adds one holding only ``.shstrtab``).
"""
import struct

from qsnap.export.cpustate import (R_CS, R_DS, R_EAX, R_EBP, R_EBX, R_ECX, R_EDI, R_EDX, R_ES, R_ESI,
                                   R_ESP, R_FS, R_GS, R_SS)
from qsnap.export.memmap import guest_ranges
from qsnap.export.pages import write_ranges

# include/elf.h
ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_CORE = 4
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
NT_PRSTATUS = 1
PN_XNUM = 0xFFFF

ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
ELF64_NHDR = struct.Struct("<III")
# arch_dump.c x86_64_elf_prstatus: pad1[32], pid, pad2[76], 27 regs, pad3[8]
X86_64_PRSTATUS = struct.Struct("<32sI76s27Q8s")
# arch_dump.c x86_elf_prstatus: pad1[24], pid, pad2[44], x86_user_regs_struct, pad3[4]
X86_PRSTATUS = struct.Struct("<24sI44s7I8HII2HII2H4s")
# arch_dump.c QEMUCPUState (QEMUCPUSTATE_VERSION 1): 18 u64 registers, 10 QEMUCPUSegments,
# cr[5], kernel_gs_base
QEMUCPUSTATE_VERSION = 1
QEMUCPUSEGMENT = struct.Struct("<IIIIQ")
QEMUCPUSTATE_HEAD = struct.Struct("<II18Q")
QEMUCPUSTATE_SIZE = QEMUCPUSTATE_HEAD.size + 10 * QEMUCPUSEGMENT.size + 6 * 8

MEMORY_ALIGN = 4096


def _note(name, ntype, desc):
    """One Elf64 note: header, name and descriptor each padded to 4 bytes."""
    n = name + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return ELF64_NHDR.pack(len(n), len(desc), ntype) + pad(n) + pad(desc)


def prstatus_x86_64(cpu):
    r = cpu.regs
    regs = (r[15], r[14], r[13], r[12], r[R_EBP], r[R_EBX], r[11], r[10],
            r[9], r[8], r[R_EAX], r[R_ECX], r[R_EDX], r[R_ESI], r[R_EDI], 0,   # orig_rax
            cpu.eip, cpu.segs[R_CS].selector, cpu.eflags,
            r[R_ESP], cpu.segs[R_SS].selector,
            cpu.segs[R_FS].base, cpu.segs[R_GS].base,
            cpu.segs[R_DS].selector, cpu.segs[R_ES].selector,
            cpu.segs[R_FS].selector, cpu.segs[R_GS].selector)
    # dump.c cpu_index(): pr_pid is the CPU index + 1
    return X86_64_PRSTATUS.pack(b"", cpu.index + 1, b"", *(v & (2**64 - 1) for v in regs), b"")


def prstatus_x86(cpu):
    r = [v & 0xFFFFFFFF for v in cpu.regs]
    sel = [s.selector & 0xFFFF for s in cpu.segs]
    return X86_PRSTATUS.pack(b"", cpu.index + 1, b"",
                             r[R_EBX], r[R_ECX], r[R_EDX], r[R_ESI], r[R_EDI], r[R_EBP], r[R_EAX],
                             sel[R_DS], 0, sel[R_ES], 0, sel[R_FS], 0, sel[R_GS], 0,
                             0, cpu.eip & 0xFFFFFFFF, sel[R_CS], 0, cpu.eflags & 0xFFFFFFFF,
                             r[R_ESP], sel[R_SS], 0, b"")


def qemu_cpu_state(cpu):
    r = cpu.regs
    head = QEMUCPUSTATE_HEAD.pack(
        QEMUCPUSTATE_VERSION, QEMUCPUSTATE_SIZE,
        r[R_EAX], r[R_EBX], r[R_ECX], r[R_EDX], r[R_ESI], r[R_EDI], r[R_ESP], r[R_EBP],
        *r[8:16], cpu.eip, cpu.eflags)
    segs = [cpu.segs[i] for i in (R_CS, R_DS, R_ES, R_FS, R_GS, R_SS)] + [cpu.ldt, cpu.tr, cpu.gdt, cpu.idt]
    body = b"".join(QEMUCPUSEGMENT.pack(s.selector & 0xFFFFFFFF, s.limit & 0xFFFFFFFF,
                                        s.flags & 0xFFFFFFFF, 0, s.base) for s in segs)
    tail = struct.pack("<6Q", *cpu.cr, cpu.kernelgsbase)
    return head + body + tail


def build_notes(cpus):
    """(e_machine, note bytes) as dump.c write_elf64_notes orders them: every
    CPU's NT_PRSTATUS, then every CPU's QEMU note."""
    long_mode = cpus[0].long_mode if cpus else True
    prstatus = prstatus_x86_64 if long_mode else prstatus_x86
    notes = [_note(b"CORE", NT_PRSTATUS, prstatus(c)) for c in cpus]
    notes += [_note(b"QEMU", 0, qemu_cpu_state(c)) for c in cpus]
    return (EM_X86_64 if long_mode else EM_386), b"".join(notes)


def plan(img, notes_len):
    """(ranges, [p_offset per range], file size) of the ELF for ``img``."""
    ranges = guest_ranges(img.blocks, img.meta.get("machine"))
    phnum = len(ranges) + (1 if notes_len else 0)
    note_off = ELF64_EHDR.size + phnum * ELF64_PHDR.size
    pos = -(-(note_off + notes_len) // MEMORY_ALIGN) * MEMORY_ALIGN
    offsets = []
    for r in ranges:
        offsets.append(pos)
        pos += r.length
    return ranges, offsets, pos


def headers(machine, ranges, offsets, notes):
    """ELF header, program headers and notes: the file's first bytes."""
    phnum = len(ranges) + (1 if notes else 0)
    note_off = ELF64_EHDR.size + phnum * ELF64_PHDR.size
    ident = ELFMAG + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT])
    out = [ELF64_EHDR.pack(ident, ET_CORE, machine, EV_CURRENT, 0, ELF64_EHDR.size, 0, 0,
                           ELF64_EHDR.size, ELF64_PHDR.size, phnum, 0, 0, 0)]
    if notes:
        out.append(ELF64_PHDR.pack(PT_NOTE, 0, note_off, 0, 0, len(notes), len(notes), 0))
    for r, off in zip(ranges, offsets):
        out.append(ELF64_PHDR.pack(PT_LOAD, 0, off, r.gpa, r.gpa, r.length, r.length, 0))
    out.append(notes)
    return b"".join(out)


def write_elf(img, pages, out, cpus):
    """Write the core of ``img`` to ``out`` (an AtomicOutput); returns the file size."""
    machine, notes = build_notes(cpus) if cpus else (EM_X86_64, b"")
    ranges, offsets, size = plan(img, len(notes))
    out.size(size)
    out.pwrite(headers(machine, ranges, offsets, notes), 0)
    write_ranges(pages, out, ranges, offsets)
    return size

