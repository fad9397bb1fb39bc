import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES_DIR = (REPO / ".." / "shared" / "fixtures").resolve()


@pytest.fixture(scope="session")
def fixtures_dir():
    """/work/shared/fixtures (../shared/fixtures from the repo root); skip when absent."""
    if not FIXTURES_DIR.is_dir():
        pytest.skip("QEMU stream fixtures not found at %s" % FIXTURES_DIR)
    return FIXTURES_DIR
