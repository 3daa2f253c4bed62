"""Frames of one track to DeRefNet windows: the one rule used by REST and WebSocket.

The model sees 5 consecutive frames and answers for the middle one, so frame ``t`` of a
segment of ``n`` frames gets the window ``t-2 .. t+2`` with indices clipped to ``0 .. n-1``:
edge frames are padded by replicating the first or last frame. Every frame thus gets exactly
one window, and a streamed frame's window is complete as soon as frame ``t+2`` has arrived.

Frame indices must increase along a track; a jump (gap) starts a new segment, because a window
that spans a gap would show the model motion that did not happen.

Every frame also gets one :class:`FeatureSlot`, shared by the (up to 5) windows that hold it:
with the streaming model parts, the batcher fills a slot with the frame's encoder features the
first time a window needs it, and every later window of that frame reuses them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

WINDOW = 5  # frames per window, the model's input
HALF = WINDOW // 2  # frames each side of the middle one: the streaming latency
_OFFSETS = np.arange(-HALF, HALF + 1)
NEIGHBOURS = tuple(p for p in range(WINDOW) if p != HALF)  # window positions aligned to the middle


def pair_features(mid: np.ndarray, nb: np.ndarray, positions) -> np.ndarray:
    """Input (P, 5, F) of the model's ``align`` part: the middle frame's features (P, F) in row
    HALF, the neighbour's (P, F) in row ``positions[i]``, zeros elsewhere (the part gates every
    row by its window position and adds the neighbour rows, so zeros leave the pair exact)."""
    out = np.zeros((len(mid), WINDOW, mid.shape[-1]), dtype=np.float32)
    out[:, HALF] = mid
    out[np.arange(len(mid)), np.asarray(positions, dtype=np.int64)] = nb
    return out


def fuse_features(mid: np.ndarray, aligned: np.ndarray) -> np.ndarray:
    """Input (B, 5, F) of the model's ``fuse`` part: the 4 aligned neighbours (B, 4, F) in their
    window positions around the middle frame's features (B, F)."""
    out = np.empty((len(mid), WINDOW, mid.shape[-1]), dtype=np.float32)
    out[:, HALF] = mid
    out[:, list(NEIGHBOURS)] = aligned
    return out


def window_indices(t, n: int) -> np.ndarray:
    """Indices of the frames in frame ``t``'s window in a segment of ``n`` frames.

    ``t`` may be an int (result shape (5,)) or an array of ints (result shape (*t.shape, 5)).
    """
    t = np.asarray(t, dtype=np.int64)
    return np.clip(t[..., None] + _OFFSETS, 0, n - 1)


def sequence_windows(frames: np.ndarray) -> np.ndarray:
    """Windows (n, 5, H, W) for every frame of one segment (n, H, W), edges replicated."""
    n = frames.shape[0]
    return frames[window_indices(np.arange(n), n)]


_SLOT_LOCK = threading.Lock()  # claim/fill are a few bytecodes; one lock for all slots is enough


class FeatureSlot:
    """The encoder features of one frame (or one aligned neighbour of a window), filled in once
    by the batcher (None until then).

    With several inference workers, the batch that finds a slot empty claims it (``claim``,
    on the event loop, in batch order) and encodes the frame; a later batch whose windows hold
    the same frame waits for the claim's event (``ready``) instead of encoding it again. Only
    the holder of the claim may ``fill`` it; filling with None (the encoder failed) gives the
    slot up, and a waiter then claims and encodes it itself.
    """

    __slots__ = ("features", "ready")

    def __init__(self) -> None:
        self.features: np.ndarray | None = None
        self.ready: threading.Event | None = None  # the open claim's event, if any

    def claim(self) -> threading.Event | None:
        """Claim the empty slot: the event to pass to ``fill``; None if filled or claimed."""
        with _SLOT_LOCK:
            if self.features is not None or self.ready is not None:
                return None
            self.ready = threading.Event()
            return self.ready

    def fill(self, features: np.ndarray | None, claim: threading.Event) -> bool:
        """Store the features of the frame claimed with ``claim`` (None: give the claim up) and
        wake the waiters. False, doing nothing, if ``claim`` is no longer this slot's claim."""
        with _SLOT_LOCK:
            if self.ready is not claim:
                return False
            self.features, self.ready = features, None
        claim.set()
        return True

    def wait(self) -> None:
        """Block until the open claim, if any, is filled or given up."""
        event = self.ready
        if event is not None:
            event.wait()


def sequence_slots(n: int) -> list[list[FeatureSlot]]:
    """One slot per frame of a segment of ``n`` frames, arranged as its windows (n lists of 5)."""
    slots = [FeatureSlot() for _ in range(n)]
    return [[slots[i] for i in row] for row in window_indices(np.arange(n), n).tolist()]


