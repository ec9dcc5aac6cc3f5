"""The evaluation report: ``metrics.csv``, ``summary.json``, one self-contained ``report.html`` and ``figures/``.

The HTML page needs nothing but a browser: inline CSS, no scripts, figures embedded as base64 PNG ``data:``
URIs; every figure is also written beside it as ``figures/<name>.png`` and ``.svg`` for papers and slides. It
states every convention behind the numbers: the protocol dict it is given, verbatim, and the statistics (see
``medldm.evaluation.stats``).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from medldm.evaluation.metrics import HIGHER_IS_BETTER, METRIC_INFO, PER_CLASS_METRICS
from medldm.evaluation.stats import summarise

import medldm
from medldm.errors import MedldmError
from medldm.outputs import write_bytes, write_text

__all__ = ["write_report", "REPORT_FILES"]

REPORT_FILES = ("metrics.csv", "summary.json", "report.html")
FIGURES_DIR = "figures"
SMALL_SAMPLE = 8  # below this many volumes the report warns that intervals and p-values are rough
DPI = 110
PANELS_PER_ROW = 6
# Labels (lower case) of example panels drawn on their own colour scale rather than the shared grey scale.
ERROR_PREFIX, UNCERTAINTY_PREFIX = "error", "uncertainty"

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;max-width:1100px;
  margin:0 auto;padding:24px 28px 64px;color:#1f2328;background:#fff;line-height:1.5}
h1{font-size:1.75rem;margin:0 0 .2rem}
h2{font-size:1.3rem;margin:2.2rem 0 .6rem;padding-bottom:.3rem;border-bottom:1px solid #d0d7de}
h3{font-size:1.05rem;margin:1.4rem 0 .4rem}
.meta{color:#59636e;margin:0 0 .8rem}
nav{font-size:.95rem;margin-bottom:1rem}
nav a{margin-right:1.1rem;color:#0550ae;text-decoration:none}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.92rem}
th,td{padding:.35rem .75rem;border-bottom:1px solid #e1e4e8;text-align:left;vertical-align:top}
thead th{background:#f6f8fa;border-bottom:2px solid #d0d7de;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.results td,table.results th{padding:.45rem .8rem}
table.results th .sub{font-weight:400}
.ci{font-size:.8rem;color:#59636e}
.p{font-size:.82rem;color:#1f2328}
.wide{overflow-x:auto}
tr.baseline td{background:#fafbfc}
.tag{font-size:.72rem;color:#59636e;border:1px solid #d0d7de;border-radius:3px;padding:0 .3rem;margin-left:.4rem}
.sub{font-size:.78rem;color:#59636e}
table.kv th{font-weight:600;background:transparent;border-bottom:1px solid #e1e4e8;white-space:normal;
  min-width:11rem}
table.kv table.kv{margin:0;font-size:.95em}
.note{font-size:.9rem;color:#3d444d;max-width:60rem}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:.5rem .8rem;border-radius:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:12px 20px}
figure{margin:0 0 1.2rem}
figcaption{font-size:.9rem;color:#3d444d;margin-top:.2rem}
img{max-width:100%;height:auto;display:block}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.88em}
"""


# --------------------------------------------------------------------------------------------- public


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
    table = summarise(
        rows,
        metrics=present,
        higher_is_better=direction,
        baselines=list(baselines),
        confidence=confidence,
        n_boot=n_boot,
        seed=seed,
    )
    per_class = [m for m in PER_CLASS_METRICS if any(r.get(m) is not None for r in rows)]
    volumetry = (
        summarise(
            rows,
            metrics=per_class,
            higher_is_better=direction,
            baselines=list(baselines),
            confidence=confidence,
            n_boot=n_boot,
            seed=seed,
        )
        if per_class
        else []
    )
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
    figures = _Figures()
    page = _page(
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
        "summary.json": json.dumps(_jsonable(summary), indent=1, allow_nan=False) + "\n",
        "report.html": page,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / FIGURES_DIR).mkdir(exist_ok=True)
    for name, data in figures.files.items():
        write_bytes(out / FIGURES_DIR / name, data)
    for name, text in texts.items():
        write_text(out / name, text)
    return out / "report.html"


