#!/usr/bin/env python3
"""atheris harness: the whole save engine (qsnap.save.save, C sink) on hostile streams.

    python tests/fuzz/fuzz_save.py -max_total_time=600 [CORPUS_DIR ...]
    QSNAP_FUZZ_FINDINGS=DIR python tests/fuzz/fuzz_save.py -fork=1 -ignore_ooms=1 -max_total_time=36000

A fuzz input is a migration stream, fed to save() as in_fd through a memfd or
(for a quarter of the inputs) a pipe written in pieces;
the return path goes to a pipe.  Seeds are small synthetic guests and real
streams cut down to a few RAM records (engine_seeds in seeds.py); besides
libFuzzer's byte mutations, a record-level mutator (stream_records.py)
inserts, deletes, duplicates and reorders whole records, rewrites RAM flags,
offsets, ids and lengths, and truncates inside a record.

The contract (engine_harness.py) plus, for save: after a failure an earlier
file at the image path is byte-identical (or no file is there); after
success the image opens, verifies and loads; the return path carries only
well-formed PONG/SHUT messages, SHUT last, SHUT(0) only on success.
"""
import fcntl
import io
import os
import random
import struct
import sys
import threading
import zlib

import numpy as np

import engine_harness as H
import seeds

import atheris

with atheris.instrument_imports(include=["qsnap"]):
    from qsnap.errors import QsnapError
    from qsnap.image.reader import Image
    from qsnap.load import load
    from qsnap.save import save
    from qsnap.stream import constants as C
    from qsnap.stream import events as ev
    from qsnap.stream.events import NO_BLOCK
    from qsnap.stream.reader import StreamReader

import stream_records

OLD = b"an earlier image that a failed save must leave alone\n" * 8
CLUSTER_SIZE = 1 << 16
PAGE_SIZE = 4096
_state = {}


def _setup():
    if _state:
        return _state
    d = H.work_dir("save")
    rp_r, rp_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(rp_w, 1031, 1 << 20)  # F_SETPIPE_SZ: room for every PONG of one input
    except OSError:
        pass
    _state.update(dir=d, path=str(d / "snap.qsnap"), name="snap.qsnap", memfd=os.memfd_create("fuzz-save"),
                  rp_r=rp_r, rp_w=rp_w, outfd=os.memfd_create("fuzz-save-load"))
    return _state


def _feed(fd, data):
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.lseek(fd, 0, os.SEEK_SET)


class _Trickle(threading.Thread):
    """Feeds ``data`` through a pipe in pieces of 1 byte to 64 KiB, as QEMU's writes
    arrive: the reader's short reads and refills get exercised too."""

    def __init__(self, data):
        super().__init__(daemon=True)
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        self.data = data
        self.start()

    def run(self):
        rng = random.Random(zlib.crc32(self.data))
        view = memoryview(self.data)
        try:
            while view:
                view = view[os.write(self.w, view[:rng.choice((1, 7, 512, 4096, 65536))]):]
        except OSError:   # save stopped reading
            pass
        os.close(self.w)

    def close(self):
        os.close(self.r)  # a blocked write fails with EPIPE
        self.join()


def _drain(fd):
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def check_return_path(rp, ok):
    """Only PONG and SHUT, well framed; SHUT last; SHUT(0) only after success."""
    pos = 0
    shut = None
    while pos < len(rp):
        if shut is not None:
            raise H.ContractViolation(f"return-path message after SHUT at offset {pos}")
        if len(rp) - pos < 4:
            raise H.ContractViolation("partial return-path message")
        typ, ln = struct.unpack_from(">HH", rp, pos)
        if typ not in (C.MIG_RP_MSG_PONG, C.MIG_RP_MSG_SHUT) or ln != 4 or pos + 8 > len(rp):
            raise H.ContractViolation(f"bad return-path message type {typ} length {ln}")
        if typ == C.MIG_RP_MSG_SHUT:
            shut = struct.unpack_from(">I", rp, pos + 4)[0]
        pos += 8
    if shut == 0 and not ok:
        raise H.ContractViolation("SHUT(0) after a failed save")
    if ok and rp and shut != 0:
        raise H.ContractViolation(f"successful save with a return path ends with SHUT {shut}")


