"""Any scan a clinic produces (issue 19): non-integer factors, slice gaps, target spacing, isotropic scans, CT in
Hounsfield units, and warnings when a scan lies outside what the model was trained on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medldm import MedldmError
from medldm.adapt import BATCH, PATCH
from medldm.degrade import (
    SliceSampling,
    ThickSlice,
    degrade_volume,
    enforce_consistency,
    grid_for_factor,
    make_operator,
)
from medldm.pipeline import Upscaler
from medldm.resample import interpolate, resample_axis
from medldm.scope import TrainingScope, contrast_hint
from medldm.volume import Volume, crop, face_corners, load, save_nifti
from tests.helpers import LPIPS, medldm, shared_path


# ------------------------------------------------------------------------------------------- forward model
@pytest.mark.parametrize("profile", ["gaussian", "boxcar"])
@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_slice_sampling_is_thick_slice_at_integer_factors(scale, profile):
    n = 6 * scale
    a = ThickSlice(0, scale, profile=profile, spatial_dims=2).matrix(n)
    b = SliceSampling(0, scale, profile=profile, spatial_dims=2).matrix(n)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("profile", ["gaussian", "boxcar"])
@pytest.mark.parametrize(
    ("scale", "thickness", "n"), [(5.5, 1.0, 176), (2.5, 0.6, 60), (177 / 29, 1.3, 177), (4, 0.5, 64)]
)
def test_slice_sampling_adjoint_and_pseudo_inverse(scale, thickness, n, profile):
    op = SliceSampling(2, scale, thickness=thickness, profile=profile)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, n, generator=g, dtype=torch.float64)
    m = op.output_shape(x.shape)[-1]
    y = torch.randn(3, 5, m, generator=g, dtype=torch.float64)
    assert abs(float((op(x) * y).sum() - (x * op.adjoint(y)).sum())) < 1e-10 * float(x.abs().sum())
    torch.testing.assert_close(op(op.back_project(y)), y, rtol=0, atol=1e-9)
    # rows sum to one: a constant scan stays that constant
    constant = torch.full((1, 1, n), 7.0, dtype=torch.float64)
    torch.testing.assert_close(op(constant), torch.full((1, 1, m), 7.0, dtype=torch.float64))
    assert op.norm_sq((n,) * 3) <= op.norm_sq() + 1e-12  # the size-free bound holds


def test_slice_gaps_sample_only_the_middle_of_each_slab():
    # x4 with a boxcar half the spacing wide: each slice averages the two central voxels of its block of four
    op = SliceSampling(0, 4, thickness=0.5, profile="boxcar", spatial_dims=2)
    x = torch.arange(16, dtype=torch.float64)[:, None]  # (16, 1): axis 0 degraded
    torch.testing.assert_close(
        op.matrix(16)[1], torch.tensor([0, 0, 0, 0, 0, 0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    )
    torch.testing.assert_close(op(x)[:, 0], torch.tensor([1.5, 5.5, 9.5, 13.5], dtype=torch.float64))


def test_grid_for_factor_keeps_whole_slices():
    assert grid_for_factor(180, 5.5) == (32, 176, 5.5)
    assert grid_for_factor(120, 4) == (30, 120, 4.0)
    m, kept, exact = grid_for_factor(120, 5.5)  # 21 slices: 115.5 voxels would not be whole
    assert (m, kept) == (21, 116) and abs(exact - 5.5) <= 0.5 / m
    with pytest.raises(MedldmError, match="shorter than the factor"):
        grid_for_factor(4, 5.5)


def test_in_plane_kinds_refuse_non_integer_factors_and_thickness():
    with pytest.raises(MedldmError, match="integer factor"):
        make_operator("kspace", axis=2, scale=2.5)
    with pytest.raises(MedldmError, match="thickness applies to thick slices"):
        make_operator("kspace", axis=2, scale=2, thickness=0.5)
    assert isinstance(make_operator("slice-profile", axis=2, scale=4.0), ThickSlice)
    assert isinstance(make_operator("slice-profile", axis=2, scale=4, thickness=0.8), SliceSampling)


def test_non_integer_degrade_keeps_the_field_of_view(ixi_path):
    vol = load(ixi_path)  # 120 x 120 x 90 at 2 mm; z is voxel axis 1
    lr, hr = degrade_volume(vol, kind="slice-profile", axis="z", scale=5.5, thickness=0.8)
    record = lr.meta["degrade"]
    assert record["axis"] == 1 and hr.shape == (120, 116, 90) and lr.shape == (120, 21, 90)
    assert record["scale"] == pytest.approx(116 / 21) and record["thickness"] == 0.8
    np.testing.assert_allclose(face_corners(lr.shape, lr.affine), face_corners(hr.shape, hr.affine), atol=1e-9)
    np.testing.assert_allclose(lr.spacing[1], 2.0 * 116 / 21, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ planning
@pytest.fixture(scope="module")
def default_upscaler():
    return Upscaler("default", device="cpu")


def _scan(shape, spacing, data=None, **meta) -> Volume:
    rng = np.random.default_rng(0)
    data = rng.uniform(20, 200, shape).astype(np.float32) if data is None else data
    return Volume(data, np.diag([*spacing, 1.0]), {"path": "scan.nii.gz", **meta})


def test_spacing_sets_the_output_grid_over_the_same_field_of_view(default_upscaler, ixi_path):
    # the TCGA-LGG-like case, 5.5 mm slices to 1 mm: a real 2 mm scan thickened x2.75 (40 slices of 5.5 mm)
    vol = crop(load(ixi_path), (slice(40, 72), slice(5, 115), slice(30, 62)))
    lr, _ = degrade_volume(vol, kind="slice-profile", axis="z", scale=2.75)
    assert lr.shape[1] == 40 and lr.spacing[1] == pytest.approx(5.5)
    plan = default_upscaler.plan(lr, spacing=1.0)
    assert plan.axis == 1 and plan.scale == pytest.approx(5.5) and plan.thickness == pytest.approx(1.0)
    result = default_upscaler.upscale(lr, plan=plan)
    assert result.sr.shape == (32, 220, 32)
    np.testing.assert_allclose(result.sr.spacing, (2.0, 1.0, 2.0), rtol=1e-9)
    np.testing.assert_allclose(
        face_corners(result.sr.shape, result.sr.affine), face_corners(lr.shape, lr.affine), atol=1e-9
    )
    assert result.residual < 1e-6  # consistent with the 5.5 mm slices through the exact operator
    assert result.sr.meta["upscale"]["scale"] == pytest.approx(5.5)


def test_factor_between_trained_ones_warns_and_is_consistent(default_upscaler, ixi_path):
    vol = crop(load(ixi_path), (slice(40, 72), slice(None), slice(30, 62)))
    lr, hr = degrade_volume(vol, kind="slice-profile", axis="z", scale=2.5)
    plan = default_upscaler.plan(lr, axis="z", scale=2.5)
    assert plan.task.scale == 2
    # the user is told the factor is off the trained ones, how the model copes, and what helps
    assert any("between the trained factors" in w and "run at x2" in w and "--adapt" in w for w in plan.warnings)
    result = default_upscaler.upscale(lr, plan=plan)
    assert result.sr.shape == hr.shape and result.residual < 1e-6


def test_off_the_trained_factors_the_estimate_is_made_on_the_trained_grid_then_resampled_and_projected(
    ixi_path, monkeypatch, tmp_path
):
    import medldm.pipeline as pipeline
    from medldm.provenance import short_description, upscale_record

    vol = crop(load(ixi_path), (slice(40, 72), slice(None), slice(30, 62)))
    lr, hr = degrade_volume(vol, kind="slice-profile", axis="z", scale=2.5)  # 5 mm slices of a 2 mm scan
    up = Upscaler("default", device="cpu", refine=0)
    monkeypatch.setattr(pipeline, "ESTIMATE_GRID", "trained")
    result = up.upscale(lr, axis="z", scale=2.5)
    assert result.sr.shape == hr.shape and result.residual < 1e-6
    assert result.sr.meta["upscale"]["estimate_scale"] == 2  # the output records where the estimate was made
    save_nifti(lr, tmp_path / "lr.nii.gz")
    record = upscale_record(
        source=tmp_path / "lr.nii.gz", volume=lr, result=result, upscaler=up, output=tmp_path / "sr.nii.gz", wall_s=1
    )
    assert record["medldm"]["factor"] == {"exact": 2.5, "thickness_ratio": 1.0, "estimate_scale": 2}
    assert "slice-profile x2.5 along" in record["Description"] and " x2.5 " in short_description(record)
    # exactly: the model's x2 estimate (its nearest trained factor) resampled onto the x2.5 grid (same field of
    # view, cubic B-spline) and made consistent with the 5 mm slices
    at_x2 = torch.from_numpy(up.upscale(lr, axis="z", scale=2).sr.data)
    a = result.plan.axis
    op = make_operator("slice-profile", axis=a, scale=result.plan.scale)
    expected = enforce_consistency(resample_axis(at_x2, a, hr.shape[a]), torch.from_numpy(lr.data), op)
    np.testing.assert_allclose(result.sr.data, expected.numpy(), atol=1e-3 * float(np.ptp(lr.data)))
    # a factor the networks learnt, and a model adapted to the scan's own factor, keep the output grid
    monkeypatch.setattr(pipeline, "ESTIMATE_GRID", "output")
    on_output = up.upscale(lr, axis="z", scale=2.5).sr.data
    assert np.abs(on_output - result.sr.data).max() > 1e-2 * float(np.ptp(lr.data))
    monkeypatch.setattr(pipeline, "ESTIMATE_GRID", "trained")
    adapted = up.with_model(replace(up.model, info={**up.model.info, "adapted_to": {"factor": 2.5}}))
    np.testing.assert_array_equal(adapted.upscale(lr, axis="z", scale=2.5).sr.data, on_output)
    at_x2_again = up.upscale(lr, axis="z", scale=2).sr.data
    np.testing.assert_array_equal(at_x2_again, at_x2.numpy())


def test_resample_axis_is_spline_interpolation_over_the_same_field_of_view():
    from scipy import ndimage

    x = np.random.default_rng(0).normal(size=(5, 11, 4))
    for size, factor in ((44, None), (27, None), (8, None), (28, 2.5)):
        f = size / 11 if factor is None else factor
        # scipy on the whole volume, each output voxel read at LR index (j - (f - 1) / 2) / f along axis 1
        grid = np.meshgrid(np.arange(5.0), (np.arange(size) - (f - 1) / 2) / f, np.arange(4.0), indexing="ij")
        for order in (0, 1, 3):
            if order == 0:
                expected = np.take(x, np.clip(np.floor(grid[1][0, :, 0] + 0.5).astype(int), 0, 10), axis=1)
            else:
                expected = ndimage.map_coordinates(x, grid, order=order, mode="nearest", prefilter=order > 1)
            got = resample_axis(torch.from_numpy(x), 1, size, factor=factor, order=order).numpy()
            np.testing.assert_allclose(got, expected, atol=1e-12)
    # interpolate (the baselines' upsampling) is that, axis by axis
    vol = Volume(x.astype(np.float32), np.eye(4))
    expected = resample_axis(resample_axis(torch.from_numpy(x), 1, 28, factor=2.5), 2, 8, factor=2).numpy()
    got = interpolate(vol, [1, 2.5, 2], method="bspline").data
    np.testing.assert_allclose(got, expected.astype(np.float32), atol=1e-5)


def test_a_t1_brain_within_range_gets_no_warning(default_upscaler, ixi_path):
    lr, _ = degrade_volume(load(ixi_path), kind="slice-profile", axis="z", scale=4)
    assert default_upscaler.plan(lr).warnings == ()


def test_isotropic_scans_need_an_axis(default_upscaler, ixi_path):
    vol = load(ixi_path)  # 2 mm isotropic
    with pytest.raises(MedldmError, match="isotropic.*--axis"):
        default_upscaler.plan(vol)
    plan = default_upscaler.plan(vol, axis="z", spacing=1.0)
    assert plan.axis == 1 and plan.scale == 2
    with pytest.raises(MedldmError, match="nothing to upscale"):
        default_upscaler.plan(vol, axis="z", spacing=2.0)


def test_dicom_slice_thickness_sets_the_operator(default_upscaler):
    scan = _scan((32, 32, 8), (1.0, 1.0, 4.0), slice_thickness=3.0, slice_axis=2)
    plan = default_upscaler.plan(scan)
    assert plan.axis == 2 and plan.scale == 4 and plan.thickness == pytest.approx(0.75)
    assert any("gaps between slices" in w for w in plan.warnings)
    assert plan.operator().thickness == pytest.approx(0.75)
    assert default_upscaler.plan(scan, thickness=4.0).thickness == pytest.approx(1.0)  # --thickness wins
    # a thickness recorded for another axis does not apply
    assert (
        default_upscaler.plan(_scan((32, 32, 8), (1.0, 1.0, 4.0), slice_thickness=3.0, slice_axis=0)).thickness == 1.0
    )


def test_dicom_series_reads_slice_thickness_and_spacing():
    folder = shared_path("data/mri/trio-b17-t1-mprage/dicom")
    vol = load(folder)
    assert vol.meta["slice_thickness"] == pytest.approx(1.0) and vol.meta["slice_axis"] == 2
    canonical = vol.to_canonical()
    moved = canonical.meta["slice_axis"]
    assert canonical.spacing[moved] == pytest.approx(vol.spacing[2])
    assert canonical.from_canonical().meta["slice_axis"] == 2


# --------------------------------------------------------------------------------------------------- CT
@pytest.fixture(scope="module")
def head_ct():
    vol = load(shared_path("data/ct/invesalius-ct-head/invesalius_cranium_ct.nii.gz"))
    return crop(vol, (slice(96, 160), slice(96, 160), slice(None)))


@pytest.mark.slow
def test_ct_warns_and_stays_in_hounsfield_range(default_upscaler, head_ct):
    lr, _ = degrade_volume(head_ct, kind="slice-profile", axis="z", scale=4)
    plan = default_upscaler.plan(lr)
    assert any("looks like CT" in w for w in plan.warnings)
    result = default_upscaler.upscale(lr, plan=plan, keep_estimate=True)
    assert result.sr.data.min() >= -1024 and result.sr.data.max() <= lr.data.max()
    # the MR model's diffusion refinement is not applied to CT by default: the output is its regression estimate
    assert not plan.modality_seen and any("estimate alone" in w for w in plan.warnings)
    assert result.sr.meta["upscale"]["refine"] == 0
    np.testing.assert_array_equal(result.sr.data, result.estimate.data)


@pytest.mark.slow
def test_a_refinement_asked_for_applies_to_any_modality(default_upscaler, head_ct, ixi_path):
    ct, _ = degrade_volume(head_ct, kind="slice-profile", axis="z", scale=4)
    asked = Upscaler(default_upscaler.model, refine=default_upscaler.refine)
    plan = asked.plan(ct)
    assert not plan.modality_seen and not any("estimate alone" in w for w in plan.warnings)
    assert asked.unseen_modality_refine == asked.refine > 0
    out = asked.upscale(ct, plan=plan, keep_estimate=True)
    assert out.sr.meta["upscale"]["refine"] == asked.refine
    assert not np.array_equal(out.sr.data, out.estimate.data)  # the diffusion detail was added
    mr = crop(load(ixi_path), (slice(40, 80), slice(40, 80), slice(None)))
    assert default_upscaler.plan(mr, axis="z").modality_seen


# ---------------------------------------------------------------------------------------------- the scope
def test_scope_of_an_older_model_comes_from_its_config(default_upscaler):
    scope = TrainingScope.of(default_upscaler.model.config, {})
    assert scope.modalities == ("MR",) and scope.factors["slice-profile"] == (2, 4)
    assert scope.spacing_mm is None


def test_a_model_trained_on_a_range_of_factors_and_thicknesses_does_not_warn_inside_it(default_upscaler, ixi_path):
    """configs/brain_mri_any_factor_long.yaml's tasks draw factors from ranges: x5.5 with gaps lies inside them."""
    from medldm.config import load_config

    config, _ = load_config(Path(__file__).parents[1] / "configs" / "brain_mri_any_factor_long.yaml", check_files=False)
    scope = TrainingScope.of(config, {})
    assert scope.factor_ranges == {"slice-profile": ((1.5, 3.0), (3.0, 8.0))} and scope.thickness == (0.5, 1.5)
    lr, _ = degrade_volume(load(ixi_path), kind="slice-profile", axis="z", scale=5.5, thickness=0.75)
    axis = default_upscaler.plan(lr, axis="z", scale=5.5).axis
    plan = default_upscaler.plan(lr, axis="z", scale=5.5, thickness=0.75 * lr.spacing[axis])
    assert plan.thickness == pytest.approx(0.75)
    assert scope.warnings(lr, plan) == []
    lr, _ = degrade_volume(load(ixi_path), kind="slice-profile", axis="z", scale=8.5)
    far = scope.warnings(lr, default_upscaler.plan(lr, axis="z", scale=8.5))
    assert len(far) == 1 and "outside the trained factors (x2, x4, x1.5-3, x3-8)" in far[0]


