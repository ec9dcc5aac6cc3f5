"""A non-editable install (what `pip install .` gives) works from any folder: the default model and the configs
travel inside the package (issue 22)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "medldm", "cli", "evaluation", "configs")


def test_an_installed_copy_has_its_model_and_configs(tmp_path):
    source, site, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
    source.mkdir()
    for name in SOURCES:  # a clean copy: no build/ folder left by an earlier build can leak into the package
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(
            REPO / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if (REPO / name).is_dir() else {}),
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import medldm, medldm.model as p, medldm.config as c; print(medldm.__file__); "
        "m = p.load_model('default'); print(m.config.name); print(' '.join(c.shipped_configs())); "
        "print(c.load_config('brain_mri', check_files=False)[0].name)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    where, model, configs, loaded = run.stdout.splitlines()
    assert Path(where).is_relative_to(site)  # the installed copy, not the checkout
    assert model == "brain_mri" and loaded == "brain_mri"
    assert {"brain_mri", "ct_head", "tiny_2d"} <= set(configs.split())
    version = subprocess.run(
        [sys.executable, "-m", "medldm.cli", "--version"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert version.returncode == 0 and version.stdout.startswith("medldm "), version.stderr
