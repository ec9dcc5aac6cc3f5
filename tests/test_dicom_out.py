"""DICOM output (issue 22): a derived series that opens in pydicom as one series and reads back through
`medldm convert` on the same grid with the same values (within one quantisation step)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medldm.volume import face_corners, load
from tests.helpers import _series, _small_scan, assert_refused, medldm, shared_path

CT_HEAD = "data/ct/invesalius-ct-head/invesalius_cranium_ct.nii.gz"
GANTRY_TILT = "data/ct/ct-phantoms-niivue/shear_gantry_tilt.nii.gz"  # a slice axis not normal to the slices


def _oblique_mr(tmp: Path) -> Path:
    """An IXI block on a grid turned 20 degrees about the left-right axis."""
    scan = nib.load(_small_scan(tmp))
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    turn = np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1.0]])
    path = tmp / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(scan.dataobj, np.float32), turn @ scan.affine), str(path))
    return path


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in sorted(folder.iterdir())]


@pytest.mark.parametrize("case", ["ct-head-hu", "ct-gantry-tilt", "mr", "mr-oblique"])
def test_a_dicom_output_reads_back_on_the_same_grid_and_values(tmp_path, case):
    source = {
        "ct-head-hu": lambda: shared_path(CT_HEAD),
        "ct-gantry-tilt": lambda: shared_path(GANTRY_TILT),
        "mr": lambda: _small_scan(tmp_path),
        "mr-oblique": lambda: _oblique_mr(tmp_path),
    }[case]()
    series, back = tmp_path / "series", tmp_path / "back.nii.gz"
    assert medldm("convert", source, series, "--format", "dicom").returncode == 0
    datasets = _read_series(series)
    original = load(source)
    assert len(datasets) == original.shape[2] and len({d.SeriesInstanceUID for d in datasets}) == 1
    assert {d.Modality for d in datasets} == {"CT" if case.startswith("ct") else "MR"}
    assert all(list(d.ImageType) == ["DERIVED", "SECONDARY"] for d in datasets)
    assert medldm("convert", series, back).returncode == 0
    # DICOM stacks slices along row x column, which may run against voxel axis k: the same grid, maybe stored in
    # the other order, so both are compared in RAS+ voxel order (flips and swaps only: no resampling)
    again, original = load(back).to_canonical(), original.to_canonical()
    assert again.shape == original.shape
    corners = np.abs(face_corners(again.shape, again.affine) - face_corners(original.shape, original.affine))
    assert corners.max() < 0.01  # mm
    step = float(datasets[0].RescaleSlope)
    assert np.abs(again.data - original.data).max() <= step * 0.5 + 1e-3 * step
    if case == "ct-head-hu":
        assert step == 1.0 and float(datasets[0].RescaleIntercept) == 0.0 and datasets[0].RescaleType == "HU"
        assert np.array_equal(again.data, original.data)  # whole Hounsfield units


def test_a_series_made_from_a_dicom_series_keeps_its_patient_and_study(tmp_path):
    folder, files = _series(tmp_path)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert medldm("convert", folder, tmp_path / "derived", "--format", "dicom").returncode == 0
    derived = _read_series(tmp_path / "derived")
    for key in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert {str(d[key].value) for d in derived} == {str(source[key].value)}, key
    assert derived[0].SeriesInstanceUID != source.SeriesInstanceUID
    assert len({d.SOPInstanceUID for d in derived}) == len(derived)


def test_upscale_writes_a_dicom_series_with_its_sidecar(tmp_path, tiny_model):
    scan, out = _small_scan(tmp_path), tmp_path / "up"
    result = medldm(
        "upscale",
        scan,
        "--model",
        tiny_model / "model",
        "-o",
        out,
        "--format",
        "dicom",
        "--device",
        "cpu",
        "--axis",
        "k",
        "--kind",
        "slice-profile",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "up.json").read_text())
    datasets = _read_series(out)
    assert len(datasets) == record["medldm"]["output"]["shape"][2]
    assert "medldm" in datasets[0].SeriesDescription and datasets[0].DerivationDescription.startswith("medldm")
    again = medldm("upscale", scan, "--model", tiny_model / "model", "-o", out, "--format", "dicom", "--device", "cpu")
    assert_refused(again, out, "already exists")


def test_a_dicom_output_over_a_file_is_refused_before_any_work(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    assert_refused(medldm("convert", _small_scan(tmp_path), taken, "--format", "dicom"), taken, "is a file")
    assert taken.read_text() == "mine"
