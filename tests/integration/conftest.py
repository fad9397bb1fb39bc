"""Fixtures for tests that drive a real QEMU.

Without QEMU these tests skip ("QEMU not found"); with QSNAP_REQUIRE_QEMU=1
(CI) they fail instead. Every test in this directory gets the ``qemu``
marker; tests elsewhere can mark themselves ``qemu`` or use ``qemu_bin``.
"""

import os
from pathlib import Path

import pytest

from qsnaptest import guests
from qsnaptest.qemu import qemu_available, qemu_binary

HERE = Path(__file__).parent


def require_qemu() -> bool:
    return os.environ.get("QSNAP_REQUIRE_QEMU", "") not in ("", "0")


def _unavailable(reason: str):
    if require_qemu():
        pytest.fail(f"{reason} (QSNAP_REQUIRE_QEMU=1)", pytrace=False)
    pytest.skip(reason)


_qemu_ok = None


def _check_qemu():
    global _qemu_ok
    if _qemu_ok is None:
        _qemu_ok = qemu_available()
    if not _qemu_ok:
        _unavailable("QEMU not found")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.qemu)


def pytest_runtest_setup(item):
    if item.get_closest_marker("qemu") is not None:
        _check_qemu()


@pytest.fixture(scope="session")
def qemu_bin() -> str:
    """Path of qemu-system-x86_64 (skip, or fail under QSNAP_REQUIRE_QEMU=1)."""
    _check_qemu()
    return qemu_binary()


@pytest.fixture(scope="session")
def linux_guest_files(qemu_bin):
    """(kernel, initramfs) of the live busybox guest; downloaded/built once, cached."""
    try:
        return guests.linux_guest_files()
    except guests.GuestUnavailable as e:
        _unavailable(f"Linux test guest unavailable: {e}")


@pytest.fixture
def blob_factory(tmp_path):
    """blob_factory(layout, seed=0) -> [Blob], files under tmp_path."""
    def make(layout, seed=0):
        return guests.make_blobs(tmp_path / f"blobs-{seed}", layout, seed)
    return make
