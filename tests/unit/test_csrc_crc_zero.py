import os
import random

import numpy as np
import pytest

from qsnap import _core


def ref_crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("fn", [_core.crc32c, _core.crc32c_sw])
def test_crc32c_known_vectors(fn):
    assert fn(b"123456789") == 0xE3069283
    assert fn(b"") == 0
    assert fn(bytes(32)) == 0x8A9136AA          # RFC 3720 B.4
    assert fn(b"\xff" * 32) == 0x62A8AB43
    assert fn(bytes(range(32))) == 0x46DD794E


@pytest.mark.parametrize("fn", [_core.crc32c, _core.crc32c_sw])
def test_crc32c_chaining(fn):
    data = os.urandom(100_000)
    whole = fn(data)
    for cut in (0, 1, 7, 8, 4095, 50_000, 99_999, 100_000):
        assert fn(data[cut:], fn(data[:cut])) == whole


def test_crc32c_hw_sw_agree_all_lengths_and_alignments():
    rnd = random.Random(1)
    buf = bytes(rnd.getrandbits(8) for _ in range(70_000))
    mv = memoryview(buf)
    for n in list(range(0, 80)) + [255, 256, 767, 768, 769, 4096, 24575, 24576, 24577, 60_000]:
        for a in (0, 1, 3, 7):
            assert _core.crc32c(mv[a:a + n]) == _core.crc32c_sw(mv[a:a + n])
    for n in (0, 1, 9, 100, 1000):
        assert _core.crc32c(buf[:n]) == ref_crc32c(buf[:n])


def test_page_crcs():
    buf = os.urandom(4096 * 5)
    crcs = _core.page_crcs(buf, 4096)
    assert crcs.dtype == np.dtype("<u4") and len(crcs) == 5
    assert list(crcs) == [_core.crc32c(buf[i * 4096:(i + 1) * 4096]) for i in range(5)]
    with pytest.raises(ValueError):
        _core.page_crcs(buf[:-1], 4096)


def test_is_zero_lengths():
    z = bytes(4097 + 64)
    mv = memoryview(z)
    for n in range(0, 4098):
        assert _core.is_zero(mv[:n])
    for a in range(1, 17):
        assert _core.is_zero(mv[a:a + 4096])


def test_is_zero_single_byte_every_position():
    page = bytearray(4096)
    for i in range(4096):
        page[i] = 1
        assert not _core.is_zero(page), i
        page[i] = 0
    assert _core.is_zero(page)
    # short and unaligned buffers
    buf = bytearray(200)
    mv = memoryview(buf)
    for a in range(0, 17):
        for n in range(0, 100):
            for i in (0, n // 2, n - 1):
                if n == 0:
                    continue
                buf[a + i] = 0x80
                assert not _core.is_zero(mv[a:a + n])
                buf[a + i] = 0
                assert _core.is_zero(mv[a:a + n])


def test_is_zero_numpy():
    a = np.zeros(1000, dtype=np.uint32)
    assert _core.is_zero(a)
    a[999] = 1
    assert not _core.is_zero(a)
