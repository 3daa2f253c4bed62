"""Request, response and message models of the API (REST and WebSocket).

Validation happens here, once, so that every malformed input (wrong shape, a string or NaN
where a number belongs, too many frames, an unknown option) is rejected with an error that
names the field, before anything reaches the model. Numbers are strict: ``"1.5"`` is not a
number. Unknown keys are rejected too, so that a misspelt option cannot be silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

from service.science.physics import MAX_SATURATION, PSF_SIGMA_MAX, PSF_SIGMA_MIN, RATIO, SIZE
from service.science.postprocess import REFINE_MODES

MAX_FRAMES = 64  # frames per REST request
MAX_PIXEL = 1e6  # |pixel| bound: keeps float32 model arithmetic finite
MAX_COORD = 1e9  # |origin| bound, sensor pixels
MAX_TRACK_ID = 256  # characters

# none | centroid | quadratic (peak refinement on the HR map) | fit (physics fit to the window)
RefineMode = Literal[REFINE_MODES]  # type: ignore[valid-type]

Pixel = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_PIXEL, le=MAX_PIXEL)]
PatchRow = Annotated[list[Pixel], Field(min_length=SIZE, max_length=SIZE)]
Patch = Annotated[
    list[PatchRow],
    Field(
        min_length=SIZE,
        max_length=SIZE,
        description=f"{SIZE}x{SIZE} pixel values, row-major (patch[row][column]), sensor units"
        " on the 8-bit scale (0..255)",
    ),
]
Coordinate = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_COORD, le=MAX_COORD)]
FrameIndex = Annotated[int, Field(strict=True, ge=0, le=2**53)]
Timestamp = Annotated[float, Field(strict=True, allow_inf_nan=False)]
TrackId = Annotated[str, Field(min_length=1, max_length=MAX_TRACK_ID)]

_STRICT = ConfigDict(extra="forbid")


class Origin(BaseModel):
    """Sensor coordinates of the centre of the patch's top-left pixel. A track's patch may move
    by whole pixels (at most 2 per axis from frame to frame: a tracker re-centring it), and its
    windows follow; any other move starts a new segment."""

    model_config = _STRICT

    x: Coordinate = Field(description="sensor column of the patch's top-left pixel centre")
    y: Coordinate = Field(description="sensor row of the patch's top-left pixel centre")


def _ordered(value: list[float]) -> list[float]:
    if not value[0] < value[1]:
        raise ValueError(f"must be [lo, hi] with lo < hi, got {value}")
    return value


BrightnessRange = Annotated[
    list[Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=MAX_PIXEL)]],
    Field(min_length=2, max_length=2),
    AfterValidator(_ordered),
]


class UnmixOptions(BaseModel):
    """Peak-extraction options; anything left out takes the settings' or the model manifest's default."""

    model_config = _STRICT

    threshold: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_PIXEL, le=MAX_PIXEL)] | None = Field(
        None,
        description="absolute brightness a peak of the HR map must exceed (the SeqCSIST metric uses 70);"
        " overrides threshold_snr",
    )
    threshold_snr: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1000)] | None = Field(
        None,
        description="peak threshold as a multiple of each window's flux noise (docs/method.md); default"
        " CSIST_THRESHOLD_SNR",
    )
    refine: RefineMode | None = Field(None, description="sub-cell refinement of each peak")
    max_targets: Annotated[int, Field(strict=True, ge=0, le=(SIZE * RATIO) ** 2)] | None = Field(
        None, description="keep at most this many (brightest) targets per frame"
    )
    psf_sigma: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=PSF_SIGMA_MIN, le=PSF_SIGMA_MAX)] | None = (
        Field(
            None,
            description="the sensor's Gaussian PSF sigma in pixels, for refine 'fit'; default CSIST_PSF_SIGMA or"
            " the model manifest's (where the frames show a misfit the fit corrects it, from 40 % narrower to"
            " 3 times wider)",
        )
    )
    saturation: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=MAX_SATURATION)] | None = Field(
        None,
        description="grey level at which the sensor clips (8-bit: 255): pixels at or above it are lower"
        " bounds for refine 'fit'; default CSIST_SATURATION",
    )
    brightness_range: BrightnessRange | None = Field(
        None,
        description="[lo, hi]: the range of target brightness (integrated flux, sensor units) from the"
        " sensor's calibration, for refine 'fit' (which counts targets by it); default"
        " CSIST_BRIGHTNESS_RANGE, else the SeqCSIST protocol's 200-270 times the saturation over 255",
    )
    deadline_ms: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=60_000)] | None = Field(
        None,
        description="ms within which the window must start inference (else the frame is answered"
        " deadline_exceeded) and the fit must answer (else it is skipped: refined false); 0 = none;"
        " default: the connection's ?deadline_ms= or CSIST_DEADLINE_MS",
    )


class Frame(BaseModel):
    """One frame of a track: the patch and where it sits on the sensor."""

    model_config = _STRICT

    patch: Patch
    origin: Origin | None = None
    frame_index: FrameIndex | None = Field(
        None,
        description="the frame's index in its track; give it on all frames or none (then "
        "0, 1, 2, ...). It must increase; a jump starts a new segment (no window spans a gap)",
    )
    timestamp: Timestamp | None = Field(None, description="echoed in the result")


class UnmixRequest(BaseModel):
    """Consecutive frames of one track; every frame gets its own result."""

    model_config = _STRICT

    frames: list[Frame] = Field(min_length=1, max_length=MAX_FRAMES)
    track_id: TrackId | None = Field(None, description="echoed in the answer and logs")
    options: UnmixOptions | None = None


class Target(BaseModel):
    """One unmixed target. x = column, y = row, in pixels; pixel centres at integers."""

    x: float = Field(description="column in the patch (0 = centre of the left pixel column)")
    y: float = Field(description="row in the patch (0 = centre of the top pixel row)")
    sensor_x: float | None = Field(description="x + origin.x; null without an origin")
    sensor_y: float | None = Field(description="y + origin.y; null without an origin")
    brightness: float = Field(description="target brightness, sensor units")
    score: float = Field(description="detection score (= brightness, as in CSO-mAP)")
    sigma_x: float | None = Field(None, description="1-sigma uncertainty of x, px (the fit's; null without it)")
    sigma_y: float | None = Field(None, description="1-sigma uncertainty of y, px (the fit's; null without it)")
    rho: float | None = Field(None, description="correlation of the x and y errors (the fit's; null without it)")
    sigma_brightness: float | None = Field(
        None, description="1-sigma uncertainty of brightness, sensor units (the fit's; null without it)"
    )


class FrameResult(BaseModel):
    frame_index: int
    timestamp: float | None = None
    targets: list[Target]
    refined: bool = Field(
        True,
        description="false when the requested fit was skipped to keep the deadline: the targets are"
        " the network's peaks",
    )
    count_confidence: float | None = Field(
        None,
        description="the fit's confidence in the number of targets (the count's share of the BIC weights"
        " of the counts it tried); null where the fit did not answer",
    )


class ModelRef(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    sha256: str


class Timing(BaseModel):
    """Milliseconds: queue wait, inference (of the batches used), peak extraction, total."""

    queue: float
    inference: float
    postprocess: float
    total: float


class UnmixResponse(BaseModel):
    track_id: str | None = None
    results: list[FrameResult]
    model: ModelRef
    timing_ms: Timing

    model_config = ConfigDict(protected_namespaces=())


class ErrorResponse(BaseModel):
    detail: str


class FrameMessage(BaseModel):
    """WebSocket client -> server: the next frame of a track."""

    model_config = _STRICT

    type: Literal["frame"]
    track_id: TrackId
    frame_index: FrameIndex
    patch: Patch
    origin: Origin | None = None
    timestamp: Timestamp | None = None
    options: UnmixOptions | None = None


class EndMessage(BaseModel):
    """WebSocket client -> server: the track ended; flush its last frames."""

    model_config = _STRICT

    type: Literal["end"]
    track_id: TrackId


ClientMessage = Annotated[FrameMessage | EndMessage, Field(discriminator="type")]
CLIENT_MESSAGE = TypeAdapter(ClientMessage)


class Status(BaseModel):
    status: str
    reason: str | None = None


class LiveV2(BaseModel):
    live: bool


class ReadyV2(BaseModel):
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """KServe V2 model metadata, plus what an operator wants to see about the served model."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    sha256: str
    providers: list[str]
    requested_providers: list[str]
    onnxruntime_version: str
    physics: dict[str, Any]
    postprocess: dict[str, Any]
    metrics: Any
    plan: dict[str, Any] = Field(
        description="the execution plan serving (name, precision, backend per part) and how it was chosen:"
        " every candidate with its status (chosen, passed, failed check, not eligible, not loaded), its"
        " measured ms per window and its largest difference from the float32 reference"
    )


def error_location(loc: tuple | list) -> str:
    """``('frames', 0, 'patch', 3)`` -> ``frames[0].patch[3]``: how users write a field path."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(message)"


def describe_errors(errors: list[dict], limit: int = 3) -> str:
    """One line naming the first few problems, for WebSocket error messages and logs."""
    parts = [f"{error_location(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:limit]]
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)
