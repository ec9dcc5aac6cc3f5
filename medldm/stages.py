"""The training stages as small objects: each builds its networks and optimisers, names what its checkpoints hold,
and runs one step. medldm.train.Trainer restores, loops, logs, shows progress and saves, the same for every stage.

Every batch and every noise draw is a function of (seed, step, rank) (medldm.train), so a stage's ``step`` must
draw its randomness from its batch, from ``step_generator(seed, step, rank, ...)`` or from the global RNG that the
loop reseeds before each step.
"""

from __future__ import annotations

import functools
import json
import math
from abc import ABC, abstractmethod
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medldm.checkpoint import load_partial_weights, load_weights
from medldm.config import Estimator as EstimatorSection
from medldm.config import Stage as Schedule
from medldm.degrade import make_operator
from medldm.errors import MedldmError
from medldm.nets import (
    ConditionCodec,
    build_autoencoder,
    build_denoiser,
    build_discriminator,
    build_error_model,
    build_estimator,
    build_schedule,
)
from medldm.spec import LATER_PASSES

__all__ = [
    "AutoencoderStage",
    "DiffusionStage",
    "EstimatorStage",
    "PASSES",
    "SecondPassStage",
    "ThirdPassStage",
    "TrainingStage",
    "UncertaintyStage",
    "encode_planes",
    "latent_scale",
    "step_generator",
    "unseen_error",
]


PASSES = ("estimator", *LATER_PASSES)  # the estimator's passes, in the order they run
SCALE_BATCHES = 4  # batches used to measure the latent standard deviation


def step_generator(seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, rank, stream): independent of every other draw."""
    value = int(np.random.default_rng([seed, step, rank, stream]).integers(2**62))
    return torch.Generator().manual_seed(value)


def unseen_error(error: torch.Tensor, batch: dict, tasks) -> torch.Tensor:
    """Each sample's error (B, 1, *spatial) without what the data-consistency projection removes (its forward
    model's row space), i.e. the error that inference returns. The forward model acts on the patch alone, so
    a degraded axis needs a whole number of LR samples; where it does not, the error is kept as it is."""
    dims = error.dim() - 2
    parts = []
    for i, err in enumerate(error):
        task, axis = tasks[int(batch["task"][i])], int(batch["axis"][i])
        op = _patch_operator(
            task.kind,
            axis=None if axis < 0 else axis,
            scale=float(batch["scale"][i]),
            spatial_dims=dims,
            profile=task.profile,
            thickness=float(batch["thickness"][i]),
        )
        try:
            op.output_shape(err.shape)
        except MedldmError:  # a non-integer factor that does not divide the patch
            parts.append(err)
            continue
        parts.append(op.unseen(err))
    return torch.stack(parts)


@functools.lru_cache(maxsize=256)
def _patch_operator(kind: str, **options):
    """make_operator, kept per arguments: a kept operator forms its row projectors once per patch length
    (LinearOperator.unseen), where unseen_error asks for one per patch of every step."""
    return make_operator(kind, **options)


def encode_planes(autoencoder, x: torch.Tensor) -> torch.Tensor:
    """Encode each channel of (B, C, *spatial) as its own one-channel image: (B, C * latent, *latent_spatial),
    channel c's latent at channels [c * latent, (c + 1) * latent). The LR condition of a 2D slab has one channel
    per plane; the autoencoder only knows single images."""
    b, c = x.shape[:2]
    z = autoencoder.encode(x.reshape(b * c, 1, *x.shape[2:]))
    return z.reshape(b, c * z.shape[1], *z.shape[2:])


@torch.no_grad()
def latent_scale(autoencoder, pairs, batch_size: int, device) -> float:
    """1 / std of the latents of a few fixed training batches (Rombach et al. 2022, Sec. G)."""
    z = [autoencoder.encode(pairs.batch(i, batch_size, stream=1)["hr"].to(device)) for i in range(SCALE_BATCHES)]
    return float(1.0 / torch.cat([v.flatten() for v in z]).float().std())


class TrainingStage(ABC):
    """One stage: ``build`` (networks, EMA, optimisers: the same initial weights on every rank and run), then
    ``resumed`` with the restored checkpoint's state, ``prepare`` (data, accelerate) when steps remain, and
    ``step`` per batch. ``modules``/``optimizers`` are what a checkpoint holds; ``state`` adds to its state.json."""

    name: str
    model: torch.nn.Module  # set by build (after prepare, as accelerate wraps it)
    ema: AveragedModel
    opt: Any

    def __init__(self, trainer):
        self.trainer, self.config, self.acc = trainer, trainer.config, trainer.acc
        self.schedule = cast(Schedule, getattr(self.config.training, self.name))

    @abstractmethod
    def build(self) -> None:
        """Build the networks, their EMA and optimisers (before any checkpoint is restored into them)."""

    def resumed(self, state: dict) -> None:  # noqa: B027 - a hook: only the diffusion stage reads the state
        """After the checkpoint (if any) was restored; ``state`` is its state.json."""

    @abstractmethod
    def prepare(self) -> None:
        """Ready the data and hand the networks to accelerate, when steps remain."""

    @abstractmethod
    def step(self, step: int) -> dict:
        """Train on batch ``step``; returns the values to log (``loss`` among them)."""

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.acc.unwrap_model(self.model), "ema": self.ema}

    def optimizers(self) -> dict[str, Any]:
        return {"model": self.opt}

    def state(self) -> dict:
        return {}

    def _ema_and_optimiser(self) -> None:
        st = self.schedule
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(st.ema_decay or 0.0), use_buffers=True)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=st.lr, weight_decay=st.weight_decay)

    def _optimise(self, loss: torch.Tensor) -> None:
        """Backward, clip and the optimiser's step."""
        self.opt.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        if self.schedule.grad_clip:
            self.acc.clip_grad_norm_(self.model.parameters(), self.schedule.grad_clip)
        self.opt.step()

    def _update(self, loss: torch.Tensor) -> None:
        """:meth:`_optimise`, then the EMA update."""
        self._optimise(loss)
        self.ema.update_parameters(self.acc.unwrap_model(self.model))


