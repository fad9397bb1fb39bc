"""The VMDESCRIPTION-driven device-state decoder (qsnap.stream.vmstate)."""
import gzip
import io
import json
import pathlib
import struct

import pytest
from hypothesis import given, settings, strategies as st

from qsnap.errors import StreamError
from qsnap.stream.events import DeviceState
from qsnap.stream.reader import StreamReader
from qsnap.stream.vmstate import decode_sections, find_vmdescription
from qsnap.stream.writer import StreamWriter

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "bg72-blob.stream.gz"


def tail(sections, desc, vmdesc=True):
    f = io.BytesIO()
    w = StreamWriter(f)
    for sid, (name, inst, ver, payload) in enumerate(sections):
        w.section_full(sid + 3, name, inst, ver, payload)
    w.eof()
    if vmdesc:
        w.vmdescription(json.dumps({"page_size": 4096, "devices": desc}).encode())
    return f.getvalue()


DEV = {"name": "dev", "instance_id": 1, "vmsd_name": "dev", "version": 3,
       "fields": [{"name": "a", "type": "uint16", "size": 2},
                  {"name": "s", "type": "int32", "size": 4},
                  {"name": "arr", "array_len": 2, "type": "struct", "size": 5, "struct": {
                      "vmsd_name": "e", "version": 1,
                      "fields": [{"name": "x", "type": "uint8", "size": 1}, {"name": "y", "type": "buffer", "size": 4}]}}],
       "subsections": [{"vmsd_name": "dev/sub", "version": 1, "fields": [{"name": "z", "type": "uint64", "size": 8}]}]}
PAYLOAD = (struct.pack(">Hi", 0x1234, -2) + b"\x01abcd\x02efgh"
           + b"\x05\x07dev/sub" + struct.pack(">IQ", 1, 0x7E7E7E7E))


def test_fields_arrays_structs_subsections():
    data = tail([("dev", 1, 3, PAYLOAD)], [DEV])
    s, = decode_sections(data, find_vmdescription(data))
    assert (s.idstr, s.instance_id, s.version_id) == ("dev", 1, 3)
    assert s.fields["a"] == 0x1234 and s.fields["s"] == -2
    assert s.fields["arr"] == [{"x": 1, "y": b"abcd"}, {"x": 2, "y": b"efgh"}]
    assert s.fields["subsections"] == {"dev/sub": {"z": 0x7E7E7E7E}}


def test_no_vmdescription():
    data = tail([("dev", 1, 3, PAYLOAD)], [DEV], vmdesc=False)
    assert find_vmdescription(data) is None
    with pytest.raises(StreamError, match="no VMDESCRIPTION"):
        decode_sections(data, None)


def test_sizes_that_do_not_match_the_payload():
    data = tail([("dev", 1, 3, PAYLOAD[:-1] + b"")], [DEV])
    with pytest.raises(StreamError, match="footer|ends inside"):
        decode_sections(data, find_vmdescription(data))


def test_section_missing_from_the_description():
    data = tail([("other", 0, 1, b"\0")], [DEV])
    with pytest.raises(StreamError, match="'other' instance 0 .* not in the VMDESCRIPTION"):
        decode_sections(data, find_vmdescription(data))


def test_bad_json():
    data = tail([("dev", 1, 3, PAYLOAD)], [DEV])
    p = data.rindex(b"{")
    with pytest.raises(StreamError, match="VMDESCRIPTION"):
        find_vmdescription(data[:p] + b"[" + data[p + 1:])


def test_real_qemu_72_device_state():
    """Every section of a QEMU 7.2 stream decodes; the cpu section has its registers."""
    with gzip.open(DATA) as f:
        ds = next(e for e in StreamReader(io.BytesIO(f.read())) if isinstance(e, DeviceState))
    sections = decode_sections(ds.data, find_vmdescription(ds.data))
    names = [s.idstr for s in sections]
    assert names[0] == "timer" and "cpu" in names and names[-1] == "globalstate"
    cpu = sections[names.index("cpu")]
    assert cpu.version_id == 12 and len(cpu.fields["env.regs"]) == 16
    assert cpu.fields["env.segs"][1]["selector"] < 0x10000  # CS
    assert {"selector", "base", "limit", "flags"} == set(cpu.fields["env.gdt"])


_json = st.recursive(st.none() | st.booleans() | st.integers(-2, 40) | st.text(max_size=6),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(
                         st.sampled_from(["name", "fields", "size", "type", "array_len", "struct",
                                          "subsections", "vmsd_name", "instance_id"]), c, max_size=5),
                     max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(field=_json, payload=st.binary(max_size=40))
def test_any_description_gives_a_value_or_a_stream_error(field, payload):
    """Whatever the JSON says, the decoder returns or raises StreamError, nothing else."""
    desc = [{"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1,
             "fields": [field] if not isinstance(field, list) else field}]
    data = tail([("dev", 0, 1, payload)], desc)
    try:
        decode_sections(data, find_vmdescription(data))
    except StreamError:
        pass
