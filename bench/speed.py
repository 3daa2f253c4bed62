r"""``csist bench speed``: every way of running DeRefNet, on the same simulated windows, one report.

    csist bench speed --model models/derefnet --checkpoint runs/derefnet/best.pt \
        --out bench/results/speed.json --markdown bench/results/speed.md

In one process and one run (so that the ratios compare like with like):

1. PyTorch eager, the training model (``DeRefNet.forward``, its training deform mode);
2. ONNX Runtime, single graph, at batch 1, 8 and 32;
3. ONNX Runtime, encoder + head in streaming mode: per step every track's new frame is encoded
   (one call) and every track's window runs the head on cached features (one call);
   2 and 3 again with ``--workers`` threads calling single-threaded sessions at once (the
   service's inference workers);
4. ONNX Runtime session options (graph level, threads, arena, spinning, workers), each timed on
   2 and 3;
5. the real server end to end (``python -m service`` on loopback, a subprocess), fed over
   WebSocket by the replay client (``csist.replay``) with N tracks at a fixed offered rate and
   at a saturating rate, with and without the feature cache; REST at a fixed offered load;
6. FLOPs per window (``bench.flops``, counted analytically) and the machine's measured
   convolution throughput, giving each mode's efficiency against that roofline.

The server and the replay client share the machine, so end-to-end numbers include the client's
CPU. ``--quick`` shrinks every duration (for tests).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import (
    calls_per_second_parallel,
    machine,
    md_table,
    simulated_trajectories,
    time_per_call,
    write_outputs,
)
from bench.flops import window_flops
from service.runtime.config import available_cpus

REPO = Path(__file__).resolve().parents[1]
AMX_MODE = "ONNX encoder+head + AMX bf16 conv + native deform, streaming"
SEED = 8101  # data seed of the speed benchmark (never used in development)
ORT_VARIANTS = {  # name -> service.modelpkg.model.session_options kwargs
    "default (all, threads=auto, arena, no spin)": {},
    "graph level extended": {"graph_level": "extended"},
    "graph level basic": {"graph_level": "basic"},
    "threads=1": {"threads": 1},
    "threads=2": {"threads": 2},
    "arena off": {"arena": False},
    "spinning on": {"spinning": True},
    "2 workers x threads=1": {"threads": 1, "workers": 2},
    "2 workers x threads=1, native deform": {"threads": 1, "workers": 2, "deform_kernel": "native"},
    "2 workers x threads=1, AMX kernels": {"threads": 1, "workers": 2, "deform_kernel": "native", "conv_kernel": "amx"},
    "2 workers x threads=1, AMX kernels, convs one by one": {
        "threads": 1,
        "workers": 2,
        "deform_kernel": "native",
        "conv_kernel": "amx",
        "fuse_convs": False,
    },
}


# --------------------------------------------------------------------------------------------
# in-process measurements


def conv_throughput(seconds: float) -> dict:
    """GFLOP/s of a large 3x3 conv (32->32 channels, 33x33, batch 64) in torch and ORT.

    The ORT figure is a single-Conv ONNX graph in the service's session options: the roofline
    the model's own convolutions could reach on this machine.
    """
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from service.modelpkg.model import session_options

    x = np.random.default_rng(0).standard_normal((64, 32, 33, 33)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((32, 32, 3, 3)).astype(np.float32)
    flops = 2 * 64 * 32 * 32 * 9 * 33 * 33
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    with torch.no_grad():
        t_torch = time_per_call(lambda: torch.nn.functional.conv2d(xt, wt, padding=1), seconds)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 32, 33, 33])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 32, 33, 33])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    t_ort = time_per_call(lambda: sess.run(None, {"x": x}), seconds)
    a = np.random.default_rng(2).standard_normal((1024, 1024)).astype(np.float32)
    t_mm = time_per_call(lambda: a @ a, seconds)
    out = {
        "method": "3x3 conv 32->32 ch on (64, 32, 33, 33), 2*Cin*Cout*9*H*W*N FLOPs; numpy 1024^3 matmul",
        "torch_gflops": flops / t_torch / 1e9,
        "ort_gflops": flops / t_ort / 1e9,
        "numpy_matmul_gflops": 2 * 1024**3 / t_mm / 1e9,
        "torch_threads": torch.get_num_threads(),
    }
    from service.kernels import conv

    if conv.AMX:  # the service's bfloat16 kernel on one thread (ORT's figure uses every core)
        kernel = conv.Conv3x3(w, None, "amx")
        out["amx_bf16_1_thread_gflops"] = flops / time_per_call(lambda: kernel(x), seconds) / 1e9
    return out


class OrtModel:
    """Single graph and (if the manifest lists them) encoder + head, in one set of session options.

    ``deform_kernel="native"`` / ``conv_kernel="amx"`` load the streaming parts through
    ``service.modelpkg.model.load_model`` with those kernels (what the service runs); they must be usable.
    """

    def __init__(self, model: Path, options: dict | None = None):
        import onnxruntime as ort

        from service.modelpkg.manifest import PackageError, load_package
        from service.modelpkg.model import ModelError, load_model, session_options

        try:
            self.package = load_package(model)
        except PackageError as exc:
            raise SystemExit(f"csist bench speed: {exc}") from None
        directory = self.package.directory
        options = dict(options or {})
        self.workers = options.pop("workers", 1)  # threads calling the sessions at once
        deform_kernel = options.pop("deform_kernel", "onnxruntime")
        conv_kernel = options.pop("conv_kernel", "onnxruntime")
        fuse_convs = options.pop("fuse_convs", True)
        opts = session_options(**options)
        cpu = ["CPUExecutionProvider"]
        self.single = ort.InferenceSession(str(self.package.model_file), opts, providers=cpu)
        parts = self.package.parts
        self.encoder = self.head = self.loaded = None
        if "encoder" in parts and "head" in parts:
            self.encoder = ort.InferenceSession(str(directory / parts["encoder"].file), opts, providers=cpu)
            self.head = ort.InferenceSession(str(directory / parts["head"].file), opts, providers=cpu)
        if self.encoder is not None and (deform_kernel, conv_kernel) != ("onnxruntime", "onnxruntime"):
            try:
                self.loaded = load_model(
                    model,
                    providers=cpu,
                    deform_kernel=deform_kernel,
                    conv_kernel=conv_kernel,
                    fuse_convs=fuse_convs,
                    **options,
                )
            except ModelError as exc:
                raise SystemExit(f"csist bench speed: {exc}") from None

    def encode(self, frames: np.ndarray) -> np.ndarray:
        if self.loaded is not None:
            return self.loaded.encode(frames)
        return self.encoder.run(None, {"lr_frames": frames})[0]

    def run_head(self, features: np.ndarray) -> np.ndarray:
        if self.loaded is not None:
            return self.loaded.head(features)
        return self.head.run(None, {"features": features})[0]

    def run_single(self, windows: np.ndarray) -> np.ndarray:
        return self.single.run(None, {"lr": windows})[0]

    def streaming_step(self, trajectories: np.ndarray, cache: np.ndarray, t: int) -> np.ndarray:
        """Frame t of every track: encode it (one call), then the head on the window ending at t.

        ``cache`` (tracks, 5, 1089) is the tracks' ring of features, shifted in place.
        """
        feats = self.encode(trajectories[:, t])
        cache[:, :-1] = cache[:, 1:]
        cache[:, -1] = feats
        return self.run_head(cache)


def windows_per_second(make_call, per_call: int, seconds: float, workers: int) -> float:
    """``per_call`` windows per call of ``make_call()``; with ``workers`` > 1, that many threads
    each call their own ``make_call()`` at once."""
    if workers == 1:
        return per_call / time_per_call(make_call(), seconds)
    return per_call * calls_per_second_parallel([make_call() for _ in range(workers)], seconds)


def time_single(m: OrtModel, windows: np.ndarray, batch: int, seconds: float, workers: int = 1) -> float:
    """Windows/s of the single graph at a batch size (cycling through the windows); with
    ``workers`` > 1, that many threads call it at once."""
    starts = list(range(0, len(windows) - batch + 1, batch)) or [0]

    def caller():
        state = {"k": 0}

        def call():
            a = starts[state["k"] % len(starts)]
            state["k"] += 1
            m.run_single(windows[a : a + batch])

        return call

    return windows_per_second(caller, batch, seconds, workers)


def time_streaming(m: OrtModel, trajectories: np.ndarray, tracks: int, seconds: float, workers: int = 1) -> float:
    """Windows/s of encoder + head with cached features, ``tracks`` streams in step.

    With ``workers`` > 1, that many threads each run their own ``tracks`` streams through the
    same sessions at once, as the service's inference workers do.
    """
    traj = (
        trajectories[:tracks]
        if len(trajectories) >= tracks
        else np.resize(trajectories, (tracks, *trajectories.shape[1:]))
    )
    traj = np.ascontiguousarray(traj)
    t_count = traj.shape[1]

    def stepper():
        cache = np.zeros((tracks, 5, m.head.get_inputs()[0].shape[2]), dtype=np.float32)
        state = {"t": 0}

        def call():
            m.streaming_step(traj, cache, state["t"] % t_count)
            state["t"] += 1

        return call

    return windows_per_second(stepper, tracks, seconds, workers)


def ort_tuning(
    model: Path,
    windows: np.ndarray,
    trajectories: np.ndarray,
    seconds: float,
    rounds: int,
    variants: dict[str, dict] | None = None,
) -> dict:
    """Windows/s of every ``ORT_VARIANTS`` entry, measured round-robin ``rounds`` times (median).

    Round-robin spreads slow phases of a shared machine over all variants instead of
    penalising whichever ran during them. A variant is worth keeping only if it beats the
    default by more than 5 % on the measurement that matters for its use (``keep``).
    """
    options = variants or ORT_VARIANTS  # the first entry is the baseline
    variants, skipped = {}, {}
    for name, opts in options.items():
        try:
            variants[name] = OrtModel(model, opts)
        except SystemExit as exc:  # its native kernels cannot run here (the model loader says why)
            skipped[name] = str(exc).removeprefix("csist bench speed: ")
    options = {name: opts for name, opts in options.items() if name in variants}
    tests = {"single_batch32": lambda v: time_single(v, windows, 32, seconds, v.workers)}
    if next(iter(variants.values())).encoder is not None:
        tests["streaming_32_tracks"] = lambda v: time_streaming(v, trajectories, 32, seconds, v.workers)
        tests["streaming_1_track"] = lambda v: time_streaming(v, trajectories, 1, seconds, v.workers)
    samples = {name: {t: [] for t in tests} for name in variants}
    for _ in range(rounds):
        for name, v in variants.items():
            for t, fn in tests.items():
                samples[name][t].append(fn(v))
    out = {}
    default = next(iter(options))
    for name in variants:
        entry = {"options": options[name], "rounds": rounds}
        entry.update({t: float(np.median(x)) for t, x in samples[name].items()})
        out[name] = entry
    for name, entry in out.items():
        entry["keep"] = {t: entry[t] > 1.05 * out[default][t] for t in tests} if name != default else None
    out.update({name: {"skipped": why} for name, why in skipped.items()})
    return out


def eager_rates(checkpoint: Path, windows: np.ndarray, batches: list[int], seconds: float) -> dict:
    """Windows/s of the PyTorch training model (``DeRefNet.forward``) per batch size."""
    import torch

    from training.model import load_checkpoint_model

    model = load_checkpoint_model(checkpoint).eval()
    out = {"deform_mode": model.cfg.deform, "torch_threads": torch.get_num_threads()}
    x = torch.from_numpy(windows)
    for b in batches:
        with torch.no_grad():
            out[b] = b / time_per_call(lambda: model(x[:b]), seconds)
    return out


# --------------------------------------------------------------------------------------------
# the real server


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m service`` on a free loopback port, with the given CSIST_* settings.

    Ready when ``/readyz`` answers 200 (the model is loaded, its plan chosen and warmed);
    ``ready_s``: seconds from the process's start to that answer.
    """

    def __init__(self, model: Path, settings: dict[str, str], timeout: float = 120.0):
        import httpx

        env = {k: v for k, v in os.environ.items() if not k.startswith("CSIST_")}
        env.update({f"CSIST_{k.upper()}": str(v) for k, v in settings.items()})
        env["PYTHONPATH"] = str(REPO)
        self.port = free_port()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), "--model", str(model)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        self.log_tail: list[str] = []

        def pump():
            for line in self.proc.stderr:
                self.log_tail = (self.log_tail + [line.rstrip()])[-20:]

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    self.ready_s = time.monotonic() - t0
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the service did not start:\n" + "\n".join(self.log_tail))
            time.sleep(0.1)

    def plan(self) -> dict[str, str]:
        """The execution plan the server serves and its backends, from its csist_model_info metric."""
        import re

        import httpx

        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        info = next((line for line in text.splitlines() if line.startswith("csist_model_info{")), "")
        return {k: v for k, v in re.findall(r'(plan|backends)="([^"]*)"', info)}

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def ws_run(
    port: int,
    tracks: int,
    rate: float,
    seconds: float,
    seed: int,
    refine: str | None = None,
    deadline_ms: float | None = None,
) -> dict:
    """The replay client: ``tracks`` tracks at ``rate`` windows/s in total for ``seconds``
    (``deadline_ms``: the connection's ``?deadline_ms=``; None: the server's setting)."""
    from csist.replay import Replay, ReplayConfig

    query = "" if deadline_ms is None else f"?deadline_ms={deadline_ms:g}"
    cfg = ReplayConfig(
        url=f"ws://127.0.0.1:{port}/ws/unmix{query}",
        tracks=tracks,
        fps=rate / tracks,
        seconds=seconds,
        seed=seed,
        quiet=True,
        report_every=3600.0,
        drain_timeout=60.0,
        refine=refine,
    )
    replay = Replay(cfg, out=io.StringIO())
    summary = asyncio.run(replay.run())
    lat = np.asarray(replay.board.latencies) * 1e3
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    return {
        "offered_windows_per_s": rate,
        "tracks": tracks,
        "windows_per_s": summary["windows_per_s"],
        "answered": summary["answered"],
        "missing": summary["missing"],
        "errors": summary["errors"],
        "error_codes": summary["error_codes"],
        "unrefined": summary["unrefined"],
        "duplicates": summary["duplicates_dropped"],
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "ok": summary["ok"],
        "cso_map": summary["cso_map"],
    }


