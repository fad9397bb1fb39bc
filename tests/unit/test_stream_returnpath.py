"""The return-path codec: encode -> decode round trips, and bad input as ProtocolError."""
import struct

import pytest

from qsnap.errors import ProtocolError
from qsnap.stream import constants as C
from qsnap.stream import returnpath as rp

MESSAGES = [
    (rp.pong(3), dict(type=C.MIG_RP_MSG_PONG, value=3)),
    (rp.shut(0), dict(type=C.MIG_RP_MSG_SHUT, value=0)),
    (rp.shut(1), dict(type=C.MIG_RP_MSG_SHUT, value=1)),
    (rp.req_pages_id("pc.ram", 0x2000, 0x1000),
     dict(type=C.MIG_RP_MSG_REQ_PAGES_ID, start=0x2000, length=0x1000, idstr="pc.ram")),
    (rp.req_pages(0x7000, 0x3000), dict(type=C.MIG_RP_MSG_REQ_PAGES, start=0x7000, length=0x3000, idstr=None)),
    (rp.resume_ack(1), dict(type=C.MIG_RP_MSG_RESUME_ACK, value=1)),
    (rp.switchover_ack(), dict(type=C.MIG_RP_MSG_SWITCHOVER_ACK, payload=b"")),
]


def decode_all(data, step=None):
    d = rp.Decoder()
    out = []
    step = step or max(len(data), 1)
    for i in range(0, len(data), step):
        out.extend(d.feed(data[i:i + step]))
    d.close()
    return out


def test_wire_layout():
    """be16 type, be16 length, payload (migration.c migrate_send_rp_message)."""
    assert rp.pong(0x01020304) == b"\x00\x02\x00\x04\x01\x02\x03\x04"
    assert rp.req_pages_id("ab", 1, 2) == (b"\x00\x03\x00\x0f" + struct.pack(">QI", 1, 2) + b"\x02ab")


@pytest.mark.parametrize("step", [None, 1, 3])
def test_round_trip(step):
    data = b"".join(m for m, _ in MESSAGES)
    msgs = decode_all(data, step)
    assert len(msgs) == len(MESSAGES)
    offset = 0
    for msg, (raw, want) in zip(msgs, MESSAGES):
        assert msg.offset == offset
        assert msg.payload == raw[4:]
        for k, v in want.items():
            assert getattr(msg, k) == v, (msg, k)
        offset += len(raw)


@pytest.mark.parametrize("cut", [1, 3, 4, 10, 15])
def test_truncated_input_names_the_offset(cut):
    data = rp.pong(1) + rp.req_pages(0, 4096)[:cut]
    d = rp.Decoder()
    assert [m.value for m in d.feed(data)] == [1]
    with pytest.raises(ProtocolError, match=f"{cut} bytes at return-path offset 0x8"):
        d.close()


@pytest.mark.parametrize("raw, what", [
    (struct.pack(">HH", C.MIG_RP_MSG_INVALID, 0), "type 0 (unknown) length 0 out of range"),
    (struct.pack(">HH", C.MIG_RP_MSG_MAX, 4), "out of range"),
    (struct.pack(">HH", C.MIG_RP_MSG_RECV_BITMAP, C.MIG_RP_MAX_LEN + 1), "exceeds 512"),
    (struct.pack(">HH", C.MIG_RP_MSG_PONG, 2) + b"\0\0", "PONG with bad length 2 (expected 4)"),
    (struct.pack(">HH", C.MIG_RP_MSG_REQ_PAGES_ID, 5) + bytes(5), "REQ_PAGES_ID with bad length 5"),
    (struct.pack(">HH", C.MIG_RP_MSG_REQ_PAGES_ID, 15) + struct.pack(">QIB", 0, 4096, 9) + b"ab",
     "REQ_PAGES_ID with bad length 15"),
])
def test_bad_message_names_the_offset(raw, what):
    d = rp.Decoder()
    first = rp.shut(0) + rp.pong(2)
    got = []
    with pytest.raises(ProtocolError, match=r"at return-path offset 0x10\b") as e:
        for msg in d.feed(first + raw):
            got.append(msg.type)
    assert what in str(e.value)
    # messages before the bad one are delivered before its error
    assert got == [C.MIG_RP_MSG_SHUT, C.MIG_RP_MSG_PONG]


def test_payload_too_long_is_refused():
    with pytest.raises(ProtocolError):
        rp.message(C.MIG_RP_MSG_RECV_BITMAP, bytes(C.MIG_RP_MAX_LEN + 1))