def test_contrast_hints_from_names():
    assert contrast_hint("sub-01_T2w.nii.gz") == "T2"
    assert contrast_hint("stroke_FLAIR.nii.gz") == "FLAIR"
    assert contrast_hint("remind_t2_space_3d.nii.gz") == "T2"
    assert contrast_hint("IXI613-HH-2734_T1.nii.gz") == "T1"
    assert contrast_hint("scan.nii.gz", None, "") is None


@pytest.mark.slow
def test_cli_warns_and_strict_refuses(tmp_path, head_ct):
    lr, _ = degrade_volume(head_ct, kind="slice-profile", axis="z", scale=4)
    scan = save_nifti(lr, tmp_path / "ct.nii.gz")
    strict = medldm("upscale", scan, "--strict", "-o", tmp_path / "strict.nii.gz")
    assert strict.returncode == 1 and "looks like CT" in strict.stderr and "--strict" in strict.stderr
    assert not (tmp_path / "strict.nii.gz").exists()
    run = medldm("upscale", scan, "--samples", "2", "-o", tmp_path / "sr.nii.gz")
    assert run.returncode == 0, run.stderr
    assert "warning: ct.nii.gz: the scan looks like CT" in run.stderr
    assert "the 2 samples are all the regression estimate" in run.stderr  # a zero spread is said, not hidden
    assert (tmp_path / "sr.nii.gz").exists()
    record = json.loads((tmp_path / "sr.json").read_text())  # the provenance names the refinement this scan got
    assert record["medldm"]["sampling"]["refine"] == 0 and "no diffusion refinement" in record["Description"]


