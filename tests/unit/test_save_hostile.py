"""`qsnap save` on a real QEMU 7.2 stream with one record inserted, changed or cut.

Each case must end as one ``qsnap: error: ... at stream offset 0x...`` line and a
non-zero exit, leave no image and no temporary file, and keep an older image at
the same path byte for byte.  The stream is ``tests/data/bg72-blob.stream.gz``
(background snapshot of a 32 MiB blob guest); offsets come from reading it.
"""
import gzip
import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qsnap.stream import constants as C
from qsnap.stream import events as ev
from qsnap.stream.reader import StreamReader

from bigcmp import assert_same

DATA = Path(__file__).resolve().parent.parent / "data" / "bg72-blob.stream.gz"


class Landmarks:
    """Stream offsets of the records the cases edit around."""

    def __init__(self, data):
        self.data = data
        eos = []
        for e in StreamReader(io.BytesIO(data)):
            if isinstance(e, ev.MemSize):
                self.mem_size = e.offset
            elif isinstance(e, ev.Eos) and len(eos) == 0:
                eos.append(e.offset)
            elif isinstance(e, ev.SectionHeader) and e.type == C.QEMU_VM_SECTION_PART:
                self.part = getattr(self, "part", e.offset)
            elif isinstance(e, ev.DeviceState):
                self.device_state = e.offset
                self.eof = e.offset + e.eof_pos
        self.first_eos = eos[0]
        self.first_part_record = self.part + 5  # type byte + be32 section id


@pytest.fixture(scope="module")
def real():
    return Landmarks(gzip.decompress(DATA.read_bytes()))


def insert(data, at, record):
    return data[:at] + record + data[at:]


def save_cli(img, stream):
    return subprocess.run([sys.executable, "-m", "qsnap", "save", "--quiet", str(img)], input=stream,
                          capture_output=True)


def assert_rejected(tmp_path, stream, offset, *fragments):
    """Save ``stream`` over an older image: one error line naming ``offset``, old image intact."""
    img = tmp_path / "vm.qsnap"
    old = b"an older file at IMG " * 100
    img.write_bytes(old)
    r = save_cli(img, stream)
    err = r.stderr.decode()
    assert r.returncode != 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qsnap: error: "), err
    assert f"at stream offset 0x{offset:x}" in lines[0], (lines[0], hex(offset))
    for f in fragments:
        assert f in lines[0], (lines[0], f)
    assert_same(img.read_bytes(), old, "img.read_bytes()")
    assert sorted(os.listdir(tmp_path)) == ["vm.qsnap"]
    new = tmp_path / "new.qsnap"
    r = save_cli(new, stream)
    assert r.returncode != 0 and not new.exists()
    assert sorted(os.listdir(tmp_path)) == ["vm.qsnap"]


def test_real_stream_saves(tmp_path, real):
    """The unedited stream saves: the cases below fail because of their edit."""
    r = save_cli(tmp_path / "vm.qsnap", real.data)
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "vm.qsnap").exists()


@pytest.mark.parametrize("record", [
    struct.pack(">Q", C.RAM_SAVE_FLAG_MULTIFD_FLUSH),
    struct.pack(">Q", C.RAM_SAVE_FLAG_ZERO) + b"\x06pc.ram" + b"\x00",
    struct.pack(">Q", C.RAM_SAVE_FLAG_ZERO | C.RAM_SAVE_FLAG_CONTINUE) + b"\x00",
    struct.pack(">Q", C.RAM_SAVE_FLAG_EOS),
], ids=["multifd-flush", "zero", "zero-continue", "eos"])
def test_ram_record_before_mem_size(tmp_path, real, record):
    stream = insert(real.data, real.mem_size, record)
    assert_rejected(tmp_path, stream, real.mem_size)


def test_second_mem_size(tmp_path, real):
    mem_size = real.data[real.mem_size:real.first_eos]
    stream = insert(real.data, real.first_part_record, mem_size)
    assert_rejected(tmp_path, stream, real.first_part_record, "MEM_SIZE")


@pytest.mark.parametrize("section_type", [C.QEMU_VM_SECTION_PART, C.QEMU_VM_SECTION_END])
def test_section_for_unknown_section_id(tmp_path, real, section_type):
    """A PART/END naming a section id no START opened (the RAM section is id 2)."""
    section = bytes([section_type]) + struct.pack(">I", 9) + struct.pack(">Q", C.RAM_SAVE_FLAG_EOS)
    stream = insert(real.data, real.part, section)
    assert_rejected(tmp_path, stream, real.part, "unknown section id 9")


def test_page_for_unknown_block(tmp_path, real):
    record = struct.pack(">Q", 0x1000 | C.RAM_SAVE_FLAG_ZERO) + b"\x07nosuch0" + b"\x00"
    stream = insert(real.data, real.first_part_record, record)
    assert_rejected(tmp_path, stream, real.first_part_record, "nosuch0")


def test_device_state_truncated_full_section(tmp_path, real):
    cut = real.device_state + 100
    assert_rejected(tmp_path, real.data[:cut], cut, "truncated")


def test_device_state_without_eof(tmp_path, real):
    """The last FULL section is followed by nothing: EOF and VMDESCRIPTION missing."""
    cut = real.eof
    assert_rejected(tmp_path, real.data[:cut], cut, "truncated")


def test_device_state_truncated_vmdescription(tmp_path, real):
    cut = len(real.data) - 10
    assert_rejected(tmp_path, real.data[:cut], real.eof + 1, "VMDESCRIPTION")
