"""The service on the bundled model (models/derefnet/), when the lead has exported it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.kernels import conv, deform
from service.modelpkg.manifest import load_package
from service.runtime.config import DEFAULT_MODEL_PATH, Settings
from tests.service.conftest import LiveServer, simulate_track

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
