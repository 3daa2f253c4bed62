"""The SeqCSIST simulator: every rule of the protocol, the files it writes, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.science import physics
from training import data, simulate
from training.simulate import SimParams

N_TRAJ = 20  # 14 / 3 / 3


def _run(out: Path, *extra: str, n: int = N_TRAJ, seed: int = 0) -> int:
    return simulate.main(["--out", str(out), "--trajectories", str(n), "--seed", str(seed), "--quiet", *extra])


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "ds"
    assert _run(out) == 0
    return out


@pytest.fixture(scope="module")
def many() -> list[simulate.Trajectory]:
    """600 trajectories with the paper's parameters, straight from the generator."""
    return [simulate.sample_trajectory(rng) for rng in simulate.trajectory_rngs(123, 600)]


# --- the rules, on the generator's own records ------------------------------------------------


def test_target_count(many):
    ks = np.array([t.targets.shape[1] for t in many])
    assert set(ks) == {2, 3, 4}
    assert np.all(np.abs(np.bincount(ks)[2:] / len(ks) - 1 / 3) < 0.08)  # uniform
    p = SimParams(targets=(5, 8))
    ks8 = {simulate.sample_trajectory(r, p).targets.shape[1] for r in simulate.trajectory_rngs(1, 200)}
    assert ks8 == {5, 6, 7, 8}


def test_directions_distinct_axis_and_fixed(many):
    axis = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}
    seen = set()
    for t in many:
        assert len(set(t.direction_names)) == len(t.direction_names)
        assert set(t.direction_names) <= set(axis)
        seen |= set(t.direction_names)
        rel = t.targets[:, :, :2] - t.reference[:, None, :]  # (T, K, 2)
        unit = rel / np.linalg.norm(rel, axis=2, keepdims=True)
        expect = np.array([axis[name] for name in t.direction_names], float)
        np.testing.assert_allclose(unit, np.broadcast_to(expect, unit.shape), atol=1e-12)
    assert seen == set(axis)


def test_more_than_four_targets_use_compass_directions():
    p = SimParams(targets=(5, 8))
    s = np.sqrt(0.5)
    compass = {
        "right": (1, 0),
        "left": (-1, 0),
        "down": (0, 1),
        "up": (0, -1),
        "down-right": (s, s),
        "down-left": (-s, s),
        "up-left": (-s, -s),
        "up-right": (s, -s),
    }
    for rng in simulate.trajectory_rngs(5, 100):
        t = simulate.sample_trajectory(rng, p)
        assert len(set(t.direction_names)) == t.targets.shape[1] >= 5
        assert set(t.direction_names) <= set(compass)
        rel = t.targets[0, :, :2] - t.reference[0]
        np.testing.assert_allclose(rel, 0.3 * np.array([compass[n] for n in t.direction_names]), atol=1e-12)
        assert np.all(t.targets[..., :2] >= 0.5) and np.all(t.targets[..., :2] <= 9.5)


def test_spacing_and_outward_drift(many):
    for t in many:
        dist = np.linalg.norm(t.targets[:, :, :2] - t.reference[:, None, :], axis=2)  # (T, K)
        np.testing.assert_allclose(dist[0], 0.3, atol=1e-12)
        d = np.diff(dist, axis=0)
        assert np.all(d > 0) and np.all(d <= 0.0014 + 1e-12)
    steps = np.concatenate([np.diff(t.distances, axis=0).ravel() for t in many])
    assert steps.mean() == pytest.approx(0.0007, rel=0.03)  # U(0, 0.0014]


def test_reference_motion_and_curve(many):
    kinds = set()
    starts = set()
    for t in many:
        x0 = t.x0
        starts.add(x0)
        assert isinstance(x0, int) and 1 <= x0 <= 9
        ref = t.reference
        assert ref[0, 0] == x0
        expect_dir = 1 if x0 < 5 else -1
        assert t.heading == expect_dir
        np.testing.assert_allclose(np.diff(ref[:, 0]), 0.04 * expect_dir, atol=1e-12)
        np.testing.assert_array_equal(ref[:, 1], t.curve(ref[:, 0]))  # on the curve
        kinds.add(t.curve.kind)
    assert kinds == {"line", "quadratic", "circle"}
    assert starts == set(range(1, 10))
    y0 = np.array([t.reference[0, 1] for t in many])
    assert np.mean(np.abs(y0 - np.round(y0)) > 1e-6) > 0.9  # f(x0) is not an integer


def test_curve_kinds_are_uniform(many):
    kinds = [t.curve.kind for t in many]
    for k in ("line", "quadratic", "circle"):
        assert abs(kinds.count(k) / len(kinds) - 1 / 3) < 0.08


def test_circle_and_quadratic_curves():
    c = simulate.Curve("circle", (5.0, 5.0, 2.0, -1.0))
    np.testing.assert_allclose(c([5.0, 7.0, 3.0]), [3.0, 5.0, 5.0])
    assert np.isnan(c(7.5))
    q = simulate.Curve("quadratic", (2.0, 4.0, 0.5, -1.0))
    np.testing.assert_allclose(q([2.0, 3.0]), [4.0, 3.5])


