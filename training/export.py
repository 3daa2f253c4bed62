"""Export a DeRefNet checkpoint to ONNX (opset 19, DeformConv nodes): a model folder.

    csist export --checkpoint runs/derefnet/best.pt --out models/derefnet \
        --eval-report runs/derefnet/test_report.json --data-command "csist simulate ..."
    csist export --metrics-only --out models/derefnet --eval-report runs/eval/test_report.json

``--out`` is the model folder (docs/model-package.md): ``model.onnx``, the parts below, and
``manifest.json`` (interface, files and hashes) with ``provenance.json`` (the commands, the
checks, the metrics), both written through ``service.modelpkg.manifest``. Files of a model
exported there before that the new manifest does not list (an old split) are removed.

The graph takes ``lr`` (batch, 5, 11, 11) in sensor units and returns ``hr`` (batch, 33, 33),
the middle frame's HR map; Phi, Qinit and the folded window-position gates are constants in it
and the training-only symmetry branch is not exported. Deformable convolutions are exported
through ``torchvision.ops.deform_conv2d`` as ONNX ``DeformConv`` with torch's dynamo exporter
(the legacy exporter fails on it). The export is checked with ``onnx.checker`` and against
PyTorch on simulated windows in ONNX Runtime before the manifest is written.

Beside the single graph it writes the two parts a stream needs (docs/method.md section 7): the
per-frame encoder ``encoder.onnx`` (``lr_frames`` (N, 11, 11) -> ``features`` (N, 1089),
the stage-9 estimates in network units, i.e. divided by ``config.scale``) and the window head
``head.onnx`` (``features`` (B, 5, 1089) -> ``hr`` (B, 33, 33) in sensor units, holding
the DeformConv nodes). The window-position gates sigmoid(Linear(e_p)) depend on nothing but
the weights, so the head multiplies by their 5 precomputed vectors. Encoder then head must equal
the single graph within the tolerance (checked in ONNX Runtime); the manifest lists both parts
under ``parts`` with their hashes, and the service verifies them like the main file.

The head is also written as its two halves, so that a stream can align a window's neighbours
one by one before the window's last frame arrives: ``align.onnx`` (``pair_features``
(P, 5, 1089): the middle frame's features in row 2 and one neighbour's in its position's row,
zeros elsewhere -> ``aligned`` (P, 1089), that neighbour aligned by the TDFA) and
``fuse.onnx`` (``stack`` (B, 5, 1089): the 4 aligned neighbours around the middle
frame's features -> ``hr`` (B, 33, 33)). The layouts are ``service.science.windows.pair_features`` and
``fuse_features``; align then fuse must equal the head within the tolerance. Last, the head is
cut at its DeformConv nodes for the service's native kernel (``csist split-head``; skipped with
a note when that kernel is not built).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from service.modelpkg.manifest import (
    MODEL_FILE,
    Interface,
    Manifest,
    PackageError,
    PartSpec,
    Provenance,
    file_sha256,
    file_spec,
    load_package,
    write_package,
)
from service.science.peaks import DEFAULT_MODE
from service.science.postprocess import REFINE_MODES
from training.model import DeRefNet, load_checkpoint_model
from training.parts import fuse_inputs, pair_inputs, pair_maps, part_paths, sample_windows
from training.split_head import split_for_native_kernel

OPSET = 19
INPUT, OUTPUT = "lr", "hr"
ENCODER_INPUT, FEATURES = "lr_frames", "features"
PAIR_FEATURES, ALIGNED, STACK = "pair_features", "aligned", "stack"


class FoldedGates(torch.nn.Module):
    """The window-position encoding with its 5 gate vectors computed once (a constant)."""

    def __init__(self, gates: torch.Tensor):
        super().__init__()
        self.register_buffer("gates", gates.detach().clone())  # (5, 1089)

    def forward(self, feats):
        return feats * self.gates


class EncoderPart(torch.nn.Module):
    """LR frames (N, 11, 11) in sensor units -> stage-9 features (N, 1089) in network units."""

    def __init__(self, model: DeRefNet):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, lr_frames):
        return self.encoder(lr_frames, with_symmetry=False)[0]


class HeadPart(torch.nn.Module):
    """Features of a window (B, 5, 1089) -> middle HR map (B, 33, 33) in sensor units."""

    def __init__(self, model: DeRefNet):
        super().__init__()
        head = copy.deepcopy(model.head)
        with torch.no_grad():
            head.temporal = FoldedGates(model.head.temporal.gates())
        self.head = head
        self.scale = float(model.cfg.scale)

    def forward(self, features):
        return self.head(features)[0] * self.scale


class AlignPart(torch.nn.Module):
    """One neighbour aligned to the middle frame (TDFA, SeqCSIST section IV-B): the head's
    alignment for a single (middle, neighbour, position) pair.

    ``pair_features`` (P, 5, 1089) holds the middle frame's features in row 2 and the
    neighbour's in its window position's row, zeros elsewhere (``service.science.windows.pair_features``):
    every row is gated by its position's vector and the neighbour rows are added, which leaves
    the one non-zero row exactly. Output: the aligned neighbour (P, 1089) in network units.
    """

    def __init__(self, model: DeRefNet):
        super().__init__()
        cfg = model.cfg
        with torch.no_grad():
            self.register_buffer("gates", model.head.temporal.gates().detach().clone())  # (5, 1089)
        self.align = copy.deepcopy(model.head.align)
        self.mid, self.hr = cfg.window // 2, cfg.hr
        self.neighbours = [p for p in range(cfg.window) if p != self.mid]

    def forward(self, pair_features):
        p = pair_features.shape[0]
        x = pair_features * self.gates  # (P, 5, 1089)
        mid = x[:, self.mid].reshape(p, 1, self.hr, self.hr)  # (P, 1, 33, 33)
        nb = x[:, self.neighbours].sum(1).reshape(p, 1, self.hr, self.hr)  # (P, 1, 33, 33)
        return self.align(mid, nb).reshape(p, self.hr * self.hr)


class FusePart(torch.nn.Module):
    """The head after the alignment: the 4 aligned neighbours around the middle frame -> HR map.

    ``stack`` (B, 5, 1089) holds the aligned neighbours in rows 0, 1, 3, 4 and the middle
    frame's features (ungated) in row 2 (``service.science.windows.fuse_features``); the output is the
    middle HR map (B, 33, 33) in sensor units, as the head's.
    """

    def __init__(self, model: DeRefNet):
        super().__init__()
        cfg = model.cfg
        gates = torch.ones(cfg.window, cfg.hr * cfg.hr)
        with torch.no_grad():
            gates[cfg.window // 2] = model.head.temporal.gates()[cfg.window // 2]
        self.register_buffer("gates", gates)  # (5, 1089): the middle row's gate, ones elsewhere
        self.fusion = copy.deepcopy(model.head.fusion)
        self.hr, self.scale = cfg.hr, float(cfg.scale)

    def forward(self, stack):
        b, w, _ = stack.shape
        x = (stack * self.gates).reshape(b, w, self.hr, self.hr)  # (B, 5, 33, 33)
        return self.fusion(x) * self.scale


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


def export_parts(model: DeRefNet, directory: Path) -> dict[str, Path]:
    """Export the per-frame encoder and the window head into the folder ``directory``; returns their paths."""
    model = model.cpu().eval()
    model.set_deform_mode("torchvision")
    paths = part_paths(directory)
    windows = torch.from_numpy(sample_windows(2))
    frames = windows.reshape(-1, *windows.shape[2:])  # (10, 11, 11)
    with torch.no_grad():
        feats = EncoderPart(model)(frames).reshape(windows.shape[0], windows.shape[1], -1)
    n = torch.export.Dim("n", min=1, max=65536)
    batch = torch.export.Dim("batch", min=1, max=4096)
    pairs = torch.from_numpy(pair_inputs(feats.numpy())[0])
    with torch.no_grad():
        stack = torch.from_numpy(fuse_inputs(lambda p: AlignPart(model)(torch.from_numpy(p)).numpy(), feats.numpy()))
    specs = {
        "encoder": (EncoderPart(model), frames, ENCODER_INPUT, FEATURES, {"lr_frames": {0: n}}),
        "head": (HeadPart(model), feats, FEATURES, OUTPUT, {"features": {0: batch}}),
        "align": (AlignPart(model), pairs, PAIR_FEATURES, ALIGNED, {"pair_features": {0: n}}),
        "fuse": (FusePart(model), stack, STACK, OUTPUT, {"stack": {0: batch}}),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, (module, example, in_name, out_name, dyn) in specs.items():
        torch.onnx.export(
            module.eval(),
            (example,),
            str(paths[name]),
            dynamo=True,
            opset_version=OPSET,
            input_names=[in_name],
            output_names=[out_name],
            dynamic_shapes=dyn,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    return paths


def check_parts(single: Path, parts: dict[str, Path], windows: np.ndarray, stages: int, tol: float = 1e-3) -> dict:
    """Encoder then head in ONNX Runtime equal to the single graph within ``tol``.

    Also checks what the split promises: DeformConv only in the head, and 4 convolutions per
    ISTA stage in the encoder (a fifth would be the training-only symmetry branch).
    """
    import onnx
    import onnxruntime as ort

    ops = {}
    for name, path in parts.items():
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        ops[name] = [n.op_type for n in proto.graph.node]
    if "DeformConv" in ops["encoder"] or ops["head"].count("DeformConv") == 0:
        raise RuntimeError("the DeformConv nodes must all be in the head")
    if ops["encoder"].count("Conv") != 4 * stages:
        raise RuntimeError(
            f"encoder has {ops['encoder'].count('Conv')} Conv nodes, expected {4 * stages} (symmetry branch exported?)"
        )
    if "align" in parts and (
        ops["align"].count("DeformConv") != ops["head"].count("DeformConv") or "DeformConv" in ops["fuse"]
    ):
        raise RuntimeError("the align part must hold the head's DeformConv nodes, and the fuse part none")
    cpu = ["CPUExecutionProvider"]
    sessions = {name: ort.InferenceSession(str(path), providers=cpu) for name, path in parts.items()}
    whole = ort.InferenceSession(str(single), providers=cpu)
    x = windows.astype(np.float32)
    b, w = x.shape[:2]
    feats = sessions["encoder"].run(None, {ENCODER_INPUT: x.reshape(b * w, *x.shape[2:])})[0].reshape(b, w, -1)
    got = sessions["head"].run(None, {FEATURES: feats})[0]
    want = whole.run(None, {INPUT: x})[0]
    err = float(np.abs(got - want).max())
    if not err <= tol:
        raise RuntimeError(f"encoder+head differ from the single graph by {err:.3g} (> {tol})")
    out = {
        "max_abs_diff_vs_single_graph": err,
        "parity_windows": int(b),
        "nodes": {k: len(v) for k, v in ops.items()},
        "head_deform_conv_nodes": ops["head"].count("DeformConv"),
    }
    if "align" in parts:
        maps = pair_maps(
            lambda p: sessions["align"].run(None, {PAIR_FEATURES: p})[0],
            lambda s: sessions["fuse"].run(None, {STACK: s})[0],
            feats,
        )
        out["max_abs_diff_align_fuse_vs_head"] = float(np.abs(maps - got).max())
        if not out["max_abs_diff_align_fuse_vs_head"] <= tol:
            raise RuntimeError(
                f"align+fuse differ from the head by {out['max_abs_diff_align_fuse_vs_head']:.3g} (> {tol})"
            )
    return out


def part_specs(parts: dict[str, Path], cfg: dict) -> dict[str, PartSpec]:
    """The manifest's ``parts``: file, hash and tensor specs of the encoder, the head and its halves."""
    hr = cfg["size"] * cfg["ratio"]
    io = {
        "encoder": (
            [
                {
                    "name": ENCODER_INPUT,
                    "shape": ["n", cfg["size"], cfg["size"]],
                    "dtype": "float32",
                    "units": "sensor counts (8-bit scale, 0..255), one frame per row",
                }
            ],
            [
                {
                    "name": FEATURES,
                    "shape": ["n", hr * hr],
                    "dtype": "float32",
                    "units": f"stage-{cfg['stages']} HR estimate divided by config.scale",
                }
            ],
        ),
        "head": (
            [
                {
                    "name": FEATURES,
                    "shape": ["batch", cfg["window"], hr * hr],
                    "dtype": "float32",
                    "units": "the encoder's features of the window's frames, in order",
                }
            ],
            [
                {
                    "name": OUTPUT,
                    "shape": ["batch", hr, hr],
                    "dtype": "float32",
                    "units": "brightness of the middle frame's targets at their HR cells",
                }
            ],
        ),
        "align": (
            [
                {
                    "name": PAIR_FEATURES,
                    "shape": ["n", cfg["window"], hr * hr],
                    "dtype": "float32",
                    "units": "features of the middle frame (row 2) and of one neighbour (its window "
                    "position's row), zeros elsewhere",
                }
            ],
            [
                {
                    "name": ALIGNED,
                    "shape": ["n", hr * hr],
                    "dtype": "float32",
                    "units": "the neighbour aligned to the middle frame, network units",
                }
            ],
        ),
        "fuse": (
            [
                {
                    "name": STACK,
                    "shape": ["batch", cfg["window"], hr * hr],
                    "dtype": "float32",
                    "units": "the 4 aligned neighbours in their window positions, the middle frame's features in row 2",
                }
            ],
            [
                {
                    "name": OUTPUT,
                    "shape": ["batch", hr, hr],
                    "dtype": "float32",
                    "units": "brightness of the middle frame's targets at their HR cells",
                }
            ],
        ),
    }
    return {
        name: file_spec(path.parent, path.name, PartSpec, inputs=io[name][0], outputs=io[name][1])
        for name, path in parts.items()
    }


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
    return {
        "deform_conv_nodes": n_deform,
        "nodes": len(ops),
        "max_abs_diff_vs_torch": err,
        "parity_windows": len(windows),
    }


