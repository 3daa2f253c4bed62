"""POST /unmix through a real uvicorn server: answers, equivalence with the model, bad input."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service.modelpkg.manifest import file_sha256
from service.runtime.config import Settings
from service.science.background import condition
from service.science.postprocess import DEFAULT_SNR, find_targets
from service.science.refine import FitConfig
from tests.service.conftest import CARD_THRESHOLD, simulate_track


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


def body_of(frames, **extra) -> dict:
    return {"frames": [{"patch": f.tolist()} for f in frames], **extra}


def expected_targets(
    session, frames, threshold=CARD_THRESHOLD, refine="centroid", max_targets=None, fit_config=None, snr=None
):
    """Direct ONNX Runtime + find_targets, windows built here by hand (t-2..t+2, clamped)."""
    n = len(frames)
    windows = np.stack(
        [np.stack([frames[min(max(t + d, 0), n - 1)] for d in (-2, -1, 0, 1, 2)]) for t in range(n)]
    ).astype(np.float32)
    maps = session.run(["hr"], {"lr": condition(windows)})[0]  # the network sees background-free frames
    return find_targets(
        maps, windows, threshold=threshold, refine=refine, max_targets=max_targets, fit_config=fit_config, snr=snr
    )


def as_array(targets) -> np.ndarray:
    return np.array([[t["x"], t["y"], t["brightness"]] for t in targets]).reshape(-1, 3)


def test_five_frames_give_five_results_with_model_and_timing(client, standin_model):
    frames = simulate_track(5, seed=1)
    r = client.post("/unmix", json=body_of(frames, track_id="trk-1"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["track_id"] == "trk-1"
    assert [res["frame_index"] for res in out["results"]] == [0, 1, 2, 3, 4]
    assert out["model"] == {
        "name": "derefnet",
        "version": "0.1.0",
        "sha256": file_sha256(standin_model / "model.onnx"),
    }
    timing = out["timing_ms"]
    assert set(timing) == {"queue", "inference", "postprocess", "total"}
    assert all(v >= 0 for v in timing.values()) and timing["total"] >= timing["inference"]
    assert any(res["targets"] for res in out["results"])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"refine": "none"},
        {"refine": "quadratic", "threshold": 20.0},
        {"refine": "centroid", "threshold": 10.0, "max_targets": 2},
        {"refine": "fit"},
        {"refine": "none", "threshold_snr": 12.0},
    ],
)
def test_rest_equals_model_plus_postprocessing(client, reference_session, options):
    frames = simulate_track(9, seed=2)
    r = client.post("/unmix", json=body_of(frames, options=options))
    assert r.status_code == 200, r.text
    want = expected_targets(
        reference_session,
        frames,
        threshold=options.get("threshold", CARD_THRESHOLD),
        refine=options.get("refine", "centroid"),
        max_targets=options.get("max_targets"),
        # without an absolute threshold the service's default is relative to each window's noise
        snr=None if "threshold" in options else options.get("threshold_snr", DEFAULT_SNR),
    )
    results = r.json()["results"]
    assert len(results) == 9
    assert sum(len(w) for w in want) > 9  # the comparison is not vacuous
    for res, w in zip(results, want):
        got = as_array(res["targets"])
        assert got.shape == w.shape
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-4)
        for t in res["targets"]:
            assert t["score"] == t["brightness"]
            assert t["sensor_x"] is None and t["sensor_y"] is None


def test_calibration_options_reach_the_fit(client, reference_session):
    frames = simulate_track(7, seed=4)
    options = {"refine": "fit", "psf_sigma": 0.62, "saturation": 180.0, "brightness_range": [150.0, 300.0]}
    r = client.post("/unmix", json=body_of(frames, options=options))
    assert r.status_code == 200, r.text
    want = expected_targets(
        reference_session,
        frames,
        refine="fit",
        fit_config=FitConfig.calibrated(0.62, 180.0, (150.0, 300.0)),
        snr=DEFAULT_SNR,
    )
    default = expected_targets(reference_session, frames, refine="fit", fit_config=FitConfig(), snr=DEFAULT_SNR)
    assert any(d.shape != w.shape or not np.allclose(d, w) for d, w in zip(default, want))  # the options matter
    for res, w in zip(r.json()["results"], want):
        np.testing.assert_allclose(as_array(res["targets"]), w, rtol=1e-5, atol=1e-4)


def test_the_fit_answers_with_uncertainties_and_the_network_without(client):
    frames = simulate_track(7, seed=4)
    fit = client.post("/unmix", json=body_of(frames, options={"refine": "fit"})).json()["results"]
    answered = [r for r in fit if r["count_confidence"] is not None]
    assert answered, "the fit answered no frame"
    for res in answered:
        assert 0.0 < res["count_confidence"] <= 1.0
        for t in res["targets"]:
            assert 0.0 < t["sigma_x"] < 0.5 and 0.0 < t["sigma_y"] < 0.5 and -1.0 <= t["rho"] <= 1.0
            assert 0.0 < t["sigma_brightness"] < t["brightness"]
    net = client.post("/unmix", json=body_of(frames, options={"refine": "none"})).json()["results"]
    assert all(r["count_confidence"] is None for r in net)
    assert all(t["sigma_x"] is None and t["sigma_brightness"] is None for r in net for t in r["targets"])


def test_calibration_settings_are_checked_and_named():
    with pytest.raises(ValidationError, match="psf_sigma"):
        Settings(psf_sigma=0.1)
    with pytest.raises(ValidationError, match="saturation"):
        Settings(saturation=-1)
    assert Settings(saturation="").saturation is None  # CSIST_SATURATION= : the sensor never clips
    assert Settings(brightness_range="60, 250").brightness_range == (60.0, 250.0)
    with pytest.raises(ValidationError, match="brightness_range"):
        Settings(brightness_range="250,60")


def test_sensor_coordinates_add_the_origin_and_fields_are_echoed(client):
    frames = simulate_track(3, seed=3)
    body = {
        "frames": [
            {
                "patch": f.tolist(),
                "origin": {"x": 100.0 + k, "y": -20.5},
                "frame_index": 40 + k,
                "timestamp": 1000.25 + k,
            }
            for k, f in enumerate(frames)
        ],
        "options": {"threshold": 30.0},
    }
    out = client.post("/unmix", json=body).json()
    assert [r["frame_index"] for r in out["results"]] == [40, 41, 42]
    assert [r["timestamp"] for r in out["results"]] == [1000.25, 1001.25, 1002.25]
    n = 0
    for k, res in enumerate(out["results"]):
        for t in res["targets"]:
            assert t["sensor_x"] == pytest.approx(t["x"] + 100.0 + k)
            assert t["sensor_y"] == pytest.approx(t["y"] - 20.5)
            n += 1
    assert n > 0


def test_a_frame_index_gap_starts_a_new_segment(client, reference_session):
    frames = simulate_track(8, seed=4)
    indices = [0, 1, 2, 3, 10, 11, 12, 13]
    body = {
        "frames": [{"patch": f.tolist(), "frame_index": i} for f, i in zip(frames, indices)],
        "options": {"threshold": 30.0},
    }
    out = client.post("/unmix", json=body).json()["results"]
    want = expected_targets(reference_session, frames[:4], 30.0) + expected_targets(reference_session, frames[4:], 30.0)
    assert [r["frame_index"] for r in out] == indices
    for res, w in zip(out, want):
        np.testing.assert_allclose(as_array(res["targets"]), w, rtol=1e-5, atol=1e-4)
    # without the gap, frames 2 and 3 would see frames 4 and 5: the answers differ
    joined = expected_targets(reference_session, frames, 30.0)
    assert not all(a.shape == b.shape and np.allclose(a, b) for a, b in zip(joined[2:4], want[2:4]))


def patch(value=0.0, rows=11, cols=11):
    return [[value] * cols for _ in range(rows)]


BAD_BODIES = [
    ({"frames": []}, ["body", "frames"]),
    ({"frames": [{"patch": patch()}] * 65}, ["body", "frames"]),
    ({}, ["body", "frames"]),
    ({"frames": [{"patch": patch(rows=10)}]}, ["body", "frames", 0, "patch"]),
    (
        {"frames": [{"patch": patch()}, {"patch": patch(cols=12)}]},
        ["body", "frames", 1, "patch", 0],
    ),
    ({"frames": [{"patch": [["a"] * 11] * 11}]}, ["body", "frames", 0, "patch", 0, 0]),
    ({"frames": [{"patch": [["1.5"] * 11] * 11}]}, ["body", "frames", 0, "patch", 0, 0]),
    ({"frames": [{"patch": patch(2e6)}]}, ["body", "frames", 0, "patch", 0, 0]),
    ({"frames": [{"patch": patch(), "origin": {"x": 1}}]}, ["body", "frames", 0, "origin", "y"]),
    (
        {"frames": [{"patch": patch()}], "options": {"refine": "magic"}},
        ["body", "options", "refine"],
    ),
    (
        {"frames": [{"patch": patch()}], "options": {"max_targets": -1}},
        ["body", "options", "max_targets"],
    ),
    ({"frames": [{"patch": patch()}], "options": {"treshold": 5}}, ["body", "options", "treshold"]),
    ({"frames": [{"patch": patch()}], "options": {"psf_sigma": 0.1}}, ["body", "options", "psf_sigma"]),
    ({"frames": [{"patch": patch()}], "options": {"psf_sigma": 4.0}}, ["body", "options", "psf_sigma"]),
    ({"frames": [{"patch": patch()}], "options": {"saturation": 0}}, ["body", "options", "saturation"]),
    (
        {"frames": [{"patch": patch()}], "options": {"brightness_range": [250, 60]}},
        ["body", "options", "brightness_range"],
    ),
    (
        {"frames": [{"patch": patch()}], "options": {"brightness_range": [0, 60]}},
        ["body", "options", "brightness_range"],
    ),
    ({"frames": [{"patch": patch()}], "options": {"brightness_range": [60]}}, ["body", "options", "brightness_range"]),
    ({"frames": [{"patch": patch()}], "options": {"saturation": 1e5}}, ["body", "options", "saturation"]),
    ({"frames": [{"patch": patch(), "frame_index": -1}]}, ["body", "frames", 0, "frame_index"]),
    (
        {"frames": [{"patch": patch(), "frame_index": 3}, {"patch": patch()}]},
        ["body", "frames", 1, "frame_index"],
    ),
    (
        {"frames": [{"patch": patch(), "frame_index": 3}, {"patch": patch(), "frame_index": 3}]},
        ["body", "frames", 1, "frame_index"],
    ),
    (
        {"frames": [{"patch": patch(), "frame_index": 5}, {"patch": patch(), "frame_index": 4}]},
        ["body", "frames", 1, "frame_index"],
    ),
    ({"frames": "nope"}, ["body", "frames"]),
    ([1, 2], ["body"]),
]


@pytest.mark.parametrize("body,loc", BAD_BODIES)
def test_bad_bodies_get_422_naming_the_field(client, body, loc):
    r = client.post("/unmix", json=body)
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["detail"]]
    assert any(got[: len(loc)] == loc for got in locs), locs
    assert all(e["msg"] for e in r.json()["detail"])


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_get_422(client, token):
    body = json.dumps({"frames": [{"patch": patch()}]}).replace("0.0", token, 1)
    r = client.post("/unmix", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "frames", 0, "patch", 0, 0]
    assert "finite" in r.json()["detail"][0]["msg"]


def test_broken_json_gets_422_and_wrong_method_405(client):
    r = client.post("/unmix", content=b'{"frames": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    assert client.get("/unmix").status_code == 405


def test_oversize_bodies_get_413(client, server):
    limit = server.settings.max_request_bytes
    big = b'{"frames": [' + b" " * (limit + 10) + b"]}"
    r = client.post("/unmix", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(limit) in r.json()["detail"]

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"frames": ['
        for _ in range(limit // 1000 + 2):
            yield b" " * 1000
        yield b"]}"

    r = client.post("/unmix", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/healthz").status_code == 200  # the server is fine


def test_full_queue_gives_503_and_the_service_recovers(start_server):
    live = start_server(max_queue_windows=8)
    with httpx.Client(base_url=live.base_url) as c:
        r = c.post("/unmix", json=body_of(simulate_track(9)))
        assert r.status_code == 503 and "queue is full" in r.json()["detail"]
        assert r.headers["retry-after"] == "1"
        assert c.post("/unmix", json=body_of(simulate_track(5))).status_code == 200


def test_bearer_token_auth(start_server):
    live = start_server(api_token="s3cret")
    body = body_of(simulate_track(2))
    with httpx.Client(base_url=live.base_url) as c:
        r = c.post("/unmix", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/unmix", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/unmix", json=body, params={"token": "wrong"}).status_code == 401
        assert c.post("/unmix", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/unmix", json=body, params={"token": "s3cret"}).status_code == 200
        for path in (
            "/healthz",
            "/readyz",
            "/v2/health/live",
            "/v2/health/ready",
            "/metrics",
            "/v2/models/derefnet",
            "/docs",
            "/openapi.json",
        ):
            assert c.get(path).status_code == 200, path


def test_undecodable_body_gets_422(client):
    r = client.post("/unmix", content=b"\xff\xfe{", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]


def test_integer_pixels_are_numbers_too(client):
    frames = simulate_track(3, seed=5)
    as_float = client.post("/unmix", json=body_of(frames)).json()["results"]
    as_int = client.post("/unmix", json={"frames": [{"patch": f.astype(int).tolist()} for f in frames]}).json()[
        "results"
    ]
    assert as_int == as_float  # 8-bit frames sent as JSON integers
    assert isinstance(json.dumps(as_int), str)
