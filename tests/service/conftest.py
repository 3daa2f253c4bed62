"""Fixtures for the service tests: a stand-in ONNX model and real uvicorn servers on loopback.

The stand-in model has the real model's interface (input "lr" (batch, 5, 11, 11), output "hr"
(batch, 33, 33), dynamic batch) and is a single MatMul: a temporally weighted sum of the 5
frames mapped to the HR grid by the least-squares map Qinit of docs/method.md section 4.1, fitted
here on random sparse targets. It is deterministic, fast, gives real peaks on simulated
frames, and its output depends on every frame of the window (so windowing errors show).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.api.server import CsistServer, build_server
from service.modelpkg.manifest import (
    MODEL_FILE,
    Interface,
    Manifest,
    Provenance,
    file_sha256,
    file_spec,
    write_package,
)
from service.runtime.config import Settings
from service.science.physics import hr_map, pixel_response, quantize, sampling_matrix

# Let every log call of the service build its record (pytest shows them on failure), so that a
# broken ``extra`` field fails here rather than in production.
logging.getLogger("service").setLevel(logging.DEBUG)

TEMPORAL_WEIGHTS = np.array([0.1, 0.2, 0.4, 0.2, 0.1])
CARD_THRESHOLD = 30.0  # the stand-in is a weak deconvolver: its peaks are lower than 70
CARD_METRICS = {"cso_map": 12.5, "ap05": 1.0, "count_accuracy": 0.75}
STANDIN_INTERFACE = {
    "opset": 19,
    "inputs": [{"name": "lr", "shape": ["batch", 5, 11, 11], "dtype": "float32"}],
    "outputs": [{"name": "hr", "shape": ["batch", 33, 33], "dtype": "float32"}],
    "config": {"stages": 9},
    "physics": {"size": 11, "ratio": 3, "psf_sigma": 0.5},
    "postprocess": {"threshold": CARD_THRESHOLD, "refine": "centroid"},
}


def fit_qinit(n_samples: int = 1500, seed: int = 0) -> np.ndarray:
    """Least-squares LR -> HR map (1089, 121) over random 2-4-target HR maps."""
    rng = np.random.default_rng(seed)
    phi = sampling_matrix()
    x = np.zeros((phi.shape[1], n_samples))
    for k in range(n_samples):
        n = rng.integers(2, 5)
        centre = rng.uniform(3, 7, size=2)
        pts = centre + rng.uniform(-0.8, 0.8, size=(n, 2))
        x[:, k] = hr_map(np.column_stack([pts, rng.uniform(220, 250, n)])).ravel()
    y = phi @ x
    return x @ y.T @ np.linalg.inv(y @ y.T + 1e-3 * np.eye(y.shape[0]))


def standin_weights() -> np.ndarray:
    """(605, 1089) MatMul weight: row block k = TEMPORAL_WEIGHTS[k] * Qinit^T."""
    q = fit_qinit()
    return np.concatenate([w * q.T for w in TEMPORAL_WEIGHTS]).astype(np.float32)


def write_standin(directory: Path, weights: np.ndarray, name: str = "derefnet") -> Path:
    """Write the model folder ``directory/<name>`` (``model.onnx``, its manifest and provenance);
    return the folder."""
    directory = directory / name
    directory.mkdir(parents=True, exist_ok=True)
    nodes = [
        helper.make_node("Reshape", ["lr", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["hr_flat"]),
        helper.make_node("Reshape", ["hr_flat", "hr_shape"], ["hr"]),
    ]
    graph = helper.make_graph(
        nodes,
        "standin",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["batch", 5, 11, 11])],
        [helper.make_tensor_value_info("hr", TensorProto.FLOAT, ["batch", 33, 33])],
        initializer=[
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.array([-1, 605], dtype=np.int64), "flat_shape"),
            numpy_helper.from_array(np.array([-1, 33, 33], dtype=np.int64), "hr_shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, directory / MODEL_FILE)
    write_manifest(directory)
    return directory


def write_manifest(directory: Path, **interface) -> Path:
    """The manifest and provenance of the stand-in folder ``directory``, made and written as the
    exporter does (``interface``: fields of the manifest's interface to change); returns the
    manifest's path."""
    manifest = Manifest(
        name="derefnet",
        version="0.1.0",
        interface=Interface.model_validate({**STANDIN_INTERFACE, **interface}),
        model=file_spec(directory, MODEL_FILE),
    )
    provenance = Provenance(training={"note": "stand-in for tests"}, data={"trajectories": 0}, metrics=CARD_METRICS)
    write_package(directory, manifest, provenance)
    return directory / "manifest.json"


def write_flat_standin(standin: Path, directory: Path, stem: str = "derefnet") -> Path:
    """The stand-in in the flat layout that came before model folders: ``<stem>.onnx`` and its
    card ``<stem>.json`` (every field in one file, no schema_version); returns the ONNX path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.onnx"
    shutil.copyfile(standin / MODEL_FILE, path)
    card = {
        "name": "derefnet",
        "version": "0.1.0",
        "file": path.name,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        **STANDIN_INTERFACE,
        "training": {"note": "stand-in for tests"},
        "data": {"trajectories": 0},
        "metrics": CARD_METRICS,
    }
    path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return path


@pytest.fixture(scope="session")
def standin_model(tmp_path_factory) -> Path:
    """The stand-in model's folder (``model.onnx`` and its manifest)."""
    return write_standin(tmp_path_factory.mktemp("model"), standin_weights())


@pytest.fixture(scope="session")
def reference_session(standin_model) -> ort.InferenceSession:
    """The stand-in model in a plain ONNX Runtime session, to compute expected answers."""
    return ort.InferenceSession(str(standin_model / MODEL_FILE), providers=["CPUExecutionProvider"])


def simulate_track(n_frames: int, seed: int = 0, n_targets: int = 3, spread: float = 1.5) -> np.ndarray:
    """8-bit frames (n, 11, 11) as float64 of a few targets drifting apart (SeqCSIST-like)."""
    rng = np.random.default_rng(seed)
    ref = rng.uniform(4.0, 6.0, size=2)
    dirs = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], dtype=float)[:n_targets]
    bright = rng.uniform(220, 250, size=n_targets)
    frames = []
    for t in range(n_frames):
        pos = ref + np.array([0.04 * t, 0.0]) + dirs * (spread + 0.01 * t)
        frames.append(quantize(pixel_response(np.column_stack([pos, bright]))))
    return np.asarray(frames, dtype=np.float64)


