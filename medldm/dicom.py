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
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    folder = check_output_folder(folder, overwrite=overwrite)
    data = volume.data
    if not np.all(np.isfinite(data)):
        raise MedldmError("refusing to write non-finite voxels (NaN or inf)", folder)
    row_cos, col_cos, pixel_spacing, lps, thickness = _geometry(volume.affine, folder)
    modality = guess_modality(data, volume.meta.get("modality"))
    slope, intercept = quantisation(data, modality)
    stored = np.clip(np.rint((data - intercept) / slope), INT16.min, INT16.max).astype(np.int16)
    source = volume.meta.get("dicom") or {}
    now = datetime.now()
    series_uid = generate_uid()
    study_uid = source.get("StudyInstanceUID") or generate_uid()
    frame_uid = source.get("FrameOfReferenceUID") or generate_uid()
    p1, p99 = np.percentile(data, [1, 99])
    centre, width = (40.0, 400.0) if modality == "CT" else ((p1 + p99) / 2, max(p99 - p1, 1e-6))

    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}{TEMPORARY_MARK}")
    tmp.mkdir(parents=True)
    try:
        for k in range(data.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = UID(SOP_CLASS[modality])
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            for key in CARRIED_OVER:
                setattr(ds, key, source.get(key, ""))
            ds.StudyInstanceUID, ds.FrameOfReferenceUID = study_uid, frame_uid
            ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASS[modality], meta.MediaStorageSOPInstanceUID
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, 9900, k + 1
            ds.Modality, ds.ImageType = modality, ["DERIVED", "SECONDARY"]
            ds.SeriesDescription = description[:64]
            ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
            ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
            ds.Manufacturer, ds.SoftwareVersions = "medldm", __version__
            ds.DerivationDescription = description[:1024]
            ds.ImageOrientationPatient = [f"{v:.8g}" for v in (*row_cos, *col_cos)]
            ds.ImagePositionPatient = [f"{v:.8g}" for v in (lps @ [0.0, 0.0, k, 1.0])[:3]]
            ds.PixelSpacing = [f"{v:.8g}" for v in pixel_spacing]
            ds.SliceThickness = ds.SpacingBetweenSlices = f"{thickness:.8g}"
            ds.Rows, ds.Columns = data.shape[1], data.shape[0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
            ds.RescaleType = "HU" if modality == "CT" else "US"
            ds.WindowCenter, ds.WindowWidth = f"{centre:.6g}", f"{width:.6g}"
            # rows run along voxel axis j, columns along i (the loader's convention, read back exactly)
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as exc:
        raise MedldmError(f"cannot write the DICOM series ({exc.strerror or exc})", folder) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
