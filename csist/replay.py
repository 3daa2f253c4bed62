"""``csist replay``: a detector stand-in that streams simulated tracks to a running service.

It plays the part of an infrared tracker next to the unmixing service: ``--tracks`` tracks at
a time, each a SeqCSIST-protocol trajectory (``training.simulate``; ``--track-frames`` frames,
optional sensor noise ``--noise``; with ``--recentre`` the patch follows the group as a
tracker's does, its origin moving by whole pixels), sent frame by frame at ``--fps`` frames per second per track
over one WebSocket (``/ws/unmix``, protocol in docs/api.md): ``frame`` messages, then
``end`` when a trajectory is over, after which a new track takes its slot. Because it knows the
truth, it scores what comes back: once a second it prints the answers per second (one answer is
one window), p50/p95 latency (from sending frame t+2, or the ``end``, to frame t's result), the
running CSO-mAP (``training.metric.cso_map``) and count accuracy over all answered frames; at
the end a summary (also as JSON with ``--json-out``).

Delivery is exactly once, as a real detector needs it:

- Every frame's answer is keyed by (track_id, frame_index). The first result is delivered to
  the user (counted, scored, written to ``--answers-out``); any later one is dropped.
- If the connection drops (a replica dies, a proxy restarts), the client reconnects (backoff,
  for up to ``--reconnect-timeout`` seconds) and starts every open track afresh on the new
  connection by resending its last 4 frames (``RESEND``), or more if older frames are still
  unanswered (each resend starts 2 frames before the oldest unanswered frame, so that frame
  has its full left context again), then the frames produced meanwhile and, for a track that
  was ending, the ``end``. The server treats the track as new and pads its first frames by
  replication; their answers are for frames the user already has and are dropped.
- A track the server expired (``idle``) is primed the same way on the same connection.
- An ``error`` answer counts only if no result for that frame ever comes; ``overloaded`` or
  ``shutting_down`` errors are often followed by a result after a reconnect.

The exit status is 0 when every frame sent got exactly one result, 1 when any frame got no
answer or only an error (or the service could not be reached or refused the token), 2 for
bad arguments.

It imports no torch (it runs in the service image): only ``service.*`` and the numpy-only
``training.simulate`` / ``training.metric`` / ``training.data``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from service.science.windows import MAX_RECENTRE_PX
from training.metric import count_accuracy, cso_map
from training.simulate import SimParams, frames_of, render, simulate_trajectory

RESEND = 4  # frames resent per open track on a new connection: 2 of context for each of the
#             2 frames whose answers may have been in flight
CONTEXT = 2  # frames of left context a window needs (window = t-2 .. t+2)
FATAL_STATUS = (401, 403, 404)  # handshake answers that a retry will not change


class FatalConnectionError(RuntimeError):
    """The service cannot be reached within the timeout, or refused us for good."""


@dataclass(frozen=True)
class ReplayConfig:
    """Everything ``csist replay`` can be told (the command-line flags)."""

    url: str = "ws://127.0.0.1:8000/ws/unmix"
    tracks: int = 4
    fps: float = 20.0
    seconds: float = 10.0  # 0 = no time limit
    max_frames: int = 0  # 0 = no frame limit
    track_frames: int = 20
    noise: float = 0.0
    recentre: bool = False
    seed: int = 0
    token: str | None = None
    refine: str | None = None
    threshold: float | None = None
    drain_timeout: float = 10.0
    reconnect_timeout: float = 30.0
    report_every: float = 1.0
    json_out: Path | None = None
    answers_out: Path | None = None
    quiet: bool = False


# --------------------------------------------------------------------------------------------
# simulated tracks


RECENTRE_PAD = 4  # px of scene around the protocol's patch: a patch centred on any group stays inside
TRACKER_SIGMA = 0.3  # px, per axis: the error of a re-centring tracker's estimate of the group's centre


@dataclass
class SimTrack:
    """One simulated trajectory as a tracker would see it, with its truth."""

    track_id: str
    frames: np.ndarray  # (T, size, size) uint8 sensor values
    truth: np.ndarray  # (T, K, 3) rows (x, y, brightness), each frame's patch coordinates
    origins: np.ndarray  # (T, 2) sensor (x, y) of each frame's top-left pixel centre


def make_track(number: int, seed: int = 0, frames: int = 20, noise: float = 0.0, recentre: bool = False) -> SimTrack:
    """Track ``number`` of a replay: deterministic in (seed, number), independent of the rest.

    ``recentre``: the patch follows the group as a tracker's does: each frame's patch is cut from
    the scene around the protocol's patch (RECENTRE_PAD px wider each side), centred on the
    pixel nearest the tracker's estimate of the group's centroid (the truth plus Gaussian error
    of TRACKER_SIGMA px per axis), moving at most MAX_RECENTRE_PX a frame; so its origin moves by
    whole pixels, most often where the centroid lies near a pixel's edge."""
    rng = np.random.default_rng([seed, number])
    params = SimParams(frames=frames, noise=noise)
    frames_float, truth = simulate_trajectory(rng, params)
    pad, size = RECENTRE_PAD if recentre else 0, params.size
    in_scene = truth.copy()
    in_scene[..., :2] += pad
    if recentre:  # the scene around the patch the tracker may cut
        frames_float = frames_of(in_scene, replace(params, size=size + 2 * pad))
    scene = render(frames_float, noise, rng, float_out=False)
    origin = np.array(rng.integers(0, 1000, size=2), dtype=np.float64)
    if not recentre:
        return SimTrack(f"track-{number:05d}", scene, truth, np.tile(origin, (frames, 1)))
    estimate = in_scene[:, :, :2].mean(axis=1) + rng.normal(0.0, TRACKER_SIGMA, size=(frames, 2))
    corners = []  # (x, y) of each patch's top-left pixel in the scene
    for t in range(frames):
        corner = np.clip(np.rint(estimate[t]).astype(int) - (size - 1) // 2, 0, 2 * pad)
        if corners:
            corner = np.clip(corner, corners[-1] - MAX_RECENTRE_PX, corners[-1] + MAX_RECENTRE_PX)
        corners.append(corner)
    corners = np.array(corners)
    patches = np.stack([scene[t, y : y + size, x : x + size] for t, (x, y) in enumerate(corners)])
    in_patch = in_scene.copy()
    in_patch[..., :2] -= corners[:, None, :]
    return SimTrack(f"track-{number:05d}", patches, in_patch, origin + corners - pad)


@dataclass
class TrackState:
    """The client's view of one track: what was produced, sent and answered."""

    sim: SimTrack
    produced: int = 0  # frames 0..produced-1 exist (sent, or waiting for a connection)
    transmitted: int = 0  # highest frame index ever written to a socket, + 1
    ending: bool = False  # the trajectory is over and `end` is owed
    closed: bool = False  # the server confirmed the end (or flushed the track at the end)
    results: dict[int, list] = field(default_factory=dict)  # frame -> targets (delivered)
    errors: dict[int, dict] = field(default_factory=dict)  # frame -> last error message
    sent_at: dict[int, float] = field(default_factory=dict)  # frame -> last send time
    end_at: float | None = None

    @property
    def track_id(self) -> str:
        return self.sim.track_id

    def first_unanswered(self) -> int:
        """Oldest produced frame without a result (``produced`` if all are answered)."""
        for idx in range(self.produced):
            if idx not in self.results:
                return idx
        return self.produced

    def resend_start(self) -> int:
        """First frame to send when the track starts afresh on a (new) connection."""
        return max(0, min(self.produced - RESEND, self.first_unanswered() - CONTEXT))


# --------------------------------------------------------------------------------------------
# statistics


def percentile_ms(values: list[float], q: float) -> float:
    """The q-th percentile in milliseconds (NaN for no values)."""
    return float(np.percentile(values, q) * 1e3) if values else float("nan")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


class Scoreboard:
    """Delivered answers against the truth, plus latency and throughput counters."""

    def __init__(self) -> None:
        self.detections: list[np.ndarray] = []
        self.truth: list[np.ndarray] = []
        self.latencies: list[float] = []
        self.window_latencies: list[float] = []
        self.window_answers = 0
        self.window_frames = 0

    def add(self, targets: list[dict], truth: np.ndarray, latency: float | None) -> None:
        rows = [[t["x"], t["y"], t["score"]] for t in targets]
        self.detections.append(np.asarray(rows, dtype=np.float64).reshape(-1, 3))
        self.truth.append(np.asarray(truth, dtype=np.float64).reshape(-1, 3))
        self.window_answers += 1
        if latency is not None:
            self.latencies.append(latency)
            self.window_latencies.append(latency)

    def metrics(self) -> dict[str, Any]:
        """Running CSO-mAP (percent) and count accuracy over every delivered frame."""
        if not self.detections:
            return {"cso_map": None, "count_accuracy": None}
        return {
            "cso_map": cso_map(self.detections, self.truth),
            "count_accuracy": count_accuracy(self.detections, self.truth),
        }

    def take_window(self) -> tuple[int, int, list[float]]:
        """Answers, frames and latencies since the last call (for the per-second line)."""
        out = (self.window_answers, self.window_frames, self.window_latencies)
        self.window_answers, self.window_frames, self.window_latencies = 0, 0, []
        return out


# --------------------------------------------------------------------------------------------
# the client


class Replay:
    """A simulated tracker streaming to ``config.url``; ``await Replay(config).run()``.

    ``on_answer(message)`` is called once per delivered result (after deduplication).
    """

    def __init__(
        self,
        config: ReplayConfig,
        on_answer: Callable[[dict], None] | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.config = config
        self.on_answer = on_answer
        self.out = out if out is not None else sys.stdout
        self.tracks: dict[str, TrackState] = {}  # every track that sent a frame, in order
        self.board = Scoreboard()
        self.frames_produced = 0
        self.duplicates = 0
        self.resent = 0
        self.reconnects = 0
        self.connections = 0
        self.stray_errors: list[dict] = []
        self.unrefined = 0  # results answered without their fit (the server kept the deadline)
        self.fatal: str | None = None
        self._ws: ClientConnection | None = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()  # stop producing (time/frames up, signal, fatal error)
        self._done = asyncio.Event()  # nothing more to wait for
        self._producer_done = False
        self._next_number = 0
        self._started = 0.0
        self._answers_file: TextIO | None = None

    # -- public -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop producing frames; open tracks are ended and their answers awaited."""
        self._stop.set()

    async def run(self) -> dict[str, Any]:
        """Stream until the time or frame budget is spent, then drain; return the summary."""
        # What is loaded by now lives as long as the run: out of the collector's sight, a full
        # collection does not stall the client (the bench's process holds torch: 100+ ms)
        # and show up as the server's latency.
        gc.collect()
        gc.freeze()
        if self.config.answers_out is not None:
            self._answers_file = open(self.config.answers_out, "w", encoding="utf-8")
        self._started = time.monotonic()
        connection = asyncio.create_task(self._connection_loop())
        reporter = asyncio.create_task(self._report_loop())
        try:
            await self._produce()
            try:
                await asyncio.wait_for(self._done.wait(), self.config.drain_timeout)
            except TimeoutError:
                pass
        finally:
            self._stop.set()
            self._done.set()
            for task in (connection, reporter):
                task.cancel()
            await asyncio.gather(connection, reporter, return_exceptions=True)
            if self._ws is not None:
                await self._ws.close()
            self._finish_answers_file()
        summary = self.summary()
        if not self.config.quiet:
            self._print_summary(summary)
        return summary

    def summary(self) -> dict[str, Any]:
        """Counts, latency, throughput and accuracy of the whole run."""
        elapsed = time.monotonic() - self._started
        missing, failed = [], []
        for track in self.tracks.values():
            for idx in range(track.produced):
                if idx in track.results:
                    continue
                (failed if idx in track.errors else missing).append([track.track_id, idx])
        answered = sum(len(t.results) for t in self.tracks.values())
        lat = self.board.latencies
        metrics = self.board.metrics()
        return {
            "url": self.config.url,
            "elapsed_s": round(elapsed, 3),
            "tracks": len(self.tracks),
            "frames": self.frames_produced,
            "answered": answered,
            "missing": len(missing),
            "errors": len(failed),
            "error_codes": dict(Counter(self.tracks[t].errors[i].get("code") for t, i in failed)),
            "unrefined": self.unrefined,
            "missing_frames": missing[:100],
            "error_frames": failed[:100],
            "stray_errors": self.stray_errors[:20],
            "duplicates_dropped": self.duplicates,
            "resent_frames": self.resent,
            "reconnects": self.reconnects,
            "windows_per_s": round(answered / elapsed, 2) if elapsed > 0 else None,
            "latency_ms": {
                "p50": percentile_ms(lat, 50),
                "p95": percentile_ms(lat, 95),
                "max": max(lat) * 1e3 if lat else float("nan"),
            },
            "cso_map": metrics["cso_map"],
            "count_accuracy": metrics["count_accuracy"],
            "frames_per_track": {t.track_id: t.produced for t in self.tracks.values()},
            "fatal": self.fatal,
            "ok": self.fatal is None and not missing and not failed and self.frames_produced > 0,
            "config": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items() if k != "token"
            },
        }

    # -- producing frames -------------------------------------------------------------------

    def _new_track(self) -> TrackState:
        sim = make_track(
            self._next_number, self.config.seed, self.config.track_frames, self.config.noise, self.config.recentre
        )
        self._next_number += 1
        return TrackState(sim)

    def _budget_left(self) -> bool:
        cfg = self.config
        if self._stop.is_set():
            return False
        if cfg.seconds > 0 and time.monotonic() - self._started >= cfg.seconds:
            return False
        return not (cfg.max_frames > 0 and self.frames_produced >= cfg.max_frames)

    async def _produce(self) -> None:
        """One tick per 1/fps seconds; each tick every slot's track produces its next frame.

        A slot's next track is simulated in the tick before its current one ends, after that
        tick's frames are out: simulating it at the tick would hold up the frames (and the
        server's CPU) behind the client's own work, which a real tracker does not do.
        """
        loop = asyncio.get_running_loop()
        period = 1.0 / self.config.fps
        slots = [self._new_track() for _ in range(self.config.tracks)]
        ready: dict[int, TrackState] = {}  # the next track of slots whose track ends next tick
        start, tick = loop.time(), 0
        while self._budget_left():
            for i, track in enumerate(slots):
                if not self._budget_left():
                    break
                if track.produced >= len(track.sim.frames):
                    await self._end(track)
                    track = slots[i] = ready.pop(i, None) or self._new_track()
                await self._produce_frame(track)
            for i, track in enumerate(slots):
                if track.produced >= len(track.sim.frames) and i not in ready:
                    ready[i] = self._new_track()
            tick += 1
            delay = start + tick * period - loop.time()
            try:
                await asyncio.wait_for(self._stop.wait(), max(delay, 0.0))
            except TimeoutError:
                pass
        for track in slots:
            if track.produced > 0 and not track.ending:
                await self._end(track)
        self._producer_done = True
        self._check_done()

    async def _produce_frame(self, track: TrackState) -> None:
        idx = track.produced
        track.produced += 1
        self.frames_produced += 1
        self.board.window_frames += 1
        self.tracks.setdefault(track.track_id, track)
        async with self._lock:
            if self._ws is not None:
                await self._send(self._ws, self._frame_message(track, idx), track, idx)

    async def _end(self, track: TrackState) -> None:
        track.ending = True
        async with self._lock:
            if self._ws is not None:
                await self._send_end(self._ws, track)

    # -- sending ----------------------------------------------------------------------------

    def _frame_message(self, track: TrackState, idx: int) -> str:
        message: dict[str, Any] = {
            "type": "frame",
            "track_id": track.track_id,
            "frame_index": idx,
            "patch": track.sim.frames[idx].tolist(),
            "origin": {"x": float(track.sim.origins[idx, 0]), "y": float(track.sim.origins[idx, 1])},
        }
        options = {}
        if self.config.refine is not None:
            options["refine"] = self.config.refine
        if self.config.threshold is not None:
            options["threshold"] = self.config.threshold
        if options:
            message["options"] = options
        return json.dumps(message)

    async def _send(self, ws: ClientConnection, text: str, track: TrackState, idx: int) -> bool:
        """Write one frame; a dead socket is left to the reader (which reconnects)."""
        try:
            await ws.send(text)
        except ConnectionClosed:
            if self._ws is ws:
                self._ws = None
            return False
        track.sent_at[idx] = time.monotonic()
        track.transmitted = max(track.transmitted, idx + 1)
        return True

    async def _send_end(self, ws: ClientConnection, track: TrackState) -> None:
        try:
            await ws.send(json.dumps({"type": "end", "track_id": track.track_id}))
        except ConnectionClosed:
            if self._ws is ws:
                self._ws = None
            return
        track.end_at = time.monotonic()

    async def _prime(self, ws: ClientConnection, track: TrackState) -> None:
        """Start ``track`` afresh on ``ws``: its last frames (see module docstring), then end."""
        for idx in range(track.resend_start(), track.produced):
            if idx < track.transmitted:
                self.resent += 1
            if not await self._send(ws, self._frame_message(track, idx), track, idx):
                return
        if track.ending:
            await self._send_end(ws, track)

    # -- the connection ---------------------------------------------------------------------

    async def _connect(self) -> ClientConnection:
        """Open a WebSocket, retrying with backoff for up to ``reconnect_timeout`` seconds."""
        cfg = self.config
        headers = {"Authorization": f"Bearer {cfg.token}"} if cfg.token else None
        deadline = time.monotonic() + cfg.reconnect_timeout
        delay, last = 0.05, "no attempt"
        while True:
            try:
                return await connect(
                    cfg.url,
                    additional_headers=headers,
                    open_timeout=5,
                    close_timeout=2,
                    max_size=None,
                )
            except InvalidURI as exc:
                raise FatalConnectionError(f"bad --url {cfg.url!r}: {exc}") from exc
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in FATAL_STATUS:
                    raise FatalConnectionError(
                        f"{cfg.url} refused the connection with HTTP {status}"
                        + (" (check --token)" if status in (401, 403) else "")
                    ) from exc
                last = f"HTTP {status}"
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() + delay > deadline or self._done.is_set():
                raise FatalConnectionError(f"cannot connect to {cfg.url} within {cfg.reconnect_timeout:g} s ({last})")
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)

    async def _connection_loop(self) -> None:
        """Connect, prime the open tracks, read answers; reconnect whenever the socket drops."""
        while not self._done.is_set():
            try:
                ws = await self._connect()
            except FatalConnectionError as exc:
                self.fatal = str(exc)
                self._log(f"replay: {exc}")
                self._stop.set()
                self._done.set()
                return
            self.connections += 1
            if self.connections > 1:
                self.reconnects += 1
                self._log(f"replay: reconnected ({self.reconnects}), priming open tracks")
            async with self._lock:
                for track in list(self.tracks.values()):
                    if not track.closed and track.produced > 0:
                        await self._prime(ws, track)
                self._ws = ws
            try:
                async for text in ws:
                    await self._on_message(json.loads(text))
            except ConnectionClosed:
                pass
            finally:
                if self._ws is ws:
                    self._ws = None
            if not self._done.is_set():
                self._log("replay: connection lost, reconnecting")

    # -- answers ----------------------------------------------------------------------------

    async def _on_message(self, msg: dict) -> None:
        kind = msg.get("type")
        track = self.tracks.get(msg.get("track_id"))
        if kind == "result":
            self._on_result(msg, track)
        elif kind == "error":
            idx = msg.get("frame_index")
            if track is None or idx is None:
                if not (msg.get("code") == "unknown_track" and track is not None and track.closed):
                    self.stray_errors.append(msg)
            elif idx not in track.results:
                track.errors[idx] = msg
        elif kind == "ended" and track is not None:
            if track.ending:
                track.closed = True
                self._check_done()
        elif kind == "expired" and track is not None:
            await self._on_expired(track, msg.get("reason"))

    def _on_result(self, msg: dict, track: TrackState | None) -> None:
        idx = msg.get("frame_index")
        if track is None or not isinstance(idx, int) or idx in track.results or not 0 <= idx < track.produced:
            self.duplicates += 1
            return
        targets = msg.get("targets", [])
        track.results[idx] = targets
        self.unrefined += msg.get("refined") is False
        track.errors.pop(idx, None)
        trigger = track.sent_at.get(idx + CONTEXT)
        if trigger is None:
            trigger = track.end_at
        latency = max(time.monotonic() - trigger, 0.0) if trigger is not None else None
        self.board.add(targets, track.sim.truth[idx], latency)
        if self._answers_file is not None:
            self._answers_file.write(
                json.dumps({"track_id": track.track_id, "frame_index": idx, "targets": targets}) + "\n"
            )
        if self.on_answer is not None:
            self.on_answer(msg)

    async def _on_expired(self, track: TrackState, reason: str | None) -> None:
        """The server flushed the track; if it is still ours to stream, prime it again."""
        if track.ending:
            track.closed = True  # every frame was flushed; the `end` found nothing to end
            self._check_done()
            return
        if reason == "shutdown":
            return  # the socket closes next; the new connection primes every open track
        async with self._lock:
            if self._ws is not None:
                await self._prime(self._ws, track)

    def _check_done(self) -> None:
        if self._producer_done and all(t.closed for t in self.tracks.values()):
            self._done.set()

    # -- output -----------------------------------------------------------------------------

    def _log(self, text: str) -> None:
        if not self.config.quiet:
            print(text, file=self.out, flush=True)

    async def _report_loop(self) -> None:
        every = self.config.report_every
        last = time.monotonic()
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            self._log(self.report_line(now - last))
            last = now

    def report_line(self, interval: float) -> str:
        """One progress line; resets the per-interval counters."""
        answers, frames, lat = self.board.take_window()
        interval = max(interval, 1e-9)
        metrics = self.board.metrics()
        cso = metrics["cso_map"]["mAP"] if metrics["cso_map"] else float("nan")
        acc = metrics["count_accuracy"] if metrics["count_accuracy"] is not None else float("nan")
        answered = sum(len(t.results) for t in self.tracks.values())
        return (
            f"[{time.monotonic() - self._started:6.1f}s] {answers / interval:7.1f} windows/s "
            f"{frames / interval:7.1f} frames/s  p50 {_fmt(percentile_ms(lat, 50))} ms  "
            f"p95 {_fmt(percentile_ms(lat, 95))} ms  answered {answered}/{self.frames_produced}  "
            f"CSO-mAP {_fmt(cso)}  count-acc {_fmt(acc, 3)}  reconnects {self.reconnects}"
        )

    def _print_summary(self, s: dict[str, Any]) -> None:
        cso = s["cso_map"] or {}
        aps = ", ".join(f"{k} {_fmt(v)}" for k, v in cso.items() if k != "mAP")
        accuracy = s["count_accuracy"]
        lines = [
            "replay summary:",
            f"  frames {s['frames']} in {s['tracks']} tracks, answered {s['answered']}, "
            f"missing {s['missing']}, errors {s['errors']}",
            f"  reconnects {s['reconnects']}, resent frames {s['resent_frames']}, "
            f"duplicate answers dropped {s['duplicates_dropped']}",
            f"  {_fmt(s['windows_per_s'])} windows/s over {s['elapsed_s']:.1f} s, "
            f"latency p50 {_fmt(s['latency_ms']['p50'])} ms, p95 {_fmt(s['latency_ms']['p95'])} ms",
            f"  CSO-mAP {_fmt(cso.get('mAP'))} ({aps})  count accuracy {_fmt(accuracy, 3)}",
        ]
        if s["fatal"]:
            lines.append(f"  FAILED: {s['fatal']}")
        elif not s["ok"]:
            lines.append(
                f"  FAILED: {s['missing']} frames got no answer, {s['errors']} only an error "
                f"(first: {(s['missing_frames'] + s['error_frames'])[:5]})"
            )
        print("\n".join(lines), file=self.out, flush=True)

    def _finish_answers_file(self) -> None:
        """Close the answers file, with one line per frame that ended with an error."""
        if self._answers_file is None:
            return
        for track in self.tracks.values():
            for idx, err in sorted(track.errors.items()):
                if idx not in track.results:
                    self._answers_file.write(
                        json.dumps({"track_id": track.track_id, "frame_index": idx, "error": err}) + "\n"
                    )
        self._answers_file.close()
        self._answers_file = None


