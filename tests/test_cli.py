"""The command line as a user runs it: real scans in, one-line errors for bad input, nothing written."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medldm.volume import face_corners, load
from tests.helpers import medldm, shared_path

TRIO = "data/mri/trio-b17-t1-mprage/dicom"
PHILIPS = "data/mri/dcm_qa-philips-t1-mprage/dicom"


def dicom_by_position(folder: Path) -> list[Path]:
    """Slice files of a single-series folder sorted along the slice normal."""
    files = sorted(folder.glob("*.dcm"))
    ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.asarray(ds[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return [f for _, f in sorted(zip([np.dot(d.ImagePositionPatient, normal) for d in ds], files, strict=True))]


def copy_slices(files: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, dest / f.name)
    return dest


# ------------------------------------------------------------------------------------------- bad inputs
def _missing(tmp: Path) -> Path:
    return tmp / "no_such_scan.nii.gz"


def _truncated(tmp: Path) -> Path:
    src = sorted(shared_path("data/mri/ixi-t1-2mm").glob("*.nii.gz"))[0].read_bytes()
    out = tmp / "truncated.nii.gz"
    out.write_bytes(src[: len(src) // 2])
    return out


def _image_2d(tmp: Path) -> Path:
    out = tmp / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32), np.float32), np.eye(4)), out)
    return out


def _nan(tmp: Path) -> Path:
    data = np.ones((16, 16, 16), np.float32)
    data[3, 4, 5], data[1, 1, 1] = np.nan, np.inf
    out = tmp / "nan.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), out)
    return out


def _two_series(tmp: Path) -> Path:
    dest = tmp / "two_series"
    copy_slices(sorted(shared_path(TRIO).glob("*.dcm"))[:6], dest)
    copy_slices(sorted(shared_path(PHILIPS).glob("*.dcm"))[:6], dest)
    return dest


def _missing_slice(tmp: Path) -> Path:
    files = dicom_by_position(shared_path(TRIO))[40:60]
    del files[9]
    return copy_slices(files, tmp / "gap")


def _empty_dir(tmp: Path) -> Path:
    dest = tmp / "nothing_here"
    dest.mkdir()
    (dest / "readme.txt").write_text("not an image")
    return dest


BAD_INPUTS = {
    "missing path": (_missing, "no such file"),
    "truncated gzip": (_truncated, "truncated"),
    "2D image": (_image_2d, "2D image"),
    "NaN and Inf": (_nan, "2 voxels are NaN or infinite"),
    "two DICOM series": (_two_series, "holds 2 DICOM series"),
    "missing slice": (_missing_slice, "uneven slice gaps"),
    "no images": (_empty_dir, "no DICOM images found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, case):
    make, cause = BAD_INPUTS[case]
    scan = make(tmp_path)
    out = tmp_path / "out" / "converted.nii.gz"
    for args in (["info", scan], ["convert", scan, out], ["degrade", scan, out]):
        result = medldm(*args)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert str(scan) in lines[0] and cause in lines[0], lines[0]
        assert not out.parent.exists()


def test_existing_output_is_refused_without_overwrite(tmp_path, ixi_path):
    out = tmp_path / "lr.nii.gz"
    out.write_bytes(b"precious")
    result = medldm("degrade", ixi_path, out)
    assert result.returncode == 1 and "--overwrite" in result.stderr and str(out) in result.stderr
    assert out.read_bytes() == b"precious"
    assert medldm("degrade", ixi_path, out, "--overwrite").returncode == 0
    assert load(out).shape == (120, 30, 90)  # IXI is PSR: z is voxel axis 1


def test_convert_dicom_series_to_nifti(tmp_path):
    out = tmp_path / "trio.nii.gz"
    result = medldm("convert", shared_path(TRIO), out)
    assert result.returncode == 0, result.stderr
    converted, reference = load(out), load(shared_path("data/mri/trio-b17-t1-mprage/trio_b17_t1_mprage.nii.gz"))
    np.testing.assert_array_equal(converted.to_canonical().data, reference.to_canonical().data)
    np.testing.assert_allclose(
        face_corners(converted.shape, converted.affine), face_corners(reference.shape, reference.affine), atol=0.01
    )


def test_series_option_picks_one_of_two(tmp_path):
    folder = _two_series(tmp_path)
    uid = str(pydicom.dcmread(sorted(shared_path(TRIO).glob("*.dcm"))[0]).SeriesInstanceUID)
    result = medldm("info", folder, "--series", uid)
    assert result.returncode == 0, result.stderr
    assert "256 x 256 x 6" in result.stdout


def test_version_prints_the_package_version():
    from medldm import __version__

    result = medldm("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"medldm {__version__}"


def test_info_reports_geometry_and_modality():
    result = medldm("info", shared_path("data/ct/invesalius-ct-head/invesalius_cranium_ct.nii.gz"))
    assert result.returncode == 0, result.stderr
    for text in ("256 x 256 x 108", "0.957", "RAS", "CT", "-1024"):
        assert text in result.stdout


def test_degrade_writes_thick_slices_with_same_field_of_view(tmp_path, ixi_path):
    lr_path, hr_path = tmp_path / "lr.nii.gz", tmp_path / "hr.nii.gz"
    result = medldm("degrade", ixi_path, lr_path, "--axis", "z", "--scale", "4", "--hr-out", hr_path)
    assert result.returncode == 0, result.stderr
    lr, hr, original = load(lr_path), load(hr_path), load(ixi_path)
    assert hr.shape == original.shape == (120, 120, 90)  # z (voxel axis 1, 120 voxels) needs no crop
    assert lr.shape == (120, 30, 90)
    np.testing.assert_allclose(lr.spacing, [2.0, 8.0, 2.0], rtol=1e-5)
    np.testing.assert_allclose(face_corners(lr.shape, lr.affine), face_corners(hr.shape, hr.affine), atol=1e-3)


def test_gzip_module_agrees_file_is_truncated(tmp_path):
    """Guard for the truncated-file case above: the fixture really is a broken gzip stream."""
    with pytest.raises(EOFError), gzip.open(_truncated(tmp_path)) as fh:
        fh.read()


def test_cli_defaults_are_the_upscalers():
    """`medldm upscale` and `medldm evaluate` sample with the library's defaults (one place decides them)."""
    import inspect

    from medldm.cli import evaluate, upscale
    from medldm.evaluation.evaluate import evaluate as run_evaluation

    from medldm.pipeline import Upscaler

    library = inspect.signature(Upscaler.__init__).parameters
    for command in (upscale, evaluate, run_evaluation):
        params = inspect.signature(command).parameters
        for name in ("steps", "refine", "sampler", "planes"):
            default = params[name].default
            assert getattr(default, "value", default) == library[name].default, (command.__name__, name)
