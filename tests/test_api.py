"""The Python API (medldm.api): the user guide's example runs as written, and arrays, nibabel images and Volumes
give the same result as a path."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medldm
from medldm.errors import MedldmError
from tests.helpers import _ixi

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "user_guide.md"


def _thick_scan(path: Path) -> Path:
    """A small IXI block with 8 mm axial slices (along world z: IXI's voxel axis 1, stored PSR), 2 x 8 x 2 mm."""
    data, affine = _ixi()
    block = data[36:100, 40:72, 20:84].astype(np.float32)
    thick = block.reshape(64, 8, 4, 64).mean(axis=2)
    nib.save(nib.Nifti1Image(thick, affine @ np.diag([1.0, 4.0, 1.0, 1.0])), str(path))
    return path


def test_the_user_guides_python_example_runs(tmp_path, monkeypatch):
    code = re.search(r"## From Python.*?```python\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    _thick_scan(tmp_path / "scan.nii.gz")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(GUIDE), "exec"), namespace)  # noqa: S102 (our own documentation)
    written = nib.load(tmp_path / "scan_sr.nii.gz")
    assert written.shape == (64, 32, 64) and np.allclose(written.header.get_zooms(), (2, 2, 2), atol=1e-4)
    sharp = namespace["sharp"]
    assert np.array_equal(np.asarray(written.dataobj), sharp.data)


def test_a_nibabel_image_and_a_volume_give_what_a_path_gives(tmp_path):
    path = _thick_scan(tmp_path / "scan.nii.gz")
    from_path = medldm.upscale(path, scale=4, axis="z", refine=0)
    from_image = medldm.upscale(nib.load(path), scale=4, axis="z", refine=0)
    assert np.array_equal(from_path.data, from_image.data) and np.allclose(from_path.affine, from_image.affine)


def test_an_array_without_its_affine_is_refused():
    with pytest.raises(MedldmError, match="needs its affine"):
        medldm.upscale(np.zeros((8, 8, 8), np.float32))
