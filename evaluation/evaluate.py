"""`medldm evaluate`: degrade each HR scan with the shared forward model, upscale it with the baselines and the
model, score every result against the truth, and write the report."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from medldm.degrade import acquisition_operator, degrade_volume
from medldm.errors import MedldmError
from medldm.resample import interpolate
from medldm.volume import SCAN_SUFFIXES, Volume, load

__all__ = ["Case", "Scores", "evaluate", "score", "scan_list"]

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
    sampling: dict[str, Any] = {"steps": steps, "sampler": sampler, "planes": planes, "refine": refine}
    sampling["refine_planes"] = refine_planes
    upscaler = None
    if model is not None:
        from medldm.pipeline import Upscaler

        upscaler = Upscaler(model, device=device, **sampling)
        # the model's defaults where none was given (an adapted model's own refinement, if none was)
        sampling = sampling_of(upscaler, adapted=adapt is not None and refine is None)
    methods = _methods(kind, baselines, upscaler, adapt)
    if rd_only and upscaler is None:
        raise MedldmError("rate-distortion needs a model (--model)")
    acquisition = {"kind": kind, "axis": axis, "scale": scale, "profile": profile, "thickness": thickness}
    results = Scores()
    run: dict[str, Any] = {"seed": seed, "samples": samples, "adapt": adapt}
    for n, path in cohort.share(list(enumerate([] if rd_only else files)), state):
        if progress:
            progress(path.name, n, len(files))
        case, lr, factors = _run_case(path, acquisition, methods, upscaler, results.timings, **run)
        results.add(case, path.name, use_mask=use_mask, lpips_weights=lpips_folder)
        if n == 0:
            results.examples.append(_example(case.truth, lr, case.outputs, case.uncertainty, case.axis, factors))
    if state is not None and not results.gather(state, files):
        return None  # the first process reports everyone's results
    rd_data, rd_sample = None, None
    if (rd or rd_only) and upscaler is not None:
        rd_data, rd_sample = _rate_distortion(upscaler, files[0], kind=kind, axis=axis, scale=scale, profile=profile)
    protocol = _protocol(
        files,
        upscaler.model if upscaler else None,
        acquisition,
        {**sampling, "samples": samples, "seed": seed},
        adapt=adapt,
        use_mask=use_mask,
        lpips_sums=verify_checksums(lpips_folder),
        command=command,
    )
    return write_report(
        out,
        rows=results.rows,
        protocol=protocol,
        examples=results.examples,
        rd=rd_data,
        timings={k: float(np.mean(v)) for k, v in results.timings.items()},
        metrics=SUMMARY_METRICS,
        baselines=methods,
        calibration=results.calibration,
        rd_sample=rd_sample,
    )


def sampling_of(upscaler, *, adapted: bool = False) -> dict[str, Any]:
    """The sampling settings an Upscaler runs with (the model's defaults where none was given), for the protocol;
    ``adapted``: the refinement a model adapted to the scan runs with by default, and the unadapted one's beside it."""
    from medldm.pipeline import ESTIMATE_GRID

    names = ("sampler", "steps", "planes", "refine", "refine_planes")
    sampling = {name: getattr(upscaler, name) for name in names}
    sampling["estimate_grid"] = ESTIMATE_GRID
    sampling["unseen-modality refine"] = upscaler.unseen_modality_refine  # e.g. CT scored with an MR model
    if adapted:
        from medldm.adapt import REFINE

        sampling["unadapted refine"], sampling["refine"] = sampling["refine"], REFINE
    return sampling


def _methods(kind: str, baselines, upscaler, adapt: dict | None) -> tuple[str, ...]:
    """The methods scored besides the model: the chosen (or every applicable) baseline, and with ``adapt`` the
    model before adaptation."""
    offered = baselines_for(kind, regression=upscaler is not None and upscaler.model.estimator is not None)
    methods = offered if baselines is None else tuple(baselines)
    unknown = [m for m in methods if m not in offered]
    if unknown:
        raise MedldmError(
            f"unknown or unavailable baseline {unknown[0]!r} for {kind}; choose from {', '.join(offered)}"
        )
    if adapt is not None:
        if upscaler is None:
            raise MedldmError("--adapt adapts a model: pass --model")
        methods = (*methods, UNADAPTED)
    return methods


@dataclass
class Case:
    """One scan's truth and every method's output on it."""

    truth: Volume
    axis: int  # the operator's axis (thick slices, or for in-plane kinds the slice axis): 2D SSIM across it
    outputs: dict[str, Volume] = field(default_factory=dict)
    uncertainty: Volume | None = None
    residual: float | None = None  # the model's consistency residual
    adaptation: dict | None = None  # --adapt: steps over every adapted pass (400 each unless the time cap cut them), s


def _timed(timings: dict[str, list[float]], method: str, tic: float) -> float:
    """Record the seconds since ``tic`` for ``method``; returns now."""
    now = time.perf_counter()
    timings.setdefault(method, []).append(now - tic)
    return now


def _run_case(path: Path, acquisition: dict, methods, upscaler, timings, *, seed: int, samples: int, adapt):
    """Degrade the scan at ``path`` as ``acquisition`` says, and run the baselines and the model on it; returns
    the Case, the LR scan and the operator's factors."""
    lr, truth = degrade_volume(load(path), **acquisition)
    kind, thickness = acquisition["kind"], acquisition["thickness"]
    op_axis, exact = lr.meta["degrade"]["axis"], lr.meta["degrade"]["scale"]  # non-integer: the grid's factor
    op = acquisition_operator(lr)
    case = Case(truth, op_axis)
    for method in (m for m in methods if m not in (REGRESSION, UNADAPTED)):  # the model makes these two
        tic = time.perf_counter()
        case.outputs[method] = baseline(method, lr, op)
        _timed(timings, method, tic)
    if upscaler is not None:
        options = {
            "axis": op_axis,
            "scale": exact,
            "kind": kind,
            "thickness": thickness * lr.spacing[op_axis] if kind == "slice-profile" else None,
        }
        _run_model(case, lr, upscaler, options, methods, timings, seed=seed, samples=samples, adapt=adapt)
    return case, lr, op.factors(3)


def _run_model(case: Case, lr: Volume, upscaler, options, methods, timings, *, seed: int, samples: int, adapt) -> None:
    """The model's output on the case (and with ``adapt`` first its output unadapted, then the adaptation, whose
    time counts as the model's), and the regression baseline."""
    from medldm.pipeline import Upscaler

    runner = upscaler
    tic = time.perf_counter()
    if adapt is not None:
        from medldm.adapt import adapt as run_adaptation

        plan = upscaler.plan(lr, **options)
        case.outputs[UNADAPTED] = upscaler.upscale(lr, plan=plan, seed=seed).sr
        tic = _timed(timings, UNADAPTED, tic)
        adapted = run_adaptation(upscaler.model, lr, plan, seed=seed, **adapt)
        runner = upscaler.with_model(adapted.model)
        timings.setdefault("adaptation", []).append(adapted.seconds)
        steps = adapted.steps + sum(len(losses) for losses in adapted.later_losses)
        case.adaptation = {"adaptation_steps": steps, "adaptation_s": adapted.seconds}
    # the regression baseline is the strongest regression the model gives: its estimate over both stacks of
    # planes, made consistent; the model's own upscale provides it when it also uses both stacks
    shared = REGRESSION in methods and runner.planes == "both"
    result = runner.upscale(lr, **options, samples=samples, seed=seed, keep_estimate=shared)
    tic = _timed(timings, "model", tic)
    if shared:
        case.outputs[REGRESSION] = result.estimate
    elif REGRESSION in methods:
        regression = Upscaler(runner.model, device=str(runner.device), planes="both", refine=0.0)
        case.outputs[REGRESSION] = regression.upscale(lr, **options).sr
        _timed(timings, REGRESSION, tic)
    case.outputs["model"], case.uncertainty, case.residual = result.sr, result.uncertainty, result.residual


@dataclass
class Scores:
    """The rows of the metrics table, the example figures, the uncertainty calibration and the timings."""

    rows: list[dict] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    calibration: list[dict] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)

    def add(self, case: Case, name: str, *, use_mask: bool, lpips_weights) -> None:
        """Score every output of ``case`` against its truth."""
        truth = case.truth
        mask = foreground_mask(truth.data) if use_mask else None
        tissues = TissueClasses(truth.data, mask)  # fitted to the truth, applied unchanged to every output
        for method, pred in case.outputs.items():
            # 2D SSIM over the HR slices across the operator's axis (for in-plane kinds, the acquired slices)
            row = {
                "volume": name,
                "method": method,
                **score(pred, truth, mask=mask, axis=case.axis, lpips_weights=lpips_weights),
                **tissues.compare(pred.data),
            }
            if method == "model":
                row["consistency_residual"] = case.residual
                row.update(case.adaptation or {})
                unc = case.uncertainty
                if unc is not None and np.ptp(unc.data) > 0:
                    cal = uncertainty_calibration(unc.data, pred.data, truth.data, mask=mask)
                    row["uncertainty_spearman"] = cal["spearman"]
                    self.calibration.append({"volume": name, **cal})
            self.rows.append(row)

    def gather(self, state, files: list[Path]) -> bool:
        """Merge every process's results, in the order of the scan list; True in the process that reports."""
        order = {p.name: i for i, p in enumerate(files)}
        self.rows = sorted(cohort.gather(self.rows, state), key=lambda r: order[r["volume"]])  # methods keep order
        self.examples = cohort.gather(self.examples, state)
        self.calibration = sorted(cohort.gather(self.calibration, state), key=lambda c: order[c["volume"]])
        merged: dict[str, list] = {}
        for part in cohort.gather([self.timings], state):
            for method, values in part.items():
                merged.setdefault(method, []).extend(values)
        self.timings = merged
        return bool(state.is_main_process)


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
    hr_slices, cond_slices = m.pad(hr_slices), m.pad(cond_slices)
    task = next((t for t in m.config.data.tasks if t.kind == kind and t.scale == scale), None)
    if task is None:  # a factor the model was not trained for: no label to measure its denoiser with
        return {}, None
    label = m.label(task, MODALITIES.index(guess_modality(lr.data, lr.meta.get("modality"))))
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


