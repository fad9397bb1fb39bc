"""x86 CPU registers from the ``cpu`` sections of an image's device state.

The ``cpu`` vmstate (target/i386/machine.c vmstate_x86_cpu, version 12; 11 is
still accepted there) is decoded with the stream's own VMDESCRIPTION
(qsnap.stream.vmstate), so only the field names below are relied on.
"""
from dataclasses import dataclass

from qsnap.errors import StreamError
from qsnap.stream.vmstate import decode_sections, find_vmdescription

# target/i386/machine.c: .version_id = 12, .minimum_version_id = 11
CPU_VMSTATE_VERSIONS = (11, 12)
# target/i386/cpu.h
R_EAX, R_ECX, R_EDX, R_EBX, R_ESP, R_EBP, R_ESI, R_EDI = range(8)
R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)
HF_LMA_SHIFT = 14
HF_LMA_MASK = 1 << HF_LMA_SHIFT


class NotesUnavailable(Exception):
    """Why the CPU notes cannot be filled (the memory export goes on without them)."""


@dataclass
class Segment:
    selector: int
    base: int
    limit: int
    flags: int


@dataclass
class CpuState:
    """The CPUX86State fields dump-guest-memory's notes use (target/i386/arch_dump.c)."""

    index: int
    regs: list          # 16 general-purpose registers, R_EAX .. r15
    eip: int
    eflags: int
    hflags: int
    segs: list          # 6 Segments, R_ES .. R_GS
    ldt: Segment
    tr: Segment
    gdt: Segment
    idt: Segment
    cr: list            # cr[0..4]; cr[1] is not migrated and is always 0
    kernelgsbase: int

    @property
    def long_mode(self):
        return bool(self.hflags & HF_LMA_MASK)


def cpu_states(device_state, footers=True):
    """[CpuState] by CPU index; raises NotesUnavailable saying why not.

    ``footers``: the stream had section footers (the image's stream_info says)."""
    try:
        desc = find_vmdescription(device_state, footers)
        if desc is None:
            raise NotesUnavailable("the device state has no VMDESCRIPTION")
        sections = decode_sections(device_state, desc, footers)
    except StreamError as e:
        raise NotesUnavailable(f"the device state cannot be decoded: {e}") from None
    cpus = sorted((s for s in sections if s.idstr == "cpu"), key=lambda s: s.instance_id)
    if not cpus:
        raise NotesUnavailable("the device state has no 'cpu' section")
    return [_cpu_state(s) for s in cpus]


def _segment(v, what):
    try:
        return Segment(int(v["selector"]), int(v["base"]), int(v["limit"]), int(v["flags"]))
    except (KeyError, TypeError, ValueError):
        raise NotesUnavailable(f"{what} is not a segment (selector, base, limit, flags)") from None


def _cpu_state(s):
    where = f"'cpu' section instance {s.instance_id}"
    if s.version_id not in CPU_VMSTATE_VERSIONS:
        raise NotesUnavailable(f"{where} has version {s.version_id}; known versions are "
                               f"{', '.join(map(str, CPU_VMSTATE_VERSIONS))}")
    f = s.fields
    try:
        regs = [int(r) for r in f["env.regs"]]
        segs = [_segment(v, f"{where} env.segs") for v in f["env.segs"]]
        cr = [int(f["env.cr[0]"]), 0, int(f["env.cr[2]"]), int(f["env.cr[3]"]), int(f["env.cr[4]"])]
        state = CpuState(s.instance_id, regs, int(f["env.eip"]), int(f["env.eflags"]),
                         int(f["env.hflags"]), segs,
                         *(_segment(f[k], f"{where} {k}") for k in ("env.ldt", "env.tr", "env.gdt", "env.idt")),
                         cr, int(f.get("env.kernelgsbase", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise NotesUnavailable(f"{where} lacks field {e}") from None
    if len(regs) not in (8, 16) or len(segs) != 6:
        raise NotesUnavailable(f"{where} has {len(regs)} registers and {len(segs)} segments")
    state.regs = regs + [0] * (16 - len(regs))
    return state
