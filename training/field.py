"""``csist simulate --scenario field``: patches like the ones a real IRST pipeline sends.

The SeqCSIST protocol (``training/simulate.py``) is the benchmark, not the world (docs/method.md
section 3.3). This scenario keeps its on-disk format (PNG frames, ``COS<n>.xml`` annotations
with brightness in sensor units, ``meta.json``) and draws every nuisance a detector's patch
has, per trajectory, from a range. Every range is a flag; a flag given one value fixes that
nuisance, so a benchmark can make one condition at a time (``--background clutter
--clutter-std 25``) while the default ("mixed") draws everything from its full range.

Ranges are written ``X`` (fixed) or ``LO,HI`` and drawn uniformly unless stated otherwise;
integer ranges are written ``N`` or ``LO-HI``. All levels are in sensor units (grey levels of
the output, whatever its bit depth); positions in pixels as everywhere in the project (x =
column, y = row, pixel centres at integers, the patch spans [-0.5, size - 0.5]).

Sensor (per trajectory):

- PSF: sigma ~ U(``--psf-sigma``) (0.4, 0.7) px, written to the XML's ``<sigma>``. Its shape
  is one of ``--psf-shape`` (``gaussian``; ``mixed`` = gaussian, airy, moffat uniformly):
  gaussian is rendered by ``physics.pixel_response`` (the project's one forward model, the
  one the fit assumes); real optics are not Gaussian, so airy (a diffraction-limited circular
  aperture, (2 J1(x) / x)^2 with x = pi r / (lambda N)) and moffat ((1 + (r / alpha)^2)^-beta,
  beta ~ U(``--moffat-beta``) (2.5, 4.5): a core with the power-law wings of aberrations and
  scatter) have the Gaussian of that sigma as their core: lambda N = sigma / 0.42 (the
  Gaussian that best matches an Airy core) and the Moffat's FWHM is the Gaussian's, 2.355
  sigma. They are integrated over each pixel on a 9 x 9 sub-pixel grid and normalised over
  the whole plane, so the flux that falls outside the patch is lost, as on a sensor.
- Noise: additive Gaussian, sigma ~ U(``--noise``) (0, 5) grey levels, independent per pixel
  and frame.
- Bit depth: one of ``--bit-depth`` (8; any of 8, 12, 14, 16, a comma list draws uniformly
  among them). Output is rounded and clipped to [0, 2^bits - 1]; 8 bits are written as 8-bit
  PNGs, more as 16-bit PNGs (``cv2`` and ``training.data.read_png`` read both back exactly).
  ``--float`` keeps float32 images (no rounding, no clipping) in ``<split>/images.npy``.

Background (per trajectory, static over the trajectory: a staring sensor's patch): one kind
of ``--background`` (``mixed`` = flat, ramp, clutter, edge, drawn uniformly; or one kind, or
a comma list). Every kind starts from a pedestal P ~ U(``--pedestal``) (0, 150). Values are
taken at pixel centres.

- flat: P everywhere.
- ramp: a plane rising along a direction theta ~ U(0, 2 pi), from L at the pixel centre
  lowest along theta to H at the highest, so L and H are the patch's extreme background
  values. ``--ramp L,H`` fixes both; otherwise L = P and H = P + U(``--ramp-rise``) (5, 60).
- clutter: P + s * z, z a white Gaussian field smoothed by a Gaussian of sigma
  c ~ U(``--clutter-scale``) (1, 3) px (the clutter's correlation length; smoothed on a grid
  3c wider on each side than the patch, so the patch has no edge effect), then shifted and
  scaled to mean 0 and standard deviation exactly 1 over the patch's pixels;
  s ~ U(``--clutter-std``) (2, 25) is therefore the background's exact standard deviation
  over the patch (its local std). A field that would dip below 0 is raised until its minimum
  is 0 (a sensor's offset keeps dark levels above 0); the metadata records the mean used.
- edge: a step from P to P + C, C ~ U(``--edge-contrast``) (10, 80), across a straight line
  with normal theta ~ U(0, 2 pi) through a point drawn uniformly in the central half of the
  patch (each axis within size/4 of the centre), blurred by a Gaussian of sigma
  b ~ U(``--edge-blur``) (0.3, 1) px: P + C * Phi(d / b), d the signed distance of the pixel
  centre from the line, Phi the normal CDF (b = 0: a sharp step).
- defects: n ~ U{``--bad-pixels``} (0-2) pixels, distinct, uniformly placed, stuck for the
  whole trajectory: hot (probability 1/2) at round(U(``--hot-level``) (0.5, 1) x
  (2^bits - 1)), else dead at 0. They replace the pixel's value after noise.

Targets (per trajectory):

- Count K ~ U{``--targets``} (1-8).
- Geometry, one of ``--geometry`` (``random``; ``mixed`` = random, line, cross uniformly), at
  the first frame, relative to the group centre, with group radius R ~ U(``--group-radius``)
  (0.3, 1) px raised where K targets would not fit at the minimum separation s
  (``--min-separation``, 0.25 px): random: each target uniform in the disc of radius R,
  R >= s/2 (sqrt(3K) - 1) (the targets' exclusion discs cover at most a third of it); line:
  K targets evenly spaced along a line through the centre at an angle U(0, pi), gap
  U(s, 2R/(K-1)), R >= s (K - 1)/2; cross: the protocol's shape, distinct directions
  up/down/left/right (for K > 4 the 8 compass directions) at one distance
  U(s / (2 sin(pi / n_dirs)), R) from the centre (adjacent targets at least s apart).
- Motion: the group centre moves in a straight line at a speed U(``--velocity``) (0, 0.1)
  px/frame in a direction U(0, 2 pi); every target adds its own constant drift, speed
  U(``--target-drift``) (0, 0.005) px/frame in a direction U(0, 2 pi), so the group slowly
  deforms. R bounds the first frame; later frames may reach R + drift x (frames - 1).
- Turbulence (off by default): the whole group shifted off its track in every frame by a
  Gaussian of sd U(``--jitter``) px per axis (platform jitter, turbulence), and each target's
  flux scaled in every frame by 1 + a Gaussian of sd U(``--scintillation``) (at least 0.05);
  and each frame's background level moved by a Gaussian of sd U(``--flicker``) grey levels (a
  sensor's gain control, frame-level noise).
  The ground truth is where and how bright the targets are in each frame.
- Separation: every pair of targets stays at least s apart in every frame. Targets are
  placed one at a time; a target's candidates (random: position and drift; line, cross:
  drift) are drawn in batches of 64 and the first whose whole track keeps s from the tracks
  already placed is taken; after 10 failed batches the whole group is drawn again (at most
  1000 times).
- Position in the patch: every target of every frame stays at least ``--margin`` (1) px
  inside the patch's outer edge, as in the protocol; the group centre's start is drawn
  uniformly over the box of starts that satisfy this (exact, no rejection).
- Brightness: integrated flux a (``physics.pixel_response``'s brightness, the XML's
  ``<brightness>``), per target, constant along the trajectory. Its peak is p = a * u(sigma),
  u the brightest pixel of a unit target centred on a pixel; its peak SNR is p / max(noise
  sigma, 1) (a 1 grey-level floor, the quantisation step, keeps the SNR finite without
  noise). Default: peak SNR log-uniform over ``--snr`` (5, sat), ``sat`` meaning the peak
  that takes the background's highest value to full scale, 2^bits - 1 (one such target just
  saturates there; groups add up and saturate sooner; if LO is above it, LO is used;
  ``--snr sat`` puts every target there; a background at full scale leaves sat at SNR 1).
  ``--brightness LO,HI`` draws the flux uniformly instead (e.g. the protocol's 220,250).

Determinism: trajectory i draws from ``SeedSequence(seed).spawn(n)[i]`` (as the protocol), so
it does not depend on the number of trajectories, and the same seed gives byte-identical
files. That sequence is split again into one stream per nuisance (sensor, background,
defects, geometry, brightness, noise, optics), so fixing one nuisance by a flag does not change the
others' draws: ``--background flat`` and ``--background clutter`` with one seed give the same
target tracks, PSF and noise realisation (noise is drawn as a unit field times the sigma), and
the same brightness unless the SNR's top is ``sat`` (which depends on the background).

Output: the protocol's layout (``DIR/<split>/image/image_<n>.png``,
``DIR/<split>/annotation/COS<n>.xml``, ``DIR/meta.json`` with ``"scenario": "field"``, every
parameter and these rules' constants), plus ``DIR/<split>/conditions.jsonl``: line t holds
the split's trajectory t (frames 20t..20t+19; ``split_index`` t, ``trajectory`` its index
over all splits, the seed's child): background kind and parameters, defects,
PSF sigma, shape and Moffat beta (null unless moffat), noise sigma,
bit depth and saturation level, geometry, radius, velocity, drifts,
per-target brightness, peak and peak SNR, the closest pair's separation and the count of
saturated pixels (``read_conditions`` reads it back).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.special import erf, j1

from service.science import physics
from training import data, sim_io

BACKGROUNDS = ("flat", "ramp", "clutter", "edge")
GEOMETRIES = ("random", "line", "cross")
BIT_DEPTHS = (8, 12, 14, 16)
MAX_TARGETS = 8
SNR_NOISE_FLOOR = 1.0  # grey levels; the SNR's noise is max(noise sigma, this)
PACKING = 3.0  # random geometry: R >= s/2 (sqrt(PACKING K) - 1)
CLUTTER_PAD = 3.0  # smoothing grid extends this many clutter sigmas beyond the patch
EDGE_CENTRAL = 0.25  # the edge's line passes within size * this of the centre on each axis
HOT_PROBABILITY = 0.5
CANDIDATES = 64  # per batch of a target's placement
PLACE_BATCHES = 10  # batches before the group is drawn again
MAX_ATTEMPTS = 1000  # group draws
CONDITIONS_FILE = "conditions.jsonl"
# one child stream of the trajectory's SeedSequence each, in this order
# (appended streams leave the earlier ones' draws unchanged)
# a stream appended keeps the others' draws (SeedSequence children by index)
STREAMS = ("sensor", "background", "defects", "geometry", "brightness", "noise", "optics", "turbulence")
PSF_SHAPES = ("gaussian", "airy", "moffat")
AIRY_CORE = 0.42  # sigma of the Gaussian matching an Airy core, in units of lambda N
PSF_SUBPIXELS = 9  # sub-pixel grid per axis for the non-Gaussian PSFs

_S = float(np.sqrt(0.5))
AXIS_UNITS = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
COMPASS_UNITS = np.vstack([AXIS_UNITS, [[_S, _S], [-_S, _S], [-_S, -_S], [_S, -_S]]])


@dataclass(frozen=True)
class FieldParams:
    """Every range of the field scenario; (lo, hi) tuples are drawn per trajectory."""

    frames: int = 20
    size: int = 11
    targets: tuple[int, int] = (1, 8)
    margin: float = 1.0
    background: tuple[str, ...] = BACKGROUNDS
    pedestal: tuple[float, float] = (0.0, 150.0)
    ramp: tuple[float, float] | None = None
    ramp_rise: tuple[float, float] = (5.0, 60.0)
    clutter_std: tuple[float, float] = (2.0, 25.0)
    clutter_scale: tuple[float, float] = (1.0, 3.0)
    edge_contrast: tuple[float, float] = (10.0, 80.0)
    edge_blur: tuple[float, float] = (0.3, 1.0)
    bad_pixels: tuple[int, int] = (0, 2)
    hot_level: tuple[float, float] = (0.5, 1.0)
    snr: tuple[float | None, float | None] = (5.0, None)  # None: the saturation peak
    brightness: tuple[float, float] | None = None  # flux range; replaces snr when given
    psf_sigma: tuple[float, float] = (0.4, 0.7)
    psf_shape: tuple[str, ...] = ("gaussian",)
    moffat_beta: tuple[float, float] = (2.5, 4.5)
    noise: tuple[float, float] = (0.0, 5.0)
    bit_depth: tuple[int, ...] = (8,)
    geometry: tuple[str, ...] = ("random",)
    group_radius: tuple[float, float] = (0.3, 1.0)
    min_separation: float = 0.25
    velocity: tuple[float, float] = (0.0, 0.1)
    target_drift: tuple[float, float] = (0.0, 0.005)
    jitter: tuple[float, float] = (0.0, 0.0)  # sd of the group's shift off its track per frame, px
    scintillation: tuple[float, float] = (0.0, 0.0)  # sd of each target's relative brightness per frame
    flicker: tuple[float, float] = (0.0, 0.0)  # sd of each frame's background level, grey levels
    float_out: bool = False

    def max_span(self) -> float:
        """Widest extent a group's tracks can need along one axis, over the whole trajectory."""
        r = max(max(self.group_radius[1], min_radius(g, self.targets[1], self.min_separation)) for g in self.geometry)
        steps = self.frames - 1
        return 2 * (r + self.target_drift[1] * steps) + self.velocity[1] * steps

    def validate(self) -> None:
        """Raise ValueError, naming the flags, on combinations the generator cannot honour."""
        if self.frames < 1 or self.size < 5:
            raise ValueError("--frames must be >= 1 and --size >= 5 for the field scenario")
        lo, hi = self.targets
        if not 1 <= lo <= hi <= MAX_TARGETS:
            raise ValueError(f"--targets must lie within 1..{MAX_TARGETS} for the field scenario, got {lo}-{hi}")
        if not 1.0 < self.moffat_beta[0] <= self.moffat_beta[1]:
            raise ValueError(
                f"--moffat-beta must be > 1 (a Moffat of beta <= 1 has no finite flux), got {self.moffat_beta}"
            )
        if self.bad_pixels[1] > self.size * self.size:
            raise ValueError(f"--bad-pixels: at most {self.size * self.size} on a {self.size} x {self.size} patch")
        room = self.size - 1 - 2 * self.margin
        if room < 0 or self.max_span() > room:
            raise ValueError(
                f"targets cannot stay --margin {self.margin} px inside the patch: a group may span "
                f"{self.max_span():.2f} px (--group-radius, --min-separation, --targets, --velocity, "
                f"--target-drift, --frames) but only {max(room, 0):.2f} px are free (--size, --margin)"
            )


