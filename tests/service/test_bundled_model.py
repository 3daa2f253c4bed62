"""The service on the bundled model (models/derefnet.onnx), when the lead has exported it."""

from __future__ import annotations

import json

import httpx
import pytest

from service import conv, deform
from service.config import DEFAULT_MODEL_PATH, Settings
from tests.service.conftest import LiveServer, simulate_track


@pytest.mark.skipif(
    not DEFAULT_MODEL_PATH.is_file(), reason="models/derefnet.onnx not exported yet"
)
def test_service_starts_on_the_bundled_model_and_answers():
    live = LiveServer(Settings(model_path=DEFAULT_MODEL_PATH, drain_s=0.0)).start()
    try:
        with httpx.Client(base_url=live.base_url, timeout=60) as c:
            assert c.get("/readyz").status_code == 200
            meta = c.get("/v2/models/derefnet").json()
            frames = simulate_track(5, seed=0, spread=0.3)
            r = c.post("/unmix", json={"frames": [{"patch": f.tolist()} for f in frames]})
        caches = live.runtime.batcher.caches_features
        kernel = live.runtime.model.deform_kernel
        conv_kernel = live.runtime.model.conv_kernel
    finally:
        live.stop()
    assert r.status_code == 200, r.text
    card = json.loads(DEFAULT_MODEL_PATH.with_suffix(".json").read_text())
    assert caches == bool(card.get("parts"))  # exported with parts: the stream uses them
    if card.get("head_split") and deform.AVAILABLE:  # the default (auto) uses a native kernel when it can
        assert kernel == ("amx" if conv_kernel == "amx" else "native")
    if card.get("amx_split") and deform.AVAILABLE and conv.AMX:
        assert conv_kernel == "amx"  # and the AMX split on a CPU that has AMX
    else:
        assert conv_kernel == "onnxruntime"
    out = r.json()
    assert len(out["results"]) == 5
    assert out["model"]["sha256"] == meta["sha256"]
    for res in out["results"]:
        for t in res["targets"]:
            assert -0.5 <= t["x"] <= 10.5 and -0.5 <= t["y"] <= 10.5
