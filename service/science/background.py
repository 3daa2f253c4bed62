"""Background and noise of a patch: one robust plane per frame (docs/method.md section 6).

A tracker's patch is never background-subtracted perfectly: it carries a sensor offset, a
gradient across the patch (sky brightness, a cloud edge far wider than the patch) and noise of
any level. DeRefNet was trained on patches whose background is 0, and its linear first stage
turns a pedestal into spurious targets, so the frames it sees are *conditioned* first: each
frame's background plane is removed and the result clipped at 0, which turns a patch with a
pedestal or a ramp into the dark-background patch the network knows. On such a patch (noise
clipped at 0) the plane is 0 and conditioning leaves it unchanged. The fit
(:mod:`service.science.refine`) starts its own background term from the same plane.

The plane is a least-absolute-deviation fit (a median plane) over the frame's pixels, computed
by iteratively reweighted least squares, with pixels far above the current plane (targets,
hot pixels) given no weight: targets cover a small part of a patch but are bright, so a
least-squares plane would be pulled up under them, and a median plane is not. The median also
makes the plane 0 on a dark frame whose noise was clipped at 0 (more than half its pixels are 0);
a frame with more than a quarter of its pixels at exactly 0 is taken for such a frame (its
background is at or below the sensor's floor) and given the plane 0.

Each frame gets its own plane, so that a frame's conditioned copy does not depend on the other
frames of its window: the service encodes each streamed frame once and reuses its features in
the five windows that hold it.
"""

from __future__ import annotations

import numpy as np

ITERATIONS = 8
CLIP_Z = 3.0  # pixels this many noise sigmas above the plane count as signal, not background
MAD_TO_SIGMA = 1.4826
DARK_SHARE = 0.25  # a frame with more of its pixels at exactly 0 was clipped at the sensor's floor


def plane_basis(height: int, width: int) -> np.ndarray:
    """(H*W, 3): columns 1, x - xc, y - yc at the pixel centres (x = column, y = row)."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.column_stack(
        [np.ones(height * width), (cols - (width - 1) / 2).ravel(), (rows - (height - 1) / 2).ravel()]
    )


def fit_planes(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background plane and noise sigma of every frame of (..., H, W).

    Returns ``coef`` (..., 3), the plane ``c0 + c1 (x - xc) + c2 (y - yc)`` in grey levels per
    pixel, and ``sigma`` (...,), the robust standard deviation (1.4826 MAD) of the pixels the
    plane kept, about them.
    """
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim < 2:
        raise ValueError(f"frames must be (..., H, W), got shape {frames.shape}")
    lead, (h, w) = frames.shape[:-2], frames.shape[-2:]
    y = frames.reshape(-1, h * w)  # (N, P)
    basis = plane_basis(h, w)  # (P, 3)
    coef = np.zeros((len(y), 3))
    coef[:, 0] = np.median(y, axis=1)
    sigma = np.ones(len(y))
    for _ in range(ITERATIONS):
        r = y - coef @ basis.T  # (N, P)
        keep = r < CLIP_Z * np.maximum(sigma, 0.5)[:, None]
        sigma = _robust_sigma(r, keep)
        # L1 by IRLS: weight 1/|r|, floored so that exact fits (flat noise-free frames) stay finite
        wts = keep / np.maximum(np.abs(r), 0.05 * np.maximum(sigma, 1.0)[:, None])
        gram = (wts[:, None, :] * basis.T[None]) @ basis  # (N, 3, 3)
        gram[:, np.arange(3), np.arange(3)] += 1e-9
        coef = np.linalg.solve(gram, ((wts * y) @ basis)[..., None])[..., 0]
    coef[np.mean(y == 0.0, axis=1) > DARK_SHARE] = 0.0
    r = y - coef @ basis.T
    sigma = _robust_sigma(r, r < CLIP_Z * np.maximum(sigma, 0.5)[:, None])
    return coef.reshape(*lead, 3), sigma.reshape(lead)


def _robust_sigma(r: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """1.4826 x the median absolute residual of the kept pixels of each row (N,)."""
    a = np.sort(np.where(keep, np.abs(r), np.inf), axis=1)
    n = keep.sum(axis=1)
    mid = a[np.arange(len(a)), np.maximum(n - 1, 0) // 2]
    return np.where(n > 0, MAD_TO_SIGMA * mid, 0.0)


def plane_image(coef: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., H, W) background of planes ``coef`` (..., 3)."""
    coef = np.asarray(coef, dtype=np.float64)
    return (coef @ plane_basis(height, width).T).reshape(*coef.shape[:-1], height, width)


def condition(frames: np.ndarray) -> np.ndarray:
    """The network's input: every frame of (..., H, W) minus its background plane, clipped at 0,
    as float32."""
    frames = np.asarray(frames)
    h, w = frames.shape[-2:]
    coef, _ = fit_planes(frames)
    out = frames - plane_image(coef, h, w)
    return np.maximum(out, 0.0, out=out).astype(np.float32)
