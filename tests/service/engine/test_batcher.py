"""The batcher on its own: gathering, limits, overload, shutdown, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import numpy as np
import pytest

from service.engine.batcher import Batcher, InferenceFailed, Overloaded, PeakOptions, ShuttingDown
from service.engine.plans import FunctionPlan
from service.runtime.metrics import Metrics
from service.science.peaks import extract_peaks
from service.science.windows import HALF, NEIGHBOURS, FeatureSlot, SegmentWindows, sequence_slots, sequence_windows

OPTS = PeakOptions(threshold=70.0, refine="centroid")


class FakeModel:
    """Maps a window to a 33x33 map with one peak whose height/position encode the window."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        self.gate.wait(5)
        self.calls.append(windows.shape[0])
        self.threads.add(threading.current_thread().name)
        out = np.zeros((windows.shape[0], 33, 33), dtype=np.float32)
        for k, w in enumerate(windows):
            v = round(float(w[2, 0, 0]))  # the middle frame's first pixel (its background plane is ~0)
            out[k, 16, 3 + int(v) % 27] = 100.0 + v
        return out


def windows_with(values) -> np.ndarray:
    w = np.zeros((len(values), 5, 11, 11), dtype=np.float32)
    w[:, 2, 0, 0] = values
    return w


def run(coro):
    return asyncio.run(coro)


def test_concurrent_groups_share_one_call_and_get_their_own_answers():
    model = FakeModel()

    async def main():
        b = Batcher(FunctionPlan(model), Metrics(), max_batch=64, max_wait_s=0.05)
        b.start()
        futures = [b.submit(windows_with([v, v + 1]), OPTS) for v in (0, 10, 20)]
        results = await asyncio.gather(*futures)
        await b.stop()
        return results

    results = run(main())
    assert model.calls == [6]  # 3 groups of 2 windows: one inference call
    assert all(r.batch_size == 6 for r in results)
    assert not any(name == threading.main_thread().name for name in model.threads)
    for v, r in zip((0, 10, 20), results):
        assert len(r.peaks) == 2
        for k, peaks in enumerate(r.peaks):
            value = v + k
            expected = extract_peaks(model(windows_with([value]))[0], threshold=70.0)
            np.testing.assert_allclose(peaks, expected)
            assert peaks[0, 2] == 100.0 + value


def test_max_batch_is_respected_and_big_groups_are_chunked():
    model = FakeModel()

    async def main():
        b = Batcher(FunctionPlan(model), Metrics(), max_batch=4, max_wait_s=0.05)
        b.start()
        f1 = b.submit(windows_with([1, 2, 3]), OPTS)
        f2 = b.submit(windows_with([4, 5]), OPTS)  # does not fit with f1: next batch
        f3 = b.submit(windows_with(list(range(10))), OPTS)  # alone, in chunks of 4
        r = await asyncio.gather(f1, f2, f3)
        await b.stop()
        return r

    r1, r2, r3 = run(main())
    assert model.calls == [3, 2, 4, 4, 2]
    assert [len(r.peaks) for r in (r1, r2, r3)] == [3, 2, 10]
    assert [p[0, 2] for p in r3.peaks] == [100.0 + v for v in range(10)]


def test_options_apply_per_group():
    model = FakeModel()

    async def main():
        b = Batcher(FunctionPlan(model), Metrics(), max_batch=64, max_wait_s=0.05)
        b.start()
        low = b.submit(windows_with([5]), PeakOptions(threshold=70.0, refine="none"))
        high = b.submit(windows_with([5]), PeakOptions(threshold=200.0, refine="none"))
        r = await asyncio.gather(low, high)
        await b.stop()
        return r

    low, high = run(main())
    assert model.calls == [2]
    assert low.peaks[0].shape == (1, 3) and high.peaks[0].shape == (0, 3)


