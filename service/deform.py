"""The native 3x3 deformable convolution of the window head (C source: service/_native/deform.c).

ONNX Runtime's CPU ``DeformConv`` took 61 % of the head's time; this kernel computes the same
function (torchvision / ONNX ``DeformConv`` semantics, checked against both by the tests) about
twice as fast on one thread. It is built at install time as the optional extension
``service._deform``; :data:`AVAILABLE` says whether it was, and the service falls back to
ONNX Runtime's kernel when it was not (see ``CSIST_DEFORM_KERNEL``).

    conv = DeformConv3x3(weight, bias)   # weight (C_out, C_in, 3, 3)
    y = conv(x, offset)                  # x (N, C_in, H, W), offset (N, 18, H, W) -> (N, C_out, H, W)

The call releases the GIL, so inference workers on separate threads run it in parallel; with
``threads`` > 1 one call also spreads its batch over that many threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    from service import _deform
except ImportError:  # installed without a C compiler: ONNX Runtime's DeformConv is used instead
    _deform = None

AVAILABLE = _deform is not None


class DeformConv3x3:
    """Stride 1, padding 1, dilation 1, one group and one offset group, no mask."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None, threads: int = 1):
        if _deform is None:
            raise RuntimeError("the native deformable convolution (service._deform) is not built")
        weight = np.asarray(weight, dtype=np.float32)
        if weight.ndim != 4 or weight.shape[2:] != (3, 3):
            raise ValueError(f"weight must be (C_out, C_in, 3, 3), got {weight.shape}")
        self.weight = weight
        self.cout, self.cin = weight.shape[:2]
        # (9 * C_in, C_out): row k * C_in + c holds the weights of tap k, input channel c.
        self.wt = np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(9 * self.cin, self.cout))
        self.bias = np.zeros(self.cout, np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        if self.bias.shape != (self.cout,):
            raise ValueError(f"bias must be ({self.cout},), got {self.bias.shape}")
        # threads > 1: a batch is cut into that many slices computed at once (the kernel itself
        # is single-threaded), for a caller that gives each call all cores (one inference worker).
        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="deform") if self.threads > 1 else None

    def __call__(self, x: np.ndarray, offset: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        offset = np.ascontiguousarray(offset, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.cin:
            raise ValueError(f"x must be (N, {self.cin}, H, W), got {x.shape}")
        n, _, h, w = x.shape
        if offset.shape != (n, 18, h, w):
            raise ValueError(f"offset must be {(n, 18, h, w)}, got {offset.shape}")
        out = np.empty((n, self.cout, h, w), np.float32)
        slices = min(self.threads, n)
        if slices <= 1:
            self._run(x, offset, out)
            return out
        bounds = np.linspace(0, n, slices + 1).astype(int)
        parts = [self._pool.submit(self._run, x[a:b], offset[a:b], out[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        for part in parts:
            part.result()
        return out

    def _run(self, x: np.ndarray, offset: np.ndarray, out: np.ndarray) -> None:
        _deform.run(x, offset, self.wt, self.bias, out, x.shape[0], self.cin, self.cout, x.shape[2], x.shape[3])
