"""Fusion of thick-slice stacks (issue 20): the grid over the common field of view, each stack's forward model
through its affine (oblique stacks included), the joint data-consistency step, registration and the errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from medldm.evaluation.baselines import baseline
from medldm.evaluation.fusion import rigid_motion
from scipy import ndimage

from medldm import MedldmError
from medldm.degrade import SliceSampling, degrade_volume, make_operator
from medldm.fusion import Stack, StackOperator, as_stack, fuse, fusion_grid
from medldm.volume import Volume, crop, face_corners, load, save_nifti
from tests.helpers import medldm, shared_path


def _truth(n: int = 32, seed: int = 0, spacing: float = 1.0) -> Volume:
    rng = np.random.default_rng(seed)
    data = ndimage.gaussian_filter(rng.normal(size=(n, n, n)), 1.5) * 10 + 5
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-7.0, 3.0, 11.0]
    return Volume(data, affine, {"path": "truth"})


def _stacks(truth: Volume, scale: int = 4) -> list[Volume]:
    out = []
    for a in range(3):
        lr = degrade_volume(truth, kind="slice-profile", axis=a, scale=scale).lr
        lr.meta["path"] = f"stack{a}"
        out.append(lr)
    return out


def _rmse(a: Volume, b: Volume) -> float:
    return float(np.sqrt(((a.data - b.data) ** 2).mean()))


def _rotation(degrees: float, axis: int) -> np.ndarray:
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


# ------------------------------------------------------------------------------------------------ the grid
def test_grid_is_the_common_field_of_view_at_the_finest_spacing():
    truth = _truth(40)
    stacks = _stacks(truth)
    shape, affine = fusion_grid([as_stack(s) for s in stacks])
    assert shape == truth.shape  # every stack covers the truth's field of view exactly
    np.testing.assert_allclose(affine, truth.affine, atol=1e-9)
    # cut one stack short: the grid shrinks to the overlap, whole voxels centred in it
    short = crop(stacks[0], (slice(0, 6), slice(None), slice(None)))  # 6 of 10 thick slices along axis 0
    shape, affine = fusion_grid([as_stack(s) for s in (short, *stacks[1:])])
    assert shape == (24, 40, 40)
    np.testing.assert_allclose(face_corners(shape, affine).min(0), face_corners(short.shape, short.affine).min(0))
    # --spacing: 1.5 mm over 40 mm holds 26 voxels, centred (1 mm spare, 0.5 on each side)
    shape, affine = fusion_grid([as_stack(s) for s in stacks], spacing=1.5)
    assert shape == (26, 26, 26)
    np.testing.assert_allclose(np.diag(affine)[:3], [1.5] * 3)
    np.testing.assert_allclose(face_corners(shape, affine).min(0), face_corners(truth.shape, truth.affine).min(0) + 0.5)


def test_stack_slice_axis_and_thickness():
    lr = _stacks(_truth())[1]
    stack = as_stack(lr)
    assert (stack.axis, stack.thickness) == (1, 1.0)
    assert as_stack(lr, thickness_mm=2.0).thickness == pytest.approx(0.5)
    assert as_stack(_truth()).axis is None  # isotropic: sampled as it is


# ---------------------------------------------------------------------------------- the joint projection
def test_joint_projection_agrees_with_every_stack_and_beats_each_alone():
    truth = _truth()
    stacks = _stacks(truth)
    fused = fuse(stacks, like=truth, prior="bspline")
    assert max(fused.residuals.values()) < 1e-6
    average = fuse(stacks, like=truth, prior="bspline", consistent=False)
    assert min(average.residuals.values()) > 1e-3  # the plain average does not reproduce the stacks
    assert _rmse(fused.volume, truth) < 0.5 * _rmse(average.volume, truth)
    for lr in stacks:  # each stack alone, B-spline made consistent with it
        op = make_operator("slice-profile", axis=lr.meta["degrade"]["axis"], scale=4)
        assert _rmse(fused.volume, truth) < 0.5 * _rmse(baseline("bspline-dc", lr, op), truth)
    np.testing.assert_allclose(fused.volume.affine, truth.affine)


def test_operator_adjoint_is_exact():
    truth = _truth(24)
    lr = _stacks(truth)[2]
    rotated = lr.with_data(lr.data, _rotation(17, 0) @ lr.affine)  # oblique: the trilinear path
    for stack in (lr, rotated):
        op = StackOperator(truth.shape, truth.affine, as_stack(stack))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(truth.shape, generator=g, dtype=torch.float64)
        y = torch.randn(stack.shape, generator=g, dtype=torch.float64)
        assert abs(float((op.forward(x) * y).sum() - (x * op.adjoint(y)).sum())) < 1e-9 * float(x.abs().sum())
    op = StackOperator(truth.shape, truth.affine, as_stack(lr))  # aligned: the stack itself, exactly
    torch.testing.assert_close(
        op.forward(torch.from_numpy(truth.data).double()), torch.from_numpy(lr.data).double(), rtol=0, atol=1e-5
    )


def _oblique_stack(truth: Volume, degrees: float, scale: int = 4) -> Volume:
    """A thick-slice stack along a rotated axis, made independently of medldm.fusion: scipy samples the truth
    (linear) on a fine grid rotated about the truth's centre, then SliceSampling thickens its third axis."""
    centre = truth.affine @ np.array([*(np.array(truth.shape) - 1) / 2, 1.0])
    move = np.eye(4)
    move[:3, 3] = centre[:3]
    back = np.eye(4)
    back[:3, 3] = -centre[:3]
    n = 24
    fine = move @ _rotation(degrees, 0) @ back @ truth.affine.copy()
    fine[:3, 3] = (
        move @ _rotation(degrees, 0) @ back @ truth.affine @ np.array([*((np.array(truth.shape) - n) / 2), 1.0])
    )[:3]
    index = np.linalg.inv(truth.affine) @ fine
    grid = np.indices((n, n, n)).reshape(3, -1)
    points = index[:3, :3] @ grid + index[:3, 3:4]
    data = ndimage.map_coordinates(truth.data.astype(np.float64), points, order=1, mode="constant", cval=0.0)
    op = SliceSampling((2,), scale)
    thick = op(torch.from_numpy(data.reshape(n, n, n))).numpy()
    from medldm.volume import rescaled_affine

    return Volume(thick, rescaled_affine(fine, [1, 1, scale]), {"path": "oblique"})


