"""CSO-mAP, the SeqCSIST detection metric (docs/method.md section 6), plus two diagnostics.

A frame's detections are rows (x, y, score) -- the score is the estimated brightness -- and
its ground truth rows (x, y, brightness), all in LR pixel units. For a distance threshold d:

1. Rank every detection of every frame by score, descending. The sort is stable over the
   frames concatenated in order, so ties keep frame order, then row order.
2. Walk the ranking. A detection is a true positive (TP) when the *nearest* ground-truth
   target of its own frame (Euclidean) lies within d (``<= d``) and no higher-ranked
   detection has matched that target yet; otherwise it is a false positive (FP). Only the
   nearest target is considered: if it is taken, the detection is an FP even when another
   free target lies within d. A detection farther than d from its nearest target consumes
   nothing.
3. Precision and recall along the ranking, with recall over the number of ground-truth
   targets of all frames; AP is the area under the curve in the VOC "area" mode (all-points
   interpolation).

AP at d = 0.05, 0.10, 0.15, 0.20, 0.25 px are AP05..AP25, CSO-mAP is their mean, and all
are reported in percent. The rules follow the SeqCSIST paper's evaluation.

Why the matching is vectorised the way it is: the nearest target of a detection does not
depend on d, so it is found once for all thresholds (one pass over all detection/target
pairs of each frame). For a given d, the greedy walk then reduces to "among the detections
within d of their nearest target, the highest-ranked one per target wins", i.e. the first
occurrence of each target id in ranked order, which ``np.unique(..., return_index=True)``
gives directly. 12,000 frames of ~3 detections take a few milliseconds per threshold.

This lives in ``training/`` because only evaluation uses it; the service never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

THRESHOLDS: tuple[float, ...] = (0.05, 0.10, 0.15, 0.20, 0.25)  # LR pixels, the paper's set


def threshold_name(d: float) -> str:
    """Report key of the AP at threshold ``d`` px: 0.05 -> "AP05", 0.25 -> "AP25"."""
    return f"AP{round(d * 100):02d}"


# --------------------------------------------------------------------------- input handling


def _as_rows(entry, what: str, index: int | None = None) -> np.ndarray:
    """One frame's rows as float64 (N, 3); an empty entry ([], shape (0, 3)) gives (0, 3).

    Values must be finite: a NaN score cannot be ranked and a NaN position cannot be matched,
    so they are rejected rather than silently counted as misses.
    """
    where = what if index is None else f"{what}[{index}]"
    try:
        a = np.asarray(entry, dtype=np.float64)
    except (TypeError, ValueError) as exc:  # ragged rows, non-numbers
        raise ValueError(f"{where} must be an array of rows (x, y, value): {exc}") from exc
    if a.size == 0:
        return np.zeros((0, 3))
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{where} must have shape (N, 3) with rows (x, y, value), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{where} contains non-finite values (NaN or inf)")
    return a


def _as_frames(frames, what: str) -> list[np.ndarray]:
    return [_as_rows(f, what, i) for i, f in enumerate(frames)]


def _check_lengths(detections, ground_truth) -> None:
    if len(detections) != len(ground_truth):
        raise ValueError(
            f"detections and ground_truth must have one entry per frame: "
            f"detections has {len(detections)} frames, ground_truth has {len(ground_truth)}"
        )


def _check_threshold(d: float) -> float:
    d = float(d)
    if not np.isfinite(d) or d < 0:
        raise ValueError(f"distance threshold must be finite and >= 0, got {d}")
    return d


# --------------------------------------------------------------------------- core


@dataclass(frozen=True)
class _Matching:
    """Everything about a set of frames that does not depend on the threshold.

    Detections and targets are flattened over frames (frame 0's rows first). ``nearest`` is
    the flat index of each detection's nearest target in its own frame (-1 if the frame has
    no target), ``dist`` the distance to it (inf if none), ``order`` the stable ranking.
    """

    n_gt: int  # targets over all frames: the recall denominator
    nearest: np.ndarray  # (D,) int
    dist: np.ndarray  # (D,) float
    order: np.ndarray  # (D,) detection indices, best score first

    def tp(self, d: float) -> np.ndarray:
        """TP flags in flat detection order for threshold ``d`` (greedy rule, module doc)."""
        ranked_gt = self.nearest[self.order]
        candidates = np.flatnonzero((ranked_gt >= 0) & (self.dist[self.order] <= d))
        # The first candidate (in rank order) per target wins; later ones are duplicates.
        _, first = np.unique(ranked_gt[candidates], return_index=True)
        tp_ranked = np.zeros(len(self.order), dtype=bool)
        tp_ranked[candidates[first]] = True
        tp = np.empty_like(tp_ranked)
        tp[self.order] = tp_ranked
        return tp


def _prepare(dets: list[np.ndarray], gts: list[np.ndarray]) -> _Matching:
    """Flatten the frames, find each detection's nearest target and rank the detections."""
    n_frames = len(dets)
    det_count = np.array([len(f) for f in dets], dtype=np.int64)
    gt_count = np.array([len(f) for f in gts], dtype=np.int64)
    det = np.concatenate(dets) if n_frames else np.zeros((0, 3))
    gt = np.concatenate(gts) if n_frames else np.zeros((0, 3))
    det_frame = np.repeat(np.arange(n_frames), det_count)
    gt_start = np.cumsum(gt_count) - gt_count

    # Every (detection, target of the same frame) pair, grouped by detection in order.
    pairs_per_det = gt_count[det_frame]
    pair_start = np.cumsum(pairs_per_det) - pairs_per_det
    pair_det = np.repeat(np.arange(len(det)), pairs_per_det)
    within = np.arange(pairs_per_det.sum()) - np.repeat(pair_start, pairs_per_det)
    pair_gt = np.repeat(gt_start[det_frame], pairs_per_det) + within
    delta = det[pair_det, :2] - gt[pair_gt, :2]
    pair_dist = np.hypot(delta[:, 0], delta[:, 1])

    # Nearest target per detection: sort each detection's pairs by distance (ties -> lower
    # target index, as argmin would); pair_det is the primary key and already ascending, so
    # each detection's group keeps its position and its first entry is the nearest target.
    by_dist = np.lexsort((pair_gt, pair_dist, pair_det))
    has_gt = pairs_per_det > 0
    first_pair = by_dist[pair_start[has_gt]]
    nearest = np.full(len(det), -1, dtype=np.int64)
    dist = np.full(len(det), np.inf)
    nearest[has_gt] = pair_gt[first_pair]
    dist[has_gt] = pair_dist[first_pair]

    order = np.argsort(-det[:, 2], kind="stable")
    return _Matching(len(gt), nearest, dist, order)


