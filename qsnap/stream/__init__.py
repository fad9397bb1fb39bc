"""The QEMU migration-stream codec: StreamReader (events.py), StreamWriter, synth."""
