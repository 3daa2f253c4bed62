"""What the API layer adds to a request before the engine sees it, and how it shapes answers:
peak-extraction options completed with the model manifest's defaults, a window's deadline, and
targets as API objects."""

from __future__ import annotations

import numpy as np

from service.api.schemas import Origin, UnmixOptions
from service.engine.batcher import GroupResult, PeakOptions
from service.runtime.lifecycle import Runtime


def deadline_s(runtime: Runtime, options: UnmixOptions | None, default_ms: float | None = None) -> float | None:
    """A window's deadline in seconds: the frame's options, else the connection's default,
    else ``CSIST_DEADLINE_MS``; None when that is 0 (no deadline)."""
    ms = runtime.settings.deadline_ms if default_ms is None else default_ms
    if options is not None and options.deadline_ms is not None:
        ms = options.deadline_ms
    return ms / 1000.0 if ms > 0 else None


def peak_options(runtime: Runtime, options: UnmixOptions | None) -> PeakOptions:
    """Request options completed with the settings' and the model manifest's defaults. A threshold
    given as a number (a request's, or CSIST_THRESHOLD_SNR unset: the card's) is absolute."""
    card = runtime.model.card
    settings = runtime.settings
    threshold = card.postprocess.threshold
    snr = settings.threshold_snr
    refine = card.postprocess.refine
    max_targets = None
    psf_sigma = settings.psf_sigma if settings.psf_sigma is not None else card.physics.psf_sigma
    saturation = settings.saturation
    brightness = settings.brightness_range
    if options is not None:
        if options.threshold_snr is not None:
            snr = options.threshold_snr
        if options.threshold is not None:
            threshold, snr = options.threshold, None
        if options.refine is not None:
            refine = options.refine
        max_targets = options.max_targets
        if options.psf_sigma is not None:
            psf_sigma = options.psf_sigma
        if options.saturation is not None:
            saturation = options.saturation
        if options.brightness_range is not None:
            brightness = options.brightness_range
    return PeakOptions(
        float(threshold),
        refine,
        max_targets,
        card.physics.ratio,
        card.postprocess.mode,
        float(psf_sigma),
        saturation,
        None if brightness is None else (float(brightness[0]), float(brightness[1])),
        snr,
    )


def targets_payload(peaks: np.ndarray, origin: Origin | None, uncertainty: np.ndarray | None = None) -> list[dict]:
    """Rows (x, y, brightness) as API targets, with sensor coordinates when the origin is known
    and the fit's (sigma_x, sigma_y, rho, sigma_brightness) rows when it answered."""
    out = []
    ox = oy = None
    if origin is not None:
        ox, oy = origin.x, origin.y
    spread = uncertainty.tolist() if uncertainty is not None else [[None] * 4] * len(peaks)
    for (x, y, b), (sx, sy, rho, sb) in zip(peaks.tolist(), spread, strict=True):
        out.append(
            {
                "x": x,
                "y": y,
                "sensor_x": None if ox is None else x + ox,
                "sensor_y": None if oy is None else y + oy,
                "brightness": b,
                "score": b,
                "sigma_x": sx,
                "sigma_y": sy,
                "rho": rho,
                "sigma_brightness": sb,
            }
        )
    return out


def window_extras(result: GroupResult, k: int) -> tuple[np.ndarray | None, float | None]:
    """The fit's uncertainties and count confidence of the group's window ``k`` (None, None
    where the fit did not answer)."""
    if result.uncertainty is None or result.count_confidence is None:
        return None, None
    return result.uncertainty[k], result.count_confidence[k]
