"""Raw export: guest-physical memory as one sparse file.

Byte N of the file is guest-physical address N (memmap.py says which blocks
are mapped where); what is not RAM (the PCI hole, unmapped blocks) and every
page the image does not store (zero pages) is a hole, so the file takes
disk space only for the non-zero pages. The file is as long as the highest
mapped address: 4 GiB for any pc/q35 guest, since the BIOS ends there.
"""
from qsnap.export.memmap import guest_ranges
from qsnap.export.pages import write_ranges


def write_raw(img, pages, out):
    ranges = guest_ranges(img.blocks, img.meta.get("machine"))
    size = max(r.gpa + r.length for r in ranges)
    out.size(size)
    write_ranges(pages, out, ranges, [r.gpa for r in ranges])
    return size