# ------------------------------------------------------------------------------------------ files


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
        return json.dumps(_jsonable(v))
    if isinstance(v, np.generic):
        v = v.item()
    return str(v)


def _jsonable(v: Any) -> Any:
    """Plain JSON types; non-finite floats become their names ("nan", "inf") since JSON cannot hold them."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
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


# ------------------------------------------------------------------------------------------- html


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _label(metric: str) -> str:
    return METRIC_INFO[metric].label if metric in METRIC_INFO else metric


def _page(
    *, title, created, rows, summary, table, examples, rd, timings, seed, calibration, rd_sample, figures: _Figures
) -> str:
    metrics = summary["metrics"]
    sections = [
        ("protocol", "Protocol", _protocol_section(summary)),
        ("results", "Results", _small_sample_warning(table) + _results_section(summary, table)),
        ("per-volume", "Per-volume values", _per_volume_section(rows, table, metrics, seed, figures)),
    ]
    if summary["volumetry"]:
        sections.append(("volumetry", "Volumetry", _volumetry_section(summary)))
    if examples:
        sections.append(("examples", "Examples", _examples_section(examples, figures)))
    if calibration:
        sections.append(("uncertainty", "Uncertainty", _calibration_section(calibration, figures)))
    if rd:
        sections.append(("rate-distortion", "Rate-distortion", _rd_section(rd, rd_sample, figures)))
    if timings:
        sections.append(("timings", "Timings", _timings_section(timings)))
    n_volumes = len({str(r["volume"]) for r in rows})
    n_methods = len({str(r["method"]) for r in rows})
    nav = "".join(f'<a href="#{key}">{_e(name)}</a>' for key, name, _ in sections)
    body = "\n".join(
        f'<section id="{key}">\n<h2>{_e(name)}</h2>\n{content}\n</section>' for key, name, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header>\n<h1>{_e(title)}</h1>\n"
        f'<p class="meta">Generated {_e(created.strftime("%Y-%m-%d %H:%M UTC"))} by medldm '
        f"{_e(medldm.__version__)} &middot; {n_volumes} volumes &middot; {n_methods} methods</p>\n"
        f"<nav>{nav}</nav>\n</header>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _value_html(v: Any) -> str:
    if isinstance(v, Mapping):
        if not v:
            return '<span class="sub">(empty)</span>'
        cells = "".join(f"<tr><th>{_e(k)}</th><td>{_value_html(x)}</td></tr>" for k, x in v.items())
        return f'<table class="kv">{cells}</table>'
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, (list, tuple, set)):
        items = list(v)
        if any(isinstance(x, (Mapping, list, tuple)) for x in items):
            return "".join(f"<div>{_value_html(x)}</div>" for x in items)
        return _e(", ".join(str(_jsonable(x)) for x in items))
    return _e(_jsonable(v))


def _protocol_section(summary: dict) -> str:
    protocol = summary["protocol"]
    parts = []
    if not protocol:
        parts.append('<p class="warn">No protocol was given: these numbers cannot be reproduced from this report.</p>')
    else:
        parts.append('<p class="note">Every setting the evaluation was run with, as recorded.</p>')
        parts.append(_value_html(protocol))
    parts.append("<h3>Statistics</h3>")
    parts.append(_value_html({k.replace("_", " "): v for k, v in summary["statistics"].items()}))
    return "\n".join(parts)


def _decimals(values: list[float]) -> int:
    """Decimals that give about four significant digits to the largest value of a column."""
    big = max((abs(v) for v in values), default=0.0)
    if big == 0.0:
        return 4
    return int(min(6, max(0, 3 - math.floor(math.log10(big)))))


def _format_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "p &lt; 0.001" if p < 0.001 else f"p = {p:.3f}"


def _small_sample_warning(table: list[dict]) -> str:
    n_volumes = max((r["n"] for r in table), default=0)
    if n_volumes >= SMALL_SAMPLE:
        return ""
    smallest_p = min(2 / 2**n_volumes, 1.0) if n_volumes else 1.0
    return (
        f'<p class="warn" id="small-sample"><strong>Small sample: {n_volumes} volume(s).</strong> '
        f"With fewer than {SMALL_SAMPLE} volumes the bootstrap interval understates the uncertainty of the mean "
        "(it can only recombine the few values seen) and the paired Wilcoxon test cannot reach significance: its "
        f"smallest possible two-sided p with {n_volumes} pairs is {smallest_p:.2g}. Read these numbers as a "
        "description of these volumes, not as evidence about scans in general.</p>\n"
    )


def _volumetry_section(summary: dict) -> str:
    """Per tissue class Dice and absolute volume error, with the results table's intervals and tests."""
    table = summary["volumetry"]
    metrics = list(dict.fromkeys(r["metric"] for r in table))
    view = {
        **summary,
        "metrics": metrics,
        "metrics_not_computed": [],
        "higher_is_better": {r["metric"]: r["higher_is_better"] for r in table},
    }
    note = (
        '<p class="note"><strong>A proxy, not a clinical segmentation.</strong> Does super-resolution change '
        "the volumes a reader would measure? The truth's intensities inside the mask are split into three classes "
        "by a Gaussian mixture (scikit-learn), darkest first (on T1: CSF, grey matter, white matter; on other "
        "contrasts, whatever the intensities separate); the same mixture then labels each output. Dice against "
        "the truth's labels, and the absolute volume error in % of the truth's class volume (the signed change, "
        "which shows a bias, is in metrics.csv as volume_change_N). The results table shows the means over the "
        "classes.</p>"
    )
    return note + _results_section(view, table, table_id="volumetry-table")


