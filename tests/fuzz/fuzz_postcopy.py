#!/usr/bin/env python3
"""atheris harness: the postcopy load engine (qsnap.postcopy.load_postcopy) on hostile
images and a hostile return path.

    python tests/fuzz/fuzz_postcopy.py -max_total_time=600 [CORPUS_DIR ...]
    QSNAP_FUZZ_FINDINGS=DIR python tests/fuzz/fuzz_postcopy.py -fork=1 -ignore_ooms=1 -max_total_time=36000

A fuzz input is

    be16 n, n bytes      image edit program (image_edits.py) over the engine seed images
    u8 upfront           return-path messages written before the engine starts
    u8 percent           precopy share, one of 0, 10, 50, 100
    rest                 return-path messages (be16 type, be16 len, payload)

The first ``upfront`` messages are in the return-path pipe from the start; the
rest arrive when the stream has ended (the engine closed its output), as
QEMU's final PONGs and SHUT do; then the pipe closes.  The custom mutator edits
the image program (image_edits.Mutator) or the message list: PONG 1..4 and
repeats, SHUT 0/1, REQ_PAGES_ID for the image's blocks at aligned, unaligned
and out-of-range offsets, REQ_PAGES, SWITCHOVER_ACK, RESUME_ACK, RECV_BITMAP,
bad types and lengths, truncation inside a message.

The contract (engine_harness.py), plus: load_postcopy returns within the
timeout, its return-path thread ends once the pipe closes, and nothing is left
beside the image.
"""
import fcntl
import os
import random
import struct
import sys
import threading

import engine_harness as H
import seeds

import atheris

with atheris.instrument_imports(include=["qsnap"]):
    from qsnap.errors import QsnapError
    from qsnap.image import layout, qcow2, reader
    from qsnap.postcopy import load_postcopy
    from qsnap.stream import constants as C

import image_edits

# Imported above so they are instrumented: load_postcopy imports the reader lazily.
_INSTRUMENTED = (layout, qcow2, reader)
PERCENTS = (0, 10, 50, 100)
JOIN_SECONDS = 5
_state = {}


def setup():
    if not _state:
        d = H.work_dir("postcopy")
        _state.update(dir=d, path=str(d / "image.qsnap"), name="image.qsnap",
                      seeds=[image_edits.Seed(n, b) for n, b in seeds.engine_images(d / "seeds")])
        os.rmdir(d / "seeds")
    return _state


# --- input layout -------------------------------------------------------------------

def decode(data):
    """(image program, upfront count, percent, return-path bytes)."""
    n = int.from_bytes(data[:2], "big") if len(data) >= 2 else 0
    prog = data[2:2 + n]
    rest = data[2 + n:]
    upfront = rest[0] if rest else 0
    percent = PERCENTS[rest[1] % len(PERCENTS)] if len(rest) > 1 else 10
    return prog, upfront, percent, rest[2:]


def encode(prog, upfront, percent_index, rp):
    return len(prog).to_bytes(2, "big") + prog + bytes([upfront & 0xFF, percent_index & 0xFF]) + rp


def split_messages(rp):
    """[bytes] of whole messages; a partial last message stays as the last item."""
    out, pos = [], 0
    while pos < len(rp):
        ln = int.from_bytes(rp[pos + 2:pos + 4], "big") if len(rp) - pos >= 4 else 0
        out.append(rp[pos:pos + 4 + ln])
        pos += 4 + ln
    return out


# --- one run ------------------------------------------------------------------------

class _Drain(threading.Thread):
    """Reads the stream to its end, then plays QEMU's late messages and closes the pipe."""

    def __init__(self, r_out, w_in, late):
        super().__init__(daemon=True)
        self.r_out, self.w_in, self.late = r_out, w_in, late
        self.closed_in = False
        self.lock = threading.Lock()

    def run(self):
        while os.read(self.r_out, 1 << 16):
            pass
        try:
            _write_all(self.w_in, self.late)
        except OSError:
            pass
        self.close_in()

    def close_in(self):
        with self.lock:
            if not self.closed_in:
                self.closed_in = True
                os.close(self.w_in)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _return_path_threads():
    return [t for t in threading.enumerate() if t.name == "qsnap-return-path"]


def run_one(data):
    st = setup()
    prog, upfront, percent, rp = decode(data)
    _seed, buf = image_edits.apply(st["seeds"], prog)
    with open(st["path"], "wb") as f:
        f.write(buf)
    msgs = split_messages(rp)
    early, late = b"".join(msgs[:upfront]), b"".join(msgs[upfront:])
    r_in, w_in = os.pipe2(os.O_CLOEXEC)
    r_out, w_out = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w_in, 1031, 1 << 20)  # F_SETPIPE_SZ: the early messages fit
    except OSError:
        pass
    _write_all(w_in, early)
    drain = _Drain(r_out, w_in, late)
    drain.start()
    try:
        load_postcopy(st["path"], percent, cache="writeback", quiet=True, in_fd=r_in, out_fd=w_out,
                      group_pages=4)
    except QsnapError as e:
        H.check_message(e)
    finally:
        os.close(w_out)           # the engine may have put /dev/null there; either way the stream ends
        drain.join(JOIN_SECONDS)
        drain.close_in()
        for t in _return_path_threads():
            t.join(JOIN_SECONDS)
        stuck = drain.is_alive() or _return_path_threads()
        if not stuck:
            os.close(r_in)
            os.close(r_out)
    if stuck:
        raise H.ContractViolation("a postcopy thread still runs after the return path closed")
    H.check_no_leftovers(st["dir"], [st["name"]])


def TestOneInput(data):
    try:
        run_one(data)
    except Exception as e:  # noqa: BLE001  every non-QsnapError is a finding
        H.finding(e, data)


