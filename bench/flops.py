"""FLOPs of DeRefNet per frame and per window, counted analytically from the model config.

Counting rules (stated in the report): a multiply-add is 2 FLOPs; a k x k convolution from Cin
to Cout channels on an H x W map costs 2 * Cin * Cout * k * k * H * W (padding ignored, biases
and activations not counted); a matrix product (m x n) @ (n x p) costs 2 * m * n * p; a
deformable 3x3 convolution costs its dense convolution plus bilinear sampling of every
(channel, tap, position): 4 taps, 2 FLOPs each (8 per sampled value); elementwise operations
(gradient-step update, soft threshold, gates, residual adds) are counted at 1 FLOP per element
per operation. The training-only symmetry branch and the (folded) gate MLP are not counted.
"""

from __future__ import annotations


def conv(cin: int, cout: int, k: int, hw: int) -> int:
    return 2 * cin * cout * k * k * hw


def encoder_flops(cfg: dict) -> dict:
    """One frame through the initialisation and the ISTA stages."""
    n_lr = cfg["size"] ** 2
    hw = (cfg["size"] * cfg["ratio"]) ** 2
    c = cfg["channels"]
    init = 2 * (2 * n_lr * hw)  # Phi^T L and Qinit L
    per_stage = (
        2 * (2 * n_lr * hw)  # (h Phi^T) Phi, computed as two products with Phi (DeRefNet.IstaStage)
        + 4 * hw  # r = h - rho*(..) + rho*Phi^T L
        + conv(1, c, 3, hw)
        + conv(c, c, 3, hw)  # forward transform G
        + 2 * c * hw  # soft threshold g - clip(g, -theta, theta)
        + conv(c, c, 3, hw)
        + conv(c, 1, 3, hw)  # inverse transform
    )
    return {"init": init, "per_stage": per_stage, "stages": cfg["stages"], "total": init + cfg["stages"] * per_stage}


def head_flops(cfg: dict) -> dict:
    """One window's head: gates, TDFA for the 4 neighbours, fusion."""
    hw = (cfg["size"] * cfg["ratio"]) ** 2
    c, w = cfg["channels"], cfg["window"]
    deform = conv(c, c, 3, hw) + 8 * 9 * c * hw
    tdfa = (
        2 * conv(1, c, 3, hw)  # embed middle and neighbour
        + 2 * conv(c, c // 2, 1, hw)
        + conv(2, 2, 3, hw)
        + 3 * c * hw  # selective attention
        + 2 * conv(c, 18, 3, hw)  # offsets
        + 2 * deform
        + conv(c, 1, 3, hw)
    )
    fusion = conv(w, c, 3, hw) + cfg["res_blocks"] * (2 * conv(c, c, 3, hw) + c * hw) + conv(c, 1, 3, hw)
    gates = w * hw
    return {"gates": gates, "tdfa_per_neighbour": tdfa, "fusion": fusion, "total": gates + (w - 1) * tdfa + fusion}


def window_flops(cfg: dict) -> dict:
    """Per window: uncached (5 frames encoded) and streaming (1 new frame encoded)."""
    enc, head = encoder_flops(cfg), head_flops(cfg)
    return {
        "encoder_per_frame": enc["total"],
        "head_per_window": head["total"],
        "uncached_per_window": cfg["window"] * enc["total"] + head["total"],
        "streaming_per_window": enc["total"] + head["total"],
        "encoder": enc,
        "head": head,
        "rules": __doc__.split("\n\n", 1)[1].strip(),
    }
