"""Cut an exported window head at its DeformConv nodes, for the service's native kernel.

    csist split-head --model models/derefnet          # the bundled model (run by csist export)
    csist split-head --model models/derefnet-int8     # its int8 variant (run by csist quantize)

ONNX Runtime's CPU ``DeformConv`` was 61 % of the head's time; the service has a faster kernel of
its own (``service/kernels/deform.py``) but cannot put it inside an ONNX Runtime graph without a custom-op
library. So the head (``parts.head`` of the manifest) is cut into the graph segments between its
DeformConv nodes, ``head.seg0.onnx`` ... ``head.seg<n>.onnx`` in the model folder, and their
weights go to ``head.deform.npz``; the service runs segment, kernel, segment, ... with the tensors
named as in the head. Constant sub-graphs (e.g. an int8 model's weight DequantizeLinear nodes)
are copied into every segment that uses them rather than passed between segments.

Only the DeformConv this kernel computes is accepted: 3x3, stride 1, padding 1, dilation 1, one
group and one offset group, weight and bias constant, no mask; anything else is refused. The
split is checked in ONNX Runtime on simulated windows (see :func:`check_split`) before the
manifest keeps its ``head_split`` plan (the files, their SHA-256, the tensor names; the measured
differences go to the provenance).

The cutting itself is generic and shared with ``csist split-amx`` (``training/split_amx.py``):
:func:`split_graph` cuts any part at the nodes native kernels compute (a segment may be empty
between two of them; for split-amx also at the selective attention, :func:`selective_attention`),
:class:`PartSplit` writes and renames the files, :func:`check_graph` compares a split with its
whole part, and :func:`replace_plan` swaps the manifest's plan in only after the check.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.modelpkg.manifest import (
    ATTENTION_WEIGHTS,
    HEAD_SPLIT,
    MANIFEST,
    ModelPackage,
    PackageError,
    PartSpec,
    SplitSpec,
    file_spec,
    load_package,
    split_file_names,
    write_package,
)

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


CONV_ATTRS = {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1}


def native_conv(node, consts: dict) -> str | None:
    """Which kernel of service/kernels/conv.py computes this Conv ("amx" or "direct"; None: none does).
    It must be 3x3, stride 1, padding 1, dilation 1, one group, with constant weight and bias."""
    from service.kernels import conv

    if node.op_type != "Conv":
        return None
    attrs = _attrs(node)
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    for name, want in CONV_ATTRS.items():
        got = attrs.get(name, ONNX_DEFAULTS[name])
        if (list(got) if isinstance(got, (list, tuple)) else got) != want:
            return None
    weight = consts.get(node.input[1])
    if weight is None or weight.ndim != 4 or weight.shape[2:] != (3, 3):
        return None
    if len(node.input) > 2 and node.input[2] and node.input[2] not in consts:
        return None
    return conv.kernel_for(weight.shape[1], weight.shape[0])


def folded_activation(out: str, consumers: dict, consts: dict, graph_outputs: set):
    """The activation after a native Conv's output ``out`` that its step can compute instead:
    (name, clip, nodes to drop, new output), or None. ReLU when a Relu is the only consumer; the
    ISTA soft threshold x - clip(x, lo, hi) when a Clip with constant bounds and the Sub of the
    two are the only consumers."""
    after = consumers.get(out, [])
    if out in graph_outputs:
        return None
    if len(after) == 1 and after[0].op_type == "Relu":
        return "relu", None, after, after[0].output[0]
    if len(after) == 2:
        clip = next((n for n in after if n.op_type == "Clip"), None)
        sub = next((n for n in after if n.op_type == "Sub"), None)
        if (
            clip is not None
            and sub is not None
            and len(clip.input) == 3
            and clip.input[0] == out
            and clip.input[1] in consts
            and clip.input[2] in consts
            and list(sub.input) == [out, clip.output[0]]
            and consumers.get(clip.output[0]) == [sub]
            and clip.output[0] not in graph_outputs
        ):
            lo, hi = float(consts[clip.input[1]]), float(consts[clip.input[2]])
            if lo <= hi:  # (lo > hi is a constant hi in ONNX; the manifest refuses it, so keep the nodes)
                return "soft_threshold", [lo, hi], [clip, sub], sub.output[0]
    return None


def folded_residual(out: str, consumers: dict, available: set, graph_outputs: set, dims: dict):
    """The residual Add after a native Conv's (activated) output ``out`` that its step can add
    instead: (the other input, the Add node) when an Add is ``out``'s only reader and its other
    input is a tensor of the same shape already computed when the Conv runs (``available``), as in
    a residual block's x + body(x); else None."""
    after = consumers.get(out, [])
    if out in graph_outputs or len(after) != 1 or after[0].op_type != "Add" or len(after[0].input) != 2:
        return None
    add = after[0]
    other = add.input[1] if add.input[0] == out else add.input[0]
    if other == out or other not in available or dims.get(other) is None or dims.get(other) != dims.get(out):
        return None
    return other, add


