"""``csist bench field``: CSO-mAP by field condition, the network alone and with the fit.

Each condition is SeqCSIST-style data with one thing changed (or the field scenario's mixed
draw), simulated in memory by the project's simulators (``training.simulate``,
``training.field``) on seeds kept for this benchmark, run through the service's streaming path
(the execution plan ``auto`` chooses) and scored with the service's post-processing at its
defaults (peak threshold 5 x each window's flux noise, the card's peak rule, the fit's default
calibration for the clip level of the frames' bit depth, ``training.evaluate.sensor_saturation``:
255 for 8-bit frames): refine ``none`` (the network's cells) and ``fit``. Each is also scored
turned at random about the true group's centre (:func:`rotated`): the share of its score that
chance earns in packed groups.

    csist bench field --model models/derefnet --trajectories 100 \\
        --out bench/results/field.json --markdown bench/results/field.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from bench.common import md_table, write_outputs
from service.science.postprocess import DEFAULT_SNR

REPO = Path(__file__).resolve().parents[1]
SEED_BASE = 7_310_000  # this benchmark's seeds: never used for training or development data
CHANCE_SEED = 7_380_000  # the rotations of the chance column

# One-thing-changed conditions keep the protocol's cross-shaped groups of 2-4 targets of
# brightness 220-250, PSF sigma 0.5, no noise, no background, unless the condition changes it.
PROTOCOL_LIKE = {
    "geometry": ("cross",),
    "targets": (2, 4),
    "brightness": (220.0, 250.0),
    "psf_sigma": (0.5, 0.5),
    "noise": (0.0, 0.0),
    "background": ("flat",),
    "pedestal": (0.0, 0.0),
    "bad_pixels": (0, 0),
    "velocity": (0.0, 0.05),
}
CONDITIONS: dict[str, tuple[str, dict]] = {
    "protocol, clean": ("seqcsist", {}),
    "protocol, noise sigma 2": ("seqcsist", {"noise": 2.0}),
    "flat background +30": ("field", {"pedestal": (30.0, 30.0)}),
    "background ramp 10..60": ("field", {"background": ("ramp",), "ramp": (10.0, 60.0)}),
    "clutter, std <= 25": ("field", {"background": ("clutter",), "clutter_std": (2.0, 25.0), "pedestal": (20.0, 60.0)}),
    "brightness 60-250": ("field", {"brightness": (60.0, 250.0)}),
    "brightness 60-120, noise 2": ("field", {"brightness": (60.0, 120.0), "noise": (2.0, 2.0)}),
    "PSF sigma 0.6": ("field", {"psf_sigma": (0.6, 0.6)}),
    "random geometry": ("field", {"geometry": ("random",), "group_radius": (0.9, 0.9), "velocity": (0.0, 0.1)}),
    "2-8 targets": ("seqcsist", {"targets": (2, 8)}),
    "field mix (all nuisances)": ("field-mix", {}),
    # appended, so that the rows above keep their seeds: optics defocused past the training's
    # 0.4-0.7, the calibration left at 0.5
    "PSF sigma 1.0": ("field", {"psf_sigma": (1.0, 1.0)}),
    # a bright sky or ground under clutter: targets on it clip at the 8-bit top, and the
    # clutter's spread is far above the noise
    "clutter on pedestal 120-180": (
        "field",
        {"background": ("clutter",), "clutter_std": (2.0, 25.0), "pedestal": (120.0, 180.0)},
    ),
    "edge across the patch, step 10-80": ("field", {"background": ("edge",), "pedestal": (0.0, 150.0)}),
    # real optics are not Gaussian (the fit's PSF is): the same core, with an Airy pattern's rings
    # or a Moffat's power-law wings (training.field.psf_profile), the calibration left at 0.5
    "Airy optics, core sigma 0.5": ("field", {"psf_shape": ("airy",)}),
    "Moffat optics (beta 2.5-4.5), core sigma 0.5": ("field", {"psf_shape": ("moffat",)}),
    # a sensor's background is never at 0 and its noise is a few grey levels: the noise is read
    # from rounded pixels about a plane that is not a whole grey level
    "pedestal 20-150, noise 1-3": ("field", {"pedestal": (20.0, 150.0), "noise": (1.0, 3.0)}),
    # the row above read by a 12-bit sensor (every grey level 16 times the 8-bit one); the fit is
    # calibrated for the clip level of the frames' bit depth (4095), as CSIST_SATURATION sets it
    "12-bit sensor: pedestal 320-2400, noise 16-48": (
        "field",
        {"bit_depth": (12,), "brightness": (3520.0, 4000.0), "pedestal": (320.0, 2400.0), "noise": (16.0, 48.0)},
    ),
    # a tracker's patch holds groups moving faster than SeqCSIST's (<= 0.1 px/frame)
    "fast motion, 0.15-0.3 px/frame": ("field", {"velocity": (0.15, 0.3)}),
    # a real sensor's frames differ from one another beyond the motion: the platform jitters
    # the group off its track, and targets scintillate (training.field's turbulence)
    "jitter 0.1 px per frame": ("field", {"jitter": (0.1, 0.1)}),
    "scintillation 20 % per frame": ("field", {"scintillation": (0.2, 0.2)}),
    # each frame's level moves (a sensor's gain control), on a pedestal with noise, as a sensor has
    "frame level flicker 4, pedestal 40-80, noise 1-2": (
        "field",
        {"flicker": (4.0, 4.0), "pedestal": (40.0, 80.0), "noise": (1.0, 2.0)},
    ),
    # targets 3-8 times the brightness calibration's, their cores clipped: a near target
    "bright targets (flux 600-2000), 1-2 per group": (
        "field",
        {"targets": (1, 2), "brightness": (600.0, 2000.0), "pedestal": (20.0, 60.0), "noise": (1.0, 2.0)},
    ),
    # a tracker's patch holds targets well apart too, where the network may miss one
    "4 targets within 1.5 px of the centre": (
        "field",
        {"geometry": ("random",), "group_radius": (1.5, 1.5), "targets": (4, 4), "velocity": (0.0, 0.1)},
    ),
}


# argparse formats help texts with %: the names' percent signs are doubled
CONDITIONS_HELP = f"run only these conditions (default: all): {json.dumps(list(CONDITIONS))}".replace("%", "%%")


def draw(kind: str, changes: dict, n: int, seed: int) -> tuple[np.ndarray, list, np.ndarray]:
    """``n`` trajectories of one condition, in memory: frames (n, T, H, W) float32, targets
    [trajectory][frame] (K, 3) and each trajectory's PSF sigma (of the core, for non-Gaussian
    optics)."""
    from training import field, simulate

    frames, targets, sigmas = [], [], []
    if kind == "seqcsist":
        params = dataclasses.replace(simulate.SimParams(), **changes)
        for rng in simulate.trajectory_rngs(seed, n):
            f, t = simulate.simulate_trajectory(rng, params)
            frames.append(simulate.render(f, params.noise, rng, False).astype(np.float32))
            targets.append(list(t))
            sigmas.append(params.psf_sigma)
    else:
        params = field.FieldParams() if kind == "field-mix" else field.FieldParams(**{**PROTOCOL_LIKE, **changes})
        params.validate()
        for s in field.trajectory_seeds(seed, n):
            traj, noise_rng = field.sample_field_trajectory(s, params)
            frames.append(field.render(traj, noise_rng, params.size).astype(np.float32))
            targets.append(list(traj.targets))
            sigmas.append(traj.psf_sigma)
    return np.stack(frames), targets, np.array(sigmas)


def simulate(kind: str, changes: dict, n: int, seed: int):
    """A ``training.data.Split`` of ``n`` trajectories of one condition, in memory."""
    from training.data import Split

    frames, targets, _ = draw(kind, changes, n, seed)
    return Split(frames, targets, "test", Path(f"<{kind}>"))


def rotated(dets: list, truth: list, rng: np.random.Generator) -> list:
    """Each window's detections turned about its true group's centre by a random angle: the same
    count, spread and scores, nothing of where the targets sit within the group. In packed
    groups any answer of the group's size lies near some target; CSO-mAP's 0.25 px reach scores
    that, and this is the share of a score such chance earns."""
    out = []
    for d, t in zip(dets, truth, strict=True):
        d = np.array(d, dtype=np.float64).reshape(-1, 3)
        if len(d) and len(t):
            centre = np.asarray(t)[:, :2].mean(axis=0)
            a = rng.uniform(0.0, 2.0 * np.pi)
            turn = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            d[:, :2] = (d[:, :2] - centre) @ turn.T + centre
        out.append(d)
    return out


def run(args) -> dict:
    from tqdm import tqdm

    from service.modelpkg.manifest import load_package
    from training.evaluate import load_predictor, middle_truth, predict, score_maps
    from training.metric import cso_map

    card = load_package(args.model)
    mode = card.postprocess.mode
    threshold = card.postprocess.threshold if args.threshold is None else args.threshold
    snr = None if args.threshold is not None else args.threshold_snr
    predictor = load_predictor(args.model, args.threads, stream=True)
    rows = []
    names = args.conditions or list(CONDITIONS)
    for name in tqdm(names, desc="conditions", unit="cond"):
        kind, changes = CONDITIONS[name]
        # a condition's seed is its place in CONDITIONS: a subset run scores the same trajectories
        split = simulate(kind, changes, args.trajectories, SEED_BASE + list(CONDITIONS).index(name))
        t0 = time.perf_counter()
        maps, timing = predict(predictor, split)
        row = {"condition": name, "trajectories": args.trajectories, "windows": int(maps.shape[0] * maps.shape[1])}
        row["inference_ms_per_window"] = 1000 * (time.perf_counter() - t0) / row["windows"]
        truth = middle_truth(split)
        for refine in ("none", "fit"):
            report, dets = score_maps(maps, split, threshold, refine, None, mode or "cells", snr)
            rng = np.random.default_rng(CHANCE_SEED + list(CONDITIONS).index(name))
            row[refine] = {
                "mAP": report["mAP"],
                "count_accuracy": report["count_accuracy"],
                "postprocess_ms_per_window": report["postprocess_ms_per_window"],
                "rotated_mAP": cso_map(rotated(dets, truth, rng), truth)["mAP"],
            }
        rows.append(row)
    return {
        "model": str(args.model),
        "sha256": card.sha256,
        "plan": predictor.plan.name,
        "threshold": None if snr is not None else threshold,
        "threshold_snr": snr,
        "peak_mode": mode,
        "seed_base": SEED_BASE,
        "rows": rows,
    }


def markdown(report: dict) -> str:
    rows = [
        [
            r["condition"],
            f"{r['none']['mAP']:.1f}",
            f"{r['fit']['mAP']:.1f}",
            f"{r['none']['count_accuracy']:.0f}",
            f"{r['fit']['count_accuracy']:.0f}",
            f"{r['fit']['postprocess_ms_per_window']:.2f}",
            f"{r['inference_ms_per_window']:.1f}",
            f"{r['none']['rotated_mAP']:.1f} / {r['fit']['rotated_mAP']:.1f}",
        ]
        for r in report["rows"]
    ]
    snr = report.get("threshold_snr")
    rule = f"threshold {snr:g} x flux noise" if snr is not None else f"threshold {report['threshold']:g}"
    head = (
        f"Model {report['model']} (plan {report['plan']}), {rule}; "
        f"{report['rows'][0]['trajectories']} trajectories per condition.\n\n"
    )
    return head + md_table(
        [
            "condition",
            "CSO-mAP network",
            "CSO-mAP network + fit",
            "count acc. % network",
            "count acc. % fit",
            "fit ms/window",
            "inference ms/window",
            "chance: CSO-mAP rotated, network / fit",
        ],
        rows,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=REPO / "models" / "derefnet", help="model folder (with its manifest)")
    p.add_argument("--trajectories", type=int, default=100, help="trajectories per condition")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per call")
    p.add_argument(
        "--threshold-snr",
        type=float,
        default=DEFAULT_SNR,
        help=f"peak threshold relative to each window's flux noise (default {DEFAULT_SNR:g}, the service's)",
    )
    p.add_argument(
        "--threshold", type=float, default=None, help="an absolute peak threshold instead (the SeqCSIST metric's 70)"
    )
    add_report_arguments(p)


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """--conditions, --out and --markdown, as every field-condition benchmark takes them."""
    p.add_argument(
        "--conditions",
        nargs="+",
        choices=list(CONDITIONS),
        default=None,
        metavar="NAME",
        help=CONDITIONS_HELP,
    )
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--markdown", type=Path, default=None, help="write the markdown table here")


def main(args) -> int:
    if args.trajectories < 1:
        raise SystemExit("csist bench field: --trajectories must be >= 1")
    report = run(args)
    text = markdown(report)
    write_outputs(report, args.out, text, args.markdown)
    print(text)
    return 0
