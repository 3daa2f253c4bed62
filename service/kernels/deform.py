"""The native 3x3 deformable convolution of the window head (C source: service/kernels/_native/deform.c).

ONNX Runtime's CPU ``DeformConv`` recomputes each sample's bilinear weights for every input
channel; this kernel computes the same function (torchvision / ONNX ``DeformConv`` semantics,
checked against both by the tests) with the weights computed once per sample. Whether it is
faster on a host is measured there (the ``native-deform`` plan is timed against the stock plan
at start-up). It is built at install time as the optional extension
``service.kernels._deform``; :data:`AVAILABLE` says whether it was, and the service falls back to
ONNX Runtime's kernel when it was not (the ``native-deform`` and ``amx`` execution plans use it).

    conv = DeformConv3x3(weight, bias)   # weight (C_out, C_in, 3, 3)
    y = conv(x, offset)                  # x (N, C_in, H, W), offset (N, 18, H, W) -> (N, C_out, H, W)

``kernel="amx"`` computes the same sampling in float32 but multiplies the sampled columns on
Intel AMX tiles in bfloat16 (service/kernels/_native/conv.c; C_in a multiple of 32), for a model split by
``csist split-amx``.

The call releases the GIL, so inference workers on separate threads run it in parallel; with
``threads`` > 1 one call also spreads its batch over that many threads.
"""

from __future__ import annotations

import numpy as np

from service.kernels import conv

try:
    from service.kernels import _deform
except ImportError:  # installed without a C compiler: ONNX Runtime's DeformConv is used instead
    _deform = None

AVAILABLE = _deform is not None
KERNELS = ("native", "amx")


def amx_takes(cin: int, cout: int) -> bool:
    """Whether kernel="amx" computes a DeformConv with these channel counts."""
    return conv.kernel_for(cin, cout) == "amx"


class DeformConv3x3:
    """Stride 1, padding 1, dilation 1, one group and one offset group, no mask."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None, threads: int = 1, kernel: str = "native"):
        if kernel == "native" and _deform is None:
            raise RuntimeError("the native deformable convolution (service.kernels._deform) is not built")
        if kernel == "amx" and not conv.AMX:
            raise RuntimeError(f"the AMX deformable convolution cannot run here: {conv.WHY_NOT_AMX}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel {kernel!r} is not one of {KERNELS}")
        self.weight, self.bias = weight, _ = conv.checked_weights(weight, bias)
        self.cout, self.cin = weight.shape[:2]
        self.kernel = kernel
        if kernel == "amx":
            if not amx_takes(self.cin, self.cout):
                raise ValueError(f"the AMX kernel needs C_in a multiple of 32 and C_out >= 16, got {weight.shape}")
            self.packed, self.cout_tiles = conv.pack_weight(weight)
        else:  # (9 * C_in, C_out): row k * C_in + c holds the weights of tap k, input channel c
            self.wt = np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(9 * self.cin, self.cout))
        # threads > 1: a batch is cut into that many slices computed at once (the kernel itself
        # is single-threaded), for a caller that gives each call all cores (one inference worker).
        self.threads = max(1, int(threads))
        self._pool = conv.thread_pool(self.threads, "deform")

    def __call__(self, x: np.ndarray, offset: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        offset = np.ascontiguousarray(offset, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.cin:
            raise ValueError(f"x must be (N, {self.cin}, H, W), got {x.shape}")
        n, _, h, w = x.shape
        if offset.shape != (n, 18, h, w):
            raise ValueError(f"offset must be {(n, 18, h, w)}, got {offset.shape}")
        out = np.empty((n, self.cout, h, w), np.float32)
        conv.in_slices(self._run, self._pool, self.threads, n, x, offset, out)
        return out

    def _run(self, x: np.ndarray, offset: np.ndarray, out: np.ndarray) -> None:
        if self.kernel == "amx":
            conv._conv.amx_deform(
                x,
                offset,
                self.packed,
                self.bias,
                out,
                x.shape[0],
                self.cin,
                self.cout_tiles,
                self.cout,
                x.shape[2],
                x.shape[3],
            )
            return
        _deform.run(x, offset, self.wt, self.bias, out, x.shape[0], self.cin, self.cout, x.shape[2], x.shape[3])
