# cython: language_level=3, embedsignature=True
"""Hot paths of qsnap: RAM-record parsing, page sinks, checksums, page emission.

The C code lives in csrc/ (no Python.h) and is declared in _core.pxd; status
codes from C become exceptions in _errors.pxi and nowhere else, and that file
also holds the interrupt hook through which C waiting for long lets Python
handle signals.

Importing this module does not import NumPy (what `qsnap load` needs takes any
buffer); the parts that make or take NumPy arrays import it on first use.
"""

include "_errors.pxi"
include "_ramparse.pxi"
include "_sink.pxi"
include "_load.pxi"
include "_maps.pxi"
include "_postcopy.pxi"


def __getattr__(name):
    """The record dtypes, which need NumPy, made when first asked for (PEP 562)."""
    if name == "PAGE_REC_DTYPE":
        return _page_rec_dtype()
    if name == "SINK_REC_DTYPE":
        return _sink_rec_dtype()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
