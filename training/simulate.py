"""``csist simulate``: SeqCSIST-protocol trajectories written in the published on-disk format.

This module is the protocol (``--scenario seqcsist``, the default); ``--scenario field``
dispatches to ``training/field.py``, which draws backgrounds, brightness, PSF, noise, bit
depth and group geometry from wide ranges into the same format (its docstring has its rules).

The published SeqCSIST data cannot be downloaded here, so we regenerate it by the paper's
rules (SeqCSIST, section III; docs/method.md section 3). Every rule is a flag with the paper's
default:

- K targets per trajectory, K uniform over ``--targets`` (2-4; up to 8 allowed).
- A reference point (no brightness) starts at (x0, f(x0)), x0 an integer in 1..size-2, f a
  random curve: straight line, quadratic or circle arc, the type chosen uniformly. It moves
  ``--step`` (0.04) px per frame along +x if x0 < (size-1)/2 (= 5 for size 11), else along
  -x, staying on the curve: y = f(x).
- Each target sits in its own direction from the reference, chosen at random without
  repetition: up / down / left / right (up = decreasing row y) when K <= 4; for K > 4 among
  the 8 compass directions (those 4 plus the 4 diagonals). It starts ``--spacing`` (0.3) px
  away and every frame moves a further U(0, ``--drift``] (0.0014) px away from the reference,
  independently per target and cumulatively; its direction never changes.
- Brightness U(``--brightness``) = U(220, 250) per target, constant along the trajectory.
- Image = ``physics.pixel_response`` (Gaussian PSF sigma ``--psf-sigma`` 0.5, integrated over
  pixels) + Gaussian noise sigma ``--noise`` (0), then ``physics.quantize`` (rounded, clipped
  to [0, 255], 8-bit). ``--float`` keeps float32 images (noise still added) in
  ``<split>/images.npy``.

Curve parameters (ours; the paper does not give them). Write dx = x - x0, y0 = f(x0):

- line: y = y0 + m dx, m = tan(theta), theta ~ U(-60, 60) degrees.
- quadratic: y = y0 + m dx + a dx^2, m as for the line, |a| ~ U(0.1, 1.0) px^-1 with a random
  sign.
- circle arc: radius R ~ U(1.5, 8) px; the reference starts at angle phi on the circle
  (image axes), phi ~ U(0, 2 pi) restricted to |sin phi| >= 0.5 (the arc starts no steeper
  than 60 degrees); y = cy + sign(sin phi) * sqrt(R^2 - (x - cx)^2) is the half of the circle
  the start lies on.
- y0 ~ U over the allowed band (below); it is real, not an integer.

A curve is accepted only if, over all frames, the reference stays on the curve's domain, its
y stays inside the allowed band and its slope |dy/dx| between frames stays <= 2 (so it moves
at most 0.04 * sqrt(5) = 0.09 px per frame); otherwise the curve's parameters and y0 are
drawn again (the curve type and x0 are kept, so the type stays uniform).

The allowed band keeps every target (and the reference) at least ``--margin`` (1) px inside
the patch's outer edge (the edge is at -0.5 and size - 0.5), i.e. out of the outermost ring
of pixels: the reference stays within [margin - 0.5 + r, size - 0.5 - margin - r] on both
axes, r = spacing + (frames - 1) * drift being the largest target distance. x0 is drawn
uniformly from the integers 1..size-2 whose whole x path satisfies that (all of 1..9 with the
paper's values).

Determinism: trajectory i uses ``numpy.random.default_rng(SeedSequence(seed).spawn(n)[i])``
for everything (geometry, then noise), so it does not depend on the number of trajectories
or the split fractions, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from service.science import physics
from training import data
from training.sim_io import (
    FORMAT_VERSION,
    SPLITS,
    Written,
    split_counts,
    trajectory_rngs,
    write_preview,
    write_splits,
)
from training.sim_io import prepare_out as _prepare_out

MAX_SLOPE = 2.0  # |dy/dx| of the reference path between frames
LINE_MAX_ANGLE = np.pi / 3  # line / quadratic start slope: tan(U(-60, 60) degrees)
QUAD_CURVATURE = (0.1, 1.0)  # |a| of the quadratic term, px^-1
CIRCLE_RADIUS = (1.5, 8.0)  # px
CIRCLE_MIN_SIN = 0.5  # |sin phi| at the start: the arc starts no steeper than 60 degrees
MAX_ATTEMPTS = 1000
CURVE_KINDS = ("line", "quadratic", "circle")

_S = float(np.sqrt(0.5))
# (name, unit vector (dx, dy)); y is the row, so "up" is -y.
AXIS_DIRECTIONS = (("right", (1.0, 0.0)), ("left", (-1.0, 0.0)), ("down", (0.0, 1.0)), ("up", (0.0, -1.0)))
DIAGONAL_DIRECTIONS = (
    ("down-right", (_S, _S)),
    ("down-left", (-_S, _S)),
    ("up-left", (-_S, -_S)),
    ("up-right", (_S, -_S)),
)
COMPASS_DIRECTIONS = AXIS_DIRECTIONS + DIAGONAL_DIRECTIONS


@dataclass(frozen=True)
class SimParams:
    """Every rule of the SeqCSIST protocol, with the paper's values as defaults."""

    frames: int = 20
    size: int = 11
    psf_sigma: float = 0.5
    step: float = 0.04
    spacing: float = 0.3
    drift: float = 0.0014
    brightness: tuple[float, float] = (220.0, 250.0)
    targets: tuple[int, int] = (2, 4)
    margin: float = 1.0
    noise: float = 0.0
    float_out: bool = False

    @property
    def max_distance(self) -> float:
        """Largest possible target-reference distance over a trajectory."""
        return self.spacing + (self.frames - 1) * self.drift

    @property
    def band(self) -> tuple[float, float]:
        """Interval the reference must stay in (both axes) so every target keeps the margin."""
        r = self.max_distance
        return self.margin - 0.5 + r, self.size - 0.5 - self.margin - r

    def validate(self) -> None:
        """Raise ValueError on parameters the generator cannot honour."""
        if self.frames < 1 or self.size < 3:
            raise ValueError("need frames >= 1 and size >= 3")
        lo, hi = self.targets
        if not 2 <= lo <= hi <= 8:
            raise ValueError(f"--targets must lie within 2..8, got {lo}-{hi}")
        b_lo, b_hi = self.brightness
        if not 0 < b_lo <= b_hi:
            raise ValueError(f"--brightness must be 0 < lo <= hi, got {b_lo},{b_hi}")
        if self.psf_sigma <= 0 or self.step < 0 or self.spacing <= 0 or self.drift < 0 or self.noise < 0:
            raise ValueError("--psf-sigma and --spacing must be > 0; --step, --drift, --noise >= 0")
        if not feasible_x0(self).size:
            raise ValueError(
                "no start x0 keeps the targets inside the patch; reduce --margin/--spacing/--drift/--step/--frames"
            )