# ---------------------------------------------------------------------------------------------- adaptation
@pytest.mark.slow
def test_adaptation_lowers_its_own_loss_and_changes_the_output(default_upscaler, head_ct, monkeypatch):
    from medldm.adapt import adapt

    monkeypatch.setattr("medldm.adapt.BATCH", 16)  # half the shipped batch: the same behaviour in half the time
    monkeypatch.setattr("medldm.adapt.PATCH", 32)  # and a quarter of its patch
    lr, _ = degrade_volume(head_ct, kind="slice-profile", axis="x", scale=4)  # in-plane axis thickened
    plan = default_upscaler.plan(lr, axis="x", scale=4)
    before = default_upscaler.upscale(lr, plan=plan).sr.data
    adapted = adapt(default_upscaler.model, lr, plan, steps=40, minutes=None, seed=0)
    assert adapted.steps == 40 and adapted.factor == pytest.approx(4.0)
    assert np.mean(adapted.losses[-10:]) < np.mean(adapted.losses[:10])
    # the second pass is adapted after the first, on the scan's pairs run through the adapted first pass
    assert [len(losses) for losses in adapted.later_losses] == [40]
    assert np.mean(adapted.later_losses[0][-10:]) < np.mean(adapted.later_losses[0][:10])
    # the shipped model is untouched; the adapted one shares its autoencoder and denoiser
    assert adapted.model.estimator is not default_upscaler.model.estimator
    assert adapted.model.second_pass is not default_upscaler.model.second_pass
    assert adapted.model.autoencoder is default_upscaler.model.autoencoder
    runner = default_upscaler.with_model(adapted.model)
    assert default_upscaler.refine > 0 and runner.refine == 0  # the unadapted denoiser's detail is left out
    after = runner.upscale(lr, plan=plan, keep_estimate=True)
    np.testing.assert_array_equal(after.sr.data, after.estimate.data)  # the adapted estimate, as it is
    assert np.abs(after.sr.data - before).mean() > 1e-3 * np.ptp(before)
    assert after.residual < 1e-6  # still consistent with the input
    np.testing.assert_array_equal(default_upscaler.upscale(lr, plan=plan).sr.data, before)
    asked = Upscaler(default_upscaler.model, device="cpu", refine=0.15).with_model(adapted.model)
    assert asked.refine == 0.15  # a refinement the user asks for still applies


