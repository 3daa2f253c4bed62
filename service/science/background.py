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

Stuck pixels (:func:`defects`): a hot pixel is a bright spot, and the fit would take it for a
target, or start a missed target there; a dead one pulls the plane and the targets next to it.
Both stay where they are, so they are found over a window's frames, never in one frame alone
(where a narrow, dim target could pass for a hot pixel), and the fit leaves them out.
"""

from __future__ import annotations

import numpy as np

from service.science.physics import pixel_fractions
from service.science.windows import replicated

ITERATIONS = 8
CLIP_Z = 3.0  # pixels this many noise sigmas above the plane count as signal, not background
MAD_TO_SIGMA = 1.4826
DARK_SHARE = 0.25  # a frame with more of its pixels at exactly 0 was clipped at the sensor's floor
DEFECT_Z = 5.0  # a stuck pixel stands this many noise sigmas off its frame's plane, in every frame


def plane_basis(height: int, width: int) -> np.ndarray:
    """(H*W, 3): columns 1, x - xc, y - yc at the pixel centres (x = column, y = row)."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.column_stack(
        [np.ones(height * width), (cols - (width - 1) / 2).ravel(), (rows - (height - 1) / 2).ravel()]
    )


def fit_planes(frames: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Background plane and noise sigma of every frame of (..., H, W).

    Returns ``coef`` (..., 3), the plane ``c0 + c1 (x - xc) + c2 (y - yc)`` in grey levels per
    pixel, and ``sigma`` (...,), the robust standard deviation (1.4826 MAD) of the pixels the
    plane kept, about them. ``valid`` (broadcastable to the frames): the pixels that hold data
    (default all); the others, e.g. the repeated edge of a frame shifted into another patch
    (service.science.windows.register), take no part.
    """
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim < 2:
        raise ValueError(f"frames must be (..., H, W), got shape {frames.shape}")
    lead, (h, w) = frames.shape[:-2], frames.shape[-2:]
    y = frames.reshape(-1, h * w)  # (N, P)
    ok = True if valid is None else np.broadcast_to(np.asarray(valid, dtype=bool), frames.shape).reshape(-1, h * w)
    basis = plane_basis(h, w)  # (P, 3)
    coef = np.zeros((len(y), 3))
    coef[:, 0] = np.median(y, axis=1) if valid is None else _masked_median(y, ok)
    sigma = np.ones(len(y))
    for _ in range(ITERATIONS):
        r = y - coef @ basis.T  # (N, P)
        keep = (r < CLIP_Z * np.maximum(sigma, 0.5)[:, None]) & ok
        sigma = _robust_sigma(r, keep)
        # L1 by IRLS: weight 1/|r|, floored so that exact fits (flat noise-free frames) stay finite
        wts = keep / np.maximum(np.abs(r), 0.05 * np.maximum(sigma, 1.0)[:, None])
        gram = (wts[:, None, :] * basis.T[None]) @ basis  # (N, 3, 3)
        gram[:, np.arange(3), np.arange(3)] += 1e-9
        coef = np.linalg.solve(gram, ((wts * y) @ basis)[..., None])[..., 0]
    coef[np.mean(y == 0.0, axis=1) > DARK_SHARE] = 0.0
    r = y - coef @ basis.T
    sigma = _robust_sigma(r, (r < CLIP_Z * np.maximum(sigma, 0.5)[:, None]) & ok)
    return coef.reshape(*lead, 3), sigma.reshape(lead)


def temporal_noise(windows: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Noise sigma (N,) of each window of (N, F, H, W), from its frames' deviations from their
    mean, after each frame's median level: whatever stays put over a window (pedestal, gradient,
    clutter, fixed pattern) has none, nor has a frame's offset as a whole, so this is the
    sensor's noise alone, where a frame's spread about its plane counts static clutter as noise
    too. 1.349 x the interquartile range of the deviations (targets move over
    few pixels and do not shift it), scaled by sqrt(n / (n - 1)) for the mean taken out.

    A copy of a frame made to fill the window (:func:`service.science.windows.replicated`) is
    left out; with
    fewer than two distinct frames (a track of one frame so far), or no valid pixel, the noise
    cannot be seen and is NaN. ``valid`` (N, H, W): the pixels that hold data in every frame
    (default all).
    """
    w = np.asarray(windows, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"windows must be (N, F, H, W), got shape {w.shape}")
    n, f = w.shape[:2]
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (n, *w.shape[2:]):
            raise ValueError(f"valid must be (N, H, W) = {(n, *w.shape[2:])}, got shape {valid.shape}")
    distinct = ~replicated(w)
    # a frame's own offset (a sensor's gain control, a non-uniformity correction) is not noise
    # of its pixels: each frame's median level is taken out first
    if valid is None or valid.all():
        level = np.median(w.reshape(n, f, -1), axis=2)
    else:
        level = _masked_median(w.reshape(n * f, -1), np.repeat(valid.reshape(n, -1), f, axis=0)).reshape(n, f)
    w = w - level[:, :, None, None]
    count = distinct.sum(axis=1)
    mean = np.einsum("nf,nfhw->nhw", distinct.astype(np.float64), w) / count[:, None, None]
    dev = w - mean[:, None]
    out = np.full(n, np.nan)
    plain = (count == f) & (count > 1)
    if valid is not None:
        plain &= valid.reshape(n, -1).all(axis=1)
    if plain.any():  # the usual case, vectorised
        q = np.quantile(dev[plain].reshape(int(plain.sum()), -1), [0.25, 0.75], axis=1)
        out[plain] = (q[1] - q[0]) / 1.349 * np.sqrt(f / (f - 1))
    for i in np.flatnonzero(~plain & (count > 1)):
        d = dev[i][distinct[i]]
        if valid is not None:
            d = d[:, valid[i]]
        if d.size:
            q = np.quantile(d, [0.25, 0.75])
            out[i] = (q[1] - q[0]) / 1.349 * np.sqrt(count[i] / (count[i] - 1))
    return out


def _masked_median(y: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Median of each row (N,) of ``y`` (N, P) over its ``ok`` pixels (all of a row with none)."""
    ok = ok & ok.any(axis=1, keepdims=True) | ~ok.any(axis=1, keepdims=True)
    return np.nanmedian(np.where(ok, y, np.nan), axis=1)


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


def defects(frames: np.ndarray, coef: np.ndarray, sigma: np.ndarray, min_psf_sigma: float) -> np.ndarray:
    """Stuck pixels of windows (..., F, H, W), given their frames' planes ``coef`` (..., F, 3) and
    noise ``sigma`` (..., F) (:func:`fit_planes`): bool (..., H, W), True where a pixel is, in
    every frame of its window, either

    - dead: ``DEFECT_Z`` sigmas below the plane (a target never darkens a pixel), or
    - hot: ``DEFECT_Z`` sigmas above the plane, with its four neighbours (the ones inside the
      patch and not dead, scaled up to four) summing to less than half of
      what a PSF of ``min_psf_sigma`` (the narrowest the fit allows) centred on the pixel puts
      there: light through optics is never confined to one pixel.

    Sigma is floored at 1 grey level (8-bit rounding, noise-free frames).
    """
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim < 3:
        raise ValueError(f"frames must be (..., F, H, W), got shape {frames.shape}")
    h, w = frames.shape[-2:]
    r = frames - plane_image(coef, h, w)
    s = np.maximum(np.asarray(sigma, dtype=np.float64), 1.0)[..., None, None]
    dead = r < -DEFECT_Z * s
    # a dead neighbour is left out: next to a target, it must not make the target look hot
    pad = np.pad(np.where(dead, np.nan, r), [(0, 0)] * (r.ndim - 2) + [(1, 1), (1, 1)], constant_values=np.nan)
    near = np.stack([pad[..., :-2, 1:-1], pad[..., 2:, 1:-1], pad[..., 1:-1, :-2], pad[..., 1:-1, 2:]])
    inside = np.isfinite(near).sum(axis=0)
    neighbours = np.nansum(near, axis=0) * 4.0 / np.maximum(inside, 1)
    edge, centre = pixel_fractions(np.array([1.0]), 3, min_psf_sigma)[0, :2]
    share = 0.5 * 4.0 * edge / centre  # 4-neighbour sum / centre pixel of a centred PSF, halved
    hot = (r > DEFECT_Z * s) & (neighbours < share * r)
    return np.all(hot | dead, axis=-3)
