"""Windowing: edge replication, streaming == batch, gaps split segments."""

from __future__ import annotations

import numpy as np
import pytest

from service.science.windows import (
    HALF,
    NEIGHBOURS,
    WINDOW,
    FeatureSlot,
    SegmentWindows,
    fuse_features,
    pair_features,
    sequence_windows,
    split_segments,
    window_indices,
)


def test_window_indices_replicate_edges():
    got = window_indices(np.arange(5), 5)
    want = [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4, 4], [2, 3, 4, 4, 4]]
    assert got.tolist() == want
    assert window_indices(0, 1).tolist() == [0, 0, 0, 0, 0]
    assert window_indices(np.arange(2), 2).tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    assert window_indices(7, 20).tolist() == [5, 6, 7, 8, 9]


def test_sequence_windows_middle_frame_uses_no_padding():
    frames = np.arange(5)[:, None, None] * np.ones((5, 2, 2))
    w = sequence_windows(frames)
    assert w.shape == (5, 5, 2, 2)
    np.testing.assert_array_equal(w[2], frames)  # the middle frame's window is the input
    np.testing.assert_array_equal(w[0, :, 0, 0], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(w[4, :, 0, 0], [2, 3, 4, 4, 4])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 9])
def test_streaming_equals_batch_and_answers_two_frames_late(n):
    rng = np.random.default_rng(n)
    frames = rng.normal(size=(n, 11, 11)).astype(np.float32)
    seg = SegmentWindows()
    got = []
    for k in range(n):
        out = seg.push(frames[k], meta=k)
        # frame k completes exactly the window of frame k - 2
        assert [w.meta for w in out] == ([k - 2] if k >= 2 else [])
        got += out
    assert seg.pending == min(n, 2)
    tail = seg.flush()
    assert [w.meta for w in tail] == list(range(max(n - 2, 0), n))
    got += tail
    assert seg.pending == 0
    np.testing.assert_array_equal(np.stack([w.frames for w in got]), sequence_windows(frames))


def test_segment_restarts_after_flush():
    seg = SegmentWindows()
    for k in range(3):
        seg.push(np.full((1, 1), k), k)
    seg.flush()
    out = seg.push(np.full((1, 1), 10), "a") + seg.flush()
    assert [w.meta for w in out] == ["a"]
    np.testing.assert_array_equal(out[0].frames.ravel(), [10] * 5)  # no frame of the old segment


def test_split_segments():
    assert split_segments([0, 1, 2, 5, 6, 9]) == [slice(0, 3), slice(3, 5), slice(5, 6)]
    assert split_segments([7]) == [slice(0, 1)]
    assert split_segments([]) == []
    with pytest.raises(ValueError, match="frame 2: frame_index 1"):
        split_segments([0, 1, 1])
    with pytest.raises(ValueError, match="not after"):
        split_segments([3, 2])


def test_streamed_windows_share_one_slot_per_frame():
    from service.science.windows import SegmentWindows, sequence_slots

    seg = SegmentWindows()
    got = []
    for t in range(6):
        got += seg.push(np.full((11, 11), t, dtype=np.float32), t)
    got += seg.flush()
    assert [w.meta for w in got] == list(range(6))
    slot_of = {}
    for w in got:
        for frame, slot in zip(w.frames, w.slots, strict=True):
            slot_of.setdefault(int(frame[0, 0]), set()).add(id(slot))
    assert all(len(ids) == 1 for ids in slot_of.values()) and len(slot_of) == 6
    rows = sequence_slots(4)
    assert rows[0][0] is rows[0][1] is rows[0][2] and rows[3][4] is rows[3][3] is rows[2][3]
    assert len({id(s) for r in rows for s in r}) == 4


def test_split_segments_on_origin_change():
    from service.science.windows import split_segments

    origins = [(0.0, 0.0)] * 3 + [(1.0, 0.0)] * 2
    assert split_segments([0, 1, 2, 3, 4], origins) == [slice(0, 3), slice(3, 5)]
    assert split_segments([0, 1, 2, 3, 4], [None] * 5) == [slice(0, 5)]


def test_feature_slot_claims_belong_to_one_holder():
    slot = FeatureSlot()
    first = slot.claim()
    assert first is not None and slot.claim() is None  # claimed: nobody else encodes it
    assert slot.fill(None, first) and slot.features is None and first.is_set()  # given up
    second = slot.claim()  # free again: a waiter takes it over
    assert second is not None and second is not first
    assert not slot.fill(np.ones(3, np.float32), first)  # a stale claim cannot fill or release
    assert slot.ready is second and slot.features is None
    assert slot.fill(np.ones(3, np.float32), second) and second.is_set()
    assert slot.claim() is None and slot.ready is None  # filled for good
    slot.wait()  # nothing open: returns at once
    np.testing.assert_array_equal(slot.features, np.ones(3))


def test_early_windows_hold_the_frames_that_are_here_and_share_their_pair_slots():
    seg = SegmentWindows()
    frames = [np.full((2, 2), i, dtype=np.float32) for i in range(5)]
    assert seg.early() == []
    seg.push(frames[0], "m0")
    (w0,) = seg.early()  # window 0: frames 0 0 0 (the start replicated), frames 1 and 2 to come
    assert w0.meta == "m0" and w0.slots[3] is None and w0.slots[4] is None and w0.slots[2] is not None
    assert w0.frames.shape == (5, 2, 2) and len(w0.pairs) == 4
    assert [f[0, 0] for f in w0.frames[:3]] == [0, 0, 0]
    seg.push(frames[1], "m1")
    a, b = seg.early()
    assert (a.meta, b.meta) == ("m0", "m1") and a.pairs is w0.pairs and a.slots[:3] == w0.slots[:3]
    assert [f[0, 0] for f in a.frames[:4]] == [0, 0, 0, 1] and a.slots[4] is None
    assert [f[0, 0] for f in b.frames[:3]] == [0, 0, 1] and b.slots[3] is None and b.slots[4] is None
    (done,) = seg.push(frames[2], "m2")
    assert done.meta == "m0" and done.pairs is w0.pairs and done.slots[:4] == a.slots[:4]
    assert [w.meta for w in seg.early()] == ["m1", "m2"]
    seg.push(frames[3], "m3")
    last = seg.early()
    flushed = seg.flush()  # the segment ends: windows 2 and 3 are completed by replicating frame 3
    assert [w.meta for w in flushed] == ["m2", "m3"]
    assert [w.pairs for w in flushed] == [w.pairs for w in last]
    assert [f[0, 0] for f in flushed[0].frames] == [0, 1, 2, 3, 3]
    assert seg.early() == []


def test_pair_and_fuse_inputs_put_rows_in_window_positions():
    mid = np.arange(6, dtype=np.float32).reshape(2, 3)
    nb = -mid - 1
    x = pair_features(mid, nb, [0, 4])
    assert x.shape == (2, WINDOW, 3)
    np.testing.assert_array_equal(x[:, HALF], mid)
    np.testing.assert_array_equal(x[0, 0], nb[0]) and np.testing.assert_array_equal(x[1, 4], nb[1])
    assert np.count_nonzero(x[0, [1, 3, 4]]) == 0 and np.count_nonzero(x[1, [0, 1, 3]]) == 0
    aligned = np.stack([np.full((2, 3), 10 * p) for p in NEIGHBOURS], axis=1)  # (2, 4, 3)
    stack = fuse_features(mid, aligned)
    np.testing.assert_array_equal(stack[:, HALF], mid)
    assert [stack[0, p, 0] for p in NEIGHBOURS] == [10 * p for p in NEIGHBOURS]
