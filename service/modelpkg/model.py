"""Loading the ONNX model once from its package, checking it against its manifest, and running it.

The service refuses to start on a model it cannot vouch for: every file's SHA-256 must match the
manifest (``service.modelpkg.manifest``), and the graph's inputs and outputs must be the window
and HR-map shapes the API is built around. Those checks turn a wrong deployment into a clear
start-up error instead of wrong answers.

When the manifest lists the streaming parts (``parts.encoder``: LR frames -> stage-9 features,
``parts.head``: a window's 5 feature maps -> HR map), they are verified the same way and loaded
beside the single graph, so that a stream encodes each frame once instead of in 5 windows.

When the manifest also has the plan ``head_split`` (written by ``csist split-head``) and the native kernel of
``service/kernels/deform.py`` is built, the head runs on the CPU as its graph segments with that kernel
computing the DeformConv nodes between them (``deform_kernel``: "auto" uses it when it can,
"native" requires it, "onnxruntime" never uses it). The split files are verified like the rest.

When the manifest has the plan ``amx_split`` (written by ``csist split-amx``, with the accuracy it measured)
and the CPU has AMX, encoder and head both run as segments with their 32-channel 3x3 Convs
computed in bfloat16 by ``service/kernels/conv.py``, their DeformConvs by the native kernel and the
head's selective attention by ``service/kernels/attention.py`` (``conv_kernel``: "auto" uses it when it
can, "amx" requires it, "onnxruntime" never uses it). Runs of convs that feed only each other
(an ISTA stage, a residual body) are joined into one chain call at load (:func:`fused_chains`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from service.kernels import attention, conv, deform
from service.modelpkg.manifest import (
    ATTENTION_WEIGHTS,
    FileSpec,
    ModelPackage,
    PackageError,
    PartSpec,
    SplitSpec,
    file_sha256,
    load_package,
    verified,
)
from service.runtime.config import available_cpus
from service.science import peaks
from service.science.physics import RATIO, SIZE
from service.science.postprocess import REFINE_MODES
from service.science.windows import WINDOW

log = logging.getLogger("service.modelpkg.model")

AUTO_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
ENCODER, HEAD = "encoder", "head"
ALIGN, FUSE = "align", "fuse"  # the head's halves (optional parts): see InferenceModel.align
DEFORM_KERNELS = ("auto", "native", "onnxruntime")
# The AMX split's segments are the glue between the native kernels (matrix products, 1x1 convs,
# reductions, concatenations). ONNX Runtime's NCHWc layout transformer reorders tensors to and
# from its blocked layout around every Conv it takes; on these small glue segments the reorders
# cost more than the blocked layout saves.
AMX_GLUE_DISABLED_OPTIMIZERS = ("NchwcTransformer",)
CONV_KERNELS = ("auto", "amx", "onnxruntime")


class ModelError(RuntimeError):
    """The model cannot be served (missing, altered, or not the expected interface)."""


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
    # the event loop needs, so it is off.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    return options


@dataclass
class Part:
    """One verified streaming part (encoder or head) in its own session."""

    path: Path
    sha256: str
    session: ort.InferenceSession | None  # None: a split of the part runs instead (not opened)
    input_name: str
    output_name: str

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]


@dataclass
class Step:
    """One node of a split part computed by a native kernel: ``output = kernel(*inputs)``."""

    op: str
    inputs: tuple[str, ...]
    output: str
    kernel: Callable[..., np.ndarray]


@dataclass
class SplitGraph:
    """A streaming part as ONNX Runtime segments with native kernels computing the nodes between.

    Tensors keep their names in the part's graph: segment ``i`` (None when no node falls between
    two steps) reads what the input and the earlier segments and steps produced, then step ``i``
    adds its output.
    """

    name: str
    segments: list[ort.InferenceSession | None]
    steps: list[Step]
    input_name: str
    output_name: str
    files: tuple[str, ...] = ()  # the segment and weight files it was loaded from

    def __post_init__(self):
        if len(self.segments) != len(self.steps) + 1:
            raise ModelError(f"{self.name} split has {len(self.segments)} segments for {len(self.steps)} steps")
        self._io = [
            ([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]) if s else ([], [])
            for s in self.segments
        ]
        known = {self.input_name}
        for i, (inputs, outputs) in enumerate(self._io):
            missing = sorted(set(inputs) - known)
            if missing:
                raise ModelError(f"{self.name} segment {i} needs {missing}, which nothing before it produces")
            known.update(outputs)
            if i < len(self.steps):
                step = self.steps[i]
                if not set(step.inputs) <= known:
                    raise ModelError(f"{step.op} step {i} of the {self.name} needs {list(step.inputs)}")
                known.add(step.output)
        if self.output_name not in known:
            raise ModelError(f"{self.name} split never produces its output {self.output_name!r}")

    @property
    def ops(self) -> set[str]:
        return {step.op for step in self.steps}

    def run(self, x: np.ndarray) -> np.ndarray:
        env = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        for i, (session, (inputs, outputs)) in enumerate(zip(self.segments, self._io)):
            if session is not None:
                env.update(zip(outputs, session.run(outputs, {name: env[name] for name in inputs})))
            if i < len(self.steps):
                step = self.steps[i]
                env[step.output] = step.kernel(*(env[name] for name in step.inputs))
        return env[self.output_name]


@dataclass
class InferenceModel:
    """An ONNX Runtime session plus the package that describes it."""

    path: Path  # the single graph's file
    card: ModelPackage  # the verified package: manifest (name, interface, files) and provenance
    sha256: str
    session: ort.InferenceSession | None  # the single graph; None when the parts run every window
    input_name: str
    output_name: str
    requested_providers: list[str]
    providers: list[str] = field(default_factory=list)
    parts: dict[str, Part] = field(default_factory=dict)
    split_head: SplitGraph | None = None
    split_encoder: SplitGraph | None = None
    split_align: SplitGraph | None = None
    split_fuse: SplitGraph | None = None

    @property
    def deform_kernel(self) -> str:
        """Which code computes the head's DeformConv: "native" (float32), "amx" (bfloat16, the AMX
        split) or "onnxruntime"."""
        if self.split_head is None:
            return "onnxruntime"
        amx = any(s.op == "DeformConv" and getattr(s.kernel, "kernel", None) == "amx" for s in self.split_head.steps)
        return "amx" if amx else "native"

    @property
    def conv_kernel(self) -> str:
        """Which code computes the 32-channel 3x3 Convs: "amx" (bfloat16) or "onnxruntime"."""
        return "amx" if self.split_encoder is not None else "onnxruntime"

    @property
    def has_parts(self) -> bool:
        """Whether the streaming encoder and head are loaded (the feature cache is usable)."""
        return ENCODER in self.parts and HEAD in self.parts

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """Features (n, 1089) float32 of LR frames (n, 11, 11); needs :attr:`has_parts`."""
        return self._run_part(ENCODER, frames)

    def head(self, features: np.ndarray) -> np.ndarray:
        """HR maps (b, 33, 33) of windows' features (b, 5, 1089); needs :attr:`has_parts`."""
        return self._run_part(HEAD, features)

    @property
    def has_pairs(self) -> bool:
        """Whether the head's halves run with the same kernels as the head: then a window's
        neighbours can be aligned one by one (:meth:`align`) and the window finished later
        (:meth:`fuse`), giving the head's map."""
        if ALIGN not in self.parts or FUSE not in self.parts or not self.has_parts:
            return False
        return self.split_head is None or (self.split_align is not None and self.split_fuse is not None)

    def align(self, pair_features: np.ndarray) -> np.ndarray:
        """Aligned neighbours (p, 1089) of ``service.science.windows.pair_features`` (p, 5, 1089)."""
        return self._run_part(ALIGN, pair_features)

    def fuse(self, stack: np.ndarray) -> np.ndarray:
        """HR maps (b, 33, 33) of ``service.science.windows.fuse_features`` (b, 5, 1089)."""
        return self._run_part(FUSE, stack)

    def _run_part(self, name: str, x: np.ndarray) -> np.ndarray:
        """A streaming part on ``x``: its split (native kernels between segments) when loaded."""
        split = getattr(self, f"split_{name}")
        return split.run(x) if split is not None else self.parts[name].run(x)

    @property
    def hr_size(self) -> int:
        return self.card.physics.size * self.card.physics.ratio

    def run(self, windows: np.ndarray) -> np.ndarray:
        """HR maps (n, 33, 33) float32 of windows (n, 5, 11, 11); thread-safe (ORT sessions are).

        Without the single graph's session, the parts compute it: every frame encoded, then the
        head (the same function; the exporter checks the two agree)."""
        x = np.ascontiguousarray(windows, dtype=np.float32)
        if self.session is None:
            n, t, h, w = x.shape
            return self.head(self.encode(x.reshape(n * t, h, w)).reshape(n, t, -1))
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
            if self.has_pairs:
                aligned = self.align(np.zeros((n, WINDOW, self.hr_size**2), dtype=np.float32))
                out = self.fuse(np.zeros((n, WINDOW, self.hr_size**2), dtype=np.float32))
                if aligned.shape != (n, self.hr_size**2) or out.shape != (n, self.hr_size, self.hr_size):
                    raise ModelError(f"model align/fuse outputs have shapes {aligned.shape}, {out.shape}")

    def metadata(self) -> dict:
        """Identity of the model, as echoed in every answer."""
        return {"name": self.card.name, "version": self.card.version, "sha256": self.sha256}


