"""Cut the streaming encoder and head at their 32-channel Convs, for the bfloat16 AMX kernel.

    csist split-amx --model models/derefnet                      # split and check (AMX CPU needed)
    csist split-amx --model models/derefnet --eval-data data/seqcsist-test-s1001 \
        --max-map-drop 0.5                                       # how the bundled model was split
    CSIST_PLAN=onnxruntime csist serve                           # serve without it

On a CPU with AMX (Intel Sapphire Rapids and later) ``service/kernels/conv.py`` computes a 3x3 Conv with
32-channel input several times faster than ONNX Runtime's float32 Conv, in bfloat16 with float32
sums. The service cannot put it inside an ONNX Runtime graph, so, as ``csist split-head`` does
for the DeformConv nodes, this command cuts the streaming parts (``parts.encoder`` and
``parts.head`` of the manifest, and the head's halves ``parts.align`` and ``parts.fuse`` when it
lists them) into the graph segments between the nodes the native kernels compute
(every DeformConv, every Conv the AMX or direct kernel takes, with a Relu or soft threshold
after it folded in, and the head's selective attention as one float32 step when its nodes are
exactly that function, see ``selective_attention`` in training/split_head.py):
``amx/encoder.seg<i>.onnx`` / ``amx/head.seg<i>.onnx`` in the model folder and their weights in
``amx/encoder.weights.npz`` / ``amx/head.weights.npz``. The manifest's plan ``amx_split``
records the files, their SHA-256 and the steps, the provenance (``plans.amx_split.check``) the
checks:

- the cut: segments with ONNX Runtime's own float32 nodes between them vs the whole part (must
  stay within ``--tolerance``),
- each kernel vs ONNX Runtime's node on the same tensors (the AMX Conv within
  ``--bf16-tolerance``: bfloat16 keeps 8 significant bits),
- the convs the service chains (service/kernels/conv.py ``ConvChain``) vs the same convs one by one
  (``chains_vs_steps_*``, within ``--tolerance``; they compute the same numbers),
- the split as the service runs it vs the whole part (recorded),
- the head's halves as the service runs a window through them (align per neighbour, then fuse)
  vs the split head (``amx_pairs_vs_head``, within ``--bf16-tolerance``; they run the same
  kernels on the same rows, so it is 0 on the bundled model),
- with ``--eval-data``: the CSO-mAP of the streaming path with ONNX Runtime's float32 Convs and
  with the AMX kernel (same threshold and refinement), and with ``--max-map-drop`` the command
  fails, leaving the previous split in place, when bfloat16 loses more than that.

On a host without AMX, ``--float32-check`` cuts the same way and checks the cut with the float32
direct kernel (and the native float32 DeformConv) in place of the AMX kernels: the cut, every
kernel against ONNX Runtime's node and the chains, as above, within ``--tolerance``. The
bfloat16 numbers are then not checked by this command; the service checks every plan's maps
against the reference maps before it serves it (service/engine/select.py), so an AMX host
serves the split only where they agree, and the provenance says which check ran.

Only a float32 model's Convs qualify (an int8 model's weights come out of DequantizeLinear).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np

from service.modelpkg.manifest import AMX_SPLIT, AmxSplitSpec, PackageError
from training.parts import fuse_inputs, pair_inputs, pair_maps
from training.split_head import (
    PartSplit,
    SplitError,
    check_graph,
    load_part,
    onnxruntime_conv,
    relative,
    replace_plan,
    split_graph,
)


def evaluate_kernels(
    model_path: Path,
    data: Path,
    split_name: str,
    limit: int | None,
    threshold: float,
    refines: list[str],
    threads: int,
) -> dict:
    """CSO-mAP of the streaming path with float32 Convs (ONNX Runtime) and with the AMX kernel
    (``model_path``: the model folder, or a manifest naming a split under test)."""
    from service.modelpkg.model import load_model
    from training.data import read_split
    from training.evaluate import score_maps, stream_maps

    split = read_split(data, split_name, limit=limit)
    out = {"data": str(data), "split": split_name, "threshold": threshold, "trajectories": int(split.frames.shape[0])}
    for kernel in ("onnxruntime", "amx"):
        model = load_model(model_path, providers=["CPUExecutionProvider"], threads=threads, conv_kernel=kernel)
        t0 = time.perf_counter()
        maps = stream_maps(model.encode, model.head, split.frames)
        seconds = time.perf_counter() - t0
        out[kernel] = {"inference_seconds": round(seconds, 2)}
        for refine in refines:
            report, _ = score_maps(maps, split, threshold, refine)
            out[kernel][f"refine={refine}"] = {k: report[k] for k in ("mAP", "AP05", "AP10", "count_accuracy")}
    out["map_drop"] = {r: out["onnxruntime"][f"refine={r}"]["mAP"] - out["amx"][f"refine={r}"]["mAP"] for r in refines}
    return out


def split_amx(
    model_path: Path,
    frames: np.ndarray,
    tolerance: float,
    bf16_tolerance: float,
    command: str,
    evaluation: dict | None = None,
    max_map_drop: float | None = None,
    float32_check: bool = False,
) -> tuple[AmxSplitSpec, dict]:
    """Split encoder and head of the model folder ``model_path``, check, optionally score, and
    record the plan ``amx_split`` (manifest) and its checks (provenance); returns both.
    ``float32_check``: check with the float32 kernels in place of AMX (module docstring)."""
    from service.kernels import conv
    from service.modelpkg.model import load_model

    if not conv.AMX and not float32_check:
        raise SplitError(
            f"the AMX kernel cannot run here, so the split cannot be checked: {conv.WHY_NOT_AMX} "
            "(--float32-check checks the cut with the float32 kernels instead)"
        )
    if float32_check and evaluation is not None:
        raise SplitError("--eval-data scores the AMX kernel, which --float32-check does not run")
    package, _ = load_part(model_path, "encoder")
    names = [name for name in ("encoder", "head", "align", "fuse") if name in package.parts]
    splits = {
        name: PartSplit(
            package.directory,
            AMX_SPLIT,
            name,
            package.parts[name],
            *split_graph(package.directory / package.parts[name].file, convs=True),
        )
        for name in names
    }
    if not any(s.get("kernel") == "amx" for s in splits["encoder"].steps):
        raise SplitError(f"the encoder of {model_path} has no Conv the AMX kernel computes (float32, 32-channel input)")
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def entry(suffix):
        return AmxSplitSpec(precision="bfloat16", **{name: s.entry(suffix) for name, s in splits.items()})

    def check(tmp_manifest):
        # each kernel is checked on its own; the service then runs runs of convs as chains
        if float32_check:
            model, split, chained = _float32_splits(tmp_manifest)
        else:
            model = load_model(
                tmp_manifest,
                providers=["CPUExecutionProvider"],
                conv_kernel="amx",
                fuse_convs=False,
                whole_parts=True,
            )
            chain_model = load_model(tmp_manifest, providers=["CPUExecutionProvider"], conv_kernel="amx")
            split = {name: getattr(model, f"split_{name}") for name in splits}
            chained = {name: getattr(chain_model, f"split_{name}") for name in splits}
        flat = frames.reshape(-1, *frames.shape[2:])
        feats = model.parts["encoder"].run(flat).reshape(*frames.shape[:2], -1)
        inputs = {"encoder": flat, "head": feats}
        if "align" in splits:
            inputs["align"] = pair_inputs(feats)[0]
            inputs["fuse"] = fuse_inputs(split["align"].run, feats)
        diffs = {}
        for name, x in inputs.items():  # keys of parts after the encoder get the part's name
            diffs.update(
                {
                    k if name == "encoder" or k.endswith(name) else f"{name}_{k}": v
                    for k, v in check_graph(split[name], model.parts[name], x).items()
                }
            )
        if "align" in splits and not float32_check:  # the service's pair path against the head, both through AMX
            diffs["amx_pairs_vs_head"] = relative(
                pair_maps(model.align, model.fuse, feats), model.split_head.run(feats)
            )
        for name, x in inputs.items():
            if chained is not None:  # the chains are of AMX convs
                diffs[f"chains_vs_steps_{name}"] = relative(chained[name].run(x), split[name].run(x))
        # ONNX Runtime's Conv in place of AMX, against itself, says nothing
        diffs = {k: v for k, v in diffs.items() if "onnxruntime_conv_kernel_vs" not in k}
        for key in diffs:
            limit = bf16_tolerance if "amx_" in key else (None if "split_vs" in key else tolerance)
            if limit is not None and not diffs[key] <= limit:
                raise SplitError(f"{key} is {diffs[key]:.3g} of the largest output (> {limit})")
        result = {
            "windows": int(frames.shape[0]),
            "relative_diff": diffs,
            "tolerance_relative": tolerance,
            "bf16_tolerance_relative": bf16_tolerance,
        }
        if float32_check:
            result["kernels"] = (
                f"float32 in place of AMX (no AMX here: {conv.WHY_NOT_AMX}): ONNX Runtime's Conv node, the "
                "native float32 DeformConv; the service checks the bfloat16 maps against the reference maps "
                "before it serves the plan"
            )
        if evaluation is not None:
            acc = evaluate_kernels(tmp_manifest, **evaluation)
            result["accuracy"] = acc
            worst = max(acc["map_drop"].values())
            if max_map_drop is not None and worst > max_map_drop:
                raise SplitError(f"CSO-mAP drops by {worst:.3f} with the AMX kernel (> --max-map-drop {max_map_drop})")
        return result

    record = {"command": command, "date": date}
    return replace_plan(package, AMX_SPLIT, list(splits.values()), entry, check, record)


class _OnnxruntimeConv:
    """A Conv step of the split computed by ONNX Runtime's float32 node (with the attributes
    ``check_graph`` reads), where the AMX kernel cannot run."""

    kernel = "onnxruntime"

    def __init__(self, weight, bias, activation, clip, residual):
        self.weight, self.bias, self.activation, self.clip, self.residual = weight, bias, activation, clip, residual
        self.run = onnxruntime_conv(weight, bias, activation, clip, residual)

    def __call__(self, *xs):
        return self.run(*xs)


def _float32_splits(manifest: Path):
    """The model of ``manifest`` with its parts whole (ONNX Runtime), and its AMX split with float32
    kernels in place of the AMX ones: ONNX Runtime's Conv node, the native float32 DeformConv
    (the direct Conv and the selective attention as the service runs them)."""
    import onnxruntime as ort

    from service.kernels import attention, conv, deform
    from service.modelpkg.manifest import load_package
    from service.modelpkg.model import ATTENTION_WEIGHTS, SplitGraph, Step, load_model

    model = load_model(
        manifest,
        providers=["CPUExecutionProvider"],
        deform_kernel="onnxruntime",
        conv_kernel="onnxruntime",
        whole_parts=True,
    )
    card = load_package(manifest)
    split = {}
    for name in ("encoder", "head", "align", "fuse"):
        spec = getattr(card.amx_split, name)
        if spec is None:
            continue
        sessions = [
            None
            if seg is None
            else ort.InferenceSession(str(card.directory / seg.file), providers=["CPUExecutionProvider"])
            for seg in spec.segments
        ]
        with np.load(card.directory / spec.weights.file, allow_pickle=False) as arrays:
            w = {key: arrays[key] for key in arrays.files}
        steps = []
        for st in spec.steps:
            if st.op == "Attention":
                kernel = attention.SelectiveAttention(
                    w[st.weight], w[st.bias], *(w[st.extra[k]] for k in ATTENTION_WEIGHTS)
                )
            elif st.op == "DeformConv":
                kernel = deform.DeformConv3x3(w[st.weight], w[st.bias], 0, "native")
            elif st.kernel == "direct":
                kernel = conv.Conv3x3(w[st.weight], w[st.bias], "direct", st.activation, st.clip, 1, st.residual)
            else:
                kernel = _OnnxruntimeConv(w[st.weight], w[st.bias], st.activation, st.clip, st.residual)
            steps.append(Step(st.op, tuple(st.inputs), st.output, kernel))
        split[name] = SplitGraph(name, sessions, steps, spec.input, spec.output)
    return model, split, None


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csist split-amx", description=__doc__, formatter_class=_Formatter)
    p.add_argument(
        "--model",
        type=Path,
        default=Path("models/derefnet"),
        help="float32 model folder whose manifest lists the streaming parts",
    )
    p.add_argument("--parity-windows", type=int, default=16, help="simulated windows for the checks")
    p.add_argument("--seed", type=int, default=12345, help="seed of those windows")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed |cut - part| and |native DeformConv - ONNX Runtime|, relative to the largest output",
    )
    p.add_argument(
        "--bf16-tolerance",
        type=float,
        default=2e-2,
        help="largest allowed |AMX Conv - ONNX Runtime Conv|, relative to the largest output",
    )
    p.add_argument(
        "--eval-data", type=Path, default=None, help="data set root (csist simulate output) to score both kernels on"
    )
    p.add_argument("--eval-split", default="test", help="split of --eval-data to score")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N trajectories")
    p.add_argument("--threshold", type=float, default=70.0, help="peak threshold of the evaluation")
    p.add_argument("--refine", nargs="+", default=["none"], help="refinements to score (as csist evaluate --refine)")
    p.add_argument(
        "--max-map-drop",
        type=float,
        default=None,
        help="with --eval-data: fail (keeping the previous split) if CSO-mAP drops more than this",
    )
    p.add_argument("--threads", type=int, default=0, help="threads for the evaluation (0: one per core)")
    p.add_argument(
        "--float32-check",
        action="store_true",
        help="on a host without AMX: check the cut with the float32 kernels in place of AMX (the service "
        "checks the bfloat16 maps before it serves the plan)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from service.modelpkg.model import ModelError
    from training.parts import sample_windows

    command = "csist split-amx " + " ".join(sys.argv[2:] if argv is None else argv)
    evaluation = None
    if args.eval_data is not None:
        evaluation = {
            "data": args.eval_data,
            "split_name": args.eval_split,
            "limit": args.eval_limit,
            "threshold": args.threshold,
            "refines": args.refine,
            "threads": args.threads,
        }
    try:
        entry, record = split_amx(
            args.model,
            sample_windows(args.parity_windows, seed=args.seed),
            args.tolerance,
            args.bf16_tolerance,
            command,
            evaluation,
            args.max_map_drop,
            args.float32_check,
        )
    except (SplitError, ModelError, PackageError, FileNotFoundError) as exc:
        raise SystemExit(f"csist split-amx: error: {exc}") from None
    for name in ("encoder", "head", "align", "fuse"):
        e = getattr(entry, name)
        if e is None:
            continue
        kinds = [(s.op, s.kernel) for s in e.steps]
        print(
            f"{name}: {sum(1 for s in e.segments if s)} ONNX segments, {len(kinds)} native steps "
            f"(Conv: {kinds.count(('Conv', 'amx'))} AMX, {kinds.count(('Conv', 'direct'))} direct float32; "
            f"DeformConv: {kinds.count(('DeformConv', 'amx'))} AMX, {kinds.count(('DeformConv', None))} float32; "
            f"selective attention: {kinds.count(('Attention', None))})"
        )
    print(
        "max difference relative to the largest output: "
        + ", ".join(f"{k} {v:.1e}" for k, v in record["check"]["relative_diff"].items())
    )
    acc = record["check"].get("accuracy")
    if acc:
        for r, drop in acc["map_drop"].items():
            print(
                f"CSO-mAP refine={r}: float32 {acc['onnxruntime'][f'refine={r}']['mAP']:.2f}, "
                f"AMX bfloat16 {acc['amx'][f'refine={r}']['mAP']:.2f} (drop {drop:.2f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
