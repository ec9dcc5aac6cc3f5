"""The fidelity stage: a pixel-space regression estimate first, then diffusion that adds only the detail it lacks."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from medldm.evaluation.evaluate import evaluate
from safetensors.torch import load_file

from medldm import MedldmError
from medldm.checkpoint import latest_checkpoint, read_model_folder, write_model_folder
from medldm.config import parse_config
from medldm.data import LaterPassSampler, PassEstimate, TrainingVolume, pass_estimates
from medldm.degrade import degrade_volume, enforce_consistency, make_operator
from medldm.model import load_model
from medldm.nets import build_autoencoder, build_denoiser, build_estimator, build_schedule, geometry_features
from medldm.pipeline import Upscaler, estimate_planes, interpolated
from medldm.resample import interpolate
from medldm.spec import SecondPass
from medldm.stages import unseen_error
from medldm.volume import crop, load, save_nifti
from tests.helpers import TINY_ESTIMATOR as ESTIMATOR
from tests.helpers import TINY_STAGE as STAGE
from tests.helpers import _one_batch, ixi_block, medldm, rows, tiny, tiny_with_estimator, trainer


def test_all_stages_train_and_the_model_folder_holds_the_estimators_ema(estimator_run):
    for stage in ("autoencoder", "estimator", "diffusion"):
        assert latest_checkpoint(estimator_run / stage).name == "step_0000004"
    log = rows(estimator_run / "estimator" / "metrics.csv")
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4] and all(np.isfinite(float(r["loss"])) for r in log)
    _, info = read_model_folder(estimator_run / "model")
    assert info["estimator_steps"] == 4
    exported = load_file(estimator_run / "model" / "estimator.safetensors")
    ema = load_file(latest_checkpoint(estimator_run / "estimator") / "ema.safetensors")
    for key, value in exported.items():
        torch.testing.assert_close(value, ema[f"module.{key}"], rtol=0, atol=0)


def test_refine_zero_gives_the_consistent_estimate_and_refining_adds_detail(estimator_run, ixi_path):
    block = ixi_block(ixi_path)
    lr, hr = degrade_volume(block, kind="slice-profile", axis="z", scale=4)
    loaded = load_model(estimator_run / "model")
    estimate = Upscaler(loaded, device="cpu", steps=2, refine=0.0).upscale(lr, axis="z", keep_estimate=True)
    refined = Upscaler(loaded, device="cpu", steps=2, refine=0.3).upscale(lr, axis="z", seed=1, keep_estimate=True)
    assert estimate.sr.shape == hr.shape
    tol = 1e-5 * hr.data.max()
    np.testing.assert_allclose(estimate.sr.data, estimate.estimate.data, rtol=0, atol=tol)  # refine 0: the estimate
    np.testing.assert_array_equal(refined.estimate.data, estimate.estimate.data)  # the estimate does not depend on it
    detail = np.abs(refined.sr.data - estimate.sr.data).mean()
    assert detail > 1e-4 * hr.data.max(), "refining from the estimate changed nothing"
    for result in (estimate, refined):
        assert result.residual < 1e-6  # degrading the output gives back the input
    again = Upscaler(loaded, device="cpu", steps=2, refine=0.3).upscale(lr, axis="z", seed=1)
    np.testing.assert_array_equal(again.sr.data, refined.sr.data)


def test_by_default_only_the_refinement_runs_in_bf16_and_only_where_native(estimator_run, ixi_path, monkeypatch):
    import medldm.pipeline

    # few planes: bf16 is emulated (slow) on a CPU without native bf16
    block = crop(load(ixi_path), (slice(52, 68), slice(None), slice(25, 65)))
    lr, _ = degrade_volume(block, kind="slice-profile", axis="z", scale=4)
    loaded = load_model(estimator_run / "model")
    monkeypatch.setattr(medldm.pipeline, "native_bf16", lambda device: True)
    default = Upscaler(loaded, device="cpu", steps=2, refine=0.3)
    assert (default.bf16, default.diffusion_bf16) == (False, True)
    mixed = default.upscale(lr, axis="z", seed=1, keep_estimate=True)
    fp32 = Upscaler(loaded, device="cpu", steps=2, refine=0.3, bf16=False).upscale(
        lr, axis="z", seed=1, keep_estimate=True
    )
    np.testing.assert_array_equal(mixed.estimate.data, fp32.estimate.data)  # the estimate stays float32
    rounding = np.abs(mixed.sr.data - fp32.sr.data).mean()
    assert 0 < rounding < 0.1 * np.abs(fp32.sr.data - fp32.estimate.data).mean()  # small beside the detail
    monkeypatch.setattr(medldm.pipeline, "native_bf16", lambda device: False)  # emulated bf16 is slow: float32
    assert not Upscaler(loaded, device="cpu", refine=0.3).diffusion_bf16


def test_the_estimate_in_channels_last_is_the_same_estimate(estimator_run, ixi_path):
    """channels_last (the default) lays out the estimator's weights channels-last, a speed-up only: the estimate is
    the float32 one in the plain layout up to summation order."""
    block = ixi_block(ixi_path)
    lr, hr = degrade_volume(block, kind="slice-profile", axis="z", scale=4)
    fast = Upscaler(load_model(estimator_run / "model"), device="cpu", refine=0.0)
    plain = Upscaler(load_model(estimator_run / "model"), device="cpu", refine=0.0, channels_last=False)
    for up, layout in ((fast, True), (plain, False)):
        conv = next(m for m in up.model.estimator.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == layout
    a, b = (up.upscale(lr, axis="z").sr.data for up in (fast, plain))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * hr.data.max())


def test_an_untrained_estimator_reproduces_linear_interpolation_made_consistent(tmp_path, ixi_path):
    config, _ = tiny_with_estimator()
    modules = {
        "autoencoder": build_autoencoder(config),
        "denoiser": build_denoiser(config),
        "estimator": build_estimator(config),
    }  # untrained: no training needed
    write_model_folder(tmp_path / "model", config=config.model_dump(), info={"latent_scale": 1.0}, modules=modules)
    lr, _ = degrade_volume(load(ixi_path), kind="slice-profile", axis="z", scale=4)
    out = Upscaler(tmp_path / "model", device="cpu", refine=0.0).upscale(lr, axis="z")
    op = make_operator("slice-profile", axis=out.axis, scale=4)
    linear = interpolate(lr, op.factors(3), method="trilinear")
    data = torch.from_numpy(linear.data.astype(np.float64))
    enforce_consistency(data, torch.from_numpy(lr.data.astype(np.float64)), op)
    assert out.sr.shape == linear.shape and out.residual < 1e-6
    np.testing.assert_allclose(out.sr.data, data.numpy(), rtol=0, atol=1e-3 * lr.data.max())


def test_the_estimator_learns_one_batch(tmp_path, monkeypatch):
    _one_batch(monkeypatch)
    config, root = tiny_with_estimator(steps=60, lr=3e-3, ema_decay=0.5)
    config = config.model_copy(update={"training": config.training.model_copy(update={"log_every": 1})})
    trainer(config, root, tmp_path / "run").run("estimator")
    losses = [float(r["loss"]) for r in rows(tmp_path / "run" / "estimator" / "metrics.csv")]
    # it starts as the identity (linear interpolation), so any fall in the loss is learnt
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


def test_the_consistent_loss_scores_the_output_after_the_projection(tmp_path):
    """estimator_loss: consistent takes L1 on what inference returns: the output made consistent with the patch's
    own acquisition, minus the truth (thick slices along either axis, and k-space)."""
    config, root = tiny_with_estimator(steps=1)
    pairs = trainer(config, root, tmp_path / "run").pair_sampler(slab=3)
    batch = pairs.batch(0, 12)
    assert {int(a) for a in batch["axis"]} == {-1, 0, 1}  # both thick-slice orientations and the in-plane kinds
    hr = batch["hr"]
    out = batch["lr"][:, 1:2] + 0.05 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(0))
    unseen = unseen_error(out - hr, batch, pairs.tasks)
    for i in range(len(hr)):
        task = pairs.tasks[int(batch["task"][i])]
        axis = int(batch["axis"][i])
        # inference's projection on a one-plane volume: the slice axis shifts by one, k-space degrades axes 1 and 2
        op = make_operator(task.kind, axis=axis + 1 if axis >= 0 else 0, scale=float(batch["scale"][i]))
        volume, truth = out[i], hr[i]  # (1, H, W)
        projected = enforce_consistency(volume.clone(), op.forward(truth), op)
        torch.testing.assert_close(unseen[i], projected - truth, atol=1e-5, rtol=0)
    assert unseen.abs().mean() < (out - hr).abs().mean()  # the projection removed part of the error


def test_an_estimator_trains_with_the_consistent_loss_and_old_digests_hold(tmp_path):
    config, root = tiny_with_estimator(steps=2)
    digest = config.digest()
    config = config.model_copy(update={"training": config.training.model_copy(update={"estimator_loss": "consistent"})})
    assert config.digest() != digest  # the plain L1 default is left out of the digest, so older configs keep theirs
    trainer(config, root, tmp_path / "run").run("estimator")
    losses = [float(r["loss"]) for r in rows(tmp_path / "run" / "estimator" / "metrics.csv")]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_estimator_resume_gives_the_same_weights_as_one_run(tmp_path):
    config, root = tiny_with_estimator(steps=6)
    trainer(config, root, tmp_path / "once").run("estimator")
    trainer(config, root, tmp_path / "twice").run("estimator", max_steps=3)
    trainer(config, root, tmp_path / "twice").run("estimator")
    a = load_file(latest_checkpoint(tmp_path / "once" / "estimator") / "ema.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "twice" / "estimator") / "ema.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_config_errors_and_old_digests(estimator_run):
    raw, _ = read_model_folder(estimator_run / "model")
    del raw["training"]["estimator"]
    with pytest.raises(MedldmError, match="training.estimator"):
        parse_config(raw, check_files=False)
    config, _ = tiny()  # no estimator: the digest it had before estimators existed
    assert config.digest() == "636a82b06053"
    without = dataclasses.replace(load_model(estimator_run / "model"), estimator=None)
    with pytest.raises(MedldmError, match="refine needs a model with an estimator"):
        Upscaler(without, device="cpu", refine=0.3)


def test_evaluate_reports_the_regression_baseline_and_the_uncertainty_calibration(estimator_run, ixi_files, tmp_path):
    block = save_nifti(
        crop(load(ixi_files[-20]), (slice(30, 78), slice(20, 68), slice(25, 57))), tmp_path / "block.nii.gz"
    )
    out = tmp_path / "report"
    evaluate(
        block,
        out,
        model=estimator_run / "model",
        steps=2,
        refine=0.3,
        samples=2,
        baselines=["bspline-dc", "regression"],
    )
    with open(out / "metrics.csv") as fh:
        methods = {row["method"]: row for row in csv.DictReader(fh)}
    assert set(methods) == {"bspline-dc", "regression", "model"}
    assert -1 <= float(methods["model"]["uncertainty_spearman"]) <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baselines"] == ["bspline-dc", "regression"]
    assert len(summary["uncertainty_calibration"][0]["error_by_decile"]) == 10
    page = (out / "report.html").read_text()
    assert 'id="uncertainty"' in page and "regression" in page
    with pytest.raises(MedldmError, match="unknown or unavailable baseline 'regression'"):
        evaluate(block, tmp_path / "r2", model=None, baselines=["regression"])


def test_a_refinement_model_fine_tuned_from_a_model_folder(estimator_run, tmp_path, ixi_path):
    """--init takes the folder's finished stages as they are and fine-tunes its denoiser to refine the estimate:
    conditioned on the estimate's latent, on the timesteps a refinement from ``diffusion.refine`` meets."""
    config, root = tiny_with_estimator()
    config = config.model_copy(
        update={"diffusion": config.diffusion.model_copy(update={"condition": "estimate", "refine": 0.3})}
    )
    run = tmp_path / "run"
    tuner = trainer(config, root, run)
    taken = tuner.init_from(estimator_run / "model")
    assert taken["autoencoder"].startswith("taken as finished") and taken["estimator"].startswith("taken as finished")
    assert taken["diffusion"].startswith("fine-tuned")
    seen = []
    schedule_add_noise = type(build_schedule(config)).add_noise

    def spy(self, x0, noise, t):
        seen.append(torch.as_tensor(t).max().item())
        return schedule_add_noise(self, x0, noise, t)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(build_schedule(config)), "add_noise", spy)
        tuner.run("diffusion")
    assert max(seen) <= 300  # round(0.3 * 999): never the noise levels a refinement from 0.3 does not meet
    source, tuned = load_model(estimator_run / "model"), load_model(run / "model")
    for name in ("autoencoder", "estimator"):  # taken as they were
        torch.testing.assert_close(
            getattr(tuned, name).state_dict(), getattr(source, name).state_dict(), rtol=0, atol=0
        )
    assert tuned.info["latent_scale"] == source.info["latent_scale"] and tuned.defaults()["refine"] == 0.3
    block = ixi_block(ixi_path)
    lr, _ = degrade_volume(block, kind="slice-profile", axis="z", scale=4)
    out = Upscaler(tuned, device="cpu", steps=2).upscale(lr, axis="z", keep_estimate=True)  # refines by default
    assert out.residual < 1e-6 and np.abs(out.sr.data - out.estimate.data).mean() > 1e-4 * lr.data.max()
    with pytest.raises(MedldmError, match="trained to refine from at most 0.3"):
        Upscaler(tuned, device="cpu", refine=0.5)


