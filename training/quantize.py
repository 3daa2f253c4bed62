"""Make an int8 variant of an exported DeRefNet (static QDQ): a model folder of its own.

    csist quantize --model models/derefnet --out models/derefnet-int8
    csist quantize --model models/derefnet --out models/derefnet-int8 --head \
        --eval-data data/seqcsist-test-s1001 --max-map-drop 0.5    # how the bundled one was made
    CSIST_MODEL_PATH=models/derefnet-int8 csist serve

Reads a model folder written by ``csist export`` (single graph + streaming encoder and head,
listed in its manifest) and writes the folder ``--out``: ``model.onnx``, ``encoder.onnx`` and
``head.onnx`` (quantized with ``--head``, else a copy of the float32 head), ``manifest.json``
(the float32 interface, its own hashes, and ``quantized_from``: the float32 folder and its hash,
against which the service checks the int8 maps) and ``provenance.json`` (the float32 model's
export and training records, a ``precision`` record and a ``quantization`` record holding the
command). The service loads the result like any model and verifies every hash.

What is quantized: by default the encoder's ``Conv`` and ``MatMul`` nodes (the 9 ISTA stages)
in the encoder part and in the single graph, with ONNX Runtime's static QDQ quantization: int8
weights (per output channel unless ``--no-per-channel``), uint8 activations with scales from
min/max calibration. ``--head`` also quantizes the head's convolutions; ``DeformConv`` is never
quantized (ONNX Runtime has no int8 kernel for it; it computes in float32 on float inputs).
Calibration runs on simulated LR frames of ``--seed`` (default 9401, a seed not used by the
training, test or benchmark data), through the fp32 encoder for the head's features.

``--eval-data`` scores the fp32 and the int8 model on that split the way the service runs a
stream (encoder on every frame once, then the head on every window; refine none, threshold 70,
cell peaks as ``csist evaluate``) and records both CSO-mAPs in the provenance; with
``--max-map-drop`` the command fails (exit 1, files removed) when int8 loses more than that.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from service.modelpkg.manifest import (
    MODEL_FILE,
    Manifest,
    ModelPackage,
    PackageError,
    PartSpec,
    Provenance,
    SourceSpec,
    file_sha256,
    file_spec,
    load_package,
    write_package,
)
from service.modelpkg.model import ENCODER, HEAD, session_options
from service.science.windows import WINDOW
from training.data import windows
from training.parts import part_paths
from training.split_head import split_for_native_kernel

DEFAULT_SEED = 9401  # not a seed of the training/test/benchmark data of this project
# Graph nodes whose weights come from the head carry initializers named "head.*" (the exporter
# keeps the PyTorch parameter names), which is how the single graph's head is told apart.
HEAD_PREFIX = "head."


def calibration_frames(trajectories: int, seed: int) -> np.ndarray:
    """(n, T, 11, 11) float32 8-bit LR frames of ``csist simulate --seed SEED`` trajectories."""
    from training.simulate import SimParams, render, simulate_trajectory, trajectory_rngs

    params = SimParams()
    out = []
    for rng in trajectory_rngs(seed, trajectories):
        clean, _ = simulate_trajectory(rng, params)
        out.append(render(clean, params.noise, rng, False).astype(np.float32))
    return np.stack(out)


class ArrayReader:
    """Calibration batches of one input for ``quantize_static`` (a CalibrationDataReader)."""

    def __init__(self, name: str, data: np.ndarray, batch: int = 64):
        self.batches = [{name: np.ascontiguousarray(data[i : i + batch])} for i in range(0, len(data), batch)]
        self.index = 0

    def get_next(self):
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return self.batches[self.index - 1]

    def rewind(self):
        self.index = 0


def nodes_to_quantize(path: Path, ops: list[str], head: bool) -> list[str]:
    """Names of the nodes to quantize: ``ops`` nodes, the head's only with ``head``; never DeformConv."""
    import onnx

    graph = onnx.load(str(path)).graph
    names = []
    for node in graph.node:
        if node.op_type not in ops or node.op_type == "DeformConv":
            continue
        in_head = any(i.startswith(HEAD_PREFIX) for i in node.input)
        if head or not in_head:
            names.append(node.name)
    return names


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def run_batched(sess, x: np.ndarray, batch: int) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def quantize_graph(
    src: Path, dst: Path, reader: ArrayReader, ops: list[str], head: bool, per_channel: bool, method: str
) -> dict:
    """Static QDQ quantization of the selected nodes of ``src`` into ``dst``; returns what was done."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # ONNX shape inference first, as the quantizer asks; the symbolic pass does not know
        # DeformConv (it fails on the head), and the exporter's shapes are enough without it.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        nodes = nodes_to_quantize(pre, ops, head)
        if not nodes:
            raise RuntimeError(f"{src}: no {'/'.join(ops)} node to quantize")
        quantize_static(
            str(pre),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,  # u8 x s8 is the VNNI/AMX fast path of ORT's kernels
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            op_types_to_quantize=ops,
            nodes_to_quantize=nodes,
            calibrate_method=methods[method],
            extra_options={"CalibTensorRangeSymmetric": False},
        )
    proto = onnx.load(str(dst))
    onnx.checker.check_model(proto, full_check=False)
    ops_after = [n.op_type for n in proto.graph.node]
    return {
        "nodes_quantized": len(nodes),
        "quantize_linear_nodes": ops_after.count("QuantizeLinear"),
        "deform_conv_nodes": ops_after.count("DeformConv"),
    }


def check_deform_fp32(path: Path) -> None:
    """DeformConv must still compute in float: its weight must not come out of a DequantizeLinear."""
    import onnx

    graph = onnx.load(str(path)).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "DeformConv" and made_by.get(node.input[1]) == "DequantizeLinear":
            raise RuntimeError(f"{path}: DeformConv {node.name} got quantized weights")


def stream_maps(encoder, head, frames: np.ndarray, batch: int = 64) -> np.ndarray:
    """``training.evaluate.stream_maps`` (the service's streaming order) on two ORT sessions."""
    from training.evaluate import stream_maps as streamed

    def call(sess):
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]

    return streamed(call(encoder), call(head), frames, batch)