@dataclass(frozen=True)
class Curve:
    """The reference point's path y = f(x); ``coeffs`` as in the module docstring.

    line: (x0, y0, m); quadratic: (x0, y0, m, a); circle: (cx, cy, radius, sign).
    """

    kind: str
    coeffs: tuple[float, ...]

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "line":
            x0, y0, m = self.coeffs
            return y0 + m * (x - x0)
        if self.kind == "quadratic":
            x0, y0, m, a = self.coeffs
            dx = x - x0
            return y0 + m * dx + a * dx * dx
        if self.kind == "circle":
            cx, cy, r, sign = self.coeffs
            with np.errstate(invalid="ignore"):
                return cy + sign * np.sqrt(r * r - (x - cx) ** 2)  # NaN off the circle
        raise ValueError(f"unknown curve kind {self.kind!r}")


@dataclass
class Trajectory:
    """One simulated trajectory with everything that produced it (tests check the rules)."""

    curve: Curve
    x0: int
    heading: int  # +1 or -1: sign of the reference's x motion
    reference: np.ndarray  # (T, 2) rows (x, y)
    direction_names: list[str]
    directions: np.ndarray  # (K, 2) unit vectors (dx, dy)
    distances: np.ndarray  # (T, K) target-reference distances
    brightness: np.ndarray  # (K,)
    targets: np.ndarray = field(init=False)  # (T, K, 3) rows (x, y, brightness)

    def __post_init__(self) -> None:
        pos = self.reference[:, None, :] + self.distances[:, :, None] * self.directions[None, :, :]
        bright = np.broadcast_to(self.brightness[None, :, None], pos.shape[:2] + (1,))
        self.targets = np.concatenate([pos, bright], axis=2)


# --------------------------------------------------------------------------------------------
# the rules


def feasible_x0(params: SimParams) -> np.ndarray:
    """Integers in 1..size-2 whose whole x path stays inside the allowed band."""
    lo, hi = params.band
    x0 = np.arange(1, params.size - 1)
    heading = np.where(x0 < (params.size - 1) / 2, 1.0, -1.0)
    end = x0 + heading * params.step * (params.frames - 1)
    ok = (np.minimum(x0, end) >= lo) & (np.maximum(x0, end) <= hi)
    return x0[ok]