def test_brightness(many):
    b = np.concatenate([t.brightness for t in many])
    assert b.min() >= 220 and b.max() <= 250 and b.max() - b.min() > 28
    for t in many:
        np.testing.assert_array_equal(t.targets[:, :, 2], np.broadcast_to(t.brightness, t.targets.shape[:2]))


def test_targets_inside_patch(many):
    xy = np.concatenate([t.targets[..., :2].reshape(-1, 2) for t in many])
    assert xy.min() >= 0.5 and xy.max() <= 9.5  # 1 px inside the patch edge at -0.5 / 10.5
    ref = np.concatenate([t.reference for t in many])
    assert ref.min() >= 0.5 + 0.3 and ref.max() <= 9.5 - 0.3


def test_trajectory_does_not_depend_on_count():
    a = [simulate.sample_trajectory(r).targets for r in simulate.trajectory_rngs(9, 3)]
    b = [simulate.sample_trajectory(r).targets for r in simulate.trajectory_rngs(9, 50)[:3]]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_split_counts():
    assert simulate.split_counts(5000, (0.7, 0.15, 0.15)) == [3500, 750, 750]
    assert simulate.split_counts(20, (0.7, 0.15, 0.15)) == [14, 3, 3]
    assert simulate.split_counts(10, (1, 0, 0)) == [10, 0, 0]


# --- what lands on disk -----------------------------------------------------------------------


def test_files_and_split_sizes(dataset):
    for name, n in (("train", 14), ("val", 3), ("test", 3)):
        assert len(list((dataset / name / "image").glob("image_*.png"))) == 20 * n
        assert len(list((dataset / name / "annotation").glob("COS*.xml"))) == 20 * n
        assert (dataset / name / "image" / f"image_{20 * n - 1}.png").is_file()
        img = cv2.imread(str(dataset / name / "image" / "image_0.png"), cv2.IMREAD_UNCHANGED)
        assert img.shape == (11, 11) and img.dtype == np.uint8


def test_disk_images_are_the_forward_model_of_the_annotations(dataset):
    for name in ("train", "val", "test"):
        split = data.read_split(dataset, name, progress=False)
        for tr in range(split.n_trajectories):
            for f in range(20):
                expect = physics.quantize(physics.pixel_response(split.targets[tr][f]))
                np.testing.assert_array_equal(split.frames[tr, f], expect)


def test_disk_targets_follow_the_rules(dataset):
    """The annotations on disk are the generator's trajectories, in order across splits."""
    rngs = simulate.trajectory_rngs(0, N_TRAJ)
    i = 0
    for name in ("train", "val", "test"):
        split = data.read_split(dataset, name, progress=False)
        for tr in range(split.n_trajectories):
            expect = simulate.sample_trajectory(rngs[i]).targets
            np.testing.assert_array_equal(np.stack(split.targets[tr]), expect)
            k = expect.shape[1]
            assert 2 <= k <= 4
            i += 1
    assert i == N_TRAJ


