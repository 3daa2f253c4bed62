"""Execution plans: the ways this service can run the network, one object each.

A plan composes the model's parts with a backend per part:

- ``onnxruntime`` (the stock plan): encoder + head (+ align + fuse) on ONNX Runtime's own
  kernels and the configured providers;
- ``onnxruntime-single``: the single graph on every window;
- ``native-deform``: encoder + head, the head's DeformConvs in the native float32 kernel
  (``service/kernels/deform.py``) between ONNX Runtime segments;
- ``amx``: encoder + head (+ halves) as the bfloat16 AMX split (``service/kernels/conv.py``,
  ``service/kernels/attention.py``);
- ``cuda``: encoder + head (+ halves) on ONNX Runtime's CUDA execution provider (DeformConv on
  the GPU), I/O bound to host buffers.

:func:`why_not` says, without loading anything, why a plan cannot run on this host with this
model's manifest (None: it can); :func:`build_plan` loads only the files the plan runs. Which eligible plan
serves is chosen by measurement (``service.engine.select``), not by CPU flags.

The batcher sees a plan as ``run`` (windows -> maps) and, for a streaming plan, ``encode`` /
``head`` and, when the halves are there, ``align`` / ``fuse``; it knows nothing else of how the
network is cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.engine.names import PLANS, STOCK
from service.kernels import conv, deform
from service.modelpkg.manifest import ModelPackage
from service.modelpkg.model import ALIGN, ENCODER, FUSE, HEAD, InferenceModel, ModelError, load_model

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# The float32 plans compute the reference's function with other kernels (summation order,
# TF32 on a GPU); AMX rounds inputs and weights to bfloat16. Relative to the reference map's
# largest value, as the split checks measure it.
TOLERANCE = {"float32": 5e-3, "bfloat16": 3e-2}
PRECISION = {
    "onnxruntime": "float32",
    "onnxruntime-single": "float32",
    "native-deform": "float32",
    "amx": "bfloat16",
    "cuda": "float32",
}

Fn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PlanOptions:
    """What a plan is built with (from the service settings or a command's flags)."""

    providers: tuple[str, ...] = (CPU,)  # resolved, in order (service.modelpkg.model.resolve_providers)
    threads: int = 0
    spinning: bool = False
    graph_level: str = "all"
    arena: bool = True


@dataclass
class FunctionPlan:
    """A plan made of plain functions: what the batcher needs, for tests and tools that fake a
    model. ``encode`` / ``head`` (and ``align`` / ``fuse``) must come in pairs."""

    run: Fn
    encode: Fn | None = None
    head: Fn | None = None
    align: Fn | None = None
    fuse: Fn | None = None
    name: str = "functions"

    @property
    def streaming(self) -> bool:
        return self.encode is not None and self.head is not None

    @property
    def pairs(self) -> bool:
        return self.streaming and self.align is not None and self.fuse is not None


class ExecutionPlan:
    """One way of running the verified model; see the module docstring for the plans."""

    def __init__(self, name: str, model: InferenceModel, io_binding: bool = False):
        self.name = name
        self.model = model
        self.precision = PRECISION[name]
        self._io_binding = io_binding and model.has_parts

    @property
    def streaming(self) -> bool:
        return self.model.has_parts

    @property
    def pairs(self) -> bool:
        return self.model.has_pairs

    def run(self, windows: np.ndarray) -> np.ndarray:
        """HR maps (n, 33, 33) of windows (n, 5, 11, 11)."""
        return self.model.run(windows)

    @property
    def encode(self) -> Fn | None:
        return self._part(ENCODER) if self.streaming else None

    @property
    def head(self) -> Fn | None:
        return self._part(HEAD) if self.streaming else None

    @property
    def align(self) -> Fn | None:
        return self._part(ALIGN) if self.pairs else None

    @property
    def fuse(self) -> Fn | None:
        return self._part(FUSE) if self.pairs else None

    def _part(self, name: str) -> Fn:
        if self._io_binding and getattr(self.model, f"split_{name}") is None:
            return _bound(self.model.parts[name])
        return getattr(self.model, {ENCODER: "encode", HEAD: "head", ALIGN: "align", FUSE: "fuse"}[name])

    def backends(self) -> dict[str, str]:
        """Which code runs each part: ``onnxruntime:<provider>``, ``native-deform`` (ONNX Runtime
        segments + the float32 DeformConv kernel), ``amx-bf16``."""
        ort_label = f"onnxruntime:{self.model.providers[0]}"
        if not self.streaming:
            return {"single": ort_label}
        parts = [ENCODER, HEAD] + ([ALIGN, FUSE] if self.pairs else [])
        native = {"native-deform": {HEAD: "native-deform"}, "amx": dict.fromkeys(parts, "amx-bf16")}.get(self.name, {})
        return {part: native.get(part, ort_label) for part in parts}

    def files(self) -> list[str]:
        """The model files this plan opened (paths inside the model folder)."""
        m = self.model
        out = [m.card.manifest.model.file] if m.session is not None else []
        for name, part in sorted(m.parts.items()):
            split = getattr(m, f"split_{name}")
            out += list(split.files) if split is not None else [m.card.parts[name].file]
        return out

    def describe(self) -> dict:
        return {
            "name": self.name,
            "precision": self.precision,
            "providers": self.model.providers,
            "backends": self.backends(),
            "pairs": self.pairs,
            "files": len(self.files()),
        }


def _bound(part) -> Fn:
    """``part.run`` through ONNX Runtime's I/O binding: the host input bound as it is and the
    output allocated by the provider and copied back once, with no per-call feed dictionary."""
    session = part.session

    def run(x: np.ndarray) -> np.ndarray:
        binding = session.io_binding()
        binding.bind_cpu_input(part.input_name, np.ascontiguousarray(x, dtype=np.float32))
        binding.bind_output(part.output_name)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    return run


def why_not(name: str, package: ModelPackage, options: PlanOptions) -> str | None:
    """Why plan ``name`` cannot run on this host with this model package (None: it can)."""
    if name not in PLANS:
        return f"unknown plan {name!r} (one of {', '.join(PLANS)})"
    streaming = {ENCODER, HEAD} <= set(package.parts)
    if name == "onnxruntime-single":
        return None
    if not streaming:
        return "the manifest lists no streaming parts (encoder, head): only onnxruntime-single runs it"
    if name == STOCK:
        return None
    if name == "cuda":
        if CUDA not in ort.get_available_providers():
            return "ONNX Runtime has no CUDAExecutionProvider here (install the gpu extra on a CUDA host)"
        return None
    if options.providers[0] != CPU:
        return f"its native kernels run on the CPU; the configured providers start with {options.providers[0]}"
    if name == "native-deform":
        if package.head_split is None:
            return "the manifest has no head_split plan (run `csist split-head`)"
        if not deform.AVAILABLE:
            return "the native kernel service.kernels._deform is not built (install with a C compiler)"
        return None
    # amx
    if package.amx_split is None:
        return "the manifest has no amx_split plan (run `csist split-amx`)"
    if not conv.AMX:
        return conv.WHY_NOT_AMX
    if not deform.AVAILABLE:
        return "the native kernel service.kernels._deform is not built (install with a C compiler)"
    return None


def build_plan(name: str, model_path: str | Path, options: PlanOptions = PlanOptions()) -> ExecutionPlan:
    """Load and verify the files plan ``name`` runs of the model at ``model_path`` (its folder or
    manifest); ModelError when it cannot run here."""
    if name not in PLANS:
        raise ModelError(f"unknown plan {name!r} (one of {', '.join(PLANS)})")
    providers = list(options.providers)
    kernels = {"deform_kernel": "onnxruntime", "conv_kernel": "onnxruntime"}
    if name == "native-deform":
        kernels["deform_kernel"] = "native"
    elif name == "amx":
        kernels = {"deform_kernel": "native", "conv_kernel": "amx"}
    elif name == "cuda":
        if CUDA not in ort.get_available_providers():
            raise ModelError("plan 'cuda' cannot be used: ONNX Runtime has no CUDAExecutionProvider here")
        providers = [CUDA, CPU]
    model = load_model(
        model_path,
        providers=providers,
        threads=options.threads,
        spinning=options.spinning,
        parts=name != "onnxruntime-single",
        graph_level=options.graph_level,
        arena=options.arena,
        single=name == "onnxruntime-single",
        **kernels,
    )
    # load_model itself refuses deform_kernel="native" / conv_kernel="amx" when their split cannot load
    plan = ExecutionPlan(name, model, io_binding=name == "cuda")
    if name != "onnxruntime-single" and not plan.streaming:
        raise ModelError(f"plan {name!r} cannot be used: the manifest lists no streaming parts")
    return plan