def evaluate_stream(encoder, head, split, threshold: float, refine: str) -> dict:
    """CSO-mAP report of encoder + head on a split (``csist evaluate``'s scoring)."""
    from training.evaluate import score_maps

    t0 = time.perf_counter()
    maps = stream_maps(encoder, head, split.frames)
    seconds = time.perf_counter() - t0
    report, _ = score_maps(maps, split, threshold, refine)
    keep = (
        "frames",
        "targets",
        "AP05",
        "AP10",
        "AP15",
        "AP20",
        "AP25",
        "mAP",
        "count_accuracy",
        "localisation_error_px",
        "by_count",
    )
    return {
        **{k: report[k] for k in keep},
        "inference_seconds": seconds,
        "refine": refine,
        "threshold": threshold,
        "path": "encoder+head (streaming, as the service)",
    }


def parity(single_fp32, single_q, parts_fp32: dict, parts_q: dict, held_out: np.ndarray) -> dict:
    """Max and mean |int8 - fp32| of the HR maps (sensor units) on held-out windows."""
    b = len(held_out)
    flat = held_out.reshape(-1, *held_out.shape[2:])

    def parts_run(p):
        return p[HEAD].run(None, {"features": p[ENCODER].run(None, {"lr_frames": flat})[0].reshape(b, WINDOW, -1)})[0]

    ref = single_fp32.run(None, {"lr": held_out})[0]
    got_single = single_q.run(None, {"lr": held_out})[0]
    got_parts = parts_run(parts_q)
    ref_parts = parts_run(parts_fp32)
    return {
        "windows": int(b),
        "hr_peak": float(np.abs(ref).max()),
        "single_graph_max_abs_diff": float(np.abs(got_single - ref).max()),
        "single_graph_mean_abs_diff": float(np.abs(got_single - ref).mean()),
        "parts_max_abs_diff": float(np.abs(got_parts - ref_parts).max()),
        "parts_mean_abs_diff": float(np.abs(got_parts - ref_parts).mean()),
    }


