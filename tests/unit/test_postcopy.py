"""load_postcopy() against a fake destination driven through a socket pair."""
import os
import socket
import struct
import threading
import time

import pytest

from qsnap.errors import ChecksumError, IOFailure, ProtocolError
from qsnap.image.reader import Image
from qsnap.postcopy import ReturnPath, load_postcopy
from qsnap.save import save
from qsnap.stream import constants as C
from qsnap.stream import events as ev
from qsnap.stream.reader import StreamReader
from qsnap.stream.synth import synth_stream

from bigcmp import assert_same

MiB = 1 << 20
PS = 4096
BLOCKS = (("pc.ram", 8 * MiB), ("pc.bios", 256 * 1024), ("/rom@etc/acpi/rsdp", 4096))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("pc")
    sp = d / "bg.stream"
    with open(sp, "wb") as f:
        synth = synth_stream(f, blocks=BLOCKS, mode="background", seed=5, zero_share=0.4)
    ip = d / "bg.qsnap"
    fd = os.open(sp, os.O_RDONLY)
    try:
        save(str(ip), in_fd=fd, out_fd=os.open(os.devnull, os.O_WRONLY), quiet=True)
    finally:
        os.close(fd)
    return ip, synth


def rp_msg(typ, payload=b""):
    return struct.pack(">HH", typ, len(payload)) + payload


def req_id(idstr, start, length=PS):
    raw = idstr.encode()
    return rp_msg(C.MIG_RP_MSG_REQ_PAGES_ID, struct.pack(">QIB", start, length, len(raw)) + raw)


def req(start, length=PS):
    return rp_msg(C.MIG_RP_MSG_REQ_PAGES, struct.pack(">QI", start, length))


