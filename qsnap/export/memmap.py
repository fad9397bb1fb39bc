"""Where the RAM blocks of a pc or q35 guest sit in guest-physical memory.

The stream names RAM blocks, not addresses, so the map follows from the
machine type and the block lengths, as QEMU's board code lays them out:

* ``pc.ram`` (the main RAM) starts at 0; what does not fit below the PCI hole
  continues at 4 GiB. pc-i440fx (hw/i386/pc_piix.c, gigabyte_align since 1.7):
  with 0xe0000000 bytes or more, 3 GiB stay below; q35 (hw/i386/pc_q35.c):
  with 0xb0000000 bytes or more, 2 GiB stay below. A ``max-ram-below-4g``
  machine option changes this and is not recorded in the stream.
* ``pc.bios`` ends at 4 GiB (hw/i386/x86.c x86_bios_rom_init).

Other blocks (option ROMs, fw_cfg blobs, video RAM) are not mapped.
"""
from dataclasses import dataclass

from qsnap.errors import ImageError

GiB = 1 << 30
FOUR_GIB = 1 << 32
# hw/i386/pc_piix.c pc_init1 / hw/i386/pc_q35.c pc_q35_init
_PC_LOWMEM_LIMIT, _PC_LOWMEM_ALIGNED = 0xE0000000, 0xC0000000
_Q35_LOWMEM_LIMIT, _Q35_LOWMEM = 0xB0000000, 0x80000000


@dataclass(frozen=True)
class GuestRange:
    """``length`` bytes of block ``block`` from ``block_offset`` sit at guest-physical ``gpa``."""

    gpa: int
    block: int
    block_offset: int
    length: int


def machine_family(machine):
    m = (machine or "").lower()
    if "q35" in m:
        return "q35"
    if m.startswith("pc") or "i440fx" in m:
        return "pc"
    return None


def main_ram_split(ram_size, machine):
    """Bytes of the main RAM below the PCI hole."""
    if machine_family(machine) == "q35":
        return _Q35_LOWMEM if ram_size >= _Q35_LOWMEM_LIMIT else ram_size
    return _PC_LOWMEM_ALIGNED if ram_size >= _PC_LOWMEM_LIMIT else ram_size


def guest_ranges(blocks, machine):
    """[GuestRange] by guest-physical address, for ``blocks`` (objects with idstr, length)."""
    if machine_family(machine) is None:
        raise ImageError(f"machine type {machine!r} is not pc or q35: its guest-physical memory map "
                         "is unknown (export --format=mapped-ram keeps RAM-block offsets)")
    names = {b.idstr: i for i, b in enumerate(blocks)}
    if "pc.ram" not in names:
        raise ImageError(f"the image has no 'pc.ram' block (blocks: {', '.join(names)})")
    ram = names["pc.ram"]
    size = blocks[ram].length
    low = main_ram_split(size, machine)
    out = [GuestRange(0, ram, 0, low)]
    if size > low:
        out.append(GuestRange(FOUR_GIB, ram, low, size - low))
    if "pc.bios" in names:
        bios = names["pc.bios"]
        out.append(GuestRange(FOUR_GIB - blocks[bios].length, bios, 0, blocks[bios].length))
    out.sort(key=lambda r: r.gpa)
    for a, b in zip(out, out[1:]):
        if a.gpa + a.length > b.gpa:
            raise ImageError(f"RAM of {a.length:#x} bytes at {a.gpa:#x} overlaps block "
                             f"'{blocks[b.block].idstr}' at {b.gpa:#x}")
    return out
