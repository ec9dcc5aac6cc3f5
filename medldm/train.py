"""The two training stages over accelerate: the perceptual autoencoder, then the conditional latent diffusion model.

Every batch and every noise draw is a function of (seed, step, rank), so resuming from a checkpoint gives the
same weights as an uninterrupted run, and ranks of a data-parallel run see different data while DDP keeps their
weights identical. Checkpoints are written atomically (see medldm.checkpoint).
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medldm import __version__
from medldm.checkpoint import (
    latest_checkpoint,
    load_partial_weights,
    load_state,
    load_weights,
    read_model_folder,
    save_checkpoint,
    write_model_folder,
)
from medldm.choices import TrainingStage
from medldm.config import Config, Stage, parse_config
from medldm.config import Estimator as EstimatorSection
from medldm.data import PairSampler, TrainingVolume, load_volumes
from medldm.errors import MedldmError
from medldm.nets import (
    ConditionCodec,
    build_autoencoder,
    build_denoiser,
    build_discriminator,
    build_estimator,
    build_schedule,
    channels_last_format,
)
from medldm.outputs import write_text
from medldm.scope import measured_scope

__all__ = ["Trainer", "STAGES", "latent_scale", "resolve_precision"]

STAGES = tuple(s.value for s in TrainingStage if s is not TrainingStage.all)  # in training order
SCALE_BATCHES = 4  # batches used to measure the latent standard deviation
_noted_no_tensorboard = False  # say once per process that tensorboard is missing


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(setting: str) -> str:
    """The accelerate mixed-precision mode for a config setting ("auto" picks bf16 only where it is fast)."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "no"


def encode_planes(autoencoder, x: torch.Tensor) -> torch.Tensor:
    """Encode each channel of (B, C, *spatial) as its own one-channel image: (B, C * latent, *latent_spatial),
    channel c's latent at channels [c * latent, (c + 1) * latent). The LR condition of a 2D slab has one channel
    per plane; the autoencoder only knows single images."""
    b, c = x.shape[:2]
    z = autoencoder.encode(x.reshape(b * c, 1, *x.shape[2:]))
    return z.reshape(b, c * z.shape[1], *z.shape[2:])


