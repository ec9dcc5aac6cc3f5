"""`medldm evaluate` end to end on a real scan: the numbers in metrics.csv are the metrics of the right images,
on the right slices, and k-space is compared with zero filling."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from medldm.evaluation.baselines import BSPLINE_DC, ZERO_FILL, baseline, baselines_for
from medldm.evaluation.evaluate import evaluate
from medldm.evaluation.metrics import foreground_mask, psnr, ssim

from medldm.degrade import degrade_volume, make_operator
from medldm.resample import interpolate
from medldm.volume import crop, load, resolve_axis, save_nifti


@pytest.fixture(scope="module")
def scan(ixi_files, tmp_path_factory):
    """A central block of a held-out IXI T1. Its z (slice) axis is voxel axis 1, not the last one."""
    vol = load(ixi_files[-20])
    assert resolve_axis(vol, "z") == 1
    block = crop(vol, (slice(30, 90), slice(20, 68), slice(25, 65)))
    return save_nifti(block, tmp_path_factory.mktemp("eval") / "block.nii.gz")


def read_rows(out) -> dict:
    with open(out / "metrics.csv") as f:
        return {row["method"]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("kind, scale", [("kspace", 2), ("slice-profile", 4)])
def test_data_consistent_baselines_reproduce_the_input(scan, kind, scale):
    """zero-fill and bspline-dc degrade back to the input exactly; bspline-dc changes only what the acquisition
    sees of the B-spline image."""
    lr, truth = degrade_volume(load(scan), kind=kind, axis="z", scale=scale)
    op = make_operator(kind, axis=lr.meta["degrade"]["axis"], scale=scale)
    bspline = interpolate(lr, op.factors(3), method="bspline")
    as64 = lambda v: torch.from_numpy(v.data.astype(np.float64))  # noqa: E731
    unseen = lambda x: x - op.back_project(op.forward(x))  # noqa: E731
    for method in {BSPLINE_DC, ZERO_FILL} & set(baselines_for(kind)):
        up = baseline(method, lr, op)
        assert up.shape == truth.shape
        np.testing.assert_allclose(up.affine, bspline.affine, atol=1e-9)
        np.testing.assert_allclose(op.forward(as64(up)).numpy(), lr.data, atol=1e-4 * float(np.abs(lr.data).max()))
    dc = as64(baseline(BSPLINE_DC, lr, op))
    assert not torch.allclose(dc, as64(bspline), atol=1.0)
    torch.testing.assert_close(unseen(dc), unseen(as64(bspline)), rtol=0, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("kind, scale", [("kspace", 2), ("slice-profile", 4)])
def test_evaluate_scores_each_baseline_on_the_acquired_slices(scan, tmp_path, kind, scale):
    out = tmp_path / "report"
    evaluate(scan, out, model=None, kind=kind, scale=scale)
    rows = read_rows(out)
    assert tuple(rows) == baselines_for(kind)
    assert ("zero-fill" in rows) == (kind == "kspace")

    # recompute independently: 2D SSIM over the slices across the z axis (voxel axis 1) for both kinds
    lr, truth = degrade_volume(load(scan), kind=kind, axis="z", scale=scale)
    op = make_operator(kind, axis=1, scale=scale)
    mask, r = foreground_mask(truth.data), float(truth.data.max())
    for method, row in rows.items():
        pred = baseline(method, lr, op)
        assert float(row["psnr"]) == pytest.approx(psnr(pred.data, truth.data, data_range=r, mask=mask), abs=1e-6)
        assert float(row["ssim"]) == pytest.approx(
            ssim(pred.data, truth.data, data_range=r, axis=1, mask=mask), abs=1e-6
        )
    if kind == "kspace":  # keeping the measured frequencies exactly beats every interpolation in the mean error
        assert float(rows["zero-fill"]["nrmse"]) < min(float(rows[m]["nrmse"]) for m in ("trilinear", "bspline"))
