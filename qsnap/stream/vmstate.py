"""Decode device (vmstate) sections with the stream's own VMDESCRIPTION.

A FULL section's payload is not self-delimiting (migration-stream.md 2.3); the
VMDESCRIPTION JSON that follows the EOF lists every section's fields with the
byte sizes QEMU actually wrote (migration/vmstate.c vmsd_desc_field_end), so a
reader can walk the payloads without knowing any device. This is what QEMU's
``scripts/analyze-migration.py`` does.

    desc = find_vmdescription(device_state)          # dict, or None
    for s in decode_sections(device_state, desc):    # VmstateSection
        s.fields["env.regs"]                         # [int, ...]

Values: integer types (``uint8``..``int64``, ``bool``) become ints (big-endian
on the wire), arrays (``array_len``) lists, structs (``struct``, ``tmp``) dicts
keyed by field name, anything else the raw bytes. Subsections are dicts under
``fields["subsections"][name]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import StreamError
from .constants import (
    QEMU_VM_EOF,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SUBSECTION,
)
from .tail import parse_tail

# vmstate field types read as integers (migration/vmstate-types.c names)
_INT_TYPES = {
    "bool": False, "uint8": False, "uint16": False, "uint32": False, "uint64": False,
    "int8": True, "int16": True, "int32": True, "int64": True,
}
# a described struct may not nest deeper than this (bad JSON must not recurse forever),
# nor an array have more elements (QEMU's largest are a few thousand)
_MAX_DEPTH = 32
_MAX_ARRAY = 1 << 20


@dataclass
class VmstateSection:
    """One decoded FULL section."""

    idstr: str
    instance_id: int
    version_id: int
    offset: int                      # of the section header inside the device state
    fields: dict = field(default_factory=dict)


def find_vmdescription(data, footers=True):
    """The VMDESCRIPTION JSON (a dict) that ends ``data``, or None when there is none.

    ``data`` is the device state as an image keeps it: FULL sections, EOF,
    optionally ``06 be32 len JSON`` (stream/tail.py finds it)."""
    desc = parse_tail(data, 0, footers)[1]
    if desc is not None and not isinstance(desc.get("devices"), list):
        raise StreamError("the VMDESCRIPTION has no device list")
    return desc


class _Cursor:
    def __init__(self, data):
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n, what):
        if n < 0 or self.pos + n > len(self.data):
            raise StreamError(f"device state ends inside {what} at device-state offset 0x{self.pos:x}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def peek(self):
        return self.data[self.pos] if self.pos < len(self.data) else None

    def be32(self, what):
        return int.from_bytes(self.take(4, what), "big")

    def counted(self, what):
        n = self.take(1, what)[0]
        return bytes(self.take(n, what)).decode("latin-1")


def decode_sections(data, desc, footers=True):
    """Decode every FULL section of ``data`` up to its EOF; returns [VmstateSection].

    ``footers``: the stream ends each section with a footer (``7e be32 id``,
    machine types since 2.9); it is checked, so a payload shorter or longer
    than the description says is caught. Raises StreamError when a section is
    not in ``desc`` or its payload does not match the sizes the description gives."""
    if desc is None:
        raise StreamError("the device state has no VMDESCRIPTION to decode its sections with")
    by_key = {}
    if not isinstance(desc, dict) or not isinstance(desc.get("devices"), list):
        raise StreamError("the VMDESCRIPTION has no device list")
    for d in desc["devices"]:
        if isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("instance_id", 0), int):
            by_key[(d["name"], d.get("instance_id", 0))] = d
    cur = _Cursor(data)
    out = []
    while True:
        off = cur.pos
        t = cur.peek()
        if t == QEMU_VM_EOF:
            return out
        if t != QEMU_VM_SECTION_FULL:
            what = "end of data" if t is None else f"0x{t:02x}"
            raise StreamError(f"expected a FULL section at device-state offset 0x{off:x}, found {what}")
        cur.pos += 1
        sid = cur.be32("section header")
        idstr = cur.counted("section idstr")
        instance_id = cur.be32("section header")
        version_id = cur.be32("section header")
        d = by_key.get((idstr, instance_id))
        if d is None:
            raise StreamError(f"section '{idstr}' instance {instance_id} at device-state offset 0x{off:x} "
                              "is not in the VMDESCRIPTION")
        fields = _decode_vmsd(cur, d, f"section '{idstr}'", 0)
        if footers:
            _footer(cur, sid, idstr)
        out.append(VmstateSection(idstr, instance_id, version_id, off, fields))


def _footer(cur, sid, idstr):
    at = cur.pos
    if cur.peek() != QEMU_VM_SECTION_FOOTER or cur.pos + 5 > len(cur.data):
        raise StreamError(f"section '{idstr}': no section footer at device-state offset 0x{at:x}; "
                          "the VMDESCRIPTION sizes do not match the payload")
    cur.pos += 1
    got = cur.be32("section footer")
    if got != sid:
        raise StreamError(f"section '{idstr}': footer names section id {got}, expected {sid} "
                          f"(device-state offset 0x{at:x}); the VMDESCRIPTION sizes do not match the payload")


def _decode_vmsd(cur, desc, where, depth):
    if depth > _MAX_DEPTH:
        raise StreamError(f"{where}: VMDESCRIPTION nests deeper than {_MAX_DEPTH}")
    fields = desc.get("fields") or []
    if not isinstance(fields, list):
        raise StreamError(f"{where}: VMDESCRIPTION 'fields' is not a list")
    out = {}
    for f in fields:
        if not isinstance(f, dict):
            raise StreamError(f"{where}: VMDESCRIPTION field {f!r:.40} is not an object")
        name = str(f.get("name", "?"))
        n = f.get("array_len")
        if n is None:
            out[name] = _decode_field(cur, f, f"{where} field '{name}'", depth)
        elif not isinstance(n, int) or not 0 <= n <= _MAX_ARRAY:
            raise StreamError(f"{where} field '{name}': bad array_len {n!r:.40}")
        else:
            out[name] = [_decode_field(cur, f, f"{where} field '{name}[{i}]'", depth) for i in range(n)]
    subs = desc.get("subsections")
    if subs:
        if not isinstance(subs, list):
            raise StreamError(f"{where}: VMDESCRIPTION 'subsections' is not a list")
        out["subsections"] = _decode_subsections(cur, subs, where, depth)
    return out


def _decode_subsections(cur, subs, where, depth):
    """Subsections follow the fields: ``05 counted-name be32 version payload``
    (vmstate.c vmstate_subsection_save), in the order the description lists them."""
    by_name = {str(s.get("vmsd_name")): s for s in subs if isinstance(s, dict)}
    out = {}
    while len(out) < len(by_name) and cur.peek() == QEMU_VM_SUBSECTION:
        at = cur.pos
        cur.pos += 1
        name = cur.counted("subsection name")
        cur.be32("subsection version")
        s = by_name.get(name)
        if s is None:
            raise StreamError(f"{where}: subsection '{name}' at device-state offset 0x{at:x} "
                              "is not in the VMDESCRIPTION")
        out[name] = _decode_vmsd(cur, s, f"{where} subsection '{name}'", depth + 1)
    return out


def _decode_field(cur, f, where, depth):
    size = f.get("size")
    if "struct" in f and not isinstance(f["struct"], dict):
        raise StreamError(f"{where}: VMDESCRIPTION 'struct' is not an object")
    nested = f.get("struct") or (f if "fields" in f else None)
    if nested is not None:
        start = cur.pos
        value = _decode_vmsd(cur, nested, where, depth + 1)
        if isinstance(size, int) and "subsections" not in value and cur.pos - start != size:
            raise StreamError(f"{where}: decoded {cur.pos - start} bytes but the VMDESCRIPTION "
                              f"says {size} (device-state offset 0x{start:x})")
        return value
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise StreamError(f"{where}: VMDESCRIPTION gives no size")
    kind = f.get("type")
    if kind is not None and not isinstance(kind, str):
        raise StreamError(f"{where}: VMDESCRIPTION 'type' is not a string")
    raw = cur.take(size, where)
    signed = _INT_TYPES.get(kind)
    if signed is not None and size in (1, 2, 4, 8):
        return int.from_bytes(raw, "big", signed=signed)
    return bytes(raw)