def test_an_adaptation_cut_short_by_its_time_bound_says_so(default_upscaler, head_ct, monkeypatch, capsys):
    from medldm.cli import _UpscaleListener

    import medldm.adapt as adapt_module

    monkeypatch.setattr(adapt_module, "BATCH", 4)
    monkeypatch.setattr(adapt_module, "PATCH", 32)
    lr, _ = degrade_volume(head_ct, kind="slice-profile", axis="x", scale=4)
    plan = default_upscaler.plan(lr, axis="x", scale=4)
    finished = adapt_module.adapt(default_upscaler.model, lr, plan, steps=2, minutes=5, seed=0)
    assert not finished.cut_short  # the step bound came first
    cut = adapt_module.adapt(default_upscaler.model, lr, plan, steps=10_000, minutes=0.01, seed=0)
    assert cut.cut_short and cut.steps < 10_000 and (cut.steps_asked, cut.minutes) == (10_000, 0.01)
    _UpscaleListener(quiet=False, json_lines=False, scans=1).adapted(Path("ct.nii.gz"), cut)
    told = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert f"the 0.01-minute bound stopped the adaptation at {cut.steps}/" in told
    assert "of 10000 steps per pass; a larger --adapt-minutes lets it finish" in told


@pytest.mark.slow
def test_adaptation_off_the_trained_factors_learns_and_runs_on_the_trained_grid(ixi_path, monkeypatch):
    import medldm.adapt as adapt_module
    import medldm.pipeline as pipeline

    monkeypatch.setattr(pipeline, "ESTIMATE_GRID", "trained")
    vol = crop(load(ixi_path), (slice(24, 88), slice(None), slice(24, 88)))
    lr, _ = degrade_volume(vol, kind="slice-profile", axis="y", scale=2.5)  # 5 mm slices, 2 mm in-plane
    up = Upscaler("default", device="cpu")
    plan = up.plan(lr, axis="y", scale=2.5)
    adapted = adapt_module.adapt(up.model, lr, plan, steps=4, minutes=None, seed=0)
    assert adapted.model.info["adapted_to"]["grid"] == "trained" and adapted.factor == pytest.approx(plan.scale)
    runner = up.with_model(adapted.model)
    result = runner.upscale(lr, plan=plan)
    assert result.residual < 1e-6
    # the adapted passes run where they learnt: on the x2 grid, then resampled onto the x2.5 grid and projected
    at_x2 = torch.from_numpy(runner.upscale(lr, axis="y", scale=2).sr.data)
    a = plan.axis
    op = make_operator("slice-profile", axis=a, scale=plan.scale)
    expected = enforce_consistency(resample_axis(at_x2, a, result.sr.shape[a]), torch.from_numpy(lr.data), op)
    np.testing.assert_allclose(result.sr.data, expected.numpy(), atol=1e-3 * float(np.ptp(lr.data)))
    monkeypatch.setattr(adapt_module, "GRID", "output")  # pairs at the scan's own factor: the output grid
    own = adapt_module.adapt(up.model, lr, plan, steps=1, minutes=None, seed=0)
    assert own.model.info["adapted_to"]["grid"] == "output"


