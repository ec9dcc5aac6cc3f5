"""Forward models: how a low-resolution (LR) image is made from a high-resolution (HR) one.

One forward model, three users: training makes (HR, LR) pairs with it, the pipeline's data-consistency
step uses its adjoint, and evaluation makes test inputs with it.

Operators act on tensors of shape ``(..., *spatial)`` whose last ``spatial_dims`` (2 or 3) dims are
spatial; an operator's ``axes`` are spatial-axis indices ``0 .. spatial_dims - 1``. They are linear,
batched, differentiable, run on any device and dtype, and are separable: the same 1D operator is applied
along each of ``axes`` in turn.

Sample grid (every operator): LR sample ``m`` along a degraded axis is centred at HR continuous index
``scale * m + (scale - 1) / 2``, the grid of :func:`medldm.volume.rescaled_affine` with factor ``scale``, so
the field of view is kept. Lengths along degraded axes must hold a whole number of LR samples (``n / scale``
an integer). Thick slices also take non-integer factors and a slice thickness that differs from the spacing
(:class:`SliceSampling`); the grid convention for those is in ``docs/grids.md``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medldm.choices import Kind, Profile
from medldm.errors import MedldmError
from medldm.volume import Volume, crop_to_length, crop_to_multiple, rescaled_affine, resolve_axis

__all__ = [
    "KINDS",
    "PROFILES",
    "LinearOperator",
    "ThickSlice",
    "KSpaceTruncation",
    "SliceSampling",
    "grid_for_factor",
    "slice_profile",
    "make_operator",
    "estimate_norm_sq",
    "enforce_consistency",
    "consistency_residual",
    "add_gaussian_noise",
    "add_rician_noise",
    "Degraded",
    "degrade_volume",
    "acquisition_operator",
]

PROFILES = Profile.values()
KINDS = Kind.values()
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
TRUNCATE_SIGMAS = 3.0


# --------------------------------------------------------------------------------------------- base class
class LinearOperator(ABC):
    """A separable linear operator: one 1D operator (:meth:`_apply_1d`) applied along each of ``axes``.

    Subclasses implement ``_apply_1d(x, dim)`` (decimating ``x`` by ``scale`` along tensor dim ``dim``)
    and ``_axis_norm_sq_bound()``; adjoint, pseudo-inverse and norms follow from those.

    Args:
        axes: spatial axes degraded, indices in ``0 .. spatial_dims - 1``.
        scale: decimation factor along each of ``axes`` (integer for every operator but :class:`SliceSampling`).
        spatial_dims: number of trailing spatial dims of the tensors (2 or 3).
    """

    def __init__(self, axes, scale: float, *, spatial_dims: int = 3):
        axes = (axes,) if isinstance(axes, int) else tuple(int(a) for a in axes)
        if spatial_dims not in (2, 3):
            raise MedldmError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not axes or len(set(axes)) != len(axes) or any(not 0 <= a < spatial_dims for a in axes):
            raise MedldmError(f"axes {axes} must be distinct spatial axes in 0..{spatial_dims - 1}")
        if not (math.isfinite(scale) and scale >= 1):
            raise MedldmError(f"scale must be a number >= 1, got {scale}")
        # integral factors stay ints, so records and messages read "x4", not "x4.0"
        scale = int(round(scale)) if abs(scale - round(scale)) < 1e-9 else float(scale)
        self.axes, self.scale, self.spatial_dims = tuple(sorted(axes)), scale, spatial_dims
        self._row_projectors: dict[int, Tensor] = {}  # A^+ A along one axis, by its length (see unseen)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(axes={self.axes}, scale={self.scale}, spatial_dims={self.spatial_dims})"

    @abstractmethod
    def _apply_1d(self, x: Tensor, dim: int) -> Tensor:
        """Decimate ``x`` by ``scale`` along tensor dim ``dim``."""

    @abstractmethod
    def _axis_norm_sq_bound(self) -> float:
        """An upper bound of ``||A_1d||^2`` valid for any length."""

    def _dim(self, axis: int) -> int:
        return axis - self.spatial_dims  # negative tensor dim, whatever the batch dims

    # ----------------------------------------------------------------------------------------- shapes
    def output_shape(self, input_shape) -> tuple[int, ...]:
        """Shape of ``forward(x)`` for ``x`` of shape ``input_shape`` (batch dims pass through)."""
        shape = list(input_shape)
        if len(shape) < self.spatial_dims:
            raise MedldmError(f"shape {tuple(shape)} has fewer than {self.spatial_dims} spatial dims")
        for a in self.axes:
            n = shape[self._dim(a)]
            m = n / self.scale
            if abs(m - round(m)) > 1e-6 or round(m) < 1:
                raise MedldmError(f"spatial axis {a} has length {n}, not a multiple of the scale {self.scale:g}")
            shape[self._dim(a)] = int(round(m))
        return tuple(shape)

    def input_shape(self, output_shape) -> tuple[int, ...]:
        """Shape of ``adjoint(y)`` for ``y`` of shape ``output_shape``."""
        shape = list(output_shape)
        if len(shape) < self.spatial_dims:
            raise MedldmError(f"shape {tuple(shape)} has fewer than {self.spatial_dims} spatial dims")
        for a in self.axes:
            shape[self._dim(a)] = int(round(shape[self._dim(a)] * self.scale))
        return tuple(shape)

    def factors(self, spatial_dims: int | None = None) -> tuple[float, ...]:
        """Per-axis spacing factors for :func:`medldm.volume.rescaled_affine`: ``scale`` on degraded axes."""
        n = self.spatial_dims if spatial_dims is None else spatial_dims
        return tuple(float(self.scale) if a in self.axes else 1.0 for a in range(n))

    # -------------------------------------------------------------------------------------- operators
    def forward(self, x: Tensor) -> Tensor:
        """Degrade ``x`` of shape ``(..., *spatial)``."""
        self.output_shape(x.shape)  # validates
        for a in self.axes:
            x = self._apply_1d(x, self._dim(a))
        return x

    __call__ = forward

    def adjoint(self, y: Tensor) -> Tensor:
        """Exact adjoint ``A^T y`` (the vector-Jacobian product of :meth:`forward`); differentiable in
        ``y`` and usable under ``torch.no_grad()``."""
        zeros = y.new_zeros(self.input_shape(y.shape))
        vjp = torch.func.vjp(self.forward, zeros)[1]  # (output, vjp_fn)
        return vjp(y)[0]

    def back_project(self, y: Tensor) -> Tensor:
        """Moore-Penrose pseudo-inverse ``A^T (A A^T)^-1 y``: the minimum-norm HR image with
        ``forward(back_project(y)) == y`` (to rounding). ``A A^T`` is inverted axis by axis (a small
        LR-length matrix per axis). Boxcar: block replication; k-space: zero-filled sinc interpolation."""
        self.input_shape(y.shape)  # validates
        for a in self.axes:
            dim = self._dim(a)
            gram = self._gram(int(round(y.shape[dim] * self.scale)), device=y.device)
            y = _matmul_along(y, torch.linalg.inv(gram).to(y.dtype), dim)
        return self.adjoint(y)

    def unseen(self, x: Tensor) -> Tensor:
        """``x - A^+ A x``: the part of ``x`` that the acquisition cannot see (its null-space component), which is
        all that the data-consistency projection keeps of an estimate's error. Differentiable in ``x``. ``A^+ A``
        of a separable operator is the product of the per-axis projectors, each an (n, n) matrix kept per length:
        a training loss calls this on every patch, and forming them anew cost as much as the network's step."""
        self.output_shape(x.shape)  # validates
        seen = x
        for a in self.axes:
            dim = self._dim(a)
            seen = _matmul_along(seen, self._row_projector(x.shape[dim]).to(device=x.device, dtype=x.dtype), dim)
        return x - seen

    def _row_projector(self, n: int) -> Tensor:
        """``A^+ A`` of the 1D operator on ``n`` samples: the orthogonal projector onto its row space (float64)."""
        if n not in self._row_projectors:
            a = self.matrix(n)
            self._row_projectors[n] = a.T @ torch.linalg.solve(a @ a.T, a)
        return self._row_projectors[n]

    def matrix(self, n: int, *, device=None) -> Tensor:
        """The 1D operator along one axis of ``n`` samples, as an ``(n / scale, n)`` float64 matrix."""
        eye = torch.eye(n, dtype=torch.float64, device=device)
        return self._apply_1d(eye, -1).T

    def _gram(self, n: int, *, device=None) -> Tensor:
        a = self.matrix(n, device=device)
        return a @ a.T

    def norm_sq(self, spatial_shape=None) -> float:
        """``||A||^2``, for a step ``1 / norm_sq()`` in ``x + step * A^T (y - A x)``.

        Args:
            spatial_shape: the input's spatial shape: gives the exact value (product over axes of the
                largest eigenvalue of the 1D ``A A^T``). Without it: an upper bound valid for any size
                (``1 / scale`` per axis for boxcar and k-space, which is exact; for the Gaussian profile
                a Schur-test bound, 1 % (scale 2) to 40 % (scale 8) above the exact value because
                replicate padding piles weight on the edge voxels).
        """
        if spatial_shape is None:
            return self._axis_norm_sq_bound() ** len(self.axes)
        spatial = tuple(spatial_shape)[-self.spatial_dims :]
        self.output_shape(spatial)  # validates
        return math.prod(float(torch.linalg.eigvalsh(self._gram(spatial[a])).max()) for a in self.axes)


