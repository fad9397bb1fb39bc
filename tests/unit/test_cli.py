"""The command line: usage errors and bad input end as one `qsnap: error:` line."""
import subprocess
import sys

import pytest

from bigcmp import assert_same


def run(*args, stdin=b""):
    return subprocess.run([sys.executable, "-m", "qsnap", *args], input=stdin,
                          capture_output=True, timeout=60)


def assert_one_line_error(r, *fragments):
    assert r.returncode != 0
    err = r.stderr.decode()
    assert err.startswith("qsnap: error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in err, err


def test_version():
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.decode().startswith("qsnap ")


def test_no_command():
    assert_one_line_error(run(), "no command")


def test_unknown_option():
    assert_one_line_error(run("save", "--bogus", "x"), "--bogus")


def test_bad_cluster_size_value():
    assert_one_line_error(run("save", "--cluster-size=huge", "x"), "huge")


@pytest.mark.parametrize("cmd", ["info", "check", "load"])
def test_missing_image(tmp_path, cmd):
    missing = tmp_path / "nope.qsnap"
    assert_one_line_error(run(cmd, str(missing)), str(missing))


@pytest.mark.parametrize("cmd", ["info", "check", "load"])
def test_not_an_image(tmp_path, cmd):
    junk = tmp_path / "junk.qsnap"
    junk.write_bytes(b"\x00" * 4096)
    r = run(cmd, str(junk))
    assert_one_line_error(r)
    assert_same(r.stdout, b"", "stdout")


def test_postcopy_percentage_checked(tmp_path):
    assert_one_line_error(run("load", "--postcopy=150", str(tmp_path / "x")), "150")


def test_debug_shows_traceback(tmp_path):
    r = run("--debug", "info", str(tmp_path / "nope"))
    assert r.returncode != 0
    assert "Traceback" in r.stderr.decode()
