"""The large-value comparison the tests rely on to fail clearly."""
import os

import pytest

from bigcmp import assert_same


def test_equal_values_pass():
    data = os.urandom(1 << 20)
    assert_same(data, bytearray(data))
    assert_same(memoryview(data), data)
    assert_same([(1, b"a")], [(1, b"a")])
    assert_same(b"", bytearray())


def test_bytes_difference_names_first_byte_and_pages():
    want = os.urandom(64 << 20)
    got = bytearray(want)
    got[0x500123] ^= 0xFF
    got[0x900000:0x900000 + 5000] = bytes(x ^ 1 for x in got[0x900000:0x900000 + 5000])
    with pytest.raises(AssertionError) as e:
        assert_same(got, want, "RAM")
    msg = str(e.value)
    assert msg.startswith("RAM differs: 67108864 bytes; first difference at byte 0x500123 (page 0x500)")
    assert f"{got[0x500123]:#04x}, expected {want[0x500123]:#04x}" in msg
    assert "5001 bytes differ in 3 of 16384 4 KiB pages" in msg


def test_length_difference():
    with pytest.raises(AssertionError, match=r"image differs: 90 bytes, expected 100; "
                                             r"identical over the first 90 bytes"):
        assert_same(b"x" * 90, b"x" * 100, "image")


def test_sequence_difference():
    page = bytes(4096)
    with pytest.raises(AssertionError, match=r"pages differs: 3 items; first difference at index 2: "
                                             r"\('b', 8192, .*\), expected \('b', 8192, None\)"):
        assert_same([("a", 0, None), ("a", 4096, page), ("b", 8192, page)],
                    [("a", 0, None), ("a", 4096, page), ("b", 8192, None)], "pages")
    with pytest.raises(AssertionError, match=r"2 items, expected 3; missing from index 2"):
        assert_same([1, 2], [1, 2, 3])
    with pytest.raises(AssertionError, match=r"3 items, expected 2; extra from index 2"):
        assert_same((1, 2, 3), (1, 2))


def test_other_values():
    with pytest.raises(AssertionError, match=r"state differs: \{'a': 1\}, expected \{'a': 2\}"):
        assert_same({"a": 1}, {"a": 2}, "state")
