"""Metrics agree with their reference implementations; baselines sit on the exact HR grid."""

from __future__ import annotations

import numpy as np
import pytest
from medldm.evaluation import foreground_mask, lpips, lpips_volume, nrmse, psnr, ssim
from scipy import ndimage
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from medldm import MedldmError
from medldm.degrade import degrade_volume
from medldm.resample import interpolate
from medldm.volume import Volume, face_corners, load
from tests.helpers import shared_path


@pytest.fixture(scope="module")
def pair():
    """A real 1 mm brain and its trilinear reconstruction from x4 thick slices."""
    vol = load(shared_path("data/mri/colin27-mricron/ch2.nii.gz"))
    lr, hr = degrade_volume(vol, kind="slice-profile", axis="z", scale=4)
    return interpolate(lr, [1, 1, 4], method="trilinear").data, hr.data


@pytest.mark.slow
def test_psnr_and_ssim_match_scikit_image(pair):
    box = (slice(40, 140), slice(40, 180), slice(50, 110))  # a central block of the brain: the same checks, 20x sooner
    pred, ref = (np.ascontiguousarray(a[box]) for a in pair)
    r = float(ref.max())
    assert psnr(pred, ref) == pytest.approx(peak_signal_noise_ratio(ref, pred, data_range=r), abs=1e-6)
    assert ssim(pred, ref, mode="3d") == pytest.approx(structural_similarity(ref, pred, data_range=r), abs=1e-6)
    per_slice = np.mean([structural_similarity(ref[:, :, k], pred[:, :, k], data_range=r) for k in range(ref.shape[2])])
    assert ssim(pred, ref, axis=2) == pytest.approx(per_slice, abs=1e-6)
    expected = normalized_root_mse(ref.astype(np.float64), pred.astype(np.float64))
    assert nrmse(pred, ref) == pytest.approx(expected, rel=1e-9)


def test_closed_form_cases():
    ref = np.random.default_rng(0).uniform(0, 100, size=(20, 24, 18))
    assert psnr(ref + 5.0, ref, data_range=100.0) == pytest.approx(10 * np.log10(100.0**2 / 25.0), abs=1e-9)
    assert psnr(ref, ref) == float("inf")
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    assert ssim(ref, ref, mode="3d") == pytest.approx(1.0, abs=1e-12)
    mask = np.zeros(ref.shape, bool)
    mask[5:10, 5:10, 5:10] = True
    noisy = ref.copy()
    noisy[~mask] += 50  # errors outside the mask do not count
    assert psnr(noisy, ref, mask=mask) == float("inf")
    assert nrmse(noisy, ref, mask=mask) == 0.0
    with pytest.raises(MedldmError, match="shapes differ"):
        psnr(ref[:-1], ref)


def test_lpips_on_real_slices(pair):
    pred, ref = pair
    r = float(ref.max())
    sl = np.clip(ref[:, :, 90] / r, 0, 1)
    assert lpips(sl, sl) == pytest.approx(0.0, abs=1e-6)
    mild, strong = ndimage.gaussian_filter(sl, 1.0), ndimage.gaussian_filter(sl, 3.0)
    assert lpips(strong, sl) > lpips(mild, sl) > 0.01
    assert lpips_volume(ref, ref, max_slices=4) == pytest.approx(0.0, abs=1e-6)
    assert lpips_volume(pred, ref, max_slices=4) > 0.01


