"""The streaming parts' files and input layouts, numpy and ONNX Runtime only (no torch): shared
by ``csist export``, the split commands and ``csist quantize``.

- :func:`part_paths`: where the parts of an exported model go in its folder;
- :func:`sample_windows`: simulated windows for parity checks;
- :func:`pair_inputs`, :func:`fuse_inputs`, :func:`pair_maps`: a window's head as its halves
  (align each neighbour, then fuse), in the layouts of ``service.science.windows``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.modelpkg.manifest import part_file
from service.science.windows import HALF, NEIGHBOURS, fuse_features, pair_features

PART_NAMES = ("encoder", "head", "align", "fuse")


def part_paths(directory: Path) -> dict[str, Path]:
    """Where the parts go in the model folder ``directory``: ``encoder.onnx`` etc."""
    return {name: Path(directory) / part_file(name) for name in PART_NAMES}


def sample_windows(n: int = 16, seed: int = 0) -> np.ndarray:
    """Simulated 8-bit windows (n, 5, 11, 11) for the parity check."""
    from training.simulate import SimParams, render, simulate_trajectory

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        frames, _ = simulate_trajectory(rng, SimParams())
        images = render(frames, 0.0, rng, False).astype(np.float32)
        start = rng.integers(0, len(images) - 4)
        out.append(images[start : start + 5])
    return np.stack(out)


def pair_inputs(feats: np.ndarray) -> tuple[np.ndarray, int]:
    """The ``align`` input of every neighbour of windows' features (B, 5, F), neighbour-major."""
    b = len(feats)
    mid = np.tile(feats[:, HALF], (len(NEIGHBOURS), 1))
    nb = np.concatenate([feats[:, p] for p in NEIGHBOURS])
    return pair_features(mid, nb, np.repeat(NEIGHBOURS, b)), b


def fuse_inputs(align, feats: np.ndarray) -> np.ndarray:
    """The ``fuse`` input of windows' features (B, 5, F), their neighbours aligned by ``align``."""
    pairs, b = pair_inputs(feats)
    aligned = align(pairs).reshape(len(NEIGHBOURS), b, -1).transpose(1, 0, 2)  # (B, 4, F)
    return fuse_features(feats[:, HALF], aligned)


def pair_maps(align, fuse, feats: np.ndarray) -> np.ndarray:
    """HR maps of windows' features (B, 5, F) through the ``align`` and ``fuse`` parts."""
    return fuse(fuse_inputs(align, feats))
