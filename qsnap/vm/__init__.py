"""Talking to a running QEMU: QMP session, migration capabilities, disks, command lines.

The VM layer drives the engines through the same ``exec:`` path a user would
(``migrate "exec:qsnap save IMG"``); the engines never import it.
"""
