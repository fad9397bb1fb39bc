"""Replay every minimised fuzz finding through the command line.

    regressions/save/NAME.stream                stdin of ``qsnap save IMG``
    regressions/load/NAME.qsnap.gz              IMG of ``qsnap load IMG``
    regressions/postcopy/NAME-pctN.qsnap.gz     IMG of ``qsnap load --postcopy=N IMG``,
    regressions/postcopy/NAME-pctN.rp           with this return path on stdin

Each must end with exactly one ``qsnap: error:`` line on stderr, a non-zero exit
status other than the internal-error one, and no traceback; save must leave neither an image nor a temporary file.
"""
import gzip
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
CASES = HERE / "regressions"
EX_SOFTWARE = 70  # qsnap.cli: what escaped was not a QsnapError

# Findings whose fix belongs to another change, expected to fail until it lands:
# "kind/name" -> reason (xfail, not strict).
STREAM_CHECKS = {}


def _cases(kind, suffix):
    d = CASES / kind
    return sorted(p.name[:-len(suffix)] for p in d.glob(f"*{suffix}")) if d.is_dir() else []


def _param(kind, name):
    reason = STREAM_CHECKS.get(f"{kind}/{name}")
    marks = [pytest.mark.xfail(strict=False, reason=reason)] if reason else []
    return pytest.param(name, marks=marks, id=name)


def _qsnap(args, stdin):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "qsnap", *args], stdin=stdin, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=60, cwd=REPO, env=env)


def _assert_one_error(r):
    lines = r.stderr.splitlines()
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("qsnap: error: "), r.stderr
    # an exception other than a QsnapError also ends as one line, but as an internal error
    assert r.returncode != EX_SOFTWARE and not lines[0].startswith("qsnap: error: internal error"), r.stderr


def _unpack_image(gz, tmp_path):
    img = tmp_path / "image.qsnap"
    with gzip.open(gz, "rb") as f:
        img.write_bytes(f.read())
    return img


@pytest.mark.parametrize("name", [_param("save", n) for n in _cases("save", ".stream")])
def test_save_regression(name, tmp_path):
    img = tmp_path / "out.qsnap"
    with open(CASES / "save" / f"{name}.stream", "rb") as stdin:
        r = _qsnap(["save", "--cluster-size=64K", str(img)], stdin)
    _assert_one_error(r)
    assert os.listdir(tmp_path) == [], "a failed save left files behind"


@pytest.mark.parametrize("name", [_param("load", n) for n in _cases("load", ".qsnap.gz")])
def test_load_regression(name, tmp_path):
    img = _unpack_image(CASES / "load" / f"{name}.qsnap.gz", tmp_path)
    r = _qsnap(["load", "--cache=writeback", str(img)], subprocess.DEVNULL)
    _assert_one_error(r)
    assert os.listdir(tmp_path) == ["image.qsnap"]


@pytest.mark.parametrize("name", [_param("postcopy", n) for n in _cases("postcopy", ".qsnap.gz")])
def test_postcopy_regression(name, tmp_path):
    img = _unpack_image(CASES / "postcopy" / f"{name}.qsnap.gz", tmp_path)
    pct = name.rsplit("-pct", 1)[1]
    rp = CASES / "postcopy" / f"{name}.rp"
    with open(rp, "rb") if rp.exists() else open(os.devnull, "rb") as stdin:
        r = _qsnap(["load", f"--postcopy={pct}", "--cache=writeback", str(img)], stdin)
    _assert_one_error(r)
    assert os.listdir(tmp_path) == ["image.qsnap"]
