"""Volumes with exact geometry: load NIfTI, DICOM series and NRRD; save NIfTI; grid maths.

Conventions (nibabel's): array axes are voxel axes (i, j, k) and the 4x4 affine maps voxel centres to
RAS+ millimetres. Axis names "x", "y", "z" mean the world axes (left-right, posterior-anterior,
inferior-superior): the voxel axis closest to that direction. "i", "j", "k" (or 0, 1, 2) name voxel axes.
"""

from __future__ import annotations

import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from nibabel import orientations

from medldm.dicom import CARRIED_OVER
from medldm.errors import MedldmError
from medldm.outputs import NIFTI_SUFFIXES, check_output, write_atomically

__all__ = [
    "Volume",
    "load",
    "save_nifti",
    "rescaled_affine",
    "rescaled_shape",
    "resolve_axis",
    "crop",
    "crop_to_multiple",
    "ANISOTROPY",
    "crop_to_length",
    "face_corners",
    "check_memory",
    "holds_dicom",
]

NRRD_SUFFIXES = (".nrrd", ".nhdr")
SCAN_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES  # single-file scans (DICOM aside)
# Relative tolerance on slice gaps before a DICOM series is called uneven (a missing slice doubles one gap).
SLICE_GAP_RTOL = 0.05
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D scalar image with its geometry.

    Args:
        data: 3D array, voxel axes (i, j, k); stored as float32.
        affine: 4x4 voxel-centre -> RAS+ mm.
        meta: where it came from (``path``, ``format``, ``dtype``, ``modality``, ``series_uid`` ...).
    """

    data: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.data = np.asarray(self.data, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        where = self.meta.get("path")
        if self.data.ndim != 3:
            raise MedldmError(f"expected a 3D volume, got an array of shape {self.data.shape}", where)
        if self.affine.shape != (4, 4):
            raise MedldmError(f"affine must be 4x4, got {self.affine.shape}", where)
        if not np.all(np.isfinite(self.affine)) or abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise MedldmError("the affine is singular or not finite (zero voxel size?)", where)

    @property
    def shape(self) -> tuple[int, int, int]:
        return cast(tuple[int, int, int], tuple(int(n) for n in self.data.shape))  # 3D: __post_init__

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each voxel axis (column norms of the affine)."""
        norms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return cast(tuple[float, float, float], tuple(float(s) for s in norms))  # 4x4 affine: __post_init__

    @property
    def orientation(self) -> str:
        """Axis codes such as "RAS" or "PSR": the world direction each voxel axis points to."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def path(self) -> str | None:
        return self.meta.get("path")

    def with_data(self, data: np.ndarray, affine: np.ndarray | None = None, **meta) -> Volume:
        """A new Volume sharing this one's metadata, with new voxels (and optionally a new grid)."""
        return Volume(data, self.affine if affine is None else affine, {**self.meta, **meta})

    def to_canonical(self) -> Volume:
        """Reorient (flips and axis swaps only, no resampling) to RAS+; lossless and undone by
        :meth:`from_canonical`."""
        ornt = orientations.io_orientation(self.affine)
        data = orientations.apply_orientation(self.data, ornt)
        affine = self.affine @ orientations.inv_ornt_aff(ornt, self.shape)
        meta = {**self.meta, "source_ornt": ornt.tolist()}
        if meta.get("slice_axis") is not None:  # input axis k becomes output axis ornt[k, 0]
            meta["slice_axis"] = int(ornt[meta["slice_axis"], 0])
        return Volume(np.ascontiguousarray(data), affine, meta)

    def from_canonical(self) -> Volume:
        """Undo :meth:`to_canonical`, returning voxels in the source's axis order."""
        if "source_ornt" not in self.meta:
            return self
        source = np.asarray(self.meta["source_ornt"])
        back = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), source)
        data = orientations.apply_orientation(self.data, back)
        affine = self.affine @ orientations.inv_ornt_aff(back, self.shape)
        meta = {k: v for k, v in self.meta.items() if k != "source_ornt"}
        if meta.get("slice_axis") is not None:
            meta["slice_axis"] = int(np.nonzero(source[:, 0] == meta["slice_axis"])[0][0])
        return Volume(np.ascontiguousarray(data), affine, meta)