def write_manifest(
    directory: Path, ckpt: dict, checks: dict, parts: dict[str, PartSpec], extra: dict
) -> tuple[Manifest, Provenance]:
    """The manifest and provenance of the model folder ``directory`` (``extra``: the version,
    post-processing defaults, commands and reports of this export)."""
    cfg = ckpt["config"]
    interface = Interface.model_validate(
        {
            "opset": OPSET,
            "inputs": [
                {
                    "name": INPUT,
                    "shape": ["batch", cfg["window"], cfg["size"], cfg["size"]],
                    "dtype": "float32",
                    "units": "sensor counts (8-bit scale, 0..255)",
                }
            ],
            "outputs": [
                {
                    "name": OUTPUT,
                    "shape": ["batch", cfg["size"] * cfg["ratio"], cfg["size"] * cfg["ratio"]],
                    "dtype": "float32",
                    "units": "brightness of the middle frame's targets at their HR cells",
                }
            ],
            "config": cfg,
            "parameters": ckpt.get("parameters"),
            "physics": {
                "size": cfg["size"],
                "ratio": cfg["ratio"],
                "psf_sigma": cfg["psf_sigma"],
                "hr_cell_centre": "(i + 0.5) / ratio - 0.5 LR px",
                "qinit": "least squares on the training split",
            },
            "postprocess": extra.pop("postprocess"),
        }
    )
    manifest = Manifest(
        name="derefnet",
        version=extra.pop("version", "0.1.0"),
        interface=interface,
        model=file_spec(directory, MODEL_FILE),
        parts=parts,
    )
    provenance = Provenance(
        export={
            "exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}",
            **checks,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": extra.pop("export_command"),
        },
        training={
            "commands": extra.pop("train_commands") or ckpt["state"].get("commands") or [ckpt.get("command")],
            "steps": ckpt["state"]["step"],
            "train_seconds": round(ckpt["state"]["train_seconds"], 1),
            "hardware": ckpt.get("hardware"),
            "loss_weights": ckpt.get("loss_weights"),
            "validation_history": ckpt["state"].get("history"),
            "args": ckpt.get("args"),
        },
        **extra,
    )
    return write_package(directory, manifest, provenance), provenance


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csist export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="training checkpoint (.pt); required unless --metrics-only"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("models/derefnet"),
        help="model folder to write: model.onnx, its parts, manifest.json and provenance.json",
    )
    p.add_argument("--version", default="0.1.0", help="model version recorded in the manifest")
    p.add_argument(
        "--eval-report",
        type=Path,
        action="append",
        default=[],
        help="JSON report(s) of `csist evaluate` to record as the model's metrics (repeatable)",
    )
    p.add_argument(
        "--data-command",
        action="append",
        default=[],
        help="the csist simulate command(s) that made the data (repeatable)",
    )
    p.add_argument(
        "--default-refine",
        default="fit",
        choices=REFINE_MODES,
        help="refine mode the service uses when a request names none (recorded in the manifest)",
    )
    p.add_argument("--default-threshold", type=float, default=70.0, help="peak threshold the service uses by default")
    p.add_argument(
        "--train-command",
        action="append",
        default=[],
        help="training command(s) to record in the provenance (default: those stored in the checkpoint)",
    )
    p.add_argument("--parity-windows", type=int, default=16, help="simulated windows for the ONNX vs PyTorch check")
    p.add_argument(
        "--tolerance", type=float, default=1e-3, help="max abs difference allowed between ONNX Runtime and PyTorch"
    )
    p.add_argument(
        "--metrics-only",
        action="store_true",
        help="export nothing: replace the metrics of the model in --out with --eval-report (after a "
        "post-processing change); its model.onnx must still match the manifest's sha256",
    )
    p.add_argument(
        "--no-parts",
        action="store_true",
        help="do not write the streaming parts (encoder.onnx, head.onnx, align.onnx, fuse.onnx)",
    )
    return p