@pytest.mark.parametrize("pairs", ["own", "trained", "mixed"])
def test_the_adaptation_pairs_take_the_degradations_asked_for(default_upscaler, ixi_path, monkeypatch, pairs):
    """First-pass pairs from the scan's own planes: "own", the thick axis's slice profile, exact factor and
    thickness of the plan (on the output grid) applied to an in-plane axis; "trained", the model's training tasks
    (the default); "mixed", half of each."""
    import medldm.adapt as adapt_module

    monkeypatch.setattr(adapt_module, "PAIRS", pairs)
    vol = crop(load(ixi_path), (slice(24, 88), slice(None), slice(24, 88)))
    lr, _ = degrade_volume(vol, kind="slice-profile", axis="y", scale=3, thickness=0.75)  # 6 mm slices, 4.5 thick
    plan = default_upscaler.plan(lr, axis="y", scale=3, thickness=4.5)  # mm
    model = default_upscaler.model
    factor, thick_axes = adapt_module._geometry(model, lr, plan, 1, None)
    sampler, *_ = adapt_module._own_pairs(model, lr, plan, factor, thick_axes, 0, "output")
    batch = sampler.batch(0, 64, (32, 32), stream=0)
    trained = list(model.config.data.tasks)
    own = [i for i, t in enumerate(sampler.tasks) if t not in trained]  # the scan's own task (x3, 0.75)
    expected = {"own": (1, 0), "trained": (0, len(trained)), "mixed": (len(trained), len(trained))}[pairs]
    assert (len(own), len(sampler.tasks) - len(own)) == expected
    rows = list(zip(*(batch[k].tolist() for k in ("task", "scale", "thickness", "axis")), strict=True))
    for task, scale, thickness, axis in rows:
        if task in own:  # an in-plane axis thickened as the thick axis is
            assert (scale, thickness) == pytest.approx((3.0, 0.75)) and axis in thick_axes
        else:  # one of the model's training tasks, at its factor and contiguous slices
            assert scale == sampler.tasks[task].scale and thickness == 1.0
    if pairs == "mixed":
        assert 16 < sum(task in own for task, *_ in rows) < 48  # about half of 64