def _draw_curve(rng: np.random.Generator, kind: str, x0: float, y0: float) -> Curve:
    """Random curve of the given kind through (x0, y0), parameters as in the module docstring."""
    if kind in ("line", "quadratic"):
        m = float(np.tan(rng.uniform(-LINE_MAX_ANGLE, LINE_MAX_ANGLE)))
        if kind == "line":
            return Curve("line", (x0, y0, m))
        a = float(rng.uniform(*QUAD_CURVATURE) * rng.choice((-1.0, 1.0)))
        return Curve("quadratic", (x0, y0, m, a))
    r = float(rng.uniform(*CIRCLE_RADIUS))
    # phi in [30, 150] or [210, 330] degrees: |sin phi| >= 0.5
    half = float(np.arcsin(CIRCLE_MIN_SIN))
    phi = float(rng.uniform(half, np.pi - half) + np.pi * rng.integers(2))
    cx, cy = x0 - r * np.cos(phi), y0 - r * np.sin(phi)
    return Curve("circle", (float(cx), float(cy), r, float(np.sign(np.sin(phi)))))


def _path_ok(xs: np.ndarray, ys: np.ndarray, band: tuple[float, float]) -> bool:
    """Reference path on the curve's domain, inside the band, no steeper than MAX_SLOPE."""
    if not np.all(np.isfinite(ys)):
        return False
    if ys.min() < band[0] or ys.max() > band[1]:
        return False
    if len(xs) > 1 and np.any(np.abs(np.diff(ys)) > MAX_SLOPE * np.abs(np.diff(xs)) + 1e-12):
        return False
    return True


def sample_trajectory(rng: np.random.Generator, params: SimParams = SimParams()) -> Trajectory:
    """Draw one trajectory's geometry and brightness by the SeqCSIST rules (no image)."""
    T = params.frames
    k = int(rng.integers(params.targets[0], params.targets[1] + 1))
    x0 = int(rng.choice(feasible_x0(params)))
    kind = CURVE_KINDS[int(rng.integers(len(CURVE_KINDS)))]
    heading = 1 if x0 < (params.size - 1) / 2 else -1
    xs = x0 + heading * params.step * np.arange(T, dtype=np.float64)
    band = params.band
    for _ in range(MAX_ATTEMPTS):
        y0 = float(rng.uniform(*band))
        curve = _draw_curve(rng, kind, float(x0), y0)
        ys = curve(xs)
        if _path_ok(xs, ys, band):
            break
    else:
        raise RuntimeError(f"no {kind} curve from x0={x0} stays inside the patch after {MAX_ATTEMPTS} draws")

    choices = AXIS_DIRECTIONS if k <= len(AXIS_DIRECTIONS) else COMPASS_DIRECTIONS
    picked = rng.choice(len(choices), size=k, replace=False)
    names = [choices[i][0] for i in picked]
    directions = np.array([choices[i][1] for i in picked], dtype=np.float64)
    # U(0, drift]: 1 - random() lies in (0, 1]
    steps = params.drift * (1.0 - rng.random((T - 1, k)))
    distances = params.spacing + np.concatenate([np.zeros((1, k)), np.cumsum(steps, axis=0)])
    brightness = rng.uniform(params.brightness[0], params.brightness[1], size=k)
    return Trajectory(
        curve=curve,
        x0=x0,
        heading=heading,
        reference=np.stack([xs, ys], axis=1),
        direction_names=names,
        directions=directions,
        distances=distances,
        brightness=brightness,
    )


def frames_of(targets: np.ndarray, params: SimParams = SimParams()) -> np.ndarray:
    """Noise-free float64 images (T, size, size) of targets (T, K, 3), one forward model each."""
    return np.stack([physics.pixel_response(t, params.size, params.psf_sigma) for t in targets])


def simulate_trajectory(rng: np.random.Generator, params: SimParams = SimParams()) -> tuple[np.ndarray, np.ndarray]:
    """One trajectory: noise-free float images (T, size, size) and targets (T, K, 3) (x, y, a)."""
    traj = sample_trajectory(rng, params)
    return frames_of(traj.targets, params), traj.targets


def render(frames_float: np.ndarray, noise: float, rng: np.random.Generator, float_out: bool) -> np.ndarray:
    """Sensor output: add Gaussian noise (sigma ``noise``), then 8-bit quantise or keep float32."""
    img = np.asarray(frames_float, dtype=np.float64)
    if noise > 0:
        img = img + rng.normal(0.0, noise, size=img.shape)
    return img.astype(np.float32) if float_out else physics.quantize(img)


