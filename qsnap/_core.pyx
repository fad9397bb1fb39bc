# cython: language_level=3, embedsignature=True
"""Hot paths of qsnap: RAM-record parsing, page sinks, checksums, page emission.

The C code lives in csrc/ (no Python.h) and is declared in _core.pxd; status
codes from C become qsnap.errors exceptions here and nowhere else.
"""

include "_errors.pxi"
include "_ramparse.pxi"
include "_sink.pxi"
include "_load.pxi"
include "_postcopy.pxi"
