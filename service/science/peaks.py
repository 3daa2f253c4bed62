"""Turn DeRefNet's HR map into a target list (docs/method.md section 5), numpy only.

The network outputs a ``ratio*size`` square HR map per window that is near zero except at
target cells, where it approaches the target's brightness (~220-250). A target is a local
maximum of that map above a brightness threshold (default 70, the reference metric's value).

``mode="cells"`` (the default, and the reference metric's rule): every cell above the threshold
is a target; the centroid then ignores neighbours that are targets themselves.
``mode="local_max"``:

1. Candidates: cells strictly above ``threshold`` that are ``>=`` all their 8 neighbours
   (cells outside the map do not count). A *plateau* (8-connected cells of equal value) is a
   maximum only if none of its cells has a higher neighbour; it then yields exactly one peak,
   its first cell in row-major order. Because two adjacent candidates must be equal, i.e. of
   one plateau, surviving candidates are always at least 2 cells apart.
2. Non-maximum suppression: candidates are accepted in descending value (ties in row-major
   order); a candidate within Chebyshev distance ``nms_radius`` of an accepted one is dropped.
   By point 1 this is a no-op for ``nms_radius <= 1``, and is skipped there.
3. ``max_targets`` keeps the brightest accepted peaks.
4. Sub-cell refinement (the HR grid is 1/3 px, so cell centres alone cap CSO-mAP near 50):
   ``"centroid"`` (intensity-weighted over the 3x3 neighbourhood), ``"quadratic"`` (separable
   3-point parabola) or ``"none"``.
5. Cell (row i, column j) + offset (dy, dx) maps to LR coordinates with
   :func:`service.science.physics.hr_to_lr`: ``x = hr_to_lr(j + dx)``, ``y = hr_to_lr(i + dy)``.

Output rows are ``(x, y, brightness)`` sorted by brightness descending, where brightness is the
map value at the peak cell and doubles as the detection score for CSO-mAP.

Everything is vectorised over a whole batch of maps, because the service runs this on every
window it serves: :func:`extract_peaks` is the one-map case of :func:`extract_peaks_batch`.
Only NMS with ``nms_radius > 1`` loops in Python, once per candidate. Measured on a shared
2-core machine: about 35-50 us per 33 x 33 network-like map, 50-85 us for a map of uniform
noise, less per map in a batch.
"""

from __future__ import annotations

import math
import operator
from functools import lru_cache

import numpy as np

from service.science.physics import RATIO, hr_to_lr

REFINE_MODES = ("none", "centroid", "quadratic")
# "cells": every HR cell above the threshold is a target (the reference CSO-mAP rule). SeqCSIST
# targets sit 0.3 px = 0.9 HR cells from their group's centre, so two targets very often fall
# in adjacent cells, and a local-maximum rule would merge them. "local_max": the rule above.
PEAK_MODES = ("cells", "local_max")
DEFAULT_MODE = "cells"
DEFAULT_THRESHOLD = 70.0  # brightness threshold of the reference CSO-mAP code

# Neighbourhood offsets (drow, dcol): the 3x3 block in row-major order, the 8 neighbours, and
# the 4 neighbours that come later in row-major order (each adjacent pair appears once there).
_BLOCK = tuple((di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1))
_NEIGHBOURS = tuple(o for o in _BLOCK if o != (0, 0))
_FORWARD = ((0, 1), (1, -1), (1, 0), (1, 1))
# Centroid moments over the 3x3 block in row-major order: columns (mass, dcol, drow).
_MOMENTS = np.array([(1.0, dj, di) for di, dj in _BLOCK])


def extract_peaks(
    hr_map: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    refine: str = "centroid",
    max_targets: int | None = None,
    ratio: int = RATIO,
    nms_radius: int = 1,
    mode: str = DEFAULT_MODE,
) -> np.ndarray:
    """Targets found in one HR map: float64 array (K, 3) of rows (x, y, brightness).

    Rows are sorted by brightness (the map value at the peak cell) descending; x, y are LR
    pixel coordinates. K may be 0, giving shape (0, 3). See the module docstring for the
    definition of a peak and of the options. Raises ValueError for a map that is not 2-D and
    finite, an unknown ``refine`` or an invalid option.
    """
    maps = _as_maps(hr_map, ndim=2, name="hr_map")[None]
    return _extract(maps, threshold, refine, max_targets, ratio, nms_radius, mode)[0]