# --------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csist replay",
        description="Stream simulated SeqCSIST tracks to a running service over its WebSocket, "
        "like a tracker would, and score the answers against the truth.",
    )
    p.add_argument("--url", default=ReplayConfig.url, help="the service's WebSocket endpoint")
    p.add_argument("--tracks", type=int, default=ReplayConfig.tracks, help="tracks streamed at once")
    p.add_argument("--fps", type=float, default=ReplayConfig.fps, help="frames per second per track")
    p.add_argument(
        "--seconds",
        type=float,
        default=ReplayConfig.seconds,
        help="how long to stream (0: until --max-frames or Ctrl-C / SIGTERM)",
    )
    p.add_argument("--max-frames", type=int, default=0, help="stop after this many frames in all (0: no limit)")
    p.add_argument(
        "--track-frames",
        type=int,
        default=ReplayConfig.track_frames,
        help="frames per track before it ends and a new one starts (SeqCSIST: 20)",
    )
    p.add_argument("--noise", type=float, default=0.0, help="sensor noise sigma in grey levels (0: none)")
    p.add_argument(
        "--recentre",
        action="store_true",
        help="re-centre each track's patch on the tracker's estimate of its group's centre (0.3 px of "
        "error): its origin moves by whole pixels, up to 2 a frame",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated tracks")
    p.add_argument(
        "--token",
        default=os.environ.get("CSIST_API_TOKEN") or None,
        help="API token, sent as 'Authorization: Bearer ...' (default: $CSIST_API_TOKEN)",
    )
    p.add_argument(
        "--refine",
        default=None,
        help="sub-cell refinement option sent with every frame, e.g. none|centroid|quadratic "
        "(default: the model's, from its manifest)",
    )
    p.add_argument("--threshold", type=float, default=None, help="peak threshold option (default: the model's)")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=ReplayConfig.drain_timeout,
        help="seconds to wait for the last answers after streaming stops",
    )
    p.add_argument(
        "--reconnect-timeout",
        type=float,
        default=ReplayConfig.reconnect_timeout,
        help="seconds to keep trying to (re)connect before giving up",
    )
    p.add_argument("--json-out", type=Path, default=None, help="write the summary as JSON here")
    p.add_argument(
        "--answers-out",
        type=Path,
        default=None,
        help="write every delivered answer here (JSON lines, one per frame)",
    )
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def config_from_args(args: argparse.Namespace) -> ReplayConfig:
    return ReplayConfig(
        url=args.url,
        tracks=args.tracks,
        fps=args.fps,
        seconds=args.seconds,
        max_frames=args.max_frames,
        track_frames=args.track_frames,
        noise=args.noise,
        recentre=args.recentre,
        seed=args.seed,
        token=args.token,
        refine=args.refine,
        threshold=args.threshold,
        drain_timeout=args.drain_timeout,
        reconnect_timeout=args.reconnect_timeout,
        json_out=args.json_out,
        answers_out=args.answers_out,
        quiet=args.quiet,
    )