def test_refinement_settings_need_an_estimator(estimator_run):
    raw, _ = read_model_folder(estimator_run / "model")
    for key, value in (("condition", "estimate"), ("refine", 0.3)):
        bad = {
            **raw,
            "estimator": None,
            "training": {**raw["training"], "estimator": None},
            "diffusion": {**raw["diffusion"], key: value},
        }
        with pytest.raises(MedldmError, match="needs an estimator section"):
            parse_config(bad, check_files=False)


def test_the_model_chooses_its_planes_and_the_regression_baseline_always_averages_both(
    estimator_run, ixi_files, tmp_path
):
    loaded = load_model(estimator_run / "model")
    info = {**loaded.info, "sampling": {"steps": 2, "refine": 0.3, "planes": "one"}}
    folder = write_model_folder(
        tmp_path / "model",
        config=loaded.config.model_dump(),
        info=info,
        modules={"autoencoder": loaded.autoencoder, "denoiser": loaded.denoiser, "estimator": loaded.estimator},
    )
    assert Upscaler(folder, device="cpu").planes == "one"
    assert Upscaler(folder, device="cpu", planes="both").planes == "both"
    block = save_nifti(
        crop(load(ixi_files[-20]), (slice(30, 78), slice(20, 68), slice(25, 57))), tmp_path / "block.nii.gz"
    )
    scores = {}
    for planes in ("one", "both"):
        evaluate(block, tmp_path / planes, model=folder, planes=planes, baselines=["regression"])
        with open(tmp_path / planes / "metrics.csv") as fh:
            scores[planes] = {row["method"]: float(row["psnr"]) for row in csv.DictReader(fh)}
    assert scores["one"]["regression"] == scores["both"]["regression"]  # the same, strongest regression
    assert scores["one"]["model"] != scores["both"]["model"]


