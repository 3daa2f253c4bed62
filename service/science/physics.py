"""Forward model of a long-range infrared sensor (docs/method.md section 2), numpy only.

A point target of brightness ``a`` at sub-pixel position (x, y) is blurred by an isotropic
Gaussian PSF (sigma 0.5 px, the SeqCSIST value) and integrated over each detector pixel.
The integral of a separable Gaussian over a square pixel is a product of two differences of
``erf``, so the image needs no numerical integration (the reference implementation used
``scipy.integrate.dblquad`` for the same number).

Coordinates everywhere in this project: ``x`` = column, ``y`` = row, in LR pixel units, pixel
centres at integers, origin at the centre of the patch's top-left pixel; pixel (r, c) covers
[c - 0.5, c + 0.5] x [r - 0.5, r + 0.5].

The high-resolution (HR) grid divides every LR pixel into ``ratio x ratio`` cells, so
``ratio * size`` cells tile [-0.5, size - 0.5] along each axis. HR cell index ``i`` has its
centre at LR coordinate ``(i + 0.5) / ratio - 0.5 = (i - (ratio - 1) / 2) / ratio``; for the
default ratio 3 that is ``(i - 1) / 3``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

SIZE = 11  # LR patch side, pixels
RATIO = 3  # unmixing ratio c: HR cells per LR pixel along each axis
SIGMA = 0.5  # PSF standard deviation, LR pixels
# The PSF sigmas the fit accepts as a calibration: below 0.2 px one pixel holds nearly all of a
# target's flux (nothing left to unmix by), above 3 px the 11-px patch no longer holds the PSF.
PSF_SIGMA_MIN, PSF_SIGMA_MAX = 0.2, 3.0
MAX_SATURATION = 65535.0  # the clip level of a 16-bit sensor, the deepest the project reads
EIGHT_BIT = 255.0  # the clip level of an 8-bit sensor: the SeqCSIST protocol's, and the default
DEFAULT_SNR = 5.0  # peaks are kept above this many sigmas of a target's flux noise (flux_noise)


def flux_noise(noise, psf_sigma: float = SIGMA):
    """Standard deviation of a point target's flux measured through a Gaussian PSF under white
    pixel noise ``noise``: noise x sqrt(4 pi) psf_sigma (the PSF's noise-equivalent area is
    4 pi psf_sigma^2 pixels)."""
    return np.asarray(noise, dtype=np.float64) * np.sqrt(4.0 * np.pi) * psf_sigma


HR_SIZE = SIZE * RATIO  # 33


def as_targets(targets) -> np.ndarray:
    """Targets as a float64 array of shape (N, 3) with rows (x, y, brightness)."""
    t = np.asarray(targets, dtype=np.float64)
    if t.size == 0:
        return np.zeros((0, 3))
    if t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"targets must have shape (N, 3) as rows (x, y, brightness), got {t.shape}")
    return t


def pixel_fractions(pos: np.ndarray, size: int = SIZE, sigma: float = SIGMA) -> np.ndarray:
    """Share of a unit 1-D Gaussian centred at each ``pos`` that falls in each pixel.

    Returns (N, size): ``0.5 * (erf((k + 0.5 - p) / (sigma*sqrt2)) - erf((k - 0.5 - p) / ...))``.
    The 2-D pixel response is the outer product of the row and column fractions.
    """
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 1)
    edges = np.arange(size + 1, dtype=np.float64) - 0.5  # (size + 1,)
    cdf = erf((edges[None, :] - pos) / (sigma * np.sqrt(2.0)))  # (N, size + 1)
    return 0.5 * (cdf[:, 1:] - cdf[:, :-1])


def pixel_fractions_grad(pos: np.ndarray, size: int = SIZE, sigma: float = SIGMA) -> np.ndarray:
    """d pixel_fractions / d pos, shape (N, size): the Gaussian density at the two pixel edges."""
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 1)
    edges = np.arange(size + 1, dtype=np.float64) - 0.5
    pdf = np.exp(-0.5 * ((edges[None, :] - pos) / sigma) ** 2) / (sigma * np.sqrt(2.0 * np.pi))
    return -(pdf[:, 1:] - pdf[:, :-1])


def pixel_fractions_dsigma(pos: np.ndarray, size: int = SIZE, sigma: float = SIGMA) -> np.ndarray:
    """d pixel_fractions / d sigma, shape (N, size): with u = edge - pos, each edge's fraction
    0.5 erf(u / (sigma sqrt2)) changes by -(u / sigma) * density(u)."""
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 1)
    u = np.arange(size + 1, dtype=np.float64)[None, :] - 0.5 - pos
    g = -(u / sigma) * np.exp(-0.5 * (u / sigma) ** 2) / (sigma * np.sqrt(2.0 * np.pi))
    return g[:, 1:] - g[:, :-1]


def pixel_response(targets, size: int = SIZE, sigma: float = SIGMA) -> np.ndarray:
    """Noise-free float image (size, size) of point targets given as rows (x, y, brightness)."""
    t = as_targets(targets)
    fx = pixel_fractions(t[:, 0], size, sigma)  # (N, size) over columns
    fy = pixel_fractions(t[:, 1], size, sigma)  # (N, size) over rows
    return np.einsum("n,nr,nc->rc", t[:, 2], fy, fx)


def hr_centers(size: int = SIZE, ratio: int = RATIO) -> np.ndarray:
    """LR coordinate of the centre of each HR cell index along one axis, shape (ratio*size,)."""
    return (np.arange(ratio * size, dtype=np.float64) + 0.5) / ratio - 0.5


def lr_to_hr_index(coord, ratio: int = RATIO) -> np.ndarray:
    """Index of the HR cell containing LR coordinate(s) ``coord`` (inverse of ``hr_centers``)."""
    return np.floor((np.asarray(coord, dtype=np.float64) + 0.5) * ratio).astype(np.int64)


def hr_to_lr(index, ratio: int = RATIO) -> np.ndarray:
    """LR coordinate of the centre of HR cell index(es) ``index`` (may be fractional)."""
    return (np.asarray(index, dtype=np.float64) + 0.5) / ratio - 0.5


def sampling_matrix(size: int = SIZE, ratio: int = RATIO, sigma: float = SIGMA) -> np.ndarray:
    """Phi, shape (size*size, (ratio*size)**2): LR = Phi @ HR for targets on HR cell centres.

    Rows are LR pixels row-major, columns HR cells row-major; column k = i * ratio*size + j is
    the LR image of a unit point at the centre of HR cell (i, j), i.e. at
    (x, y) = (hr_to_lr(j), hr_to_lr(i)).
    """
    f = pixel_fractions(hr_centers(size, ratio), size, sigma)  # (n_hr, size): [cell, pixel]
    # Phi[(r, c), (i, j)] = f[i, r] * f[j, c]
    phi = np.einsum("ir,jc->rcij", f, f)
    return phi.reshape(size * size, (ratio * size) ** 2)


def hr_map(targets, size: int = SIZE, ratio: int = RATIO) -> np.ndarray:
    """HR ground-truth map (ratio*size, ratio*size): each target's brightness at its cell.

    Targets outside the patch are dropped; two targets in one cell add up.
    """
    t = as_targets(targets)
    n = ratio * size
    out = np.zeros((n, n), dtype=np.float64)
    i = lr_to_hr_index(t[:, 1], ratio)
    j = lr_to_hr_index(t[:, 0], ratio)
    keep = (i >= 0) & (i < n) & (j >= 0) & (j < n)
    np.add.at(out, (i[keep], j[keep]), t[keep, 2])
    return out


def quantize(image: np.ndarray) -> np.ndarray:
    """8-bit sensor output: rounded and clipped to [0, 255] (as the published PNGs)."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
