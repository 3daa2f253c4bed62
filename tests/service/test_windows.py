"""Windowing: edge replication, streaming == batch, gaps split segments."""

from __future__ import annotations

import numpy as np
import pytest

from service.windows import FeatureSlot, SegmentWindows, sequence_windows, split_segments, window_indices


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
    from service.windows import SegmentWindows, sequence_slots

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
    from service.windows import split_segments

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