# ----------------------------------------------------------------------------------------------- grid maths
ANISOTROPY = 1.2  # a scan is anisotropic when its largest spacing exceeds its smallest by more than this


def rescaled_affine(affine: np.ndarray, factors) -> np.ndarray:
    """Affine of the grid whose spacing along voxel axis a is ``factors[a]`` times the old one, with the same
    field of view: column a is scaled by the factor and the first voxel centre moves to continuous index
    ``0.5 * (factor - 1)`` (upscaling by s along a is factor 1/s; decimating by s is factor s)."""
    f = np.asarray(factors, dtype=np.float64)
    t = np.eye(4)
    t[:3, :3] = np.diag(f)
    t[:3, 3] = 0.5 * (f - 1.0)
    return np.asarray(affine, dtype=np.float64) @ t


def rescaled_shape(shape, factors) -> tuple[int, int, int]:
    """Grid size after :func:`rescaled_affine`; the field of view must hold a whole number of new voxels."""
    out = []
    for n, f in zip(shape, factors, strict=True):
        m = n / f
        if abs(m - round(m)) > 1e-6:
            raise MedldmError(f"an axis of {n} voxels does not hold a whole number of voxels {f:g} times as large")
        out.append(int(round(m)))
    return cast(tuple[int, int, int], tuple(out))  # one per axis of the 3D shape


def face_corners(shape, affine: np.ndarray) -> np.ndarray:
    """World coordinates (8 x 3) of the corners of the grid's outer faces: the field of view."""
    lo, hi = -0.5, np.asarray(shape, dtype=np.float64) - 0.5
    idx = np.array([[c[0], c[1], c[2], 1.0] for c in np.array(np.meshgrid(*[[lo, h] for h in hi])).reshape(3, -1).T])
    return (np.asarray(affine) @ idx.T).T[:, :3]


def resolve_axis(volume: Volume, axis: str | int) -> int:
    """Voxel axis for a name: "x"/"y"/"z" (world L-R, P-A, I-S), "i"/"j"/"k" or 0/1/2 (voxel axes), or "auto"
    (the axis with the largest spacing, "z" when the volume is isotropic)."""
    name = str(axis).lower()
    if name in ("0", "1", "2"):
        return int(name)
    if name in ("i", "j", "k"):
        return "ijk".index(name)
    if name == "auto":
        spacing = np.asarray(volume.spacing)
        if spacing.max() / spacing.min() > ANISOTROPY:
            # spacings equal up to float noise (3.0 vs 3.0000001) tie: the world-z axis among them, else the first
            tied = np.nonzero(spacing >= spacing.max() * (1 - 1e-4))[0]
            z = resolve_axis(volume, "z")
            return z if z in tied else int(tied[0])
        name = "z"
    if name in ("x", "y", "z"):
        world = "xyz".index(name)
        ornt = orientations.io_orientation(volume.affine)
        return int(np.nonzero(ornt[:, 0] == world)[0][0])
    raise MedldmError(f"unknown axis {axis!r}: use x, y, z (world), i, j, k (voxel) or auto")


def crop(volume: Volume, slices: tuple[slice, ...]) -> Volume:
    """Sub-volume by index ranges (step 1, one per axis), with the affine moved so world positions are unchanged."""
    starts = [s.indices(n)[0] for s, n in zip(slices, volume.shape, strict=True)]
    affine = volume.affine.copy()
    affine[:3, 3] = (volume.affine @ np.array([*starts, 1.0]))[:3]
    return volume.with_data(volume.data[slices], affine)


def crop_to_multiple(volume: Volume, axis: int, multiple: int) -> Volume:
    """Drop the fewest voxels (split between both ends) so axis ``axis`` holds a multiple of ``multiple``."""
    n = volume.shape[axis]
    if n < multiple:
        raise MedldmError(f"axis {axis} has {n} voxels, fewer than the factor {multiple}", volume.path)
    return crop_to_length(volume, axis, n - n % multiple)


