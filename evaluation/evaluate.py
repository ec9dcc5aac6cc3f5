"""`medldm evaluate`: degrade each HR scan with the shared forward model, upscale it with the baselines and the
model, score every result against the truth, and write the report."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from medldm.evaluation.baselines import REGRESSION, baseline, baselines_for
from medldm.evaluation.metrics import (
    SUMMARY_METRICS,
    TissueClasses,
    foreground_mask,
    lpips_volume,
    nrmse,
    psnr,
    ssim,
    uncertainty_calibration,
)

from medldm import __version__, cohort
from medldm.degrade import degrade_volume, make_operator
from medldm.errors import MedldmError
from medldm.resample import interpolate
from medldm.volume import SCAN_SUFFIXES, Volume, load

__all__ = ["evaluate", "score", "scan_list"]

UNADAPTED = "unadapted"  # with adapt: the same model before adapting to the scan


def scan_list(data: str | Path) -> list[Path]:
    """Scans from a folder (NIfTI/NRRD files in it), a text file with one path per line, or one scan."""
    data = Path(data)
    if data.is_dir():
        files = sorted(p for p in data.iterdir() if p.name.lower().endswith(SCAN_SUFFIXES))
    elif data.suffix == ".txt" and data.is_file():
        files = [Path(line.strip()) for line in data.read_text().splitlines() if line.strip()]
    elif data.exists():
        files = [data]
    else:
        raise MedldmError("no such file or folder", data)
    if not files:
        raise MedldmError(f"no scans ({', '.join(SCAN_SUFFIXES)}) found", data)
    return files


def score(pred: Volume, truth: Volume, *, mask, axis: int, lpips_weights=None, lpips_slices: int = 16) -> dict:
    """Every metric of one prediction against the truth (data range: the truth's maximum)."""
    p, t = pred.data, truth.data
    r = float(t.max())
    return {
        "psnr": psnr(p, t, data_range=r, mask=mask),
        "ssim": ssim(p, t, data_range=r, axis=axis, mask=mask),
        "ssim3d": ssim(p, t, data_range=r, mode="3d", mask=mask),
        "lpips": lpips_volume(p, t, data_range=r, weights=lpips_weights, max_slices=lpips_slices, mask=mask),
        "nrmse": nrmse(p, t, mask=mask),
    }


def _example(
    truth: Volume, lr: Volume, outputs: dict[str, Volume], uncertainty: Volume | None, axis: int, factors
) -> dict:
    """A slice through the middle of the volume, on a plane containing the degraded axis."""
    other = [a for a in range(3) if a != axis]
    cut = other[int(np.argmin([truth.shape[a] for a in other]))]
    k = truth.shape[cut] // 2

    def plane(v: Volume) -> np.ndarray:
        return np.rot90(np.take(v.data, k, axis=cut))

    images = {"input (nearest)": plane(interpolate(lr, factors, method="nearest"))}
    images.update({name: plane(v) for name, v in outputs.items()})
    images["truth"] = plane(truth)
    for name in ("bspline", "model"):
        if name in outputs:
            images[f"error {name}"] = np.abs(plane(outputs[name]) - plane(truth))
    if uncertainty is not None:
        images["uncertainty (std)"] = plane(uncertainty)
    return {"title": f"{truth.meta.get('path', '')}: slice {k} across voxel axis {cut}", "images": images}


def evaluate(
    data,
    out: Path,
    *,
    model: str | Path | None = None,
    kind: str = "slice-profile",
    axis: str = "z",
    scale: float = 4,
    profile: str = "gaussian",
    thickness: float = 1.0,
    steps: int | None = None,
    sampler: str = "dpmpp-2m",
    samples: int = 1,
    planes: str | None = None,
    refine: float | None = None,
    refine_planes: str | None = None,
    baselines=None,
    seed: int = 0,
    use_mask: bool = True,
    limit: int | None = None,
    device: str = "auto",
    adapt: dict | None = None,
    lpips_weights=None,
    rd: bool = False,
    rd_only: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    command: list[str] | None = None,
) -> Path | None:
    """Run the evaluation and write ``out/report.html``, ``metrics.csv`` and ``summary.json``.

    Under torchrun or accelerate launch the scans are shared between the processes (medldm.cohort) and the first
    process writes the report from everyone's results; the others return None.

    Args:
        data: folder, list file or scan (see :func:`scan_list`): the HR ground truth.
        out: report folder.
        model: model folder or "default"; None scores the baselines alone.
        kind, axis, scale, profile, thickness: the simulated acquisition (medldm.degrade.degrade_volume; thick
            slices take non-integer factors and a thickness other than the spacing, as a fraction of it).
        steps, sampler, samples, seed, device, planes, refine, refine_planes: the model's sampling settings
            (medldm.pipeline.Upscaler; None: the model's defaults).
        baselines: names of the baselines to score (default: every one that applies, see
            medldm.evaluation.baselines.baselines_for; ``regression`` needs a model with an estimator stage).
        use_mask: score inside the Otsu foreground of the truth (else the whole volume).
        adapt: fine-tune the model's estimator on each degraded scan first (medldm.adapt.adapt; a dict of its
            ``steps`` and ``minutes``); the model without adaptation is then scored too, as ``unadapted``.
        limit: evaluate the first N scans only.
        rd: add the rate-distortion curves of the model (medldm.evaluation.rate_distortion).
        rd_only: the rate-distortion curves alone (no per-volume metrics).
        progress: callable(stage, done, total).
        command: the command line to record in the report's provenance (default: this process's arguments).
    """
    from medldm.evaluation.report import write_report

    from medldm.perceptual import find_lpips_weights, verify_checksums

    files = scan_list(data)[:limit]
    lpips_folder = find_lpips_weights(lpips_weights)
    state = cohort.current(device)
    if state is not None and device == "auto":
        device = str(state.device)
    upscaler = None
    if model is not None:
        from medldm.pipeline import Upscaler

        upscaler = Upscaler(
            model,
            device=device,
            steps=steps,
            sampler=sampler,
            planes=planes,
            refine=refine,
            refine_planes=refine_planes,
        )
        steps, refine, planes = upscaler.steps, upscaler.refine, upscaler.planes
        refine_planes = upscaler.refine_planes
    offered = baselines_for(kind, regression=upscaler is not None and upscaler.model.estimator is not None)
    methods = offered if baselines is None else tuple(baselines)
    unknown = [m for m in methods if m not in offered]
    if unknown:
        raise MedldmError(
            f"unknown or unavailable baseline {unknown[0]!r} for {kind}; choose from {', '.join(offered)}"
        )
    rows, examples, calibration = [], [], []
    timings: dict[str, list[float]] = {}
    if adapt is not None:
        if upscaler is None:
            raise MedldmError("--adapt adapts a model: pass --model")
        from medldm.adapt import adapt as run_adaptation

        methods = (*methods, UNADAPTED)
    if rd_only and upscaler is None:
        raise MedldmError("rate-distortion needs a model (--model)")
    for n, path in cohort.share(list(enumerate([] if rd_only else files)), state):
        if progress:
            progress(path.name, n, len(files))
        hr_full = load(path)
        lr, truth = degrade_volume(hr_full, kind=kind, axis=axis, scale=scale, profile=profile, thickness=thickness)
        op_axis, exact = lr.meta["degrade"]["axis"], lr.meta["degrade"]["scale"]  # non-integer: the grid's factor
        op = make_operator(kind, axis=op_axis, scale=exact, profile=profile, thickness=thickness)
        factors = op.factors(3)
        options = {
            "axis": op_axis,
            "scale": exact,
            "kind": kind,
            "thickness": thickness * lr.spacing[op_axis] if kind == "slice-profile" else None,
        }
        mask = foreground_mask(truth.data) if use_mask else None
        outputs, uncertainty = {}, None
        for method in (m for m in methods if m not in (REGRESSION, UNADAPTED)):  # the model makes these two
            tic = time.perf_counter()
            outputs[method] = baseline(method, lr, op)
            timings.setdefault(method, []).append(time.perf_counter() - tic)
        residual = None
        if upscaler is not None:
            tic = time.perf_counter()
            runner = upscaler
            if adapt is not None:  # fine-tuned on this scan first (the time counts as the model's); also unadapted
                plan = upscaler.plan(lr, **options)
                outputs[UNADAPTED] = upscaler.upscale(lr, plan=plan, seed=seed).sr
                timings.setdefault(UNADAPTED, []).append(time.perf_counter() - tic)
                tic = time.perf_counter()
                adapted = run_adaptation(upscaler.model, lr, plan, seed=seed, **adapt)
                runner = upscaler.with_model(adapted.model)
                timings.setdefault("adaptation", []).append(adapted.seconds)
            # the regression baseline is the strongest regression the model gives: its estimate over both stacks of
            # planes, made consistent; the model's own upscale provides it when it also uses both stacks
            shared = REGRESSION in methods and runner.planes == "both"
            result = runner.upscale(lr, **options, samples=samples, seed=seed, keep_estimate=shared)
            timings.setdefault("model", []).append(time.perf_counter() - tic)
            if shared:
                outputs[REGRESSION] = result.estimate
            elif REGRESSION in methods:
                tic = time.perf_counter()
                regression = Upscaler(runner.model, device=device, planes="both", refine=0.0)
                outputs[REGRESSION] = regression.upscale(lr, **options).sr
                timings.setdefault(REGRESSION, []).append(time.perf_counter() - tic)
            outputs["model"], uncertainty, residual = result.sr, result.uncertainty, result.residual
        # op_axis is the thick axis, or for in-plane kinds the slice axis: 2D SSIM over the HR slices across it
        # (for in-plane kinds, the acquired slices)
        tissues = TissueClasses(truth.data, mask)  # fitted to the truth, applied unchanged to every output
        for method, pred in outputs.items():
            row = {
                "volume": path.name,
                "method": method,
                **score(pred, truth, mask=mask, axis=op_axis, lpips_weights=lpips_folder),
                **tissues.compare(pred.data),
            }
            if method == "model":
                row["consistency_residual"] = residual
                if uncertainty is not None and np.ptp(uncertainty.data) > 0:
                    cal = uncertainty_calibration(uncertainty.data, pred.data, truth.data, mask=mask)
                    row["uncertainty_spearman"] = cal["spearman"]
                    calibration.append({"volume": path.name, **cal})
            rows.append(row)
        if n == 0:
            examples.append(_example(truth, lr, outputs, uncertainty, op_axis, factors))
    if state is not None:  # everyone's results, in the order of the scan list, for the first process to report
        order = {p.name: i for i, p in enumerate(files)}
        rows = sorted(cohort.gather(rows, state), key=lambda r: order[r["volume"]])  # stable: methods keep order
        examples = cohort.gather(examples, state)
        calibration = sorted(cohort.gather(calibration, state), key=lambda c: order[c["volume"]])
        merged: dict[str, list] = {}
        for part in cohort.gather([timings], state):
            for method, values in part.items():
                merged.setdefault(method, []).extend(values)
        timings = merged
        if not state.is_main_process:
            return None
    rd_data, rd_sample = None, None
    if (rd or rd_only) and upscaler is not None:
        rd_data, rd_sample = _rate_distortion(upscaler, files[0], kind=kind, axis=axis, scale=scale, profile=profile)
    protocol = _protocol(
        files,
        model=upscaler.model if upscaler else None,
        kind=kind,
        axis=axis,
        scale=scale,
        profile=profile,
        steps=steps,
        sampler=sampler,
        samples=samples,
        seed=seed,
        planes=planes,
        refine=refine,
        refine_planes=refine_planes,
        thickness=thickness,
        adapt=adapt,
        use_mask=use_mask,
        lpips_sums=verify_checksums(lpips_folder),
        command=command,
    )
    return write_report(
        out,
        rows=rows,
        protocol=protocol,
        examples=examples,
        rd=rd_data,
        timings={k: float(np.mean(v)) for k, v in timings.items()},
        metrics=SUMMARY_METRICS,
        baselines=methods,
        calibration=calibration,
        rd_sample=rd_sample,
    )


def _rate_distortion(upscaler, path: Path, *, kind, axis, scale, profile) -> tuple[dict, str | None]:
    """Rate-distortion of the model on central slices of one scan (2D models) - see rate_distortion.py - and a
    sentence saying what it was measured on."""
    import torch
    from medldm.evaluation.rate_distortion import model_rd

    from medldm.intensity import guess_modality, normaliser
    from medldm.nets import MODALITIES
    from medldm.resample import upsample

    m = upscaler.model
    if m.config.data.spatial_dims != 2:
        return {}, None
    lr, truth = degrade_volume(load(path), kind=kind, axis=axis, scale=scale, profile=profile)
    a = lr.meta["degrade"]["axis"]
    norm = normaliser(m.config.data.intensity, lr.data)
    hr = torch.from_numpy(norm.forward(truth.data)).float()
    cond = upsample(torch.from_numpy(norm.forward(lr.data)).float()[None, None], truth.shape)[0, 0]
    cut = [d for d in range(3) if d != a][0]
    mid = truth.shape[cut] // 2
    idx = slice(mid - 2, mid + 2)
    hr_slices = hr.movedim(cut, 0)[idx][:, None]
    cond_slices = cond.movedim(cut, 0)[idx][:, None]
    pad = [p for n in reversed(hr_slices.shape[2:]) for p in (0, (-n) % upscaler.multiple)]
    hr_slices = torch.nn.functional.pad(hr_slices, pad, mode="replicate")
    cond_slices = torch.nn.functional.pad(cond_slices, pad, mode="replicate")
    task = next((t for t in m.config.data.tasks if t.kind == kind and t.scale == scale), None)
    if task is None:  # a factor the model was not trained for: no label to measure its denoiser with
        return {}, None
    modality = MODALITIES.index(guess_modality(lr.data, lr.meta.get("modality")))
    label = int(m.codec.label(torch.tensor(m.config.data.tasks.index(task)), torch.tensor(modality), torch.tensor(0)))
    rd = model_rd(
        m,
        hr_slices,
        cond_images=cond_slices,
        label=label,
        timesteps=[999, 750, 500, 250, 100, 50, 0],
        qsteps=(None, 0.5, 0.25, 0.1),
    )
    sample = (
        f"{hr_slices.shape[0]} central slices (across voxel axis {cut}) of one volume, {path.name}, the first "
        "of the set. Distortion is that of the autoencoder's (or the diffusion's progressive) reconstruction of "
        "the high-resolution slices, on the model's normalised intensity scale, over whole slices (background "
        "included, no mask): not the super-resolved output over the foreground mask that the results table "
        "scores, so the two PSNRs are not comparable."
    )
    return rd, sample


def _protocol(
    files,
    *,
    model,
    kind,
    axis,
    scale,
    profile,
    steps,
    sampler,
    samples,
    seed,
    planes,
    refine,
    use_mask,
    lpips_sums,
    refine_planes=None,
    thickness=1.0,
    adapt=None,
    command=None,
) -> dict:
    import monai
    import skimage
    import torch

    skimage_version = skimage.__version__  # type: ignore[attr-defined]  # left out of skimage's __init__.pyi
    protocol: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "scans": f"{len(files)}: " + ", ".join(p.name for p in files),
        "degradation": f"{kind} x{scale:g} along {axis} (profile {profile}"
        + (f", slice thickness {thickness:g} x the spacing" if thickness != 1 else "")
        + "), medldm.degrade; the truth is the input cropped to hold whole LR samples"
        + (
            ""
            if float(scale).is_integer()
            else " (docs/grids.md: the exact factor may differ from the one asked by up to 0.5 / LR slices)"
        ),
        "baselines": "nearest, trilinear, cubic B-spline (scipy map_coordinates with prefilter) on the exact HR grid; "
        "bspline-dc: cubic B-spline with the model's data-consistency projection x + A^+(y - Ax)"
        + (
            "; zero-fill: zero filling (pseudo-inverse of the k-space truncation, sinc interpolation)"
            if kind == "kspace"
            else ""
        )
        + (
            "; regression: the model's own regression (estimator) stage over both stacks of planes with "
            "the same projection, without the diffusion model's detail"
            if model is not None and model.estimator is not None
            else ""
        ),
        "data range": "per-volume maximum of the truth (fastMRI convention), original intensity units",
        "mask": "Otsu foreground of the truth, holes filled, largest component" if use_mask else "whole volume",
        "SSIM": "scikit-image, 7-voxel uniform window, K1=0.01, K2=0.03; 'ssim' = mean of 2D slices across the "
        "thick axis (in-plane kinds: the acquired slices, across the slice axis), 'ssim3d' = volumetric 7x7x7",
        "LPIPS": "official lpips 0.1.4, AlexNet, real ImageNet backbone (sha256 "
        + ", ".join(f"{k} {v[:12]}" for k, v in sorted(lpips_sums.items()))
        + "); 16 evenly spaced "
        "slices per orthogonal plane, intensities / data range clipped to [0, 1]",
        "NRMSE": "||pred - truth|| / ||truth|| inside the mask",
        "volumetry": "a proxy, not a clinical segmentation: 3-class Gaussian mixture (scikit-learn) fitted to the "
        "truth's intensities inside the mask, applied unchanged to each output; classes by increasing "
        "mean intensity (on T1: CSF, grey matter, white matter); 'dice' and 'volume_error' are the "
        "means over the classes of Dice and of the absolute volume error (%), per class in metrics.csv "
        "and the Volumetry section",
        "statistics": "mean with 95% percentile-bootstrap CI (10,000 resamples, seed 0); two-sided paired Wilcoxon "
        "signed-rank test against the best baseline of each metric",
        "software": f"medldm {__version__}, torch {torch.__version__}, monai {monai.__version__}, "
        f"scikit-image {skimage_version}, numpy {np.__version__}, Python {platform.python_version()}",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
    }
    from medldm.provenance import git_commit, model_digest

    protocol["provenance"] = {
        "command line": shlex.join(command or sys.argv),
        "cwd": os.getcwd(),
        "medldm": __version__ + (f" (git {git_commit()})" if git_commit() else ""),
    }
    if model is not None:
        staged = model.estimator is not None
        protocol["provenance"]["model sha256"] = model_digest(model.path)
        protocol["model"] = (
            f"{model.path} (config {model.info.get('config_digest')}, "
            f"autoencoder {model.info.get('autoencoder_steps')} steps, "
            f"diffusion {model.info.get('diffusion_steps')} steps"
            + (f", estimator {model.info.get('estimator_steps')} steps" if staged else "")
            + ")"
        )
        protocol["sampling"] = (
            f"{sampler}, {steps} steps, {samples} sample(s), seed {seed}, planes {planes}, "
            + (
                f"refine {refine} (diffusion from the regression estimate; detail from planes {refine_planes}), "
                if staged
                else ""
            )
            + "data consistency on"
            + (
                "; adapted to each degraded scan first (medldm.adapt: the estimator fine-tuned "
                f"on the scan's own slices, at most {adapt['steps'] or 'any number of'} steps and "
                f"{adapt['minutes'] or 'no limit in'} minutes; 'unadapted' is the same model "
                "without it)"
                if adapt
                else ""
            )
        )
    return protocol