def _tensorboard(folder: Path, *, purge_step: int | None):
    """A SummaryWriter on ``folder``, or None (with one line on stderr, once) when tensorboard is not installed.
    ``purge_step`` hides the events a resumed run will write again (those at steps >= it, as in metrics.csv)."""
    global _noted_no_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter  # raises ImportError without the tensorboard package
    except ImportError:
        if not _noted_no_tensorboard:
            print("tensorboard is not installed: metrics go to metrics.csv only", file=sys.stderr)
            _noted_no_tensorboard = True
        return None
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def _generator(seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    value = int(np.random.default_rng([seed, step, rank, stream]).integers(2**62))
    return torch.Generator().manual_seed(value)


@torch.no_grad()
def latent_scale(autoencoder, pairs: PairSampler, batch_size: int, device) -> float:
    """1 / std of the latents of a few fixed training batches (Rombach et al. 2022, Sec. G)."""
    z = [autoencoder.encode(pairs.batch(i, batch_size, stream=1)["hr"].to(device)) for i in range(SCALE_BATCHES)]
    return float(1.0 / torch.cat([v.flatten() for v in z]).float().std())


class Trainer:
    """Trains one stage at a time in ``run_dir/<stage>/`` and exports ``run_dir/model/`` after stage 2.

    Args:
        config: the validated config.
        data_root: folder the config's data globs are relative to.
        run_dir: where checkpoints, metrics and the exported model go.
        accelerator: an ``accelerate.Accelerator``; one is made from the config when None.
        lpips_weights: folder of the real LPIPS weights (default: see medldm.perceptual).
        progress: show a rich progress bar on the main process.
    """

    def __init__(
        self,
        config: Config,
        data_root: Path,
        run_dir: Path,
        *,
        accelerator=None,
        lpips_weights: str | None = None,
        progress: bool = True,
    ):
        from accelerate import Accelerator

        self.config, self.data_root, self.run_dir = config, Path(data_root), Path(run_dir)
        self.acc = accelerator or Accelerator(
            mixed_precision=resolve_precision(config.training.mixed_precision), cpu=not torch.cuda.is_available()
        )
        self.lpips_weights = lpips_weights or config.autoencoder.lpips_weights
        self.progress = progress and self.acc.is_main_process
        self._volumes: list[TrainingVolume] | None = None
        self.trained: dict[str, torch.nn.Module] = {}  # each stage's live (non-EMA) model on this rank

    # ------------------------------------------------------------------------------------------ shared
    def _training_forward(self, model, spatial_dims: int | None = None):
        """The callable a training step runs: the model in channels-last layout and/or compiled, by config
        (benchmarks/training.py measures both; the weights, EMA and checkpoints stay those of ``model``)."""
        cfg = self.config.training
        if cfg.channels_last:
            model.to(memory_format=channels_last_format(spatial_dims or self.config.data.spatial_dims))
        return torch.compile(model) if cfg.compile else model

    def _in_model_layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory layout the training forward expects (channels-last when the config asks)."""
        if not self.config.training.channels_last:
            return x
        return x.contiguous(memory_format=channels_last_format(x.dim() - 2))

    @property
    def rank(self) -> int:
        return self.acc.process_index

    def pair_sampler(self, *, slab: int | None = None, spatial_dims: int | None = None) -> PairSampler:
        if self._volumes is None:
            cache = self.config.data.cache
            self._volumes = load_volumes(self.config, self.data_root, cache=self.run_dir / cache if cache else None)
        return PairSampler(self._volumes, self.config, rank=self.rank, slab=slab, spatial_dims=spatial_dims)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def finished_step(self, stage: str) -> int:
        ckpt = latest_checkpoint(self.stage_dir(stage))
        return 0 if ckpt is None else int(json.loads((ckpt / "state.json").read_text())["step"])

    def _restore(self, stage: str, modules: dict, optimizers: dict) -> tuple[int, dict]:
        ckpt = latest_checkpoint(self.stage_dir(stage))
        if ckpt is None:
            return 0, {}
        state, optim = load_state(ckpt)
        if "taken_from" in state:  # a finished stage taken from a model folder: only its EMA weights exist
            return int(state["step"]), state
        for name, module in modules.items():
            load_weights(module, ckpt / f"{name}.safetensors")
        for name, opt in optimizers.items():
            opt.load_state_dict(optim[name])
        return int(state["step"]), state

    def _loop(
        self,
        stage: str,
        *,
        start: int,
        stop: int,
        step_fn: Callable[[int], dict],
        batch_size: int,
        save: Callable[[int], None],
    ) -> None:
        """Run steps [start, stop): log to CSV (and TensorBoard), checkpoint every N steps and at the end, show
        progress."""
        cfg = self.config.training
        log_path = self.stage_dir(stage) / "metrics.csv"
        rows = []
        if self.acc.is_main_process and log_path.exists():  # a resumed run continues the log from its step
            with open(log_path) as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start]
        progress = None
        if self.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            progress = Progress(
                TextColumn(f"[bold]{stage}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            task = progress.add_task(stage, total=stop, completed=start, info="")
            progress.start()
        board = None
        try:
            if self.acc.is_main_process and cfg.tensorboard:
                board = _tensorboard(self.stage_dir(stage) / "tensorboard", purge_step=start + 1 if start else None)
            tic = time.perf_counter()
            for step in range(start, stop):
                # the global RNG (the KL posterior sample, dropout) restarts from (seed, step, rank) every step
                torch.manual_seed(_generator(cfg.seed, step, self.rank, 2).initial_seed())
                logs = step_fn(step)
                done = step + 1
                if not math.isfinite(logs["loss"]):  # diverged: stop before a NaN model is saved or exported
                    raise MedldmError(
                        f"the {stage} loss became {logs['loss']} at step {done}: training diverged "
                        "and stopped, nothing was exported (lower the learning rate?)",
                        self.stage_dir(stage),
                    )
                if done % cfg.log_every == 0 or done == stop:
                    elapsed = time.perf_counter() - tic
                    rate = (done - start) * batch_size * self.acc.num_processes / max(elapsed, 1e-9)
                    row = {
                        "step": done,
                        **{k: f"{v:.6g}" for k, v in logs.items()},
                        "samples_per_s": f"{rate:.3g}",
                        "elapsed_s": f"{elapsed:.3f}",
                    }
                    rows.append(row)
                    if board is not None:
                        for key, value in {**logs, "samples_per_s": rate}.items():
                            board.add_scalar(key, value, done)
                    info = f"loss {logs['loss']:.4f}  {rate:.1f} samples/s"
                    if progress is not None:
                        progress.update(task, completed=done, info=info)
                        if not progress.console.is_terminal:  # logs and CI: one plain line per log row
                            print(f"{stage} {done}/{stop} {info}", flush=True)
                elif progress is not None:
                    progress.update(task, completed=done)
                if done % cfg.checkpoint_every == 0 or done == stop:
                    self.acc.wait_for_everyone()
                    if self.acc.is_main_process:
                        save(done)
                        _write_csv(log_path, rows)
                        if board is not None:
                            board.flush()
                    self.acc.wait_for_everyone()
        finally:
            if progress is not None:
                progress.stop()
            if board is not None:
                board.close()

    def init_from(self, folder: Path) -> dict[str, str]:
        """Start this (new) run from a trained model folder, to fine-tune it. A stage whose network and training
        settings equal the folder's, and that the folder trained for the configured steps, is taken as finished
        (the folder's weights become its last checkpoint); a denoiser of the same shape starts the diffusion stage
        from the folder's weights and latent scale. Returns what happened to each stage, for the log."""
        folder = Path(folder)
        raw, info = read_model_folder(folder)
        old, _ = parse_config(raw, source=str(folder / "config.json"), check_files=False)
        cfg, taken = self.config, {}
        for stage, build in (("autoencoder", build_autoencoder), ("estimator", build_estimator)):
            if getattr(cfg, stage) is None:
                continue
            same = (
                getattr(cfg, stage) == getattr(old, stage)
                and getattr(cfg.training, stage) == getattr(old.training, stage)
                and info.get(f"{stage}_steps") == getattr(cfg.training, stage).steps
                and (stage != "autoencoder" or cfg.data.intensity == old.data.intensity)
            )
            if not same and stage == "estimator" and (folder / "estimator.safetensors").is_file():
                try:  # the same network, perhaps told the geometry too: fine-tune the folder's weights
                    load_partial_weights(build_estimator(cfg), folder / "estimator.safetensors", new="geometry.")
                except MedldmError:
                    pass
                else:
                    self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(folder / "estimator.safetensors", self.stage_dir(stage) / "init.safetensors")
                    taken[stage] = f"fine-tuned from {folder}'s estimator"
                    continue
            if not same:
                taken[stage] = "trained from scratch (its settings differ from the folder's)"
                continue
            module = build(cfg)
            load_weights(module, folder / f"{stage}.safetensors")
            save_checkpoint(
                self.stage_dir(stage),
                getattr(cfg.training, stage).steps,
                modules={"ema": AveragedModel(module, use_buffers=True)},
                optimizers={},
                state={"stage": stage, "taken_from": str(folder), "version": __version__},
            )
            taken[stage] = f"taken as finished from {folder}"
        denoiser = build_denoiser(cfg)
        try:
            load_weights(denoiser, folder / "denoiser.safetensors")
        except MedldmError:
            taken["diffusion"] = "trained from scratch (the folder's denoiser has another shape)"
        else:
            self.stage_dir("diffusion").mkdir(parents=True, exist_ok=True)
            (self.stage_dir("diffusion") / "init.json").write_text(
                json.dumps({"from": str(folder), "latent_scale": info["latent_scale"]})
            )
            save_file(
                {k: v.contiguous() for k, v in denoiser.state_dict().items()},
                str(self.stage_dir("diffusion") / "init.safetensors"),
            )
            taken["diffusion"] = f"fine-tuned from {folder}'s denoiser"
        return taken

    # ------------------------------------------------------------------------------------- stage 1
    def train_autoencoder(self, max_steps: int | None = None) -> Path:
        from monai.losses import PatchAdversarialLoss

        cfg, stage = self.config, "autoencoder"
        st, ae_cfg = cfg.training.autoencoder, cfg.autoencoder
        torch.manual_seed(cfg.training.seed)  # same initial weights on every rank and every run
        model, disc = build_autoencoder(cfg), build_discriminator(cfg)
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(st.ema_decay or 0.0), use_buffers=True)
        opt = torch.optim.AdamW(model.parameters(), lr=st.lr, weight_decay=st.weight_decay)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=st.lr, weight_decay=st.weight_decay, betas=(0.5, 0.9))
        start, _ = self._restore(
            stage, {"model": model, "ema": ema, "discriminator": disc}, {"model": opt, "discriminator": opt_d}
        )
        stop = min(st.steps, max_steps or st.steps)
        if start >= stop:
            return self.stage_dir(stage)
        perceptual = None
        if ae_cfg.perceptual_weight > 0:
            from medldm.perceptual import PerceptualLoss

            perceptual = PerceptualLoss(weights=self.lpips_weights).to(self.acc.device)
        pairs = self.pair_sampler()
        model, disc, opt, opt_d = self.acc.prepare(model, disc, opt, opt_d)
        forward = self._training_forward(model)
        adversarial = PatchAdversarialLoss(criterion="least_squares")
        reg_weight = ae_cfg.kl_weight if ae_cfg.kind == "kl" else 1.0

        def step_fn(step: int) -> dict:
            size = pairs.patch_size(step, st.progressive)
            x = self._in_model_layout(pairs.batch(step, st.batch_size, size)["hr"].to(self.acc.device))
            use_adv = ae_cfg.adversarial_weight > 0 and step >= ae_cfg.adversarial_start
            with self.acc.autocast():
                recon, reg = forward(x)
                recon = recon.float()
                l1 = (recon - x).abs().mean()
                loss = l1 + reg_weight * reg
                logs = {"l1": l1.item(), "reg": reg.item()}
                if perceptual is not None:
                    p = perceptual(recon.clamp(0, 1), x.clamp(0, 1))
                    loss = loss + ae_cfg.perceptual_weight * p
                    logs["lpips"] = p.item()
                if use_adv:
                    g_adv = adversarial(disc(recon)[-1], target_is_real=True, for_discriminator=False)
                    loss = loss + ae_cfg.adversarial_weight * g_adv
                    logs["g_adv"] = g_adv.item()
            opt.zero_grad(set_to_none=True)
            self.acc.backward(loss)
            if st.grad_clip:
                self.acc.clip_grad_norm_(model.parameters(), st.grad_clip)
            opt.step()
            if use_adv:
                with self.acc.autocast():
                    d_loss = 0.5 * (
                        adversarial(disc(recon.detach())[-1], target_is_real=False, for_discriminator=True)
                        + adversarial(disc(x)[-1], target_is_real=True, for_discriminator=True)
                    )
                opt_d.zero_grad(set_to_none=True)
                self.acc.backward(d_loss)
                opt_d.step()
                logs["d_adv"] = d_loss.item()
            ema.update_parameters(self.acc.unwrap_model(model))
            return {"loss": loss.item(), **logs}

        def save(step: int) -> None:
            save_checkpoint(
                self.stage_dir(stage),
                step,
                modules={
                    "model": self.acc.unwrap_model(model),
                    "ema": ema,
                    "discriminator": self.acc.unwrap_model(disc),
                },
                optimizers={"model": opt, "discriminator": opt_d},
                state={"stage": stage, "config": cfg.model_dump(), "version": __version__},
                keep=cfg.training.keep_checkpoints,
            )

        self._loop(stage, start=start, stop=stop, step_fn=step_fn, batch_size=st.batch_size, save=save)
        self.trained[stage] = self.acc.unwrap_model(model)
        return self.stage_dir(stage)

    def trained_autoencoder(self):
        """Stage 1's EMA weights in a frozen autoencoder; stage 1 must have finished."""
        return self._trained("autoencoder", build_autoencoder(self.config))

    def _trained(self, stage: str, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` with the EMA weights of a finished stage, frozen."""
        steps = getattr(self.config.training, stage).steps
        ckpt = latest_checkpoint(self.stage_dir(stage))
        done = self.finished_step(stage)
        if ckpt is None or done < steps:
            raise MedldmError(
                f"the {stage} stage has not finished (step {done} of {steps}); train it first (--stage {stage})",
                self.stage_dir(stage),
            )
        ema = AveragedModel(module, use_buffers=True)
        load_weights(ema, ckpt / "ema.safetensors")
        return ema.module.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------- fidelity stage
    def train_estimator(self, max_steps: int | None = None) -> Path:
        """The pixel-space regression network (posterior mean, L1), independent of the autoencoder."""
        cfg, stage = self.config, "estimator"
        torch.manual_seed(cfg.training.seed + 2)
        model = build_estimator(cfg)  # refuses configs without an estimator section
        init = self.stage_dir(stage) / "init.safetensors"  # written by init_from: fine-tune a folder's estimator
        if init.is_file():
            load_partial_weights(model, init, new="geometry.")
        st = cast(Stage, cfg.training.estimator)  # set with an estimator section (the Config checks it)
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(st.ema_decay or 0.0), use_buffers=True)
        opt = torch.optim.AdamW(model.parameters(), lr=st.lr, weight_decay=st.weight_decay)
        start, _ = self._restore(stage, {"model": model, "ema": ema}, {"model": opt})
        stop = min(st.steps, max_steps or st.steps)
        if start >= stop:
            return self.stage_dir(stage)
        section = cast(EstimatorSection, cfg.estimator)  # build_estimator checked it
        pairs = self.pair_sampler(slab=section.slab, spatial_dims=section.spatial_dims)
        model, opt = self.acc.prepare(model, opt)
        forward = self._training_forward(model, section.spatial_dims)
        codec = ConditionCodec(cfg)
        # cosine decay to 10 % over the whole stage: a function of the step, so resumed runs match (a Python float:
        # the optimizer state is saved with it and read back with weights_only=True)
        lr_at = lambda step: st.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / st.steps)))  # noqa: E731

        def step_fn(step: int) -> dict:
            size = section.patch_size or pairs.patch_size(step, st.progressive)
            batch = pairs.batch(step, st.batch_size, size, stream=3)
            lr_in = self._in_model_layout(batch["lr"].to(self.acc.device))
            hr = batch["hr"].to(self.acc.device)
            label = codec.task_label(batch["task"], batch["modality"]).to(self.acc.device)
            geometry = batch["geometry"].to(self.acc.device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            with self.acc.autocast():
                out = forward(lr_in, label, geometry)
            loss = (out.float() - hr).abs().mean()
            opt.zero_grad(set_to_none=True)
            self.acc.backward(loss)
            if st.grad_clip:
                self.acc.clip_grad_norm_(model.parameters(), st.grad_clip)
            opt.step()
            ema.update_parameters(self.acc.unwrap_model(model))
            return {"loss": loss.item(), "lr": lr_at(step)}

        def save(step: int) -> None:
            save_checkpoint(
                self.stage_dir(stage),
                step,
                modules={"model": self.acc.unwrap_model(model), "ema": ema},
                optimizers={"model": opt},
                state={"stage": stage, "config": cfg.model_dump(), "version": __version__},
                keep=cfg.training.keep_checkpoints,
            )

        self._loop(stage, start=start, stop=stop, step_fn=step_fn, batch_size=st.batch_size, save=save)
        self.trained[stage] = self.acc.unwrap_model(model)
        return self.stage_dir(stage)

    def trained_estimator(self):
        """The estimator stage's EMA weights; the stage must have finished."""
        return self._trained("estimator", build_estimator(self.config))

    # ------------------------------------------------------------------------------------- stage 2
    def train_diffusion(self, max_steps: int | None = None) -> Path:
        cfg, stage = self.config, "diffusion"
        st, d_cfg = cfg.training.diffusion, cfg.diffusion
        ae = self.trained_autoencoder().to(self.acc.device)
        torch.manual_seed(cfg.training.seed + 1)
        model = build_denoiser(cfg)
        init = self.stage_dir(stage) / "init.json"  # written by init_from: fine-tune a model folder's denoiser
        init = json.loads(init.read_text()) if init.is_file() else {}
        if init:
            load_weights(model, self.stage_dir(stage) / "init.safetensors")
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(st.ema_decay or 0.0), use_buffers=True)
        opt = torch.optim.AdamW(model.parameters(), lr=st.lr, weight_decay=st.weight_decay)
        start, state = self._restore(stage, {"model": model, "ema": ema}, {"model": opt})
        stop = min(st.steps, max_steps or st.steps)
        refining = d_cfg.condition == "estimate"
        # refining needs an estimator section (the Config checks it)
        pairs = self.pair_sampler(slab=cast(EstimatorSection, cfg.estimator).slab if refining else None)
        estimator = self.trained_estimator().to(self.acc.device) if refining else None
        # the timesteps trained: all, or those a refinement from ``refine`` of the schedule meets
        # (medldm.diffusion.timesteps_for starts it at round(refine * (T - 1)))
        t_stop = d_cfg.timesteps if d_cfg.refine is None else math.floor(d_cfg.refine * (d_cfg.timesteps - 1) + 0.5) + 1
        scale = state.get("latent_scale", init.get("latent_scale"))
        if scale is None:
            with self.acc.autocast():
                scale = latent_scale(ae, pairs, st.batch_size, self.acc.device)
        if start < stop:
            model, opt = self.acc.prepare(model, opt)
            forward = self._training_forward(model)
            schedule = build_schedule(cfg)
            codec = ConditionCodec(cfg)
            seed = cfg.training.seed

            def step_fn(step: int) -> dict:
                size = pairs.patch_size(step, st.progressive)
                batch = pairs.batch(step, st.batch_size, size)
                g = _generator(seed, step, self.rank, 1)
                n = st.batch_size
                t = torch.randint(0, t_stop, (n,), generator=g)
                level = torch.randint(0, codec.levels, (n,), generator=g)
                with torch.no_grad(), self.acc.autocast():
                    z0 = ae.encode(batch["hr"].to(self.acc.device)).float() * scale
                    lr = batch["lr"].to(self.acc.device)
                    if estimator is not None:  # refining: condition on the estimator's estimate, as upscale does
                        task = codec.task_label(batch["task"], batch["modality"]).to(self.acc.device)
                        lr = estimator(self._in_model_layout(lr), task, batch["geometry"].to(self.acc.device)).float()
                    cond = encode_planes(ae, lr).float() * scale
                noise = torch.randn(z0.shape, generator=g).to(self.acc.device)
                cond_noise = torch.randn(cond.shape, generator=g).to(self.acc.device)
                t, level = t.to(self.acc.device), level.to(self.acc.device)
                t_cond = codec.timestep(level)
                noisy_cond = schedule.add_noise(cond, cond_noise, t_cond)
                cond = torch.where((t_cond > 0).view(-1, *[1] * (cond.dim() - 1)), noisy_cond, cond)
                x_t = schedule.add_noise(z0, noise, t)
                label = codec.label(batch["task"].to(self.acc.device), batch["modality"].to(self.acc.device), level)
                target = schedule.training_target(z0, noise, t, d_cfg.prediction)
                with self.acc.autocast():
                    out = forward(self._in_model_layout(x_t), t, self._in_model_layout(cond), label)
                loss = F.mse_loss(out.float(), target.float())
                opt.zero_grad(set_to_none=True)
                self.acc.backward(loss)
                if st.grad_clip:
                    self.acc.clip_grad_norm_(model.parameters(), st.grad_clip)
                opt.step()
                ema.update_parameters(self.acc.unwrap_model(model))
                return {"loss": loss.item()}

            def save(step: int) -> None:
                save_checkpoint(
                    self.stage_dir(stage),
                    step,
                    modules={"model": self.acc.unwrap_model(model), "ema": ema},
                    optimizers={"model": opt},
                    state={"stage": stage, "config": cfg.model_dump(), "latent_scale": scale, "version": __version__},
                    keep=cfg.training.keep_checkpoints,
                )

            self._loop(stage, start=start, stop=stop, step_fn=step_fn, batch_size=st.batch_size, save=save)
            self.trained[stage] = self.acc.unwrap_model(model)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.export(scale)
        return self.stage_dir(stage)

    def export(self, scale: float) -> Path:
        """Write ``run_dir/model``: the EMA autoencoder and denoiser with everything upscale needs."""
        ckpt = cast(Path, latest_checkpoint(self.stage_dir("diffusion")))  # called once the stage has run
        denoiser = build_denoiser(self.config)
        ema = AveragedModel(denoiser, use_buffers=True)
        load_weights(ema, ckpt / "ema.safetensors")
        info = {
            "version": __version__,
            "latent_scale": scale,
            "spatial_dims": self.config.data.spatial_dims,
            "autoencoder_steps": self.finished_step("autoencoder"),
            "diffusion_steps": self.finished_step("diffusion"),
            "config_digest": self.config.digest(),
        }
        modules = {"autoencoder": self.trained_autoencoder(), "denoiser": ema.module}
        if self.config.estimator is not None:
            info["estimator_steps"] = self.finished_step("estimator")
            modules["estimator"] = self.trained_estimator()
        self.pair_sampler()  # loads the training volumes, if no stage did
        info["trained_on"] = measured_scope(self.config, self.data_root, self._volumes)
        if self.config.diffusion.refine is not None:  # refinement models: refine from where they were trained
            info["sampling"] = {"refine": self.config.diffusion.refine}
        return write_model_folder(self.run_dir / "model", config=self.config.model_dump(), info=info, modules=modules)

    def run(self, stage: str = "all", max_steps: int | None = None) -> None:
        """Train ``stage`` or all stages in order; with ``all``, a stage stopped early by ``max_steps`` makes the
        later ones wait for a resumed run."""
        staged = self.config.estimator is not None or stage == "estimator"  # without a section it says so
        for name in (s for s in STAGES if staged or s != "estimator"):
            if stage not in ("all", name):
                continue
            getattr(self, f"train_{name}")(max_steps)
            if stage == "all" and self.finished_step(name) < getattr(self.config.training, name).steps:
                return


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())
