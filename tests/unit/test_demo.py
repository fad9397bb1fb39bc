"""`qsnap demo` runs the whole save/load path on a synthetic VM and verifies it."""
import subprocess
import sys


def test_demo_passes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qsnap", "demo", "--size", "16M", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("demo passed")
    assert "byte-identical" in r.stdout
    assert (tmp_path / "vm.qsnap").exists()


def test_demo_rejects_odd_size():
    r = subprocess.run([sys.executable, "-m", "qsnap", "demo", "--size", "1000"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.startswith("qsnap: error: demo size 1000")