@dataclass
class Window:
    """A complete window and the metadata of its middle frame (whatever the caller attached).

    An *early* window (:meth:`SegmentWindows.early`) lacks its last frame or two: their
    ``slots`` entries are None (their ``frames`` rows hold the newest frame and are not read),
    and only the pairs of the other neighbours can be computed."""

    frames: np.ndarray  # (5, H, W)
    meta: Any
    slots: list[FeatureSlot | None] | None = None  # the 5 frames' feature slots, in window order
    pairs: list[FeatureSlot] | None = None  # the 4 aligned neighbours' slots, in NEIGHBOURS order


class SegmentWindows:
    """Streaming version of :func:`sequence_windows` for one segment of one track.

    ``push`` a frame, get the windows that it completes (the window of the frame two earlier,
    or nothing for the first two frames); ``flush`` at the end of the segment to get the
    windows of the last (up to two) frames, padded by replicating the last frame. Only the last
    5 frames are kept, so memory per track is constant.
    """

    def __init__(self) -> None:
        self._frames: deque[np.ndarray] = deque(maxlen=WINDOW)
        self._slots: deque[FeatureSlot] = deque(maxlen=WINDOW)
        self._metas: deque[Any] = deque(maxlen=WINDOW)
        self._pairs: deque[list[FeatureSlot]] = deque(maxlen=WINDOW)  # per middle frame
        self._count = 0  # frames pushed into this segment
        self._emitted = 0  # frames whose window has been handed out

    @property
    def pending(self) -> int:
        """Frames pushed whose window has not been handed out yet (0, 1 or 2)."""
        return self._count - self._emitted

    def push(self, frame: np.ndarray, meta: Any = None) -> list[Window]:
        """Add the next frame; return the windows it completes."""
        self._frames.append(frame)
        self._slots.append(FeatureSlot())
        self._metas.append(meta)
        self._pairs.append([FeatureSlot() for _ in NEIGHBOURS])
        self._count += 1
        return self._emit(until=self._count - HALF, n=None)

    def early(self) -> list[Window]:
        """The windows not complete yet whose middle frame is here (the last two frames'), with
        None slots for the frames still to come.

        Their neighbours that are here are final whatever comes next (frames before the segment
        replicate its first one), so they can be aligned to the middle frame while the stream
        waits: the newest frame's window has its 2 earlier neighbours, the one before it 3.
        """
        first = self._count - len(self._frames)
        out = []
        for t in range(max(self._emitted, self._count - HALF), self._count):
            idx = (window_indices(t, self._count) - first).tolist()  # frames to come: the newest
            out.append(
                Window(
                    np.stack([self._frames[i] for i in idx]),
                    self._metas[t - first],
                    [self._slots[i] if t + p - HALF < self._count else None for p, i in enumerate(idx)],
                    self._pairs[t - first],
                )
            )
        return out

    def flush(self) -> list[Window]:
        """Windows of all remaining frames (end of segment); the segment starts over empty."""
        out = self._emit(until=self._count, n=self._count)
        self._frames.clear()
        self._slots.clear()
        self._metas.clear()
        self._pairs.clear()
        self._count = self._emitted = 0
        return out

    def _emit(self, until: int, n: int | None) -> list[Window]:
        """Windows of frames ``_emitted .. until-1``; ``n`` is the segment length if it ended.

        While the segment is open, every window emitted lies inside the frames seen so far
        (t + 2 < count), so clipping to the count is the same as clipping to the final length.
        """
        out = []
        first = self._count - len(self._frames)  # segment index of the oldest buffered frame
        total = self._count if n is None else n
        for t in range(self._emitted, until):
            idx = (window_indices(t, total) - first).tolist()
            out.append(
                Window(
                    np.stack([self._frames[i] for i in idx]),
                    self._metas[t - first],
                    [self._slots[i] for i in idx],
                    self._pairs[t - first],
                )
            )
        self._emitted = max(self._emitted, until)
        return out


def split_segments(frame_indices: Sequence[int], origins: Sequence | None = None) -> list[slice]:
    """Consecutive runs of a strictly increasing index sequence, as slices; gaps split runs.

    A change of the patch ``origin`` (the tracker re-centred its patch) splits runs too: a
    window must show one patch position, or the model would read the shift as motion.
    Raises ValueError naming the position if an index repeats or goes back.
    """
    starts = [0]
    for k in range(1, len(frame_indices)):
        prev, cur = frame_indices[k - 1], frame_indices[k]
        if cur <= prev:
            raise ValueError(f"frame {k}: frame_index {cur} is not after the previous frame's {prev}")
        if cur != prev + 1 or (origins is not None and origins[k] != origins[k - 1]):
            starts.append(k)
    ends = starts[1:] + [len(frame_indices)]
    return [slice(a, b) for a, b in zip(starts, ends, strict=True) if b > a]