def build_package(source: ModelPackage, out: Path, paths: dict[str, Path], info: dict) -> tuple[Manifest, Provenance]:
    """The int8 folder ``out``'s manifest (the float32 interface with the int8 files' hashes, no
    plans: main() splits this model's own head) and provenance (the float32 model's records, the
    precision and quantization records, and only the metrics measured on the int8 model)."""
    parts = {  # the float32 align/fuse are not this model's
        name: file_spec(out, path.name, PartSpec, **source.parts[name].model_dump(include={"inputs", "outputs"}))
        for name, path in paths.items()
    }
    manifest = Manifest(
        name=source.name,  # same name (clients address /v2/models/<name>); the variant shows in the version
        version=f"{source.version}+int8",
        interface=source.manifest.interface,
        model=file_spec(out, MODEL_FILE),
        parts=parts,
        quantized_from=SourceSpec(
            package=Path(os.path.relpath(source.directory.resolve(), out.resolve())).as_posix(), sha256=source.sha256
        ),
    )
    records = source.provenance.model_dump(include={"export", "training", "data", "host"})
    provenance = Provenance(**records, precision=info.pop("precision"), metrics=info.pop("metrics"), quantization=info)
    return manifest, provenance


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csist quantize", description=__doc__, formatter_class=_Formatter)
    p.add_argument(
        "--model",
        type=Path,
        default=Path("models/derefnet"),
        help="float32 model folder written by `csist export`; its manifest must list the parts",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("models/derefnet-int8"),
        help="int8 model folder to write (model.onnx, encoder.onnx, head.onnx, manifest.json, provenance.json)",
    )
    p.add_argument(
        "--ops", default="Conv,MatMul", help="comma-separated op types to quantize (DeformConv is always left fp32)"
    )
    p.add_argument("--head", action="store_true", help="also quantize the head's convolutions (default: encoder only)")
    p.add_argument(
        "--per-channel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one weight scale per output channel (default) or per tensor",
    )
    p.add_argument(
        "--method",
        default="minmax",
        choices=("minmax", "entropy", "percentile"),
        help="calibration method for activation ranges",
    )
    p.add_argument(
        "--calibration-trajectories", type=int, default=64, help="simulated 20-frame trajectories to calibrate on"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="simulation seed of the calibration data (keep it apart from test seeds)",
    )
    p.add_argument(
        "--parity-windows",
        type=int,
        default=32,
        help="held-out simulated windows for the int8 vs fp32 difference in the provenance",
    )
    p.add_argument(
        "--eval-data", type=Path, default=None, help="data set root (csist simulate output) to score fp32 and int8 on"
    )
    p.add_argument("--eval-split", default="test", help="split of --eval-data to score")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N trajectories")
    p.add_argument("--threshold", type=float, default=70.0, help="peak threshold of the evaluation")
    p.add_argument(
        "--max-map-drop",
        type=float,
        default=None,
        help="with --eval-data: fail (and remove the int8 files) if CSO-mAP drops more than this",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime threads for calibration and evaluation (0: default)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    import onnxruntime as ort

    try:
        source = load_package(args.model)
    except PackageError as exc:
        print(f"csist quantize: {exc}", file=sys.stderr)
        return 2
    if not {ENCODER, HEAD} <= set(source.parts):
        print(f"csist quantize: {source.manifest_path} lists no encoder and head (export with parts)", file=sys.stderr)
        return 2
    if args.out.resolve() == source.directory.resolve():
        print("csist quantize: --out must differ from --model (each model is a folder of its own)", file=sys.stderr)
        return 2
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    src_model = source.model_file
    src_parts = {k: source.directory / v.file for k, v in source.parts.items()}
    wanted = {src_model: source.sha256, **{src_parts[k]: v.sha256 for k, v in source.parts.items()}}
    for path, want in wanted.items():
        digest = file_sha256(path)
        if digest != want.lower():
            print(f"csist quantize: {path} has sha256 {digest}, its manifest says {want}", file=sys.stderr)
            return 2
    # the int8 model streams through encoder + head; its manifest lists no align/fuse parts
    out_parts = {k: v for k, v in part_paths(args.out).items() if k in (ENCODER, HEAD)}
    out_model = args.out / MODEL_FILE
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    frames = calibration_frames(args.calibration_trajectories, args.seed)
    enc32, head32 = session(src_parts[ENCODER], args.threads), session(src_parts[HEAD], args.threads)
    feats = run_batched(enc32, frames.reshape(-1, *frames.shape[2:]), 320).reshape(*frames.shape[:2], -1)
    readers = {
        ENCODER: ArrayReader("lr_frames", frames.reshape(-1, *frames.shape[2:])),
        HEAD: ArrayReader("features", windows(feats)),
        "single": ArrayReader(source.inputs[0].name, windows(frames)),
    }
    graphs = {}
    graphs[ENCODER] = quantize_graph(
        src_parts[ENCODER], out_parts[ENCODER], readers[ENCODER], ops, True, args.per_channel, args.method
    )
    if args.head:
        graphs[HEAD] = quantize_graph(
            src_parts[HEAD], out_parts[HEAD], readers[HEAD], ["Conv"], True, args.per_channel, args.method
        )
    else:
        shutil.copyfile(src_parts[HEAD], out_parts[HEAD])  # a model folder holds every file it runs
    graphs["single"] = quantize_graph(
        src_model,
        out_model,
        readers["single"],
        ops if not args.head else sorted(set(ops) | {"Conv"}),
        args.head,
        args.per_channel,
        args.method,
    )
    for path in (out_model, *out_parts.values()):
        check_deform_fp32(path)
    quant_seconds = time.perf_counter() - t0

    held_out = windows(calibration_frames(max(1, -(-args.parity_windows // 16)), args.seed + 1))[: args.parity_windows]
    parts_q = {k: session(p, args.threads) for k, p in out_parts.items()}
    diff = parity(
        session(src_model, args.threads),
        session(out_model, args.threads),
        {ENCODER: enc32, HEAD: head32},
        parts_q,
        np.ascontiguousarray(held_out),
    )

    metrics, comparison = {}, None
    if args.eval_data is not None:
        from training.data import read_split

        split = read_split(args.eval_data, args.eval_split, limit=args.eval_limit)
        fp32 = evaluate_stream(enc32, head32, split, args.threshold, "none")
        int8 = evaluate_stream(parts_q[ENCODER], parts_q[HEAD], split, args.threshold, "none")
        key = f"{args.eval_data.name}:{args.eval_split}:refine=none"
        metrics[key] = {**int8, "data": str(args.eval_data), "trajectories": split.n_trajectories}
        comparison = {
            "data": str(args.eval_data),
            "split": args.eval_split,
            "trajectories": split.n_trajectories,
            "fp32_mAP": fp32["mAP"],
            "int8_mAP": int8["mAP"],
            "drop": fp32["mAP"] - int8["mAP"],
            "max_drop": args.max_map_drop,
        }
        print(
            f"CSO-mAP (refine none, encoder+head) on {args.eval_data}/{args.eval_split}: "
            f"fp32 {fp32['mAP']:.2f}  int8 {int8['mAP']:.2f}  drop {comparison['drop']:.2f}"
        )
        if args.max_map_drop is not None and comparison["drop"] > args.max_map_drop:
            for path in (out_model, *out_parts.values()):
                path.unlink(missing_ok=True)
            print(
                f"csist quantize: CSO-mAP drop {comparison['drop']:.2f} > {args.max_map_drop}; int8 files removed",
                file=sys.stderr,
            )
            return 1

    command = "csist quantize " + " ".join(argv)
    head_precision = "int8 convolutions (QDQ), DeformConv float32" if args.head else "float32"
    info = {
        "precision": {
            "single": f"encoder int8 (QDQ), head {head_precision}",
            ENCODER: "int8 (QDQ)",
            HEAD: head_precision,
            "io": "float32",
        },
        "metrics": metrics,
        "tool": f"onnxruntime.quantization.quantize_static, onnxruntime {ort.__version__}",
        "format": "QDQ",
        "weights": f"int8, {'per channel' if args.per_channel else 'per tensor'}",
        "activations": "uint8, per tensor",
        "ops": ops if not args.head else sorted(set(ops) | {"Conv"}),
        "calibration": {
            "method": args.method,
            "data": "training.simulate trajectories (clean 8-bit)",
            "seed": args.seed,
            "trajectories": args.calibration_trajectories,
            "frames": int(frames.shape[0] * frames.shape[1]),
        },
        "graphs": graphs,
        "parity": {**diff, "seed": args.seed + 1},
        "evaluation": comparison,
        "source": {
            "package": str(args.model),
            "sha256": source.sha256,
            "mAP": {k: v.get("mAP") for k, v in source.metrics.items() if isinstance(v, dict)},
        },
        "seconds": round(quant_seconds, 1),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    manifest, provenance = build_package(source, args.out, out_parts, info)
    write_package(args.out, manifest, provenance)
    print(f"wrote {args.out}: {', '.join(f.file for f in manifest.files)} and manifest.json")
    split_for_native_kernel(args.out, held_out)
    print(
        f"max |int8 - fp32| on {diff['windows']} held-out windows: single graph "
        f"{diff['single_graph_max_abs_diff']:.3g}, "
        f"encoder+head {diff['parts_max_abs_diff']:.3g} (peak {diff['hr_peak']:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