def test_full_queue_raises_overloaded_then_recovers():
    model = FakeModel()
    model.gate.clear()  # the first batch blocks in the model, the rest must queue

    async def main():
        b = Batcher(FunctionPlan(model), Metrics(), max_batch=2, max_wait_s=0.0, max_queue=4)
        b.start()
        first = b.submit(windows_with([1]), OPTS)
        await asyncio.sleep(0.05)  # the worker took it and is stuck in the model
        queued = [b.submit(windows_with([2, 3]), OPTS), b.submit(windows_with([4, 5]), OPTS)]
        assert b.queued_windows == 4
        with pytest.raises(Overloaded, match="queue is full"):
            b.submit(windows_with([6]), OPTS)
        model.gate.set()
        await asyncio.gather(first, *queued)
        later = await b.submit(windows_with([7]), OPTS)  # capacity is back
        await b.stop()
        return later

    assert run(main()).peaks[0][0, 2] == 107.0


def test_stop_finishes_queued_work_then_refuses():
    model = FakeModel()
    model.gate.clear()

    async def main():
        b = Batcher(FunctionPlan(model), Metrics(), max_batch=1, max_wait_s=0.0)
        b.start()
        futures = [b.submit(windows_with([v]), OPTS) for v in range(3)]
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0.02)
        with pytest.raises(ShuttingDown):
            b.submit(windows_with([9]), OPTS)
        model.gate.set()
        await stopping
        return [f.result() for f in futures]

    results = run(main())
    assert [r.peaks[0][0, 2] for r in results] == [100.0, 101.0, 102.0]


def test_model_failure_reaches_every_caller_and_the_worker_survives():
    calls = []

    def flaky(windows):
        calls.append(len(windows))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return np.zeros((len(windows), 33, 33), dtype=np.float32)

    def nan_model(windows):
        return np.full((len(windows), 33, 33), np.nan, dtype=np.float32)

    async def main():
        b = Batcher(FunctionPlan(flaky), Metrics(), max_batch=8, max_wait_s=0.02)
        b.start()
        f1, f2 = b.submit(windows_with([1]), OPTS), b.submit(windows_with([2]), OPTS)
        errors = await asyncio.gather(f1, f2, return_exceptions=True)
        ok = await b.submit(windows_with([3]), OPTS)
        await b.stop()
        b2 = Batcher(FunctionPlan(nan_model), Metrics(), max_batch=8, max_wait_s=0.0)
        b2.start()
        nan_error = await asyncio.gather(b2.submit(windows_with([1]), OPTS), return_exceptions=True)
        await b2.stop()
        return errors, ok, nan_error[0]

    errors, ok, nan_error = run(main())
    assert all(isinstance(e, InferenceFailed) and "boom" in str(e) for e in errors)
    assert ok.peaks[0].shape == (0, 3)
    assert isinstance(nan_error, InferenceFailed) and "non-finite" in str(nan_error)


def test_metrics_record_batches():
    model = FakeModel()
    metrics = Metrics()

    async def main():
        b = Batcher(FunctionPlan(model), metrics, max_batch=64, max_wait_s=0.05)
        b.start()
        await asyncio.gather(*(b.submit(windows_with([v]), OPTS) for v in range(5)))
        await b.stop()

    run(main())
    reg = metrics.registry
    assert reg.get_sample_value("csist_batch_size_count") == 1
    assert reg.get_sample_value("csist_batch_size_sum") == 5
    assert reg.get_sample_value("csist_inference_seconds_count") == 1
    assert reg.get_sample_value("csist_queue_wait_seconds_count") == 5
    assert reg.get_sample_value("csist_queue_windows") == 0


def test_inference_does_not_block_the_event_loop():
    def slow_model(windows):
        time.sleep(0.3)  # stands in for a long ONNX Runtime call
        return np.zeros((len(windows), 33, 33), dtype=np.float32)

    async def main():
        b = Batcher(FunctionPlan(slow_model), Metrics(), max_batch=8, max_wait_s=0.0)
        b.start()
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await b.submit(windows_with([1]), OPTS)
        task.cancel()
        await b.stop()
        return ticks

    assert run(main()) >= 10  # the loop kept running while the model ran


class FakeParts:
    """Encoder = first pixel of each frame; head = the single FakeModel rule on the middle
    frame's feature, so cached and uncached answers must agree."""

    def __init__(self):
        self.encoded: list[int] = []
        self.heads: list[int] = []

    def encode(self, frames: np.ndarray) -> np.ndarray:
        self.encoded.append(len(frames))
        feats = np.zeros((len(frames), 1089), dtype=np.float32)
        feats[:, 0] = frames[:, 0, 0]
        return feats

    def head(self, feats: np.ndarray) -> np.ndarray:
        self.heads.append(len(feats))
        return FakeModel()(windows_with(feats[:, 2, 0]))


