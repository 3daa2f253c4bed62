"""The model package: one folder per model, its versioned manifest and its provenance.

    models/derefnet/
        manifest.json       what the service needs to run the model (this module's Manifest)
        provenance.json     how it was made and measured (Provenance): reports only
        model.onnx          the single graph
        encoder.onnx, head.onnx, align.onnx, fuse.onnx      the streaming parts
        head.seg<i>.onnx, head.deform.npz                   the head split (csist split-head)
        amx/<part>.seg<i>.onnx, amx/<part>.weights.npz      the AMX split (csist split-amx)

The manifest names every file by its path inside the folder and its SHA-256; the service
verifies each file it runs (and the provenance it shows) and refuses the model otherwise. This
module is the one schema of that format: every writer (``csist export``, ``split-head``,
``split-amx``, ``quantize``, ``migrate-model``) builds these models and writes them with
:func:`write_package`, and the service reads them with :func:`load_package`. It needs neither
ONNX Runtime nor torch.

A manifest carries ``schema_version``; a reader refuses a version it does not know rather than
guess at its fields, and refuses the flat layout that came before (``derefnet.onnx`` with its
card ``derefnet.json`` beside it), naming the command that migrates it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service.science.peaks import DEFAULT_THRESHOLD

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PROVENANCE = "provenance.json"
MODEL_FILE = "model.onnx"
MIGRATE = "csist migrate-model"
HEAD_SPLIT, AMX_SPLIT = "head_split", "amx_split"
AMX_DIR = "amx"  # the AMX split's files, apart from the float32 ones


class PackageError(ValueError):
    """The model package is missing, unreadable, of another layout or inconsistent."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks (models can be large). The plan choice loads the
    same files for several plans: a file unchanged since it was hashed (same size and
    modification time) is not read again."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ file names


def part_file(name: str) -> str:
    """Where streaming part ``name`` (encoder, head, align, fuse) lives in its folder."""
    return f"{name}.onnx"


def split_file_names(plan: str, part: str, segments: int, suffix: str = "") -> tuple[list[str], str]:
    """(segment files, weights file) of ``part``'s split for ``plan`` (``head_split`` or
    ``amx_split``), ``suffix`` before the extension (a split under test has temporary names)."""
    if plan == HEAD_SPLIT:
        stem, weights = part, f"{part}.deform{suffix}.npz"
    elif plan == AMX_SPLIT:
        stem, weights = f"{AMX_DIR}/{part}", f"{AMX_DIR}/{part}.weights{suffix}.npz"
    else:
        raise ValueError(f"unknown plan {plan!r} (one of {HEAD_SPLIT}, {AMX_SPLIT})")
    return [f"{stem}.seg{i}{suffix}.onnx" for i in range(segments)], weights


# ------------------------------------------------------------------------------ the schema

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]


def _inside(value: str) -> str:
    path = PurePosixPath(value)
    if not value or "\\" in value or path.is_absolute() or ".." in path.parts or value != path.as_posix():
        raise ValueError(f"{value!r} must be a relative path inside the model folder, written with '/'")
    return value


RelativePath = Annotated[str, AfterValidator(_inside)]


