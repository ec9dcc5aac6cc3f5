"""Malformed inputs, each made here from the real scans and config in the repository: the CLI must exit 1 with
one stderr line ``error: <file>: <cause>``, no traceback, and leave nothing (not even a partial file) behind.

Cases beyond tests/test_cli.py: broken NIfTI headers and voxel types, damaged DICOM series, NRRD without
geometry, bad training configs and tampered model folders. A few positive cases document what is accepted
(a 4D file holding one volume, a negative pixdim under a valid sform, one DICOM slice standing for its series).
Property tests (hypothesis) check the geometry round trips and the linearity of the forward models.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import pathlib
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, generate_uid

from medldm.degrade import make_operator
from medldm.errors import MedldmError
from medldm.volume import Volume, face_corners, load, rescaled_affine, rescaled_shape, save_nifti
from tests.helpers import (
    TINY_CONFIG,
    TRIO,
    _edit_dicom,
    _ixi,
    _ixi_path,
    _patched_ixi,
    _reseal,
    _save,
    _series,
    _set_pixdim,
    _trio_slices,
    assert_refused,
    medldm,
    shared_path,
)

BRAIN_NRRD = "data/mri/tcga-gbm-pyradiomics/brain1_image.nrrd"


# ------------------------------------------------------------------------------------------------ helpers


# --------------------------------------------------------------------------------------- NIfTI bad inputs
def truncated_gzip_tail(tmp):
    raw = _ixi_path().read_bytes()
    path = tmp / "tail_cut.nii.gz"
    path.write_bytes(raw[:-4096])  # most voxels are there; the deflate stream just stops
    return path, path


def truncated_nii(tmp):
    raw = gzip.decompress(_ixi_path().read_bytes())
    path = tmp / "half.nii"
    path.write_bytes(raw[: len(raw) // 2])
    return path, path


def vox_offset_past_end(tmp):
    size = len(gzip.decompress(_ixi_path().read_bytes()))

    def edit(hdr):
        hdr["vox_offset"] = size + 4096

    path = _patched_ixi(tmp, "offset.nii", edit)
    return path, path


def zero_pixdim(tmp):
    def edit(hdr):  # qform only: the geometry rests on pixdim, which nibabel would silently set to 1 mm
        _set_pixdim(hdr, 3, 0.0)
        hdr["sform_code"] = 0

    path = _patched_ixi(tmp, "zero_pixdim.nii.gz", edit)
    return path, path


def singular_sform(tmp):
    def edit(hdr):  # third sform column zero, no qform to fall back on
        for row in ("srow_x", "srow_y", "srow_z"):
            values = hdr[row].copy()
            values[2] = 0.0
            hdr[row] = values
        hdr["qform_code"] = 0

    path = _patched_ixi(tmp, "singular.nii.gz", edit)
    return path, path


def many_volumes(tmp):
    data, _ = _ixi()
    path = _save(tmp, "fmri.nii.gz", np.stack([data] * 5, axis=-1))
    return path, path


def complex_voxels(tmp):
    data, _ = _ixi()
    path = _save(tmp, "complex.nii.gz", data.astype(np.complex64) * (1 + 1j))
    return path, path


def rgb_voxels(tmp):
    data, _ = _ixi()
    rgb = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"], rgb["B"] = data, data // 2, data // 4
    path = _save(tmp, "rgb.nii.gz", rgb)
    return path, path


def nan_voxel(tmp):
    data, _ = _ixi()
    data = data.astype(np.float32)
    data[60, 60, 45] = np.nan
    path = _save(tmp, "nan.nii.gz", data)
    return path, path


def inf_voxels(tmp):
    data, _ = _ixi()
    data = data.astype(np.float32)
    data[0, 0, 0], data[10, 20, 30], data[-1, -1, -1] = np.inf, -np.inf, np.inf
    path = _save(tmp, "inf.nii.gz", data)
    return path, path


def one_voxel_thick(tmp):
    data, _ = _ixi()
    path = _save(tmp, "thin.nii.gz", data[:, 60:61, :])
    return path, path


def huge_declared_size(tmp):
    """A NIfTI-2 header declaring 40000^3 int16 voxels (~116 TiB) on a file of a few kilobytes."""
    data, affine = _ixi()
    hdr = nib.Nifti2Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((40000, 40000, 40000))
    hdr.set_sform(affine, code=1)
    hdr["vox_offset"] = 544
    path = tmp / "huge.nii.gz"
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + data.astype(np.int16).tobytes()[:65536]))
    return path, path


def dicom_renamed(tmp):
    path = tmp / "scan.nii.gz"
    shutil.copy(_trio_slices()[0], path)
    return path, path


def empty_file(tmp):
    path = tmp / "empty.nii.gz"
    path.write_bytes(b"")
    return path, path


def folder_named_like_a_file(tmp):
    path = tmp / "scan.nii.gz"
    path.mkdir()
    return path, path


# --------------------------------------------------------------------------------------- DICOM bad inputs


def mixed_series(tmp):
    folder, files = _series(tmp)
    uid = generate_uid()
    for f in files[4:]:
        _edit_dicom(f, lambda ds: setattr(ds, "SeriesInstanceUID", uid))
    return folder, folder


def duplicate_position(tmp):
    folder, files = _series(tmp)
    position = pydicom.dcmread(files[3], stop_before_pixels=True).ImagePositionPatient
    _edit_dicom(files[4], lambda ds: setattr(ds, "ImagePositionPatient", position))
    return folder, folder


def missing_slice_near_edge(tmp):
    folder, files = _series(tmp)
    files[1].unlink()
    return folder, folder


def rotated_slice(tmp):
    folder, files = _series(tmp)

    def rotate(ds):  # turn the row and column directions 10 degrees about the slice normal
        iop = np.asarray(ds.ImageOrientationPatient, float)
        row, col = iop[:3], iop[3:]
        c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*(c * row + s * col), *(-s * row + c * col))]

    _edit_dicom(files[5], rotate)
    return folder, files[5]


def missing_pixel_spacing(tmp):
    folder, files = _series(tmp)
    _edit_dicom(files[2], lambda ds: delattr(ds, "PixelSpacing"))
    return folder, files[2]


def _compress_all(files: list[Path], syntax) -> None:
    """Declare a compressed transfer syntax and encapsulate the raw bytes (not a valid codestream)."""

    def edit(ds):
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax

    for f in files:
        ds = pydicom.dcmread(f)
        edit(ds)
        ds.save_as(f, enforce_file_format=True)


def _decoder_available(syntax) -> bool:
    from pydicom.pixels import get_decoder

    return get_decoder(syntax).is_available


def compressed_without_decoder(tmp):
    folder, files = _series(tmp, 4)
    _compress_all(files, JPEGLosslessSV1)
    return folder, folder


def compressed_damaged(tmp):
    folder, files = _series(tmp, 4)
    _compress_all(files, JPEG2000Lossless)
    return folder, folder


def only_non_dicom(tmp):
    dest = tmp / "notes"
    dest.mkdir()
    for f in sorted(shared_path(TRIO).glob("*.nfo"))[:5]:  # the real dcmdump notes beside the slices
        shutil.copy(f, dest / f.name)
    assert any(dest.iterdir())
    return dest, dest


def truncated_edge_slice_header(tmp):
    """The first slice cut inside its header: pydicom reads the stub without complaint; skipping it would
    silently lose a slice at the edge of the field of view, where no gap betrays it."""
    folder, files = _series(tmp)
    files[0].write_bytes(files[0].read_bytes()[:2000])
    return folder, files[0]


def truncated_slice_pixels(tmp):
    folder, files = _series(tmp)
    files[4].write_bytes(files[4].read_bytes()[:-5000])
    return folder, files[4]


# ---------------------------------------------------------------------------------------- NRRD bad inputs
@functools.cache
def _brain_nrrd() -> tuple[np.ndarray, dict]:
    data, header = nrrd.read(str(shared_path(BRAIN_NRRD)))
    return data[96:160, 96:160, :].copy(), dict(header)  # a 64 x 64 x 25 block of the real scan, LPS


def _write_nrrd(path: Path, data: np.ndarray, header: dict) -> Path:
    nrrd.write(str(path), data, {k: v for k, v in header.items() if k not in ("sizes", "dimension", "type")})
    return path


def nrrd_without_directions(tmp):
    data, header = _brain_nrrd()
    header = {k: v for k, v in header.items() if k not in ("space", "space directions", "space origin")}
    header["spacings"] = [0.78125, 0.78125, 6.5]
    path = _write_nrrd(tmp / "spacings_only.nrrd", data, header)
    return path, path


def nrrd_truncated(tmp):
    data, header = _brain_nrrd()
    path = _write_nrrd(tmp / "cut.nrrd", data, header)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    return path, path


def nrrd_unknown_space(tmp):
    data, header = _brain_nrrd()
    path = _write_nrrd(tmp / "scanner.nrrd", data, header)
    raw = path.read_bytes()
    assert b"space: left-posterior-superior" in raw
    path.write_bytes(raw.replace(b"space: left-posterior-superior", b"space: scanner-xyz", 1))
    return path, path


def nrrd_4d(tmp):
    data, header = _brain_nrrd()
    header = {
        **header,
        "kinds": ["domain"] * 3 + ["list"],
        "space directions": np.vstack([header["space directions"], [np.nan] * 3]),
    }
    path = _write_nrrd(tmp / "dwi.nrrd", np.stack([data, data, data], axis=-1), header)
    return path, path


SCAN_CASES = [
    # NIfTI
    pytest.param(truncated_gzip_tail, ["truncated"], id="nifti-truncated-gzip-tail"),
    pytest.param(truncated_nii, ["voxel data cannot be read", "Expected 1296000 bytes"], id="nifti-truncated-nii"),
    pytest.param(vox_offset_past_end, ["past the end of the file", "vox_offset"], id="nifti-vox-offset-past-end"),
    pytest.param(zero_pixdim, ["voxel size (2.0, 2.0, 0.0)", "zero entry", "no sform"], id="nifti-zero-pixdim"),
    pytest.param(singular_sform, ["affine is singular"], id="nifti-singular-sform"),
    pytest.param(many_volumes, ["holds 5 volumes (4D)"], id="nifti-4d-five-volumes"),
    pytest.param(complex_voxels, ["voxel type complex64", "not a scalar image"], id="nifti-complex64"),
    pytest.param(rgb_voxels, ["('R', 'u1')", "not a scalar image"], id="nifti-rgb24"),
    pytest.param(nan_voxel, ["1 voxels are NaN or infinite"], id="nifti-nan"),
    pytest.param(inf_voxels, ["3 voxels are NaN or infinite"], id="nifti-inf"),
    pytest.param(one_voxel_thick, ["shape (120, 1, 90) is a single slice"], id="nifti-one-voxel-thick"),
    pytest.param(
        huge_declared_size, ["declared size (40000, 40000, 40000)", "GiB as float32"], id="nifti-huge-declared-size"
    ),
    pytest.param(dicom_renamed, ["not a readable NIfTI file", "not a gzip file"], id="nifti-is-really-dicom"),
    pytest.param(empty_file, ["not a readable NIfTI file", "Empty file"], id="nifti-empty-file"),
    pytest.param(folder_named_like_a_file, ["no DICOM images found"], id="nifti-name-on-a-folder"),
    # DICOM
    pytest.param(mixed_series, ["holds 2 DICOM series", "--series"], id="dicom-two-series-uids"),
    pytest.param(duplicate_position, ["two slices share position"], id="dicom-duplicate-position"),
    pytest.param(
        missing_slice_near_edge, ["uneven slice gaps: 2.000 mm", "a missing slice?"], id="dicom-missing-slice"
    ),
    pytest.param(rotated_slice, ["slice orientation differs within the series"], id="dicom-rotated-slice"),
    pytest.param(missing_pixel_spacing, ["missing PixelSpacing"], id="dicom-no-pixel-spacing"),
    pytest.param(compressed_without_decoder, None, id="dicom-jpeg-lossless-no-decoder"),
    pytest.param(compressed_damaged, None, id="dicom-jpeg2000-undecodable"),
    pytest.param(only_non_dicom, ["no DICOM images found"], id="dicom-folder-of-notes"),
    pytest.param(
        truncated_edge_slice_header, ["ends before its pixel data", "truncated"], id="dicom-truncated-header-at-edge"
    ),
    pytest.param(
        truncated_slice_pixels, ["pixel data cannot be read", "less than expected"], id="dicom-truncated-pixels"
    ),
    # NRRD
    pytest.param(nrrd_without_directions, ["no 'space directions'"], id="nrrd-no-space-directions"),
    pytest.param(nrrd_truncated, ["not a readable NRRD file, truncated or damaged?"], id="nrrd-truncated"),
    pytest.param(nrrd_unknown_space, ["NRRD space 'scanner-xyz' is not supported"], id="nrrd-unknown-space"),
    pytest.param(nrrd_4d, ["holds 3 volumes (4D)"], id="nrrd-4d"),
]

# cheap loads where `medldm info` is checked as well as `convert`
INFO_TOO = {
    "nifti-zero-pixdim",
    "nifti-rgb24",
    "nifti-huge-declared-size",
    "nifti-empty-file",
    "dicom-truncated-header-at-edge",
    "nrrd-no-space-directions",
}


def _compressed_phrases(case: str) -> list[str]:
    """What the user must be told depends on the decoders installed here: pydicom names them."""
    syntax = JPEGLosslessSV1 if "no-decoder" in case else JPEG2000Lossless
    if _decoder_available(syntax):
        return ["pixel data cannot be read"]  # a decoder exists and fails on the damaged codestream
    return ["no decoder is installed", "pip install pylibjpeg"]


@pytest.mark.parametrize("build, phrases", SCAN_CASES)
def test_bad_scan_is_refused_with_one_line(request, tmp_path, out_dir, build, phrases):
    case = request.node.callspec.id
    scan, offender = build(tmp_path)
    phrases = phrases or _compressed_phrases(case)
    out = out_dir / "converted.nii.gz"
    started = time.monotonic()
    line = assert_refused(medldm("convert", scan, out), offender, *phrases, out_dir=out_dir)
    elapsed = time.monotonic() - started
    if case == "dicom-jpeg2000-undecodable":
        assert "no decoder" not in line, "a decoder is installed: the data are damaged, not undecodable"
    if case == "nifti-huge-declared-size":
        assert elapsed < 30, f"refusing an impossible size took {elapsed:.0f} s: it should not read the file"
    if case in INFO_TOO:
        assert_refused(medldm("info", scan), offender, *phrases)


# ----------------------------------------------------------------------------------- accepted (documented)
def test_4d_file_with_one_volume_is_accepted_as_3d(tmp_path, out_dir):
    data, affine = _ixi()
    scan = _save(tmp_path, "one_volume.nii.gz", data[..., None])
    assert nib.load(scan).shape == (120, 120, 90, 1)
    out = out_dir / "squeezed.nii.gz"
    result = medldm("convert", scan, out)
    assert result.returncode == 0, result.stderr
    converted = nib.load(out)
    assert converted.shape == (120, 120, 90)
    np.testing.assert_allclose(converted.get_fdata(), data, rtol=1e-6)  # stored as float32
    np.testing.assert_allclose(converted.affine, affine, atol=1e-5)


def test_negative_pixdim_under_a_valid_sform_is_accepted(tmp_path, out_dir):
    """nibabel reads the geometry from the sform and replaces a negative pixdim by its absolute value (as
    NIfTI readers do; the handedness lives in the sform/qfac), so such a file is not an error."""
    scan = _patched_ixi(tmp_path, "negative_pixdim.nii.gz", lambda hdr: _set_pixdim(hdr, 1, -2.0))
    out = out_dir / "fine.nii.gz"
    result = medldm("convert", scan, out)
    assert result.returncode == 0, result.stderr
    data, affine = _ixi()
    converted = load(out)
    np.testing.assert_allclose(converted.affine, affine, atol=1e-5)
    np.testing.assert_allclose(converted.data, data, rtol=1e-6)


def test_single_dicom_slice_opens_its_series_and_refuses_when_alone(tmp_path):
    """A classic slice file passed alone stands for its series in the same folder (as viewers do)."""
    folder, files = _series(tmp_path)
    result = medldm("info", files[3])
    assert result.returncode == 0, result.stderr
    assert "256 x 256 x 8" in result.stdout
    alone = tmp_path / "alone"
    alone.mkdir()
    only = Path(shutil.copy(files[3], alone / files[3].name))
    assert_refused(medldm("info", only), alone, "the series has a single slice, not a 3D volume")


def test_all_zero_volume_is_a_valid_file(tmp_path, out_dir):
    """Constant images are legal files (info and convert work); only upscaling refuses them (see below)."""
    _, affine = _ixi()
    scan = _save(tmp_path, "blank.nii.gz", np.zeros((120, 120, 90), np.uint8), affine)
    assert medldm("info", scan).returncode == 0
    result = medldm("convert", scan, out_dir / "blank_copy.nii.gz")
    assert result.returncode == 0, result.stderr
    assert not load(out_dir / "blank_copy.nii.gz").data.any()


# ------------------------------------------------------------------------------------------ config cases
def _config_from(tmp: Path, edit=None, text: str | None = None) -> Path:
    path = tmp / "bad.yaml"
    if text is None:
        raw = yaml.safe_load(TINY_CONFIG.read_text())
        edit(raw)
        text = yaml.safe_dump(raw, sort_keys=False)
    path.write_text(text)
    return path


def _pop_steps(raw):
    del raw["training"]["autoencoder"]["steps"]


CONFIG_CASES = [
    pytest.param(
        None,
        "name: tiny\ndata:\n\tsources: [\nfoo: bar: baz\n",
        ["not valid YAML at line 3, column 1", "cannot start any token"],
        id="not-yaml",
    ),
    pytest.param(
        None,
        yaml.safe_dump([{"name": "tiny"}, {"data": None}]),
        ["expected a mapping of keys at the top level"],
        id="list-at-top-level",
    ),
    pytest.param(
        lambda raw: raw["training"]["autoencoder"].update(warmup_steps=10),
        None,
        ["unknown key 'training.autoencoder.warmup_steps'"],
        id="unknown-nested-key",
    ),
    pytest.param(
        lambda raw: raw["training"]["diffusion"].update(batch_size="eight"),
        None,
        ["key 'training.diffusion.batch_size'", "valid integer"],
        id="string-batch-size",
    ),
    pytest.param(_pop_steps, None, ["missing key 'training.autoencoder.steps'"], id="missing-steps"),
    pytest.param(
        lambda raw: raw["training"]["autoencoder"].update(lr=-1e-3),
        None,
        ["key 'training.autoencoder.lr'", "greater than 0"],
        id="negative-lr",
    ),
    pytest.param(
        lambda raw: raw["data"].update(spatial_dims=4), None, ["key 'data.spatial_dims'", "2 or 3"], id="spatial-dims-4"
    ),
    pytest.param(
        lambda raw: raw["data"]["sources"][0].update(holdout=50),
        None,
        ["key 'data.sources.0.holdout'", "50 leaves no training files"],
        id="holdout-too-large",
    ),
]


@pytest.mark.parametrize("edit, text, phrases", CONFIG_CASES)
def test_bad_config_is_refused_before_any_run_folder(tmp_path, edit, text, phrases):
    config = _config_from(tmp_path, edit, text)
    run = tmp_path / "run"
    result = medldm("train", "--config", config, "--data-root", shared_path("data"), "--run-dir", run)
    assert_refused(result, config, *phrases)
    assert not run.exists()


# ------------------------------------------------------------------------------------- model-folder cases


def no_model_folder(model: Path, root: Path):
    shutil.rmtree(model)
    return model, ["no such model folder"]


def truncated_weights(model: Path, root: Path):
    weights = model / "denoiser.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _reseal(model)
    return weights, ["weights cannot be read"]


def foreign_weights(model: Path, root: Path):
    shutil.copy(root / "foreign.safetensors", model / "denoiser.safetensors")
    _reseal(model)
    return model / "denoiser.safetensors", ["weights do not fit the model in its config"]


def flipped_byte(model: Path, root: Path):
    weights = model / "denoiser.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    return model, ["denoiser.safetensors", "does not match its checksum"]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(no_model_folder, id="missing-folder"),
        pytest.param(truncated_weights, id="truncated-denoiser-resealed"),
        pytest.param(foreign_weights, id="other-architecture-resealed"),
        pytest.param(flipped_byte, id="checksum-mismatch"),
    ],
)
def test_bad_model_folder_is_refused(tmp_path, out_dir, tiny_model, damage):
    model = Path(shutil.copytree(tiny_model / "model", tmp_path / "model"))
    offender, phrases = damage(model, tiny_model)
    out = out_dir / "sr.nii.gz"
    result = medldm("upscale", _ixi_path(), "--model", model, "-o", out, "--device", "cpu")
    assert_refused(result, offender, *phrases, out_dir=out_dir)


def test_upscale_refuses_a_constant_image(tmp_path, out_dir, tiny_model):
    _, affine = _ixi()
    scan = _save(tmp_path, "blank.nii.gz", np.zeros((120, 120, 90), np.uint8), affine)
    out = out_dir / "blank_sr.nii.gz"
    result = medldm("upscale", scan, "--model", tiny_model / "model", "-o", out, "--device", "cpu")
    assert_refused(result, scan, "constant", out_dir=out_dir)


class _TouchOnUnpickle:
    """A pickle payload: unpickling calls Path.touch(marker), i.e. runs code chosen by the file's author."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_checkpoint_with_a_pickle_payload_is_refused_unexecuted(tmp_path):
    from medldm.checkpoint import load_state

    ckpt = tmp_path / "run" / "diffusion" / "step_0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 2}))
    marker = tmp_path / "pwned"
    torch.save({"denoiser": _TouchOnUnpickle(marker)}, ckpt / "optim.pt")
    with pytest.raises(MedldmError, match="checkpoint cannot be read") as err:
        load_state(ckpt)
    assert str(ckpt) in str(err.value)
    assert not marker.exists(), "the payload ran"
    # the payload is live: an unrestricted load would have run it
    torch.load(ckpt / "optim.pt", weights_only=False)
    assert marker.exists()


