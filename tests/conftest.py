"""Shared fixtures. Real data lives in ../shared (or $MEDLDM_SHARED); in CI its absence is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, SHARED, TINY_CONFIG, shared_path

__all__ = ["REPO", "SHARED", "shared_path"]

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs JOBS pytest-xdist workers (Makefile)
    # one torch thread per worker and per process it starts: two workers of two threads on 2 cores contend
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ixi_files() -> list[Path]:
    files = sorted(shared_path("data/mri/ixi-t1-2mm").glob("*.nii.gz"))
    assert files, "no IXI volumes found"
    return files


@pytest.fixture(scope="session")
def ixi_path(ixi_files) -> Path:
    return ixi_files[0]


# The quick lane (`make test-quick`, marker `slow` left out) skips what trains or runs models end to end: whole
# modules of such tests, and any test that asks for a model folder fixture. `make test` runs everything.
SLOW_MODULES = {
    "test_pipeline",
    "test_estimator",
    "test_train",
    "test_cohort",
    "test_provenance",
    "test_bids",
    "test_dicom_out",
    "test_install",
    "test_api",
}
MODEL_FIXTURES = {"tiny_model", "trained_models", "estimator_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in SLOW_MODULES or MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An existing, empty output folder: after a refused command it must still be empty (no temporary files)."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained model folder of configs/tiny_2d.yaml (cheap: no training), plus a denoiser of another
    architecture (other channel counts) saved beside it."""
    from safetensors.torch import save_file

    from medldm.checkpoint import write_model_folder
    from medldm.config import Config, load_config
    from medldm.nets import build_autoencoder, build_denoiser

    cfg, _ = load_config(TINY_CONFIG, data_root=shared_path("data"))
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_model")
    write_model_folder(
        root / "model",
        config=cfg.model_dump(),
        info={"latent_scale": 1.0, "spatial_dims": 2},
        modules={"autoencoder": build_autoencoder(cfg), "denoiser": build_denoiser(cfg)},
    )
    other = cfg.model_dump()
    other["diffusion"]["channels"] = [24, 48]
    foreign = build_denoiser(Config.model_validate(other))
    save_file({k: v.contiguous() for k, v in foreign.state_dict().items()}, str(root / "foreign.safetensors"))
    return root


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory) -> dict[str, Path]:
    """Model folders of the tiny 2D and 3D configs, trained once for the whole run for a few steps (weights are
    real, if untaught). Read only: tests that change a model copy it first."""
    from tests.helpers import tiny, trainer

    out = {}
    for name in ("tiny_2d", "tiny_3d"):
        config, root = tiny(name)
        run = tmp_path_factory.mktemp(name)
        trainer(config, root, run).run("all")
        out[name] = run / "model"
    return out


@pytest.fixture(scope="session")
def estimator_run(tmp_path_factory) -> Path:
    """A run folder of the tiny config with an estimator stage, all stages trained once for the whole run (its
    model in ``model/``). Read only."""
    from tests.helpers import tiny_with_estimator, trainer

    config, root = tiny_with_estimator()
    run = tmp_path_factory.mktemp("estimator")
    trainer(config, root, run).run("all")
    return run