ESTIMATOR_3D = {"channels": [8, 16], "num_res_blocks": 1, "slab": 1, "spatial_dims": 3, "patch_size": [16, 16, 16]}


class _Pointwise(torch.nn.Module):
    """A stand-in 3D estimator with no spatial reach (2 x + 1), so a chunked estimate must equal a whole one."""

    slab, spatial_dims, multiple = 1, 3, 4

    def forward(self, lr, label, geometry=None):
        assert lr.shape[1] == 1 and all(n % self.multiple == 0 for n in lr.shape[2:])
        return 2 * lr + 1


def test_a_3d_estimator_trains_on_patches_and_the_upscaler_runs_it_in_chunks(tmp_path, ixi_path, monkeypatch):
    config, root = tiny(estimator=ESTIMATOR_3D, training={"estimator": STAGE})
    trainer(config, root, tmp_path / "run").run("all")
    log = rows(tmp_path / "run" / "estimator" / "metrics.csv")
    assert len(log) == 4 and all(np.isfinite(float(r["loss"])) for r in log)
    block = ixi_block(ixi_path)
    lr, hr = degrade_volume(block, kind="slice-profile", axis="z", scale=4)
    loaded = load_model(tmp_path / "run" / "model")
    assert loaded.estimator.spatial_dims == 3
    out = Upscaler(loaded, device="cpu").upscale(lr, axis="z")
    assert out.sr.shape == hr.shape and out.residual < 1e-6
    pointwise = dataclasses.replace(loaded, estimator=_Pointwise())
    whole = Upscaler(pointwise, device="cpu").upscale(lr, axis="z", keep_estimate=True).estimate
    monkeypatch.setattr(Upscaler, "BATCH_PIXELS", {"cpu": 1 << 9, "cuda": 1 << 9})  # chunks of a few planes
    upscaler = Upscaler(pointwise, device="cpu")
    plan = upscaler.plan(lr, axis="z")
    axis, depth = upscaler._chunks_3d(hr.shape, plan.operator())
    assert axis != out.axis and hr.shape[axis] > 3 * depth  # across a free axis, in several chunks
    chunked = upscaler.upscale(lr, axis="z", keep_estimate=True).estimate
    np.testing.assert_array_equal(chunked.data, whole.data)


