"""Forward models: adjointness, sample grid, profiles, pseudo-inverse, norms, noise, volumes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medldm.degrade import (
    KSpaceTruncation,
    ThickSlice,
    acquisition_operator,
    add_gaussian_noise,
    add_rician_noise,
    degrade_volume,
    estimate_norm_sq,
    make_operator,
    slice_profile,
)
from medldm.errors import MedldmError
from medldm.volume import Volume, face_corners, load, resolve_axis

OPERATORS = [
    ThickSlice((0,), 2, spatial_dims=2),
    ThickSlice((1,), 3, profile="boxcar", spatial_dims=2),
    ThickSlice((0, 1), 4, spatial_dims=2),
    KSpaceTruncation((0, 1), 2, spatial_dims=2),
    KSpaceTruncation((1,), 3, spatial_dims=2),
    ThickSlice((2,), 4, spatial_dims=3),
    ThickSlice((0,), 5, profile="boxcar", spatial_dims=3),
    ThickSlice((0, 2), 2, spatial_dims=3),
    KSpaceTruncation((0, 1), 4, spatial_dims=3),
    KSpaceTruncation((1, 2), 2, spatial_dims=3),
]


def _shape(op, other: int = 5, batch=(2,)) -> tuple[int, ...]:
    """A test shape: 6 LR samples along degraded axes (7 for scale 4: odd, no Nyquist bin in k-space)."""
    length = op.scale * (7 if op.scale == 4 else 6)
    return (*batch, *(length if a in op.axes else other for a in range(op.spatial_dims)))


def _along(values: torch.Tensor, axis: int, spatial_dims: int) -> torch.Tensor:
    """A 1D profile laid along spatial ``axis`` of a ``spatial_dims`` tensor (size 1 elsewhere)."""
    shape = [1] * spatial_dims
    shape[axis] = -1
    return values.reshape(shape)


@pytest.fixture(scope="module")
def ixi(ixi_path) -> Volume:
    return load(ixi_path)


# ------------------------------------------------------------------------------------------- adjoints
@pytest.mark.parametrize("op", OPERATORS, ids=repr)
def test_adjoint_is_exact(op):
    gen = torch.Generator().manual_seed(0)
    shape = _shape(op)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = torch.randn(op.output_shape(shape), generator=gen, dtype=torch.float64)
    lhs, rhs = (op(x) * y).sum(), (x * op.adjoint(y)).sum()
    assert abs(float(lhs - rhs)) < 1e-12 * float(x.norm() * y.norm())
    assert op.adjoint(y).shape == shape


@pytest.mark.parametrize("scale", [2, 3])
def test_boxcar_adjoint_is_block_replication(scale):
    op = ThickSlice((1,), scale, profile="boxcar", spatial_dims=2)
    y = torch.randn(3, 5, dtype=torch.float64)
    expected = torch.repeat_interleave(y, scale, dim=1) / scale
    torch.testing.assert_close(op.adjoint(y), expected, rtol=0, atol=1e-14)


def test_adjoint_is_differentiable_and_works_under_no_grad():
    op = ThickSlice((0,), 2, spatial_dims=2)
    y = torch.randn(4, 3, requires_grad=True)
    op.adjoint(y).square().sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    with torch.no_grad():
        assert op.adjoint(torch.randn(4, 3)).shape == (8, 3)


# -------------------------------------------------------------------------------------- known values
def test_boxcar_gives_exact_block_means():
    x = torch.arange(4 * 6 * 5, dtype=torch.float64).reshape(4, 6, 5) ** 1.5
    y = ThickSlice((1,), 3, profile="boxcar")(x)
    expected = x.numpy().reshape(4, 2, 3, 5).mean(axis=2)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-14)


@pytest.mark.parametrize("scale", [1, 2, 3, 4, 5, 8])
def test_gaussian_profile_has_fwhm_scale_and_unit_sum(scale):
    offsets, weights = slice_profile(scale)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-14)
    torch.testing.assert_close(offsets, -offsets.flip(0), rtol=0, atol=0)  # centred on the LR sample
    assert np.allclose(offsets.numpy() % 1, 0.5 if scale % 2 == 0 else 0.0)  # half-integers for even scales
    sigma = scale / (2 * math.sqrt(2 * math.log(2)))
    assert float(offsets.max()) >= 3 * sigma and float(offsets.max()) < 3 * sigma + 1.5
    # the samples lie on one Gaussian A exp(-d^2 / (2 s^2)); find A and s and read off its half maximum
    slope, log_peak = np.polyfit(offsets.numpy() ** 2, np.log(weights.numpy()), 1)
    half = np.exp(log_peak + slope * (scale / 2) ** 2)
    assert half == pytest.approx(0.5 * np.exp(log_peak), rel=1e-9)


def test_boxcar_profile():
    offsets, weights = slice_profile(4, profile="boxcar")
    assert offsets.tolist() == [-1.5, -0.5, 0.5, 1.5]
    assert weights.tolist() == [0.25] * 4


@pytest.mark.parametrize("op", OPERATORS, ids=repr)
def test_constant_stays_constant(op):
    y = op(torch.full(_shape(op), 7.25, dtype=torch.float64))
    torch.testing.assert_close(y, torch.full_like(y, 7.25), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- sample grid
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("profile", ["gaussian", "boxcar"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_thick_slice_samples_ramp_at_block_centres(spatial_dims, profile, scale):
    n = 12 * scale
    for axis in range(spatial_dims):
        op = ThickSlice((axis,), scale, profile=profile, spatial_dims=spatial_dims)
        shape = [3] * spatial_dims
        shape[axis] = n
        ramp = _along(torch.arange(n, dtype=torch.float64), axis, spatial_dims).expand(shape)
        y = op(ramp).movedim(axis, 0).reshape(n // scale, -1)
        centres = scale * torch.arange(n // scale, dtype=torch.float64) + (scale - 1) / 2
        edge = math.ceil(op.pad / scale) + 1  # replicate padding bends the ramp near the borders
        inner = slice(edge, n // scale - edge)
        torch.testing.assert_close(y[inner], centres[inner, None].expand_as(y[inner]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("m", [6, 7])  # even / odd LR length: with / without a Nyquist bin
def test_kspace_samples_low_frequency_cosine_on_rescaled_grid(scale, m):
    n = m * scale
    t = torch.arange(n, dtype=torch.float64)
    lr = scale * torch.arange(m, dtype=torch.float64) + (scale - 1) / 2
    for freq in range(0, (m + 1) // 2):  # every frequency below the LR Nyquist
        cos_i, cos_j = (torch.cos(2 * math.pi * freq * t / n + 0.3), torch.cos(2 * math.pi * 1 * t / n - 1.1))
        x = cos_i[:, None] * cos_j[None, :]
        y = KSpaceTruncation((0, 1), scale, spatial_dims=2)(x)
        expected = torch.cos(2 * math.pi * freq * lr / n + 0.3)[:, None] * torch.cos(2 * math.pi * lr / n - 1.1)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


def test_kspace_nyquist_cosine_is_halved():
    scale, m = 2, 8
    n = scale * m
    t = torch.arange(n, dtype=torch.float64)
    x = torch.cos(math.pi * (t - (scale - 1) / 2) / scale)  # +-1 at the LR sample positions
    y = KSpaceTruncation((0,), scale, spatial_dims=2)(x[:, None])[:, 0]
    torch.testing.assert_close(y, 0.5 * (-1.0) ** torch.arange(m, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", OPERATORS, ids=repr)
def test_reversing_hr_axes_reverses_lr_axes(op):
    """The LR grid is symmetric in the HR field of view, and the Nyquist bin is split symmetrically."""
    x = torch.randn(_shape(op), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dims = [a - op.spatial_dims for a in range(op.spatial_dims)]
    torch.testing.assert_close(op(x.flip(dims)), op(x).flip(dims), rtol=0, atol=1e-12)


def test_kspace_is_shift_equivariant_by_scale():
    op = KSpaceTruncation((0,), 3, spatial_dims=2)
    x = torch.randn(24, 5, dtype=torch.float64)
    torch.testing.assert_close(op(x.roll(3, 0)), op(x).roll(1, 0), rtol=0, atol=1e-12)


# -------------------------------------------------------------------------------- inverse, norms, DC
@pytest.mark.parametrize("op", OPERATORS, ids=repr)
def test_back_project_is_the_pseudo_inverse(op):
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(op.output_shape(_shape(op)), generator=gen, dtype=torch.float64)
    x = op.back_project(y)
    torch.testing.assert_close(op(x), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(op.back_project(op(x)), x, rtol=0, atol=1e-10)  # minimum norm: in range(A^T)


@pytest.mark.parametrize(
    "op", [*OPERATORS, make_operator("slice-profile", axis=1, scale=2.5, thickness=1.4, spatial_dims=2)], ids=repr
)
def test_unseen_is_the_null_space_part(op):
    """unseen(x) = x - A^+ A x (the error the data-consistency projection keeps), with its projectors kept between
    calls: invisible to the acquisition, and what is left of x once its seen part is restored."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):  # the second call uses the kept projectors
        x = torch.randn(tuple(int(n) for n in _shape(op)), generator=gen, dtype=torch.float64)
        unseen = op.unseen(x)
        torch.testing.assert_close(op(unseen), torch.zeros_like(op(x)), rtol=0, atol=1e-10)
        torch.testing.assert_close(unseen, x - op.back_project(op(x)), rtol=0, atol=1e-10)


