"""What made an output: the provenance record written beside every upscaled scan (``<name>.json``, a BIDS
derivative sidecar) and its short form in the NIfTI ``descrip`` field.

The record holds everything needed to repeat the run: the command line and working folder, the input's SHA-256,
the model's digest (of its SHA256SUMS, so of every file in the model folder), every sampling setting, the task
and geometry, the consistency residual, wall time and device."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path

from medldm import __version__
from medldm.outputs import NIFTI_SUFFIXES, strip_suffix, write_text

__all__ = [
    "sampling_summary",
    "sidecar_path",
    "input_digest",
    "model_digest",
    "git_commit",
    "upscale_record",
    "short_description",
    "write_sidecar",
]


def sidecar_path(output: str | os.PathLike) -> Path:
    """``scan_sr.nii.gz`` -> ``scan_sr.json`` (the BIDS sidecar name)."""
    output = Path(output)
    stem, _ = strip_suffix(output.name, NIFTI_SUFFIXES)
    return output.with_name(f"{stem}.json")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a scan file; of a DICOM folder, SHA-256 over its files' names and digests in name order."""
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}  {_file_sha256(f)}\n".encode())
    return h.hexdigest()


def model_digest(folder: str | os.PathLike) -> str:
    """SHA-256 of the model folder's SHA256SUMS: it lists every file's digest, so it names the exact model."""
    return _file_sha256(Path(folder) / "SHA256SUMS")


@cache
def git_commit() -> str | None:
    """The commit of the medldm checkout this runs from (with ``-dirty`` for local changes), or None when it is
    not a git checkout (an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None

    def run(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = run("rev-parse", "HEAD")
        return commit + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _geometry(volume) -> dict:
    return {
        "shape": list(volume.shape),
        "spacing_mm": [round(s, 6) for s in volume.spacing],
        "orientation": volume.orientation,
    }


def sampling_summary(upscaler, refine: float | None = None) -> str:
    """How an Upscaler makes its output, in words (provenance records, the demo); ``refine``: the level one output
    was made with, where it differs from the upscaler's (medldm.pipeline.Upscaler.refine_for)."""
    refine = upscaler.refine if refine is None else refine
    if upscaler.model.estimator is not None and refine == 0:
        return "its regression estimate (no diffusion refinement)"
    if upscaler.model.estimator is not None:
        return f"its regression estimate refined by {upscaler.steps} diffusion step(s) from {refine:g}"
    return f"{upscaler.steps} diffusion sampler step(s) from noise"


def upscale_record(
    *,
    source: str | os.PathLike,
    volume,
    result,
    upscaler,
    output: str | os.PathLike,
    wall_s: float,
    command: list[str] | None = None,
) -> dict:
    """The provenance record of one upscale: ``volume`` was read from ``source`` and became ``result``.
    ``command`` defaults to this process's command line (``medldm`` and its arguments)."""
    model = upscaler.model
    task = result.task
    made = result.sr.meta["upscale"]
    settings = {
        "steps": upscaler.steps,
        "refine": made["refine"],  # this scan's (a modality the model never learnt gets the estimate alone)
        "sampler": upscaler.sampler,
        "planes": upscaler.planes,
        "refine_planes": upscaler.refine_planes,
        "samples": result.sr.meta["upscale"]["samples"],
        "seed": result.sr.meta["upscale"]["seed"],
        "consistency": upscaler.consistency,
        "condition_level": upscaler.condition_level,
        "bf16": upscaler.bf16,
        "diffusion_bf16": upscaler.diffusion_bf16,
        "batch_size": upscaler.batch_size,
    }
    how = sampling_summary(upscaler, made["refine"])
    # the output grid's exact factor (any number for thick slices), and the factor of the grid the estimate was made
    # on (the nearest trained one where the model never learnt the exact one: docs/grids.md)
    factor = {"exact": made["scale"], "thickness_ratio": made["thickness"], "estimate_scale": made["estimate_scale"]}
    description = (
        f"Super-resolved by medldm {__version__}: {task.kind} x{factor['exact']:.4g} along voxel axis {result.axis}"
        f" (the model's x{task.scale} task), "
        f"model {model.config.name} ({model_digest(model.path)[:12]}), {how}, made consistent with the "
        f"input (residual {100 * result.residual:.3g}% of range). Finer detail than the input's is a "
        "model's guess."
    )
    return {
        "Description": description,
        "GeneratedBy": [
            {"Name": "medldm", "Version": __version__, **({"Commit": git_commit()} if git_commit() else {})}
        ],
        "Sources": [str(source)],
        "medldm": {
            "command": ["medldm", *sys.argv[1:]] if command is None else list(command),  # as a user types it
            "cwd": os.getcwd(),
            "input": {"path": str(Path(source).resolve()), "sha256": input_digest(source), **_geometry(volume)},
            "output": {"path": str(Path(output).resolve()), **_geometry(result.sr)},
            "model": {
                "name": model.config.name,
                "path": str(model.path),
                "sha256": model_digest(model.path),
                "config_digest": model.info.get("config_digest"),
            },
            "task": {"kind": task.kind, "scale": task.scale, "axis": result.axis, "profile": task.profile},
            "factor": factor,
            "sampling": settings,
            "consistency_residual": result.residual,
            "wall_time_s": round(wall_s, 3),
            "device": str(upscaler.device),
            "host": {"python": platform.python_version(), "torch": _torch_version(), "machine": platform.machine()},
        },
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def short_description(record: dict) -> str:
    """The record in one short line, for the NIfTI descrip field (save_nifti keeps its first 79 bytes)."""
    m = record["medldm"]
    s, t = m["sampling"], m["task"]
    factor = m["factor"]["exact"]
    return (
        f"medldm {record['GeneratedBy'][0]['Version']} {m['model']['sha256'][:12]} {t['kind']} x{factor:.4g} "
        f"ax{t['axis']} r{s['refine']:g} s{s['steps']} n{s['samples']} seed{s['seed']}"
    )


def write_sidecar(output: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` beside ``output`` as its sidecar (atomically) and return the sidecar's path."""
    return write_text(sidecar_path(output), json.dumps(record, indent=1) + "\n", suffixes=(".json",))