# A server is taken as saturated when it carries less than this share of the offered rate: at a
# load it keeps up with, the windows/s measured is the client's rate, not the server's capacity.
SATURATED_SHARE = 0.9


def saturate(run, rate: float, doublings: int) -> dict:
    """``run(rate)`` at ``rate`` windows/s, then at twice the rate while the server still keeps up
    with what is offered (at most ``doublings`` times): the capacity is the windows/s carried at
    the first rate it falls behind. The result says whether that was reached (``saturated``)."""
    while True:
        result = run(rate)
        saturated = result["windows_per_s"] < SATURATED_SHARE * rate
        if saturated or doublings == 0:
            return {**result, "saturated": saturated}
        rate, doublings = 2 * rate, doublings - 1


def abandon_run(
    port: int,
    server: "ServerProcess",
    connections: int = 20,
    tracks: int = 256,
    frames: int = 2,
    after_s: float = 5.0,
    seed: int = SEED,
) -> dict:
    """``connections`` WebSockets each open ``tracks`` tracks with ``frames`` frames and vanish
    (transport aborted, no close handshake); the server's CPU seconds in the ``after_s`` seconds
    after the last one went are what it spent on work nobody will receive."""
    from websockets.asyncio.client import connect

    from csist.replay import make_track

    patches = [make_track(k, seed=seed).frames[:frames] for k in range(8)]

    async def one(c: int) -> None:
        ws = await connect(f"ws://127.0.0.1:{port}/ws/unmix", max_size=None)
        for t in range(tracks):
            for i in range(frames):
                await ws.send(
                    json.dumps(
                        {
                            "type": "frame",
                            "track_id": f"c{c}-t{t}",
                            "frame_index": i,
                            "patch": patches[t % 8][i].tolist(),
                        }
                    )
                )
        ws.transport.abort()

    async def all_() -> None:
        await asyncio.gather(*(one(c) for c in range(connections)))

    t0 = time.perf_counter()
    asyncio.run(all_())
    sent_s = time.perf_counter() - t0
    cpu0 = server.cpu_seconds()
    time.sleep(after_s)
    return {
        "connections": connections,
        "tracks": tracks,
        "frames_per_track": frames,
        "send_s": round(sent_s, 2),
        "after_s": after_s,
        "server_cpu_s_after": round(server.cpu_seconds() - cpu0, 3),
        "target_cpu_s": 1.0,
    }