def recentred_track(number: int, noise: float = 0.0, frames: int = 12):
    """Replay track ``number`` (csist.replay.make_track, a SeqCSIST-protocol trajectory) cut by a
    tracker that re-centres its patch on the group, and the same track through a still patch:
    for each, the patches, their origins ({"x", "y"} dicts) and the true targets in sensor
    coordinates (T, K, 3)."""
    from csist.replay import make_track

    out = []
    for recentre in (True, False):
        track = make_track(number, seed=5, frames=frames, noise=noise, recentre=recentre)
        truth = track.truth.copy()
        truth[..., :2] += track.origins[:, None, :]
        origins = [{"x": float(x), "y": float(y)} for x, y in track.origins]
        out.append((track.frames.astype(np.float64), origins, truth))
    return out


def origin_runs(origins: list) -> list[list[int]]:
    """The frames of each run of one origin: the segments a service that does not follow a
    re-centred patch would make."""
    runs = [[0]]
    for t in range(1, len(origins)):
        if origins[t] == origins[t - 1]:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def matched(results: list[dict], truth: np.ndarray, within: float = 0.05) -> int:
    """True targets with an answered target (sensor coordinates) within ``within`` px, over all frames."""
    n = 0
    for res, want in zip(results, truth, strict=True):
        got = np.array([[t["sensor_x"], t["sensor_y"]] for t in res["targets"]]).reshape(-1, 2)
        if len(got):
            d = np.hypot(got[:, None, 0] - want[None, :, 0], got[:, None, 1] - want[None, :, 1])
            n += int((d.min(axis=0) <= within).sum())
    return n


class LiveServer:
    """A real uvicorn server (the service's own CsistServer) in a thread on a free port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: CsistServer = build_server(settings, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    def start(self, timeout: float = 30.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def runtime(self):
        return self.server.runtime

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/unmix"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def make_settings(standin_model):
    """Settings on the stand-in model; keyword overrides as for Settings(...)."""

    def make(**overrides) -> Settings:
        # no deadline unless a test sets one: these tests check answers, not timing on a shared host
        values = {"model_path": standin_model, "max_batch_wait_ms": 2.0, "drain_s": 0.0, "deadline_ms": 0.0}
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def start_server(make_settings):
    """Start a server with the given setting overrides; stopped after the test."""
    started: list[LiveServer] = []

    def start(**overrides) -> LiveServer:
        live = LiveServer(make_settings(**overrides)).start()
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


@pytest.fixture(scope="session")
def server(make_settings) -> LiveServer:
    """One shared server with default settings for the tests that need nothing special."""
    live = LiveServer(make_settings()).start()
    yield live
    live.stop()


class ServerProcess:
    """``python -m service`` in a subprocess (signals work there), JSON logs captured."""

    def __init__(self, model_path: Path, env: dict[str, str] | None = None, args: list[str] = ()):
        import os
        import re
        import subprocess
        import sys

        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CSIST_")}
        full_env.update(env or {})
        repo = Path(__file__).resolve().parents[2]
        full_env["PYTHONPATH"] = str(repo)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--model",
                str(model_path),
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=repo,
        )
        self.logs: list[dict] = []
        self.port: int | None = None
        self._started = threading.Event()
        pattern = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")

        def pump():
            for line in self.proc.stderr:
                try:
                    record = json.loads(line)
                except ValueError:
                    record = {"message": line.rstrip(), "unparsed": True}
                self.logs.append(record)
                match = pattern.search(record.get("message", ""))
                if match:
                    self.port = int(match.group(1))
                    self._started.set()
            self._started.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()

    def wait_started(self, timeout: float = 60.0) -> bool:
        self._started.wait(timeout)
        return self.port is not None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/unmix"

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._pump.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