class AutoencoderStage(TrainingStage):
    """The perceptual autoencoder: L1 + regulariser (KL or VQ) + LPIPS, and a patch adversarial loss when on."""

    name = "autoencoder"

    def build(self) -> None:
        torch.manual_seed(self.config.training.seed)  # same initial weights on every rank and every run
        self.model, self.disc = build_autoencoder(self.config), build_discriminator(self.config)
        self._ema_and_optimiser()
        st = self.schedule
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=st.lr, weight_decay=st.weight_decay, betas=(0.5, 0.9))

    def modules(self) -> dict[str, torch.nn.Module]:
        return {**super().modules(), "discriminator": self.acc.unwrap_model(self.disc)}

    def optimizers(self) -> dict[str, Any]:
        return {"model": self.opt, "discriminator": self.opt_d}

    def prepare(self) -> None:
        from monai.losses import PatchAdversarialLoss

        ae_cfg, t = self.config.autoencoder, self.trainer
        self.perceptual = None
        if ae_cfg.perceptual_weight > 0:
            from medldm.perceptual import PerceptualLoss

            self.perceptual = PerceptualLoss(weights=t.lpips_weights).to(self.acc.device)
        self.pairs = t.pair_sampler()
        self.model, self.disc, self.opt, self.opt_d = self.acc.prepare(self.model, self.disc, self.opt, self.opt_d)
        self.forward = t._training_forward(self.model)
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self.reg_weight = ae_cfg.kl_weight if ae_cfg.kind == "kl" else 1.0

    def step(self, step: int) -> dict:
        ae_cfg, st = self.config.autoencoder, self.schedule
        size = self.pairs.patch_size(step, st.progressive)
        x = self.trainer._in_model_layout(self.pairs.batch(step, st.batch_size, size)["hr"].to(self.acc.device))
        use_adv = ae_cfg.adversarial_start is not None and step >= ae_cfg.adversarial_start
        with self.acc.autocast():
            recon, reg = self.forward(x)
            recon = recon.float()
            l1 = (recon - x).abs().mean()
            loss = l1 + self.reg_weight * reg
            logs = {"l1": l1.item(), "reg": reg.item()}
            if self.perceptual is not None:
                p = self.perceptual(recon.clamp(0, 1), x.clamp(0, 1))
                loss = loss + ae_cfg.perceptual_weight * p
                logs["lpips"] = p.item()
            if use_adv:
                g_adv = self.adversarial(self.disc(recon)[-1], target_is_real=True, for_discriminator=False)
                loss = loss + ae_cfg.adversarial_weight * g_adv
                logs["g_adv"] = g_adv.item()
        self._optimise(loss)
        if use_adv:  # the discriminator's step before the EMA update, as the autoencoder's order has always been
            logs["d_adv"] = self._discriminator_step(recon, x)
        self.ema.update_parameters(self.acc.unwrap_model(self.model))
        return {"loss": loss.item(), **logs}

    def _discriminator_step(self, recon: torch.Tensor, x: torch.Tensor) -> float:
        with self.acc.autocast():
            d_loss = 0.5 * (
                self.adversarial(self.disc(recon.detach())[-1], target_is_real=False, for_discriminator=True)
                + self.adversarial(self.disc(x)[-1], target_is_real=True, for_discriminator=True)
            )
        self.opt_d.zero_grad(set_to_none=True)
        self.acc.backward(d_loss)
        self.opt_d.step()
        return d_loss.item()


