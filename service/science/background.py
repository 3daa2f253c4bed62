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

An edge (:func:`fit_edge`): a horizon, a coastline or a cloud's rim crossing the patch is a
step no plane follows. Where a window's static background leaves structure about its plane, the
fit (:mod:`service.science.refine`) tries a straight, blurred step as one more background term
(:func:`edge_column`), its geometry from the pixels away from the targets, and keeps it where
those pixels are likelier with it.

Stuck pixels (:func:`defects`): a hot pixel is a bright spot, and the fit would take it for a
target, or start a missed target there; a dead one pulls the plane and the targets next to it.
Both stay where they are, so they are found over a window's frames, never in one frame alone
(where a narrow, dim target could pass for a hot pixel), and the fit leaves them out.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.special import ndtr

from service.science.physics import pixel_fractions
from service.science.windows import replicated

try:  # the edge's least squares in C (service/kernels/_native/fit.c), where it is built
    from service.kernels import _fit as _native_fit
except ImportError:  # pragma: no cover - a checkout without the extension built
    _native_fit = None

# an extension built from older source has no edge_fit: the numpy reference runs instead
NATIVE_EDGE = _native_fit is not None and hasattr(_native_fit, "edge_fit")

ITERATIONS = 8
CLIP_Z = 3.0  # pixels this many noise sigmas above the plane count as signal, not background
MAD_TO_SIGMA = 1.4826
DARK_SHARE = 0.25  # a frame with more of its pixels at exactly 0 was clipped at the sensor's floor
DEFECT_Z = 5.0  # a stuck pixel stands this many noise sigmas off its frame's plane, in every frame
EDGE_ANGLES = 3  # directions of the edge search's grid, about the residual's mean gradient
EDGE_ANGLE_SPREAD = 20.0  # degrees either side of it
EDGE_STEP = 1.0  # px between the grid's edge positions
EDGE_BLURS = (0.4, 1.2)  # px, the grid's edge widths (a Gaussian's sigma)
EDGE_MIN_BLUR = 0.15  # px: a step sharper than this is one pixel column, which a model cannot place
EDGE_MAX_BLUR = 4.0  # px: a wider step is a gradient, the plane's
EDGE_ITERATIONS = 12
EDGE_TOL = 1e-3  # Gauss-Newton stops when a step lowers the squares by less than this share


def plane_basis(height: int, width: int) -> np.ndarray:
    """(H*W, 3): columns 1, x - xc, y - yc at the pixel centres (x = column, y = row). Read-only
    (one array per patch size, shared)."""
    return _plane_basis(int(height), int(width))


@functools.lru_cache(maxsize=16)
def _plane_basis(height: int, width: int) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    x, y = (cols - (width - 1) / 2).ravel(), (rows - (height - 1) / 2).ravel()
    out = np.column_stack([np.ones(height * width), x, y])
    out.flags.writeable = False
    return out


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

    - dead: ``DEFECT_Z`` sigmas below the plane (a target never darkens a pixel) and below all
      its eight neighbours in the patch but one (a dead pixel stands alone, or beside one
      other: the dark side of an edge or a dark patch of clutter is not dead), or
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
    # the second-lowest of the eight neighbours (outside the patch: none, +inf)
    up = np.pad(r, [(0, 0)] * (r.ndim - 2) + [(1, 1), (1, 1)], constant_values=np.inf)
    h, w = r.shape[-2:]
    ring = [up[..., i : i + h, j : j + w] for i in range(3) for j in range(3) if (i, j) != (1, 1)]
    second = np.partition(np.stack(ring), 1, axis=0)[1]
    dead = (r < -DEFECT_Z * s) & (r < second - DEFECT_Z * s)
    # a dead neighbour is left out: next to a target, it must not make the target look hot
    pad = np.pad(np.where(dead, np.nan, r), [(0, 0)] * (r.ndim - 2) + [(1, 1), (1, 1)], constant_values=np.nan)
    near = np.stack([pad[..., :-2, 1:-1], pad[..., 2:, 1:-1], pad[..., 1:-1, :-2], pad[..., 1:-1, 2:]])
    inside = np.isfinite(near).sum(axis=0)
    neighbours = np.nansum(near, axis=0) * 4.0 / np.maximum(inside, 1)
    edge, centre = pixel_fractions(np.array([1.0]), 3, min_psf_sigma)[0, :2]
    share = 0.5 * 4.0 * edge / centre  # 4-neighbour sum / centre pixel of a centred PSF, halved
    hot = (r > DEFECT_Z * s) & (neighbours < share * r)
    return np.all(hot | dead, axis=-3)