def test_cached_path_encodes_each_distinct_slot_once_per_batch_and_reuses_it():
    parts, model = FakeParts(), FakeModel()

    async def main():
        b = Batcher(FunctionPlan(model, encode=parts.encode, head=parts.head), Metrics(), max_batch=64, max_wait_s=0.05)
        b.start()
        frames = np.zeros((6, 11, 11), dtype=np.float32)
        frames[:, 0, 0] = [3, 4, 5, 6, 7, 8]
        slots = sequence_slots(6)
        first = await b.submit(sequence_windows(frames)[0], OPTS, slots)
        assert parts.encoded == [6] and b.frames_encoded == 6  # 30 frame uses, 6 distinct
        again = await b.submit(sequence_windows(frames)[0], OPTS, slots)  # same slots: no encode
        assert parts.encoded == [6] and parts.heads == [6, 6]
        # a group without slots in the same batch sends the whole batch to the single graph
        fresh = [[FeatureSlot() for _ in range(5)]]
        mixed = await asyncio.gather(b.submit(windows_with([9]), OPTS, fresh), b.submit(windows_with([9]), OPTS))
        await b.stop()
        return first, again, mixed

    first, again, mixed = run(main())
    assert [p.tolist() for p in first.peaks] == [p.tolist() for p in again.peaks]
    assert [round(p[0, 2]) for p in first.peaks] == [103, 104, 105, 106, 107, 108]
    assert model.calls == [2] and mixed[0].peaks[0][0, 2] == mixed[1].peaks[0][0, 2] == 109.0


def test_inference_overlaps_the_fit_and_answers_keep_their_order(monkeypatch):
    """Batch 2's inference runs while batch 1 is fitted (the post thread); answers come back in
    order."""
    import service.engine.batcher as batcher_module

    events: list[tuple[str, float]] = []
    real = batcher_module.find_targets
    fit = dataclasses.replace(OPTS, refine="fit")

    def slow_find_targets(maps, *args, **kwargs):
        events.append(("post-start", time.perf_counter()))
        assert threading.current_thread().name.startswith("csist-post")
        time.sleep(0.3)
        events.append(("post-end", time.perf_counter()))
        return real(maps, *args, **{**kwargs, "refine": "none"})

    monkeypatch.setattr(batcher_module, "find_targets", slow_find_targets)

    class TimedModel(FakeModel):
        def __call__(self, windows):
            events.append(("infer", time.perf_counter()))
            return super().__call__(windows)

    model = TimedModel()
    done: list[int] = []

    async def main():
        b = Batcher(FunctionPlan(model), Metrics(), max_batch=1, max_wait_s=0.0)
        b.start()
        futures = [b.submit(windows_with([v]), fit) for v in (1, 2, 3)]
        for v, f in zip((1, 2, 3), futures):
            f.add_done_callback(lambda _, v=v: done.append(v))
        results = await asyncio.gather(*futures)
        await b.stop()
        return results

    results = run(main())
    assert done == [1, 2, 3]
    assert [r.peaks[0][0, 2] for r in results] == [101.0, 102.0, 103.0]
    infer = [t for name, t in events if name == "infer"]
    first_post_end = next(t for name, t in events if name == "post-end")
    assert len(infer) == 3 and infer[1] < first_post_end  # overlapped, not serialised
    assert sum(name == "post-start" for name, _ in events) == 3