def extract_peaks_batch(
    hr_maps: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    refine: str = "centroid",
    max_targets: int | None = None,
    ratio: int = RATIO,
    nms_radius: int = 1,
    mode: str = DEFAULT_MODE,
) -> list[np.ndarray]:
    """:func:`extract_peaks` for each map of a (B, H, W) stack, in one vectorised pass.

    Returns a list of B float64 arrays of shape (K_b, 3), identical to calling
    :func:`extract_peaks` on each map, but with the per-call overhead paid once.
    """
    maps = _as_maps(hr_maps, ndim=3, name="hr_maps")
    return _extract(maps, threshold, refine, max_targets, ratio, nms_radius, mode)


def _extract(maps, threshold, refine, max_targets, ratio, nms_radius, mode) -> list[np.ndarray]:
    """Peaks of a validated (B, H, W) float64 stack; see the module docstring."""
    threshold, max_targets, ratio, nms_radius = _check_options(threshold, refine, max_targets, ratio, nms_radius)
    if mode not in PEAK_MODES:
        raise ValueError(f"mode must be one of {PEAK_MODES}, got {mode!r}")
    n_maps, h, w = maps.shape
    if maps.size == 0:
        return [np.zeros((0, 3)) for _ in range(n_maps)]

    # Work on flat indices into a copy padded with a ring of -inf: every neighbour of a cell
    # is then the cell's flat index plus a fixed offset, border cells included, and the ring
    # can never be above the threshold, a maximum, or equal to a (finite) map value.
    padded = np.full((n_maps, h + 2, w + 2), -np.inf)
    padded[:, 1:-1, 1:-1] = maps
    flat = padded.reshape(-1)
    offs = _offsets(w + 2)

    if mode == "cells":
        cells = np.flatnonzero(flat > threshold)
    else:
        cells = _candidates(flat, threshold, offs)
    v = flat[cells]
    if n_maps == 1:
        order = np.argsort(-v, kind="stable")  # value descending, ties stay row-major
        cells, v = cells[order], v[order]
        b, rest = np.zeros(cells.size, dtype=np.intp), cells
    else:
        b, rest = np.divmod(cells, (h + 2) * (w + 2))
        order = np.lexsort((-v, b))  # map, then value descending; stable, as above
        cells, v, b, rest = cells[order], v[order], b[order], rest[order]

    if nms_radius > 1:
        keep = _nms(b, rest, maps.shape, nms_radius, max_targets)
    elif max_targets is not None:
        keep = np.arange(b.size) - np.searchsorted(b, b, side="left") < max_targets
    else:
        keep = None
    if keep is not None:
        cells, v, b, rest = cells[keep], v[keep], b[keep], rest[keep]

    out = np.empty((cells.size, 3))
    out[:, 1], out[:, 0] = np.divmod(rest, w + 2)  # padded (row, column) = cell + 1
    out[:, :2] -= 1.0  # HR cell (column j, row i)
    if refine != "none" and cells.size:
        if refine == "centroid":
            out[:, :2] += _centroid(flat, cells, v, offs, threshold if mode == "cells" else None)
        else:
            out[:, :2] += _quadratic(flat, cells, v, offs)
    out[:, :2] = hr_to_lr(out[:, :2], ratio)
    out[:, 2] = v
    if n_maps == 1:
        return [out]
    return np.split(out, np.cumsum(np.bincount(b, minlength=n_maps))[:-1])