def test_back_project_of_boxcar_replicates_blocks_and_keeps_float32():
    op = ThickSlice((0,), 4, profile="boxcar", spatial_dims=2)
    y = torch.randn(3, 2)
    x = op.back_project(y)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, torch.repeat_interleave(y, 4, dim=0))


@pytest.mark.parametrize("op", OPERATORS, ids=repr)
def test_norm_sq_exact_and_bound(op):
    shape = _shape(op, other=2, batch=())
    exact = op.norm_sq(shape)
    eye = torch.eye(math.prod(shape), dtype=torch.float64).reshape(-1, *shape)
    dense = op(eye).reshape(len(eye), -1)  # the whole operator as a matrix, transposed
    assert exact == pytest.approx(float(torch.linalg.eigvalsh(dense.T @ dense).max()), rel=1e-9)
    estimate = estimate_norm_sq(op, shape, iters=30, generator=torch.Generator().manual_seed(3))
    assert 0.95 * exact < estimate <= exact * (1 + 1e-9)
    assert op.norm_sq() >= exact * (1 - 1e-12)
    if isinstance(op, KSpaceTruncation) or op.profile == "boxcar":
        assert op.norm_sq() == pytest.approx(op.scale ** -len(op.axes), rel=1e-12)
        assert exact == pytest.approx(op.scale ** -len(op.axes), rel=1e-9)


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_gaussian_bound_holds_for_every_length(scale):
    op = ThickSlice((0,), scale, spatial_dims=2)
    assert max(op.norm_sq((k * scale, 1)) for k in range(1, 16)) <= op.norm_sq()