def selective_attention(sigmoid, producer: dict, consumers: dict, consts: dict, graph_outputs: set):
    """The nodes of DeRefNet's selective attention around ``sigmoid`` (``SelectiveAttention`` in
    training/model.py), which service/kernels/attention.py computes as one step, or None when they are
    not exactly that: a = Conv1x1(mid), b = Conv1x1(nb), c = Concat(a, b), s = Sigmoid(Conv3x3(
    Concat(ReduceMean(c), ReduceMax(c)))) over channels, y = Concat(a * s[:, 0:1], b * s[:, 1:]),
    with constant weights and no intermediate read by anything else.

    Returns {"nodes", "inputs": [mid, nb], "output", "weights": (wa, ba, wb, bb, wmix, bmix)}."""

    def only(name, *readers):
        return name not in graph_outputs and sorted(map(id, consumers.get(name, []))) == sorted(map(id, readers))

    def const_list(name):
        return consts[name].reshape(-1).tolist() if name in consts else None

    def conv_weights(node, kernel, pads):
        attrs = _attrs(node)
        w = consts.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if w is None or w.ndim != 4 or tuple(w.shape[2:]) != (kernel, kernel):
            return None
        if (
            attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or list(attrs.get("pads", [0] * 4)) != [pads] * 4
        ):
            return None
        if any(list(attrs.get(k, [1, 1])) != [1, 1] for k in ("strides", "dilations")) or attrs.get("group", 1) != 1:
            return None
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if has_bias and node.input[2] not in consts:
            return None
        bias = consts[node.input[2]] if has_bias else np.zeros(w.shape[0], np.float32)
        return w.astype(np.float32), bias.astype(np.float32)

    def channel_axis(node):
        axes = const_list(node.input[1]) if len(node.input) > 1 and node.input[1] else _attrs(node).get("axes")
        return axes is not None and list(axes) in ([1], [-3]) and _attrs(node).get("keepdims", 1) == 1

    def concat(node, n):
        return (
            node is not None
            and node.op_type == "Concat"
            and _attrs(node).get("axis") in (1, -3)
            and len(node.input) == n
        )

    mix = producer.get(sigmoid.input[0])
    cat2 = producer.get(mix.input[0]) if mix is not None else None
    if mix is None or conv_weights(mix, 3, 1) is None or not concat(cat2, 2):
        return None
    mean, amax = producer.get(cat2.input[0]), producer.get(cat2.input[1])
    if (
        mean is None
        or amax is None
        or mean.op_type != "ReduceMean"
        or amax.op_type != "ReduceMax"
        or mean.input[0] != amax.input[0]
        or not channel_axis(mean)
        or not channel_axis(amax)
    ):
        return None
    cat1 = producer.get(mean.input[0])
    if not concat(cat1, 2):
        return None
    conv_a, conv_b = producer.get(cat1.input[0]), producer.get(cat1.input[1])
    wa = conv_weights(conv_a, 1, 0) if conv_a is not None else None
    wb = conv_weights(conv_b, 1, 0) if conv_b is not None else None
    wmix = conv_weights(mix, 3, 1)
    if wa is None or wb is None or wa[0].shape != wb[0].shape or wmix[0].shape != (2, 2, 3, 3):
        return None
    slices = consumers.get(sigmoid.output[0], [])
    if len(slices) != 2 or any(n.op_type != "Slice" or len(n.input) < 4 for n in slices):
        return None
    picks = {}
    for sl in slices:
        starts, ends, axes = (const_list(sl.input[i]) for i in (1, 2, 3))
        steps = const_list(sl.input[4]) if len(sl.input) > 4 and sl.input[4] else [1]
        if axes not in ([1], [-3]) or steps != [1] or starts is None or ends is None:
            return None
        if starts == [0] and ends == [1]:
            picks[0] = sl
        elif starts == [1] and ends[0] >= 2:
            picks[1] = sl
    if set(picks) != {0, 1}:
        return None
    a, b = conv_a.output[0], conv_b.output[0]
    muls = []
    for x, sl in ((a, picks[0]), (b, picks[1])):
        after = consumers.get(sl.output[0], [])
        if len(after) != 1 or after[0].op_type != "Mul" or sorted(after[0].input) != sorted([x, sl.output[0]]):
            return None
        muls.append(after[0])
    cat3 = consumers.get(muls[0].output[0], [None])[0]
    if not concat(cat3, 2) or list(cat3.input) != [muls[0].output[0], muls[1].output[0]]:
        return None
    internal = [
        (a, (cat1, muls[0])),
        (b, (cat1, muls[1])),
        (cat1.output[0], (mean, amax)),
        (mean.output[0], (cat2,)),
        (amax.output[0], (cat2,)),
        (cat2.output[0], (mix,)),
        (mix.output[0], (sigmoid,)),
        (sigmoid.output[0], tuple(slices)),
        (picks[0].output[0], (muls[0],)),
        (picks[1].output[0], (muls[1],)),
        (muls[0].output[0], (cat3,)),
        (muls[1].output[0], (cat3,)),
    ]
    if not all(only(name, *readers) for name, readers in internal):
        return None
    return {
        "nodes": [conv_a, conv_b, cat1, mean, amax, cat2, mix, sigmoid, *slices, *muls, cat3],
        "inputs": [conv_a.input[0], conv_b.input[0]],
        "output": cat3.output[0],
        "weights": (*wa, *wb, *wmix),
    }


