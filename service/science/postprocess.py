"""HR maps (+ their LR windows) -> target lists: the one post-processing path.

``csist evaluate``, the service's batcher and the benchmarks all call :func:`find_targets`, so
the numbers reported for a model are the numbers the service delivers.

``refine`` is one of :data:`REFINE_MODES`: the peak refinements of :mod:`service.science.peaks`
(``none``, ``centroid``, ``quadratic``) work on the HR map alone; ``fit`` takes the map's
cell-centre peaks as a start and fits them to the window's 5 LR frames through the forward
model (:mod:`service.science.refine`), which places targets below the 1/3-pixel HR grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.science import peaks as _peaks
from service.science.background import defects, fit_planes, temporal_noise
from service.science.physics import DEFAULT_SNR, SIGMA, flux_noise
from service.science.refine import FitConfig, FitResult, refine_windows

__all__ = ["DEFAULT_SNR", "REFINE_MODES", "Found", "find_targets", "snr_thresholds"]

REFINE_MODES = (*_peaks.REFINE_MODES, "fit")
MIN_NOISE = 1.0  # grey levels: the floor of a patch's noise (quantisation, residual background)


@dataclass(frozen=True)
class Found:
    """One window's answer with what the fit knows about it: ``targets`` (K, 3) rows (x, y,
    brightness); ``uncertainty`` (K, 4) rows (sigma_x, sigma_y, rho_xy, sigma_brightness) and
    ``count_confidence`` (the chosen count's weight among the counts tried) where the fit
    answered, else None."""

    targets: np.ndarray
    uncertainty: np.ndarray | None = None
    count_confidence: float | None = None

    @classmethod
    def of_fit(cls, result: FitResult, max_targets: int | None = None) -> Found:
        keep = slice(None) if max_targets is None else slice(0, max_targets)
        if not result.accepted:
            return cls(result.targets[keep])
        return cls(result.targets[keep], result.uncertainty[keep], result.count_confidence)


def snr_thresholds(noise: np.ndarray, snr: float, psf_sigma: float = SIGMA) -> np.ndarray:
    """Peak thresholds (N,) of windows whose frames have the pixel noise ``noise`` (N,) (the
    sensor's noise, :func:`service.science.background.temporal_noise`): ``snr`` times the
    noise of a target's flux.

    The HR map is in brightness (flux) units, so the threshold is ``snr`` x
    :func:`service.science.physics.flux_noise` of the window's pixel noise, at least
    ``MIN_NOISE``. Static clutter is not noise here: the network sees it for what it is, and
    the fit models it; counting it in raised the threshold above the targets on cluttered
    patches (measured in docs/method.md section 5.0).
    """
    if not snr > 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    noise = np.asarray(noise, dtype=np.float64)
    if noise.ndim != 1:
        raise ValueError(f"noise must be one value per window (N,), got shape {noise.shape}")
    return snr * flux_noise(np.maximum(noise, MIN_NOISE), psf_sigma)


def _on(mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Which targets (K, 3) sit on a pixel of ``mask`` (H, W) (pixel centres at integers)."""
    if not len(rows):
        return np.zeros(0, dtype=bool)
    h, w = mask.shape
    c = np.clip(np.rint(rows[:, 0]).astype(int), 0, w - 1)
    r = np.clip(np.rint(rows[:, 1]).astype(int), 0, h - 1)
    return mask[r, c]


def find_targets(
    maps: np.ndarray,
    windows: np.ndarray | None = None,
    threshold: float = _peaks.DEFAULT_THRESHOLD,
    refine: str = "none",
    max_targets: int | None = None,
    mode: str | None = None,
    ratio: int = 3,
    fit_config: FitConfig | None = None,
    snr: float | None = None,
    details: bool = False,
    missing: np.ndarray | None = None,
) -> list:
    """Targets (K, 3) rows (x, y, brightness) of each map of (N, H, W), brightest first.

    ``windows`` (N, 5, 11, 11), the LR frames each map was computed from, is needed for
    ``refine="fit"`` and for ``snr``. ``snr``: the peak threshold of each window is ``snr``
    times its flux noise (:func:`snr_thresholds`) instead of the absolute ``threshold``.
    ``max_targets`` applies to the final answer. ``details``: a :class:`Found` per map instead,
    with the fit's uncertainties where the fit answered. ``missing`` (N, H, W): pixels of each
    window that a frame registered into its patch does not cover
    (:func:`service.science.windows.register`): the background planes are fitted without them,
    a peak on one is dropped, and the fit leaves them out, as it does stuck pixels.
    """
    if refine not in REFINE_MODES:
        raise ValueError(f"refine must be one of {REFINE_MODES}, got {refine!r}")
    needs_windows = refine == "fit" or snr is not None
    if needs_windows and (windows is None or len(windows) != len(maps)):
        raise ValueError("refine='fit' and snr need the LR window of every map")
    kwargs = {} if mode is None else {"mode": mode}
    fit_config = fit_config or FitConfig()
    if missing is not None:
        missing = np.asarray(missing, dtype=bool)
        if windows is None or missing.shape != (len(maps), *np.shape(windows)[2:]):
            raise ValueError(f"missing must be (N, H, W) like the windows' frames, got {missing.shape}")
    if needs_windows:  # one batched call: the fit's planes, also the threshold's fallback
        windows = np.asarray(windows, dtype=np.float64)
        if windows.ndim != 4:
            raise ValueError(f"windows must be (N, F, H, W), got shape {windows.shape}")
        planes, noise = fit_planes(windows, None if missing is None else ~missing[:, None])
    per_window = None
    if snr is not None:
        sensor = temporal_noise(windows, None if missing is None else ~missing)
        # a window of one distinct frame shows no noise over time: its spread about the plane
        sensor = np.where(np.isnan(sensor), np.median(noise, axis=1), sensor)
        per_window = snr_thresholds(sensor, snr, fit_config.psf_sigma)
    floor = threshold if per_window is None or not len(per_window) else float(per_window.min())
    peak_refine = "none" if refine == "fit" else refine
    found = _peaks.extract_peaks_batch(
        maps,
        threshold=floor,
        refine=peak_refine,
        max_targets=None if per_window is not None or refine == "fit" else max_targets,
        ratio=ratio,
        **kwargs,
    )
    if per_window is not None:  # each window's own threshold: rows are brightness-sorted
        found = [f[f[:, 2] > t] for f, t in zip(found, per_window)]
    if missing is not None:  # a peak on a repeated edge pixel is the network reading the copy
        found = [f[~_on(m, f)] for f, m in zip(found, missing)]
    if refine != "fit":
        found = [f if max_targets is None else f[:max_targets] for f in found]
        return [Found(f) for f in found] if details else found
    stuck = defects(windows, planes, noise, fit_config.psf_sigma * (1.0 - fit_config.psf_range))
    if missing is not None:
        stuck = stuck | missing
    fits = refine_windows(windows, found, fit_config, details=True, planes=planes, stuck=stuck)
    if not details:
        return [r.targets if max_targets is None else r.targets[:max_targets] for r in fits]
    return [Found.of_fit(r, max_targets) for r in fits]