def test_peak_extraction_without_the_fit_runs_in_the_inference_worker(monkeypatch):
    """refine != "fit": the worker that inferred the batch extracts its peaks (no hand-off to a
    thread that must wait for a core)."""
    import service.engine.batcher as batcher_module

    threads: list[str] = []
    real = batcher_module.find_targets

    def recording(maps, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(maps, *args, **kwargs)

    monkeypatch.setattr(batcher_module, "find_targets", recording)

    async def main():
        b = Batcher(FunctionPlan(FakeModel()), Metrics(), max_batch=1, max_wait_s=0.0)
        b.start()
        results = await asyncio.gather(*(b.submit(windows_with([v]), OPTS) for v in (1, 2)))
        await b.stop()
        return results

    results = run(main())
    assert [r.peaks[0][0, 2] for r in results] == [101.0, 102.0]
    assert len(threads) == 2 and all(name.startswith("csist-infer") for name in threads)


def test_workers_run_batches_at_the_same_time_and_answers_keep_their_order():
    """Two workers: batch 2 starts while batch 1 still runs; answers leave in batch order."""
    running, overlap = [0], [0]
    lock = threading.Lock()

    class SlowModel(FakeModel):
        def __call__(self, windows):
            with lock:
                running[0] += 1
                overlap[0] = max(overlap[0], running[0])
            # the first batch is the slowest, so an unordered answer would overtake it
            time.sleep(0.4 if windows[0, 2, 0, 0] == 1 else 0.1)
            with lock:
                running[0] -= 1
            return super().__call__(windows)

    done: list[int] = []

    async def main():
        b = Batcher(FunctionPlan(SlowModel()), Metrics(), max_batch=1, max_wait_s=0.0, workers=2)
        b.start()
        futures = [b.submit(windows_with([v]), OPTS) for v in (1, 2, 3, 4)]
        for v, f in zip((1, 2, 3, 4), futures):
            f.add_done_callback(lambda _, v=v: done.append(v))
        t0 = time.perf_counter()
        results = await asyncio.gather(*futures)
        elapsed = time.perf_counter() - t0
        await b.stop()
        return results, elapsed

    results, elapsed = run(main())
    assert overlap[0] == 2  # never more than the 2 workers at once
    assert done == [1, 2, 3, 4]
    assert [r.peaks[0][0, 2] for r in results] == [101.0, 102.0, 103.0, 104.0]
    assert elapsed < 0.65  # serial would be 0.7 s: 0.4 + 3 x 0.1


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="workers"):
        Batcher(FunctionPlan(FakeModel()), Metrics(), workers=0)


class GatedParts(FakeParts):
    """FakeParts whose first encode call waits for ``gate`` (and may fail)."""

    def __init__(self, fail_first: bool = False):
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def encode(self, frames):
        with self.lock:
            first = not self.encoded
            out = super().encode(frames)
        if first:
            self.entered.set()
            self.gate.wait(5)
            if self.fail_first:
                raise RuntimeError("encoder exploded")
        return out


def _stream_batches(parts: GatedParts):
    """Batch 1: frames 0-5 of a segment (6 windows); batch 2: the same windows again, sent while
    batch 1 is still encoding. Returns both results (or exceptions) and the batcher."""

    async def main():
        b = Batcher(
            FunctionPlan(FakeModel(), encode=parts.encode, head=parts.head),
            Metrics(),
            max_batch=6,
            max_wait_s=0.0,
            workers=2,
        )
        b.start()
        frames = np.zeros((6, 11, 11), dtype=np.float32)
        frames[:, 0, 0] = [3, 4, 5, 6, 7, 8]
        slots = sequence_slots(6)
        first = b.submit(sequence_windows(frames)[0], OPTS, slots)
        await asyncio.to_thread(parts.entered.wait, 5)
        second = b.submit(sequence_windows(frames)[0], OPTS, slots)
        await asyncio.sleep(0.2)  # batch 2 is dispatched and waits on batch 1's frames
        parts.gate.set()
        results = await asyncio.gather(first, second, return_exceptions=True)
        await b.stop()
        return results, b

    return run(main())


def test_a_frame_being_encoded_by_another_batch_is_waited_for_not_encoded_again():
    parts = GatedParts()
    (first, second), b = _stream_batches(parts)
    assert parts.encoded == [6] and b.frames_encoded == 6  # batch 2 encoded nothing
    assert [round(p[0, 2]) for p in first.peaks] == [103, 104, 105, 106, 107, 108]
    assert [p.tolist() for p in second.peaks] == [p.tolist() for p in first.peaks]


def test_when_the_encoding_batch_fails_the_waiting_batch_encodes_itself():
    parts = GatedParts(fail_first=True)
    (first, second), b = _stream_batches(parts)
    assert isinstance(first, InferenceFailed) and "encoder exploded" in str(first)
    assert [round(p[0, 2]) for p in second.peaks] == [103, 104, 105, 106, 107, 108]
    assert b.frames_encoded == 6  # batch 1's count never landed; batch 2 encoded all 6


