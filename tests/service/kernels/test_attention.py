"""The native selective attention (service/kernels/attention.py) against a float64 reference of the
function DeRefNet's SelectiveAttention computes (training/model.py)."""

from __future__ import annotations

import numpy as np
import pytest

from service.kernels import attention
from tests.service.kernels.test_conv import reference as conv3x3

pytestmark = pytest.mark.skipif(not attention.AVAILABLE, reason="service.kernels._conv is not built")


def weights(c=32, seed=0):
    rng = np.random.default_rng(seed)
    half = c // 2
    return [
        (rng.standard_normal(shape) * scale).astype(np.float32)
        for shape, scale in (
            ((half, c, 1, 1), 0.3),
            ((half,), 0.1),
            ((half, c, 1, 1), 0.3),
            ((half,), 0.1),
            ((2, 2, 3, 3), 0.5),
            ((2,), 0.2),
        )
    ]


def expected(mid, nb, wa, ba, wb, bb, wmix, bmix):
    a = np.einsum("oc,nchw->nohw", wa[:, :, 0, 0].astype(np.float64), mid) + ba[None, :, None, None]
    b = np.einsum("oc,nchw->nohw", wb[:, :, 0, 0].astype(np.float64), nb) + bb[None, :, None, None]
    both = np.concatenate([a, b], axis=1)
    stats = np.concatenate([both.mean(1, keepdims=True), both.max(1, keepdims=True)], axis=1)
    s = 1 / (1 + np.exp(-conv3x3(stats, wmix, bmix)))
    return np.concatenate([a * s[:, :1], b * s[:, 1:]], axis=1)


@pytest.mark.parametrize("n,c,h,w", [(16, 32, 33, 33), (2, 32, 7, 9), (1, 32, 1, 1), (3, 16, 5, 40), (1, 24, 4, 33)])
def test_attention_equals_float64(n, c, h, w):
    """Odd sizes, a 1 x 1 map, widths past a vector, and squeeze widths that are not a multiple of
    the kernel's 8-output block (c=24: 12 per half)."""
    rng = np.random.default_rng(n * h + w)
    mid, nb = (rng.standard_normal((n, c, h, w)).astype(np.float32) for _ in range(2))
    ws = weights(c)
    got = attention.SelectiveAttention(*ws)(mid, nb)
    want = expected(mid, nb, *ws)
    assert got.shape == (n, c, h, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_attention_threads_split_the_batch_identically_and_nan_stays():
    rng = np.random.default_rng(3)
    mid, nb = (rng.standard_normal((5, 32, 33, 33)).astype(np.float32) for _ in range(2))
    mid[2, 4, 10, 10] = np.nan
    one = attention.SelectiveAttention(*weights())(mid, nb)
    np.testing.assert_array_equal(attention.SelectiveAttention(*weights(), threads=2)(mid, nb), one)
    assert np.isnan(one[2]).any() and np.isfinite(one[[0, 1, 3, 4]]).all()


def test_attention_refuses_bad_shapes():
    ws = weights()
    with pytest.raises(ValueError, match=r"mix weight must be \(2, 2, 3, 3\)"):
        attention.SelectiveAttention(*ws[:4], ws[4][:, :, :2], ws[5])
    with pytest.raises(ValueError, match=r"nb bias must be \(16,\)"):
        attention.SelectiveAttention(*ws[:3], ws[3][:3], *ws[4:])
    att = attention.SelectiveAttention(*ws)
    with pytest.raises(ValueError, match=r"mid and nb must both be \(N, 32, H, W\)"):
        att(np.zeros((1, 32, 4, 4), np.float32), np.zeros((1, 32, 4, 5), np.float32))
    empty, wide = np.zeros(0, np.float32), np.zeros((512, 1024), np.float32)
    with pytest.raises(ValueError, match="expected 4294967296"):  # sizes computed without int overflow
        attention._conv.attention(
            empty,
            empty,
            wide,
            wide[0, :512],
            wide,
            wide[0, :512],
            np.zeros(36, np.float32),
            np.zeros(2, np.float32),
            empty,
            1 << 22,
            1024,
            512,
            1,
            1,
        )
    with pytest.raises(ValueError, match="expected"):  # the native side checks sizes too
        attention._conv.attention(
            *(np.zeros(s, np.float32) for s in ((1, 32, 4, 4), (1, 32, 4, 4))),
            *ws,
            np.empty((1, 31, 4, 4), np.float32),
            1,
            32,
            16,
            4,
            4,
        )
