"""Runs tests/native (csrc under ASan/UBSan and TSan) as part of the unit suite."""
import importlib.util
import pathlib

_path = pathlib.Path(__file__).resolve().parents[1] / "native" / "test_native.py"
_spec = importlib.util.spec_from_file_location("qsnap_native_tests", _path)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

test_csrc_under_asan_ubsan = _mod.test_csrc_under_asan_ubsan
test_csrc_under_tsan = _mod.test_csrc_under_tsan
