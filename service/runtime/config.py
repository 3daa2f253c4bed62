"""Service settings: one ``Settings`` object, read from ``CSIST_*`` environment variables.

Every knob an operator may need is here, with a default that works for ``make serve`` on a
laptop; command-line flags of ``csist serve`` override the few that people change by hand
(host, port, model, log level). Example: ``CSIST_MAX_BATCH_SIZE=128 csist serve``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engine.names import AUTO, PLANS
from service.science.physics import DEFAULT_SNR, MAX_SATURATION, PSF_SIGMA_MAX, PSF_SIGMA_MIN

# The bundled model, found next to the package so that the service starts from any working
# directory of a source checkout (``models/`` is not inside the ``service`` package).
DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[2] / "models" / "derefnet"

MAX_WORKERS = 64


def available_cpus() -> int:
    """CPU cores this process may use: its affinity (Linux; else all cores), capped by a cgroup
    v2 quota as Docker sets one (cgroup v1 and systemd limits are not read)."""
    affinity = getattr(os, "sched_getaffinity", None)
    n = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """All service settings; environment variable = ``CSIST_`` + upper-case field name."""

    model_config = SettingsConfigDict(env_prefix="CSIST_", case_sensitive=False, extra="ignore")

    model_path: Path = Field(
        DEFAULT_MODEL_PATH, description="model folder (holding manifest.json, docs/model-package.md) or its manifest"
    )
    providers: str = Field(
        "auto",
        description="ONNX Runtime execution providers, comma-separated in order of preference,"
        " or 'auto' (CUDA when available, else CPU)",
    )
    threads: int = Field(
        0,
        ge=0,
        description="intra-op threads of each ONNX Runtime call (0 = 1 with several inference"
        " workers, else ONNX Runtime's default)",
    )
    inference_workers: int = Field(
        0,
        ge=0,
        le=MAX_WORKERS,
        description="batches inferred at the same time, each in its own thread (0 = one per CPU"
        " core on the CPU provider, 1 with CUDA)",
    )
    ort_spinning: bool = Field(
        False,
        description="let ONNX Runtime threads busy-wait between runs (lower latency, more CPU)",
    )
    ort_graph_level: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level"
    )
    ort_arena: bool = Field(True, description="ONNX Runtime CPU memory arena")
    plan: str = Field(
        AUTO,
        description="how the network runs (docs/performance.md): 'auto' times every plan eligible on"
        f" this host at start-up, checks each against the float32 reference and serves the fastest;"
        f" or one of {', '.join(PLANS)} ('onnxruntime' is the stock plan: encoder + head with ONNX"
        " Runtime's own kernels on the configured providers)",
    )
    plan_budget_s: float = Field(
        6.0, ge=0.0, le=60.0, description="seconds the 'auto' plan choice may spend timing candidates"
    )
    pair_cache: bool = Field(
        True,
        description="when the chosen plan has the head's halves (align, fuse), align a stream's"
        " window neighbour by neighbour as soon as each pair is known, so that a completed window"
        " waits only for its last neighbour and the fusion",
    )
    deadline_ms: float = Field(
        500.0,
        ge=0.0,
        le=60_000.0,
        description="per-window deadline for the answer, counted from when the window is complete: a"
        " window the queue would make late is not computed and its frame is answered deadline_exceeded"
        " (REST: 503 with Retry-After), and the fit is skipped (refined: false) when it would answer"
        " late. A connection (?deadline_ms=) or a frame's options override it; 0 = none",
    )
    threshold_snr: float | None = Field(
        DEFAULT_SNR,
        gt=0.0,
        le=1000.0,
        description="peak threshold of the HR map as a multiple of each window's flux noise (its pixel noise"
        " from frame to frame, so that static clutter does not count, at least 1 grey level, times the PSF's"
        " sqrt(4 pi) sigma). Empty: the"
        " model manifest's absolute threshold (interface.postprocess.threshold, the SeqCSIST metric's"
        " 70). A request's threshold or threshold_snr overrides it",
    )
    psf_sigma: float | None = Field(
        None,
        ge=PSF_SIGMA_MIN,
        le=PSF_SIGMA_MAX,
        description="the sensor's Gaussian PSF sigma in pixels (its calibration), used by refine 'fit';"
        " unset: the model manifest's interface.physics.psf_sigma. A request's options.psf_sigma overrides it. The fit"
        " corrects a mismatch (from 40 % narrower to 3 times wider) where the frames show it",
    )
    saturation: float | None = Field(
        255.0,
        gt=0.0,
        le=MAX_SATURATION,
        description="grey level at which the sensor clips (8-bit: 255; 12-bit: 4095): the fit takes pixels"
        " at or above it as lower bounds, and its default brightness range and largest noise (8-bit grey"
        " levels) scale by it over 255. Empty = the sensor never clips. options.saturation overrides it",
    )
    brightness_range: tuple[float, float] | None = Field(
        None,
        description="'lo,hi': the range of target brightness (integrated flux, sensor units) from the"
        " sensor's calibration; the fit counts targets by it, with a prior spanning it. Unset: the"
        " SeqCSIST protocol's 200,270, times CSIST_SATURATION / 255 for a sensor that does not clip at 255."
        " options.brightness_range overrides it",
    )
    require_token: bool = Field(
        False,
        description="refuse to start on a non-loopback address without CSIST_API_TOKEN (else: a warning in the log)",
    )
    max_batch_size: int = Field(64, ge=1, le=4096, description="windows per inference call")
    max_batch_wait_ms: float = Field(2.0, ge=0.0, le=1000.0, description="how long the batcher waits to fill a batch")
    max_queue_windows: int = Field(4096, ge=1, description="windows waiting for inference before requests get 503")
    max_tracks_per_connection: int = Field(256, ge=1, description="open tracks per WebSocket")
    track_ttl_s: float = Field(30.0, gt=0.0, description="seconds without frames after which a track expires")
    max_request_bytes: int = Field(1_048_576, ge=1024, description="largest accepted HTTP request body (bytes)")
    max_message_bytes: int = Field(65_536, ge=1024, description="largest accepted WebSocket message (bytes)")
    ws_max_pending: int = Field(
        1024,
        ge=1,
        description="answers queued for one WebSocket before the server stops reading from it",
    )
    api_token: SecretStr | None = Field(
        None, description="if set, /unmix and /ws/unmix need 'Authorization: Bearer <token>'"
    )
    log_level: LogLevel = Field("info", description="log level of the JSON logs on stderr")
    drain_s: float = Field(
        1.0,
        ge=0.0,
        description="on SIGTERM, seconds of not-ready-but-serving before sockets close",
    )
    shutdown_timeout_s: float = Field(30.0, gt=0.0, description="longest wait for in-flight work on shutdown")

    @field_validator("psf_sigma", "saturation", "threshold_snr", "api_token", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        """An empty variable (``CSIST_SATURATION=``) means unset: for ``CSIST_API_TOKEN=``, no auth
        rather than an empty password."""
        return None if value == "" else value

    @field_validator("brightness_range", mode="before")
    @classmethod
    def _lo_hi(cls, value):
        if isinstance(value, str):
            value = None if value.strip() == "" else [v.strip() for v in value.split(",")]
        if value is not None:
            lo, hi = (float(v) for v in value) if len(value) == 2 else (None, None)
            if lo is None or not 0 < lo < hi <= 1e6:
                raise ValueError(f"must be 'lo,hi' with 0 < lo < hi <= 1e6, got {value}")
            value = (lo, hi)
        return value

    @field_validator("plan", mode="before")
    @classmethod
    def _known_plan(cls, value):
        value = value.strip().lower() if isinstance(value, str) else value
        if value not in (AUTO, *PLANS):
            raise ValueError(f"plan must be one of {', '.join((AUTO, *PLANS))}, got {value!r}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value):
        return value.lower() if isinstance(value, str) else value

    def parallelism(self, cuda: bool) -> tuple[int, int]:
        """(inference workers, ONNX Runtime intra-op threads) with the automatic choices made.

        On the CPU, one single-threaded call per core beats one call over all cores for this
        model's small tensors (``csist bench speed`` measures both); a GPU takes one call at a time.
        """
        workers = self.inference_workers or (1 if cuda else min(available_cpus(), MAX_WORKERS))
        threads = self.threads or (1 if workers > 1 else 0)
        return workers, threads

    def provider_list(self) -> list[str] | None:
        """Requested providers, or None for automatic choice."""
        text = self.providers.strip()
        if text.lower() in ("", "auto"):
            return None
        return [p.strip() for p in text.split(",") if p.strip()]
