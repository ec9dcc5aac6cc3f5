"""medldm upscale end to end with tiny 2D and 3D trained_models trained here by the project's own code."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from medldm import MedldmError
from medldm.degrade import degrade_volume, make_operator
from medldm.model import load_model
from medldm.pipeline import RunningStats, Upscaler
from medldm.volume import crop, face_corners, load, rescaled_affine, save_nifti
from tests.helpers import ixi_block, medldm, tiny, trainer


@pytest.fixture(scope="module")
def degraded(ixi_path):
    """The IXI block (tests.helpers.ixi_block) with thick slices x4 along z (voxel axis 1), and its ground truth."""
    return degrade_volume(ixi_block(ixi_path), kind="slice-profile", axis="z", scale=4)


@pytest.mark.parametrize("name", ["tiny_2d", "tiny_3d"])
def test_upscale_restores_the_grid_and_is_consistent(trained_models, ixi_path, name):
    # a real sub-volume keeps the run short; 48 planes still take two batches of 32
    vol = crop(load(ixi_path), (slice(30, 78), slice(None), slice(20, 60)))
    lr, hr = degrade_volume(vol, kind="slice-profile", axis="z", scale=4)
    upscaler = Upscaler(trained_models[name], device="cpu", steps=2, batch_size=32)
    result = upscaler.upscale(lr, axis="z")
    assert result.task.kind == "slice-profile" and result.task.scale == 4 and result.axis == 1
    assert result.sr.shape == hr.shape == (vol.shape[0], 120, vol.shape[2])
    np.testing.assert_allclose(result.sr.affine, rescaled_affine(lr.affine, [1, 0.25, 1]), atol=1e-12)
    np.testing.assert_allclose(result.sr.affine, hr.affine, atol=1e-9)
    np.testing.assert_allclose(
        face_corners(result.sr.shape, result.sr.affine), face_corners(lr.shape, lr.affine), atol=1e-9
    )
    assert result.sr.data.dtype == np.float32 and np.isfinite(result.sr.data).all()
    # data consistency: degrading the output with the model's forward operator gives back the input
    op = make_operator("slice-profile", axis=1, scale=4)
    again = op(torch.from_numpy(result.sr.data).double()).numpy()
    value_range = float(lr.data.max() - lr.data.min())
    assert np.sqrt(np.mean((again - lr.data) ** 2)) < 1e-4 * value_range
    assert result.residual < 1e-6
    assert result.uncertainty is None


def test_consistency_can_be_switched_off(trained_models, degraded):
    lr, _ = degraded
    loose = Upscaler(trained_models["tiny_2d"], device="cpu", steps=2, batch_size=64, consistency=0.0).upscale(
        lr, axis="z"
    )
    assert loose.residual > 1e-3  # an untaught model is far from the data; consistency is what fixed it above


def test_same_seed_same_output_other_seed_other_sample(trained_models, degraded):
    lr = crop(degraded[0], (slice(12, 36), slice(None), slice(10, 30)))  # the centre: fewer planes, same property
    upscaler = Upscaler(trained_models["tiny_2d"], device="cpu", steps=2, batch_size=64, sampler="ddim")
    a = upscaler.upscale(lr, axis="z", seed=1)
    b = upscaler.upscale(lr, axis="z", seed=1)
    c = upscaler.upscale(lr, axis="z", seed=2)
    np.testing.assert_array_equal(a.sr.data, b.sr.data)
    assert np.abs(a.sr.data - c.sr.data).max() > 1e-3
    huge = upscaler.upscale(lr, axis="z", seed=20261202)  # per-plane seeds past 2^64 wrap, not overflow
    assert np.isfinite(huge.sr.data).all() and np.abs(huge.sr.data - a.sr.data).max() > 1e-3
    many = upscaler.upscale(lr, axis="z", seed=1, samples=3)
    assert many.uncertainty is not None and many.uncertainty.shape == many.sr.shape
    assert many.uncertainty.data.max() > 0
    np.testing.assert_array_equal(many.uncertainty.affine, many.sr.affine)


def test_output_does_not_depend_on_how_planes_are_batched(trained_models, degraded, monkeypatch):
    """Each plane draws its own noise, so batch size and the per-call pixel cap (which differ between CPU and
    GPU) change only float rounding, not the sample a user gets for a seed."""
    lr = crop(degraded[0], (slice(12, 36), slice(None), slice(10, 30)))  # the centre: fewer planes, same property
    kw = dict(device="cpu", steps=2, sampler="ddpm")  # stochastic at every step
    big = Upscaler(trained_models["tiny_2d"], batch_size=64, **kw).upscale(lr, axis="z", seed=3)
    monkeypatch.setitem(Upscaler.BATCH_PIXELS, "cpu", 1)  # one plane per call
    small = Upscaler(trained_models["tiny_2d"], batch_size=64, **kw).upscale(lr, axis="z", seed=3)
    odd = Upscaler(trained_models["tiny_2d"], batch_size=5, **kw).upscale(lr, axis="z", seed=3)
    other_seed = np.abs(
        Upscaler(trained_models["tiny_2d"], batch_size=64, **kw).upscale(lr, axis="z", seed=4).sr.data - big.sr.data
    )
    for other in (small, odd):  # float rounding only: thousands of times below another sample's difference
        d = np.abs(other.sr.data - big.sr.data)
        assert d.mean() < 1e-3 * other_seed.mean() and d.max() < 0.05 * other_seed.max()


def test_condition_is_encoded_once_for_all_samples(trained_models, degraded):
    lr, _ = degraded
    upscaler = Upscaler(trained_models["tiny_2d"], device="cpu", steps=1, batch_size=64)
    calls = []
    encode = upscaler.model.autoencoder.encode
    upscaler.model.autoencoder.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    try:
        upscaler.upscale(lr, axis="z", samples=3)
    finally:
        del upscaler.model.autoencoder.encode
    planes = lr.shape[0] + lr.shape[2]  # thick slices along voxel axis 1: both stacks of planes (the default)
    assert sum(calls) == planes  # one encoding per plane, shared by the three samples


@pytest.mark.parametrize("name", ["tiny_2d", "tiny_3d"])
def test_channels_last_is_the_same_autoencoder(trained_models, degraded, name):
    lr, hr = degraded
    if name == "tiny_3d":
        lr = crop(lr, (slice(30, 62), slice(None), slice(20, 52)))
    plain = Upscaler(trained_models[name], device="cpu", steps=1, batch_size=64, channels_last=False)
    fast = Upscaler(
        load_model(trained_models[name]), device="cpu", steps=1, batch_size=64
    )  # channels_last: the default
    x = torch.from_numpy(hr.data[None, None, 44:76, 44:76, 29:61] / hr.data.max()).float()  # inside the head
    if name == "tiny_2d":
        x = x[..., 0]
    fmt = torch.channels_last if name == "tiny_2d" else torch.channels_last_3d
    with torch.no_grad():
        z = plain.model.autoencoder.encode(x)
        image = plain.model.autoencoder.decode(z)
        # the same function in another memory layout: equal up to float32 summation order
        assert (fast.model.autoencoder.encode(x.contiguous(memory_format=fmt)) - z).abs().max() <= 1e-4 * z.abs().max()
        assert (fast.model.autoencoder.decode(z.contiguous(memory_format=fmt)) - image).abs().max() <= (
            1e-4 * image.abs().max()
        )
    result = fast.upscale(lr, axis="z")
    assert result.residual < 1e-6 and result.sr.data.flags.c_contiguous


def test_both_plane_stacks_average_two_consistent_passes(trained_models, degraded):
    lr, _ = degraded
    one = Upscaler(trained_models["tiny_2d"], device="cpu", steps=1, batch_size=64, planes="one").upscale(lr, axis="z")
    both = Upscaler(trained_models["tiny_2d"], device="cpu", steps=1, batch_size=64, planes="both").upscale(
        lr, axis="z"
    )
    assert both.sr.shape == one.sr.shape and both.residual < 1e-6
    np.testing.assert_array_equal(both.sr.affine, one.sr.affine)
    assert np.abs(both.sr.data - one.sr.data).max() > 1e-3  # the second stack of planes changed the result
    assert both.sr.meta["upscale"]["planes"] == "both"
    with pytest.raises(MedldmError, match="planes must be one of"):
        Upscaler(trained_models["tiny_2d"], device="cpu", planes="three")


@pytest.mark.parametrize("denoiser", ["unet", "dit"])
def test_slab_model_trains_and_upscales_consistently(tmp_path, ixi_path, denoiser):
    """2.5D (configs/tiny_2d_slab.yaml): both stages train, and the model conditions each plane on 3 LR planes."""
    vol = crop(load(ixi_path), (slice(40, 72), slice(None), slice(30, 50)))  # a real sub-volume: 20 planes
    lr, hr = degrade_volume(vol, kind="slice-profile", axis="z", scale=4)
    changes = {} if denoiser == "unet" else {"diffusion": {"denoiser": "dit", "depth": 2, "width": 32, "heads": 2}}
    config, root = tiny("tiny_2d_slab", **changes)
    trainer(config, root, tmp_path / "run").run("all")
    model = load_model(tmp_path / "run" / "model")
    assert model.config.data.slab == 3
    calls = []
    encode = model.autoencoder.encode
    model.autoencoder.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    result = Upscaler(model, device="cpu", steps=1, batch_size=32).upscale(lr, axis="z", samples=2)
    assert sum(calls) == lr.shape[0] + lr.shape[2]  # every plane of both stacks encoded once, for both samples
    assert result.sr.shape == hr.shape and np.isfinite(result.sr.data).all()
    np.testing.assert_allclose(result.sr.affine, hr.affine, atol=1e-9)
    assert result.residual < 1e-6


@pytest.mark.parametrize("kind", ["slice-profile", "kspace"])
def test_slab_by_slab_consistency_equals_the_whole_volume_formula(kind):
    from medldm.degrade import _slabs, consistency_residual, enforce_consistency

    op = make_operator(kind, axis=1, scale=4 if kind == "slice-profile" else 2)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((24, 32, 20), generator=g)
    lr = torch.rand(op.output_shape(x.shape), generator=g)
    whole = (x.double() + op.back_project(lr.double() - op.forward(x.double()))).float()
    assert len(_slabs(x, op, 100)) > 1  # slabs of one plane
    fixed = enforce_consistency(x.clone(), lr, op, chunk_voxels=100)
    torch.testing.assert_close(fixed, whole, rtol=0, atol=1e-6)
    assert consistency_residual(fixed, lr, op, chunk_voxels=100) < 1e-6
    expected = float((op.forward(x.double()) - lr.double()).pow(2).mean().sqrt())
    assert consistency_residual(x, lr, op, chunk_voxels=100) == pytest.approx(expected, rel=1e-9)
    half = enforce_consistency(x.clone(), lr, op, strength=0.5, chunk_voxels=100)
    torch.testing.assert_close(half, (x + fixed) / 2, rtol=0, atol=1e-6)


def test_running_stats_are_exact_and_zero_where_samples_agree():
    rng = np.random.default_rng(0)
    draws = [rng.normal(size=(4, 5, 6)) for _ in range(5)]
    for d in draws:
        d[:2] = 7.0  # all samples agree here
    stats = RunningStats()
    for d in draws:
        stats.add(torch.from_numpy(d))
    np.testing.assert_allclose(stats.mean.numpy(), np.mean(draws, axis=0), atol=1e-12)
    np.testing.assert_allclose(stats.std.numpy(), np.std(draws, axis=0, ddof=1), atol=1e-12)
    assert np.all(stats.std.numpy()[:2] == 0)
    single = RunningStats()
    single.add(torch.from_numpy(draws[0]).float())
    assert single.mean.dtype == torch.float32 and torch.equal(single.mean, torch.from_numpy(draws[0]).float())
    assert torch.equal(single.std, torch.zeros_like(single.mean))


def test_in_plane_kspace_upscale(trained_models, ixi_path):
    lr, hr = degrade_volume(ixi_block(ixi_path), kind="kspace", axis="z", scale=2)
    result = Upscaler(trained_models["tiny_2d"], device="cpu", steps=2, batch_size=64).upscale(
        lr, axis="z", kind="kspace"
    )
    assert result.sr.shape == hr.shape
    np.testing.assert_allclose(result.sr.affine, hr.affine, atol=1e-9)
    assert result.residual < 1e-6


def test_model_folder_checksums_and_task_choice(trained_models, degraded, tmp_path):
    lr, _ = degraded
    with pytest.raises(MedldmError, match="not trained for blur"):
        Upscaler(trained_models["tiny_2d"], device="cpu").upscale(lr, axis="z", kind="blur")
    model = load_model(trained_models["tiny_2d"])
    assert model.info["spatial_dims"] == 2
    tampered = tmp_path / "model"
    tampered.mkdir()
    for f in trained_models["tiny_2d"].iterdir():
        tampered.joinpath(f.name).write_bytes(f.read_bytes())
    weights = tampered / "denoiser.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(MedldmError, match="checksum"):
        load_model(tampered)


def test_cli_upscale_leaves_the_input_untouched(trained_models, degraded, tmp_path):
    lr, hr = degraded
    scan = tmp_path / "thick.nii.gz"
    save_nifti(lr, scan)
    before = scan.read_bytes()
    result = medldm(
        "upscale",
        scan,
        "--model",
        trained_models["tiny_2d"],
        "--steps",
        "2",
        "--axis",
        "z",
        "--samples",
        "2",
        "--preview",
        tmp_path / "preview.png",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    assert scan.read_bytes() == before
    sr = load(tmp_path / "thick_sr.nii.gz")
    assert sr.shape == hr.shape
    np.testing.assert_allclose(sr.affine, hr.affine, atol=1e-4)
    assert load(tmp_path / "thick_sr_uncertainty.nii.gz").shape == hr.shape
    assert (tmp_path / "preview.png").stat().st_size > 10_000
    again = medldm("upscale", scan, "--model", trained_models["tiny_2d"], "--steps", "2")
    assert again.returncode == 1 and "--overwrite" in again.stderr
    folder = tmp_path / "results"  # an existing folder takes <name>_sr.nii.gz and its sidecar, as cp would
    folder.mkdir()
    into = medldm("upscale", scan, "--model", trained_models["tiny_2d"], "--steps", "2", "-o", folder)
    assert into.returncode == 0, into.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["thick_sr.json", "thick_sr.nii.gz"]
    np.testing.assert_allclose(load(folder / "thick_sr.nii.gz").affine, hr.affine, atol=1e-4)


def test_batch_mode_survives_a_corrupt_file_and_resumes(trained_models, degraded, tmp_path):
    lr, _ = degraded
    folder = tmp_path / "scans"
    save_nifti(lr, folder / "a.nii.gz")
    save_nifti(lr, folder / "c.nii.gz")
    good = (folder / "a.nii.gz").read_bytes()
    (folder / "b.nii.gz").write_bytes(good[: len(good) // 3])
    out = tmp_path / "out"
    result = medldm(
        "upscale",
        folder,
        "-o",
        out,
        "--model",
        trained_models["tiny_2d"],
        "--steps",
        "1",
        "--axis",
        "z",
        "--device",
        "cpu",
    )
    assert result.returncode == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "a_sr.json",
        "a_sr.nii.gz",
        "c_sr.json",
        "c_sr.nii.gz",
        "medldm_upscale.csv",
    ]  # scans, sidecars, the batch summary
    with open(out / "medldm_upscale.csv", newline="") as fh:
        assert sorted(r["status"] for r in csv.DictReader(fh)) == ["failed", "written", "written"]
    assert "2 written, 0 skipped (already done), 1 failed" in result.stdout
    assert "b.nii.gz" in result.stderr and "Traceback" not in result.stderr
    stamp = (out / "a_sr.nii.gz").stat().st_mtime_ns
    (folder / "b.nii.gz").unlink()
    resumed = medldm("upscale", folder, "-o", out, "--model", trained_models["tiny_2d"], "--steps", "1", "--axis", "z")
    assert resumed.returncode == 0, resumed.stderr
    assert "0 written, 2 skipped" in resumed.stdout
    assert (out / "a_sr.nii.gz").stat().st_mtime_ns == stamp


def test_cuda_request_without_a_gpu_is_a_clear_error(trained_models):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(MedldmError, match="no CUDA GPU"):
        Upscaler(trained_models["tiny_2d"], device="cuda")