def test_lpips_volume_scores_planes_as_small_as_the_backbone_takes(pair):
    _, ref = pair
    c = [n // 2 for n in ref.shape]
    small = ref[c[0] - 15 : c[0] + 16, c[1] - 15 : c[1] + 16, c[2] - 15 : c[2] + 16]  # AlexNet's smallest side
    assert lpips_volume(ndimage.gaussian_filter(small, 2.0), small, max_slices=4) > 0.01
    with pytest.raises(MedldmError, match="needs 31 voxels a side"):
        lpips_volume(small[:30, :30, :30], small[:30, :30, :30])


def test_foreground_mask_is_the_head(pair):
    _, ref = pair
    mask = foreground_mask(ref)
    assert 0.2 < mask.mean() < 0.8
    assert not mask[0, 0, 0] and mask[tuple(s // 2 for s in ref.shape)]


def test_baselines_on_the_exact_grid(ixi_path):
    vol = load(ixi_path)
    lr, hr = degrade_volume(vol, kind="slice-profile", axis="z", scale=4, profile="boxcar")
    for method in ("nearest", "trilinear", "bspline"):
        up = interpolate(lr, [1, 4, 1], method=method)
        assert up.shape == hr.shape
        np.testing.assert_allclose(up.affine, hr.affine, atol=1e-9)
        np.testing.assert_allclose(face_corners(up.shape, up.affine), face_corners(lr.shape, lr.affine), atol=1e-9)
    nearest = interpolate(lr, [1, 4, 1], method="nearest").data
    np.testing.assert_array_equal(nearest, np.repeat(lr.data, 4, axis=1))
    # scipy's zoom with grid_mode=True uses the same field-of-view-preserving grid
    for method, order in (("trilinear", 1), ("bspline", 3)):
        expected = ndimage.zoom(lr.data.astype(np.float64), (1, 4, 1), order=order, grid_mode=True, mode="nearest")
        np.testing.assert_allclose(interpolate(lr, [1, 4, 1], method=method).data, expected, atol=1e-3)


def test_linear_ramp_is_reproduced_inside():
    n = 128
    ramp = np.broadcast_to(np.arange(n, dtype=np.float32)[None, None, :], (4, 4, n))
    lr = Volume(ramp.reshape(4, 4, n // 4, 4).mean(-1), np.diag([1.0, 1.0, 4.0, 1.0]))  # LR m sits at 4m + 1.5
    trilinear = interpolate(lr, [1, 1, 4], method="trilinear").data
    np.testing.assert_allclose(trilinear[0, 0, 2:-2], np.arange(n)[2:-2], atol=1e-4)
    bspline = interpolate(lr, [1, 1, 4], method="bspline").data  # the edge condition fades within a few samples
    np.testing.assert_allclose(bspline[0, 0, 32:-32], np.arange(n)[32:-32], atol=1e-3)


def test_uncertainty_calibration_ranks_a_map_that_predicts_the_error_above_one_that_does_not():
    from medldm.evaluation.metrics import uncertainty_calibration

    rng = np.random.default_rng(0)
    ref = rng.random((20, 30, 40))
    spread = rng.random(ref.shape) * 0.2
    pred = ref + spread * rng.choice([-1.0, 1.0], size=ref.shape)  # |error| == spread
    good = uncertainty_calibration(spread, pred, ref)
    assert good["spearman"] == pytest.approx(1.0)
    assert np.all(np.diff(good["error_by_decile"]) > 0) and len(good["error_by_decile"]) == 10
    useless = uncertainty_calibration(rng.random(ref.shape), pred, ref)
    assert abs(useless["spearman"]) < 0.05
    with pytest.raises(MedldmError, match="constant"):
        uncertainty_calibration(np.zeros(ref.shape), pred, ref)


def test_tissue_classes_score_the_truth_perfectly_and_count_a_moved_boundary():
    from medldm.evaluation.metrics import TissueClasses

    rng = np.random.default_rng(0)
    truth = np.full((40, 40, 40), 100.0)  # "white matter", with a darker slab and a darkest core
    truth[:, :, :20] = 60.0
    truth[15:25, 15:25, 5:15] = 20.0
    truth += rng.normal(0, 2, truth.shape)
    tissues = TissueClasses(truth)
    assert tissues.compare(truth)["dice"] == 1.0 and tissues.compare(truth)["volume_error"] == 0.0
    moved = truth.copy()
    moved[:, :, 20:24] = 60.0 + rng.normal(0, 2, moved[:, :, 20:24].shape)  # the boundary moves by 4 of 20 slices
    scores = tissues.compare(moved)
    assert scores["volume_change_2"] > 0 > scores["volume_change_3"]  # class 2 grows, class 3 (brightest) shrinks
    assert scores["volume_error_3"] == pytest.approx(100 * 4 / 20, rel=0.02)
    assert scores["dice_1"] == pytest.approx(1.0, abs=0.01) and scores["dice_3"] < 0.95