@dataclass
class FieldTrajectory:
    """One field trajectory before rendering, with the values that produced it."""

    targets: np.ndarray  # (T, K, 3) rows (x, y, brightness)
    background: np.ndarray  # (size, size) float64, before noise
    defects: np.ndarray  # (n, 3) rows (x, y, stuck value)
    psf_sigma: float
    noise: float
    bit_depth: int
    conditions: dict  # JSON-ready drawn values (see the module docstring)
    psf_shape: str = "gaussian"
    moffat_beta: float | None = None
    levels: np.ndarray | None = None  # (T,) each frame's background level off the pedestal (flicker)

    @property
    def saturation(self) -> int:
        return 2**self.bit_depth - 1


# --------------------------------------------------------------------------------------------
# the rules


def min_radius(geometry: str, k: int, s: float) -> float:
    """Smallest group radius that holds ``k`` targets ``s`` apart in ``geometry``."""
    if k <= 1:
        return 0.0
    if geometry == "random":
        return max(0.0, 0.5 * s * (np.sqrt(PACKING * k) - 1.0))
    if geometry == "line":
        return 0.5 * s * (k - 1)
    if geometry == "cross":
        n_dirs = len(AXIS_UNITS) if k <= len(AXIS_UNITS) else len(COMPASS_UNITS)
        return s / (2.0 * np.sin(np.pi / n_dirs))
    raise ValueError(f"unknown geometry {geometry!r}")


