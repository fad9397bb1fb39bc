"""The qsnap image: a qcow2 v3 file holding RAM pages at addressable offsets
plus a metadata region (docs/image-format.md)."""

# The names below are imported on first use (PEP 562): `qsnap load` needs the
# reader, `qsnap save` the writer, and neither should pay for the other's
# imports before its first byte.
_LAZY = {
    "FORMAT_VERSION": "qsnap.image.layout",
    "BlockInfo": "qsnap.image.reader",
    "Image": "qsnap.image.reader",
    "peek_header": "qsnap.image.reader",
    "ImageWriter": "qsnap.image.writer",
}

__all__ = ["FORMAT_VERSION", "BlockInfo", "Image", "ImageWriter", "peek_header"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qsnap.image' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
