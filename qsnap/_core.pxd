# cython: language_level=3
# C declarations of qsnap/csrc, in one place.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t


# --- csrc/ramparse.h (stream codec) ---------------------------------------



# --- end ramparse ------------------------------------------------------------


# --- csrc/zero.h, csrc/crc32c.h, csrc/sink.h (image side) -------------------



# --- end sink ----------------------------------------------------------------
