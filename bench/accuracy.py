r"""``csist bench accuracy``: CSO-mAP per test condition, beside the ceiling and the paper.

    csist bench accuracy --model models/derefnet --trajectories 200 \
        --out bench/results/accuracy.json --markdown bench/results/accuracy.md

For each condition a fresh test split is simulated with its own seed (listed in ``CONDITIONS``;
none of them was used in development: 0, 1001, 3, 4, 5, 11, 99, 777, 8101, 8301, 8302, 8305, 8306
and 20261121 were), exactly as
``csist simulate --trajectories N --split 0,0,1 --seed SEED --noise SIGMA --targets LO-HI``
writes it. The model's HR maps are computed once per condition and every post-processing mode is
applied to the same maps (``training.evaluate``: the one path the service also runs):

- ``perfect cell centres``: the true targets snapped to their HR cell centres (targets sharing a
  cell merge), the ceiling of any method that reports cell centres;
- ``none``: network peaks at cell centres (as the paper's metric reads the map);
- ``centroid``: intensity-weighted centroid refinement of each peak on the map;
- ``fit``: the peaks fitted to the window's 5 LR frames through the forward model.

The paper's numbers are DeRefNet's CSO-mAP from SeqCSIST (TGRS 2025) Table V (noise) and
Table VI (2-8 targets).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import machine, md_table, simulated_trajectories, write_outputs

REPO = Path(__file__).resolve().parents[1]

# name -> (noise sigma, targets range, seed, paper CSO-mAP and its source)
CONDITIONS = {
    "clean": (0.0, (2, 4), 7301, 51.55, "Table V/VI"),
    "sigma2": (2.0, (2, 4), 7302, 49.09, "Table V"),
    "sigma3": (3.0, (2, 4), 7303, 48.40, "Table V"),
    "sigma4": (4.0, (2, 4), 7304, 48.41, "Table V"),
    "sigma5": (5.0, (2, 4), 7305, 47.23, "Table V"),
    "targets2-8": (0.0, (2, 8), 7306, 49.79, "Table VI"),
}
REFINE_DEFAULT = ("none", "centroid", "fit")


def cell_centre_detections(truth: list[np.ndarray], ratio: int = 3) -> list[np.ndarray]:
    """The perfect cell-centre predictor: each frame's truth HR map read back as (x, y, score)."""
    from service.science.physics import hr_map, hr_to_lr

    out = []
    for t in truth:
        m = hr_map(t, ratio=ratio)
        i, j = np.nonzero(m)
        out.append(np.column_stack([hr_to_lr(j, ratio), hr_to_lr(i, ratio), m[i, j]]))
    return out


class _Split:
    """The attributes of ``training.data.Split`` that ``training.evaluate`` reads."""

    def __init__(self, frames: np.ndarray, targets: list[list[np.ndarray]]):
        self.frames, self.targets = frames, targets
        self.n_trajectories = len(frames)


def condition_rows(name: str, predictor, n: int, refines: tuple[str, ...], threshold: float) -> dict:
    from training import evaluate

    noise, targets, seed, paper, source = CONDITIONS[name]
    frames, truth_all = simulated_trajectories(n, seed, noise=noise, targets=targets)
    split = _Split(frames, truth_all)
    truth = evaluate.middle_truth(split)
    t0 = time.perf_counter()
    maps = predictor(frames)
    infer_s = time.perf_counter() - t0
    result = {
        "noise": noise,
        "targets": f"{targets[0]}-{targets[1]}",
        "seed": seed,
        "trajectories": n,
        "frames_scored": len(truth),
        "paper": {"cso_map": paper, "source": f"SeqCSIST {source}"},
        "command": f"csist simulate --trajectories {n} --split 0,0,1 --seed {seed} --noise {noise:g} "
        f"--targets {targets[0]}-{targets[1]}",
        "inference_s": infer_s,
        "modes": {},
    }
    result["modes"]["perfect cell centres"] = evaluate.score(cell_centre_detections(truth), truth)
    for refine in refines:
        t1 = time.perf_counter()
        dets = evaluate.detections(maps, threshold, refine, frames=frames)
        r = evaluate.score(dets, truth)
        r["postprocess_s"] = time.perf_counter() - t1
        result["modes"][refine] = r
    return result


def run(args) -> dict:
    from training import evaluate

    predictor = evaluate.load_predictor(args.model, args.threads)
    threshold = args.threshold
    if threshold is None:  # a model folder's default; a checkpoint has none
        from service.modelpkg.manifest import load_package

        model = Path(args.model)
        threshold = load_package(model).postprocess.threshold if model.is_dir() else 70.0
    refines = tuple(r for r in args.refine.split(",") if r)
    report = {
        "machine": machine(),
        "model": str(args.model),
        "threshold": threshold,
        "refine_modes": list(refines),
        "conditions": {},
    }
    for name in args.conditions.split(","):
        if name not in CONDITIONS:
            raise SystemExit(f"unknown condition {name!r}; known: {', '.join(CONDITIONS)}")
        report["conditions"][name] = condition_rows(name, predictor, args.trajectories, refines, threshold)
    report["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    return report


def markdown(report: dict) -> str:
    modes = ["perfect cell centres", *report["refine_modes"]]
    labels = {"none": "network, cell centres", "centroid": "network + centroid", "fit": "network + physics fit"}
    header = ["condition", "seed", "paper DeRefNet"] + [labels.get(m, m) for m in modes]
    timed = [m for m in report["refine_modes"] if m == "fit"]
    header += [f"{labels.get(m, m)}: ms/window" for m in timed]
    rows = []
    for name, c in report["conditions"].items():
        cells = [f"{c['modes'][m]['mAP']:.2f} ({c['modes'][m]['count_accuracy']:.0f} %)" for m in modes]
        ms = [1e3 * c["modes"][m]["postprocess_s"] / c["frames_scored"] for m in timed]
        rows.append(
            [f"{name} ({c['targets']} targets, sigma {c['noise']:g})", c["seed"], c["paper"]["cso_map"], *cells, *ms]
        )
    n = next(iter(report["conditions"].values()))["trajectories"] if report["conditions"] else 0
    return (
        f"CSO-mAP (%) and, in brackets, count accuracy (% of frames with the right number of targets) on "
        f"{n} simulated test trajectories per condition (middle frames of full windows), peak threshold "
        f"{report['threshold']:g}; paper: SeqCSIST Tables V and VI (CSO-mAP only). ms/window: "
        f"post-processing time per window, one thread, peak extraction included.\n\n" + md_table(header, rows)
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=REPO / "models" / "derefnet", help="model folder or checkpoint (.pt)")
    p.add_argument("--trajectories", type=int, default=200, help="test trajectories per condition")
    p.add_argument(
        "--conditions", default=",".join(CONDITIONS), help=f"comma-separated subset of {', '.join(CONDITIONS)}"
    )
    p.add_argument("--refine", default=",".join(REFINE_DEFAULT), help="comma-separated post-processing modes to score")
    p.add_argument(
        "--threshold", type=float, default=None, help="peak threshold (default: the model folder's, else 70)"
    )
    p.add_argument("--threads", type=int, default=None, help="inference threads")
    p.add_argument("--quick", action="store_true", help="2 trajectories per condition (tests)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--markdown", type=Path, default=None, help="write the markdown table here")


def main(args) -> int:
    if args.quick:
        args.trajectories = 2
    report = run(args)
    text = markdown(report)
    write_outputs(report, args.out, text, args.markdown)
    print(text)
    return 0
