"""Loading the ONNX model once, checking it against its card, and running it.

The service refuses to start on a model it cannot vouch for: the file's SHA-256 must match the
card, and the graph's inputs and outputs must be the window and HR-map shapes the API is built
around. Those checks turn a wrong deployment into a clear start-up error instead of wrong
answers.

When the card lists the streaming parts (``parts.encoder``: LR frames -> stage-9 features,
``parts.head``: a window's 5 feature maps -> HR map), they are verified the same way and loaded
beside the single graph, so that a stream encodes each frame once instead of in 5 windows.

When the card also has ``head_split`` (written by ``csist split-head``) and the native kernel of
``service/deform.py`` is built, the head runs on the CPU as its graph segments with that kernel
computing the DeformConv nodes between them (``deform_kernel``: "auto" uses it when it can,
"native" requires it, "onnxruntime" never uses it). The split files are verified like the rest.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from service.config import available_cpus
from service.card import CardError, FileSpec, HeadSplitSpec, ModelCard, PartSpec, load_card
from service import deform, peaks
from service.postprocess import REFINE_MODES
from service.physics import RATIO, SIZE
from service.windows import WINDOW

log = logging.getLogger("service.model")

AUTO_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
ENCODER, HEAD = "encoder", "head"
DEFORM_KERNELS = ("auto", "native", "onnxruntime")


class ModelError(RuntimeError):
    """The model cannot be served (missing, altered, or not the expected interface)."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (models can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_providers(requested: list[str] | None) -> list[str]:
    """Providers to ask ONNX Runtime for, in order, keeping only those this build has.

    ``None`` means automatic: CUDA first when present, CPU always last. An explicitly requested
    provider that is not available is skipped with a warning; CPU is the fallback of last resort.
    """
    available = set(ort.get_available_providers())
    wanted = list(AUTO_PROVIDERS) if requested is None else list(requested)
    chosen = [p for p in wanted if p in available]
    for p in wanted:
        if p not in available and requested is not None:
            log.warning("execution provider not available, skipped", extra={"provider": p})
    if not chosen:
        chosen = ["CPUExecutionProvider"]
    return chosen


