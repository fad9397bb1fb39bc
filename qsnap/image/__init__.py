"""The qsnap image: a qcow2 v3 file holding RAM pages at addressable offsets
plus a metadata region (docs/image-format.md)."""

from qsnap.image.layout import FORMAT_VERSION
from qsnap.image.reader import BlockInfo, Image, peek_header
from qsnap.image.writer import ImageWriter

__all__ = ["FORMAT_VERSION", "BlockInfo", "Image", "ImageWriter", "peek_header"]
