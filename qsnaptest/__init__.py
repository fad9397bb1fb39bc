"""The real-QEMU harness shared by tests/ and bench/ (not part of the qsnap package).

    from qsnaptest import guests, tools
    from qsnaptest.qemu import BlobGuest, LinuxGuest, Qemu

``qemu``: start a QEMU, drive it over QMP, wait for states, dump RAM.
``guests``: blob guests (RAM content known exactly) and the busybox Linux guest.
``tools``: run qsnap behind QEMU (exec: command lines, environment, image checks).
"""
