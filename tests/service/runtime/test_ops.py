"""Operations: health/readiness, model metadata, Prometheus metrics, docs, start-up refusal."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from service.api.server import build_parser, main
from service.modelpkg.manifest import file_sha256
from tests.service.conftest import CARD_METRICS, ServerProcess, simulate_track


def scrape(base_url: str) -> dict[str, dict]:
    """Metric families by name -> {(sample name, sorted labels): value}."""
    r = httpx.get(f"{base_url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(family.name, {})[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics, family, sample=None, **labels) -> float:
    return metrics[family].get((sample or family, tuple(sorted(labels.items()))), 0.0)


def test_health_and_readiness(server):
    with httpx.Client(base_url=server.base_url) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        assert c.get("/readyz").json()["status"] == "ready"
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get("/v2/models/derefnet/ready").json() == {"ready": True}


def test_model_metadata(server, standin_model):
    r = httpx.get(f"{server.base_url}/v2/models/derefnet")
    assert r.status_code == 200
    meta = r.json()
    assert meta["name"] == "derefnet" and meta["versions"] == ["0.1.0"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "lr", "datatype": "FP32", "shape": [-1, 5, 11, 11]}]
    assert meta["outputs"] == [{"name": "hr", "datatype": "FP32", "shape": [-1, 33, 33]}]
    assert meta["sha256"] == file_sha256(standin_model / "model.onnx")
    assert meta["providers"] == ["CPUExecutionProvider"]
    assert meta["onnxruntime_version"] == ort.__version__
    assert meta["metrics"] == CARD_METRICS
    assert meta["physics"]["psf_sigma"] == 0.5
    assert httpx.get(f"{server.base_url}/v2/models/other").status_code == 404


def test_docs_and_openapi(server):
    assert "swagger" in httpx.get(f"{server.base_url}/docs").text.lower()
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    assert {"/unmix", "/healthz", "/readyz", "/metrics", "/v2/models/{model_name}"} <= set(spec["paths"])
    refine = spec["components"]["schemas"]["UnmixOptions"]["properties"]["refine"]["anyOf"][0]
    assert refine["enum"] == ["none", "centroid", "quadratic", "fit"]


def test_prometheus_metrics_count_what_happened(start_server):
    live = start_server(max_batch_wait_ms=200.0)  # a wide window: concurrent work shares batches
    frames = simulate_track(5, seed=3)
    body = {"frames": [{"patch": f.tolist()} for f in frames]}

    async def traffic():
        async with httpx.AsyncClient(base_url=live.base_url) as c:
            rs = await asyncio.gather(*(c.post("/unmix", json=body) for _ in range(4)))
            assert all(r.status_code == 200 for r in rs)
            assert (await c.post("/unmix", json={"frames": []})).status_code == 422
            targets = sum(len(res["targets"]) for r in rs for res in r.json()["results"])
        after_rest = scrape(live.base_url)
        async with connect(live.ws_url) as ws:
            for i in range(4):
                await ws.send(
                    json.dumps(
                        {
                            "type": "frame",
                            "track_id": "m",
                            "frame_index": i,
                            "patch": frames[i].tolist(),
                        }
                    )
                )
            await ws.send(
                json.dumps(
                    {
                        "type": "frame",
                        "track_id": "m2",
                        "frame_index": 0,
                        "patch": frames[0].tolist(),
                    }
                )
            )
            await ws.send("nope")
            for _ in range(3):  # results 0, 1 and the bad_json error
                await ws.recv()
            mid = scrape(live.base_url)
        return targets, after_rest, mid

    rest_targets, after_rest, mid = asyncio.run(traffic())
    # 4 concurrent requests of 5 windows shared inference calls (fewer calls than requests; a
    # gathered batch is shared out between the 2 workers when the other one is idle)
    assert value(after_rest, "csist_batch_size", "csist_batch_size_sum") == 20
    assert value(after_rest, "csist_batch_size", "csist_batch_size_count") <= 3
    assert value(mid, "csist_active_tracks") == 2
    assert value(mid, "csist_ws_connections") == 1
    m = scrape(live.base_url)
    assert (
        value(
            m,
            "csist_http_requests",
            "csist_http_requests_total",
            route="/unmix",
            method="POST",
            status="200",
        )
        == 4
    )
    assert (
        value(
            m,
            "csist_http_requests",
            "csist_http_requests_total",
            route="/unmix",
            method="POST",
            status="422",
        )
        == 1
    )
    assert value(m, "csist_errors", "csist_errors_total", code="invalid_request") == 1
    assert value(m, "csist_errors", "csist_errors_total", code="bad_json") == 1
    assert value(m, "csist_frames", "csist_frames_total", source="rest") == 20
    assert value(m, "csist_frames", "csist_frames_total", source="ws") == 5
    assert value(m, "csist_windows", "csist_windows_total", source="rest") == 20
    assert value(m, "csist_windows", "csist_windows_total", source="ws") == 2
    assert value(m, "csist_targets", "csist_targets_total", source="rest") == rest_targets > 0
    calls = value(m, "csist_batch_size", "csist_batch_size_count")
    assert value(m, "csist_batch_size", "csist_batch_size_sum") == 22
    assert value(m, "csist_inference_seconds", "csist_inference_seconds_count") == calls
    assert value(m, "csist_queue_wait_seconds", "csist_queue_wait_seconds_count") >= 5
    assert value(m, "csist_active_tracks") == 0  # the connection closed: tracks dropped
    assert value(m, "csist_track_evictions", "csist_track_evictions_total", reason="disconnect") == 2
    assert value(m, "csist_ready") == 1
    assert (
        value(
            m,
            "csist_model_info",
            name="derefnet",
            version="0.1.0",
            sha256=live.runtime.model.sha256,
            providers="CPUExecutionProvider",
            plan="onnxruntime-single",  # the stand-in model has no streaming parts
            backends="single=onnxruntime:CPUExecutionProvider",
        )
        == 1
    )
    assert "csist_http_request_seconds" in m


def test_parser_defaults():
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.model, args.log_level) == ("127.0.0.1", 8000, None, None)
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0


def test_refuses_to_start_on_sha_mismatch(standin_model, tmp_path):
    path = tmp_path / "derefnet"
    shutil.copytree(standin_model, path)
    listed = file_sha256(path / "model.onnx")
    with open(path / "model.onnx", "ab") as fh:  # a file changed after its manifest was written
        fh.write(b"\0")
    proc = ServerProcess(path)
    try:
        assert not proc.wait_started(60)
        assert proc.wait(30) != 0
    finally:
        proc.kill()
    errors = [r for r in proc.logs if r.get("level") == "error"]
    assert any("SHA-256 mismatch" in r["message"] and listed in r["message"] for r in errors), proc.logs
    assert all(not r.get("unparsed") for r in proc.logs)  # every log line is JSON