class EstimatorStage(TrainingStage):
    """The pixel-space regression network (posterior mean, L1), independent of the autoencoder."""

    name = "estimator"
    stream = 3  # the training batches' random stream

    def build(self) -> None:
        torch.manual_seed(self.config.training.seed + self.stream - 1)
        self.model = build_estimator(self.config)  # refuses configs without an estimator section
        init = self.trainer.stage_dir(self.name) / "init.safetensors"  # init_from: fine-tune a folder's pass
        if init.is_file():
            load_partial_weights(self.model, init, new="geometry.")
        else:
            self._start()
        self._ema_and_optimiser()

    def _start(self) -> None:
        """The weights a new run starts from without a folder to fine-tune: the estimator's, random."""

    def prepare(self) -> None:
        self.section = cast(EstimatorSection, self.config.estimator)  # build_estimator checked it
        self.pairs = self._sampler()
        self.model, self.opt = self.acc.prepare(self.model, self.opt)
        self.forward = self.trainer._training_forward(self.model, self.section.spatial_dims)
        self.codec = ConditionCodec(self.config)

    def _sampler(self):
        """Where the training pairs come from: the degraded training volumes."""
        return self.trainer.pair_sampler(slab=self.section.slab, spatial_dims=self.section.spatial_dims)

    def learning_rate(self, step: int) -> float:
        """Cosine decay to 10 % over the whole stage: a function of the step, so resumed runs match (a Python
        float: the optimizer state is saved with it and read back with weights_only=True)."""
        st = self.schedule
        return st.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / st.steps)))

    def _inputs(self, step: int) -> tuple[dict, tuple[torch.Tensor, ...], float]:
        """Batch ``step`` (from this stage's random stream), the networks' inputs on the device (LR, label,
        geometry), and the step's learning rate, set in the optimiser."""
        st, device = self.schedule, self.acc.device
        size = self.section.patch_size or self.pairs.patch_size(step, st.progressive)
        batch = self.pairs.batch(step, st.batch_size, size, stream=self.stream)
        inputs = (
            self.trainer._in_model_layout(batch["lr"].to(device)),
            self.codec.task_label(batch["task"], batch["modality"]).to(device),
            batch["geometry"].to(device),
        )
        rate = self.learning_rate(step)
        for group in self.opt.param_groups:
            group["lr"] = rate
        return batch, inputs, rate

    def step(self, step: int) -> dict:
        batch, inputs, rate = self._inputs(step)
        with self.acc.autocast():
            out = self.forward(*inputs)
        error = out.float() - batch["hr"].to(self.acc.device)
        if self.config.training.estimator_loss == "consistent":
            error = unseen_error(error, batch, self.pairs.tasks)
        loss = error.abs().mean()
        self._update(loss)
        return {"loss": loss.item(), "lr": rate}


