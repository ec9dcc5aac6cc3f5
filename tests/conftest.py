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
