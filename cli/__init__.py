"""The `medldm` command line. Heavy libraries (torch, MONAI) are imported inside the commands that need them,
so `medldm --help` and `medldm info` start fast. User mistakes (MedldmError) print one line and exit 1."""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from medldm.errors import MedldmError

__all__ = ["app"]


class _App(typer.Typer):
    """A Typer app whose commands turn MedldmError into one line on stderr and exit code 1."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(fn):
            @functools.wraps(fn)
            def wrapped(*a, **k):
                try:
                    return fn(*a, **k)
                except MedldmError as err:
                    print(f"error: {err}", file=sys.stderr)
                    raise typer.Exit(1) from None

            return register(wrapped)

        return decorator


app = _App(
    name="medldm",
    help="Latent diffusion super-resolution for MRI and CT volumes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


class Kind(str, Enum):
    slice_profile = "slice-profile"
    kspace = "kspace"
    blur = "blur"


class Profile(str, Enum):
    gaussian = "gaussian"
    boxcar = "boxcar"


AXIS_HELP = "x, y, z (world L-R, P-A, I-S), i, j, k (voxel axes) or auto (largest spacing, else z)"
Scan = Annotated[Path, typer.Argument(help="NIfTI, NRRD, DICOM file, or a folder holding a DICOM series")]
Series = Annotated[str | None, typer.Option("--series", help="DICOM SeriesInstanceUID when a folder holds several")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing output file")]


def _check_output(path: Path, overwrite: bool) -> None:
    """Refuse a bad output path before any work is done, so a failure writes nothing."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise MedldmError("output must end in .nii or .nii.gz", path)
    if path.exists() and not overwrite:
        raise MedldmError("already exists; pass --overwrite to replace it", path)


def _load(scan: Path, series: str | None = None):
    from rich.console import Console

    from medldm.volume import load

    with Console(stderr=True).status(f"reading {scan}"):
        return load(scan, series_uid=series)


@app.command()
def info(scan: Scan, series: Series = None):
    """Shape, spacing, orientation, intensity range and modality of a scan."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from medldm.intensity import guess_modality

    vol = _load(scan, series)
    p1, p99 = np.percentile(vol.data, [1, 99])
    table = Table(title=str(scan), show_header=False, title_justify="left")
    rows = {
        "format": vol.meta.get("format", "?"),
        "shape": " x ".join(str(n) for n in vol.shape),
        "spacing (mm)": " x ".join(f"{s:.4g}" for s in vol.spacing),
        "orientation": vol.orientation,
        "field of view (mm)": " x ".join(f"{n * s:.1f}" for n, s in zip(vol.shape, vol.spacing, strict=True)),
        "stored type": vol.meta.get("dtype", "?"),
        "intensity": f"min {vol.data.min():.6g}, max {vol.data.max():.6g}, p1 {p1:.6g}, p99 {p99:.6g}",
        "modality (guess)": guess_modality(vol.data, vol.meta.get("modality")),
    }
    if "series_uid" in vol.meta:
        rows["series"] = f"{vol.meta['series_uid']} {vol.meta.get('series_description', '')}".strip()
    for key, value in rows.items():
        table.add_row(key, value)
    table.add_row("affine", "\n".join("  ".join(f"{v:9.4f}" for v in row) for row in vol.affine))
    Console().print(table)


@app.command()
def convert(scan: Scan, out: Annotated[Path, typer.Argument(help="output .nii or .nii.gz")],
            series: Series = None, overwrite: Overwrite = False):
    """Convert a DICOM series (folder or enhanced multi-frame file) or NRRD to NIfTI, geometry exact."""
    from medldm.volume import save_nifti

    _check_output(out, overwrite)
    vol = _load(scan, series)
    save_nifti(vol, out, overwrite=overwrite)
    print(f"wrote {out}: {' x '.join(map(str, vol.shape))} voxels, {vol.orientation}, "
          f"spacing {' x '.join(f'{s:.4g}' for s in vol.spacing)} mm")


@app.command()
def degrade(
    scan: Scan,
    out: Annotated[Path, typer.Argument(help="output .nii or .nii.gz (the low-resolution scan)")],
    axis: Annotated[str, typer.Option(help=AXIS_HELP)] = "z",
    scale: Annotated[int, typer.Option(min=2, max=16, help="integer factor")] = 4,
    kind: Annotated[Kind, typer.Option(help="thick slices along AXIS, or in-plane k-space truncation / blur")]
    = Kind.slice_profile,
    profile: Annotated[Profile, typer.Option(help="slice profile (slice-profile and blur kinds)")]
    = Profile.gaussian,
    noise: Annotated[float, typer.Option(min=0.0, help="Rician noise, fraction of the 99th percentile")] = 0.0,
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
    hr_out: Annotated[Path | None, typer.Option(help="also write the (cropped) high-resolution reference")] = None,
    series: Series = None,
    overwrite: Overwrite = False,
):
    """Simulate a low-resolution acquisition with the same forward model training and evaluation use."""
    _check_output(out, overwrite)
    if hr_out is not None:
        _check_output(hr_out, overwrite)
    vol = _load(scan, series)
    from medldm.degrade import degrade_volume

    from medldm.volume import save_nifti

    result = degrade_volume(vol, kind=kind.value, axis=axis, scale=scale, profile=profile.value, noise=noise,
                            seed=seed)
    save_nifti(result.lr, out, overwrite=overwrite)
    if hr_out is not None:
        save_nifti(result.hr, hr_out, overwrite=overwrite)
    lr = result.lr
    print(f"wrote {out}: {' x '.join(map(str, lr.shape))} voxels, spacing "
          f"{' x '.join(f'{s:.4g}' for s in lr.spacing)} mm ({kind.value}, x{scale} along voxel axis "
          f"{lr.meta['degrade']['axis']})")
    if result.hr.shape != vol.shape:
        print(f"note: the scan was cropped from {vol.shape} to {result.hr.shape} to hold whole thick voxels")