def split_graph(path: Path, convs: bool = False):
    """(segment ModelProtos or None, step dicts, weight arrays) of the part at ``path``, cut at
    every DeformConv and, with ``convs``, at every Conv a kernel of service/kernels/conv.py computes (a
    ReLU or soft threshold after it folded into its step, see :func:`folded_activation`). A
    segment is None when no node falls between two steps. With ``convs`` the DeformConvs the AMX
    kernel takes run on it too (step ``kernel`` "amx")."""
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    from service.kernels import deform

    model = shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    infos = {v.name: v for v in [*g.value_info, *g.input, *g.output]}
    inits = {i.name: i for i in g.initializer}
    consts = {name: numpy_helper.to_array(t) for name, t in inits.items()}
    graph_outputs = {o.name for o in g.output}
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # Nodes computed from constants only: copied into each segment that needs them.
    const_names, const_nodes = set(inits), []
    for node in g.node:
        if node.op_type != "DeformConv" and node.input and all(i in const_names for i in node.input if i):
            const_names.update(node.output)
            const_nodes.append(node)
    # With convs: DeRefNet's selective attention, one native step at the place of its last node.
    producer_of = {out: node for node in g.node for out in node.output}
    attention_at: dict[int, dict] = {}
    for node in g.node if convs else ():
        group = (
            selective_attention(node, producer_of, consumers, consts, graph_outputs)
            if node.op_type == "Sigmoid"
            else None
        )
        if group is not None:
            attention_at[id(group["nodes"][-1])] = group
    in_attention = {id(n) for group in attention_at.values() for n in group["nodes"][:-1]}

    def dims_of(info):
        """Static sizes and symbolic names; None when any dimension is unknown (never equal)."""
        if not info.type.tensor_type.HasField("shape"):
            return None
        dims = tuple(d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim)
        return None if any(d in ("", 0) for d in dims) else dims

    dims = {name: dims_of(info) for name, info in infos.items()}
    # runtime tensors computed before each node (a folded residual must be one of them)
    available = {i.name for i in g.input} - set(inits)
    segments, steps, current, folded = [], [], [], set()
    for node in g.node:
        ready = set(available)
        available.update(o for o in node.output if o not in const_names)
        if node in const_nodes or id(node) in folded or id(node) in in_attention:
            continue
        kernel = native_conv(node, consts) if convs else None
        if id(node) in attention_at:
            group = attention_at[id(node)]
            segments.append(current)
            steps.append(
                {"op": "Attention", "node": None, "inputs": group["inputs"], "output": group["output"], "group": group}
            )
            current = []
        elif node.op_type == "DeformConv" or kernel is not None:
            step = {"op": node.op_type, "node": node}
            if node.op_type == "DeformConv":
                _check_deform(node, consts)
                step["inputs"], step["output"] = [node.input[0], node.input[2]], node.output[0]
                cout, cin = consts[node.input[1]].shape[:2]
                if convs and deform.amx_takes(cin, cout):
                    step["kernel"] = "amx"
            else:
                step.update(kernel=kernel, inputs=[node.input[0]], output=node.output[0], activation="none", clip=None)
                folded_act = folded_activation(node.output[0], consumers, consts, graph_outputs)
                if folded_act is not None:
                    step["activation"], step["clip"], dropped, step["output"] = folded_act
                    folded.update(id(n) for n in dropped)
                res = folded_residual(step["output"], consumers, ready, graph_outputs, dims)
                if res is not None:
                    step["inputs"].append(res[0])
                    step["residual"], step["output"] = True, res[1].output[0]
                    folded.add(id(res[1]))
            segments.append(current)
            steps.append(step)
            current = []
        else:
            current.append(node)
    segments.append(current)
    if not steps:
        raise SplitError(f"{path} has no node for the native kernels")
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

    protos, weights = [], {}
    for s, nodes in enumerate(segments):
        if not nodes:
            protos.append(None)
            continue
        nodes = with_constants(nodes)
        produced = {o for n in nodes for o in n.output}
        later = set(graph_outputs)
        for step in steps[s:]:
            later.update(step["inputs"])
        for rest in segments[s + 1 :]:
            later |= consumed(rest)
        inputs = sorted(consumed(nodes) - produced - set(inits))
        outputs = sorted((produced & later) - const_names)
        if not outputs:
            raise SplitError(f"segment {s} of {path} has no outputs")
        used = [inits[name] for name in sorted(consumed(nodes) & set(inits))]
        missing = [t for t in [*inputs, *outputs] if t not in infos]
        if missing:
            raise SplitError(f"{path}: no type/shape information for the cut tensors {missing}")
        graph = helper.make_graph(
            nodes, f"{g.name or 'part'}_seg{s}", [infos[i] for i in inputs], [infos[o] for o in outputs], used
        )
        proto = helper.make_model(
            graph, opset_imports=model.opset_import, ir_version=model.ir_version, producer_name="csist split"
        )
        onnx.checker.check_model(proto)
        protos.append(proto)
    for k, step in enumerate(steps):
        node = step.pop("node")
        if step["op"] == "Attention":
            wa, ba, wb, bb, wmix, bmix = step.pop("group")["weights"]
            keys = [f"weight{k}", f"bias{k}", *(f"{role}{k}" for role in ATTENTION_WEIGHTS)]
            weights.update(zip(keys, (wa, ba, wb, bb, wmix, bmix)))
            step.update(weight=keys[0], bias=keys[1], extra=dict(zip(ATTENTION_WEIGHTS, keys[2:])))
            continue
        weight = consts[node.input[1]].astype(np.float32)
        bias_at = 3 if node.op_type == "DeformConv" else 2
        has_bias = len(node.input) > bias_at and bool(node.input[bias_at])
        weights[f"weight{k}"] = weight
        weights[f"bias{k}"] = (
            consts[node.input[bias_at]].astype(np.float32) if has_bias else np.zeros(weight.shape[0], np.float32)
        )
        step.update(weight=f"weight{k}", bias=f"bias{k}")
    return protos, steps, weights


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz with a fixed timestamp, so that the same weights give the same bytes (and hash)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in sorted(arrays.items()):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


