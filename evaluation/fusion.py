"""`medldm evaluate --stacks`: score the fusion of three orthogonal thick-slice stacks (medldm.fusion).

Each HR scan is cropped to hold whole thick slices along every axis, then thickened along each voxel axis in turn
(three stacks, the same forward model as `medldm degrade`). Scored against the truth on its own grid:
- ``model``: the fusion (each stack upscaled by the model, averaged, made consistent with every stack);
- ``model-average``: the same average before the joint consistency step;
- ``bspline-dc``: the classical fusion (B-spline average made consistent with every stack);
- ``upscale-i`` / ``-j`` / ``-k``: the model's upscale of one stack alone (thick along that voxel axis).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from medldm.evaluation.evaluate import Case, Scores, _protocol, sampling_of, scan_list
from medldm.evaluation.metrics import SUMMARY_METRICS

from medldm.degrade import degrade_volume
from medldm.errors import MedldmError
from medldm.volume import crop_to_multiple, load

__all__ = ["evaluate_fusion", "FUSION_BASELINES"]

AXES = "ijk"
FUSION_BASELINES = ("bspline-dc", "model-average", *(f"upscale-{a}" for a in AXES))


class _Cached:
    """An upscaler that returns the results it already made for a stack (the single-stack scores reuse them)."""

    def __init__(self, upscaler):
        self.upscaler, self.results = upscaler, {}

    def upscale(self, volume, **options):
        key = volume.meta["path"]
        if key not in self.results:
            self.results[key] = self.upscaler.upscale(volume, **options)
        return self.results[key]


def evaluate_fusion(
    data,
    out: Path,
    *,
    model: str | Path,
    scale: float = 4,
    seed: int = 0,
    device: str = "auto",
    use_mask: bool = True,
    limit: int | None = None,
    lpips_weights=None,
    progress: Callable[[str, int, int], None] | None = None,
    command: list[str] | None = None,
) -> Path:
    """Write the fusion report (``report.html``, ``metrics.csv``, ``summary.json``) for the HR scans in ``data``."""
    from medldm.evaluation.report import write_report

    from medldm.perceptual import find_lpips_weights, verify_checksums
    from medldm.pipeline import Upscaler

    if float(scale) != int(scale):
        raise MedldmError("--stacks takes an integer --scale (every axis must hold whole thick slices)")
    scale = int(scale)
    files = scan_list(data)[:limit]
    lpips_folder = find_lpips_weights(lpips_weights)
    upscaler = Upscaler(model, device=device)
    results = Scores()
    for n, path in enumerate(files):
        if progress:
            progress(path.name, n, len(files))
        truth = load(path)
        for a in range(3):
            truth = crop_to_multiple(truth, a, scale)
        stacks = []
        for a in range(3):
            lr = degrade_volume(truth, kind="slice-profile", axis=a, scale=scale).lr
            lr.meta["path"] = f"{path.name} thick along {AXES[a]}"
            stacks.append(lr)
        case = _fuse_case(truth, stacks, upscaler, results.timings)
        results.add(case, path.name, use_mask=use_mask, lpips_weights=lpips_folder)
        if n == 0:
            results.examples.append(_example(truth, stacks, case.outputs))
    acquisition = {"kind": "slice-profile", "axis": "each voxel axis in turn", "scale": scale, "profile": "gaussian"}
    sampling = {**sampling_of(upscaler), "samples": 1, "seed": seed}
    protocol = _protocol(
        files,
        upscaler.model,
        {**acquisition, "thickness": 1.0},
        sampling,
        adapt=None,
        use_mask=use_mask,
        lpips_sums=verify_checksums(lpips_folder),
        command=command,
    )
    protocol["degradation"] = (
        f"three stacks per scan, thick slices x{scale} along voxel axis i, j and k in turn "
        "(gaussian profile, medldm.degrade); the truth is the scan cropped to hold whole thick "
        "slices along every axis"
    )
    protocol["fusion"] = (
        "medldm.fusion on the truth's grid: each stack upscaled (the model, or B-spline for "
        "bspline-dc), averaged, then CGLS on the stacks' joint normal equations from that average "
        "(model-average: without that step); upscale-i/j/k: the model on one stack alone"
    )
    return write_report(
        out,
        rows=results.rows,
        protocol=protocol,
        examples=results.examples,
        timings={k: float(np.mean(v)) for k, v in results.timings.items()},
        metrics=SUMMARY_METRICS,
        baselines=FUSION_BASELINES,
        title="Fusion of orthogonal thick-slice stacks",
    )


def _fuse_case(truth, stacks, upscaler, timings: dict[str, list[float]]) -> Case:
    """The fusions of ``stacks`` on the truth's grid (the model's, with and without the joint consistency step,
    and B-spline's), and the model's upscale of each stack alone."""
    from medldm.fusion import fuse

    cached = _Cached(upscaler)
    case = Case(truth, axis=2)
    tic = time.perf_counter()
    case.outputs["model-average"] = fuse(stacks, like=truth, prior="model", upscaler=cached, consistent=False).volume
    fused = fuse(stacks, like=truth, prior="model", upscaler=cached)
    timings.setdefault("model", []).append(time.perf_counter() - tic)
    case.outputs["model"], case.residual = fused.volume, max(fused.residuals.values())
    tic = time.perf_counter()
    case.outputs["bspline-dc"] = fuse(stacks, like=truth, prior="bspline").volume
    timings.setdefault("bspline-dc", []).append(time.perf_counter() - tic)
    for a, lr in enumerate(stacks):
        case.outputs[f"upscale-{AXES[a]}"] = cached.results[lr.meta["path"]].sr
    return case


def _example(truth, stacks, outputs) -> dict:
    """The middle plane across voxel axis k: each stack's nearest view is the input, then the results."""
    from medldm.resample import interpolate

    k = truth.shape[2] // 2
    images = {}
    for a, lr in enumerate(stacks):
        factors = [1, 1, 1]
        factors[a] = lr.meta["degrade"]["scale"]
        images[f"stack {AXES[a]} (nearest)"] = np.rot90(interpolate(lr, factors, method="nearest").data[:, :, k])
    for name in ("bspline-dc", "upscale-i", "model"):
        images[name] = np.rot90(outputs[name].data[:, :, k])
    images["truth"] = np.rot90(truth.data[:, :, k])
    images["error model"] = np.abs(images["model"] - images["truth"])
    images["error bspline-dc"] = np.abs(images["bspline-dc"] - images["truth"])
    return {"title": f"{truth.meta.get('path', '')}: slice {k} across voxel axis k", "images": images}