def test_meta_json(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["format_version"] == simulate.FORMAT_VERSION
    assert meta["seed"] == 0 and meta["trajectories"] == N_TRAJ
    assert meta["splits"]["train"] == {"trajectories": 14, "frames": 280, "first_trajectory": 0}
    assert meta["splits"]["val"]["trajectories"] == 3 and meta["splits"]["test"]["first_trajectory"] == 17
    p = meta["params"]
    assert p["frames"] == 20 and p["size"] == 11 and p["psf_sigma"] == 0.5
    assert p["step"] == 0.04 and p["spacing"] == 0.3 and p["drift"] == 0.0014
    assert p["brightness"] == [220.0, 250.0] and p["targets"] == [2, 4]
    assert p["noise"] == 0.0 and p["float_out"] is False
    assert meta["split_fractions"] == [0.7, 0.15, 0.15]
    assert meta["image_format"] == "png-uint8"


def test_same_seed_same_bytes_other_seed_other_bytes(dataset, tmp_path):
    assert _run(tmp_path / "again") == 0
    first = _hashes(dataset)
    assert len(first) == 1 + 2 * 20 * N_TRAJ
    assert _hashes(tmp_path / "again") == first
    assert _run(tmp_path / "other", seed=1) == 0
    other = _hashes(tmp_path / "other")
    assert other.keys() == first.keys()
    differing = [k for k in first if k.endswith(".xml") and first[k] != other[k]]
    assert len(differing) == 20 * N_TRAJ


def test_noise_statistics(tmp_path):
    assert _run(tmp_path / "f", "--noise", "3", "--float", n=10) == 0
    split = data.read_split(tmp_path / "f", "train", progress=False)
    clean = np.stack([[physics.pixel_response(t) for t in tr] for tr in split.targets])
    resid = split.frames - clean
    assert abs(resid.mean()) < 0.1 and resid.std() == pytest.approx(3.0, rel=0.05)

    assert _run(tmp_path / "q", "--noise", "3", n=10) == 0
    split = data.read_split(tmp_path / "q", "train", progress=False)
    clean = np.stack([[physics.pixel_response(t) for t in tr] for tr in split.targets])
    inside = (clean > 15) & (clean < 240)  # away from the clipping at 0 and 255
    resid = (split.frames - clean)[inside]
    assert inside.sum() > 500
    assert abs(resid.mean()) < 0.3 and resid.std() == pytest.approx(np.sqrt(9 + 1 / 12), rel=0.1)
    assert np.all(split.frames == np.round(split.frames)) and split.frames.min() >= 0


def test_float_mode(tmp_path):
    out = tmp_path / "fl"
    assert _run(out, "--float", n=5) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["image_format"] == "npy-float32"
    counts = {k: v["trajectories"] for k, v in meta["splits"].items()}
    assert sum(counts.values()) == 5
    train = out / "train"
    assert not (train / "image").exists()
    arr = np.load(train / "images.npy")
    assert arr.dtype == np.float32 and arr.shape == (20 * counts["train"], 11, 11)
    split = data.read_split(out, "train", progress=False)
    for tr in range(split.n_trajectories):
        for f in range(20):
            expect = physics.pixel_response(split.targets[tr][f]).astype(np.float32)
            np.testing.assert_array_equal(split.frames[tr, f], expect)
    assert np.any(split.frames != np.round(split.frames))  # not quantised


def test_render():
    frames = np.full((2, 11, 11), 100.4)
    rng = np.random.default_rng(0)
    q = simulate.render(frames, 0.0, rng, float_out=False)
    assert q.dtype == np.uint8 and np.all(q == 100)
    assert np.all(simulate.render(frames * 3, 0.0, rng, False) == 255)
    f = simulate.render(frames, 0.0, rng, float_out=True)
    assert f.dtype == np.float32 and np.allclose(f, 100.4)
    noisy = simulate.render(np.zeros((200, 11, 11)), 4.0, np.random.default_rng(0), True)
    assert noisy.std() == pytest.approx(4.0, rel=0.03)


def test_simulate_trajectory_shapes():
    frames, targets = simulate.simulate_trajectory(np.random.default_rng(3))
    assert frames.shape == (20, 11, 11) and targets.shape[0] == 20 and targets.shape[2] == 3
    total = targets[:, :, 2].sum(axis=1)  # energy inside the patch: at most all, at least ~98%
    assert np.all(frames.sum(axis=(1, 2)) <= total) and np.all(frames.sum(axis=(1, 2)) > 0.98 * total)


def test_cli_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        simulate.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--trajectories",
        "--noise",
        "--targets",
        "--split",
        "--float",
        "--preview",
        "--frames",
        "--size",
        "--psf-sigma",
        "--step",
        "--spacing",
        "--drift",
        "--brightness",
    ):
        assert flag in text

    out = tmp_path / "o"
    assert _run(out, "--targets", "6-8", "--split", "0.5,0.5,0", "--preview", str(tmp_path / "p.png"), n=4) == 0
    assert not (out / "test").exists()
    split = data.read_split(out, "val", progress=False)
    assert split.n_trajectories == 2
    assert all(6 <= len(t) <= 8 for tr in split.targets for t in tr)
    preview = cv2.imread(str(tmp_path / "p.png"))
    assert preview is not None and preview.shape[0] > 200

    assert _run(out, n=4) == 2  # refuses to mix with an existing data set
    assert _run(out, "--overwrite", n=4) == 0
    assert _run(tmp_path / "bad", "--targets", "1-9") == 2
    assert _run(tmp_path / "bad", "--margin", "5") == 2


# --- the protocol stays as it was (the field scenario shares this command) --------------------


def _content_digest(root: Path) -> str:
    """Every file's bytes, PNGs by their decoded pixels (independent of the PNG encoder build)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        h.update(str(p.relative_to(root)).encode())
        if p.suffix == ".png":
            img = data.read_png(p)
            h.update(str(img.dtype).encode())
            h.update(img.tobytes())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "extra, expect",
    [
        ((), "db5b9a6a7fc3cd29c5476eaa5148c4c7e03c5afd9f8360cb6913bb7b2743522b"),
        (("--noise", "3", "--targets", "2-8"), "dae4925b245440c24bd06d972510d6a099ab3161e77a308b0d2c2cf73272bcb9"),
    ],
)
def test_protocol_output_is_pinned(tmp_path, extra, expect):
    """Digests of the protocol's output before the field scenario existed: not one byte moved."""
    out = tmp_path / "pinned"
    assert _run(out, *extra, n=4, seed=11) == 0
    assert _content_digest(out) == expect


def test_explicit_scenario_is_the_default(dataset, tmp_path):
    assert _run(tmp_path / "s", "--scenario", "seqcsist") == 0
    assert _hashes(tmp_path / "s") == _hashes(dataset)


def test_scenario_flags_do_not_mix(tmp_path, capsys):
    assert _run(tmp_path / "a", "--pedestal", "30", n=2) == 2
    assert "--pedestal" in capsys.readouterr().err
    assert _run(tmp_path / "b", "--scenario", "field", "--step", "0.05", n=2) == 2
    assert "--step" in capsys.readouterr().err
    assert _run(tmp_path / "c", "--noise", "0,5", n=2) == 2
    assert "--noise" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
