"""One WebSocket connection: many tracks, each answered frame by frame.

Protocol (JSON text messages):

- client -> server ``{"type": "frame", "track_id", "frame_index", "patch", "origin"?,
  "timestamp"?, "options"?}`` and ``{"type": "end", "track_id"}``;
- server -> client ``{"type": "result", "track_id", "frame_index", "timestamp", "targets",
  "refined"}`` for every frame once frame t+2 of its track arrived (or at end / gap / expiry /
  shutdown, padded by replication); ``refined`` is false when the fit was skipped to keep the
  deadline; ``{"type": "error", "track_id", "frame_index", "code", "message"}``, with code
  ``deadline_exceeded`` for a window that could not start inference within its deadline
  (``CSIST_DEADLINE_MS``, the connection's ``?deadline_ms=``, or the frame's
  ``options.deadline_ms``; counted from when the window is complete);
  ``{"type": "ended", "track_id", "frames"}`` after an end's results; ``{"type": "expired",
  "track_id", "reason"}`` when the server closes a track (``idle`` or ``shutdown``) after
  flushing it.

Every frame gets exactly one result or one error. Tracks belong to the connection: when the
client goes away its buffered frames are forgotten (no padded windows are flushed for it) and
its queued windows and early work are dropped from the batcher.

Feature cache: each track's segment keeps a feature slot per buffered frame next to the frame
itself (``refine="fit"`` needs the raw LR window); with the model's streaming parts the batcher
encodes a frame once, in the batch of the first window that holds it (batched with the other
tracks' and connections' frames), and later windows run only the head.

Concurrency: a receive loop parses messages and updates track state (synchronously, so there
are no races between tracks), submits completed windows to the batcher and puts the pending
answer in a bounded per-connection outbox; a send loop awaits the outbox entries in order and
writes the answers. Answers of one track therefore leave in frame order, and a client that does
not read makes the server stop reading from it (TCP back-pressure) rather than buffer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError
from starlette.websockets import WebSocket

from service.api.answers import deadline_s, peak_options, targets_payload, window_extras
from service.api.schemas import CLIENT_MESSAGE, EndMessage, FrameMessage, Origin, describe_errors
from service.engine.batcher import DeadlineExceeded, Overloaded, PeakOptions, ShuttingDown
from service.runtime.lifecycle import Runtime
from service.science.windows import SegmentWindows, Window, recentre_step

log = logging.getLogger("service.ws")

_CLOSE = object()  # outbox sentinel: stop the send loop


@dataclass
class FrameMeta:
    """What the answer of a frame needs besides its targets."""

    frame_index: int
    origin: Origin | None
    timestamp: float | None
    options: PeakOptions
    deadline_s: float | None = None  # of the window this frame is the middle of


@dataclass
class Track:
    track_id: str
    segment: SegmentWindows = field(default_factory=SegmentWindows)
    last_index: int | None = None
    last_origin: tuple[float, float] | None = None
    last_seen: float = field(default_factory=time.monotonic)
    frames: int = 0


@dataclass
class _Pending:
    track_id: str
    metas: list[FrameMeta]
    future: asyncio.Future


def error_message(track_id: Any, frame_index: Any, code: str, message: str) -> dict:
    return {
        "type": "error",
        "track_id": track_id if isinstance(track_id, str) else None,
        "frame_index": frame_index if isinstance(frame_index, int) and not isinstance(frame_index, bool) else None,
        "code": code,
        "message": message,
    }


def error_code(exc: Exception) -> str:
    """The protocol's error code of a failed window."""
    if isinstance(exc, DeadlineExceeded):
        return "deadline_exceeded"
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, ShuttingDown):
        return "shutting_down"
    return "inference_error"


