"""The save engine: migration stream on stdin -> qsnap image.

Runs behind ``migrate "exec:qsnap save IMG"``.  Data flows one way: the
StreamReader parses stdin into events, RAM pages go in batches to the image's
ClusterSink (C, GIL released), everything needed to regenerate the stream is
kept for the metadata region, and the image appears at IMG only once it is
complete and durable.  stdout carries nothing but return-path replies (PONG,
SHUT), because QEMU reads the child's stdout as the return path.
"""
import gc
import json
import os
import stat
import sys
import time

from qsnap import atomic
from qsnap.errors import ImageError, Interrupted, IOFailure, QsnapError, StreamError, UsageError
from qsnap.image import layout
from qsnap.image.writer import ImageWriter
from qsnap.stream import constants as C
from qsnap.stream import encode, returnpath
from qsnap.stream import events as ev
from qsnap.stream.reader import StreamReader

# Commands a savable (precopy or background-snapshot) stream may carry.
_PREFIX_COMMANDS = {
    C.MIG_CMD_OPEN_RETURN_PATH,
    C.MIG_CMD_PING,
    C.MIG_CMD_POSTCOPY_ADVISE,
    C.MIG_CMD_ENABLE_COLO,
}


class ReturnPath:
    """The source's return path: our stdout, written only when the stream opened it."""

    def __init__(self, fd):
        self.fd = fd
        self.open = False

    def send(self, data):
        if not self.open:
            return
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except OSError as e:
            raise IOFailure(f"cannot write to the return path (stdout): {e.strerror}") from None

    def pong(self, value):
        self.send(returnpath.pong(value))

    def shut(self, error):
        self.send(returnpath.shut(1 if error else 0))


class _StreamFacts:
    """What the image must remember of the stream besides pages and device state."""

    def __init__(self):
        self.header = b""
        self.configuration = None
        self.pre_ram = bytearray()
        self.commands = []
        self.ram_section = None
        self.ram_end = False
        self.switchover_start = False
        self.postcopy_advise = None
        self.mem_size = None
        self.device_state = None
        self.vmdescription = None
        self.stream_bytes = 0

    def stream_info(self, reader):
        conf = self.configuration
        return {
            "footers": bool(reader.uses_footers),
            "ram_section": self.ram_section,
            "ram_end": self.ram_end,
            "switchover_start": self.switchover_start,
            "return_path": any(c == C.MIG_CMD_OPEN_RETURN_PATH for c, _ in self.commands),
            "postcopy_advise": self.postcopy_advise,
            "capabilities": [c for c in conf.capabilities
                             if c != C.MIGRATION_CAPABILITY_MAPPED_RAM] if conf else [],
            "mem_size_total": self.mem_size.total,
        }


def save(path, *, in_fd=0, out_fd=1, cache="auto", cluster_size=None, quiet=False,
         log=sys.stderr, vm_info=None, report=None, on_stream_end=None, parent=None,
         notify=None):
    """Save the migration stream read from ``in_fd`` as the image ``path``.

    Returns a summary dict.  Raises a QsnapError (and leaves nothing at ``path``
    and an earlier file there intact) on any failure.

    ``vm_info``: a JSON file holding the VM record, read when the image is
    finished and stored as its "vm" key.  ``report``: a file written atomically
    when the save ends, ``{"ok": true, "summary": ...}`` or ``{"ok": false,
    "error": "..."}``.  A failed save drains ``in_fd`` to its end before it
    raises, so that QEMU never blocks writing into a pipe nobody reads.
    ``on_stream_end()`` is called once the whole stream has been read;
    ``notify("reading")`` when the image is open and the stream is read next,
    ``notify("ram pages")`` when the first RAM iteration section (SECTION_PART) begins,
    ``notify("failed")`` when the save failed (before it drains its input).
    ``parent``: the path of an image this one is incremental to (stores only
    what differs from it; its chain stays needed).  ``cluster_size``: None for
    1 MiB, or the parent's.
    """
    try:
        summary = _save(path, in_fd, out_fd, cache, cluster_size, quiet, log, vm_info,
                        (on_stream_end, notify), parent)
    except BaseException as e:
        if report:
            write_report(report, {"ok": False, "error": error_line(e)})
        if notify:
            notify("failed")  # whoever waits for an event learns now, not at the drain's end
        if not isinstance(e, (Interrupted, KeyboardInterrupt)):  # a signal means stop now
            drain(in_fd)
        raise
    if report:
        write_report(report, {"ok": True, "summary": summary})
    return summary


