"""What both simulation scenarios share (``csist simulate``, ``training/simulate.py`` and
``training/field.py``): the on-disk format's version and splits, per-trajectory seeding, the
split counts, the output folder and the preview picture."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


def trajectory_rngs(seed: int, n: int) -> list[np.random.Generator]:
    """Independent generators, one per trajectory; trajectory i's does not depend on n."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def split_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Trajectories per split, in order: 5000 at 0.7/0.15/0.15 -> 3500/750/750."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or np.any(f < 0) or f.sum() <= 0:
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {fractions}")
    bounds = np.rint(n * np.cumsum(f) / f.sum()).astype(int)
    bounds[-1] = n
    return list(np.diff(np.concatenate([[0], bounds])))


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix a new data set with an old one: stale frames would join the new splits."""
    existing = [out / s for s in SPLITS if (out / s).exists()] + (
        [out / "meta.json"] if (out / "meta.json").exists() else []
    )
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a data set ({existing[0]}); use --overwrite to replace it")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_preview(
    path: Path,
    samples: list[tuple[np.ndarray, np.ndarray]],
    n_cols: int = 5,
    titles: list[str] | None = None,
    stretch: bool = False,
) -> None:
    """Grid: one row per trajectory, ``n_cols`` frames across, true targets marked.

    ``titles`` adds a line per row; ``stretch`` maps each row's own min..max to black..white
    (a background pedestal would otherwise wash the targets out).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(samples)
    fig, axes = plt.subplots(rows, n_cols, figsize=(2.2 * n_cols, 2.3 * rows), squeeze=False)
    for r, (images, targets) in enumerate(samples):
        T = images.shape[0]
        vmin = float(images.min()) if stretch else 0.0
        vmax = max(float(images.max()), vmin + 1.0)
        for c, t in enumerate(np.linspace(0, T - 1, n_cols).round().astype(int)):
            ax = axes[r, c]
            ax.imshow(images[t], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.scatter(targets[t][:, 0], targets[t][:, 1], s=14, c="red", marker="x", linewidths=0.8)
            title = f"traj {r} frame {t + 1}  K={len(targets[t])}"
            if titles is not None and c == 0:
                title = f"{titles[r]}\n{title}"
            ax.set_title(title, fontsize=7, loc="left" if titles is not None and c == 0 else "center")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Written:
    """One simulated trajectory, as :func:`write_splits` writes it."""

    images: np.ndarray  # (T, H, W) sensor values (or float32 with ``float_out``)
    targets: list[np.ndarray]  # per frame (K, 3): x, y, brightness
    psf_sigma: float
    record: dict | None = None  # a line of the split's side file (per-trajectory conditions)


def write_splits(
    out: Path,
    counts: list[int],
    frames: int,
    float_out: bool,
    trajectory: Callable[[int], Written],
    write_png: Callable[[Path, np.ndarray], None],
    side_file: str | None = None,
    progress: bool = True,
    desc: str = "simulate",
    keep: int = 4,
) -> list[Written]:
    """Write trajectory 0, 1, ... (``trajectory(i)``) into the splits of ``out`` in order, in the
    published layout: PNG frames (or one float32 ``images.npy`` per split) and XML annotations;
    with ``side_file``, each trajectory's ``record`` as a JSON line of that file per split.
    Returns the first ``keep`` trajectories (for a preview)."""
    from tqdm import tqdm

    from training import data

    kept: list[Written] = []
    bar = tqdm(total=sum(counts), desc=desc, unit="traj", disable=not progress)
    i = 0
    for name, count in zip(SPLITS, counts):
        if count == 0:
            continue
        split_dir = out / name
        (split_dir / data.ANNOTATION_DIR).mkdir(parents=True)
        if not float_out:
            (split_dir / data.IMAGE_DIR).mkdir()
        float_images, lines = [], []
        for local in range(count):
            w = trajectory(i)
            for t in range(frames):
                frame_n = local * frames + t
                if float_out:
                    float_images.append(w.images[t])
                else:
                    write_png(data.image_path(split_dir, frame_n), w.images[t])
                data.write_annotation(split_dir, frame_n, w.targets[t], w.images.shape[1:], w.psf_sigma)
            if side_file is not None:
                lines.append(json.dumps({"trajectory": i, "split_index": local, **(w.record or {})}, sort_keys=True))
            if len(kept) < keep:
                kept.append(w)
            i += 1
            bar.update()
        if side_file is not None:
            (split_dir / side_file).write_text("\n".join(lines) + "\n", encoding="utf-8")
        if float_out:
            np.save(split_dir / data.FLOAT_IMAGES, np.stack(float_images).astype(np.float32))
    bar.close()
    return kept