@dataclass
class PartSplit:
    """One part's split for ``plan`` (``head_split`` or ``amx_split``), its files in the model
    folder named by ``service.modelpkg.manifest.split_file_names``; written under temporary names
    first and renamed into place only after the check."""

    directory: Path
    plan: str
    name: str  # the part's name in the manifest: encoder, head, align or fuse
    part: PartSpec  # the manifest's parts.<name> it is cut from
    protos: list
    steps: list[dict]
    weights: dict[str, np.ndarray]

    def names(self, suffix: str = "") -> tuple[list[str | None], str]:
        segs, npz = split_file_names(self.plan, self.name, len(self.protos), suffix)
        return [f if p is not None else None for f, p in zip(segs, self.protos, strict=True)], npz

    def write(self) -> None:
        import onnx

        segs, npz = self.names(TMP)
        for proto, name in zip(self.protos, segs, strict=True):
            if proto is not None:
                (self.directory / name).parent.mkdir(parents=True, exist_ok=True)
                onnx.save(proto, str(self.directory / name))
        (self.directory / npz).parent.mkdir(parents=True, exist_ok=True)
        save_npz(self.directory / npz, self.weights)

    def entry(self, suffix: str = "") -> SplitSpec:
        segs, npz = self.names(suffix)
        return SplitSpec(
            part=self.part.file,
            part_sha256=self.part.sha256,
            input=self.part.inputs[0].name,
            output=self.part.outputs[0].name,
            segments=[None if name is None else file_spec(self.directory, name) for name in segs],
            steps=self.steps,
            weights=file_spec(self.directory, npz),
        )

    def commit(self) -> None:
        for src, dst in zip(self._files(TMP), self._files(), strict=True):
            src.replace(dst)

    def remove_temporary(self) -> None:
        for path in self._files(TMP):
            path.unlink(missing_ok=True)

    def _files(self, suffix: str = "") -> list[Path]:
        segs, npz = self.names(suffix)
        return [self.directory / name for name in segs if name is not None] + [self.directory / npz]