def error_line(e):
    """The one-line message `qsnap: error:` prints for ``e``."""
    if isinstance(e, QsnapError):
        return str(e)
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror or e}{where}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def write_report(path, doc):
    """Write ``doc`` as JSON to ``path`` atomically (temp file + rename)."""
    try:
        atomic.write_json(path, doc, indent=2, default=_jsonable)
    except OSError as e:
        raise IOFailure(f"cannot write the report {path}: {e.strerror}") from None


def _jsonable(value):
    """numpy scalars in a summary become plain numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


DRAIN_CHUNK = 1 << 20


def drain(fd):
    """Read ``fd`` to its end, discarding it, unless it is a terminal.

    A failed save must not leave QEMU blocked in write() on the pipe: QEMU 7.2
    wedges (QMP stops answering, the migration stays active) when its exec
    child dies mid-stream.  The stream is bounded, so this ends."""
    try:
        if os.isatty(fd) or stat.S_ISDIR(os.fstat(fd).st_mode):
            return
        while os.read(fd, DRAIN_CHUNK):
            pass
    except OSError:
        pass  # the writer is gone: nothing left to drain


VM_INFO_WAIT = 5.0  # s: `qsnap snapshot` writes the record while QEMU sets up the stream


def read_vm_info(path):
    """The VM record in the JSON file ``path``, validated (layout.validate_vm_record).

    Waits up to VM_INFO_WAIT s for the file to appear: `qsnap snapshot` writes it
    (atomically) once the disks are frozen, while QEMU already streams."""
    deadline = time.monotonic() + VM_INFO_WAIT
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read the VM record --vm-info {path}: {e.strerror}") from None
    try:
        vm = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"bad VM record in --vm-info {path}: not JSON: {e}") from None
    try:
        layout.validate_vm_record(vm, path="vm")
    except ImageError as e:
        detail = str(e).removeprefix("bad image metadata: ")
        raise UsageError(f"bad VM record in --vm-info {path}: {detail}") from None
    return vm


def open_parent(parent, path):
    """The image ``parent`` (with its chain), opened for an incremental save to
    ``path``, which must not be a file of that chain."""
    from qsnap.image.reader import Image

    img = Image.open(parent)
    try:
        target = os.stat(path)
    except OSError:
        return img
    for member in img.chain:
        st = os.fstat(member.fd)
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            close_chain(img)
            raise UsageError(f"cannot save {path} onto {parent}: {path} is "
                             f"{'that image' if member is img else 'in its backing chain'}")
    return img


def close_chain(img):
    for member in img.chain:
        member.close()


def _save(path, in_fd, out_fd, cache, cluster_size, quiet, log, vm_info, hooks, parent):
    parent_img = open_parent(parent, path) if parent else None
    try:
        if cluster_size is None:
            cluster_size = parent_img.cluster_size if parent_img else 1 << 20
        return _save_stream(path, in_fd, out_fd, cache, cluster_size, quiet, log, vm_info,
                            hooks, parent_img)
    finally:
        if parent_img is not None:
            close_chain(parent_img)


def _save_stream(path, in_fd, out_fd, cache, cluster_size, quiet, log, vm_info, hooks,
                 parent_img):
    on_stream_end, notify = hooks
    t0 = time.monotonic()
    rp = ReturnPath(out_fd)
    facts = _StreamFacts()
    src = os.fdopen(in_fd, "rb", buffering=0, closefd=False)
    reader = StreamReader(src, stop_at_logical_end=True)
    # The hot loop allocates a few objects per batch and creates no cycles; the
    # cyclic collector would only walk them again and again.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with ImageWriter(path, cluster_size=cluster_size, cache=cache, parent=parent_img) as img:
            if notify:
                notify("reading")
            _consume(reader, img, facts, rp, notify)
            t_end = time.monotonic()  # the last byte of the stream is in
            if on_stream_end:
                on_stream_end()
            vm = read_vm_info(vm_info) if vm_info else None
            summary = img.finish(
                header_bytes=facts.header,
                pre_ram=bytes(facts.pre_ram),
                device_state=facts.device_state,
                stream_info=facts.stream_info(reader),
                commands=facts.commands,
                machine=facts.configuration.machine if facts.configuration else None,
                counts={"stream_bytes": reader.offset},
                vm=vm,
            )
            summary["finish_seconds"] = time.monotonic() - t_end  # tables, fsync, rename
            tps = img.target_page_size
            summary.setdefault("pages", sum(-(-b.length // tps) for b in facts.mem_size.blocks))
    except QsnapError:
        rp.shut(error=True)
        raise
    finally:
        if gc_was_enabled:
            gc.enable()
    # The image is durable and in place: only now may the source report success.
    rp.shut(error=False)
    elapsed = time.monotonic() - t0
    summary["seconds"] = elapsed
    if not quiet:
        mb = reader.offset / 1e6
        log.write(
            f"qsnap: saved {path}: {summary.get('nonzero_pages', 0)} of "
            f"{summary.get('pages', 0)} pages stored, {summary.get('file_bytes', 0) / 1e6:.1f} MB "
            f"from a {mb:.1f} MB stream in {elapsed:.2f} s ({mb / max(elapsed, 1e-9):.0f} MB/s, "
            f"{summary.get('disk_wait_s', 0):.2f} s waiting for the disk)\n"
        )
        log.flush()
    return summary


def _consume(reader, img, facts, rp, notify=None):
    sink = None
    ram_id = None
    for e in reader:
        if isinstance(e, ev.PageBatch):
            sink.put_batch(e.records, e.data)
        elif isinstance(e, ev.Eos):
            pass
        elif isinstance(e, ev.SectionFooter):
            pass
        elif isinstance(e, ev.SectionHeader):
            if e.type == C.QEMU_VM_SECTION_START:
                if e.idstr != "ram":
                    raise StreamError(f"unsupported iterable section '{e.idstr}' at stream offset 0x{e.offset:x}")
                if ram_id is not None:
                    raise StreamError(f"second RAM SECTION_START at stream offset 0x{e.offset:x}")
                ram_id = e.section_id
                facts.ram_section = {"section_id": e.section_id, "instance_id": e.instance_id,
                                     "version_id": e.version_id}
            elif e.type == C.QEMU_VM_SECTION_END:
                facts.ram_end = True
            if e.type == C.QEMU_VM_SECTION_PART and notify is not None:
                notify("ram pages")
                notify = None
        elif isinstance(e, ev.MemSize):
            if facts.mem_size is not None:
                raise StreamError(f"second RAM block list at stream offset 0x{e.offset:x}")
            facts.mem_size = e
            img.start([{"idstr": b.idstr, "length": b.length,
                        "page_size": b.page_size, "page_size_on_wire": b.page_size is not None,
                        "gpa": b.gpa} for b in e.blocks])
            sink = img.sink
        elif isinstance(e, ev.Command):
            _command(e, facts, rp, ram_started=ram_id is not None)
        elif isinstance(e, ev.FileHeader):
            facts.header = encode.file_header(e.version)
        elif isinstance(e, ev.Configuration):
            facts.configuration = e
            facts.header += _loadable_configuration(e)
        elif isinstance(e, ev.PreRamSection):
            facts.pre_ram += e.raw
        elif isinstance(e, ev.DeviceState):
            facts.device_state = e.data
            facts.vmdescription = e.vmdescription
        elif isinstance(e, ev.EndOfStream):
            break
    if facts.mem_size is None:
        raise StreamError("stream has no RAM block list (no RAM SECTION_START)")
    if facts.device_state is None:
        raise StreamError(f"stream ended without device state at stream offset 0x{reader.offset:x}")


def _loadable_configuration(conf):
    """The configuration as the image keeps it. A mapped-ram file (read from a
    file: qsnap import) is stored without the mapped-ram capability: qsnap load
    regenerates an ordinary precopy stream, and a destination with mapped-ram
    off refuses a stream that announces it (savevm.c configuration_validate_capabilities)."""
    if C.MIGRATION_CAPABILITY_MAPPED_RAM not in conf.capabilities:
        return conf.raw
    return encode.without_capability(conf, C.MIGRATION_CAPABILITY_MAPPED_RAM)


def _command(e, facts, rp, ram_started):
    cmd = e.cmd
    if cmd == C.MIG_CMD_OPEN_RETURN_PATH:
        rp.open = True
    elif cmd == C.MIG_CMD_PING:
        rp.pong(e.ping_value)
    elif cmd == C.MIG_CMD_POSTCOPY_ADVISE:
        if e.advise is not None:
            facts.postcopy_advise = list(e.advise)
    elif cmd == C.MIG_CMD_SWITCHOVER_START and ram_started:
        facts.switchover_start = True
    elif cmd not in _PREFIX_COMMANDS:
        name = C.MIG_CMD_NAMES.get(cmd, f"0x{cmd:x}")
        raise StreamError(
            f"command {name} at stream offset 0x{e.offset:x} cannot be saved "
            "(postcopy switch-over or recovery; save a precopy or background-snapshot stream)"
        )
    if not ram_started:
        facts.commands.append((cmd, e.payload.hex()))
