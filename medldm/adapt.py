"""Self-supervised adaptation to one scan (``medldm upscale --adapt``).

A thick-slice scan is sharp within its slices. Degrading one in-plane axis of those slices with the thick axis's
own slice profile, factor and thickness gives training pairs from the scan itself, whatever its contrast or
modality (SMORE, Zhao et al. 2021; ECLARE, Remedios et al. 2023). The model's estimator (its regression stage)
is fine-tuned for a bounded time on the scan's planes degraded as in the model's own training (PAIRS; on the
tuning scans about as good as the thick axis's degradation alone), then each later pass (second, third) on the
scan's own pairs run through the adapted passes before it, and the model upscales the scan through the thick axis
as usual. At a factor the model was not trained at, the pairs are made on the grid of its nearest trained factor,
where the upscale then runs the adapted passes (GRID; medldm.pipeline.ESTIMATE_GRID). The autoencoder and denoiser
stay as they are. (Adapting the first pass alone cost MR scans close to the training data up to 0.45 dB; adapting the
later passes too turned that into gains: docs/model_card.md, "Per-scan adaptation".)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from medldm.data import LaterPassSampler, PairSampler, PassEstimate, TrainingVolume
from medldm.degrade import enforce_consistency, make_operator
from medldm.errors import MedldmError
from medldm.intensity import guess_modality, normaliser
from medldm.nets import MODALITIES, geometry_features, native_bf16
from medldm.resample import resample_axis
from medldm.spec import Task
from medldm.stages import PASSES, unseen_error

if TYPE_CHECKING:
    from medldm.model import LoadedModel

__all__ = ["Adaptation", "adapt", "in_bf16", "recipe", "DEFAULT_STEPS", "DEFAULT_MINUTES"]

DEFAULT_STEPS = 400  # per pass; tuned on scans outside every validation set (docs/model_card.md: 200 until 2026-12-06)
DEFAULT_MINUTES = 4.0  # the cap on slow machines: with the inference after it, about 5 minutes on 2 CPU cores
# 32 patches per step (16 until 2026-12-07): +0.05 dB on the nine adapt tuning cases' mean at about 1.6x the time
# (docs/model_card.md, "Twice the batch")
BATCH = 32
PATCH = 64
# constant: 2e-4 won on the tuning cases but lost on the report cases (CT -0.38, cardiac -0.48 dB), and a cosine
# decay lost 0.3 dB on the phantom CT (docs/model_card.md, "Per-scan adaptation", end)
LR = 1e-4
FOREGROUND = 0.05
NEIGHBOURS = "real"  # or "centre": the slab neighbours replaced by the centre plane (tuning: real was better)
PARAMETERS = "all"  # or "bias": only biases and normalisation scales change (a low-capacity adaptation)
# the later passes after an adapted first pass: "adapt" them too (each fine-tuned on the scan's own pairs after
# the adapted passes before it), or "keep" them unadapted (tuning: adapt was better on every MR scan)
LATER = "adapt"
# the adapted model's default refinement level: the denoiser is not adapted, and on the adapt tuning scans its
# detail cost an adapted estimate up to 0.57 dB (the estimate alone, 0, won by the rule written first; a refine
# the caller gives still applies)
REFINE = 0.0
# at a factor the model never learnt (as medldm.pipeline.ESTIMATE_GRID): "trained", the pairs are made on the grid
# of its nearest trained factor (each thickened in-plane axis resampled to the thick spacing / that factor), where
# the adapted passes then run; "output", at the scan's own factor on the scan's own voxels
GRID = "trained"
# the fine-tuning steps under bf16 autocast where the device runs it natively (float32 master weights; 1.8x faster
# per step on the 2-core CPU): "auto", or "no" for float32 everywhere
PRECISION = "auto"
# the fine-tuning's L1 on the "unseen" part of the error, the part the data-consistency projection keeps
# (medldm.stages.unseen_error: the error of what the upscale returns), on "all" of it (until 2026-12-07), or on the
# unseen part in the first pass only ("unseen-first"); tuning: unseen +0.07 dB on the nine cases' mean, the two CT
# phantoms over three seeds each (docs/model_card.md, "Per-scan adaptation")
LOSS = "unseen"
# which degradations the first pass's pairs apply to the scan's own planes: "own", the thick axis's slice profile,
# factor and thickness only; "trained", the model's training tasks (thick slices x2/x4, k-space x2/x4, thickness
# 1); "mixed", half of each. Tuning: trained +0.17 dB over own on the rule's two scans (mixed +0.07), a tie over
# four (own better on a T2 and a CT: docs/model_card.md, "The first pass's pairs"), and a tie on the HU phantom
# CT over three seeds (own for CT only: not adopted). The later passes always learn the scan's own degradation.
PAIRS = "trained"
_PAIRS_WORDS = {
    "own": ", the first pass's pairs thickened as the thick axis is",
    "trained": ", the first pass's pairs degraded as in the model's training",
    "mixed": ", the first pass's pairs half thickened as the thick axis is, half degraded as in the model's training",
}
_LOSS_WORDS = {"all": "", "unseen": ", L1 on the unseen error", "unseen-first": ", L1 on the first pass's unseen error"}


@dataclass
class Adaptation:
    model: LoadedModel  # the adapted model (its estimator and later passes fine-tuned; the rest shared; its
    # sampling defaults to the estimate alone, REFINE)
    steps: int
    seconds: float
    losses: list[float]  # L1 per step, on the scan's own pairs
    factor: float  # the in-plane factor the pairs were made with
    thickness: float  # slice thickness / spacing of the pairs
    later_losses: list[list[float]] = field(default_factory=list)  # per adapted later pass, L1 per step
    steps_asked: int | None = None  # the step bound per pass (None: the time bound alone)
    minutes: float | None = None  # the time bound of all the passes together

    @property
    def cut_short(self) -> bool:
        """Whether the time bound stopped a pass before its step bound (a slow machine or a large scan)."""
        runs = [self.losses, *self.later_losses]
        return self.steps_asked is not None and any(len(r) < self.steps_asked for r in runs)


def adapt(
    model,
    volume,
    plan,
    *,
    steps: int | None = DEFAULT_STEPS,
    minutes: float | None = DEFAULT_MINUTES,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Adaptation:
    """Fine-tune ``model``'s estimator, then its later passes, on pairs made from ``volume``'s own slices (see the
    module docstring) and return the adapted model. Each network stops after ``steps`` steps or its share of
    ``minutes`` minutes, whichever comes first (at least one of them must be set). ``plan`` is the
    medldm.pipeline.Plan of the upscale to come (thick slices)."""
    factor, thick_axes = _geometry(model, volume, plan, steps, minutes)
    unknown = not model.scope.knows_factor(plan.task.kind, plan.scale)
    grid = "trained" if GRID == "trained" and unknown else "output"
    pairs, label, size, views = _own_pairs(model, volume, plan, factor, thick_axes, seed, grid)
    later = model.later_pass_names("slice-profile") if LATER == "adapt" else []
    rounds = 1 + len(later)  # the time bound is shared by the passes that are fine-tuned
    share = None if minutes is None else minutes / rounds
    net = copy.deepcopy(model.estimator).train().requires_grad_(True)
    if PARAMETERS == "bias":
        for name, p in net.named_parameters():
            p.requires_grad_(name.endswith("bias") or ".norm" in name or p.ndim == 1)
    started = time.perf_counter()
    tick = _round_progress(progress, 0, rounds)
    unseen_first, unseen_later = LOSS in ("unseen", "unseen-first"), LOSS == "unseen"
    fine_tune = partial(_fine_tune, steps=steps, minutes=share, seed=seed)  # each pass under the same bounds
    losses = fine_tune(net, pairs, label, size, progress=tick, unseen=unseen_first)
    _check(losses, volume)
    adapted = replace(model, estimator=net.eval().requires_grad_(False))
    later_losses = []
    for k, name in enumerate(later, 1):
        sampler = _later_pairs(adapted, views, plan, int(label), name)
        net = copy.deepcopy(getattr(model, name)).train().requires_grad_(True)
        tick = _round_progress(progress, k, rounds)
        later_losses.append(fine_tune(net, sampler, label, size, progress=tick, unseen=unseen_later))
        _check(later_losses[-1], volume)
        adapted = replace(adapted, **{name: net.eval().requires_grad_(False)})
    seconds = time.perf_counter() - started
    # adapted_to tells the upscaler which grid the adapted passes learnt (and so run on: docs/grids.md)
    own = {"factor": round(factor, 6), "thickness": plan.thickness, "grid": grid, "loss_on": LOSS, "pairs": PAIRS}
    sampling = {**model.defaults(), "refine": REFINE}
    adapted = replace(adapted, info={**model.info, "sampling": sampling, "adapted_to": own})
    return Adaptation(adapted, len(losses), seconds, losses, factor, plan.thickness, later_losses, steps, minutes)


def in_bf16(device: torch.device) -> bool:
    """Whether the fine-tuning steps run under bf16 autocast on ``device`` (PRECISION)."""
    return PRECISION == "auto" and native_bf16(device)


def recipe(device: torch.device) -> str:
    """The fine-tuning's batch, loss, pairs and precision on ``device`` in words, for a report's protocol line
    (", ...")."""
    precision = "the steps under bf16 autocast" if in_bf16(device) else "in float32"
    return f", {BATCH} patches of {PATCH}^2 a step{_LOSS_WORDS[LOSS]}{_PAIRS_WORDS[PAIRS]}, {precision}"


def _check(losses: list[float], volume) -> None:
    if not losses or not all(math.isfinite(v) for v in losses):
        raise MedldmError("adaptation diverged (a non-finite loss); upscale without --adapt", volume.path)


def _round_progress(progress, k: int, rounds: int):
    """``progress`` for the k-th of ``rounds`` fine-tuning rounds, as one bar over all of them."""
    if progress is None:
        return None
    return lambda done, total: progress(k * total + done, rounds * total)


def _later_pairs(adapted, views: list[_View], plan, label: int, name: str):
    """Training batches for the later pass ``name`` from the scan itself: each view's in-plane axis thickened as
    in :func:`_own_pairs`, run through ``adapted``'s passes before ``name`` on the planes across the thick axis (as
    the adapted first pass learnt them) and projected; slabs of that estimate across the thick axis are the input,
    the view's own planes the truth."""
    from medldm.pipeline import estimate_planes, interpolated, planes_of, planes_per_call

    a, task = plan.axis, adapted.config.data.tasks.index(plan.task)
    in_plane = [d for d in range(3) if d != a]
    before = [getattr(adapted, n) for n in PASSES[: PASSES.index(name)]]
    items = []
    for view, k in ((v, k) for v in views for k in v.thick_axes):
        b, factor, scan = in_plane[k], view.factor, view.volume
        hr = torch.from_numpy(scan.data)
        n = hr.shape[b]
        scale: float
        if abs(factor - round(factor)) < 1e-6:  # an integer factor: whole LR slices, as training pairs have
            whole = round(factor)
            hr, scale = hr.narrow(b, 0, n - n % whole), whole
        else:
            scale = n / max(1, round(n / factor))
        op = make_operator("slice-profile", axis=b, scale=scale, profile=plan.task.profile, thickness=plan.thickness)
        lr = op.forward(hr)
        source, geometry = interpolated(lr, hr.shape), geometry_features(scale, plan.thickness)
        for net in before:
            device = next(net.parameters()).device
            per_call = partial(planes_per_call, device=device, multiple=net.multiple)
            estimate, _ = estimate_planes(
                (net, None), source, hr.shape, [a], label, geometry, per_call=per_call, device=device
            )
            estimate = enforce_consistency(estimate, lr, op)
            source = planes_of(estimate)
        truth = hr.numpy()
        estimate16 = estimate.numpy().astype(np.float16)
        items.append(PassEstimate(estimate16, truth, task, b, scan, scale=scale, thickness=plan.thickness))
    return LaterPassSampler(items, adapted.config, slab=before[0].slab, across=(a,))