def unit_peak(size: int, sigma: float, shape: str = "gaussian", beta: float | None = None) -> float:
    """Brightest pixel of a unit-flux target centred on a pixel: peak = flux * this."""
    c = (size - 1) // 2
    return float(psf_response([[c, c, 1.0]], size, sigma, shape, beta).max())


def psf_profile(r: np.ndarray, sigma: float, shape: str, beta: float | None = None) -> np.ndarray:
    """Intensity of a unit-flux PSF at radius ``r`` (px): ``shape`` airy or moffat with the
    Gaussian of ``sigma`` as its core (module docstring), normalised over the plane."""
    if shape == "airy":
        ln = sigma / AIRY_CORE  # lambda N, px
        x = np.pi * np.maximum(r, 1e-12) / ln
        return (2.0 * j1(x) / x) ** 2 * np.pi / (4.0 * ln * ln)  # the pattern's integral is 4 (lambda N)^2 / pi
    if shape == "moffat":
        alpha = sigma * np.sqrt(2.0 * np.log(2.0)) / np.sqrt(2.0 ** (1.0 / beta) - 1.0)  # FWHM = 2.355 sigma
        return (1.0 + (r / alpha) ** 2) ** (-beta) * (beta - 1.0) / (np.pi * alpha * alpha)
    raise ValueError(f"unknown PSF shape {shape!r}")


