# C status codes -> qsnap.errors exceptions, for every module of csrc/.
#
# Each C module returns a status code and fills a caller-owned error struct
# (what failed, offset, value, errno).  The functions here are the only code
# that reads those structs: they return (never raise) the exception, so that
# callers write `raise _sink_error(...)` and the traceback starts where the
# C call was made.
#
# Out of memory (ENOMEM policy): a MemoryError whose message names what could
# not be allocated and how many bytes.  Not a QsnapError: running out of
# memory is neither bad input nor an I/O failure of the file being worked on,
# and Python code (including the CLI, which prints the message) already
# treats MemoryError as the one "out of memory" exception.
#
# Interruption (csrc/intr.h): C that waits for long calls an _Interrupt's
# hook every slice it waits and after a signal; the hook takes the GIL and
# runs the Python signal handlers (SIGTERM raises Terminated, SIGINT
# KeyboardInterrupt) and the engine's own check.  If one raises, the hook
# keeps the exception and tells C to stop; C returns its *_EINTR status and
# the conversion functions below hand back that very exception.

import os as _os
import sys as _sys
from array import array as _array

from cpython.exc cimport PyErr_CheckSignals

from qsnap.errors import ChecksumError as _ChecksumError
from qsnap.errors import ImageError as _ImageError
from qsnap.errors import IOFailure as _IOFailure
from qsnap.errors import StreamError as _StreamError


cdef str _strerror(int errnum):
    """errno as text for the middle of a message ("no space left on device")."""
    if errnum == 0:
        return "unknown error"
    text = _os.strerror(errnum)
    return text[:1].lower() + text[1:]


cdef object _no_memory(str what, uint64_t size):
    """The ENOMEM policy (see the top of this file)."""
    return MemoryError(f"cannot allocate {what} ({size} bytes)")


cdef class _Interrupt:
    """The interrupt hook handed to C (``c``): Python signal handlers, then
    ``check`` (a callable or None, e.g. "has the return path failed?").  The
    exception either raises waits in ``exc`` for the C call's caller.  Whoever
    hands ``c`` to C keeps a reference to this object while C may call it."""

    cdef qs_intr c
    cdef public object check
    cdef object exc

    def __cinit__(self):
        self.check = None
        self.exc = None
        self.c.fn = _intr_hook
        self.c.ctx = <void *>self
        self.c.slice_ms = QS_INTR_SLICE_MS

    cdef object take(self):
        """The exception that made C stop (returned, not raised)."""
        exc, self.exc = self.exc, None
        if exc is None:
            return RuntimeError("C code interrupted without an exception")
        return exc


cdef int _intr_hook(void *ctx) noexcept with gil:
    cdef _Interrupt it = <_Interrupt>ctx
    try:
        PyErr_CheckSignals()
        if it.check is not None:
            it.check()
    except BaseException as e:
        it.exc = e
        return 1
    return 0


class _LazyNumPy:
    """NumPy, imported on first use.  Importing it costs more than all the rest
    of `qsnap load`'s start-up, and the load path needs none of it: the code
    here that takes or makes NumPy arrays (the sink, postcopy, the parser's
    record array) reaches it through ``_np``."""

    def __getattr__(self, name):
        import numpy
        return getattr(numpy, name)


_np = _LazyNumPy()


cdef object _as_exact(obj, dtype, str what):
    """A C-contiguous NumPy array of exactly ``dtype`` for C: an array of another
    dtype is refused (TypeError; no silent cast that could wrap or truncate
    values), another sequence converted."""
    if isinstance(obj, _np.ndarray) and obj.dtype != dtype:
        raise TypeError(f"{what} must have dtype {_np.dtype(dtype)}, not {obj.dtype}")
    return _np.ascontiguousarray(obj, dtype=dtype)


# Buffer formats (struct module syntax) of unsigned integers, and the byte order
# prefix that still means native.
_UNSIGNED_FORMATS = ("B", "H", "I", "L", "Q", "N")
_NATIVE_PREFIXES = ("@", "=", "<" if _sys.byteorder == "little" else ">")


cdef object _c_array(obj, str code, str what):
    """``obj`` as a flat C-contiguous memoryview of the unsigned C type of array
    typecode ``code`` ("B" uint8_t, "I" uint32_t, "Q" uint64_t) for a typed
    memoryview, without NumPy.  A buffer of unsigned native items of that size
    (array.array, bytes, bytearray, memoryview, a NumPy array of any shape) is
    taken as it is, copied only if it is not contiguous; a buffer of other items
    is refused (TypeError: no silent cast that could wrap or truncate values); a
    sequence of ints, or of rows of ints, is converted (ValueError if one does
    not fit)."""
    cdef Py_ssize_t size = _array(code).itemsize
    try:
        m = memoryview(obj)
    except TypeError:
        return _array_of_ints(obj, code, size, what)
    fmt = m.format[1:] if m.format[:1] in _NATIVE_PREFIXES else m.format
    if m.itemsize != size or fmt not in _UNSIGNED_FORMATS:
        dtype = getattr(obj, "dtype", None)    # a NumPy array names its own type
        raise TypeError(f"{what} must have dtype uint{size * 8}, not "
                        f"{dtype if dtype is not None else repr(m.format) + ' items'}")
    if m.ndim == 1 and m.c_contiguous:
        return m
    flat = memoryview(m.tobytes()) if not m.c_contiguous else m.cast("B")
    return flat.cast(code)


cdef object _array_of_ints(seq, str code, Py_ssize_t size, str what):
    """A sequence of ints, or of rows of ints (read row by row), as a memoryview of
    an array.array."""
    items = list(seq)
    try:
        try:
            return memoryview(_array(code, items))
        except TypeError:
            return memoryview(_array(code, [x for row in items for x in row]))
    except OverflowError:
        raise ValueError(f"{what}: a value does not fit in {size * 8} unsigned bits") from None


