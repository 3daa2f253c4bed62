"""Real-time behaviour under overload: deadlines (admission by predicted wait, shedding at
dispatch), the fit's degradation, cancellation of a vanished client's work, and an OpenAPI
schema whose auth matches the server's. Batcher tests use fakes; the rest a real server."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from service.api.server import exposure_problem, main
from service.engine.batcher import Batcher, DeadlineExceeded, PeakOptions
from service.engine.plans import FunctionPlan
from service.runtime.config import Settings
from service.runtime.metrics import Metrics
from service.science.postprocess import find_targets
from tests.service.api.test_ws import end_msg, frame_msg, recv
from tests.service.conftest import simulate_track
from tests.service.engine.test_batcher import OPTS, FakeModel, windows_with

FIT = PeakOptions(threshold=70.0, refine="fit")


def run(coro):
    return asyncio.run(coro)


def test_admission_refuses_a_window_the_queue_would_make_late():
    model = FakeModel()

    async def main_():
        b = Batcher(FunctionPlan(model), Metrics(), max_batch=1, max_wait_s=0.0, window_s=0.1)
        b.start()
        model.gate.clear()  # the worker holds the first window; the rest wait
        first = b.submit(windows_with([1]), OPTS)
        await asyncio.sleep(0.05)
        queued = [b.submit(windows_with([v]), OPTS) for v in (2, 3, 4, 5)]  # 4 x 0.1 s ahead
        assert b.predicted_wait_s() == pytest.approx(0.4)
        # 0.4 s ahead + its own 0.1 s do not fit in the 90 % of 0.5 s left for the batcher
        with pytest.raises(DeadlineExceeded, match="deadline of 500 ms"):
            b.submit(windows_with([6]), OPTS, deadline_s=0.5)
        ok = b.submit(windows_with([7]), OPTS, deadline_s=5.0)  # one that can wait
        model.gate.set()
        await asyncio.gather(first, *queued, ok)
        await b.stop()
        return b

    b = run(main_())
    assert b.shed == 1 and sorted(model.calls) == [1] * 6  # window 6 was never computed


def test_a_window_still_queued_at_its_deadline_is_not_computed():
    model = FakeModel()

    async def main_():
        b = Batcher(FunctionPlan(model), Metrics(), max_batch=1, max_wait_s=0.0)
        b.start()
        model.gate.clear()
        first = b.submit(windows_with([1]), OPTS)
        await asyncio.sleep(0.05)
        late = b.submit(windows_with([2]), OPTS, deadline_s=0.05)  # no measured cost yet: admitted
        await asyncio.sleep(0.2)
        model.gate.set()
        await first
        with pytest.raises(DeadlineExceeded, match="within its deadline of 50 ms"):
            await late
        await b.stop()
        return b

    b = run(main_())
    assert model.calls == [1] and b.shed == 1


def test_a_batch_lasts_at_most_a_quarter_of_its_windows_deadline():
    """At 0.05 s per window, windows with a 0.5 s deadline (0.45 s for the batcher) go at most 2 to a
    batch (so that what
    starts in time answers in time); without a deadline the batch takes all that waits."""
    calls = []

    def per_window(windows):
        calls.append(len(windows))
        time.sleep(0.05 * len(windows))
        return FakeModel()(windows)

    async def main_(deadline_s):
        b = Batcher(FunctionPlan(per_window), Metrics(), max_batch=64, max_wait_s=0.0, window_s=0.05)
        b.start()
        first = b.submit(windows_with([0]), OPTS)
        await asyncio.sleep(0.01)
        rest = [b.submit(windows_with([v]), OPTS, deadline_s=deadline_s) for v in range(1, 7)]
        await asyncio.gather(first, *rest)
        await b.stop()

    run(main_(0.5))
    assert calls == [1, 2, 2, 2]
    calls.clear()
    run(main_(None))
    assert calls == [1, 6]


def test_batch_cap_follows_the_deadline():
    model = FakeModel()
    b = Batcher(FunctionPlan(model), Metrics(), max_batch=64, window_s=0.1)
    from service.engine.batcher import _Item

    item = _Item(windows_with([1]), OPTS, None, enqueued=0.0, deadline=0.8)  # as submitted: 0.8 s left
    assert b._batch_cap(item) == 2
    assert b._batch_cap(_Item(windows_with([1]), OPTS, None)) == 64
    b.window_s = 0.0  # nothing measured yet: no cap
    assert b._batch_cap(item) == 64


def test_cancel_drops_an_owners_queued_windows_and_early_work():
    model = FakeModel()
    gone, stays = object(), object()

    async def main_():
        b = Batcher(FunctionPlan(model), Metrics(), max_batch=1, max_wait_s=0.0)
        b.start()
        model.gate.clear()
        running = b.submit(windows_with([1]), OPTS, owner=gone)  # taken by the worker already
        await asyncio.sleep(0.05)
        dropped = [b.submit(windows_with([v]), OPTS, owner=gone) for v in (2, 3)]
        kept = b.submit(windows_with([4]), OPTS, owner=stays)
        assert b.cancel(gone) == 2 and b.queued_windows == 1
        model.gate.set()
        await running
        await kept
        assert all(f.cancelled() for f in dropped)
        await b.stop()
        return b

    b = run(main_())
    assert model.calls == [1, 1] and b.cancelled == 2


def test_fit_is_skipped_when_it_would_answer_after_the_deadline():
    """The windows keep their answer (the network's peaks, refined False) instead of waiting for
    a fit that cannot make the deadline; with time to spare, the fit runs."""
    model = FakeModel()
    frames = np.stack([simulate_track(5, seed=s) for s in range(2)]).astype(np.float32)

    async def main_():
        b = Batcher(FunctionPlan(model), Metrics(), max_batch=8, max_wait_s=0.0)
        b.start()
        b.fit_s = 1.0  # as measured on a slow host: one second of fit per window
        late = await b.submit(frames, FIT, deadline_s=0.5)
        on_time = await b.submit(frames, FIT, deadline_s=30.0)
        no_deadline = await b.submit(frames, FIT)
        await b.stop()
        return b, late, on_time, no_deadline

    b, late, on_time, no_deadline = run(main_())
    assert not late.refined and on_time.refined and no_deadline.refined
    assert b.degraded == 2
    maps = model(frames)
    want = find_targets(maps, frames, threshold=70.0, refine="none")
    for got, w in zip(late.peaks, want, strict=True):
        np.testing.assert_array_equal(got, w)
    assert 0 < b.fit_s < 1.0  # the fits that ran were measured


# ------------------------------------------------------------------------------ real server


def slow_down(live, seconds: float) -> None:
    """Make the served plan take ``seconds`` per call (a slow host), keeping its answers."""
    b = live.runtime.batcher
    for name in ("_run_model", "_encode", "_head"):
        fn = getattr(b, name)
        if fn is not None:
            setattr(b, name, lambda x, fn=fn: (time.sleep(seconds), fn(x))[1])


def test_ws_every_frame_gets_exactly_one_message_when_windows_are_shed(start_server):
    live = start_server(max_batch_size=4)
    slow_down(live, 0.05)
    tracks = {f"t{k}": simulate_track(8, seed=k) for k in range(6)}

    async def main_():
        got = []
        async with connect(live.ws_url + "?deadline_ms=60") as ws:
            for i in range(8):
                for t, frames in tracks.items():
                    await ws.send(frame_msg(t, i, frames[i]))
            for t in tracks:
                await ws.send(end_msg(t))
            ended = 0
            while ended < len(tracks):
                m = await recv(ws, 30)
                ended += m["type"] == "ended"
                got.append(m)
        return got

    got = asyncio.run(main_())
    answers = [(m["track_id"], m["frame_index"]) for m in got if m["type"] in ("result", "error")]
    assert sorted(answers) == sorted((t, i) for t in tracks for i in range(8))  # each exactly once
    codes = {m.get("code") for m in got if m["type"] == "error"}
    assert codes == {"deadline_exceeded"}  # some were shed ...
    assert any(m["type"] == "result" and m["refined"] for m in got)  # ... and others answered
    assert live.runtime.batcher.shed > 0


def test_rest_past_the_deadline_is_503_with_retry_after(start_server):
    live = start_server()
    b = live.runtime.batcher
    frames = simulate_track(5, seed=1)
    body = {"frames": [{"patch": f.tolist()} for f in frames], "options": {"deadline_ms": 200}}
    with httpx.Client(base_url=live.base_url, timeout=30) as c:
        first = c.post("/unmix", json=body)  # nothing queued, a few ms per window: answered
        b.window_s = 10.0  # as if each window took 10 s here: 5 windows cannot make 200 ms
        try:
            r = c.post("/unmix", json=body)
        finally:
            b.window_s = 0.0
    assert first.status_code == 200 and all(x["refined"] for x in first.json()["results"])
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["detail"].startswith("deadline_exceeded")
    bad = httpx.post(f"{live.base_url}/unmix", json={**body, "options": {"deadline_ms": -1}})
    assert bad.status_code == 422 and "deadline_ms" in json.dumps(bad.json())


def test_a_vanished_websocket_leaves_no_work_behind(start_server):
    live = start_server(max_batch_size=2, plan="onnxruntime-single")
    slow_down(live, 0.1)
    b = live.runtime.batcher

    async def main_():
        ws = await connect(live.ws_url + "?deadline_ms=0")
        for i in range(4):
            for k in range(8):
                await ws.send(frame_msg(f"t{k}", i, simulate_track(4, seed=k)[i]))
        await asyncio.sleep(0.3)  # windows queued behind the slow first batch
        ws.transport.abort()  # the client is gone without a close handshake

    asyncio.run(main_())
    for _ in range(100):
        if b.cancelled:
            break
        time.sleep(0.05)
    run_at_cancel = b.windows_run
    time.sleep(0.5)
    assert b.cancelled > 0 and b.queued_windows == 0
    assert b.windows_run - run_at_cancel <= b.workers * b.max_batch  # at most the batches that were running
    assert live.runtime.sessions == set()


def test_a_vanished_rest_client_has_its_windows_dropped(start_server):
    live = start_server(max_batch_size=1, inference_workers=1)
    slow_down(live, 0.3)
    frames = simulate_track(5, seed=2)
    body = {"frames": [{"patch": f.tolist()} for f in frames], "options": {"deadline_ms": 0}}
    first = []
    ahead = threading.Thread(target=lambda: first.append(httpx.post(f"{live.base_url}/unmix", json=body, timeout=30)))
    ahead.start()  # 5 windows in chunks of one, 1.5 s
    time.sleep(0.2)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.base_url}/unmix", json=body, timeout=0.5)  # gives up while queued behind it
    b = live.runtime.batcher
    for _ in range(100):
        if b.cancelled:
            break
        time.sleep(0.05)
    ahead.join(30)
    assert first[0].status_code == 200
    assert b.cancelled == 5 and b.windows_run == 5  # the vanished request's windows never ran


def test_openapi_declares_auth_only_when_a_token_is_set(start_server):
    open_ = start_server()
    closed = start_server(api_token="s3cret")
    a = httpx.get(f"{open_.base_url}/openapi.json").json()
    b = httpx.get(f"{closed.base_url}/openapi.json").json()
    assert "securitySchemes" not in a.get("components", {})
    assert "security" not in a["paths"]["/unmix"]["post"] and "401" not in a["paths"]["/unmix"]["post"]["responses"]
    assert "token" not in json.dumps(a["paths"]["/unmix"]["post"].get("parameters", []))
    assert "HTTPBearer" in b["components"]["securitySchemes"]
    assert b["paths"]["/unmix"]["post"]["security"] and "401" in b["paths"]["/unmix"]["post"]["responses"]


def test_serving_beyond_loopback_without_a_token_warns_or_is_refused(monkeypatch, capsys):
    s = Settings()
    assert exposure_problem("127.0.0.1", s) is None and exposure_problem("::1", s) is None
    assert exposure_problem("localhost", s) is None
    assert "without CSIST_API_TOKEN" in exposure_problem("0.0.0.0", s)
    assert exposure_problem("0.0.0.0", Settings(api_token="x")) is None
    monkeypatch.setenv("CSIST_REQUIRE_TOKEN", "1")
    assert main(["--host", "0.0.0.0", "--port", "0"]) == 2
    assert "CSIST_REQUIRE_TOKEN forbids" in capsys.readouterr().err
