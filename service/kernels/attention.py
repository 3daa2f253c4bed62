"""Native selective attention of the AMX split head (C source: service/kernels/_native/conv.c).

DeRefNet's alignment weighs the middle and neighbour features of each pair by two attention
maps (``SelectiveAttention`` in training/model.py, after SeqCSIST's TDFA): 1x1 convs squeeze
both to half the channels, the channel mean and max of the squeezed pair go through a 3x3 conv
(2 -> 2) and a sigmoid, and each half is scaled by its map. In ONNX Runtime that is 13 nodes
with layout reorders and copies between them, for a few multiply-adds per value; this computes
it in one float32 pass per map. ``csist split-amx`` cuts it out of the head as one step and
checks it against ONNX Runtime's nodes.

    att = SelectiveAttention(w_mid, b_mid, w_nb, b_nb, w_mix, b_mix)  # (C/2, C, 1, 1) ... (2, 2, 3, 3)
    y = att(mid, nb)                                                # (N, C, H, W) x 2 -> (N, C, H, W)
"""

from __future__ import annotations

import numpy as np

from service.kernels.conv import WHY_NOT_AMX, _conv, in_slices, thread_pool

AVAILABLE = _conv is not None


class SelectiveAttention:
    """(mid, nb) -> (a * s_0, b * s_1) with a, b the squeezed features and s the sigmoid maps."""

    def __init__(self, w_mid, b_mid, w_nb, b_nb, w_mix, b_mix, threads: int = 1):
        if _conv is None:
            raise RuntimeError(WHY_NOT_AMX)
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in (w_mid, b_mid, w_nb, b_nb, w_mix, b_mix)]
        self.w_mid, self.b_mid, self.w_nb, self.b_nb, self.w_mix, self.b_mix = arrays
        half, cin = self.w_mid.shape[:2]
        for name, a, shape in (
            ("mid weight", self.w_mid, (half, cin, 1, 1)),
            ("mid bias", self.b_mid, (half,)),
            ("nb weight", self.w_nb, (half, cin, 1, 1)),
            ("nb bias", self.b_nb, (half,)),
            ("mix weight", self.w_mix, (2, 2, 3, 3)),
            ("mix bias", self.b_mix, (2,)),
        ):
            if a.shape != shape:
                raise ValueError(f"{name} must be {shape}, got {a.shape}")
        self.cin, self.half = int(cin), int(half)
        self.threads = max(1, int(threads))
        self._pool = thread_pool(self.threads, "attention")

    def __call__(self, mid: np.ndarray, nb: np.ndarray) -> np.ndarray:
        mid = np.ascontiguousarray(mid, dtype=np.float32)
        nb = np.ascontiguousarray(nb, dtype=np.float32)
        if mid.ndim != 4 or mid.shape[1] != self.cin or nb.shape != mid.shape:
            raise ValueError(f"mid and nb must both be (N, {self.cin}, H, W), got {mid.shape} and {nb.shape}")
        out = np.empty((mid.shape[0], 2 * self.half, *mid.shape[2:]), np.float32)
        in_slices(self._run, self._pool, self.threads, mid.shape[0], mid, nb, out)
        return out

    def _run(self, mid: np.ndarray, nb: np.ndarray, out: np.ndarray) -> None:
        n, _, h, w = mid.shape
        _conv.attention(
            mid,
            nb,
            self.w_mid,
            self.b_mid,
            self.w_nb,
            self.b_nb,
            self.w_mix,
            self.b_mix,
            out,
            n,
            self.cin,
            self.half,
            h,
            w,
        )
