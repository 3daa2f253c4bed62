"""Cut an exported window head at its DeformConv nodes, for the service's native kernel.

    csist split-head --model models/derefnet.onnx          # the bundled model (run by csist export)
    csist split-head --model models/derefnet-int8.onnx     # its int8 variant (run by csist quantize)

ONNX Runtime's CPU ``DeformConv`` was 61 % of the head's time; the service has a faster kernel of
its own (``service/deform.py``) but cannot put it inside an ONNX Runtime graph without a custom-op
library. So the head (``parts.head`` of the card) is cut into the graph segments between its
DeformConv nodes, ``<model stem>.head.seg0.onnx`` ... ``.seg<n>.onnx``, and their weights go to
``<model stem>.head.deform.npz``; the service runs segment, kernel, segment, ... with the tensors
named as in the head. Constant sub-graphs (e.g. an int8 model's weight DequantizeLinear nodes)
are copied into every segment that uses them rather than passed between segments.

Only the DeformConv this kernel computes is accepted: 3x3, stride 1, padding 1, dilation 1, one
group and one offset group, weight and bias constant, no mask; anything else is refused. The
split is checked in ONNX Runtime on simulated windows (see :func:`check_split`) before the card
keeps its ``head_split`` entry: the files, their SHA-256, the tensor names and the measured
differences.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from service.model import file_sha256

# What the native kernel computes, and the ONNX DeformConv defaults of each attribute.
DEFORM_ATTRS = {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1, "offset_group": 1}
ONNX_DEFAULTS = {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1, "offset_group": 1}


class SplitError(ValueError):
    """The head cannot be split for the native kernel (unsupported DeformConv, bad graph)."""


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _check_deform(node, consts: dict) -> None:
    attrs = _attrs(node)
    for name, want in DEFORM_ATTRS.items():
        got = attrs.get(name, ONNX_DEFAULTS[name])
        if (list(got) if isinstance(got, (list, tuple)) else got) != want:
            raise SplitError(f"{node.name}: {name}={got}, the native kernel needs {want}")
    if len(node.input) > 4 and node.input[4]:
        raise SplitError(f"{node.name}: has a mask input; the native kernel takes none")
    weight = consts.get(node.input[1])
    if weight is None or weight.ndim != 4 or weight.shape[2:] != (3, 3):
        raise SplitError(f"{node.name}: weight must be a constant (C_out, C_in, 3, 3)")
    if attrs.get("kernel_shape", [3, 3]) != [3, 3]:
        raise SplitError(f"{node.name}: kernel_shape {attrs['kernel_shape']}, the native kernel needs [3, 3]")
    if len(node.input) > 3 and node.input[3] and node.input[3] not in consts:
        raise SplitError(f"{node.name}: bias must be a constant")


def split_graph(head_path: Path):
    """(segment ModelProtos, deform step dicts, weight arrays) of the head at ``head_path``."""
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(head_path)))
    g = model.graph
    infos = {v.name: v for v in [*g.value_info, *g.input, *g.output]}
    inits = {i.name: i for i in g.initializer}
    consts = {name: numpy_helper.to_array(t) for name, t in inits.items()}
    # Nodes computed from constants only: copied into each segment that needs them.
    const_names, const_nodes = set(inits), []
    for node in g.node:
        if node.op_type != "DeformConv" and node.input and all(i in const_names for i in node.input if i):
            const_names.update(node.output)
            const_nodes.append(node)
    segments, deforms, current = [], [], []
    for node in g.node:
        if node in const_nodes:
            continue
        if node.op_type == "DeformConv":
            _check_deform(node, consts)
            segments.append(current)
            deforms.append(node)
            current = []
        else:
            current.append(node)
    segments.append(current)
    if not deforms:
        raise SplitError(f"{head_path} has no DeformConv node")
    producer = {out: node for node in const_nodes for out in node.output}

    def with_constants(nodes):
        needed, stack = [], [i for n in nodes for i in n.input]
        while stack:
            name = stack.pop()
            node = producer.get(name)
            if node is not None and node not in needed:
                needed.append(node)
                stack.extend(node.input)
        return [n for n in const_nodes if n in needed] + nodes

    def consumed(nodes):
        return {i for n in nodes for i in n.input if i}

    graph_outputs = {o.name for o in g.output}
    protos, steps, weights = [], [], {}
    for s, nodes in enumerate(segments):
        nodes = with_constants(nodes)
        produced = {o for n in nodes for o in n.output}
        later = set(graph_outputs)
        for d in deforms[s:]:
            later.update(d.input)
        for rest in segments[s + 1:]:
            later |= consumed(rest)
        inputs = sorted(consumed(nodes) - produced - set(inits))
        outputs = sorted((produced & later) - const_names)
        if not outputs:
            raise SplitError(f"segment {s} of {head_path} has no outputs")
        used = [inits[name] for name in sorted(consumed(nodes) & set(inits))]
        missing = [t for t in [*inputs, *outputs] if t not in infos]
        if missing:
            raise SplitError(f"{head_path}: no type/shape information for the cut tensors {missing}")
        graph = helper.make_graph(nodes, f"{g.name or 'head'}_seg{s}", [infos[i] for i in inputs],
                                  [infos[o] for o in outputs], used)
        proto = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version,
                                  producer_name="csist split-head")
        onnx.checker.check_model(proto)
        protos.append(proto)
    for k, node in enumerate(deforms):
        weights[f"weight{k}"] = consts[node.input[1]].astype(np.float32)
        has_bias = len(node.input) > 3 and bool(node.input[3])
        cout = weights[f"weight{k}"].shape[0]
        weights[f"bias{k}"] = consts[node.input[3]].astype(np.float32) if has_bias else np.zeros(cout, np.float32)
        steps.append({"input": node.input[0], "offset": node.input[2], "output": node.output[0],
                      "weight": f"weight{k}", "bias": f"bias{k}"})
    return protos, steps, weights


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz with a fixed timestamp, so that the same weights give the same bytes (and hash)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in sorted(arrays.items()):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def split_paths(model: Path, n_segments: int, suffix: str = "") -> tuple[list[Path], Path]:
    """``<model stem>.head.seg<i>.onnx`` and ``<model stem>.head.deform.npz``: named after the model,
    not its head file, so that two models sharing one head (an int8 encoder with the fp32 head)
    never share, overwrite or delete each other's split."""
    stem = f"{model.stem}.head"
    return ([model.with_name(f"{stem}.seg{s}{suffix}.onnx") for s in range(n_segments)],
            model.with_name(f"{stem}.deform{suffix}.npz"))


