"""Dynamic batching: windows from all requests and streams share one ONNX Runtime call.

Callers ``submit`` a group of windows (one REST request, or the windows one WebSocket message
completed) with their peak-extraction options and await a future. A worker task takes the
first waiting group, keeps gathering groups until the batch holds ``max_batch`` windows or
``max_wait`` has passed, and hands the batch to one of ``workers`` inference threads, so that
the event loop keeps accepting connections while the model runs. With several workers (one per
CPU core by default), batches run at the same time, each ONNX Runtime call on one thread: on
this model's small 33 x 33 tensors that gets more out of the cores than one call spread over
them (measured in ``csist bench speed``). A new batch is gathered only when a worker is free,
so batches fill up while the workers are busy; when several workers are idle, what was gathered
is shared out among them, so that a burst of frames (every track's frame at once) does not wait
for one core.

Peak extraction takes a fraction of a millisecond and runs in the worker right after the
model. The physics fit (``refine="fit"``) takes milliseconds per window and runs in its own
thread instead: the kernels release the GIL, so the next batches' inference overlaps the
previous batch's fit. (Handed to that thread too, the cheap extraction waited for a core
the workers held.)
At most ``workers + MAX_POSTPROCESS_BACKLOG`` batches are in flight; then the gathering waits
too. Answers are released in batch order, so a stream's answers keep their
order. The queue is bounded in windows: a submit that does not fit raises ``Overloaded`` at
once (the caller answers 503 or an error message) instead of letting memory grow.

With the model's streaming parts (``encode``: frames -> features, ``head``: 5 features -> HR
map), a group may carry a :class:`~service.science.windows.FeatureSlot` per frame of each window. When
a batch is dispatched it claims every empty slot of its windows (each distinct slot once: a
REST request's frames, or the new frame of each stream that sent one); its worker encodes those
frames in one call, stores the features and runs only the head on the windows. A frame claimed
by an earlier batch still running is waited for, not encoded twice; a stream's later windows
find their older frames already encoded. Groups without slots (or a model without parts) run
the single graph.

With the head's halves (``align``: one neighbour aligned to the middle frame, ``fuse``: the
aligned neighbours -> HR map), a window's head is its 4 pairs and the fusion, and a group may
carry a pair slot per neighbour, shared with *early work*: when a stream's frame t + 1 arrives,
the window of frame t still lacks frame t + 2, but its neighbours t - 2, t - 1 and t + 1 can be
aligned already, and those of frame t + 1's window up to frame t (:meth:`Batcher.submit_early`).
Early work runs only when no window waits and is dropped, oldest first, when it piles up; a
window finds its pairs aligned (or waits for the
batch aligning them, or aligns them itself), so that when its last frame comes it runs the
encoder on that frame, one pair and the fusion instead of four pairs (the README's speed
section measures the server with and without).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.runtime.metrics import Metrics
from service.science.background import condition
from service.science.physics import SIGMA
from service.science.postprocess import Found, find_targets
from service.science.refine import FitConfig
from service.science.windows import HALF, NEIGHBOURS, WINDOW, FeatureSlot, fuse_features, pair_features

log = logging.getLogger("service.engine.batcher")

MAX_POSTPROCESS_BACKLOG = 2  # inferred batches that may wait for post-processing
# Of a window's deadline, the share kept for what follows the batcher: the answer's trip through
# the event loop and the socket, which the batcher does not see.
DEADLINE_DELIVERY_SHARE = 0.1
BATCH_SHARE_OF_DEADLINE = 0.25  # of a window's deadline, the longest a batch holding it may run
EARLY_BATCH = 4  # early windows (about 6 pairs) per batch: a burst waits at most that long


class Plan(Protocol):
    """What the batcher needs of an execution plan (``service.engine.plans``): windows -> maps,
    and for a streaming plan its parts (``encode`` / ``head``; ``align`` / ``fuse`` when
    ``pairs``)."""

    name: str
    streaming: bool
    pairs: bool
    run: Callable[[np.ndarray], np.ndarray]
    encode: Callable[[np.ndarray], np.ndarray] | None
    head: Callable[[np.ndarray], np.ndarray] | None
    align: Callable[[np.ndarray], np.ndarray] | None
    fuse: Callable[[np.ndarray], np.ndarray] | None


Claim = tuple[FeatureSlot, np.ndarray, threading.Event]  # a claimed slot, its frame, the claim
PairClaim = tuple[FeatureSlot, threading.Event, "_Item", int, int]  # slot, claim, item, window, position


def _conditioned(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``fn`` on frames (..., H, W) with their background planes removed, as the network was trained."""

    def run(frames: np.ndarray) -> np.ndarray:
        return fn(condition(frames))

    return run