# -------------------------------------------------------------------------------------- property tests
@st.composite
def oblique_affines(draw) -> np.ndarray:
    """Random rotation x optional flip x optional small shear x positive spacing 0.3..5 mm, random origin."""
    q = np.array(draw(st.lists(st.floats(-1, 1), min_size=4, max_size=4)))
    if np.linalg.norm(q) < 0.1:
        q = np.array([1.0, 0.0, 0.0, 0.0])
    w, x, y, z = q / np.linalg.norm(q)
    rotation = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    shear = np.eye(3)
    if draw(st.booleans()):
        shear[0, 1], shear[0, 2], shear[1, 2] = draw(st.lists(st.floats(-0.2, 0.2), min_size=3, max_size=3))
    flip = np.diag([-1.0 if draw(st.booleans()) else 1.0, 1.0, 1.0])
    spacing = np.diag(draw(st.lists(st.floats(0.3, 5.0), min_size=3, max_size=3)))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ flip @ shear @ spacing
    affine[:3, 3] = draw(st.lists(st.floats(-200, 200), min_size=3, max_size=3))
    return affine


SMALL = st.integers(2, 12)


@settings(max_examples=25, deadline=None)
@given(affine=oblique_affines(), shape=st.tuples(SMALL, SMALL, SMALL), seed=st.integers(0, 2**31), gz=st.booleans())
def test_oblique_round_trip_through_nifti(affine, shape, seed, gz):
    data = (np.random.default_rng(seed).normal(size=shape) * 100).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_nifti(Volume(data, affine), Path(tmp) / ("v.nii.gz" if gz else "v.nii"))
        back = load(path)
        assert sorted(os.listdir(tmp)) == [path.name]
    # float32 storage: 1e-5 relative, on the voxel vectors and on the origin separately
    np.testing.assert_allclose(back.affine[:3, :3], affine[:3, :3], rtol=1e-5, atol=1e-5 * np.abs(affine[:3, :3]).max())
    np.testing.assert_allclose(back.affine[:3, 3], affine[:3, 3], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(back.affine[3], [0, 0, 0, 1])
    np.testing.assert_array_equal(back.data, data)


@settings(max_examples=25, deadline=None)
@given(
    affine=oblique_affines(),
    counts=st.tuples(*[st.integers(1, 6)] * 3),
    factors=st.tuples(*[st.integers(1, 4)] * 3),
    upscale=st.tuples(*[st.booleans()] * 3),
)
def test_integer_rescaling_keeps_the_field_of_view(affine, counts, factors, upscale):
    shape = tuple(m if up else m * f for m, f, up in zip(counts, factors, upscale, strict=True))
    scaled = tuple(1.0 / f if up else float(f) for f, up in zip(factors, upscale, strict=True))
    expected = tuple(m * f if up else m for m, f, up in zip(counts, factors, upscale, strict=True))
    new_shape = rescaled_shape(shape, scaled)
    assert new_shape == expected
    np.testing.assert_allclose(
        face_corners(new_shape, rescaled_affine(affine, scaled)), face_corners(shape, affine), rtol=0, atol=1e-6
    )


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["slice-profile", "kspace", "blur"]),
    profile=st.sampled_from(["gaussian", "boxcar"]),
    scale=st.integers(2, 4),
    axis=st.integers(0, 2),
    counts=st.tuples(*[st.integers(1, 3)] * 3),
    a=st.floats(-3, 3),
    b=st.floats(-3, 3),
    seed=st.integers(0, 2**31),
)
def test_degradation_operators_are_linear(kind, profile, scale, axis, counts, a, b, seed):
    op = make_operator(kind, axis=axis, scale=scale, spatial_dims=3, profile=profile)
    shape = (2, *(m * scale for m in counts))  # a batch of two, every axis a multiple of the scale
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op(a * x + b * y), a * op(x) + b * op(y), rtol=1e-9, atol=1e-9)