def _as_maps(maps, ndim: int, name: str) -> np.ndarray:
    """``maps`` as float64 with ``ndim`` dimensions and only finite values, else ValueError."""
    try:
        m = np.asarray(maps, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array: {exc}") from None
    if m.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {m.shape}")
    # A finite sum proves every value finite (NaN and inf propagate); the full test runs
    # only when the sum is not finite, which huge finite values can also cause.
    if not math.isfinite(m.sum()) and not np.isfinite(m).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return m


def _check_options(threshold, refine, max_targets, ratio, nms_radius):
    """Validated options; fail early with a message that names the bad option."""
    if refine not in REFINE_MODES:
        raise ValueError(f"refine must be one of {REFINE_MODES}, got {refine!r}")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    if threshold != threshold:
        raise ValueError("threshold must not be NaN")
    try:
        ratio = operator.index(ratio)
        nms_radius = operator.index(nms_radius)
        if max_targets is not None:
            max_targets = operator.index(max_targets)
    except TypeError as exc:
        raise ValueError(f"ratio, nms_radius and max_targets must be integers: {exc}") from None
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if nms_radius < 0:
        raise ValueError(f"nms_radius must be >= 0, got {nms_radius}")
    if max_targets is not None and max_targets < 0:
        raise ValueError(f"max_targets must be >= 0 or None, got {max_targets}")
    return threshold, max_targets, ratio, nms_radius


@lru_cache(maxsize=16)
def _offsets(row: int) -> dict[str, np.ndarray]:
    """Flat-index offsets of the neighbourhoods in a padded map whose rows are ``row`` long."""

    def flat(offsets):
        return np.array([di * row + dj for di, dj in offsets])

    return {
        "block": flat(_BLOCK),
        "neighbours": flat(_NEIGHBOURS),
        "forward": flat(_FORWARD),
        "row": row,
        "before": np.array([-1, -row]),  # left, up
        "after": np.array([1, row]),  # right, down
    }


def _candidates(flat: np.ndarray, threshold: float, offs: dict) -> np.ndarray:
    """Sorted flat indices (into the padded stack) of the peak cells before NMS.

    The 3x3 maximum is separable: a running maximum of 3 along the flat array (rows), then of
    3 at a stride of one padded row (columns). Sliding across row or map boundaries only ever
    mixes in the -inf ring, which is never a candidate itself. Fast path: a local maximum with
    no equal neighbour is a peak by itself; only when a candidate ties with a neighbour is the
    plateau rule applied.
    """
    row = offs["row"]
    rows_max = np.maximum(np.maximum(flat[:-2], flat[1:-1]), flat[2:])  # centred at k + 1
    n = rows_max.size - 2 * row
    block_max = np.maximum(  # centred at k + 1 + row
        np.maximum(rows_max[:n], rows_max[row : row + n]), rows_max[2 * row :]
    )
    centre = flat[1 + row : 1 + row + n]
    cells = np.flatnonzero((centre > threshold) & (centre == block_max)) + (1 + row)
    if (flat[cells[:, None] + offs["neighbours"]] == flat[cells][:, None]).any():
        cells = _resolve_plateaus(flat, cells, threshold, offs)
    return cells


def _resolve_plateaus(flat, cells, threshold, offs) -> np.ndarray:
    """The candidate ``cells`` with each plateau reduced to its first cell.

    Plateaus are the connected components of the graph joining 8-adjacent equal cells above
    the threshold (below it nothing can be a peak). A plateau with a non-candidate cell has a
    higher neighbour somewhere: it is a shoulder, not a maximum, and yields no peak.
    """
    above = np.flatnonzero(flat > threshold)  # sorted: (map, row-major) order
    fwd = above[:, None] + offs["forward"]  # (N, 4)
    src, col = np.nonzero(flat[fwd] == flat[above][:, None])
    # An equal neighbour is above the threshold too, hence in ``above``.
    dst = np.searchsorted(above, fwd[src, col])
    labels = _components(above.size, src, dst)

    is_max = np.zeros(above.size, dtype=bool)
    is_max[np.searchsorted(above, cells)] = True
    spoiled = np.zeros(above.size, dtype=bool)
    spoiled[labels[~is_max]] = True
    # A plateau's label is its smallest index, i.e. its first cell in row-major order.
    first = labels == np.arange(above.size)
    return above[is_max & first & ~spoiled[labels]]


def _components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph on nodes 0..n-1 with edges (src, dst).

    Returns for every node the smallest node of its component. Min-label propagation along
    the edges plus pointer jumping: plateaus are small, so this takes a few cheap numpy
    passes, where a sparse-graph library costs hundreds of microseconds in overhead alone.
    """
    labels = np.arange(n)
    while True:
        low = np.minimum(labels[src], labels[dst])
        new = labels.copy()
        np.minimum.at(new, src, low)
        np.minimum.at(new, dst, low)
        new = new[new]  # labels only ever point to a smaller node of the same component
        if np.array_equal(new, labels):
            return labels
        labels = new


def _nms(b, rest, shape, radius: int, max_targets: int | None) -> np.ndarray:
    """Greedy NMS over candidates sorted by (map, value desc); returns the keep mask.

    ``rest`` is each candidate's flat index inside its padded map. A per-map boolean grid
    marks the cells covered by accepted peaks, so each candidate costs one lookup and one
    slice assignment.
    """
    n, h, w = shape
    i, j = np.divmod(rest, w + 2)  # padded row/column = cell + 1
    covered = np.zeros((n, h + 2 * radius, w + 2 * radius), dtype=bool)
    counts = [0] * n
    cap = b.size if max_targets is None else max_targets
    keep = np.zeros(b.size, dtype=bool)
    span = 2 * radius + 1
    shift = radius - 1  # covered index = cell + radius = padded index + radius - 1
    for k, (bk, ik, jk) in enumerate(zip(b.tolist(), i.tolist(), j.tolist())):
        if counts[bk] >= cap or covered[bk, ik + shift, jk + shift]:
            continue
        keep[k] = True
        counts[bk] += 1
        covered[bk, ik - 1 : ik - 1 + span, jk - 1 : jk - 1 + span] = True
    return keep


def _centroid(flat, cells, v, offs, exclude_above: float | None = None) -> np.ndarray:
    """(dx, dy) columns: intensity-weighted centroid offset over the 3x3 neighbourhood.

    With ``exclude_above`` set, neighbours above it (targets of their own) get no weight.

    Values are clipped at 0 (the -inf ring becomes 0, which cuts the neighbourhood at the
    border) so that negative network output cannot push the centroid away from the peak; the
    offset is then a convex combination of -1, 0, 1, i.e. within +-1 cell.
    """
    weights = np.maximum(flat[cells[:, None] + offs["block"]], 0.0)  # (K, 9)
    if exclude_above is not None:
        centre = weights[:, 4].copy()
        weights[weights > exclude_above] = 0.0
        weights[:, 4] = centre
    moments = weights @ _MOMENTS  # (K, 3): mass, sum of weight*dcol, sum of weight*drow
    mass = moments[:, :1]
    if (mass > 0).all():
        return moments[:, 1:] / mass
    # Only a peak <= 0 (possible with a negative threshold) has no mass: keep its centre.
    return np.where(mass > 0, moments[:, 1:], 0.0) / np.where(mass > 0, mass, 1.0)


def _quadratic(flat, cells, v, offs) -> np.ndarray:
    """(dx, dy) columns: separable 3-point parabola fits along the row and the column.

    The vertex of the parabola through (-1, before), (0, centre), (1, after) is at
    (before - after) / (2 * curvature), curvature = before - 2 * centre + after. It is clamped
    to +-0.5 cell (beyond that the neighbour cell would be the peak) and replaced by 0 at the
    border (a neighbour is the -inf ring) or for a degenerate, flat fit (curvature 0).
    """
    before = flat[cells[:, None] + offs["before"]]  # (K, 2): left, up
    after = flat[cells[:, None] + offs["after"]]  # (K, 2): right, down
    curvature = before + after - 2.0 * v[:, None]  # -inf at the border, <= 0 elsewhere
    ok = np.isfinite(curvature) & (curvature < 0)
    offset = np.zeros(before.shape)
    np.subtract(before, after, out=offset, where=ok)  # ``where`` skips -inf - -inf
    np.divide(offset, 2.0 * curvature, out=offset, where=ok)
    np.maximum(offset, -0.5, out=offset)  # np.clip costs more than both calls on tiny arrays
    return np.minimum(offset, 0.5, out=offset)