def crop_to_length(volume: Volume, axis: int, length: int) -> Volume:
    """Keep ``length`` voxels along ``axis``, dropping the others split between both ends (one more at the end)."""
    n = volume.shape[axis]
    extra = n - length
    if extra < 0:
        raise MedldmError(f"axis {axis} has {n} voxels, fewer than {length}", volume.path)
    if extra == 0:
        return volume
    sl = [slice(None)] * 3
    sl[axis] = slice(extra // 2, n - (extra - extra // 2))
    return crop(volume, tuple(sl))


# ------------------------------------------------------------------------------------------------- loading
def load(path: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read a NIfTI file, an NRRD file, a DICOM series folder or a single (enhanced multi-frame) DICOM file.

    Args:
        path: file or folder.
        series_uid: which DICOM series to read when a folder holds several.

    Raises:
        MedldmError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.exists():
        raise MedldmError("no such file or folder", path)
    name = path.name.lower()
    if path.is_dir():
        volume = _load_dicom(_series_files(path), path, series_uid)
    elif name.endswith(NIFTI_SUFFIXES):
        volume = _load_nifti(path)
    elif name.endswith(NRRD_SUFFIXES):
        volume = _load_nrrd(path)
    elif _is_dicom_file(path):
        volume = _load_dicom_file(path, series_uid)
    else:
        raise MedldmError("unknown format: expected .nii, .nii.gz, .nrrd, a DICOM file or a DICOM folder", path)
    _check_voxels(volume.data, path)
    return volume


def holds_dicom(folder: Path) -> bool:
    """The one rule for folders, for every command: a folder that directly holds DICOM files is one DICOM series
    (other files and sub-folders beside them are ignored); otherwise it is a folder of scans (a batch for upscale)."""
    return any(p.is_file() and _is_dicom_file(p) for p in folder.iterdir())


def _series_files(folder: Path) -> list[Path]:
    if holds_dicom(folder):
        return sorted(p for p in folder.iterdir() if p.is_file())
    scans = [p.name for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(SCAN_SUFFIXES)]
    if scans:
        raise MedldmError(
            f"holds scans ({', '.join(sorted(scans)[:3])}{' ...' if len(scans) > 3 else ''}) and no "
            "DICOM files of its own: a folder of scans is a batch for 'medldm upscale'; name one scan "
            "here",
            folder,
        )
    return sorted(p for p in folder.rglob("*") if p.is_file())  # a DICOM tree (patient/study/series/...)


def _check_voxels(data: np.ndarray, path: Path) -> None:
    if min(data.shape) < 2:
        raise MedldmError(f"shape {data.shape} is a single slice, not a 3D volume", path)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise MedldmError(f"{bad} voxels are NaN or infinite", path)


def check_memory(shape, path, *, copies: float = 1, what: str = "declared size", share: float = 0.5) -> None:
    """Refuse up front work whose ``copies`` float32 volumes of ``shape`` would take more than ``share`` of this
    machine's memory, with the estimate."""
    need = float(np.prod(np.asarray(shape, dtype=np.float64))) * 4 * copies
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > share * have:
        raise MedldmError(
            f"{what} {tuple(int(s) for s in shape)} needs {need / 2**30:.1f} GiB as float32, "
            f"more than {share:.0%} of this machine's {have / 2**30:.1f} GiB",
            path,
        )


def _squeeze_to_3d(data_shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in data_shape)
    if len(shape) < 3:
        raise MedldmError(f"shape {shape} is a 2D image, not a 3D volume", path)
    if len(shape) > 3:
        if any(s != 1 for s in shape[3:]):
            raise MedldmError(
                f"shape {shape} holds {int(np.prod(shape[3:]))} volumes (4D); extract one volume first", path
            )
        shape = shape[:3]
    return cast(tuple[int, int, int], shape)  # 3 axes: fewer raised above, more were cut


def _raw_nifti_header(path: Path):
    """The NIfTI-1 or NIfTI-2 header as stored (nibabel repairs some fields on load: a zero pixdim becomes 1 mm),
    or None when the file does not start with one (damaged: nib.load decides and explains)."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as fh:
            block = fh.read(540)
        kinds = ((nib.Nifti1Header, 348, (b"n+1", b"ni1")), (nib.Nifti2Header, 540, (b"n+2", b"ni2")))
        for header, size, magics in kinds:
            hdr = header(block[:size], check=False)
            if hdr["magic"].item()[:3] in magics:
                return hdr
    except Exception:
        return None
    return None


@contextmanager
def _nibabel_messages(into: list[str]):
    """Collect what nibabel says (Python warnings, its 'nibabel.global' log) instead of letting it reach stderr."""
    import logging
    import warnings

    logger = logging.getLogger("nibabel.global")

    class _Keep(logging.Handler):
        def emit(self, record):
            into.append(" ".join(record.getMessage().split()))

    keep, propagate = _Keep(), logger.propagate
    logger.addHandler(keep)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        into.extend(" ".join(str(w.message).split()) for w in caught)
    finally:
        logger.removeHandler(keep)
        logger.propagate = propagate


def _geometry_warnings(img) -> list[str]:
    """What the header leaves unsure about where the voxels are (the volume still loads)."""
    sform, s_code = img.header.get_sform(coded=True)
    qform, q_code = img.header.get_qform(coded=True)
    if s_code == 0 and q_code == 0:
        return [
            "neither sform nor qform is set: the orientation is unknown, so the voxel sizes alone place the "
            "image (nibabel's default, left-right flipped); check it before trusting left and right"
        ]
    if s_code and q_code and not np.allclose(sform, qform, atol=1e-3):
        gap = float(np.abs(sform - qform).max())
        return [f"the qform and the sform disagree (by up to {gap:.3g} in the affine); the sform is used"]
    return []


def _load_nifti(path: Path) -> Volume:
    raw = _raw_nifti_header(path)
    if raw is not None:
        offset, size = float(raw["vox_offset"]), path.stat().st_size
        if path.name.lower().endswith(".nii") and offset >= size:
            raise MedldmError(
                f"header says the voxel data start at byte {offset:.0f}, past the end of the file "
                f"({size} bytes): wrong vox_offset or a truncated file",
                path,
            )
        pixdim = tuple(float(z) for z in raw["pixdim"][1:4])
        if int(raw["sform_code"]) == 0 and any(not np.isfinite(z) or z == 0 for z in pixdim):
            raise MedldmError(
                f"voxel size {pixdim} in the header has a zero entry and no sform gives the geometry", path
            )
    said: list[str] = []  # nibabel's own warnings and log lines, kept for one "warning:" line each
    try:
        with _nibabel_messages(said):
            # typed FileBasedImage by nibabel, the base of all its formats: the NIfTI attributes used below
            # (get_data_dtype, shape, dataobj.slope, affine) are not on it
            img: Any = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for broken headers
        raise MedldmError(f"not a readable NIfTI file ({exc})", path) from None
    dtype = img.get_data_dtype()
    if dtype.fields is not None or np.issubdtype(dtype, np.complexfloating):
        raise MedldmError(f"voxel type {dtype} (RGB or complex) is not a scalar image", path)
    shape = _squeeze_to_3d(img.shape, path)
    check_memory(shape, path)
    try:
        with _nibabel_messages(said):
            data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as exc:  # truncated gzip: EOFError, zlib.error, OSError ...
        raise MedldmError(f"voxel data cannot be read, the file may be truncated ({exc})", path) from None
    slope, inter = img.dataobj.slope, img.dataobj.inter
    meta = {
        "path": str(path),
        "format": "nifti",
        "dtype": str(dtype),
        "scl_slope": float(slope) if slope is not None else 1.0,
        "scl_inter": float(inter) if inter is not None else 0.0,
        # the command line prints them as "warning:" lines (raw library output would break the one-line contract)
        "warnings": _geometry_warnings(img) + [f"nibabel: {m}" for m in dict.fromkeys(said)],
    }
    try:
        return Volume(data, img.affine, meta)
    except MedldmError as err:
        raise MedldmError(err.reason, path) from None


def _load_nrrd(path: Path) -> Volume:
    import nrrd

    try:
        data, header = nrrd.read(str(path))
    except Exception as exc:
        raise MedldmError(f"not a readable NRRD file, truncated or damaged? ({exc})", path) from None
    if np.issubdtype(data.dtype, np.complexfloating):
        raise MedldmError(f"voxel type {data.dtype} (complex) is not a scalar image", path)
    shape = _squeeze_to_3d(data.shape, path)
    directions = header.get("space directions")
    if directions is None:
        raise MedldmError("NRRD header has no 'space directions': the voxel geometry is unknown", path)
    directions = np.asarray(
        [d for d in directions if d is not None and np.all(np.isfinite(np.asarray(d, dtype=float)))], dtype=float
    )
    if directions.shape != (3, 3) or data.ndim != 3:
        raise MedldmError(f"expected a 3D scalar image, got shape {data.shape}", path)
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = directions.T  # each 'space directions' row is the step of one voxel axis
    affine[:3, 3] = origin
    space = str(header.get("space", "right-anterior-superior")).lower()
    flips = {
        "left-posterior-superior": LPS_TO_RAS,
        "lps": LPS_TO_RAS,
        "right-anterior-superior": np.eye(4),
        "ras": np.eye(4),
        "left-anterior-superior": np.diag([-1.0, 1.0, 1.0, 1.0]),
        "las": np.diag([-1.0, 1.0, 1.0, 1.0]),
    }
    if space not in flips:
        raise MedldmError(f"NRRD space {space!r} is not supported (RAS, LAS or LPS)", path)
    meta = {"path": str(path), "format": "nrrd", "dtype": str(data.dtype)}
    try:
        return Volume(data.reshape(shape).astype(np.float32), flips[space] @ affine, meta)
    except MedldmError as err:
        raise MedldmError(err.reason, path) from None


# --------------------------------------------------------------------------------------------------- DICOM
def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


@dataclass
class _Frame:
    """One 2D image of a series: a classic file or one frame of an enhanced multi-frame file."""

    source: str
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray  # ImageOrientationPatient: row cosine, column cosine
    pixel_spacing: np.ndarray  # (between rows, between columns)
    slope: float
    intercept: float
    dataset: Any
    frame: int | None  # index into a multi-frame pixel array, None for a classic file


def _first(seq_owner, name):
    seq = getattr(seq_owner, name, None)
    return seq[0] if seq else None


def _frames_of(ds, source: str) -> list[_Frame]:
    if hasattr(ds, "PerFrameFunctionalGroupsSequence"):
        shared = _first(ds, "SharedFunctionalGroupsSequence")
        frames = []
        for index, per in enumerate(ds.PerFrameFunctionalGroupsSequence):

            def group(name, per=per):
                return _first(per, name) or (_first(shared, name) if shared is not None else None)

            pos, ori, meas, pvt = (
                group("PlanePositionSequence"),
                group("PlaneOrientationSequence"),
                group("PixelMeasuresSequence"),
                group("PixelValueTransformationSequence"),
            )
            if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
                raise MedldmError(f"frame {index + 1} lacks plane position, orientation or pixel spacing", source)
            frames.append(
                _Frame(
                    source,
                    np.asarray(pos.ImagePositionPatient, float),
                    np.asarray(ori.ImageOrientationPatient, float),
                    np.asarray(meas.PixelSpacing, float),
                    float(getattr(pvt, "RescaleSlope", 1.0) or 1.0),
                    float(getattr(pvt, "RescaleIntercept", 0.0) or 0.0),
                    ds,
                    index,
                )
            )
        return frames
    missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if t not in ds]
    if missing:
        raise MedldmError(f"missing {', '.join(missing)}: the slice geometry is unknown", source)
    return [
        _Frame(
            source,
            np.asarray(ds.ImagePositionPatient, float),
            np.asarray(ds.ImageOrientationPatient, float),
            np.asarray(ds.PixelSpacing, float),
            float(getattr(ds, "RescaleSlope", 1.0) or 1.0),
            float(getattr(ds, "RescaleIntercept", 0.0) or 0.0),
            ds,
            None,
        )
    ]


def _decoder_available(syntax) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return get_decoder(syntax).is_available
    except Exception:  # no decoder class at all for this syntax
        return False


def _read_pixels(frame: _Frame) -> np.ndarray:
    ds = frame.dataset
    if "PixelData" not in ds:
        import pydicom

        ds = frame.dataset = pydicom.dcmread(frame.source)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed and not _decoder_available(syntax):
            raise MedldmError(
                f"pixel data is compressed ({syntax.name}) and no decoder is installed: "
                "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)",
                frame.source,
            ) from None
        raise MedldmError(f"pixel data cannot be read ({exc})", frame.source) from None
    if frame.frame is not None:
        pixels = pixels[frame.frame] if pixels.ndim == 3 else pixels
    if pixels.ndim != 2:
        raise MedldmError(f"expected a greyscale image, got pixel array of shape {pixels.shape}", frame.source)
    return pixels


def _load_dicom_file(path: Path, series_uid: str | None) -> Volume:
    """A multi-frame file is a volume on its own; a classic slice stands for its series in the same folder."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise MedldmError(f"not a readable DICOM file ({exc})", path) from None
    if "PerFrameFunctionalGroupsSequence" in ds or "SeriesInstanceUID" not in ds:
        return _load_dicom([path], path, series_uid)
    return _load_dicom(
        sorted(p for p in path.parent.iterdir() if p.is_file()), path.parent, series_uid or str(ds.SeriesInstanceUID)
    )


def _load_dicom(files: list[Path], where: Path, series_uid: str | None) -> Volume:
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list] = defaultdict(list)
    for f in files:
        try:
            ds = pydicom.dcmread(f, defer_size="1 KB")  # large values (pixel data) are located, not read
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
            if _is_dicom_file(f):
                raise MedldmError(f"DICOM file cannot be read, truncated or damaged? ({exc})", f) from None
            continue  # not DICOM (notes ...): skipped
        sop = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        if len(ds) == 0 or (sop is not None and "Image Storage" in sop.name and "PixelData" not in ds):
            # pydicom reads a cut-off file without complaint: skipping it would silently drop a slice
            raise MedldmError("DICOM image ends before its pixel data: the file is truncated or damaged", f)
        # objects without pixels (reports, presentation states) are skipped; an image without a position is kept,
        # so that the series is refused by name rather than loaded a slice short
        if (
            "SeriesInstanceUID" not in ds
            or "PixelData" not in ds
            and (len(files) == 1 or not ("ImagePositionPatient" in ds or "PerFrameFunctionalGroupsSequence" in ds))
        ):
            continue
        series[str(ds.SeriesInstanceUID)].append((f, ds))
    if not series:
        raise MedldmError("no DICOM images found", where)
    if series_uid is not None:
        if series_uid not in series:
            raise MedldmError(f"no series with UID {series_uid}; present: {', '.join(sorted(series))}", where)
        chosen = series_uid
    elif len(series) > 1:
        listing = "; ".join(
            f"{uid} ({getattr(items[0][1], 'SeriesDescription', '?')}, {len(items)} files)"
            for uid, items in sorted(series.items())
        )
        raise MedldmError(f"holds {len(series)} DICOM series, choose one with --series UID: {listing}", where)
    else:
        chosen = next(iter(series))
    frames = [fr for f, ds in series[chosen] for fr in _frames_of(ds, str(f))]
    return _stack_frames(frames, where, chosen)


def _slice_thickness(ds) -> float | None:
    """SliceThickness (mm) of a classic file, or of an enhanced file's shared pixel measures; None if absent."""
    value = getattr(ds, "SliceThickness", None)
    if value in (None, "") and hasattr(ds, "SharedFunctionalGroupsSequence"):
        measures = _first(_first(ds, "SharedFunctionalGroupsSequence"), "PixelMeasuresSequence")
        value = getattr(measures, "SliceThickness", None) if measures is not None else None
    try:
        return float(value) if value not in (None, "") and float(value) > 0 else None
    except (TypeError, ValueError):
        return None


def _stack_frames(frames: list[_Frame], where: Path, uid: str) -> Volume:
    if len(frames) < 2:
        raise MedldmError("the series has a single slice, not a 3D volume", where)
    orientation = frames[0].orientation
    for fr in frames:
        if not np.allclose(fr.orientation, orientation, atol=1e-4):
            raise MedldmError(f"slice orientation differs within the series ({fr.source})", where)
        if not np.allclose(fr.pixel_spacing, frames[0].pixel_spacing, rtol=1e-4):
            raise MedldmError(f"pixel spacing differs within the series ({fr.source})", where)
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    frames.sort(key=lambda fr: float(fr.position @ normal))
    depth = np.array([fr.position @ normal for fr in frames])
    gaps = np.diff(depth)
    if np.any(gaps < 1e-3):
        k = int(np.argmin(gaps))
        raise MedldmError(
            f"two slices share position {depth[k]:.3f} mm ({frames[k].source}, {frames[k + 1].source}): "
            "several echoes, phases or series mixed?",
            where,
        )
    step = float(np.median(gaps))
    uneven = np.abs(gaps - step) > SLICE_GAP_RTOL * step
    if np.any(uneven):
        k = int(np.argmax(uneven))
        raise MedldmError(
            f"uneven slice gaps: {gaps[k]:.3f} mm after {frames[k].source} where the series has {step:.3f} mm "
            "(a missing slice?)",
            where,
        )
    pixels = [_read_pixels(fr) for fr in frames]
    if len({p.shape for p in pixels}) != 1:
        raise MedldmError("slices differ in size within the series", where)
    check_memory((*pixels[0].shape, len(pixels)), where)
    # voxel axis i runs along a row (DICOM column index), j down the columns (row index), k across slices
    data = np.stack(
        [p.T.astype(np.float32) * fr.slope + fr.intercept for p, fr in zip(pixels, frames, strict=True)], axis=-1
    )
    d_row, d_col = frames[0].pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = row_cos * d_col
    lps[:3, 1] = col_cos * d_row
    lps[:3, 2] = (frames[-1].position - frames[0].position) / (len(frames) - 1)
    lps[:3, 3] = frames[0].position
    ds = frames[0].dataset
    meta = {
        "path": str(where),
        "format": "dicom",
        "dtype": str(pixels[0].dtype),
        "series_uid": uid,
        "modality": str(getattr(ds, "Modality", "")) or None,
        "series_description": str(getattr(ds, "SeriesDescription", "")),
        "slice_thickness": _slice_thickness(ds),  # mm, or None; may differ from the spacing (gaps or overlap)
        "slice_axis": 2,  # the voxel axis across the acquired slices, the one slice_thickness applies to
        # patient, study and frame of reference: what a derived series written from this one carries over
        "dicom": {key: str(ds[key].value) for key in CARRIED_OVER if key in ds and ds[key].value is not None},
    }
    return Volume(data, LPS_TO_RAS @ lps, meta)


# -------------------------------------------------------------------------------------------------- saving
def save_nifti(
    volume: Volume, path: str | os.PathLike, *, overwrite: bool = False, description: str | None = None
) -> Path:
    """Write ``volume`` as float32 NIfTI with sform and qform set, atomically (medldm.outputs); ``description``
    (at most 79 ASCII characters) goes in the header's descrip field.

    Refuses to replace an existing file unless ``overwrite``, never replaces the volume's own source, and never
    writes non-finite voxels (NaN or inf: a broken model or values beyond float32)."""
    path = check_output(path, overwrite=overwrite)
    source = volume.meta.get("path")
    if path.exists() and source and Path(source).exists() and path.resolve() == Path(source).resolve():
        raise MedldmError("refusing to overwrite the input scan", path)
    data = volume.data.astype(np.float32)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise MedldmError(
            f"refusing to write {bad} non-finite voxels (NaN or inf, {100 * bad / data.size:.3g}% of "
            "the volume): the model or the input produced values float32 cannot hold",
            path,
        )
    img = nib.Nifti1Image(data, volume.affine)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)  # qform cannot hold shear; readers use the exact sform
    img.header.set_xyzt_units("mm", "sec")
    if description is not None:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    return write_atomically(path, lambda tmp: nib.save(img, str(tmp)), overwrite=overwrite)