# --- csrc/ramparse.c ------------------------------------------------------------

cdef object _ram_error(const qs_ram_state *st, blocks, buf):
    """QS_RAM_ERR of qs_ram_parse over ``buf``; the message is shared with the
    pure-Python parser (qsnap.stream._pyreader, imported here: it needs NumPy)."""
    from qsnap.stream._pyreader import ram_error_message as _ram_error_message
    return _StreamError(_ram_error_message(st.err_code, st.err_offset, st.err_value, blocks,
                                           memoryview(buf).cast("B"), st.last_block))


# --- csrc/sink.c ----------------------------------------------------------------

cdef object _sink_error(const qs_sink_err *err, str path, object block_names, _Interrupt intr):
    """A qs_sink_* status with its error struct (``intr``: the sink's hook)."""
    st = err.status
    if st == QS_SINK_EINTR:
        return intr.take()
    name = None
    if block_names is not None and err.block < len(block_names):
        name = block_names[err.block]
    where = (f"in block '{name}' page 0x{err.offset:x}" if name is not None
             else f"at virtual offset 0x{err.voff:x}")
    if st == QS_SINK_EWRITE:
        return _IOFailure(f"{_strerror(err.errnum)} writing {path} at offset 0x{err.host_off:x}")
    if st == QS_SINK_EREAD:
        return _IOFailure(f"{_strerror(err.errnum)} reading {path} at offset 0x{err.host_off:x}")
    if st == QS_SINK_ENOMEM:
        return _no_memory(f"page sink tables for {path}", err.value)
    if st == QS_SINK_ESPILL:
        verb = "writing" if err.value else "reading"
        return _IOFailure(f"{_strerror(err.errnum)} {verb} the page-state spill file of {path} "
                          f"at offset 0x{err.host_off:x}")
    if st == QS_SINK_ETHREAD:
        return _IOFailure(f"cannot start the page sink's writer threads for {path}: "
                          f"{_strerror(err.errnum)}")
    if st == QS_SINK_EINVAL:
        return ValueError(f"bad page sink parameter 0x{err.value:x} "
                          f"(block {err.block}, offset 0x{err.offset:x})")
    if st == QS_SINK_EBADREC:
        return _StreamError(f"unknown RAM record flags 0x{err.value:x} {where}")
    if st == QS_SINK_EUNSUPPORTED:
        return _StreamError(f"unsupported RAM record COMPRESS_PAGE (flags 0x{err.value:x}) {where}; "
                            "migrate without the compress capability")
    if st == QS_SINK_EBLOCK:
        return _StreamError(f"RAM block index {err.value} out of range "
                            f"(record {err.rec_index} of the batch)")
    if st == QS_SINK_ERANGE:
        if name is not None:
            return _StreamError(f"illegal RAM offset 0x{err.value:x} in block '{name}'")
        return _StreamError(f"illegal RAM offset 0x{err.value:x} at virtual offset 0x{err.voff:x}")
    if st == QS_SINK_EDATA:
        return _StreamError(f"bad page payload length {err.value} {where}")
    if st == QS_SINK_EXBZRLE:
        return _StreamError(f"malformed XBZRLE encoding at byte {err.value} {where}")
    return _StreamError(f"page sink error {st} {where}")


# --- csrc/aio.c -----------------------------------------------------------------

cdef object _aio_error(const qs_aio_err *e, _Interrupt intr):
    """A qs_aio_* status with its error struct (``intr``: the ring's hook)."""
    if e.code == QS_AIO_EINTR:
        return intr.take()
    if e.code == QS_AIO_ESHORT:
        return _ImageError(f"image file truncated: {e.value} bytes missing at image offset 0x{e.offset:x}")
    if e.code == QS_AIO_EIO:
        return _IOFailure(f"cannot read the image: {_strerror(e.sys_errno)} at image offset 0x{e.offset:x}")
    if e.code == QS_AIO_ECANCELED:
        return _IOFailure(f"image read-ahead cancelled at image offset 0x{e.offset:x}")
    if e.code == QS_AIO_ENOMEM:
        return _no_memory("read-ahead buffers", e.value)
    if e.code == QS_AIO_ETHREAD:
        return _IOFailure(f"cannot start read-ahead threads: {_strerror(e.sys_errno)}")
    if e.code == QS_AIO_ESTATE:
        return RuntimeError(f"read-ahead ring misused at read {e.value}")
    return ValueError(f"bad read-ahead parameter {e.value} (extent at 0x{e.offset:x})")


# --- csrc/emit.c ----------------------------------------------------------------

cdef object _emit_error(const qs_emit_err *e, list names, _Interrupt intr):
    """A qs_emit_* status; ``names``: the blocks' idstrs, ``intr``: the emitter's hook."""
    if e.code == QS_EMIT_EINTR:
        return intr.take()
    if e.code == QS_EMIT_ECRC:
        name = names[e.block] if e.block < len(names) else f"#{e.block}"
        return _ChecksumError(
            f"page checksum mismatch (stored 0x{e.expected:08x}, computed 0x{e.actual:08x}) "
            f"in block '{name}' page 0x{e.offset:x}")
    if e.code == QS_EMIT_EPIPE:
        return _IOFailure(f"the stream reader closed the pipe (EPIPE) after {e.value} bytes")
    if e.code == QS_EMIT_EIO:
        return _IOFailure(f"cannot write the stream: {_strerror(e.sys_errno)} after {e.value} bytes")
    if e.code == QS_EMIT_ENOMEM:
        return _no_memory("the record arena", e.value)
    return ValueError(f"bad emitter argument 0x{e.offset:x} (value 0x{e.value:x})")
