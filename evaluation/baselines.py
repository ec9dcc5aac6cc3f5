"""Baselines on the exact HR grid: nearest, (tri)linear and cubic B-spline interpolation; cubic B-spline with the
model's data-consistency projection (which separates what the projection adds from what the generative model
adds); and for k-space truncation, zero filling.

The interpolations themselves are medldm.resample's (the grid maths shared with the model's input).
"""

from __future__ import annotations

import numpy as np
import torch

from medldm.degrade import enforce_consistency
from medldm.resample import SPLINE_ORDER, interpolate
from medldm.volume import Volume, rescaled_affine

__all__ = [
    "BASELINES",
    "BSPLINE_DC",
    "ZERO_FILL",
    "REGRESSION",
    "baseline",
    "baselines_for",
    "zero_fill",
]

BASELINES = tuple(SPLINE_ORDER)  # the interpolations
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
