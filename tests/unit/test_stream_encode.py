"""stream/encode: what the engines write between pages parses back as written."""
import io

import pytest

from qsnap.errors import StreamError
from qsnap.stream import constants as C
from qsnap.stream import encode
from qsnap.stream import events as ev
from qsnap.stream.reader import StreamReader

from _streamutil import BLOCKS


def test_commands_wire_layout():
    assert encode.command(C.MIG_CMD_PING, b"\0\0\0\x07") == b"\x08\x00\x02\x00\x04\x00\x00\x00\x07"
    assert encode.ping(7) == encode.command(C.MIG_CMD_PING, b"\0\0\0\x07")
    assert encode.packaged(b"xyz") == encode.packaged_header(3) + b"xyz"
    with pytest.raises(StreamError):
        encode.command(C.MIG_CMD_PING, bytes(0x10000))


def test_postcopy_prefix_and_framing_parse_back():
    """The stream a postcopy load starts with, built only from encode, reads back."""
    framing = encode.RamFraming(2, footers=True)
    ranges = [(i * 0x2000, 0x1000) for i in range(13)]   # two DISCARD commands
    blob = encode.postcopy_listen() + encode.eof() + encode.ping(3) + encode.postcopy_run()
    data = (encode.file_header() + encode.open_return_path() + encode.ping(1)
            + encode.postcopy_advise(0x1000, 0x1000)
            + framing.start(encode.mem_size(BLOCKS, host_page_size=4096))
            + framing.part_start + framing.section_close
            + encode.ram_discard("pc.ram", ranges) + encode.packaged(blob) + framing.end()
            + encode.eof())
    events = list(StreamReader(io.BytesIO(data)))
    cmds = [e for e in events if isinstance(e, ev.Command)]
    assert [c.cmd for c in cmds] == [C.MIG_CMD_OPEN_RETURN_PATH, C.MIG_CMD_PING, C.MIG_CMD_POSTCOPY_ADVISE,
                                     C.MIG_CMD_POSTCOPY_RAM_DISCARD, C.MIG_CMD_POSTCOPY_RAM_DISCARD,
                                     C.MIG_CMD_PACKAGED]
    assert cmds[1].ping_value == 1
    assert cmds[2].advise == (0x1000, 0x1000)
    assert len(cmds[3].payload) == 3 + 6 + 12 * 16 and len(cmds[4].payload) == 3 + 6 + 16
    assert cmds[5].blob == blob
    (mem,) = [e for e in events if isinstance(e, ev.MemSize)]
    assert [(b.idstr, b.length) for b in mem.blocks] == [(b.idstr, b.length) for b in BLOCKS]
    headers = [(e.type, e.section_id) for e in events if isinstance(e, ev.SectionHeader)]
    assert headers == [(C.QEMU_VM_SECTION_START, 2), (C.QEMU_VM_SECTION_PART, 2), (C.QEMU_VM_SECTION_END, 2)]
