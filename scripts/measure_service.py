"""Throughput and latency of the service through a real server, REST and WebSocket.

Starts ``python -m service`` on a free loopback port (the stand-in test model unless --model
is given), loads it from concurrent clients for a fixed time, and prints windows/s and p50/p99
latency as JSON:

    .venv/bin/python scripts/measure_service.py --duration 10

REST latency is per request (``--frames`` frames = that many windows). WebSocket latency is per
frame: from sending frame t+2 of a track (the frame that completes frame t's window) to
receiving frame t's result. Client and server share the machine, so the numbers are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), to report server cost."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary(latencies_s: list[float], windows: int, seconds: float) -> dict:
    ms = [v * 1000.0 for v in latencies_s]
    return {
        "windows_per_s": round(windows / seconds, 1),
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "samples": len(ms),
    }


async def rest_load(
    base_url: str, body: bytes, n_frames: int, clients: int, duration: float
) -> dict:
    import httpx

    latencies: list[float] = []
    windows = 0
    stop = time.perf_counter() + duration
    headers = {"content-type": "application/json"}

    async def worker(client):
        nonlocal windows
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await client.post("/unmix", content=body, headers=headers)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"REST answered {r.status_code}: {r.text[:200]}")
            windows += n_frames

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return summary(latencies, windows, elapsed) | {
        "clients": clients,
        "frames_per_request": n_frames,
    }


async def ws_load(
    ws_url: str, patches: list[list], connections: int, tracks: int, inflight: int, duration: float
) -> dict:
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    results = 0
    patch_json = [json.dumps(p) for p in patches]

    async def one_connection(c: int):
        nonlocal results
        sent_at: dict[tuple[str, int], float] = {}
        budget = asyncio.Semaphore(inflight)
        stop = time.perf_counter() + duration
        done = asyncio.Event()
        expected_ends = tracks

        async with connect(ws_url, max_size=None) as ws:

            async def reader():
                nonlocal results, expected_ends
                async for raw in ws:
                    m = json.loads(raw)
                    if m["type"] == "result":
                        key = (m["track_id"], m["frame_index"] + 2)
                        t_sent = sent_at.pop(key, None) or sent_at.pop(
                            (m["track_id"], m["frame_index"]), None
                        )
                        if t_sent is not None and time.perf_counter() < stop:
                            latencies.append(time.perf_counter() - t_sent)
                        results += 1
                        budget.release()
                    elif m["type"] == "ended":
                        expected_ends -= 1
                        if expected_ends == 0:
                            done.set()
                            return
                    elif m["type"] == "error":
                        raise RuntimeError(f"WebSocket error: {m}")

            reading = asyncio.create_task(reader())
            index = 0
            while time.perf_counter() < stop:
                for k in range(tracks):
                    await budget.acquire()
                    track = f"c{c}t{k}"
                    sent_at[(track, index)] = time.perf_counter()
                    await ws.send(
                        f'{{"type":"frame","track_id":"{track}","frame_index":{index},'
                        f'"patch":{patch_json[index % len(patch_json)]}}}'
                    )
                index += 1
            for k in range(tracks):
                await ws.send(json.dumps({"type": "end", "track_id": f"c{c}t{k}"}))
            await asyncio.wait_for(done.wait(), 60)
            await reading

    t0 = time.perf_counter()
    await asyncio.gather(*(one_connection(c) for c in range(connections)))
    elapsed = time.perf_counter() - t0
    return summary(latencies, results, elapsed) | {
        "connections": connections,
        "tracks_per_connection": tracks,
        "inflight_per_connection": inflight,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default=None, help="ONNX model with its card (default: the stand-in test model)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per protocol")
    p.add_argument("--rest-clients", type=int, default=8, help="concurrent REST clients")
    p.add_argument("--frames", type=int, default=5, help="frames per REST request")
    p.add_argument("--ws-connections", type=int, default=4, help="WebSocket connections")
    p.add_argument("--tracks", type=int, default=8, help="tracks per WebSocket connection")
    p.add_argument(
        "--inflight", type=int, default=32, help="unanswered frames allowed per connection"
    )
    p.add_argument(
        "--batch-wait-ms", type=float, default=2.0, help="CSIST_MAX_BATCH_WAIT_MS of the server"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.inflight <= 2 * args.tracks:
        print(
            "--inflight must exceed 2 x --tracks (each track holds 2 frames back)", file=sys.stderr
        )
        return 2
    import os

    from tests.service.conftest import ServerProcess, simulate_track, standin_weights, write_standin

    extra_env = {k: v for k, v in os.environ.items() if k.startswith("CSIST_")}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else write_standin(Path(tmp), standin_weights())
        server = ServerProcess(
            model, env={"CSIST_MAX_BATCH_WAIT_MS": str(args.batch_wait_ms), **extra_env}
        )
        try:
            if not server.wait_started(60):
                print(json.dumps(server.logs[-5:], indent=1), file=sys.stderr)
                return 1
            frames = simulate_track(max(args.frames, 20), seed=0, spread=0.3)
            body = json.dumps(
                {"frames": [{"patch": f.tolist()} for f in frames[: args.frames]]}
            ).encode()
            pid = server.proc.pid
            patches = [f.tolist() for f in frames]
            levels = {
                # closed loop, one request / one frame at a time: latency without queueing
                "single": dict(rest_clients=1, ws_connections=1, tracks=1, inflight=3),
                "loaded": dict(
                    rest_clients=args.rest_clients,
                    ws_connections=args.ws_connections,
                    tracks=args.tracks,
                    inflight=args.inflight,
                ),
            }
            report = {}
            for level, cfg in levels.items():
                c0 = cpu_seconds(pid)
                rest = asyncio.run(
                    rest_load(
                        server.base_url, body, args.frames, cfg["rest_clients"], args.duration
                    )
                )
                c1 = cpu_seconds(pid)
                ws = asyncio.run(
                    ws_load(
                        server.ws_url,
                        patches,
                        cfg["ws_connections"],
                        cfg["tracks"],
                        cfg["inflight"],
                        args.duration,
                    )
                )
                c2 = cpu_seconds(pid)
                # server CPU per window: what one server core costs per window, client excluded
                rest["server_cpu_us_per_window"] = round(
                    1e6 * (c1 - c0) / max(rest["samples"] * args.frames, 1), 1
                )
                ws["server_cpu_us_per_window"] = round(1e6 * (c2 - c1) / max(ws["samples"], 1), 1)
                report[level] = {"rest": rest, "ws": ws}
        finally:
            server.kill()
    print(
        json.dumps({"model": "stand-in" if not args.model else str(args.model), **report}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