def _results_section(summary: dict, table: list[dict], table_id: str = "results-table") -> str:
    metrics, baselines = summary["metrics"], summary["baselines"]
    if not metrics:
        return '<p class="warn">No metric values in the rows.</p>'
    cells = {(r["method"], r["metric"]): r for r in table}
    methods = list(dict.fromkeys(r["method"] for r in table))
    conf = summary["statistics"]["confidence"]
    best_mean, decimals, best_base = {}, {}, {}
    for m in metrics:
        means = [r["mean"] for r in table if r["metric"] == m and r["mean"] is not None]
        hib = summary["higher_is_better"][m]
        best_mean[m] = (max if hib else min)(means) if means else None
        decimals[m] = _decimals(means)
        best_base[m] = next((r["best_baseline"] for r in table if r["metric"] == m), None)

    head1 = "".join(
        f'<th class="num">{_e(_label(m))} {"&uarr;" if summary["higher_is_better"][m] else "&darr;"}'
        f'<br><span class="sub">mean [{conf:.0%} CI]<br>'
        f"p vs {_e(best_base[m]) if best_base[m] else 'baseline'}</span></th>"
        for m in metrics
    )
    body = []
    for method in methods:
        is_base = method in baselines
        n_vol = max(cells[(method, m)]["n"] + cells[(method, m)]["n_missing"] for m in metrics)
        tag = '<span class="tag">baseline</span>' if is_base else ""
        tds = [f"<td>{_e(method)}{tag}</td>", f'<td class="num">{n_vol}</td>']
        for m in metrics:
            r, d = cells[(method, m)], decimals[m]
            if r["mean"] is None:
                tds.append('<td class="num">-</td>')
                continue
            mean = f"{r['mean']:.{d}f}"
            if r["mean"] == best_mean[m]:
                mean = f"<strong>{mean}</strong>"
            text = f'{mean} <span class="ci">[{r["ci_low"]:.{d}f}, {r["ci_high"]:.{d}f}]</span>'
            if r["n"] != n_vol:
                text += f' <span class="sub">(n={r["n"]})</span>'
            if is_base:
                text += '<br><span class="sub">-</span>'
            else:
                p = r["p_value"]
                tip = (
                    "test undefined (fewer than 2 pairs or no differences)"
                    if p is None
                    else (f"p = {p:.6g}, {r['n_pairs']} pairs")
                )
                text += f'<br><span class="p" title="{_e(tip)}">{_format_p(p)}</span>'
            tds.append(f'<td class="num">{text}</td>')
        body.append(f'<tr class="{"baseline" if is_base else "method"}">{"".join(tds)}</tr>')

    up = [_label(m) for m in metrics if summary["higher_is_better"][m]]
    down = [_label(m) for m in metrics if not summary["higher_is_better"][m]]
    direction = " ".join(
        s
        for s in (
            f"Higher is better for {', '.join(up)}." if up else "",
            f"Lower is better for {', '.join(down)}." if down else "",
        )
        if s
    )
    missing = summary["metrics_not_computed"]
    notes = [
        f'<p class="note">{_e(direction)} Mean over volumes with its {conf:.0%} percentile-bootstrap interval; '
        "the best mean of each metric is in bold. p: two-sided Wilcoxon signed-rank test of each method against "
        "the best baseline for that metric (named in the column header), paired by volume, not adjusted for "
        'multiple comparisons; "-" marks baselines. n: volumes evaluated.</p>',
    ]
    if missing:
        notes.append(f'<p class="note">Not computed: {_e(", ".join(_label(m) for m in missing))}.</p>')
    return (
        f'<div class="wide"><table class="results" id="{table_id}">\n<thead><tr><th>Method</th>'
        f'<th class="num">n</th>{head1}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + "\n</tbody></table></div>\n"
        + "\n".join(notes)
    )


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _per_volume_section(rows: list[dict], table: list[dict], metrics: list[str], seed: int, figures: _Figures) -> str:
    methods = list(dict.fromkeys(r["method"] for r in table))
    directions = {r["metric"]: r["higher_is_better"] for r in table}
    panels = []
    for m in metrics:
        uri = figures.add(
            f"per_volume_{m}", _metric_plot(rows, metric=m, methods=methods, higher_is_better=directions[m], seed=seed)
        )
        panels.append(f"<figure>{_img(uri, f'per-volume {_label(m)} by method')}</figure>")
    note = (
        '<p class="note">One point per volume (jittered sideways); grey lines join the same volume across '
        "methods. Boxes: median and quartiles; whiskers: 1.5 times the interquartile range.</p>"
    )
    return note + '\n<div class="grid">\n' + "\n".join(panels) + "\n</div>"