class TensorSpec(BaseModel):
    """One input or output of an ONNX graph."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int | str]
    dtype: str = "float32"
    units: str | None = None


class PhysicsSpec(BaseModel):
    """Sensor model the network was trained for (extra keys kept, shown in the metadata)."""

    model_config = ConfigDict(extra="allow")

    size: int = 11
    ratio: int = 3
    psf_sigma: float = 0.5


class PostprocessSpec(BaseModel):
    """Default peak-extraction options, tuned with the model (extra keys kept)."""

    model_config = ConfigDict(extra="allow")

    threshold: float = DEFAULT_THRESHOLD
    refine: str = "centroid"
    # Peak rule of service.science.peaks (e.g. "cells" or "local_max"); None: that module's default.
    mode: str | None = None


class FileSpec(BaseModel):
    """A file of the package: its path inside the folder and its hash."""

    model_config = ConfigDict(extra="forbid")

    file: RelativePath
    sha256: Sha256
    bytes: int | None = Field(default=None, ge=0)


class PartSpec(FileSpec):
    """One streaming part (the encoder, the head or one of its halves), verified like the model."""

    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)


ATTENTION_WEIGHTS = ("nb_weight", "nb_bias", "mix_weight", "mix_bias")


class StepSpec(BaseModel):
    """One node of a split graph computed by a native kernel: tensor names in the graph, weight
    keys in the split's .npz. DeformConv reads (x, offset) and runs on the float32 kernel of
    service/kernels/deform.py, or with ``kernel`` "amx" on its bfloat16 AMX kernel; Conv reads x and runs
    on ``kernel`` "amx" or "direct" (service/kernels/conv.py), ending with the ``activation`` folded in
    from the graph (the soft threshold with its ``clip`` bounds) and, with ``residual``, the Add
    of its second input after it; Attention reads (mid, nb) and
    runs DeRefNet's selective attention (service/kernels/attention.py): ``weight``/``bias`` the mid
    squeeze, ``extra`` the keys of the others."""

    model_config = ConfigDict(extra="forbid")

    op: Literal["Conv", "DeformConv", "Attention"]
    inputs: list[str] = Field(min_length=1, max_length=2)
    output: str
    weight: str
    bias: str
    kernel: Literal["amx", "direct"] | None = None
    activation: Literal["none", "relu", "soft_threshold"] = "none"
    clip: list[float] | None = Field(default=None, min_length=2, max_length=2)
    extra: dict[str, str] | None = None  # Attention: the keys of its other weights
    residual: bool = False  # Conv: adds its second input after the activation (a residual Add)

    @model_validator(mode="after")
    def _consistent(self):
        takes = 1 + self.residual if self.op == "Conv" else 2
        if self.residual and self.op != "Conv":
            raise ValueError("only a Conv step folds a residual Add")
        if len(self.inputs) != takes:
            raise ValueError(f"{self.op} step takes {takes} inputs, got {self.inputs}")
        if self.op == "Attention" and (
            self.kernel is not None or self.activation != "none" or set(self.extra or {}) != set(ATTENTION_WEIGHTS)
        ):
            raise ValueError(f"an Attention step has no kernel or activation and names its weights {ATTENTION_WEIGHTS}")
        if self.op == "Conv" and self.kernel is None:
            raise ValueError("a Conv step names its kernel")
        if self.op == "DeformConv" and self.kernel not in (None, "amx"):
            raise ValueError("a DeformConv step's kernel is the float32 one (none named) or amx")
        if (self.activation == "soft_threshold") != (self.clip is not None):
            raise ValueError("clip [lo, hi] goes with activation soft_threshold, and only with it")
        if self.clip is not None and not self.clip[0] <= self.clip[1]:
            raise ValueError(f"clip {self.clip}: lo must not exceed hi")
        return self


class SplitSpec(BaseModel):
    """A streaming part cut at the nodes native kernels compute (``csist split-head`` / ``split-amx``):
    ONNX segment i (None when no node falls between two steps), then step i, ..., last segment."""

    model_config = ConfigDict(extra="forbid")

    part: RelativePath  # the file of the part it was cut from, and that file's hash
    part_sha256: Sha256
    input: str
    output: str
    segments: list[FileSpec | None] = Field(min_length=2)
    steps: list[StepSpec] = Field(min_length=1)
    weights: FileSpec

    @model_validator(mode="after")
    def _interleaved(self):
        if len(self.segments) != len(self.steps) + 1:
            raise ValueError(f"{len(self.segments)} segments for {len(self.steps)} steps (need one more)")
        return self

    def files(self) -> list[FileSpec]:
        return [s for s in self.segments if s is not None] + [self.weights]


class AmxSplitSpec(BaseModel):
    """Encoder and head cut at their 32-channel Convs too, for the bfloat16 AMX kernel."""

    model_config = ConfigDict(extra="forbid")

    precision: Literal["bfloat16"]
    encoder: SplitSpec
    head: SplitSpec
    # The head as its two halves, when the manifest lists them as parts: one neighbour's
    # alignment and the fusion (the service then aligns a window's neighbours before its last
    # frame comes).
    align: SplitSpec | None = None
    fuse: SplitSpec | None = None

    def splits(self) -> list[SplitSpec]:
        return [s for s in (self.encoder, self.head, self.align, self.fuse) if s is not None]


class Plans(BaseModel):
    """Cuts of the streaming parts for the service's native kernels; each is optional."""

    model_config = ConfigDict(extra="forbid")

    # The head as graph segments between its DeformConv nodes, which the native float32 kernel
    # computes (service/kernels/deform.py). Absent: ONNX Runtime runs the whole head.
    head_split: SplitSpec | None = None
    # Encoder and head cut at their DeformConv and 32-channel Conv nodes, for the native kernels
    # with the bfloat16 AMX convolution (service/kernels/conv.py). Absent: no AMX path.
    amx_split: AmxSplitSpec | None = None

    def splits(self) -> list[SplitSpec]:
        own = [self.head_split] if self.head_split is not None else []
        return own + (self.amx_split.splits() if self.amx_split is not None else [])


