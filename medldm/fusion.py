"""Fuse thick-slice stacks of one scan session into one isotropic volume (``medldm fuse``).

Each stack is sharp within its slices and blurred across them, so orthogonal stacks complement each other. The
fused volume lives on an isotropic grid over the stacks' common field of view. Each stack's forward model is
computed through its own affine: the fused volume is resampled (trilinearly; exactly, by index, when the grids
line up) onto the stack's grid refined along its slice normal, then thickened with the stack's own slice profile
(:class:`medldm.degrade.SliceSampling`). The estimate starts from a prior (each stack upscaled, by B-spline or
the learned model, and averaged) and is then made consistent with every stack at once: CGLS on the sum of the
stacks' normal equations, started at the prior, converges to the least-squares solution nearest to it (for
consistent stacks: the prior projected onto the set of volumes that reproduce every stack).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from torch import Tensor

from medldm.choices import Prior
from medldm.degrade import SliceSampling, _matmul_along, grid_for_factor
from medldm.errors import MedldmError
from medldm.intensity import guess_modality
from medldm.resample import interpolate
from medldm.volume import ANISOTROPY, Volume, face_corners, rescaled_affine

__all__ = [
    "Stack",
    "Fusion",
    "as_stack",
    "fusion_grid",
    "grid_spacing_along",
    "StackOperator",
    "joint_consistency",
    "fuse",
    "PRIORS",
]

PRIORS = Prior.values()
ITERATIONS = 60  # CGLS iterations at most; a few tens reach 1e-4 of the range on x4 stacks
TOLERANCE = 1e-7  # stop when every stack's RMS residual is below this fraction of its range


@dataclass
class Stack:
    """One acquisition: its volume, its slice axis (voxel index; None when isotropic) and its slice thickness as a
    fraction of the slice spacing."""

    volume: Volume
    axis: int | None
    thickness: float = 1.0
    profile: str = "gaussian"

    @property
    def name(self) -> str:
        return str(self.volume.path or "stack")


def as_stack(volume: Volume, *, thickness_mm: float | None = None, profile: str = "gaussian") -> Stack:
    """A Stack whose slice axis is the one with the largest spacing (none when the volume is isotropic); the
    thickness is ``thickness_mm``, else the DICOM SliceThickness along the slice axis, else the spacing."""
    spacing = np.asarray(volume.spacing)
    if spacing.max() / spacing.min() <= ANISOTROPY:
        return Stack(volume, None, 1.0, profile)
    axis = int(np.argmax(spacing))
    mm = thickness_mm
    if mm is None and volume.meta.get("slice_thickness") and volume.meta.get("slice_axis") == axis:
        mm = float(volume.meta["slice_thickness"])
    return Stack(volume, axis, 1.0 if mm is None else mm / spacing[axis], profile)


def fusion_grid(stacks: list[Stack], spacing: float | None = None) -> tuple[tuple[int, int, int], np.ndarray]:
    """The isotropic grid (shape, affine) over the stacks' common field of view, oriented as the first stack, at
    ``spacing`` mm (default: the finest spacing of any stack). The field of view of a stack is the box of its
    voxels' outer faces; the grid holds whole voxels of the box where all of them overlap, centred in it."""
    first = stacks[0].volume
    if spacing is None:
        spacing = min(min(s.volume.spacing) for s in stacks)
    if not (math.isfinite(spacing) and spacing > 0):
        raise MedldmError(f"--spacing must be a positive number of mm, got {spacing}")
    rotation = first.affine[:3, :3] / np.asarray(first.spacing)  # unit columns: the first stack's axes
    lo, hi = np.full(3, -np.inf), np.full(3, np.inf)
    for s in stacks:
        corners = face_corners(s.volume.shape, s.volume.affine) @ rotation  # in the first stack's frame
        lo, hi = np.maximum(lo, corners.min(0)), np.minimum(hi, corners.max(0))
    counts = np.floor((hi - lo) / spacing + 1e-6).astype(int)
    if np.any(counts < 2):
        names = ", ".join(s.name for s in stacks)
        raise MedldmError(
            f"the stacks do not overlap (common field of view {np.round(hi - lo, 1).tolist()} mm): {names}"
        )
    start = lo + (hi - lo - counts * spacing) / 2 + spacing / 2  # first voxel centre, in the frame
    affine = np.eye(4)
    affine[:3, :3] = rotation * spacing
    affine[:3, 3] = rotation @ start
    return cast(tuple[int, int, int], tuple(int(n) for n in counts)), affine  # counts: one per axis