TMP = ".tmp"


def onnxruntime_nodes(nodes: list, inputs: list[str], consts: dict[str, np.ndarray]):
    """A few ONNX nodes run by ONNX Runtime as a callable (*inputs) -> the last node's output,
    the reference of the checks."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    f32, out = TensorProto.FLOAT, nodes[-1].output[0]
    graph = helper.make_graph(
        nodes,
        nodes[0].op_type,
        [helper.make_tensor_value_info(n, f32, [None] * 4) for n in inputs],
        [helper.make_tensor_value_info(out, f32, [None] * 4)],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda *xs: session.run([out], dict(zip(inputs, xs)))[0]


def onnxruntime_deform(weight: np.ndarray, bias: np.ndarray):
    """ONNX Runtime's own DeformConv as a callable (x, offset) -> y."""
    from onnx import helper

    node = helper.make_node("DeformConv", ["x", "w", "offset", "b"], ["y"], pads=[1, 1, 1, 1])
    return onnxruntime_nodes([node], ["x", "offset"], {"w": weight, "b": bias})


def onnxruntime_conv(weight: np.ndarray, bias: np.ndarray, activation: str = "none", clip=None, residual: bool = False):
    """ONNX Runtime's float32 Conv, then the activation a step folded in, as a callable x -> y
    (with ``residual``: (x, r) -> y + r, the Add a step folded in)."""
    from onnx import helper

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])]
    consts = {"w": weight, "b": bias}
    if activation == "relu":
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
    elif activation == "soft_threshold":
        consts.update(lo=np.float32(clip[0]), hi=np.float32(clip[1]))
        nodes += [helper.make_node("Clip", ["y", "lo", "hi"], ["c"]), helper.make_node("Sub", ["y", "c"], ["z"])]
    if residual:
        nodes.append(helper.make_node("Add", [nodes[-1].output[0], "r"], ["sum"]))
    return onnxruntime_nodes(nodes, ["x", "r"] if residual else ["x"], consts)


