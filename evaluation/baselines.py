"""Baselines on the exact HR grid: nearest, (tri)linear and cubic B-spline interpolation; cubic B-spline with the
model's data-consistency projection (which separates what the projection adds from what the generative model
adds); and for k-space truncation, zero filling.

LR sample m along a degraded axis sits at HR continuous index ``s*m + (s-1)/2`` (the grid maths of
medldm.volume), so HR voxel i is read at LR coordinate ``(i - (s-1)/2) / s``. Borders replicate the edge.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from medldm.degrade import enforce_consistency
from medldm.volume import Volume, rescaled_affine

__all__ = [
    "BASELINES",
    "BSPLINE_DC",
    "ZERO_FILL",
    "REGRESSION",
    "baseline",
    "baselines_for",
    "interpolate",
    "zero_fill",
]

BASELINES = {"nearest": 0, "trilinear": 1, "bspline": 3}  # interpolations: spline order
BSPLINE_DC = "bspline-dc"
ZERO_FILL = "zero-fill"
# the model's own regression (estimator) stage made data-consistent, without the diffusion model's detail:
# what the diffusion adds over plain regression (computed by the pipeline, not by :func:`baseline`)
REGRESSION = "regression"


def baselines_for(kind: str, *, regression: bool = False) -> tuple[str, ...]:
    """The baselines of a degradation kind: the interpolations, cubic B-spline made data-consistent, for k-space
    truncation zero filling (the scanner's own 'zero-fill interpolation', and there the stronger yardstick: it
    keeps every measured frequency exactly), and with ``regression`` the model's regression stage alone."""
    return (*BASELINES, BSPLINE_DC, *((ZERO_FILL,) if kind == "kspace" else ()), *((REGRESSION,) if regression else ()))


def baseline(method: str, lr: Volume, op) -> Volume:
    """The HR estimate of one baseline (see :func:`baselines_for`) from ``lr``, acquired with the operator ``op``
    (medldm.degrade)."""
    if method == ZERO_FILL:
        return zero_fill(lr, op)
    if method == BSPLINE_DC:
        up = interpolate(lr, op.factors(3), method="bspline")
        enforce_consistency(torch.from_numpy(up.data), torch.from_numpy(lr.data.astype(np.float32)), op)  # in place
        return up.with_data(up.data, up.affine, baseline=BSPLINE_DC)
    return interpolate(lr, op.factors(3), method=method)


def zero_fill(lr: Volume, op) -> Volume:
    """k-space zero filling onto the HR grid: the pseudo-inverse of the k-space truncation ``op``
    (:class:`medldm.degrade.KSpaceTruncation`), i.e. the minimum-norm HR image with exactly the LR's central
    frequencies and none above them (sinc interpolation)."""
    data = op.back_project(torch.from_numpy(lr.data.astype(np.float64))).numpy()
    affine = rescaled_affine(lr.affine, [1.0 / f for f in op.factors(3)])
    return lr.with_data(data.astype(np.float32), affine, baseline=ZERO_FILL)


def interpolate(lr: Volume, factors, *, method: str = "trilinear") -> Volume:
    """Upsample ``lr`` by ``factors`` per voxel axis onto the HR grid with the same field of view (``round(n * f)``
    voxels; HR voxel ``j`` sits at LR index ``(j - (f - 1) / 2) / f``, the grid of medldm.degrade).

    Args:
        lr: the low-resolution volume.
        factors: upsampling factor per voxel axis (1 for untouched axes; need not be integers).
        method: "nearest", "trilinear" or "bspline" (cubic, with scipy's prefilter).
    """
    order = BASELINES[method]
    factors = [int(round(f)) if abs(f - round(f)) < 1e-9 else float(f) for f in factors]
    shape = tuple(int(round(n * f)) for n, f in zip(lr.shape, factors, strict=True))
    coords = [(np.arange(n) - (f - 1) / 2.0) / f for n, f in zip(shape, factors, strict=True)]
    data = lr.data.astype(np.float64)
    # separable: interpolate one axis at a time (exact for these tensor-product kernels, and much cheaper)
    for axis, (f, c) in enumerate(zip(factors, coords, strict=True)):
        if f == 1:
            continue
        if order == 0:
            data = np.take(data, np.clip(np.floor(c + 0.5).astype(int), 0, lr.shape[axis] - 1), axis=axis)
            continue
        grid = np.meshgrid(
            *[
                np.arange(n, dtype=np.float64) if a != axis else c
                for a, n in enumerate(data.shape[:axis] + (len(c),) + data.shape[axis + 1 :])
            ],
            indexing="ij",
        )
        data = ndimage.map_coordinates(data, grid, order=order, mode="nearest", prefilter=order > 1)
    affine = rescaled_affine(lr.affine, [1.0 / f for f in factors])
    return lr.with_data(data.astype(np.float32), affine, baseline=method)
