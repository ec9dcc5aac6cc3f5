"""Upscaling to files: one scan from its path to its written output (with its uncertainty map, provenance sidecar
and preview), and a batch of scans that skips finished outputs (so an interrupted batch resumes), collects the
failures instead of stopping at the first, and ends with one CSV summary. ``medldm upscale`` is these functions
with progress bars; a script may call them with none.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medldm.choices import Format
from medldm.errors import MedldmError
from medldm.outputs import NIFTI_SUFFIXES, is_temporary, strip_suffix, write_text
from medldm.volume import SCAN_SUFFIXES, Volume, holds_dicom

__all__ = [
    "BATCH_SUMMARY",
    "AdaptSettings",
    "Request",
    "Row",
    "batch_inputs",
    "bids_jobs",
    "outputs_of",
    "run_batch",
    "save_volume",
    "uncertainty_path",
    "upscale_to_files",
    "write_batch_summary",
]

BATCH_SUMMARY = "medldm_upscale.csv"
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class AdaptSettings:
    """--adapt: fine-tune the estimator passes on each scan first (medldm.adapt), within these bounds (neither
    given: the tuned step count per pass, capped at the default minutes in all), and write the adapted model folder
    to ``save``."""

    steps: int | None = None
    minutes: float | None = None
    save: Path | None = None

    def bounds(self) -> dict:
        from medldm.adapt import DEFAULT_MINUTES, DEFAULT_STEPS

        if self.steps is None and self.minutes is None:
            return {"steps": DEFAULT_STEPS, "minutes": DEFAULT_MINUTES}
        return {"steps": self.steps, "minutes": self.minutes}


@dataclass(frozen=True)
class Request:
    """What to do with every scan of a run: the plan's settings (Upscaler.plan), the sampling, and what to write."""

    axis: str = "auto"
    scale: float | None = None
    kind: str | None = None
    spacing: float | None = None
    thickness: float | None = None
    strict: bool = False  # refuse scans outside what the model was trained on, instead of warning
    samples: int = 1
    uncertainty: bool = False  # write the uncertainty map (when the result has one: samples > 1 or an error model)
    seed: int = 0
    fmt: Format = Format.nifti
    overwrite: bool = False
    preview: Path | None = None  # a three-plane before/after PNG (one scan)
    window: str | None = None  # its CT window
    adapt: AdaptSettings | None = None


@dataclass
class Row:
    """One scan of a batch, as the summary CSV has it; ``record`` is the provenance of a written scan."""

    input: str
    output: str
    status: str  # written, skipped (already done) or failed
    error: str = ""
    record: dict | None = None

    def csv_row(self) -> dict:
        run = (self.record or {}).get("medldm", {})
        return {
            "input": self.input,
            "output": self.output,
            "status": self.status,
            "seconds": run.get("wall_time_s", ""),
            "residual": run.get("consistency_residual", ""),
            "error": self.error,
        }


class Listener:
    """What a run tells its user; this one tells nothing. The command line shows bars and lines."""

    def warn(self, source: Path, line: str) -> None:
        """The plan's warnings (a scan outside what the model was trained on)."""

    def progress(self, label: str) -> Progress | None:
        """A callback (done, total) for the next piece of work named ``label``, or None."""
        return None

    def adapted(self, source: Path, adaptation: Any) -> None:
        """Per-scan adaptation finished (a medldm.adapt.Adaptation)."""

    def done(self, row: Row, result: Any = None) -> None:
        """A scan was written (with its UpscaleResult), skipped or failed."""


