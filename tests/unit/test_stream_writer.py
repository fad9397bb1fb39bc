"""StreamWriter: byte-exact output for the samples in the stream spec."""
import io
import struct

import pytest

from qsnap.errors import StreamError
from qsnap.stream.constants import QEMU_VM_SECTION_PART
from qsnap.stream.events import RamBlock
from qsnap.stream.writer import StreamWriter

from bigcmp import assert_same


def w_out(**kw):
    f = io.BytesIO()
    return StreamWriter(f, **kw), f


def test_header_and_configuration_bytes():
    w, f = w_out()
    w.header()
    w.configuration("pc-i440fx-7.2", capabilities=["x-ignore-shared"])
    assert f.getvalue() == (b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0dpc-i440fx-7.2\x05\x1a"
                            b"configuration/capabilities\x00\x00\x00\x01\x00\x00\x00\x01\x0fx-ignore-shared")


def test_commands_bytes():
    w, f = w_out()
    w.open_return_path(); w.ping(1); w.postcopy_advise(0x1000, 0x1000)
    assert f.getvalue() == bytes.fromhex("0800010000" "080002000400000001"
                                         "08000300100000000000001000" "0000000000001000")


def test_discard_bytes_and_split():
    w, f = w_out()
    w.ram_discard("m", [(0x79e000, 0x3862000)])
    assert f.getvalue() == bytes.fromhex("0800060014 00 01 6d 00 000000000079e000 0000000003862000".replace(" ", ""))
    w, f = w_out()
    w.ram_discard("m", [(i, 1) for i in range(25)])
    assert f.getvalue().count(b"\x08\x00\x06") == 3


def test_packaged_blob_follows_command():
    w, f = w_out()
    w.packaged(b"abc")
    assert f.getvalue() == b"\x08\x00\x07\x00\x04\x00\x00\x00\x03abc"


def test_mem_size_bytes():
    w, f = w_out()
    w.mem_size([RamBlock("m", 0x2000000, page_size=0x200000), RamBlock("pc.rom", 0x20000, page_size=4096)],
               page_size_fields=True)
    assert f.getvalue() == (struct.pack(">Q", 0x2020000 | 4) + b"\x01m" + struct.pack(">QQ", 0x2000000, 0x200000)
                            + b"\x06pc.rom" + struct.pack(">Q", 0x20000))


def test_page_continue_and_disable():
    w, f = w_out()
    w.zero("pc.ram", 0x1000); w.zero("pc.ram", 0x2000); w.zero("pc.ram", 0x3000, use_continue=False)
    assert f.getvalue() == (bytes.fromhex("0000000000001002") + b"\x06pc.ram\x00"
                            + bytes.fromhex("0000000000002022") + b"\x00"
                            + bytes.fromhex("0000000000003002") + b"\x06pc.ram\x00")
    w, f = w_out(use_continue=False)
    w.zero("a", 0); w.zero("a", 0x1000)
    assert f.getvalue().count(b"\x01a") == 2


def test_sections_and_footers():
    w, f = w_out()
    with w.section(QEMU_VM_SECTION_PART, 2):
        w.eos()
    w.section_full(0, "timer", 0, 2, b"xy")
    w.eof()
    assert f.getvalue() == (b"\x02\x00\x00\x00\x02" + struct.pack(">Q", 0x10) + b"\x7e\x00\x00\x00\x02"
                            + b"\x04\x00\x00\x00\x00\x05timer\x00\x00\x00\x00\x00\x00\x00\x02xy\x7e\x00\x00\x00\x00\x00")
    w, f = w_out(footers=False)
    w.section_full(0, "timer", 0, 2, b"")
    w.end_section(0)
    assert b"\x7e" not in f.getvalue()


def test_write_pages_matches_page():
    data = bytes(range(256)) * 16 * 3
    w1, f1 = w_out()
    w1.write_pages("pc.ram", [0, 0x5000, 0x1000], data)
    w2, f2 = w_out()
    for i, o in enumerate([0, 0x5000, 0x1000]):
        w2.page("pc.ram", o, data[i * 4096 : (i + 1) * 4096])
    assert_same(f1.getvalue(), f2.getvalue(), "f1.getvalue()")


def test_writer_errors():
    w, _ = w_out()
    with pytest.raises(StreamError):
        w.page("pc.ram", 0, b"short")
    with pytest.raises(StreamError):
        w.zero("pc.ram", 0x10)
    with pytest.raises(StreamError):
        w.zero("", 0)
    with pytest.raises(StreamError):
        w.command(1, bytes(70000))
    with pytest.raises(StreamError):
        StreamWriter(io.BytesIO(), page_size=3000)


def test_writer_to_fd(tmp_path):
    import os
    p = tmp_path / "o"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT)
    try:
        w = StreamWriter(fd)
        w.header()
    finally:
        os.close(fd)
    assert p.read_bytes() == b"QEVM\x00\x00\x00\x03"