def _ids_of(text: str) -> tuple[Any, Any]:
    """Best-effort track_id and frame_index of a message that failed validation."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(raw, dict):
        return None, None
    return raw.get("track_id"), raw.get("frame_index")


class StreamSession:
    """State and tasks of one accepted WebSocket."""

    def __init__(self, websocket: WebSocket, runtime: Runtime, deadline_ms: float | None = None) -> None:
        self.ws = websocket
        self.deadline_ms = deadline_ms  # the connection's ?deadline_ms=, else the setting
        self.rt = runtime
        self.settings = runtime.settings
        self.metrics = runtime.metrics
        self.tracks: dict[str, Track] = {}
        self.outbox: asyncio.Queue = asyncio.Queue(maxsize=self.settings.ws_max_pending)
        self._close_reason: str | None = None
        self._done = asyncio.Event()
        self._receiver: asyncio.Task | None = None
        self._in_receive = False
        self._send_failed = False
        self._frames = 0  # frames accepted on this connection
        self._errors = 0  # error messages sent

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the client leaves or the server closes it."""
        self.rt.sessions.add(self)
        self.metrics.ws_connections.inc()
        sender = asyncio.create_task(self._send_loop())
        janitor = asyncio.create_task(self._janitor())
        self._receiver = asyncio.current_task()
        opened = time.monotonic()
        disconnected = True
        try:
            disconnected = await self._receive_loop()
            janitor.cancel()
            if disconnected:
                self._drop_all("disconnect")
                self._cancel_pending()
            else:
                await self._close_all("shutdown")
                await self.outbox.put(_CLOSE)
                await sender
                try:
                    await self.ws.close(code=1001, reason=self._close_reason or "closing")
                except Exception:  # the client may be gone already
                    pass
        finally:
            janitor.cancel()
            sender.cancel()
            self._drop_all("disconnect")
            self._cancel_pending()
            self.rt.sessions.discard(self)
            self.metrics.ws_connections.dec()
            self._done.set()
            client = self.ws.client
            log.info(
                "websocket closed",
                extra={
                    "client": f"{client.host}:{client.port}" if client else None,
                    "frames": self._frames,
                    "errors": self._errors,
                    "reason": "client" if disconnected else "shutdown",
                    "duration_s": round(time.monotonic() - opened, 3),
                },
            )

    def _cancel_pending(self) -> None:
        """The client is gone: its queued windows and early work are dropped from the batcher,
        and the answers still awaited are abandoned (nothing more is computed for it)."""
        batcher = self.rt.batcher
        if batcher is not None:
            batcher.cancel(self)
        while not self.outbox.empty():
            entry = self.outbox.get_nowait()
            if isinstance(entry, _Pending) and not entry.future.done():
                entry.future.cancel()

    async def close(self, reason: str) -> None:
        """Ask the connection to flush its tracks and close with ``reason``; wait until it has."""
        if self._close_reason is None:
            self._close_reason = reason
            if self._in_receive and self._receiver is not None:
                self._receiver.cancel()  # only ever interrupts the wait for the next message
        await self._done.wait()

    async def _receive_loop(self) -> bool:
        """Handle messages until disconnect (returns True) or a close request (False)."""
        while self._close_reason is None:
            self._in_receive = True
            try:
                message = await self.ws.receive()
            except asyncio.CancelledError:
                if self._close_reason is not None:
                    asyncio.current_task().uncancel()  # our own close request, not a real cancel
                    return False
                raise
            finally:
                self._in_receive = False
            if message["type"] == "websocket.disconnect":
                return True
            await self._on_message(message)
        return False

    # -- incoming messages ----------------------------------------------------------------

    async def _on_message(self, message: dict) -> None:
        text = message.get("text")
        if text is None:
            await self._error(None, None, "bad_message", "binary messages are not supported: send JSON text")
            return
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        if size > self.settings.max_message_bytes:
            track_id, frame_index = _ids_of(text)
            await self._error(
                track_id,
                frame_index,
                "message_too_large",
                f"message of {size} bytes exceeds the limit of {self.settings.max_message_bytes}",
            )
            return
        try:
            msg = CLIENT_MESSAGE.validate_json(text)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            if errors and errors[0]["type"] == "json_invalid":
                await self._error(None, None, "bad_json", f"message is not valid JSON: {errors[0]['msg']}")
                return
            for e in errors:  # drop the union tag ('frame' / 'end') from field paths
                loc = e.get("loc", ())
                if loc and loc[0] in ("frame", "end"):
                    e["loc"] = loc[1:]
            track_id, frame_index = _ids_of(text)
            await self._error(track_id, frame_index, "invalid_message", describe_errors(errors))
            return
        if isinstance(msg, FrameMessage):
            await self._on_frame(msg)
        else:
            await self._on_end(msg)

    async def _on_frame(self, msg: FrameMessage) -> None:
        track = self.tracks.get(msg.track_id)
        if track is None:
            if len(self.tracks) >= self.settings.max_tracks_per_connection:
                await self._error(
                    msg.track_id,
                    msg.frame_index,
                    "too_many_tracks",
                    f"this connection already has {len(self.tracks)} open tracks (the limit); end one first",
                )
                return
            track = self.tracks[msg.track_id] = Track(msg.track_id)
            self.metrics.active_tracks.inc()
        track.last_seen = time.monotonic()
        windows: list[Window] = []
        origin = None if msg.origin is None else (msg.origin.x, msg.origin.y)
        if track.last_index is not None:
            if msg.frame_index <= track.last_index:
                await self._error(
                    msg.track_id,
                    msg.frame_index,
                    "frame_index_not_increasing",
                    f"frame_index {msg.frame_index} is not after this track's last frame {track.last_index}",
                )
                return
            # a gap, or a move of the patch its windows do not follow: the old segment ends here
            if msg.frame_index != track.last_index + 1 or recentre_step(track.last_origin, origin) is None:
                windows += track.segment.flush()
        meta = FrameMeta(
            msg.frame_index,
            msg.origin,
            msg.timestamp,
            peak_options(self.rt, msg.options),
            deadline_s(self.rt, msg.options, self.deadline_ms),
        )
        windows += track.segment.push(np.asarray(msg.patch, dtype=np.float32), meta, origin)
        track.last_index = msg.frame_index
        track.last_origin = origin
        track.frames += 1
        self._frames += 1
        self.metrics.frames.labels("ws").inc()
        await self._submit(track.track_id, windows)
        if self.rt.batcher.caches_pairs:
            for early in track.segment.early():
                self.rt.batcher.submit_early(early.frames, early.slots, early.pairs, owner=self)

    async def _on_end(self, msg: EndMessage) -> None:
        track = self.tracks.pop(msg.track_id, None)
        if track is None:
            await self._error(
                msg.track_id,
                None,
                "unknown_track",
                f"no open track {msg.track_id!r} on this connection",
            )
            return
        self.metrics.active_tracks.dec()
        await self._submit(track.track_id, track.segment.flush())
        await self.outbox.put({"type": "ended", "track_id": track.track_id, "frames": track.frames})

    # -- track housekeeping ---------------------------------------------------------------

    async def _janitor(self) -> None:
        """Expire tracks idle for longer than the TTL: flush them, then say so."""
        ttl = self.settings.track_ttl_s
        interval = min(max(ttl / 4.0, 0.01), 1.0)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for track_id, track in list(self.tracks.items()):
                if now - track.last_seen > ttl and self.tracks.get(track_id) is track:
                    await self._evict(track_id, "idle")

    async def _evict(self, track_id: str, reason: str) -> None:
        track = self.tracks.pop(track_id)
        self.metrics.active_tracks.dec()
        self.metrics.track_evictions.labels(reason).inc()
        await self._submit(track_id, track.segment.flush())
        await self.outbox.put({"type": "expired", "track_id": track_id, "reason": reason})

    async def _close_all(self, reason: str) -> None:
        for track_id in list(self.tracks):
            await self._evict(track_id, reason)

    def _drop_all(self, reason: str) -> None:
        """The client is gone: forget its tracks (nobody to answer)."""
        for _ in self.tracks:
            self.metrics.active_tracks.dec()
            self.metrics.track_evictions.labels(reason).inc()
        self.tracks.clear()

    # -- outgoing messages ----------------------------------------------------------------

    async def _submit(self, track_id: str, windows: list[Window]) -> None:
        """Send completed windows to the batcher; queue their pending answers in order."""
        if not windows:
            return
        groups: dict[tuple[PeakOptions, float | None], list[Window]] = {}
        for w in windows:
            groups.setdefault((w.meta.options, w.meta.deadline_s), []).append(w)
        for (options, window_deadline_s), group in groups.items():
            try:
                future = self.rt.batcher.submit(
                    np.stack([w.frames for w in group]),
                    options,
                    [w.slots for w in group],
                    [w.pairs for w in group],
                    deadline_s=window_deadline_s,
                    owner=self,
                    missing=np.stack([w.missing for w in group]),
                )
            except (Overloaded, ShuttingDown) as exc:
                code = error_code(exc)
                for w in group:
                    await self._error(track_id, w.meta.frame_index, code, str(exc))
                continue
            self.metrics.windows.labels("ws").inc(len(group))
            await self.outbox.put(_Pending(track_id, [w.meta for w in group], future))

    async def _error(self, track_id: Any, frame_index: Any, code: str, message: str) -> None:
        self._errors += 1
        self.metrics.errors.labels(code).inc()
        await self.outbox.put(error_message(track_id, frame_index, code, message))

    async def _send_loop(self) -> None:
        while True:
            entry = await self.outbox.get()
            if entry is _CLOSE:
                return
            if isinstance(entry, dict):
                await self._send(entry)
                continue
            try:
                result = await entry.future
            except Exception as exc:  # shed at its deadline, or inference failed for this batch
                code = error_code(exc)
                for meta in entry.metas:
                    self._errors += 1
                    self.metrics.errors.labels(code).inc()
                    await self._send(error_message(entry.track_id, meta.frame_index, code, str(exc)))
                continue
            n_targets = 0
            for k, (meta, peaks) in enumerate(zip(entry.metas, result.peaks, strict=True)):
                n_targets += len(peaks)
                spread, confidence = window_extras(result, k)
                await self._send(
                    {
                        "type": "result",
                        "track_id": entry.track_id,
                        "frame_index": meta.frame_index,
                        "timestamp": meta.timestamp,
                        "targets": targets_payload(peaks, meta.origin, spread),
                        "refined": result.refined,
                        "count_confidence": confidence,
                    }
                )
            self.metrics.targets.labels("ws").inc(n_targets)

    async def _send(self, message: dict) -> None:
        """Write one message; after a failed write (client gone) keep draining silently."""
        if self._send_failed:
            return
        try:
            await self.ws.send_text(json.dumps(message))
        except Exception:
            self._send_failed = True
