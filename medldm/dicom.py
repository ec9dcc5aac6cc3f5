"""DICOM output: a volume written as a derived series of classic single-frame CT or MR images (pydicom), one
file per slice along voxel axis k, for PACS and viewers such as OHIF.

- Geometry: ImageOrientationPatient from the affine's first two columns (which must be orthogonal; a slice
  direction that is not, as after a gantry tilt, is kept through each slice's ImagePositionPatient), PixelSpacing
  from their lengths, one ImagePositionPatient per slice; RAS+ (NIfTI) becomes LPS (DICOM). Reading the series
  back (``medldm convert``) gives the same affine.
- Intensities: int16 with RescaleSlope and RescaleIntercept. CT whose values fit int16 is stored in whole HU
  (slope 1, intercept 0); anything else spreads its range over the int16 range, so every value comes back within
  half a slope.
- Identity: a new SeriesInstanceUID and SOPInstanceUIDs, ImageType DERIVED\\SECONDARY, and a SeriesDescription
  naming medldm. The patient, study and frame-of-reference identifiers of a DICOM input are carried over (the
  output lies in the same patient coordinates); for other inputs they are left empty, with a new study.
"""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np

from medldm import __version__
from medldm.errors import MedldmError
from medldm.intensity import guess_modality
from medldm.outputs import TEMPORARY_MARK, check_output_folder

__all__ = ["save_dicom", "CARRIED_OVER", "quantisation"]

# Attributes a derived series keeps from its DICOM source (the loader stores them in meta["dicom"]).
CARRIED_OVER = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
    "FrameOfReferenceUID",
    "BodyPartExamined",
)
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}  # CT / MR Image Storage
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
INT16 = np.iinfo(np.int16)


def quantisation(data: np.ndarray, modality: str) -> tuple[float, float]:
    """(slope, intercept) mapping stored int16 values to intensities: ``value = slope * stored + intercept``."""
    lo, hi = float(data.min()), float(data.max())
    if modality == "CT" and lo >= INT16.min and hi <= INT16.max:
        return 1.0, 0.0  # whole Hounsfield units, as scanners store them
    slope = (hi - lo) / (INT16.max - INT16.min) or 1.0
    return slope, lo - INT16.min * slope


def _geometry(affine: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray, list[float], np.ndarray, float]:
    """Row and column direction cosines (LPS), PixelSpacing, the LPS affine, and the slice spacing."""
    lps = RAS_TO_LPS @ affine
    col_i, col_j, col_k = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    di, dj = float(np.linalg.norm(col_i)), float(np.linalg.norm(col_j))
    row_cos, col_cos = col_i / di, col_j / dj
    if abs(float(row_cos @ col_cos)) > 1e-4:
        raise MedldmError(
            "the grid's in-plane axes are not perpendicular: DICOM slices cannot hold it (write NIfTI instead)", path
        )
    normal = np.cross(row_cos, col_cos)
    return row_cos, col_cos, [dj, di], lps, abs(float(col_k @ normal))


def save_dicom(volume, folder: str | os.PathLike, *, description: str = "medldm", overwrite: bool = False) -> Path:
    """Write ``volume`` as a new DICOM series in ``folder`` (created; built aside and renamed into place, so a
    failure leaves nothing). Returns the folder."""
    folder = check_output_folder(folder, overwrite=overwrite)
    data = volume.data
    if not np.all(np.isfinite(data)):
        raise MedldmError("refusing to write non-finite voxels (NaN or inf)", folder)
    row_cos, col_cos, pixel_spacing, lps, thickness = _geometry(volume.affine, folder)
    modality = guess_modality(data, volume.meta.get("modality"))
    slope, intercept = quantisation(data, modality)
    stored = np.clip(np.rint((data - intercept) / slope), INT16.min, INT16.max).astype(np.int16)
    series = _series_attributes(volume, modality, description, slope, intercept)
    series.update(
        ImageOrientationPatient=[f"{v:.8g}" for v in (*row_cos, *col_cos)],
        PixelSpacing=[f"{v:.8g}" for v in pixel_spacing],
        SliceThickness=f"{thickness:.8g}",
        SpacingBetweenSlices=f"{thickness:.8g}",
        Rows=data.shape[1],
        Columns=data.shape[0],
    )
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}{TEMPORARY_MARK}")
    tmp.mkdir(parents=True)
    try:
        for k in range(data.shape[2]):
            position = [f"{v:.8g}" for v in (lps @ [0.0, 0.0, k, 1.0])[:3]]
            # rows run along voxel axis j, columns along i (the loader's convention, read back exactly)
            pixels = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            ds = _slice_dataset(series, modality, k, position, pixels)
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as exc:
        raise MedldmError(f"cannot write the DICOM series ({exc.strerror or exc})", folder) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _series_attributes(volume, modality: str, description: str, slope: float, intercept: float) -> dict:
    """The attributes every slice of the new series shares: the study and frame of reference carried over from
    the source series (new ones without it), a new series, the rescale and a display window."""
    from pydicom.uid import generate_uid

    source = volume.meta.get("dicom") or {}
    now = datetime.now()
    p1, p99 = np.percentile(volume.data, [1, 99])
    centre, width = (40.0, 400.0) if modality == "CT" else ((p1 + p99) / 2, max(p99 - p1, 1e-6))
    return {
        **{key: source.get(key, "") for key in CARRIED_OVER},
        "StudyInstanceUID": source.get("StudyInstanceUID") or generate_uid(),
        "FrameOfReferenceUID": source.get("FrameOfReferenceUID") or generate_uid(),
        "SOPClassUID": SOP_CLASS[modality],
        "SeriesInstanceUID": generate_uid(),
        "SeriesNumber": 9900,
        "Modality": modality,
        "ImageType": ["DERIVED", "SECONDARY"],
        "SeriesDescription": description[:64],
        "SeriesDate": now.strftime("%Y%m%d"),
        "ContentDate": now.strftime("%Y%m%d"),
        "SeriesTime": now.strftime("%H%M%S"),
        "ContentTime": now.strftime("%H%M%S"),
        "Manufacturer": "medldm",
        "SoftwareVersions": __version__,
        "DerivationDescription": description[:1024],
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 1,
        "RescaleSlope": f"{slope:.10g}",
        "RescaleIntercept": f"{intercept:.10g}",
        "RescaleType": "HU" if modality == "CT" else "US",
        "WindowCenter": f"{centre:.6g}",
        "WindowWidth": f"{width:.6g}",
    }


def _slice_dataset(series: dict, modality: str, k: int, position: list[str], pixels: bytes):
    """Slice ``k`` of the series: its own SOP instance, number, position and pixels."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SOP_CLASS[modality])
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    for key, value in series.items():
        setattr(ds, key, value)
    ds.SOPInstanceUID, ds.InstanceNumber = meta.MediaStorageSOPInstanceUID, k + 1
    ds.ImagePositionPatient = position
    ds.PixelData = pixels
    return ds
