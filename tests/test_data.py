"""Training pairs: the contrast augmentation changes how tissues look, never where they are or the pair's physics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medldm import MedldmError
from medldm.data import PairSampler, load_volumes, random_contrast
from tests.helpers import tiny

LEVELS = np.linspace(0.0, 1.0, 6)


def _curve_through(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, float]:
    """The piecewise-linear curve on LEVELS that best maps ``before`` to ``after`` (least squares over the hat
    functions), and the largest misfit: zero when ``after`` is such a curve of ``before``."""
    x = np.clip(before.ravel().astype(np.float64), 0, 1)
    hats = np.clip(1 - np.abs(x[:, None] - LEVELS[None]) / (LEVELS[1] - LEVELS[0]), 0, None)
    values, *_ = np.linalg.lstsq(hats, after.ravel().astype(np.float64), rcond=None)
    return values, float(np.abs(hats @ values - after.ravel()).max())


def test_random_contrast_is_a_curve_that_keeps_background_dark_and_can_invert_tissues():
    data = np.random.default_rng(0).uniform(0, 1, (4, 16, 16)).astype(np.float32)
    inverted = 0
    for seed in range(20):
        out = random_contrast(data, np.random.default_rng(seed))
        assert out.dtype == data.dtype and out.shape == data.shape
        assert np.array_equal(out, random_contrast(data, np.random.default_rng(seed)))  # seeded
        values, misfit = _curve_through(data, out)
        assert misfit < 1e-5 and abs(values[0]) < 1e-5 and abs(values.max() - 1) < 1e-5
        inverted += values[1] > values[-1]  # dark tissue made brighter than bright tissue (T1 to T2-like)
    assert inverted > 0
    assert random_contrast(np.zeros(3, np.float32), np.random.default_rng(1)).max() == 0


def test_augmented_pairs_show_the_same_patches_through_a_curve():
    """The augmentation draws from its own stream: the same batch with it and without shows the same anatomy (the
    same patches, mirrors and operators), the HR of each augmented sample a curve of the plain one."""
    task = {"kind": "slice-profile", "scale": 4}
    plain_config, root = tiny(data={"tasks": [task]})
    volumes = load_volumes(plain_config, root)
    augmented_config, _ = tiny(data={"tasks": [task], "contrast_augmentation": 1.0})
    plain = PairSampler(volumes, plain_config).batch(3, 6)
    augmented = PairSampler(volumes, augmented_config).batch(3, 6)
    torch.testing.assert_close(augmented["geometry"], plain["geometry"])
    changed = 0
    for before, after in zip(plain["hr"].numpy(), augmented["hr"].numpy(), strict=True):
        _, misfit = _curve_through(before, after)
        assert misfit < 1e-3  # the training volumes are float16
        changed += not np.allclose(before, after)
    assert changed == 6
    # the LR went through the forward model after the curve, not the curve after the forward model: it differs
    # from the curve of the plain LR wherever the blur mixes tissues
    _, misfit = _curve_through(plain["lr"][0].numpy(), augmented["lr"][0].numpy())
    assert misfit > 0.02


def test_contrast_augmentation_is_a_share():
    with pytest.raises(MedldmError, match="contrast_augmentation"):
        tiny(data={"contrast_augmentation": 1.5})
