"""``csist replay`` (csist/replay.py): the detector stand-in.

Two kinds of server: a small protocol-faithful fake (answers frame t when t+2 arrives, flushes
on end) whose answers are the truth and which can drop the connection, repeat, skip or refuse
answers on purpose; and the real service (stand-in model) on loopback.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.asyncio.server import serve

from csist import replay
from csist.replay import RESEND, Replay, ReplayConfig, TrackState, make_track
from service.runtime.config import Settings
from service.science.windows import MAX_RECENTRE_PX
from tests.service.conftest import LiveServer, standin_weights, write_standin

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ fake service


class FakeService:
    """The WebSocket protocol with oracle answers (the truth) and optional faults."""

    def __init__(
        self,
        seed: int,
        track_frames: int,
        drop_after: int | None = None,
        duplicate: bool = False,
        skip: frozenset = frozenset(),
        error_for: frozenset = frozenset(),
    ) -> None:
        self.seed, self.track_frames = seed, track_frames
        self.drop_after, self.duplicate = drop_after, duplicate
        self.skip, self.error_for = skip, error_for
        self.received: list[list[tuple[str, int]]] = []  # per connection, in order
        self.answered: list[set[tuple[str, int]]] = []  # per connection
        self._tracks: dict[str, object] = {}

    def truth(self, track_id: str, idx: int) -> list[dict]:
        if track_id not in self._tracks:
            number = int(track_id.split("-")[1])
            self._tracks[track_id] = make_track(number, self.seed, self.track_frames)
        track = self._tracks[track_id]
        ox, oy = track.origins[idx]
        return [
            {"x": x, "y": y, "sensor_x": x + ox, "sensor_y": y + oy, "brightness": b, "score": b}
            for x, y, b in track.truth[idx]
        ]

    async def _answer(self, ws, track_id: str, idx: int, answered: set) -> None:
        key = (track_id, idx)
        if key in self.skip:
            return
        if key in self.error_for:
            await ws.send(
                json.dumps(
                    {
                        "type": "error",
                        "track_id": track_id,
                        "frame_index": idx,
                        "code": "inference_error",
                        "message": "boom",
                    }
                )
            )
            return
        msg = json.dumps(
            {
                "type": "result",
                "track_id": track_id,
                "frame_index": idx,
                "timestamp": None,
                "targets": self.truth(track_id, idx),
            }
        )
        await ws.send(msg)
        if self.duplicate:
            await ws.send(msg)
        answered.add(key)

    async def handler(self, ws) -> None:
        received, answered = [], set()
        self.received.append(received)
        self.answered.append(answered)
        first_connection = len(self.received) == 1
        pending: dict[str, list[int]] = {}
        counts: dict[str, int] = {}
        async for text in ws:
            msg = json.loads(text)
            track_id = msg["track_id"]
            if msg["type"] == "frame":
                idx = msg["frame_index"]
                received.append((track_id, idx))
                if first_connection and self.drop_after is not None and len(received) > self.drop_after:
                    ws.transport.abort()  # a crash: no close frame, answers in flight lost
                    return
                window = pending.setdefault(track_id, [])
                window.append(idx)
                counts[track_id] = counts.get(track_id, 0) + 1
                if len(window) == 3:  # frame t's window is complete when t+2 arrives
                    await self._answer(ws, track_id, window.pop(0), answered)
            elif track_id not in pending:
                await ws.send(
                    json.dumps(
                        {
                            "type": "error",
                            "track_id": track_id,
                            "frame_index": None,
                            "code": "unknown_track",
                            "message": "no such track",
                        }
                    )
                )
            else:
                for idx in pending.pop(track_id):
                    await self._answer(ws, track_id, idx, answered)
                await ws.send(json.dumps({"type": "ended", "track_id": track_id, "frames": counts.pop(track_id)}))


def run_fake(fake: FakeService, **overrides) -> tuple[dict, list[dict], Replay]:
    """Stream to ``fake`` with a fast config; returns (summary, delivered answers, client)."""
    delivered: list[dict] = []

    async def scenario():
        async with serve(fake.handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            values = dict(
                url=f"ws://127.0.0.1:{port}/ws/unmix",
                tracks=3,
                fps=100.0,
                seconds=0,
                max_frames=60,
                track_frames=fake.track_frames,
                seed=fake.seed,
                drain_timeout=5.0,
                reconnect_timeout=5.0,
                quiet=True,
            )
            values.update(overrides)
            client = Replay(ReplayConfig(**values), on_answer=delivered.append)
            return await client.run(), client

    summary, client = asyncio.run(scenario())
    return summary, delivered, client


def keys_of(delivered: list[dict]) -> list[tuple[str, int]]:
    return [(m["track_id"], m["frame_index"]) for m in delivered]


def expected_keys(summary: dict) -> set[tuple[str, int]]:
    return {(t, i) for t, n in summary["frames_per_track"].items() for i in range(n)}


def test_oracle_answers_score_perfectly():
    fake = FakeService(seed=3, track_frames=8)
    summary, delivered, _ = run_fake(fake)
    assert summary["ok"] and summary["frames"] == summary["answered"] == 60
    assert summary["missing"] == summary["errors"] == summary["duplicates_dropped"] == 0
    assert summary["reconnects"] == 0 and summary["resent_frames"] == 0
    keys = keys_of(delivered)
    assert len(keys) == len(set(keys)) == 60 and set(keys) == expected_keys(summary)
    # 60 frames over 3 slots of 8-frame tracks: tracks 0..8, ended ones replaced
    assert len(summary["frames_per_track"]) == 9
    assert summary["cso_map"]["mAP"] == pytest.approx(100.0)
    assert all(v == pytest.approx(100.0) for v in summary["cso_map"].values())
    assert summary["count_accuracy"] == 1.0
    # every frame reached the server once, in order per track, with its own index
    (received,) = fake.received
    for track_id, n in summary["frames_per_track"].items():
        assert [i for t, i in received if t == track_id] == list(range(n))


def test_reconnect_resends_and_delivers_every_frame_once():
    fake = FakeService(seed=5, track_frames=12, drop_after=25)
    summary, delivered, client = run_fake(fake, max_frames=72)
    assert summary["ok"], summary
    assert summary["reconnects"] == 1 and len(fake.received) == 2
    keys = keys_of(delivered)
    assert len(keys) == len(set(keys)) and set(keys) == expected_keys(summary)
    assert summary["answered"] == summary["frames"] == 72
    assert summary["resent_frames"] >= RESEND and summary["duplicates_dropped"] >= 1
    assert summary["cso_map"]["mAP"] == pytest.approx(100.0)
    first, second = fake.received
    answered_first = fake.answered[0]
    for track_id in {t for t, _ in first}:
        on_first = [i for t, i in first if t == track_id]
        on_second = [i for t, i in second if t == track_id]
        n = summary["frames_per_track"][track_id]
        unanswered = [i for i in range(n) if (track_id, i) not in answered_first]
        if not unanswered:
            assert not on_second  # finished before the drop: nothing to resend
            continue
        # the track starts afresh: a contiguous run up to its end, beginning early enough to
        # give the oldest unanswered frame its 2 frames of context and to resend >= 4 frames
        assert on_second == list(range(on_second[0], n))
        assert on_second[0] <= max(0, min(unanswered[0] - 2, max(on_first) + 1 - RESEND))
    # the answers of resent frames the user already had were dropped, not delivered
    assert summary["duplicates_dropped"] == len(fake.answered[1] & answered_first)


def test_repeated_answers_are_dropped():
    fake = FakeService(seed=1, track_frames=10, duplicate=True)
    summary, delivered, _ = run_fake(fake, max_frames=30)
    assert summary["ok"] and len(delivered) == 30
    assert summary["duplicates_dropped"] == 30


def test_a_frame_without_answer_fails_the_run(tmp_path):
    fake = FakeService(seed=2, track_frames=10, skip=frozenset({("track-00001", 4)}))
    answers = tmp_path / "answers.jsonl"
    summary, delivered, _ = run_fake(fake, max_frames=30, answers_out=answers)
    assert not summary["ok"]
    assert summary["missing"] == 1 and summary["missing_frames"] == [["track-00001", 4]]
    assert summary["answered"] == 29 and len(delivered) == 29
    assert len(answers.read_text().splitlines()) == 29


def test_an_error_answer_fails_the_run(tmp_path):
    fake = FakeService(seed=2, track_frames=10, error_for=frozenset({("track-00002", 0)}))
    answers = tmp_path / "answers.jsonl"
    summary, _, _ = run_fake(fake, max_frames=30, answers_out=answers)
    assert not summary["ok"] and summary["errors"] == 1 and summary["missing"] == 0
    assert summary["error_frames"] == [["track-00002", 0]]
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    (error,) = [line for line in lines if "error" in line]
    assert error["error"]["code"] == "inference_error" and error["frame_index"] == 0


def test_resend_start():
    def state(produced: int, answered: list[int]) -> TrackState:
        s = TrackState(make_track(0, frames=20), produced=produced)
        s.results = {i: [] for i in answered}
        return s

    assert state(10, list(range(8))).resend_start() == 6  # the last 4
    assert state(10, list(range(10))).resend_start() == 6
    assert state(10, list(range(4))).resend_start() == 2  # 2 before the oldest unanswered
    assert state(10, []).resend_start() == 0
    assert state(3, [0]).resend_start() == 0
    assert state(10, [0, 1, 2, 3, 4, 5, 7]).resend_start() == 4  # a hole at 6


def test_make_track_is_deterministic_and_noisy_on_request():
    a, b = make_track(4, seed=9), make_track(4, seed=9)
    assert a.track_id == "track-00004" and np.array_equal(a.frames, b.frames)
    assert a.frames.dtype == np.uint8 and a.frames.shape == (20, 11, 11)
    assert a.truth.shape[0] == 20 and a.truth.shape[2] == 3
    assert not np.array_equal(make_track(5, seed=9).frames, a.frames)
    noisy = make_track(4, seed=9, noise=5.0)
    assert np.array_equal(noisy.truth, a.truth) and not np.array_equal(noisy.frames, a.frames)


def test_a_recentred_track_shows_the_same_scene_through_a_moving_patch():
    still, moving = make_track(6, seed=2), make_track(6, seed=2, recentre=True)
    steps = np.diff(moving.origins, axis=0)
    assert np.array_equal(steps, np.rint(steps)) and np.abs(steps).max() <= MAX_RECENTRE_PX and np.abs(steps).max() > 0
    # the same targets in sensor coordinates (noise-free: the same draws)
    np.testing.assert_allclose(
        moving.truth[..., :2] + moving.origins[:, None, :], still.truth[..., :2] + still.origins[:, None, :], atol=1e-9
    )
    np.testing.assert_array_equal(moving.truth[..., 2], still.truth[..., 2])
    # and the same pixels where the moving patch overlaps the still one
    for t in range(20):
        dx, dy = (moving.origins[t] - still.origins[t]).astype(int)
        a = moving.frames[t][max(0, -dy) : 11 - max(0, dy), max(0, -dx) : 11 - max(0, dx)]
        b = still.frames[t][max(0, dy) : 11 - max(0, -dy), max(0, dx) : 11 - max(0, -dx)]
        np.testing.assert_array_equal(a, b)
    assert all(0 <= x <= 10 and 0 <= y <= 10 for x, y, _ in moving.truth.reshape(-1, 3))


def test_unreachable_service_fails_fast(tmp_path):
    out = tmp_path / "summary.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        code = replay.main(
            [
                "--url",
                f"ws://127.0.0.1:{port}/ws/unmix",
                "--reconnect-timeout",
                "0.3",
                "--seconds",
                "2",
                "--quiet",
                "--json-out",
                str(out),
            ]
        )
    assert code == 1
    summary = json.loads(out.read_text())
    assert "cannot connect" in summary["fatal"] and not summary["ok"]


@pytest.mark.parametrize("argv", [["--fps", "0"], ["--tracks", "0"], ["--url", "http://x/ws"], ["--seconds", "-1"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        replay.main(argv)
    assert exc.value.code == 2


def test_imports_no_torch():
    code = (
        "import sys, csist.replay; "
        "heavy = {'torch', 'torchvision', 'onnx', 'matplotlib', 'tqdm'}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ the real service


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_standin(tmp_path_factory.mktemp("model"), standin_weights())


def live(model: Path, **overrides) -> LiveServer:
    values = dict(
        model_path=model, max_batch_wait_ms=1.0, drain_s=0.0, threads=1, deadline_ms=0.0
    )  # delivery, not timing
    values.update(overrides)
    return LiveServer(Settings(**values)).start()


@pytest.fixture(scope="module")
def service(model):
    server = live(model)
    yield server
    server.stop()


@pytest.mark.parametrize("recentre", [False, True], ids=["still", "recentred"])
def test_streams_to_the_service_and_matches_rest(service, tmp_path, capsys, recentre):
    summary_path, answers_path = tmp_path / "s.json", tmp_path / "a.jsonl"
    code = replay.main(
        ["--recentre"] * recentre
        + [
            "--url",
            service.ws_url,
            "--tracks",
            "2",
            "--fps",
            "30",
            "--seconds",
            "1.3",
            "--track-frames",
            "12",
            "--seed",
            "4",
            "--refine",
            "quadratic",
            "--json-out",
            str(summary_path),
            "--answers-out",
            str(answers_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "windows/s" in out and "CSO-mAP" in out and "replay summary:" in out
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] and summary["frames"] == summary["answered"] >= 40
    assert summary["latency_ms"]["p50"] > 0 and summary["windows_per_s"] > 0
    assert 0.0 <= summary["cso_map"]["mAP"] <= 100.0 and 0.0 <= summary["count_accuracy"] <= 1.0
    answers = {
        (a["track_id"], a["frame_index"]): a["targets"] for a in map(json.loads, answers_path.read_text().splitlines())
    }
    assert set(answers) == expected_keys(summary)
    # a whole track through REST (same windows, same padding) gives the same answers
    track = make_track(0, seed=4, frames=12, recentre=recentre)
    assert np.ptp(track.origins, axis=0).any() == recentre
    n = summary["frames_per_track"][track.track_id]
    assert n == 12
    body = {
        "options": {"refine": "quadratic"},
        "frames": [
            {
                "patch": f.tolist(),
                "frame_index": i,
                "origin": {"x": float(track.origins[i, 0]), "y": float(track.origins[i, 1])},
            }
            for i, f in enumerate(track.frames)
        ],
    }
    rest = httpx.post(f"{service.base_url}/unmix", json=body, timeout=30).json()["results"]
    assert len(rest) == 12

    def rows(targets):
        return np.array([[t[k] for k in ("x", "y", "sensor_x", "sensor_y", "brightness")] for t in targets])

    for i, result in enumerate(rest):
        ws_rows, rest_rows = rows(answers[(track.track_id, i)]), rows(result["targets"])
        assert ws_rows.shape == rest_rows.shape and ws_rows.size > 0, i
        np.testing.assert_allclose(ws_rows, rest_rows, rtol=1e-5, atol=1e-4, err_msg=str(i))


def test_token_is_sent_and_a_refusal_is_fatal(model, tmp_path):
    server = live(model, api_token="s3cret")
    try:
        out = tmp_path / "s.json"
        args = [
            "--url",
            server.ws_url,
            "--max-frames",
            "20",
            "--fps",
            "50",
            "--quiet",
            "--json-out",
            str(out),
        ]
        assert replay.main(args) == 1
        assert "HTTP 401" in json.loads(out.read_text())["fatal"]
        assert replay.main(args + ["--token", "s3cret"]) == 0
        assert json.loads(out.read_text())["answered"] == 20
    finally:
        server.stop()


def test_idle_expired_tracks_are_primed_again(model, tmp_path):
    server = live(model, track_ttl_s=0.1)
    try:
        out = tmp_path / "s.json"
        code = replay.main(
            [
                "--url",
                server.ws_url,
                "--tracks",
                "1",
                "--fps",
                "4",
                "--max-frames",
                "6",
                "--quiet",
                "--json-out",
                str(out),
            ]
        )
        summary = json.loads(out.read_text())
        assert code == 0, summary
        assert summary["answered"] == 6 and summary["duplicates_dropped"] >= 1
        assert server.runtime.metrics.track_evictions.labels("idle")._value.get() >= 4
    finally:
        server.stop()