class UncertaintyStage(EstimatorStage):
    """The error model: on the estimator's training pairs, the finished estimator (frozen) makes its estimate, and
    the error model learns the scale b of the error that remains after the data-consistency projection, by the
    Laplace negative log-likelihood |e| / b + log b (minimised where b is the expected absolute error)."""

    name = "uncertainty"
    stream = 4  # its own batches, not the estimator's

    def build(self) -> None:
        torch.manual_seed(self.config.training.seed + 3)
        self.model = build_error_model(self.config)  # refuses configs without an uncertainty section
        self.estimator = self.trainer.trained_estimator().to(self.acc.device)
        self._ema_and_optimiser()

    def step(self, step: int) -> dict:
        batch, inputs, rate = self._inputs(step)
        with torch.no_grad(), self.acc.autocast():
            estimate = self.estimator(*inputs).float()
        error = unseen_error(estimate - batch["hr"].to(self.acc.device), batch, self.pairs.tasks).abs()
        with self.acc.autocast():
            log_scale = self.forward(*inputs).float()
        loss = (error * torch.exp(-log_scale) + log_scale).mean()
        self._update(loss)
        return {"loss": loss.item(), "lr": rate, "error": error.mean().item()}


class SecondPassStage(EstimatorStage):
    """The estimator's second pass (thick slices): a network of the estimator's design, starting from its trained
    weights (or, fine-tuned, from a model folder's second pass), learns to map the slab of the first pass's
    consistent estimate to the truth, with the estimator's loss. The earlier passes run once per training volume,
    thick-slice task and axis before the first step (medldm.data.pass_estimates, cached in the stage's folder)."""

    name = "second_pass"
    stream = 5

    def _start(self) -> None:
        """A later pass starts from the previous pass's trained weights."""
        previous = PASSES[PASSES.index(self.name) - 1]
        self.model.load_state_dict(self.trainer.trained_pass(previous).state_dict())

    def _sampler(self):
        """The earlier passes' estimates of the training volumes (thick slices)."""
        return self.trainer.later_pass_sampler(self.name)


class ThirdPassStage(SecondPassStage):
    """The third pass: the same, starting from the second pass's weights, on the two-pass consistent estimate."""

    name = "third_pass"
    stream = 6