def _matmul_along(x: Tensor, matrix: Tensor, dim: int) -> Tensor:
    """Apply ``matrix`` (out x in) to the vectors of ``x`` along ``dim``."""
    return (x.movedim(dim, -1) @ matrix.T).movedim(-1, dim)


# -------------------------------------------------------------------------------------- slice profile
def slice_profile(scale: int, *, profile: str = "gaussian", dtype=torch.float64, device=None) -> tuple[Tensor, Tensor]:
    """Slice profile sampled on the HR grid, centred on an LR sample.

    Gaussian: FWHM = ``scale`` HR voxels (sigma = scale / (2 sqrt(2 ln 2))), sampled at the offsets from
    the LR sample centre (half-integers for even ``scale``), truncated at ~3 sigma. Boxcar: the ``scale``
    voxels of the block, equal weights. Both sum to 1.

    Args:
        scale: decimation factor (the slice thickness in HR voxels).
        profile: "gaussian" or "boxcar".

    Returns:
        ``(offsets, weights)``: offsets in HR voxels from the LR sample centre, symmetric, and the weights.
        The number of taps is ``scale + 2 * pad`` with ``pad`` extra taps beyond each end of the block.
    """
    if profile not in PROFILES:
        raise MedldmError(f"unknown slice profile {profile!r}: use one of {', '.join(PROFILES)}")
    half = (scale - 1) / 2
    if profile == "boxcar":
        offsets = torch.arange(scale, dtype=dtype, device=device) - half
        return offsets, torch.full_like(offsets, 1.0 / scale)
    sigma = scale * FWHM_TO_SIGMA
    pad = max(0, math.ceil(TRUNCATE_SIGMAS * sigma - half))
    offsets = torch.arange(scale + 2 * pad, dtype=dtype, device=device) - pad - half
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return offsets, weights / weights.sum()


