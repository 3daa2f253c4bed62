"""The service on the bundled model (models/derefnet/), when the lead has exported it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from service.kernels import conv, deform
from service.modelpkg.manifest import load_package
from service.runtime.config import DEFAULT_MODEL_PATH, Settings
from tests.service.conftest import LiveServer, matched, origin_runs, recentred_track, simulate_track

BUNDLED = (DEFAULT_MODEL_PATH / "manifest.json").is_file()


@pytest.mark.skipif(not BUNDLED, reason="models/derefnet not exported yet")
def test_service_starts_on_the_bundled_model_and_answers():
    live = LiveServer(Settings(model_path=DEFAULT_MODEL_PATH, drain_s=0.0, plan_budget_s=2.0, deadline_ms=0.0)).start()
    try:
        with httpx.Client(base_url=live.base_url, timeout=60) as c:
            assert c.get("/readyz").status_code == 200
            meta = c.get("/v2/models/derefnet").json()
            frames = simulate_track(5, seed=0, spread=0.3)
            r = c.post("/unmix", json={"frames": [{"patch": f.tolist()} for f in frames]})
        caches = live.runtime.batcher.caches_features
        report = live.runtime.selection.report()
    finally:
        live.stop()
    assert r.status_code == 200, r.text
    card = load_package(DEFAULT_MODEL_PATH)
    assert caches == bool(card.parts)  # exported with parts: the stream uses them
    # auto: every plan eligible here was checked and timed, and the fastest that passed serves
    assert meta["plan"]["name"] == report["name"] and meta["plan"]["requested"] == "auto"
    rows = {row["plan"]: row for row in report["candidates"]}
    passed = {n: r["ms_per_window"] for n, r in rows.items() if r["status"] in ("chosen", "passed")}
    assert rows[report["name"]]["status"] == "chosen" and "onnxruntime" in passed
    assert passed[report["name"]] == min(passed.values())
    assert (rows["native-deform"]["status"] != "not eligible") == (card.head_split is not None and deform.AVAILABLE)
    assert (rows["amx"]["status"] != "not eligible") == (card.amx_split is not None and conv.AMX and deform.AVAILABLE)
    out = r.json()
    assert len(out["results"]) == 5
    assert out["model"]["sha256"] == meta["sha256"]
    for res in out["results"]:
        for t in res["targets"]:
            assert -0.5 <= t["x"] <= 10.5 and -0.5 <= t["y"] <= 10.5


def test_the_default_model_path_is_the_repositorys_bundled_model():
    """A layout change that moves service/runtime/config.py must not move the default model (the
    tests on the bundled model would skip instead of failing)."""
    repo = Path(__file__).resolve().parents[2]
    assert DEFAULT_MODEL_PATH == repo / "models" / "derefnet"
    assert BUNDLED and (DEFAULT_MODEL_PATH / "model.onnx").is_file()


@pytest.mark.skipif(not BUNDLED, reason="models/derefnet not exported yet")
def test_a_recentring_trackers_patches_are_answered_as_a_still_patchs():
    """A tracker that re-centres its patch on the group by whole pixels (csist replay's, on most
    frames; noise sigma 2): its windows are kept (frames shifted into each window's middle
    patch), and the targets, in sensor coordinates, land within 0.05 px of the truth about as
    often as from a patch that never moved; cut into a segment per origin instead (before the
    service followed re-centring), most windows are a single frame, far less often."""
    live = LiveServer(Settings(model_path=DEFAULT_MODEL_PATH, drain_s=0.0, plan_budget_s=2.0, deadline_ms=0.0)).start()
    found = {"moving": 0, "still": 0, "split": 0, "total": 0}
    try:
        with httpx.Client(base_url=live.base_url, timeout=60) as c:
            for number in range(4):
                (moving, origins, truth), (fixed, fixed_origins, fixed_truth) = recentred_track(number, noise=2.0)
                frames = [{"patch": f.tolist(), "origin": o} for f, o in zip(moving, origins, strict=True)]
                rest = c.post("/unmix", json={"frames": frames}).json()["results"]
                streamed = asyncio.run(_stream(live.ws_url, moving, origins))
                assert [m["targets"] for m in streamed] == [r["targets"] for r in rest]
                body = {
                    "frames": [{"patch": f.tolist(), "origin": o} for f, o in zip(fixed, fixed_origins, strict=True)]
                }
                still = c.post("/unmix", json=body).json()["results"]
                split = []
                for run in origin_runs(origins):
                    split += c.post("/unmix", json={"frames": [frames[t] for t in run]}).json()["results"]
                found["moving"] += matched(rest, truth)
                found["still"] += matched(still, fixed_truth)
                found["split"] += matched(split, truth)
                found["total"] += truth.shape[0] * truth.shape[1]
    finally:
        live.stop()
    print(f"targets within 0.05 px of the truth: {found}")  # shown with pytest -s
    total = found["total"]
    assert found["moving"] >= 0.5 * total and found["moving"] >= found["still"] - 0.05 * total, found
    assert found["split"] <= found["moving"] - 0.15 * total, found


async def _stream(url: str, patches, origins) -> list[dict]:
    """The results of one track streamed over the WebSocket, in frame order."""
    async with connect(url) as ws:
        for i, (patch, origin) in enumerate(zip(patches, origins, strict=True)):
            msg = {"type": "frame", "track_id": "t", "frame_index": i, "patch": patch.tolist(), "origin": origin}
            await ws.send(json.dumps(msg))
        await ws.send(json.dumps({"type": "end", "track_id": "t"}))
        msgs = [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(len(patches) + 1)]
    return [m for m in msgs if m["type"] == "result"]