def _examples_section(examples: Sequence[Mapping[str, Any]], figures: _Figures) -> str:
    parts = [
        '<p class="note">Intensity panels share one grey scale; error and uncertainty panels have their '
        "own colour scales (colour bars).</p>"
    ]
    for i, example in enumerate(examples):
        if not isinstance(example, Mapping):
            raise MedldmError(f"example {i} is not a dict")
        title = str(example.get("title") or f"Example {i + 1}")
        parts.append(
            f"<figure><figcaption><strong>{_e(title)}</strong></figcaption>"
            f"{_img(figures.add(f'example_{i + 1}', _example_figure(example, title)), title)}</figure>"
        )
    return "\n".join(parts)


RD_COLUMNS = (
    ("bits_per_dim", "bits/dim"),
    ("bits_per_latent", "bits/latent"),
    ("bits_per_voxel", "bits/voxel"),
    ("psnr", "PSNR (dB)"),
    ("rmse", "RMSE"),
    ("image_psnr", "image PSNR (dB)"),
    ("image_rmse", "image RMSE"),
)


def _rd_series(rd: Mapping[str, Any]) -> list[dict]:
    """Each series with its legend, a text per point, and the distortion keys to plot (image space preferred)."""
    series = []
    for name, entries in rd.items():
        if (
            not isinstance(entries, Sequence)
            or isinstance(entries, str)
            or not all(isinstance(e, Mapping) for e in entries)
        ):
            raise MedldmError(f"rate-distortion series {name!r} must be a list of dicts")
        entries = [dict(e) for e in entries]
        labels = [e.get("label") for e in entries]
        common = str(labels[0]) if labels and labels[0] is not None and len(set(map(str, labels))) == 1 else None
        image = bool(entries) and all(e.get("image_psnr") is not None for e in entries)
        latent = not image and any(e.get("t") is not None for e in entries)
        legend = f"{name} ({common})" if common else str(name)
        series.append(
            {
                "name": str(name),
                "legend": legend + (", latent-space distortion" if latent else ""),
                "entries": entries,
                "texts": [_rd_point_text(e, i, common) for i, e in enumerate(entries)],
                "psnr": "image_psnr" if image else "psnr",
                "rmse": "image_rmse" if image else "rmse",
            }
        )
    return series


