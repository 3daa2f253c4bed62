"""HR maps (+ their LR windows) -> target lists: the one post-processing path.

``csist evaluate``, the service's batcher and the benchmarks all call :func:`find_targets`, so
the numbers reported for a model are the numbers the service delivers.

``refine`` is one of :data:`REFINE_MODES`: the peak refinements of :mod:`service.science.peaks`
(``none``, ``centroid``, ``quadratic``) work on the HR map alone; ``fit`` takes the map's
cell-centre peaks as a start and fits them to the window's 5 LR frames through the forward
model (:mod:`service.science.refine`), which places targets below the 1/3-pixel HR grid.
"""

from __future__ import annotations

import numpy as np

from service.science import peaks as _peaks
from service.science.refine import FitConfig, refine_windows

REFINE_MODES = (*_peaks.REFINE_MODES, "fit")


def find_targets(
    maps: np.ndarray,
    windows: np.ndarray | None = None,
    threshold: float = _peaks.DEFAULT_THRESHOLD,
    refine: str = "none",
    max_targets: int | None = None,
    mode: str | None = None,
    ratio: int = 3,
    fit_config: FitConfig | None = None,
) -> list[np.ndarray]:
    """Targets (K, 3) rows (x, y, brightness) of each map of (N, H, W), brightest first.

    ``windows`` (N, 5, 11, 11), the LR frames each map was computed from, is needed for
    ``refine="fit"`` only. ``max_targets`` applies to the final answer.
    """
    if refine not in REFINE_MODES:
        raise ValueError(f"refine must be one of {REFINE_MODES}, got {refine!r}")
    kwargs = {} if mode is None else {"mode": mode}
    if refine != "fit":
        return _peaks.extract_peaks_batch(
            maps, threshold=threshold, refine=refine, max_targets=max_targets, ratio=ratio, **kwargs
        )
    if windows is None or len(windows) != len(maps):
        raise ValueError("refine='fit' needs the LR window of every map")
    start = _peaks.extract_peaks_batch(maps, threshold=threshold, refine="none", ratio=ratio, **kwargs)
    found = refine_windows(np.asarray(windows, dtype=np.float64), start, fit_config or FitConfig())
    return [f if max_targets is None else f[:max_targets] for f in found]
