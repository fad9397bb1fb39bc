"""A one-line progress display of a running migration (query-migrate), for terminals only."""
import time

INTERVAL = 0.5


class Progress:
    """``tick(qmp)`` redraws at most every INTERVAL s; ``done()`` ends the line."""

    def __init__(self, stream, label):
        self.stream = stream
        self.label = label
        self.last = 0.0
        self.first = None  # (time, bytes done) of the first sample: the rate's origin
        self.shown = False

    def tick(self, qmp):
        now = time.monotonic()
        if now - self.last < INTERVAL:
            return
        self.last = now
        info = qmp.cmd("query-migrate")
        ram = info.get("ram")
        if info.get("status") not in ("setup", "active", "pre-switchover", "device") or not ram:
            return
        done = ram.get("total", 0) - ram.get("remaining", 0)
        if self.first is None:
            self.first = (now, done)
        rate = (done - self.first[1]) / (now - self.first[0]) if now > self.first[0] else 0.0
        self.stream.write("\r" + line(self.label, done, ram.get("total", 0), rate) + "\x1b[K")
        self.stream.flush()
        self.shown = True

    def done(self):
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


def line(label, done, total, rate):
    """``label: 120.0 of 256.0 MiB RAM, 85.3 MB/s, ETA 2 s`` (rate in bytes/s)."""
    text = f"{label}: {done / (1 << 20):.1f} of {total / (1 << 20):.1f} MiB RAM, {rate / 1e6:.1f} MB/s"
    if rate > 0 and total > done:
        text += f", ETA {(total - done) / rate:.0f} s"
    return text