def _grid_points(index_affine: np.ndarray, shape) -> Tensor:
    """The points ``index_affine @ (i, j, k, 1)`` of every voxel of a grid of ``shape``, (*shape, 3), float64."""
    m = torch.as_tensor(index_affine, dtype=torch.float64)
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1) @ m[:3, :3].T + m[:3, 3]


def _inside(index_affine: np.ndarray, shape, bounds, tol: float = 1e-6) -> Tensor:
    """Which points of a grid of ``shape`` map (through ``index_affine``) into the index box ``[0, bounds - 1]``."""
    points = _grid_points(index_affine, shape)
    upper = torch.tensor(bounds, dtype=torch.float64) - 1
    return ((points >= -tol) & (points <= upper + tol)).all(-1)


def grid_spacing_along(affine: np.ndarray, direction) -> float:
    """The spacing (mm) of the grid ``affine`` along a world direction: one voxel step along a grid axis parallel to
    it (for an oblique direction, the 2-norm over the grid axes it crosses). A stack is refined along its slice
    normal to this spacing, so on a grid that lines up with it the refined stack is the grid itself."""
    d = np.asarray(direction, dtype=np.float64)
    return float(1.0 / np.linalg.norm(np.linalg.solve(affine[:3, :3], d / np.linalg.norm(d))))


def _index_map(index_affine: np.ndarray, tol: float = 1e-6):
    """When ``index_affine`` only permutes, flips and shifts voxel indices by whole voxels (grids that line up),
    the source axis, sign and offset for each target axis; else None."""
    m = index_affine[:3]
    if not np.allclose(np.abs(m[:, :3]), np.round(np.abs(m[:, :3])), atol=tol) or not np.allclose(
        m[:, 3], np.round(m[:, 3]), atol=tol
    ):
        return None
    r = np.round(m[:, :3]).astype(int)
    if sorted(np.abs(r).sum(0).tolist()) != [1, 1, 1] or sorted(np.abs(r).sum(1).tolist()) != [1, 1, 1]:
        return None
    # target axis b reads source axis a where r[a, b] != 0: source index = r[a, b] * t + offset[a]
    return [
        (int(np.nonzero(r[:, b])[0][0]), int(r[:, b].sum()), int(round(m[np.nonzero(r[:, b])[0][0], 3])))
        for b in range(3)
    ]


def _gather(x: Tensor, mapping, shape) -> Tensor:
    """``x`` read on a grid that lines up with it (see :func:`_index_map`); zero outside ``x``."""
    out = x.permute([a for a, _, _ in mapping])
    for b, (a, sign, offset) in enumerate(mapping):
        idx = sign * torch.arange(shape[b], device=x.device) + offset
        inside = (idx >= 0) & (idx < x.shape[a])
        out = out.index_select(b, idx.clamp(0, x.shape[a] - 1))
        view = [1, 1, 1]
        view[b] = -1
        out = out * inside.view(view).to(out.dtype)
    return out


def _scatter(y: Tensor, mapping, shape) -> Tensor:
    """The adjoint of :func:`_gather`: ``y`` (on the lined-up grid) added back onto a zero grid of ``shape``."""
    order = [a for a, _, _ in mapping]
    out = y
    for b in reversed(range(3)):
        a, sign, offset = mapping[b]
        idx = sign * torch.arange(y.shape[b], device=y.device) + offset
        inside = (idx >= 0) & (idx < shape[a])
        view = [1, 1, 1]
        view[b] = -1
        out = out * inside.view(view).to(out.dtype)
        size = list(out.shape)
        size[b] = shape[a]
        out = torch.zeros(size, dtype=out.dtype, device=out.device).index_add_(b, idx.clamp(0, shape[a] - 1), out)
    return out.permute([order.index(k) for k in range(3)])


