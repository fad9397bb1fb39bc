"""C status codes -> qsnap.errors (qsnap/_errors.pxi): each error path forced, type and message checked."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qsnap import _core
from qsnap.errors import IOFailure

PS = 4096
CS = 1 << 16


def _closed_fd(tmp_path, mode=os.O_RDWR):
    """A descriptor number that is not open (EBADF), with nothing else given that number."""
    fd = os.open(tmp_path / "f", mode | os.O_CREAT, 0o644)
    keep = os.dup(fd)          # holds no number below fd after fd is closed
    os.close(fd)
    return fd, keep


# --- sink ------------------------------------------------------------------------

@pytest.mark.parametrize("kw,bad", [
    (dict(cluster_size=3 * CS), 3 * CS),
    (dict(cluster_size=CS, page_size=100), 100),
    (dict(cluster_size=CS, n_slots=0), 0),
    (dict(cluster_size=CS, append_offset=CS + 1), CS + 1),
])
def test_sink_bad_parameter_is_named(kw, bad):
    with pytest.raises(ValueError, match=f"bad page sink parameter 0x{bad:x}: fd 0, "):
        _core.ClusterSink(0, 4 * CS, **kw)


def test_sink_negative_fd_is_named():
    with pytest.raises(ValueError, match="bad page sink parameter 0xffffffffffffffff: fd -1,"):
        _core.ClusterSink(-1, 4 * CS, cluster_size=CS)


def test_sink_misaligned_block_names_block_and_offset(tmp_path):
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(ValueError, match=r"block 1 region at 0x1000 \(length 0x1000\) not "
                                             r"cluster aligned or beyond the virtual size 0x40000"):
            _core.ClusterSink(fd, 4 * CS, cluster_size=CS, region_offsets=[0, PS],
                              block_lengths=[CS, PS])
    finally:
        os.close(fd)


def test_sink_closed_fd_write_is_ebadf(tmp_path):
    fd, keep = _closed_fd(tmp_path)
    try:
        sink = _core.ClusterSink(fd, 2 * CS, cluster_size=CS, n_slots=1, path="gone")
        sink.put_page(0, b"\x01" * PS)
        with pytest.raises(IOFailure, match="^bad file descriptor writing gone at offset 0x10000$"):
            sink.flush()
        sink.close()
    finally:
        os.close(keep)


def test_sink_records_of_another_dtype_are_refused(tmp_path):
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o644)
    sink = _core.ClusterSink(fd, 2 * CS, cluster_size=CS, region_offsets=[0], block_lengths=[CS])
    try:
        # same size and field names, one field of another type: not a page record
        fields = [(n, _core.SINK_REC_DTYPE.fields[n][0]) for n in _core.SINK_REC_DTYPE.names]
        fields[0] = ("offset", ">u8")
        other = np.zeros(1, np.dtype(fields))
        assert other.dtype.itemsize == _core.SINK_REC_DTYPE.itemsize
        with pytest.raises(TypeError, match="page-record dtype"):
            sink.put_batch(other, b"")
        with pytest.raises(TypeError, match="page-record dtype"):
            sink.put_batch(np.zeros(4, np.uint64), b"")
        recs = np.zeros(1, _core.SINK_REC_DTYPE)
        with pytest.raises(TypeError, match="region_offsets must have dtype uint64, not int64"):
            sink.put_batch(recs, b"", np.zeros(1, np.int64))
    finally:
        sink.close()
        os.close(fd)


def test_sink_close_then_use_and_close_again(tmp_path):
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o644)
    sink = _core.ClusterSink(fd, 2 * CS, cluster_size=CS)
    sink.close()
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.put_page(0, None)
    os.close(fd)


# --- read-ahead ring -----------------------------------------------------------------

def test_aio_closed_fd_is_ebadf(tmp_path):
    fd, keep = _closed_fd(tmp_path, os.O_RDONLY)
    try:
        with _core.AioRing(fd, [(0, PS)], buf_size=PS) as ring:
            with pytest.raises(IOFailure, match="^cannot read the image: bad file descriptor "
                                                "at image offset 0x0$"):
                ring.next()
    finally:
        os.close(keep)


def test_aio_bad_parameter_and_dtype(tmp_path):
    with pytest.raises(ValueError, match="bad read-ahead parameter 100 "):
        _core.AioRing(0, [(0, PS)], buf_size=100)
    with pytest.raises(TypeError, match="extents must have dtype uint64, not int64"):
        _core.AioRing(0, np.array([[0, PS]], np.int64))


# --- emitter ---------------------------------------------------------------------

def _block(n_pages=4):
    return ("pc.ram", 0, n_pages * PS, np.zeros(-(-n_pages // 8), np.uint8),
            np.zeros(n_pages, np.uint32))


def test_emit_read_only_fd_is_ebadf(tmp_path):
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        em = _core.PageEmitter(fd, PS)
        em.bytes(b"abc")
        with pytest.raises(IOFailure, match="^cannot write the stream: bad file descriptor "
                                            "after 0 bytes$"):
            em.flush()
    finally:
        os.close(fd)


def test_emit_full_device_is_enospc():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        em = _core.PageEmitter(fd, PS)
        em.bytes(b"x" * 100)
        with pytest.raises(IOFailure, match="no space left on device after 0 bytes"):
            em.flush()
    finally:
        os.close(fd)


def test_emit_bad_page_size_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"value 0x3e8\)"):
        _core.PageEmitter(1, 1000)


def test_emit_block_arrays_of_another_dtype_are_refused():
    em = _core.PageEmitter(1, PS)
    name, region, length, bm, crcs = _block()
    with pytest.raises(TypeError, match="block checksums must have dtype uint32, not int64"):
        em.set_blocks([(name, region, length, bm, crcs.astype(np.int64))])
    with pytest.raises(TypeError, match="block bitmap must have dtype uint8, not bool"):
        em.set_blocks([(name, region, length, bm.astype(bool), crcs)])
    em.set_blocks([(name, region, length, list(bm), list(crcs))])    # sequences are converted
    assert em.names == ["pc.ram"]


def test_emit_checksum_mismatch_names_block_and_page(tmp_path):
    from qsnap.errors import ChecksumError

    with open(tmp_path / "out", "wb") as f:
        em = _core.PageEmitter(f.fileno(), PS)
        bm = np.array([0b10], np.uint8)
        crcs = np.array([0, 0x1234, 0, 0], np.uint32)
        em.set_blocks([("pc.ram", 0, 4 * PS, bm, crcs)])
        page = b"\x07" * PS
        with pytest.raises(ChecksumError, match=r"stored 0x00001234, computed 0x%08x\) in block "
                                                r"'pc.ram' page 0x1000" % _core.crc32c(page)):
            em.cluster(0, 0, bytes(PS) + page + bytes(2 * PS))


# --- RAM parser -------------------------------------------------------------------

def test_ramparser_bad_blocks_keep_the_old_list():
    p = _core.RamParser(16)
    p.set_blocks([(b"pc.ram", 1 << 20)])
    with pytest.raises(ValueError, match="length 18446744073709551616 out of range"):
        p.set_blocks([(b"ok", 4096), (b"pc.ram", 1 << 64)])
    with pytest.raises(ValueError, match="RAM block 0 idstr of length 0 not in 1..255"):
        p.set_blocks([(b"", 4096)])
    # the list installed before the failures is still in use
    rec = (0x1000 | 0x08).to_bytes(8, "big") + bytes([6]) + b"pc.ram" + bytes(PS)
    status, recs, used = p.parse(rec)
    assert used == len(rec) and recs[0]["offset"] == 0x1000


# --- out of memory ---------------------------------------------------------------

def _run_limited(code):
    """Run ``code`` in a child whose address space is capped at 1 GiB beyond what it uses."""
    prog = textwrap.dedent("""
        import resource, sys
        from qsnap import _core
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.RLIM_INFINITY))
        try:
    """) + textwrap.indent(textwrap.dedent(code), "    ") + textwrap.dedent("""
        except MemoryError as e:
            print("MemoryError:", e)
    """)
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60,
                       cwd=os.getcwd())
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_enomem_sink_names_what_and_size():
    # the page state no longer grows with the space (csrc/sink.c, chunks): the
    # cluster buffers of 4096 slots of 2 MiB are what cannot be had
    out = _run_limited("_core.ClusterSink(0, 1 << 40, cluster_size=1 << 21, n_slots=4096, "
                       "path='big')\n")
    assert out.startswith("MemoryError: cannot allocate page sink tables for big (")
    assert int(out.rsplit("(", 1)[1].split()[0]) > 1 << 30


def test_enomem_aio_names_what_and_size():
    out = _run_limited("_core.AioRing(0, [(i << 31, 1 << 30) for i in range(4)], "
                       "buf_size=1 << 30, n_bufs=4)\n")
    assert out == f"MemoryError: cannot allocate read-ahead buffers ({1 << 30} bytes)"


def test_cli_reports_memory_error_with_its_message(monkeypatch, capsys):
    from qsnap import cli

    def boom(args):
        raise MemoryError("cannot allocate read-ahead buffers (123 bytes)")

    monkeypatch.setitem(cli._COMMANDS, "info", boom)
    assert cli.main(["info", "x"]) == 1
    err = capsys.readouterr().err
    assert err == "qsnap: error: out of memory: cannot allocate read-ahead buffers (123 bytes)\n"


def test_host_pager_refuses_blocks_set_after_it(tmp_path):
    with open(tmp_path / "out", "wb") as f:
        em = _core.PageEmitter(f.fileno(), PS)
        em.set_blocks([_block(4)])
        pager = _core.HostPager(em, [1])
        assert pager.zero_pass(0, 0, 1, np.zeros(4, np.uint8)) == 1
        em.set_blocks([_block(64)])     # the pager's sent table has 4 entries
        with pytest.raises(ValueError, match="blocks changed after the host pager was made"):
            pager.zero_pass(0, 0, 64, np.zeros(4, np.uint8))
        with pytest.raises(ValueError, match="blocks changed after the host pager was made"):
            pager.emit(0, 0, 64)
