"""Graceful shutdown of a real server process on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.service.conftest import ServerProcess, simulate_track


def frame_msg(track_id, index, patch) -> str:
    return json.dumps({"type": "frame", "track_id": track_id, "frame_index": index, "patch": patch.tolist()})


def test_sigterm_drains_flushes_tracks_and_closes_with_reason(standin_model):
    proc = ServerProcess(standin_model, env={"CSIST_DRAIN_S": "1.5"})
    frames = simulate_track(3, seed=2)
    body = {"frames": [{"patch": f.tolist()} for f in frames]}
    try:
        assert proc.wait_started(60), proc.logs
        assert httpx.get(f"{proc.base_url}/readyz").status_code == 200

        async def scenario():
            async with connect(proc.ws_url) as ws:
                for i in range(2):
                    await ws.send(frame_msg("A", i, frames[i]))
                for i in range(3):
                    await ws.send(frame_msg("B", i, frames[i]))
                first = json.loads(await asyncio.wait_for(ws.recv(), 5))  # B's frame 0

                proc.proc.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
                async with httpx.AsyncClient(base_url=proc.base_url) as c:
                    ready = (await c.get("/readyz")).status_code
                    while ready != 503 and time.monotonic() - t0 < 1.0:
                        await asyncio.sleep(0.02)
                        ready = (await c.get("/readyz")).status_code
                    drained = await c.get("/readyz")
                    live = await c.get("/healthz")
                    # still serving during the drain window (load balancers need time)
                    in_drain = await c.post("/unmix", json=body)
                messages = []
                try:
                    while True:
                        messages.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                except ConnectionClosed:
                    pass
                return (
                    first,
                    ready,
                    drained,
                    live,
                    in_drain,
                    messages,
                    ws.close_code,
                    ws.close_reason,
                )

        first, ready, drained, live, in_drain, messages, code, reason = asyncio.run(scenario())
        exit_code = proc.wait(30)
    finally:
        proc.kill()

    assert (first["track_id"], first["frame_index"]) == ("B", 0)
    assert ready == 503 and drained.json() == {"status": "not ready", "reason": "draining"}
    assert live.status_code == 200
    assert in_drain.status_code == 200 and len(in_drain.json()["results"]) == 3
    # every open track flushed (its last frames answered), then marked expired by shutdown
    by_track = {}
    for m in messages:
        by_track.setdefault(m["track_id"], []).append((m["type"], m.get("frame_index"), m.get("reason")))
    assert by_track["A"] == [
        ("result", 0, None),
        ("result", 1, None),
        ("expired", None, "shutdown"),
    ]
    assert by_track["B"] == [
        ("result", 1, None),
        ("result", 2, None),
        ("expired", None, "shutdown"),
    ]
    assert code == 1001 and reason == "server shutting down"
    assert exit_code == 0
    assert all(not r.get("unparsed") for r in proc.logs)
    assert any(r["message"].startswith("draining") for r in proc.logs)