def psf_response(targets, size: int, sigma: float, shape: str = "gaussian", beta: float | None = None) -> np.ndarray:
    """Noise-free float image (size, size) of point targets, rows (x, y, brightness), through a
    PSF of ``shape``: gaussian is ``physics.pixel_response``; airy and moffat are integrated
    over each pixel on a ``PSF_SUBPIXELS`` grid per axis."""
    if shape == "gaussian":
        return physics.pixel_response(targets, size, sigma)
    t = physics.as_targets(targets)
    n = PSF_SUBPIXELS
    sub = (np.arange(size * n) + 0.5) / n - 0.5  # sub-pixel centres, px
    image = np.zeros((size * n, size * n))
    for x, y, b in t:
        image += b * psf_profile(np.hypot(sub[None, :] - x, sub[:, None] - y), sigma, shape, beta)
    return image.reshape(size, n, size, n).mean(axis=(1, 3))


def quantize(image: np.ndarray, bit_depth: int) -> np.ndarray:
    """Sensor output: rounded and clipped to [0, 2^bits - 1]; uint8 for 8 bits, else uint16."""
    dtype = np.uint8 if bit_depth <= 8 else np.uint16
    return np.clip(np.rint(image), 0, 2**bit_depth - 1).astype(dtype)


def trajectory_seeds(seed: int, n: int) -> list[np.random.SeedSequence]:
    """Trajectory i's SeedSequence; the same as ``sim_io.trajectory_rngs`` seeds from."""
    return np.random.SeedSequence(seed).spawn(n)


def _streams(ss: np.random.SeedSequence) -> dict[str, np.random.Generator]:
    return {name: np.random.default_rng(child) for name, child in zip(STREAMS, ss.spawn(len(STREAMS)))}


def _uniform(rng: np.random.Generator, bounds) -> float:
    """One draw from U(lo, hi); consumed even when lo == hi, so fixing a value keeps the stream."""
    lo, hi = bounds
    return float(rng.uniform(lo, hi))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Column (x) and row (y) coordinate of every pixel centre, each (size, size)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return x, y


def sample_background(rng: np.random.Generator, params: FieldParams) -> tuple[np.ndarray, dict]:
    """One background (size, size) by the module docstring's rules, and its drawn values."""
    size = params.size
    x, y = _pixel_grid(size)
    kind = _pick(rng, params.background)
    pedestal = _uniform(rng, params.pedestal)
    info: dict = {"kind": kind, "pedestal": pedestal}
    if kind == "flat":
        bg = np.full((size, size), pedestal)
    elif kind == "ramp":
        theta = float(rng.uniform(0.0, 2 * np.pi))
        rise = _uniform(rng, params.ramp_rise)
        low, high = params.ramp if params.ramp is not None else (pedestal, pedestal + rise)
        proj = np.cos(theta) * x + np.sin(theta) * y
        frac = (proj - proj.min()) / (proj.max() - proj.min())
        bg = low + (high - low) * frac
        info.update(low=float(low), high=float(high), angle_deg=float(np.degrees(theta)))
    elif kind == "clutter":
        std = _uniform(rng, params.clutter_std)
        scale = _uniform(rng, params.clutter_scale)
        pad = int(np.ceil(CLUTTER_PAD * scale))
        z = gaussian_filter(rng.standard_normal((size + 2 * pad, size + 2 * pad)), scale, mode="wrap")
        z = z[pad : pad + size, pad : pad + size]
        z = (z - z.mean()) / z.std()
        bg = pedestal + std * z
        bg += max(0.0, -float(bg.min()))
        info.update(std=std, scale=scale, mean=float(bg.mean()))
    elif kind == "edge":
        theta = float(rng.uniform(0.0, 2 * np.pi))
        centre = (size - 1) / 2.0
        point = rng.uniform(centre - EDGE_CENTRAL * size, centre + EDGE_CENTRAL * size, size=2)
        contrast = _uniform(rng, params.edge_contrast)
        blur = _uniform(rng, params.edge_blur)
        d = (x - point[0]) * np.cos(theta) + (y - point[1]) * np.sin(theta)
        step = np.heaviside(d, 0.5) if blur <= 0 else 0.5 * (1.0 + erf(d / (blur * np.sqrt(2.0))))
        bg = pedestal + contrast * step
        info.update(
            low=pedestal,
            high=pedestal + contrast,
            contrast=contrast,
            blur=blur,
            angle_deg=float(np.degrees(theta)),
            point=[float(v) for v in point],
        )
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    return bg, info


