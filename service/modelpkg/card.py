"""The model card: the JSON file ``csist export`` writes next to the ONNX model.

The service reads only what it needs (identity, hash, tensor specs, physics, post-processing
defaults, metrics) and ignores any other key, so that the exporter can add fields freely.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.science.peaks import DEFAULT_THRESHOLD


class CardError(ValueError):
    """The model card is missing, unreadable or inconsistent."""


class TensorSpec(BaseModel):
    """One input or output of the ONNX graph as the card declares it."""

    model_config = ConfigDict(extra="ignore")

    name: str
    shape: list[int | str]
    dtype: str = "float32"


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


class PartSpec(BaseModel):
    """One extra ONNX file of the model (the streaming encoder or head), verified like the main one."""

    model_config = ConfigDict(extra="ignore")

    file: str
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)


class FileSpec(BaseModel):
    """A file of the model beside the card, with its hash."""

    model_config = ConfigDict(extra="ignore")

    file: str
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


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

    model_config = ConfigDict(extra="ignore")

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

    model_config = ConfigDict(extra="allow")

    part: str  # the parts.<name> file it was cut from, and that file's hash
    part_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    input: str
    output: str
    segments: list[FileSpec | None] = Field(min_length=2)
    steps: list[StepSpec] = Field(min_length=1)
    weights: FileSpec

    @model_validator(mode="before")
    @classmethod
    def _from_the_deform_only_format(cls, data):
        """Cards in the older deform-only split format: head/head_sha256/deform."""
        if isinstance(data, dict) and "deform" in data and "steps" not in data:
            data = dict(data)
            data.setdefault("part", data.pop("head", None))
            data.setdefault("part_sha256", data.pop("head_sha256", None))
            data["steps"] = [
                {
                    "op": "DeformConv",
                    "inputs": [d.get("input"), d.get("offset")],
                    "output": d.get("output"),
                    "weight": d.get("weight"),
                    "bias": d.get("bias"),
                }
                if isinstance(d, dict)
                else d
                for d in data.pop("deform")
            ]
        return data

    @model_validator(mode="after")
    def _interleaved(self):
        if len(self.segments) != len(self.steps) + 1:
            raise ValueError(f"{len(self.segments)} segments for {len(self.steps)} steps (need one more)")
        return self


class AmxSplitSpec(BaseModel):
    """Encoder and head cut at their 32-channel Convs too, for the bfloat16 AMX kernel."""

    model_config = ConfigDict(extra="allow")

    precision: Literal["bfloat16"]
    encoder: SplitSpec
    head: SplitSpec
    # The head as its two halves, when the card lists them as parts: one neighbour's alignment
    # and the fusion (the service then aligns a window's neighbours before its last frame comes).
    align: SplitSpec | None = None
    fuse: SplitSpec | None = None


class ModelCard(BaseModel):
    """The parts of the model card the service uses; extra keys are kept but not interpreted."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    file: str | None = None
    opset: int | None = None
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    physics: PhysicsSpec = PhysicsSpec()
    postprocess: PostprocessSpec = PostprocessSpec()
    metrics: Any = {}  # shown as is at /v2/models/{name}
    # Streaming parts written by ``csist export``: "encoder" (frames -> features) and "head"
    # (5 frames' features -> HR map), and optionally the head's halves "align" (one neighbour
    # aligned to the middle frame) and "fuse" (aligned neighbours -> HR map). Absent: the
    # service runs the single graph only.
    parts: dict[str, PartSpec] = {}
    # The head as graph segments between its DeformConv nodes, which the service's native
    # kernel computes (service/kernels/deform.py). Absent: ONNX Runtime runs the whole head.
    head_split: SplitSpec | None = None
    # Encoder and head cut at their DeformConv and 32-channel Conv nodes, for the native kernels
    # with the bfloat16 AMX convolution (service/kernels/conv.py). Absent: no AMX path.
    amx_split: AmxSplitSpec | None = None


def load_card(path: str | Path) -> ModelCard:
    """Read and validate a model card; CardError names the file and the problem."""
    path = Path(path)
    try:
        # NaN / Infinity (which Python writes by default) become null: answers must stay JSON.
        raw = json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda _: None)
    except FileNotFoundError:
        raise CardError(f"model card not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"model card {path} is not readable JSON: {exc}") from None
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise CardError(f"model card {path} is invalid: {problems}") from None
