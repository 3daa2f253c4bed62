"""Windowing: edge replication, streaming == batch, gaps split segments, re-centred patches registered."""

from __future__ import annotations

import numpy as np
import pytest

from service.science.windows import (
    HALF,
    MAX_RECENTRE_PX,
    NEIGHBOURS,
    WINDOW,
    FeatureSlot,
    SegmentWindows,
    fuse_features,
    pair_features,
    recentre_step,
    register,
    replicated,
    sequence_slots,
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
    w, missing = sequence_windows(frames)
    assert missing.shape == (5, 2, 2) and not missing.any()
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
    np.testing.assert_array_equal(np.stack([w.frames for w in got]), sequence_windows(frames)[0])


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

    # a re-centring step of whole pixels (up to MAX_RECENTRE_PX) is followed, not split
    recentred = [(0.0, 0.0)] * 3 + [(1.0, 0.0), (1.0, -2.0)]
    assert split_segments([0, 1, 2, 3, 4], recentred) == [slice(0, 5)]
    # a fraction of a pixel, a larger jump, or an origin given on some frames only splits
    assert split_segments([0, 1, 2, 3], [(0.0, 0.0), (0.5, 0.0), (0.5, 0.0), (0.5, 3.0)]) == [
        slice(0, 1),
        slice(1, 3),
        slice(3, 4),
    ]
    assert split_segments([0, 1, 2], [(0.0, 0.0), None, None]) == [slice(0, 1), slice(1, 3)]
    assert split_segments([0, 1, 2, 3, 4], [None] * 5) == [slice(0, 5)]


def test_half_pixel_origins_register_by_their_whole_pixel_steps():
    frames = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    origins = [(100.5, 7.5), (101.5, 7.5), (102.5, 8.5)]
    assert split_segments([0, 1, 2], origins) == [slice(0, 3)]
    windows, missing = sequence_windows(frames, origins)
    # frame 0 in frame 1's patch: 1 px to the left of it, so its column c + 1 is column c there
    np.testing.assert_array_equal(windows[1, 1][:, :3], frames[0][:, 1:])
    np.testing.assert_array_equal(windows[1, 3][1:, 1:], frames[2][:3, :3])
    assert missing[1][:, 3].all() and missing[1][:, 0].all() and missing[1][0].all()


def test_recentre_step():
    assert recentre_step(None, None) == (0, 0)
    assert recentre_step((10.0, 20.0), (12.0, 19.0)) == (2, -1)
    assert recentre_step((10.0, 20.0), (10.0, 20.0)) == (0, 0)
    assert recentre_step((10.0, 20.0), (13.0, 20.0)) is None  # over MAX_RECENTRE_PX
    assert recentre_step((10.0, 20.0), (10.5, 20.0)) is None  # a fraction of a pixel
    assert recentre_step(None, (10.0, 20.0)) is None and recentre_step((10.0, 20.0), None) is None
    assert MAX_RECENTRE_PX == 2


def test_register_shifts_the_frame_into_the_other_patch_and_marks_what_it_misses():
    frame = np.arange(20.0).reshape(4, 5)
    out, missing = register(frame, (1, -2))  # the other patch lies 1 px right of and 2 px above this one
    # its pixel (r, c) is this frame's (r - 2, c + 1)
    np.testing.assert_array_equal(out[2:, :4], frame[:2, 1:])
    assert missing[:2].all() and missing[:, 4].all()
    assert not missing[2:, :4].any()
    np.testing.assert_array_equal(out[:2, :4], np.repeat(frame[:1, 1:], 2, axis=0))  # the edge repeated
    same, none = register(frame, (0, 0))
    np.testing.assert_array_equal(same, frame)
    assert not none.any()


def _recentred_track(n: int = 9, seed: int = 0):
    """A sensor scene cut into 11 x 11 patches whose origin a tracker moves by 0-2 px a frame."""
    rng = np.random.default_rng(seed)
    scene = rng.integers(0, 255, size=(40, 40)).astype(np.float32)
    origins, x, y = [], 12, 14
    for _ in range(n):
        origins.append((float(x), float(y)))
        x, y = x + int(rng.integers(-2, 3)), y + int(rng.integers(-2, 3))
    patches = np.stack([scene[int(oy) : int(oy) + 11, int(ox) : int(ox) + 11] for ox, oy in origins])
    return scene, origins, patches


def test_recentred_windows_show_the_scene_in_the_middle_frames_patch():
    scene, origins, patches = _recentred_track()
    windows, missing = sequence_windows(patches, origins)
    assert windows.shape == (9, 5, 11, 11) and missing.shape == (9, 11, 11)
    index = window_indices(np.arange(9), 9)
    for t in range(9):
        ox, oy = (int(v) for v in origins[t])
        middle_patch = scene[oy : oy + 11, ox : ox + 11]
        covered = np.ones((11, 11), dtype=bool)
        for p in range(5):  # each frame, where it covers the middle patch, shows the scene there
            fx, fy = (int(v) for v in origins[index[t, p]])
            rows, cols = np.arange(11) + oy - fy, np.arange(11) + ox - fx
            inside = ((rows >= 0) & (rows < 11))[:, None] & ((cols >= 0) & (cols < 11))[None, :]
            np.testing.assert_array_equal(windows[t, p][inside], middle_patch[inside])
            covered &= inside
        np.testing.assert_array_equal(missing[t], ~covered)
        np.testing.assert_array_equal(windows[t, 2], patches[t])  # the middle frame as it came
    assert missing.any() and not missing.all(axis=(1, 2)).any()


def test_streamed_recentred_windows_match_the_sequence_and_share_slots_by_shift():
    _, origins, patches = _recentred_track(seed=3)
    seg = SegmentWindows()
    got, early = [], {}
    for t in range(9):
        got += seg.push(patches[t], t, origins[t])
        for w in seg.early():
            early.setdefault(w.meta, []).append(w)
    got += seg.flush()
    frames, missing = sequence_windows(patches, origins)
    np.testing.assert_array_equal(np.stack([w.frames for w in got]), frames)
    for w, m in zip(got, missing, strict=True):
        np.testing.assert_array_equal(w.missing, m)
    index = window_indices(np.arange(9), 9)
    shifts = [[tuple(np.subtract(origins[t], origins[i]).astype(int)) for i in index[t]] for t in range(9)]
    # a slot per (frame, shift): the same frame shown with the same shift shares one encoding,
    # whatever window it is in, and another shift shows other pixels
    for rows in ([w.slots for w in got], sequence_slots(9, origins)):
        seen: dict[tuple, FeatureSlot] = {}
        for t in range(9):
            for p in range(5):
                key = (int(index[t, p]), shifts[t][p])
                assert seen.setdefault(key, rows[t][p]) is rows[t][p]
        assert len({id(s) for s in seen.values()}) == len(seen) > 9
    for t, w in enumerate(got):  # the early windows of frame t fill the same slots as its final window
        for e in early.get(t, []):
            assert all(a is None or a is b for a, b in zip(e.slots, w.slots, strict=True))
    assert early


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


def test_replicated_marks_the_copies_that_fill_a_segments_edge_windows():
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(6, 11, 11))
    windows = frames[window_indices(np.arange(6), 6)]  # (6, 5, 11, 11), edges repeated
    got = replicated(windows)
    assert got.shape == (6, 5)
    np.testing.assert_array_equal(got[0], [True, True, False, False, False])
    np.testing.assert_array_equal(got[1], [True, False, False, False, False])
    assert not got[2:4].any()
    np.testing.assert_array_equal(got[5], [False, False, False, True, True])
    # one window alone, and a static scene: every frame but the middle one reads as a copy
    np.testing.assert_array_equal(replicated(windows[4]), [False, False, False, False, True])
    np.testing.assert_array_equal(replicated(np.zeros((5, 3, 3))), [True, True, False, True, True])