def upscale_to_files(upscaler, volume: Volume, source: Path, target: Path, request: Request, listener: Listener):
    """Upscale ``volume`` (read from ``source``) and write ``target`` (NIfTI, or a DICOM series folder), its
    uncertainty map (when asked and the result has one), its provenance sidecar and the preview; returns
    (provenance record, UpscaleResult). Outputs were checked before (medldm.outputs), so a refusal here writes
    nothing."""
    from medldm.provenance import short_description, upscale_record, write_sidecar

    plan = upscaler.plan(
        volume,
        axis=request.axis,
        scale=request.scale,
        kind=request.kind,
        spacing=request.spacing,
        thickness=request.thickness,
    )
    if plan.warnings and request.strict:
        reasons = "; ".join(plan.warnings)
        why = f"outside what the model was trained on: {reasons} (drop --strict to upscale it anyway)"
        raise MedldmError(why, source)
    for line in plan.warnings:
        listener.warn(source, line)
    started = time.perf_counter()
    runner, adaptation = upscaler, None
    if request.adapt is not None:
        runner, adaptation = _adapted(upscaler, volume, plan, source, request, listener)
    # the refinement this scan or --adapt dropped (only models with an estimator drop it; the CLI's note covers a
    # --refine 0 the user gave): every sample is then the same estimate
    if request.samples > 1 and runner.refine_for(plan) == 0 and upscaler.refine != 0:
        steps = "" if upscaler.steps >= 8 else " --steps 8"
        listener.warn(
            source,
            f"the {request.samples} samples are all the regression estimate (no diffusion refinement here), so their "
            f"spread, the uncertainty map, is zero; --refine {upscaler.refine:g}{steps} draws samples that differ",
        )
    progress = listener.progress(source.name)
    result = runner.upscale(volume, plan=plan, samples=request.samples, seed=request.seed, progress=progress)
    wall_s = time.perf_counter() - started
    record = upscale_record(source=source, volume=volume, result=result, upscaler=runner, output=target, wall_s=wall_s)
    if adaptation is not None:
        losses = adaptation.losses
        record["medldm"]["adaptation"] = {
            "steps": adaptation.steps,
            "seconds": round(adaptation.seconds, 2),
            "factor": adaptation.factor,
            "thickness": adaptation.thickness,
            "loss_on": adaptation.model.info["adapted_to"]["loss_on"],  # the error the L1 was taken on (LOSS)
            "pairs": adaptation.model.info["adapted_to"]["pairs"],  # the first pass's degradations (PAIRS)
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }
    overwrite = request.overwrite
    save_volume(result.sr, target, request.fmt, overwrite=overwrite, description=short_description(record))
    if result.uncertainty is not None and request.uncertainty:
        unc = uncertainty_path(target)
        description = "medldm uncertainty (std)"
        save_volume(result.uncertainty, unc, request.fmt, overwrite=overwrite, description=description)
        record["medldm"]["uncertainty"] = str(unc.resolve())
    write_sidecar(target, record)
    if request.preview is not None:
        from medldm.figures import before_after

        before_after(volume, result.sr, request.preview, overwrite=overwrite, window=request.window)
    return record, result


def _adapted(upscaler, volume: Volume, plan, source: Path, request: Request, listener: Listener):
    """An Upscaler with the same settings whose model's estimator passes were fine-tuned on ``volume``, and the
    Adaptation; the adapted model folder is written where the request says."""
    from medldm.adapt import adapt

    settings = request.adapt
    assert settings is not None  # called with --adapt only
    progress = listener.progress(f"adapting to {source.name}")
    adaptation = adapt(upscaler.model, volume, plan, **settings.bounds(), seed=request.seed, progress=progress)
    listener.adapted(source, adaptation)
    if settings.save is not None:
        done = {
            **adaptation.model.info["adapted_to"],
            "scan": str(volume.path),
            "steps": adaptation.steps,
            "seconds": round(adaptation.seconds, 2),
        }
        adaptation.model.save(settings.save, adapted_to=done)
    return upscaler.with_model(adaptation.model), adaptation


def run_batch(
    jobs: list[tuple[Path, Path]],
    work: Callable[[Path, Path], tuple[dict, Any]],
    *,
    overwrite: bool,
    single: bool,
    listener: Listener,
) -> list[Row]:
    """Run ``work(source, target)`` (returning the provenance record and the result) for each job. A batch
    (``single`` False) skips a job whose output exists (unless ``overwrite``) and records a refused scan as
    failed and goes on; a single scan raises instead."""
    rows = []
    for source, target in jobs:
        result = None
        try:
            if target.exists() and not overwrite:
                if single:
                    raise MedldmError("already exists; pass --overwrite to replace it", target)
                row = Row(str(source), str(target), "skipped")
            else:
                record, result = work(source, target)
                row = Row(str(source), str(target), "written", record=record)
        except MedldmError as err:
            if single:
                raise
            row = Row(str(source), str(target), "failed", error=str(err))
        rows.append(row)
        listener.done(row, result)
    return rows