def test_adaptation_needs_thick_slices_and_a_bound(default_upscaler, ixi_path):
    from medldm.adapt import adapt

    vol = load(ixi_path)
    with pytest.raises(MedldmError, match="needs a bound"):
        adapt(default_upscaler.model, vol, default_upscaler.plan(vol, axis="z", scale=2), steps=None, minutes=None)
    kspace = default_upscaler.plan(vol, kind="kspace", scale=2)
    with pytest.raises(MedldmError, match="needs thick slices"):
        adapt(default_upscaler.model, vol, kspace, steps=1)
    # an isotropic scan upscaled along an axis: its slices are no thicker than their in-plane voxels
    with pytest.raises(MedldmError, match="thicker than their in-plane voxels"):
        adapt(default_upscaler.model, vol, default_upscaler.plan(vol, axis="z", scale=2), steps=1)


@pytest.mark.slow
def test_evaluate_adapt_scores_the_model_adapted_and_unadapted(tmp_path, head_ct):
    import csv

    from medldm.evaluation.evaluate import evaluate

    scan = save_nifti(head_ct, tmp_path / "ct.nii.gz")
    evaluate(
        scan,
        tmp_path / "report",
        model="default",
        axis="x",
        scale=4,
        baselines=["bspline-dc"],
        adapt={"steps": 2, "minutes": None},
        lpips_weights=str(LPIPS),
    )
    with open(tmp_path / "report" / "metrics.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert sorted(rows) == ["bspline-dc", "model", "unadapted"]
    # each volume's adaptation: steps over the adapted passes (2 each: the estimator and the second pass), seconds
    assert rows["model"]["adaptation_steps"] == "4" and float(rows["model"]["adaptation_s"]) > 0
    assert "adapted to each degraded scan first" in (tmp_path / "report" / "report.html").read_text()
    sampling = json.loads((tmp_path / "report" / "summary.json").read_text())["protocol"]["sampling"]
    assert "refine 0.0 (" in sampling and "without it, refine 0.15)" in sampling  # what each of the two ran with
    # the batch and loss it was tuned with
    assert f"{BATCH} patches of {PATCH}^2 a step, L1 on the unseen error" in sampling


@pytest.mark.slow
def test_cli_adapt_saves_a_checksummed_model_that_loads(tmp_path, head_ct):
    lr, _ = degrade_volume(head_ct, kind="slice-profile", axis="x", scale=4)
    scan = save_nifti(lr, tmp_path / "ct.nii.gz")
    run = medldm(
        "upscale",
        scan,
        "--axis",
        "x",
        "--scale",
        "4",
        "--adapt",
        "--adapt-steps",
        "3",
        "--save-adapted",
        tmp_path / "adapted",
        "-o",
        tmp_path / "sr.nii.gz",
    )
    assert run.returncode == 0, run.stderr
    assert "adapted to ct.nii.gz: 3 steps" in run.stderr and "note:" not in run.stderr  # a step bound alone: all done
    from medldm.model import load_model

    model = load_model(tmp_path / "adapted")  # checksums verified
    assert model.info["adapted_to"]["steps"] == 3 and model.info["adapted_to"]["loss_on"] == "unseen"
    sidecar = (tmp_path / "sr.json").read_text()
    recorded = json.loads(sidecar)["medldm"]["adaptation"]
    assert (recorded["loss_on"], recorded["pairs"]) == ("unseen", "trained")  # how it was adapted
    again = medldm(
        "upscale",
        scan,
        "--axis",
        "x",
        "--scale",
        "4",
        "--adapt",
        "--adapt-steps",
        "3",
        "--save-adapted",
        tmp_path / "adapted",
        "-o",
        tmp_path / "sr2.nii.gz",
    )
    assert again.returncode == 1 and "already exists" in again.stderr


def test_preview_windows_follow_the_modality(head_ct, ixi_path):
    from medldm.figures import display_window

    assert display_window(head_ct)[2] == "CT soft-tissue window L50 W400"
    assert display_window(head_ct, "bone")[:2] == (-800.0, 2000.0)
    with pytest.raises(MedldmError, match="CT window"):
        display_window(load(ixi_path), "bone")
    info = medldm("info", shared_path("data/ct/invesalius-ct-head/invesalius_cranium_ct.nii.gz"), "--json")
    assert info.returncode == 0 and '"display_window": "CT soft-tissue window L50 W400"' in info.stdout


def test_the_shipped_model_knows_what_it_was_trained_on(default_upscaler):
    scope = default_upscaler.model.scope
    assert scope.contrasts == ("T1",) and scope.region == "brain" and scope.spacing_mm == (0.8984, 2.0)
    t2 = _scan((64, 64, 10), (0.9, 0.9, 4.0), path="sub-01_T2w.nii.gz")
    assert any("name says T2" in w for w in default_upscaler.plan(t2).warnings)
    fine = _scan((64, 64, 10), (0.43, 0.43, 2.5), path="scan.nii.gz")
    assert any("in-plane spacing 0.43 mm" in w for w in default_upscaler.plan(fine).warnings)
    dark = _scan(
        (64, 64, 10), (1.0, 1.0, 4.0), data=np.random.default_rng(1).exponential(20, (64, 64, 10)).astype(np.float32)
    )  # most of the foreground near the bottom of the range
    assert any("normalised foreground mean" in w for w in default_upscaler.plan(dark).warnings)