def test_3d_estimator_settings_are_checked():
    for wrong, phrase in [
        ({**ESTIMATOR_3D, "slab": 3}, "slab 1"),
        ({**ESTIMATOR_3D, "patch_size": None}, "patch_size"),
        ({**ESTIMATOR_3D, "patch_size": [16, 16, 14]}, "multiple of 4"),
        ({**ESTIMATOR, "patch_size": [16, 16, 16]}, "spatial_dims 3"),
    ]:
        with pytest.raises(MedldmError, match=phrase):
            tiny(estimator=wrong, training={"estimator": STAGE})


def test_a_refinement_denoiser_is_not_trained_on_a_3d_estimator(tmp_path):
    """Refinement training runs the estimator on 2D patches; a 3D estimator is refused with one line (a model
    folder may still pair a 3D estimator with a refinement denoiser trained on another)."""
    config, root = tiny(estimator=ESTIMATOR_3D, training={"estimator": STAGE}, diffusion={"condition": "estimate"})
    with pytest.raises(MedldmError, match="estimator is 3D"):
        trainer(config, root, tmp_path / "run").run("all")  # the autoencoder and estimator, then the refusal


def test_adapt_refuses_a_3d_estimator_with_one_line(tmp_path, ixi_path):
    from medldm.adapt import adapt

    config, _ = tiny(estimator=ESTIMATOR_3D, training={"estimator": STAGE})
    modules = {
        "autoencoder": build_autoencoder(config),
        "denoiser": build_denoiser(config),
        "estimator": build_estimator(config),
    }  # untrained: the refusal comes before any work
    write_model_folder(tmp_path / "model", config=config.model_dump(), info={"latent_scale": 1.0}, modules=modules)
    loaded = load_model(tmp_path / "model")
    lr, _ = degrade_volume(load(ixi_path), kind="slice-profile", axis="z", scale=4)
    plan = Upscaler(loaded, device="cpu").plan(lr, axis="z")
    with pytest.raises(MedldmError, match="estimator is 3D"):
        adapt(loaded, lr, plan, steps=1)


# ------------------------------------------------------------------------------------------- the error model
TINY_UNCERTAINTY = {"channels": [8, 16], "num_res_blocks": 1}


def test_the_error_model_learns_the_scale_of_the_estimates_error(tmp_path, monkeypatch):
    _one_batch(monkeypatch)
    config, root = tiny(
        estimator=ESTIMATOR,
        uncertainty=TINY_UNCERTAINTY,
        training={
            "log_every": 1,
            "estimator": {**STAGE, "steps": 2},
            "uncertainty": {**STAGE, "steps": 60, "lr": 3e-3},
        },
    )
    run = trainer(config, root, tmp_path / "run")
    run.run("estimator")
    run.run("uncertainty")
    log = rows(tmp_path / "run" / "uncertainty" / "metrics.csv")
    losses = [float(r["loss"]) for r in log]
    # the Laplace likelihood is best where the scale is the mean absolute error: it falls towards log(error) + 1
    error = float(log[-1]["error"])
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert abs(np.mean(losses[-3:]) - (np.log(error) + 1)) < 0.3, (losses[-3:], error)


