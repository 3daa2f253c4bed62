"""Export a DeRefNet checkpoint to ONNX (opset 19, DeformConv nodes) and write its model card.

    csist export --checkpoint runs/derefnet/best.pt --out models/derefnet.onnx \
        --eval-report runs/derefnet/test_report.json --data-command "csist simulate ..."

The graph takes ``lr`` (batch, 5, 11, 11) in sensor units and returns ``hr`` (batch, 33, 33),
the middle frame's HR map; Phi, Qinit and the folded window-position gates are constants in it
and the training-only symmetry branch is not exported. Deformable convolutions are exported
through ``torchvision.ops.deform_conv2d`` as ONNX ``DeformConv`` with torch's dynamo exporter
(the legacy exporter fails on it). The export is checked with ``onnx.checker`` and against
PyTorch on simulated windows in ONNX Runtime before the card is written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from service.model import file_sha256 as sha256
from training.model import DeRefNet
from training.train import load_checkpoint_model

OPSET = 19
INPUT, OUTPUT = "lr", "hr"


def sample_windows(n: int = 16, seed: int = 0) -> np.ndarray:
    """Simulated 8-bit windows (n, 5, 11, 11) for the parity check."""
    from training.simulate import SimParams, render, simulate_trajectory

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        frames, _ = simulate_trajectory(rng, SimParams())
        images = render(frames, 0.0, rng, False).astype(np.float32)
        start = rng.integers(0, len(images) - 4)
        out.append(images[start : start + 5])
    return np.stack(out)


def export_onnx(model: DeRefNet, out: Path) -> None:
    model = model.cpu().eval()
    model.set_deform_mode("torchvision")
    example = torch.from_numpy(sample_windows(2))
    batch = torch.export.Dim("batch", min=1, max=4096)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (example,),
        str(out),
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes={"windows": {0: batch}},
        external_data=False,
        optimize=True,
        verbose=False,
    )


def check_onnx(model: DeRefNet, path: Path, windows: np.ndarray, tol: float = 1e-3) -> dict:
    """onnx.checker, DeformConv present, and ONNX Runtime CPU output equal to PyTorch within tol."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    n_deform = ops.count("DeformConv")
    if n_deform == 0:
        raise RuntimeError(f"{path}: no DeformConv node in the exported graph")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT: windows.astype(np.float32)})[0]
    model.set_deform_mode("torchvision")
    with torch.no_grad():
        want = model(torch.from_numpy(windows.astype(np.float32))).numpy()
    err = float(np.abs(got - want).max())
    if not err <= tol:
        raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch by {err:.3g} (> {tol})")
    return {"deform_conv_nodes": n_deform, "nodes": len(ops), "max_abs_diff_vs_torch": err, "parity_windows": len(windows)}


def write_card(path: Path, onnx_path: Path, ckpt: dict, checks: dict, extra: dict) -> dict:
    cfg = ckpt["config"]
    card = {
        "name": "derefnet",
        "version": extra.pop("version", "0.1.0"),
        "file": onnx_path.name,
        "sha256": sha256(onnx_path),
        "bytes": onnx_path.stat().st_size,
        "opset": OPSET,
        "inputs": [{"name": INPUT, "shape": ["batch", cfg["window"], cfg["size"], cfg["size"]], "dtype": "float32",
                    "units": "sensor counts (8-bit scale, 0..255)"}],
        "outputs": [{"name": OUTPUT, "shape": ["batch", cfg["size"] * cfg["ratio"], cfg["size"] * cfg["ratio"]], "dtype": "float32",
                     "units": "brightness of the middle frame's targets at their HR cells"}],
        "config": cfg,
        "parameters": ckpt.get("parameters"),
        "physics": {"size": cfg["size"], "ratio": cfg["ratio"], "psf_sigma": cfg["psf_sigma"],
                    "hr_cell_centre": "(i + 0.5) / ratio - 0.5 LR px", "qinit": "least squares on the training split"},
        "postprocess": {"threshold": 70.0, "refine": "centroid"},
        "export": {"exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}", **checks,
                   "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": extra.pop("export_command")},
        "training": {
            "commands": extra.pop("train_commands") or ckpt["state"].get("commands") or [ckpt.get("command")],
            "steps": ckpt["state"]["step"],
            "train_seconds": round(ckpt["state"]["train_seconds"], 1),
            "hardware": ckpt.get("hardware"),
            "loss_weights": ckpt.get("loss_weights"),
            "validation_history": ckpt["state"].get("history"),
            "args": ckpt.get("args"),
        },
        **extra,
    }
    path.write_text(json.dumps(card, indent=2) + "\n")
    return card


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csist export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="training checkpoint (.pt)")
    p.add_argument("--out", type=Path, default=Path("models/derefnet.onnx"), help="ONNX file to write; the card goes next to it (.json)")
    p.add_argument("--card", type=Path, default=None, help="model card path (default: OUT with .json)")
    p.add_argument("--version", default="0.1.0", help="model version recorded in the card")
    p.add_argument("--eval-report", type=Path, action="append", default=[],
                   help="JSON report(s) of `csist evaluate` to record as the card's metrics (repeatable)")
    p.add_argument("--data-command", action="append", default=[], help="the csist simulate command(s) that made the data (repeatable)")
    p.add_argument("--train-command", action="append", default=[],
                   help="training command(s) to record in the card (default: those stored in the checkpoint)")
    p.add_argument("--parity-windows", type=int, default=16, help="simulated windows for the ONNX vs PyTorch check")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max abs difference allowed between ONNX Runtime and PyTorch")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    model = load_checkpoint_model(args.checkpoint)
    export_onnx(model, args.out)
    checks = check_onnx(model, args.out, sample_windows(args.parity_windows, seed=12345), args.tolerance)
    metrics = {}
    for report in args.eval_report:
        r = json.loads(report.read_text())
        metrics[f"{r.get('split', 'test')}:{r.get('refine', 'centroid')}:{report.stem}"] = r
    command = "csist export " + " ".join(sys.argv[2:] if argv is None else argv)
    card = write_card(args.card or args.out.with_suffix(".json"), args.out, ckpt, checks,
                      {"version": args.version, "export_command": command, "train_commands": args.train_command, "data": {"commands": args.data_command},
                       "metrics": metrics, "host": {"machine": platform.machine(), "python": platform.python_version()}})
    print(f"wrote {args.out} ({card['bytes']} bytes, sha256 {card['sha256'][:12]}..., {checks['deform_conv_nodes']} DeformConv nodes, "
          f"max |onnx - torch| {checks['max_abs_diff_vs_torch']:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