def rest_run(
    port: int, rate: float, seconds: float, frames: np.ndarray, per_request: int = 5, refine: str | None = None
) -> dict:
    """Open-loop REST load: requests of ``per_request`` frames at ``rate`` windows/s."""
    import httpx

    options = {} if refine is None else {"options": {"refine": refine}}
    bodies = [
        json.dumps({"frames": [{"patch": f.tolist()} for f in frames[k, :per_request]], **options})
        for k in range(len(frames))
    ]
    period = per_request / rate
    latencies: list[float] = []
    failures = 0

    async def one(client, body):
        nonlocal failures
        t0 = time.perf_counter()
        r = await client.post("/unmix", content=body, headers={"content-type": "application/json"})
        if r.status_code == 200:
            latencies.append(time.perf_counter() - t0)
        else:
            failures += 1

    async def main():
        gc.collect()
        gc.freeze()  # as the replay client does: no full collection of this process's heap mid-run
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            tasks, t0, k = [], time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                tasks.append(asyncio.create_task(one(client, bodies[k % len(bodies)])))
                k += 1
                await asyncio.sleep(max(0.0, t0 + k * period - time.perf_counter()))
            await asyncio.gather(*tasks)
            return time.perf_counter() - t0

    elapsed = asyncio.run(main())
    lat = np.asarray(latencies) * 1e3
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    return {
        "offered_windows_per_s": rate,
        "frames_per_request": per_request,
        "windows_per_s": len(latencies) * per_request / elapsed,
        "requests": len(latencies),
        "failures": failures,
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
    }