def test_a_config_that_adds_an_error_model_trains_only_that_and_upscale_returns_its_map(
    estimator_run, tmp_path, ixi_path
):
    raw, _ = read_model_folder(estimator_run / "model")
    raw["uncertainty"] = TINY_UNCERTAINTY
    raw["training"]["uncertainty"] = {**STAGE, "steps": 3}
    config, root = parse_config(raw, check_files=False)
    t = trainer(config, tiny()[1], tmp_path / "run")
    taken = t.init_from(estimator_run / "model")
    assert taken == {
        "autoencoder": f"taken as finished from {estimator_run / 'model'}",
        "estimator": f"taken as finished from {estimator_run / 'model'}",
        "uncertainty": "trained from scratch (its settings differ from the folder's)",
        "diffusion": f"taken as finished from {estimator_run / 'model'}",
    }
    t.run("all")
    assert not (tmp_path / "run" / "diffusion" / "metrics.csv").exists()  # nothing but the error model trained
    folder = tmp_path / "run" / "model"
    assert (folder / "uncertainty.safetensors").is_file()
    block = ixi_block(ixi_path)
    lr, hr = degrade_volume(block, kind="slice-profile", axis="z", scale=4)
    with_map = Upscaler(folder, device="cpu").upscale(lr, axis="z")
    without = Upscaler(estimator_run / "model", device="cpu").upscale(lr, axis="z")
    np.testing.assert_array_equal(with_map.sr.data, without.sr.data)  # the error model does not touch the output
    assert without.uncertainty is None and with_map.uncertainty.shape == hr.shape
    assert with_map.uncertainty.data.min() > 0  # a standard deviation in the scan's units, everywhere
    scan = save_nifti(lr, tmp_path / "lr.nii.gz")
    done = medldm("upscale", scan, "--model", folder, "--uncertainty", "-o", tmp_path / "sr.nii.gz", "--quiet")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "sr_uncertainty.nii.gz").is_file()
    plain = medldm("upscale", scan, "--model", folder, "-o", tmp_path / "plain.nii.gz", "--quiet")
    assert plain.returncode == 0 and not (tmp_path / "plain_uncertainty.nii.gz").exists()
    refused = medldm("upscale", scan, "--model", estimator_run / "model", "--uncertainty", "-o", tmp_path / "x.nii.gz")
    assert refused.returncode == 1 and "no error model" in refused.stderr and len(refused.stderr.splitlines()) == 1


# ------------------------------------------------------------------------------------------- the second pass
def _first_pass(volume: np.ndarray, estimate: np.ndarray, axis: int) -> PassEstimate:
    fg = np.argwhere(volume > 0.05).astype(np.int32)
    return PassEstimate(estimate, volume, 0, axis, TrainingVolume("v", volume, 0, fg))


def test_second_pass_batches_pair_each_estimate_slab_with_the_truth_at_the_same_place(ixi_path):
    config, _ = tiny_with_estimator()
    truth = np.asarray(load(ixi_path).data[:64, :72, :40], np.float32) / 1000
    items = [_first_pass(truth, truth.copy(), axis) for axis in range(3)]  # an estimate equal to its truth
    sampler = LaterPassSampler(items, config, slab=3)
    batch = sampler.batch(0, 24)
    assert batch["lr"].shape == (24, 3, 32, 32) and batch["hr"].shape == (24, 1, 32, 32)
    np.testing.assert_array_equal(batch["lr"][:, 1], batch["hr"][:, 0])  # the centre plane is the target's
    assert (batch["hr"].flatten(1).abs().amax(1) > 0).all()  # drawn from the head, not from the air around it
    assert set(batch["axis"].tolist()) == {0, 1} and (batch["scale"] == 4).all()
    np.testing.assert_array_equal(sampler.batch(0, 24)["lr"], batch["lr"])  # a pure function of the step
    assert not torch.equal(sampler.batch(1, 24)["lr"], batch["lr"])


def test_every_pass_sees_its_planes_from_an_lr_slice_edge_in_training_and_at_inference():
    """The passes read where a plane lies between the thick slices from their own 8-voxel grid (model card, "Where
    the thick slices lie": half a slice off costs about 1 dB), so patches and planes must start at a slice's edge."""
    config, _ = tiny_with_estimator()
    index = np.arange(1, 41, dtype=np.float32)  # a value per plane along the thick axis (z): its index + 1
    truth = np.broadcast_to(index[None, None], (64, 72, 40)).copy()
    batch = LaterPassSampler([_first_pass(truth, truth.copy(), 2)], config, slab=3).batch(0, 16)
    assert (batch["scale"] == 4).all()
    for hr, thick in zip(batch["hr"][:, 0], batch["axis"].tolist(), strict=True):
        line = hr.movedim(thick, 0)[:, 0]  # along the thick axis (mirrored or not)
        slices = (line[line > 0] - 1).long() // 4  # the LR slice of each voxel inside the volume
        positions = (line > 0).nonzero()[:, 0] // 4
        for p in positions.unique():  # each run of 4 patch voxels holds a single LR slice
            assert len(slices[positions == p].unique()) == 1

    class Recorder(torch.nn.Module):  # the identity on the centre plane, recording what it is given
        slab, multiple = 1, 16

        def __init__(self):
            super().__init__()
            self.seen: list[torch.Tensor] = []

        def forward(self, x, label, geometry):
            self.seen.append(x)
            return x

    net, hr_shape = Recorder(), (20, 18, 40)
    source = interpolated(torch.rand(20, 18, 10), hr_shape)
    estimate, _ = estimate_planes(
        (net, None), source, hr_shape, [0, 1], 0, geometry_features(4, 1), per_call=lambda _: 7,
        device=torch.device("cpu"),
    )  # fmt: skip
    whole = source(0, 0, 20)
    torch.testing.assert_close(estimate, whole)  # every plane back where it came from
    first = net.seen[0][:, 0]  # planes across x: (7, 18 -> 32, 40 -> 48), padded at the far ends only
    torch.testing.assert_close(first[:, :18, :40], whole[:7])


