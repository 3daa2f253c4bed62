"""Study of ``refine="fit"`` (service.science.refine) on simulated SeqCSIST-protocol windows.

    python scripts/refine_study.py --windows 300 --noise 0,2,5 --starts cell,degraded,oracle

For each noise level it simulates ``--windows`` trajectories by the SeqCSIST protocol
(training.simulate, 8-bit output), takes one full 5-frame window from each (middle frame drawn
uniformly from frames 3..18, 1-based) and scores, with CSO-mAP and count accuracy on the
middle frames, the starting peaks and the fit started from them. Starting peaks (what a
network would give):

- ``cell``: every true target snapped to its HR cell centre, true brightness: the perfect
  cell-centre answer (CSO-mAP ~ 50, the grid's ceiling).
- ``degraded``: ``cell`` with one peak dropped in ``--drop`` of the windows, one spurious peak
  two HR cells (2/3 px) from a random target added in ``--add`` of them, and every brightness
  scaled by U(1 - j, 1 + j), j = ``--jitter``: exercises the count selection and the fallback.
- ``oracle``: ``service.science.peaks.extract_peaks`` (refine "none") on the true HR map: what a perfect
  network plus our peak extraction gives; targets in adjacent HR cells merge into one peak.
- ``offcell``: ``cell`` with each peak moved to one of its 8 neighbouring HR cells with
  probability ``--offcell``: a network that misplaces some peaks by a cell.
- ``truth``: the true targets themselves: the fit's ceiling when its anchors are exact (no
  network on the 1/3-px grid can give them; the gap to ``cell`` is what the grid costs).

``--targets 2-8`` draws 2-8 targets per window by the protocol's rule for more than 4 (the
eight compass directions), the accuracy benchmark's hardest row.

The geometry is the same at every noise level (trajectory i uses the same seed); the noise
differs. A window's time is the best wall-clock time of ``--repeats`` runs (so that other
processes on a shared machine do not inflate it; run with OMP_NUM_THREADS=1); ``nfev`` is the
mean number of model evaluations per window, a load-independent measure of the work.
Benchmarks that report results should use seeds never used in development (this one's
default, 20261121, and 99 were used).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields, replace

import numpy as np

from service.science import physics
from service.science.peaks import extract_peaks
from service.science.refine import SOLVERS, FitConfig, fit_window
from training.metric import count_accuracy, cso_map
from training.simulate import SimParams, render, simulate_trajectory, trajectory_rngs

STARTS = ("cell", "degraded", "oracle", "offcell", "truth")
WINDOW = 5


def simulate_windows(n: int, noise: float, seed: int, params: SimParams = SimParams()):
    """``n`` 8-bit windows (n, 5, size, size) as float64 and the middle frames' true targets."""
    pick = np.random.default_rng([seed, 7])  # middle frames, independent of the noise level
    half = WINDOW // 2
    mids = pick.integers(half, params.frames - half, size=n)
    windows, truth = [], []
    for rng, m in zip(trajectory_rngs(seed, n), mids):
        frames, targets = simulate_trajectory(rng, params)
        images = render(frames, noise, rng, float_out=False)
        windows.append(images[m - half : m + half + 1].astype(np.float64))
        truth.append(targets[m])
    return np.stack(windows), truth


def cell_start(truth: np.ndarray) -> np.ndarray:
    """Every target snapped to the centre of its HR cell, true brightness."""
    out = np.array(truth, dtype=np.float64)
    out[:, :2] = physics.hr_to_lr(physics.lr_to_hr_index(out[:, :2]))
    return out


def degraded_start(truth: np.ndarray, rng: np.random.Generator, drop: float, add: float, jitter: float) -> np.ndarray:
    """Cell-centre start with a dropped peak, a spurious peak and brightness jitter (see docstring)."""
    out = cell_start(truth)
    u = rng.random()
    if u < drop and len(out) > 1:
        out = np.delete(out, rng.integers(len(out)), axis=0)
    elif u < drop + add:
        src = out[rng.integers(len(out))]
        angle = rng.integers(8) * np.pi / 4
        step = 2.0 / physics.RATIO
        extra = [src[0] + step * np.cos(angle), src[1] + step * np.sin(angle), src[2] * rng.uniform(0.5, 1.0)]
        out = np.vstack([out, extra])
    out[:, 2] *= rng.uniform(1 - jitter, 1 + jitter, size=len(out))
    return out[np.argsort(-out[:, 2], kind="stable")]