class ThickSlice(LinearOperator):
    """Slice profile + decimation: convolve with the profile along each of ``axes`` then keep every
    ``scale``-th sample, so LR sample ``m`` is centred at HR index ``scale * m + (scale - 1) / 2``.

    Along one axis this makes thick slices; along the in-plane axes it is "blur + decimate" (see
    :func:`make_operator`). Borders: replicate padding (the edge voxel is repeated), so a constant image
    stays constant. The boxcar profile is the mean of each block of ``scale`` voxels (no padding).

    Args:
        axes: spatial axes degraded, indices in ``0 .. spatial_dims - 1``.
        scale: integer decimation factor (slice thickness in HR voxels).
        profile: "gaussian" (FWHM = scale) or "boxcar".
        spatial_dims: number of trailing spatial dims (2 or 3).
    """

    scale: int  # _require_integer

    def __init__(self, axes, scale: float, *, profile: str = "gaussian", spatial_dims: int = 3):
        super().__init__(axes, scale, spatial_dims=spatial_dims)
        _require_integer(self)
        offsets, _ = slice_profile(self.scale, profile=profile)  # validates the profile
        self.profile = profile
        self.pad = (len(offsets) - self.scale) // 2

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", profile={self.profile!r})"

    def _apply_1d(self, x: Tensor, dim: int) -> Tensor:
        _, kernel = slice_profile(self.scale, profile=self.profile, dtype=x.dtype, device=x.device)
        x = x.movedim(dim, -1)
        batch = x.shape[:-1]
        flat = x.reshape(-1, 1, x.shape[-1])
        if self.pad:
            flat = F.pad(flat, (self.pad, self.pad), mode="replicate")
        out = F.conv1d(flat, kernel.view(1, 1, -1), stride=self.scale)  # symmetric kernel: no flip needed
        return out.reshape(*batch, -1).movedim(-1, dim)

    def _axis_norm_sq_bound(self) -> float:
        if self.profile == "boxcar":
            return 1.0 / self.scale
        # Schur test: ||A||^2 <= max row sum * max column sum of |A|, on an axis long enough that both
        # borders are present but do not interact (shorter axes fold fewer taps onto a border voxel).
        taps = self.scale + 2 * self.pad
        a = self.matrix(self.scale * (2 * math.ceil(taps / self.scale) + 2)).abs()
        return float(a.sum(1).max() * a.sum(0).max())