@pytest.mark.slow  # 800 CGLS iterations
def test_oblique_stack_is_modelled_exactly():
    truth = _truth()
    straight = _stacks(truth)[:2]
    oblique = _oblique_stack(truth, 25.0)
    assert abs(oblique.affine[1, 2]) > 0.5  # really tilted: its slice normal is 25 degrees off the z axis
    # trilinear resampling makes the joint system less well conditioned than the aligned one: more iterations
    fused = fuse([*straight, oblique], like=truth, prior="bspline", iterations=800)
    assert max(fused.residuals.values()) < 1e-6  # the forward model reproduces the independently made stack
    two = fuse(straight, like=truth, prior="bspline")
    assert _rmse(fused.volume, truth) < 0.9 * _rmse(two.volume, truth)  # and its information is used


# --------------------------------------------------------------------------------------------- the errors
def test_refuses_stacks_that_do_not_overlap():
    stacks = _stacks(_truth())
    far = stacks[1].with_data(stacks[1].data, stacks[1].affine.copy())
    far.affine[0, 3] += 500.0
    with pytest.raises(MedldmError, match="do not overlap"):
        fuse([stacks[0], far], prior="bspline")


def test_refuses_different_modalities_and_single_stacks():
    stacks = _stacks(_truth())
    ct = stacks[1].with_data(stacks[1].data * 100 - 1000, modality="CT")
    with pytest.raises(MedldmError, match="different modalities"):
        fuse([stacks[0], ct], prior="bspline")
    with pytest.raises(MedldmError, match="at least two stacks"):
        fuse(stacks[:1], prior="bspline")
    with pytest.raises(MedldmError, match="needs an upscaler"):
        fuse(stacks, prior="model")