def offcell_start(truth: np.ndarray, rng: np.random.Generator, share: float) -> np.ndarray:
    """Cell-centre start with some peaks one HR cell off (see the module docstring)."""
    out = cell_start(truth)
    moved = rng.random(len(out)) < share
    steps = np.array([(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy], dtype=np.float64)
    out[moved, :2] += steps[rng.integers(len(steps), size=int(moved.sum()))] / physics.RATIO
    return out


def oracle_start(truth: np.ndarray) -> np.ndarray:
    """Peaks of the true HR map, as a perfect network's output would give them."""
    return extract_peaks(physics.hr_map(truth), refine="none")


def make_starts(kind: str, truth: list, seed: int, args) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, 11])
    if kind == "cell":
        return [cell_start(t) for t in truth]
    if kind == "degraded":
        return [degraded_start(t, rng, args.drop, args.add, args.jitter) for t in truth]
    if kind == "oracle":
        return [oracle_start(t) for t in truth]
    if kind == "offcell":
        return [offcell_start(t, rng, args.offcell) for t in truth]
    if kind == "truth":
        return [np.array(t, dtype=np.float64) for t in truth]
    raise ValueError(f"unknown start {kind!r}")


def run(windows: np.ndarray, starts: list, config: FitConfig, repeats: int = 3):
    """Fit every window; returns refined targets, accepted flags, seconds and nfev per window.

    A window's time is the best of ``repeats`` runs (the fit is deterministic), so that other
    processes on a shared machine do not inflate it.
    """
    out, accepted, seconds, nfev = [], [], [], []
    for w, p in zip(windows, starts):
        best = np.inf
        for _ in range(max(repeats, 1)):
            t0 = time.perf_counter()
            r = fit_window(w, p, config)
            best = min(best, time.perf_counter() - t0)
        seconds.append(best)
        out.append(r.targets)
        accepted.append(r.accepted)
        nfev.append(r.nfev)
    return out, np.array(accepted), np.array(seconds), np.array(nfev)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _count_range(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}") from None
    if not 2 <= bounds[0] <= bounds[1] <= 8:
        raise argparse.ArgumentTypeError(f"--targets must lie within 2..8, got {text!r}")
    return bounds


