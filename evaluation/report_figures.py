"""The figures of the evaluation report (matplotlib on the Agg canvas, no pyplot): per-volume metric plots,
example panels, rate-distortion curves; each kept as PNG and SVG and embedded in the page as a data URI."""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from medldm.evaluation.metrics import metric_label

from medldm.errors import MedldmError

__all__ = ["Figures", "figure", "metric_plot", "example_figure", "rd_figure"]


# Labels (lower case) of example panels drawn on their own colour scale rather than the shared grey scale.
ERROR_PREFIX, UNCERTAINTY_PREFIX = "error", "uncertainty"
DPI = 110
PANELS_PER_ROW = 6


def figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


class Figures:
    """The report's figures: each is embedded in the page as a PNG data URI and kept as PNG and SVG files."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def add(self, name: str, fig) -> str:
        """Render ``fig`` (then clear it) under a file-safe ``name``; returns the PNG data URI for the page."""
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "figure"
        while f"{name}.png" in self.files:
            name += "_"
        try:
            fig.draw_without_rendering()  # the constrained layout once, not again for each format
            fig.set_layout_engine("none")
            png, svg = io.BytesIO(), io.BytesIO()
            fig.savefig(png, format="png", dpi=DPI, facecolor="white")
            fig.savefig(svg, format="svg", facecolor="white")
        finally:
            fig.clear()
        self.files[f"{name}.png"], self.files[f"{name}.svg"] = png.getvalue(), svg.getvalue()
        return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii")


def metric_plot(rows: list[dict], *, metric: str, methods: list[str], higher_is_better: bool, seed: int):
    values: dict[str, dict[str, float]] = {m: {} for m in methods}
    for r in rows:
        v = r.get(metric)
        if v is not None and math.isfinite(float(v)):
            values[str(r["method"])][str(r["volume"])] = float(v)
    volumes = list(dict.fromkeys(v for m in methods for v in values[m]))
    rng = np.random.default_rng(seed)
    jitter = dict(zip(volumes, rng.uniform(-0.13, 0.13, size=len(volumes)), strict=True))
    fig = figure(max(4.6, 1.4 + 0.85 * len(methods)), 3.5)
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
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{metric_label(metric)} ({'higher' if higher_is_better else 'lower'} is better)", fontsize=10)
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


def example_figure(example: Mapping[str, Any], title: str):
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
    fig = figure(1.9 * ncols + 0.4, 2.3 * len(lines))
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


def rd_figure(series: list[dict]):
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
    fig = figure(5.2 * len(panels), 3.8)
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