def test_cli_fuses_and_refuses(tmp_path):
    truth = _truth()
    paths = []
    for lr in _stacks(truth):
        paths.append(save_nifti(lr, tmp_path / f"{lr.meta['path']}.nii.gz"))
    like = save_nifti(truth, tmp_path / "truth.nii.gz")
    out = tmp_path / "fused.nii.gz"
    done = medldm("fuse", *paths, "-o", out, "--like", like, "--prior", "bspline")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("residual") == 3 and "wrote" in done.stdout
    fused = load(out)
    assert fused.shape == truth.shape and _rmse(fused, truth) < 0.5
    again = medldm("fuse", *paths, "-o", out, "--prior", "bspline")
    assert again.returncode == 1 and "already exists" in again.stderr and len(again.stderr.splitlines()) == 1
    elsewhere = np.diag([1, 4, 1, 1.0])
    elsewhere[0, 3] = 900.0  # 900 mm to the side
    far = save_nifti(Volume(load(paths[1]).data, elsewhere), tmp_path / "far.nii.gz")
    refused = medldm("fuse", paths[0], far, "-o", tmp_path / "x.nii.gz", "--prior", "bspline")
    assert refused.returncode == 1 and "do not overlap" in refused.stderr
    assert not (tmp_path / "x.nii.gz").exists()


# ------------------------------------------------------------------------------------------- registration
@pytest.mark.slow
def test_register_recovers_a_known_rigid_motion():
    pytest.importorskip("SimpleITK")

    brain = load(shared_path("data/mri/colin27-mricron/ch2.nii.gz"))
    brain = crop(brain, (slice(32, 152), slice(40, 176), slice(24, 136)))  # 120 x 136 x 112 at 1 mm
    # the patient moved (3 degrees about z through the centre, then 2 mm along x): the second acquisition sees the
    # anatomy at motion(p) where it was at p
    moved = rigid_motion(brain, 3.0, 2.0)
    motion, centre = moved.matrix, np.array([*moved.centre, 1.0])
    axial = degrade_volume(brain, kind="slice-profile", axis=2, scale=4).lr
    coronal = degrade_volume(moved.volume, kind="slice-profile", axis=1, scale=4).lr
    axial.meta["path"], coronal.meta["path"] = "axial", "coronal"
    from medldm.registration import register_stacks, rigid_parameters

    aligned, transforms = register_stacks([as_stack(axial), as_stack(coronal)])
    found = np.array(transforms["coronal"]["matrix"])
    error = rigid_parameters(found @ motion)  # found should undo the motion: their product is the identity
    assert error["rotation_deg"] < 0.5
    # the residual translation, measured where it matters: at the brain's centre
    assert np.linalg.norm((found @ motion @ centre)[:3] - centre[:3]) < 0.5
    assert isinstance(aligned[1], Stack) and not np.allclose(aligned[1].volume.affine, coronal.affine)


def test_grids_that_line_up_are_read_by_index_as_interpolation_would():
    from medldm.fusion import _gather, _index_map, _Trilinear

    truth = _truth(20)
    # a stack stored in another voxel order (axes swapped, one flipped) and shifted by whole voxels
    swap = np.array([[0, 1, 0, 3], [-1, 0, 0, 25], [0, 0, 1, -2], [0, 0, 0, 1.0]])
    mapping = _index_map(swap)
    assert mapping is not None and _index_map(_rotation(10, 2)) is None
    x = torch.from_numpy(truth.data).double()
    torch.testing.assert_close(
        _gather(x, mapping, (24, 18, 22)), _Trilinear(swap, (24, 18, 22), x.shape).forward(x), rtol=0, atol=1e-9
    )


