import pathlib

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