def _starts(text: str) -> list[str]:
    kinds = [v.strip() for v in text.split(",") if v.strip()]
    bad = [k for k in kinds if k not in STARTS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"starts must be among {STARTS}, got {text!r}")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    d = FitConfig()
    p = argparse.ArgumentParser(
        prog="refine_study",
        description="CSO-mAP of the multi-frame physics fit (refine='fit') against its starting peaks "
        "on simulated SeqCSIST-protocol 8-bit windows.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--windows", type=int, default=300, help="windows (one per simulated trajectory) per noise level")
    p.add_argument(
        "--seed", type=int, default=20261121, help="simulation seed (development seed; benchmarks use others)"
    )
    p.add_argument("--noise", type=_floats, default="0,2,5", help="comma-separated noise sigmas, grey levels")
    p.add_argument("--targets", type=_count_range, default="2-4", help="targets per window, N or LO-HI (protocol: 2-8)")
    p.add_argument(
        "--starts",
        type=_starts,
        default="cell,degraded,oracle",
        help=f"comma-separated starting peaks among {','.join(STARTS)}",
    )
    p.add_argument("--drop", type=float, default=0.2, help="degraded start: share of windows missing one peak")
    p.add_argument("--add", type=float, default=0.2, help="degraded start: share of windows with one spurious peak")
    p.add_argument("--offcell", type=float, default=0.3, help="offcell start: share of peaks one HR cell off")
    p.add_argument("--jitter", type=float, default=0.15, help="degraded start: relative brightness jitter")
    p.add_argument("--prior-px", type=float, default=d.prior_px, help="FitConfig.prior_px (<= 0: no prior)")
    p.add_argument("--max-shift-px", type=float, default=d.max_shift_px, help="FitConfig.max_shift_px")
    p.add_argument(
        "--brightness-range",
        type=_floats,
        default=",".join(f"{v:g}" for v in d.brightness_range),
        help="FitConfig.brightness_range LO,HI",
    )
    p.add_argument(
        "--brightness-prior",
        type=float,
        default=d.brightness_prior,
        help="FitConfig.brightness_prior, grey levels (<= 0 or unset: flat)",
    )
    p.add_argument("--max-nfev", type=int, default=d.max_nfev, help="FitConfig.max_nfev")
    p.add_argument("--tol", type=float, default=d.tol, help="FitConfig.tol")
    p.add_argument("--solver", default=d.solver, choices=SOLVERS, help="FitConfig.solver")
    p.add_argument("--criterion", default=d.criterion, choices=("bic", "aic"), help="FitConfig.criterion")
    p.add_argument("--model-error", type=float, default=d.model_error, help="FitConfig.model_error, grey levels")
    p.add_argument("--fixed-count", action="store_true", help="FitConfig.try_counts=False: keep the start's count")
    p.add_argument("--repeats", type=int, default=3, help="time each window as the best of this many runs")
    p.add_argument(
        "--known-noise", action="store_true", help="give the fit the true noise sigma instead of estimating it"
    )
    return p


def config_from_args(args) -> FitConfig:
    return FitConfig(
        prior_px=args.prior_px if args.prior_px and args.prior_px > 0 else None,
        max_shift_px=args.max_shift_px,
        brightness_range=tuple(args.brightness_range),
        brightness_prior=args.brightness_prior if args.brightness_prior and args.brightness_prior > 0 else None,
        max_nfev=args.max_nfev,
        tol=args.tol,
        criterion=args.criterion,
        solver=args.solver,
        model_error=args.model_error,
        try_counts=not args.fixed_count,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.windows < 1:
        print("refine_study: error: --windows must be >= 1", file=sys.stderr)
        return 2
    try:
        base = config_from_args(args)
    except (TypeError, ValueError) as exc:
        print(f"refine_study: error: {exc}", file=sys.stderr)
        return 2
    changed = [
        f"{f.name}={getattr(base, f.name)}"
        for f in fields(base)
        if getattr(base, f.name) != getattr(FitConfig(), f.name)
    ]
    print(
        f"seed {args.seed}, {args.windows} windows per noise level, {args.targets[0]}-{args.targets[1]} targets, "
        f"FitConfig: {', '.join(changed) or 'defaults'}"
    )
    header = (
        f"{'noise':>5} {'start':>9} | {'mAP start':>9} {'mAP fit':>8} | {'count start':>11} {'count fit':>9} | "
        f"{'accepted':>8} | {'ms mean':>7} {'ms p95':>7} {'nfev':>5}"
    )
    print(header)
    print("-" * len(header))
    for noise in args.noise:
        windows, truth = simulate_windows(args.windows, noise, args.seed, SimParams(targets=args.targets))
        config = replace(base, noise=noise) if args.known_noise else base
        for kind in args.starts:
            starts = make_starts(kind, truth, args.seed, args)
            fitted, accepted, seconds, nfev = run(windows, starts, config, args.repeats)
            m0, m1 = cso_map(starts, truth)["mAP"], cso_map(fitted, truth)["mAP"]
            c0, c1 = 100 * count_accuracy(starts, truth), 100 * count_accuracy(fitted, truth)
            print(
                f"{noise:>5g} {kind:>9} | {m0:>9.2f} {m1:>8.2f} | {c0:>10.1f}% {c1:>8.1f}% | "
                f"{100 * accepted.mean():>7.1f}% | {1e3 * seconds.mean():>7.2f} "
                f"{1e3 * np.percentile(seconds, 95):>7.2f} {nfev.mean():>5.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
