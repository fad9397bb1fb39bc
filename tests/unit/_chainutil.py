"""Chains of small images for the tests: full images written from page dictionaries,
children made by rebasing a full image onto another (qsnap.image.rewrite)."""
import numpy as np

from qsnap.image import ImageWriter
from qsnap.image.reader import Image
from qsnap.image.rewrite import rewrite
from qsnap.stream.constants import RAM_SAVE_FLAG_PAGE

PS = 4096
CS = 64 * 1024
PPC = CS // PS
BLOCKS = [
    {"idstr": "pc.ram", "length": 2 << 20, "page_size": PS},
    {"idstr": "vga.vram", "length": 256 * 1024, "page_size": PS},
]
REC = np.dtype([('offset', 'u8'), ('data_pos', 'u8'), ('data_len', 'u4'),
                ('block', 'u4'), ('flags', 'u2'), ('fill', 'u1'), ('_pad', 'V5')])


def page(seed, block, idx):
    """A recognisable non-zero page."""
    rng = np.random.default_rng([seed, block, idx])
    return rng.integers(1, 256, size=PS, dtype=np.uint8).tobytes()


def write_full(path, pages, machine="pc-i440fx-7.2", blocks=BLOCKS, created=None):
    """A stand-alone image holding ``pages`` {(block, page index): bytes}."""
    with ImageWriter(path, cluster_size=CS) as w:
        w.start(blocks)
        for (b, i), data in sorted(pages.items()):
            r = np.zeros(1, dtype=REC)
            r["offset"], r["block"], r["flags"], r["data_len"] = i * PS, b, RAM_SAVE_FLAG_PAGE, PS
            w.sink.put_batch(r, memoryview(data))
        w.finish(header_bytes=b"QEVM\0\0\0\3", device_state=b"\x04dev" * 10, machine=machine,
                 stream_info={"ram_end": True}, created=created)


def rebase(full_path, base_path, child_path):
    """``child_path``: the content of the image at ``full_path`` on top of ``base_path``."""
    with Image.open(full_path) as src, Image.open(base_path) as base:
        return rewrite(src, child_path, base)


def two_generations(seed=1):
    """(base pages, child pages): the child changes some pages, zeroes one page,
    zeroes a whole cluster, and adds a page where the base has none."""
    base = {(0, i): page(seed, 0, i) for i in list(range(0, 40)) + [100, 200, 300]}
    base.update({(1, i): page(seed, 1, i) for i in (0, 1, 2)})
    child = dict(base)
    child[(0, 3)] = page(seed + 1, 0, 3)               # changed: cluster 0 copied
    del child[(0, 20)]                                 # zeroed page: cluster 1 copied
    for i in range(32, 40):                            # cluster 2 all zero: zero flag
        del child[(0, i)]
    child[(0, 400)] = page(seed + 1, 0, 400)           # new cluster
    child[(1, 5)] = page(seed + 1, 1, 5)               # changed in vga.vram's only cluster
    return base, child
