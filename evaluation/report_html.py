"""The evaluation report's self-contained HTML page: inline CSS, no scripts, figures as data URIs, every
convention behind the numbers stated (the protocol verbatim, the statistics)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from medldm.evaluation.metrics import metric_label
from medldm.evaluation.report_figures import Figures, example_figure, figure, metric_plot, rd_figure

import medldm
from medldm.errors import MedldmError

__all__ = ["page", "jsonable"]

SMALL_SAMPLE = 8  # below this many volumes the report warns that intervals and p-values are rough


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


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def page(
    *, title, created, rows, summary, table, examples, rd, timings, seed, calibration, rd_sample, figures: Figures
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
        return _e(", ".join(str(jsonable(x)) for x in items))
    return _e(jsonable(v))


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
        f'<th class="num">{_e(metric_label(m))} {"&uarr;" if summary["higher_is_better"][m] else "&darr;"}'
        f'<br><span class="sub">mean [{conf:.0%} CI]<br>'
        f"p vs {_e(best_base[m]) if best_base[m] else 'baseline'}</span></th>"
        for m in metrics
    )
    body = [_result_row(method, method in baselines, metrics, cells, best_mean, decimals) for method in methods]

    up = [metric_label(m) for m in metrics if summary["higher_is_better"][m]]
    down = [metric_label(m) for m in metrics if not summary["higher_is_better"][m]]
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
        notes.append(f'<p class="note">Not computed: {_e(", ".join(metric_label(m) for m in missing))}.</p>')
    return (
        f'<div class="wide"><table class="results" id="{table_id}">\n<thead><tr><th>Method</th>'
        f'<th class="num">n</th>{head1}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + "\n</tbody></table></div>\n"
        + "\n".join(notes)
    )


def _result_row(method: str, is_base: bool, metrics, cells: dict, best_mean: dict, decimals: dict) -> str:
    """One method's row of the results table: each metric's mean [CI] and its p-value against the best
    baseline."""
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
            tip = f"p = {p:.6g}, {r['n_pairs']} pairs" if p is not None else ""
            tip = tip or "test undefined (fewer than 2 pairs or no differences)"
            text += f'<br><span class="p" title="{_e(tip)}">{_format_p(p)}</span>'
        tds.append(f'<td class="num">{text}</td>')
    return f'<tr class="{"baseline" if is_base else "method"}">{"".join(tds)}</tr>'


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _per_volume_section(rows: list[dict], table: list[dict], metrics: list[str], seed: int, figures: Figures) -> str:
    methods = list(dict.fromkeys(r["method"] for r in table))
    directions = {r["metric"]: r["higher_is_better"] for r in table}
    panels = []
    for m in metrics:
        uri = figures.add(
            f"per_volume_{m}", metric_plot(rows, metric=m, methods=methods, higher_is_better=directions[m], seed=seed)
        )
        panels.append(f"<figure>{_img(uri, f'per-volume {metric_label(m)} by method')}</figure>")
    note = (
        '<p class="note">One point per volume (jittered sideways); grey lines join the same volume across '
        "methods. Boxes: median and quartiles; whiskers: 1.5 times the interquartile range.</p>"
    )
    return note + '\n<div class="grid">\n' + "\n".join(panels) + "\n</div>"


def _examples_section(examples: Sequence[Mapping[str, Any]], figures: Figures) -> str:
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
            f"{_img(figures.add(f'example_{i + 1}', example_figure(example, title)), title)}</figure>"
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


def _rd_section(rd: Mapping[str, Any], sample: str | None, figures: Figures) -> str:
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
    fig = rd_figure(series)
    figure = f"<figure>{_img(figures.add('rate_distortion', fig), 'rate-distortion curves')}</figure>" if fig else ""
    return note + "\n" + figure + "\n" + table


def _calibration_section(calibration: Sequence[Mapping[str, Any]], figures: Figures) -> str:
    rho = [float(c["spearman"]) for c in calibration]
    note = (
        '<p class="note">Does the uncertainty map (per-voxel standard deviation over the samples) say where '
        "the output is wrong? Spearman's rank correlation between the standard deviation and the absolute "
        f"error, over the voxels of the mask: mean {np.mean(rho):.3f} over {len(rho)} volume(s) (range "
        f"{min(rho):.3f} to {max(rho):.3f}). The figure splits each volume's voxels into ten equal groups by "
        "their standard deviation and shows the mean absolute error of each: a useful map gives errors that "
        "rise from left to right.</p>"
    )
    fig = figure(6.4, 3.6)
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


def jsonable(v: Any) -> Any:
    """Plain JSON types; non-finite floats become their names ("nan", "inf") since JSON cannot hold them."""
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, (list, tuple, set)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)