def _require_integer(op: LinearOperator) -> None:
    if not isinstance(op.scale, int):
        raise MedldmError(
            f"{type(op).__name__} needs an integer factor, got {op.scale:g} (non-integer factors: thick slices only)"
        )


class SliceSampling(LinearOperator):
    """Thick slices at any factor, with a slice thickness that may differ from the slice spacing (gaps or
    overlap). LR sample ``m`` is the slice profile centred at HR continuous index ``scale * m + (scale - 1) / 2``
    (the common grid of every operator), ``thickness * scale`` HR voxels wide: Gaussian with that FWHM, sampled
    at the HR voxel centres within 3 sigma (plus one voxel); boxcar integrated exactly over each HR voxel. Weights
    that fall past an end go to the edge voxel (replicate padding, as :class:`ThickSlice`), and each row sums to 1.
    With an integer factor and thickness 1 it is the matrix of :class:`ThickSlice` (which does the same by
    convolution, faster).

    Args:
        axes: spatial axes degraded.
        scale: the factor, any number >= 1: LR spacing / HR spacing. An axis of ``n`` HR voxels must hold a whole
            number of LR samples (see :func:`grid_for_factor`).
        thickness: slice thickness in units of the LR slice spacing (1: contiguous slices; below 1: gaps; above 1:
            overlap).
        profile: "gaussian" or "boxcar".
    """

    def __init__(self, axes, scale: float, *, thickness: float = 1.0, profile: str = "gaussian", spatial_dims: int = 3):
        super().__init__(axes, scale, spatial_dims=spatial_dims)
        if profile not in PROFILES:
            raise MedldmError(f"unknown slice profile {profile!r}: use one of {', '.join(PROFILES)}")
        if not (math.isfinite(thickness) and 0.05 <= thickness <= 8):
            raise MedldmError(f"the slice thickness must lie between 0.05 and 8 times the spacing, got {thickness}")
        self.thickness, self.profile = float(thickness), profile
        self._cache: dict[int, Tensor] = {}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", thickness={self.thickness:g}, profile={self.profile!r})"

    def _weights(self, n: int, m: int) -> Tensor:
        """The (m, n) float64 matrix with LR centres at ``scale * k + (scale - 1) / 2``."""
        centres = self.scale * np.arange(m) + (self.scale - 1) / 2
        width = self.thickness * self.scale  # in HR voxels
        if self.profile == "gaussian":
            sigma = width * FWHM_TO_SIGMA
            reach = TRUNCATE_SIGMAS * sigma + 1.0  # ThickSlice's taps, for integer factors
        else:
            reach = width / 2 + 0.5
        j = np.arange(math.floor(centres[0] - reach), math.ceil(centres[-1] + reach) + 1)
        offsets = j[None, :] - centres[:, None]
        if self.profile == "gaussian":
            w = np.where(np.abs(offsets) < reach, np.exp(-0.5 * (offsets / sigma) ** 2), 0.0)
        else:  # overlap of the voxel [j - 1/2, j + 1/2] with the slab [c - w/2, c + w/2]
            w = np.clip(np.minimum(offsets + 0.5, width / 2) - np.maximum(offsets - 0.5, -width / 2), 0.0, None)
        w /= w.sum(1, keepdims=True)
        out = np.zeros((m, n))
        np.add.at(out.T, np.clip(j, 0, n - 1), w.T)  # past either end: onto the edge voxel
        return torch.from_numpy(out)

    def matrix(self, n: int, *, device=None) -> Tensor:
        if n not in self._cache:
            m = self.output_shape((n,) * self.spatial_dims)[self._dim(self.axes[0])]
            self._cache[n] = self._weights(n, m)
        return self._cache[n].to(device)

    def _apply_1d(self, x: Tensor, dim: int) -> Tensor:
        return _matmul_along(x, self.matrix(x.shape[dim], device=x.device).to(x.dtype), dim)

    def _axis_norm_sq_bound(self) -> float:
        # Schur test on an axis long enough that both borders are present but do not interact
        m = 2 * math.ceil((self.thickness * self.scale * 2 + 8) / self.scale) + 4
        a = self._weights(math.ceil(self.scale * m), m).abs()
        return float(a.sum(1).max() * a.sum(0).max())