def test_later_pass_batches_can_be_cut_across_one_axis_at_an_exact_factor():
    """--adapt's own pairs: planes across the scan's thick axis only, thickened in-plane at a non-integer factor."""
    config, _ = tiny_with_estimator()
    truth = np.broadcast_to(np.arange(1, 41, dtype=np.float32)[None, None], (64, 72, 40)).copy()  # constant across z
    scan = TrainingVolume("v", truth, 0, np.argwhere(truth > 0)[::97])
    item = PassEstimate(truth, truth, 0, 0, scan, scale=5.5, thickness=1.5)
    batch = LaterPassSampler([item], config, slab=3, across=(2,)).batch(0, 16)
    for hr in batch["hr"]:  # a plane across z holds one value (zero beyond the volume)
        assert len(set(hr[hr != 0].tolist())) == 1
    # each patch's forward model as the pairs were made (a loss on the unseen error rebuilds it from these)
    assert (batch["scale"] == 5.5).all() and (batch["thickness"] == 1.5).all()
    torch.testing.assert_close(batch["geometry"], geometry_features([5.5] * 16, [1.5] * 16))
    across_any = LaterPassSampler([item], config, slab=3).batch(0, 16)["hr"]
    assert any(len(set(hr[hr != 0].tolist())) > 1 for hr in across_any)  # planes across x hold every z


def test_a_config_that_adds_a_second_pass_trains_it_from_the_estimator_and_upscale_runs_it_on_thick_slices(
    estimator_run, tmp_path, ixi_path
):
    raw, _ = read_model_folder(estimator_run / "model")
    raw["second_pass"] = {}
    raw["training"]["second_pass"] = {**STAGE, "steps": 3}
    config, _ = parse_config(raw, check_files=False)
    t = trainer(config, tiny()[1], tmp_path / "run")
    taken = t.init_from(estimator_run / "model")
    assert taken["second_pass"] == "trained from the estimator's weights (its settings differ from the folder's)"
    assert taken["diffusion"] == f"taken as finished from {estimator_run / 'model'}"
    t.run("all")
    assert not (tmp_path / "run" / "diffusion" / "metrics.csv").exists()  # only the second pass trained
    assert len(rows(tmp_path / "run" / "second_pass" / "metrics.csv")) == 3
    folder = tmp_path / "run" / "model"
    assert load_model(folder).second_pass is not None and load_model(estimator_run / "model").second_pass is None
    block = ixi_block(ixi_path)
    lr, hr = degrade_volume(block, kind="slice-profile", axis="z", scale=4)
    two = Upscaler(folder, device="cpu").upscale(lr, axis="z")
    one = Upscaler(estimator_run / "model", device="cpu").upscale(lr, axis="z")
    assert np.abs(two.sr.data - one.sr.data).max() > 1  # the second pass changed the estimate
    assert two.residual < 1e-6  # and the result is projected onto the input again
    kspace, _ = degrade_volume(block, kind="kspace", axis="z", scale=2)
    np.testing.assert_array_equal(  # trained on thick slices, it leaves the other kinds alone
        Upscaler(folder, device="cpu").upscale(kspace, axis="z", kind="kspace").sr.data,
        Upscaler(estimator_run / "model", device="cpu").upscale(kspace, axis="z", kind="kspace").sr.data,
    )


def _two_pass_model(estimator_run, run_dir):
    """The estimator run's model with a second pass added and trained 2 steps: its config (raw) and folder."""
    raw, _ = read_model_folder(estimator_run / "model")
    raw["second_pass"] = {}
    raw["training"]["second_pass"] = {**STAGE, "steps": 2}
    two = trainer(parse_config(raw, check_files=False)[0], tiny()[1], run_dir)
    two.init_from(estimator_run / "model")
    two.run("all")
    return raw, run_dir / "model"


def test_telling_a_two_pass_model_the_geometry_fine_tunes_its_estimator_and_keeps_its_second_pass(
    estimator_run, tmp_path
):
    """An any-factor fine-tune (estimator.geometry) of a two-pass model: the second pass shares the estimator's
    design, so it is told the geometry too, through a part that starts at zero: taken as it is, it must compute
    what the folder's second pass did, whatever factor it is told."""
    raw, folder = _two_pass_model(estimator_run, tmp_path / "two")
    raw["estimator"] = {**raw["estimator"], "geometry": True}
    t = trainer(parse_config(raw, check_files=False)[0], tiny()[1], tmp_path / "run")
    taken = t.init_from(folder)
    assert taken["estimator"] == f"fine-tuned from {folder}'s estimator"
    assert taken["second_pass"] == f"taken as finished from {folder}"
    told, before = t.trained_pass("second_pass"), load_model(folder).second_pass
    assert told.geometry is not None and before.geometry is None
    x, label = torch.rand(2, told.slab, 32, 32), torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(told(x, label, geometry_features([5.5, 2.5], [1.0, 0.75])), before(x, label))


