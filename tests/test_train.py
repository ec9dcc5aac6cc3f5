"""Two-stage training on real IXI scans with the tiny configs: runs, learns, resumes exactly, runs on 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from medldm import MedldmError
from medldm.checkpoint import latest_checkpoint, read_model_folder
from medldm.data import PairSampler
from medldm.train import Trainer
from tests.helpers import DATA, LPIPS, REPO, _free_port, _one_batch, ixi_block, medldm, rows, shared_path, tiny, trainer


@pytest.mark.parametrize("name", ["tiny_2d", "tiny_3d"])
def test_tiny_config_trains_both_stages_and_exports_a_model(tmp_path, name):
    config, root = tiny(name)
    t = trainer(config, root, tmp_path / "run")
    t.run("all")
    for stage in ("autoencoder", "diffusion"):
        ckpt = latest_checkpoint(tmp_path / "run" / stage)
        assert ckpt is not None and ckpt.name == "step_0000004"
        log = rows(tmp_path / "run" / stage / "metrics.csv")
        assert [int(r["step"]) for r in log] == [1, 2, 3, 4]
        assert all(np.isfinite(float(r["loss"])) and float(r["samples_per_s"]) > 0 for r in log)
    cfg, info = read_model_folder(tmp_path / "run" / "model")
    assert cfg["name"] == name and info["spatial_dims"] == config.data.spatial_dims
    assert 0.01 < info["latent_scale"] < 100
    # the exported autoencoder is stage 1's EMA, bit for bit
    exported = load_file(tmp_path / "run" / "model" / "autoencoder.safetensors")
    ema = load_file(latest_checkpoint(tmp_path / "run" / "autoencoder") / "ema.safetensors")
    for key, value in exported.items():
        torch.testing.assert_close(value, ema[f"module.{key}"], rtol=0, atol=0)


def test_overfitting_one_batch_halves_the_loss(tmp_path, monkeypatch):
    _one_batch(monkeypatch)
    config, root = tiny(
        training={
            "log_every": 1,
            "checkpoint_every": 1000,
            "autoencoder": {"steps": 60, "lr": 3e-3, "ema_decay": 0.5},
            "diffusion": {"steps": 60, "lr": 2e-3, "ema_decay": 0.5},
        },
        autoencoder={"adversarial_weight": 0.0},
    )
    t = trainer(config, root, tmp_path / "run")
    t.run("all")
    for stage in ("autoencoder", "diffusion"):
        losses = [float(r["loss"]) for r in rows(tmp_path / "run" / stage / "metrics.csv")]
        first, last = np.mean(losses[:3]), np.mean(losses[-3:])
        assert last < 0.5 * first, (stage, first, last)


def test_resume_gives_the_same_weights_as_one_run(tmp_path):
    config, root = tiny(training={"autoencoder": {"steps": 6}, "diffusion": {"steps": 6}})
    trainer(config, root, tmp_path / "once").run("all")
    trainer(config, root, tmp_path / "twice").run("all", max_steps=3)
    assert not (tmp_path / "twice" / "diffusion").exists()  # stage 2 waits for stage 1 to finish
    trainer(config, root, tmp_path / "twice").run("all")
    for stage in ("autoencoder", "diffusion"):
        a = load_file(latest_checkpoint(tmp_path / "once" / stage) / "ema.safetensors")
        b = load_file(latest_checkpoint(tmp_path / "twice" / stage) / "ema.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_two_data_parallel_ranks_end_with_identical_weights(tmp_path):
    shared_path("data/mri/ixi-t1-2mm")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MEDLDM_DATA_ROOT": str(DATA)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(REPO / "tests" / "ddp_worker.py"),
        str(REPO / "configs" / "tiny_2d.yaml"),
        str(tmp_path / "run"),
        str(LPIPS),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world"] == 2 for r in reports)
    assert reports[0]["batch_digest"] != reports[1]["batch_digest"]  # the ranks saw different data
    assert reports[0]["weights"] == reports[1]["weights"]  # and DDP kept them in step


def test_perceptual_loss_refuses_to_run_without_real_weights(tmp_path):
    config, root = tiny()
    empty = tmp_path / "no_weights"
    empty.mkdir()
    t = Trainer(config, root, tmp_path / "run", lpips_weights=str(empty), progress=False)
    with pytest.raises(MedldmError, match="LPIPS"):
        t.run("autoencoder")
    assert latest_checkpoint(tmp_path / "run" / "autoencoder") is None


BAD_CONFIGS = {
    "typo": ({"training": {"autoencoder": {"stesp": 4}}}, "unknown key 'training.autoencoder.stesp'"),
    "negative lr": ({"training": {"diffusion": {"lr": -1e-4}}}, "key 'training.diffusion.lr'"),
    "missing folder": (
        {"data": {"sources": [{"glob": "mri/no-such-folder/*.nii.gz"}]}},
        "key 'data.sources.0.glob': no files match",
    ),
    "spatial_dims 4": ({"data": {"spatial_dims": 4}}, "key 'data.spatial_dims'"),
    "even slab": ({"data": {"slab": 2}}, "key 'data.slab': slab must be odd"),
    "slab in 3D": (
        {"data": {"spatial_dims": 3, "patch_size": [16, 16, 16], "slab": 3}},
        "key 'data.slab': slab 3 needs spatial_dims 2",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_errors_name_the_key(tmp_path, case):
    changes, message = BAD_CONFIGS[case]
    raw = yaml.safe_load((REPO / "configs" / "tiny_2d.yaml").read_text())
    for section, values in changes.items():
        for k, v in values.items():
            if isinstance(v, dict):
                raw[section][k].update(v)
            else:
                raw[section][k] = v
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medldm.cli",
            "train",
            "--config",
            str(path),
            "--data-root",
            str(DATA),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_refuses_to_train_over_an_existing_run(tmp_path):
    config, root = tiny()
    trainer(config, root, tmp_path / "run").run("autoencoder", max_steps=2)
    config_path = str(REPO / "configs/tiny_2d.yaml")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medldm.cli",
            "train",
            "--config",
            config_path,
            "--data-root",
            str(DATA),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "--resume" in result.stderr


def test_vq_autoencoder_and_dit_denoiser_train_and_upscale(tmp_path, ixi_path):
    from medldm.degrade import degrade_volume
    from medldm.pipeline import Upscaler
    from medldm.volume import crop, load

    config, root = tiny(
        autoencoder={"kind": "vq", "num_embeddings": 16},
        diffusion={"denoiser": "dit", "patch": 2, "depth": 2, "width": 32, "heads": 2},
    )
    trainer(config, root, tmp_path / "run").run("all")
    vol = crop(load(ixi_path), (slice(40, 72), slice(None), slice(30, 50)))
    lr, hr = degrade_volume(vol, kind="slice-profile", axis="z", scale=4)
    result = Upscaler(tmp_path / "run" / "model", device="cpu", steps=1).upscale(lr, axis="z")
    assert result.sr.shape == hr.shape and np.isfinite(result.sr.data).all() and result.residual < 1e-6


def test_training_killed_with_sigkill_resumes_from_a_complete_checkpoint(tmp_path):
    import signal
    import time

    from medldm.checkpoint import load_state

    raw = yaml.safe_load((REPO / "configs" / "tiny_2d.yaml").read_text())
    raw["training"].update(checkpoint_every=1, keep_checkpoints=3, autoencoder={"steps": 400, "batch_size": 2})
    cfg_path = tmp_path / "long.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    args = ["train", "--config", str(cfg_path), "--data-root", str(DATA), "--lpips-weights", str(LPIPS)]
    args += ["--stage", "autoencoder"]
    command = [sys.executable, "-m", "medldm.cli", *args, "--run-dir", str(run)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((run / "autoencoder").glob("step_*"))) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # wherever it is, possibly in the middle of writing a checkpoint
    proc.wait()
    ckpt = latest_checkpoint(run / "autoencoder")
    assert ckpt is not None
    state, _ = load_state(ckpt)  # the newest complete checkpoint reads back whole
    step = int(state["step"])
    assert all((ckpt / f"{n}.safetensors").is_file() for n in ("model", "ema", "discriminator"))
    result = medldm(*args, "--resume", run, "--max-steps", str(step + 2))  # in this process: a quicker start
    assert result.returncode == 0, result.stderr[-2000:]
    assert latest_checkpoint(run / "autoencoder").name == f"step_{step + 2:07d}"


def test_slab_channels_are_the_degraded_neighbouring_planes():
    """2.5D: LR channel k is plane centre - 1 + k of the HR volume, degraded by the same operator and upsampled
    (built here from the volume and medldm.degrade); the centre channel is what a slab-1 sampler gives."""
    import torch.nn.functional as F

    from medldm.data import TrainingVolume, load_volumes
    from medldm.degrade import make_operator

    task = {"kind": "slice-profile", "scale": 4}
    config, root = tiny("tiny_2d_slab", data={"tasks": [task], "foreground_fraction": 1.0})
    real = load_volumes(config, root)[0]
    centre = np.array(real.data.shape) // 2  # interior: the slab and the patch margins stay inside the volume
    vol = TrainingVolume(real.name, real.data, real.modality, centre[None].astype(np.int32))
    batch = PairSampler([vol], config).batch(0, 6)
    assert batch["hr"].shape == (6, 1, 32, 32) and batch["lr"].shape == (6, 3, 32, 32)
    data = vol.data.astype(np.float32)
    s, m = 32, 2 * task["scale"]  # patch size, and the margin the sampler degrades beyond a degraded axis

    def expected_lr(plane_axis, origin, degraded, flip):
        """The three LR channels for a patch at ``origin`` of the planes across ``plane_axis``."""
        out = []
        for k in (-1, 0, 1):
            plane = np.take(data, centre[plane_axis] + k, axis=plane_axis)
            pad = [m if a == degraded else 0 for a in range(2)]
            region = torch.from_numpy(
                plane[origin[0] - pad[0] : origin[0] + s + pad[0], origin[1] - pad[1] : origin[1] + s + pad[1]].copy()
            )
            region = region.flip(flip) if flip is not None else region
            low = make_operator("slice-profile", axis=degraded, scale=task["scale"], spatial_dims=2).forward(region)
            up = F.interpolate(low[None, None], size=region.shape, mode="bilinear", align_corners=False)[0, 0]
            out.append(up[pad[0] : pad[0] + s, pad[1] : pad[1] + s])
        return torch.stack(out)

    for b in range(6):
        hr, lr = batch["hr"][b, 0], batch["lr"][b]
        matches = []
        # find where the HR patch came from: which planes, where in them (the sampler jitters it) and any mirror
        for plane_axis in range(3):
            plane = np.take(data, centre[plane_axis], axis=plane_axis)
            c = np.delete(centre, plane_axis)
            for flip in (None, 0, 1):
                patch = (hr.flip(flip) if flip is not None else hr).numpy()
                for o0 in range(c[0] - 24, c[0] - 7):
                    for o1 in range(c[1] - 24, c[1] - 7):
                        if np.array_equal(plane[o0 : o0 + s, o1 : o1 + s], patch):
                            matches.append((plane_axis, (o0, o1), flip))
        assert len(matches) == 1, matches
        plane_axis, origin, flip = matches[0]
        # thick slices along one in-plane axis: the sampler picks which, so one of the two must fit exactly
        errors = [float((expected_lr(plane_axis, origin, d, flip) - lr).abs().max()) for d in (0, 1)]
        assert min(errors) < 1e-6, errors
        assert (lr[0] - lr[1]).abs().max() > 1e-3 and (lr[2] - lr[1]).abs().max() > 1e-3  # real neighbours
    # the same draw with slab 1: the same HR patches, and LR equal to the slab's centre channel
    flat, _ = tiny(data={"tasks": [task], "foreground_fraction": 1.0})
    single = PairSampler([vol], flat).batch(0, 6)
    assert single["lr"].shape == (6, 1, 32, 32)
    torch.testing.assert_close(single["hr"], batch["hr"], rtol=0, atol=0)
    torch.testing.assert_close(single["lr"][:, 0], batch["lr"][:, 1], rtol=0, atol=0)


def test_tensorboard_holds_the_logged_scalars_of_the_csv(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, root = tiny()
    trainer(config, root, tmp_path / "run").run("autoencoder", max_steps=2)
    trainer(config, root, tmp_path / "run").run("autoencoder")  # resumed: a second event file, no step twice
    board = tmp_path / "run" / "autoencoder" / "tensorboard"
    assert list(board.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(board))
    events.Reload()
    log = rows(tmp_path / "run" / "autoencoder" / "metrics.csv")
    assert {"loss", "l1", "samples_per_s"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [int(r["step"]) for r in log] == [1, 2, 3, 4]
    np.testing.assert_allclose([e.value for e in loss], [float(r["loss"]) for r in log], rtol=1e-5)


def test_training_without_tensorboard_logs_to_csv_only(tmp_path, monkeypatch, capsys):
    import medldm.train

    off, root = tiny(training={"tensorboard": False})
    trainer(off, root, tmp_path / "off").run("autoencoder", max_steps=1)
    assert (tmp_path / "off" / "autoencoder" / "metrics.csv").is_file()
    assert not (tmp_path / "off" / "autoencoder" / "tensorboard").exists()
    # not installed: torch.utils.tensorboard raises ImportError; training goes on, saying so once
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(medldm.train, "_noted_no_tensorboard", False)
    config, root = tiny()
    capsys.readouterr()
    trainer(config, root, tmp_path / "run").run("autoencoder", max_steps=1)
    trainer(config, root, tmp_path / "run").run("autoencoder", max_steps=2)
    assert [int(r["step"]) for r in rows(tmp_path / "run" / "autoencoder" / "metrics.csv")] == [1, 2]
    assert not (tmp_path / "run" / "autoencoder" / "tensorboard").exists()
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "tensorboard" in line] == [
        "tensorboard is not installed: metrics go to metrics.csv only"
    ], err


def test_channels_last_training_runs_end_to_end_and_upscales(tmp_path, ixi_path):
    """training.channels_last trains both stages and exports a usable model. (Its losses are not compared with a
    contiguous run: the KL posterior noise is drawn in memory order, so the two runs see different draws.)"""
    from medldm.degrade import degrade_volume
    from medldm.pipeline import Upscaler

    config, root = tiny(
        "tiny_2d", training={"channels_last": True, "autoencoder": {"steps": 2}, "diffusion": {"steps": 2}}
    )
    trainer(config, root, tmp_path / "run").run("all")
    for stage in ("autoencoder", "diffusion"):
        assert all(np.isfinite(float(r["loss"])) for r in rows(tmp_path / "run" / stage / "metrics.csv"))
    lr, hr = degrade_volume(ixi_block(ixi_path), kind="slice-profile", axis="z", scale=4)
    result = Upscaler(tmp_path / "run" / "model", device="cpu", steps=1).upscale(lr, axis="z")
    assert result.sr.shape == hr.shape and result.residual < 1e-6
