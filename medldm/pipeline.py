"""The Upscaler: one Volume in, one upscaled Volume out. No file I/O and no printing (progress goes through a
callback), so the CLI, evaluation and benchmarks share it.

Steps: pick the axis and task -> normalise intensities -> interpolate the LR scan onto the HR grid (the
condition) -> 2D models: sample slice batches on the planes that contain the upscaled axis (2.5D models,
``data.slab`` > 1, condition each plane on its neighbours' latents too); 3D models:
overlapping patches blended with a Gaussian window (MONAI sliding_window_inference) -> data consistency with the
forward model (degrading the output gives back the input) -> mean and standard deviation over N samples ->
original intensity scale on the HR grid (affine per DESIGN.md: field of view unchanged).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from medldm.choices import Planes
from medldm.degrade import KSpaceTruncation, LinearOperator, consistency_residual, enforce_consistency, make_operator
from medldm.diffusion import make_denoiser, randn, sample
from medldm.errors import MedldmError
from medldm.intensity import guess_modality, normaliser
from medldm.model import LoadedModel, load_model, pad_to_multiple
from medldm.nets import (
    MODALITIES,
    Estimator,
    channels_last_format,
    geometry_features,
    native_bf16,
)
from medldm.resample import resample_axis, upsample
from medldm.scope import scan_statistics
from medldm.spec import Task
from medldm.volume import ANISOTROPY, Volume, check_memory, rescaled_affine, resolve_axis

__all__ = ["PLANES", "Upscaler", "UpscaleResult", "RunningStats", "estimate_planes", "interpolated", "planes_per_call"]

PLANES = Planes.values()
# Where the estimate of thick slices is made at a factor the networks never learnt (e.g. x5.5 from a model trained
# at x2 and x4, not told the factor): "trained" (the default since 2026-12-06), on the grid of the nearest trained
# factor (the slices keep their place, only the HR voxels between them change), then interpolated onto the output
# grid (cubic B-spline) and made consistent with the scan again; "output", on the output grid, the networks told
# the nearest trained factor (0.4-2.3 dB worse on the tuning scans: docs/model_card.md, "The estimate on the
# trained factor's grid").
ESTIMATE_GRID = "trained"
HU_MIN = -1024.0  # air: CT outputs are clipped here (and at the scan's maximum)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Plan:
    """What an upscale will do to one scan: see :meth:`Upscaler.plan`."""

    task: Task  # the model task whose label the networks get: the trained one nearest to the factor
    axis: int  # voxel axis: the upscaled one (thick slices) or the slice axis (in-plane kinds)
    scale: int | float  # the exact factor of the output grid (output voxels / input voxels along the axis)
    thickness: float  # thick slices: slice thickness / slice spacing (1: contiguous slices)
    warnings: tuple[str, ...] = ()  # how the scan lies outside what the model was trained on
    # False for a modality the model was never trained on: such a scan gets the upscaler's unseen_modality_refine
    # (the estimate alone, unless a refinement was asked for)
    modality_seen: bool = True

    def operator(self):
        """The forward model of this scan's acquisition (3D)."""
        return make_operator(
            self.task.kind,
            axis=self.axis,
            scale=self.scale,
            spatial_dims=3,
            profile=self.task.profile,
            thickness=self.thickness,
        )


@dataclass
class UpscaleResult:
    sr: Volume  # the upscaled scan (mean over samples), float32, original intensity scale
    uncertainty: Volume | None  # per-voxel standard deviation over samples (None for one sample)
    residual: float  # RMS of degrade(sr) - input, as a fraction of the input's intensity range
    task: Task
    axis: int  # voxel axis: the upscaled one (thick slices) or the slice axis (in-plane kinds)
    estimate: Volume | None = None  # the consistent regression estimate (models with an estimator, when kept)
    plan: Plan | None = None  # the factor, thickness and warnings this result was made with