def test_a_second_pass_with_new_training_settings_is_fine_tuned_from_the_folders_second_pass(estimator_run, tmp_path):
    """Retraining a two-pass model's second pass (say, on a new first pass's estimates) starts from the folder's
    second pass, not again from the estimator's weights: at a negligible learning rate it stays the folder's."""
    raw, folder = _two_pass_model(estimator_run, tmp_path / "two")
    raw["training"]["second_pass"] = {**STAGE, "steps": 1, "lr": 1e-12}
    t = trainer(parse_config(raw, check_files=False)[0], tiny()[1], tmp_path / "run")
    taken = t.init_from(folder)
    assert taken["second_pass"] == f"fine-tuned from {folder}'s second_pass"
    assert taken["estimator"] == f"taken as finished from {folder}"
    t.run("second_pass")
    before, estimator = load_model(folder).second_pass, load_model(folder).estimator
    after = t.trained_pass("second_pass")
    x, label = torch.rand(2, after.slab, 32, 32), torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(after(x, label), before(x, label))
    assert (after(x, label) - estimator(x, label)).abs().max() > 1e-4  # the estimator's weights would differ


def test_a_third_pass_trains_from_the_second_on_its_estimates_and_upscale_runs_both(estimator_run, tmp_path, ixi_path):
    raw, _ = read_model_folder(estimator_run / "model")
    raw["second_pass"], raw["third_pass"] = {}, {}
    raw["training"]["second_pass"] = raw["training"]["third_pass"] = {**STAGE, "steps": 2}
    config, _ = parse_config(raw, check_files=False)
    t = trainer(config, tiny()[1], tmp_path / "run")
    taken = t.init_from(estimator_run / "model")
    assert taken["third_pass"] == "trained from the second_pass's weights (its settings differ from the folder's)"
    t.run("all")
    assert (tmp_path / "run" / "third_pass" / "second_pass.h5").is_file()  # the two-pass estimates, cached
    model = load_model(tmp_path / "run" / "model")
    assert [net is not None for net in (model.second_pass, model.third_pass)] == [True, True]
    block = ixi_block(ixi_path)
    lr, _ = degrade_volume(block, kind="slice-profile", axis="z", scale=4)
    three = Upscaler(model, device="cpu").upscale(lr, axis="z")
    two = Upscaler(dataclasses.replace(model, third_pass=None), device="cpu").upscale(lr, axis="z")
    assert np.abs(three.sr.data - two.sr.data).max() > 0.1 and three.residual < 1e-6


def test_a_second_pass_for_kspace_learns_the_acquired_planes_and_upscale_runs_it_on_kspace_only(
    estimator_run, tmp_path, ixi_path
):
    raw, _ = read_model_folder(estimator_run / "model")
    raw["second_pass"] = {"kinds": ["kspace"]}
    raw["training"]["second_pass"] = {**STAGE, "steps": 2}
    config, _ = parse_config(raw, check_files=False)
    t = trainer(config, tiny()[1], tmp_path / "run")
    t.init_from(estimator_run / "model")
    sampler = t.later_pass_sampler("second_pass")
    assert {(config.data.tasks[i.task].kind, i.axis) for i in sampler.items} == {("kspace", a) for a in range(3)}
    assert set(sampler.batch(0, 8)["axis"].tolist()) == {-1}  # in-plane pairs, like the first pass's
    t.run("all")
    folder, one = tmp_path / "run" / "model", estimator_run / "model"
    block = ixi_block(ixi_path)
    kspace, _ = degrade_volume(block, kind="kspace", axis="z", scale=2)
    two = Upscaler(folder, device="cpu").upscale(kspace, axis="z", kind="kspace")
    assert np.abs(two.sr.data - Upscaler(one, device="cpu").upscale(kspace, axis="z", kind="kspace").sr.data).max() > 1
    assert two.residual < 1e-6  # projected onto the acquired k-space again
    thick, _ = degrade_volume(block, kind="slice-profile", axis="z", scale=4)
    np.testing.assert_array_equal(  # trained on k-space, it leaves thick slices alone
        Upscaler(folder, device="cpu").upscale(thick, axis="z").sr.data,
        Upscaler(one, device="cpu").upscale(thick, axis="z").sr.data,
    )


def test_later_pass_kinds_must_be_tasks_of_the_config_and_a_third_pass_runs_where_the_second_does(estimator_run):
    raw, _ = read_model_folder(estimator_run / "model")
    raw["training"]["second_pass"] = raw["training"]["third_pass"] = STAGE
    thick_only = {**raw, "data": {**raw["data"], "tasks": raw["data"]["tasks"][:1]}}
    with pytest.raises(MedldmError, match="not all among them"):
        parse_config({**thick_only, "second_pass": {"kinds": ["kspace"]}}, check_files=False)
    with pytest.raises(MedldmError, match="its kinds must be the second's too"):
        parse_config({**raw, "second_pass": {}, "third_pass": {"kinds": ["kspace"]}}, check_files=False)
    plain, _ = parse_config({**raw, "second_pass": {}}, check_files=False)
    told, _ = parse_config({**raw, "second_pass": {"kinds": ["slice-profile"]}}, check_files=False)
    assert plain.digest() == told.digest()  # the default kinds leave the digest of shipped models alone


