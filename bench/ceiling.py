"""``csist bench ceiling``: what the frames of each field condition allow any estimator.

For every window of a ``csist bench field`` condition (the same simulated trajectories, by the
same seeds) the Cramer-Rao bound on its targets' positions is computed at the truth
(:func:`service.science.refine.position_bound`: the Fisher information of the fit's own model
of the window, with the true PSF sigma and the brightness calibration the benchmark gives the
fit, without any pull toward start positions; for Airy and Moffat optics, of a Gaussian PSF of
their core, so their ceiling is too high). An estimator that knew the count and were unbiased and efficient
would place each target with errors drawn from that bound; the CSO-mAP of such draws (scored
by the true brightness) is the condition's ceiling for unbiased estimators. A biased one can
pass it: the fit's pull toward the network's answer carries what the network learned of
group shapes (the SeqCSIST cross and ring) into the fit, which helps where the data alone do
not place the targets, and only where groups look like the training's. Where targets are
packed closer than the frames can separate, the bound is singular and an unbiased estimator
places them nowhere near.

    csist bench ceiling --trajectories 100 --field bench/results/field.json \\
        --out bench/results/ceiling.json --markdown bench/results/ceiling.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.common import md_table, write_outputs
from bench.field import CONDITIONS, SEED_BASE, add_report_arguments, draw

DRAW_SEED = 7_390_000  # the efficient estimator's errors
RESOLVED_PX = 0.05  # the metric's finest threshold


def window_velocity(truth_frames: list[np.ndarray], times: np.ndarray) -> np.ndarray:
    """The group's velocity (px/frame) over a window: the least-squares slope of its targets'
    mean position against the frames' times (about the middle one)."""
    centres = np.array([np.asarray(t)[:, :2].mean(axis=0) for t in truth_frames])  # (F, 2)
    return (times @ (centres - centres.mean(axis=0))) / float(times @ times)


def condition_bounds(frames: np.ndarray, targets: list, sigmas: np.ndarray) -> tuple[list, list]:
    """Every window's middle-frame truth (K, 3) and position bound (K, 3) rows (sigma_x,
    sigma_y, rho), trajectory-major as ``training.evaluate.middle_truth``, for trajectories of
    ``frames`` (n, T, H, W), ``targets`` [trajectory][frame] (K, 3) and PSF ``sigmas`` (n,)."""
    from dataclasses import replace

    from service.science.refine import position_bound
    from training.data import WINDOW, window_middles
    from training.evaluate import fit_config

    calibrated = fit_config(frames)
    half = WINDOW // 2
    times = np.arange(WINDOW, dtype=np.float64) - half
    truths, bounds = [], []
    for t in range(len(frames)):
        config = replace(calibrated, psf_sigma=float(sigmas[t]))
        for mid in window_middles(frames.shape[1], WINDOW):
            span = range(mid - half, mid + half + 1)
            truth = np.asarray(targets[t][mid], dtype=np.float64)
            velocity = window_velocity([targets[t][f] for f in span], times)
            truths.append(truth)
            bounds.append(position_bound(frames[t, span.start : span.stop], truth, velocity, config, times))
    return truths, bounds


def efficient_draws(truths: list[np.ndarray], bounds: list[np.ndarray], rng: np.random.Generator) -> list:
    """Detections (K, 3) of an unbiased efficient estimator that knows the count: each target's
    position drawn from its bound's Gaussian, scored by its true brightness."""
    out = []
    for truth, bound in zip(truths, bounds, strict=True):
        sx, sy, rho = bound.T
        zx, zy = rng.standard_normal(len(truth)), rng.standard_normal(len(truth))
        d = truth.copy()
        d[:, 0] += sx * zx
        d[:, 1] += sy * (rho * zx + np.sqrt(1.0 - rho**2) * zy)
        out.append(d)
    return out