@dataclass(frozen=True)
class Edge:
    """A straight edge, blurred: the background steps by ``contrast`` across the line
    ``(x - xc) cos(angle) + (y - yc) sin(angle) = offset`` (about the patch centre (xc, yc), x =
    column, y = row) with the profile of a Gaussian's CDF of width ``blur`` px, rising along the
    normal (angle, radians)."""

    angle: float
    offset: float
    blur: float
    contrast: float


class EdgeFit(NamedTuple):
    """:func:`fit_edge`'s answer: the edge, the plane under it (3,) as :func:`plane_basis`
    orders its coefficients, the residual sum of squares, and the contrast's standard error
    for noise of unit sigma (times the values' noise sigma: the contrast's; its geometry's
    uncertainty included)."""

    edge: Edge
    plane: np.ndarray
    rss: float
    contrast_se: float


def edge_column(edge: Edge, height: int, width: int) -> np.ndarray:
    """(H*W,) the unit step of ``edge`` (0 on its low side, 1 on its high side) at the pixel
    centres: the background column the fit multiplies by the contrast."""
    x, y = plane_basis(height, width)[:, 1:].T
    return ndtr((x * np.cos(edge.angle) + y * np.sin(edge.angle) - edge.offset) / edge.blur)


def fit_edge(values: np.ndarray, mask: np.ndarray, native: bool = True) -> EdgeFit | None:
    """The plane plus edge that fits ``values`` (m,), a static background at the ``mask`` (H, W)
    pixels, best in least squares (:class:`EdgeFit`), or None where the pixels cannot place one
    (too few, or the best step is no step).

    A grid search over direction, position and width (each step a linear ramp of the Gaussian
    CDF's central slope, the plane projected out) about the residual's principal gradient
    direction, then Levenberg-Marquardt on all seven terms from the best; steps wider than
    EDGE_MAX_BLUR are left to the plane. In C where the extension is built and ``native``, else
    in numpy (:func:`_fit_edge_numpy`, the reference the tests compare with).
    """
    height, width = mask.shape
    z = np.ascontiguousarray(values, dtype=np.float64)
    basis = plane_basis(height, width)[mask.ravel()]  # (m, 3)
    m = len(z)
    if m != basis.shape[0]:
        raise ValueError(f"values must have one entry per masked pixel ({basis.shape[0]}), got {m}")
    if m < 12:
        return None
    x, y = basis[:, 1].copy(), basis[:, 2].copy()
    q = np.ascontiguousarray(np.linalg.qr(basis)[0])  # orthonormal plane columns: projects it out
    zr = z - q @ (q.T @ z)
    angles = _gradient_angle(zr, mask) + np.deg2rad(EDGE_ANGLE_SPREAD) * np.linspace(-1, 1, EDGE_ANGLES)
    blurs = np.asarray(EDGE_BLURS, dtype=np.float64)
    log_blur = (math.log(EDGE_MIN_BLUR) - 1.0, math.log(EDGE_MAX_BLUR) + 1.0)
    if native and NATIVE_EDGE:
        out = np.zeros(9)
        if not _native_fit.edge_fit(out, z, x, y, q, angles, blurs, EDGE_STEP, EDGE_ITERATIONS, EDGE_TOL, *log_blur):
            return None
    else:
        out = _fit_edge_numpy(z, basis, q, zr, angles, blurs, log_blur)
        if out is None:
            return None
    b = math.exp(out[2])
    if not EDGE_MIN_BLUR <= b <= EDGE_MAX_BLUR:
        return None
    angle, offset, contrast, plane = float(out[0]), float(out[1]), float(out[6]), out[3:6].copy()
    if contrast < 0:  # one orientation for one edge: rising along the normal (C Phi(u) = C + |C| Phi(-u))
        angle, offset, contrast = angle + np.pi, -offset, -contrast
        plane[0] -= contrast
    se = math.sqrt(out[8]) if 0 < out[8] < np.inf else float("inf")
    return EdgeFit(Edge(float(np.mod(angle, 2 * np.pi)), offset, b, contrast), plane, float(out[7]), se)