def _rd_point_text(entry: Mapping[str, Any], index: int, common: str | None) -> str:
    parts = []
    if entry.get("label") is not None and common is None:
        parts.append(str(entry["label"]))
    if "step" in entry:
        parts.append("float" if entry["step"] is None else f"q={_number(entry['step'])}")
    if entry.get("t") is not None:
        parts.append(f"t={entry['t']}")
    return " ".join(parts) or common or str(index)


def _rd_section(rd: Mapping[str, Any], sample: str | None, figures: _Figures) -> str:
    series = _rd_series(rd)
    columns = [(k, label) for k, label in RD_COLUMNS if any(k in e for s in series for e in s["entries"])]
    body = []
    for s in series:
        for e, text in zip(s["entries"], s["texts"], strict=True):
            nums = "".join(f'<td class="num">{_e(_number(e.get(k)))}</td>' for k, _ in columns)
            body.append(f"<tr><td>{_e(s['legend'])}</td><td>{_e(text)}</td>{nums}</tr>")
    head = "".join(f'<th class="num">{_e(label)}</th>' for _, label in columns)
    table = (
        f'<div class="wide"><table><thead><tr><th>Series</th><th>Point</th>{head}</tr></thead>\n<tbody>'
        + "\n".join(body)
        + "</tbody></table></div>"
    )
    note = (
        '<p class="note">Rate against distortion. Autoencoder points: its latent quantised with step q '
        "(float: unquantised); diffusion points: the progressive-coding rate when stopping at timestep t. "
        "The plots use image-space distortion (image PSNR/RMSE) where a series gives it, otherwise the "
        "series' own PSNR/RMSE.</p>"
    )
    if sample:
        note += f'\n<p class="note"><strong>Sample.</strong> {_e(sample)}</p>'
    fig = _rd_figure(series)
    figure = f"<figure>{_img(figures.add('rate_distortion', fig), 'rate-distortion curves')}</figure>" if fig else ""
    return note + "\n" + figure + "\n" + table


def _calibration_section(calibration: Sequence[Mapping[str, Any]], figures: _Figures) -> str:
    rho = [float(c["spearman"]) for c in calibration]
    note = (
        '<p class="note">Does the uncertainty map (per-voxel standard deviation over the samples) say where '
        "the output is wrong? Spearman's rank correlation between the standard deviation and the absolute "
        f"error, over the voxels of the mask: mean {np.mean(rho):.3f} over {len(rho)} volume(s) (range "
        f"{min(rho):.3f} to {max(rho):.3f}). The figure splits each volume's voxels into ten equal groups by "
        "their standard deviation and shows the mean absolute error of each: a useful map gives errors that "
        "rise from left to right.</p>"
    )
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    deciles = np.arange(1, len(calibration[0]["error_by_decile"]) + 1)
    for c in calibration:
        ax.plot(deciles, c["error_by_decile"], color="#8c959f", lw=1, alpha=0.7)
    ax.plot(
        deciles,
        np.mean([c["error_by_decile"] for c in calibration], axis=0),
        color="#0550ae",
        lw=2.5,
        marker="o",
        label="mean over volumes",
    )
    ax.set_xlabel("uncertainty decile (1 = lowest standard deviation)")
    ax.set_ylabel("mean absolute error")
    ax.set_xticks(deciles)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    body = "".join(
        f'<tr><td>{_e(c["volume"])}</td><td class="num">{float(c["spearman"]):.3f}</td></tr>' for c in calibration
    )
    table = (
        '<table><thead><tr><th>Volume</th><th class="num">Spearman (std, |error|)</th></tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )
    uri = figures.add("uncertainty_calibration", fig)
    return note + f"\n<figure>{_img(uri, 'uncertainty calibration')}</figure>\n" + table


def _number(v: Any) -> str:
    if v is None:
        return "-"
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)