def run(args) -> dict:
    from tqdm import tqdm

    from training.metric import cso_map

    field = json.loads(args.field.read_text()) if args.field else None
    measured = {r["condition"]: r for r in field["rows"]} if field else {}
    other = sorted({r.get("trajectories") for r in measured.values()} - {args.trajectories}, key=str)
    if other:
        # the same seeds with another count are other windows: their scores are no neighbours
        raise SystemExit(
            f"csist bench ceiling: --field {args.field} scored {other} trajectories per condition, "
            f"not --trajectories {args.trajectories}"
        )
    rows = []
    for name in tqdm(args.conditions or list(CONDITIONS), desc="conditions", unit="cond"):
        kind, changes = CONDITIONS[name]
        frames, targets, sigmas = draw(kind, changes, args.trajectories, SEED_BASE + list(CONDITIONS).index(name))
        t0 = time.perf_counter()
        truths, bounds = condition_bounds(frames, targets, sigmas)
        rng = np.random.default_rng(DRAW_SEED + list(CONDITIONS).index(name))
        # each target's radial bound, and how many targets its window has
        radial = np.concatenate([np.hypot(b[:, 0], b[:, 1]) for b in bounds])
        counts = np.concatenate([np.full(len(t), len(t)) for t in truths])
        by_count = {
            str(int(k)): {"targets": int((counts == k).sum()), "median_bound_px": float(np.median(radial[counts == k]))}
            for k in np.unique(counts)
        }
        row = {
            "condition": name,
            "trajectories": args.trajectories,
            "windows": len(truths),
            "ceiling_mAP": cso_map(efficient_draws(truths, bounds, rng), truths)["mAP"],
            "median_bound_px": float(np.median(radial)),
            "resolved_share": float(np.mean(radial <= RESOLVED_PX)),
            "by_count": by_count,
            "ms_per_window": 1000 * (time.perf_counter() - t0) / max(len(truths), 1),
        }
        if name in measured:
            row["network_mAP"] = measured[name]["none"]["mAP"]
            row["fit_mAP"] = measured[name]["fit"]["mAP"]
        rows.append(row)
    return {"field_report": str(args.field) if args.field else None, "draw_seed": DRAW_SEED, "rows": rows}


def markdown(report: dict) -> str:
    measured = any("fit_mAP" in r for r in report["rows"])
    head = ["condition", "ceiling CSO-mAP", "median bound px", f"bound <= {RESOLVED_PX:g} px, % of targets"]
    if measured:
        head += ["CSO-mAP network", "CSO-mAP network + fit"]
    rows = []
    for r in report["rows"]:
        bound = r["median_bound_px"]
        row = [
            r["condition"],
            f"{r['ceiling_mAP']:.1f}",
            f"{bound:.3f}" if bound < 10 else "unbounded",
            f"{100 * r['resolved_share']:.0f}",
        ]
        if measured:
            row += [f"{r['network_mAP']:.1f}", f"{r['fit_mAP']:.1f}"] if "fit_mAP" in r else ["", ""]
        rows.append(row)
    text = (
        f"{report['rows'][0]['trajectories']} trajectories per condition; the bound is the radial "
        "Cramer-Rao bound (sqrt(sigma_x^2 + sigma_y^2)) of each target.\n\n"
    )
    return text + md_table(head, rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trajectories", type=int, default=100, help="trajectories per condition")
    p.add_argument(
        "--field",
        type=Path,
        default=None,
        help="a csist bench field JSON report (same --trajectories) whose scores to put beside the ceilings",
    )
    add_report_arguments(p)


def main(args) -> int:
    if args.trajectories < 1:
        raise SystemExit("csist bench ceiling: --trajectories must be >= 1")
    if args.field is not None and not args.field.is_file():
        raise SystemExit(f"csist bench ceiling: --field {args.field} is not a file")
    report = run(args)
    text = markdown(report)
    write_outputs(report, args.out, text, args.markdown)
    print(text)
    return 0