class DiffusionStage(TrainingStage):
    """The conditional latent denoiser, on the finished autoencoder's latents (conditioned on the interpolated
    input, or for refinement models on the finished estimator's estimate)."""

    name = "diffusion"

    def build(self) -> None:
        t, cfg = self.trainer, self.config
        self.ae = t.trained_autoencoder().to(self.acc.device)
        torch.manual_seed(cfg.training.seed + 1)
        self.model = build_denoiser(cfg)
        init = t.stage_dir(self.name) / "init.json"  # written by init_from: fine-tune a model folder's denoiser
        self.init = json.loads(init.read_text()) if init.is_file() else {}
        if self.init:
            load_weights(self.model, t.stage_dir(self.name) / "init.safetensors")
        self._ema_and_optimiser()

    def resumed(self, state: dict) -> None:
        t, cfg = self.trainer, self.config
        refining = cfg.diffusion.condition == "estimate"
        if refining and cast(EstimatorSection, cfg.estimator).spatial_dims != 2:
            raise MedldmError(
                "training a refinement denoiser runs the estimator on 2D patches; this config's estimator is 3D "
                "(train the estimator stage alone, or condition the denoiser on the interpolated input)"
            )
        # refining needs an estimator section (the Config checks it)
        self.pairs = t.pair_sampler(slab=cast(EstimatorSection, cfg.estimator).slab if refining else None)
        self.estimator = t.trained_estimator().to(self.acc.device) if refining else None
        scale = state.get("latent_scale", self.init.get("latent_scale"))
        if scale is None:
            with self.acc.autocast():
                scale = latent_scale(self.ae, self.pairs, self.schedule.batch_size, self.acc.device)
        self.scale = float(scale)

    def state(self) -> dict:
        return {"latent_scale": self.scale}

    def prepare(self) -> None:
        d_cfg = self.config.diffusion
        # refinement on what upscale refines: the final consistent estimates of thick slices, on a share of steps
        # (made here, when steps remain: a finished stage, e.g. one taken from a model folder, needs none)
        share = d_cfg.final_estimate_share
        self.finals: Any = self.trainer.later_pass_sampler(self.name, slab=1) if share > 0 else None
        # the timesteps trained: all, or those a refinement from ``refine`` of the schedule meets
        # (medldm.diffusion.timesteps_for starts it at round(refine * (T - 1)))
        refine = d_cfg.refine
        self.t_stop = d_cfg.timesteps if refine is None else math.floor(refine * (d_cfg.timesteps - 1) + 0.5) + 1
        self.model, self.opt = self.acc.prepare(self.model, self.opt)
        self.forward = self.trainer._training_forward(self.model)
        self.noise_schedule = build_schedule(self.config)
        self.codec = ConditionCodec(self.config)

    def step(self, step: int) -> dict:
        st, device, codec, t_layout = self.schedule, self.acc.device, self.codec, self.trainer._in_model_layout
        final = self._on_final_estimate(step)
        sampler = self.finals if final else self.pairs
        batch = sampler.batch(step, st.batch_size, sampler.patch_size(step, st.progressive))
        g = step_generator(self.config.training.seed, step, self.trainer.rank, 1)
        n = st.batch_size
        t = torch.randint(0, self.t_stop, (n,), generator=g)
        level = torch.randint(0, codec.levels, (n,), generator=g)
        z0, cond = self._latents(batch, estimated=final)
        noise = torch.randn(z0.shape, generator=g).to(device)
        cond_noise = torch.randn(cond.shape, generator=g).to(device)
        t, level = t.to(device), level.to(device)
        t_cond = codec.timestep(level)
        noisy_cond = self.noise_schedule.add_noise(cond, cond_noise, t_cond)
        cond = torch.where((t_cond > 0).view(-1, *[1] * (cond.dim() - 1)), noisy_cond, cond)
        x_t = self.noise_schedule.add_noise(z0, noise, t)
        label = codec.label(batch["task"].to(device), batch["modality"].to(device), level)
        target = self.noise_schedule.training_target(z0, noise, t, self.config.diffusion.prediction)
        with self.acc.autocast():
            out = self.forward(t_layout(x_t), t, t_layout(cond), label)
        loss = F.mse_loss(out.float(), target.float())
        self._update(loss)
        return {"loss": loss.item()}

    def _on_final_estimate(self, step: int) -> bool:
        """Whether step ``step`` draws from the final estimates: evenly spread, final_estimate_share of the steps."""
        share = self.config.diffusion.final_estimate_share
        return self.finals is not None and math.floor((step + 1) * share) > math.floor(step * share)

    def _latents(self, batch: dict, *, estimated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaled latents of the HR patches, and of their conditions (the interpolated LR planes, or for
        refinement models the estimator's estimate, as upscale does; ``estimated``: the batch's "lr" already is
        the estimate)."""
        device = self.acc.device
        with torch.no_grad(), self.acc.autocast():
            z0 = self.ae.encode(batch["hr"].to(device)).float() * self.scale
            lr = batch["lr"].to(device)
            if self.estimator is not None and not estimated:
                task = self.codec.task_label(batch["task"], batch["modality"]).to(device)
                geometry = batch["geometry"].to(device)
                lr = self.estimator(self.trainer._in_model_layout(lr), task, geometry).float()
            cond = encode_planes(self.ae, lr).float() * self.scale
        return z0, cond