def test_a_burst_is_shared_out_among_idle_workers_and_answers_keep_their_order():
    """8 single-window groups at once on 2 idle workers: two batches of 4 that run together,
    not one batch of 8; with one worker, one batch of 8."""

    class SlowModel(FakeModel):
        def __call__(self, windows):
            time.sleep(0.1 * len(windows))
            return super().__call__(windows)

    async def burst(workers):
        model = SlowModel()
        b = Batcher(FunctionPlan(model), Metrics(), max_batch=64, max_wait_s=0.02, workers=workers)
        b.start()
        done: list[int] = []
        futures = [b.submit(windows_with([v]), OPTS) for v in range(8)]
        for v, f in enumerate(futures):
            f.add_done_callback(lambda _, v=v: done.append(v))
        t0 = time.perf_counter()
        results = await asyncio.gather(*futures)
        elapsed = time.perf_counter() - t0
        await b.stop()
        assert done == list(range(8))
        assert [r.peaks[0][0, 2] for r in results] == [100.0 + v for v in range(8)]
        return model.calls, elapsed

    calls, elapsed = run(burst(2))
    assert calls == [4, 4] and elapsed < 0.7  # one batch of 8 would take 0.8 s, two at once 0.4 s
    calls, _ = run(burst(1))
    assert calls == [8]


def test_a_backlog_found_while_the_other_workers_are_busy_is_taken_in_fair_shares():
    """6 groups wait while one of 2 workers is busy: the free worker takes 3 (half), the other
    3 go to whichever worker frees next, instead of all 6 to one worker (which would leave the
    other idle when it frees)."""

    class Model(FakeModel):
        def __call__(self, windows):
            self.calls.append(windows.shape[0])
            time.sleep(0.3 if len(self.calls) == 1 else 0.05 * len(windows))
            self.gate.wait(0)
            return FakeModel.__call__(FakeModel(), windows)

    async def main():
        model = Model()
        b = Batcher(FunctionPlan(model), Metrics(), max_batch=64, max_wait_s=0.02, workers=2)
        b.start()
        first = b.submit(windows_with([0]), OPTS)
        while not model.calls:
            await asyncio.sleep(0.005)
        rest = [b.submit(windows_with([v]), OPTS) for v in range(1, 7)]
        results = await asyncio.gather(first, *rest)
        await b.stop()
        return model.calls, results

    calls, results = run(main())
    assert calls == [1, 3, 3]
    assert [r.peaks[0][0, 2] for r in results] == [100.0 + v for v in range(7)]


class FakePairParts(FakeParts):
    """FakeParts plus the head's halves: ``align`` of a (middle, neighbour) pair gives
    middle + 10 * neighbour in column 0 and the neighbour's window position in column 1; ``fuse``
    records what it got and answers with the FakeModel rule on the middle frame's feature."""

    def __init__(self, gate: threading.Event | None = None):
        super().__init__()
        self.aligned: list[int] = []
        self.stacks: list[np.ndarray] = []
        self.log: list[str] = []
        self.gate = gate

    def encode(self, frames):
        if self.gate is not None:
            self.gate.wait(5)
        self.log.append(f"encode{len(frames)}")
        feats = super().encode(frames)
        feats[:, 1] = 1.0  # marks the rows that hold a frame
        return feats

    def align(self, pairs):
        self.aligned.append(len(pairs))
        self.log.append(f"align{len(pairs)}")
        out = np.zeros((len(pairs), pairs.shape[-1]), dtype=np.float32)
        for k, x in enumerate(pairs):
            p = next(r for r in NEIGHBOURS if x[r, 1] != 0)
            out[k, 0], out[k, 1] = x[HALF, 0] + 10 * x[p, 0], p
        return out

    def fuse(self, stack):
        self.log.append(f"fuse{len(stack)}")
        self.stacks.append(stack.copy())
        return FakeModel()(windows_with(stack[:, HALF, 0]))


