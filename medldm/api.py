"""medldm from Python: the functions a notebook or script needs, on paths, :class:`Volume`\\ s, nibabel images or
numpy arrays with an affine. They run the same code as the command line.

Example (the user guide runs the same lines in a test)::

    import medldm

    scan = medldm.load("scan.nii.gz")                 # a Volume: .data (float32 array), .affine (4 x 4, mm)
    sharp = medldm.upscale(scan, scale=4, axis="z")   # thick slices along z, x4, with the shipped model
    medldm.save(sharp, "scan_sr.nii.gz")
    print(sharp.shape, sharp.spacing)
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from medldm.errors import MedldmError
from medldm.volume import Volume, save_nifti
from medldm.volume import load as _load_scan

__all__ = ["load", "save", "upscale", "fuse", "evaluate", "as_volume"]

ScanLike = str | os.PathLike | Volume | np.ndarray  # or a nibabel image


def load(path: str | os.PathLike, *, series: str | None = None) -> Volume:
    """Read a NIfTI, NRRD or DICOM scan (a file or a series folder; ``series`` picks one SeriesInstanceUID of
    several) into a :class:`Volume` with its exact geometry."""
    return _load_scan(path, series_uid=series)


def save(volume: Volume, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``volume`` as NIfTI (atomically; an existing file only with ``overwrite``)."""
    return save_nifti(volume, path, overwrite=overwrite)


def as_volume(scan: ScanLike, affine: np.ndarray | None = None) -> Volume:
    """A :class:`Volume` from a path, a Volume, a nibabel image, or a 3D array with its 4 x 4 ``affine`` (voxel
    centre to RAS+ mm; required for arrays, since the spacing decides what is upscaled)."""
    if isinstance(scan, Volume):
        return scan
    if isinstance(scan, str | os.PathLike):
        return load(scan)
    if hasattr(scan, "affine") and hasattr(scan, "get_fdata"):  # a nibabel image
        return Volume(np.asarray(scan.get_fdata(dtype=np.float32)), scan.affine, {"format": "nibabel"})
    if isinstance(scan, np.ndarray):
        if affine is None:
            raise MedldmError("an array needs its affine (4 x 4, voxel to RAS+ mm): upscale(array, affine=...)")
        if not np.all(np.isfinite(scan)):
            raise MedldmError("the array holds NaN or inf voxels")
        return Volume(scan, affine, {"format": "array"})
    raise MedldmError(
        f"cannot make a scan from a {type(scan).__name__}: pass a path, a Volume, a nibabel image "
        "or an array with its affine"
    )


@lru_cache(maxsize=2)
def _model(model: str, device: str):
    from medldm.model import load_model
    from medldm.pipeline import _device

    return load_model(model, device=_device(device))


def upscale(
    scan: ScanLike,
    *,
    affine: np.ndarray | None = None,
    scale: int | None = None,
    axis: str | int = "auto",
    kind: str | None = None,
    steps: int | None = None,
    refine: float | None = None,
    planes: str | None = None,
    refine_planes: str | None = None,
    samples: int = 1,
    seed: int = 0,
    model: str | os.PathLike = "default",
    device: str = "auto",
) -> Volume:
    """Upscale a scan as ``medldm upscale`` does, with the same defaults, and return the result as a Volume on the
    finer grid (same field of view). With ``samples > 1`` the per-voxel standard deviation over the samples is
    ``result.meta["uncertainty"]`` (an array on the same grid). The model is loaded once and kept for later
    calls."""
    from medldm.pipeline import Upscaler

    volume = as_volume(scan, affine)
    upscaler = Upscaler(
        _model(str(model), device),
        device=device,
        steps=steps,
        refine=refine,
        planes=planes,
        refine_planes=refine_planes,
    )
    result = upscaler.upscale(volume, axis=axis, scale=scale, kind=kind, samples=samples, seed=seed)
    if result.uncertainty is not None:
        result.sr.meta["uncertainty"] = result.uncertainty.data
    return result.sr


def fuse(
    stacks,
    *,
    spacing: float | None = None,
    like: ScanLike | None = None,
    register: bool = False,
    prior: str = "model",
    model: str | os.PathLike = "default",
    device: str = "auto",
) -> Volume:
    """Fuse thick-slice stacks of one session (paths, Volumes or nibabel images) into one isotropic volume, as
    ``medldm fuse`` does: at ``spacing`` mm over their common field of view, or on the grid of ``like``.
    ``result.meta["fuse"]`` holds each stack's consistency residual (a fraction of its range) and, with
    ``register``, the rigid transform found for each moved stack."""
    from medldm.fusion import fuse as run
    from medldm.pipeline import Upscaler

    upscaler = Upscaler(_model(str(model), device), device=device) if prior == "model" else None
    result = run(
        [as_volume(s) for s in stacks],
        spacing=spacing,
        like=None if like is None else as_volume(like),
        prior=prior,
        upscaler=upscaler,
        register=register,
    )
    result.volume.meta["fuse"].update(residuals=result.residuals, transforms=result.transforms)
    return result.volume


def evaluate(data: str | os.PathLike, out: str | os.PathLike, **options) -> Path:
    """Score a model and the baselines on HR scans (a folder, a .txt list or one scan) and write the browser
    report; returns the path of ``report.html``. ``options`` are those of ``medldm evaluate`` (model, kind, axis,
    scale, steps, refine, baselines, limit, lpips_weights, ...): see
    :func:`medldm.evaluation.evaluate.evaluate`."""
    from medldm.evaluation.evaluate import evaluate as run

    return run(data, Path(out), **options)