def _protocol(files, model, acquisition: dict, sampling: dict, *, adapt, use_mask, lpips_sums, command) -> dict:
    """The report's protocol section: what was degraded how, each method and metric, the software, the command
    and the model with its sampling."""
    from medldm.provenance import git_commit, model_digest

    protocol: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "scans": f"{len(files)}: " + ", ".join(p.name for p in files),
        **_methods_protocol(acquisition, regression=model is not None and model.estimator is not None),
        **_metrics_protocol(use_mask, lpips_sums),
    }
    protocol["provenance"] = {
        "command line": shlex.join(command or sys.argv),
        "cwd": os.getcwd(),
        "medldm": __version__ + (f" (git {git_commit()})" if git_commit() else ""),
    }
    if model is not None:
        protocol["provenance"]["model sha256"] = model_digest(model.path)
        protocol.update(_model_protocol(model, sampling, adapt))
    return protocol


def _methods_protocol(acquisition: dict, *, regression: bool) -> dict[str, Any]:
    kind, scale, thickness = acquisition["kind"], acquisition["scale"], acquisition["thickness"]
    degradation = (
        f"{kind} x{scale:g} along {acquisition['axis']} (profile {acquisition['profile']}"
        + (f", slice thickness {thickness:g} x the spacing" if thickness != 1 else "")
        + "), medldm.degrade; the truth is the input cropped to hold whole LR samples"
    )
    if not float(scale).is_integer():
        degradation += " (docs/grids.md: the exact factor may differ from the one asked by up to 0.5 / LR slices)"
    baselines = (
        "nearest, trilinear, cubic B-spline (scipy map_coordinates with prefilter) on the exact HR grid; "
        "bspline-dc: cubic B-spline with the model's data-consistency projection x + A^+(y - Ax)"
    )
    if kind == "kspace":
        baselines += "; zero-fill: zero filling (pseudo-inverse of the k-space truncation, sinc interpolation)"
    if regression:
        baselines += (
            "; regression: the model's own regression (estimator) stage over both stacks of planes with "
            "the same projection, without the diffusion model's detail"
        )
    return {"degradation": degradation, "baselines": baselines}


