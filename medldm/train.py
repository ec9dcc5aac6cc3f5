"""The Trainer: runs the training stages of a config (medldm.stages: the perceptual autoencoder, the estimator when
the config has one, then the conditional latent diffusion model) over accelerate, and exports the model folder.

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
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel

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
from medldm.choices import StageName
from medldm.config import Config, parse_config
from medldm.config import Estimator as EstimatorSection
from medldm.data import LaterPassSampler, PairSampler, TrainingVolume, load_volumes, pass_estimates
from medldm.errors import MedldmError
from medldm.nets import (
    build_autoencoder,
    build_denoiser,
    build_error_model,
    build_estimator,
    channels_last_format,
    native_bf16,
)
from medldm.outputs import write_text
from medldm.scope import measured_scope
from medldm.spec import THICK_ONLY
from medldm.stages import (
    PASSES,
    AutoencoderStage,
    DiffusionStage,
    EstimatorStage,
    SecondPassStage,
    ThirdPassStage,
    TrainingStage,
    UncertaintyStage,
    step_generator,
)

__all__ = ["Trainer", "STAGES", "resolve_precision"]

STAGES = tuple(s.value for s in StageName if s is not StageName.all)  # in training order
ORDINALS = ("first", "second", "third")  # names the cache of the estimate after that many passes
_noted_no_tensorboard = False  # say once per process that tensorboard is missing


def resolve_precision(setting: str) -> str:
    """The accelerate mixed-precision mode for a config setting ("auto" picks bf16 only where it is fast)."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() or native_bf16(torch.device("cpu")) else "no"


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

    def later_pass_sampler(self, stage: str, *, slab: int | None = None) -> LaterPassSampler:
        """Training batches from the consistent estimates of the training volumes after the finished passes before
        ``stage``: the earlier passes for a later pass; all the config's passes for the diffusion stage (a
        refinement denoiser learning what upscale gives it). The estimate after the first k passes is computed once
        (with a progress bar) and cached as ORDINALS[k]_pass.h5 in the folder of the first stage that learns from
        it (second_pass/first_pass.h5, third_pass/second_pass.h5, or diffusion/...), so later stages reuse it.
        ``slab``: planes per input (default: the estimator's slab)."""
        self.pair_sampler()  # loads the training volumes
        if stage in PASSES:
            before, kinds = list(PASSES[: PASSES.index(stage)]), getattr(self.config, stage).kinds
        else:  # the diffusion stage: after every pass the config runs on thick slices
            kinds = THICK_ONLY
            before = ["estimator", *self.config.passes_for("slice-profile")]
        nets: list[torch.nn.Module] = []
        items = None
        for k, name in enumerate(before):
            nets.append(self.trained_pass(name).to(self.acc.device))
            learner = PASSES[k + 1] if k + 1 < len(before) else stage
            cache = self.stage_dir(learner) / f"{ORDINALS[k]}_pass.h5"
            with _Counting(self, f"{stage}: {ORDINALS[k]}-pass estimates") as counting:
                items = pass_estimates(
                    cast(list, self._volumes), self.config, nets, cache, earlier=items, kinds=kinds,
                    progress=counting.update,
                )  # fmt: skip
        slab = cast(EstimatorSection, self.config.estimator).slab if slab is None else slab
        return LaterPassSampler(cast(list, items), self.config, slab=slab, rank=self.rank)

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

    def _loop(self, stage: TrainingStage, *, start: int, stop: int) -> None:
        """Run steps [start, stop) of ``stage``: log, checkpoint every N steps and at the end."""
        cfg = self.config.training
        with _StageLog(self, stage.name, start, stop, stage.schedule.batch_size) as log:
            for step in range(start, stop):
                # the global RNG (the KL posterior sample, dropout) restarts from (seed, step, rank) every step
                torch.manual_seed(step_generator(cfg.seed, step, self.rank, 2).initial_seed())
                logs = stage.step(step)
                done = step + 1
                if not math.isfinite(logs["loss"]):  # diverged: stop before a NaN model is saved or exported
                    raise MedldmError(
                        f"the {stage.name} loss became {logs['loss']} at step {done}: training diverged "
                        "and stopped, nothing was exported (lower the learning rate?)",
                        self.stage_dir(stage.name),
                    )
                log.record(done, logs, row=done % cfg.log_every == 0 or done == stop)
                if done % cfg.checkpoint_every == 0 or done == stop:
                    self.acc.wait_for_everyone()
                    if self.acc.is_main_process:
                        self._save(stage, done)
                        log.flush()
                    self.acc.wait_for_everyone()

    def init_from(self, folder: Path) -> dict[str, str]:
        """Start this (new) run from a trained model folder, to fine-tune it. A stage whose network and training
        settings equal the folder's, and that the folder trained for the configured steps, is taken as finished
        (the folder's weights become its last checkpoint); an estimator pass of the same shape with other settings
        is fine-tuned from the folder's weights; so is a denoiser (with the folder's latent scale), which is taken
        as finished when its data, settings and steps are the folder's and it sits on the folder's own autoencoder
        and estimator (so a config that only adds a stage trains just that one). A taken network of the estimator's
        design that this config tells the geometry, and the folder's did not, gets that part at zero: it computes
        what the folder's did. Returns what happened to each stage, for the log."""
        folder = Path(folder)
        raw, info = read_model_folder(folder)
        old, _ = parse_config(raw, source=str(folder / "config.json"), check_files=False)
        cfg, taken = self.config, {}
        finished: set[str] = set()  # the stages taken as finished
        networks = {
            "autoencoder": build_autoencoder,
            "estimator": build_estimator,
            "second_pass": build_estimator,
            "third_pass": build_estimator,
            "uncertainty": build_error_model,
        }
        for stage, build in networks.items():
            if getattr(cfg, stage) is None:
                continue
            same = (
                getattr(cfg, stage) == getattr(old, stage)
                and getattr(cfg.training, stage) == getattr(old.training, stage)
                and info.get(f"{stage}_steps") == getattr(cfg.training, stage).steps
                and (stage != "autoencoder" or cfg.data.intensity == old.data.intensity)
            )
            if not same and stage in PASSES and (weights := folder / f"{stage}.safetensors").is_file():
                try:  # the same network, perhaps told the geometry too: fine-tune the folder's weights
                    load_partial_weights(build_estimator(cfg), weights, new="geometry.")
                except MedldmError:
                    pass
                else:
                    self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(weights, self.stage_dir(stage) / "init.safetensors")
                    taken[stage] = f"fine-tuned from {folder}'s {stage}"
                    continue
            if not same:
                taken[stage] = f"trained {_starting_point(stage)} (its settings differ from the folder's)"
                continue
            module = build(cfg)
            # told the geometry as this config's estimator is, it may have a part the folder lacks: zero at first
            load_partial_weights(module, folder / f"{stage}.safetensors", new="geometry.")
            self._take_as_finished(stage, module, folder)
            taken[stage] = f"taken as finished from {folder}"
            finished.add(stage)
        denoiser = build_denoiser(cfg)
        try:
            load_weights(denoiser, folder / "denoiser.safetensors")
        except MedldmError:
            taken["diffusion"] = "trained from scratch (the folder's denoiser has another shape)"
        else:
            if self._same_denoiser(old, info, finished):
                self._take_as_finished("diffusion", denoiser, folder, latent_scale=info["latent_scale"])
                taken["diffusion"] = f"taken as finished from {folder}"
                return taken
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

    def _take_as_finished(self, stage: str, module: torch.nn.Module, folder: Path, **state) -> None:
        """Make ``module`` (holding the model folder's weights) the last checkpoint of a finished ``stage``."""
        save_checkpoint(
            self.stage_dir(stage),
            getattr(self.config.training, stage).steps,
            modules={"ema": AveragedModel(module, use_buffers=True)},
            optimizers={},
            state={"stage": stage, "taken_from": str(folder), "version": __version__, **state},
        )

    def _same_denoiser(self, old: Config, info: dict, finished: set[str]) -> bool:
        """Whether the folder's denoiser is what this config would train: the same data, diffusion settings and
        steps, on the folder's own autoencoder and estimator (both among the stages taken as ``finished``)."""
        cfg = self.config
        return (
            {stage for stage in ("autoencoder", "estimator") if getattr(cfg, stage) is not None} <= finished
            and cfg.data == old.data
            and cfg.diffusion == old.diffusion
            and cfg.training.diffusion == old.training.diffusion
            and info.get("diffusion_steps") == cfg.training.diffusion.steps
        )

    # ------------------------------------------------------------------------------------------ stages
    def train_autoencoder(self, max_steps: int | None = None) -> Path:
        return self._run_stage(AutoencoderStage(self), max_steps)

    def train_estimator(self, max_steps: int | None = None) -> Path:
        return self._run_stage(EstimatorStage(self), max_steps)

    def train_second_pass(self, max_steps: int | None = None) -> Path:
        return self._run_stage(SecondPassStage(self), max_steps)

    def train_third_pass(self, max_steps: int | None = None) -> Path:
        return self._run_stage(ThirdPassStage(self), max_steps)

    def train_uncertainty(self, max_steps: int | None = None) -> Path:
        return self._run_stage(UncertaintyStage(self), max_steps)

    def train_diffusion(self, max_steps: int | None = None) -> Path:
        stage = DiffusionStage(self)
        self._run_stage(stage, max_steps)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.export(stage.scale)
        return self.stage_dir(stage.name)

    def _run_stage(self, stage: TrainingStage, max_steps: int | None) -> Path:
        """Build the stage, restore its last checkpoint, and run its remaining steps up to ``max_steps``."""
        stage.build()
        start, state = self._restore(stage.name, stage.modules(), stage.optimizers())
        stage.resumed(state)
        stop = min(stage.schedule.steps, max_steps or stage.schedule.steps)
        if start < stop:
            stage.prepare()
            self._loop(stage, start=start, stop=stop)
            self.trained[stage.name] = self.acc.unwrap_model(stage.model)
        return self.stage_dir(stage.name)

    def _save(self, stage: TrainingStage, step: int) -> None:
        state = {"stage": stage.name, "config": self.config.model_dump(), **stage.state(), "version": __version__}
        save_checkpoint(
            self.stage_dir(stage.name),
            step,
            modules=stage.modules(),
            optimizers=stage.optimizers(),
            state=state,
            keep=self.config.training.keep_checkpoints,
        )

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

    def trained_estimator(self):
        """The estimator stage's EMA weights; the stage must have finished."""
        return self.trained_pass("estimator")

    def trained_pass(self, stage: str):
        """The EMA weights of one of the estimator's passes (PASSES); the stage must have finished."""
        return self._trained(stage, build_estimator(self.config))

    def trained_error_model(self):
        """The uncertainty stage's EMA weights; the stage must have finished."""
        return self._trained("uncertainty", build_error_model(self.config))

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
        if self.config.uncertainty is not None:
            info["uncertainty_steps"] = self.finished_step("uncertainty")
            modules["uncertainty"] = self.trained_error_model()
        for stage in PASSES[1:]:
            if getattr(self.config, stage) is not None:
                info[f"{stage}_steps"] = self.finished_step(stage)
                modules[stage] = self.trained_pass(stage)
        self.pair_sampler()  # loads the training volumes, if no stage did
        info["trained_on"] = measured_scope(self.config, self.data_root, self._volumes)
        if self.config.diffusion.refine is not None:  # refinement models: refine from where they were trained
            info["sampling"] = {"refine": self.config.diffusion.refine}
        return write_model_folder(self.run_dir / "model", config=self.config.model_dump(), info=info, modules=modules)

    def run(self, stage: str = "all", max_steps: int | None = None) -> None:
        """Train ``stage`` or all stages in order; with ``all``, a stage stopped early by ``max_steps`` makes the
        later ones wait for a resumed run."""
        # stages with a section of their own run when the config has it, or when asked for (then saying it has not)
        optional = (*PASSES, "uncertainty")
        skip = {name for name in optional if getattr(self.config, name) is None and stage != name}
        for name in (s for s in STAGES if s not in skip):
            if stage not in ("all", name):
                continue
            getattr(self, f"train_{name}")(max_steps)
            if stage == "all" and self.finished_step(name) < getattr(self.config.training, name).steps:
                return


