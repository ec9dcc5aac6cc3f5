"""BIDS in, BIDS derivatives out: `medldm upscale DATASET --bids` finds the dataset's NIfTI scans and writes each
one to ``derivatives/medldm/`` with the same sub-/ses-/datatype folders and a ``desc-sr`` entity, beside the
derivative's ``dataset_description.json`` (BIDS 1.9, "Derivatives")."""

from __future__ import annotations

import json
import os
from pathlib import Path

from medldm import __version__
from medldm.errors import MedldmError
from medldm.outputs import NIFTI_SUFFIXES, strip_suffix, write_text

__all__ = ["bids_root", "bids_scans", "derivative_path", "write_dataset_description", "PIPELINE"]

PIPELINE = "medldm"
DESCRIPTION = "dataset_description.json"


def bids_root(path: str | os.PathLike) -> Path | None:
    """The BIDS dataset holding ``path`` (the nearest folder at or above it with a dataset_description.json),
    or None."""
    path = Path(path).resolve()
    for folder in [path, *path.parents] if path.is_dir() else path.parents:
        if (folder / DESCRIPTION).is_file():
            return folder
    return None


def bids_scans(root: Path) -> list[Path]:
    """The NIfTI scans of a BIDS dataset (under sub-* folders, never under derivatives/ or sourcedata/)."""
    return sorted(
        p
        for sub in sorted(root.glob("sub-*"))
        if sub.is_dir()
        for p in sub.rglob("*")
        if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")
    )


def derivative_path(scan: Path, root: Path, out_root: Path | None = None) -> Path:
    """Where the upscaled ``scan`` goes: ``<out_root or root/derivatives/medldm>/<same folders>/<name with
    desc-sr>``, e.g. sub-01/anat/sub-01_T1w.nii.gz -> sub-01/anat/sub-01_desc-sr_T1w.nii.gz. An existing desc
    entity becomes desc-<old>sr."""
    scan, root = Path(scan).resolve(), Path(root).resolve()
    try:
        relative = scan.relative_to(root)
    except ValueError:
        raise MedldmError(f"is not inside the BIDS dataset {root}", scan) from None
    stem, suffix = strip_suffix(scan.name, NIFTI_SUFFIXES)
    parts = stem.split("_")
    if len(parts) < 2 or not parts[0].startswith("sub-"):
        raise MedldmError("is not a BIDS file name (sub-<label>_..._<suffix>)", scan)
    entities, modality = parts[:-1], parts[-1]
    old = next((e for e in entities if e.startswith("desc-")), None)
    entities = [e for e in entities if e != old] + [f"desc-{old[5:] if old else ''}sr"]
    base = out_root if out_root is not None else root / "derivatives" / PIPELINE
    return base / relative.parent / ("_".join([*entities, modality]) + suffix)


def write_dataset_description(derivatives: Path, source: Path) -> Path:
    """The derivative dataset's description (written once; an existing one is left alone)."""
    path = derivatives / DESCRIPTION
    if path.exists():
        return path
    derivatives.mkdir(parents=True, exist_ok=True)
    source_name = "source dataset"
    try:
        source_name = json.loads((source / DESCRIPTION).read_text()).get("Name", source_name)
    except (OSError, ValueError, AttributeError):
        pass
    record = {
        "Name": f"medldm super-resolution of {source_name}",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": PIPELINE,
                "Version": __version__,
                "Description": "latent diffusion super-resolution (regression estimate refined by "
                "a conditional latent diffusion model, made data-consistent)",
            }
        ],
        "SourceDatasets": [{"URL": source.resolve().as_uri()}],
    }
    return write_text(path, json.dumps(record, indent=1) + "\n", suffixes=(".json",))