def onnxruntime_attention(att):
    """DeRefNet's selective attention as ONNX Runtime runs its nodes, a callable (mid, nb) -> y,
    with the weights of a service.kernels.attention.SelectiveAttention."""
    from onnx import helper

    axes, one, two, zero = np.array([1]), np.array([1]), np.array([2]), np.array([0])
    nodes = [
        helper.make_node("Conv", ["mid", "wa", "ba"], ["a"]),
        helper.make_node("Conv", ["nb", "wb", "bb"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        helper.make_node("ReduceMean", ["c", "axes"], ["mean"]),
        helper.make_node("ReduceMax", ["c", "axes"], ["max"]),
        helper.make_node("Concat", ["mean", "max"], ["stats"], axis=1),
        helper.make_node("Conv", ["stats", "wmix", "bmix"], ["g"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["g"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "one", "axes"], ["s0"]),
        helper.make_node("Slice", ["s", "one", "two", "axes"], ["s1"]),
        helper.make_node("Mul", ["a", "s0"], ["m0"]),
        helper.make_node("Mul", ["b", "s1"], ["m1"]),
        helper.make_node("Concat", ["m0", "m1"], ["y"], axis=1),
    ]
    consts = {
        "wa": att.w_mid,
        "ba": att.b_mid,
        "wb": att.w_nb,
        "bb": att.b_nb,
        "wmix": att.w_mix,
        "bmix": att.b_mix,
        "axes": axes,
        "zero": zero,
        "one": one,
        "two": two,
    }
    return onnxruntime_nodes(nodes, ["mid", "nb"], consts)


def relative(got: np.ndarray, want: np.ndarray) -> float:
    """The largest difference relative to the largest reference value."""
    return float(np.abs(got - want).max() / (np.abs(want).max() or 1.0))


def check_graph(native, whole, x: np.ndarray) -> dict:
    """Relative to the largest output of ``whole`` (the uncut part) on ``x``:

    - ``segments_vs_<part>``: the segments with ONNX Runtime's float32 nodes between them (is
      the cut right?),
    - ``<op>_kernel_vs_onnxruntime``: each native kernel against ONNX Runtime's node on the same
      tensors, the largest over the steps of that op,
    - ``split_vs_<part>``: the split as the service runs it.
    """
    from service.modelpkg.model import SplitGraph, Step

    errors: dict[str, float] = {}

    def reference(step):
        k = step.kernel
        if step.op == "Attention":
            ref, key = onnxruntime_attention(k), "attention_kernel_vs_onnxruntime"
        elif step.op == "DeformConv":
            ref = onnxruntime_deform(k.weight, k.bias)
            key = "amx_deform_kernel_vs_onnxruntime" if k.kernel == "amx" else "deform_kernel_vs_onnxruntime"
        else:
            clip = k.clip if k.activation == "soft_threshold" else None
            ref = onnxruntime_conv(k.weight, k.bias, k.activation, clip, k.residual)
            key = f"{k.kernel}_conv_kernel_vs_onnxruntime"

        def run(*xs):
            want, got = ref(*xs), step.kernel(*xs)
            err = relative(got, want)
            errors[key] = max(errors.get(key, 0.0), err)
            return want

        return run

    reference_graph = SplitGraph(
        native.name,
        native.segments,
        [Step(s.op, s.inputs, s.output, reference(s)) for s in native.steps],
        native.input_name,
        native.output_name,
    )
    want = whole.run(x)
    scale = float(np.abs(want).max()) or 1.0
    cut = float(np.abs(reference_graph.run(x) - want).max()) / scale
    split = float(np.abs(native.run(x) - want).max()) / scale
    return {f"segments_vs_{native.name}": cut, **errors, f"split_vs_{native.name}": split}


def check_split(model_path: Path, windows: np.ndarray, tolerance: float) -> dict:
    """The head split of the model at ``model_path`` (its folder, or a manifest such as one naming
    a split under test) checked on the features of ``windows`` with :func:`check_graph`. The cut
    and the kernel must stay within ``tolerance``; the whole split's difference is recorded with
    no bound of its own, because in an int8 head a difference at float rounding level moves
    values across quantization steps, which later layers amplify: judge such a model by its
    CSO-mAP."""
    from service.modelpkg.model import load_model

    loaded = load_model(
        model_path,
        providers=["CPUExecutionProvider"],
        deform_kernel="native",
        conv_kernel="onnxruntime",
        whole_parts=True,
    )
    b, w = windows.shape[:2]
    feats = loaded.encode(windows.reshape(b * w, *windows.shape[2:])).reshape(b, w, -1)
    diffs = check_graph(loaded.split_head, loaded.parts["head"], feats)
    for what, key in (
        ("segments with ONNX Runtime's DeformConv differ from the head", "segments_vs_head"),
        ("the native kernel differs from ONNX Runtime's DeformConv", "deform_kernel_vs_onnxruntime"),
    ):
        if not diffs[key] <= tolerance:
            raise SplitError(f"{what} by {diffs[key]:.3g} of the largest output (> {tolerance})")
    return {"windows": int(b), "relative_diff": diffs}


def load_part(model: Path, name: str) -> tuple[ModelPackage, PartSpec]:
    """The package of the model folder ``model`` and its ``parts.<name>``; SplitError when it
    cannot be read or lists no such part."""
    try:
        package = load_package(model)
    except PackageError as exc:
        raise SplitError(str(exc)) from None
    part = package.parts.get(name)
    if part is None:
        raise SplitError(f"{package.manifest_path} lists no streaming {name} (parts.{name}); export with parts first")
    return package, part


def replace_plan(package: ModelPackage, key: str, splits: list[PartSplit], make_entry, check, record: dict):
    """Write the splits under temporary names, check them with a temporary manifest holding the
    plan ``make_entry(TMP)``, then rename them into place and write the manifest with
    ``make_entry("")`` and the provenance with ``record`` and the check's result under
    ``plans.<key>``: a failed or interrupted split leaves the previous one intact (and the files
    of a previous split that this one does not use go, with ``write_package``).
    Returns (the plan, its provenance record)."""
    directory, tmp = package.directory, package.directory / (MANIFEST + TMP)
    plans = package.manifest.plans
    try:
        for split in splits:
            split.write()
        trial = package.manifest.model_copy(update={"plans": plans.model_copy(update={key: make_entry(TMP)})})
        write_package(directory, trial, name=tmp.name)
        result = check(tmp)
        for split in splits:
            split.commit()
        entry = make_entry("")
        manifest = package.manifest.model_copy(update={"plans": plans.model_copy(update={key: entry})})
        done = {**record, "check": result}
        provenance = package.provenance.model_copy(update={"plans": {**package.provenance.plans, key: done}})
        write_package(directory, manifest, provenance)
    finally:
        for split in splits:
            split.remove_temporary()
        tmp.unlink(missing_ok=True)
    return entry, done


def split_head(model: Path, windows: np.ndarray, tolerance: float, command: str) -> tuple[SplitSpec, dict]:
    """Split the head of the model folder ``model``, check it, record it in the manifest
    (``plans.head_split``) and the check in the provenance; returns both."""
    package, head = load_part(model, "head")
    split = PartSplit(package.directory, HEAD_SPLIT, "head", head, *split_graph(package.directory / head.file))
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def check(tmp_manifest):
        return {**check_split(tmp_manifest, windows, tolerance), "tolerance_relative": tolerance}

    return replace_plan(package, HEAD_SPLIT, [split], split.entry, check, {"command": command, "date": date})


def split_for_native_kernel(model_path: Path, windows: np.ndarray, tolerance: float = 1e-4) -> SplitSpec | None:
    """What ``csist export`` and ``csist quantize`` run last: split the head when the kernel is built."""
    from service.kernels import deform

    if not deform.AVAILABLE:
        print(
            "note: service.kernels._deform is not built, so the head was not split for it "
            "(the service runs ONNX Runtime's DeformConv); build it and run csist split-head"
        )
        return None
    command = f"csist split-head --model {model_path} --parity-windows {len(windows)}"
    entry, record = split_head(model_path, windows, tolerance, command + " (run by the exporter on its parity windows)")
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in record["check"]["relative_diff"].items())
    print(f"split the head for the native DeformConv kernel: {len(entry.segments)} segments; {diffs}")
    return entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csist split-head", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        type=Path,
        default=Path("models/derefnet"),
        help="model folder whose manifest lists the streaming head",
    )
    p.add_argument("--parity-windows", type=int, default=16, help="simulated windows for the check against the head")
    p.add_argument("--seed", type=int, default=12345, help="seed of those windows")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed |split - head|, relative to the largest |head| output",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from service.kernels import deform
    from training.parts import sample_windows

    if not deform.AVAILABLE:
        raise SystemExit(
            "csist split-head: error: the native kernel service.kernels._deform is not built "
            "(reinstall with a C compiler: pip install -e .)"
        )
    command = "csist split-head " + " ".join(sys.argv[2:] if argv is None else argv)
    try:
        entry, record = split_head(
            args.model, sample_windows(args.parity_windows, seed=args.seed), args.tolerance, command
        )
    except (SplitError, PackageError, FileNotFoundError) as exc:
        raise SystemExit(f"csist split-head: error: {exc}") from None
    names = ", ".join(s.file for s in entry.segments if s)
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in record["check"]["relative_diff"].items())
    print(
        f"wrote {names} and {entry.weights.file}; on {record['check']['windows']} windows, "
        f"max difference relative to the largest output: {diffs}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