def sample_defects(rng: np.random.Generator, params: FieldParams, bit_depth: int) -> np.ndarray:
    """Stuck pixels as rows (x, y, value): hot at a share of full scale, or dead at 0."""
    n = int(rng.integers(params.bad_pixels[0], params.bad_pixels[1] + 1))
    flat = rng.choice(params.size * params.size, size=n, replace=False)
    hot = rng.random(n) < HOT_PROBABILITY
    level = rng.uniform(params.hot_level[0], params.hot_level[1], size=n)
    value = np.where(hot, np.rint(level * (2**bit_depth - 1)), 0.0)
    return np.column_stack([flat % params.size, flat // params.size, value]).astype(np.float64)


def _drifts(rng: np.random.Generator, bounds, n: int) -> np.ndarray:
    speed = rng.uniform(bounds[0], bounds[1], size=n)
    angle = rng.uniform(0.0, 2 * np.pi, size=n)
    return speed[:, None] * np.column_stack([np.cos(angle), np.sin(angle)])


def _shape(rng: np.random.Generator, geometry: str, k: int, radius: float, s: float) -> np.ndarray | None:
    """First-frame offsets (k, 2) of a line or cross group; None for random (placed later)."""
    if geometry == "random":
        return None
    if geometry == "line":
        gap = float(rng.uniform(s, 2 * radius / (k - 1))) if k > 1 else 0.0
        angle = float(rng.uniform(0.0, np.pi))
        along = (np.arange(k) - (k - 1) / 2.0) * gap
        return along[:, None] * np.array([np.cos(angle), np.sin(angle)])[None, :]
    units = AXIS_UNITS if k <= len(AXIS_UNITS) else COMPASS_UNITS
    picked = rng.choice(len(units), size=k, replace=False)
    dist = float(rng.uniform(min_radius("cross", k, s) if k > 1 else 0.0, radius))
    return dist * units[picked]


def _place_group(
    rng: np.random.Generator, params: FieldParams, geometry: str, k: int, radius: float
) -> np.ndarray | None:
    """Tracks (T, k, 2) relative to the group centre, every pair >= s apart; None if jammed."""
    T, s = params.frames, params.min_separation
    t = np.arange(T, dtype=np.float64)[None, :, None]  # (1, T, 1)
    shape = _shape(rng, geometry, k, radius, s)
    tracks = np.zeros((T, 0, 2))
    for j in range(k):
        for _ in range(PLACE_BATCHES):
            if shape is None:
                r = radius * np.sqrt(rng.random(CANDIDATES))
                a = rng.uniform(0.0, 2 * np.pi, size=CANDIDATES)
                start = np.column_stack([r * np.cos(a), r * np.sin(a)])
            else:
                start = np.broadcast_to(shape[j], (CANDIDATES, 2))
            cand = start[:, None, :] + t * _drifts(rng, params.target_drift, CANDIDATES)[:, None, :]  # (B, T, 2)
            if j:
                gaps = np.linalg.norm(cand[:, :, None, :] - tracks[None], axis=-1)  # (B, T, j)
                ok = np.all(gaps >= s, axis=(1, 2))
            else:
                ok = np.ones(CANDIDATES, dtype=bool)
            if ok.any():
                tracks = np.concatenate([tracks, cand[int(np.argmax(ok))][:, None, :]], axis=1)
                break
        else:
            return None
    return tracks


def sample_geometry(rng: np.random.Generator, params: FieldParams) -> tuple[np.ndarray, dict]:
    """Target positions (T, K, 2) by the module docstring's rules, and the drawn values."""
    T, size = params.frames, params.size
    k = int(rng.integers(params.targets[0], params.targets[1] + 1))
    geometry = _pick(rng, params.geometry)
    radius = max(_uniform(rng, params.group_radius), min_radius(geometry, k, params.min_separation))
    speed = _uniform(rng, params.velocity)
    heading = float(rng.uniform(0.0, 2 * np.pi))
    velocity = speed * np.array([np.cos(heading), np.sin(heading)])
    for _ in range(MAX_ATTEMPTS):
        rel = _place_group(rng, params, geometry, k, radius)
        if rel is not None:
            break
    else:
        raise RuntimeError(f"no {geometry} group of {k} targets {params.min_separation} px apart within {radius} px")
    drift = (rel[-1] - rel[0]) / max(T - 1, 1)
    rel = rel + np.arange(T, dtype=np.float64)[:, None, None] * velocity  # (T, K, 2), start centre at 0
    lo_edge, hi_edge = params.margin - 0.5, size - 0.5 - params.margin
    lo = lo_edge - rel.min(axis=(0, 1))
    hi = hi_edge - rel.max(axis=(0, 1))
    if np.any(lo > hi):
        raise ValueError("group does not fit inside --margin; see FieldParams.validate")
    start = rng.uniform(lo, hi)
    pos = start + rel
    if k > 1:
        gaps = np.linalg.norm(pos[:, :, None, :] - pos[:, None, :, :], axis=-1)
        closest = float(gaps[:, ~np.eye(k, dtype=bool)].min())
    else:
        closest = None
    centre = start + np.arange(T, dtype=np.float64)[:, None] * velocity
    info = {
        "geometry": geometry,
        "targets": k,
        "group_radius": radius,
        "max_offset": float(np.linalg.norm(pos - centre[:, None, :], axis=-1).max()),
        "closest_pair": closest,
        "velocity": [float(v) for v in velocity],
        "speed": speed,
        "target_drift": drift.tolist(),
        "centre_start": [float(v) for v in start],
    }
    return pos, info


def sample_brightness(
    rng: np.random.Generator,
    params: FieldParams,
    k: int,
    noise: float,
    psf_sigma: float,
    headroom: float,
    optics: tuple[str, float | None] = ("gaussian", None),
) -> tuple[np.ndarray, dict]:
    """Per-target flux (k,) from the SNR or flux range, and each target's peak and peak SNR.

    ``headroom``: full scale minus the background's highest value, the peak ``sat`` stands for;
    ``optics``: the PSF's shape and Moffat beta, which set the peak of a unit flux.
    """
    noise_ref = max(noise, SNR_NOISE_FLOOR)
    u = unit_peak(params.size, psf_sigma, *optics)
    if params.brightness is not None:
        flux = rng.uniform(params.brightness[0], params.brightness[1], size=k)
    else:
        top = max(headroom / noise_ref, 1.0)
        lo, hi = params.snr
        lo = top if lo is None else lo
        hi = max(top if hi is None else hi, lo)
        flux = np.exp(rng.uniform(np.log(lo), np.log(hi), size=k)) * noise_ref / u
    peak = flux * u
    return flux, {
        "brightness": flux.tolist(),
        "peak": peak.tolist(),
        "peak_snr": (peak / noise_ref).tolist(),
        "snr_noise": noise_ref,
    }


def sample_field_trajectory(
    ss: np.random.SeedSequence, params: FieldParams = FieldParams()
) -> tuple[FieldTrajectory, np.random.Generator]:
    """Draw trajectory ``ss``'s scene (no image); also returns its noise stream for ``render``."""
    rngs = _streams(ss)
    sensor = rngs["sensor"]
    psf_sigma = _uniform(sensor, params.psf_sigma)
    noise = _uniform(sensor, params.noise)
    bit_depth = int(_pick(sensor, params.bit_depth))
    optics = rngs["optics"]
    shape = str(_pick(optics, params.psf_shape))
    beta = _uniform(optics, params.moffat_beta)
    beta = beta if shape == "moffat" else None
    background, bg_info = sample_background(rngs["background"], params)
    defects = sample_defects(rngs["defects"], params, bit_depth)
    pos, geo_info = sample_geometry(rngs["geometry"], params)
    k = pos.shape[1]
    headroom = 2**bit_depth - 1 - float(background.max())
    flux, b_info = sample_brightness(rngs["brightness"], params, k, noise, psf_sigma, headroom, (shape, beta))
    targets = np.concatenate([pos, np.broadcast_to(flux[None, :, None], pos.shape[:2] + (1,))], axis=2)
    turbulence = rngs["turbulence"]
    jitter, scintillation = _uniform(turbulence, params.jitter), _uniform(turbulence, params.scintillation)
    if jitter > 0:  # the whole group, off its track, frame by frame (platform jitter, turbulence)
        targets[:, :, :2] += turbulence.normal(0.0, jitter, (len(targets), 1, 2))
    if scintillation > 0:  # each target's flux, frame by frame (never below 5 % of it)
        targets[:, :, 2] *= np.maximum(1.0 + turbulence.normal(0.0, scintillation, targets.shape[:2]), 0.05)
    flicker = _uniform(turbulence, params.flicker)  # drawn last: the draws above stay as they were
    levels = turbulence.normal(0.0, flicker, len(targets)) if flicker > 0 else None
    conditions = {
        "background": bg_info,
        "defects": defects.tolist(),
        "psf_sigma": psf_sigma,
        "psf_shape": shape,
        "moffat_beta": beta,
        "noise": noise,
        "bit_depth": bit_depth,
        "saturation": 2**bit_depth - 1,
        "jitter": jitter,
        "scintillation": scintillation,
        "flicker": flicker,
        **geo_info,
        **b_info,
    }
    traj = FieldTrajectory(
        targets=targets,
        background=background,
        defects=defects,
        psf_sigma=psf_sigma,
        noise=noise,
        bit_depth=bit_depth,
        conditions=conditions,
        psf_shape=shape,
        moffat_beta=beta,
        levels=levels,
    )
    return traj, rngs["noise"]


def clean_frames(traj: FieldTrajectory, size: int) -> np.ndarray:
    """Noise-free float64 frames (T, size, size): background (with each frame's level where it
    flickers) plus the targets' forward model."""
    frames = traj.background[None] + np.stack(
        [psf_response(t, size, traj.psf_sigma, traj.psf_shape, traj.moffat_beta) for t in traj.targets]
    )
    return frames if traj.levels is None else frames + traj.levels[:, None, None]


def render(traj: FieldTrajectory, rng: np.random.Generator, size: int, float_out: bool = False) -> np.ndarray:
    """Sensor output (T, size, size): noise, stuck pixels, then quantisation (or float32)."""
    img = clean_frames(traj, size) + traj.noise * rng.standard_normal((traj.targets.shape[0], size, size))
    if len(traj.defects):
        cols, rows = traj.defects[:, 0].astype(int), traj.defects[:, 1].astype(int)
        img[:, rows, cols] = traj.defects[:, 2]
    return img.astype(np.float32) if float_out else quantize(img, traj.bit_depth)


# --------------------------------------------------------------------------------------------
# files


def write_png(path: Path, image: np.ndarray) -> None:
    """8-bit frames through ``data.write_png``; deeper ones as 16-bit grey PNGs."""
    if image.dtype == np.uint8:
        data.write_png(path, image)
        return
    if image.dtype != np.uint16 or image.ndim != 2:
        raise ValueError(f"PNG frames must be 2-D uint8 or uint16, got {image.dtype} {image.shape}")
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    Path(path).write_bytes(buf.tobytes())


def read_conditions(root, split: str) -> list[dict]:
    """The per-trajectory conditions of ``root/<split>``, in trajectory order."""
    path = Path(root) / split / CONDITIONS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise data.DataError(f"missing conditions file: {path}") from None
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as exc:
        raise data.DataError(f"malformed conditions file {path}: {exc}") from None


def meta_dict(params: FieldParams, seed: int, fractions, counts: list[int]) -> dict:
    """Contents of meta.json for a field data set."""
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    kinds = {"uint8" if b == 8 else "uint16" for b in params.bit_depth}
    image_format = (
        "npy-float32" if params.float_out else "png-" + "/".join(k for k in ("uint8", "uint16") if k in kinds)
    )
    return {
        "format": "seqcsist",
        "format_version": sim_io.FORMAT_VERSION,
        "scenario": "field",
        "generator": "csist simulate --scenario field",
        "seed": seed,
        "trajectories": int(sum(counts)),
        "frames_per_trajectory": params.frames,
        "image_format": image_format,
        "params": asdict(params),
        "split_fractions": list(fractions),
        "splits": {
            name: {
                "trajectories": int(c),
                "frames": int(c) * params.frames,
                "first_trajectory": int(f),
                "conditions": f"{name}/{CONDITIONS_FILE}",
            }
            for name, c, f in zip(sim_io.SPLITS, counts, first)
        },
        "rules": {
            "snr": "peak SNR = flux * unit_peak(psf_sigma) / max(noise, snr_noise_floor); "
            "snr hi null = (full scale - max background) / max(noise, snr_noise_floor)",
            "snr_noise_floor": SNR_NOISE_FLOOR,
            "packing": PACKING,
            "clutter_pad_sigmas": CLUTTER_PAD,
            "edge_central": EDGE_CENTRAL,
            "hot_probability": HOT_PROBABILITY,
            "streams": list(STREAMS),
        },
        "coordinates": "annotation xc = row (y), yc = column (x); pixel centres at integers",
    }


def generate(
    out: Path,
    n: int,
    seed: int,
    params: FieldParams,
    fractions=(0.7, 0.15, 0.15),
    progress: bool = True,
    preview: Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Simulate ``n`` field trajectories into ``out``; returns the meta.json contents."""
    params.validate()
    counts = sim_io.split_counts(n, fractions)
    out = Path(out)
    sim_io.prepare_out(out, overwrite)
    seeds = trajectory_seeds(seed, n)

    def trajectory(i: int) -> sim_io.Written:
        traj, noise_rng = sample_field_trajectory(seeds[i], params)
        images = render(traj, noise_rng, params.size, params.float_out)
        stuck = np.zeros(images.shape[1:], dtype=bool)
        stuck[traj.defects[:, 1].astype(int), traj.defects[:, 0].astype(int)] = True
        saturated = int(np.sum((images >= traj.saturation) & ~stuck[None]))
        record = {**traj.conditions, "saturated_pixels": saturated}
        return sim_io.Written(images, traj.targets, traj.psf_sigma, record)

    kept = sim_io.write_splits(
        out,
        counts,
        params.frames,
        params.float_out,
        trajectory,
        write_png,
        CONDITIONS_FILE,
        progress,
        "simulate field",
        keep=4 if preview is not None else 0,
    )
    meta = meta_dict(params, seed, fractions, counts)
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if preview is not None:
        titles = []
        for w in kept:
            c = w.record
            titles.append(
                f"{c['background']['kind']} {c['geometry']} psf {c['psf_sigma']:.2f} noise {c['noise']:.1f} "
                f"SNR {min(c['peak_snr']):.0f}-{max(c['peak_snr']):.0f}"
            )
        sim_io.write_preview(preview, [(w.images, w.targets) for w in kept], titles=titles, stretch=True)
    return meta


# --------------------------------------------------------------------------------------------
# command line (the flags join ``csist simulate``'s parser)


def _numbers(text: str, flag_min: float | None, strict: bool) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None
    if not all(np.isfinite(vals)):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    if flag_min is not None and any(v < flag_min or (strict and v == flag_min) for v in vals):
        raise argparse.ArgumentTypeError(f"values must be {'>' if strict else '>='} {flag_min:g}, got {text!r}")
    return vals


def float_range(minimum: float | None = 0.0, strict: bool = False, maximum: float | None = None):
    """``X`` or ``LO,HI`` -> (lo, hi) with lo <= hi, each >= ``minimum`` (> if ``strict``)."""

    def parse(text: str) -> tuple[float, float]:
        vals = _numbers(text, minimum, strict)
        if len(vals) not in (1, 2):
            raise argparse.ArgumentTypeError(f"expected X or LO,HI, got {text!r}")
        lo, hi = vals[0], vals[-1]
        if lo > hi:
            raise argparse.ArgumentTypeError(f"LO must be <= HI, got {text!r}")
        if maximum is not None and hi > maximum:
            raise argparse.ArgumentTypeError(f"values must be <= {maximum:g}, got {text!r}")
        return lo, hi

    return parse


def _pair(text: str) -> tuple[float, float]:
    vals = _numbers(text, 0.0, False)
    if len(vals) != 2:
        raise argparse.ArgumentTypeError(f"expected LO,HI (the ramp's two end values), got {text!r}")
    return vals[0], vals[1]


def _count_range(text: str) -> tuple[int, int]:
    parts = text.replace(" ", "").split("-")
    try:
        lo, hi = int(parts[0]), int(parts[-1])
        if len(parts) > 2:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI, got {text!r}")
    return lo, hi


def _non_negative(text: str) -> float:
    vals = _numbers(text, 0.0, False)
    if len(vals) != 1:
        raise argparse.ArgumentTypeError(f"expected one number, got {text!r}")
    return vals[0]


def _snr(text: str) -> tuple[float | None, float | None]:
    parts = text.replace(" ", "").split(",")
    if parts == ["sat"]:
        return None, None
    if len(parts) not in (1, 2) or parts[0] == "sat":
        raise argparse.ArgumentTypeError(f"expected X, LO,HI, LO,sat or sat, got {text!r}")
    hi_sat = parts[-1] == "sat"
    lo, hi = float_range(0.0, strict=True)(",".join(parts[:-1] if hi_sat else parts))
    return (lo, None) if hi_sat else (lo, hi)


def _choices(options: tuple, mixed: tuple, cast=str):
    def parse(text: str) -> tuple:
        if text == "mixed":
            return mixed
        try:
            vals = tuple(cast(v) for v in text.replace(" ", "").split(","))
        except ValueError:
            vals = ()
        if not vals or any(v not in options for v in vals):
            raise argparse.ArgumentTypeError(
                f"expected mixed or a comma list of {', '.join(map(str, options))}; got {text!r}"
            )
        return tuple(dict.fromkeys(vals))

    return parse


# dest -> (flag, type, help); help gains FieldParams' default. Shared flags (--targets, --noise,
# --psf-sigma, --brightness, --margin, --frames, --size, --float) are the protocol's parser's.
FIELD_FLAGS = {
    "background": (
        "--background",
        _choices(BACKGROUNDS, BACKGROUNDS),
        "background kind: mixed (all four) or a comma list of flat, ramp, clutter, edge",
    ),
    "pedestal": ("--pedestal", float_range(), "background pedestal, grey levels, X or LO,HI"),
    "ramp": (
        "--ramp",
        _pair,
        "ramp background's two end values L,H across the patch (when not given: L = pedestal, H = L + --ramp-rise)",
    ),
    "ramp_rise": ("--ramp-rise", float_range(), "ramp rise across the patch when --ramp is not given"),
    "clutter_std": (
        "--clutter-std",
        float_range(),
        "clutter background's standard deviation over the patch, grey levels",
    ),
    "clutter_scale": (
        "--clutter-scale",
        float_range(0.0, strict=True),
        "clutter correlation length (Gaussian smoothing sigma), px",
    ),
    "edge_contrast": ("--edge-contrast", float_range(), "edge background's step height, grey levels"),
    "edge_blur": ("--edge-blur", float_range(), "edge blur sigma, px; 0 = sharp step"),
    "bad_pixels": ("--bad-pixels", _count_range, "stuck (hot or dead) pixels per trajectory, N or LO-HI"),
    "hot_level": (
        "--hot-level",
        float_range(0.0, strict=True, maximum=1.0),
        "hot pixel level as a share of full scale",
    ),
    "snr": (
        "--snr",
        _snr,
        "target peak SNR, X, LO,HI, LO,sat or sat (log-uniform; sat = the peak that takes the highest background "
        "pixel to full scale); ignored with --brightness",
    ),
    "psf_shape": (
        "--psf-shape",
        _choices(PSF_SHAPES, PSF_SHAPES),
        "PSF shape, its core the Gaussian of --psf-sigma: gaussian, airy, moffat, a comma list or mixed",
    ),
    "moffat_beta": (
        "--moffat-beta",
        float_range(1.0, strict=True),
        "Moffat PSF's power-law index beta (> 1; smaller: heavier wings)",
    ),
    "bit_depth": (
        "--bit-depth",
        _choices(BIT_DEPTHS, BIT_DEPTHS, int),
        "sensor bit depth: 8, 12, 14, 16, a comma list or mixed; >8 bits are 16-bit PNGs",
    ),
    "geometry": (
        "--geometry",
        _choices(GEOMETRIES, GEOMETRIES),
        "group geometry: random, line, cross, a comma list or mixed",
    ),
    "group_radius": ("--group-radius", float_range(0.0, strict=True), "group radius at the first frame, px"),
    "min_separation": (
        "--min-separation",
        _non_negative,
        "minimum distance between any two targets in every frame, px",
    ),
    "velocity": ("--velocity", float_range(), "group speed, px/frame, random direction"),
    "target_drift": ("--target-drift", float_range(), "each target's own drift speed, px/frame, random direction"),
    "jitter": ("--jitter", float_range(), "sd of the group's shift off its track in each frame, px (platform jitter)"),
    "scintillation": (
        "--scintillation",
        float_range(),
        "sd of each target's relative brightness change in each frame (scintillation)",
    ),
    "flicker": ("--flicker", float_range(), "sd of each frame's background level, grey levels (gain control)"),
}
PROTOCOL_ONLY = {"step": "--step", "spacing": "--spacing", "drift": "--drift"}


def default_text(dest: str) -> str:
    """FieldParams' default of ``dest`` as its flag would be written."""
    value = getattr(FieldParams(), dest)
    if value is None:
        return ""
    if value in (BACKGROUNDS, GEOMETRIES, PSF_SHAPES):
        return "mixed"
    if dest in ("targets", "bad_pixels"):
        return f"{value[0]}-{value[1]}"
    if isinstance(value, tuple):
        return ",".join("sat" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The field scenario's own flags; absent from the namespace unless given."""
    group = parser.add_argument_group("field scenario (--scenario field; see docs/field-simulator.md)")
    for dest, (flag, kind, text) in FIELD_FLAGS.items():
        shown = default_text(dest)
        group.add_argument(
            flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=f"{text} (default {shown})" if shown else text
        )


def params_from_args(args: argparse.Namespace) -> FieldParams:
    """FieldParams from a parsed ``csist simulate`` namespace (flags not given keep defaults)."""
    given = vars(args)
    used = [PROTOCOL_ONLY[d] for d in PROTOCOL_ONLY if d in given]
    if used:
        raise ValueError(f"{', '.join(used)} {'applies' if len(used) == 1 else 'apply'} to --scenario seqcsist only")
    values = {}
    for dest in ("frames", "size", "margin", "float_out"):
        if dest in given:
            values[dest] = given[dest]
    for dest in FIELD_FLAGS:
        if dest in given:
            values[dest] = given[dest]
    for dest in ("targets", "noise", "psf_sigma", "brightness"):
        if dest in given:
            values[dest] = tuple(given[dest])
    if "noise" in values and values["noise"][0] < 0:
        raise ValueError("--noise must be >= 0")
    if "psf_sigma" in values and values["psf_sigma"][0] <= 0:
        raise ValueError("--psf-sigma must be > 0")
    if "brightness" in values and values["brightness"][0] <= 0:
        raise ValueError("--brightness must be > 0")
    return FieldParams(**values)