class Interface(BaseModel):
    """What the model computes, as the service speaks to it."""

    model_config = ConfigDict(extra="forbid")

    opset: int | None = None
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    physics: PhysicsSpec = PhysicsSpec()
    postprocess: PostprocessSpec = PostprocessSpec()
    config: dict[str, Any] = {}  # the network's configuration (training.model.DeRefNetConfig)
    parameters: int | None = None


class SourceSpec(BaseModel):
    """The float32 model an int8 one was quantized from: its folder, relative to this one, and
    the hash of its single graph. The service checks the int8 maps against it when it is there."""

    model_config = ConfigDict(extra="forbid")

    package: str
    sha256: Sha256


class Manifest(BaseModel):
    """``manifest.json``: identity, interface, files and plans of one model.

    ``files`` is the inventory of the folder (everything the other sections name, with the
    provenance): a writer leaves it out and :func:`write_package` fills it; a manifest read back
    must list exactly what its sections name, with the same hashes.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    interface: Interface
    model: FileSpec  # the single graph
    # Streaming parts: "encoder" (frames -> features) and "head" (5 frames' features -> HR map),
    # and optionally the head's halves "align" (one neighbour aligned to the middle frame) and
    # "fuse" (aligned neighbours -> HR map). Absent: the service runs the single graph only.
    parts: dict[str, PartSpec] = {}
    plans: Plans = Plans()
    quantized_from: SourceSpec | None = None  # set on an int8 model (csist quantize)
    provenance: FileSpec | None = None
    files: list[FileSpec] = Field(default_factory=list, validate_default=True)

    @field_validator("files")
    @classmethod
    def _inventory(cls, files: list[FileSpec], info: ValidationInfo) -> list[FileSpec]:
        data = info.data
        if not {"model", "parts", "plans", "provenance"} <= data.keys():
            return files  # a section is invalid: that is the error to report
        named: dict[str, FileSpec] = {}
        splits = [f for s in data["plans"].splits() for f in s.files()]
        listed_elsewhere = [data["model"], *data["parts"].values(), *splits]
        for spec in listed_elsewhere + ([data["provenance"]] if data["provenance"] is not None else []):
            seen = named.get(spec.file)
            if seen is not None and seen.sha256.lower() != spec.sha256.lower():
                raise ValueError(f"{spec.file} is named twice with different sha256")
            if seen is None or seen.bytes is None:
                named[spec.file] = FileSpec(file=spec.file, sha256=spec.sha256.lower(), bytes=spec.bytes)
        if not files:
            return sorted(named.values(), key=lambda f: f.file)
        listed = {f.file: f.sha256.lower() for f in files}
        want = {name: f.sha256 for name, f in named.items()}
        if listed != want:
            problems = [f"{n} is named but not listed" for n in sorted(want.keys() - listed.keys())]
            problems += [f"{n} is listed but named nowhere" for n in sorted(listed.keys() - want.keys())]
            problems += [
                f"{n} is listed with another sha256" for n in sorted(want) if listed.get(n, want[n]) != want[n]
            ]
            raise ValueError(f"not the files the manifest names: {'; '.join(problems)}")
        return files


class Provenance(BaseModel):
    """``provenance.json``: how the model was made and measured. Reports only: the service reads
    ``metrics`` to show them at ``GET /v2/models/{name}`` and nothing else; writers add keys freely."""

    model_config = ConfigDict(extra="allow")

    export: dict[str, Any] | None = None  # the exporter's command and checks
    training: dict[str, Any] | None = None  # the training commands, steps, time and hardware
    data: dict[str, Any] | None = None  # the commands that made the data
    host: dict[str, Any] | None = None
    metrics: dict[str, Any] = {}  # `csist evaluate` reports, shown as they are
    metrics_updated: dict[str, Any] | None = None  # when `csist export --metrics-only` replaced them
    precision: dict[str, Any] | None = None  # an int8 model: what computes in which precision
    quantization: dict[str, Any] | None = None  # an int8 model: calibration, checks, command
    plans: dict[str, dict[str, Any]] = {}  # per plan of the manifest: its command, date and checks


@dataclass(frozen=True)
class ModelPackage:
    """A model package as read from its folder: the manifest and the provenance, with the fields
    the service uses at hand."""

    directory: Path
    manifest_path: Path
    manifest: Manifest
    provenance: Provenance

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def sha256(self) -> str:
        """The single graph's hash, as the manifest records it."""
        return self.manifest.model.sha256.lower()

    @property
    def model_file(self) -> Path:
        return self.directory / self.manifest.model.file

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.manifest.interface.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.manifest.interface.outputs

    @property
    def physics(self) -> PhysicsSpec:
        return self.manifest.interface.physics

    @property
    def postprocess(self) -> PostprocessSpec:
        return self.manifest.interface.postprocess

    @property
    def parts(self) -> dict[str, PartSpec]:
        return self.manifest.parts

    @property
    def head_split(self) -> SplitSpec | None:
        return self.manifest.plans.head_split

    @property
    def amx_split(self) -> AmxSplitSpec | None:
        return self.manifest.plans.amx_split

    @property
    def metrics(self) -> dict[str, Any]:
        return self.provenance.metrics


