import pathlib
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "tests" / "data"
FIXTURES_DIR = (REPO / ".." / "shared" / "fixtures").resolve()


def _stream_dirs():
    """tests/data (committed, see its README), plus ../shared/fixtures where present:
    the same kinds of stream from other captures, one more case for each test."""
    dirs = [pytest.param(DATA_DIR, id="data")]
    if FIXTURES_DIR.is_dir():
        dirs.append(pytest.param(FIXTURES_DIR, id="shared"))
    return dirs


@pytest.fixture(scope="session", params=_stream_dirs())
def fixtures_dir(request):
    """A directory of real QEMU streams NAME.stream.gz (tests/data/README.md)."""
    return request.param


# The module-scoped fixtures keep whole saved guests (hundreds of MiB each) in
# tmp_path_factory directories, which pytest removes only when the session
# ends. Each module's go when the module is done, unless one of its tests
# failed (then they stay for a look, as pytest keeps a failed test's tmp_path).
_made = []


@pytest.fixture(scope="session", autouse=True)
def _record_mktemp(tmp_path_factory):
    real = tmp_path_factory.mktemp

    def mktemp(basename, numbered=True):
        path = real(basename, numbered)
        _made.append(path)
        return path

    tmp_path_factory.mktemp = mktemp
    yield
    tmp_path_factory.mktemp = real


@pytest.fixture(scope="module", autouse=True)
def _drop_module_tmp(request, _record_mktemp):
    first, failed = len(_made), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in _made[first:]:
            shutil.rmtree(path, ignore_errors=True)
    del _made[first:]