@pytest.mark.parametrize("op", OPERATORS, ids=repr)
@pytest.mark.parametrize("exact", [False, True])
def test_data_consistency_iteration_converges_monotonically(op, exact):
    gen = torch.Generator().manual_seed(4)
    shape = _shape(op, batch=())
    y = op(torch.rand(shape, generator=gen, dtype=torch.float64))
    y = y + 0.01 * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    step = 1.0 / (op.norm_sq(shape) if exact else op.norm_sq())
    x = torch.zeros(shape, dtype=torch.float64)
    residuals = [float((op(x) - y).norm())]
    for _ in range(40):
        x = x + step * op.adjoint(y - op(x))
        residuals.append(float((op(x) - y).norm()))
    rounding = 1e-12 * residuals[0]  # k-space with odd LR lengths converges in one step, then rounding
    assert all(b <= a + rounding for a, b in zip(residuals, residuals[1:], strict=False))
    assert residuals[-1] < 1e-3 * residuals[0]


# ----------------------------------------------------------------------------------------- validation
def test_length_not_a_multiple_of_scale_is_refused():
    with pytest.raises(MedldmError, match=r"length 10, not a multiple of the scale 4"):
        ThickSlice((1,), 4)(torch.zeros(3, 10, 8))
    with pytest.raises(MedldmError, match=r"length 9, not a multiple of the scale 2"):
        KSpaceTruncation((0, 1), 2, spatial_dims=2)(torch.zeros(8, 9))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ThickSlice((3,), 2),
        lambda: ThickSlice((0, 0), 2),
        lambda: ThickSlice((0,), 0),
        lambda: ThickSlice((0,), 2.5),
        lambda: ThickSlice((0,), 2, profile="sinc"),
        lambda: KSpaceTruncation((0,), 2, spatial_dims=4),
        lambda: make_operator("sharpen", axis=0, scale=2),
        lambda: make_operator("kspace", axis=None, scale=2),
        lambda: make_operator("slice-profile", axis=2, scale=2, spatial_dims=2),
    ],
)
def test_bad_options_are_refused(make):
    with pytest.raises(MedldmError):
        make()


