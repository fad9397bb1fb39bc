"""Recording a working set during a postcopy restore and sending it first on the next one."""
import io
import shutil
import threading
import time

import numpy as np
import pytest

from qsnap.errors import UsageError
from qsnap.image import workingset as ws
from qsnap.image.reader import Image
from qsnap.postcopy import load_postcopy, working_set_runs

import test_postcopy
from test_postcopy import PS, FakeDest, _last_data_pages, check_pages, req, req_id

image = test_postcopy.image   # the module's saved synthetic image (fixture)


@pytest.fixture
def img_copy(image, tmp_path):
    ip, synth = image
    p = tmp_path / "vm.qsnap"
    shutil.copy(ip, p)
    return p, synth


def _record(p, wanted):
    def on_packaged(d):
        d.send(req_id("pc.ram", wanted[0]) + b"".join(req(w) for w in wanted[1:]))
        time.sleep(0.2)
    return FakeDest(p, 0, on_packaged=on_packaged, record_working_set=True).drive()


def _postcopy_data(d):
    return [(p[1], p[2]) for p in d.pages if p[0] == "postcopy" and p[3] is not None]


def test_record_then_replay_first(img_copy):
    p, synth = img_copy
    wanted = _last_data_pages(p, 6)[::-1]
    d = _record(p, wanted)
    assert d.exc is None, d.exc
    check_pages(d, synth)
    assert d.result["working_set_recorded"] == len(wanted)
    with Image.open(p) as img:
        got = img.working_set
        assert [(int(e["block"]), int(e["page"]) * PS) for e in got.entries] == [(0, w) for w in wanted]
        assert got.restores == 1
    log = io.StringIO()
    d2 = FakeDest(p, 0, log=log).drive()
    assert d2.exc is None, d2.exc
    check_pages(d2, synth)
    assert _postcopy_data(d2)[:len(wanted)] == [("pc.ram", w) for w in wanted]
    assert d2.result["pages_working_set"] == len(wanted)
    assert "warning" not in log.getvalue()
    # recording again merges (union): nothing new, one more restore
    d3 = _record(p, wanted[:2])
    assert d3.exc is None and d3.result["working_set_recorded"] == len(wanted)
    with Image.open(p) as img:
        assert img.working_set.restores == 2