def server_settings(pairs: list[str]) -> dict[str, str]:
    """``--server-setting NAME=VALUE`` pairs as service settings (``CSIST_`` prefix optional)."""
    out = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--server-setting wants NAME=VALUE, got {pair!r}")
        name = name.strip().lower()
        out[name.removeprefix("csist_")] = value.strip()
    return out


def server_runs(
    model: Path,
    args,
    frames: np.ndarray,
    plan: str | None = None,
    pair_cache: bool = True,
    phases: tuple[str, ...] = ("ws_fixed", "ws_saturation", "rest"),
) -> dict:
    """The WebSocket load at the fixed and the saturating rate, then REST, on one server process
    (``phases``: which of them). ``plan``: CSIST_PLAN (None: the service's default, auto)."""
    settings = {"pair_cache": int(pair_cache), "inference_workers": args.workers, "drain_s": 0, "log_level": "warning"}
    if plan is not None:
        settings["plan"] = plan
    settings.update(server_settings(args.server_setting))
    server = ServerProcess(model, settings)
    try:
        cpu0 = server.cpu_seconds()
        out = {
            "pair_cache": pair_cache,
            "settings": {f"CSIST_{k.upper()}": v for k, v in settings.items()},
            "refine": args.refine,
            "ready_s": round(server.ready_s, 2),
            **server.plan(),
        }
        if "ws_fixed" in phases:
            out["ws_fixed"] = ws_run(server.port, args.tracks, args.rate, args.seconds, SEED, args.refine)
        if "ws_saturation" in phases:  # capacity: every window computed, however late (no deadline)
            out["ws_saturation"] = saturate(
                lambda rate: ws_run(server.port, args.tracks, rate, args.seconds, SEED + 1, args.refine, deadline_ms=0),
                args.max_rate,
                args.max_doublings,
            )
        if "rest" in phases:
            out["rest"] = rest_run(server.port, args.rest_rate, args.seconds, frames, refine=args.refine)
        if "overload" in phases:  # twice what the server carried saturated, for the overload time
            rate = 2 * out["ws_saturation"]["windows_per_s"]
            out["ws_overload"] = ws_run(server.port, args.tracks, rate, args.overload_seconds, SEED + 2, args.refine)
            out["ws_overload"]["deadline_ms"] = "server setting"
        if "fit" in phases:  # the fit asked for at the inference capacity (refine none, saturated)
            out["ws_fit"] = ws_run(
                server.port, args.tracks, out["ws_saturation"]["windows_per_s"], args.seconds, SEED + 3, "fit"
            )
        if "abandon" in phases:
            out["abandon"] = (
                abandon_run(server.port, server, 2, 8, after_s=1.0) if args.quick else abandon_run(server.port, server)
            )
        out["server_cpu_s"] = server.cpu_seconds() - cpu0
        return out
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# the report