def write_batch_summary(folder: Path, rows: list[Row]) -> Path:
    """One CSV row per scan of a batch (merged over every process of a cohort run), written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["input", "output", "status", "seconds", "residual", "error"])
    writer.writeheader()
    writer.writerows(row.csv_row() for row in rows)
    return write_text(folder / BATCH_SUMMARY, text.getvalue(), suffixes=(".csv",))


def save_volume(volume: Volume, out: Path, fmt: Format, *, overwrite: bool, description: str | None = None) -> None:
    """Write a volume as NIfTI, or as a DICOM series folder."""
    if fmt == Format.dicom:
        from medldm.dicom import save_dicom

        save_dicom(volume, out, overwrite=overwrite, description=description or "medldm")
    else:
        from medldm.volume import save_nifti

        save_nifti(volume, out, overwrite=overwrite, description=description)


def batch_inputs(folder: Path, out_dir: Path | None) -> list[Path] | None:
    """The scans of a batch folder (NIfTI/NRRD files and DICOM sub-folders), or None for a DICOM series folder (one
    that directly holds DICOM files).
    A batch never takes its own products as inputs: hidden and temporary files, the outputs (and uncertainty maps)
    of the folder's other scans, and the output folder when it lies inside."""
    if holds_dicom(folder):  # one rule for every command (medldm.volume.holds_dicom)
        return None
    entries = [p for p in folder.iterdir() if not is_temporary(p)]
    files = [p for p in entries if p.is_file() and p.name.lower().endswith(SCAN_SUFFIXES)]
    subdirs = [p for p in entries if p.is_dir() and (out_dir is None or p.resolve() != out_dir.resolve())]
    if not files and not subdirs:
        return None  # a DICOM series folder (or nothing): load() decides and explains
    products = {q.name for p in [*files, *subdirs] for fmt in Format for q in outputs_of(p, folder, fmt)}
    return sorted(p for p in files if p.name not in products) + sorted(p for p in subdirs if p.name not in products)


def outputs_of(scan: Path, out_dir: Path | None, fmt: Format = Format.nifti) -> tuple[Path, Path]:
    """The upscaled scan's default path (a file, or a folder for DICOM) and its uncertainty map's."""
    stem, _ = strip_suffix(scan.name, SCAN_SUFFIXES)
    target = (out_dir or scan.parent) / (f"{stem}_sr.nii.gz" if fmt == Format.nifti else f"{stem}_sr")
    return target, uncertainty_path(target)


def uncertainty_path(target: Path) -> Path:
    """Where the uncertainty map of ``target`` goes: ``<name>_uncertainty`` with the same suffix."""
    stem, suffix = strip_suffix(target.name, NIFTI_SUFFIXES)
    return target.with_name(f"{stem}_uncertainty{suffix}")


def bids_jobs(scan: Path, out: Path | None, fmt: Format) -> tuple[list[Path], list[tuple[Path, Path]], Path]:
    """A BIDS run: the dataset's scans at or under ``scan``, each with its derivative path, and the derivatives
    folder (which also takes the batch summary)."""
    from medldm.bids import PIPELINE, bids_root, bids_scans, derivative_path

    root = bids_root(scan)
    if root is None:
        raise MedldmError("is not inside a BIDS dataset (no dataset_description.json at or above it)", scan)
    if fmt != Format.nifti:
        raise MedldmError("BIDS derivatives are NIfTI: --bids takes no --format dicom", scan)
    here = scan.resolve()
    sources = [p for p in bids_scans(root) if p == here or here in p.parents]
    if not sources:
        raise MedldmError("holds no NIfTI scans of the BIDS dataset (under its sub-* folders)", scan)
    derivatives = out if out is not None else root / "derivatives" / PIPELINE
    return sources, [(p, derivative_path(p, root, derivatives)) for p in sources], derivatives
