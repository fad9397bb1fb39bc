# cython: language_level=3, embedsignature=True
"""Hot paths of qsnap: RAM-record parsing, page sinks, checksums, page emission.

The C code lives in csrc/ (no Python.h) and is declared in _core.pxd; status
codes from C become exceptions in _errors.pxi and nowhere else, and that file
also holds the interrupt hook through which C waiting for long lets Python
handle signals.
"""

include "_errors.pxi"
include "_ramparse.pxi"
include "_sink.pxi"
include "_load.pxi"
include "_postcopy.pxi"
