"""The evaluation report: ``metrics.csv``, ``summary.json``, one self-contained ``report.html`` and ``figures/``.

This module writes the files; the page is report_html.py's, its figures report_figures.py's. The HTML page needs
nothing but a browser: inline CSS, no scripts, figures embedded as base64 PNG ``data:``
URIs; every figure is also written beside it as ``figures/<name>.png`` and ``.svg`` for papers and slides. It
states every convention behind the numbers: the protocol dict it is given, verbatim, and the statistics (see
``medldm.evaluation.stats``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from medldm.evaluation.metrics import HIGHER_IS_BETTER, PER_CLASS_METRICS
from medldm.evaluation.report_figures import Figures
from medldm.evaluation.report_html import jsonable, page
from medldm.evaluation.stats import summarise

import medldm
from medldm.errors import MedldmError
from medldm.outputs import write_bytes, write_text

__all__ = ["write_report", "REPORT_FILES"]


REPORT_FILES = ("metrics.csv", "summary.json", "report.html")
FIGURES_DIR = "figures"


def write_report(
    out_dir: str | os.PathLike,
    *,
    rows: Sequence[Mapping[str, Any]],
    protocol: Mapping[str, Any],
    examples: Sequence[Mapping[str, Any]] | None = None,
    rd: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    metrics: Sequence[str] = ("psnr", "ssim", "lpips", "nrmse"),
    higher_is_better: Mapping[str, bool] | None = None,
    baselines: Sequence[str] = ("nearest", "trilinear", "bspline"),
    title: str = "Super-resolution evaluation",
    confidence: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
    calibration: Sequence[Mapping[str, Any]] | None = None,
    rd_sample: str | None = None,
) -> Path:
    """Write ``metrics.csv``, ``summary.json``, ``report.html`` and ``figures/`` (each figure as PNG and SVG) into
    ``out_dir``; return the HTML path.

    Everything is computed and rendered before the first file is written; each file is written atomically and
    replaces the file of that name (whether that is allowed is the caller's decision, e.g. the CLI's
    ``--overwrite``).

    Args:
        out_dir: folder for the three files (created if needed).
        rows: one dict per (volume, method): ``volume``, ``method``, metric values (float or None) and any
            other columns (they go to the CSV).
        protocol: every convention behind the numbers (degradation, scales, data range, masks, seeds, software
            versions, config hash ...); rendered key by key, nested dicts as nested tables.
        examples: panels to show, each ``{"title": str, "images": {label: 2D array or Volume},
            "cmap": {label: matplotlib colormap name}}`` (``cmap`` optional). Intensity panels share one grey
            scale; panels whose label starts with "error" share a second scale and those starting with
            "uncertainty" a third. A Volume is shown as its axial plane through the centre of the first Volume
            of the example (``medldm.figures.three_planes``).
        rd: rate-distortion series, e.g. ``{"autoencoder": [{"label", "bits_per_voxel", "psnr", "rmse"}, ...],
            "diffusion": [{"t", "bits_per_dim", "bits_per_voxel", "psnr", "rmse"}, ...]}``; any key is a
            series, missing keys are fine.
        timings: seconds per volume for each method.
        metrics: metric keys, in table order; those no row holds are listed as not computed.
        higher_is_better: direction of each metric, merged over medldm.evaluation.metrics.HIGHER_IS_BETTER.
        baselines: baseline method names; the best of them per metric is the reference of the paired tests.
        title: page title.
        confidence: coverage of the bootstrap intervals.
        n_boot: bootstrap resamples.
        seed: seed of the bootstrap and of the plot jitter.
        calibration: per volume, how the model's uncertainty predicts its error: ``{"volume", "spearman",
            "std_by_decile", "error_by_decile"}`` (medldm.evaluation.metrics.uncertainty_calibration).
        rd_sample: what the rate-distortion curves were measured on (volumes, slices, intensity scale), stated
            above them.

    Raises:
        MedldmError: no rows, malformed rows/examples/rd, or ``out_dir`` is a file.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MedldmError("is not a folder", out)
    rows = [dict(r) for r in rows]
    if not rows:
        raise MedldmError("no metrics rows to report")
    direction = {**HIGHER_IS_BETTER, **(higher_is_better or {})}
    present = [m for m in metrics if any(r.get(m) is not None for r in rows)]
    per_class = [m for m in PER_CLASS_METRICS if any(r.get(m) is not None for r in rows)]
    options = {
        "higher_is_better": direction,
        "baselines": list(baselines),
        "confidence": confidence,
        "n_boot": n_boot,
        "seed": seed,
    }
    table = summarise(rows, metrics=present, **options)
    volumetry = summarise(rows, metrics=per_class, **options) if per_class else []
    statistics = _statistics(confidence=confidence, n_boot=n_boot, seed=seed)
    created = datetime.now(timezone.utc).replace(microsecond=0)
    summary = {
        "title": title,
        "created": created.isoformat(),
        "medldm_version": medldm.__version__,
        "protocol": protocol,
        "statistics": statistics,
        "metrics": present,
        "metrics_not_computed": [m for m in metrics if m not in present],
        "higher_is_better": {m: bool(direction[m]) for m in present},
        "baselines": list(baselines),
        "summary": table,
        "timings": timings,
        "rate_distortion": rd,
        "uncertainty_calibration": list(calibration or []),
        "volumetry": volumetry,
    }
    figures = Figures()
    html_text = page(
        title=title,
        created=created,
        rows=rows,
        summary=summary,
        table=table,
        examples=examples or [],
        rd=rd,
        timings=timings,
        seed=seed,
        calibration=calibration or [],
        rd_sample=rd_sample,
        figures=figures,
    )
    texts = {
        "metrics.csv": _csv_text(rows, metrics),
        "summary.json": json.dumps(jsonable(summary), indent=1, allow_nan=False) + "\n",
        "report.html": html_text,
    }
    _write_files(out, texts, figures.files)
    return out / "report.html"


def _write_files(out: Path, texts: dict[str, str], figures: dict[str, bytes]) -> None:
    """The figures, then the report's files, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    (out / FIGURES_DIR).mkdir(exist_ok=True)
    for name, data in figures.items():
        write_bytes(out / FIGURES_DIR / name, data)
    for name, text in texts.items():
        write_text(out / name, text)


def _csv_text(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    columns = ["volume", "method"] + [m for m in metrics if m in keys]
    columns += [k for k in keys if k not in columns]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_csv_cell(r.get(k)) for k in columns])
    return buf.getvalue()


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(jsonable(v))
    if isinstance(v, np.generic):
        v = v.item()
    return str(v)


def _statistics(*, confidence: float, n_boot: int, seed: int) -> dict[str, Any]:
    import scipy

    return {
        "unit": "volume (every value is one metric of one whole volume)",
        "confidence_interval": (
            f"{confidence:.0%} percentile bootstrap of the mean over volumes (scipy.stats.bootstrap)"
        ),
        "confidence": confidence,
        "bootstrap_resamples": n_boot,
        "bootstrap_seed": seed,
        "test": (
            "two-sided Wilcoxon signed-rank test, paired by volume, against the best baseline for each "
            "metric (best mean in the metric's direction)"
        ),
        "test_implementation": (
            f"scipy {scipy.__version__} stats.wilcoxon, zero_method='wilcox' (zero "
            "differences discarded), method='auto' (exact up to 50 pairs)"
        ),
        "multiple_comparisons": "none: p-values are not adjusted",
        "missing_values": "left out; a volume missing for either method is left out of the pairs",
    }