def onnxruntime_deform(weight: np.ndarray, bias: np.ndarray):
    """ONNX Runtime's own DeformConv as a callable (x, offset) -> y, the reference of the check."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("DeformConv", ["x", "w", "offset", "b"], ["y"], pads=[1, 1, 1, 1])
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "deform", [helper.make_tensor_value_info("x", f32, [None] * 4), helper.make_tensor_value_info("offset", f32, [None] * 4)],
        [helper.make_tensor_value_info("y", f32, [None] * 4)], [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x, offset: session.run(["y"], {"x": x, "offset": offset})[0]


def check_split(model_path: Path, windows: np.ndarray, tolerance: float, card_path: Path | None = None) -> dict:
    """Three measurements on the features of ``windows``, in ONNX Runtime:

    1. segments with ONNX Runtime's DeformConv between them vs the whole head (the cut is right),
    2. the native kernel vs ONNX Runtime's DeformConv on the same tensors (the kernel is right),
    3. segments with the native kernel vs the whole head (recorded; no bound of its own, because
       in an int8 head a difference at float rounding level moves values across quantization
       steps, which later layers amplify: judge such a model by its CSO-mAP).
    1 and 2 must stay within ``tolerance`` relative to the largest output.
    """
    from service.model import DeformStep, SplitHead, load_model

    loaded = load_model(model_path, card_path, providers=["CPUExecutionProvider"], deform_kernel="native")
    native = loaded.split_head
    b, w = windows.shape[:2]
    feats = loaded.encode(windows.reshape(b * w, *windows.shape[2:])).reshape(b, w, -1)
    whole = loaded.parts["head"].run(feats)
    kernel_err = [0.0]

    def compared(step):
        ref = onnxruntime_deform(step.kernel.weight, step.kernel.bias)

        def run(x, offset):
            want = ref(x, offset)
            got = step.kernel(x, offset)
            kernel_err[0] = max(kernel_err[0], float(np.abs(got - want).max() / (np.abs(want).max() or 1.0)))
            return want
        return run

    reference = SplitHead(native.segments, [DeformStep(s.input, s.offset, s.output, compared(s)) for s in native.steps],
                          native.input_name, native.output_name)
    scale = float(np.abs(whole).max()) or 1.0
    cut_err = float(np.abs(reference.run(feats) - whole).max()) / scale
    split_err = float(np.abs(native.run(feats) - whole).max()) / scale
    for what, err in (("segments with ONNX Runtime's DeformConv differ from the head", cut_err),
                      ("the native kernel differs from ONNX Runtime's DeformConv", kernel_err[0])):
        if not err <= tolerance:
            raise SplitError(f"{what} by {err:.3g} of the largest output (> {tolerance})")
    return {"windows": int(b), "max_abs_head": scale, "relative_diff": {
        "segments_vs_head": cut_err, "native_kernel_vs_onnxruntime_deformconv": kernel_err[0],
        "segments_with_native_kernel_vs_head": split_err}}


def split_head(model_path: Path, windows: np.ndarray, tolerance: float, command: str) -> dict:
    """Split the head listed in the card of ``model_path``, check it, record it in the card."""
    import onnx

    card_path = model_path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    head = card.get("parts", {}).get("head")
    if head is None:
        raise SplitError(f"{card_path} lists no streaming head (parts.head); export with parts first")
    head_path = model_path.parent / head["file"]
    protos, steps, weights = split_graph(head_path)
    # Written and checked under temporary names with a temporary card, then renamed into place
    # and the card replaced: a failed or interrupted split leaves the previous one intact.
    tmp_segs, tmp_npz = split_paths(model_path, len(protos), ".tmp")
    seg_paths, npz_path = split_paths(model_path, len(protos))
    tmp_card = card_path.with_name(card_path.name + ".tmp")
    try:
        for proto, path in zip(protos, tmp_segs, strict=True):
            onnx.save(proto, str(path))
        save_npz(tmp_npz, weights)

        def entry(segs, npz):
            return {
                "head": head["file"],
                "head_sha256": head["sha256"],
                "input": head["inputs"][0]["name"],
                "output": head["outputs"][0]["name"],
                "segments": [{"file": p.name, "sha256": file_sha256(p), "bytes": p.stat().st_size} for p in segs],
                "deform": steps,
                "weights": {"file": npz.name, "sha256": file_sha256(npz)},
                "command": command,
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }

        tmp_card.write_text(json.dumps({**card, "head_split": entry(tmp_segs, tmp_npz)}, indent=2) + "\n")
        check = check_split(model_path, windows, tolerance, tmp_card)
        for src, dst in zip([*tmp_segs, tmp_npz], [*seg_paths, npz_path], strict=True):
            src.replace(dst)
        card["head_split"] = {**entry(seg_paths, npz_path), "check": {**check, "tolerance_relative": tolerance}}
        tmp_card.write_text(json.dumps(card, indent=2) + "\n")
        tmp_card.replace(card_path)
    finally:
        for path in [*tmp_segs, tmp_npz, tmp_card]:
            path.unlink(missing_ok=True)
    return card["head_split"]


def split_for_native_kernel(model_path: Path, windows: np.ndarray, tolerance: float = 1e-4) -> dict | None:
    """What ``csist export`` and ``csist quantize`` run last: split the head when the kernel is built."""
    from service import deform

    if not deform.AVAILABLE:
        print("note: service._deform is not built, so the head was not split for it "
              "(the service runs ONNX Runtime's DeformConv); build it and run csist split-head")
        return None
    command = f"csist split-head --model {model_path} --parity-windows {len(windows)}"
    entry = split_head(model_path, windows, tolerance, command + " (run by the exporter on its parity windows)")
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in entry["check"]["relative_diff"].items())
    print(f"split the head for the native DeformConv kernel: {len(entry['segments'])} segments; {diffs}")
    return entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csist split-head", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/derefnet.onnx"),
                   help="exported model whose card (.json beside it) lists the streaming head")
    p.add_argument("--parity-windows", type=int, default=16, help="simulated windows for the check against the head")
    p.add_argument("--seed", type=int, default=12345, help="seed of those windows")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |split - head|, relative to the largest |head| output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from service import deform
    from training.export import sample_windows

    if not deform.AVAILABLE:
        raise SystemExit("csist split-head: error: the native kernel service._deform is not built "
                         "(reinstall with a C compiler: pip install -e .)")
    command = "csist split-head " + " ".join(sys.argv[2:] if argv is None else argv)
    try:
        entry = split_head(args.model, sample_windows(args.parity_windows, seed=args.seed), args.tolerance, command)
    except (SplitError, FileNotFoundError) as exc:
        raise SystemExit(f"csist split-head: error: {exc}") from None
    names = ", ".join(s["file"] for s in entry["segments"])
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in entry["check"]["relative_diff"].items())
    print(f"wrote {names} and {entry['weights']['file']}; on {entry['check']['windows']} windows, "
          f"max difference relative to the largest output: {diffs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
