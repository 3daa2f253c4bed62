"""The native convolutions (service/kernels/conv.py): float32 direct and bfloat16 AMX, against references.

The AMX kernels round inputs and weights to bfloat16 and sum in float32, so they are compared
with a float64 convolution of the bfloat16-rounded operands (tight) and with float32 (bf16-loose).
AMX tests skip on a CPU without AMX, as CUDA tests do without a GPU.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from service.kernels import conv, deform
from tests.service.kernels.test_deform import ort_deform

pytestmark = pytest.mark.skipif(not conv.BUILT, reason="service.kernels._conv is not built")
needs_amx = pytest.mark.skipif(not conv.AMX, reason=f"no AMX here: {conv.WHY_NOT_AMX}")


def bf16(a: np.ndarray) -> np.ndarray:
    """Values rounded to bfloat16, as float64."""
    return (conv.to_bfloat16(a).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def reference(x, weight, bias, activation="none", clip=None):
    """float64 3x3 convolution (padding 1), then the activation."""
    n, cin, h, w = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, weight.shape[0], h, w)) + bias.astype(np.float64)[None, :, None, None]
    for dy in range(3):
        for dx in range(3):
            out += np.einsum(
                "oc,nchw->nohw", weight[:, :, dy, dx].astype(np.float64), padded[:, :, dy : dy + h, dx : dx + w]
            )
    if activation == "relu":
        out = np.maximum(out, 0)
    elif activation == "soft_threshold":
        out = out - np.clip(out, *clip)
    return out


def operands(n, cin, cout, h, w, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    weight = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    return x, weight, bias


ACTIVATIONS = [("none", None), ("relu", None), ("soft_threshold", (-0.3, 0.2))]


def test_kernel_choice():
    assert conv.kernel_for(32, 32) == conv.kernel_for(64, 18) == "amx"
    assert conv.kernel_for(1, 32) == conv.kernel_for(32, 1) == conv.kernel_for(5, 32) == "direct"
    assert conv.kernel_for(16, 16) is None and conv.kernel_for(32, 12) is None  # left to ONNX Runtime


def test_bfloat16_rounding_is_to_nearest_even():
    a = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, np.inf, np.nan, 0.0], np.float32)
    got = (conv.to_bfloat16(a).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got[:5], [1.0, 1.0, 1.0 + 2**-6, -2.5, np.inf])  # ties to even
    assert np.isnan(got[5]) and got[6] == 0.0


@pytest.mark.parametrize(
    "n,cin,cout,h,w",
    [(3, 1, 32, 33, 33), (2, 32, 1, 33, 33), (2, 5, 32, 9, 13), (1, 2, 2, 4, 3), (2, 3, 7, 1, 1), (1, 8, 40, 17, 2)],
)
@pytest.mark.parametrize("activation,clip", ACTIVATIONS)
def test_direct_equals_float64(n, cin, cout, h, w, activation, clip):
    x, weight, bias = operands(n, cin, cout, h, w)
    got = conv.Conv3x3(weight, bias, "direct", activation, clip)(x)
    want = reference(x, weight, bias, activation, clip)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_amx
@pytest.mark.parametrize(
    "n,cin,cout,h,w",
    [
        (3, 32, 32, 33, 33),
        (2, 32, 18, 33, 33),
        (1, 64, 48, 17, 40),
        (2, 32, 16, 5, 3),
        (1, 96, 32, 1, 1),
        (1, 32, 33, 2, 70),
    ],
)
@pytest.mark.parametrize("activation,clip", ACTIVATIONS)
def test_amx_equals_bfloat16_rounded_convolution(n, cin, cout, h, w, activation, clip):
    x, weight, bias = operands(n, cin, cout, h, w, seed=cin + cout)
    got = conv.Conv3x3(weight, bias, "amx", activation, clip)(x)
    scale = np.abs(reference(x, weight, bias)).max()
    exact_bf16 = reference(bf16(x), bf16(weight), bias, activation, clip)
    np.testing.assert_allclose(got, exact_bf16, rtol=1e-5, atol=1e-5 * scale)  # only the sums' order differs
    fp32 = reference(x, weight, bias, activation, clip)
    assert np.abs(got - fp32).max() < 1e-2 * scale  # bfloat16 keeps 8 significant bits


@needs_amx
def test_amx_threads_split_the_batch_identically():
    x, weight, bias = operands(7, 32, 32, 33, 33)
    one = conv.Conv3x3(weight, bias, "amx", "relu")(x)
    three = conv.Conv3x3(weight, bias, "amx", "relu", threads=3)(x)
    np.testing.assert_array_equal(one, three)


@needs_amx
def test_amx_releases_the_gil():
    x, weight, bias = operands(1024, 32, 32, 33, 33)  # 50-150 ms here
    kernel = conv.Conv3x3(weight, bias, "amx")
    ticks, done = [], threading.Event()

    def count():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    start = time.perf_counter()
    kernel(x)
    end = time.perf_counter()
    done.set()
    t.join()
    assert end - start > 0.02
    assert sum(start < s < end for s in ticks) >= 5  # the counter ran while the kernel did


@needs_amx
@pytest.mark.parametrize(
    "n,cin,cout,h,w", [(2, 32, 32, 33, 33), (1, 64, 48, 9, 20), (2, 32, 16, 1, 1), (1, 32, 32, 3, 40)]
)
def test_amx_deform_equals_onnxruntime_within_bfloat16(n, cin, cout, h, w):
    rng = np.random.default_rng(cin + h)
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    offset = (rng.standard_normal((n, 18, h, w)) * 3).astype(np.float32)
    offset[:, :, ::3] = np.round(offset[:, :, ::3])  # integer points, the far edge and -1 included
    weight = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    want = ort_deform(x, offset, weight, bias)
    got = deform.DeformConv3x3(weight, bias, kernel="amx")(x, offset)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()
    plain = deform.DeformConv3x3(weight, bias)(x, offset)  # the float32 kernel is much closer
    assert np.abs(plain - want).max() < 1e-5 * np.abs(want).max()


@needs_amx
def test_amx_deform_nan_and_far_offsets_read_zero():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 32, 6, 7)).astype(np.float32)
    x[0, :, 0, 0] = np.inf  # never 0 * inf: outside corners read a zero row
    weight = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    bias = np.arange(32, dtype=np.float32)
    offset = np.full((1, 18, 6, 7), np.nan, np.float32)
    offset[:, :, 3:] = 1e9
    got = deform.DeformConv3x3(weight, bias, kernel="amx")(x, offset)
    np.testing.assert_array_equal(got, np.broadcast_to(bias[None, :, None, None], got.shape))


def test_bad_arguments_are_refused():
    x, weight, bias = operands(1, 5, 32, 4, 4)
    with pytest.raises(ValueError, match="does not take"):  # a 32-channel conv is the AMX kernel's
        conv.Conv3x3(operands(1, 32, 32, 4, 4)[1], None, "direct")
    kernel = conv.Conv3x3(weight, bias, "direct", "relu")
    with pytest.raises(ValueError, match=r"x must be \(N, 5, H, W\)"):
        kernel(x[:, :3])
    with pytest.raises(ValueError, match="clip"):
        conv.Conv3x3(weight, bias, "direct", "soft_threshold")
    with pytest.raises(ValueError, match="activation"):
        conv.Conv3x3(weight, bias, "direct", "gelu")
    with pytest.raises(ValueError, match=r"bias must be \(32,\)"):
        conv.Conv3x3(weight, bias[:3], "direct")
    with pytest.raises(TypeError, match="format"):
        conv._conv.direct_conv(
            x.astype(np.float64), weight, bias, 0, 0.0, 0.0, np.empty((1, 32, 4, 4), np.float32), 1, 5, 32, 4, 4
        )
    with pytest.raises(ValueError, match="expected"):
        conv._conv.direct_conv(x, weight, bias, 0, 0.0, 0.0, np.empty((1, 31, 4, 4), np.float32), 1, 5, 32, 4, 4)
    with pytest.raises(ValueError, match="bad dimensions"):
        conv._conv.direct_conv(x, weight, bias, 7, 0.0, 0.0, np.empty((1, 32, 4, 4), np.float32), 1, 5, 32, 4, 4)


def test_amx_refuses_to_run_without_amx(monkeypatch):
    if conv.AMX:
        x, weight, bias = operands(1, 32, 32, 4, 4)
        packed, tiles = conv.pack_weight(weight)
        with pytest.raises(ValueError, match="bad dimensions"):  # C_in not a multiple of 32
            conv._conv.amx_conv(x[:, :16], packed, bias, 0, 0.0, 0.0, np.empty_like(x), 1, 16, tiles, 32, 4, 4)
    monkeypatch.setattr(conv, "AMX", False)
    with pytest.raises(RuntimeError, match="cannot run here"):
        conv.Conv3x3(np.zeros((32, 32, 3, 3), np.float32), kernel="amx")


@pytest.mark.parametrize("kernel,cin,cout", [("direct", 1, 32)] + ([("amx", 32, 32)] if conv.AMX else []))
def test_folded_activations_follow_onnx_for_nan_and_reversed_bounds(kernel, cin, cout):
    """Relu keeps a NaN (the service's finiteness check must still see it); Clip is
    min(max(v, lo), hi) as in ONNX, even with lo > hi (which the card refuses anyway)."""
    x, weight, bias = operands(1, cin, cout, 5, 6)
    x[0, :, 2, 3] = np.nan
    y = conv.Conv3x3(weight, bias, kernel, "relu")(x)
    assert np.isnan(y[0, :, 2, 3]).all() and np.isfinite(y[0, :, 0, 0]).all()
    assert (y[np.isfinite(y)] >= 0).all()
    clean = operands(1, cin, cout, 5, 6)[0]
    plain = conv.Conv3x3(weight, bias, kernel, "none")(clean)
    reversed_bounds = conv.Conv3x3(weight, bias, kernel, "soft_threshold", (0.5, -0.5))(clean)
    np.testing.assert_allclose(reversed_bounds, plain - (-0.5), rtol=1e-6, atol=1e-6)


def chain_of(*layers, seed=0):
    """Conv3x3s from (kernel, cin, cout, activation, clip) tuples, random weights and biases."""
    rng = np.random.default_rng(seed)
    convs = []
    for kernel, cin, cout, activation, clip in layers:
        weight = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        convs.append(conv.Conv3x3(weight, rng.standard_normal(cout).astype(np.float32), kernel, activation, clip))
    return convs


CHAINS = {
    "ista stage": [
        ("direct", 1, 32, "relu", None),
        ("amx", 32, 32, "soft_threshold", (-0.3, 0.2)),
        ("amx", 32, 32, "relu", None),
        ("direct", 32, 1, "none", None),
    ],
    "residual body": [("amx", 32, 32, "relu", None), ("amx", 32, 32, "none", None)],
    "every hand-over": [
        ("direct", 5, 32, "relu", None),
        ("amx", 32, 64, "relu", None),
        ("amx", 64, 32, "relu", None),
        ("direct", 32, 4, "soft_threshold", (-0.1, 0.1)),
        ("direct", 4, 32, "relu", None),
        ("amx", 32, 18, "none", None),
    ],
}


@needs_amx
@pytest.mark.parametrize("name", list(CHAINS))
@pytest.mark.parametrize("n,h,w", [(3, 33, 33), (2, 7, 9), (1, 1, 1), (2, 16, 40)])
def test_chain_computes_exactly_what_the_convs_do_one_by_one(name, n, h, w):
    """Same bfloat16 rounding points and float32 sums: bit for bit, padding included (odd sizes,
    a 1 x 1 map, widths past one 16-position vector)."""
    convs = chain_of(*CHAINS[name])
    x = (3 * np.random.default_rng(1).standard_normal((n, convs[0].cin, h, w))).astype(np.float32)
    expected = x
    for c in convs:
        expected = c(expected)
    got = conv.ConvChain(convs)(x)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@needs_amx
def test_chain_keeps_nan_and_splits_the_batch_identically():
    convs = chain_of(*CHAINS["ista stage"])
    x = np.random.default_rng(2).standard_normal((5, 1, 33, 33)).astype(np.float32)
    x[3, 0, 10, 10] = np.nan
    one = conv.ConvChain(convs)(x)
    assert np.isnan(one[3]).any() and np.isfinite(one[[0, 1, 2, 4]]).all()
    threaded = [
        conv.Conv3x3(
            c.weight, c.bias, c.kernel, c.activation, c.clip if c.activation == "soft_threshold" else None, threads=2
        )
        for c in convs
    ]
    np.testing.assert_array_equal(conv.ConvChain(threaded)(x), one)


@needs_amx
def test_chain_refuses_convs_that_do_not_fit():
    with pytest.raises(ValueError, match="2 to"):
        conv.ConvChain(chain_of(("amx", 32, 32, "relu", None)))
    with pytest.raises(ValueError, match="cannot follow"):  # channel counts differ
        conv.ConvChain(chain_of(("amx", 32, 32, "relu", None), ("direct", 5, 32, "none", None)))
    chain = conv.ConvChain(chain_of(*CHAINS["residual body"]))
    with pytest.raises(ValueError, match=r"x must be \(N, 32, H, W\)"):
        chain(np.zeros((1, 5, 4, 4), np.float32))
    layers = list(chain._layers)
    layers[1] = (1, layers[1][1], layers[1][2], 0, 0.0, 0.0, 16, 32, 32)  # C_in 16 after 32 outputs
    with pytest.raises(ValueError, match="bad dimensions|does not take"):
        conv._conv.chain_conv(np.zeros((1, 32, 4, 4), np.float32), np.empty((1, 32, 4, 4), np.float32), 1, 4, 4, layers)
    with pytest.raises(TypeError, match="layer 0 is not a tuple"):
        conv._conv.chain_conv(
            np.zeros((1, 32, 4, 4), np.float32), np.empty((1, 32, 4, 4), np.float32), 1, 4, 4, [list(chain._layers[0])]
        )
    with pytest.raises(ValueError, match="expected"):  # output of the wrong size
        conv._conv.chain_conv(
            np.zeros((1, 32, 4, 4), np.float32), np.empty((1, 31, 4, 4), np.float32), 1, 4, 4, chain._layers
        )


@pytest.mark.parametrize(
    "kernel,cin,cout", [("direct", 5, 32), ("direct", 32, 1)] + ([("amx", 32, 32)] if conv.AMX else [])
)
def test_a_folded_residual_is_added_after_the_activation(kernel, cin, cout):
    """A residual block's x + body(x): the Add a step folds in, after the activation."""
    x, weight, bias = operands(3, cin, cout, 7, 9)
    r = np.random.default_rng(5).standard_normal((3, cout, 7, 9)).astype(np.float32)
    plain = conv.Conv3x3(weight, bias, kernel, "relu")(x)
    with_r = conv.Conv3x3(weight, bias, kernel, "relu", residual=True)
    np.testing.assert_array_equal(with_r(x, r), plain + r)
    np.testing.assert_array_equal(conv.Conv3x3(weight, bias, kernel, "relu", threads=2, residual=True)(x, r), plain + r)
    with pytest.raises(ValueError, match="adds a residual: pass one"):
        with_r(x)
    with pytest.raises(ValueError, match=r"residual must be \(3, %d, 7, 9\)" % cout):
        with_r(x, r[:, :, :6])
    with pytest.raises(ValueError, match="takes no residual"):
        conv.Conv3x3(weight, bias, kernel, "relu")(x, r)


@needs_amx
def test_a_chain_adds_the_residual_of_its_last_conv_only():
    body = chain_of(*CHAINS["residual body"])
    last = body[1]
    with_r = [body[0], conv.Conv3x3(last.weight, last.bias, "amx", "none", residual=True)]
    x = np.random.default_rng(6).standard_normal((2, 32, 33, 33)).astype(np.float32)
    np.testing.assert_array_equal(conv.ConvChain(with_r)(x, x), conv.ConvChain(body)(x) + x)
    first_r = [conv.Conv3x3(body[0].weight, body[0].bias, "amx", "relu", residual=True), last]
    with pytest.raises(ValueError, match="cannot follow"):
        conv.ConvChain(first_r)
    with pytest.raises(ValueError, match="adds a residual"):
        conv.ConvChain(with_r)(x)
