"""Two-stage training on real IXI scans with the tiny configs: runs, learns, resumes exactly, runs on 2 ranks."""

from __future__ import annotations

import copy
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from medldm import MedldmError
from medldm.checkpoint import latest_checkpoint, read_model_folder
from medldm.config import parse_config
from medldm.data import PairSampler
from medldm.train import Trainer
from tests.conftest import REPO, SHARED, shared_path

DATA = SHARED / "data"
LPIPS = SHARED / "weights" / "lpips"


def tiny(name: str = "tiny_2d", **changes):
    """The tiny config with nested overrides such as training={"autoencoder": {"steps": 8}}."""
    shared_path("data/mri/ixi-t1-2mm")
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())

    def merge(into, new):
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    merge(raw, copy.deepcopy(changes))
    config, root = parse_config(raw, data_root=DATA)
    return config, root


def trainer(config, root, run_dir, **kw) -> Trainer:
    return Trainer(config, root, run_dir, lpips_weights=str(LPIPS), progress=False, **kw)


def rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


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


def _one_batch(monkeypatch):
    """Make every step draw the same batch, for overfitting."""
    original = PairSampler.batch
    monkeypatch.setattr(PairSampler, "batch", lambda self, step, n, size=None, **kw: original(self, 0, n, size))


def test_overfitting_one_batch_halves_the_loss(tmp_path, monkeypatch):
    _one_batch(monkeypatch)
    config, root = tiny(training={"log_every": 1, "checkpoint_every": 1000,
                                  "autoencoder": {"steps": 60, "lr": 3e-3, "ema_decay": 0.5},
                                  "diffusion": {"steps": 60, "lr": 2e-3, "ema_decay": 0.5}},
                        autoencoder={"adversarial_weight": 0.0})
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_data_parallel_ranks_end_with_identical_weights(tmp_path):
    shared_path("data/mri/ixi-t1-2mm")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MEDLDM_DATA_ROOT": str(DATA)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / "ddp_worker.py"),
           str(REPO / "configs" / "tiny_2d.yaml"), str(tmp_path / "run"), str(LPIPS)]
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
    "missing folder": ({"data": {"sources": [{"glob": "mri/no-such-folder/*.nii.gz"}]}},
                       "key 'data.sources.0.glob': no files match"),
    "spatial_dims 4": ({"data": {"spatial_dims": 4}}, "key 'data.spatial_dims'"),
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
    result = subprocess.run([sys.executable, "-m", "medldm.cli", "train", "--config", str(path), "--data-root",
                             str(DATA), "--run-dir", str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_refuses_to_train_over_an_existing_run(tmp_path):
    config, root = tiny()
    trainer(config, root, tmp_path / "run").run("autoencoder", max_steps=2)
    config_path = str(REPO / "configs/tiny_2d.yaml")
    result = subprocess.run([sys.executable, "-m", "medldm.cli", "train", "--config", config_path,
                             "--data-root", str(DATA), "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "--resume" in result.stderr


def test_vq_autoencoder_and_dit_denoiser_train_and_upscale(tmp_path, ixi_path):
    from medldm.degrade import degrade_volume
    from medldm.pipeline import Upscaler
    from medldm.volume import crop, load

    config, root = tiny(autoencoder={"kind": "vq", "num_embeddings": 16},
                        diffusion={"denoiser": "dit", "patch": 2, "depth": 2, "width": 32, "heads": 2})
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
    base = [sys.executable, "-m", "medldm.cli", "train", "--config", str(cfg_path), "--data-root", str(DATA),
            "--lpips-weights", str(LPIPS), "--stage", "autoencoder"]
    proc = subprocess.Popen([*base, "--run-dir", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    result = subprocess.run([*base, "--resume", str(run), "--max-steps", str(step + 2)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert latest_checkpoint(run / "autoencoder").name == f"step_{step + 2:07d}"
