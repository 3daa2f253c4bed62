"""The native deformable convolution against ONNX Runtime's DeformConv (the operator it replaces)."""

from __future__ import annotations

import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.kernels import deform

pytestmark = pytest.mark.skipif(not deform.AVAILABLE, reason="service.kernels._deform is not built")


def ort_deform(x, offset, weight, bias):
    node = helper.make_node("DeformConv", ["x", "w", "offset", "b"], ["y"], pads=[1, 1, 1, 1])
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("x", f32, list(x.shape)),
            helper.make_tensor_value_info("offset", f32, list(offset.shape)),
        ],
        [helper.make_tensor_value_info("y", f32, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x, "offset": offset})[0]


@pytest.mark.parametrize(
    "n,cin,cout,h,w", [(2, 32, 32, 33, 33), (3, 4, 4, 33, 33), (1, 5, 7, 6, 9), (2, 32, 64, 5, 4), (1, 1, 1, 1, 1)]
)
def test_equals_onnxruntime_deformconv(n, cin, cout, h, w):
    rng = np.random.default_rng(cin * 100 + cout)
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    # Offsets up to several pixels: samples leave the map on every side, and some land exactly
    # on integer positions (including -1 and the far edge, where torchvision's rule reads 0).
    offset = (rng.standard_normal((n, 18, h, w)) * 3).astype(np.float32)
    offset[:, :, ::3] = np.round(offset[:, :, ::3])
    weight = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    got = deform.DeformConv3x3(weight, bias)(x, offset)
    want = ort_deform(x, offset, weight, bias)
    assert got.shape == want.shape == (n, cout, h, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_zero_offsets_are_a_plain_convolution():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 7, 8)).astype(np.float32)
    weight = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    got = deform.DeformConv3x3(weight)(x, np.zeros((1, 18, 7, 8), np.float32))
    padded = np.pad(x[0], ((0, 0), (1, 1), (1, 1)))
    want = np.zeros((2, 7, 8), np.float32)
    for i in range(7):
        for j in range(8):
            want[:, i, j] = np.tensordot(weight, padded[:, i : i + 3, j : j + 3], axes=3)
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


def test_non_finite_and_far_offsets_read_zero():
    x = np.ones((1, 2, 5, 5), np.float32)
    weight = np.ones((1, 2, 3, 3), np.float32)
    offset = np.full((1, 18, 5, 5), np.nan, np.float32)
    offset[0, :, 0, 0] = 1e9
    offset[0, :, 0, 1] = -np.inf
    out = deform.DeformConv3x3(weight, np.array([0.5], np.float32))(x, offset)
    assert np.all(out == 0.5)  # only the bias: every sample is outside or undefined


def test_bad_shapes_name_the_argument():
    conv = deform.DeformConv3x3(np.zeros((4, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="x must be"):
        conv(np.zeros((1, 2, 5, 5), np.float32), np.zeros((1, 18, 5, 5), np.float32))
    with pytest.raises(ValueError, match="offset must be"):
        conv(np.zeros((1, 3, 5, 5), np.float32), np.zeros((1, 18, 5, 4), np.float32))
    with pytest.raises(ValueError, match="weight must be"):
        deform.DeformConv3x3(np.zeros((4, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match="bias must be"):
        deform.DeformConv3x3(np.zeros((4, 3, 3, 3), np.float32), np.zeros(3, np.float32))


def test_non_contiguous_and_float64_input_is_converted():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 6, 6))
    offset = rng.standard_normal((2, 18, 6, 6))
    weight = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    conv = deform.DeformConv3x3(weight)
    want = conv(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(offset, np.float32))
    got = conv(np.asfortranarray(x), offset[:, :, :, :])
    np.testing.assert_array_equal(got, want)


def test_releases_the_gil():
    """A pure-Python thread keeps running during the call (an inference worker on the other core).

    With the GIL held, it could run only in the interpreter's switch intervals (5 ms), not for
    most of a call of 100 ms or more.
    """
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 32, 33, 33)).astype(np.float32)
    offset = rng.standard_normal((256, 18, 33, 33)).astype(np.float32)
    conv = deform.DeformConv3x3(rng.standard_normal((32, 32, 3, 3)).astype(np.float32))
    counter = [0]
    done = threading.Event()

    def spin():
        while not done.is_set():
            counter[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        time.sleep(0.05)
        c0, t0 = counter[0], time.perf_counter()
        time.sleep(0.05)
        rate = (counter[0] - c0) / (time.perf_counter() - t0)  # steps per second, spinning alone
        c0, t0 = counter[0], time.perf_counter()
        conv(x, offset)
        during, seconds = counter[0] - c0, time.perf_counter() - t0
    finally:
        done.set()
        spinner.join()
    assert seconds > 0.05, "call too short to tell"
    assert during > 0.4 * rate * seconds


def test_threads_split_the_batch_without_changing_the_answer():
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    one, three = deform.DeformConv3x3(weight), deform.DeformConv3x3(weight, threads=3)
    for n in (1, 2, 7):
        x = rng.standard_normal((n, 32, 9, 9)).astype(np.float32)
        offset = rng.standard_normal((n, 18, 9, 9)).astype(np.float32)
        np.testing.assert_array_equal(three(x, offset), one(x, offset))


def test_outside_corners_do_not_read_a_pixel():
    """A corner outside the map reads zeros, not pixel (0, 0): an inf there stays local."""
    x = np.ones((1, 2, 8, 8), np.float32)
    x[0, :, 0, 0] = np.inf
    offset = np.full((1, 18, 8, 8), 0.5, np.float32)  # every sample half a pixel down-right
    out = deform.DeformConv3x3(np.ones((3, 2, 3, 3), np.float32))(x, offset)
    assert np.isfinite(out[:, :, 2:, 2:]).all()  # samples there never reach pixel (0, 0)
    want = ort_deform(np.ones_like(x), offset, np.ones((3, 2, 3, 3), np.float32), np.zeros(3, np.float32))
    np.testing.assert_allclose(out[:, :, 2:, 2:], want[:, :, 2:, 2:], rtol=1e-6)


def test_raw_entry_point_checks_types_and_sizes():
    from service.kernels import _deform

    f32 = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    with pytest.raises(TypeError, match="x: expected float32"):
        _deform.run(
            np.zeros((1, 1, 2, 2), np.int32), f32(1, 18, 2, 2), f32(9, 1), f32(1), f32(1, 1, 2, 2), 1, 1, 1, 2, 2
        )
    with pytest.raises(ValueError, match="offset: expected 72 float32 values"):
        _deform.run(f32(1, 1, 2, 2), f32(1, 18, 2, 1), f32(9, 1), f32(1), f32(1, 1, 2, 2), 1, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="bad dimensions"):
        _deform.run(f32(1), f32(1), f32(1), f32(1), f32(1), 1, 4096, 4096, 1000, 1000)
    # sizes are computed in 64 bits: a huge batch does not wrap around to the small buffer
    with pytest.raises(ValueError, match="x: expected"):
        _deform.run(f32(0), f32(0), f32(9 * 4096), f32(1), f32(0), 2**20, 4096, 1, 1, 1)