class Overloaded(RuntimeError):
    """The inference queue is full; retry later."""


class DeadlineExceeded(Overloaded):
    """A window could not be inferred by its deadline (predicted at admission from the queue
    ahead, or found when its batch was gathered); it was not computed."""


class ShuttingDown(RuntimeError):
    """The batcher no longer accepts work."""


class InferenceFailed(RuntimeError):
    """The model failed or produced a non-finite map for a window."""


@dataclass(frozen=True)
class PeakOptions:
    """Peak-extraction settings of one group; hashable so that a batch can group by them."""

    threshold: float
    refine: str
    max_targets: int | None = None
    ratio: int = 3
    mode: str | None = None  # peak rule of service.science.peaks; None: its default
    # sensor calibration for refine="fit": PSF sigma (px) and the level at which pixels clip
    psf_sigma: float = SIGMA
    saturation: float | None = 255.0
    brightness_range: tuple[float, float] | None = None  # None: the fit's default
    snr: float | None = None  # peak threshold relative to each window's noise (then ``threshold`` is unused)

    def fit_config(self) -> FitConfig | None:
        if self.refine != "fit":
            return None
        return FitConfig.calibrated(self.psf_sigma, self.saturation, self.brightness_range)


@dataclass
class GroupResult:
    """Answer for one submitted group: one (K, 3) target array per window, plus timings."""

    peaks: list[np.ndarray]
    queue_s: float
    inference_s: float
    postprocess_s: float
    batch_size: int
    refined: bool = True  # False: the requested fit was skipped to keep the deadline (network peaks)
    # per window, where the fit answered: (K, 4) uncertainties and the count's confidence
    uncertainty: list[np.ndarray | None] | None = None
    count_confidence: list[float | None] | None = None


@dataclass
class _Item:
    windows: np.ndarray  # (k, 5, H, W) float32
    options: PeakOptions | None
    future: asyncio.Future | None  # None for early work (nobody waits for it)
    slots: list[list[FeatureSlot | None]] | None = None  # (k lists of 5) when features may be cached
    pairs: list[list[FeatureSlot]] | None = None  # (k lists of 4) aligned neighbours, NEIGHBOURS order
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    shared_out: bool = False  # put back by a batch that shared its groups out: no second wait
    deadline: float | None = None  # perf_counter time by which inference must start
    owner: object | None = None  # who submitted it (a connection, a request): see Batcher.cancel
    missing: np.ndarray | None = None  # (k, H, W) pixels registered frames do not cover (the fit leaves them out)

    @property
    def early(self) -> bool:
        """Early work (nobody waits): a window short of frames (None slots), whose pairs that
        are there are all it computes."""
        return self.future is None

    @property
    def size(self) -> int:
        return int(self.windows.shape[0])