def _check_interface(package: ModelPackage) -> None:
    """The manifest must describe the interface this service speaks (11x11 patches, 5-frame windows)."""
    phys = package.physics
    if (phys.size, phys.ratio) != (SIZE, RATIO):
        raise ModelError(
            f"manifest interface.physics size={phys.size} ratio={phys.ratio}; this service serves "
            f"size={SIZE} ratio={RATIO}"
        )
    want_in, want_out = [WINDOW, SIZE, SIZE], [SIZE * RATIO, SIZE * RATIO]
    if list(package.inputs[0].shape[1:]) != want_in:
        raise ModelError(f"manifest interface input shape {package.inputs[0].shape}, expected [batch, *{want_in}]")
    if list(package.outputs[0].shape[1:]) != want_out:
        raise ModelError(f"manifest interface output shape {package.outputs[0].shape}, expected [batch, *{want_out}]")
    mode = package.postprocess.mode
    peak_modes = getattr(peaks, "PEAK_MODES", None)
    if mode is not None and (peak_modes is None or mode not in peak_modes):
        raise ModelError(f"manifest interface.postprocess.mode={mode!r} is not one of {peak_modes}")
    if package.postprocess.refine not in REFINE_MODES:
        refine = package.postprocess.refine
        raise ModelError(f"manifest interface.postprocess.refine={refine!r} is not one of {REFINE_MODES}")


