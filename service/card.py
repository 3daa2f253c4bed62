"""The model card: the JSON file ``csist export`` writes next to the ONNX model.

The service reads only what it needs (identity, hash, tensor specs, physics, post-processing
defaults, metrics) and ignores any other key, so that the exporter can add fields freely.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.peaks import DEFAULT_THRESHOLD


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
    # Peak rule of service.peaks (e.g. "cells" or "local_max"); None: that module's default.
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


class DeformStepSpec(BaseModel):
    """One DeformConv of the head: tensor names in the head graph, weight keys in the .npz."""

    model_config = ConfigDict(extra="ignore")

    input: str
    offset: str
    output: str
    weight: str
    bias: str


class HeadSplitSpec(BaseModel):
    """The head cut at its DeformConv nodes by ``csist split-head`` (for the native kernel)."""

    model_config = ConfigDict(extra="allow")

    head: str  # the parts.head file it was cut from, and that file's hash
    head_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    input: str
    output: str
    segments: list[FileSpec] = Field(min_length=2)
    deform: list[DeformStepSpec] = Field(min_length=1)
    weights: FileSpec


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
    # (5 frames' features -> HR map). Absent: the service runs the single graph only.
    parts: dict[str, PartSpec] = {}
    # The head as graph segments between its DeformConv nodes, which the service's native
    # kernel computes (service/deform.py). Absent: ONNX Runtime runs the whole head.
    head_split: HeadSplitSpec | None = None


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
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise CardError(f"model card {path} is invalid: {problems}") from None