def test_pass_estimates_of_kspace_are_consistent_with_the_acquired_planes_and_what_inference_computes(
    estimator_run, tmp_path, ixi_path
):
    model = load_model(estimator_run / "model")
    real = load(ixi_path).to_canonical()
    data = (np.asarray(real.data[:40, :48, :32], np.float32) / np.percentile(real.data, 99.5)).astype(np.float16)
    volume = TrainingVolume("v", data, 0, np.argwhere(data > 0.05).astype(np.int32))
    items = pass_estimates([volume], model.config, [model.estimator], tmp_path / "one.h5", kinds=["kspace"])
    assert [(i.task, i.axis) for i in items] == [(1, 0), (1, 1), (1, 2)]  # the k-space task across each axis
    op = make_operator("kspace", axis=2, scale=2)
    lr = op.forward(torch.from_numpy(data.astype(np.float32)))
    np.testing.assert_allclose(op.forward(torch.from_numpy(items[2].estimate.astype(np.float32))), lr, atol=2e-3)
    other = build_estimator(model.config)
    chained = pass_estimates(
        [volume], model.config, [model.estimator, other], tmp_path / "two.h5", earlier=items, kinds=["kspace"]
    )
    spec = model.config.model_copy(update={"second_pass": SecondPass(kinds=("kspace",))})
    upscaler = Upscaler(dataclasses.replace(model, config=spec, second_pass=other), device="cpu")
    label = int(model.codec.task_label(1, 0))
    inferred, _ = upscaler._estimate(lr, data.shape, op, label, lambda: None, geometry_features(2, 1.0))
    np.testing.assert_allclose(chained[2].estimate.astype(np.float32), inferred, atol=2e-2)


def test_pass_estimates_are_cached_and_redone_for_other_estimator_weights(estimator_run, tmp_path, ixi_path):
    model = load_model(estimator_run / "model")
    real = load(ixi_path).to_canonical()
    data = (np.asarray(real.data[:40, :48, :32], np.float32) / np.percentile(real.data, 99.5)).astype(np.float16)
    volume = TrainingVolume("v", data, 0, np.argwhere(data > 0.05).astype(np.int32))
    cache = tmp_path / "first_pass.h5"
    items = pass_estimates([volume], model.config, [model.estimator], cache)
    assert [(i.task, i.axis) for i in items] == [(0, 0), (0, 1), (0, 2)]  # the thick-slice task along each axis
    op = make_operator("slice-profile", axis=2, scale=4)
    lr = op.forward(torch.from_numpy(data.astype(np.float32)))
    np.testing.assert_allclose(  # what inference returns: consistent with the thick slices
        op.forward(torch.from_numpy(items[2].estimate.astype(np.float32))), lr, atol=2e-3
    )
    again = pass_estimates([volume], model.config, [model.estimator], cache)
    np.testing.assert_array_equal(again[1].estimate, items[1].estimate)
    other = build_estimator(model.config)  # other weights: the cached estimates no longer hold
    redone = pass_estimates([volume], model.config, [other], cache)
    assert not np.array_equal(redone[1].estimate, items[1].estimate)
    # a later pass on the cached estimates gives what inference computes with both passes (up to the float16 cache)
    chained = pass_estimates([volume], model.config, [model.estimator, other], tmp_path / "two.h5", earlier=items)
    two = model.config.model_copy(update={"second_pass": SecondPass()})
    upscaler = Upscaler(dataclasses.replace(model, config=two, second_pass=other), device="cpu")
    label = int(model.codec.task_label(0, 0))
    inferred, _ = upscaler._estimate(lr, data.shape, op, label, lambda: None, geometry_features(4, 1.0))
    np.testing.assert_allclose(chained[2].estimate.astype(np.float32), inferred, atol=2e-2)
    assert not np.array_equal(chained[2].estimate, redone[2].estimate)  # the first pass's output, not the input
    with pytest.raises(MedldmError, match="earlier passes' estimates"):
        pass_estimates([volume], model.config, [model.estimator, other], tmp_path / "three.h5")


def test_a_refinement_denoiser_learns_on_the_final_estimates_on_its_share_of_steps(
    estimator_run, tmp_path, monkeypatch
):
    from medldm.stages import DiffusionStage

    raw, _ = read_model_folder(estimator_run / "model")
    raw["second_pass"] = {}
    raw["training"]["second_pass"] = {**STAGE, "steps": 2}
    raw["diffusion"].update(condition="estimate", refine=0.3, final_estimate_share=0.5)
    config, _ = parse_config(raw, check_files=False)
    t = trainer(config, tiny()[1], tmp_path / "run")
    assert t.init_from(estimator_run / "model")["diffusion"].startswith("fine-tuned from")
    drawn: list[tuple[int, bool]] = []  # (planes per input, condition already the estimate) of each diffusion batch
    original = DiffusionStage._latents

    def latents(self, batch, *, estimated=False):
        drawn.append((batch["lr"].shape[1], estimated))
        return original(self, batch, estimated=estimated)

    monkeypatch.setattr(DiffusionStage, "_latents", latents)
    t.run("all")
    # steps 0-3: every other one on the cached two-pass estimates (one plane: the condition itself), the others on
    # the estimator's slab of LR planes, as before
    assert drawn == [(3, False), (1, True), (3, False), (1, True)]
    assert (tmp_path / "run" / "diffusion" / "second_pass.h5").is_file()  # the two passes' estimates, cached
    assert (tmp_path / "run" / "second_pass" / "first_pass.h5").is_file()  # shared with the second pass's stage
    with pytest.raises(MedldmError, match="final_estimate_share needs"):
        raw["diffusion"]["condition"] = "lr"
        parse_config(raw, check_files=False)