def _geometry(model, volume, plan, steps, minutes) -> tuple[float, tuple[int, ...]]:
    """The factor from the finest in-plane spacing to it, and the in-plane axes the pairs thicken;
    refuses what cannot be adapted."""
    if model.estimator is None:
        raise MedldmError("--adapt fine-tunes the model's estimator stage, and this model has none", model.path)
    if model.estimator.spatial_dims != 2:
        raise MedldmError("--adapt fine-tunes 2D (slab) estimators; this model's estimator is 3D", model.path)
    if plan.task.kind != "slice-profile":
        raise MedldmError(
            "--adapt learns from the scan's own slices, so it needs thick slices (not in-plane kinds)", volume.path
        )
    if steps is None and minutes is None:
        raise MedldmError("--adapt needs a bound: --adapt-steps or --adapt-minutes")
    a = plan.axis
    in_plane = np.delete(np.asarray(volume.spacing, dtype=np.float64), a)
    # the pairs thicken the finest in-plane axis (and the other too when its spacing is within 20 %) to the thick
    # axis's slices, in units of its voxels
    thick_axes = tuple(int(k) for k in np.nonzero(in_plane <= in_plane.min() * 1.2)[0])
    factor = volume.spacing[a] / float(in_plane.min())
    if factor < 1.05:
        raise MedldmError(
            f"--adapt needs slices thicker than their in-plane voxels (here {volume.spacing[a]:.3g} "
            f"mm vs {in_plane.min():.3g} mm)",
            volume.path,
        )
    smallest = PATCH // 2 + 2 * math.ceil(factor)
    if min(volume.shape[d] for d in range(3) if d != a) < smallest:
        raise MedldmError(f"--adapt needs slices of at least {smallest} x {smallest} voxels", volume.path)
    return factor, thick_axes