class RunningStats:
    """Mean and sample standard deviation of a stream of equally shaped tensors (Welford, in the dtype of the
    first tensor: float32 volumes stay float32), holding at most two volumes however many samples are drawn, and
    one for a single sample: the first tensor becomes the mean without a copy, so do not modify it afterwards."""

    def __init__(self):
        self.count, self.mean, self._m2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        self.count += 1
        if self.mean is None:
            self.mean = x if x.is_floating_point() else x.double()
            return
        x = x.to(self.mean.dtype)
        if self._m2 is None:
            self.mean = self.mean.clone()  # no longer the caller's tensor
            self._m2 = torch.zeros_like(self.mean)
        delta = x - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (x - self.mean)

    @property
    def std(self) -> torch.Tensor:
        if self._m2 is None:
            return torch.zeros_like(self.mean)
        return (self._m2 / (self.count - 1)).clamp_min(0).sqrt()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedldmError("CUDA was asked for (--device cuda) but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


class Upscaler:
    """Upscales Volumes with a trained model.

    Args:
        model: a model folder path, "default", or a :class:`LoadedModel`.
        device: "auto", "cpu" or "cuda[:n]".
        steps: sampler steps (network evaluations per sample; None: the model's default). From pure noise, 1 step
            returns the denoiser's estimate of the clean latent: close to the posterior mean, the highest PSNR/SSIM
            and the least invented detail; more steps draw sharper posterior samples (lower LPIPS, lower PSNR), and
            only those make ``samples > 1`` a meaningful uncertainty map (benchmarks/steps_quality.py measures it).
        sampler: a name from medldm.diffusion.SAMPLERS.
        batch_size: slices (2D) or patches (3D) per network call; 2D batches of large planes are smaller, so
            that a call holds at most ``BATCH_PIXELS`` pixels.
        consistency: strength of the data-consistency correction in [0, 1] (1: degrade(output) == input).
        condition_level: noise-augmentation level of the condition (0: clean, as the test inputs are).
        bf16: bfloat16 autocast: True for every network, False for none. None (the default): only the diffusion
            refinement's networks (the autoencoder and denoiser, when they refine an estimate), and only where the
            device runs bf16 natively; the estimate, which sets the fidelity, stays float32. The refinement
            returns a detail added to the estimate, so its rounding is small beside the detail; in bf16 it ran
            1.9x faster on the 2-core CPU measured (the whole default upscale 1.4x; docs/performance.md).
        planes: 2D models and thick slices: "one" samples the stack of planes across the shorter free axis;
            "both" also samples the other stack of planes containing the upscaled axis, with its own noise, and
            averages the two (twice the time; their errors are less correlated than two samples of one stack).
            None: the model's default (model.json; "both" for models that do not say). With an estimator stage it
            sets the stacks the estimate averages; ``refine_planes`` those the refinement's detail comes from.
        channels_last: channels-last memory format for the autoencoder and the 2D estimator passes (the same
            output up to float rounding; their speed on the CPUs measured: docs/performance.md).
        refine: models with an estimator (fidelity) stage: the fraction of the noise schedule from which the
            diffusion model refines the estimate (its latent is noised to that level, then ``steps`` sampler steps
            run back to 0, and only the detail the diffusion adds, ``decode(z_0) - decode(z_estimate)``, is added
            to the estimate, so the autoencoder's own reconstruction error cancels). 0 returns the estimate
            alone (regression + data consistency). None: the model's validated default (model.json).
        refine_planes: "one" or "both": the stacks of planes the refinement adds detail from (None: the model's
            default, else ``planes``). Estimating on both and refining one costs half the refinement time.
    """

    # At most this many HR pixels per 2D network call. The decoder's full-resolution activations (channels x
    # pixels x 4 bytes, a few alive at once) then stay bounded for any plane size; on a CPU, calls small enough
    # for the activations to stay in cache are also faster (docs/performance.md), on a GPU larger calls are.
    BATCH_PIXELS = {"cpu": 1 << 17, "cuda": 1 << 20}

    def __init__(
        self,
        model: str | Path | LoadedModel = "default",
        *,
        device: str = "auto",
        steps: int | None = None,
        sampler: str = "dpmpp-2m",
        batch_size: int = 16,
        consistency: float = 1.0,
        condition_level: int = 0,
        bf16: bool | None = None,
        planes: str | None = None,
        channels_last: bool = True,
        refine: float | None = None,
        refine_planes: str | None = None,
    ):
        # the options as given (None: the model's default), so that another model's defaults apply in with_model
        self._options: dict[str, Any] = dict(
            device=device, steps=steps, sampler=sampler, batch_size=batch_size, consistency=consistency,
            condition_level=condition_level, bf16=bf16, planes=planes, channels_last=channels_last, refine=refine,
            refine_planes=refine_planes,
        )  # fmt: skip
        self.device = _device(device)
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device=self.device)
        self.model.autoencoder.to(self.device)
        self.model.denoiser.to(self.device)
        defaults = self.model.defaults()
        steps = defaults["steps"] if steps is None else steps
        refine = defaults["refine"] if refine is None else refine
        planes = defaults["planes"] if planes is None else planes
        refine_planes = (
            (planes if "refine_planes" not in self.model.info.get("sampling", {}) else defaults["refine_planes"])
            if refine_planes is None
            else refine_planes
        )
        if self.model.estimator is None and refine > 0:
            raise MedldmError(
                "refine needs a model with an estimator stage; this one samples from pure noise", self.model.path
            )
        if not 0.0 <= refine < 1.0:
            raise MedldmError(f"refine must lie in [0, 1), got {refine}")
        trained = self.model.spec.diffusion.refine
        if trained is not None and refine > trained + 1e-9:
            raise MedldmError(
                f"this model's denoiser was trained to refine from at most {trained}, not {refine}", self.model.path
            )
        self.refine = refine
        # a scan of a modality the model never learnt gets the estimate alone unless a refinement was asked for:
        # on a CT phantom the MR denoiser's default refinement cost 2.2 dB and raised LPIPS 3.9x (model card)
        given = self._options["refine"] is not None
        self.unseen_modality_refine = refine if given or self.model.estimator is None else 0.0
        if not 0.0 <= consistency <= 1.0:
            raise MedldmError(f"consistency must lie in [0, 1], got {consistency}")
        if not 0 <= condition_level < self.model.codec.levels:
            raise MedldmError(f"condition level must lie in 0..{self.model.codec.levels - 1}")
        for value in (planes, refine_planes):
            if value not in PLANES:
                raise MedldmError(f"planes must be one of {', '.join(PLANES)}, got {value!r}")
        if channels_last:
            self.model.autoencoder.to(memory_format=channels_last_format(self.model.spec.data.spatial_dims))
            # the 2D estimator passes too: the same output to float rounding, the estimate 0.84x the time in float32
            # on a 2-core CPU (docs/performance.md); the denoiser (slower there) and 3D estimators (not measured) not
            for net in (self.model.estimator, self.model.second_pass, self.model.third_pass):
                if net is not None and net.spatial_dims == 2:
                    net.to(memory_format=channels_last_format(net.spatial_dims))
        self.steps, self.sampler, self.batch_size, self.planes = steps, sampler, batch_size, planes
        self.refine_planes = refine_planes if self.model.estimator is not None else planes
        self.channels_last = channels_last
        self.consistency, self.condition_level, self.bf16 = consistency, condition_level, bool(bf16)
        # the autoencoder's and denoiser's precision: by default bf16 only when they refine an estimate
        self.diffusion_bf16 = (
            bf16 if bf16 is not None else self.model.estimator is not None and native_bf16(self.device)
        )
        cfg = self.model.spec
        self.dims = cfg.data.spatial_dims
        self.multiple = self.model.multiple

    def with_model(self, model: LoadedModel) -> Upscaler:
        """The same options with another model of the same kind (e.g. one adapted to a scan); the sampling options
        left to the model's defaults take the other model's (an adapted model refines less)."""
        return Upscaler(model, **self._options)

    # ------------------------------------------------------------------------------------ choices
    def plan(
        self,
        volume: Volume,
        *,
        axis: str | int = "auto",
        scale: float | None = None,
        kind: str | None = None,
        spacing: float | None = None,
        thickness: float | None = None,
    ) -> Plan:
        """What upscaling ``volume`` will do: the kind, axis and exact factor, the slice thickness, the model task
        whose label the networks get, and warnings where the scan lies outside what the model was trained on.

        Thick slices take any factor >= 1.05: ``spacing`` (mm, the output spacing along the axis) or ``scale``;
        by default the spacing ratio of an anisotropic scan (thick axis / finest in-plane). The output holds
        ``round(n * factor)`` voxels over the same field of view (docs/grids.md). An isotropic scan needs ``axis``
        or ``kind``: medldm never turns an isotropic scan into an anisotropic one unasked.

        Args:
            thickness: the slice thickness in mm (default: the DICOM SliceThickness, else the slice spacing).
        """
        tasks = self.model.spec.data.tasks
        _, normalised, modality, _ = self._normalised(volume)  # first: an unusable scan (a constant image) is named
        voxel_spacing = np.asarray(volume.spacing, dtype=np.float64)
        anisotropic = voxel_spacing.max() / voxel_spacing.min() > ANISOTROPY
        if kind is None:
            if str(axis) == "auto" and not anisotropic:
                raise MedldmError(
                    f"the scan is isotropic ({' x '.join(f'{v:.3g}' for v in voxel_spacing)} mm): name the axis to "
                    "upscale (e.g. --axis z) or --kind kspace for in-plane",
                    volume.path,
                )
            kind = "slice-profile"
        a = resolve_axis(volume, axis)
        trained = [t for t in tasks if t.kind == kind]
        if not trained:
            offered = ", ".join(f"{t.kind} x{t.scale}" for t in tasks)
            raise MedldmError(f"the model was not trained for {kind}; it offers {offered}", volume.path)
        exact = _exact_factor(volume, a, kind, spacing=spacing, scale=scale, trained=trained, anisotropic=anisotropic)
        ratio = _thickness_ratio(volume, a, kind, thickness)
        task = min(trained, key=lambda t: abs(math.log(t.scale / exact)))
        scope = self.model.scope
        seen = MODALITIES[modality] in scope.modalities
        plan = Plan(task, a, round(exact) if abs(exact - round(exact)) < 1e-9 else exact, ratio, modality_seen=seen)
        warnings = scope.warnings(volume, plan, statistics=scan_statistics(normalised.numpy()))
        if self.refine_for(plan) != self.refine:
            warnings.append(
                f"the diffusion refinement learnt {'/'.join(scope.modalities)} only, so this scan gets the "
                f"regression estimate alone (--refine {self.refine:g} adds it)"
            )
        return replace(plan, warnings=tuple(warnings))

    def refine_for(self, plan: Plan) -> float:
        """The refinement level the scan ``plan`` was made for gets: this upscaler's, or for a modality the model
        never learnt, :attr:`unseen_modality_refine`."""
        return self.refine if plan.modality_seen else self.unseen_modality_refine

    def choose(
        self, volume: Volume, *, axis: str | int = "auto", scale: int | None = None, kind: str | None = None
    ) -> tuple[Task, int]:
        """The model task and voxel axis for a scan (see :meth:`plan`)."""
        plan = self.plan(volume, axis=axis, scale=scale, kind=kind)
        return plan.task, plan.axis

    # ----------------------------------------------------------------------------------------- run
    def upscale(
        self,
        volume: Volume,
        *,
        axis: str | int = "auto",
        scale: float | None = None,
        kind: str | None = None,
        spacing: float | None = None,
        thickness: float | None = None,
        samples: int = 1,
        seed: int = 0,
        progress: Progress | None = None,
        keep_estimate: bool = False,
        plan: Plan | None = None,
    ) -> UpscaleResult:
        """Upscale one scan; see the class docstring for the options fixed at construction and :meth:`plan` for
        ``axis``, ``scale``, ``kind``, ``spacing`` and ``thickness`` (or pass a ``plan`` made for this scan).
        ``keep_estimate`` also returns the regression estimate alone (models with an estimator; one more volume
        in memory)."""
        if samples < 1:
            raise MedldmError(f"samples must be at least 1, got {samples}")
        if plan is None:
            plan = self.plan(volume, axis=axis, scale=scale, kind=kind, spacing=spacing, thickness=thickness)
        if self.refine_for(plan) != self.refine:
            runner = copy.copy(self)  # the same networks, without the refinement the model never learnt here
            runner.refine = self.refine_for(plan)
            return runner.upscale(
                volume, samples=samples, seed=seed, progress=progress, keep_estimate=keep_estimate, plan=plan
            )
        task, a, op = plan.task, plan.axis, plan.operator()
        hr_shape = op.input_shape(volume.shape)
        # HR-grid float32 volumes alive at once: the sum over stacks, the running mean (and spread), the estimate
        # (and its kept copy), the output in the scan's units; refused now rather than after minutes of work
        copies = 3 + (self.model.estimator is not None) + (self.model.error_model is not None) + keep_estimate
        copies += bool(self._later_passes(op))
        copies += 2 * (samples > 1)
        grid = self._estimate_grid(plan, hr_shape, op)  # finer than the output when the trained factor is larger
        larger = max(hr_shape, grid[0], key=lambda shape: int(np.prod(shape)))
        check_memory(larger, volume.path, copies=copies, what="the upscaled grid", share=0.8)
        norm, lr, modality, limits = self._normalised(volume)
        task_index = self.model.spec.data.tasks.index(task)
        label = self.model.label(task, modality, self.condition_level)
        tick = _counter(self._total_units(hr_shape, op, samples, grid), progress)
        stats = RunningStats()
        encoded: dict = {}  # condition latents, encoded once and reused by every sample
        estimate = error_scale = None
        if self.model.estimator is not None:  # fidelity first: the regression estimate, made consistent
            label_of_task = self.model.codec.task_label(task_index, modality)
            estimate, error_scale = self._estimate_on(grid, lr, hr_shape, op, plan, label_of_task, tick)
        for k in range(samples):
            if estimate is not None and self.refine == 0:
                stats.add(estimate)  # already consistent; every sample is the same
                continue
            x = self._sample_volume(lr, hr_shape, op, label, _mix_seed(seed, k), tick, encoded, estimate)
            stats.add(enforce_consistency(x, lr, op, strength=self.consistency))  # in place, slab by slab
        del encoded
        mean = stats.mean
        residual = consistency_residual(mean, lr, op)  # normalised LR: a fraction of the intensity range
        affine = rescaled_affine(volume.affine, [1.0 / f for f in op.factors(3)])
        estimate_scale = plan.scale if grid[1] is op else plan.task.scale
        meta = self._output_meta(plan, samples, seed, estimate_scale=estimate_scale)
        kept = None  # before the in-place de-normalisation below: with refine 0 the mean is the estimate
        if keep_estimate and estimate is not None:
            kept = volume.with_data(
                _clip(norm.inverse(estimate.float().numpy()), limits),
                affine,
                **{"upscale": {**meta["upscale"], "refine": 0.0}},
            )
        voxels = mean.float().numpy()
        sr = volume.with_data(_clip(norm.inverse(voxels, out=voxels), limits), affine, **meta)  # in place
        unc = None
        if samples > 1 or error_scale is not None:
            std = _uncertainty(stats if samples > 1 else None, error_scale)
            unc = volume.with_data(std.numpy() * (norm.high - norm.low), affine, **meta)
        return UpscaleResult(sr, unc, residual, task, a, kept, plan)

    def autoencode(self, lr: Volume, truth: Volume, op: LinearOperator) -> Volume:
        """``truth`` (the HR volume that the forward model ``op`` turned into ``lr``) encoded and decoded by the
        autoencoder, plane by plane on the stack the refinement adds its detail from, normalised as the upscale
        normalises ``lr``: what the latent bottleneck keeps of the true image (medldm.evaluation.ceiling). 2D models
        only."""
        if self.dims != 2:
            raise MedldmError("the reconstruction ceiling is measured plane by plane: 2D models only", self.model.path)
        if tuple(op.input_shape(lr.shape)) != truth.shape:
            raise MedldmError(f"the truth is {truth.shape}, but this acquisition comes from {op.input_shape(lr.shape)}")
        norm, _, _, limits = self._normalised(lr)
        axis = self._plane_axes(truth.shape, op, "one")[0]
        planes = torch.from_numpy(norm.forward(truth.data.astype(np.float32))).movedim(axis, 0)
        out = torch.empty_like(planes)
        per_call, scale = self._planes_per_call(planes.shape[1:]), float(self.model.info["latent_scale"])
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.diffusion_bf16):
            for start in range(0, len(planes), per_call):
                block = planes[start : start + per_call, None]
                decoded = self._decode(self._encode(block) / scale)  # as the refinement decodes its latents
                out[start : start + len(block)] = decoded[:, 0, : planes.shape[1], : planes.shape[2]].cpu()
        data = out.movedim(0, axis).contiguous().numpy()
        return truth.with_data(_clip(norm.inverse(data, out=data), limits))

    def _normalised(self, volume: Volume):
        """The model's intensity normaliser fitted to ``volume``, the normalised scan, its modality's index and
        the output's intensity limits (CT stays within physical Hounsfield units: nothing below air, nothing above
        the scan's own maximum)."""
        try:
            norm = normaliser(self.model.spec.data.intensity, volume.data)
        except MedldmError as err:  # e.g. a constant image: name the scan
            raise MedldmError(err.reason, err.path or volume.path) from None
        lr = torch.from_numpy(norm.forward(volume.data.astype(np.float32)))
        modality_name = guess_modality(volume.data, volume.meta.get("modality"))
        limits = (HU_MIN, float(volume.data.max())) if modality_name == "CT" else None
        return norm, lr, MODALITIES.index(modality_name), limits

    def _total_units(self, hr_shape, op, samples: int, grid) -> int:
        """Progress units of one upscale: the estimate's (on ``grid``, :meth:`_estimate_grid`), and each sample's
        that needs the diffusion model."""
        sampled = samples if self.model.estimator is None or self.refine > 0 else 0
        estimated = self._estimate_units(*grid) if self.model.estimator is not None else 0
        return estimated + sampled * self._units(hr_shape, op, self.refine_planes)

    def _output_meta(self, plan: Plan, samples: int, seed: int, *, estimate_scale: float) -> dict[str, Any]:
        """What the output volume's metadata records of how it was made (``estimate_scale``: the factor of the grid
        the estimate was made on, docs/grids.md)."""
        task = plan.task
        return {
            "slice_thickness": None,  # the input's no longer describes the output's slices
            "upscale": {
                "kind": task.kind,
                "scale": plan.scale,
                "estimate_scale": estimate_scale,
                "thickness": plan.thickness,
                "axis": plan.axis,
                "model_task": f"{task.kind} x{task.scale}",
                "steps": self.steps,
                "refine": self.refine,
                "sampler": self.sampler,
                "samples": samples,
                "planes": self.planes,
                "refine_planes": self.refine_planes,
                "seed": seed,
                "consistency": self.consistency,
                "model": str(self.model.path),
            },
        }

    def _estimate_units(self, hr_shape, op) -> int:
        """Progress units of the estimate: slice batches (2D estimators) or chunks (3D)."""
        net = cast(Estimator, self.model.estimator)
        if net.spatial_dims == 2:
            return self._units(hr_shape, op, self.planes) * (1 + len(self._later_passes(op)))
        axis, depth = self._chunks_3d(hr_shape, op)
        return -(-hr_shape[axis] // depth)

    def _units(self, hr_shape, op, planes: str) -> int:
        """Progress units per pass: slice batches (2D) or patches (3D, estimated)."""
        if self.dims == 2:
            return sum(
                -(-hr_shape[axis] // self._planes_per_call(np.delete(hr_shape, axis)))
                for axis in self._plane_axes(hr_shape, op, planes)
            )
        return 1

    def _planes_per_call(self, plane_shape) -> int:
        return planes_per_call(plane_shape, self.device, multiple=self.multiple, batch_size=self.batch_size)

    def _plane_axes(self, hr_shape, op, planes: str) -> list[int]:
        """2D models see planes containing every degraded axis, so they slice across an axis that is not degraded:
        the one free axis (in-plane kinds), or for thick slices the free axis with the fewest voxels, and with
        ``planes="both"`` the other free axis too."""
        free = sorted((d for d in range(3) if d not in op.axes), key=lambda d: hr_shape[d])
        return free if planes == "both" else free[:1]

    def _memory_format(self):
        return channels_last_format(self.dims)

    def _encode(self, cond: torch.Tensor) -> torch.Tensor:
        """Scaled latents (on the device) of HR-grid conditions (B, 1, *spatial), padded to the network's multiple."""
        m = self.model
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.diffusion_bf16):
            cond = m.pad(cond).to(self.device)
            if self.channels_last:
                cond = cond.contiguous(memory_format=self._memory_format())
            return m.autoencoder.encode(cond).float().contiguous() * float(m.info["latent_scale"])

    def _generate(
        self, c: torch.Tensor, size, label: int, seeds: list[int], init: torch.Tensor | None = None
    ) -> torch.Tensor:
        """SR images (B, 1, *size) for a batch of condition latents ``c`` (from :meth:`_encode`; for 2D slabs, the
        latents of each plane of the slab concatenated along channels). Element ``i`` draws its noise from its own
        ``seeds[i]``, so a plane's output does not depend on how planes are batched (memory caps, devices).
        With ``init`` (scaled latents of the estimate, from :meth:`_encode`), sampling starts from ``init`` noised
        to ``self.refine`` of the schedule, and the result is the detail it adds: decode(z_0) - decode(init)."""
        m = self.model
        scale = float(m.info["latent_scale"])
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.diffusion_bf16):
            labels = torch.full((c.shape[0],), label, dtype=torch.long, device=self.device)

            def model_fn(x_t, t):
                return m.denoiser(x_t, t.to(self.device), c, labels).float()

            denoise = make_denoiser(model_fn, m.schedule, m.spec.diffusion.prediction)
            # seeds are taken modulo 2^64 (what torch does with negative ones), so large user seeds cannot overflow
            gens = [torch.Generator().manual_seed(s % 2**64) for s in seeds]
            if init is None:
                latent = m.spec.autoencoder.latent_channels  # one plane's channels, not the slab's
                x, kw = randn((c.shape[0], latent, *c.shape[2:]), gens, device=self.device), {"steps": self.steps}
            else:  # SDEdit from the estimate: ``steps`` network calls over the last ``refine`` of the schedule
                x, kw = init, {"steps": math.ceil(self.steps / self.refine - 1e-9), "start": self.refine}
            z = sample(self.sampler, denoise, x, m.schedule, generator=gens, **kw) / scale
            out = self._decode(z)
            if init is not None:
                out = out - self._decode(init / scale)
        crop = (slice(None), slice(None), *[slice(0, n) for n in size])
        return out[crop].contiguous().cpu()

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            z = z.contiguous(memory_format=self._memory_format())
        return self.model.autoencoder.decode(z).float()

    def _plane_latents(self, lr: torch.Tensor, hr_shape, encoded: dict, axis: int) -> torch.Tensor:
        """Latents (n, latent, h, w) of the conditions of every plane across ``axis`` (not a degraded axis), encoded
        in batches the first time and kept in ``encoded`` for the other samples. Each batch interpolates its own
        block of LR planes onto the HR grid (exactly as interpolating the whole volume would, since ``axis`` keeps
        its length), so the HR-grid condition volume is never held whole."""
        key = (axis, "planes")
        if key not in encoded:
            latents, n = [], lr.shape[axis]
            per_call = self._planes_per_call(np.delete(hr_shape, axis))
            for start in range(0, n, per_call):
                block = lr.narrow(axis, start, min(per_call, n - start))
                size = [*hr_shape]
                size[axis] = block.shape[axis]
                cond = upsample(block[None, None], size)[0, 0].movedim(axis, 0)  # (B, H, W)
                latents.append(self._encode(cond[:, None]))
            encoded[key] = torch.cat(latents)
        return encoded[key]

    def _later_passes(self, op) -> list[Estimator]:
        """The model's later passes that run on ``op``: those trained on its kind (thick slices, the one kind whose
        operator degrades a single axis of the volume, or k-space), in order."""
        kind = "slice-profile" if len(op.axes) == 1 else "kspace" if isinstance(op, KSpaceTruncation) else "other"
        return [getattr(self.model, name) for name in self.model.later_pass_names(kind)]

    def _estimate_grid(self, plan: Plan, hr_shape, op) -> tuple[tuple[int, ...], Any]:
        """The grid (shape) and forward model the estimate is made on: the output grid, or with ESTIMATE_GRID
        "trained", for thick slices at a factor the networks never learnt (neither a trained factor nor in a trained
        range, and not adapted to the scan), the grid of the nearest trained factor, where they see the slice profile
        they were trained on; :meth:`upscale` then interpolates that estimate onto the output grid and projects it
        again."""
        learnt = (
            self.model.estimator is None
            or plan.task.kind != "slice-profile"
            or self.model.scope.knows_factor(plan.task.kind, plan.scale)
        )
        # an adapted model's passes learnt the grid its pairs were made on (medldm.adapt.GRID)
        adapted = self.model.info.get("adapted_to")
        grid = adapted.get("grid", "output") if adapted else ESTIMATE_GRID
        if grid == "output" or learnt:
            return tuple(hr_shape), op
        trained = replace(plan, scale=plan.task.scale).operator()
        return tuple(trained.input_shape(op.output_shape(hr_shape))), trained

    def _estimate_on(self, grid, lr: torch.Tensor, hr_shape, op, plan: Plan, label: int, tick):
        """:meth:`_estimate` on ``grid`` (:meth:`_estimate_grid`), brought onto the output grid and made consistent
        with ``lr`` there when the grid is another one."""
        grid_shape, grid_op = grid
        geometry = geometry_features(grid_op.factors(3)[plan.axis], plan.thickness)
        estimate, error_scale = self._estimate(lr, grid_shape, grid_op, label, tick, geometry)
        if grid_op is not op:  # made on the trained factor's grid: onto the output grid, consistent again
            a = plan.axis
            estimate = enforce_consistency(resample_axis(estimate, a, hr_shape[a]), lr, op, strength=self.consistency)
            if error_scale is not None:
                error_scale = resample_axis(error_scale, a, hr_shape[a]).clamp_min(0)
        return estimate, error_scale

    def _estimate(
        self, lr: torch.Tensor, hr_shape, op, label: int, tick, geometry
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The estimator's regression estimate on the HR grid, made consistent with ``lr`` (normalised units), and
        for models with an error model its predicted Laplace scale (else None). With later passes (thick slices),
        each later network refines the previous pass's consistent estimate, which is projected again."""
        net = cast(Estimator, self.model.estimator)  # called for models with an estimator only
        if net.spatial_dims == 3:
            estimate, error_scale = self._estimate_volume_3d(lr, hr_shape, op, label, tick, geometry), None
        else:
            nets = (net, self.model.error_model)
            estimate, error_scale = self._estimate_volume(
                nets, interpolated(lr, hr_shape), hr_shape, op, label, tick, geometry
            )
        estimate = enforce_consistency(estimate, lr, op, strength=self.consistency)
        for later in self._later_passes(op):
            estimate, _ = self._estimate_volume((later, None), planes_of(estimate), hr_shape, op, label, tick, geometry)
            estimate = enforce_consistency(estimate, lr, op, strength=self.consistency)
        return estimate, error_scale

    def _estimate_volume(
        self, nets, source, hr_shape, op, label: int, tick, geometry
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:func:`estimate_planes` over this upscaler's stacks of planes, batches and device."""
        axes = self._plane_axes(hr_shape, op, self.planes)
        return estimate_planes(
            nets, source, hr_shape, axes, label, geometry, per_call=self._planes_per_call, device=self.device,
            bf16=self.bf16, tick=tick,
        )  # fmt: skip

    # a 3D estimator's chunks overlap by this many HR planes on each side: every kept plane sees at least this much
    # of the scan around it (the network's reach is longer; beyond the halo, padding stands in, as at the border
    # of a training patch)
    CHUNK_HALO = 16

    def _chunks_3d(self, hr_shape, op) -> tuple[int, int]:
        """The axis a 3D estimator's chunks are cut across (the longest axis that is not degraded, so each chunk
        interpolates just its own LR planes) and the number of HR planes per chunk (about BATCH_PIXELS * 16
        voxels with the halo)."""
        free = [d for d in range(3) if d not in op.axes]
        axis = max(free, key=lambda d: hr_shape[d])
        cross = int(np.prod([n + (-n) % self.multiple for d, n in enumerate(hr_shape) if d != axis]))
        cap = 16 * self.BATCH_PIXELS.get(self.device.type, self.BATCH_PIXELS["cuda"])
        return axis, max(self.multiple, cap // cross - 2 * self.CHUNK_HALO)

    def _estimate_volume_3d(self, lr: torch.Tensor, hr_shape, op, label: int, tick, geometry) -> torch.Tensor:
        """A 3D estimator's estimate on the HR grid: the volume in chunks across a free axis, each with a halo of
        CHUNK_HALO planes on both sides that is cut off again."""
        net = cast(Estimator, self.model.estimator)
        axis, depth = self._chunks_3d(hr_shape, op)
        out = torch.zeros(hr_shape)
        n, halo = hr_shape[axis], self.CHUNK_HALO
        labels = torch.full((1,), label, dtype=torch.long, device=self.device)
        for start in range(0, n, depth):
            stop = min(start + depth, n)
            lo, hi = max(start - halo, 0), min(stop + halo, n)
            size = [*hr_shape]
            size[axis] = hi - lo
            cond = upsample(lr.narrow(axis, lo, hi - lo)[None, None], size)
            x = pad_to_multiple(cond, net.multiple)
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                y = net(x.to(self.device), labels, geometry.to(self.device)).float().cpu()[0, 0]
            y = y[tuple(slice(0, m) for m in size)].narrow(axis, start - lo, stop - start)
            out.narrow(axis, start, stop - start).copy_(y)
            tick()
        return out

    def _sample_volume(
        self, lr: torch.Tensor, hr_shape, op, label: int, seed: int, tick, encoded, estimate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One sample on the HR grid (normalised intensities, before data consistency); with an ``estimate``,
        the estimate plus the detail the diffusion model adds to it."""
        if self.dims == 3:
            return self._sample_patches(upsample(lr[None, None], hr_shape)[0, 0], label, seed, tick, encoded)
        r = self.model.spec.data.slab // 2
        axes = self._plane_axes(hr_shape, op, self.planes if estimate is None else self.refine_planes)
        total = torch.zeros(hr_shape)  # the passes over each stack of planes are summed in place, then averaged
        on_estimate = self.model.spec.diffusion.condition == "estimate"  # refinement models see the estimate
        for n, axis in enumerate(axes):
            latents = None if on_estimate else self._plane_latents(lr, hr_shape, encoded, axis)
            offsets = torch.arange(-r, r + 1)
            planes = total.movedim(axis, 0)  # (n, H, W) view
            per_call = self._planes_per_call(planes.shape[1:])
            for start in range(0, planes.shape[0], per_call):
                # each target plane with its slab of neighbours, clamped at the ends as in training
                index = torch.arange(start, min(start + per_call, planes.shape[0]))
                init = None
                if estimate is not None:
                    init = self._encode(estimate.movedim(axis, 0)[start : start + len(index)][:, None])
                if latents is None:  # on_estimate: the estimate's latents (refinement models always get one)
                    c = cast(torch.Tensor, init)
                else:  # (B, slab * latent, h, w); slab 1: the planes' own latents
                    near = (index[:, None] + offsets).clamp(0, planes.shape[0] - 1)  # (B, slab)
                    c = latents[near.to(latents.device)].flatten(1, 2)
                seeds = [_mix_seed(seed * 4 + n, p) for p in index.tolist()]  # per plane, per stack
                planes[start : start + len(index)] += self._generate(c, planes.shape[1:], label, seeds, init)[:, 0]
                tick()
        total = total.div_(len(axes)) if len(axes) > 1 else total
        return total.add_(estimate) if estimate is not None else total

    def _sample_patches(self, cond: torch.Tensor, label: int, seed: int, tick, encoded) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        roi = tuple(max(self.multiple, n) for n in self.model.spec.data.patch_size)
        seen = 0  # windows come in the same order in every sample: the first window's index keys the batch

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            nonlocal seen
            first, seen = seen, seen + patch.shape[0]
            if first not in encoded:
                encoded[first] = self._encode(patch)
            seeds = [_mix_seed(seed, w) for w in range(first, first + patch.shape[0])]  # per window
            return self._generate(encoded[first], patch.shape[2:], label, seeds).to(patch.device)

        out = sliding_window_inference(
            cond[None, None],
            roi_size=roi,
            sw_batch_size=self.batch_size,
            predictor=predictor,
            overlap=0.25,
            mode="gaussian",
            sw_device="cpu",
            device="cpu",
            progress=False,
        )
        tick()
        return cast(torch.Tensor, out)[0, 0]  # a Tensor predictor gives a Tensor (monai types a union)


def planes_per_call(plane_shape, device: torch.device, *, multiple: int = 1, batch_size: int | None = None) -> int:
    """Planes per network call: as many as the device's pixel budget holds (``Upscaler.BATCH_PIXELS``, sizes padded
    to ``multiple``), at most ``batch_size``."""
    pixels = int(np.prod([n + (-n) % multiple for n in plane_shape]))
    cap = Upscaler.BATCH_PIXELS.get(device.type, Upscaler.BATCH_PIXELS["cuda"])
    return max(1, min(batch_size or cap, cap // pixels))


def interpolated(lr: torch.Tensor, hr_shape) -> Callable[[int, int, int], torch.Tensor]:
    """The source of a first pass (:func:`estimate_planes`): the LR planes ``lo:hi`` across ``axis`` interpolated
    onto the HR grid, one block at a time (the HR-grid input volume is never held whole)."""

    def block(axis: int, lo: int, hi: int) -> torch.Tensor:
        size = [*hr_shape]
        size[axis] = hi - lo
        return upsample(lr.narrow(axis, lo, hi - lo)[None, None], size)[0, 0]

    return block


def planes_of(volume: torch.Tensor) -> Callable[[int, int, int], torch.Tensor]:
    """The source of a later pass (:func:`estimate_planes`): planes ``lo:hi`` across ``axis`` of an earlier pass's
    estimate on the HR grid."""
    return lambda axis, lo, hi: volume.narrow(axis, lo, hi - lo)


def estimate_planes(
    nets, source, hr_shape, axes, label: int, geometry, *, per_call, device, bf16: bool = False, tick=lambda: None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 2D estimator's estimate on the HR grid (normalised intensities, before data consistency), averaged over
    the stacks of planes across ``axes``, and with an error model (``nets``: the estimator and the error model or
    None) its predicted Laplace scale, averaged the same way (else None). ``source(axis, lo, hi)`` gives the input
    on the HR grid for planes ``lo:hi`` across ``axis`` (:func:`interpolated`, or a first pass's estimate);
    ``per_call(plane_shape)`` the planes per network call."""
    net, errors = nets
    r = net.slab // 2
    sums = [torch.zeros(hr_shape) for _ in range(1 + (errors is not None))]  # the estimate (and error scale)
    for axis in axes:
        planes = sums[0].movedim(axis, 0)  # (n, H, W) view
        n, step = planes.shape[0], per_call(planes.shape[1:])
        for start in range(0, n, step):
            stop = min(start + step, n)
            lo, hi = max(start - r, 0), min(stop + r, n)
            cond = source(axis, lo, hi).movedim(axis, 0)
            # each target plane with its slab of neighbours, clamped at the ends as in training
            near = (torch.arange(start, stop)[:, None] + torch.arange(-r, r + 1)).clamp(0, n - 1) - lo
            x = pad_to_multiple(cond[near], net.multiple)  # (B, slab, H, W)
            labels = torch.full((x.shape[0],), label, dtype=torch.long, device=device)
            inputs = (x.to(device), labels, geometry.expand(len(x), 2).to(device))
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                outs = [net(*inputs)] + ([errors(*inputs).float().exp()] if errors is not None else [])
            crop = (slice(None), 0, slice(planes.shape[1]), slice(planes.shape[2]))
            for volume, out in zip(sums, outs, strict=True):
                volume.movedim(axis, 0)[start:stop] += out.float().cpu()[crop]
            tick()
    for volume in sums:
        volume.div_(len(axes))
    return sums[0], (sums[1] if errors is not None else None)


def _uncertainty(stats: RunningStats | None, error_scale: torch.Tensor | None) -> torch.Tensor:
    """The per-voxel standard deviation of the output (normalised units, float32): the spread of the samples, and
    with an error model the predicted error of the estimate (a Laplace scale b has variance 2 b^2), the two
    variances added (the law of total variance: the estimate's error and the samples' spread about it)."""
    variance = torch.zeros(()) if stats is None else stats.std.float() ** 2
    if error_scale is not None:
        variance = variance + 2 * error_scale.float() ** 2
    return variance.sqrt()


def _mix_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` (a sample, plane or window) of a run seeded ``seed``: distinct for every pair
    while indices stay below the prime stride."""
    return seed * 1_000_003 + index


def _clip(values: np.ndarray, limits: tuple[float, float] | None) -> np.ndarray:
    return values if limits is None else np.clip(values, *limits, out=values)


def _exact_factor(volume: Volume, a: int, kind: str, *, spacing, scale, trained, anisotropic: bool) -> float:
    """The factor along voxel axis ``a`` (Upscaler.plan): from the output ``spacing``, the ``scale``, the spacing
    ratio of an anisotropic scan, or the model's largest; for thick slices rounded to a whole number of output
    voxels over the same field of view."""
    voxel_spacing = np.asarray(volume.spacing, dtype=np.float64)
    along = voxel_spacing[a]
    if spacing is not None:
        in_plane = voxel_spacing if kind != "slice-profile" else [along]
        factor = float(np.mean(in_plane)) / spacing if kind != "slice-profile" else along / spacing
    elif scale is not None:
        factor = float(scale)
    elif kind == "slice-profile" and anisotropic:
        factor = along / float(np.delete(voxel_spacing, a).min())  # to the finest in-plane spacing
    else:
        factor = float(max(t.scale for t in trained))
    if kind == "slice-profile":
        n = volume.shape[a]
        exact = round(n * factor) / n  # the output grid's factor: a whole number of voxels, same field of view
    else:
        exact = factor
        if abs(factor - round(factor)) > 1e-6:
            raise MedldmError(f"{kind} takes integer factors, not x{factor:.4g}", volume.path)
    if exact < 1.05:
        raise MedldmError(
            f"nothing to upscale: factor x{exact:.3g} along voxel axis {a} ({along:.3g} mm spacing)", volume.path
        )
    return exact


def _thickness_ratio(volume: Volume, a: int, kind: str, thickness: float | None) -> float:
    """Thick slices: the slice thickness (given, else the DICOM SliceThickness, else the spacing) over the
    spacing along voxel axis ``a``; 1 for other kinds, which take no thickness."""
    if kind != "slice-profile":
        if thickness is not None:
            raise MedldmError(f"a slice thickness applies to thick slices, not to {kind}", volume.path)
        return 1.0
    along = float(volume.spacing[a])
    recorded = volume.meta.get("slice_thickness") if volume.meta.get("slice_axis") == a else None
    mm = thickness if thickness is not None else recorded
    ratio = float(mm) / along if mm else 1.0
    if mm and not 0.05 <= ratio <= 8:  # without mm, ratio is 1.0
        raise MedldmError(
            f"slice thickness {float(mm):.3g} mm against a spacing of {along:.3g} mm is not plausible", volume.path
        )
    return ratio


def _counter(total: int, progress: Progress | None) -> Callable[[], None]:
    """A tick() that counts units of work done and reports (done, total) to ``progress``."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    return tick
