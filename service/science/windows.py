"""Frames of one track to DeRefNet windows: the one rule used by REST and WebSocket.

The model sees 5 consecutive frames and answers for the middle one, so frame ``t`` of a
segment of ``n`` frames gets the window ``t-2 .. t+2`` with indices clipped to ``0 .. n-1``:
edge frames are padded by replicating the first or last frame. Every frame thus gets exactly
one window, and a streamed frame's window is complete as soon as frame ``t+2`` has arrived.

Frame indices must increase along a track; a jump (gap) starts a new segment, because a window
that spans a gap would show the model motion that did not happen.

A tracker that re-centres its patch on the target moves the patch's ``origin`` (the sensor
coordinates of its top-left pixel centre) by whole pixels now and then. The segment carries on
across such a step (at most :data:`MAX_RECENTRE_PX` per axis): every frame of a window is shifted
into the middle frame's patch (:func:`register`), so the window shows the scene in one set of
sensor coordinates, as a staring patch would. The pixels a shifted frame does not cover repeat
its edge for the network and are marked missing (:attr:`Window.missing`), which the fit leaves
out. Any other change of origin (a fraction of a pixel, a larger jump, an origin given on some
frames only) starts a new segment.

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
# a re-centring step of the patch that the windows follow, whole pixels per axis: 2 steps either
# side of the middle frame then leave at least 11 - 2 * 2 * 2 = 3 columns and rows of an 11-px
# patch in every frame of a window, around its centre, where a re-centring tracker keeps its target
MAX_RECENTRE_PX = 2
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


def replicated(frames: np.ndarray) -> np.ndarray:
    """Which frames of windows (..., F, H, W) are copies made to fill them (bool (..., F)).

    A segment's first and last frames are repeated to fill its edge windows
    (:func:`window_indices`): [f0, f0, f0, f1, f2] for the first frame, [f0, f0, f1, f2, f3]
    for the second. A frame bit-identical to its neighbour toward the middle frame is taken for
    such a copy; real frames are never identical in practice (noise, motion), and where they
    are (a static, noise-free scene) nothing is lost by the rule.
    """
    frames = np.asarray(frames)
    f = frames.shape[-3]
    mid = f // 2
    same = np.all(frames[..., 1:, :, :] == frames[..., :-1, :, :], axis=(-2, -1))  # (..., F - 1): frame i + 1 == i
    copy = np.zeros((*same.shape[:-1], f), dtype=bool)
    copy[..., :mid] = same[..., :mid]  # frame i before the middle equals frame i + 1
    copy[..., mid + 1 :] = same[..., mid:]  # frame i after it equals frame i - 1
    return copy


def recentre_step(previous, current) -> tuple[int, int] | None:
    """The whole-pixel step (dx, dy) of the patch origin from one frame to the next that a segment
    carries on across: (0, 0) for the same origin or none on either; None where a new segment
    must start (an origin on one of them only, a fractional step or one over MAX_RECENTRE_PX)."""
    if previous is None and current is None:
        return (0, 0)
    if previous is None or current is None:
        return None
    step = (current[0] - previous[0], current[1] - previous[1])
    whole = tuple(round(v) for v in step)
    if any(abs(v - w) > 1e-6 or abs(w) > MAX_RECENTRE_PX for v, w in zip(step, whole, strict=True)):
        return None
    return int(whole[0]), int(whole[1])


def register(frame: np.ndarray, shift) -> tuple[np.ndarray, np.ndarray]:
    """``frame`` (H, W) shown in a patch whose origin lies ``shift`` = (dx, dy) whole pixels from
    its own (the other patch's origin minus this frame's): pixel (r, c) there is the frame's
    pixel (r + dy, c + dx). Returns the shifted frame, the pixels it does not cover repeating its
    nearest edge pixel, and the (H, W) mask of those missing pixels."""
    height, width = frame.shape
    rows, cols = np.arange(height) + int(shift[1]), np.arange(width) + int(shift[0])
    out = frame[np.clip(rows, 0, height - 1)][:, np.clip(cols, 0, width - 1)]
    missing = ((rows < 0) | (rows >= height))[:, None] | ((cols < 0) | (cols >= width))[None, :]
    return out, missing


def window_shifts(origins, index: np.ndarray) -> np.ndarray:
    """(..., 5, 2) integer shifts that :func:`register` each frame of each window by: the middle
    frame's origin minus the frame's (windows as ``index`` (..., 5) of :func:`window_indices`,
    ``origins`` one (x, y) per frame of the segment, or None for a patch that does not move)."""
    index = np.asarray(index)
    if origins is None or all(o is None for o in origins):
        return np.zeros(index.shape + (2,), dtype=np.int64)
    xy = np.asarray(origins, dtype=np.float64)  # (n, 2); steps are whole pixels, origins need not be
    return np.rint(xy[index[..., HALF : HALF + 1]] - xy[index]).astype(np.int64)


def sequence_windows(frames: np.ndarray, origins=None) -> tuple[np.ndarray, np.ndarray]:
    """Windows (n, 5, H, W) for every frame of one segment (n, H, W), edges replicated, each frame
    registered into its window's middle patch where ``origins`` (one (x, y) per frame, or None)
    moved; and the (n, H, W) pixels missing from any of a window's frames."""
    n = frames.shape[0]
    index = window_indices(np.arange(n), n)
    shifts = window_shifts(origins, index)
    windows = frames[index]
    missing = np.zeros((n, *frames.shape[1:]), dtype=bool)
    for w, p in zip(*np.nonzero(shifts.any(axis=-1)), strict=True):
        windows[w, p], gone = register(frames[index[w, p]], shifts[w, p])
        missing[w] |= gone
    return windows, missing


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


