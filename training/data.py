"""Reader and writer of the SeqCSIST on-disk format (docs/method.md section 3).

One format for our simulated data and for the published data set, so that a user who has the
real SeqCSIST data can train on it unchanged::

    DIR/<split>/image/image_<n>.png        11 x 11 8-bit grey PNG
    DIR/<split>/annotation/COS<n>.xml      the targets of frame n
    DIR/<split>/images.npy                 instead of the PNGs when written with --float
                                           (float32, shape (N, 11, 11))

``n`` counts frames from 0 within each split; frames ``20t .. 20t + 19`` are trajectory ``t``.

The XML (``<annotation>`` with ``<filename>``, ``<size>``, ``<sigma>`` and one ``<object>``
per target holding ``<coordinate>`` with ``<xc>``, ``<yc>``, ``<brightness>``) stores the
ROW in ``xc`` and the COLUMN in ``yc`` (the published HR ground truth is indexed
``[round(3*xc + 1), round(3*yc + 1)]``). Everywhere else in this project ``x`` is the column
and ``y`` the row, so the swap happens in ``write_frame`` / ``read_annotation`` and nowhere
else.
"""

from __future__ import annotations

import dataclasses
import os
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from service.science import physics
from service.science.background import condition

IMAGE_DIR = "image"
ANNOTATION_DIR = "annotation"
FLOAT_IMAGES = "images.npy"
FRAMES_PER_TRAJECTORY = 20
WINDOW = 5

_IMAGE_RE = re.compile(r"^image_(\d+)\.png$")
_ANNOTATION_RE = re.compile(r"^COS(\d+)\.xml$")


class DataError(ValueError):
    """A data set on disk is missing, incomplete or malformed; the message names the file."""


# --------------------------------------------------------------------------------------------
# paths


def image_path(split_dir: Path, n: int) -> Path:
    """Path of frame ``n``'s PNG inside a split folder."""
    return Path(split_dir) / IMAGE_DIR / f"image_{n}.png"


def annotation_path(split_dir: Path, n: int) -> Path:
    """Path of frame ``n``'s XML annotation inside a split folder."""
    return Path(split_dir) / ANNOTATION_DIR / f"COS{n}.xml"


# --------------------------------------------------------------------------------------------
# writing


def _num(value: float) -> str:
    """Lossless, deterministic text of a float: ``float(_num(v)) == v`` bit for bit."""
    return repr(float(value))


def annotation_xml(n: int, targets: np.ndarray, size: tuple[int, int] = (11, 11), sigma: float = 0.5) -> str:
    """The XML text of frame ``n``; ``targets`` rows are (x, y, brightness), ours.

    Written as a string template rather than through ElementTree: it is several times faster
    (100k files per data set) and the layout is fixed. ``<name>Target</name>`` is kept from
    the published files so that their readers accept ours.
    """
    height, width = size
    t = physics.as_targets(targets)
    parts = [
        '<?xml version="1.0" ?>\n<annotation>\n',
        f"\t<filename>image_{n}.png</filename>\n",
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>1</depth>\n\t</size>\n",
        f"\t<sigma>{_num(sigma)}</sigma>\n",
    ]
    for x, y, a in t:
        # the swap: xc is the row (our y), yc the column (our x)
        parts.append(
            "\t<object>\n\t\t<name>Target</name>\n\t\t<coordinate>\n"
            f"\t\t\t<xc>{_num(y)}</xc>\n\t\t\t<yc>{_num(x)}</yc>\n"
            f"\t\t\t<brightness>{_num(a)}</brightness>\n"
            "\t\t</coordinate>\n\t</object>\n"
        )
    parts.append("</annotation>\n")
    return "".join(parts)


def write_annotation(
    split_dir: Path, n: int, targets: np.ndarray, size: tuple[int, int] = (11, 11), sigma: float = 0.5
) -> None:
    """Write ``COS<n>.xml`` (folders must exist)."""
    annotation_path(split_dir, n).write_text(annotation_xml(n, targets, size, sigma), encoding="utf-8")


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an 8-bit grey PNG; ``cv2.imencode`` + one write is faster than ``imwrite``."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"PNG frames must be 2-D uint8, got {image.dtype} {image.shape}")
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    Path(path).write_bytes(buf.tobytes())