# --- mutation -----------------------------------------------------------------------

def _msg(typ, payload, ln=None):
    return struct.pack(">HH", typ, len(payload) if ln is None else ln) + payload


class RpMutator:
    """Whole-message mutations of the return-path part, edits of the image part."""

    def __init__(self, seeds_, byte_mutate):
        self.images = image_edits.Mutator(seeds_, byte_mutate)
        self.byte_mutate = byte_mutate
        self.blocks = sorted({(b["idstr"], b["length"]) for s in seeds_ for b in s.facts["doc"]["ram_blocks"]
                              if isinstance(b, dict) and "idstr" in b and "length" in b})

    def new_message(self, rng):
        typ = rng.choice((C.MIG_RP_MSG_PONG, C.MIG_RP_MSG_SHUT, C.MIG_RP_MSG_REQ_PAGES_ID,
                          C.MIG_RP_MSG_REQ_PAGES_ID, C.MIG_RP_MSG_REQ_PAGES, C.MIG_RP_MSG_SWITCHOVER_ACK,
                          C.MIG_RP_MSG_RESUME_ACK, C.MIG_RP_MSG_RECV_BITMAP, 0, C.MIG_RP_MSG_MAX, 0xFFFF))
        if typ == C.MIG_RP_MSG_PONG:
            return _msg(typ, struct.pack(">I", rng.choice((1, 2, 3, 4, 4, 0, 0x42))))
        if typ in (C.MIG_RP_MSG_SHUT, C.MIG_RP_MSG_RESUME_ACK):
            return _msg(typ, struct.pack(">I", rng.choice((0, 0, 1))))
        if typ in (C.MIG_RP_MSG_REQ_PAGES_ID, C.MIG_RP_MSG_REQ_PAGES):
            idstr, length = rng.choice(self.blocks) if self.blocks else ("pc.ram", 1 << 16)
            start = rng.choice((0, 0x1000, length - 0x1000, length, rng.randrange(max(length, 1)) & ~0xFFF,
                                rng.randrange(max(length, 1)), 1 << 63))
            n = rng.choice((0x1000, 0x1000, 0x2000, 0, 0x800, 0x200000, 0xFFFFFFFF))
            payload = struct.pack(">QI", start & ((1 << 64) - 1), n)
            if typ == C.MIG_RP_MSG_REQ_PAGES_ID:
                name = rng.choice((idstr.encode(), idstr.encode(), b"nosuchblock", b""))
                payload += bytes([len(name)]) + name
            return _msg(typ, payload)
        if typ == C.MIG_RP_MSG_RECV_BITMAP:
            return _msg(typ, b"\x06pc.ram")
        return _msg(typ, b"", ln=rng.choice((0, 4, 513)))

    def mutate(self, data, max_size, rseed):
        rng = random.Random(rseed)
        prog, upfront, percent, rp = decode(data)
        pct = data[2 + len(prog) + 1] if len(data) > 3 + len(prog) else 1
        r = rng.random()
        if r < 0.1:
            return self.byte_mutate(data, max_size)
        if r < 0.35:
            prog = self.images.mutate(prog, 255, rng.getrandbits(32))
        elif r < 0.45:
            upfront = rng.randrange(len(split_messages(rp)) + 1)
            pct = rng.randrange(len(PERCENTS))
        else:
            rp = self.mutate_messages(rng, split_messages(rp))
        return encode(prog, upfront, pct, rp)[:max_size]

    def mutate_messages(self, rng, msgs):
        op = rng.randrange(6)
        if op <= 1 or not msgs:
            msgs.insert(rng.randrange(len(msgs) + 1), self.new_message(rng))
        elif op == 2:
            del msgs[rng.randrange(len(msgs))]
        elif op == 3:
            i = rng.randrange(len(msgs))
            msgs.insert(rng.randrange(len(msgs) + 1), msgs[i])
        elif op == 4:
            i, j = rng.randrange(len(msgs)), rng.randrange(len(msgs))
            msgs[i], msgs[j] = msgs[j], msgs[i]
        else:
            i = rng.randrange(len(msgs))
            msgs[i] = msgs[i][:rng.randrange(len(msgs[i]) + 1)]
            del msgs[i + 1:]
        return b"".join(msgs)


_mutator = None


def CustomMutator(data, max_size, seed):
    global _mutator
    if _mutator is None:
        _mutator = RpMutator(setup()["seeds"], atheris.Mutate)
    return _mutator.mutate(data, max_size, seed)


def seed_inputs(n_seeds):
    """Each seed image served to a well-behaved QEMU: PONG 1, 2, a page request, then
    (after the stream) PONG 4, 3 and SHUT 0."""
    pong = [_msg(C.MIG_RP_MSG_PONG, struct.pack(">I", v)) for v in (1, 2, 3, 4)]
    req = _msg(C.MIG_RP_MSG_REQ_PAGES_ID, struct.pack(">QI", 0x2000, 0x1000) + b"\x06pc.ram")
    shut = _msg(C.MIG_RP_MSG_SHUT, struct.pack(">I", 0))
    rp = pong[0] + pong[1] + req + pong[3] + pong[2] + shut
    return [(f"seed{i}-pct{p}", encode(image_edits.encode(i, 0, []), 3, p, rp))
            for i in range(n_seeds) for p in (0, 1)]


def seed_dir():
    return H.write_seed_dir("postcopy", seed_inputs(len(setup()["seeds"])))


def main(argv=None):
    H.run(sys.argv if argv is None else argv, "postcopy", TestOneInput, seed_dir, CustomMutator, max_len=1024)


if __name__ == "__main__":
    main()