class _Trilinear:
    """Trilinear reads of a grid of ``source_shape`` at the points ``index_affine @ (i, j, k, 1)`` of a grid of
    ``shape`` (zero outside, as grid_sample with zero padding), with the corner indices and weights computed once,
    so the adjoint is the same eight corners added back (index_add) instead of a differentiated grid_sample."""

    def __init__(self, index_affine: np.ndarray, shape, source_shape):
        points = _grid_points(index_affine, shape).reshape(-1, 3)
        base = torch.floor(points)
        frac = points - base
        base = base.to(torch.int64)
        self.shape, self.source_shape = tuple(shape), tuple(source_shape)
        strides = torch.tensor([source_shape[1] * source_shape[2], source_shape[2], 1])
        # (flat source index, weight) per corner, 8 bytes a point; weight 0 outside the source
        self.corners: list[tuple[Tensor, Tensor]] = []
        for c in np.ndindex(2, 2, 2):
            idx = base + torch.tensor(c)
            w = torch.prod(torch.where(torch.tensor(c, dtype=torch.bool), frac, 1 - frac), dim=1)
            inside = ((idx >= 0) & (idx < torch.tensor(source_shape))).all(1)
            flat = (idx.clamp(min=0) * strides).sum(1).clamp(max=int(np.prod(source_shape)) - 1)
            self.corners.append((flat.to(torch.int32), torch.where(inside, w, 0.0).to(torch.float32)))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1)
        out = cast(Tensor, sum(flat[src] * w.to(x.dtype) for src, w in self.corners))  # 8 corners: a Tensor
        return out.reshape(self.shape)

    def adjoint(self, y: Tensor) -> Tensor:
        flat = y.reshape(-1)
        out = torch.zeros(int(np.prod(self.source_shape)), dtype=y.dtype, device=y.device)
        for src, w in self.corners:
            out.index_add_(0, src, flat * w.to(y.dtype))
        return out.reshape(self.source_shape)


class StackOperator:
    """The forward model from the fused grid to one stack (see the module docstring), with its exact adjoint
    (by automatic differentiation: the operator is linear). ``valid`` marks the stack voxels whose every
    contribution lies inside the fused grid: only those take part in the fit and the residual."""

    def __init__(self, grid_shape, grid_affine: np.ndarray, stack: Stack):
        self.stack, self.grid_shape = stack, tuple(grid_shape)
        vol, a = stack.volume, stack.axis
        self.op: SliceSampling | None = None
        fine_shape, fine_affine = list(vol.shape), vol.affine
        if a is not None:
            spacing = grid_spacing_along(grid_affine, vol.affine[:3, a])
        if a is not None and vol.spacing[a] / spacing >= 1.05:
            m = vol.shape[a]
            kept = max(round(m * vol.spacing[a] / spacing), m)
            _, kept, _ = grid_for_factor(kept, kept / m)
            factor = kept / m
            self.op = SliceSampling((a,), factor, thickness=stack.thickness, profile=stack.profile)
            factors = [1.0, 1.0, 1.0]
            factors[a] = 1.0 / factor
            fine_shape[a] = kept
            fine_affine = rescaled_affine(vol.affine, factors)
        self.fine_shape, self.fine_affine = tuple(fine_shape), fine_affine
        self.to_grid = np.linalg.inv(grid_affine) @ fine_affine  # fine voxel index -> grid voxel index
        self.lined_up = _index_map(self.to_grid)  # grids that line up: exact reads by index, no interpolation
        self.trilinear = None if self.lined_up is not None else _Trilinear(self.to_grid, self.fine_shape, grid_shape)
        inside = _inside(self.to_grid, self.fine_shape, self.grid_shape).to(torch.float64)
        outside = 1 - inside
        if self.op is not None:
            outside = self.op(outside)
        self.valid = outside < 1e-9
        if not bool(self.valid.any()):
            raise MedldmError("no voxel of this stack lies inside the fused field of view", stack.name)

    def forward(self, x: Tensor) -> Tensor:
        if self.lined_up is not None:
            fine = _gather(x, self.lined_up, self.fine_shape)
        else:
            fine = cast(_Trilinear, self.trilinear).forward(x)  # built when the grids do not line up
        return fine if self.op is None else self.op(fine)

    def adjoint(self, y: Tensor) -> Tensor:
        fine = y  # written out: several times faster than differentiating the forward model
        if self.op is not None:  # the transposed slice-profile matrix along the slice axis
            a = cast(int, self.stack.axis)  # self.op is only built along a slice axis
            matrix = self.op.matrix(self.fine_shape[a], device=y.device).to(y.dtype)
            fine = _matmul_along(y, matrix.T, a)
        if self.lined_up is not None:
            return _scatter(fine, self.lined_up, self.grid_shape)
        return cast(_Trilinear, self.trilinear).adjoint(fine)  # built when the grids do not line up

    def data(self, dtype=torch.float64) -> Tensor:
        return torch.from_numpy(self.stack.volume.data).to(dtype)