@dataclass
class _View:
    """The scan (normalised) as the pairs see it, the in-plane axes (0, 1: of the planes across the thick axis)
    that are thickened, and the factor they are thickened by."""

    volume: TrainingVolume
    thick_axes: tuple[int, ...]
    factor: float


@dataclass
class _InTurn:
    """Batches from each of several samplers in turn (one per view)."""

    samplers: list[PairSampler]

    @property
    def tasks(self):  # the views' tasks differ only in their factor range; each batch carries its factor
        return self.samplers[0].tasks

    def batch(self, step: int, batch_size: int, patch_size=None, *, stream: int = 0) -> dict[str, torch.Tensor]:
        n = len(self.samplers)
        return self.samplers[step % n].batch(step // n, batch_size, patch_size, stream=stream)


def _own_pairs(model, volume, plan, factor: float, thick_axes, seed: int, grid: str):
    """Batches of the scan's own planes across its thick axis, degraded along an in-plane axis by ``factor`` (on
    the ``grid`` "trained": that axis first resampled to the thick spacing / the nearest trained factor, and
    degraded by that factor); the networks' label; the patch size; the views the batches come from."""
    a, config = plan.axis, model.config
    data = normaliser(config.data.intensity, volume.data).forward(volume.data.astype(np.float32))
    modality = MODALITIES.index(guess_modality(volume.data, volume.meta.get("modality")))
    in_plane = [d for d in range(3) if d != a]
    if grid == "trained":
        f = float(plan.task.scale)
        views = []
        for k in thick_axes:
            b = in_plane[k]
            resampled = resample_axis(torch.from_numpy(data), b, round(data.shape[b] * f / factor)).numpy()
            views.append(_View(_scan(resampled, modality, volume, seed), (k,), f))
    else:
        views = [_View(_scan(data, modality, volume, seed), tuple(thick_axes), factor)]
    samplers, trained = [], list(config.data.tasks)
    for view in views:
        task = Task(
            kind="slice-profile",
            scale=plan.task.scale,
            profile=plan.task.profile,
            scale_range=(view.factor, view.factor),
            thickness_range=(plan.thickness, plan.thickness),
            range_share=1.0,
        )
        slab = model.estimator.slab
        tasks = {"own": [task], "trained": trained, "mixed": [task] * len(trained) + trained}[PAIRS]
        samplers.append(
            PairSampler([view.volume], config, slab=slab, tasks=tasks, plane_axes=(a,), thick_axes=view.thick_axes)
        )
    size = min(PATCH, *(v.volume.data.shape[d] for v in views for d in in_plane))
    size -= size % model.estimator.multiple
    label = model.codec.task_label(torch.tensor(config.data.tasks.index(plan.task)), torch.tensor(modality))
    return (samplers[0] if len(samplers) == 1 else _InTurn(samplers)), label, size, views


def _scan(data: np.ndarray, modality: int, volume, seed: int) -> TrainingVolume:
    """``data`` (normalised) as a training volume, with up to 20000 foreground voxels to centre patches on."""
    fg = np.argwhere(data > FOREGROUND)
    if len(fg) > 20000:
        fg = fg[np.random.default_rng(seed).choice(len(fg), 20000, replace=False)]
    return TrainingVolume(str(volume.path or "scan"), data, modality, fg.astype(np.int32))


def _fine_tune(net, pairs, label, size: int, *, steps, minutes, seed: int, progress, unseen=False) -> list[float]:
    """L1 steps on the pairs (on the error's unseen part with ``unseen``) until ``steps`` steps or ``minutes``
    minutes; the losses, one per step."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR)
    device = next(net.parameters()).device
    fast = in_bf16(device)
    losses: list[float] = []
    started = time.perf_counter()
    step = 0
    while (steps is None or step < steps) and (minutes is None or time.perf_counter() - started < 60 * minutes):
        batch = pairs.batch(step, BATCH, (size, size), stream=seed)
        labels = label.expand(BATCH)
        lr = batch["lr"]
        if NEIGHBOURS == "centre":  # the thick axis's neighbours are too far apart to stand in for fine ones
            lr = lr[:, net.slab // 2 : net.slab // 2 + 1].expand_as(lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            out = net(lr, labels, batch["geometry"])
        error = out.float() - batch["hr"]
        if unseen:
            error = unseen_error(error, batch, pairs.tasks)
        loss = error.abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if progress is not None:
            # the time bound: progress in seconds; the step bound: in steps
            if steps is None:
                limit = int(60 * cast(float, minutes))  # no step bound: the time bound is set (checked before)
                progress(min(int(time.perf_counter() - started), limit), limit)
            else:
                progress(step, steps)
    return losses
