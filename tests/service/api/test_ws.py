"""WebSocket /ws/unmix through a real uvicorn server, with the ``websockets`` client."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.service.conftest import origin_runs, recentred_track, simulate_track


def frame_msg(track_id, index, patch, **extra) -> str:
    return json.dumps(
        {
            "type": "frame",
            "track_id": track_id,
            "frame_index": index,
            "patch": patch.tolist(),
            **extra,
        }
    )


def end_msg(track_id) -> str:
    return json.dumps({"type": "end", "track_id": track_id})


async def recv(ws, timeout: float = 5.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_n(ws, n: int, timeout: float = 5.0) -> list[dict]:
    return [await recv(ws, timeout) for _ in range(n)]


async def nothing_within(ws, seconds: float) -> bool:
    try:
        await asyncio.wait_for(ws.recv(), seconds)
    except TimeoutError:
        return True
    return False


def rest_results(base_url, frames, origin=None, options=None) -> list[list[dict]]:
    body = {"frames": [{"patch": f.tolist(), **({"origin": origin} if origin else {})} for f in frames]}
    if options:
        body["options"] = options
    r = httpx.post(f"{base_url}/unmix", json=body)
    assert r.status_code == 200, r.text
    return [res["targets"] for res in r.json()["results"]]


def test_result_comes_when_frame_t_plus_2_arrives(server):
    frames = simulate_track(4, seed=5)

    async def main():
        async with connect(server.ws_url) as ws:
            await ws.send(frame_msg("a", 0, frames[0]))
            await ws.send(frame_msg("a", 1, frames[1]))
            assert await nothing_within(ws, 0.3)
            await ws.send(frame_msg("a", 2, frames[2], timestamp=12.5))
            first = await recv(ws)
            await ws.send(frame_msg("a", 3, frames[3]))
            second = await recv(ws)
            assert await nothing_within(ws, 0.2)
            await ws.send(end_msg("a"))
            rest = await recv_n(ws, 3)
            return first, second, rest

    first, second, rest = asyncio.run(main())
    assert (first["type"], first["track_id"], first["frame_index"]) == ("result", "a", 0)
    assert second["frame_index"] == 1
    assert [m["frame_index"] for m in rest[:2]] == [2, 3]
    assert rest[1]["timestamp"] is None and rest[0]["timestamp"] == 12.5
    assert rest[2] == {"type": "ended", "track_id": "a", "frames": 4}
    want = rest_results(server.base_url, frames)
    got = [first["targets"], second["targets"], rest[0]["targets"], rest[1]["targets"]]
    assert got == want  # same windows and peaks as REST, to the last bit


def test_interleaved_tracks_on_one_connection_and_across_connections(server):
    tracks = {f"t{k}": simulate_track(6 + k, seed=10 + k) for k in range(3)}
    origin = {"x": 1000.0, "y": 2000.0}

    async def stream(track_ids):
        got: dict[str, list[dict]] = {t: [] for t in track_ids}
        ended = set()
        async with connect(server.ws_url) as ws:
            longest = max(len(tracks[t]) for t in track_ids)
            for i in range(longest):  # interleave: frame i of every track, then i + 1, ...
                for t in track_ids:
                    if i < len(tracks[t]):
                        await ws.send(frame_msg(t, 100 + i, tracks[t][i], origin=origin))
            for t in track_ids:
                await ws.send(end_msg(t))
            while len(ended) < len(track_ids):
                m = await recv(ws)
                if m["type"] == "ended":
                    ended.add(m["track_id"])
                else:
                    assert m["type"] == "result", m
                    got[m["track_id"]].append(m)
        return got

    async def main():
        # two connections at once, one with the same track ids: state belongs to the connection
        return await asyncio.gather(stream(["t0", "t1", "t2"]), stream(["t2", "t0"]))

    one, two = asyncio.run(main())
    for got in (one, two):
        for t, msgs in got.items():
            n = len(tracks[t])
            assert [m["frame_index"] for m in msgs] == [100 + i for i in range(n)]  # once, in order
            want = rest_results(server.base_url, tracks[t], origin)
            assert [m["targets"] for m in msgs] == want
            for m in msgs:
                for target in m["targets"]:
                    assert target["sensor_x"] == pytest.approx(target["x"] + 1000.0)


def test_bad_messages_get_errors_and_the_connection_goes_on(server):
    frames = simulate_track(3, seed=6)
    bad_patch = json.dumps({"type": "frame", "track_id": "b", "frame_index": 7, "patch": [[0.0] * 11] * 10})

    async def main():
        async with connect(server.ws_url) as ws:
            out = {}
            await ws.send("{not json")
            out["json"] = await recv(ws)
            await ws.send(b"\x00\x01")
            out["binary"] = await recv(ws)
            await ws.send(bad_patch)
            out["shape"] = await recv(ws)
            await ws.send(frame_msg("b", 8, frames[0]).replace("0.0", "NaN", 1))
            out["nan"] = await recv(ws)
            await ws.send(json.dumps({"type": "hello", "track_id": "b"}))
            out["type"] = await recv(ws)
            await ws.send(json.dumps({"type": "frame", "track_id": "b", "patch": frames[0].tolist()}))
            out["missing"] = await recv(ws)
            await ws.send(end_msg("nobody"))
            out["unknown"] = await recv(ws)
            await ws.send(json.dumps([1, 2]))
            out["array"] = await recv(ws)
            # the same connection still serves a good track, and track "b" was never opened
            for i in range(3):
                await ws.send(frame_msg("good", i, frames[i]))
            await ws.send(end_msg("good"))
            out["good"] = await recv_n(ws, 4)
            await ws.send(end_msg("b"))
            out["b"] = await recv(ws)
            return out

    out = asyncio.run(main())
    assert all(m["type"] == "error" for k, m in out.items() if k != "good")
    assert out["json"]["code"] == "bad_json" and out["json"]["track_id"] is None
    assert out["binary"]["code"] == "bad_message"
    assert out["shape"]["code"] == "invalid_message"
    assert (out["shape"]["track_id"], out["shape"]["frame_index"]) == ("b", 7)
    assert out["shape"]["message"].startswith("patch:")
    assert out["nan"]["code"] == "invalid_message" and "finite" in out["nan"]["message"]
    assert (out["nan"]["track_id"], out["nan"]["frame_index"]) == ("b", 8)
    assert out["nan"]["message"].startswith("patch[0][0]")
    assert out["type"]["code"] == "invalid_message" and "'frame', 'end'" in out["type"]["message"]
    assert "frame_index" in out["missing"]["message"]
    assert out["unknown"]["code"] == "unknown_track" and out["unknown"]["track_id"] == "nobody"
    assert out["array"]["code"] == "invalid_message"
    assert [m["type"] for m in out["good"]] == ["result"] * 3 + ["ended"]
    assert out["b"]["code"] == "unknown_track"


def test_frame_index_rules_repeat_back_and_gap(server):
    frames = simulate_track(8, seed=7)

    async def main():
        async with connect(server.ws_url) as ws:
            msgs = []
            for i in (0, 1, 2, 3):
                await ws.send(frame_msg("g", i, frames[i]))
            msgs += await recv_n(ws, 2)  # results 0, 1
            await ws.send(frame_msg("g", 3, frames[3]))  # repeat
            msgs.append(await recv(ws))
            await ws.send(frame_msg("g", 1, frames[3]))  # back
            msgs.append(await recv(ws))
            for k, i in enumerate((10, 11, 12, 13)):  # gap: 2, 3 flushed first
                await ws.send(frame_msg("g", i, frames[4 + k]))
            await ws.send(end_msg("g"))
            msgs += await recv_n(ws, 7)
            return msgs

    msgs = asyncio.run(main())
    assert [m["frame_index"] for m in msgs[:2]] == [0, 1]
    assert msgs[2]["code"] == msgs[3]["code"] == "frame_index_not_increasing"
    assert (msgs[2]["frame_index"], msgs[3]["frame_index"]) == (3, 1)
    assert "last frame 3" in msgs[2]["message"]
    results = [m for m in msgs[4:] if m["type"] == "result"]
    assert [m["frame_index"] for m in results] == [2, 3, 10, 11, 12, 13]
    assert msgs[-1]["type"] == "ended" and msgs[-1]["frames"] == 8
    want = rest_results(server.base_url, frames[:4]) + rest_results(server.base_url, frames[4:])
    got = [m["targets"] for m in msgs[:2]] + [m["targets"] for m in results]
    assert got == want  # windows never span the gap


def test_every_frame_gets_exactly_one_answer(server):
    frames = simulate_track(5, seed=8)
    rng = np.random.default_rng(0)
    expected: Counter = Counter()  # (track, frame_index, "result" | "error") -> count

    async def main():
        answers: Counter = Counter()
        async with connect(server.ws_url) as ws:
            next_index = {t: 0 for t in "xyz"}
            for _ in range(60):
                t = "xyz"[rng.integers(3)]
                i = next_index[t]
                if rng.random() < 0.2 and i > 0:
                    i -= 1  # a repeat: must be an error
                    expected[(t, i, "error")] += 1
                else:
                    i += int(rng.integers(0, 2))  # sometimes a gap
                    expected[(t, i, "result")] += 1
                    next_index[t] = i + 1
                await ws.send(frame_msg(t, i, frames[i % 5]))
            for t in "xyz":
                await ws.send(end_msg(t))
            ended = 0
            while ended < 3:
                m = await recv(ws)
                if m["type"] == "ended":
                    ended += 1
                else:
                    answers[(m["track_id"], m["frame_index"], m["type"])] += 1
        return answers

    answers = asyncio.run(main())
    assert sum(expected.values()) == 60
    assert answers == expected
    assert any(k[2] == "error" for k in expected)  # the sequence did include repeats


def test_limits_tracks_and_message_size(start_server):
    live = start_server(max_tracks_per_connection=2, max_message_bytes=1024)
    small = np.zeros((11, 11))
    big = np.full((11, 11), 1.0 / 3.0)  # ~20 characters a value: over 1 KiB

    async def main():
        async with connect(live.ws_url) as ws:
            out = {}
            await ws.send(frame_msg("a", 0, small))
            await ws.send(frame_msg("b", 0, small))
            await ws.send(frame_msg("c", 0, small))
            out["third"] = await recv(ws)
            await ws.send(frame_msg("a", 1, big))
            out["big"] = await recv(ws)
            await ws.send(end_msg("a"))
            out["end_a"] = await recv_n(ws, 2)
            await ws.send(frame_msg("c", 0, small))  # room again
            await ws.send(end_msg("c"))
            out["c"] = await recv_n(ws, 2)
            return out

    out = asyncio.run(main())
    assert out["third"]["code"] == "too_many_tracks" and out["third"]["track_id"] == "c"
    assert out["big"]["code"] == "message_too_large"
    assert (out["big"]["track_id"], out["big"]["frame_index"]) == ("a", 1)
    assert "1024" in out["big"]["message"]
    assert [m["type"] for m in out["end_a"]] == ["result", "ended"]  # frame 1 was never taken
    assert [m["type"] for m in out["c"]] == ["result", "ended"]


def test_idle_tracks_expire_after_flushing(start_server):
    live = start_server(track_ttl_s=0.5)
    frames = simulate_track(3, seed=9)

    async def main():
        async with connect(live.ws_url) as ws:
            for i in range(3):
                await ws.send(frame_msg("idle", i, frames[i]))
            msgs = await recv_n(ws, 4, timeout=3.0)
            await ws.send(frame_msg("idle", 7, frames[0]))  # after expiry: a new track
            await ws.send(end_msg("idle"))
            msgs += await recv_n(ws, 2)
            return msgs

    msgs = asyncio.run(main())
    assert [(m["type"], m.get("frame_index")) for m in msgs[:3]] == [
        ("result", 0),
        ("result", 1),
        ("result", 2),
    ]
    assert msgs[3] == {"type": "expired", "track_id": "idle", "reason": "idle"}
    assert msgs[4]["frame_index"] == 7 and msgs[5]["frames"] == 1
    reg = live.runtime.metrics.registry
    assert reg.get_sample_value("csist_track_evictions_total", {"reason": "idle"}) == 1
    assert reg.get_sample_value("csist_active_tracks") == 0


def test_full_queue_gives_error_messages_per_frame(start_server):
    live = start_server(max_queue_windows=1)
    frames = simulate_track(3, seed=1)

    async def main():
        async with connect(live.ws_url) as ws:
            for i in range(3):
                await ws.send(frame_msg("q", i, frames[i]))
            first = await recv(ws)
            await ws.send(end_msg("q"))  # flushes 2 windows at once: more than the queue holds
            return first, await recv_n(ws, 3)

    first, rest = asyncio.run(main())
    assert first["type"] == "result"
    assert [(m["type"], m.get("code"), m.get("frame_index")) for m in rest] == [
        ("error", "overloaded", 1),
        ("error", "overloaded", 2),
        ("ended", None, None),
    ]


def test_websocket_auth(start_server):
    live = start_server(api_token="s3cret")
    frame = simulate_track(1)[0]

    async def try_connect(**kwargs):
        async with connect(live.ws_url + kwargs.pop("suffix", ""), **kwargs) as ws:
            await ws.send(frame_msg("a", 0, frame))
            await ws.send(end_msg("a"))
            return [m["type"] for m in await recv_n(ws, 2)]

    with pytest.raises(InvalidStatus) as info:
        asyncio.run(try_connect())
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus):
        asyncio.run(try_connect(additional_headers={"Authorization": "Bearer nope"}))
    assert asyncio.run(try_connect(additional_headers={"Authorization": "Bearer s3cret"})) == [
        "result",
        "ended",
    ]
    assert asyncio.run(try_connect(suffix="?token=s3cret")) == ["result", "ended"]


def test_a_patch_moved_by_a_fraction_or_a_jump_starts_a_new_segment(server):
    """Windows never mix two patch positions they cannot register: a move of the origin by a
    fraction of a pixel, or by more than a re-centring step, ends the segment."""
    frames = simulate_track(8, seed=9)
    a, b = {"x": 100.0, "y": 50.0}, {"x": 100.5, "y": 50.0}

    async def main():
        async with connect(server.ws_url) as ws:
            for i in range(8):
                await ws.send(frame_msg("r", i, frames[i], origin=a if i < 4 else b))
            await ws.send(end_msg("r"))
            return await recv_n(ws, 9)

    msgs = asyncio.run(main())
    results = [m for m in msgs if m["type"] == "result"]
    assert [m["frame_index"] for m in results] == list(range(8))
    want = rest_results(server.base_url, frames[:4], a) + rest_results(server.base_url, frames[4:], b)
    assert [m["targets"] for m in results] == want
    # REST splits the same way when one request carries both positions, and at a jump of 3 px
    for far in (b, {"x": 103.0, "y": 50.0}):
        body = {"frames": [{"patch": f.tolist(), "origin": a if i < 4 else far} for i, f in enumerate(frames)]}
        r = httpx.post(f"{server.base_url}/unmix", json=body)
        split = rest_results(server.base_url, frames[:4], a) + rest_results(server.base_url, frames[4:], far)
        assert [res["targets"] for res in r.json()["results"]] == split


def test_a_recentred_patch_is_followed_on_websocket_as_on_rest(server):
    """A tracker that re-centres its patch by whole pixels keeps its windows (every frame shifted
    into its window's middle patch): the stream answers as REST does, and not as separate
    segments would. (How close the answers come to a patch that never moved: on the bundled
    model, tests/service/test_bundled_model.py.)"""
    (moving, origins, _), _ = recentred_track(1)
    steps = {(b["x"] - a["x"], b["y"] - a["y"]) for a, b in zip(origins, origins[1:])}
    assert any(s != (0.0, 0.0) for s in steps) and max(max(abs(v) for v in s) for s in steps) <= 2
    fit = {"refine": "fit", "threshold": 30.0}

    async def main():
        async with connect(server.ws_url) as ws:
            for i in range(len(moving)):
                await ws.send(frame_msg("m", i, moving[i], origin=origins[i], options=fit))
            await ws.send(end_msg("m"))
            return await recv_n(ws, len(moving) + 1)

    streamed = [m for m in asyncio.run(main()) if m["type"] == "result"]
    body = {
        "frames": [{"patch": f.tolist(), "origin": o} for f, o in zip(moving, origins, strict=True)],
        "options": fit,
    }
    rest = httpx.post(f"{server.base_url}/unmix", json=body).json()["results"]
    assert [m["frame_index"] for m in streamed] == list(range(len(moving)))
    assert [m["targets"] for m in streamed] == [r["targets"] for r in rest]
    split = [
        r for run in origin_runs(origins) for r in rest_results(server.base_url, moving[run], origins[run[0]], fit)
    ]
    assert [r["targets"] for r in rest] != split


def test_fitted_results_carry_the_same_uncertainties_as_rest(server):
    frames = simulate_track(5, seed=6)
    fit = {"refine": "fit"}

    async def main():
        async with connect(server.ws_url) as ws:
            for k, f in enumerate(frames):
                await ws.send(frame_msg("u", k, f, options=fit))
            await ws.send(end_msg("u"))
            return await recv_n(ws, len(frames) + 1)

    got = asyncio.run(main())[:-1]
    r = httpx.post(server.base_url + "/unmix", json={"frames": [{"patch": f.tolist()} for f in frames], "options": fit})
    want = r.json()["results"]
    assert [m["count_confidence"] for m in got] == [w["count_confidence"] for w in want]
    assert [m["targets"] for m in got] == [w["targets"] for w in want]
    assert any(m["count_confidence"] is not None and m["targets"][0]["sigma_x"] > 0 for m in got)
