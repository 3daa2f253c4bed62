"""Evaluate a DeRefNet checkpoint or ONNX model on a data split with CSO-mAP.

    csist evaluate --model models/derefnet --data data/seqcsist --split test
    csist evaluate --model models/derefnet --data data/seqcsist --split test --path stream
    csist evaluate --model runs/derefnet/best.pt --data data/seqcsist --split test \
        --refine centroid --out report.json --detections dets.json --plots plots/

Scores the middle frames of all full 5-frame windows (frames 3..18 of each 20-frame trajectory,
1-based) as the SeqCSIST paper does: CSO-mAP with AP05..AP25, broken down by the number of
targets, count accuracy and the mean localisation error of matched targets. The peaks come
from ``service.science.peaks``, the same code the service runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.engine.names import AUTO, PLANS
from service.science.background import condition
from service.science.peaks import DEFAULT_MODE, PEAK_MODES
from service.science.physics import SIGMA
from service.science.postprocess import DEFAULT_SNR, REFINE_MODES, Found, find_targets
from service.science.refine import FitConfig
from training.data import read_split, window_middles, windows
from training.metric import count_accuracy, cso_map, localisation_error

WINDOW = 5


def load_predictor(path: str | Path, threads: int | None = None, stream: bool = False, plan: str = "auto"):
    """A function frames (n, T, 11, 11) -> HR maps (n, T-4, 33, 33) for a model folder (or its
    manifest: the single graph, its hash verified), a bare .onnx graph, or a checkpoint (.pt).

    ``stream``: a model folder run the way the service streams it (:class:`StreamPredictor`).
    """
    path = Path(path)
    if stream:
        return StreamPredictor(path, threads, plan)
    if path.suffix == ".onnx":
        return OnnxPredictor(path, threads)
    if path.is_dir() or path.suffix == ".json":
        from service.modelpkg.manifest import PackageError, load_package, verified

        try:
            package = load_package(path)
            return OnnxPredictor(verified(package.directory, package.manifest.model, "model", "re-export it"), threads)
        except PackageError as exc:
            raise SystemExit(f"csist evaluate: error: {exc}") from None
    return TorchPredictor(path, threads)


class StreamPredictor:
    """The service's streaming path: the execution plan the service would serve (``plan``:
    "auto" chooses by measurement, as ``CSIST_PLAN`` does; manifest and hashes verified), each frame
    encoded once, then the head on every window of features."""

    def __init__(self, path: Path, threads: int | None = None, plan: str = "auto", batch: int = 64):
        from service.engine.plans import PlanOptions
        from service.engine.select import select_plan
        from service.modelpkg.model import ModelError

        try:
            selection = select_plan(path, options=PlanOptions(threads=threads or 0), requested=plan, budget_s=3.0)
        except ModelError as exc:
            raise SystemExit(f"csist evaluate: error: {exc}") from None
        self.plan = selection.plan
        if not self.plan.streaming:
            raise SystemExit(f"csist evaluate: error: the manifest of {path} lists no streaming encoder and head")
        self.batch = batch
        self.backends = self.plan.backends()

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return stream_maps(self.plan.encode, self.plan.head, frames, self.batch)


def stream_maps(encode, head, frames: np.ndarray, batch: int = 64) -> np.ndarray:
    """HR maps (n, T-4, 33, 33) of trajectories (n, T, 11, 11) as the service streams them: every
    frame encoded once (``encode``: (m, 11, 11) -> (m, 1089)), then ``head`` ((b, 5, 1089) ->
    (b, 33, 33)) on every window of features, ``batch`` windows per call."""
    n, t = frames.shape[:2]
    flat = frames.reshape(n * t, *frames.shape[2:]).astype(np.float32)
    step = batch * WINDOW
    feats = np.concatenate([encode(flat[i : i + step]) for i in range(0, len(flat), step)])
    win = windows(feats.reshape(n, t, -1), WINDOW)  # (n*(T-4), 5, 1089)
    starts = range(0, len(win), batch)
    maps = np.concatenate(
        [
            head(win[i : i + batch])
            for i in tqdm(starts, desc="infer", unit="batch", leave=False, disable=not sys.stderr.isatty())
        ]
    )
    return maps.reshape(n, t - WINDOW + 1, *maps.shape[1:])


class OnnxPredictor:
    def __init__(self, path: Path, threads: int | None = None, batch: int = 64):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.batch = batch

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        n, t = frames.shape[:2]
        win = windows(frames.astype(np.float32), WINDOW)  # (n*(T-4), 5, 11, 11)
        starts = range(0, len(win), self.batch)
        out = [
            self.session.run(None, {self.input: win[i : i + self.batch]})[0]
            for i in tqdm(starts, desc="infer", unit="batch", leave=False, disable=not sys.stderr.isatty())
        ]
        maps = np.concatenate(out)
        return maps.reshape(n, t - WINDOW + 1, *maps.shape[1:])


class TorchPredictor:
    def __init__(self, path: Path, threads: int | None = None, batch: int = 8):
        import torch

        from training.model import load_checkpoint_model

        if threads:
            torch.set_num_threads(threads)
        self.model = load_checkpoint_model(path)
        self.batch = batch

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return predict_trajectories(self.model, frames, self.batch)


def predict_trajectories(model, frames: np.ndarray, batch: int = 8) -> np.ndarray:
    """Torch model over whole trajectories, each frame encoded once: (n, T-4, 33, 33) maps."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in tqdm(
            range(0, len(frames), batch), desc="infer", unit="batch", leave=False, disable=not sys.stderr.isatty()
        ):
            x = torch.from_numpy(np.ascontiguousarray(frames[i : i + batch], dtype=np.float32)).to(device)
            hr = model.forward_trajectories(x, with_symmetry=False)[0]
            out.append((hr * model.cfg.scale).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


BIT_DEPTHS = (8, 10, 12, 14, 16)


def sensor_saturation(frames: np.ndarray) -> float | None:
    """The clip level of the sensor that made ``frames``: 2^b - 1 for the fewest bits b of
    :data:`BIT_DEPTHS` that hold them where they are integers from 0 (255 for frames as
    published), None for float (``--float``) data."""
    if not (frames.min() >= 0 and np.array_equal(frames, np.round(frames))):
        return None
    top = float(frames.max())
    return next((2.0**b - 1 for b in BIT_DEPTHS if top <= 2**b - 1), None)


def fit_config(frames: np.ndarray) -> FitConfig:
    """The fit's calibration for ``frames``: the clip level of their bit depth
    (:func:`sensor_saturation`) for integer frames, no rounding and no clipping for float ones."""
    saturation = sensor_saturation(frames)
    return (
        FitConfig(quantized=False, saturation=None) if saturation is None else FitConfig.calibrated(SIGMA, saturation)
    )


def detections(
    maps: np.ndarray,
    threshold: float = 70.0,
    refine: str = "none",
    max_targets: int | None = None,
    frames: np.ndarray | None = None,
    mode: str = DEFAULT_MODE,
    snr: float | None = None,
    details: bool = False,
):
    """Targets of every map in (n, W, 33, 33): a flat list of (K, 3) arrays, trajectory-major
    (with ``details``, of :class:`service.science.postprocess.Found`).

    ``frames`` (n, T, 11, 11), the trajectories the maps came from, is needed for refine="fit"
    and for ``snr`` (the peak threshold relative to each window's noise, instead of the absolute
    ``threshold``); integer frames get the fit calibrated for the clip level of their bit depth
    (:func:`sensor_saturation`: 255 for 8-bit data), float (unquantised) frames a fit without
    rounding and saturation.
    """
    flat = maps.reshape(-1, *maps.shape[-2:])
    win, fit = None, None
    if (refine == "fit" or snr is not None) and frames is not None:
        win = windows(frames, WINDOW)
        fit = fit_config(frames)
    return find_targets(
        flat,
        win,
        threshold=threshold,
        refine=refine,
        max_targets=max_targets,
        mode=mode,
        fit_config=fit,
        snr=snr,
        details=details,
    )


def middle_truth(split) -> list[np.ndarray]:
    """Ground truth of every window's middle frame, trajectory-major, matching ``detections``."""
    mids = window_middles(split.frames.shape[1], WINDOW)
    return [np.asarray(split.targets[t][i]) for t in range(split.n_trajectories) for i in mids]


def score(dets: list, truth: list) -> dict:
    """CSO-mAP overall and by target count, count accuracy and localisation error."""
    report = {
        "frames": len(truth),
        "targets": int(sum(len(g) for g in truth)),
        **cso_map(dets, truth),
        "count_accuracy": 100.0 * count_accuracy(dets, truth),
        "localisation_error_px": localisation_error(dets, truth),
        "by_count": {},
    }
    counts = np.array([len(g) for g in truth])
    for k in np.unique(counts):
        idx = np.flatnonzero(counts == k)
        d, g = [dets[i] for i in idx], [truth[i] for i in idx]
        report["by_count"][str(int(k))] = {
            "frames": len(idx),
            **cso_map(d, g),
            "count_accuracy": 100.0 * count_accuracy(d, g),
        }
    return report


def predict(predictor, split) -> tuple[np.ndarray, dict]:
    """HR maps (n, T-4, 33, 33) of a split and the inference timing."""
    t0 = time.perf_counter()
    maps = predictor(condition(split.frames))  # as the service runs the network: background removed
    seconds = time.perf_counter() - t0
    return maps, {
        "inference_seconds": seconds,
        "windows_per_second": maps.shape[0] * maps.shape[1] / max(seconds, 1e-9),
    }


def score_maps(
    maps,
    split,
    threshold: float = 70.0,
    refine: str = "none",
    max_targets: int | None = None,
    mode: str = DEFAULT_MODE,
    snr: float | None = None,
    details: bool = False,
) -> tuple[dict, list]:
    """Targets from precomputed maps and their report; returns (report, detections), the
    detections as :class:`service.science.postprocess.Found` with ``details``."""
    t1 = time.perf_counter()
    dets = detections(maps, threshold, refine, max_targets, split.frames, mode, snr, details)
    post = time.perf_counter() - t1
    report = score([d.targets for d in dets] if details else dets, middle_truth(split))
    report["postprocess_ms_per_window"] = 1000 * post / max(1, len(dets))
    return report, dets


def evaluate(
    predictor,
    split,
    threshold: float = 70.0,
    refine: str = "none",
    max_targets: int | None = None,
    mode: str = DEFAULT_MODE,
):
    """Run ``predictor`` on a split; returns (report, detections, maps)."""
    maps, timing = predict(predictor, split)
    report, dets = score_maps(maps, split, threshold, refine, max_targets, mode)
    return {**report, **timing}, dets, maps


def save_detections(path: Path, split, dets: list) -> None:
    """Every scored frame's detections, rows (x, y, brightness); ``dets`` of
    :class:`service.science.postprocess.Found` add the fit's ``uncertainty`` rows (sigma_x,
    sigma_y, rho, sigma_brightness) and ``count_confidence`` where the fit answered (else null)."""
    mids = window_middles(split.frames.shape[1], WINDOW)
    frames = []
    for k, d in enumerate(dets):
        t, i = divmod(k, len(mids))
        entry = {"trajectory": t, "frame": int(mids[i])}
        if isinstance(d, Found):
            spread = None if d.uncertainty is None else np.round(d.uncertainty, 6).tolist()
            entry.update(detections=np.round(d.targets, 6).tolist(), uncertainty=spread)
            entry["count_confidence"] = d.count_confidence
        else:
            entry["detections"] = np.round(d, 6).tolist()
        frames.append(entry)
    path.write_text(json.dumps({"frames": frames}))


def plot_windows(out_dir: Path, split, maps: np.ndarray, dets: list, count: int = 6) -> list[Path]:
    """Input, output map, HR truth and found targets for the first ``count`` windows of a few trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from service.science.physics import hr_map

    out_dir.mkdir(parents=True, exist_ok=True)
    mids = window_middles(split.frames.shape[1], WINDOW)
    written = []
    picks = np.linspace(0, split.n_trajectories - 1, min(count, split.n_trajectories)).astype(int)
    for t in picks:
        w = len(mids) // 2
        frame = mids[w]
        truth = np.asarray(split.targets[t][frame])
        found = dets[t * len(mids) + w]
        fig, ax = plt.subplots(1, 3, figsize=(11, 3.8))
        ax[0].imshow(split.frames[t, frame], cmap="gray", vmin=0, vmax=255)
        ax[0].set_title(f"input: trajectory {t}, frame {frame}")
        ax[1].imshow(maps[t, w], cmap="inferno", extent=(-0.5, 10.5, 10.5, -0.5))
        ax[1].set_title("network output (HR map)")
        ax[2].imshow(hr_map(truth), cmap="inferno", extent=(-0.5, 10.5, 10.5, -0.5))
        ax[2].set_title("truth (HR map)")
        for a in ax:
            a.scatter(truth[:, 0], truth[:, 1], marker="+", c="cyan", s=80, label="truth")
            if len(found):
                a.scatter(found[:, 0], found[:, 1], marker="x", c="lime", s=50, label="found")
        lo, hi = truth[:, :2].min(0) - 1.5, truth[:, :2].max(0) + 1.5
        for a in ax[1:]:
            a.set_xlim(lo[0], hi[0])
            a.set_ylim(hi[1], lo[1])
        ax[0].legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        path = out_dir / f"window_t{t:04d}_f{frame:02d}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def format_report(r: dict) -> str:
    aps = " ".join(f"{k} {r[k]:.2f}" for k in ("AP05", "AP10", "AP15", "AP20", "AP25"))
    lines = [
        f"CSO-mAP {r['mAP']:.2f}  ({aps})",
        f"count accuracy {r['count_accuracy']:.2f} %  localisation error {r['localisation_error_px']:.4f} px"
        f"  frames {r['frames']}  targets {r['targets']}",
    ]
    for k, v in r["by_count"].items():
        lines.append(f"  K={k}: mAP {v['mAP']:.2f}  count accuracy {v['count_accuracy']:.2f} %  frames {v['frames']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csist evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        required=True,
        help="model folder (with its manifest.json), bare ONNX graph (.onnx) or checkpoint (.pt)",
    )
    p.add_argument("--data", required=True, help="data set root (csist simulate output or the published layout)")
    p.add_argument("--split", default="test", help="split folder to evaluate (default: test)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N trajectories")
    p.add_argument(
        "--threshold", type=float, default=70.0, help="peak brightness threshold (default 70, as the reference metric)"
    )
    p.add_argument(
        "--threshold-snr",
        type=float,
        default=None,
        help="peak threshold relative to each window's flux noise instead (the service's default is"
        f" {DEFAULT_SNR:g}; docs/method.md)",
    )
    p.add_argument(
        "--refine",
        nargs="+",
        default=["none"],
        choices=REFINE_MODES,
        help="none: HR cell centres (as the reference metric); centroid/quadratic: sub-cell peak refinement "
        "on the map; fit: physics fit of the peaks to the window's 5 LR frames. Several modes score "
        "the same network output each (--out then holds {'reports': [...]}; detections and plots "
        "use the last mode)",
    )
    p.add_argument(
        "--peak-mode",
        default=DEFAULT_MODE,
        choices=PEAK_MODES,
        help="cells: every HR cell above the threshold (the reference metric); local_max: local maxima only",
    )
    p.add_argument("--max-targets", type=int, default=None, help="keep at most this many peaks per frame")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for inference (default: library default)")
    p.add_argument(
        "--path",
        choices=("single", "stream"),
        default="single",
        help="single: the single graph on every window; stream: the service's streaming path on a model "
        "folder (encoder once per frame, head per window, manifest and hashes verified)",
    )
    p.add_argument(
        "--plan",
        choices=(AUTO, *PLANS),
        default=AUTO,
        help="with --path stream: the execution plan (as CSIST_PLAN; auto: the fastest that passes the"
        " check against the float32 reference on this host)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--detections", type=Path, default=None, help="write all detections as JSON here")
    p.add_argument("--plots", type=Path, default=None, help="write PNGs of input, output, truth and found targets here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    split = read_split(args.data, args.split, limit=args.limit)
    predictor = load_predictor(args.model, args.threads, args.path == "stream", args.plan)
    path = {
        "path": args.path,
        **({"plan": predictor.plan.name, "backends": predictor.backends} if args.path == "stream" else {}),
    }
    maps, timing = predict(predictor, split)
    reports = []
    for refine in args.refine:
        # the detections written are the last mode's, with the fit's uncertainties where it answered
        details = args.detections is not None and refine == args.refine[-1]
        report, dets = score_maps(
            maps, split, args.threshold, refine, args.max_targets, args.peak_mode, args.threshold_snr, details
        )
        report.update(
            timing,
            model=str(args.model),
            data=str(args.data),
            split=args.split,
            refine=refine,
            threshold=args.threshold,
            threshold_snr=args.threshold_snr,
            peak_mode=args.peak_mode,
            trajectories=split.n_trajectories,
            **path,
        )
        print(f"refine={refine}: " + format_report(report))
        reports.append(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(reports[0] if len(reports) == 1 else {"reports": reports}, indent=2))
    if args.detections:
        save_detections(args.detections, split, dets)
        dets = [d.targets for d in dets]
    if args.plots:
        for path in plot_windows(args.plots, split, maps, dets):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