# --------------------------------------------------------------------------------------------
# command line


def _int_range(text: str) -> tuple[int, int]:
    parts = text.replace(" ", "").split("-")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}")
    return lo, hi


def _float_list(n: int):
    def parse(text: str) -> tuple[float, ...]:
        try:
            vals = tuple(float(v) for v in text.split(","))
        except ValueError:
            vals = ()
        if len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
        return vals

    return parse


def _float_range(text: str) -> tuple[float, float]:
    """``X`` or ``LO,HI``; the protocol takes one value where the field scenario takes a range."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected X or LO,HI, got {text!r}")
    if vals[0] > vals[-1]:
        raise argparse.ArgumentTypeError(f"LO must be <= HI, got {text!r}")
    return vals[0], vals[-1]


SCENARIOS = ("seqcsist", "field")


def build_parser() -> argparse.ArgumentParser:
    from training import field

    p = argparse.ArgumentParser(
        prog="csist simulate",
        description="Simulate trajectories and write them in the published SeqCSIST on-disk format: "
        "DIR/<split>/image/image_<n>.png and DIR/<split>/annotation/COS<n>.xml, 20 consecutive "
        "frames per trajectory, plus DIR/meta.json. --scenario seqcsist (default) follows the "
        "paper's protocol (section III); --scenario field draws backgrounds, brightness, PSF, "
        "noise, bit depth and group geometry from wide ranges, per trajectory, and also writes "
        "DIR/<split>/conditions.jsonl. Flags without a shown default take the scenario's default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = SimParams()
    f = field.FieldParams()
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="seqcsist",
        help="seqcsist: the paper's protocol; field: field conditions (docs/field-simulator.md)",
    )
    p.add_argument("--trajectories", type=int, default=5000, help="number of trajectories")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> byte-identical files)")
    p.add_argument(
        "--split",
        type=_float_list(3),
        default=(0.7, 0.15, 0.15),
        help="train,val,test fractions; trajectories are split in order",
    )
    p.add_argument(
        "--noise",
        type=_float_range,
        default=argparse.SUPPRESS,
        help=f"additive Gaussian noise sigma, grey levels (seqcsist: one value, default {d.noise:g}; the paper's 0, "
        f"2, 3, 4, 5; field: X or LO,HI per trajectory, default {f.noise[0]:g},{f.noise[1]:g})",
    )
    p.add_argument(
        "--targets",
        type=_int_range,
        default=argparse.SUPPRESS,
        help=f"targets per trajectory, N or LO-HI (uniform) (seqcsist: within 2-8, default "
        f"{d.targets[0]}-{d.targets[1]}, >4 uses diagonal directions too; field: within 1-8, default "
        f"{f.targets[0]}-{f.targets[1]})",
    )
    p.add_argument(
        "--float",
        dest="float_out",
        action="store_true",
        default=argparse.SUPPRESS,
        help="write float32 images without quantisation to <split>/images.npy instead of PNGs",
    )
    p.add_argument("--frames", type=int, default=argparse.SUPPRESS, help=f"frames per trajectory (default {d.frames})")
    p.add_argument("--size", type=int, default=argparse.SUPPRESS, help=f"patch side, pixels (default {d.size})")
    p.add_argument(
        "--psf-sigma",
        type=_float_range,
        default=argparse.SUPPRESS,
        help=f"Gaussian PSF sigma, pixels (seqcsist: one value, default {d.psf_sigma:g}; field: X or LO,HI per "
        f"trajectory, default {f.psf_sigma[0]:g},{f.psf_sigma[1]:g})",
    )
    p.add_argument(
        "--brightness",
        type=_float_range,
        default=argparse.SUPPRESS,
        help=f"target brightness (integrated flux) range LO,HI, uniform (seqcsist default "
        f"{d.brightness[0]:g},{d.brightness[1]:g}; field: replaces --snr)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=argparse.SUPPRESS,
        help=f"minimum distance of every target from the patch's outer edge, pixels (default {d.margin:g})",
    )
    proto = p.add_argument_group("SeqCSIST protocol only (--scenario seqcsist)")
    proto.add_argument(
        "--step",
        type=float,
        default=argparse.SUPPRESS,
        help=f"reference motion along x per frame, pixels (default {d.step:g})",
    )
    proto.add_argument(
        "--spacing",
        type=float,
        default=argparse.SUPPRESS,
        help=f"initial target-reference distance, pixels (default {d.spacing:g})",
    )
    proto.add_argument(
        "--drift",
        type=float,
        default=argparse.SUPPRESS,
        help=f"max extra outward motion of each target per frame, pixels (drawn from U(0, drift]) (default "
        f"{d.drift:g})",
    )
    field.add_arguments(p)
    p.add_argument(
        "--preview", type=Path, default=None, help="also draw a PNG grid of a few trajectories with their true targets"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing splits and meta.json in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def params_from_args(args: argparse.Namespace) -> SimParams:
    """SimParams from a parsed namespace; flags not given keep the protocol's defaults."""
    from training import field

    d = SimParams()
    given = vars(args)
    used = [flag for dest, (flag, _, _) in field.FIELD_FLAGS.items() if dest in given]
    if used:
        raise ValueError(f"{', '.join(used)} {'applies' if len(used) == 1 else 'apply'} to --scenario field only")
    for dest, flag in (("noise", "--noise"), ("psf_sigma", "--psf-sigma")):
        if dest in given and given[dest][0] != given[dest][1]:
            raise ValueError(f"{flag} takes one value in the seqcsist scenario (a range needs --scenario field)")
    return SimParams(
        frames=given.get("frames", d.frames),
        size=given.get("size", d.size),
        psf_sigma=float(given["psf_sigma"][0]) if "psf_sigma" in given else d.psf_sigma,
        step=given.get("step", d.step),
        spacing=given.get("spacing", d.spacing),
        drift=given.get("drift", d.drift),
        brightness=tuple(float(v) for v in given.get("brightness", d.brightness)),
        targets=tuple(int(v) for v in given.get("targets", d.targets)),
        margin=given.get("margin", d.margin),
        noise=float(given["noise"][0]) if "noise" in given else d.noise,
        float_out=given.get("float_out", d.float_out),
    )