def test_prefetch_none_and_before(img_copy):
    p, synth = img_copy
    wanted = _last_data_pages(p, 6)[::-1]
    ws.store(p, ws.entries([(0, w // PS, 0) for w in wanted]))
    d = FakeDest(p, 0, prefetch="none").drive()
    assert d.exc is None and d.result["pages_working_set"] == 0
    assert _postcopy_data(d)[:len(wanted)] != [("pc.ram", w) for w in wanted]
    d = FakeDest(p, 0, prefetch="before").drive()
    assert d.exc is None, d.exc
    check_pages(d, synth)
    pre = {(q[1], q[2]) for q in d.pages if q[0] == "precopy"}
    assert {("pc.ram", w) for w in wanted} <= pre
    with pytest.raises(UsageError, match="prefetch mode"):
        load_postcopy(p, prefetch="sometimes")


def test_damaged_working_set_is_ignored_with_one_warning(img_copy):
    p, synth = img_copy
    wanted = _last_data_pages(p, 6)[::-1]
    ws.store(p, ws.entries([(0, w // PS, 0) for w in wanted]))
    with Image.open(p) as img:
        h = img.host_offset(img.meta_offset + img.meta["working_set"]["offset"])
    with open(p, "r+b") as f:
        f.seek(h + 4)
        f.write(b"\x00\x00\x10\x00")       # page 0x100000 > pc.ram: also out of range
    log = io.StringIO()
    d = FakeDest(p, 0, log=log).drive()
    assert d.exc is None, d.exc
    check_pages(d, synth)
    assert d.result["pages_working_set"] == 0
    lines = [ln for ln in log.getvalue().splitlines() if "warning" in ln]
    assert len(lines) == 1 and "ignoring the working set" in lines[0] and "checksum" in lines[0]


def test_runs_coalesce_adjacent_pages_in_order():
    e = ws.entries([(0, 5, 0), (0, 6, 0), (0, 7, 0), (1, 0, 0), (0, 2, 0), (0, 3, 0), (1, 512, 0)])
    assert working_set_runs(e, [1, 512], [PS, 2 << 20]) == [(0, 5, 8), (1, 0, 1), (0, 2, 4), (1, 1, 2)]
    long = ws.entries([(0, i, 0) for i in range(600)])
    assert working_set_runs(long, [1], [PS]) == [(0, 0, 256), (0, 256, 512), (0, 512, 600)]
    assert working_set_runs(np.zeros(0, ws.ENTRY), [1], [PS]) == []


def _precopy_pages(p, tmp_path, **kw):
    from qsnap.load import load
    from qsnap.stream import events as ev
    from qsnap.stream.reader import StreamReader

    out = tmp_path / "out.stream"
    with open(out, "wb") as f:
        load(str(p), f.fileno(), cache="writeback", quiet=True, log=kw.pop("log", io.StringIO()), **kw)
    pages = []
    with open(out, "rb") as f:
        for e in StreamReader(f):
            if isinstance(e, ev.PageBatch):
                pages += [(idstr, off, payload) for idstr, off, flags, payload in e.iter_pages()]
    return pages


def test_precopy_load_sends_working_set_clusters_first_same_ram(img_copy, tmp_path):
    p, synth = img_copy
    wanted = _last_data_pages(p, 6)[::-1]
    plain = _precopy_pages(p, tmp_path)
    ws.store(p, ws.entries([(0, w // PS, 0) for w in wanted]))
    first = _precopy_pages(p, tmp_path)
    assert len(first) == len(plain)
    assert {(i, o): d for i, o, d in first} == {(i, o): d for i, o, d in plain}
    cs = Image.open(p).cluster_size
    head = {(i, o // cs) for i, o, d in first[:cs // PS] if d is not None}
    assert {("pc.ram", w // cs) for w in wanted} <= head
    assert [(i, o) for i, o, _ in plain[:cs // PS]] != [(i, o) for i, o, _ in first[:cs // PS]]
    assert [(i, o) for i, o, _ in _precopy_pages(p, tmp_path, prefetch=False)] == \
        [(i, o) for i, o, _ in plain]


def test_clusters_first_order():
    class B:
        offset = 0
    host = np.array([1, 2, 3, 4], np.uint64) << np.uint64(20)
    virt = np.array([0, 1, 2, 3], np.uint64) << np.uint64(20)
    e = ws.entries([(0, 3 * 256 + 5, 0), (0, 1 * 256, 0), (0, 3 * 256, 0), (0, 9 * 256, 0)])
    order = ws.clusters_first(e, [B()], host, virt, 1 << 20, PS)
    assert list(order) == [3, 1, 0, 2]


def test_record_window_sends_only_requested_pages(img_copy):
    p, synth = img_copy
    wanted = _last_data_pages(p, 4)[::-1]

    def on_packaged(d):
        # the guest asks a moment after the switch: without the window the
        # background pass would have filled the stream by then
        msg = req_id("pc.ram", wanted[0]) + b"".join(req(w) for w in wanted[1:])
        threading.Timer(0.2, d.send, (msg,)).start()
    d = FakeDest(p, 0, on_packaged=on_packaged, record_working_set=True, record_window=1.0).drive()
    assert d.exc is None, d.exc
    check_pages(d, synth)
    post = [(q[1], q[2]) for q in d.pages if q[0] == "postcopy"]
    assert post[:len(wanted)] == [("pc.ram", w) for w in wanted]
    assert d.result["working_set_recorded"] == len(wanted)
    with pytest.raises(UsageError, match="record window"):
        load_postcopy(p, record_working_set=True, record_window=-1)