class FakeDest:
    """Runs load_postcopy in a thread; this side reads the stream and writes the return path."""

    def __init__(self, image_path, percent, on_packaged=None, shut=True, bufsize=64 << 10, **kw):
        self.stream_a, self.stream_b = socket.socketpair()
        self.rp_a, self.rp_b = socket.socketpair()
        for s in (self.stream_a, self.stream_b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        self.result = None
        self.exc = None          # what load_postcopy raised
        self.read_exc = None     # what reading its stream raised (expected only when it failed)
        self.pages = []          # (phase, idstr, offset, is_zero, payload)
        self.commands = []
        self.device_state = None
        self.phase = "precopy"
        self.on_packaged = on_packaged
        self.shut = shut
        kw.setdefault("group_pages", 16)

        def run():
            try:
                self.result = load_postcopy(image_path, percent=percent, cache="writeback",
                                            quiet=True, in_fd=self.rp_b.fileno(),
                                            out_fd=self.stream_a.fileno(), **kw)
            except BaseException as e:  # noqa: BLE001
                self.exc = e
            finally:
                try:
                    self.stream_a.shutdown(socket.SHUT_WR)
                except OSError:
                    pass   # load_postcopy already put /dev/null over the fd

        self.thread = threading.Thread(target=run, daemon=True)

    def send(self, data):
        self.rp_a.sendall(data)

    def drive(self):
        self.thread.start()
        f = self.stream_b.makefile("rb", buffering=0)
        try:
            for e in StreamReader(f):
                if isinstance(e, ev.Command):
                    self.commands.append(e)
                    if e.cmd == C.MIG_CMD_PING:
                        self.send(rp_msg(C.MIG_RP_MSG_PONG, e.payload))
                    if e.cmd == C.MIG_CMD_PACKAGED:
                        self.phase = "postcopy"
                        self.send(rp_msg(C.MIG_RP_MSG_PONG, struct.pack(">I", 3)))
                        if self.on_packaged:
                            self.on_packaged(self)
                elif isinstance(e, ev.PageBatch):
                    for idstr, off, flags, payload in e.iter_pages():
                        self.pages.append((self.phase, idstr, off, payload))
                elif isinstance(e, ev.DeviceState):
                    self.device_state = e.data
            if self.shut:
                self.send(rp_msg(C.MIG_RP_MSG_SHUT, b"\0\0\0\0"))
        except AssertionError:
            raise
        except Exception as e:  # a failing load_postcopy cuts its stream short
            self.read_exc = e
        finally:
            self.rp_a.close()
            self.thread.join(30)
            f.close()
        assert not self.thread.is_alive(), "load_postcopy still running 30 s after its stream"
        if self.exc is None and self.read_exc is not None:
            raise self.read_exc
        return self


def check_pages(dest, synth):
    seen = set()
    for phase, idstr, off, payload in dest.pages:
        assert (idstr, off) not in seen, f"{idstr}:0x{off:x} sent twice"
        seen.add((idstr, off))
        want = synth.final_page(idstr, off)
        got = None if payload is None else payload
        assert_same(got, want, f"{idstr}:0x{off:x}")
    assert len(seen) == sum(n // PS for _, n in BLOCKS)


@pytest.mark.parametrize("percent", [0, 10, 50, 100])
def test_every_page_once_and_protocol(image, percent):
    ip, synth = image
    d = FakeDest(ip, percent).drive()
    assert d.exc is None, d.exc
    check_pages(d, synth)
    names = [c.name for c in d.commands]
    assert names[:3] == ["OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE"]
    assert names[-2:] == ["PACKAGED", "PING"]
    advise = d.commands[2].payload
    assert struct.unpack(">QQ", advise) == (PS, PS)
    pre = [p for p in d.pages if p[0] == "precopy"]
    nz = sum(1 for p in pre if p[3] is not None)
    total_nz = sum(b.nonzero_pages for b in Image.open(ip).blocks)
    assert nz >= total_nz * percent / 100
    if percent < 100:
        assert nz < total_nz * percent / 100 + 256 + 1
    discards = [c for c in d.commands if c.cmd == C.MIG_CMD_POSTCOPY_RAM_DISCARD]
    early = {(n, o) for n, ln in BLOCKS for o in range(0, min(ln, MiB), PS)}
    if percent == 0:
        # only legacy low memory / ROM blocks go before LISTEN
        assert {(p[1], p[2]) for p in pre} == early
    if True:
        # the discards cover exactly the pages not sent in precopy
        pre_set = {(p[1], p[2]) for p in pre}
        covered = set()
        for c in discards:
            n = c.payload[1]
            idstr = c.payload[2:2 + n].decode()
            body = c.payload[3 + n:]
            for i in range(0, len(body), 16):
                s, ln = struct.unpack_from(">QQ", body, i)
                covered |= {(idstr, o) for o in range(s, s + ln, PS)}
        assert covered.isdisjoint(pre_set)
        assert len(covered) + len(pre_set) == sum(n // PS for _, n in BLOCKS)
    blob = d.commands[-2].blob
    img = Image.open(ip)
    state = img.device_state
    assert blob.startswith(struct.pack(">BHH", C.QEMU_VM_COMMAND, C.MIG_CMD_POSTCOPY_LISTEN, 0))
    assert blob.endswith(struct.pack(">BHHI", C.QEMU_VM_COMMAND, C.MIG_CMD_PING, 4, 3)
                         + struct.pack(">BHH", C.QEMU_VM_COMMAND, C.MIG_CMD_POSTCOPY_RUN, 0))
    inner = blob[5:-14]
    assert state.startswith(inner) and state[len(inner)] == C.QEMU_VM_EOF
    assert d.device_state == b"\x00"   # EOF, no VMDESCRIPTION
    assert d.result["pages_precopy"] == len(pre)
    assert sorted(d.result["pongs"]) == [1, 2, 3, 4]


def _last_data_pages(ip, n=3):
    """The last stored pages of pc.ram in background (host) order."""
    img = Image.open(ip)
    b = img.blocks[0]
    pairs = img.data_clusters()
    cs = img.cluster_size
    out = []
    for h, v in pairs[::-1]:
        if b.offset <= int(v) < b.offset + b.length:
            for p in range((int(v) - b.offset) // PS + cs // PS - 1, (int(v) - b.offset) // PS - 1, -1):
                if b.stored(p):
                    out.append(p * PS)
                    if len(out) == n:
                        return out
    return out


@pytest.mark.parametrize("percent", [0, 50])
def test_requested_page_comes_first(image, percent):
    ip, synth = image
    wanted = _last_data_pages(ip)
    marks = {}

    def on_packaged(d):
        marks["at"] = sum(1 for p in d.pages if p[3] is not None)
        d.send(req_id("pc.ram", wanted[0]) + req(wanted[1]) + req(wanted[0])
               + req_id("pc.bios", 0) + req_id("pc.ram", wanted[2]))
        # A destination faults and waits: stop reading for a moment so the
        # bound below measures qsnap's queueing, not this thread's scheduling.
        time.sleep(0.2)

    d = FakeDest(ip, percent, on_packaged=on_packaged).drive()
    assert d.exc is None, d.exc
    check_pages(d, synth)
    data = [(p[1], p[2]) for p in d.pages if p[3] is not None]
    for w in wanted:
        idx = data.index(("pc.ram", w))
        # socket buffers (2 x 2 x 64 KiB) + one group of 16 pages
        assert idx - marks["at"] < 100, (w, idx, marks["at"], len(data))
    r = d.result
    assert r["requests"] == 5
    assert r["requests_already_sent"] >= 1
    assert r["pages_requested"] >= 3
    assert r["service_ms"]["p50"] is not None


@pytest.mark.parametrize("msg,err", [
    (rp_msg(0, b""), "type 0"),
    (rp_msg(9, b""), "type 9"),
    (rp_msg(C.MIG_RP_MSG_PONG, b"\0\0"), "bad length 2"),
    (rp_msg(C.MIG_RP_MSG_SHUT, b"\0\0\0\1"), "SHUT 1"),
    (rp_msg(C.MIG_RP_MSG_PONG, b"\0\0\0\x09"), "PONG value 9"),
    (rp_msg(C.MIG_RP_MSG_RECV_BITMAP, b"\x01a"), "RECV_BITMAP"),
    (struct.pack(">HH", C.MIG_RP_MSG_REQ_PAGES_ID, 600), "exceeds 512"),
    (req(0), "without a previous REQ_PAGES_ID"),
    (req_id("nope", 0), "unknown RAM block 'nope'"),
    (req_id("pc.ram", 0x800), "misaligned"),
    (req_id("pc.ram", 8 * MiB), "outside block"),
    (req_id("pc.ram", 0, 0), "misaligned"),
    (rp_msg(C.MIG_RP_MSG_REQ_PAGES_ID, struct.pack(">QIB", 0, PS, 9) + b"pc.ram"), "bad length"),
    (rp_msg(C.MIG_RP_MSG_REQ_PAGES_ID, b""), "REQ_PAGES_ID with bad length 0"),
    (rp_msg(C.MIG_RP_MSG_REQ_PAGES_ID, b"\0" * 11), "REQ_PAGES_ID with bad length 11"),
])
def test_return_path_errors(image, msg, err):
    ip, _ = image

    def on_packaged(d):
        d.send(msg)

    d = FakeDest(ip, 0, on_packaged=on_packaged, shut=False).drive()
    assert isinstance(d.exc, ProtocolError), d.exc
    assert err in str(d.exc)


def test_unexpected_return_path_error_reaches_the_writer(image, monkeypatch):
    """A bug in the return-path thread ends the load with that error instead of a hang."""
    ip, _ = image

    def broken(self, *args):
        raise KeyError("injected")

    monkeypatch.setattr(ReturnPath, "_handle", broken)
    d = FakeDest(ip, 0, shut=False).drive()
    assert isinstance(d.exc, KeyError), d.exc
    assert not d.thread.is_alive()


def test_qemu_goes_away(image):
    ip, _ = image

    def on_packaged(d):
        d.rp_a.close()
        d.stream_b.shutdown(socket.SHUT_RDWR)

    d = FakeDest(ip, 0, on_packaged=on_packaged, shut=False).drive()
    assert isinstance(d.exc, (IOFailure, ProtocolError)), d.exc


def test_stats_file(image, tmp_path):
    ip, _ = image
    st = tmp_path / "s.json"
    d = FakeDest(ip, 10, stats_path=str(st)).drive()
    assert d.exc is None
    import json
    s = json.loads(st.read_text())
    for k in ("handover_seconds", "pages_requested", "service_ms", "pages_precopy",
              "pages_postcopy", "seconds"):
        assert k in s
    assert set(s["service_ms"]) == {"p50", "p90", "p99", "max"}


def test_corrupt_page_is_never_sent(image, tmp_path):
    ip, _ = image
    bad = tmp_path / "bad.qsnap"
    bad.write_bytes(ip.read_bytes())
    img = Image.open(bad)
    b = img.blocks[0]
    p = next(i for i in range(b.length // PS) if b.stored(i))
    h = img.host_offset(b.offset + p * PS)
    img.close()
    with open(bad, "r+b") as f:
        f.seek(h + 100)
        c = f.read(1)
        f.seek(h + 100)
        f.write(bytes([c[0] ^ 0xFF]))
    d = FakeDest(bad, 0).drive()
    assert isinstance(d.exc, ChecksumError), d.exc
    assert f"page 0x{p * PS:x}" in str(d.exc)
    assert ("pc.ram", p * PS) not in {(x[1], x[2]) for x in d.pages}


def test_cluster_pass_stops_for_requests_and_resumes(image, tmp_path):
    """ClusterPass stops at a group boundary while the flag is set, resumes where it
    stopped, and never sends a host page twice (pages sent elsewhere are skipped)."""
    from qsnap import _core
    from qsnap.load import _cluster_plan

    ip, synth = image
    img = Image.open(ip)
    blocks = list(img.blocks)
    out = tmp_path / "out.bin"
    ofd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    ifd = os.open(ip, os.O_RDONLY)
    try:
        em = _core.PageEmitter(ofd, PS)
        em.set_blocks([(b.idstr, b.offset, b.length, b.bitmap, b.checksums) for b in blocks])
        pager = _core.HostPager(em, [1] * len(blocks))
        host, virt, bidx = _cluster_plan(img, blocks)
        # a page "served on request" before the pass reaches it
        pager.emit(0, 5, 6, None if not blocks[0].stored(5) else
                   os.pread(ifd, PS, img.host_offset(blocks[0].offset + 5 * PS)), 5)
        flag = _core.RequestFlag()
        with _core.ClusterPass(pager, ifd, host, virt, bidx, img.cluster_size, 8, flag) as cp:
            flag.set()
            before = em.pages + em.zero_pages
            assert cp.step() == _core.CLUSTER_PASS_REQUEST
            assert em.pages + em.zero_pages == before       # nothing while flagged
            flag.clear()
            assert cp.step(em.bytes_out + 1) == _core.CLUSTER_PASS_LIMIT
            assert 1 <= em.pages + em.zero_pages - before <= 8   # one group, then the limit
            steps = 0
            while True:
                r = cp.step(em.bytes_out + 10 * PS)
                steps += 1
                if r == _core.CLUSTER_PASS_END:
                    break
                assert r == _core.CLUSTER_PASS_LIMIT
            assert steps > 2
        em.flush()
    finally:
        os.close(ofd)
        os.close(ifd)
    # every data cluster's host pages went out exactly once
    cs = img.cluster_size
    for k in range(len(host)):
        b = blocks[int(bidx[k])]
        p0 = (int(virt[k]) - b.offset) // PS
        n = min(cs // PS, b.length // PS - p0)
        assert pager.sent[int(bidx[k])][p0:p0 + n].all()
    data = out.read_bytes()
    n_rec = em.pages + em.zero_pages
    assert n_rec == pager.host_pages_sent
    # records carry the right bytes: parse PAGE/ZERO records of pc.ram back
    seen = {}
    pos = 0
    while pos < len(data):
        (hdr,) = struct.unpack_from(">Q", data, pos)
        pos += 8
        flags = hdr & 0xFFF
        if not flags & C.RAM_SAVE_FLAG_CONTINUE:
            n = data[pos]
            name = data[pos + 1:pos + 1 + n].decode()
            pos += 1 + n
        off = hdr & ~0xFFF
        if flags & C.RAM_SAVE_FLAG_PAGE:
            seen[(name, off)] = data[pos:pos + PS]
            pos += PS
        else:
            seen[(name, off)] = None
            pos += 1
    assert len(seen) == n_rec
    for (name, off), payload in seen.items():
        assert_same(payload, synth.final_page(name, off), (name, off))


def test_sent_bits_scans_match_a_byte_per_page():
    """SentBits' C scans (by bit, byte and 64-page word) against a plain byte array."""
    import numpy as np
    from qsnap import _core

    rng = np.random.default_rng(3)
    n = 1000
    null = os.open(os.devnull, os.O_WRONLY)
    em = _core.PageEmitter(null, PS)
    em.set_blocks([("pc.ram", 0, n * PS, None, None)])
    sent = _core.HostPager(em, [1]).sent[0]
    os.close(null)   # nothing is emitted
    ref = np.zeros(n, bool)
    for a, b in [(3, 9), (64, 200), (201, 202), (500, 1000), (0, 1)]:
        sent.set(a, b)
        ref[a:b] = True
        for _ in range(50):
            s, e = sorted(rng.integers(0, n + 1, 2).tolist())
            for value in (False, True):
                hits = np.flatnonzero(ref[s:e] == value)
                assert sent.find(s, e, value) == (s + int(hits[0]) if len(hits) else e)
            assert sent.all(s, e) == bool(ref[s:e].all())
            assert (sent[s:e] == ref[s:e]).all()
        runs = list(sent.unsent_runs())
        d = np.diff(np.concatenate(([1], ref.astype(np.int8), [1])))
        assert runs == list(zip(np.flatnonzero(d == -1).tolist(), np.flatnonzero(d == 1).tolist()))
    assert sent[999] and not sent[250] and len(sent) == n