# ------------------------------------------------------------------------------ reading


def migrate_command(onnx_path: Path) -> str:
    """The command that turns a flat model into a folder beside it."""
    return f"{MIGRATE} {onnx_path} --out {onnx_path.with_suffix('')}"


def is_flat_card(raw: Any) -> bool:
    """Whether parsed JSON is a card of the flat layout (no schema_version, a model hash)."""
    return isinstance(raw, dict) and "schema_version" not in raw and "sha256" in raw and "inputs" in raw


def _flat_card_of(path: Path) -> dict | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return raw if is_flat_card(raw) else None


def _flat_error(onnx_path: Path) -> PackageError:
    return PackageError(
        f"{onnx_path} is a model in the old flat layout (its card {onnx_path.with_suffix('.json').name} beside "
        f"it), which this csist no longer reads; migrate it to a model folder with `{migrate_command(onnx_path)}` "
        "and point CSIST_MODEL_PATH / --model at that folder"
    )


def locate_manifest(path: str | Path) -> Path:
    """The manifest of the model at ``path``: a model folder (holding ``manifest.json``) or a
    manifest file. PackageError for anything else, naming the migration command for a model of
    the flat layout (an ``.onnx`` file with its card beside it, or a folder of them)."""
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return path / MANIFEST
        for card in sorted(path.glob("*.json")):
            raw = _flat_card_of(card)
            if raw is not None:
                raise _flat_error(path / str(raw.get("file") or card.with_suffix(".onnx").name))
        raise PackageError(f"no {MANIFEST} in {path}: not a model folder (`csist export` writes one)")
    if path.is_file():
        if path.suffix == ".onnx":
            if _flat_card_of(path.with_suffix(".json")) is not None:
                raise _flat_error(path)
            if (path.parent / MANIFEST).is_file():
                raise PackageError(f"{path} is a file of the model folder {path.parent}: point at the folder")
            raise PackageError(f"{path} is an ONNX file, not a model: a model is a folder with its {MANIFEST}")
        return path
    folder = path.with_suffix("")
    if (folder / MANIFEST).is_file():
        raise PackageError(f"model not found: {path} (the model is the folder {folder} now: point at that)")
    raise PackageError(
        f"model not found: {path} (a model folder, written by `csist export`; point CSIST_MODEL_PATH / --model at it)"
    )


def read_json(path: Path, what: str) -> Any:
    try:
        # NaN / Infinity (which Python writes by default) become null: answers must stay JSON.
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda _: None)
    except FileNotFoundError:
        raise PackageError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{what} {path} is not readable JSON: {exc}") from None