def _check_session(session: ort.InferenceSession, spec: ModelPackage | PartSpec) -> tuple[str, str]:
    """The graph's input/output names and static dims must agree with the manifest (or the part)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    by_name_in = {i.name: i for i in inputs}
    by_name_out = {o.name: o for o in outputs}
    in_name, out_name = spec.inputs[0].name, spec.outputs[0].name
    if in_name not in by_name_in:
        raise ModelError(f"model has inputs {sorted(by_name_in)}, the manifest says {in_name!r}")
    if out_name not in by_name_out:
        raise ModelError(f"model has outputs {sorted(by_name_out)}, the manifest says {out_name!r}")
    for what, node, tensor in (
        ("input", by_name_in[in_name], spec.inputs[0]),
        ("output", by_name_out[out_name], spec.outputs[0]),
    ):
        dims = list(node.shape)
        if len(dims) != len(tensor.shape):
            raise ModelError(f"model {what} {node.name!r} has shape {dims}, the manifest says {tensor.shape}")
        for got, want in zip(dims[1:], tensor.shape[1:], strict=True):
            if isinstance(got, int) and isinstance(want, int) and got != want:
                raise ModelError(f"model {what} {node.name!r} has shape {dims}, the manifest says {tensor.shape}")
    return in_name, out_name


def _part_shapes(name: str) -> tuple[list[int], list[int]]:
    """Static input/output dims (after the batch dim) the service needs of a part."""
    hr = SIZE * RATIO
    if name == ENCODER:
        return [SIZE, SIZE], [hr * hr]
    if name == ALIGN:
        return [WINDOW, hr * hr], [hr * hr]
    return [WINDOW, hr * hr], [hr, hr]


def _load_part(
    name: str,
    spec: PartSpec,
    directory: Path,
    options: ort.SessionOptions,
    providers: list[str],
    session: bool = True,
) -> Part:
    """Verify one streaming part (hash, tensor names and shapes) and open its session (``session``
    False: verified only, for a part whose split runs instead)."""
    path = directory / spec.file
    if not path.is_file():
        raise ModelError(f"model part {name!r} not found: {path} (listed in the manifest)")
    want_in, want_out = _part_shapes(name)
    if list(spec.inputs[0].shape[1:]) != want_in or list(spec.outputs[0].shape[1:]) != want_out:
        raise ModelError(
            f"manifest part {name!r} maps {spec.inputs[0].shape} -> {spec.outputs[0].shape}; "
            f"expected [n, *{want_in}] -> [n, *{want_out}]"
        )
    digest = file_sha256(path)
    if digest.lower() != spec.sha256.lower():
        raise ModelError(
            f"SHA-256 mismatch: model part {path} has {digest} but the manifest says "
            f"{spec.sha256.lower()} (re-export with `csist export` to write both)"
        )
    if not session:
        return Part(path, digest, None, spec.inputs[0].name, spec.outputs[0].name)
    try:
        opened = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from None
    in_name, out_name = _check_session(opened, spec)
    return Part(path, digest, opened, in_name, out_name)


def _verified_file(spec: FileSpec, directory: Path, what: str, command: str) -> Path:
    try:
        return verified(directory, spec, what, f"split anew with `{command}`")
    except PackageError as exc:
        raise ModelError(str(exc)) from None


def load_split(
    name: str,
    spec: SplitSpec,
    part: PartSpec,
    directory: Path,
    options: ort.SessionOptions,
    providers: list[str],
    fuse: bool = True,
    disabled_optimizers: tuple[str, ...] = (),
) -> SplitGraph:
    """Verify a split part's segments and weights and set up its native kernels.

    The kernels use as many threads as the sessions' intra-op setting (0: one per CPU core).
    ``fuse``: join runs of AMX-split convs into chains (:func:`fused_chains`).
    ``disabled_optimizers``: ONNX Runtime graph optimizers the segments' sessions leave out.
    """
    threads = options.intra_op_num_threads or available_cpus()
    command = "csist split-amx" if spec.steps and any(s.op == "Conv" for s in spec.steps) else "csist split-head"
    if spec.part != part.file or spec.part_sha256.lower() != part.sha256.lower():
        raise ModelError(
            f"the {name} split was cut from {spec.part!r} (sha256 {spec.part_sha256[:12]}...), but the manifest's "
            f"{name} is {part.file!r} (sha256 {part.sha256[:12]}...): run `{command}` again"
        )
    sessions = []
    for i, seg in enumerate(spec.segments):
        if seg is None:
            sessions.append(None)
            continue
        path = _verified_file(seg, directory, f"{name} segment {i}", command)
        try:
            sessions.append(
                ort.InferenceSession(
                    str(path), sess_options=options, providers=providers, disabled_optimizers=list(disabled_optimizers)
                )
            )
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from None
    npz = _verified_file(spec.weights, directory, f"{name} split weights", command)
    try:
        with np.load(npz, allow_pickle=False) as arrays:
            weights = {key: arrays[key] for key in arrays.files}
        steps = []
        for s in spec.steps:
            if s.op == "Attention":
                kernel = attention.SelectiveAttention(
                    weights[s.weight],
                    weights[s.bias],
                    *(weights[s.extra[k]] for k in ATTENTION_WEIGHTS),
                    threads=threads,
                )
            elif s.op == "DeformConv":
                kernel = deform.DeformConv3x3(weights[s.weight], weights[s.bias], threads, s.kernel or "native")
            else:
                kernel = conv.Conv3x3(
                    weights[s.weight], weights[s.bias], s.kernel, s.activation, s.clip, threads, s.residual
                )
            steps.append(Step(s.op, tuple(s.inputs), s.output, kernel))
    except (KeyError, ValueError, OSError, RuntimeError) as exc:  # RuntimeError: a kernel cannot run here
        raise ModelError(
            f"split weights {npz} do not fit the manifest's {name} split, or its kernels cannot run here: {exc}"
        ) from None
    if fuse:
        sessions, steps = fused_chains(sessions, steps, spec.output)
    files = tuple(seg.file for seg in spec.segments if seg is not None) + (spec.weights.file,)
    return SplitGraph(name, sessions, steps, spec.input, spec.output, files)


def fused_chains(
    segments: list[ort.InferenceSession | None], steps: list[Step], output: str
) -> tuple[list[ort.InferenceSession | None], list[Step]]:
    """The split with each run of native Conv steps that feed only each other as one chain step.

    Steps ``i`` and ``i + 1`` join when no segment runs between them, step ``i + 1`` reads
    step ``i``'s output (and, if it adds a residual, that as its second input), and nothing else
    reads it (no later segment or step, not the part's output). Only a chain's last conv adds a
    residual. The chain computes the same numbers (see :class:`service.kernels.conv.ConvChain`).
    """
    readers: dict[str, int] = {output: 1}
    for session in segments:
        for i in session.get_inputs() if session is not None else ():
            readers[i.name] = readers.get(i.name, 0) + 1
    for step in steps:
        for name in step.inputs:
            readers[name] = readers.get(name, 0) + 1

    def joins(a: Step, b: Step, between: ort.InferenceSession | None) -> bool:
        return (
            conv.AMX
            and between is None
            and isinstance(a.kernel, conv.Conv3x3)
            and isinstance(b.kernel, conv.Conv3x3)
            and b.inputs[0] == a.output
            and a.output not in b.inputs[1:]
            and readers.get(a.output) == 1
            and conv.chains_into(a.kernel, b.kernel)
            and len(runs[-1]) < conv.CHAIN_MAX
        )

    runs: list[list[int]] = []
    for i, step in enumerate(steps):
        if runs and runs[-1][-1] == i - 1 and joins(steps[i - 1], step, segments[i]):
            runs[-1].append(i)
        else:
            runs.append([i])
    new_segments, new_steps = [segments[0]], []
    for run in runs:
        if len(run) == 1:
            new_steps.append(steps[run[0]])
        else:
            first, last = steps[run[0]], steps[run[-1]]
            chain = conv.ConvChain([steps[i].kernel for i in run])
            new_steps.append(Step("ConvChain", first.inputs + last.inputs[1:], last.output, chain))
        new_segments.append(segments[run[-1] + 1])
    return new_segments, new_steps


def _native_blocker(loaded: dict, requested: list[str]) -> str | None:
    """Why no split part can run here (None: it can)."""
    if not loaded:
        return "the streaming parts are not loaded (a manifest without parts, or feature cache off)"
    if requested[0] != "CPUExecutionProvider":
        return f"the parts run on {requested[0]}, the native kernels on the CPU"
    return None


def load_model(
    path: str | Path,
    providers: list[str] | None = None,
    threads: int = 0,
    spinning: bool = False,
    parts: bool = True,
    graph_level: str = "all",
    arena: bool = True,
    deform_kernel: str = "auto",
    conv_kernel: str = "auto",
    fuse_convs: bool = True,
    single: bool = True,
    whole_parts: bool = False,
) -> InferenceModel:
    """Load and verify the model at ``path`` (its folder, or its manifest); ModelError with a clear
    message when it cannot be served (a model of the old flat layout: naming the migration command).

    ``parts``: also load the streaming encoder and head when the manifest lists them (both or
    neither must be listed). ``deform_kernel``, ``conv_kernel``: see the module docstring.
    ``fuse_convs``: run the AMX split's consecutive convs as chains (the same numbers, fewer
    copies; off only to compare). ``single``: also open the single graph when the parts are
    loaded (without it :meth:`InferenceModel.run` computes windows through the parts). Only the
    files that will run get a session: a part replaced by its split is verified, not opened,
    unless ``whole_parts`` (the split checks compare the two).
    """
    if deform_kernel not in DEFORM_KERNELS:
        raise ModelError(f"deform_kernel={deform_kernel!r} is not one of {DEFORM_KERNELS}")
    if conv_kernel not in CONV_KERNELS:
        raise ModelError(f"conv_kernel={conv_kernel!r} is not one of {CONV_KERNELS}")
    try:
        card = load_package(path)
    except PackageError as exc:
        raise ModelError(str(exc)) from None
    _check_interface(card)
    model_path, directory = card.model_file, card.directory
    if not model_path.is_file():
        raise ModelError(f"model file not found: {model_path} (listed in {card.manifest_path})")
    digest = file_sha256(model_path)
    if digest.lower() != card.sha256:
        raise ModelError(
            f"SHA-256 mismatch: {model_path} has {digest} but its manifest {card.manifest_path} says "
            f"{card.sha256}; the model file was changed or the manifest belongs to another "
            "model (re-export with `csist export` to write both)"
        )
    requested = resolve_providers(providers)
    options = session_options(threads, spinning, graph_level, arena)
    listed = set(card.parts)
    if listed and listed not in ({ENCODER, HEAD}, {ENCODER, HEAD, ALIGN, FUSE}):
        raise ModelError(
            f"manifest parts {sorted(listed)}; expected 'encoder' and 'head' (and optionally 'align' and 'fuse')"
        )
    loaded = {}
    if parts and listed:
        loaded = {
            name: _load_part(name, card.parts[name], directory, options, requested, session=False)
            for name in sorted(listed)
        }
    split_head = split_encoder = split_align = split_fuse = None
    if conv_kernel != "onnxruntime":
        why_not = _native_blocker(loaded, requested)
        if why_not is None and card.amx_split is None:
            why_not = "the manifest has no amx_split plan (run `csist split-amx`)"
        if why_not is None and deform_kernel == "onnxruntime":
            why_not = "deform_kernel='onnxruntime' (the AMX split computes DeformConv natively)"
        if why_not is None and not conv.AMX:
            why_not = conv.WHY_NOT_AMX
        if why_not is None and not deform.AVAILABLE:
            why_not = "the native kernel service.kernels._deform is not built (install with a C compiler)"
        if why_not is None:
            amx = card.amx_split
            split_encoder = load_split(
                ENCODER,
                amx.encoder,
                card.parts[ENCODER],
                directory,
                options,
                requested,
                fuse_convs,
                AMX_GLUE_DISABLED_OPTIMIZERS,
            )
            split_head = load_split(
                HEAD,
                amx.head,
                card.parts[HEAD],
                directory,
                options,
                requested,
                fuse_convs,
                AMX_GLUE_DISABLED_OPTIMIZERS,
            )
            if ALIGN in loaded and amx.align is not None and amx.fuse is not None:
                split_align, split_fuse = (
                    load_split(
                        name,
                        spec,
                        card.parts[name],
                        directory,
                        options,
                        requested,
                        fuse_convs,
                        AMX_GLUE_DISABLED_OPTIMIZERS,
                    )
                    for name, spec in ((ALIGN, amx.align), (FUSE, amx.fuse))
                )
        elif conv_kernel == "amx":
            raise ModelError(f"conv_kernel='amx' cannot be used: {why_not}")
        else:
            log.info("AMX convolution not used", extra={"reason": why_not})
    if split_head is None and deform_kernel != "onnxruntime":
        why_not = _native_blocker(loaded, requested)
        if why_not is None and card.head_split is None:
            why_not = "the manifest has no head_split plan (run `csist split-head`)"
        if why_not is None and not deform.AVAILABLE:
            why_not = "the native kernel service.kernels._deform is not built (install with a C compiler)"
        if why_not is None:
            split_head = load_split(HEAD, card.head_split, card.parts[HEAD], directory, options, requested)
        elif deform_kernel == "native":
            raise ModelError(f"deform_kernel='native' cannot be used: {why_not}")
    if split_head is not None and (split_align is None or split_fuse is None):
        # the halves would run on other kernels than the head, so they do not run at all
        loaded.pop(ALIGN, None), loaded.pop(FUSE, None)
    splits = {HEAD: split_head, ENCODER: split_encoder, ALIGN: split_align, FUSE: split_fuse}
    for name in sorted(loaded):
        if splits.get(name) is None or whole_parts:
            loaded[name] = _load_part(name, card.parts[name], directory, options, requested)
    session, in_name, out_name = None, card.inputs[0].name, card.outputs[0].name
    if single or not loaded:
        try:
            session = ort.InferenceSession(str(model_path), sess_options=options, providers=requested)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ModelError(f"ONNX Runtime cannot load {model_path}: {exc}") from None
        in_name, out_name = _check_session(session, card)
    opened = [session] + [p.session for p in loaded.values()]
    used = next((list(o.get_providers()) for o in opened if o is not None), list(requested))
    return InferenceModel(
        path=model_path,
        card=card,
        sha256=digest,
        session=session,
        input_name=in_name,
        output_name=out_name,
        requested_providers=requested,
        providers=used,
        parts=loaded,
        split_head=split_head,
        split_encoder=split_encoder,
        split_align=split_align,
        split_fuse=split_fuse,
    )