def test_make_operator_axis_convention():
    thick = make_operator("slice-profile", axis=1, scale=4, profile="boxcar")
    assert isinstance(thick, ThickSlice) and thick.axes == (1,) and thick.profile == "boxcar"
    kspace = make_operator("kspace", axis=1, scale=2)
    assert isinstance(kspace, KSpaceTruncation) and kspace.axes == (0, 2)
    blur = make_operator("blur", axis=0, scale=3)
    assert isinstance(blur, ThickSlice) and blur.axes == (1, 2) and blur.profile == "gaussian"
    assert make_operator("kspace", axis=None, scale=2, spatial_dims=2).axes == (0, 1)
    assert make_operator("slice-profile", axis=1, scale=2, spatial_dims=2).axes == (1,)
    assert kspace.factors(3) == (2.0, 1.0, 2.0)
    assert kspace.output_shape((5, 8, 6, 10)) == (5, 4, 6, 5)
    assert kspace.input_shape((5, 4, 6, 5)) == (5, 8, 6, 10)


# ---------------------------------------------------------------------------------------------- noise
def test_noise_is_seeded_and_rician_is_non_negative():
    x = torch.zeros(20000, dtype=torch.float64)
    a = add_gaussian_noise(x, 2.0, generator=torch.Generator().manual_seed(5))
    b = add_gaussian_noise(x, 2.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and float(a.std()) == pytest.approx(2.0, rel=0.03)
    r = add_rician_noise(x - 1.0, 0.5, generator=torch.Generator().manual_seed(6))
    assert float(r.min()) >= 0
    # zero signal: Rayleigh with mean sigma sqrt(pi / 2)
    rayleigh = add_rician_noise(x, 0.5, generator=torch.Generator().manual_seed(7))
    assert float(rayleigh.mean()) == pytest.approx(0.5 * math.sqrt(math.pi / 2), rel=0.03)


# -------------------------------------------------------------------------------------------- volumes
def test_degrade_volume_crops_and_keeps_field_of_view():
    rng = np.random.default_rng(8)
    affine = np.array([[0.9, 0.1, 0.0, -20.0], [-0.1, 0.9, 0.2, 10.0], [0.0, -0.2, 2.5, 5.0], [0, 0, 0, 1]])
    volume = Volume(rng.random((9, 10, 7)), affine, {"path": "synthetic"})
    lr, hr = degrade_volume(volume, kind="blur", axis="k", scale=4, profile="boxcar")
    assert hr.shape == (8, 8, 7) and lr.shape == (2, 2, 7)
    np.testing.assert_allclose(face_corners(lr.shape, lr.affine), face_corners(hr.shape, hr.affine), atol=1e-9)
    np.testing.assert_allclose(lr.data[0, 0], hr.data[:4, :4].mean(axis=(0, 1)), rtol=1e-6)
    # hr is the centred crop: one voxel dropped at the start of axis 0 and of axis 1
    np.testing.assert_allclose(hr.data, volume.data[:8, 1:9], rtol=0)
    np.testing.assert_allclose(hr.affine[:3, 3], (volume.affine @ [0, 1, 0, 1])[:3])
    assert lr.meta["degrade"] == {
        "kind": "blur",
        "axis": 2,
        "scale": 4,
        "thickness": 1.0,
        "profile": "boxcar",
        "noise": 0.0,
        "cropped_from": (9, 10, 7),
    }
    assert lr.meta["path"] == "synthetic"


def test_degrade_volume_ixi_thick_slices(ixi):
    assert ixi.orientation == "PSR" and resolve_axis(ixi, "z") == 1 and ixi.shape[1] == 120
    lr, hr = degrade_volume(ixi, kind="slice-profile", axis="z", scale=4)
    assert hr.shape == ixi.shape and lr.shape == (120, 30, 90)
    np.testing.assert_allclose(lr.spacing, (hr.spacing[0], 4 * hr.spacing[1], hr.spacing[2]), rtol=1e-9)
    np.testing.assert_allclose(face_corners(lr.shape, lr.affine), face_corners(hr.shape, hr.affine), atol=1e-6)
    assert lr.meta["degrade"]["axis"] == 1 and lr.meta["degrade"]["cropped_from"] == (120, 120, 90)
    assert lr.orientation == ixi.orientation


def test_degrade_volume_ixi_noise_is_seeded(ixi):
    a = degrade_volume(ixi, kind="slice-profile", axis="z", scale=4, noise=0.05, seed=3).lr
    b = degrade_volume(ixi, kind="slice-profile", axis="z", scale=4, noise=0.05, seed=3).lr
    c = degrade_volume(ixi, kind="slice-profile", axis="z", scale=4, noise=0.05, seed=4).lr
    assert np.array_equal(a.data, b.data) and not np.array_equal(a.data, c.data)
    assert a.data.min() >= 0


def test_degrade_volume_ixi_kspace(ixi):
    lr, hr = degrade_volume(ixi, kind="kspace", axis="z", scale=2)
    assert lr.shape == (60, 120, 45)
    np.testing.assert_allclose(lr.spacing, (4.0, 2.0, 4.0), rtol=1e-9)
    np.testing.assert_allclose(face_corners(lr.shape, lr.affine), face_corners(hr.shape, hr.affine), atol=1e-6)
    assert float(lr.data.mean()) == pytest.approx(float(hr.data.mean()), rel=0.01)


@pytest.mark.parametrize(
    "kind,scale,profile,thickness", [("slice-profile", 5.5, "boxcar", 0.75), ("kspace", 2, "gaussian", 1.0)]
)
def test_the_acquisition_operator_remakes_the_degraded_volume(kind, scale, profile, thickness):
    rng = np.random.default_rng(0)
    hr = Volume(rng.random((40, 36, 44)).astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0]), {})
    lr, truth = degrade_volume(hr, kind=kind, axis=2, scale=scale, profile=profile, thickness=thickness)
    op = acquisition_operator(lr)
    remade = op(torch.from_numpy(truth.data).to(torch.float64)).numpy()
    np.testing.assert_allclose(remade, lr.data, rtol=0, atol=1e-6)  # lr is stored in float32