def _metrics_protocol(use_mask: bool, lpips_sums: dict) -> dict[str, Any]:
    import monai
    import skimage
    import torch

    skimage_version = skimage.__version__  # type: ignore[attr-defined]  # left out of skimage's __init__.pyi
    return {
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


def _adapt_recipe(model) -> str:
    from medldm.adapt import recipe

    return recipe(next(model.estimator.parameters()).device)


def _model_protocol(model, sampling: dict, adapt: dict | None) -> dict[str, str]:
    staged = model.estimator is not None
    info = model.info
    described = (
        f"{model.path} (config {info.get('config_digest')}, autoencoder {info.get('autoencoder_steps')} steps, "
        f"diffusion {info.get('diffusion_steps')} steps"
        + (f", estimator {info.get('estimator_steps')} steps" if staged else "")
        + ")"
    )
    how = (
        f"{sampling['sampler']}, {sampling['steps']} steps, {sampling['samples']} sample(s), seed {sampling['seed']}, "
        f"planes {sampling['planes']}, "
    )
    if staged:
        how += (
            f"refine {sampling['refine']} (diffusion from the regression estimate; detail from planes "
            f"{sampling['refine_planes']}), "
        )
    if staged and sampling.get("estimate_grid") == "trained":
        how += "at a factor not trained on the estimate made on the nearest trained factor's grid (docs/grids.md), "
    how += "data consistency on"
    if adapt:
        how += (
            "; adapted to each degraded scan first (medldm.adapt: the estimator, then each later pass, fine-tuned "
            f"on the scan's own slices, at most {adapt['steps'] or 'any number of'} steps each and "
            f"{adapt['minutes'] or 'no limit in'} minutes in all{_adapt_recipe(model)}; 'unadapted' is the same "
            "model without it"
            + (f", refine {sampling['unadapted refine']})" if "unadapted refine" in sampling else ")")
        )
    unseen, default = sampling.get("unseen-modality refine"), sampling.get("unadapted refine", sampling["refine"])
    if staged and unseen is not None and unseen != default:  # medldm.pipeline.Upscaler.unseen_modality_refine
        how += f"; scans of a modality the model was not trained on (CT for an MR model) get refine {unseen:g}"
    return {"model": described, "sampling": how}