class Batcher:
    """Gathers submitted windows into batches and runs the execution plan on them off the loop."""

    def __init__(
        self,
        plan: Plan,
        metrics: Metrics,
        max_batch: int = 64,
        max_wait_s: float = 0.002,
        max_queue: int = 4096,
        workers: int = 1,
        pairs: bool = True,
        window_s: float = 0.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        # the network sees every frame with its background plane removed (service.science.background)
        self._run_model = _conditioned(plan.run)
        self._encode = _conditioned(plan.encode) if plan.streaming else None
        self._head = plan.head if plan.streaming else None
        self._align = plan.align if pairs and plan.pairs else None
        self._fuse = plan.fuse if pairs and plan.pairs else None
        # Measured costs (EWMA), for admission by predicted wait and for the fit's degradation:
        # inference seconds per window (seeded by the plan choice's timing) and fit seconds per
        # window in the post thread.
        self.window_s = window_s
        self.fit_s = 0.0
        self._post_backlog = 0  # windows handed to the post thread, not yet done
        self.shed = 0  # windows not computed: past their deadline (admission or dispatch)
        self.degraded = 0  # windows answered without their fit to keep the deadline
        self.cancelled = 0  # queued windows dropped because their submitter went away
        self.frames_encoded = 0  # frames run through ``encode`` (feature-cache path)
        self.windows_run = 0  # windows through ``head`` (or ``fuse``) or the single graph
        self.pairs_aligned = 0  # neighbours run through ``align``
        self.early_pairs = 0  # ... of them, in early batches (before their window was complete)
        self._counts = threading.Lock()  # the counters are bumped by several worker threads
        self._metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._items: deque[_Item] = deque()
        self._early: deque[_Item] = deque(maxlen=max_queue)  # a full queue drops its oldest
        self._early_runs: set[asyncio.Task] = set()
        self._queued = 0  # windows waiting (not yet taken by the worker)
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._post_executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._busy = 0  # workers holding a batch
        self._in_flight = 0  # batches inferred or post-processed, not yet answered

    @property
    def queued_windows(self) -> int:
        return self._queued

    def start(self) -> None:
        """Start the worker on the running loop."""
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="csist-infer")
        self._post_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="csist-post")
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="csist-batcher")

    @property
    def caches_features(self) -> bool:
        """Whether groups submitted with slots run encoder + head (else the single graph)."""
        return self._encode is not None and self._head is not None

    @property
    def caches_pairs(self) -> bool:
        """Whether those groups run encoder + align + fuse instead, so that :meth:`submit_early`
        can align a window's first neighbours before its last frame comes."""
        return self.caches_features and self._align is not None and self._fuse is not None

    def submit_early(
        self, frames: np.ndarray, slots: list[FeatureSlot | None], pairs: list[FeatureSlot], owner: object | None = None
    ) -> bool:
        """Queue the work a window allows before it is complete: encode the frames it has and
        align those neighbours to the middle frame, into ``slots`` / ``pairs``.

        ``frames`` (5, H, W); the rows whose ``slots`` entry is None (frames still to come) are
        not read. Early work runs only when no window waits (a burst is never queued behind it)
        and is dropped, oldest first, when it piles up; a window whose pairs are not ready
        computes them itself.
        Returns False (nothing queued) when pairs are not cached or the batcher is closing.
        """
        if not self.caches_pairs or self._closing or self._worker is None:
            return False
        self._early.append(_Item(frames[None], None, None, [slots], [pairs], owner=owner))
        self._wakeup.set()
        return True

    def submit(
        self,
        windows: np.ndarray,
        options: PeakOptions,
        slots: list[list[FeatureSlot]] | None = None,
        pairs: list[list[FeatureSlot]] | None = None,
        deadline_s: float | None = None,
        owner: object | None = None,
        missing: np.ndarray | None = None,
    ) -> asyncio.Future:
        """Queue a group of windows; the returned future resolves to a :class:`GroupResult`.

        ``slots``: the feature slot of each frame of each window (see module docstring);
        ``pairs``: the slots of each window's aligned neighbours (shared with early work).
        ``deadline_s``: seconds from now by which its inference must be done; a group that the
        queue ahead of it would make miss it is refused at once (DeadlineExceeded), and one that
        can no longer make it when its batch is gathered is dropped (its future raises
        DeadlineExceeded). The fit is skipped for windows it would make late.
        ``owner``: what :meth:`cancel` drops the group by. ``missing``: (k, H, W) pixels of each
        window that a frame registered into its patch does not cover (service.science.windows);
        a mask with none is dropped, so that post-processing takes its path for whole windows.
        Raises Overloaded (queue full), DeadlineExceeded or ShuttingDown immediately rather
        than waiting.
        """
        if self._closing or self._worker is None:
            raise ShuttingDown("the service is shutting down")
        k = int(windows.shape[0])
        if k == 0:
            raise ValueError("empty group")
        if self._queued + k > self.max_queue:
            raise Overloaded(f"inference queue is full ({self._queued} of {self.max_queue} windows waiting)")
        now = time.perf_counter()
        budget_s = None if deadline_s is None else deadline_s * (1.0 - DEADLINE_DELIVERY_SHARE)
        deadline = None if budget_s is None else now + budget_s
        if budget_s is not None and self.predicted_wait_s() + k * self.window_s > budget_s:
            self._shed(k)
            raise DeadlineExceeded(
                f"the {self._queued} windows queued ahead would make this one miss its deadline of "
                f"{deadline_s * 1000:.0f} ms (predicted wait {self.predicted_wait_s() * 1000:.0f} ms)"
            )
        future = asyncio.get_running_loop().create_future()
        if slots is not None and len(slots) != k:
            raise ValueError(f"{len(slots)} slot rows for {k} windows")
        if pairs is not None and (slots is None or len(pairs) != k):
            raise ValueError(f"pair slots need feature slots, and one row per window ({k})")
        if missing is not None and missing.shape != (k, *windows.shape[2:]):
            raise ValueError(f"missing pixels of shape {missing.shape} for windows of shape {windows.shape}")
        if missing is not None and not missing.any():
            missing = None
        self._items.append(
            _Item(windows, options, future, slots, pairs, enqueued=now, deadline=deadline, owner=owner, missing=missing)
        )
        self._queued += k
        self._metrics.queue_windows.set(self._queued)
        self._wakeup.set()
        return future

    def predicted_wait_s(self) -> float:
        """Seconds before a window submitted now would start inference: the windows queued
        ahead of it at the measured cost per window, shared by the workers."""
        return self._queued * self.window_s / self.workers

    def cancel(self, owner: object) -> int:
        """Drop the queued windows and early work of ``owner`` (a client that went away): their
        futures are cancelled and nothing of them is computed. Returns the windows dropped; a
        batch already running finishes."""
        dropped = 0
        for item in [i for i in self._items if i.owner is owner]:
            self._items.remove(item)
            dropped += item.size
            if item.future is not None and not item.future.done():
                item.future.cancel()
        self._queued -= dropped
        self.cancelled += dropped
        early = [i for i in self._early if i.owner is not owner]
        if len(early) != len(self._early):
            self._early.clear()
            self._early.extend(early)
        self._metrics.queue_windows.set(self._queued)
        if dropped:
            self._metrics.cancelled_windows.inc(dropped)
        return dropped

    def _shed(self, windows: int) -> None:
        self.shed += windows
        self._metrics.shed_windows.inc(windows)

    def _live(self, batch: list[_Item], now: float) -> list[_Item]:
        """The items of a gathered batch still worth computing: not cancelled, and able to make
        their deadline when the batch ends (the others are answered DeadlineExceeded now)."""
        live = []
        end = now + sum(item.size for item in batch) * self.window_s
        for item in batch:
            if item.future is not None and item.future.done():  # cancelled by its caller
                continue
            if item.deadline is not None and end > item.deadline:
                self._shed(item.size)
                late = (now - item.enqueued) * 1000
                item.future.set_exception(
                    DeadlineExceeded(
                        f"waited {late:.0f} ms for inference, too long to be answered within its deadline of "
                        f"{(item.deadline - item.enqueued) / (1.0 - DEADLINE_DELIVERY_SHARE) * 1000:.0f} ms"
                    )
                )
                continue
            live.append(item)
        return live

    async def stop(self) -> None:
        """Refuse new work, finish everything already queued, then stop the worker."""
        self._closing = True
        if self._worker is None:
            return
        self._wakeup.set()
        await self._worker
        self._worker = None
        self._executor.shutdown(wait=True)
        self._post_executor.shutdown(wait=True)

    async def _next_item(self, timeout: float | None, early: bool = False) -> _Item | None:
        """Pop the next item, waiting up to ``timeout`` (None: until one comes or we close);
        with ``early``, early work when no window waits."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self._items:
            if early and self._early:
                return self._early.popleft()
            if self._closing:
                return None
            remaining = None if deadline is None else deadline - time.perf_counter()
            if remaining is not None and remaining <= 0:
                return None
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return None
        return self._items.popleft()

    async def _gather(self) -> list[_Item] | None:
        """The next batch: the first item plus whatever fits and arrives within max_wait.

        When other workers are idle at the end of the wait, the gathered groups are shared out:
        this batch keeps the first 1 / (idle + 1) of the windows (whole groups) and the rest go
        back to the front of the queue for the next worker, so that a burst (every track's
        frame at once) runs on all idle cores instead of one.
        """
        first = await self._next_item(None, early=True)
        if first is None:
            return None
        batch, n = [first], first.size
        if first.early:
            while self._early and n < EARLY_BATCH:
                batch.append(self._early.popleft())
                n += 1
            return batch
        deadline = time.perf_counter() + (0.0 if first.shared_out else self.max_wait_s)
        cap = min(self.max_batch, self._batch_cap(first))
        while n < cap:
            if self._items:
                if n + self._items[0].size > min(cap, self._batch_cap(self._items[0])):
                    break  # the next group waits for the next batch, groups are not split
                item = self._items.popleft()
            else:
                item = await self._next_item(deadline - time.perf_counter())
                if item is None:
                    break
            batch.append(item)
            n += item.size
            cap = min(cap, self._batch_cap(item))
        # _busy and _in_flight count this batch already; a share is only worth splitting off if a
        # worker and an in-flight slot are free for it now
        idle_others = min(self.workers - self._busy, self.workers + MAX_POSTPROCESS_BACKLOG - self._in_flight)
        if idle_others > 0 and len(batch) > 1:
            batch = self._keep(batch, -(-n // (idle_others + 1)))
        elif self.workers > 1 and len(batch) > 1 and not first.shared_out:
            # the others are busy: take a fair share of what waits and leave the rest to the
            # next worker that frees (or to this one, if it frees first): a backlog that one
            # worker takes whole would leave the others idle while it works through it
            batch = self._keep(batch, -(-self._queued // self.workers))
        return batch

    def _batch_cap(self, item: _Item) -> int:
        """The most windows a batch holding ``item`` may take: at the measured cost per window,
        a batch lasts at most a quarter of the item's deadline, so that what starts in time also
        answers in time (large batches would add their whole duration to every answer)."""
        if item.deadline is None or self.window_s <= 0:
            return self.max_batch
        return max(1, int(BATCH_SHARE_OF_DEADLINE * (item.deadline - item.enqueued) / self.window_s))

    def _keep(self, batch: list[_Item], windows: int) -> list[_Item]:
        """The first groups of ``batch`` holding at least ``windows`` windows; the rest go back
        to the front of the queue (marked: they have waited, no second gathering wait)."""
        kept, keep = 0, 0
        while kept < windows and keep < len(batch):
            kept += batch[keep].size
            keep += 1
        for item in batch[keep:]:
            item.shared_out = True
        self._items.extendleft(reversed(batch[keep:]))
        return batch[:keep]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        free_workers = asyncio.Semaphore(self.workers)
        in_flight = asyncio.Semaphore(self.workers + MAX_POSTPROCESS_BACKLOG)
        previous: asyncio.Task | None = None  # the batch answered just before the next one
        while True:
            await in_flight.acquire()
            self._in_flight += 1
            await free_workers.acquire()
            self._busy += 1  # this batch's worker (only the loop touches the counts)
            batch = await self._gather()
            if batch is None:
                break
            now = time.perf_counter()
            early = batch[0].early
            for item in batch:
                item.started = now
                self._queued -= 0 if early else item.size
            self._metrics.queue_windows.set(self._queued)
            batch = batch if early else self._live(batch, now)
            if not batch:
                self._busy -= 1
                free_workers.release()
                self._in_flight -= 1
                in_flight.release()
                continue
            claims = self._claim(batch)
            if early:  # no answers: not in the answer order, and nothing to do if all is done
                if not claims[0] and not claims[1]:
                    self._busy -= 1
                    free_workers.release()
                    self._in_flight -= 1
                    in_flight.release()
                    continue
                run = loop.create_task(self._run(batch, claims, None, free_workers, in_flight))
                self._early_runs.add(run)
                run.add_done_callback(self._early_runs.discard)
                continue
            previous = loop.create_task(self._run(batch, claims, previous, free_workers, in_flight))
        if previous is not None:
            await asyncio.wait([previous])  # each batch awaits the one before it: all are done
        if self._early_runs:
            await asyncio.wait(list(self._early_runs))

    def _claim(self, batch: list[_Item]) -> tuple[list[Claim], list[PairClaim] | None] | None:
        """On the loop, in batch order: the empty slots this batch will encode and the empty
        pair slots it will align, claimed."""
        if not self._uses_parts(batch):
            return None
        claims, pair_claims = [], [] if self.caches_pairs else None
        for item in batch:
            for w, row in enumerate(item.slots):
                for k, slot in enumerate(row):
                    event = slot.claim() if slot is not None else None
                    if event is not None:
                        claims.append((slot, item.windows[w, k], event))
            if pair_claims is None:
                continue
            if item.pairs is None:  # a REST group: its pairs are its own
                item.pairs = [[FeatureSlot() for _ in NEIGHBOURS] for _ in range(item.size)]
            for w, row in enumerate(item.pairs):
                for slot, p in zip(row, NEIGHBOURS, strict=True):
                    event = slot.claim() if item.slots[w][p] is not None else None
                    if event is not None:
                        pair_claims.append((slot, event, item, w, p))
        return claims, pair_claims

    async def _run(
        self,
        batch: list[_Item],
        claims: tuple[list[Claim], list[PairClaim] | None] | None,
        previous: asyncio.Task | None,
        free_workers: asyncio.Semaphore,
        in_flight: asyncio.Semaphore,
    ) -> None:
        """Infer (a worker thread), post-process (the post thread), answer after ``previous``."""
        loop = asyncio.get_running_loop()
        results: list[GroupResult] | None = None
        error: Exception | None = None
        try:
            # peak extraction is a fraction of a millisecond: done by the worker, it does not
            # wait for the post thread to get a core; the physics fit overlaps the next batches
            inline = not any(item.options is not None and item.options.refine == "fit" for item in batch)
            try:
                maps, infer_s, results = await loop.run_in_executor(self._executor, self._infer, batch, claims, inline)
            except Exception as exc:  # the model or the peak extraction failed: all hear it
                log.exception("inference failed")
                error = exc
            finally:
                frames, pairs = claims or ((), None)
                for slot, _, event in frames:
                    slot.fill(None, event)  # no-op unless never filled: don't leave it claimed
                for slot, event, *_ in pairs or ():
                    slot.fill(None, event)
                self._busy -= 1
                free_workers.release()
            if batch[0].early:
                return  # nobody waits for early work; a failure leaves the pairs to their windows
            if error is None and results is None:
                n = sum(item.size for item in batch)
                self._post_backlog += n
                try:
                    results = await loop.run_in_executor(self._post_executor, self._postprocess, batch, maps, infer_s)
                except Exception as exc:
                    log.exception("post-processing failed")
                    error = exc
                finally:
                    self._post_backlog -= n
            if previous is not None:
                await asyncio.wait([previous])  # its outcome is its callers', not ours
        finally:
            self._in_flight -= 1
            in_flight.release()
            if results is None:  # failed, or cancelled (the loop is going away)
                self._fail(batch, error or ShuttingDown("the service is shutting down"))
        if results is not None:
            for item, result in zip(batch, results, strict=True):
                if item.future is not None and not item.future.done():  # a caller may have been cancelled meanwhile
                    item.future.set_result(result)

    @staticmethod
    def _fail(batch: list[_Item], exc: Exception) -> None:
        for item in batch:
            if item.future is not None and not item.future.done():
                item.future.set_exception(InferenceFailed(f"inference failed: {exc}"))

    @staticmethod
    def _chunked(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, size: int) -> np.ndarray:
        return np.concatenate([fn(x[a : a + size]) for a in range(0, len(x), size)])

    def _count(self, frames: int = 0, windows: int = 0, pairs: int = 0, early: bool = False) -> None:
        with self._counts:
            self.frames_encoded += frames
            self.windows_run += windows
            self.pairs_aligned += pairs
            self.early_pairs += pairs if early else 0

    def _uses_parts(self, batch: list[_Item]) -> bool:
        return self.caches_features and all(i.slots is not None for i in batch)

    def _run_cached(self, batch: list[_Item], claims: tuple[list[Claim], list[PairClaim] | None]) -> np.ndarray | None:
        """Encode the claimed frames (one call), wait for frames other batches encode; then run
        the head, or align the claimed pairs (one call), wait for pairs other batches align and
        fuse. An early batch stops after the pairs (None)."""
        frames, pairs = claims
        if frames:  # on failure, ``_run`` gives the claims up and the waiters go on
            x = np.stack([frame for _, frame, _ in frames])
            feats = self._chunked(self._encode, x, self.max_batch * WINDOW)
            for (slot, _, event), f in zip(frames, feats, strict=True):
                slot.fill(f.copy(), event)  # a view would keep the whole batch's array alive
            self._count(frames=len(frames))
        if pairs is None:
            rows = [
                np.stack([self._features(slot, item.windows[w, k]) for k, slot in enumerate(row)])
                for item in batch
                for w, row in enumerate(item.slots)
            ]
            return self._chunked(self._head, np.stack(rows), self.max_batch)
        if pairs:
            mids, nbs = zip(*(self._pair(item, w, p) for _, _, item, w, p in pairs))
            x = pair_features(np.stack(mids), np.stack(nbs), [p for *_, p in pairs])  # (P, 5, F)
            aligned = self._chunked(self._align, x, self.max_batch * len(NEIGHBOURS))
            for (slot, event, *_), a in zip(pairs, aligned, strict=True):
                slot.fill(a.copy(), event)
            self._count(pairs=len(pairs), early=batch[0].early)
        if batch[0].early:
            return None
        mids, rows = [], []
        for item in batch:
            for w, row in enumerate(item.pairs):
                mids.append(self._features(item.slots[w][HALF], item.windows[w, HALF]))
                rows.append(np.stack([self._aligned(slot, item, w, p) for slot, p in zip(row, NEIGHBOURS)]))
        return self._chunked(self._fuse, fuse_features(np.stack(mids), np.stack(rows)), self.max_batch)

    def _pair(self, item: _Item, w: int, p: int) -> tuple[np.ndarray, np.ndarray]:
        """The features of window ``w``'s middle frame and of its neighbour at position ``p``."""
        slots = item.slots[w]
        return self._features(slots[HALF], item.windows[w, HALF]), self._features(slots[p], item.windows[w, p])

    def _aligned(self, slot: FeatureSlot, item: _Item, w: int, p: int) -> np.ndarray:
        """A pair's aligned neighbour (see :meth:`_ensure`)."""

        def align() -> np.ndarray:
            mid, nb = self._pair(item, w, p)
            aligned = self._align(pair_features(mid[None], nb[None], [p]))[0].copy()
            self._count(pairs=1)
            return aligned

        return self._ensure(slot, align)

    def _features(self, slot: FeatureSlot, frame: np.ndarray) -> np.ndarray:
        """A frame's features (see :meth:`_ensure`)."""

        def encode() -> np.ndarray:
            features = self._encode(frame[None])[0].copy()
            self._count(frames=1)
            return features

        return self._ensure(slot, encode)

    @staticmethod
    def _ensure(slot: FeatureSlot, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The slot's array: already there, or after the batch computing it is done; if that
        batch failed, computed here (claimed first, so that no one else computes it too)."""
        while slot.features is None:
            event = slot.claim()
            if event is None:
                slot.wait()
                continue
            value = None
            try:
                value = compute()
            finally:
                slot.fill(value, event)
        return slot.features

    @staticmethod
    def _windows(batch: list[_Item]) -> np.ndarray:
        return batch[0].windows if len(batch) == 1 else np.concatenate([i.windows for i in batch])

    @staticmethod
    def _missing(batch: list[_Item]) -> np.ndarray | None:
        """The batch's missing pixels (n, H, W), or None where no window misses any."""
        if all(i.missing is None for i in batch):
            return None
        return np.concatenate(
            [np.zeros((i.size, *i.windows.shape[2:]), dtype=bool) if i.missing is None else i.missing for i in batch]
        )

    def _infer(
        self, batch: list[_Item], claims: list[Claim] | None, inline: bool = False
    ) -> tuple[np.ndarray, float, list[GroupResult] | None]:
        """HR maps of all windows of the batch, the seconds they took (including any wait for
        frames that another batch encodes) and, if ``inline``, the answers.

        Runs in an inference thread. A single group larger than max_batch is run in chunks.
        """
        n = sum(item.size for item in batch)
        t0 = time.perf_counter()
        if claims is not None:
            maps = self._run_cached(batch, claims)
        else:
            maps = self._chunked(self._run_model, self._windows(batch), self.max_batch)
        if maps is None:  # early work: nothing to answer, not a batch of windows
            return None, time.perf_counter() - t0, None
        self._count(windows=n)
        infer_s = time.perf_counter() - t0
        # a batch is cheaper per window than one window alone: the estimate follows what runs
        self.window_s = infer_s / n if self.window_s == 0 else 0.8 * self.window_s + 0.2 * infer_s / n
        if not np.isfinite(maps).all():
            raise InferenceFailed("the model produced non-finite values")
        self._metrics.inference_seconds.observe(infer_s)
        self._metrics.batch_size.observe(n)
        degrade = not inline and self._late_for_fit(batch)
        if degrade or inline:
            return maps, infer_s, self._postprocess(batch, maps, infer_s, degrade)
        return maps, infer_s, None

    def _late_for_fit(self, batch: list[_Item]) -> bool:
        """Whether the fit of this batch, queued behind the post thread's backlog at its
        measured cost, would answer after the batch's earliest deadline."""
        deadlines = [i.deadline for i in batch if i.deadline is not None]
        if not deadlines or self.fit_s == 0:
            return False
        fit = sum(i.size for i in batch if i.options is not None and i.options.refine == "fit")
        return time.perf_counter() + (self._post_backlog + fit) * self.fit_s > min(deadlines)

    def _postprocess(
        self, batch: list[_Item], maps: np.ndarray, infer_s: float, degrade: bool = False
    ) -> list[GroupResult]:
        """Targets of every window, one vectorised call per distinct options (post thread).

        ``degrade``: the windows asking for the fit get the network's peaks instead (answered
        with ``refined`` False), because the fit would be late."""
        windows = self._windows(batch)
        missing = self._missing(batch)
        n = windows.shape[0]
        bounds = np.cumsum([0] + [i.size for i in batch])
        by_options: dict[PeakOptions, list[int]] = {}
        for k, item in enumerate(batch):
            by_options.setdefault(item.options, []).append(k)
        peaks: list[list[Found] | None] = [None] * len(batch)
        post: list[float] = [0.0] * len(batch)
        refined = [True] * len(batch)
        for opts, members in by_options.items():
            p0 = time.perf_counter()
            sel = np.concatenate([np.arange(bounds[k], bounds[k + 1]) for k in members])
            skip_fit = degrade and opts.refine == "fit"
            found = find_targets(
                maps[sel],
                windows[sel],
                threshold=opts.threshold,
                refine="none" if skip_fit else opts.refine,
                max_targets=opts.max_targets,
                ratio=opts.ratio,
                mode=opts.mode,
                fit_config=opts.fit_config(),
                snr=opts.snr,
                details=True,
                missing=None if missing is None else missing[sel],
            )
            dt = time.perf_counter() - p0
            if skip_fit:
                self.degraded += len(sel)
                self._metrics.degraded_windows.inc(len(sel))
                for k in members:
                    refined[k] = False
            elif opts.refine == "fit":
                self.fit_s = dt / len(sel) if self.fit_s == 0 else 0.8 * self.fit_s + 0.2 * dt / len(sel)
            at = 0
            for k in members:
                size = batch[k].size
                peaks[k] = found[at : at + size]
                post[k] = dt
                at += size
        results = []
        for k, item in enumerate(batch):
            queue_s = item.started - item.enqueued
            self._metrics.queue_wait_seconds.observe(queue_s)
            found = peaks[k]
            results.append(
                GroupResult(
                    [f.targets for f in found],
                    queue_s,
                    infer_s,
                    post[k],
                    n,
                    refined[k],
                    [f.uncertainty for f in found],
                    [f.count_confidence for f in found],
                )
            )
        return results