def _fit_edge_numpy(z, basis, q, zr, angles, blurs, log_blur) -> np.ndarray | None:
    """:func:`fit_edge`'s search and refinement in numpy: (9,) as the C extension's edge_fit
    gives them (angle, offset, log blur, plane (3), contrast, sum of squares, the contrast's
    variance per unit noise variance), or None."""
    m = len(z)
    x, y = basis[:, 1], basis[:, 2]
    s = x[:, None] * np.cos(angles) + y[:, None] * np.sin(angles)  # (m, A)
    lo, hi = s.min(), s.max()
    offsets = np.arange(np.ceil(lo / EDGE_STEP) * EDGE_STEP, hi + 1e-9, EDGE_STEP)
    u = (s[:, :, None, None] - offsets[None, None, :, None]) * (1.0 / (np.sqrt(2 * np.pi) * blurs))
    cols = np.clip(u + 0.5, 0.0, 1.0, out=u).reshape(m, -1)  # (m, A * O * B)
    cols -= q @ (q.T @ cols)
    norm = np.einsum("mc,mc->c", cols, cols)
    gain = np.where(norm > 1e-9 * m, (zr @ cols) ** 2 / np.maximum(norm, 1e-300), 0.0)
    best = int(np.argmax(gain))
    if gain[best] <= 0.0:
        return None
    ia, io, ib = np.unravel_index(best, (len(angles), len(offsets), len(blurs)))
    p = np.array([angles[ia], offsets[io], np.log(blurs[ib])])
    a = np.column_stack([basis, _edge_profile(x, y, p)])
    gram = a.T @ a
    try:
        np.linalg.cholesky(gram)  # as the C solve: the normal equations must be positive definite
        lin = np.linalg.solve(gram, a.T @ z)
    except np.linalg.LinAlgError:
        return None
    full = np.concatenate([p, lin])
    cost = _edge_refine(basis, z, x, y, full, log_blur)
    jac = _edge_jacobian(basis, x, y, full)
    try:
        var = float(np.linalg.solve(jac.T @ jac, np.eye(7)[6])[6])
    except np.linalg.LinAlgError:
        var = float("inf")
    return np.concatenate([full, [cost, var]])


def _edge_refine(basis, z, x, y, full, log_blur) -> float:
    """Levenberg-Marquardt on all seven terms of plane plus edge (angle, offset, log blur,
    plane (3), contrast) from ``full`` (updated in place); returns the sum of squares."""
    r = basis @ full[3:6] + full[6] * _edge_profile(x, y, full) - z
    cost, damp = float(r @ r), 1e-3
    for _ in range(EDGE_ITERATIONS):
        jac = _edge_jacobian(basis, x, y, full)
        gram, grad = jac.T @ jac, jac.T @ r
        diag = np.diag(gram) + 1e-12
        while damp < 1e6:
            try:
                step = np.linalg.solve(gram + damp * np.diag(diag), -grad)
            except np.linalg.LinAlgError:
                damp *= 10.0
                continue
            new = full + step
            new[2] = min(max(new[2], log_blur[0]), log_blur[1])
            r_new = basis @ new[3:6] + new[6] * _edge_profile(x, y, new) - z
            c_new = float(r_new @ r_new)
            if c_new <= cost:
                break
            damp *= 10.0
        else:
            break
        done = cost - c_new <= EDGE_TOL * cost or np.abs(step[:3]).max() < 1e-4
        full[:], r, cost, damp = new, r_new, c_new, max(damp * 0.1, 1e-6)
        if done:
            break
    return cost


def _gradient_angle(values: np.ndarray, mask: np.ndarray) -> float:
    """Direction (radians, [0, pi)) along which ``values`` at the ``mask`` pixels change most:
    the principal axis of their gradients (central differences where both neighbours are in
    the mask), the normal of an edge."""
    img = np.full(mask.shape, np.nan)
    img[mask] = values
    gy, gx = np.gradient(img)
    ok = np.isfinite(gx) & np.isfinite(gy)
    gx, gy = gx[ok], gy[ok]
    # the structure tensor's principal direction: half the angle of (sxx - syy, 2 sxy)
    return float(np.mod(0.5 * np.arctan2(2 * gx @ gy, gx @ gx - gy @ gy), np.pi))


def _edge_jacobian(basis, x, y, full) -> np.ndarray:
    """(m, 7) derivatives of plane plus edge over (angle, offset, log blur, plane (3), contrast)."""
    c, s, b = np.cos(full[0]), np.sin(full[0]), np.exp(full[2])
    u = (x * c + y * s - full[1]) / b
    g = full[6] * np.exp(-0.5 * u * u) / (np.sqrt(2 * np.pi) * b)  # contrast x d step / d u / b
    return np.column_stack([g * (y * c - x * s), -g, -g * u * b, basis, ndtr(u)])


def _edge_profile(x, y, p) -> np.ndarray:
    """The unit step at the pixels (x, y) for geometry ``p`` (angle, offset, log blur)."""
    return ndtr((x * np.cos(p[0]) + y * np.sin(p[0]) - p[1]) / np.exp(p[2]))
