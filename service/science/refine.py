"""Physics refinement of the network's targets over a whole window (``refine="fit"``).

Why: the network answers on the 1/3-px HR grid, and a perfect cell-centre answer scores only
about CSO-mAP 50 (docs/method.md section 5). The frames themselves hold the sub-cell information,
and a window holds 5 of them. This module fits the middle frame's targets to all LR frames of
the window through the forward model of :mod:`service.science.physics` (numpy + scipy only: the
service runs it).

The model of a window (frame ``f`` taken ``t_f`` frames after the middle one, -2..2)::

    frame_f = sum_k a_k * pixel_response(x_k + vx * t_f, y_k + vy * t_f; s) + b(x, y)  (+ noise)

- Unknowns: (x_k, y_k, a_k) of every target in the MIDDLE frame, one group velocity (vx, vy)
  in px/frame shared by all targets (SeqCSIST moves the group 0.04-0.09 px/frame; the targets'
  own outward drift, <= 0.0014 px/frame, is ignored) and the background plane b (offset and
  two gradients, static over the window, started from the frames' median planes of
  :mod:`service.science.background`). The PSF sigma s is the calibration, and becomes an
  unknown too where the calibrated fit leaves a misfit (``psf_chi2``); where a misfit remains,
  the PSF may gain a halo, a wider Gaussian holding a share of the flux (:func:`_halo`: the
  wings of real optics).
- Bounded nonlinear least squares with the analytic Jacobian (built from
  :func:`service.science.physics.pixel_fractions_grad`). Solver ``"lm"`` (default) is a compact
  projected Levenberg-Marquardt written for this problem size (<= 26 parameters, a few hundred
  residuals), where the per-iteration overhead of ``scipy.optimize.least_squares`` cost more
  than the model itself. It runs in C (``service/kernels/_native/fit.c``, the same algorithm on
  the same residuals) where that extension is built, else in numpy; ``"scipy"`` runs
  ``least_squares(method="trf")`` on the same residuals, bounds and Jacobian (the reference;
  the tests check all three agree).
- Clutter: where the frame-mean background left by the plane varies more than the frames' noise
  explains (:func:`_clutter`: the noise from the frames' deviations from their mean, which a
  static background does not have; the clutter's variance, correlation length and covariance
  shape, smooth or rough, from the far pixels), the background's departure from the plane is a
  Gaussian random field, marginalised: the frame-mean residual is whitened by the clutter-plus-
  noise covariance (the frames' deviations from it keep the noise alone), the crop grows by a
  correlation length, and the flux that sets the count is the one left after kriging the
  clutter under the targets from the pixels around them (:func:`_clutter_flux`).
- 8-bit physics: residuals are divided by ``s = sqrt(noise^2 + 1/12 + model_error^2)`` (the
  1/12 is the variance of rounding to integers). A pixel at the saturation level (255) only
  says "the truth is at least 255": its residual is ``min(model - 255, 0) / s``, i.e. it counts
  only while the model is below 255.
- The noise is configured or estimated from the pixels far from every target, about the
  background plane (:func:`estimate_noise`).
- Priors: each target's position is bounded to +-``max_shift_px`` of its start (below) and
  pulled toward it by a Gaussian prior of width ``prior_px`` (a residual ``(x - x_peak) / prior_px``);
  brightness is bounded to ``brightness_range`` and pulled toward its centre by a Gaussian
  prior of width ``brightness_prior``; the velocity is bounded to +-``max_speed_px``, a bound
  that grows with the group's speed where its frames' centroid moves near or past it
  (:func:`_speed_bound`).
- Only pixels whose centre lies within ``crop_px`` of a start position (plus the possible
  motion) are fitted: a sigma-0.5 PSF puts < 1e-4 of a target's flux beyond 2.5 px.

Count and start (``try_counts``). The network's count is the weak part of its answer: the
reference rule (every HR cell above 70 is a target) spreads one target over 1-3 adjacent cells,
and on SeqCSIST-protocol data its count is right in only about a fifth of the windows. The
frames know better. The forward model conserves flux, so K targets of brightness within
``brightness_range`` put K lo .. K hi grey levels into the window (:func:`_flux_counts`), and
every count within ``flux_z`` sigma of the measured flux is fitted (almost always exactly one).
Where the flux is only a lower bound (saturated pixels, a target near the patch border), more
targets are added one at a time while the information criterion (``bic``: chi2 + p ln n;
``aic``: chi2 + 2p) keeps falling and the last fit leaves room for one (:func:`_may_grow`);
among the fitted counts the lowest criterion wins (the brightness calibration's prior counts
in it: a fit that needs targets far from the calibration pays for them). Where the flux is a
lower bound, targets brighter than the calibration expects also make room for one more. Where
the chosen fit pins a target at a bound of ``brightness_range`` or leaves a misfit, the
calibration does not hold for this window: it is counted again with brightness free
(:func:`_free_brightness`; with the PSF sigma free too where that still misfits past the
fallback's limit) and the criterion decides. Stuck pixels
(:func:`service.science.background.defects`) read as background and are left out. Where the network
gave no peaks, the brightest spot of the frames is the start (:func:`_frame_seed`). The start of a K-target fit
(:func:`_start`): with more peaks than K, the centres of a brightness-weighted K-means
clustering of the peaks (between the cells the network spread a target over); with K peaks,
the peaks; with fewer, the peaks plus new targets where they leave flux unexplained (no
position prior for those). A fit whose chi2 / dof exceeds ``retry_chi2`` (a local minimum) is
started again (:func:`_retry`: from the K peaks with the least linear misfit, or from the K-1
fit plus a target at its largest residual) and the better one kept. (The first version tried
K-1, K and K+1 around the network's count, merging the closest pair and splitting the
worst-fitted target as issue 7 proposed, later dropping the least wanted peak and adding one
at the largest residual; it could not repair the network's usual error of 1-2 spare cells:
CSO-mAP 72.4 on clean data against 93 now.)

Safety (``fallback``): the fit replaces the network's answer only when (0) the estimated noise
is at most ``max_noise`` (garbage frames fail here), (1) the fit is finite, (2) its misfit is
plausible (chi2 / dof <= ``max_reduced_chi2``; targets out of reach of the start, saturation
ignored, unmodelled structure fail here) and (3) it explains the frames better than the network's
answer: a lower criterion than the network's peaks with brightness and velocity refitted,
penalised like a fit with the network's count (for the same count, a lower chi2). Otherwise
the network's peaks come back unchanged with ``accepted=False``. (Counting the network's
positions as given, i.e. penalising the fit's 2K position parameters, rejected one window in
ten at noise sigma 5 where the fit was better: the position prior already guards them.)

Edge-padded windows (a track's first/last frames replicated to fill the window) break the
constant-velocity model: a replicated frame shows the group where it was, not where it would
have been. So each frame gets a time (frames after the middle one): by default (``times=None``
with ``detect_padding``) a frame bit-identical to its neighbour toward the middle is taken for
a copy and given that neighbour's time, e.g. (0, 0, 0, 1, 2) for a track's first frame; the
model is then exact again (the copies count the same noise more than once, which makes the fit
a little overconfident). Callers that know the padding may pass ``times`` themselves. Fitted as
ordinary windows (``detect_padding=False``), clean padded windows misfit the window's model,
and the frame terms below take the copies up as shifts of their frames off the track; noisy
ones are fitted with a velocity that absorbs part of the mismatch, less accurately than real
windows.

Frame terms. A real sensor's frames also depart from one another in ways the window's model
does not have: the platform jitters and turbulence moves the group off its track from frame to
frame, and targets scintillate. Where even the best fit misfits past the fallback's limit, its
count and the counts next to it are fitted again with every frame but the middle one shifted
and each target's brightness in it scaled (:class:`_FrameProblem`, :func:`_free_frames`; in C
like the rigid fits, numpy the reference), and the criterion decides. Frames whose levels
differ (a sensor's gain control) are taken to the window's level before any of this
(:func:`_frame_levels`).

Reach. Where the fit misfits past the fallback's limit with a target stopped at its bound, its
counts are also fitted with every target free to move UNBOUND_SHIFT times further and not
pulled toward the network's answer (:func:`_unbound`): the network's cells may carpet some
targets and miss one nearby, whose start then stops at its bound.

Missed targets. Every start comes from the network's peaks, and the crop is cut around them:
a target the network did not see, away from the others, gets neither a start nor all of its
pixels, and the window misfits. Where the fit still misfits past the fallback's limit, the
light it leaves in the window's mean frame (:func:`_missed`: spots as wide as a target, above
the noise and the residual's spread, away from its targets, the whole frame searched) becomes
peaks too, peaks with no light under them are dropped, and the window is fitted again from
those; the new fit replaces the network's answer only where it passes every test above.

Information. :func:`position_bound` gives the Cramer-Rao bound on the targets' positions at
given true values: the least covariance an unbiased estimator reaches from a window's frames
(``csist bench ceiling`` turns it into each condition's ceiling).
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from dataclasses import astuple, dataclass, field, replace
from typing import NamedTuple

import numpy as np
from scipy.linalg.lapack import dposv as _posv
from scipy.linalg.lapack import dtrtri as _trtri
from scipy.optimize import least_squares
from scipy.special import lambertw, ndtri

from service.science.background import (
    defects,
    edge_column,
    fit_edge,
    fit_planes,
    plane_basis,
    plane_image,
    temporal_noise,
)
from service.science.physics import (
    DEFAULT_SNR,
    EIGHT_BIT,
    SIGMA,
    flux_noise,
    pixel_fractions,
    pixel_fractions_dsigma,
    pixel_fractions_grad,
    pixel_response,
)
from service.science.windows import replicated

try:
    from service.kernels import _fit as _native_fit
except ImportError:  # installed without a C compiler: the numpy solver
    _native_fit = None

# whether solver "lm" and the starts' clustering run in C (an extension built from older source
# lacks an entry point, takes no edge column or no halo: numpy runs instead)
NATIVE = _native_fit is not None and all(hasattr(_native_fit, f) for f in ("lm", "edge_fit", "kmeans", "HALO"))
NATIVE_MAX_PARAMS = 64  # the C solver's limit (MAXP in fit.c); larger problems run in numpy
NATIVE_FRAMES = NATIVE and hasattr(_native_fit, "FRAMES")  # the C solver takes the frame terms
CRITERIA = ("bic", "aic")
SOLVERS = ("lm", "lm-numpy", "scipy")
ROUNDING_VARIANCE = 1.0 / 12.0  # variance of the error of rounding to an integer
# Clutter is modelled where the frame mean's variance beyond the noise exceeds the noise's own
# share of it (so that it doubles the variance: far past what ~70 far pixels' sampling error of
# a pure-noise variance reaches) and a quarter grey level squared (the rounding's scale)
CLUTTER_MIN_RATIO = 1.0
CLUTTER_MIN_VAR = 0.25
CLUTTER_MIN_LENGTH = 2.0  # correlation length >= this many PSF sigmas: clutter seen through the optics
CLUTTER_MAX_LENGTH = 5.0  # px: longer than this, the plane takes it within an 11-px patch
CLUTTER_PAD = 1.0  # the crop grows by this many correlation lengths where there is clutter
CLUTTER_KERNELS = ("smooth", "rough")  # covariance shapes tried (_kernel), the likelier kept
# A group whose frames' centroid moves faster than FAST_SHARE of the speed bound is fitted with
# the bound (and the crop) grown to FAST_ROOM times that speed, at most MAX_SPEED px/frame: a
# tracker's patch can hold targets moving faster than SeqCSIST's (<= 0.1 px/frame), and a
# bound below their speed leaves every fit a misfit. A tracker re-centring its patch keeps the
# motion within a patch below a pixel per frame.
FAST_SHARE = 0.8
FAST_ROOM = 2.0
MAX_SPEED = 1.0
# Where even the best fit misfits past the fallback's limit, the frames may depart from the
# window's model, each but the middle one: the group shifted off its track (platform jitter,
# turbulence; a prior of FRAME_JITTER_PX, at most FRAME_MAX_JITTER_PX) and each target's
# brightness scaled (scintillation; a prior of FRAME_GAIN, within FRAME_MIN_GAIN .. its
# inverse). Fitted from the best fit with FRAME_NFEV residual evaluations at most.
FRAME_JITTER_PX = 0.2
FRAME_MAX_JITTER_PX = 0.6
FRAME_GAIN = 0.3
FRAME_MIN_GAIN = 0.1
FRAME_NFEV = 40
# A fitted answer with STACK_TARGETS or more targets within STACK_PX of one of them is one
# target brighter than the brightness calibration, split by it into several of calibrated
# brightness at one place (which fit as well): the count is searched again with brightness free.
# (Two coincident targets are left alone: in packed groups fitted pairs come that close.)
STACK_TARGETS = 3
STACK_PX = 0.2
# the brightness-free fits' flux bound, in clip levels (a peak of about 5 of them)
BRIGHT_SATURATIONS = 10.0
# a fit that misfits is tried with its targets free to move this many times max_shift_px
# (_unbound), where a target stopped at BOUND_SHARE of its reach or beyond
UNBOUND_SHIFT = 3.0
BOUND_SHARE = 0.9
# a spot the chosen fit leaves unexplained this far from its targets (px) is a target the network
# missed (_missed); at most MISSED_MAX of them are added
MISSED_PX = 1.0
MISSED_MAX = 3
# a target's brightest pixel holds at most about half of its 3 x 3 pixels' flux (sigma 0.5)
MISSED_PEAK_SHARE = 0.75
FRAME_LEVEL_Z = 5.0  # frames' levels differ where one is this many standard errors off the median


@dataclass(frozen=True)
class FitConfig:
    """Settings of :func:`fit_window`; the defaults suit SeqCSIST-protocol 8-bit windows."""

    psf_sigma: float = SIGMA  # PSF standard deviation, LR px (the papers' 0.5): the calibration
    # Where the calibrated PSF leaves a misfit (chi2 / dof above ``psf_chi2``), fit the PSF sigma
    # too, from ``psf_sigma`` x (1 - ``psf_range``) to ``psf_sigma`` x ``psf_max``, pulled toward
    # it by a Gaussian prior of relative width ``psf_prior``, and keep it where the criterion says
    # the frames support it: optics differ from their calibration (focus, temperature, field
    # position), and a sigma 20 % off moves and splits targets. The range is wider upward: a
    # defocused or blurred PSF can be several times the calibrated one, and a wider PSF than
    # the fit may take is explained by splitting each target into several (a sigma-0.9 target
    # fitted as 6-7 targets at 0.7). Where the calibration fits, sigma stays fixed: a free sigma
    # trades against close targets' separations and brightness.
    fit_psf: bool = True
    psf_chi2: float = 1.5
    # Real optics are not Gaussian: aberrations, scatter and diffraction put a share of the flux
    # in wings around the core. Where the calibrated PSF (sigma freed too) still leaves a misfit,
    # the PSF also gets a halo, a Gaussian of one of ``halo_scales`` times the core's sigma
    # holding one of ``halos`` of each target's flux, each pair in turn, kept where the criterion
    # prefers it (two more parameters); without it such wings are explained as extra targets.
    halos: tuple[float, ...] = (0.15, 0.3, 0.5)
    halo_scales: tuple[float, ...] = (2.0, 3.0)
    # the halo of the PSF in use: (share of the flux, width / core sigma); None: a Gaussian core
    psf_halo: tuple[float, float] | None = None
    # Where a fitted target sits at a bound of ``brightness_range``, or the calibrated fit leaves
    # a misfit (chi2 / dof above ``psf_chi2``, after the PSF was freed), the window's targets are
    # dimmer or brighter than the calibration (whose flux then allows only wrong counts): count
    # and fit again with brightness free (by the criterion, from the calibrated count one way,
    # then the other) and keep what the criterion prefers.
    free_brightness: bool = True
    psf_range: float = 0.4
    psf_max: float = 3.0
    psf_prior: float | None = 0.2
    # width of the pull toward each start position, px; None = no pull. Measured on dev windows
    # started from the network's peaks (CSO-mAP clean / sigma 2 / sigma 5): 0.1 -> 93.7 / 72.7
    # / 56.7, 0.15 -> 93.7 / 73.7 / 58.9, 0.2 -> 93.9 / 72.5 / 58.6, 0.3 -> 93.7 / 68.7 / 56.1.
    # In 8-bit frames of 4 targets within 0.6 px, configurations 0.07 px apart can fit equally
    # well; the pull toward the network's answer decides between them.
    prior_px: float | None = 0.15
    max_shift_px: float = 0.5  # a target stays within +-this of its start position, px
    # Brightness: bounds, and a Gaussian prior of this width (grey levels) toward the centre of
    # the range (None = flat within it). SeqCSIST draws U(220, 250). Both matter at noise:
    # without them the fit trades flux between close targets (measured at sigma 2: CSO-mAP
    # 83 with (150, 300) and no prior, 92 with (200, 270), 95 with the prior as well; the
    # prior also halves the work). Set them from your sensor's calibration.
    brightness_range: tuple[float, float] = (200.0, 270.0)
    brightness_prior: float | None = 20.0

    @classmethod
    def calibrated(
        cls, psf_sigma: float, saturation: float | None, brightness_range: tuple[float, float] | None = None
    ) -> FitConfig:
        """The fit for a sensor's calibration: PSF sigma, clip level and, where known, the range of
        target brightness (integrated flux), whose Gaussian prior then spans it at +-1.75 sigma
        (the default's 20 for its 70 wide range).

        The defaults' grey levels (the brightness range and prior, ``max_noise``) are an 8-bit
        sensor's, clipping at 255. A sensor that clips elsewhere has them scaled by its clip level
        over 255: a 12-bit sensor (4095) read with 8-bit levels has all its targets 16 times too
        bright for the range and its noise past ``max_noise``, and the fit gives up on every
        window. Without a clip level (``saturation`` None) they stay as they are."""
        scale = 1.0 if saturation is None else saturation / EIGHT_BIT
        base = cls()
        if brightness_range is None:
            lo, hi = (scale * b for b in base.brightness_range)
            prior = None if base.brightness_prior is None else scale * base.brightness_prior
        else:
            lo, hi = brightness_range
            prior = (hi - lo) / 3.5
        return cls(
            psf_sigma=psf_sigma,
            saturation=saturation,
            brightness_range=(lo, hi),
            brightness_prior=prior,
            max_noise=scale * base.max_noise,
        )

    max_speed_px: float = 0.15  # |vx|, |vy| bound, px/frame (SeqCSIST: <= 0.09); grown for faster groups
    noise: float | None = None  # Gaussian noise sigma, grey levels; None = estimate from the patch
    quantized: bool = True  # frames were rounded to integers: add 1/12 to the noise variance
    model_error: float = 0.0  # extra per-pixel error, grey levels (unmodelled physics)
    saturation: float | None = 255.0  # pixels >= this are lower bounds; None = no clipping
    # Count selection: fit every count the window's flux allows (see the module docstring) and
    # keep the one with the lowest information criterion. False: keep the network's count.
    try_counts: bool = True
    flux_z: float = 3.0  # the flux allows a count within this many sigma of its noise
    criterion: str = "bic"  # information criterion for the count and the fallback: bic | aic
    max_targets: int = 8  # never fit more targets than this
    # A fit with chi2 / dof above this is likely a local minimum: it is also started from the
    # subset of the peaks with the least linear misfit, and the better fit kept. On clean dev
    # windows chi2 / dof is 0.77 at the median and 1.36 at the 95th percentile.
    retry_chi2: float = 2.0
    grow_chi2: float = 1.5  # where the flux is a lower bound, try one more target only past this chi2 / dof
    # "lm": the built-in projected Levenberg-Marquardt, in C where service.kernels._fit is built
    # (else as "lm-numpy"); "lm-numpy": the same in numpy (the reference); "scipy": least_squares trf
    solver: str = "lm"
    max_nfev: int = 20  # residual evaluations per fit (one count)
    tol: float = 1e-4  # stop when the cost falls by less than tol (relative) or the step is tiny
    crop_px: float = 2.0  # fit pixels whose centre is within this of a start position, px
    fallback: bool = True  # keep the network's answer where the fit does not explain better
    detect_padding: bool = True  # with times=None, give replicated edge frames their copy's time
    max_reduced_chi2: float = 5.0  # fallback when chi2 / dof of the chosen fit exceeds this
    max_noise: float = 25.0  # fallback when the estimated noise sigma exceeds this, grey levels
    min_noise_pixels: int = 20  # far-from-target pixel values needed to estimate the noise
    # Fit a background plane (offset and gradient, shared by the window's frames: a staring
    # sensor's background is static over 5 frames) jointly with the targets, started from the
    # frames' median planes (service.science.background). False: the background is 0.
    background: bool = True
    # Clutter: where the frame-mean background left by the plane varies more than the frames'
    # noise explains, model it as a Gaussian random field (a Gaussian process) and marginalise it
    clutter: bool = True
    # Edges: where there is such structure, also try a straight blurred step across the patch (a
    # horizon, a cloud's rim; service.science.background.fit_edge) as a background term, placed
    # from the far pixels with its contrast fitted jointly, and keep it where the far pixels are
    # likelier with it (BIC)
    edges: bool = True

    def __post_init__(self) -> None:
        # sequences as tuples: a config is hashable (the fit caches its variants by it) and
        # cannot be changed through a list it was given
        for name in ("brightness_range", "halos", "halo_scales", "psf_halo"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        lo, hi = self.brightness_range
        if not 0 < lo < hi:
            raise ValueError(f"brightness_range must be 0 < lo < hi, got {self.brightness_range}")
        if self.psf_sigma <= 0 or self.max_shift_px <= 0 or self.max_speed_px < 0:
            raise ValueError("psf_sigma and max_shift_px must be > 0, max_speed_px >= 0")
        if not 0 < self.psf_range < 1 or not self.psf_max > 1 or (self.psf_prior is not None and self.psf_prior <= 0):
            raise ValueError(
                f"psf_range must be in (0, 1), psf_max > 1 and psf_prior > 0 or None, got {self.psf_range}, "
                f"{self.psf_max}, {self.psf_prior}"
            )
        if self.prior_px is not None and self.prior_px <= 0:
            raise ValueError(f"prior_px must be > 0 or None, got {self.prior_px}")
        if self.brightness_prior is not None and self.brightness_prior <= 0:
            raise ValueError(f"brightness_prior must be > 0 or None, got {self.brightness_prior}")
        if self.noise is not None and self.noise < 0:
            raise ValueError(f"noise must be >= 0 or None, got {self.noise}")
        if self.max_nfev < 2 or self.max_targets < 1 or self.crop_px <= 0 or self.tol <= 0:
            raise ValueError("need max_nfev >= 2, max_targets >= 1, crop_px > 0, tol > 0")
        if self.flux_z <= 0 or self.retry_chi2 <= 0 or self.grow_chi2 <= 0:
            raise ValueError("flux_z, retry_chi2 and grow_chi2 must be > 0")

    @property
    def brightness_centre(self) -> float:
        """Centre of the calibrated brightness range: the prior's mean."""
        return 0.5 * (self.brightness_range[0] + self.brightness_range[1])


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit_window`.

    ``targets``: (K', 3) rows (x, y, brightness) of the middle frame, brightness descending;
    the network's peaks, unchanged, when ``accepted`` is False. ``cost``: data chi2 of the
    chosen fit (sum of squared noise-normalised residuals; NaN when nothing was fitted).
    ``nfev``: residual evaluations over all fits. ``criteria``: information criterion of each
    tried count, plus ``"network"`` for the network's answer when it was compared.
    """

    targets: np.ndarray
    accepted: bool
    k_start: int
    k_final: int
    cost: float
    velocity: tuple[float, float]
    nfev: int
    noise: float = float("nan")  # the residual scale s = sqrt(noise^2 + 1/12 + model_error^2)
    reason: str = ""  # why the fit was rejected ("" when accepted)
    criteria: dict = field(default_factory=dict)
    # the chosen fit's background plane (offset, d/dx, d/dy about the patch centre, grey levels)
    # and PSF sigma (the calibration, or fitted where it left a misfit); NaN when not accepted
    background: tuple[float, float, float] = (float("nan"),) * 3
    psf_sigma: float = float("nan")
    # the share of each target's flux in the PSF's halo (FitConfig.halos) where one was fitted
    psf_halo: float = 0.0
    # the background's edge where the window has one (FitConfig.edges): angle (radians), offset
    # and blur (px) as service.science.background.Edge, and the fitted contrast; else None
    edge: tuple[float, float, float, float] | None = None
    # per target (rows as ``targets``): sigma_x, sigma_y (px), rho_xy, sigma_brightness, from the
    # fit's covariance; and the chosen count's weight among the counts tried. Empty / NaN when
    # not accepted.
    uncertainty: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    count_confidence: float = float("nan")


# ------------------------------------------------------------------------------ public API


def estimate_noise(values: np.ndarray, min_pixels: int = 20, plane: np.ndarray | float | None = None) -> float | None:
    """Gaussian noise sigma (grey levels) from pixel values far from every target (any shape).

    Robust to a minority of pixels holding signal (quantiles, not moments), and aware of how
    8-bit frames were made: noise added to the background ``plane`` (each value's own, or one
    level; default 0), then rounded and clipped at 0.

    - Dark background (more than 10 % of the values exactly 0, i.e. clipped; the plane is then
      taken for 0): if at least 75 % are 0, their share p0 = P(noise < 0.5) gives
      sigma = 0.5 / Phi^-1(p0) (0 when all are 0); otherwise sigma = (75th percentile of the
      noise) / 0.6745.
    - Otherwise: sigma = interquartile range of the values less the plane / 1.349.

    Where the values are integers, each stands for the unit bin it was rounded from
    (k - 0.5 <= x < k + 0.5), shifted by its plane, and the quantiles are read from those bins
    (:func:`_binned_quantiles`): read from the rounded values themselves they move by whole
    grey levels, and at a noise of 2 the estimate swung from 1.5 to 2.2 with the plane's
    fractional part. Returns None when fewer than ``min_pixels`` values are given (the caller
    then estimates the noise from the fit's residuals).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < max(min_pixels, 1):
        return None
    integers = bool(np.all(v == np.rint(v)))
    p0 = float(np.mean(v == 0.0))
    if p0 > 0.1:
        if p0 >= 0.75:
            return 0.0 if p0 == 1.0 else float(0.5 / ndtri(p0))
        q3 = _binned_quantiles(v - 0.5, (0.75,))[0] if integers else np.quantile(v, 0.75)
        return float(q3) / 0.6745
    base = 0.0 if plane is None else np.broadcast_to(np.asarray(plane, dtype=np.float64), np.shape(values)).ravel()
    if not integers:
        q1, q3 = np.quantile(v - base, (0.25, 0.75))
        return float(q3 - q1) / 1.349
    # the bins' spread is the rounding's twice over (once in the values, once in the bins):
    # 1/6 of variance beyond the noise's, which the fit counts once itself (ROUNDING_VARIANCE)
    q1, q3 = _binned_quantiles(v - 0.5 - base, (0.25, 0.75))
    return math.sqrt(max((float(q3 - q1) / 1.349) ** 2 - 2.0 * ROUNDING_VARIANCE, 0.0))


def _binned_quantiles(lower: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """Quantiles ``qs`` of values each spread evenly over its unit bin [lower, lower + 1): the
    inverse of their CDF F(x) = mean(clip(x - lower, 0, 1)), which is linear between the bins'
    edges."""
    a = np.sort(lower)
    sums = np.concatenate([[0.0], np.cumsum(a)])
    knots = np.unique(np.concatenate([a, a + 1.0]))
    full = np.searchsorted(a, knots - 1.0, side="right")  # bins wholly below each knot
    begun = np.searchsorted(a, knots, side="right")  # bins begun by each knot
    cdf = (full + (begun - full) * knots - (sums[begun] - sums[full])) / a.size
    return np.interp(qs, cdf, knots)


def fit_window(
    frames: np.ndarray,
    peaks: np.ndarray,
    config: FitConfig = FitConfig(),
    times: np.ndarray | None = None,
    planes: np.ndarray | None = None,
    stuck: np.ndarray | None = None,
) -> FitResult:
    """Refine the middle frame's targets of one window by fitting all its frames.

    ``frames``: (F, H, W) LR frames (F = 5 for a window; grey levels, 8-bit values or float);
    ``peaks``: (K, 3) rows (x, y, brightness) of the middle frame (index F // 2) in LR px, e.g.
    from :func:`service.science.peaks.extract_peaks`. ``times``: when each frame was taken, in frames
    relative to the middle one (default ``-(F//2) .. F//2``, with replicated edge frames
    detected; see the module docstring). ``planes``: the frames' background planes (F, 3) of
    :func:`service.science.background.fit_planes`, where the caller has them, and ``stuck`` (H, W)
    the window's stuck pixels (:func:`service.science.background.defects`; found here when
    ``planes`` is None), which the fit leaves out. With 0 peaks the fit starts from the frames'
    brightest spot (:func:`_frame_seed`), and where there is none the empty answer comes back
    with ``accepted`` False.
    """
    return _fit_window(frames, peaks, config, times, planes, stuck, rescue=True)


def _fit_window(
    frames: np.ndarray,
    peaks: np.ndarray,
    config: FitConfig,
    times: np.ndarray | None,
    planes: np.ndarray | None,
    stuck: np.ndarray | None,
    rescue: bool,
) -> FitResult:
    """:func:`fit_window`; with ``rescue``, a window that still misfits is fitted once more from
    the light its fit leaves (:func:`_missed`)."""
    cfg = config
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim != 3 or min(frames.shape) < 1:
        raise ValueError(f"frames must be (F, H, W), got shape {frames.shape}")
    peaks_in = np.asarray(peaks, dtype=np.float64)
    if peaks_in.size != 0 and (peaks_in.ndim != 2 or peaks_in.shape[1] != 3):
        raise ValueError(f"peaks must have shape (K, 3), got {peaks_in.shape}")
    network = peaks_in.reshape(-1, 3)  # the answer kept where the fit is not better
    frames, planes, stuck = _sensor_frames(frames, cfg, planes, stuck)
    if peaks_in.size == 0:
        # nothing above the network's threshold: the frames may still hold a target it did not
        # see (dim, or an unfamiliar shape); start from their brightest spot
        peaks_in = _frame_seed(frames, planes) if planes is not None else None
        if peaks_in is None:
            return FitResult(np.zeros((0, 3)), False, 0, 0, float("nan"), (0.0, 0.0), 0, reason="no peaks")
    times = _times(frames, times, cfg)
    k0 = len(peaks_in)

    def reject(reason: str, nfev: int = 0, chi2: float = float("nan"), v=(0.0, 0.0), s=float("nan"), ics=None):
        k = len(network)
        return FitResult(network.copy(), False, k, k, chi2, (float(v[0]), float(v[1])), nfev, s, reason, ics or {})

    if not (np.isfinite(frames).all() and np.isfinite(peaks_in).all()):
        return reject("non-finite input")

    win, drift = _window(frames, times, peaks_in, cfg, planes, stuck)
    cfg = win.cfg
    if cfg.fallback and win.noise is not None and win.noise > cfg.max_noise:
        return reject(f"noise {win.noise:.3g} > {cfg.max_noise}", s=win.noise)
    scale = win.scale if win.scale is not None else 1.0

    v0 = np.clip(drift, -cfg.max_speed_px, cfg.max_speed_px)  # the fits' start, within the bound
    if cfg.try_counts:
        counts, open_ended = _flux_counts(win)
    else:
        counts, open_ended = [min(k0, cfg.max_targets)], False
    fits: dict[int, _Fit] = {}
    best: _Fit | None = None
    nfev = 0
    k = counts[0]
    # every count the flux allows; above that, where the flux is only a lower bound, one more
    # at a time while the criterion keeps falling
    while k <= cfg.max_targets and (k <= counts[-1] or (open_ended and best is fits[k - 1] and _may_grow(win, best))):
        fit, scale = _fit_count(win, peaks_in, k, v0, scale, fits)
        fits[k] = fit
        nfev += fit.nfev
        if best is None or fit.ic < best.ic:
            best = fit
        k += 1

    if cfg.fit_psf and win.reduced_chi2(best) > cfg.psf_chi2:
        # the calibrated PSF leaves a misfit: the best count and its neighbours again with sigma
        # free (the flux, which sets the count, does not depend on sigma), kept where better
        nfev += _free_psf(win, fits, len(best.targets), scale)
        best = min(fits.values(), key=lambda f: f.ic)
    halo = None
    if cfg.halos and win.white is None and win.reduced_chi2(best) > cfg.psf_chi2:
        # still a misfit: the wings of non-Gaussian optics, which the counts below would explain
        # as more targets; or targets dimmer or brighter than calibrated, which a halo would
        # explain by spreading their flux. Both are tried, the criterion decides below. (Under
        # clutter, whose correlation length is a halo's width, the misfit is the background's.)
        halo_fits = dict(fits)
        halo_win, extra = _halo(win, halo_fits, len(best.targets), scale)
        nfev += extra
        if halo_win is not win:
            halo = (halo_win, halo_fits, min(halo_fits.values(), key=lambda f: f.ic))
    best_win = win  # the window (and its brightness range) the chosen fit was made in
    lo, hi = cfg.brightness_range
    pinned = best.targets[:, 2].min() <= lo * 1.01 or best.targets[:, 2].max() >= hi * 0.99
    # or targets stacked at one place: one brighter than the calibration (STACK_TARGETS)
    stacked = _stack(best.targets) >= STACK_TARGETS
    if cfg.free_brightness and (pinned or stacked or win.reduced_chi2(best) > cfg.psf_chi2):
        # a target pinned at a bound of the calibrated range, or a misfit the PSF does not
        # explain: this window's targets are dimmer or brighter than the calibration says (the
        # flux then allows only wrong counts), so count and fit again with brightness free; and
        # where that still misfits past what the fallback accepts, with the PSF sigma free too
        # (both can be off at once; a milder misfit is not worth the freedom)
        free, extra, tried, free_win = _free_brightness(win, peaks_in, best, v0, scale)
        nfev += extra
        if cfg.fit_psf and win.reduced_chi2(free) > cfg.max_reduced_chi2:
            nfev += _free_psf(free_win, tried, len(free.targets), scale)
            free = min(tried.values(), key=lambda f: f.ic)
        if free.ic < best.ic:
            best, best_win = free, free_win
    if halo is not None and halo[2].ic < best.ic:
        win, fits, best = halo
        best_win = win
    ics: dict = {k: f.ic for k, f in fits.items()}

    if not (np.isfinite(best.targets).all() and math.isfinite(best.chi2)):
        return reject("fit not finite", nfev, s=scale, ics=ics)
    if cfg.fallback:
        reduced = win.reduced_chi2(best)
        if reduced > cfg.max_reduced_chi2:
            # a misfit: the fits that take it up are tried from the rigid fits, and the one the
            # criterion prefers is kept
            rigid, tried = best, []
            # the targets may sit beyond their starts' reach: the network's cells covered some
            # targets several times and another not at all, and the start meant for it stopped
            # at its bound. Where one did, the counts again from their fits, each target free to
            # move further and not pulled back; kept where that takes the misfit away by moving a
            # target past the reach (freer targets fit any misfit a little better)
            if _stretched(rigid, BOUND_SHARE * cfg.max_shift_px):
                loose, extra = _unbound(best_win, rigid, fits, scale)
                nfev += extra
                if win.reduced_chi2(loose) <= cfg.max_reduced_chi2 and _beyond(
                    loose.targets, rigid.anchors, cfg.max_shift_px
                ):
                    tried.append(loose)
            if win.moving:
                # the frames may differ from each other in ways the window's model does not have
                # (jitter, scintillation)
                free, extra = _free_frames(best_win, rigid, fits, scale)
                nfev += extra
                tried.append(free)
            best = min([rigid, *tried], key=lambda f: f.ic)
            reduced = win.reduced_chi2(best)
        if reduced > cfg.max_reduced_chi2 and rescue and planes is not None:
            # still a misfit, with light where the fit has no target: the network missed a target
            # away from the others, whose light the crop (around the peaks) cut, and no start or
            # bound reaches it. The whole fit again, with those spots as peaks too (and without
            # peaks that have no light under them).
            missed = _missed(frames, planes, best, times, scale, peaks_in)
            if missed is not None:
                again = _fit_window(frames, missed, config, times, planes, stuck, rescue=False)
                nfev += again.nfev
                if again.accepted:
                    return replace(again, k_start=k0, nfev=nfev)
        if reduced > cfg.max_reduced_chi2:
            return reject(
                f"reduced chi2 {reduced:.3g} > {cfg.max_reduced_chi2}", nfev, best.chi2, best.velocity, scale, ics
            )
        # the network's answer on the same footing: its positions with brightness and velocity
        # refitted, penalised as if fitted like the others (so for the same count this
        # compares chi2: "explains the frames better")
        net, bg_net = _linear_fit(best_win, network, best.velocity, best.psf_sigma)
        r_net = win.data_residuals(win.model(net, best.velocity, bg_net, best.psf_sigma))
        others = best.n_params - 3 * len(best.targets)  # velocity, background, sigma if fitted
        ics["network"] = _criterion(
            win.chi2(r_net, scale) + _calibration_chi2(best_win.cfg, net[:, 2]),
            3 * len(net) + others,
            win.n_data,
            cfg.criterion,
        )
        if not best.ic < ics["network"]:
            return reject(
                "the fit does not explain the frames better than the peaks", nfev, best.chi2, best.velocity, scale, ics
            )

    order = np.argsort(-best.targets[:, 2], kind="stable")
    # the count's confidence: its share of the criterion's weights exp(-IC / 2) among the counts
    # tried (BIC weights approximate the counts' posterior probabilities)
    by_count = {k: f.ic for k, f in fits.items() if isinstance(k, int)}
    by_count[len(best.targets)] = min(by_count.get(len(best.targets), math.inf), best.ic)
    weights = np.exp(-0.5 * (np.array(list(by_count.values())) - best.ic))
    return FitResult(
        targets=best.targets[order],
        uncertainty=best.uncertainty()[order],
        count_confidence=float(1.0 / weights.sum()),
        accepted=True,
        k_start=k0,
        k_final=len(best.targets),
        cost=best.chi2,
        velocity=(float(best.velocity[0]), float(best.velocity[1])),
        nfev=nfev,
        noise=scale,
        criteria=ics,
        background=tuple(float(b) for b in best.background[:3]),
        psf_sigma=best.psf_sigma,
        psf_halo=0.0 if best_win.cfg.psf_halo is None else best_win.cfg.psf_halo[0],
        edge=None if win.edge is None else (*astuple(win.edge)[:3], float(best.background[3])),
    )


def _sensor_frames(
    frames: np.ndarray, cfg: FitConfig, planes: np.ndarray | None, stuck: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The frames as the fit reads them, their background planes and stuck pixels (found where
    not given, and the frames are finite); None for stuck where there are none."""
    if planes is None and np.isfinite(frames).all():
        planes, noise = fit_planes(frames)
        if stuck is None:
            stuck = defects(frames, planes, noise, cfg.psf_sigma * (1.0 - cfg.psf_range))
    if stuck is not None and stuck.any() and planes is not None:
        # a stuck pixel reads as its frame's background: no flux, seed or centroid comes from
        # it, and the fit leaves it out (_Window)
        return np.where(stuck, plane_image(planes, *frames.shape[1:]), frames), planes, stuck
    return frames, planes, None


def _times(frames: np.ndarray, times: np.ndarray | None, cfg: FitConfig) -> np.ndarray:
    """Each frame's time (frames after the middle one): as given, else with replicated edge
    frames detected (``detect_padding``), else -(F//2) .. F//2."""
    n_frames = frames.shape[0]
    if times is None:
        times = _frame_times(frames) if cfg.detect_padding else np.arange(n_frames, dtype=np.float64) - n_frames // 2
    times = np.asarray(times, dtype=np.float64)
    if times.shape != (n_frames,):
        raise ValueError(f"times must have one entry per frame ({n_frames}), got shape {times.shape}")
    return times


def _window(
    frames: np.ndarray,
    times: np.ndarray,
    peaks: np.ndarray,
    cfg: FitConfig,
    planes: np.ndarray | None,
    stuck: np.ndarray | None,
) -> tuple[_Window, np.ndarray]:
    """The window the fit works in (its ``cfg`` the config it is fitted with) and the frames'
    centroid velocity."""
    saturated = None
    if planes is not None and cfg.background:
        levels = _frame_levels(frames)
        if levels is not None:
            # the frames' levels differ by more than their noise explains (a sensor's gain control,
            # frame-level noise): each frame is taken to the window's level, and the pixels it
            # clipped stay lower bounds
            if cfg.saturation is not None:
                saturated = frames >= cfg.saturation
            frames = frames - levels[:, None, None]
            planes = planes.copy()
            planes[:, 0] -= levels
    win = _Window(frames, times, peaks, cfg, planes, stuck, saturated)
    drift = _centroid_velocity(win)
    fast = _speed_bound(cfg.max_speed_px, drift)
    if fast is not None:
        # the group moves about as fast as the bound allows, or faster: the bound and the crop
        # (which reaches as far as the bound lets a target move) grow to its speed
        win = _Window(frames, times, peaks, _variant(cfg, max_speed_px=fast), planes, stuck, saturated)
        drift = _centroid_velocity(win)
    return win, drift


def _linear_fit(win: _Window, targets: np.ndarray, v, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Targets (K, 3) at fixed positions with their brightness, and the background plane, by one
    linear least-squares solve (saturated pixels left out; brightness clipped to the calibrated
    range, the plane then solved again for it)."""
    keep = win.usable
    cols = win.unit_columns(targets[:, :2], v, sigma)  # (n, K)
    basis = win.bg_basis[:, : win.n_bg]
    lo, hi = win.cfg.brightness_range
    try:
        sol = _lstsq(np.hstack([cols, basis])[keep], win.obs[keep])
        a = np.clip(sol[: len(targets)], lo, hi) if len(targets) else sol[:0]
        rest = win.obs[keep] - cols[keep] @ a
        bg = _lstsq(basis[keep], rest) if win.n_bg else np.zeros(0)
    except np.linalg.LinAlgError:
        return targets.copy(), win.bg0.copy()
    plane = win.bg0.copy()
    plane[: win.n_bg] = bg
    return np.column_stack([targets[:, :2], a]), plane


def _lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least-squares x of a x = b for a tall ``a`` (m, n): the normal equations by one LAPACK
    call (Cholesky, ``dposv``), which at these sizes costs a fifth of an SVD; numpy's SVD
    ``lstsq`` (singular values below 1e-6 of the largest dropped) where they are not
    well-posed (a^T a not positive definite, or a condition number past 1e6: close targets)."""
    gram = a.T @ a
    if gram.size:
        chol, x, info = _posv(gram, a.T @ b, lower=1)
        d = np.abs(np.diag(chol))
        if info == 0 and d.min() > 1e-6 * d.max():
            return x
    return np.linalg.lstsq(a, b, rcond=1e-6)[0]


def _frame_levels(frames: np.ndarray) -> np.ndarray | None:
    """Each frame's level (F,) off the window's: the mean of the central half of its pixels'
    differences from the pixel-wise median frame (a static background and clutter cancel, the
    few pixels a moving target changes fall outside it), where one is more than FRAME_LEVEL_Z
    standard errors of such a mean (and half a grey level) off the median level; None where
    they are not (the frames share one level)."""
    n_frames, height, width = frames.shape
    if n_frames < 3 or np.mean(frames == 0.0) > 0.1:  # a dark floor clips the noise: no level to see
        return None
    diff = np.sort((frames - np.median(frames, axis=0)).reshape(n_frames, -1), axis=1)
    quarter = diff.shape[1] // 4
    levels = diff[:, quarter : diff.shape[1] - quarter].mean(axis=1)
    levels -= np.median(levels)
    if not np.max(np.abs(levels)) > 0.5:  # within half a grey level: no need of the noise
        return None
    noise = temporal_noise(frames[None])[0]
    if not np.isfinite(noise):
        return None
    error = 1.5 * max(float(noise), 0.5) / math.sqrt(height * width)
    if not np.max(np.abs(levels)) > max(FRAME_LEVEL_Z * error, 0.5):
        return None
    return levels


def _frame_seed(frames: np.ndarray, planes: np.ndarray) -> np.ndarray | None:
    """One start (1, 3) at the brightest spot (:func:`_spot`) of the window's mean frame above
    its background ``planes`` (F, 3), where that spot stands DEFAULT_SNR sigmas above the mean
    frame's noise; else None."""
    n_frames, height, width = frames.shape
    plane = plane_image(np.median(planes, axis=0), height, width)
    noise = max(estimate_noise(frames, plane=plane) or 0.0, 1.0) / math.sqrt(n_frames)
    x, y, mass, peak = _spot((frames - plane).mean(axis=0), np.arange(height), np.arange(width))
    return np.array([[x, y, mass / 0.6]]) if peak > DEFAULT_SNR * noise else None


def _spot(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[float, float, float, float]:
    """Where a new target starts in ``image`` (R, C) (pixel centres ``rows``, ``cols``): the
    centroid (x, y) of the positive part of the 3 x 3 pixels around its maximum, their sum (3 x 3
    pixels hold about 60 % of a PSF's flux) and the maximum's value."""
    r, c = np.unravel_index(int(np.argmax(image)), image.shape)
    rs, cs = slice(max(r - 1, 0), r + 2), slice(max(c - 1, 0), c + 2)
    block = np.maximum(image[rs, cs], 0.0)
    mass = float(block.sum())
    if mass > 0:
        x, y = float(block.sum(axis=0) @ cols[cs]) / mass, float(block.sum(axis=1) @ rows[rs]) / mass
    else:
        x, y = float(cols[c]), float(rows[r])
    return x, y, mass, float(image[r, c])


def _missed(
    frames: np.ndarray, planes: np.ndarray, fit: _Fit, times: np.ndarray, scale: float, peaks: np.ndarray
) -> np.ndarray | None:
    """Peaks (m, 3) to fit the window from again where ``fit`` leaves light unexplained, or None.

    The light: spots of the window's mean frame farther than MISSED_PX from the fit's targets
    (the whole frame, not only the crop it was fitted in), DEFAULT_SNR sigmas above the mean
    frame's noise and the residual's own spread, and as wide as a target (a pixel of its own is
    a defect), brightest first, each taken away before the next is looked for. The peaks: those
    of ``peaks`` on light of that strength, then the spots (None where there are no spots)."""
    n_frames, height, width = frames.shape
    size = max(height, width)  # pixel_response draws square images

    def image(targets: np.ndarray) -> np.ndarray:
        return pixel_response(targets, size, fit.psf_sigma)[:height, :width]

    plane = plane_image(np.median(planes, axis=0), height, width)
    model = sum(image(fit.targets + [fit.velocity[0] * t, fit.velocity[1] * t, 0.0]) for t in times)
    excess = (frames - plane).mean(axis=0)
    residual = excess - model / n_frames
    rows, cols = np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64)
    near = np.hypot(cols[None, :, None] - fit.targets[:, 0], rows[:, None, None] - fit.targets[:, 1])
    masked = (near < MISSED_PX).any(axis=2)
    residual[masked] = 0.0
    # above the mean frame's noise, and above what the background leaves (clutter the plane
    # does not take: its bumps are no targets)
    spread = (
        1.4826 * float(np.median(np.abs(residual[~masked] - np.median(residual[~masked])))) if (~masked).any() else 0.0
    )
    floor = DEFAULT_SNR * max(scale / math.sqrt(n_frames), spread)
    found = []
    for _ in range(4 * MISSED_MAX):  # defects and bumps are passed over, a few of them
        r, c = np.unravel_index(int(np.argmax(residual)), residual.shape)
        x, y, mass, peak = _spot(residual, rows, cols)
        if not peak > floor or len(found) == MISSED_MAX:
            break
        if peak <= MISSED_PEAK_SHARE * mass:
            found.append([x, y, mass / 0.6])
        # its wings are no other target: a target of its light taken away (3 x 3 pixels hold
        # more than 60 % of a sigma-0.5 PSF's flux, so the wings go with some to spare)
        residual -= image(np.array([[x, y, mass / 0.6]]))
        residual[r, c] = min(residual[r, c], 0.0)
    if not found:
        return None
    # a peak with no light under it (the network's answer far from the group) starts nothing
    r = np.clip(np.rint(peaks[:, 1]).astype(int), 0, height - 1)
    c = np.clip(np.rint(peaks[:, 0]).astype(int), 0, width - 1)
    return np.vstack([peaks[excess[r, c] > floor], found])


def _above_plane(values: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """Pixel values less their background plane (the window's background level is their mean);
    left as they are where more than 10 % of them are exactly 0: a patch clipped at the sensor's
    floor, whose plane is 0 (and whose noise :func:`estimate_noise` reads from the zeros)."""
    return values - plane if values.size and np.mean(values == 0.0) <= 0.1 else values


def _free_brightness(win: _Window, peaks: np.ndarray, best: _Fit, v0, scale: float) -> tuple[_Fit, int, dict, _Window]:
    """The best fit with brightness free of the calibrated range and prior: from ``best``'s count,
    one target more or fewer at a time while the criterion falls. The flux is fixed, so targets
    pinned at the range's top mean more, dimmer targets: that direction is tried first, the
    other only if the first step does not help. Brightness stays above a 5-sigma flux (any
    dimmer target is noise) and below 4x the range's top or BRIGHT_SATURATIONS times the clip
    level, whichever is higher. Returns the best fit, the residual evaluations, every count's fit
    and the window with brightness free."""
    cfg = win.cfg
    floor = float(DEFAULT_SNR * max(flux_noise(max(scale, 1.0), cfg.psf_sigma), win.flux_sigma))
    # a target far brighter than the calibration clips its core; its wings still tell its flux
    top = 0.0 if cfg.saturation is None else BRIGHT_SATURATIONS * cfg.saturation
    hi = max(4.0 * cfg.brightness_range[1], 2.0 * floor, top)
    free = copy.copy(win)
    free.cfg = replace(cfg, brightness_range=(min(floor, 0.5 * hi), hi), brightness_prior=None)
    k0 = len(best.targets)
    tried: dict[int, _Fit] = {}
    if not cfg.try_counts:  # the count is given: brightness alone is freed
        top = _fit_count(free, peaks, k0, v0, scale, tried)[0]
        return top, top.nfev, {k0: top}, free
    # best's own count from best's answer: the same targets, their brightness now free
    top = _fit(free, best.targets, best.velocity, best.anchors, best.has_prior, scale, 0, best.background)
    tried[k0] = top
    nfev = top.nfev
    # pinned at the top, or a misfit with none pinned (the calibration is too bright for them):
    # more, dimmer targets first
    first = -1 if best.targets[:, 2].min() <= cfg.brightness_range[0] * 1.01 else 1
    for step in (first, -first):
        k = k0 + step
        while 1 <= k <= cfg.max_targets:
            fit = _fit_count(free, peaks, k, v0, scale, tried)[0]
            tried[k] = fit
            nfev += fit.nfev
            if not fit.ic < top.ic:
                break
            top = fit
            k += step
        if len(top.targets) != k0:
            break  # the first direction helped: the other will not
    return top, nfev, tried, free


def _free_frames(best_win: _Window, best: _Fit, fits: dict, scale: float) -> tuple[_Fit, int]:
    """The counts of ``fits`` at and next to ``best``'s fitted again, from their rigid fits, with
    each frame free to depart from the window's model (:class:`_FrameProblem`), in ``best_win``
    (whose brightness settings ``best`` was made with); the one the criterion prefers, and the
    residual evaluations. The misfit also chose the count, and with the frames free a count one
    short can fit as well as the rigid model did. (Started from ``best`` itself, which may have
    taken a halo or a free PSF for the misfit, the fits kept what those had absorbed, and placed
    the targets worse.)"""

    def free(f: _Fit) -> _Fit:
        return _fit(
            best_win,
            f.targets,
            f.velocity,
            f.anchors,
            f.has_prior,
            scale,
            0,
            f.background,
            f.psf_sigma,
            bool(f.problem.n_psf),
            frames_free=True,
        )

    k = len(best.targets)
    return _best_refit([fits[kk] for kk in (k, k - 1, k + 1) if kk in fits] or [best], free)


def _best_refit(starts: list, refit) -> tuple[_Fit, int]:
    """``refit`` of each fit of ``starts``: the one the criterion prefers (the first of equals),
    and the residual evaluations of all."""
    top, nfev = None, 0
    for f in starts:
        alt = refit(f)
        nfev += alt.nfev
        if top is None or alt.ic < top.ic:
            top = alt
    return top, nfev


def _unbound(best_win: _Window, best: _Fit, fits: dict, scale: float) -> tuple[_Fit, int]:
    """The counts of ``fits`` at and next to ``best``'s fitted again from their fits (``best``
    itself for its own count) with each target free to move UNBOUND_SHIFT times further than
    ``max_shift_px`` and no pull toward the network's answer; the one the criterion prefers, and
    the residual evaluations."""
    loose = copy.copy(best_win)
    loose.cfg = _variant(best_win.cfg, max_shift_px=UNBOUND_SHIFT * best_win.cfg.max_shift_px)
    k = len(best.targets)

    def free(f: _Fit) -> _Fit:
        anchors, unpulled = f.targets[:, :2], np.zeros(len(f.targets), dtype=bool)
        return _fit(
            loose, f.targets, f.velocity, anchors, unpulled, scale, 0, f.background, f.psf_sigma, bool(f.problem.n_psf)
        )

    return _best_refit([best] + [fits[kk] for kk in (k - 1, k + 1) if kk in fits], free)


def _stretched(fit: _Fit, reach: float) -> bool:
    """Whether a target of ``fit`` lies ``reach`` or farther from its own anchor."""
    d = np.hypot(fit.targets[:, 0] - fit.anchors[:, 0], fit.targets[:, 1] - fit.anchors[:, 1])
    return bool((d >= reach).any())


def _beyond(targets: np.ndarray, anchors: np.ndarray, reach: float) -> bool:
    """Whether a target of ``targets`` (K, 3) lies farther than ``reach`` from every anchor (M, 2)."""
    d = np.hypot(targets[:, None, 0] - anchors[None, :, 0], targets[:, None, 1] - anchors[None, :, 1])
    return bool(len(anchors) and (d.min(axis=1) > reach).any())


def _free_psf(win: _Window, fits: dict, k: int, scale: float) -> int:
    """Count ``k`` and its neighbours of ``fits`` fitted again with the PSF sigma free, each kept
    where the criterion prefers it (in place); returns the residual evaluations."""
    nfev = 0
    for kk, f in [(kk, f) for kk, f in fits.items() if abs(kk - k) <= 1 and not f.problem.n_psf]:
        alt = _fit(win, f.targets, f.velocity, f.anchors, f.has_prior, scale, 0, f.background, free_sigma=True)
        nfev += alt.nfev
        if alt.ic < f.ic:
            fits[kk] = alt
    return nfev


def _halo(win: _Window, fits: dict, k: int, scale: float) -> tuple[_Window, int]:
    """Count ``k`` of ``fits`` fitted again with a halo in the PSF, for each share of
    ``FitConfig.halos`` and width of ``halo_scales``, then its neighbours with the best of them.
    Where the criterion prefers it (the halo's share and width count as two more parameters),
    those fits replace the counts' in ``fits`` (in place) and their window is returned, else
    ``win``; also returns the residual evaluations."""
    cfg = win.cfg

    def trial(halo: _Window, kk: int) -> _Fit:
        f = fits[kk]
        free = bool(f.problem.n_psf)
        return _fit(halo, f.targets, f.velocity, f.anchors, f.has_prior, scale, 0, f.background, f.psf_sigma, free)

    best_ic, nfev = min(f.ic for f in fits.values()), 0
    pairs = list(itertools.product(cfg.halos, cfg.halo_scales))
    # the middle share first: where it does not help, the window is not about wings (e.g. its
    # brightness is not the calibrated one) and pays one fit
    pairs.insert(0, pairs.pop(len(cfg.halos) // 2 * len(cfg.halo_scales)))
    top = None
    for i, pair in enumerate(pairs):
        halo = copy.copy(win)
        halo.cfg = _variant(cfg, psf_halo=pair)
        fit = trial(halo, k)
        nfev += fit.nfev
        if i == 0 and not fit.ic < best_ic:
            return win, nfev
        if top is None or fit.ic < top[1].ic:
            top = (halo, fit)
    halo, fit = top
    tried = {k: fit}
    for kk in (k - 1, k + 1):
        if kk in fits:
            tried[kk] = trial(halo, kk)
            nfev += tried[kk].nfev
    fits.update(tried)
    return halo, nfev


@functools.lru_cache(maxsize=64)
def _variant(cfg: FitConfig, **changes) -> FitConfig:
    """``cfg`` with ``changes`` (dataclasses.replace), made once per setting: the halo fits ask
    for the same few variants in every window, and each new FitConfig is validated again."""
    return replace(cfg, **changes)


def _fit_count(win: _Window, peaks: np.ndarray, k: int, v0, scale: float, fits: dict) -> tuple[_Fit, float]:
    """The k-target fit of a window (started again elsewhere if poor), and the noise scale (set
    from this fit's residuals when the window had too few far pixels to measure it)."""
    cfg = win.cfg
    start, has_prior = _start(win, peaks, k, v0)
    fit = _fit(win, start, v0, start[:, :2], has_prior, scale)
    if win.scale is None:  # too few far pixels: noise from this fit's residuals, then refit
        res = win.data_residuals(fit.problem.model(fit.theta))
        scale = max(math.sqrt(float(res @ res) / win.dof(fit)), 1e-3)
        fit = _fit(win, fit.targets, fit.velocity, fit.anchors, fit.has_prior, scale, fit.nfev, fit.background)
        win.scale = scale
    if win.reduced_chi2(fit) > cfg.retry_chi2:
        # a poor fit, likely a local minimum: start again elsewhere, keep the better
        alt = _retry(win, peaks, k, v0, fits.get(k - 1), scale)
        if alt is not None:
            alt.nfev += fit.nfev
            fit = alt if alt.ic < fit.ic else replace(fit, nfev=alt.nfev)
    return fit, scale


def _crop_bounds(peaks: np.ndarray, reach: float, height: int, width: int) -> tuple[int, int, int, int]:
    """Rows r0:r1 and columns c0:c1 of the pixels whose centre lies within ``reach`` px of the
    peaks' bounding box (at least one pixel, inside the patch)."""
    lo = np.floor(peaks[:, :2].min(axis=0) - reach + 1.0).astype(int)  # first centre >= min - reach
    hi = np.ceil(peaks[:, :2].max(axis=0) + reach).astype(int)  # one past the last centre
    c0, r0 = min(max(0, int(lo[0])), width - 1), min(max(0, int(lo[1])), height - 1)
    c1, r1 = max(min(width, int(hi[0])), c0 + 1), max(min(height, int(hi[1])), r0 + 1)
    return r0, r1, c0, c1


class _Clutter(NamedTuple):
    """A window's clutter (:func:`_clutter`): variance, correlation length px, noise sigma,
    covariance shape, and the far pixels' log-likelihood under it (up to a constant)."""

    var: float
    length: float
    noise: float
    shape: str
    ll: float


def _clutter(r: np.ndarray, mask: np.ndarray, extra: float, cfg: FitConfig) -> _Clutter | None:
    """Clutter of a window from its far pixels' residuals ``r`` (F, m) about the background
    (``mask`` (H, W) marks where they are), or None where the frame-mean residual varies no more
    than the noise explains.

    The background is static over a window and the noise is not, so the frames' deviations from
    their mean measure the noise, and the frame mean's variance beyond it is clutter. For each
    covariance shape of :data:`CLUTTER_KERNELS` (smooth and rough fields) the correlation length
    is the one that gives neighbouring far pixels their measured correlation, bounded below by
    CLUTTER_MIN_LENGTH PSF sigmas (light through the optics is never sharper) and above by
    CLUTTER_MAX_LENGTH px; the shape under which the far pixels are likelier wins.
    """
    n_frames, m = r.shape
    if m < cfg.min_noise_pixels:
        return None
    mean = r.mean(axis=0)
    noise = _iqr((r - mean).ravel()) / 1.349 * math.sqrt(n_frames / (n_frames - 1))
    centred = mean - np.median(mean)
    white_var = noise**2 / n_frames + extra
    var_c = float(np.mean(centred**2)) - white_var
    if not var_c > max(CLUTTER_MIN_RATIO * white_var, CLUTTER_MIN_VAR):
        return None
    img = np.full(mask.shape, np.nan)
    img[mask] = centred
    pairs = np.concatenate([(img[:, 1:] * img[:, :-1]).ravel(), (img[1:, :] * img[:-1, :]).ravel()])
    pairs = pairs[np.isfinite(pairs)]
    rho = float(np.mean(pairs)) / var_c if pairs.size else 0.0
    rows, cols = np.nonzero(mask)
    d2 = (cols[:, None] - cols[None]) ** 2 + (rows[:, None] - rows[None]) ** 2
    lo, hi = CLUTTER_MIN_LENGTH * cfg.psf_sigma, CLUTTER_MAX_LENGTH
    best = None
    for shape in CLUTTER_KERNELS:
        at = min(max(rho, float(_kernel(shape, 1.0, lo))), float(_kernel(shape, 1.0, hi)))
        length = _length(shape, at) if lo < hi else lo
        cov = var_c * _kernel(shape, d2, length) + white_var * np.eye(m)
        chol, x, info = _posv(cov, centred, lower=1)  # one LAPACK call: the factor and cov^-1 r
        if info != 0:
            continue
        ll = -0.5 * float(centred @ x) - float(np.log(np.diag(chol)).sum())
        if best is None or ll > best.ll:
            best = _Clutter(var_c, length, noise, shape, ll)
    return best


def _iqr(x: np.ndarray) -> float:
    """Interquartile range of ``x`` (n,), quantiles interpolated as np.quantile's default does,
    by a partial sort (np.quantile's overhead is most of its cost at these sizes)."""
    h = (x.size - 1) * np.array([0.25, 0.75])
    lo = np.floor(h).astype(int)
    part = np.partition(x, np.unique(np.concatenate([lo, np.minimum(lo + 1, x.size - 1)])))
    q = part[lo] + (h - lo) * (part[np.minimum(lo + 1, x.size - 1)] - part[lo])
    return float(q[1] - q[0])


def _length(shape: str, rho: float) -> float:
    """The correlation length at which neighbouring pixels (1 px apart) correlate by ``rho``
    (0 < rho < 1) under covariance ``shape`` (:func:`_kernel`)."""
    if shape == "smooth":  # exp(-1 / (2 l^2)) = rho
        return math.sqrt(-0.5 / math.log(rho))
    # (1 + z) exp(-z) = rho with z = sqrt(3) / l: z = -1 - W_-1(-rho / e)
    z = -1.0 - float(lambertw(-rho / math.e, -1).real)
    return math.sqrt(3.0) / z


def _kernel(shape: str, d2, length: float):
    """Correlation of a clutter field at squared distance ``d2`` px^2: ``"smooth"`` a Gaussian
    (a field blurred by optics or atmosphere), ``"rough"`` a Matern 3/2 (once differentiable:
    cloud edges, terrain)."""
    if shape == "smooth":
        return np.exp(-0.5 * np.asarray(d2) / length**2)
    d = np.sqrt(3.0 * np.asarray(d2)) / length
    return (1.0 + d) * np.exp(-d)


def _frame_times(frames: np.ndarray) -> np.ndarray:
    """Frame times relative to the middle frame, replicated edge frames given their copy's time.

    A track's first and last frames are replicated to fill its windows (docs/method.md section 7;
    :func:`service.science.windows.replicated` says which); a copy takes the time of the frame
    it copies. Where real frames are identical (a static, noise-free group) equal times are
    right anyway.
    """
    n = frames.shape[0]
    mid = n // 2
    copy = replicated(frames)
    times = np.arange(n, dtype=np.float64) - mid
    for i in range(mid - 1, -1, -1):
        if copy[i]:
            times[i] = times[i + 1]
    for i in range(mid + 1, n):
        if copy[i]:
            times[i] = times[i - 1]
    return times


def refine_windows(
    windows: np.ndarray,
    peaks: list,
    config: FitConfig = FitConfig(),
    times: np.ndarray | None = None,
    details: bool = False,
    planes: np.ndarray | None = None,
    stuck: np.ndarray | None = None,
) -> list:
    """:func:`fit_window` on each window of (N, F, H, W): the refined (K', 3) targets per window
    (with ``details``, the whole :class:`FitResult`s).

    ``times`` is one (F,) array for all windows, or None; ``planes`` (N, F, 3) the windows'
    background planes and ``stuck`` (N, H, W) their stuck pixels, or None; see :func:`fit_window`.
    """
    windows = np.asarray(windows)
    if windows.ndim != 4:
        raise ValueError(f"windows must be (N, F, H, W), got shape {windows.shape}")
    if len(peaks) != len(windows):
        raise ValueError(f"need one peak array per window: {len(windows)} windows, {len(peaks)} peak arrays")
    if planes is None:
        planes = [None] * len(windows)
    if stuck is None:
        stuck = [None] * len(windows)
    results = [fit_window(w, p, config, times, b, d) for w, p, b, d in zip(windows, peaks, planes, stuck, strict=True)]
    return results if details else [r.targets for r in results]


def position_bound(
    frames: np.ndarray,
    targets: np.ndarray,
    velocity=(0.0, 0.0),
    config: FitConfig = FitConfig(),
    times: np.ndarray | None = None,
) -> np.ndarray:
    """(K, 3) rows (sigma_x, sigma_y, rho_xy): the Cramer-Rao bound on the middle frame's target
    positions, the least covariance an unbiased estimator reaches from these frames and the
    brightness calibration, where ``targets`` (K, 3) rows (x, y, brightness) and ``velocity``
    are the truth.

    It is the Fisher information of the window's model as :func:`fit_window` builds it (the
    calibrated PSF, the background plane and clutter, saturation, the noise estimated from the
    frames) plus the calibration's brightness prior (``brightness_prior``; None leaves it out),
    without the pull toward start positions (those come from an estimate, not from knowledge).
    Where targets are packed closer than the data can separate, the information is singular
    and the bound is huge: no unbiased estimator places them (a biased one needs to know their
    geometry beforehand). Benchmarks read it as a condition's ceiling.
    """
    frames = np.asarray(frames, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64).reshape(-1, 3)
    if len(targets) == 0:
        return np.zeros((0, 3))
    cfg = replace(config, prior_px=None)
    frames, planes, stuck = _sensor_frames(frames, cfg, None, None)
    win, _ = _window(frames, _times(frames, times, cfg), targets, cfg, planes, stuck)
    k = len(targets)
    scale = win.scale if win.scale is not None else math.sqrt(ROUNDING_VARIANCE if cfg.quantized else 1e-6)
    prob = _Problem(win, targets[:, :2], np.zeros(k, dtype=bool), scale)
    theta = np.concatenate([targets[:, :3].T.ravel(), np.asarray(velocity, dtype=np.float64), win.bg0[: win.n_bg]])
    jac = prob.jacobian(theta)
    return _position_spread(_covariance(jac.T @ jac, 2 * k), k)


# ------------------------------------------------------------------------------ the problem


class _Window:
    """One window's data: the fitted crop of the frames, times, saturation mask, noise scale."""

    def __init__(
        self,
        frames: np.ndarray,
        times: np.ndarray,
        peaks: np.ndarray,
        cfg: FitConfig,
        planes: np.ndarray | None = None,
        stuck: np.ndarray | None = None,
        saturated: np.ndarray | None = None,
    ):
        n_frames, height, width = frames.shape
        self.cfg = cfg
        self.times = times
        self.moving = bool(np.ptp(times) > 0)  # more than one time: a velocity to fit
        self.peaks = peaks
        basis = plane_basis(height, width).reshape(height, width, 3)
        if planes is None and cfg.background:
            planes = fit_planes(frames)[0]
        self.bg0 = np.median(planes, axis=0) if cfg.background else np.zeros(3)
        self.n_bg = 3 if cfg.background else 0
        # the noise, background level and clutter, from the pixels outside the default crop
        reach = cfg.crop_px + cfg.max_speed_px * float(np.max(np.abs(times)))
        r0, r1, c0, c1 = _crop_bounds(peaks, reach, height, width)
        outside = np.ones((height, width), dtype=bool)
        outside[r0:r1, c0:c1] = False
        if stuck is not None:
            outside &= ~stuck
        raw_far = frames[:, outside]
        # a target near the patch border loses flux over the edge
        self.at_border = bool(
            np.any(peaks[:, :2] < 1.0 + cfg.max_shift_px)
            or np.any(peaks[:, 0] > width - 2.0 - cfg.max_shift_px)
            or np.any(peaks[:, 1] > height - 2.0 - cfg.max_shift_px)
        )
        # clutter (which also measures the noise); not on a background clipped at the sensor's
        # floor (noise cut at 0, as estimate_noise reads it): there it is not measurable, and
        # the frames' deviations understate the noise
        self.clutter, self.edge, self.edge_prior, self.temporal_noise = None, None, None, None
        if cfg.clutter and cfg.background and n_frames > 1 and cfg.noise is None and raw_far.size:
            if np.mean(raw_far == 0.0) <= 0.1:
                self.clutter = _clutter(raw_far - basis[outside] @ self.bg0, outside, self.extra, cfg)
                if self.clutter is not None and cfg.edges:
                    basis = self._edge(raw_far, outside, basis)
        plane_far = basis[outside] @ self.bg0
        far = _above_plane(raw_far, plane_far)
        # mean level of a pixel without signal above the plane (noise clipped at 0 raises it)
        self.background = float(far.mean()) if far.size >= cfg.min_noise_pixels else None
        if self.clutter is not None:
            self.noise = self.clutter.noise
            # the crop grows by a correlation length: the clutter around the targets tells what
            # it is under them
            r0, r1, c0, c1 = _crop_bounds(peaks, reach + CLUTTER_PAD * self.clutter.length, height, width)
        elif self.temporal_noise is not None:
            self.noise = self.temporal_noise
        else:
            self.noise = (
                cfg.noise if cfg.noise is not None else estimate_noise(raw_far, cfg.min_noise_pixels, plane_far)
            )
        self.scale = math.sqrt(self.noise**2 + self.extra) if self.noise is not None else None
        if self.scale is not None and self.scale == 0.0:  # float frames, no noise: any scale fits
            self.scale = 1e-3

        # the fitted crop
        self.r0, self.r1, self.c0, self.c1 = r0, r1, c0, c1
        # pixel_fractions counts pixels from 0, so one call of this size covers rows and columns
        self.size = max(r1, c1)
        crop = frames[:, r0:r1, c0:c1]
        self.shape = crop.shape
        self.obs = crop.ravel()
        self.n = self.obs.size
        self.t_pix = np.repeat(times, crop[0].size)  # the time of every fitted pixel
        if cfg.saturation is None:
            self.sat = np.zeros(self.n, dtype=bool)
        elif saturated is not None:  # frames moved off the sensor's levels: where they clipped
            self.sat = saturated[:, r0:r1, c0:c1].ravel()
        else:
            self.sat = self.obs >= cfg.saturation
        # stuck pixels: no residual, no Jacobian row, not counted as data
        self.stuck = np.zeros(self.n, dtype=bool) if stuck is None else np.tile(stuck[r0:r1, c0:c1].ravel(), n_frames)
        self.sat &= ~self.stuck
        self.any_sat = bool(self.sat.any())
        self.any_stuck = bool(self.stuck.any())
        self.sat_f, self.stuck_f = self.sat.astype(np.float64), self.stuck.astype(np.float64)  # for the C solver
        self.n_data = self.n - int(self.stuck.sum())
        self.usable = ~(self.sat | self.stuck)  # pixels the linear solves use
        self.bg_basis = np.tile(basis[r0:r1, c0:c1].reshape(-1, basis.shape[2]), (n_frames, 1))  # (n, 3 or 4)
        # the observations less the starting background: what the targets must explain
        self.sig = self.obs - self.bg_basis @ self.bg0
        self._whitening()
        # the peaks' linear system for _best_subset, by velocity and PSF: the same in every count
        # tried (copies of the window, with other brightness settings, share it)
        self.subset_system: dict = {}

    def _edge(self, raw_far: np.ndarray, outside: np.ndarray, basis: np.ndarray) -> np.ndarray:
        """Where an edge explains the far pixels' static background better than the clutter
        does (BIC over the frame mean, :func:`_clutter`'s likelihood): the edge becomes a fourth
        background column (its geometry fixed, its contrast fitted with the plane), the
        starting background and the clutter left about it are set, and the widened basis (H, W,
        4) comes back; else ``basis`` unchanged."""
        found = fit_edge(raw_far.mean(axis=0), outside)
        if found is None:
            return basis
        n_frames, m = raw_far.shape
        # the edge alone, the noise white about it, must be likelier than the clutter: a
        # stricter test than edge plus clutter, and one that needs no second covariance where
        # it fails. Seven terms fitted to the far pixels (plane, geometry, contrast) against the
        # clutter's three (the level, variance and length about the window's median plane).
        white_var = self.clutter.noise**2 / n_frames + self.extra
        ll = -0.5 * found.rss / white_var - 0.5 * m * math.log(white_var)
        if not ll - 2.0 * math.log(m) > self.clutter.ll:
            return basis
        edge = found.edge
        height, width = outside.shape
        wide = np.concatenate([basis, edge_column(edge, height, width).reshape(height, width, 1)], axis=2)
        self.edge, self.bg0, self.n_bg = edge, np.append(found.plane, edge.contrast), 4
        # the far pixels' contrast is a prior of the fit's: where the crop lies on one side of
        # the edge, the crop alone cannot tell the step's height from the plane's level
        misfit = max(white_var, found.rss / max(m - 7, 1))
        self.edge_prior = (edge.contrast, max(found.contrast_se * math.sqrt(misfit), 1e-6))
        # the noise is still the frames' own (the first clutter estimate's); whatever structure
        # is left about the edge is clutter again
        self.temporal_noise = self.clutter.noise
        self.clutter = _clutter(raw_far - wide[outside] @ self.bg0, outside, self.extra, self.cfg)
        return wide

    @property
    def extra(self) -> float:
        """Per-pixel variance besides the noise: rounding and the configured model error."""
        return (ROUNDING_VARIANCE if self.cfg.quantized else 0.0) + self.cfg.model_error**2

    def _whitening(self) -> None:
        """The clutter's whitening of the crop's frame-mean residual (None without clutter), its
        covariance (for the kriged flux of :func:`_clutter_flux`), and a lone target's flux sigma
        under the clutter and the noise (the floor of the brightness-free search)."""
        self.white, self.flux_sigma = None, 0.0
        if self.clutter is None:
            return
        var_c, length, shape = self.clutter.var, self.clutter.length, self.clutter.shape
        n_frames, rows, cols = self.shape
        # rounding of a static background is static too: it does not average over the frames
        white_var = self.noise**2 / n_frames + self.extra
        yy, xx = np.mgrid[0:rows, 0:cols]
        d2 = (xx.ravel()[:, None] - xx.ravel()[None]) ** 2 + (yy.ravel()[:, None] - yy.ravel()[None]) ** 2
        ok = ~self.stuck[: rows * cols]
        kern = var_c * _kernel(shape, d2[np.ix_(ok, ok)], length)
        cov = kern + np.eye(int(ok.sum())) * white_var
        # the inverse of the covariance's lower Cholesky factor, lower triangular too (stuck
        # pixels, whose mean residual is 0, get a row of the identity): W^T W = cov^-1
        chol = np.eye(rows * cols)
        chol[np.ix_(ok, ok)] = np.linalg.cholesky(cov)
        self.white = np.ascontiguousarray(_trtri(chol, lower=1)[0])
        self.kern, self.white_var = kern, white_var
        fr = pixel_fractions(np.array([(cols - 1) / 2.0, (rows - 1) / 2.0]), max(rows, cols), self.cfg.psf_sigma)
        unit = np.outer(fr[1, :rows], fr[0, :cols]).ravel()
        self.flux_sigma = 1.0 / max(float(np.linalg.norm(self.whiten_mean(unit))), 1e-12)

    @property
    def n_rows(self) -> int:
        """Rows of the data part of the residual vector."""
        return self.n + (self.white.shape[0] if self.white is not None else 0)

    def whiten(self, r: np.ndarray, scale: float) -> np.ndarray:
        """Data residuals (n,) or Jacobian rows (n, p) -> rows whose squares sum to the chi2:
        without clutter r / scale; with clutter each frame's deviation from the frame mean / scale
        and the frame mean whitened by the clutter-plus-noise covariance."""
        if self.white is None:
            return r / scale
        f = self.shape[0]
        x = r.reshape(f, -1, *r.shape[1:])
        m = x.mean(axis=0)
        return np.concatenate([((x - m) / scale).reshape(r.shape), self.whiten_mean(m)], axis=0)

    def whiten_mean(self, m: np.ndarray) -> np.ndarray:
        """The crop's frame-mean values (P,) or (P, p) whitened by the clutter-plus-noise covariance."""
        return self.white @ m

    def chi2(self, r: np.ndarray, scale: float) -> float:
        w = self.whiten(r, scale)
        return float(np.sum(w * w))

    def positions(self, x: np.ndarray, y: np.ndarray, v) -> np.ndarray:
        """(2, F, K): column and row position of every target in every frame."""
        t = self.times[:, None]
        pos = np.empty((2, len(self.times), len(x)))
        np.add(x[None, :], v[0] * t, out=pos[0])
        np.add(y[None, :], v[1] * t, out=pos[1])
        return pos

    def split(self, values: np.ndarray, k: int):
        """(2FK, size) per-position values -> cropped (F, K, C) along columns, (F, K, R) rows."""
        vals = values.reshape(2, len(self.times), k, self.size)
        return vals[0, :, :, self.c0 : self.c1], vals[1, :, :, self.r0 : self.r1]

    def components(self, sigma: float | None = None) -> tuple[tuple[float, float], ...]:
        """The PSF as Gaussians, (share of the flux, sigma) each: the core of ``sigma`` (default:
        the calibrated one), and the halo where this window's PSF has one."""
        core = sigma or self.cfg.psf_sigma
        if self.cfg.psf_halo is None:
            return ((1.0, core),)
        share, width = self.cfg.psf_halo
        return ((1.0 - share, core), (share, width * core))

    def unit_images(self, x: np.ndarray, y: np.ndarray, v, sigma: float | None = None) -> np.ndarray:
        """(F, R, C, K): every target's cropped frames at unit brightness."""
        pos = self.positions(x, y, v).ravel()
        out = 0.0
        for share, s in self.components(sigma):
            fx, fy = self.split(pixel_fractions(pos, self.size, s), len(x))
            out = out + share * np.einsum("fkr,fkc->frck", fy, fx)
        return out

    def model(self, targets: np.ndarray, v, bg: np.ndarray | None = None, sigma: float | None = None) -> np.ndarray:
        """Noise-free cropped frames, flat, of targets (K, 3) moving with velocity v over the
        background plane ``bg`` (3,) (default: the starting one), PSF ``sigma`` (default: the
        calibrated one)."""
        targets_only = (self.unit_images(targets[:, 0], targets[:, 1], v, sigma) @ targets[:, 2]).ravel()
        return targets_only + self.bg_basis @ (self.bg0 if bg is None else bg)

    def data_residuals(self, model: np.ndarray) -> np.ndarray:
        """(model - obs) per pixel, saturated pixels as lower bounds (0 once the model is above)."""
        r = model - self.obs
        if self.any_sat:
            r[self.sat] = np.minimum(r[self.sat], 0.0)
        if self.any_stuck:
            r[self.stuck] = 0.0
        return r

    def dof(self, fit: _Fit) -> int:
        """Degrees of freedom of a fit: data pixels (stuck ones left out) less its parameters."""
        return max(self.n_data - fit.n_params, 1)

    def reduced_chi2(self, fit: _Fit) -> float:
        return fit.chi2 / self.dof(fit)

    def unit_columns(self, xy: np.ndarray, v, sigma: float | None = None) -> np.ndarray:
        """(n, K): each target's cropped frames at unit brightness (for linear brightness fits)."""
        return self.unit_images(xy[:, 0], xy[:, 1], v, sigma).reshape(self.n, -1)


_BG_SCALE = np.array([1.0, 0.1, 0.1, 1.0])  # x_scale of the plane's offset, gradients and edge


class _Problem:
    """Least squares for one count: parameters theta = (x_1..K, y_1..K, a_1..K, vx, vy, s, b)
    with s the PSF sigma (absent without ``FitConfig.fit_psf``) and b the background plane (3
    coefficients, absent without ``FitConfig.background``).

    Residuals: the data (noise-normalised, saturation-aware), then the priors (positions of
    the network's peaks, then brightness).
    """

    def __init__(
        self, win: _Window, anchors: np.ndarray, has_prior: np.ndarray, scale: float, free_sigma: bool = False
    ):
        cfg = win.cfg
        self.win = win
        self.n_psf = ns = 1 if free_sigma else 0
        self.k = k = len(anchors)
        self.scale = scale
        nb = win.n_bg
        self.i_s = 3 * k + 2 if ns else None  # index of the PSF sigma in theta
        self.i_bg = 3 * k + 2 + ns  # first background coefficient
        self.n_params = n_params = 3 * k + 2 + ns + nb
        ax, ay = anchors[:, 0], anchors[:, 1]
        # prior residuals (theta[col] - mean) * weight: positions toward the anchors, then
        # brightness toward the centre of the range, the edge's contrast toward the far
        # pixels' (_Window._edge), the PSF sigma toward its calibration
        idx = np.flatnonzero(has_prior) if cfg.prior_px is not None else np.zeros(0, dtype=int)
        n_pos = 2 * idx.size
        bright = cfg.brightness_prior is not None
        edge = win.edge_prior is not None
        psf = bool(ns) and cfg.psf_prior is not None
        n_prior = n_pos + k * bright + edge + psf
        cols, means, weights = np.empty(n_prior, dtype=int), np.empty(n_prior), np.empty(n_prior)
        cols[: idx.size], cols[idx.size : n_pos] = idx, k + idx
        means[: idx.size], means[idx.size : n_pos] = ax[idx], ay[idx]
        if n_pos:  # prior_px is set
            weights[:n_pos] = 1.0 / cfg.prior_px
        i = n_pos
        if bright:
            cols[i : i + k] = 2 * k + np.arange(k)
            means[i : i + k] = cfg.brightness_centre
            weights[i : i + k] = 1.0 / cfg.brightness_prior
            i += k
        if edge:
            cols[i], means[i], weights[i] = self.i_bg + 3, win.edge_prior[0], 1.0 / win.edge_prior[1]
            i += 1
        if psf:
            cols[i], means[i], weights[i] = self.i_s, cfg.psf_sigma, 1.0 / (cfg.psf_prior * cfg.psf_sigma)
        self.prior_cols, self.prior_mean, self.prior_w = cols, means, weights
        self.n_res = win.n_rows + n_prior
        # box bounds, and the typical size of a meaningful change of each parameter (for
        # stopping and for trf)
        m = cfg.max_shift_px
        vmax = cfg.max_speed_px if win.moving else 0.0  # one time: no velocity to fit
        b_lo, b_hi = cfg.brightness_range
        lower, upper, x_scale = np.empty(n_params), np.empty(n_params), np.empty(n_params)
        lower[:k], lower[k : 2 * k], lower[2 * k : 3 * k], lower[3 * k : 3 * k + 2] = ax - m, ay - m, b_lo, -vmax
        upper[:k], upper[k : 2 * k], upper[2 * k : 3 * k], upper[3 * k : 3 * k + 2] = ax + m, ay + m, b_hi, vmax
        x_scale[: 2 * k], x_scale[2 * k : 3 * k], x_scale[3 * k : 3 * k + 2 + ns] = 0.05, 10.0, 0.01
        if ns:
            lower[self.i_s], upper[self.i_s] = cfg.psf_sigma * (1 - cfg.psf_range), cfg.psf_sigma * cfg.psf_max
        lower[self.i_bg :], upper[self.i_bg :], x_scale[self.i_bg :] = -np.inf, np.inf, _BG_SCALE[:nb]
        self.lower, self.upper, self.x_scale = lower, upper, x_scale
        self.prior_cols_f = cols.astype(np.float64)  # for the C solver

        self._key: bytes | None = None
        self._state = None

    def sigma(self, theta: np.ndarray) -> float:
        return float(theta[self.i_s]) if self.i_s is not None else self.win.cfg.psf_sigma

    def _placed(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every target's position in every frame, flat (2FK,), and its brightness there (1, K)."""
        k = self.k
        pos = self.win.positions(theta[:k], theta[k : 2 * k], theta[3 * k : 3 * k + 2]).ravel()
        return pos, theta[None, 2 * k : 3 * k]

    def _eval(self, theta: np.ndarray):
        """Fractions and model at theta, cached: Jacobians are asked for at the last point."""
        key = theta.tobytes()
        if key != self._key:
            k, win = self.k, self.win
            pos, amp = self._placed(theta)
            parts, model = [], 0.0
            for share, s in win.components(self.sigma(theta)):  # the core, and the halo if any
                fx, fy = win.split(pixel_fractions(pos, win.size, s), k)
                fya = fy * amp[:, :, None]
                model = model + share * np.matmul(fya.transpose(0, 2, 1), fx).ravel()
                parts.append((share, s, fx, fy, fya))
            if win.n_bg:
                model += win.bg_basis @ theta[self.i_bg : self.i_bg + win.n_bg]
            self._key, self._state = key, (parts, model, pos)
        return self._state

    def model(self, theta: np.ndarray) -> np.ndarray:
        return self._eval(theta)[1]

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        n = self.win.n_rows
        r = np.empty(self.n_res)
        r[:n] = self.win.whiten(self.win.data_residuals(self._eval(theta)[1]), self.scale)
        r[n:] = (theta[self.prior_cols] - self.prior_mean) * self.prior_w
        return r

    def jacobian(self, theta: np.ndarray) -> np.ndarray:
        """Analytic d residuals / d theta, shape (n_res, 3K + 2).

        d model / d x_k = a_k fy_k (outer) dfx_k, d / d y_k = a_k dfy_k (outer) fx_k,
        d / d a_k = fy_k (outer) fx_k, d / d (vx, vy) = sum_k t_f d / d (x_k, y_k); with a halo,
        the share-weighted sum of each Gaussian's terms.
        """
        parts, model, pos = self._eval(theta)
        k, win = self.k, self.win
        n = win.n
        sigma = self.sigma(theta)
        n_frames = len(win.times)
        jac = np.zeros((n, self.n_params))
        for share, s, fx, fy, fya in parts:
            dfx, dfy = win.split(pixel_fractions_grad(pos, win.size, s), k)
            rows = np.empty((3, n_frames, k, fy.shape[2]))
            rows[0], rows[1], rows[2] = fya, dfy * theta[None, 2 * k : 3 * k, None], fy
            cols = np.empty((3, n_frames, k, fx.shape[2]))
            cols[0], cols[1], cols[2] = dfx, fx, fx
            jac[:n, : 3 * k] += share * np.einsum("sfkr,sfkc->frcsk", rows, cols).reshape(n, 3 * k)
            if self.i_s is not None:  # d / d sigma = sum_k a_k (dfy_s (outer) fx + fy (outer) dfx_s)
                sx, sy = win.split(pixel_fractions_dsigma(pos, win.size, s), k)
                jac[:n, self.i_s] += (share * s / sigma) * (
                    np.matmul((sy * theta[None, 2 * k : 3 * k, None]).transpose(0, 2, 1), fx)
                    + np.matmul(fya.transpose(0, 2, 1), sx)
                ).ravel()
        jac[:n, 3 * k] = win.t_pix * jac[:n, :k].sum(axis=1)
        jac[:n, 3 * k + 1] = win.t_pix * jac[:n, k : 2 * k].sum(axis=1)
        return self._finish(jac, model)

    def _finish(self, jac: np.ndarray, model: np.ndarray) -> np.ndarray:
        """The model's Jacobian ``jac`` (n, p), its background columns still to fill, as the
        residuals' (saturation, stuck pixels, whitening, then the priors' rows)."""
        win, n = self.win, self.win.n
        jac[:n, self.i_bg : self.i_bg + win.n_bg] = win.bg_basis[:, : win.n_bg]
        if win.any_sat:
            jac[:n][win.sat & (model >= win.obs)] = 0.0
        if win.any_stuck:
            jac[:n][win.stuck] = 0.0
        out = np.zeros((self.n_res, self.n_params))
        m = win.n_rows
        out[:m] = win.whiten(jac, self.scale)
        out[m + np.arange(self.prior_cols.size), self.prior_cols] = self.prior_w
        return out

    def pack(self, targets: np.ndarray, v, bg: np.ndarray, sigma: float | None = None) -> np.ndarray:
        k, win = self.k, self.win
        theta = np.empty(self.n_params)
        theta[: 3 * k] = targets[:, :3].T.ravel()
        theta[3 * k : 3 * k + 2] = v
        if self.n_psf:
            theta[self.i_s] = sigma or win.cfg.psf_sigma
        theta[self.i_bg : self.i_bg + win.n_bg] = np.asarray(bg, float)[: win.n_bg]
        return np.minimum(np.maximum(theta, self.lower, out=theta), self.upper, out=theta)

    def unpack(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Targets (K, 3), velocity (2,), background plane (3,) and PSF sigma of a parameter vector."""
        k = self.k
        nb = self.win.n_bg
        bg = theta[self.i_bg : self.i_bg + nb] if nb else np.zeros(self.win.bg_basis.shape[1])
        targets = theta[: 3 * k].reshape(3, k).T.copy()
        return targets, theta[3 * k : 3 * k + 2].copy(), bg.copy(), self.sigma(theta)


class _FrameProblem(_Problem):
    """A count's least squares where each frame may depart from the window's model, every frame
    but the middle one: the group shifted by (ox_f, oy_f) off its constant-velocity track
    (platform jitter, turbulence) and each target's brightness scaled by g_fk (scintillation),
    with Gaussian priors of FRAME_JITTER_PX and FRAME_GAIN toward none. theta appends to
    :class:`_Problem`'s (ox, then oy, of the F-1 other frames; then g, (F-1, K) row-major).
    Solved in C where the extension has these terms (``FRAMES``) and the parameters fit its
    limit, else in numpy."""

    def __init__(
        self, win: _Window, anchors: np.ndarray, has_prior: np.ndarray, scale: float, free_sigma: bool = False
    ):
        super().__init__(win, anchors, has_prior, scale, free_sigma)
        n_frames, k = len(win.times), self.k
        self.others = np.flatnonzero(np.arange(n_frames) != n_frames // 2)
        m = len(self.others)
        self.i_off, self.i_gain = self.n_params, self.n_params + 2 * m
        extra = 2 * m + m * k
        cols = np.arange(self.n_params, self.n_params + extra)
        self.n_params += extra
        self.n_res += extra
        self.prior_cols = np.concatenate([self.prior_cols, cols])
        self.prior_cols_f = self.prior_cols.astype(np.float64)
        self.prior_mean = np.concatenate([self.prior_mean, np.zeros(2 * m), np.ones(m * k)])
        self.prior_w = np.concatenate(
            [self.prior_w, np.full(2 * m, 1.0 / FRAME_JITTER_PX), np.full(m * k, 1.0 / FRAME_GAIN)]
        )
        lower = np.concatenate([np.full(2 * m, -FRAME_MAX_JITTER_PX), np.full(m * k, FRAME_MIN_GAIN)])
        upper = np.concatenate([np.full(2 * m, FRAME_MAX_JITTER_PX), np.full(m * k, 1.0 / FRAME_MIN_GAIN)])
        self.lower, self.upper = np.concatenate([self.lower, lower]), np.concatenate([self.upper, upper])
        self.x_scale = np.concatenate([self.x_scale, np.full(2 * m, 0.05), np.full(m * k, 0.1)])

    def frame_terms(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(2, F) offsets and (F, K) gains of every frame (the middle one's 0 and 1)."""
        n_frames, m = len(self.win.times), len(self.others)
        off = np.zeros((2, n_frames))
        off[:, self.others] = theta[self.i_off : self.i_gain].reshape(2, m)
        gain = np.ones((n_frames, self.k))
        gain[self.others] = theta[self.i_gain :].reshape(m, self.k)
        return off, gain

    def _placed(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions (2FK,) shifted by each frame's offset, brightness (F, K) scaled by its gains."""
        k = self.k
        off, gain = self.frame_terms(theta)
        pos = self.win.positions(theta[:k], theta[k : 2 * k], theta[3 * k : 3 * k + 2]) + off[:, :, None]
        return pos.ravel(), theta[None, 2 * k : 3 * k] * gain

    def jacobian(self, theta: np.ndarray) -> np.ndarray:
        parts, model, pos = self._eval(theta)
        k, win = self.k, self.win
        n, n_frames = win.n, len(win.times)
        sigma = self.sigma(theta)
        off, gain = self.frame_terms(theta)
        amp = theta[None, 2 * k : 3 * k] * gain
        d_x = d_y = unit = 0.0
        d_s = np.zeros(n)
        for share, s, fx, fy, fya in parts:
            dfx, dfy = win.split(pixel_fractions_grad(pos, win.size, s), k)
            d_x = d_x + share * np.einsum("fkr,fkc->frck", fya, dfx)  # (F, R, C, K)
            d_y = d_y + share * np.einsum("fkr,fkc->frck", dfy * amp[:, :, None], fx)
            unit = unit + share * np.einsum("fkr,fkc->frck", fy, fx)
            if self.i_s is not None:
                sx, sy = win.split(pixel_fractions_dsigma(pos, win.size, s), k)
                d_s += (share * s / sigma) * (
                    np.matmul((sy * amp[:, :, None]).transpose(0, 2, 1), fx) + np.matmul(fya.transpose(0, 2, 1), sx)
                ).ravel()
        jac = np.zeros((n, self.n_params))
        jac[:n, :k], jac[:n, k : 2 * k] = d_x.reshape(n, k), d_y.reshape(n, k)
        jac[:n, 2 * k : 3 * k] = (unit * gain[:, None, None, :]).reshape(n, k)
        if self.i_s is not None:
            jac[:n, self.i_s] = d_s
        jac[:n, 3 * k] = win.t_pix * jac[:n, :k].sum(axis=1)
        jac[:n, 3 * k + 1] = win.t_pix * jac[:n, k : 2 * k].sum(axis=1)
        per = n // n_frames  # pixels of one frame
        m = len(self.others)
        a = theta[2 * k : 3 * k]
        for j, f in enumerate(self.others):
            rows = slice(f * per, (f + 1) * per)
            jac[rows, self.i_off + j] = d_x[f].sum(axis=-1).ravel()
            jac[rows, self.i_off + m + j] = d_y[f].sum(axis=-1).ravel()
            jac[rows, self.i_gain + j * k : self.i_gain + (j + 1) * k] = unit[f].reshape(per, k) * a
        return self._finish(jac, model)

    def pack(self, targets: np.ndarray, v, bg: np.ndarray, sigma: float | None = None) -> np.ndarray:
        theta = np.zeros(self.n_params)
        theta[: self.i_off] = super().pack(targets, v, bg, sigma)[: self.i_off]
        theta[self.i_gain :] = 1.0
        return theta


@dataclass
class _Fit:
    """One fitted count: targets, velocity, data chi2, criterion, bookkeeping for the next step."""

    targets: np.ndarray
    velocity: np.ndarray
    chi2: float
    ic: float
    n_params: int
    nfev: int
    anchors: np.ndarray
    has_prior: np.ndarray
    background: np.ndarray  # (3,) fitted background plane
    psf_sigma: float  # fitted (or calibrated) PSF sigma, px
    problem: _Problem  # the least-squares problem and its solution, for the covariance
    theta: np.ndarray

    def uncertainty(self) -> np.ndarray:
        """(K, 4) rows (sigma_x, sigma_y, rho_xy, sigma_brightness): the Gaussian posterior of
        every target from the inverse of J^T J at the solution (residuals are noise-normalised,
        so J^T J is the Fisher information of the data plus the priors' own)."""
        jac = self.problem.jacobian(self.theta)
        k = len(self.targets)
        cov = _covariance(jac.T @ jac, 3 * k)
        var_a = cov[2 * k + np.arange(k), 2 * k + np.arange(k)]
        return np.column_stack([_position_spread(cov, k), np.sqrt(np.maximum(var_a, 0.0))])


def _position_spread(cov: np.ndarray, k: int) -> np.ndarray:
    """(K, 3) rows (sigma_x, sigma_y, rho_xy) of the K targets from a covariance whose first 2K
    rows are theta's x_1..K, y_1..K."""
    i = np.arange(k)
    sx, sy = np.sqrt(np.maximum(cov[i, i], 0.0)), np.sqrt(np.maximum(cov[k + i, k + i], 0.0))
    rho = np.divide(cov[i, k + i], sx * sy, out=np.zeros(k), where=sx * sy > 0)
    return np.column_stack([sx, sy, np.clip(rho, -1.0, 1.0)])


def _covariance(info: np.ndarray, m: int) -> np.ndarray:
    """The first ``m`` columns of the inverse of the information matrix ``info`` (p, p): one
    Cholesky solve where it is positive definite (the usual case, several times cheaper than an
    SVD), else the pseudo-inverse's (a parameter the data do not constrain)."""
    rhs = np.eye(len(info), m)
    _, cov, ok = _posv(info, rhs, lower=1)
    return cov if ok == 0 and np.isfinite(cov).all() else np.linalg.pinv(info)[:, :m]


# ------------------------------------------------------------------------------ solvers


def _solve_lm(prob: _Problem, theta: np.ndarray, max_nfev: int, tol: float) -> tuple[np.ndarray, int, None]:
    """Projected Levenberg-Marquardt for box bounds; returns (theta, residual evaluations, None:
    the caller computes the chi2).

    Each iteration solves (J^T J + lambda diag(J^T J)) step = -J^T r over the free parameters
    (a parameter on a bound whose gradient pushes it outward is held there), clips the new
    point into the box and keeps it if the cost fell. lambda follows Nielsen's rule (shrink
    by up to 3x after a step that did as predicted, double-and-more after a failed one).
    Stops when the cost falls by less than ``tol`` (relative) or every parameter moves by less
    than ``tol`` of its ``x_scale``.
    """
    lower, upper = prob.lower, prob.upper
    r = prob.residuals(theta)
    cost = float(r @ r)
    nfev, lam, nu = 1, 1e-3, 2.0
    while nfev < max_nfev:
        jac = prob.jacobian(theta)
        grad = jac.T @ r
        hess = jac.T @ jac
        free = ~(((theta <= lower) & (grad > 0)) | ((theta >= upper) & (grad < 0)))
        if not free.any():
            break
        hd = np.diag(hess)
        diag = np.maximum(hd, 1e-12 * max(float(hd.max()), 1e-300))
        improved = False
        while nfev < max_nfev:
            step = _bounded_step(hess, grad, diag * lam, theta, lower, upper, free)
            if step is None:
                lam, nu = lam * nu, nu * 2.0
                if lam > 1e12:
                    break
                continue
            new = np.clip(theta + step, lower, upper)
            r_new = prob.residuals(new)
            nfev += 1
            cost_new = float(r_new @ r_new)
            predicted = -float(step @ (2.0 * grad + hess @ step))  # decrease of the linear model
            if cost_new < cost:
                rho = (cost - cost_new) / predicted if predicted > 0 else 1.0
                lam *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
                nu = 2.0
                improved = True
                break
            lam, nu = lam * nu, nu * 2.0
            if lam > 1e12:
                break
        if not improved:
            break
        small_step = np.all(np.abs(new - theta) <= tol * prob.x_scale)
        small_gain = cost - cost_new <= tol * cost
        theta, r, cost = new, r_new, cost_new
        if small_step or small_gain:
            break
    return theta, nfev, None


def _bounded_step(hess, grad, damping, theta, lower, upper, free) -> np.ndarray | None:
    """Damped Gauss-Newton step that respects the box: parameters the step would push past a
    bound are put on it and the rest re-solved (at most once per parameter). None when the
    damped system is singular."""
    step = np.zeros_like(theta)
    free = free.copy()
    for _ in range(theta.size):
        if free.all():  # the usual case: no bound in the way
            h = hess.copy()
            h[np.diag_indices(theta.size)] += damping
            rhs = -grad
            idx = slice(None)
        else:
            idx = np.flatnonzero(free)
            if idx.size == 0:
                return step
            fixed = np.flatnonzero(~free)
            h = hess[idx][:, idx]
            h[np.diag_indices(idx.size)] += damping[idx]
            # parameters already put on a bound move by a fixed amount: to the right side
            rhs = -grad[idx] - hess[idx][:, fixed] @ step[fixed]
        # J^T J + damping is symmetric positive definite unless singular: Cholesky, through
        # LAPACK directly (numpy's solve costs more in checks than the solve on these sizes)
        s, info = _posv(h, rhs)[1:]
        if info != 0:
            return None
        new = theta[idx] + s
        out = (new < lower[idx]) | (new > upper[idx])
        step[idx] = s
        if not out.any():
            return step
        hit = np.arange(theta.size)[idx][out]
        step[hit] = np.clip(new[out], lower[hit], upper[hit]) - theta[hit]
        free[hit] = False
    return step


def _solve_native(prob: _Problem, theta: np.ndarray, max_nfev: int, tol: float) -> tuple[np.ndarray, int, float]:
    """:func:`_solve_lm` in C (service/kernels/_native/fit.c): the same algorithm on the same
    residuals, without numpy's per-call overhead; also returns the data chi2 at the solution."""
    win = prob.win
    theta = np.array(theta, dtype=np.float64)
    empty = np.zeros(0)
    nfev, chi2 = _native_fit.lm(
        theta,
        prob.lower,
        prob.upper,
        prob.x_scale,
        win.times,
        win.obs,
        win.sat_f,
        win.stuck_f,
        win.bg_basis,
        empty if win.white is None else win.white.ravel(),
        prob.prior_cols_f,
        prob.prior_mean,
        prob.prior_w,
        prob.k,
        win.shape[1],
        win.shape[2],
        win.r0,
        win.c0,
        prob.n_psf,
        win.n_bg,
        max_nfev,
        prob.scale,
        win.cfg.psf_sigma,
        tol,
        *((0.0, 1.0) if win.cfg.psf_halo is None else win.cfg.psf_halo),
        int(isinstance(prob, _FrameProblem)),
    )
    return theta, nfev, chi2


def _solve_scipy(prob: _Problem, theta: np.ndarray, max_nfev: int, tol: float) -> tuple[np.ndarray, int, None]:
    """``scipy.optimize.least_squares`` (trust-region reflective, exact bounds), same problem."""
    lower, upper = prob.lower, np.maximum(prob.upper, prob.lower + 1e-12)  # trf needs lower < upper
    span = np.where(np.isfinite(upper - lower), upper - lower, 0.0)
    start = np.clip(theta, lower + 1e-9 * span, upper - 1e-9 * span)
    sol = least_squares(
        prob.residuals,
        start,
        jac=prob.jacobian,
        bounds=(lower, upper),
        method="trf",
        x_scale=prob.x_scale,
        ftol=tol * 1e-2,
        xtol=tol * 1e-2,
        gtol=1e-10,
        max_nfev=max_nfev,
    )
    return np.clip(sol.x, prob.lower, prob.upper), int(sol.nfev), None


# ------------------------------------------------------------------------------ the steps


def _calibration_chi2(cfg: FitConfig, brightness: np.ndarray) -> float:
    """The brightness calibration's own chi2: its Gaussian prior's residuals, squared and summed
    (0 without a prior)."""
    if cfg.brightness_prior is None:
        return 0.0
    return float(np.sum(((brightness - cfg.brightness_centre) / cfg.brightness_prior) ** 2))


def _criterion(chi2: float, n_params: int, n: int, kind: str) -> float:
    """Information criterion of a fit with Gaussian noise of known scale (chi2 = -2 log L + c)."""
    return chi2 + n_params * (math.log(n) if kind == "bic" else 2.0)


def _fit(
    win: _Window,
    start: np.ndarray,
    v0,
    anchors: np.ndarray,
    has_prior: np.ndarray,
    scale: float,
    nfev0: int = 0,
    bg0: np.ndarray | None = None,
    sigma0: float | None = None,
    free_sigma: bool = False,
    frames_free: bool = False,
) -> _Fit:
    """Fit K = len(start) targets from ``start`` (K, 3); ``anchors`` (K, 2) centre bounds and
    priors; the background from ``bg0`` (default: the window's starting plane); with
    ``frames_free``, each frame's departures too (:class:`_FrameProblem`)."""
    cfg = win.cfg
    anchors = np.asarray(anchors, dtype=np.float64)
    prob = (_FrameProblem if frames_free else _Problem)(win, anchors, has_prior, scale, free_sigma)
    native = NATIVE and prob.n_params <= NATIVE_MAX_PARAMS and (NATIVE_FRAMES or not frames_free)
    solve = {"scipy": _solve_scipy, "lm-numpy": _solve_lm}.get(cfg.solver, _solve_native if native else _solve_lm)
    theta, nfev, chi2 = solve(
        prob,
        prob.pack(start, v0, win.bg0 if bg0 is None else bg0, sigma0),
        max(cfg.max_nfev, FRAME_NFEV) if frames_free else cfg.max_nfev,
        cfg.tol,
    )
    targets, v, bg, sigma = prob.unpack(theta)
    if chi2 is None:
        chi2 = win.chi2(win.data_residuals(prob.model(theta)), scale)
    n_params = prob.n_params + 2 * (cfg.psf_halo is not None)  # the halo's share and width were chosen too
    return _Fit(
        targets=targets,
        velocity=v,
        chi2=chi2,
        ic=_criterion(chi2 + _calibration_chi2(cfg, targets[:, 2]), n_params, win.n_data, cfg.criterion),
        n_params=n_params,
        nfev=nfev + nfev0,
        anchors=anchors,
        has_prior=has_prior,
        background=bg,
        psf_sigma=sigma,
        problem=prob,
        theta=theta,
    )


def _stack(targets: np.ndarray) -> int:
    """The most of ``targets`` (K, 3) within STACK_PX of one of them, itself counted."""
    if len(targets) < 2:
        return len(targets)
    d = np.hypot(targets[:, None, 0] - targets[None, :, 0], targets[:, None, 1] - targets[None, :, 1])
    return int((d < STACK_PX).sum(axis=1).max())


def _separate(peaks: np.ndarray, min_px: float = 0.05) -> np.ndarray:
    """Copy of ``peaks`` with coincident positions moved apart along x to ``min_px``.

    Two targets at one position are a saddle of the cost (swapping them changes nothing), from
    which the solver creeps away slowly; 0.05 px apart they separate at once.
    """
    out = np.array(peaks, dtype=np.float64)
    xs, ys = out[:, 0].tolist(), out[:, 1].tolist()  # Python floats: a few pairs, no numpy calls
    for i in range(1, len(xs)):
        for j in range(i):
            if math.hypot(xs[i] - xs[j], ys[i] - ys[j]) < min_px:
                xs[i] += 0.5 * min_px
                xs[j] -= 0.5 * min_px
    out[:, 0] = xs
    return out


def _centroid_velocity(win: _Window) -> np.ndarray:
    """Group velocity from the motion of each frame's intensity centroid in the crop
    (least-squares slope); 0 where a frame has no signal or the window one time."""
    img = np.maximum(win.sig, 0.0).reshape(win.shape)
    mass = img.sum(axis=(1, 2))
    t = win.times
    if np.any(mass <= 0) or not win.moving:
        return np.zeros(2)
    cx = (img.sum(axis=1) @ np.arange(win.c0, win.c1)) / mass
    cy = (img.sum(axis=2) @ np.arange(win.r0, win.r1)) / mass
    tc = t - t.mean()
    return np.array([tc @ cx, tc @ cy]) / (tc @ tc)


def _speed_bound(bound: float, drift: np.ndarray) -> float | None:
    """A larger speed bound than ``bound`` for a window whose frames' centroid moves with
    ``drift`` (:func:`_centroid_velocity`) near or past it (a speed, which a crop too small for
    the motion understates, above FAST_SHARE of it): FAST_ROOM times that speed, at most
    MAX_SPEED; None for the others."""
    speed = float(np.max(np.abs(drift)))
    if not speed > FAST_SHARE * bound or bound >= MAX_SPEED:
        return None
    return min(max(FAST_ROOM * speed, bound), MAX_SPEED)


def _linear_brightness(win: _Window, xy: np.ndarray, v, fallback: np.ndarray) -> np.ndarray:
    """Least-squares brightness of targets at fixed positions, clipped to the allowed range.

    Saturated pixels are left out (they are only bounds). Falls back to ``fallback`` when the
    system is singular (e.g. two targets at the same place).
    """
    lo, hi = win.cfg.brightness_range
    cols = win.unit_columns(xy, v)
    keep = win.usable
    try:
        a = _lstsq(cols[keep], win.sig[keep])
    except np.linalg.LinAlgError:
        a = fallback
    if a.shape != fallback.shape or not np.isfinite(a).all():
        a = fallback
    return np.clip(a, lo, hi)


def _flux_counts(win: _Window) -> tuple[list[int], bool]:
    """Target counts the window's flux allows, and whether more are possible (open-ended).

    The forward model conserves energy: the fitted pixels of a frame sum to the targets'
    brightness (plus background), so K targets of brightness within ``brightness_range``
    (lo, hi) put a flux F with K lo <= F <= K hi, up to the noise of the sum. The counts
    returned are those within ``flux_z`` sigma of that. Where the flux is only a lower bound
    (pixels clipped at saturation, a target near the patch border, or no far pixels to measure
    the background) the upper end is open: more targets are tried one at a time while they
    lower the information criterion.
    """
    cfg = win.cfg
    lo, hi = cfg.brightness_range
    img = win.sig.reshape(win.shape)
    n_frames, n_px = img.shape[0], img[0].size
    background = win.background if win.background is not None else 0.0
    flux = float(img.sum(axis=(1, 2)).mean()) - background * n_px
    s = win.scale if win.scale is not None else 1.0
    sigma = s * math.sqrt(n_px / n_frames) + 1.0  # noise of the frame-mean sum (+1: rounding of bounds)
    if win.white is not None:
        flux, sigma = _clutter_flux(win, img.mean(axis=0).ravel() - background)
    k_lo = max(1, math.ceil((flux - cfg.flux_z * sigma) / hi))
    k_hi = math.floor((flux + cfg.flux_z * sigma) / lo)
    open_ended = win.any_sat or win.at_border or win.background is None
    if k_lo > k_hi:  # no count fits the brightness range (miscalibrated sensor?): nearest one
        k_lo = k_hi = max(1, round(flux / cfg.brightness_centre))
    k_lo, k_hi = min(k_lo, cfg.max_targets), min(k_hi, cfg.max_targets)
    return list(range(k_lo, k_hi + 1)), open_ended


def _clutter_flux(win: _Window, mean: np.ndarray) -> tuple[float, float]:
    """Targets' flux in a window with clutter, and its sigma: the frame-mean residual ``mean``
    (P,) summed over the pixels near the start positions, less the clutter there as predicted
    (kriged) from the crop's other pixels."""
    _, rows, cols = win.shape
    yy, xx = np.mgrid[win.r0 : win.r1, win.c0 : win.c1]
    reach = 3.0 * win.cfg.psf_sigma + 0.5 + win.cfg.max_speed_px * float(np.max(np.abs(win.times)))
    dist = np.hypot(xx.ravel()[:, None] - win.peaks[None, :, 0], yy.ravel()[:, None] - win.peaks[None, :, 1])
    ok = ~win.stuck[: rows * cols]
    near = (dist.min(axis=1) <= reach)[ok]
    m = mean[ok]
    kern = win.kern
    if near.all():
        return float(m.sum()), math.sqrt(float(kern.sum()) + win.white_var * m.size) + 1.0
    k_oo = kern[np.ix_(~near, ~near)] + win.white_var * np.eye(int((~near).sum()))
    k_zo = kern[np.ix_(near, ~near)]
    gain = np.linalg.solve(k_oo, k_zo.T).T  # (Z, O)
    flux = float(np.sum(m[near] - gain @ m[~near]))
    cov = kern[np.ix_(near, near)] - gain @ k_zo.T
    return flux, math.sqrt(max(float(cov.sum()), 0.0) + win.white_var * int(near.sum())) + 1.0


def _start(win: _Window, peaks: np.ndarray, k: int, v) -> tuple[np.ndarray, np.ndarray]:
    """Starting targets (k, 3) of a k-target fit, and which of them have a position prior.

    With more than k peaks: the centres of a brightness-weighted k-means clustering of the
    peaks (:func:`_cluster`). The network's cells-above-threshold rule spreads one target over
    1-3 adjacent cells on SeqCSIST data, and the cluster centre sits between them, below the
    1/3-px grid. (Measured on dev windows, CSO-mAP clean / sigma 2 / sigma 5: k-means 93.0 /
    72.5 / 58.6; the subset of k peaks with the least linear misfit 88.7 / 66.4 / 55.4; the
    best of three such subsets by the criterion after a short fit 93.4 / 71.4 / 55.0 at twice
    the time. Across starts a lower criterion did not mean closer targets: the one that moves
    further from its anchors fits the noise better.) With exactly k peaks: the peaks. With
    fewer: all peaks plus new targets where they leave flux unexplained (:func:`_grow`), which
    get no position prior.
    """
    if k < len(peaks):
        start = np.column_stack([_cluster(peaks[:, :2], peaks[:, 2], k), np.zeros(k)])
        has_prior = np.ones(k, dtype=bool)
    elif k == len(peaks):
        start, has_prior = np.array(peaks, dtype=np.float64), np.ones(k, dtype=bool)
    else:
        known = np.array(peaks, dtype=np.float64)
        known[:, 2] = _linear_brightness(win, known[:, :2], v, known[:, 2])
        start, has_prior = _grow(win, known, k, v), np.arange(k) < len(peaks)
    start = _separate(start)
    start[:, 2] = _linear_brightness(win, start[:, :2], v, np.full(k, np.mean(win.cfg.brightness_range)))
    return start, has_prior


def _may_grow(win: _Window, fit: _Fit) -> bool:
    """Whether one more target could explain the frames better than ``fit``: its misfit is above
    ``grow_chi2`` times the degrees of freedom, or a target is brighter than the calibration
    expects (a prior sigma above its centre, or at the range's top without a prior): with the
    flux a lower bound, it may be two. The gate skips the try where it cannot change the answer,
    which is most windows of clean data."""
    cfg = win.cfg
    hi = cfg.brightness_range[1]
    bright = hi * 0.99 if cfg.brightness_prior is None else min(cfg.brightness_centre + cfg.brightness_prior, hi * 0.99)
    return bool(fit.targets[:, 2].max() >= bright or win.reduced_chi2(fit) > cfg.grow_chi2)


def _retry(win: _Window, peaks: np.ndarray, k: int, v0, previous: _Fit | None, scale: float) -> _Fit | None:
    """A second k-target fit after a poor one: with more peaks than k, from the k peaks with the
    least linear misfit; with fewer, from the (k-1)-target fit plus a target where it leaves the
    most flux unexplained. None when there is no such start."""
    if k < len(peaks):
        start = _best_subset(win, peaks, k, v0)
        if start is None:
            return None
        return _fit(win, start, v0, start[:, :2], np.ones(k, dtype=bool), scale)
    if k > len(peaks) and previous is not None:
        start = _separate(_grow(win, previous.targets, k, previous.velocity))
        anchors = np.vstack([previous.anchors, start[-1:, :2]])
        return _fit(
            win, start, previous.velocity, anchors, np.append(previous.has_prior, False), scale, bg0=previous.background
        )
    return None


def _best_subset(win: _Window, peaks: np.ndarray, k: int, v, max_subsets: int = 64) -> np.ndarray | None:
    """The k of the peaks whose linear fit (brightness at fixed positions, saturated pixels left
    out) leaves the least misfit, as a start (k, 3); None when there are more than
    ``max_subsets`` subsets to score."""
    c = len(peaks)
    if math.comb(c, k) > max_subsets:
        return None
    key = (peaks.tobytes(), float(v[0]), float(v[1]), win.cfg.psf_sigma, win.cfg.psf_halo)
    if key not in win.subset_system:
        keep = win.usable
        a_mat = win.unit_columns(peaks[:, :2], v)[keep]
        gram, rhs = a_mat.T @ a_mat, a_mat.T @ win.sig[keep]
        gram[np.diag_indices(c)] += 1e-9 * max(float(np.trace(gram)), 1e-12)
        win.subset_system[key] = gram, rhs
    gram, rhs = win.subset_system[key]
    subsets = np.array(list(itertools.combinations(range(c), k)))  # (M, k)
    g = gram[subsets[:, :, None], subsets[:, None, :]]  # (M, k, k)
    b = rhs[subsets]
    a = np.linalg.solve(g, b[..., None])[..., 0]
    explained = np.einsum("mk,mk->m", b, a) - np.where(a.min(axis=1) < 0.5 * win.cfg.brightness_range[0], np.inf, 0.0)
    start = _separate(peaks[subsets[int(np.argmax(explained))]])
    start[:, 2] = _linear_brightness(win, start[:, :2], v, start[:, 2])
    return start


def _cluster(xy: np.ndarray, weight: np.ndarray, k: int, iterations: int = 8, native: bool = True) -> np.ndarray:
    """(k, 2) centres of a weighted k-means clustering of the points ``xy`` (n > k).

    Deterministic start: the heaviest point, then each time the point with the largest weight
    times squared distance to the centres so far. In C where the extension is built and
    ``native`` (the same algorithm; numpy's per-call overhead was most of its cost).
    """
    if native and NATIVE:
        centres = np.zeros((k, 2))
        _native_fit.kmeans(
            centres,
            np.ascontiguousarray(xy, dtype=np.float64),
            np.ascontiguousarray(weight, dtype=np.float64),
            k,
            iterations,
        )
        return centres
    w = np.maximum(np.asarray(weight, dtype=np.float64), 1e-12)
    first = int(np.argmax(w))
    centres = [xy[first]]
    d2 = ((xy - xy[first]) ** 2).sum(axis=1)
    for _ in range(1, k):
        nxt = int(np.argmax(w * d2))
        centres.append(xy[nxt])
        d2 = np.minimum(d2, ((xy - xy[nxt]) ** 2).sum(axis=1))
    c = np.array(centres)
    wxy = np.column_stack([w, w[:, None] * xy])  # (n, 3): weight, weighted x, weighted y
    for _ in range(iterations):
        label = np.argmin(((xy[:, None, :] - c[None]) ** 2).sum(axis=2), axis=1)
        sums = (label[None, :] == np.arange(k)[:, None]) @ wxy  # (k, 3) per cluster
        mass, moved = sums[:, 0], sums[:, 1:]
        new = np.where(mass[:, None] > 0, moved / np.maximum(mass, 1e-300)[:, None], c)
        if np.all(np.abs(new - c) <= 1e-8 + 1e-5 * np.abs(c)):  # np.allclose, without its overhead
            break
        c = new
    return c


def _grow(win: _Window, targets: np.ndarray, k: int, v) -> np.ndarray:
    """``targets`` (m, 3) plus new ones, one at a time, where they leave the most flux unexplained.

    Each new target starts at the frame-mean residual's brightest spot (:func:`_spot`).
    """
    lo, hi = win.cfg.brightness_range
    start = np.array(targets, dtype=np.float64)
    cols, rows = np.arange(win.c0, win.c1), np.arange(win.r0, win.r1)
    while len(start) < k:
        res = (win.obs - win.model(start, v)).reshape(win.shape).mean(axis=0)  # (R, C)
        x, y, mass, _ = _spot(res, rows, cols)
        start = np.vstack([start, [x, y, float(np.clip(mass / 0.6, lo, hi))]])
    return start
