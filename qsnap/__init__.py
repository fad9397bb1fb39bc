"""qsnap: external snapshots of QEMU virtual machines.

``qsnap save IMG`` turns a QEMU migration stream into a qcow2 image in which
every RAM page is addressable; ``qsnap load IMG`` turns the image back into a
migration stream (precopy, or postcopy with ``--postcopy``).
"""

__version__ = "0.1.0"
