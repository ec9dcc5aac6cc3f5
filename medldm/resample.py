"""Onto a finer grid with the same field of view: the interpolations every stage shares (the network's input, the
baselines, fusion's start, registration's resampling).

LR sample m along an axis upsampled by f sits at HR continuous index ``f*m + (f-1)/2`` (the grid maths of
medldm.volume and medldm.degrade), so HR voxel j is read at LR coordinate ``(j - (f-1)/2) / f``. Borders replicate
the edge.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medldm.volume import Volume, rescaled_affine

__all__ = ["SPLINE_ORDER", "interpolate", "resample_axis", "upsample"]

SPLINE_ORDER = {"nearest": 0, "trilinear": 1, "bspline": 3}


def upsample(lr: torch.Tensor, size) -> torch.Tensor:
    """Interpolate an LR batch (B, C, *spatial) onto the HR grid (bi- or trilinear). With align_corners=False, LR
    sample m lands at HR index s*m + (s-1)/2: the same grid maths as the forward operators and volume affines."""
    mode = "bilinear" if lr.dim() == 4 else "trilinear"
    return F.interpolate(lr, size=tuple(size), mode=mode, align_corners=False)


def interpolate(lr: Volume, factors, *, method: str = "trilinear") -> Volume:
    """Upsample ``lr`` by ``factors`` per voxel axis onto the HR grid with the same field of view (``round(n * f)``
    voxels; HR voxel ``j`` sits at LR index ``(j - (f - 1) / 2) / f``, the grid of medldm.degrade).

    Args:
        lr: the low-resolution volume.
        factors: upsampling factor per voxel axis (1 for untouched axes; need not be integers).
        method: "nearest", "trilinear" or "bspline" (cubic, with scipy's prefilter).
    """
    order = SPLINE_ORDER[method]
    factors = [int(round(f)) if abs(f - round(f)) < 1e-9 else float(f) for f in factors]
    data = torch.from_numpy(lr.data.astype(np.float64))
    # separable: one axis at a time (exact for these tensor-product kernels, and much cheaper)
    for axis, (n, f) in enumerate(zip(lr.shape, factors, strict=True)):
        if f != 1:
            data = resample_axis(data, axis, int(round(n * f)), factor=f, order=order)
    affine = rescaled_affine(lr.affine, [1.0 / f for f in factors])
    return lr.with_data(data.numpy().astype(np.float32), affine, baseline=method)


def resample_axis(
    x: torch.Tensor, axis: int, size: int, *, factor: float | None = None, order: int = 3
) -> torch.Tensor:
    """``x`` resampled along ``axis`` onto ``size`` voxels over the same field of view, edges replicated: voxel ``j``
    is read at input index ``(j - (f - 1) / 2) / f``, ``f = factor`` (default ``size / n``, the exact factor).
    ``order``: 0 nearest, 1 linear, 3 cubic B-spline with scipy's prefilter. One matrix product along the axis (or
    an index for nearest), in ``x``'s dtype."""
    n = x.shape[axis]
    if n == size and factor is None:
        return x
    f = size / n if factor is None else factor
    coords = (np.arange(size) - (f - 1) / 2.0) / f
    if order == 0:
        index = torch.from_numpy(np.clip(np.floor(coords + 0.5).astype(np.int64), 0, n - 1))
        return x.index_select(axis, index)
    # the interpolation is linear in the samples: its matrix, one column per input sample
    columns = [
        ndimage.map_coordinates(e, [coords], order=order, mode="nearest", prefilter=order > 1) for e in np.eye(n)
    ]
    w = torch.from_numpy(np.stack(columns, axis=1)).to(x.dtype)
    return torch.tensordot(w, x.movedim(axis, 0), dims=1).movedim(0, axis).contiguous()