def meta_dict(params: SimParams, seed: int, fractions, counts: list[int]) -> dict:
    """Contents of meta.json: everything needed to regenerate the data set, and its layout."""
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    return {
        "format": "seqcsist",
        "format_version": FORMAT_VERSION,
        "generator": "csist simulate",
        "seed": seed,
        "trajectories": int(sum(counts)),
        "frames_per_trajectory": params.frames,
        "image_format": "npy-float32" if params.float_out else "png-uint8",
        "params": asdict(params),
        "split_fractions": list(fractions),
        "splits": {
            name: {"trajectories": int(c), "frames": int(c) * params.frames, "first_trajectory": int(f)}
            for name, c, f in zip(SPLITS, counts, first)
        },
        "curves": {
            "kinds": list(CURVE_KINDS),
            "line_max_angle_deg": 60.0,
            "quadratic_curvature": list(QUAD_CURVATURE),
            "circle_radius": list(CIRCLE_RADIUS),
            "circle_min_sin": CIRCLE_MIN_SIN,
            "max_slope": MAX_SLOPE,
        },
        "coordinates": "annotation xc = row (y), yc = column (x); pixel centres at integers",
    }


def generate(
    out: Path,
    n: int,
    seed: int,
    params: SimParams,
    fractions=(0.7, 0.15, 0.15),
    progress: bool = True,
    preview: Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Simulate ``n`` trajectories into ``out``; returns the meta.json contents."""
    params.validate()
    counts = split_counts(n, fractions)
    out = Path(out)
    _prepare_out(out, overwrite)
    rngs = trajectory_rngs(seed, n)

    def trajectory(i: int) -> Written:
        frames, targets = simulate_trajectory(rngs[i], params)
        return Written(render(frames, params.noise, rngs[i], params.float_out), targets, params.psf_sigma)

    kept = write_splits(
        out,
        counts,
        params.frames,
        params.float_out,
        trajectory,
        data.write_png,
        progress=progress,
        keep=4 if preview is not None else 0,
    )
    meta = meta_dict(params, seed, fractions, counts)
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if preview is not None:
        write_preview(preview, [(w.images, w.targets) for w in kept])
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.scenario == "field":
            from training import field

            params = field.params_from_args(args)
            run = field.generate
        else:
            params = params_from_args(args)
            run = generate
        params.validate()
        if args.trajectories < 1:
            raise ValueError("--trajectories must be >= 1")
        meta = run(
            args.out,
            args.trajectories,
            args.seed,
            params,
            args.split,
            progress=not args.quiet,
            preview=args.preview,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"csist simulate: error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v['trajectories']}" for k, v in meta["splits"].items())
    print(f"wrote {meta['trajectories']} trajectories to {args.out} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
