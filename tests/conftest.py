"""Shared fixtures. Real data lives in ../shared (or $MEDLDM_SHARED); in CI its absence is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDLDM_SHARED", REPO.parent / "shared"))


def shared_path(relative: str) -> Path:
    """Path under the shared data folder; fails in CI (CI=true) and skips elsewhere when it is missing."""
    path = SHARED / relative
    if not path.exists():
        message = f"shared test data missing: {path} (set MEDLDM_SHARED)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


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
SLOW_MODULES = {"test_pipeline", "test_estimator", "test_train", "test_cohort", "test_provenance", "test_bids",
                "test_dicom_out", "test_install", "test_api"}
MODEL_FIXTURES = {"tiny_model", "models", "model"}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in SLOW_MODULES or MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