def final_ram(stream, zeros_override=True):
    """{(block, offset): page} of the non-zero pages a destination ends with, and the
    pages an XBZRLE record touched (their content needs the previous one: not compared).
    ``zeros_override=False`` skips ZERO records of fill 0 (load sends them only for
    pages it sent no data for)."""
    pages, xbzrle = {}, set()
    for e in StreamReader(io.BytesIO(stream), buffer_size=1 << 18):
        if not isinstance(e, ev.PageBatch):
            continue
        r = e.records
        kind = r["flags"] & np.uint16(0xFFFF & ~C.RAM_SAVE_FLAG_CONTINUE)
        keep = (kind != C.RAM_SAVE_FLAG_ZERO) | (r["fill"] != 0) if not zeros_override else kind >= 0
        for i in np.flatnonzero(keep).tolist():
            k, blk, off = int(kind[i]), int(r["block"][i]), int(r["offset"][i])
            key = (e.blocks[blk].idstr if blk != NO_BLOCK else None, off)
            if k == C.RAM_SAVE_FLAG_XBZRLE:
                xbzrle.add(key)
            elif k == C.RAM_SAVE_FLAG_PAGE:
                pos, n = int(r["data_pos"][i]), int(r["data_len"][i])
                pages[key] = bytes(e.data[pos:pos + n])
            elif k == C.RAM_SAVE_FLAG_ZERO:
                pages[key] = bytes([int(r["fill"][i])]) * PAGE_SIZE if r["fill"][i] else None
    return {k: v for k, v in pages.items() if v and v.count(0) != len(v)}, xbzrle


def check_round_trip(st, stream):
    """The saved image loads, and gives a destination the RAM the stream gave it."""
    with Image.open(st["path"]) as img:
        img.verify_all()
        _feed(st["outfd"], b"")
        load(img, st["outfd"], cache="writeback", quiet=True)
    out = os.pread(st["outfd"], os.fstat(st["outfd"]).st_size, 0)
    want, xbzrle = final_ram(stream)
    got, _ = final_ram(out, zeros_override=False)
    for key in xbzrle:
        want.pop(key, None)
        got.pop(key, None)
    if want != got:
        diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise H.ContractViolation(f"loaded RAM differs from the saved stream's at {diff[:3]}")


def check_files(st, ok, had_old, stream):
    names = [st["name"]] if ok or had_old else []
    H.check_no_leftovers(st["dir"], names, "in the image directory")
    if ok:
        check_round_trip(st, stream)
    elif had_old:
        with open(st["path"], "rb") as f:
            if f.read() != OLD:
                raise H.ContractViolation("a failed save changed the earlier file at the image path")
    elif os.path.exists(st["path"]):
        raise H.ContractViolation("a failed save left a file at the image path")


def run_one(data):
    st = _setup()
    had_old = zlib.crc32(data[-16:]) & 1 == 1
    if had_old:
        with open(st["path"], "wb") as f:
            f.write(OLD)
    _drain(st["rp_r"])   # what an input that ended in a finding left there
    pipe = _Trickle(data) if zlib.crc32(data) & 3 == 0 else None
    if pipe is None:
        _feed(st["memfd"], data)
    ok = False
    try:
        save(st["path"], in_fd=pipe.r if pipe else st["memfd"], out_fd=st["rp_w"], cache="writeback",
             cluster_size=CLUSTER_SIZE, quiet=True)
        ok = True
    except QsnapError as e:
        H.check_message(e)
    finally:
        if pipe:
            pipe.close()
    rp = _drain(st["rp_r"])
    try:
        check_return_path(rp, ok)
        check_files(st, ok, had_old, data)
    except QsnapError as e:
        raise H.ContractViolation(f"the saved image does not load: {type(e).__name__}: {e}") from None
    finally:
        for n in os.listdir(st["dir"]):
            os.unlink(os.path.join(st["dir"], n))


def TestOneInput(data):
    try:
        run_one(data)
    except Exception as e:  # noqa: BLE001  every non-QsnapError is a finding
        H.finding(e, data)
        for n in os.listdir(_state["dir"]):
            os.unlink(os.path.join(_state["dir"], n))


_mutator = None


def CustomMutator(data, max_size, seed):
    global _mutator
    if _mutator is None:
        _mutator = stream_records.Mutator([stream_records.split(b) for _, b in seeds.engine_streams()],
                                          atheris.Mutate)
    if random.Random(seed).random() < 0.25:
        return atheris.Mutate(data, max_size)
    return _mutator.mutate(data, max_size, seed)


def seed_dir():
    return H.write_seed_dir("save", seeds.engine_streams())


def main(argv=None):
    H.run(sys.argv if argv is None else argv, "save", TestOneInput, seed_dir, CustomMutator)


if __name__ == "__main__":
    main()