def session_options(
    threads: int = 0, spinning: bool = False, graph_level: str = "all", arena: bool = True
) -> ort.SessionOptions:
    """ONNX Runtime session options of the service (the benchmark times the same knobs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = GRAPH_LEVELS[graph_level]
    options.enable_cpu_mem_arena = arena
    options.log_severity_level = 3
    # ORT's worker threads busy-wait between runs by default; in a server that burns the CPU
    # the event loop needs (measured: twice the CPU per window on 2 cores), so it is off.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    return options


@dataclass
class Part:
    """One verified streaming part (encoder or head) in its own session."""

    path: Path
    sha256: str
    session: ort.InferenceSession
    input_name: str
    output_name: str

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]


@dataclass
class DeformStep:
    """One DeformConv of the head, computed outside ONNX Runtime between two segments."""

    input: str
    offset: str
    output: str
    kernel: Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class SplitHead:
    """The window head as ONNX Runtime segments with its DeformConv nodes computed in between.

    Tensors keep their names in the head graph: segment ``i`` reads what the head input and the
    earlier segments and steps produced, then step ``i`` adds its output.
    """

    segments: list[ort.InferenceSession]
    steps: list[DeformStep]
    input_name: str
    output_name: str

    def __post_init__(self):
        if len(self.segments) != len(self.steps) + 1:
            raise ModelError(f"head split has {len(self.segments)} segments for {len(self.steps)} DeformConv steps")
        self._io = [([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]) for s in self.segments]
        known = {self.input_name}
        for i, (inputs, outputs) in enumerate(self._io):
            missing = sorted(set(inputs) - known)
            if missing:
                raise ModelError(f"head segment {i} needs {missing}, which nothing before it produces")
            known.update(outputs)
            if i < len(self.steps):
                step = self.steps[i]
                if step.input not in known or step.offset not in known:
                    raise ModelError(f"DeformConv step {i} needs {step.input!r} and {step.offset!r}")
                known.add(step.output)
        if self.output_name not in known:
            raise ModelError(f"head split never produces its output {self.output_name!r}")

    def run(self, features: np.ndarray) -> np.ndarray:
        env = {self.input_name: np.ascontiguousarray(features, dtype=np.float32)}
        for i, (session, (inputs, outputs)) in enumerate(zip(self.segments, self._io)):
            env.update(zip(outputs, session.run(outputs, {name: env[name] for name in inputs})))
            if i < len(self.steps):
                step = self.steps[i]
                env[step.output] = step.kernel(env[step.input], env[step.offset])
        return env[self.output_name]


@dataclass
class InferenceModel:
    """An ONNX Runtime session plus the card that describes it."""

    path: Path
    card: ModelCard
    sha256: str
    session: ort.InferenceSession
    input_name: str
    output_name: str
    requested_providers: list[str]
    providers: list[str] = field(default_factory=list)
    parts: dict[str, Part] = field(default_factory=dict)
    split_head: SplitHead | None = None

    @property
    def deform_kernel(self) -> str:
        """Which code computes the head's DeformConv: "native" or "onnxruntime"."""
        return "native" if self.split_head is not None else "onnxruntime"

    @property
    def has_parts(self) -> bool:
        """Whether the streaming encoder and head are loaded (the feature cache is usable)."""
        return ENCODER in self.parts and HEAD in self.parts

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """Features (n, 1089) float32 of LR frames (n, 11, 11); needs :attr:`has_parts`."""
        return self.parts[ENCODER].run(frames)

    def head(self, features: np.ndarray) -> np.ndarray:
        """HR maps (b, 33, 33) of windows' features (b, 5, 1089); needs :attr:`has_parts`."""
        if self.split_head is not None:
            return self.split_head.run(features)
        return self.parts[HEAD].run(features)

    @property
    def hr_size(self) -> int:
        return self.card.physics.size * self.card.physics.ratio

    def run(self, windows: np.ndarray) -> np.ndarray:
        """HR maps (n, 33, 33) float32 of windows (n, 5, 11, 11); thread-safe (ORT sessions are)."""
        x = np.ascontiguousarray(windows, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run the session once per batch size so that first requests do not pay for set-up."""
        size = self.card.physics.size
        for n in batch_sizes:
            out = self.run(np.zeros((n, WINDOW, size, size), dtype=np.float32))
            if out.shape != (n, self.hr_size, self.hr_size):
                want = (n, self.hr_size, self.hr_size)
                raise ModelError(f"model output has shape {out.shape}, expected {want}")
            if self.has_parts:
                feats = self.encode(np.zeros((n * WINDOW, size, size), dtype=np.float32))
                out = self.head(feats.reshape(n, WINDOW, -1))
                if out.shape != (n, self.hr_size, self.hr_size):
                    want = (n, self.hr_size, self.hr_size)
                    raise ModelError(f"model head output has shape {out.shape}, expected {want}")

    def metadata(self) -> dict:
        """Identity of the model, as echoed in every answer."""
        return {"name": self.card.name, "version": self.card.version, "sha256": self.sha256}


def _check_card(card: ModelCard) -> None:
    """The card must describe the interface this service speaks (11x11 patches, 5-frame windows)."""
    phys = card.physics
    if (phys.size, phys.ratio) != (SIZE, RATIO):
        raise ModelError(
            f"model card physics size={phys.size} ratio={phys.ratio}; this service serves "
            f"size={SIZE} ratio={RATIO}"
        )
    want_in, want_out = [WINDOW, SIZE, SIZE], [SIZE * RATIO, SIZE * RATIO]
    if list(card.inputs[0].shape[1:]) != want_in:
        raise ModelError(
            f"model card input shape {card.inputs[0].shape}, expected [batch, *{want_in}]"
        )
    if list(card.outputs[0].shape[1:]) != want_out:
        raise ModelError(
            f"model card output shape {card.outputs[0].shape}, expected [batch, *{want_out}]"
        )
    mode = card.postprocess.mode
    peak_modes = getattr(peaks, "PEAK_MODES", None)
    if mode is not None and (peak_modes is None or mode not in peak_modes):
        raise ModelError(f"model card postprocess.mode={mode!r} is not one of {peak_modes}")
    if card.postprocess.refine not in REFINE_MODES:
        refine = card.postprocess.refine
        raise ModelError(f"model card postprocess.refine={refine!r} is not one of {REFINE_MODES}")


def _check_session(session: ort.InferenceSession, card: ModelCard | PartSpec) -> tuple[str, str]:
    """The graph's input/output names and static dims must agree with the card (or part)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    by_name_in = {i.name: i for i in inputs}
    by_name_out = {o.name: o for o in outputs}
    in_name, out_name = card.inputs[0].name, card.outputs[0].name
    if in_name not in by_name_in:
        raise ModelError(f"model has inputs {sorted(by_name_in)}, card says {in_name!r}")
    if out_name not in by_name_out:
        raise ModelError(f"model has outputs {sorted(by_name_out)}, card says {out_name!r}")
    for what, node, spec in (
        ("input", by_name_in[in_name], card.inputs[0]),
        ("output", by_name_out[out_name], card.outputs[0]),
    ):
        dims = list(node.shape)
        if len(dims) != len(spec.shape):
            raise ModelError(f"model {what} {node.name!r} has shape {dims}, card says {spec.shape}")
        for got, want in zip(dims[1:], spec.shape[1:], strict=True):
            if isinstance(got, int) and isinstance(want, int) and got != want:
                raise ModelError(
                    f"model {what} {node.name!r} has shape {dims}, card says {spec.shape}"
                )
    return in_name, out_name


def _part_shapes(name: str) -> tuple[list[int], list[int]]:
    """Static input/output dims (after the batch dim) the service needs of a part."""
    hr = SIZE * RATIO
    if name == ENCODER:
        return [SIZE, SIZE], [hr * hr]
    return [WINDOW, hr * hr], [hr, hr]


def _load_part(
    name: str, spec: PartSpec, directory: Path, options: ort.SessionOptions, providers: list[str]
) -> Part:
    """Verify one streaming part (hash, tensor names and shapes) and open its session."""
    path = directory / spec.file
    if not path.is_file():
        raise ModelError(f"model part {name!r} not found: {path} (listed in the model card)")
    want_in, want_out = _part_shapes(name)
    if list(spec.inputs[0].shape[1:]) != want_in or list(spec.outputs[0].shape[1:]) != want_out:
        raise ModelError(
            f"model card part {name!r} maps {spec.inputs[0].shape} -> {spec.outputs[0].shape}; "
            f"expected [n, *{want_in}] -> [n, *{want_out}]"
        )
    digest = file_sha256(path)
    if digest.lower() != spec.sha256.lower():
        raise ModelError(
            f"SHA-256 mismatch: model part {path} has {digest} but the card says "
            f"{spec.sha256.lower()} (re-export with `csist export` to write both)"
        )
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from None
    in_name, out_name = _check_session(session, spec)
    return Part(path, digest, session, in_name, out_name)


def _verified_file(spec: FileSpec, directory: Path, what: str) -> Path:
    path = directory / spec.file
    if not path.is_file():
        raise ModelError(f"{what} not found: {path} (listed in the model card)")
    digest = file_sha256(path)
    if digest.lower() != spec.sha256.lower():
        raise ModelError(
            f"SHA-256 mismatch: {what} {path} has {digest} but the card says {spec.sha256.lower()} "
            "(split the head anew with `csist split-head`)"
        )
    return path


def load_split_head(
    spec: HeadSplitSpec, head: PartSpec, directory: Path, options: ort.SessionOptions, providers: list[str]
) -> SplitHead:
    """Verify the head's segments and DeformConv weights and set up the native kernels.

    The kernels use as many threads as the sessions' intra-op setting (0: one per CPU core).
    """
    threads = options.intra_op_num_threads or available_cpus()
    if spec.head != head.file or spec.head_sha256.lower() != head.sha256.lower():
        raise ModelError(
            f"head_split was cut from {spec.head!r} (sha256 {spec.head_sha256[:12]}...), but the card's "
            f"head is {head.file!r} (sha256 {head.sha256[:12]}...): run `csist split-head` again"
        )
    sessions = []
    for i, seg in enumerate(spec.segments):
        path = _verified_file(seg, directory, f"head segment {i}")
        try:
            sessions.append(ort.InferenceSession(str(path), sess_options=options, providers=providers))
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from None
    npz = _verified_file(spec.weights, directory, "DeformConv weights")
    try:
        with np.load(npz, allow_pickle=False) as arrays:
            weights = {name: arrays[name] for name in arrays.files}
        steps = [
            DeformStep(d.input, d.offset, d.output, deform.DeformConv3x3(weights[d.weight], weights[d.bias], threads))
            for d in spec.deform
        ]
    except (KeyError, ValueError, OSError) as exc:
        raise ModelError(f"DeformConv weights {npz} do not fit the card's head_split: {exc}") from None
    return SplitHead(sessions, steps, spec.input, spec.output)


def load_model(
    model_path: str | Path,
    card_path: str | Path | None = None,
    providers: list[str] | None = None,
    threads: int = 0,
    spinning: bool = False,
    parts: bool = True,
    graph_level: str = "all",
    arena: bool = True,
    deform_kernel: str = "auto",
) -> InferenceModel:
    """Load and verify the model; ModelError with a clear message when it cannot be served.

    ``parts``: also load the streaming encoder and head when the card lists them (both or
    neither must be listed). ``deform_kernel``: see the module docstring.
    """
    if deform_kernel not in DEFORM_KERNELS:
        raise ModelError(f"deform_kernel={deform_kernel!r} is not one of {DEFORM_KERNELS}")
    model_path = Path(model_path)
    card_path = Path(card_path) if card_path is not None else model_path.with_suffix(".json")
    if not model_path.is_file():
        raise ModelError(
            f"model file not found: {model_path} (export one with `csist export`, "
            "or point CSIST_MODEL_PATH / --model at it)"
        )
    try:
        card = load_card(card_path)
    except CardError as exc:
        raise ModelError(str(exc)) from None
    _check_card(card)
    digest = file_sha256(model_path)
    if digest.lower() != card.sha256.lower():
        raise ModelError(
            f"SHA-256 mismatch: {model_path} has {digest} but its card {card_path} says "
            f"{card.sha256.lower()}; the model file was changed or the card belongs to another "
            "model (re-export with `csist export` to write both)"
        )
    requested = resolve_providers(providers)
    options = session_options(threads, spinning, graph_level, arena)
    listed = set(card.parts)
    if listed and listed != {ENCODER, HEAD}:
        raise ModelError(f"model card parts {sorted(listed)}; expected both 'encoder' and 'head'")
    loaded = {}
    if parts and listed:
        loaded = {
            name: _load_part(name, card.parts[name], model_path.parent, options, requested)
            for name in (ENCODER, HEAD)
        }
    split = None
    if deform_kernel != "onnxruntime":
        why_not = None
        if not loaded:
            why_not = "the streaming parts are not loaded (card without parts, or feature cache off)"
        elif card.head_split is None:
            why_not = "the model card has no head_split (run `csist split-head`)"
        elif not deform.AVAILABLE:
            why_not = "the native kernel service._deform is not built (install with a C compiler)"
        elif requested[0] != "CPUExecutionProvider":
            why_not = f"the head runs on {requested[0]}, the native kernel on the CPU"
        if why_not is None:
            split = load_split_head(card.head_split, card.parts[HEAD], model_path.parent, options, requested)
        elif deform_kernel == "native":
            raise ModelError(f"deform_kernel='native' cannot be used: {why_not}")
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=requested)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise ModelError(f"ONNX Runtime cannot load {model_path}: {exc}") from None
    in_name, out_name = _check_session(session, card)
    return InferenceModel(
        path=model_path,
        card=card,
        sha256=digest,
        session=session,
        input_name=in_name,
        output_name=out_name,
        requested_providers=requested,
        providers=list(session.get_providers()),
        parts=loaded,
        split_head=split,
    )