def write_frame(split_dir: Path, n: int, image: np.ndarray, targets: np.ndarray, sigma: float = 0.5) -> None:
    """Write frame ``n`` of a split: ``image/image_<n>.png`` and ``annotation/COS<n>.xml``.

    ``image`` is uint8 (size, size); ``targets`` rows are (x, y, brightness) in our convention.
    The sub-folders are created if missing.
    """
    split_dir = Path(split_dir)
    (split_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (split_dir / ANNOTATION_DIR).mkdir(parents=True, exist_ok=True)
    image = np.asarray(image)
    write_png(image_path(split_dir, n), image)
    write_annotation(split_dir, n, targets, image.shape[:2], sigma)


# --------------------------------------------------------------------------------------------
# reading


def _parse_annotation(path: Path) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Targets (K, 3) rows (x, y, brightness) ours, and (height, width) if the XML gives it."""
    path = Path(path)
    try:
        root = ET.fromstring(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"missing annotation file: {path}") from None
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"malformed annotation file {path}: {exc}") from None
    if root.tag != "annotation":
        raise DataError(f"malformed annotation file {path}: root element is <{root.tag}>, not <annotation>")
    rows = []
    try:
        for obj in root.iter("object"):
            coord = obj.find("coordinate")
            if coord is None:
                raise DataError(f"malformed annotation file {path}: <object> without <coordinate>")
            row_c, col_c, bright = (coord.findtext(tag) for tag in ("xc", "yc", "brightness"))
            if row_c is None or col_c is None or bright is None:
                raise DataError(f"malformed annotation file {path}: <coordinate> needs <xc>, <yc>, <brightness>")
            # the swap: xc is the row (our y), yc the column (our x)
            rows.append((float(col_c), float(row_c), float(bright)))
        size = None
        if root.find("size") is not None and root.findtext("size/width") is not None:
            size = (int(float(root.findtext("size/height"))), int(float(root.findtext("size/width"))))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"malformed annotation file {path}: {exc}") from None
    targets = np.array(rows, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(targets)):
        raise DataError(f"malformed annotation file {path}: non-finite number")
    return targets, size


def read_annotation(path) -> np.ndarray:
    """Targets of one ``COS<n>.xml`` as (K, 3) float64 rows (x, y, brightness), our convention."""
    return _parse_annotation(Path(path))[0]


def read_png(path: Path) -> np.ndarray:
    """One grey PNG as a 2-D array; a missing or undecodable file is a ``DataError``."""
    path = Path(path)
    try:
        buf = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"missing image file: {path}") from None
    image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if image is None:
        raise DataError(f"malformed image file {path}: not a readable PNG")
    if image.ndim != 2:
        raise DataError(f"malformed image file {path}: expected a grey image, got shape {image.shape}")
    return image


@dataclass
class Split:
    """One split in memory: frames grouped by trajectory, with their targets."""

    frames: np.ndarray  # float32 (n_traj, T, H, W)
    targets: list[list[np.ndarray]]  # [trajectory][frame] -> (K, 3) rows (x, y, brightness)
    name: str
    root: Path

    @property
    def n_trajectories(self) -> int:
        return int(self.frames.shape[0])

    @property
    def frames_per_trajectory(self) -> int:
        return int(self.frames.shape[1])


def conditioned(split: Split) -> Split:
    """The split with its frames as the network sees them (:func:`service.science.background.condition`)."""
    return dataclasses.replace(split, frames=condition(split.frames))


def concat_splits(splits: list[Split]) -> Split:
    """Several splits of the same name as one (trajectories in order), e.g. protocol and field
    data trained on together; their frames must have one shape."""
    if len(splits) == 1:
        return splits[0]
    shapes = {s.frames.shape[1:] for s in splits}
    if len(shapes) != 1:
        raise DataError(
            f"cannot mix splits with frames of shapes {sorted(shapes)}: " + ", ".join(str(s.root) for s in splits)
        )
    return Split(
        np.concatenate([s.frames for s in splits]),
        [t for s in splits for t in s.targets],
        splits[0].name,
        splits[0].root,
    )


def _indices(folder: Path, pattern: re.Pattern) -> set[int]:
    """Frame numbers of the files in ``folder`` whose names match ``pattern`` (others ignored)."""
    found = set()
    with os.scandir(folder) as it:
        for entry in it:
            m = pattern.match(entry.name)
            if m:
                found.add(int(m.group(1)))
    return found


def _check_complete(indices: set[int], n_frames: int, path_of) -> None:
    """Every frame 0..n_frames-1 must be present; name the first missing file."""
    if len(indices) != n_frames:
        missing = min(set(range(n_frames)) - indices)
        raise DataError(f"missing file: {path_of(missing)}")


def _read_chunk(split_dir: Path, frames: range, read_images: bool):
    """Read a contiguous run of frames: images (or None) and targets, checking sizes agree."""
    images = [] if read_images else None
    targets = []
    for n in frames:
        t, size = _parse_annotation(annotation_path(split_dir, n))
        targets.append(t)
        if read_images:
            img = read_png(image_path(split_dir, n))
            if size is not None and img.shape != size:
                raise DataError(
                    f"{image_path(split_dir, n)} is {img.shape[1]}x{img.shape[0]} but "
                    f"{annotation_path(split_dir, n)} says {size[1]}x{size[0]}"
                )
            images.append(img)
    return images, targets


def read_split(
    root,
    split: str,
    frames_per_trajectory: int = FRAMES_PER_TRAJECTORY,
    limit: int | None = None,
    progress: bool = True,
) -> Split:
    """Read ``root/<split>`` into a ``Split``; ``limit`` keeps the first N trajectories only.

    Images come from ``images.npy`` when present (a ``--float`` data set), else from the PNGs.
    The files are read by a small thread pool: PNG decoding and file reads release the GIL,
    and this keeps a 3,500-trajectory split (70k PNG + 70k XML) well within a minute.
    """
    from tqdm import tqdm

    root = Path(root)
    split_dir = root / split
    ann_dir = split_dir / ANNOTATION_DIR
    img_dir = split_dir / IMAGE_DIR
    npy_path = split_dir / FLOAT_IMAGES
    if not split_dir.is_dir():
        raise DataError(f"missing split folder: {split_dir}")
    if not ann_dir.is_dir():
        raise DataError(f"missing annotation folder: {ann_dir}")
    use_npy = npy_path.is_file()
    if not use_npy and not img_dir.is_dir():
        raise DataError(f"missing image folder: {img_dir} (and no {npy_path})")

    ann_idx = _indices(ann_dir, _ANNOTATION_RE)
    img_idx = set() if use_npy else _indices(img_dir, _IMAGE_RE)
    n_frames = max(ann_idx | img_idx, default=-1) + 1
    if n_frames == 0:
        raise DataError(f"split {split!r} in {root} has no frames")
    _check_complete(ann_idx, n_frames, lambda n: annotation_path(split_dir, n))
    if not use_npy:
        _check_complete(img_idx, n_frames, lambda n: image_path(split_dir, n))
    T = int(frames_per_trajectory)
    if T < 1 or n_frames % T:
        raise DataError(f"split {split!r} in {root} has {n_frames} frames, not a multiple of {T} frames per trajectory")
    n_traj = n_frames // T
    if limit is not None:
        n_traj = max(0, min(n_traj, int(limit)))
    n_read = n_traj * T

    chunk = 500
    starts = range(0, n_read, chunk)
    workers = max(2, min(8, 2 * (os.cpu_count() or 1)))
    images: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(lambda s: _read_chunk(split_dir, range(s, min(s + chunk, n_read)), not use_npy), starts)
        for imgs, tgts in tqdm(
            jobs, total=len(starts), desc=f"read {split}", unit="chunk", disable=not progress, leave=False
        ):
            if imgs is not None:
                images.extend(imgs)
            targets.extend(tgts)

    if use_npy:
        try:
            arr = np.load(npy_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"malformed image file {npy_path}: {exc}") from None
        if arr.ndim != 3 or arr.shape[0] != n_frames:
            raise DataError(f"{npy_path} has shape {arr.shape}, expected ({n_frames}, H, W)")
        frames = np.array(arr[:n_read], dtype=np.float32)
    elif n_read:
        shapes = {img.shape for img in images}
        if len(shapes) != 1:
            raise DataError(f"images in {img_dir} have different sizes: {sorted(shapes)}")
        frames = np.stack(images).astype(np.float32)
    else:
        frames = np.zeros((0, 11, 11), dtype=np.float32)
    frames = frames.reshape(n_traj, T, *frames.shape[1:])
    per_traj = [targets[i * T : (i + 1) * T] for i in range(n_traj)]
    return Split(frames=frames, targets=per_traj, name=split, root=root)


# --------------------------------------------------------------------------------------------
# training views


def hr_maps(targets_per_frame, size: int = physics.SIZE, ratio: int = physics.RATIO) -> np.ndarray:
    """HR ground-truth maps, float32 (N, ratio*size, ratio*size), one per frame's (K, 3) targets."""
    targets_per_frame = list(targets_per_frame)
    out = np.zeros((len(targets_per_frame), ratio * size, ratio * size), dtype=np.float32)
    for i, t in enumerate(targets_per_frame):
        out[i] = physics.hr_map(t, size, ratio)
    return out


def windows(frames: np.ndarray, length: int = WINDOW) -> np.ndarray:
    """All full windows of ``length`` consecutive frames, trajectory-major.

    ``frames`` (n_traj, T, H, W) -> (n_traj * (T - length + 1), length, H, W); window ``w`` of
    trajectory ``t`` is row ``t * (T - length + 1) + w`` and its middle frame is
    ``window_middles(T, length)[w]``. Any trailing shape works the same, e.g. per-frame
    features (n_traj, T, F) -> (n_windows, length, F).
    """
    frames = np.asarray(frames)
    if frames.ndim < 3:
        raise ValueError(f"frames must be (n_traj, T, H, W) (or (n_traj, T, ...)), got {frames.shape}")
    n, T = frames.shape[:2]
    if length < 1 or length > T:
        raise ValueError(f"window length {length} does not fit {T} frames")
    view = np.lib.stride_tricks.sliding_window_view(frames, length, axis=1)  # (n, T-L+1, ..., L)
    return np.ascontiguousarray(np.moveaxis(view, -1, 2)).reshape(n * (T - length + 1), length, *frames.shape[2:])


def window_middles(T: int = FRAMES_PER_TRAJECTORY, length: int = WINDOW) -> np.ndarray:
    """0-based index of each window's middle frame: 2..17 for T=20, length 5."""
    half = length // 2
    return np.arange(half, T - (length - 1 - half), dtype=np.int64)