def _rms_fraction(r: Tensor, y: Tensor, valid: Tensor) -> float:
    """RMS of ``r`` over the valid voxels, as a fraction of the range of ``y`` there."""
    span = float(y[valid].max() - y[valid].min()) or 1.0
    return float(r[valid].pow(2).mean().sqrt()) / span


def joint_consistency(
    x0: Tensor,
    operators: list[StackOperator],
    *,
    iterations: int = ITERATIONS,
    tolerance: float = TOLERANCE,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, list[float]]:
    """CGLS on ``sum_k ||A_k x - y_k||^2`` over each stack's valid voxels, from ``x0``: the least-squares volume
    nearest to ``x0`` after enough iterations. Stops when every stack's RMS residual is below ``tolerance`` of its
    range, or when the largest residual has fallen by less than 1 % over the last 20 iterations (stacks that are not
    exactly consistent, e.g. rounded to float32, level off). Returns the volume and each stack's residual."""
    x = x0.clone()
    ys = [op.data(x.dtype) for op in operators]
    masks = [op.valid.to(x.dtype) for op in operators]
    counts = [float(w.sum()) for w in masks]
    spans = [float(y[op.valid].max() - y[op.valid].min()) or 1.0 for y, op in zip(ys, operators, strict=True)]

    def fractions(r: list[Tensor]) -> list[float]:  # r is zero outside the valid voxels
        return [float(ri.pow(2).sum() / c) ** 0.5 / sp for ri, c, sp in zip(r, counts, spans, strict=True)]

    r = [(y - op.forward(x)) * w for op, y, w in zip(operators, ys, masks, strict=True)]
    # sums of Tensors: operators is not empty (fuse passes two or more)
    s = cast(Tensor, sum(op.adjoint(ri) for op, ri in zip(operators, r, strict=True)))
    p, gamma = s.clone(), float(s.pow(2).sum())
    history = [max(fractions(r))]
    for it in range(iterations):
        if history[-1] < tolerance or gamma == 0 or (len(history) > 20 and history[-1] > 0.99 * history[-21]):
            break
        q = [op.forward(p) * w for op, w in zip(operators, masks, strict=True)]
        alpha = gamma / sum(float(qi.pow(2).sum()) for qi in q)
        x += alpha * p
        r = [ri - alpha * qi for ri, qi in zip(r, q, strict=True)]
        s = cast(Tensor, sum(op.adjoint(ri) for op, ri in zip(operators, r, strict=True)))
        gamma, previous = float(s.pow(2).sum()), gamma
        p = s + (gamma / previous) * p
        history.append(max(fractions(r)))
        if progress is not None:
            progress(it + 1, iterations)
    return x, fractions(r)


@dataclass
class Fusion:
    volume: Volume  # the fused volume on the grid
    residuals: dict[str, float]  # per stack: RMS of degrade(volume) - stack, as a fraction of the stack's range
    prior: str  # what the estimate started from ("bspline" or "model")
    transforms: dict[str, dict] = field(default_factory=dict)  # --register: each moved stack's rigid transform