def _validate(parser: argparse.ArgumentParser, cfg: ReplayConfig) -> None:
    if cfg.tracks < 1:
        parser.error("--tracks must be >= 1")
    if not cfg.fps > 0:
        parser.error("--fps must be > 0")
    if cfg.seconds < 0 or cfg.max_frames < 0:
        parser.error("--seconds and --max-frames must be >= 0")
    if cfg.track_frames < 1:
        parser.error("--track-frames must be >= 1")
    if cfg.noise < 0:
        parser.error("--noise must be >= 0")
    if not cfg.url.startswith(("ws://", "wss://")):
        parser.error("--url must start with ws:// or wss://")


async def _run_with_signals(replay: Replay) -> dict[str, Any]:
    """Run; SIGINT/SIGTERM stop streaming gracefully (a second one aborts)."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, replay.stop)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread / not supported: Ctrl-C raises as usual
    try:
        return await replay.run()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    cfg = config_from_args(parser.parse_args(argv))
    _validate(parser, cfg)
    summary = asyncio.run(_run_with_signals(Replay(cfg)))
    if cfg.json_out is not None:
        cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_out.write_text(json.dumps(jsonable(summary), indent=2, allow_nan=False))
    return 0 if summary["ok"] else 1


def jsonable(value: Any) -> Any:
    """``value`` with NaN / infinity replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    sys.exit(main())