def _timings_section(timings: Mapping[str, Any]) -> str:
    body = "".join(
        f'<tr><td>{_e(method)}</td><td class="num">{_e(_number(s))}</td></tr>' for method, s in timings.items()
    )
    return (
        '<table><thead><tr><th>Method</th><th class="num">seconds per volume</th></tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


# ---------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


class _Figures:
    """The report's figures: each is embedded in the page as a PNG data URI and kept as PNG and SVG files."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def add(self, name: str, fig) -> str:
        """Render ``fig`` (then clear it) under a file-safe ``name``; returns the PNG data URI for the page."""
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "figure"
        while f"{name}.png" in self.files:
            name += "_"
        try:
            png, svg = io.BytesIO(), io.BytesIO()
            fig.savefig(png, format="png", dpi=DPI, facecolor="white")
            fig.savefig(svg, format="svg", facecolor="white")
        finally:
            fig.clear()
        self.files[f"{name}.png"], self.files[f"{name}.svg"] = png.getvalue(), svg.getvalue()
        return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii")


def _metric_plot(rows: list[dict], *, metric: str, methods: list[str], higher_is_better: bool, seed: int):
    values: dict[str, dict[str, float]] = {m: {} for m in methods}
    for r in rows:
        v = r.get(metric)
        if v is not None and math.isfinite(float(v)):
            values[str(r["method"])][str(r["volume"])] = float(v)
    volumes = list(dict.fromkeys(v for m in methods for v in values[m]))
    rng = np.random.default_rng(seed)
    jitter = dict(zip(volumes, rng.uniform(-0.13, 0.13, size=len(volumes)), strict=True))
    fig = _figure(max(4.6, 1.4 + 0.85 * len(methods)), 3.5)
    ax = fig.add_subplot()
    positions = np.arange(1, len(methods) + 1)
    for vol in volumes:  # paired lines under everything else
        xy = [(p + jitter[vol], values[m][vol]) for p, m in zip(positions, methods, strict=True) if vol in values[m]]
        if len(xy) > 1:
            ax.plot(*zip(*xy, strict=True), color="0.6", lw=0.6, alpha=0.45, zorder=1)
    filled = [(p, m) for p, m in zip(positions, methods, strict=True) if values[m]]
    if filled:
        ax.boxplot(
            [list(values[m].values()) for _, m in filled],
            positions=[p for p, _ in filled],
            widths=0.5,
            showfliers=False,
            patch_artist=True,
            zorder=2,
            boxprops={"facecolor": "#eef2f7", "edgecolor": "#57606a"},
            medianprops={"color": "#1f2328", "linewidth": 1.6},
            whiskerprops={"color": "#57606a"},
            capprops={"color": "#57606a"},
        )
    colours = [f"C{i % 10}" for i in range(len(methods))]
    for p, m, c in zip(positions, methods, colours, strict=True):
        if values[m]:
            xs = [p + jitter[v] for v in values[m]]
            ax.scatter(xs, list(values[m].values()), s=16, color=c, alpha=0.85, zorder=3, linewidths=0)
    ax.set_xticks(positions, labels=methods, rotation=20 if len(methods) > 4 else 0)
    ax.set_xlim(0.4, len(methods) + 0.6)
    ax.set_ylabel(_label(metric))
    ax.set_title(f"{_label(metric)} ({'higher' if higher_is_better else 'lower'} is better)", fontsize=10)
    ax.grid(axis="y", color="0.9")
    ax.set_axisbelow(True)
    return fig


def _panel_kind(label: str) -> str:
    low = label.lower()
    if low.startswith(ERROR_PREFIX):
        return "error"
    if low.startswith(UNCERTAINTY_PREFIX):
        return "uncertainty"
    return "intensity"


def _planes(images: Mapping[str, Any], title: str) -> dict[str, tuple[np.ndarray, float]]:
    """Each image as a 2D float array and its display aspect; Volumes become their axial plane."""
    from medldm.figures import three_planes
    from medldm.volume import Volume

    centre = None
    planes = {}
    for label, image in images.items():
        if isinstance(image, Volume):
            if centre is None:
                centre = (image.affine @ np.append((np.asarray(image.shape) - 1) / 2.0, 1.0))[:3]
            sp = image.to_canonical().spacing
            planes[str(label)] = (three_planes(image, centre)[2].astype(np.float64), sp[1] / sp[0])
            continue
        arr = np.asarray(image, dtype=np.float64)
        if arr.ndim != 2 or min(arr.shape) == 0:
            raise MedldmError(f"example {title!r}: image {label!r} must be a 2D array, got shape {arr.shape}")
        planes[str(label)] = (arr, 1.0)
    return planes


def _limits(arrays: list[np.ndarray], kind: str) -> tuple[float, float, str]:
    """vmin, vmax and default colormap shared by the panels of one kind."""
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.zeros(0)
    if finite.size == 0:
        return 0.0, 1.0, "gray"
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    if kind == "intensity":
        cmap = "gray"
    elif kind == "error" and lo < 0:  # signed error: symmetric diverging scale
        hi = float(np.percentile(np.abs(finite), 99.5))
        lo, cmap = -hi, "RdBu_r"
    else:
        lo, cmap = min(0.0, lo), ("magma" if kind == "error" else "viridis")
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi, cmap


def _example_figure(example: Mapping[str, Any], title: str):
    images = example.get("images")
    if not isinstance(images, Mapping) or not images:
        raise MedldmError(f"example {title!r} has no images (expected a dict label -> 2D array)")
    cmaps = dict(example.get("cmap") or {})
    planes = _planes(images, title)
    kinds = {label: _panel_kind(label) for label in planes}
    scales = {
        kind: _limits([planes[lb][0] for lb in planes if kinds[lb] == kind], kind) for kind in set(kinds.values())
    }
    # Intensity panels first, then the error/uncertainty maps; each line is a subfigure so that a colour bar
    # narrows only its own panel.
    groups = [[lb for lb in planes if kinds[lb] == "intensity"], [lb for lb in planes if kinds[lb] != "intensity"]]
    lines = [g[i : i + PANELS_PER_ROW] for g in groups for i in range(0, len(g), PANELS_PER_ROW)]
    ncols = max(len(line) for line in lines)
    fig = _figure(1.9 * ncols + 0.4, 2.3 * len(lines))
    for sub, line in zip(fig.subfigures(len(lines), 1, squeeze=False).ravel(), lines, strict=True):
        axes = sub.subplots(1, ncols, squeeze=False)[0]
        for ax in axes[len(line) :]:
            ax.set_axis_off()
        for ax, label in zip(axes, line, strict=False):
            plane, aspect = planes[label]
            lo, hi, cmap = scales[kinds[label]]
            im = ax.imshow(plane, cmap=cmaps.get(label, cmap), vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.set_axis_off()
            if kinds[label] != "intensity":
                cb = sub.colorbar(im, ax=ax, fraction=0.046, pad=0.03, shrink=0.85)
                cb.ax.tick_params(labelsize=7)
    return fig


def _rd_figure(series: list[dict]):
    def points(s: dict, key: str) -> list[tuple[float, float, str]]:
        pts = []
        for e, text in zip(s["entries"], s["texts"], strict=True):
            try:
                x, y = float(e["bits_per_voxel"]), float(e[s[key]])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(x) and math.isfinite(y):
                pts.append((x, y, text))
        return sorted(pts)

    panels = [
        (key, label) for key, label in (("psnr", "PSNR (dB)"), ("rmse", "RMSE")) if any(points(s, key) for s in series)
    ]
    if not panels:
        return None
    fig = _figure(5.2 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rates = [p[0] for s in series for key, _ in panels for p in points(s, key)]
    log_x = min(rates) > 0 and max(rates) / min(rates) > 100
    for ax, (key, label) in zip(axes, panels, strict=True):
        for i, s in enumerate(series):
            pts = points(s, key)
            if not pts:
                continue
            xs, ys, _ = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=4, lw=1.4, color=f"C{i % 10}", label=s["legend"])
            for x, y, text in pts:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.25")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel("rate (bits per voxel)")
        ax.set_ylabel(label)
        ax.set_title(f"rate vs {label}", fontsize=10)
        ax.margins(0.08)
        ax.grid(color="0.9")
        ax.legend(fontsize=8, frameon=False)
    return fig