def _upsampled(stack: Stack, op: StackOperator, prior: str, upscaler) -> np.ndarray:
    """The stack on its fine grid (op.fine_shape): B-spline along the slice axis, or the model's upscale."""
    vol = stack.volume
    if op.op is None:
        return vol.data.astype(np.float64)
    axis = cast(int, stack.axis)  # op.op is only built along a slice axis
    if prior == "bspline":
        factors = [1.0, 1.0, 1.0]
        factors[axis] = op.op.scale
        return interpolate(vol, factors, method="bspline").data.astype(np.float64)
    result = upscaler.upscale(
        vol,
        axis=axis,
        scale=op.op.scale,
        kind="slice-profile",
        thickness=stack.thickness * vol.spacing[axis],
    )
    if result.sr.shape != op.fine_shape:  # the upscaler and this module share medldm.degrade's grid convention
        raise MedldmError(
            f"the model's output grid {result.sr.shape} differs from the stack's {op.fine_shape}", stack.name
        )
    return result.sr.data.astype(np.float64)


def fuse(
    stacks: Sequence[Volume | Stack],
    *,
    spacing: float | None = None,
    like: Volume | None = None,
    prior: str = "model",
    upscaler=None,
    iterations: int = ITERATIONS,
    consistent: bool = True,
    register: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Fusion:
    """Fuse thick-slice ``stacks`` (Volumes or Stacks) of one session into one volume.

    Args:
        spacing: the isotropic output spacing in mm (default: the finest spacing of any stack).
        like: write on exactly this volume's grid instead (its voxels are not used).
        prior: "model" (each stack upscaled by ``upscaler``, a medldm.pipeline.Upscaler) or "bspline" (the
            classical fusion); the stacks' estimates are averaged where they overlap.
        consistent: make the estimate agree with every stack (:func:`joint_consistency`); False keeps the average.
        register: first align every stack rigidly to the first (:func:`medldm.registration.register_stacks`).
    """
    if len(stacks) < 2:
        raise MedldmError("fusion needs at least two stacks")
    if prior not in PRIORS:
        raise MedldmError(f"unknown prior {prior!r}: use one of {', '.join(PRIORS)}")
    stack_list = [s if isinstance(s, Stack) else as_stack(s) for s in stacks]
    kinds = {s.name: guess_modality(s.volume.data, s.volume.meta.get("modality")) for s in stack_list}
    if len(set(kinds.values())) > 1:
        raise MedldmError(
            "the stacks have different modalities: " + ", ".join(f"{name} {kind}" for name, kind in kinds.items())
        )
    transforms: dict[str, dict] = {}
    if register:
        from medldm.registration import register_stacks

        stack_list, transforms = register_stacks(stack_list)
    if like is not None:
        shape, affine = like.shape, like.affine
    else:
        shape, affine = fusion_grid(stack_list, spacing)
    if prior == "model" and upscaler is None:
        raise MedldmError("prior 'model' needs an upscaler (medldm.pipeline.Upscaler)")
    operators = [StackOperator(shape, affine, s) for s in stack_list]
    total = torch.zeros(shape, dtype=torch.float64)
    weight = torch.zeros(shape, dtype=torch.float64)
    for s, op in zip(stack_list, operators, strict=True):
        if progress:
            progress(f"upsampling {s.name} ({prior})")
        fine = torch.from_numpy(_upsampled(s, op, prior, upscaler))
        back = np.linalg.inv(op.to_grid)  # grid voxel index -> fine voxel index
        lined_up = _index_map(back)
        total += (
            _gather(fine, lined_up, shape)
            if lined_up is not None
            else _Trilinear(back, shape, fine.shape).forward(fine)
        )
        weight += _inside(back, shape, op.fine_shape).to(torch.float64)
    x = total / weight.clamp(min=1)
    if consistent:
        if progress:
            progress("joint data consistency")
        x, residuals = joint_consistency(x, operators, iterations=iterations)
    else:
        residuals = [
            _rms_fraction(op.forward(x) * op.valid - op.data() * op.valid, op.data(), op.valid) for op in operators
        ]
    first = stack_list[0].volume
    data = x.numpy().astype(np.float32)
    if kinds[stack_list[0].name] == "CT":
        data = np.clip(data, -1024, max(float(s.volume.data.max()) for s in stack_list))
    out = Volume(data, affine, {k: v for k, v in first.meta.items() if k not in ("slice_thickness", "slice_axis")})
    out.meta["fuse"] = {"stacks": [s.name for s in stack_list], "prior": prior, "consistent": consistent}
    return Fusion(out, {s.name: r for s, r in zip(stack_list, residuals, strict=True)}, prior, transforms)
