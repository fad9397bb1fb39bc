"""Fixtures for tests that drive a real QEMU.

Without QEMU these tests skip ("QEMU not found"); with QSNAP_REQUIRE_QEMU=1
(CI) they fail instead. Every test in this directory gets the ``qemu``
marker; tests elsewhere can mark themselves ``qemu`` or use ``qemu_bin``.

QEMU builds: ``QSNAP_QEMU=7.2,10.0`` (see qsnaptest/builds.py) names the
builds to test; unset, the installed qemu-system-x86_64. Every test here runs
under the autouse ``qemu`` fixture, which makes its build the default of every
``Qemu()`` the test (and its fixtures) start: binary, -L firmware dirs and
machine type (``pc-i440fx-<major.minor>``). A test runs on the first build;
one marked ``all_qemu`` on each requested build. The build is in the test id:
``test_blob_save[qemu10.0-background]``.
"""

import os
import re
from pathlib import Path

import pytest

from qsnaptest import builds, guests
from qsnaptest.qemu import qemu_available, use_build

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


def pytest_configure(config):
    config.addinivalue_line("markers", "all_qemu: run on every QEMU build QSNAP_QEMU names "
                            "(other tests: on the first one)")


_build_ids = {}


def build_id(spec: str) -> str:
    """``qemu7.2`` for a build spec (its version when it runs, else the spec)."""
    if spec not in _build_ids:
        try:
            _build_ids[spec] = builds.find_build(spec).id
        except builds.BuildUnavailable:
            name = spec if re.fullmatch(r"\d+\.\d+", spec) else Path(spec).name
            _build_ids[spec] = f"qemu{name}"
    return _build_ids[spec]


def pytest_generate_tests(metafunc):
    if "qemu" not in metafunc.fixturenames:
        return
    specs = builds.requested_specs()
    if metafunc.definition.get_closest_marker("all_qemu") is None:
        specs = specs[:1]
    metafunc.parametrize("qemu", specs, ids=[build_id(s) for s in specs], indirect=True,
                         scope="session")


def find_build(spec: str) -> builds.Build:
    """The build ``spec`` names; skip, or fail under QSNAP_REQUIRE_QEMU=1, when it is missing."""
    try:
        return builds.find_build(spec)
    except builds.BuildUnavailable as e:
        _unavailable(f"QEMU {spec} requested but unavailable: {e}")


def requested_build(spec: str) -> builds.Build:
    """The build ``spec`` for a test that needs it beside the one it runs on: skip when
    QSNAP_QEMU does not name it, else as find_build (CI names 7.2 and 10.0)."""
    specs = builds.requested_specs()
    if spec not in specs:
        pytest.skip(f"QSNAP_QEMU={','.join(specs)} does not name QEMU {spec}")
    return find_build(spec)


@pytest.fixture(scope="session", autouse=True)
def qemu(request):
    """The QEMU build of this test (QSNAP_QEMU), the default of every Qemu() meanwhile."""
    build = find_build(getattr(request, "param", builds.requested_specs()[0]))
    prev = use_build(build)
    yield build
    use_build(prev)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.qemu)


def pytest_runtest_setup(item):
    if item.get_closest_marker("qemu") is not None:
        _check_qemu()


@pytest.fixture(scope="session")
def qemu_bin(qemu) -> str:
    """Path of this test's qemu-system-x86_64 (skip, or fail under QSNAP_REQUIRE_QEMU=1)."""
    _check_qemu()
    return qemu.binary


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