def test_pairs_aligned_early_are_reused_and_each_pair_is_aligned_once():
    """A stream's early work aligns every window's neighbours as soon as they are here (the
    last window's first two, every other window's first three); the window then aligns only
    what is left, and fuse sees the same stacks as if all were aligned at once."""
    parts = FakePairParts()
    values = [3, 4, 5, 6, 7, 8]

    async def main():
        b = Batcher(
            FunctionPlan(FakeModel(), encode=parts.encode, head=parts.head, align=parts.align, fuse=parts.fuse),
            Metrics(),
            max_batch=64,
            max_wait_s=0.0,
        )
        b.start()
        assert b.caches_pairs
        seg, answers = SegmentWindows(), []
        for i, v in enumerate(values):
            frame = np.zeros((11, 11), dtype=np.float32)
            frame[0, 0] = v
            for w in seg.push(frame):
                answers.append(await b.submit(w.frames[None], OPTS, [w.slots], [w.pairs]))
            for early in seg.early():
                assert b.submit_early(early.frames, early.slots, early.pairs)
            for _ in range(500):  # the early batches run while nothing else waits
                if b.early_pairs == 3 * i + 2:
                    break
                await asyncio.sleep(0.01)
        for w in seg.flush():
            answers.append(await b.submit(w.frames[None], OPTS, [w.slots], [w.pairs]))
        await b.stop()
        return b, answers

    b, answers = run(main())
    n = len(values)
    assert b.frames_encoded == n and b.windows_run == n
    assert b.early_pairs == 3 * (n - 1) + 2 and b.pairs_aligned == 4 * n  # each pair once
    assert [round(a.peaks[0][0, 2]) for a in answers] == [100 + v for v in values]
    stacks = np.concatenate(parts.stacks)
    for t, stack in enumerate(stacks):  # window t: frames t-2 .. t+2, edges replicated
        idx = np.clip(np.arange(t - 2, t + 3), 0, n - 1)
        mid = values[t]
        assert stack[HALF, 0] == mid
        for p in NEIGHBOURS:
            assert (stack[p, 0], stack[p, 1]) == (mid + 10 * values[idx[p]], p)


def test_early_work_waits_while_windows_wait():
    """Early work is taken only when no window is queued: a window that comes while the worker
    is busy runs before the early work queued before it."""
    gate = threading.Event()
    parts = FakePairParts(gate)

    async def main():
        b = Batcher(
            FunctionPlan(FakeModel(), encode=parts.encode, head=parts.head, align=parts.align, fuse=parts.fuse),
            Metrics(),
            max_batch=64,
            max_wait_s=0.0,
            workers=1,
        )
        b.start()
        fresh = lambda: ([FeatureSlot() for _ in range(5)], [FeatureSlot() for _ in NEIGHBOURS])  # noqa: E731
        s1, p1 = fresh()
        first = b.submit(windows_with([1]), OPTS, [s1], [p1])
        while not parts.log and b.queued_windows:  # the first window is with the (blocked) worker
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        s2, p2 = fresh()
        assert b.submit_early(windows_with([2])[0], s2[:4] + [None], p2)
        s3, p3 = fresh()
        second = b.submit(windows_with([3]), OPTS, [s3], [p3])
        gate.set()
        results = await asyncio.gather(first, second)
        for _ in range(500):
            if b.early_pairs == 3:
                break
            await asyncio.sleep(0.01)
        await b.stop()
        return b, results

    b, results = run(main())
    assert [r.peaks[0][0, 2] for r in results] == [101.0, 103.0]
    # window 1 (5 frames, 4 pairs), then window 3, and only then the early work (4 frames, 3 pairs)
    assert parts.log == ["encode5", "align4", "fuse1", "encode5", "align4", "fuse1", "encode4", "align3"]
    assert b.early_pairs == 3 and b.windows_run == 2


def test_missing_pixels_must_fit_the_windows():
    async def main():
        b = Batcher(FunctionPlan(FakeModel()), Metrics(), max_batch=64, max_wait_s=0.01)
        b.start()
        try:
            with pytest.raises(ValueError, match="missing"):
                b.submit(windows_with([1, 2]), OPTS, missing=np.zeros((2, 5, 11), dtype=bool))
            missing = np.zeros((2, 11, 11), dtype=bool)
            missing[:, :, 0] = True
            # one batch of a group with missing pixels and one without
            return await asyncio.gather(
                b.submit(windows_with([1, 2]), OPTS, missing=missing), b.submit(windows_with([3]), OPTS)
            )
        finally:
            await b.stop()

    with_missing, without = run(main())
    assert with_missing.batch_size == 3 and len(with_missing.peaks) == 2 and len(without.peaks) == 1
