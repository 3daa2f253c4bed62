"""The SeqCSIST on-disk format: writer, reader, errors, training views."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from service.science import physics
from training import data
from training.data import DataError


def _targets(rng: np.random.Generator, k: int) -> np.ndarray:
    return np.column_stack([rng.uniform(1, 9, k), rng.uniform(1, 9, k), rng.uniform(220, 250, k)])


def _write_split(root: Path, split: str, n_traj: int, T: int = 20, seed: int = 0) -> list[np.ndarray]:
    """A small split written frame by frame; returns the targets of every frame."""
    rng = np.random.default_rng(seed)
    out = []
    for n in range(n_traj * T):
        t = _targets(rng, int(rng.integers(2, 5)))
        data.write_frame(root / split, n, physics.quantize(physics.pixel_response(t)), t)
        out.append(t)
    return out


HAND_MADE = """<?xml version="1.0" ?>
<annotation>
\t<filename>COS0</filename>
\t<size><width>11</width><height>11</height><depth>1</depth></size>
\t<sigma>0.5</sigma>
\t<object><name>Target</name><coordinate><xc>2.25</xc><yc>7.5</yc><brightness>230.0</brightness></coordinate></object>
\t<object><name>Target</name><coordinate><xc>6.0</xc><yc>1.0</yc><brightness>221.5</brightness></coordinate></object>
</annotation>
"""


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(1)
    t = _targets(rng, 4)
    img = physics.quantize(physics.pixel_response(t))
    data.write_frame(tmp_path / "train", 7, img, t)
    got = data.read_annotation(tmp_path / "train" / "annotation" / "COS7.xml")
    assert got.dtype == np.float64 and got.shape == (4, 3)
    np.testing.assert_array_equal(got, t)  # bit-exact: repr() floats
    np.testing.assert_array_equal(data.read_png(tmp_path / "train" / "image" / "image_7.png"), img)


def test_writer_fields_and_swap(tmp_path):
    t = np.array([[7.5, 2.25, 230.0]])  # x = column 7.5, y = row 2.25
    data.write_frame(tmp_path, 3, np.zeros((11, 11), np.uint8), t, sigma=0.5)
    root = ET.parse(tmp_path / "annotation" / "COS3.xml").getroot()
    assert root.tag == "annotation"
    assert root.findtext("filename") == "image_3.png"
    assert [root.findtext(f"size/{k}") for k in ("width", "height", "depth")] == ["11", "11", "1"]
    assert float(root.findtext("sigma")) == 0.5
    coord = root.find("object/coordinate")
    assert float(coord.findtext("xc")) == 2.25  # row
    assert float(coord.findtext("yc")) == 7.5  # column
    assert float(coord.findtext("brightness")) == 230.0


def test_writer_is_deterministic(tmp_path):
    t = np.array([[1.0 / 3.0, 2.0 / 7.0, 233.3]])
    data.write_frame(tmp_path / "a", 0, np.zeros((11, 11), np.uint8), t)
    data.write_frame(tmp_path / "b", 0, np.zeros((11, 11), np.uint8), t)
    for sub in ("annotation/COS0.xml", "image/image_0.png"):
        assert (tmp_path / "a" / sub).read_bytes() == (tmp_path / "b" / sub).read_bytes()


def test_reader_swaps_published_rows_and_columns(tmp_path):
    path = tmp_path / "COS0.xml"
    path.write_text(HAND_MADE)
    got = data.read_annotation(path)
    np.testing.assert_array_equal(got, [[7.5, 2.25, 230.0], [1.0, 6.0, 221.5]])
    # the published HR ground truth is indexed [round(3*xc + 1), round(3*yc + 1)]
    hr = data.hr_maps([got])[0]
    assert hr[round(3 * 2.25 + 1), round(3 * 7.5 + 1)] == 230.0
    assert hr[round(3 * 6.0 + 1), round(3 * 1.0 + 1)] == 221.5
    assert hr.sum() == pytest.approx(451.5)


def test_hr_maps_places_brightness(tmp_path):
    frames = [np.array([[4.0, 6.0, 240.0], [4.34, 6.66, 225.0]]), np.array([[0.0, 10.0, 250.0]]), np.zeros((0, 3))]
    hr = data.hr_maps(frames)
    assert hr.shape == (3, 33, 33) and hr.dtype == np.float32
    for i, t in enumerate(frames):
        expect = np.zeros((33, 33), np.float32)
        for x, y, a in t:
            expect[round(3 * y + 1), round(3 * x + 1)] += a
        np.testing.assert_array_equal(hr[i], expect)
    assert hr[0, 19, 13] == 240.0 and hr[0, 21, 14] == 225.0 and hr[1, 31, 1] == 250.0


def test_read_split(tmp_path):
    written = _write_split(tmp_path, "val", n_traj=3)
    split = data.read_split(tmp_path, "val", progress=False)
    assert split.name == "val" and split.root == tmp_path
    assert split.n_trajectories == 3
    assert split.frames.shape == (3, 20, 11, 11) and split.frames.dtype == np.float32
    assert len(split.targets) == 3 and all(len(tr) == 20 for tr in split.targets)
    for n, t in enumerate(written):
        tr, f = divmod(n, 20)
        np.testing.assert_array_equal(split.targets[tr][f], t)
        np.testing.assert_array_equal(split.frames[tr, f], physics.quantize(physics.pixel_response(t)))
    limited = data.read_split(tmp_path, "val", limit=2, progress=False)
    assert limited.frames.shape == (2, 20, 11, 11) and len(limited.targets) == 2
    np.testing.assert_array_equal(limited.frames, split.frames[:2])
    # other trajectory lengths
    by10 = data.read_split(tmp_path, "val", frames_per_trajectory=10, progress=False)
    assert by10.frames.shape == (6, 10, 11, 11)


def test_read_split_float_images(tmp_path):
    written = _write_split(tmp_path, "test", n_traj=1)
    imgs = np.stack([physics.pixel_response(t) for t in written]).astype(np.float32)
    np.save(tmp_path / "test" / "images.npy", imgs)
    split = data.read_split(tmp_path, "test", progress=False)
    np.testing.assert_array_equal(split.frames[0], imgs)  # npy wins over PNGs


def test_errors_name_the_file(tmp_path):
    _write_split(tmp_path, "train", n_traj=2)
    ann = tmp_path / "train" / "annotation"
    img = tmp_path / "train" / "image"

    with pytest.raises(DataError, match="nosuch"):
        data.read_split(tmp_path, "nosuch")

    (img / "image_13.png").unlink()
    with pytest.raises(DataError, match="image_13.png"):
        data.read_split(tmp_path, "train", progress=False)
    data.write_png(img / "image_13.png", np.zeros((11, 11), np.uint8))

    good = (ann / "COS5.xml").read_text()
    (ann / "COS5.xml").write_text(good.replace("</annotation>", ""))
    with pytest.raises(DataError, match="COS5.xml"):
        data.read_split(tmp_path, "train", progress=False)
    with pytest.raises(DataError, match="COS5.xml"):
        data.read_annotation(ann / "COS5.xml")
    (ann / "COS5.xml").write_text(good.replace("<yc>", "<yc>abc", 1))
    with pytest.raises(DataError, match="COS5.xml"):
        data.read_split(tmp_path, "train", progress=False)
    (ann / "COS5.xml").write_text(good)

    (img / "image_22.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="image_22.png"):
        data.read_split(tmp_path, "train", progress=False)
    data.write_png(img / "image_22.png", np.zeros((11, 11), np.uint8))

    (ann / "COS30.xml").unlink()
    with pytest.raises(DataError, match="COS30.xml"):
        data.read_split(tmp_path, "train", progress=False)
    with pytest.raises(DataError, match="COS30.xml"):
        data.read_annotation(ann / "COS30.xml")
    (ann / "COS30.xml").write_text(good)

    data.read_split(tmp_path, "train", progress=False)  # repaired: reads again
    data.write_frame(tmp_path / "train", 40, np.zeros((11, 11), np.uint8), np.zeros((0, 3)))
    with pytest.raises(DataError, match="'train'.*41 frames"):
        data.read_split(tmp_path, "train", progress=False)

    import shutil

    shutil.rmtree(img)
    with pytest.raises(DataError, match="image"):
        data.read_split(tmp_path, "train", progress=False)
    assert issubclass(DataError, ValueError)


def test_windows_and_middles():
    n, T = 3, 20
    frames = np.arange(n * T, dtype=np.float32)[:, None, None] * np.ones((1, 11, 11), np.float32)
    frames = frames.reshape(n, T, 11, 11)  # value = 20 * trajectory + frame
    w = data.windows(frames)
    assert w.shape == (n * 16, 5, 11, 11)
    mid = data.window_middles()
    np.testing.assert_array_equal(mid, np.arange(2, 18))
    for t in range(n):
        for k in range(16):
            np.testing.assert_array_equal(w[t * 16 + k, :, 0, 0], 20 * t + k + np.arange(5))
            assert w[t * 16 + k, 2, 0, 0] == 20 * t + mid[k]
    assert data.windows(frames, length=3).shape == (n * 18, 3, 11, 11)
    np.testing.assert_array_equal(data.window_middles(20, 3), np.arange(1, 19))
    np.testing.assert_array_equal(data.window_middles(7, 5), [2, 3, 4])


def test_windows_of_per_frame_features():
    feats = np.arange(2 * 7 * 3, dtype=np.float32).reshape(2, 7, 3)  # (n_traj, T, F)
    w = data.windows(feats)
    assert w.shape == (2 * 3, 5, 3)
    np.testing.assert_array_equal(w[4], feats[1, 1:6])
