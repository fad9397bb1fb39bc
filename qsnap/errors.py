"""The one exception family qsnap raises for bad input and failed operations.

Every message names where the problem is (stream offset, image offset, block
and page) and the bad value, e.g.
``unknown section type 0x42 at stream offset 0x1a2b``.  The CLI prints
``qsnap: error: <message>`` and exits non-zero; anything that is not a
``QsnapError`` escaping a reader is a bug.
"""


class QsnapError(Exception):
    """Base class of every error qsnap reports."""

    exit_code = 1


class UsageError(QsnapError):
    """Bad command line or arguments."""

    exit_code = 2


class StreamError(QsnapError):
    """Malformed, truncated or unsupported QEMU migration stream."""


class ImageError(QsnapError):
    """Corrupt, incomplete, foreign or unsupported qsnap image."""


class ChecksumError(ImageError):
    """Data or metadata in an image does not match its checksum."""


class ProtocolError(QsnapError):
    """Bad message on the postcopy/return-path channel."""


class IOFailure(QsnapError):
    """An operating-system I/O error while reading or writing (disk full, EPIPE...)."""


class VmError(QsnapError):
    """A QEMU could not be driven: QMP unreachable, busy or not QMP, a command QEMU refused,
    or a VM in a state the operation cannot work in."""


class Interrupted(QsnapError):
    """A signal asked qsnap to stop (SIGTERM from QEMU cancelling a migration, SIGINT)."""