def sequence_slots(n: int, origins=None) -> list[list[FeatureSlot]]:
    """One slot per frame of a segment of ``n`` frames, arranged as its windows (n lists of 5);
    a frame registered into another patch (``origins`` as for :func:`sequence_windows`) shows
    other pixels, and has one more slot per shift it is shown with."""
    index = window_indices(np.arange(n), n)
    shifts = window_shifts(origins, index)
    slots: dict[tuple[int, int, int], FeatureSlot] = {}
    return [
        [slots.setdefault((i, dx, dy), FeatureSlot()) for i, (dx, dy) in zip(row, srow, strict=True)]
        for row, srow in zip(index.tolist(), shifts.tolist(), strict=True)
    ]


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
    missing: np.ndarray | None = None  # (H, W) pixels a registered frame does not cover (None on early windows)


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
        self._origins: deque[tuple[float, float] | None] = deque(maxlen=WINDOW)
        self._pairs: deque[list[FeatureSlot]] = deque(maxlen=WINDOW)  # per middle frame
        # per frame: its slots registered into other patches, by shift, shared by every window
        # (early or final) that shows it with that shift
        self._moved: deque[dict[tuple[int, int], FeatureSlot]] = deque(maxlen=WINDOW)
        self._count = 0  # frames pushed into this segment
        self._emitted = 0  # frames whose window has been handed out

    @property
    def pending(self) -> int:
        """Frames pushed whose window has not been handed out yet (0, 1 or 2)."""
        return self._count - self._emitted

    def push(self, frame: np.ndarray, meta: Any = None, origin: tuple[float, float] | None = None) -> list[Window]:
        """Add the next frame (its patch's ``origin``, where the patch moves: see the module
        docstring; the caller starts a new segment where :func:`recentre_step` says so); return
        the windows it completes."""
        self._frames.append(frame)
        self._slots.append(FeatureSlot())
        self._metas.append(meta)
        self._origins.append(origin)
        self._pairs.append([FeatureSlot() for _ in NEIGHBOURS])
        self._moved.append({})
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
            parts = [
                self._frame(t - first, i) if t + p - HALF < self._count else (self._frames[i], None, None)
                for p, i in enumerate(idx)
            ]
            out.append(
                Window(
                    np.stack([f for f, _, _ in parts]),
                    self._metas[t - first],
                    [s for _, s, _ in parts],
                    self._pairs[t - first],
                )
            )
        return out

    def _frame(self, t: int, i: int) -> tuple[np.ndarray, FeatureSlot, np.ndarray | None]:
        """Buffered frame ``i`` in buffered frame ``t``'s window: registered into ``t``'s patch,
        with its slot (the frame's own where it did not move, else its slot for that shift) and
        the pixels it does not cover (None where it did not move)."""
        a, b = self._origins[t], self._origins[i]
        shift = (0, 0) if a is None or b is None else (round(a[0] - b[0]), round(a[1] - b[1]))
        if shift == (0, 0):
            return self._frames[i], self._slots[i], None
        frame, missing = register(self._frames[i], shift)
        moved = self._moved[i]
        if shift not in moved:
            moved[shift] = FeatureSlot()
        return frame, moved[shift], missing

    def flush(self) -> list[Window]:
        """Windows of all remaining frames (end of segment); the segment starts over empty."""
        out = self._emit(until=self._count, n=self._count)
        self._frames.clear()
        self._slots.clear()
        self._metas.clear()
        self._origins.clear()
        self._pairs.clear()
        self._moved.clear()
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
            parts = [self._frame(t - first, i) for i in idx]
            missing = np.zeros(self._frames[0].shape, dtype=bool)
            for _, _, gone in parts:
                if gone is not None:
                    missing |= gone
            out.append(
                Window(
                    np.stack([f for f, _, _ in parts]),
                    self._metas[t - first],
                    [s for _, s, _ in parts],
                    self._pairs[t - first],
                    missing,
                )
            )
        self._emitted = max(self._emitted, until)
        return out


def split_segments(frame_indices: Sequence[int], origins: Sequence | None = None) -> list[slice]:
    """Consecutive runs of a strictly increasing index sequence, as slices; gaps split runs.

    A change of the patch ``origin`` that the windows do not follow by registering the frames
    (:func:`recentre_step` None: a fraction of a pixel, a jump over MAX_RECENTRE_PX) splits runs
    too, or the model would read the shift as motion.
    Raises ValueError naming the position if an index repeats or goes back.
    """
    starts = [0]
    for k in range(1, len(frame_indices)):
        prev, cur = frame_indices[k - 1], frame_indices[k]
        if cur <= prev:
            raise ValueError(f"frame {k}: frame_index {cur} is not after the previous frame's {prev}")
        if cur != prev + 1 or (origins is not None and recentre_step(origins[k - 1], origins[k]) is None):
            starts.append(k)
    ends = starts[1:] + [len(frame_indices)]
    return [slice(a, b) for a, b in zip(starts, ends, strict=True) if b > a]