def validation_problems(exc: ValidationError) -> str:
    """A pydantic error as one line: each field's dotted path and its problem."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors())


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; PackageError names the file, the field and the problem."""
    path = Path(path)
    raw = read_json(path, "manifest")
    if is_flat_card(raw):
        raise _flat_error(path.parent / str(raw.get("file") or path.with_suffix(".onnx").name))
    if not isinstance(raw, dict) or "schema_version" not in raw:
        raise PackageError(f"manifest {path} has no schema_version: not a model manifest")
    if raw["schema_version"] != SCHEMA_VERSION or isinstance(raw["schema_version"], bool):
        raise PackageError(
            f"manifest {path}: schema_version {raw['schema_version']!r} is not supported; this csist reads "
            f"schema_version {SCHEMA_VERSION} (a newer csist wrote it: upgrade to serve it)"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise PackageError(f"manifest {path} is invalid: {validation_problems(exc)}") from None


def verified(directory: Path, spec: FileSpec, what: str, fix: str) -> Path:
    """The path of a listed file, after checking it is there with the listed hash."""
    path = directory / spec.file
    if not path.is_file():
        raise PackageError(f"{what} not found: {path} (listed in the manifest)")
    digest = file_sha256(path)
    if digest.lower() != spec.sha256.lower():
        raise PackageError(
            f"SHA-256 mismatch: {what} {path} has {digest} but the manifest says {spec.sha256.lower()} ({fix})"
        )
    return path


def load_package(path: str | Path) -> ModelPackage:
    """The model package at ``path`` (folder or manifest), its provenance verified and read."""
    manifest_path = locate_manifest(path)
    manifest = read_manifest(manifest_path)
    directory = manifest_path.parent
    provenance = Provenance()
    if manifest.provenance is not None:
        file = verified(
            directory, manifest.provenance, "provenance", "it was edited by hand, or copied from another model"
        )
        try:
            provenance = Provenance.model_validate(read_json(file, "provenance"))
        except ValidationError as exc:
            raise PackageError(f"provenance {file} is invalid: {validation_problems(exc)}") from None
    return ModelPackage(directory, manifest_path, manifest, provenance)


# ------------------------------------------------------------------------------ writing


def file_spec(directory: Path, file: str, spec: type[FileSpec] = FileSpec, **fields) -> FileSpec:
    """A spec of ``directory / file`` with its hash and size (``spec``: e.g. PartSpec, with ``fields``)."""
    path = Path(directory) / file
    return spec(file=file, sha256=file_sha256(path), bytes=path.stat().st_size, **fields)


def _dumps(model: BaseModel) -> str:
    return json.dumps(model.model_dump(mode="json", exclude_none=True), indent=2) + "\n"


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` in one step (a reader sees the old file or the new one)."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _listed(path: Path) -> set[str]:
    """The files an existing manifest lists (none when there is none or it cannot be read)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {str(f["file"]) for f in raw.get("files", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()


def write_package(
    directory: str | Path, manifest: Manifest, provenance: Provenance | None = None, name: str = MANIFEST
) -> Manifest:
    """Write the manifest (and, when given, the provenance it then names) of the files in
    ``directory``; return the manifest written.

    Every file the manifest names must be there with its hash (a written manifest is true of its
    folder), and ``files`` is made from what it names. Files the manifest previously at ``name``
    listed and this one does not (a split cut elsewhere, a plan dropped) are removed: the
    manifest owns its folder's model files. ``name``: a manifest under another name, e.g. one
    that points at a split under test.
    """
    directory = Path(directory)
    data = manifest.model_dump(mode="json", exclude_none=True)
    data.pop("files", None)
    text = None
    if provenance is not None:
        text = _dumps(Provenance.model_validate(provenance.model_dump()))
        raw = text.encode("utf-8")
        data["provenance"] = {"file": PROVENANCE, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise PackageError(f"cannot write the manifest of {directory}: {validation_problems(exc)}") from None
    files = []
    for spec in manifest.files:
        if text is not None and spec.file == PROVENANCE:
            files.append(spec)
            continue
        path = verified(directory, spec, "model file", "the writer's files changed under it")
        files.append(spec.model_copy(update={"bytes": path.stat().st_size}))
    manifest.files = files
    previous = _listed(directory / name)
    if text is not None:
        _replace(directory / PROVENANCE, text)
    _replace(directory / name, _dumps(manifest))
    root = directory.resolve()
    for stale in sorted(previous - {f.file for f in files} - {name}):
        path = (directory / stale).resolve()
        if path.is_relative_to(root) and path.is_file():
            path.unlink()
            for folder in path.parents:  # a folder of the package left empty (amx/)
                if folder == root or any(folder.iterdir()):
                    break
                folder.rmdir()
    return manifest