def read_metrics(reports: list[Path]) -> dict:
    """Metrics from `csist evaluate` reports: one entry per report (and refine mode)."""
    metrics = {}
    for report in reports:
        doc = json.loads(report.read_text())
        for r in doc.get("reports", [doc]):
            metrics[f"{report.stem}:{r.get('split', 'test')}:refine={r.get('refine', 'none')}"] = r
    return metrics


def update_metrics(directory: Path, reports: list[Path], command: str) -> Provenance:
    """Replace the metrics in the provenance of the model in ``directory``; its single graph must
    be the one its manifest describes."""
    try:
        package = load_package(directory)
    except PackageError as exc:
        raise SystemExit(f"csist export: error: {exc}") from None
    model = package.model_file
    if not model.is_file() or file_sha256(model) != package.sha256:
        raise SystemExit(
            f"csist export: error: {model} does not match the sha256 in {package.manifest_path}; export it anew"
        )
    provenance = package.provenance.model_copy(
        update={
            "metrics": read_metrics(reports),
            "metrics_updated": {
                "command": command,
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            },
        }
    )
    write_package(package.directory, package.manifest, provenance)
    return provenance


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "csist export " + " ".join(sys.argv[2:] if argv is None else argv)
    if args.metrics_only:
        if not args.eval_report:
            raise SystemExit("csist export: error: --metrics-only needs at least one --eval-report")
        provenance = update_metrics(args.out, args.eval_report, command)
        print(f"updated the metrics of {args.out}: {', '.join(provenance.metrics)}")
        return 0
    if args.checkpoint is None:
        raise SystemExit("csist export: error: --checkpoint is required (unless --metrics-only)")
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    if args.out.suffix == ".onnx":
        folder = args.out.with_suffix("")
        raise SystemExit(f"csist export: error: --out is the model folder (e.g. {folder}), not a file")
    model = load_checkpoint_model(args.checkpoint)
    single = args.out / MODEL_FILE
    export_onnx(model, single)
    parity = sample_windows(args.parity_windows, seed=12345)
    checks = check_onnx(model, single, parity, args.tolerance)
    parts = {}
    if not args.no_parts:
        paths = export_parts(model, args.out)
        checks["parts"] = check_parts(single, paths, parity, ckpt["config"]["stages"], args.tolerance)
        parts = part_specs(paths, ckpt["config"])
    metrics = read_metrics(args.eval_report)
    manifest, _ = write_manifest(
        args.out,
        ckpt,
        checks,
        parts,
        {
            "version": args.version,
            "export_command": command,
            "train_commands": args.train_command,
            "postprocess": {"threshold": args.default_threshold, "refine": args.default_refine, "mode": DEFAULT_MODE},
            "data": {"commands": args.data_command},
            "metrics": metrics,
            "host": {"machine": platform.machine(), "python": platform.python_version()},
        },
    )
    print(
        f"wrote {single} ({manifest.model.bytes} bytes, sha256 {manifest.model.sha256[:12]}..., "
        f"{checks['deform_conv_nodes']} DeformConv nodes, max |onnx - torch| {checks['max_abs_diff_vs_torch']:.2e})"
    )
    for part in manifest.parts.values():
        print(f"wrote {args.out / part.file} ({part.bytes} bytes, sha256 {part.sha256[:12]}...)")
    if parts:
        print(f"max |encoder+head - single graph| {checks['parts']['max_abs_diff_vs_single_graph']:.2e}")
        split_for_native_kernel(args.out, parity)
    print(f"wrote {args.out / 'manifest.json'} and {args.out / 'provenance.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