def run(args) -> dict:
    import torch

    quick = args.quick
    seconds = 0.05 if quick else args.measure_seconds
    trajectories, _ = simulated_trajectories(max(args.windows // 16, 2), SEED)
    from training.data import windows as all_windows

    windows = np.ascontiguousarray(all_windows(trajectories)[: args.windows])
    m = OrtModel(args.model)
    cfg = m.package.manifest.interface.config
    flops = window_flops(cfg)
    report: dict = {
        "machine": machine(),
        "model": str(args.model),
        "sha256": m.package.sha256,
        "data": {"seed": SEED, "trajectories": int(len(trajectories)), "windows": int(len(windows))},
        "flops": flops,
        "conv_throughput": conv_throughput(seconds),
        "rows": [],
    }
    rows = report["rows"]
    roof = report["conv_throughput"]["ort_gflops"] * 1e9

    def add(mode: str, batch: int, rate: float, flops_per_window: int, **extra):
        rows.append(
            {
                "mode": mode,
                "batch": batch,
                "windows_per_s": rate,
                "gflops_per_s": rate * flops_per_window / 1e9,
                "roofline_fraction": rate * flops_per_window / roof,
                **extra,
            }
        )

    batches = [1, 8, 32]
    if args.checkpoint is not None and args.checkpoint.is_file():
        eager = eager_rates(args.checkpoint, windows, [1, 32], seconds)
        for b in (1, 32):
            add(f"PyTorch eager ({eager['deform_mode']})", b, eager[b], flops["uncached_per_window"])
    else:
        eager = None
        report["eager_skipped"] = f"no checkpoint at {args.checkpoint}"
    for b in batches:
        add("ONNX single graph", b, time_single(m, windows, b, seconds), flops["uncached_per_window"])
    if m.encoder is not None:
        for n in (1, 32):
            add(
                "ONNX encoder+head, streaming (cached features)",
                n,
                time_streaming(m, trajectories, n, seconds),
                flops["streaming_per_window"],
            )
    from service.kernels import conv, deform

    native = m.encoder is not None and m.package.head_split is not None and deform.AVAILABLE
    amx = m.encoder is not None and m.package.amx_split is not None and conv.AMX and deform.AVAILABLE
    report["amx"] = {
        "used": amx,
        "why_not": None if amx else (conv.WHY_NOT_AMX if not conv.AMX else "no amx_split plan in the manifest"),
    }
    if native:  # the head's DeformConv in the service's native kernel
        mn = OrtModel(args.model, {"deform_kernel": "native"})
        for n in (1, 32):
            add(
                "ONNX encoder+head + native deform, streaming",
                n,
                time_streaming(mn, trajectories, n, seconds),
                flops["streaming_per_window"],
            )
    if amx:  # and the convolutions in the bfloat16 AMX kernels (what the service runs on an AMX CPU)
        ma = OrtModel(args.model, {"deform_kernel": "native", "conv_kernel": "amx"})
        for n in (1, 32):
            add(AMX_MODE, n, time_streaming(ma, trajectories, n, seconds), flops["streaming_per_window"])
    workers = args.workers
    if workers > 1:  # the service's default on the CPU: one single-threaded call per core
        m1 = OrtModel(args.model, {"threads": 1})
        label = f"{workers} workers x 1 thread"
        add(
            f"ONNX single graph, {label}",
            32,
            time_single(m1, windows, 32, seconds, workers),
            flops["uncached_per_window"],
        )
        if m1.encoder is not None:
            for n in (1, 32):
                add(
                    f"ONNX encoder+head, streaming, {label}",
                    n,
                    time_streaming(m1, trajectories, n, seconds, workers),
                    flops["streaming_per_window"],
                )
        if native:
            m1n = OrtModel(args.model, {"threads": 1, "deform_kernel": "native"})
            for n in (1, 32):
                add(
                    f"ONNX encoder+head + native deform, streaming, {label}",
                    n,
                    time_streaming(m1n, trajectories, n, seconds, workers),
                    flops["streaming_per_window"],
                )
        if amx:
            m1a = OrtModel(args.model, {"threads": 1, "deform_kernel": "native", "conv_kernel": "amx"})
            for n in (1, 32):
                add(
                    f"{AMX_MODE}, {label}",
                    n,
                    time_streaming(m1a, trajectories, n, seconds, workers),
                    flops["streaming_per_window"],
                )
    by = {
        (r["mode"].split(" (")[0] if r["mode"].startswith("PyTorch") else r["mode"], r["batch"]): r["windows_per_s"]
        for r in rows
    }
    ratios = {}
    if workers > 1 and ("PyTorch eager", 32) in by:
        for what, mode in (
            ("single", "ONNX single graph"),
            ("streaming", "ONNX encoder+head, streaming"),
            ("streaming_native", "ONNX encoder+head + native deform, streaming"),
            ("streaming_amx", AMX_MODE),
        ):
            key = (f"{mode}, {workers} workers x 1 thread", 32)
            if key in by:
                ratios[f"onnx_{what}_{workers}_workers_vs_eager_batch32"] = by[key] / by[("PyTorch eager", 32)]
    for b in (1, 32):
        if ("PyTorch eager", b) in by:
            ratios[f"onnx_single_vs_eager_batch{b}"] = by[("ONNX single graph", b)] / by[("PyTorch eager", b)]
            key = ("ONNX encoder+head, streaming (cached features)", b)
            if key in by:
                ratios[f"onnx_streaming_vs_eager_batch{b}"] = by[key] / by[("PyTorch eager", b)]
            key = ("ONNX encoder+head + native deform, streaming", b)
            if key in by:
                ratios[f"onnx_streaming_native_vs_eager_batch{b}"] = by[key] / by[("PyTorch eager", b)]
            if (AMX_MODE, b) in by:
                ratios[f"onnx_streaming_amx_vs_eager_batch{b}"] = by[(AMX_MODE, b)] / by[("PyTorch eager", b)]
        key = ("ONNX encoder+head, streaming (cached features)", b)
        if key in by:
            ratios[f"cached_vs_uncached_batch{b}"] = by[key] / by[("ONNX single graph", b)]
    report["ratios"] = ratios

    from service.engine.plans import PlanOptions
    from service.engine.select import select_plan

    # the service's own start-up choice, on one thread as each inference worker runs
    report["plans"] = select_plan(args.model, options=PlanOptions(threads=1), budget_s=1.0 if quick else 6.0).report()
    if not args.no_tuning:
        report["ort_tuning"] = ort_tuning(
            args.model, windows, trajectories, seconds, 1 if quick else args.tuning_rounds
        )

    if not args.no_server:
        # the served plan (auto unless --server-setting plan=...) and, side by side in the same run,
        # the stock plan at the same saturating load
        main_phases = ("ws_fixed", "ws_saturation", "rest") + (
            () if args.no_overload else ("overload", "fit", "abandon")
        )
        server = {"cached": server_runs(args.model, args, trajectories, phases=main_phases)}
        if m.encoder is not None and not args.no_stock_server and server["cached"].get("plan") != "onnxruntime":
            server["stock plan"] = server_runs(args.model, args, trajectories, "onnxruntime", phases=("ws_saturation",))
        if "align" in m.package.parts and not args.no_pair_ab:
            # the same fixed load with the window's head run whole when it completes
            server["cached, no pair cache"] = server_runs(
                args.model, args, trajectories, pair_cache=False, phases=("ws_fixed",)
            )
        if m.encoder is not None and not args.no_uncached_server:
            server["uncached"] = server_runs(args.model, args, trajectories, "onnxruntime-single")
        report["server"] = server
        c = server["cached"]
        if "uncached" in server:
            u = server["uncached"]["ws_saturation"]["windows_per_s"]
            ratios["server_cached_vs_uncached_saturation"] = c["ws_saturation"]["windows_per_s"] / u if u else None
        stock = server.get("stock plan", c if c.get("plan") == "onnxruntime" else None)
        if stock is not None and stock["ws_saturation"]["windows_per_s"]:
            ratios["server_plan_vs_stock_saturation"] = (
                c["ws_saturation"]["windows_per_s"] / stock["ws_saturation"]["windows_per_s"]
            )
        deadline_ms = float(server_settings(args.server_setting).get("deadline_ms", 500.0))
        if "ws_overload" in c:
            o, f = c["ws_overload"], c["ws_fit"]
            o_shed, f_shed = (r["error_codes"].get("deadline_exceeded", 0) for r in (o, f))  # shed by deadline
            report["overload"] = {
                "deadline_ms": deadline_ms,
                "offered": o["offered_windows_per_s"],
                "answered": o["answered"],
                "shed": o_shed,
                "other_errors": o["errors"] - o_shed,
                "missing": o["missing"],
                "duplicates": o["duplicates"],
                "p50_ms": o["p50_ms"],
                "p99_ms": o["p99_ms"],
                "target_p99_ms": 1.5 * deadline_ms,
                "fit_p99_ms": f["p99_ms"],
                "fit_unrefined": f["unrefined"],
                "fit_answered": f["answered"],
                "fit_missing": f["missing"],
                "fit_shed": f_shed,
                "fit_errors": f["errors"] - f_shed,
                "abandon": c["abandon"],
            }
        report["done_when"] = {
            "ws_saturation_windows_per_s": c["ws_saturation"]["windows_per_s"],
            "target_windows_per_s": 150,
            "ws_p99_ms_at_offered": c["ws_fixed"]["p99_ms"],
            "offered": args.rate,
            "target_p99_ms": 50,
            "server_plan": c.get("plan"),
            "server_backends": c.get("backends"),
            "stock_plan_ws_saturation_windows_per_s": None
            if stock is None
            else stock["ws_saturation"]["windows_per_s"],
            "plan_vs_stock_saturation": ratios.get("server_plan_vs_stock_saturation"),
            "target_plan_vs_stock": 0.95,
            "onnx_vs_eager_batch32": ratios.get("onnx_single_vs_eager_batch32"),
            "onnx_streaming_vs_eager_batch32": ratios.get("onnx_streaming_vs_eager_batch32"),
            "onnx_streaming_workers_vs_eager_batch32": ratios.get(f"onnx_streaming_{workers}_workers_vs_eager_batch32"),
            "onnx_streaming_native_workers_vs_eager_batch32": ratios.get(
                f"onnx_streaming_native_{workers}_workers_vs_eager_batch32"
            ),
            "onnx_streaming_amx_workers_vs_eager_batch32": ratios.get(
                f"onnx_streaming_amx_{workers}_workers_vs_eager_batch32"
            ),
            "workers": workers,
            "target_ratio": 5,
        }
    report["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    report["torch_threads"] = torch.get_num_threads()
    return report


def markdown(report: dict) -> str:
    mach = report["machine"]
    conv = report["conv_throughput"]
    f = report["flops"]
    out = [
        f"Machine: {mach['cpu']}, {mach['logical_cores']} logical cores; onnxruntime {mach['onnxruntime']}, "
        f"torch {mach.get('torch', '-')}. Data: {report['data']['windows']} simulated windows (seed "
        f"{report['data']['seed']}).\n",
        f"FLOPs per window (counted, see bench/flops.py): {f['uncached_per_window'] / 1e9:.3f} GFLOP uncached "
        f"(5 x {f['encoder_per_frame'] / 1e9:.3f} encoder + {f['head_per_window'] / 1e9:.3f} head), "
        f"{f['streaming_per_window'] / 1e9:.3f} GFLOP streaming. Measured 3x3-conv throughput: "
        f"{conv['ort_gflops']:.1f} GFLOP/s (ONNX Runtime, float32), {conv['torch_gflops']:.1f} GFLOP/s (torch)"
        + (
            f", {conv['amx_bf16_1_thread_gflops']:.1f} GFLOP/s (the service's bfloat16 AMX kernel, one thread)"
            if "amx_bf16_1_thread_gflops" in conv
            else ""
        )
        + "; roofline = the ONNX Runtime float32 figure (rows with the AMX kernels can exceed it).\n\n",
    ]
    rows = [
        [r["mode"], r["batch"], r["windows_per_s"], r["gflops_per_s"], 100 * r["roofline_fraction"]]
        for r in report["rows"]
    ]
    out.append(md_table(["mode", "batch / tracks", "windows/s", "GFLOP/s", "% of conv roofline"], rows))
    if report.get("ratios"):
        out.append(
            "\nRatios (same run): "
            + ", ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items() if v is not None)
            + "\n"
        )
    if "plans" in report:
        from service.engine.select import table

        out.append(
            f"\nExecution plans as the service chooses them at start-up (`csist plans`; chosen: "
            f"{report['plans']['name']}):\n\n{table(report['plans'])}\n"
        )
    if "ort_tuning" in report:
        rows = [
            [name, "-", "-", "-", f"skipped: {e['skipped']}"]
            if "skipped" in e
            else [
                name,
                e["single_batch32"],
                e.get("streaming_32_tracks"),
                e.get("streaming_1_track"),
                "-" if e["keep"] is None else ", ".join(k for k, v in e["keep"].items() if v) or "no",
            ]
            for name, e in report["ort_tuning"].items()
        ]
        out.append(
            "\nONNX Runtime session options (windows/s, median of round-robin repeats; "
            "'faster on' = more than 5 % above the default):\n\n"
        )
        out.append(
            md_table(
                ["options", "single graph, batch 32", "streaming, 32 tracks", "streaming, 1 track", "faster on"], rows
            )
        )
    if "server" in report:
        rows = []
        for name, s in report["server"].items():
            for key, label in (
                ("ws_fixed", "WebSocket, fixed rate"),
                ("ws_saturation", "WebSocket, saturating (no deadline)"),
                ("ws_overload", "WebSocket, 2x saturated (deadline)"),
                ("ws_fit", "WebSocket, refine=fit at the saturated rate"),
                ("rest", "REST, fixed rate"),
            ):
                if key in s:
                    r = s[key]
                    short = " (not saturated: the server kept up)" if r.get("saturated") is False else ""
                    rows.append(
                        [
                            f"{label} ({name}){short}",
                            r.get("tracks", "-"),
                            r["offered_windows_per_s"],
                            r["windows_per_s"],
                            r["p50_ms"],
                            r["p95_ms"],
                            r["p99_ms"],
                        ]
                    )
        if "overload" in report:
            o = report["overload"]
            a = o["abandon"]
            out.append(
                f"\nOverload (CSIST_DEADLINE_MS={o['deadline_ms']:g}): {o['offered']:.0f} windows/s offered (2x "
                "saturated) "
                f"-> {o['answered']} answered (p50 {o['p50_ms']:.1f} ms, p99 {o['p99_ms']:.1f} ms; target <= "
                f"{o['target_p99_ms']:.0f}), {o['shed']} shed (deadline_exceeded), {o['other_errors']} other errors, "
                f"{o['missing']} missing, {o['duplicates']} duplicates. Fit at the saturated rate: p99 "
                f"{o['fit_p99_ms']:.1f} ms, {o['fit_unrefined']} of {o['fit_answered']} answered without the fit, "
                f"{o['fit_missing']} missing, {o['fit_shed']} shed, {o['fit_errors']} other errors. "
                f"{a['connections']} connections x {a['tracks']} "
                f"tracks x {a['frames_per_track']} frames vanished: {a['server_cpu_s_after']} s of server CPU in the "
                f"next {a['after_s']:g} s (target < {a['target_cpu_s']:g}).\n"
            )
        out.append("\nReal server end to end (loopback, client on the same machine):\n\n")
        out.append(md_table(["load", "tracks", "offered windows/s", "windows/s", "p50 ms", "p95 ms", "p99 ms"], rows))
        ready = [f"{name} {s['ready_s']:g} s" for name, s in report["server"].items() if "ready_s" in s]
        if ready:
            out.append(f"\nStart-up to ready (process start to the first 200 of /readyz): {', '.join(ready)}.\n")
        d = report["done_when"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        out.append(
            f"\nTargets: streaming sustains {d['ws_saturation_windows_per_s']} windows/s (target >= 150); "
            f"p99 {d['ws_p99_ms_at_offered']:.1f} ms at {d['offered']:g} windows/s offered (target < 50 ms); "
            f"ONNX / PyTorch eager at batch 32: single graph {fmt(d['onnx_vs_eager_batch32'])}, "
            f"encoder+head streaming {fmt(d['onnx_streaming_vs_eager_batch32'])}, "
            f"encoder+head streaming on {d.get('workers', 1)} workers "
            f"{fmt(d.get('onnx_streaming_workers_vs_eager_batch32'))}, with the native deform kernel "
            f"{fmt(d.get('onnx_streaming_native_workers_vs_eager_batch32'))}, with the AMX kernels "
            f"{fmt(d.get('onnx_streaming_amx_workers_vs_eager_batch32'))} (target >= 5). "
            f"The server ran plan {d.get('server_plan')} ({d.get('server_backends')}); saturated, it carried "
            f"{fmt(d.get('plan_vs_stock_saturation'))} x the stock plan's windows/s in the same run "
            f"(target >= 0.95).\n"
        )
    return "".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=Path,
        default=REPO / "models" / "derefnet",
        help="model folder (its manifest.json lists the parts)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=REPO / "runs" / "derefnet" / "best.pt",
        help="training checkpoint for the PyTorch eager row (skipped if missing)",
    )
    p.add_argument("--windows", type=int, default=512, help="simulated windows for the in-process measurements")
    p.add_argument("--measure-seconds", type=float, default=2.0, help="seconds per in-process measurement")
    p.add_argument("--tracks", type=int, default=8, help="concurrent WebSocket tracks of the replay client")
    p.add_argument("--rate", type=float, default=100.0, help="fixed offered WebSocket load, windows/s (all tracks)")
    p.add_argument(
        "--max-rate",
        type=float,
        default=400.0,
        help="first saturating offered WebSocket load, windows/s (doubled while the server keeps up)",
    )
    p.add_argument(
        "--max-doublings",
        type=int,
        default=3,
        help="how many times the saturating load may be doubled before the run stops short of saturation",
    )
    p.add_argument(
        "--rest-rate", type=float, default=50.0, help="fixed offered REST load, windows/s (5 frames per request)"
    )
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per end-to-end load phase")
    p.add_argument(
        "--refine",
        default="none",
        help="refine option the server runs with (default none: the network's answer; 'fit' adds the "
        "physics fit, whose cost `csist evaluate` reports as postprocess_ms_per_window)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=available_cpus(),
        help="inference workers of the parallel rows (default: one per core, the service's default)",
    )
    p.add_argument(
        "--server-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra service setting for the server runs, e.g. max_batch_size=16 (repeatable)",
    )
    p.add_argument("--no-server", action="store_true", help="skip the end-to-end server runs")
    p.add_argument(
        "--no-uncached-server",
        action="store_true",
        help="skip the server run on the single graph (CSIST_PLAN=onnxruntime-single)",
    )
    p.add_argument(
        "--no-overload",
        action="store_true",
        help="skip the overload rows: twice the saturated rate offered, the fit at the saturated rate, "
        "and 20 connections x 256 tracks vanishing",
    )
    p.add_argument("--overload-seconds", type=float, default=20.0, help="seconds of the overload phase")
    p.add_argument(
        "--no-stock-server",
        action="store_true",
        help="skip the saturating server run on the stock plan (CSIST_PLAN=onnxruntime)",
    )
    p.add_argument(
        "--no-pair-ab",
        action="store_true",
        help="skip the fixed-rate server run with CSIST_PAIR_CACHE=0 (the head run whole per window)",
    )
    p.add_argument("--no-tuning", action="store_true", help="skip the ONNX Runtime option sweep")
    p.add_argument("--tuning-rounds", type=int, default=3, help="round-robin repetitions of the option sweep (median)")
    p.add_argument("--quick", action="store_true", help="tiny durations (tests); numbers are not meaningful")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--markdown", type=Path, default=None, help="write the markdown tables here")


def main(args) -> int:
    if args.quick:
        args.windows = min(args.windows, 64)
        args.seconds = min(args.seconds, 1.0)
        args.overload_seconds = min(args.overload_seconds, 1.0)
        args.max_doublings = min(args.max_doublings, 1)
    report = run(args)
    text = markdown(report)
    write_outputs(report, args.out, text, args.markdown)
    print(text)
    return 0
