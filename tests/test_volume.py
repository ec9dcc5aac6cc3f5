"""Volume I/O and geometry on real scans: DICOM vs NIfTI, oblique round trips, NRRD, grid maths."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medldm import MedldmError
from medldm.volume import (
    Volume,
    crop_to_multiple,
    face_corners,
    load,
    rescaled_affine,
    rescaled_shape,
    resolve_axis,
    save_nifti,
)
from tests.helpers import shared_path

DICOM_SERIES = [
    ("data/mri/trio-b17-t1-mprage/dicom", "data/mri/trio-b17-t1-mprage/trio_b17_t1_mprage.nii.gz"),
    ("data/mri/dcm_qa-philips-t1-mprage/dicom", "data/mri/dcm_qa-philips-t1-mprage/dcmqa_philips_adni_mprage.nii.gz"),
]


def assert_same_scan(a: Volume, b: Volume, *, atol_mm=0.01, atol_value=0.0):
    """Same voxels in world space: compare in canonical orientation, and the field-of-view corners."""
    ca, cb = a.to_canonical(), b.to_canonical()
    assert ca.shape == cb.shape
    np.testing.assert_allclose(ca.data, cb.data, atol=atol_value, rtol=0)
    np.testing.assert_allclose(face_corners(ca.shape, ca.affine), face_corners(cb.shape, cb.affine), atol=atol_mm)
    np.testing.assert_allclose(corner_set(a), corner_set(b), atol=atol_mm)


def corner_set(v: Volume) -> np.ndarray:
    """The 8 field-of-view corners in an order that does not depend on the voxel axis order."""
    c = np.round(face_corners(v.shape, v.affine), 3)
    return c[np.lexsort(c.T[::-1])]


@pytest.mark.parametrize(("dicom", "nifti"), DICOM_SERIES, ids=["siemens-trio", "philips"])
def test_dicom_series_matches_its_nifti_conversion(dicom, nifti):
    from_dicom = load(shared_path(dicom))
    from_nifti = load(shared_path(nifti))
    assert from_dicom.meta["format"] == "dicom" and from_dicom.meta["modality"] == "MR"
    # Philips stores rescaled floats: the conversion kept float32 precision of slope * value + intercept
    assert_same_scan(from_dicom, from_nifti, atol_value=1e-3 * float(from_nifti.data.max()))


def test_single_slice_file_opens_its_series():
    folder = shared_path("data/mri/trio-b17-t1-mprage/dicom")
    vol = load(sorted(folder.glob("*.dcm"))[10])
    assert vol.shape == (256, 256, 176)


def test_enhanced_multiframe_matches_classic_series(tmp_path):
    """A legacy-converted enhanced MR image (one file, 176 frames) loads to the same volume as the series."""
    import pydicom
    from highdicom import UID
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    folder = shared_path("data/mri/trio-b17-t1-mprage/dicom")
    datasets = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    enhanced = LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=UID(), series_number=99, sop_instance_uid=UID(), instance_number=1
    )
    enhanced.save_as(tmp_path / "enhanced.dcm")
    multi = load(tmp_path / "enhanced.dcm")
    classic = load(folder)
    np.testing.assert_array_equal(multi.data, classic.data)
    np.testing.assert_allclose(multi.affine, classic.affine, atol=1e-6)


@pytest.mark.parametrize("name", ["shear_gantry_tilt.nii.gz", "CT_pitch.nii.gz"])
def test_oblique_phantoms_survive_load_save_load(tmp_path, name):
    original = load(shared_path(f"data/ct/ct-phantoms-niivue/{name}"))
    save_nifti(original, tmp_path / name)
    again = load(tmp_path / name)
    np.testing.assert_array_equal(again.affine, original.affine)
    np.testing.assert_array_equal(again.data, original.data)
    header = nib.load(tmp_path / name).header
    assert int(header["sform_code"]) > 0 and int(header["qform_code"]) > 0


def test_random_oblique_affine_survives_round_trips(tmp_path):
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = q @ np.diag([0.7, 1.3, 2.9]) @ (np.eye(3) + 0.1 * np.triu(rng.normal(size=(3, 3)), 1))
    affine[:3, 3] = rng.normal(scale=50, size=3)
    data = rng.normal(size=(17, 12, 9)).astype(np.float32)
    save_nifti(Volume(data, affine), tmp_path / "a.nii.gz")
    first = load(tmp_path / "a.nii.gz")  # the file stores the affine in float32
    np.testing.assert_allclose(first.affine, affine, rtol=1e-6, atol=1e-5)
    save_nifti(first, tmp_path / "b.nii")
    second = load(tmp_path / "b.nii")
    np.testing.assert_array_equal(second.affine, first.affine)
    np.testing.assert_array_equal(second.data, data)


def test_canonical_round_trip_is_lossless(ixi_path):
    vol = load(ixi_path)
    assert vol.orientation == "PSR"
    canonical = vol.to_canonical()
    assert canonical.orientation == "RAS"
    assert_same_scan(vol, canonical, atol_mm=1e-9)
    back = canonical.from_canonical()
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-12)


def test_nrrd_thick_slice_scan_loads_with_header_geometry(tmp_path):
    import nrrd

    path = shared_path("data/mri/tcga-gbm-pyradiomics/brain1_image.nrrd")
    _, header = nrrd.read(str(path), index_order="F")
    vol = load(path)
    assert vol.shape == (256, 256, 25)
    np.testing.assert_allclose(vol.spacing, [0.78125, 0.78125, 6.5], atol=1e-3)
    # NRRD is LPS: RAS x and y are negated, z kept
    lps_origin = np.asarray(header["space origin"], dtype=float)
    np.testing.assert_allclose(vol.affine[:3, 3], lps_origin * [-1, -1, 1])
    save_nifti(vol, tmp_path / "brain1.nii.gz")
    assert_same_scan(load(tmp_path / "brain1.nii.gz"), vol, atol_mm=1e-4)


def test_upscaled_grid_keeps_field_of_view():
    rng = np.random.default_rng(0)
    affine = np.eye(4)
    affine[:3, :3] = rng.normal(size=(3, 3))
    affine[:3, 3] = rng.normal(size=3)
    shape = (30, 20, 12)
    for factors in ([1, 1, 0.25], [0.5, 0.5, 1], [3, 1, 1], [1 / 3, 2, 0.5]):
        new_shape = rescaled_shape(shape, factors)
        new_affine = rescaled_affine(affine, factors)
        np.testing.assert_allclose(face_corners(new_shape, new_affine), face_corners(shape, affine), atol=1e-9)
        np.testing.assert_allclose(
            np.linalg.norm(new_affine[:3, :3], axis=0), np.linalg.norm(affine[:3, :3], axis=0) * factors
        )
    with pytest.raises(MedldmError, match="whole number"):
        rescaled_shape((30, 20, 13), [1, 1, 4])


def test_world_axis_names_follow_orientation(ixi_path):
    vol = load(ixi_path)  # PSR: voxel axis 0 -> A-P, 1 -> S-I, 2 -> R-L
    assert [resolve_axis(vol, a) for a in "xyz"] == [2, 0, 1]
    assert resolve_axis(vol, "k") == 2 and resolve_axis(vol, 1) == 1
    thick = Volume(np.zeros((8, 8, 4)), np.diag([1.0, 1.0, 5.0, 1.0]))
    assert resolve_axis(thick, "auto") == 2
    with pytest.raises(MedldmError, match="unknown axis"):
        resolve_axis(vol, "w")


def test_crop_to_multiple_moves_origin_not_world(ixi_path):
    vol = load(ixi_path)
    cropped = crop_to_multiple(vol, 2, 4)  # 90 -> 88 voxels, one from each end
    assert cropped.shape == (120, 120, 88)
    world_of_first = vol.affine @ np.array([0, 0, 1, 1.0])
    np.testing.assert_allclose(cropped.affine @ np.array([0, 0, 0, 1.0]), world_of_first)
    np.testing.assert_array_equal(cropped.data, vol.data[:, :, 1:89])


def test_save_refuses_to_overwrite(tmp_path, ixi_path):
    vol = load(ixi_path)
    out = tmp_path / "x.nii.gz"
    save_nifti(vol, out)
    stamp = out.stat().st_mtime_ns
    with pytest.raises(MedldmError, match="--overwrite"):
        save_nifti(vol, out)
    assert out.stat().st_mtime_ns == stamp
    save_nifti(vol, out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name != "x.nii.gz"], "temporary files left behind"


def test_interrupted_write_leaves_no_output_under_the_final_name(tmp_path, ixi_path, monkeypatch):
    import os

    vol = load(ixi_path)
    out = tmp_path / "sr.nii.gz"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died between writing and renaming

    monkeypatch.setattr(os, "replace", killed)  # the move into place: a rename, or a link for a new name
    monkeypatch.setattr(os, "link", killed)
    for overwrite in (False, True):
        with pytest.raises(KeyboardInterrupt):
            save_nifti(vol, out, overwrite=overwrite)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file was removed too
