"""The command line: usage errors and bad input end as one `qsnap: error:` line."""
import argparse
import signal
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


@pytest.fixture(autouse=True)
def keep_sigterm_handler():
    """cli.main() installs its SIGTERM handler; give pytest its own back."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def _raise_value_error(args):
    raise ValueError("block list is odd")


def test_internal_error_is_one_line_and_exit_70(tmp_path, monkeypatch, capsys):
    from qsnap import cli

    monkeypatch.setitem(cli._COMMANDS, "info", _raise_value_error)
    status = cli.main(["info", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert status == cli.EX_SOFTWARE == 70
    assert err == ("qsnap: error: internal error: ValueError: block list is odd "
                   "(run with --debug for the traceback)\n")


def test_internal_error_with_debug_raises(tmp_path, monkeypatch):
    from qsnap import cli

    monkeypatch.setitem(cli._COMMANDS, "info", _raise_value_error)
    with pytest.raises(ValueError, match="block list is odd"):
        cli.main(["--debug", "info", str(tmp_path / "x")])


def test_qsnap_error_keeps_its_exit_status(tmp_path, capsys):
    from qsnap import cli

    assert cli.main(["save", "--bogus", "x"]) == 2
    assert capsys.readouterr().err.startswith("qsnap: error: ")


def test_internal_error_message_stays_on_one_line(tmp_path, monkeypatch, capsys):
    from qsnap import cli

    def raise_multiline(args):
        raise KeyError("first\nsecond")

    monkeypatch.setitem(cli._COMMANDS, "info", raise_multiline)
    assert cli.main(["info", str(tmp_path / "x")]) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qsnap: error: internal error: KeyError: "), err


def imported(*args):
    """The modules ``python -m qsnap ARGS`` imports (python -X importtime), and its result."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "qsnap", *args], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    mods = {ln.split("|")[2].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    return mods, r


# Modules of the other commands: the start-up of save and load pays for none of them.
NOT_FOR_THE_ENGINES = {"shutil", "qsnap.export", "qsnap.vm", "qsnap.image.inspect", "asyncio", "qemu"}


def test_load_imports_only_what_load_needs(tmp_path):
    mods, r = imported("load", "-q", str(tmp_path / "missing.qsnap"))
    assert "no such file" in r.stderr and "qsnap.load" in mods, r.stderr[-500:]
    assert not mods & (NOT_FOR_THE_ENGINES | {"qsnap.image.writer", "qsnap.save", "qsnap.postcopy"})


def test_save_imports_only_what_save_needs(tmp_path):
    mods, r = imported("save", "-q", str(tmp_path / "out.qsnap"))
    assert "truncated stream" in r.stderr and "qsnap.save" in mods, r.stderr[-500:]
    assert not mods & (NOT_FOR_THE_ENGINES | {"qsnap.image.reader", "qsnap.load", "qsnap.postcopy"})


def test_restore_reads_an_image_without_numpy_or_the_engines(tmp_path):
    mods, r = imported("restore", "--launch", str(tmp_path / "missing.qsnap"))
    assert "no such file" in r.stderr and "qsnap.image.metadata" in mods, r.stderr[-500:]
    assert not mods & {"numpy", "qsnap._core", "qsnap.image.reader", "qsnap.load"}


def test_parser_of_one_command_or_all():
    from qsnap import cli

    def commands(p):
        return sorted(next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices)

    assert commands(cli.build_parser("load")) == ["load"]
    assert commands(cli.build_parser()) == commands(cli.build_parser("bogus")) == sorted(cli._COMMANDS)
    assert cli._command_word(["--debug", "restore", "--launch", "x"]) == "restore"
    assert cli._command_word(["--version"]) is None