def _starting_point(stage: str) -> str:
    """Where a stage's training starts: a later pass from the previous pass's weights, the others from scratch."""
    return f"from the {PASSES[PASSES.index(stage) - 1]}'s weights" if stage in PASSES[1:] else "from scratch"


def _bar(label: str, *, info: bool = False):
    """A rich progress bar labelled ``label``; with ``info``, a column for the task's ``info`` field (a stage's loss
    and speed)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    extra = [TextColumn("{task.fields[info]}")] if info else []
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), *extra, TimeRemainingColumn())


class _Counting:
    """A progress bar for work before a stage's steps (a rich bar in a terminal; outside one, a plain line at
    every tenth)."""

    def __init__(self, trainer: Trainer, label: str):
        self.label, self.show, self.shown = label, trainer.progress, -1
        self.bar: Any = None  # a rich Progress while a bar is shown

    def __enter__(self) -> _Counting:
        if self.show:
            self.bar = _bar(self.label)
            self.task = self.bar.add_task(self.label, total=None)
            self.bar.start()
        return self

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            return
        self.bar.update(self.task, completed=done, total=total)
        if not self.bar.console.is_terminal and done * 10 // total > self.shown:
            self.shown = done * 10 // total
            print(f"{self.label} {done}/{total}", flush=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


class _StageLog:
    """What a stage's steps report: metrics.csv (a resumed run continues it from its step), TensorBoard, and the
    progress bar (outside a terminal, one plain line per log row instead)."""

    def __init__(self, trainer: Trainer, stage: str, start: int, stop: int, batch_size: int):
        self.stage, self.start, self.stop = stage, start, stop
        self.samples_per_step = batch_size * trainer.acc.num_processes
        self.path = trainer.stage_dir(stage) / "metrics.csv"
        self.rows: list[dict] = []
        main = trainer.acc.is_main_process
        if main and self.path.exists():
            with open(self.path) as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start]
        self.progress: Any = None  # a rich Progress while a bar is shown
        self.board: Any = None  # a TensorBoard SummaryWriter
        self.show = trainer.progress
        self.tensorboard = main and trainer.config.training.tensorboard

    def __enter__(self) -> _StageLog:
        if self.show:
            self.progress = _bar(self.stage, info=True)
            self.task = self.progress.add_task(self.stage, total=self.stop, completed=self.start, info="")
            self.progress.start()
        if self.tensorboard:
            folder = self.path.parent / "tensorboard"
            self.board = _tensorboard(folder, purge_step=self.start + 1 if self.start else None)
        self.tic = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.board is not None:
            self.board.close()

    def record(self, done: int, logs: dict, *, row: bool) -> None:
        """Step ``done`` finished with ``logs``; with ``row``, a row of the log."""
        if not row:
            if self.progress is not None:
                self.progress.update(self.task, completed=done)
            return
        elapsed = time.perf_counter() - self.tic
        rate = (done - self.start) * self.samples_per_step / max(elapsed, 1e-9)
        values = {k: f"{v:.6g}" for k, v in logs.items()}
        self.rows.append({"step": done, **values, "samples_per_s": f"{rate:.3g}", "elapsed_s": f"{elapsed:.3f}"})
        if self.board is not None:
            for key, value in {**logs, "samples_per_s": rate}.items():
                self.board.add_scalar(key, value, done)
        info = f"loss {logs['loss']:.4f}  {rate:.1f} samples/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=done, info=info)
            if not self.progress.console.is_terminal:  # logs and CI: one plain line per log row
                print(f"{self.stage} {done}/{self.stop} {info}", flush=True)

    def flush(self) -> None:
        _write_csv(self.path, self.rows)
        if self.board is not None:
            self.board.flush()


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())
