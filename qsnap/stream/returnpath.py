"""The return-path codec: messages a destination sends back to the migration source.

Both directions live here: ``save`` answers as a destination would (PONG,
SHUT), and postcopy ``load`` reads what a real destination sends (PONG,
REQ_PAGES(_ID), SHUT, ...).  Every message is ``be16 type, be16 length,
payload`` (QEMU migration/migration.c migrate_send_rp_message and
source_return_path_thread, whose checks :class:`Decoder` repeats).
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Optional

from ..errors import ProtocolError
from .constants import (
    MIG_RP_MAX_LEN,
    MIG_RP_MSG_INVALID,
    MIG_RP_MSG_MAX,
    MIG_RP_MSG_NAMES,
    MIG_RP_MSG_PONG,
    MIG_RP_MSG_REQ_PAGES,
    MIG_RP_MSG_REQ_PAGES_ID,
    MIG_RP_MSG_RESUME_ACK,
    MIG_RP_MSG_SHUT,
    MIG_RP_MSG_SWITCHOVER_ACK,
)

# migration.c rp_message[]: the fixed payload lengths (-1 there: variable).
FIXED_LEN = {
    MIG_RP_MSG_SHUT: 4,
    MIG_RP_MSG_PONG: 4,
    MIG_RP_MSG_REQ_PAGES: 12,
    MIG_RP_MSG_RESUME_ACK: 4,
    MIG_RP_MSG_SWITCHOVER_ACK: 0,
}


# -- encoding ----------------------------------------------------------------------

def message(msg_type, payload=b""):
    if len(payload) > MIG_RP_MAX_LEN:
        raise ProtocolError(f"return-path payload of {len(payload)} bytes exceeds {MIG_RP_MAX_LEN}")
    return struct.pack(">HH", msg_type, len(payload)) + bytes(payload)


def pong(value):
    return message(MIG_RP_MSG_PONG, struct.pack(">I", value))


def shut(value):
    """SHUT: 0 when the destination loaded the stream, non-zero on error."""
    return message(MIG_RP_MSG_SHUT, struct.pack(">I", value))


def req_pages(start, length):
    """REQ_PAGES: ``length`` bytes at ``start`` of the block of the previous REQ_PAGES_ID."""
    return message(MIG_RP_MSG_REQ_PAGES, struct.pack(">QI", start, length))


def req_pages_id(idstr, start, length):
    raw = idstr.encode() if isinstance(idstr, str) else bytes(idstr)
    return message(MIG_RP_MSG_REQ_PAGES_ID, struct.pack(">QIB", start, length, len(raw)) + raw)


def resume_ack(value):
    return message(MIG_RP_MSG_RESUME_ACK, struct.pack(">I", value))


def switchover_ack():
    return message(MIG_RP_MSG_SWITCHOVER_ACK)


# -- decoding ----------------------------------------------------------------------

class Message(NamedTuple):
    """One decoded message; ``offset`` is its return-path offset.

    ``value``: PONG, SHUT and RESUME_ACK.  ``start``, ``length``: REQ_PAGES(_ID);
    ``idstr``: REQ_PAGES_ID.  ``payload``: always, verbatim.
    """

    offset: int
    type: int
    payload: bytes
    value: Optional[int] = None
    start: Optional[int] = None
    length: Optional[int] = None
    idstr: Optional[str] = None

    @property
    def name(self):
        return MIG_RP_MSG_NAMES.get(self.type, "unknown")


class Decoder:
    """Incremental decoder: ``feed(bytes)`` yields the messages completed so far.

    Raises ProtocolError naming the return-path offset on a bad header or
    payload; ``close()`` raises if the input ended inside a message.
    """

    def __init__(self):
        self.offset = 0          # return-path offset of the first undecoded byte
        self._buf = bytearray()

    def feed(self, data):
        """Yield the messages completed by ``data``, one at a time, so that a
        caller acting on one sees the errors of the next only after it."""
        buf = self._buf
        buf += data
        pos = 0
        try:
            while len(buf) - pos >= 4:
                typ, ln = struct.unpack_from(">HH", buf, pos)
                self._check_header(typ, ln)
                if len(buf) - pos - 4 < ln:
                    break
                msg = _decode(self.offset, typ, bytes(buf[pos + 4:pos + 4 + ln]))
                pos += 4 + ln
                self.offset += 4 + ln
                yield msg
        finally:
            del buf[:pos]

    def close(self):
        if self._buf:
            raise ProtocolError(f"return path closed inside a message ({len(self._buf)} bytes "
                                f"at return-path offset 0x{self.offset:x})")

    def _check_header(self, typ, ln):
        off = self.offset
        name = MIG_RP_MSG_NAMES.get(typ, "unknown")
        if typ == MIG_RP_MSG_INVALID or typ >= MIG_RP_MSG_MAX:
            raise ProtocolError(f"return-path message type {typ} ({name}) length {ln} "
                                f"out of range at return-path offset 0x{off:x}")
        if ln > MIG_RP_MAX_LEN:
            raise ProtocolError(f"return-path message {name} length {ln} exceeds "
                                f"{MIG_RP_MAX_LEN} at return-path offset 0x{off:x}")
        fixed = FIXED_LEN.get(typ)
        if fixed is not None and ln != fixed:
            raise ProtocolError(f"return-path message {name} with bad length {ln} "
                                f"(expected {fixed}) at return-path offset 0x{off:x}")


def _decode(off, typ, p):
    if typ in (MIG_RP_MSG_PONG, MIG_RP_MSG_SHUT, MIG_RP_MSG_RESUME_ACK):
        return Message(off, typ, p, value=struct.unpack(">I", p)[0])
    if typ == MIG_RP_MSG_REQ_PAGES:
        start, length = struct.unpack(">QI", p)
        return Message(off, typ, p, start=start, length=length)
    if typ == MIG_RP_MSG_REQ_PAGES_ID:
        ln = len(p)
        # migration.c: the idstr length byte must match what follows it
        if ln < 14 or p[12] == 0 or ln != 13 + p[12]:
            raise ProtocolError(f"REQ_PAGES_ID with bad length {ln} at return-path offset 0x{off:x}")
        start, length = struct.unpack_from(">QI", p)
        return Message(off, typ, p, start=start, length=length, idstr=p[13:].decode("utf-8", "replace"))
    return Message(off, typ, p)