# --------------------------------------------------------------------------- public API


def average_precision(tp: np.ndarray, n_gt: int) -> float:
    """VOC "area"-mode average precision (a fraction 0..1) of a ranked list of TP flags.

    ``tp[k]`` says whether the k-th best detection is a true positive; ``n_gt`` is the number
    of ground-truth targets (the recall denominator, so missed targets lower AP). Recall is
    padded with 0 and 1 and precision with 0 and 0, precision is made non-increasing from
    the right (the best precision reachable at this recall or more), and AP is the sum of
    recall step x precision at every point where recall changes. With no targets at all
    (``n_gt == 0``) recall is undefined; AP is then 0 by convention.
    """
    tp = np.asarray(tp, dtype=bool).ravel()
    n_gt = int(n_gt)
    if n_gt < 0:
        raise ValueError(f"n_gt must be >= 0, got {n_gt}")
    if tp.sum() > n_gt:
        raise ValueError(f"{int(tp.sum())} true positives but only n_gt={n_gt} targets")
    if n_gt == 0 or tp.size == 0:
        return 0.0
    tp_cum = np.cumsum(tp)
    fp_cum = np.cumsum(~tp)
    recall = np.concatenate(([0.0], tp_cum / n_gt, [1.0]))
    precision = np.concatenate(([0.0], tp_cum / (tp_cum + fp_cum), [0.0]))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    step = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[step + 1] - recall[step]) * precision[step + 1]))


def match_frame(dets, gts, d: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of one frame's detections to its targets at threshold ``d``.

    Detections are visited by score, descending (stable); each is a TP when its nearest
    target is within ``d`` and still free. Returns ``(tp_flags, matched_gt_index)`` in the
    *input row order* of ``dets``: a bool array and the row of ``gts`` each TP matched
    (-1 for FPs), so callers can pair rows to measure localisation errors. Within one frame
    this is exactly the order the global ranking of :func:`cso_map` uses.
    """
    d = _check_threshold(d)
    m = _prepare([_as_rows(dets, "dets")], [_as_rows(gts, "gts")])
    tp = m.tp(d)
    matched = np.where(tp, m.nearest, -1)  # one frame: flat target index == row of gts
    return tp, matched


def cso_map(
    detections: Sequence,
    ground_truth: Sequence,
    thresholds: Sequence[float] = THRESHOLDS,
) -> dict[str, float]:
    """CSO-mAP and the AP at each distance threshold, in percent.

    ``detections`` and ``ground_truth`` hold one entry per frame, each an array-like of rows
    (x, y, score) resp. (x, y, brightness), possibly empty. Returns ``{"AP05": ...,
    "AP25": ..., "mAP": ...}`` (keys from :func:`threshold_name`). The ranking runs over all
    frames together. If there is no ground-truth target in any frame, every AP (and mAP) is
    0, whatever was detected.
    """
    _check_lengths(detections, ground_truth)
    thresholds = [_check_threshold(d) for d in thresholds]
    if not thresholds:
        raise ValueError("at least one distance threshold is needed")
    names = [threshold_name(d) for d in thresholds]
    if len(set(names)) != len(names):
        raise ValueError(f"thresholds {thresholds} give duplicate names {names}")
    m = _prepare(_as_frames(detections, "detections"), _as_frames(ground_truth, "ground_truth"))
    result = {name: 100.0 * average_precision(m.tp(d)[m.order], m.n_gt) for name, d in zip(names, thresholds)}
    result["mAP"] = float(np.mean([result[name] for name in names]))
    return result


def count_accuracy(detections: Sequence, ground_truth: Sequence) -> float:
    """Share (0..1) of frames whose number of detections equals their number of targets.

    A coarse check of the unmixing's "how many targets are there" answer, independent of
    position. NaN when there are no frames.
    """
    _check_lengths(detections, ground_truth)
    if len(detections) == 0:
        return float("nan")
    dets = _as_frames(detections, "detections")
    gts = _as_frames(ground_truth, "ground_truth")
    return float(np.mean([len(a) == len(b) for a, b in zip(dets, gts)]))


def localisation_error(detections: Sequence, ground_truth: Sequence, d: float = 0.25) -> float:
    """Mean Euclidean distance (LR px) between TP detections and the targets they matched.

    Uses the same greedy matching as :func:`cso_map` at threshold ``d``, so it answers "how
    far off are the targets we did find". NaN when nothing matched.
    """
    _check_lengths(detections, ground_truth)
    d = _check_threshold(d)
    m = _prepare(_as_frames(detections, "detections"), _as_frames(ground_truth, "ground_truth"))
    tp = m.tp(d)
    return float(np.mean(m.dist[tp])) if tp.any() else float("nan")