def grid_for_factor(n: int, scale: float) -> tuple[int, int, float]:
    """The grid convention for a factor ``scale`` on an axis of ``n`` fine voxels, when they must be cut down
    to hold whole coarse samples: ``(coarse count m, fine count kept N, exact factor N / m)`` with
    ``m = floor(n / scale)`` and ``N = round(m * scale)``. Integer factors keep ``N = m * scale``; a factor like
    5.5 with an odd ``m`` gives ``N / m`` within ``0.5 / m`` of it (docs/grids.md)."""
    m = int(math.floor(n / scale + 1e-9))
    if m < 1:
        raise MedldmError(f"an axis of {n} voxels is shorter than the factor {scale:g}")
    kept = int(round(m * scale))
    return m, kept, kept / m


# -------------------------------------------------------------------------------------------- k-space
class KSpaceTruncation(LinearOperator):
    """MRI low-resolution acquisition: keep the central ``n / scale`` frequencies along each of ``axes``.

    Along an axis of ``n`` samples (``m = n / scale``): FFT, phase ramp, crop to the central ``m``
    frequencies, inverse FFT of length ``m``, real part, times ``1 / scale`` (so a constant is kept, and the
    LR mean equals the HR mean exactly).

    Sample grid: a plain crop samples the band-limited image at HR index ``scale * m``; multiplying
    frequency ``k`` by ``exp(2 pi i k c / n)`` with ``c = (scale - 1) / 2`` first shifts it to
    ``scale * m + c``, the grid of :func:`medldm.volume.rescaled_affine`.

    Nyquist: for even ``m`` the LR Nyquist bin takes the mean of the two HR bins ``+m/2`` and ``-m/2`` (each
    with its own phase), i.e. half of each Nyquist component of the band-limited interpolant. This keeps
    the operator real-linear (the LR spectrum stays Hermitian) and symmetric (reversing the HR axis
    reverses the LR one), and reproduces every frequency below ``m / 2`` exactly; a cosine at the LR
    Nyquist frequency comes out at half amplitude. ``||A||^2 = 1 / scale`` per axis.

    Args:
        axes: spatial axes degraded (in-plane axes), indices in ``0 .. spatial_dims - 1``.
        scale: integer decimation factor.
        spatial_dims: number of trailing spatial dims (2 or 3).
    """

    scale: int  # _require_integer

    def __init__(self, axes, scale: float, *, spatial_dims: int = 3):
        super().__init__(axes, scale, spatial_dims=spatial_dims)
        _require_integer(self)

    def _apply_1d(self, x: Tensor, dim: int) -> Tensor:
        n, s = x.shape[dim], self.scale
        m = n // s
        spec = torch.fft.fft(x, dim=dim)
        low = torch.fft.fftfreq(m, 1.0 / m, device=x.device).round().long()  # signed LR frequencies
        high = low.clone()
        if m % 2 == 0:
            high[m // 2] = m // 2  # the LR Nyquist bin (-m/2) also takes its +m/2 twin
        trailing = [1] * (-dim - 1)

        def pick(freq: Tensor) -> Tensor:
            phase = torch.exp(2j * math.pi * (s - 1) / 2 / n * freq.double()).to(spec.dtype)
            return spec.index_select(dim, freq % n) * phase.view(-1, *trailing)

        kept = 0.5 * (pick(low) + pick(high))
        return torch.fft.ifft(kept, dim=dim).real / s

    def _axis_norm_sq_bound(self) -> float:
        return 1.0 / self.scale


# -------------------------------------------------------------------------------------------- factory
def make_operator(
    kind: str,
    *,
    axis: int | None,
    scale: float,
    spatial_dims: int = 3,
    profile: str = "gaussian",
    thickness: float = 1.0,
) -> LinearOperator:
    """Operator for a CLI/config degradation kind.

    ``axis`` always names the slice (through-plane) axis; the in-plane axes are the others (in 2D both
    axes are in-plane and ``axis`` is ignored by the in-plane kinds).

    - "slice-profile": thick slices along ``axis``: :class:`ThickSlice` for integer factors and contiguous
      slices, else :class:`SliceSampling`.
    - "kspace": :class:`KSpaceTruncation` over the in-plane axes.
    - "blur": blur + decimate, :class:`ThickSlice` over the in-plane axes.

    Args:
        kind: one of :data:`KINDS`.
        axis: slice axis, a spatial-axis index (required for "slice-profile" and for 3D).
        scale: decimation factor (integer for the in-plane kinds).
        spatial_dims: 2 or 3.
        profile: slice profile of the ThickSlice kinds, "gaussian" (FWHM = scale) or "boxcar".
        thickness: "slice-profile": slice thickness / slice spacing (1: contiguous slices).
    """
    if kind not in KINDS:
        raise MedldmError(f"unknown degradation {kind!r}: use one of {', '.join(KINDS)}")
    if axis is None and (kind == "slice-profile" or spatial_dims == 3):
        raise MedldmError(f"degradation {kind!r} needs the slice axis")
    if axis is not None and not 0 <= axis < spatial_dims:
        raise MedldmError(f"axis {axis} is not a spatial axis in 0..{spatial_dims - 1}")
    in_plane = tuple(a for a in range(spatial_dims) if spatial_dims == 2 or a != axis)
    if kind == "slice-profile":
        if abs(scale - round(scale)) < 1e-9 and abs(thickness - 1.0) < 1e-9:
            return ThickSlice((axis,), round(scale), profile=profile, spatial_dims=spatial_dims)
        return SliceSampling((axis,), scale, thickness=thickness, profile=profile, spatial_dims=spatial_dims)
    if abs(thickness - 1.0) > 1e-9:
        raise MedldmError(f"a slice thickness applies to thick slices, not to {kind!r}")
    if kind == "kspace":
        return KSpaceTruncation(in_plane, scale, spatial_dims=spatial_dims)
    return ThickSlice(in_plane, scale, profile=profile, spatial_dims=spatial_dims)


def estimate_norm_sq(op: LinearOperator, shape, *, iters: int = 100, generator=None) -> float:
    """Power-iteration estimate (from below) of ``||A||^2`` on inputs of ``shape``, in float64."""
    x = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
    value = 0.0
    for _ in range(iters):
        x = x / x.norm()
        x = op.adjoint(op.forward(x))
        value = float(x.norm())
    return value


# ------------------------------------------------------------------------------------- data consistency
CHUNK_VOXELS = 2 << 20  # float64 working set of the consistency functions: 16 MiB


def _slabs(x: Tensor, op: LinearOperator, chunk_voxels: int) -> list[tuple[int, int, int]]:
    """Slabs ``(axis, start, length)`` of about ``chunk_voxels`` voxels across an axis the operator leaves alone:
    the operators are separable, so they act on each slab exactly as on the whole volume, and the float64 work
    never needs a whole volume in memory."""
    axis = next(d for d in range(x.dim()) if d not in op.axes)
    step = max(1, chunk_voxels // max(1, x.numel() // x.shape[axis]))
    return [(axis, start, min(step, x.shape[axis] - start)) for start in range(0, x.shape[axis], step)]


def enforce_consistency(
    x: Tensor, y: Tensor, op: LinearOperator, *, strength: float = 1.0, chunk_voxels: int = CHUNK_VOXELS
) -> Tensor:
    """Add the pseudo-inverse of the LR residual to the HR volume ``x``, in place, slab by slab in float64:
    ``x + strength * A^+ (y - A x)``. With strength 1, ``op.forward(x)`` then equals ``y`` exactly and only the
    part of ``x`` that the acquisition cannot see is kept. ``x``: (*spatial) HR, ``y``: the LR volume."""
    if strength == 0:
        return x
    for axis, start, n in _slabs(x, op, chunk_voxels):
        part, low = x.narrow(axis, start, n), y.narrow(axis, start, n).double()
        fixed = part.double()
        fixed += strength * op.back_project(low - op.forward(fixed))
        part.copy_(fixed)
    return x


def consistency_residual(x: Tensor, y: Tensor, op: LinearOperator, *, chunk_voxels: int = CHUNK_VOXELS) -> float:
    """RMS of ``op.forward(x) - y`` over the LR voxels, computed slab by slab in float64."""
    total = 0.0
    for axis, start, n in _slabs(x, op, chunk_voxels):
        diff = op.forward(x.narrow(axis, start, n).double()) - y.narrow(axis, start, n).double()
        total += float(diff.pow(2).sum())
    return (total / y.numel()) ** 0.5


# ---------------------------------------------------------------------------------------------- noise
def add_gaussian_noise(x: Tensor, sigma: float, *, generator: torch.Generator | None = None) -> Tensor:
    """``x`` plus white Gaussian noise of standard deviation ``sigma`` (CT-like, may go negative)."""
    return x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def add_rician_noise(x: Tensor, sigma: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Magnitude of ``x`` plus complex white Gaussian noise (sigma per channel): MRI magnitude noise, >= 0."""
    real = add_gaussian_noise(x, sigma, generator=generator)
    imag = add_gaussian_noise(torch.zeros_like(x), sigma, generator=generator)
    return torch.sqrt(real**2 + imag**2)


# --------------------------------------------------------------------------------------------- volumes
class Degraded(NamedTuple):
    """Result of :func:`degrade_volume`: ``lr`` the degraded volume, ``hr`` the input cropped to hold whole LR
    samples (the ground truth on the same field of view as ``lr``)."""

    lr: Volume
    hr: Volume


def degrade_volume(
    volume: Volume,
    *,
    kind: str,
    axis: str | int = "z",
    scale: float = 4,
    profile: str = "gaussian",
    noise: float = 0.0,
    seed: int = 0,
    thickness: float = 1.0,
) -> Degraded:
    """Make an LR volume with exact geometry from an HR one.

    The degraded axes are cropped (fewest voxels, split between both ends) to hold whole LR samples: a multiple
    of an integer ``scale``; for other factors :func:`grid_for_factor` (the exact factor used, recorded as
    ``scale``, is then within ``0.5 / m`` of the one asked for). The LR affine is
    ``rescaled_affine(hr.affine, op.factors(3))``, so ``lr`` and ``hr`` share their field of view.
    ``lr.meta["degrade"]`` records ``kind``, ``axis`` (voxel index), ``scale``, ``thickness``, ``profile``,
    ``noise`` and ``cropped_from`` (the input shape). Computed in float64 on the CPU.

    Args:
        volume: HR input.
        kind: "slice-profile", "kspace" or "blur" (see :func:`make_operator`).
        axis: slice axis, any name :func:`medldm.volume.resolve_axis` accepts ("x", "y", "z", "i", 0, "auto").
        scale: decimation factor; non-integer for thick slices only.
        thickness: thick slices: slice thickness / slice spacing (1: contiguous; below 1: gaps).
        profile: "gaussian" or "boxcar" for the ThickSlice kinds.
        noise: Rician noise sigma as a fraction of the HR 99th-percentile intensity (0: none).
        seed: noise seed; the same seed gives the same output.
    """
    if not 0 <= noise < float("inf"):  # also refuses NaN
        raise MedldmError(f"noise must be a finite number >= 0, got {noise}")
    voxel_axis = resolve_axis(volume, axis)
    op = make_operator(kind, axis=voxel_axis, scale=scale, spatial_dims=3, profile=profile, thickness=thickness)
    hr = volume
    if not isinstance(op.scale, int):  # one thick axis: the exact factor follows from the lengths kept
        _, kept, exact = grid_for_factor(hr.shape[voxel_axis], op.scale)
        hr = crop_to_length(hr, voxel_axis, kept)
        op = make_operator(kind, axis=voxel_axis, scale=exact, spatial_dims=3, profile=profile, thickness=thickness)
    for a in op.axes:
        if isinstance(op.scale, int):
            hr = crop_to_multiple(hr, a, op.scale)
    with torch.no_grad():
        lr = op(torch.from_numpy(hr.data).to(torch.float64))
        if noise > 0:
            sigma = noise * float(np.percentile(hr.data, 99))
            lr = add_rician_noise(lr, sigma, generator=torch.Generator().manual_seed(int(seed)))
    record = {
        "kind": kind,
        "axis": voxel_axis,
        "scale": op.scale,
        "thickness": float(thickness),
        "profile": profile,
        "noise": float(noise),
        "cropped_from": volume.shape,
    }
    return Degraded(hr.with_data(lr.numpy(), rescaled_affine(hr.affine, op.factors(3)), degrade=record), hr)


def acquisition_operator(lr: Volume) -> LinearOperator:
    """The forward model that made ``lr`` from its truth, as :func:`degrade_volume` recorded it in
    ``lr.meta["degrade"]`` (the exact factor, the profile and the thickness it used)."""
    record = lr.meta["degrade"]
    return make_operator(
        record["kind"],
        axis=record["axis"],
        scale=record["scale"],
        profile=record["profile"],
        thickness=record["thickness"],
    )
