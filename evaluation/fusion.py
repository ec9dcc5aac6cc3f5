"""`medldm evaluate --stacks`: score the fusion of three orthogonal thick-slice stacks (medldm.fusion).

Each HR scan is cropped to hold whole thick slices along every axis, then thickened along each voxel axis in turn
(three stacks, the same forward model as `medldm degrade`). Scored against the truth on its own grid:
- ``model``: the fusion (each stack upscaled by the model, averaged, made consistent with every stack);
- ``model-average``: the same average before the joint consistency step;
- ``bspline-dc``: the classical fusion (B-spline average made consistent with every stack);
- ``upscale-i`` / ``-j`` / ``-k``: the model's upscale of one stack alone (thick along that voxel axis).

With ``motion`` (degrees, mm), the patient moved before the second stack (thick along j): its truth is rotated
about the world z axis through the scan's centre and shifted along world x before it is thickened; every fusion
then registers the stacks first (medldm.registration), and the report records how well the motion was recovered.
The moved stack's own upscale lies in the moved anatomy, so ``upscale-j`` is left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from medldm.evaluation.evaluate import Case, Scores, _protocol, sampling_of, scan_list
from medldm.evaluation.metrics import SUMMARY_METRICS

from medldm.degrade import degrade_volume
from medldm.errors import MedldmError
from medldm.volume import Volume, crop_to_multiple, load

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
    motion: tuple[float, float] | None = None,
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
    results, recovered = Scores(), []
    for n, path in enumerate(files):
        if progress:
            progress(path.name, n, len(files))
        truth = load(path)
        for a in range(3):
            truth = crop_to_multiple(truth, a, scale)
        moved = rigid_motion(truth, *motion) if motion else None
        stacks = _stacks(truth, path.name, scale, moved)
        case, transforms = _fuse_case(truth, stacks, upscaler, results.timings, register=moved is not None)
        if moved is not None:
            recovered.append(_recovery(path.name, transforms[stacks[1].meta["path"]], moved))
        results.add(case, path.name, use_mask=use_mask, lpips_weights=lpips_folder)
        if n == 0:
            results.examples.append(_example(truth, stacks, case.outputs))
    protocol = _fusion_protocol(files, upscaler, scale, seed, use_mask, verify_checksums(lpips_folder), command)
    baselines = FUSION_BASELINES
    if motion:
        protocol["motion"] = (
            f"the stack thick along j was acquired after a rigid motion of {motion[0]:g} degrees about world z "
            f"(through the scan's centre) and {motion[1]:g} mm along world x; every fusion registers the stacks "
            "to the first (medldm.registration) before fusing; upscale-j is left out"
        )
        protocol["registration"] = recovered
        baselines = tuple(b for b in FUSION_BASELINES if b != "upscale-j")
    return write_report(
        out,
        rows=results.rows,
        protocol=protocol,
        examples=results.examples,
        timings={k: float(np.mean(v)) for k, v in results.timings.items()},
        metrics=SUMMARY_METRICS,
        baselines=baselines,
        title="Fusion of orthogonal thick-slice stacks" + (" (one stack moved, registered)" if motion else ""),
    )


def _stacks(truth: Volume, name: str, scale: int, moved: Motion | None) -> list[Volume]:
    """Three stacks of ``truth``, thick along voxel axis i, j and k in turn (the second from the moved truth, if
    any), each named after the scan and its axis."""
    stacks = []
    for a in range(3):
        source = moved.volume if moved is not None and a == 1 else truth
        lr = degrade_volume(source, kind="slice-profile", axis=a, scale=scale).lr
        lr.meta["path"] = f"{name} thick along {AXES[a]}"
        stacks.append(lr)
    return stacks


def _fusion_protocol(files, upscaler, scale: int, seed: int, use_mask: bool, lpips_sums, command) -> dict:
    """The report's protocol: the evaluation's, with the stacks and the fusion described."""
    acquisition = {"kind": "slice-profile", "axis": "each voxel axis in turn", "scale": scale, "profile": "gaussian"}
    sampling = {**sampling_of(upscaler), "samples": 1, "seed": seed}
    protocol = _protocol(
        files,
        upscaler.model,
        {**acquisition, "thickness": 1.0},
        sampling,
        adapt=None,
        use_mask=use_mask,
        lpips_sums=lpips_sums,
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
    return protocol


def _fuse_case(
    truth, stacks, upscaler, timings: dict[str, list[float]], *, register: bool = False
) -> tuple[Case, dict[str, dict]]:
    """The fusions of ``stacks`` on the truth's grid (the model's, with and without the joint consistency step,
    and B-spline's), and the model's upscale of each stack alone; with ``register``, the stacks are registered
    once first (the moved second stack's own upscale is left out), and the transforms found come back."""
    from medldm.fusion import as_stack, fuse

    cached, names = _Cached(upscaler), [s.meta["path"] for s in stacks]  # the names the cached upscales go by
    case = Case(truth, axis=2)
    transforms: dict[str, dict] = {}
    tic = time.perf_counter()
    if register:
        from medldm.registration import register_stacks

        stacks, transforms = register_stacks([as_stack(s) for s in stacks])
    case.outputs["model-average"] = fuse(stacks, like=truth, prior="model", upscaler=cached, consistent=False).volume
    fused = fuse(stacks, like=truth, prior="model", upscaler=cached)
    timings.setdefault("model", []).append(time.perf_counter() - tic)
    case.outputs["model"], case.residual = fused.volume, max(fused.residuals.values())
    tic = time.perf_counter()
    case.outputs["bspline-dc"] = fuse(stacks, like=truth, prior="bspline").volume
    timings.setdefault("bspline-dc", []).append(time.perf_counter() - tic)
    for a, name in enumerate(names):
        if not (register and a == 1):
            case.outputs[f"upscale-{AXES[a]}"] = cached.results[name].sr
    return case, transforms


class Motion(NamedTuple):
    volume: Volume  # the truth after the motion
    matrix: np.ndarray  # 4 x 4, world to world: where a point of the anatomy went
    centre: np.ndarray  # the scan's centre in world mm


def rigid_motion(truth: Volume, degrees: float, mm: float) -> Motion:
    """``truth`` as a second acquisition would see it after the patient moved: rotated by ``degrees`` about the
    world z axis through the scan's centre, then shifted ``mm`` along world x (linear interpolation)."""
    from scipy import ndimage

    centre = (truth.affine @ np.array([*(np.array(truth.shape) - 1) / 2, 1.0]))[:3]
    t = np.radians(degrees)
    matrix = np.eye(4)
    matrix[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    matrix[:3, 3] = centre - matrix[:3, :3] @ centre + np.array([mm, 0.0, 0.0])
    index = np.linalg.inv(truth.affine) @ np.linalg.inv(matrix) @ truth.affine  # output voxel -> source voxel
    data = ndimage.affine_transform(truth.data, index[:3, :3], index[:3, 3], order=1)
    return Motion(truth.with_data(data.astype(truth.data.dtype)), matrix, centre)


def _recovery(name: str, transform: dict, motion: Motion) -> str:
    """How far the registration's transform is from undoing the motion: the rotation left, and the displacement
    left at the scan's centre."""
    from medldm.registration import rigid_parameters

    left = np.array(transform["matrix"]) @ motion.matrix  # the identity if the motion was undone exactly
    moved = np.linalg.norm((left @ np.array([*motion.centre, 1.0]))[:3] - motion.centre)
    return f"{name}: {rigid_parameters(left)['rotation_deg']:.3f} degrees and {moved:.3f} mm at the centre left"


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
