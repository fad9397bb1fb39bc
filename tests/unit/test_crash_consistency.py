"""SIGKILL `qsnap save` at random points while it reads a real QEMU stream.

What is left (the temporary file) is refused by `qsnap check` (exit 1) and
`qsnap load` (one error line), and an earlier image at the path is intact.
"""
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "fuzz"))
import seeds  # noqa: E402
from bigcmp import assert_same  # noqa: E402

KILLS = 20
CHUNK = 32 << 10
CHUNK_DELAY = 0.004   # ~8 MB/s: a 1.7 MB stream takes ~0.2 s


def _qsnap(*args, **kw):
    return subprocess.run([sys.executable, "-m", "qsnap", *args], capture_output=True, timeout=60, **kw)


def _feed(proc, data):
    try:
        for i in range(0, len(data), CHUNK):
            proc.stdin.write(data[i:i + CHUNK])
            proc.stdin.flush()
            time.sleep(CHUNK_DELAY)
        proc.stdin.close()
    except (BrokenPipeError, ValueError, OSError):
        pass


@pytest.fixture(scope="module")
def stream():
    assert seeds.BLOB_STREAM.exists(), f"{seeds.BLOB_STREAM} is missing"
    return seeds.load_stream(seeds.BLOB_STREAM)


def test_sigkill_save_at_random_points(stream, tmp_path):
    img = tmp_path / "vm.qsnap"
    seeds.save_image(seeds.load_stream(seeds.stream_path("pc72")), img)
    earlier = img.read_bytes()
    rng = random.Random(0x5EED)
    duration = len(stream) / CHUNK * CHUNK_DELAY
    killed = 0
    for n in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-m", "qsnap", "save", "-q", str(img)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        # start the clock when the temporary file exists (imports done, header written)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.startswith(".vm.qsnap.qsnap-") for p in tmp_path.iterdir()):
                break
            time.sleep(0.002)
        feeder = threading.Thread(target=_feed, args=(proc, stream), daemon=True)
        feeder.start()
        time.sleep(rng.uniform(0, duration * 1.1))
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait(timeout=20)
        feeder.join(timeout=20)
        proc.stderr.close()
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".vm.qsnap.qsnap-")]
        if finished and proc.returncode == 0:
            # the save completed before the kill: the new image is whole
            assert _qsnap("check", str(img)).returncode == 0
            earlier = img.read_bytes()
        else:
            assert_same(img.read_bytes(), earlier, f"kill {n}: the earlier image changed")
            assert len(temps) == 1, temps
        for t in temps:
            r = _qsnap("check", str(t))
            assert r.returncode == 1, (n, r.stdout, r.stderr)
            r = _qsnap("load", "--cache=writeback", str(t))
            err = r.stderr.decode()
            assert r.returncode != 0 and r.stdout == b""
            assert err.startswith("qsnap: error: ") and err.count("\n") == 1, err
            t.unlink()
    assert killed >= KILLS // 2, f"only {killed} of {KILLS} saves were still running when killed"
