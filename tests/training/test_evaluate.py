"""training.evaluate: the fit's calibration for the data's sensor."""

import numpy as np
import pytest

from service.science.physics import hr_map
from training import field
from training.data import window_middles
from training.evaluate import WINDOW, detections, sensor_saturation


def test_sensor_saturation_is_the_clip_level_of_the_fewest_bits_that_hold_the_frames():
    assert sensor_saturation(np.array([[0.0, 17.0], [200.0, 255.0]])) == 255.0
    assert sensor_saturation(np.array([0.0, 256.0])) == 1023.0
    assert sensor_saturation(np.array([12.0, 4000.0])) == 4095.0
    assert sensor_saturation(np.array([0.0, 65535.0])) == 65535.0
    assert sensor_saturation(np.array([0.0, 12.5])) is None  # float data: no rounding, no clipping
    assert sensor_saturation(np.array([-1.0, 12.0])) is None
    assert sensor_saturation(np.array([0.0, 70000.0])) is None


def twelve_bit_trajectory(seed: int = 3):
    """One 12-bit field trajectory: protocol groups 16 times as bright on a pedestal, noise 32
    (an 8-bit protocol track at noise 2, read by a 12-bit sensor)."""
    params = field.FieldParams(
        targets=(3, 3),
        geometry=("cross",),
        brightness=(3520.0, 4000.0),
        pedestal=(800.0, 800.0),
        noise=(32.0, 32.0),
        bad_pixels=(0, 0),
        bit_depth=(12,),
        background=("flat",),
        psf_sigma=(0.5, 0.5),
    )
    traj, rng = field.sample_field_trajectory(field.trajectory_seeds(seed, 1)[0], params)
    frames = field.render(traj, rng, params.size).astype(np.float64)
    return frames, traj.targets


def test_12bit_frames_are_fitted_at_their_own_clip_level():
    frames, targets = twelve_bit_trajectory()
    assert frames.max() > 255
    mids = window_middles(len(frames), WINDOW)
    truth = [targets[i] for i in mids]
    maps = np.stack([hr_map(t) for t in truth])[None]  # perfect cells as the network's answer
    found = detections(maps, refine="fit", frames=frames[None], snr=5.0, details=True)
    accepted = [f for f in found if f.uncertainty is not None]
    # read with 8-bit grey levels (noise 32 past the largest noise of 25, targets 16 times the
    # brightness range) the fit gave up on every window
    assert len(accepted) >= 0.9 * len(found)
    counts = [len(f.targets) == len(t) for f, t in zip(found, truth, strict=True)]
    assert np.mean(counts) >= 0.9
    for f, t in zip(found, truth, strict=True):
        if len(f.targets) == len(t):
            d = np.hypot(f.targets[:, None, 0] - t[None, :, 0], f.targets[:, None, 1] - t[None, :, 1])
            assert d.min(axis=0).max() < 0.2
            assert np.sort(f.targets[:, 2]) == pytest.approx(np.sort(t[:, 2]), rel=0.2)