def test_python_api_fuses_paths(tmp_path):
    import medldm

    truth = _truth()
    paths = [save_nifti(lr, tmp_path / f"{lr.meta['path']}.nii.gz") for lr in _stacks(truth)]
    fused = medldm.fuse(paths, like=truth, prior="bspline")
    assert fused.shape == truth.shape and _rmse(fused, truth) < 0.5
    assert max(fused.meta["fuse"]["residuals"].values()) < 1e-6 and fused.meta["fuse"]["transforms"] == {}


def test_an_anisotropic_grid_lines_up_with_stacks_made_from_it():
    # --like an anisotropic scan (1.15 x 1.15 x 1 mm, as a real MPRAGE): each stack is refined to the grid's own
    # spacing along its normal, so every operator reads the grid by index and the fusion is exact
    truth = _truth(24)
    truth = truth.with_data(truth.data, np.diag([1.15, 1.15, 1.0, 1.0]))
    stacks = _stacks(truth)
    for lr in stacks:
        op = StackOperator(truth.shape, truth.affine, as_stack(lr))
        assert op.lined_up is not None and op.fine_shape == truth.shape
    assert max(fuse(stacks, like=truth, prior="bspline").residuals.values()) < 1e-6


def test_a_stack_that_cannot_be_registered_is_refused():
    pytest.importorskip("SimpleITK")
    from medldm.registration import register_stacks

    stacks = _stacks(_truth())
    blank = stacks[1].with_data(np.zeros(stacks[1].shape, np.float32))  # nothing to align
    with pytest.raises(MedldmError, match="could not be registered"):
        register_stacks([as_stack(stacks[0]), as_stack(blank)])


# ------------------------------------------------------------------------------------------- evaluation
def _brain_list(tmp_path) -> Path:
    brain = load(shared_path("data/mri/colin27-mricron/ch2.nii.gz"))
    brain = crop(brain, (slice(58, 122), slice(76, 140), slice(56, 104)))  # 64 x 64 x 48 mm of the centre
    scans = tmp_path / "scans.txt"
    scans.write_text(f"{save_nifti(brain, tmp_path / 'brain.nii.gz')}\n")
    return scans


def test_evaluate_scores_the_fusion_and_a_moved_stack_after_registration(tmp_path, trained_models):
    pytest.importorskip("SimpleITK")
    scans, model = _brain_list(tmp_path), trained_models["tiny_2d"]
    plain = medldm("evaluate", "--stacks", "--data", scans, "--model", model, "--out", tmp_path / "plain", "--quiet")
    assert plain.returncode == 0, plain.stderr
    summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert set(summary["baselines"]) == {"bspline-dc", "model-average", "upscale-i", "upscale-j", "upscale-k"}
    moved = medldm(
        "evaluate", "--stacks", "--motion", "3", "2", "--data", scans, "--model", model, "--out", tmp_path / "moved"
    )
    assert moved.returncode == 0, moved.stderr
    summary = json.loads((tmp_path / "moved" / "summary.json").read_text())
    assert "upscale-j" not in summary["baselines"]  # the moved stack's own upscale lies in the moved anatomy
    (line,) = summary["protocol"]["registration"]
    degrees, mm = (float(v) for v in re.findall(r"([\d.]+) (?:degrees|mm)", line))
    assert degrees < 1.0 and mm < 1.0, line  # 3 degrees and 2 mm were applied
    assert "registers the stacks" in (tmp_path / "moved" / "report.html").read_text()
    refused = medldm("evaluate", "--motion", "3", "2", "--data", scans, "--model", model, "--out", tmp_path / "x")
    assert refused.returncode == 1 and "pass --stacks" in refused.stderr
