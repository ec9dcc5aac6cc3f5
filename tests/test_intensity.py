"""Intensity normalisation round trips exactly on real MRI and on HU CT."""

from __future__ import annotations

import numpy as np
import pytest

from medldm import MedldmError
from medldm.intensity import IntensityTransform, guess_modality, hu_window, percentile_scaling
from medldm.volume import load
from tests.helpers import shared_path


def test_mri_percentile_scaling_round_trip(ixi_path):
    data = load(ixi_path).data
    t = percentile_scaling(data)
    y = t.forward(data.astype(np.float64))
    assert t.low == 0.0  # zero background stays zero
    assert np.mean(y > 1) == pytest.approx(0.005 * np.mean(data > 0), abs=2e-3)  # 99.5th percentile -> 1
    np.testing.assert_allclose(t.inverse(y), data, rtol=1e-12, atol=1e-9)
    again = IntensityTransform.from_dict(t.to_dict())
    assert again == t


def test_ct_hu_window_round_trip():
    vol = load(shared_path("data/ct/invesalius-ct-head/invesalius_cranium_ct.nii.gz"))
    assert guess_modality(vol.data) == "CT"
    t = hu_window(preset="brain")
    assert (t.low, t.high) == (0.0, 80.0)
    y = t.forward(vol.data)
    assert y.min() < 0 and y.max() > 1  # not clipped: the inverse stays exact
    np.testing.assert_allclose(t.inverse(y), vol.data, atol=1e-3)  # float32 HU up to 3000
    centred = hu_window(centre=40, width=80)
    assert centred == t


def test_modality_guess_on_mri(ixi_path):
    assert guess_modality(load(ixi_path).data) == "MR"
    assert guess_modality(np.zeros(3), hint="CT") == "CT"


def test_bad_parameters():
    with pytest.raises(MedldmError, match="constant"):
        percentile_scaling(np.ones((4, 4, 4)))
    with pytest.raises(MedldmError, match="unknown CT window"):
        hu_window(preset="liverish")
    with pytest.raises(MedldmError, match="positive width"):
        hu_window(centre=0, width=0)


def test_inverse_in_place_equals_the_allocating_inverse():
    data = np.random.default_rng(0).normal(100, 30, (8, 9, 10)).astype(np.float32)
    t = percentile_scaling(data)
    y = t.forward(data)
    expected = t.inverse(y)
    buffer = y.copy()
    assert t.inverse(buffer, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, expected)
