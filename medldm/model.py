"""Model folders: reading one (checksums verified, safetensors only) into a :class:`LoadedModel`, the networks
with what they need to be run (labels, input sizes), and writing one back. The Upscaler, evaluation,
rate-distortion and adaptation all use this one object."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medldm.checkpoint import build_with_weights, read_model_folder, write_model_folder
from medldm.config import Config, parse_config
from medldm.diffusion import NoiseSchedule
from medldm.errors import MedldmError
from medldm.nets import (
    Autoencoder,
    ConditionCodec,
    Denoiser,
    ErrorModel,
    Estimator,
    build_autoencoder,
    build_denoiser,
    build_error_model,
    build_estimator,
    build_schedule,
)
from medldm.scope import TrainingScope
from medldm.spec import ModelSpec, Task

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_model", "pad_to_multiple"]

DEFAULT_MODEL = Path(__file__).parent / "weights" / "default"


@dataclass
class LoadedModel:
    config: Config
    info: dict
    autoencoder: Autoencoder
    denoiser: Denoiser
    schedule: NoiseSchedule
    codec: ConditionCodec
    path: Path
    estimator: Estimator | None = None  # the fidelity stage, in models that have one
    error_model: ErrorModel | None = None  # the estimate's error scale (the uncertainty section), if any
    second_pass: Estimator | None = None  # the estimator's second pass (the second_pass section), if any
    third_pass: Estimator | None = None  # and its third (the third_pass section), if any

    def later_pass_names(self, kind: str) -> list[str]:
        """The names of the later passes that run on ``kind``, in the order they run (each on the previous pass's
        consistent estimate)."""
        return [name for name in self.spec.passes_for(kind) if getattr(self, name) is not None]

    def save(self, out: str | Path, **info) -> Path:
        """Write this model as a checksummed model folder (e.g. an adapted one), ``info`` added to its model.json."""
        modules = {"autoencoder": self.autoencoder, "denoiser": self.denoiser}
        if self.estimator is not None:
            modules["estimator"] = self.estimator
        if self.error_model is not None:
            modules["uncertainty"] = self.error_model
        if self.second_pass is not None:
            modules["second_pass"] = self.second_pass
        if self.third_pass is not None:
            modules["third_pass"] = self.third_pass
        return write_model_folder(
            Path(out), config=self.config.model_dump(), info={**self.info, **info}, modules=modules
        )

    @property
    def spec(self) -> ModelSpec:
        """What the model is (medldm.spec): all that inference reads. ``config`` is the training config the folder
        was written with (a ModelSpec with data sources and a schedule), which adaptation and ``save`` need."""
        return self.config

    @property
    def scope(self) -> TrainingScope:
        """What the model was trained on (model.json "trained_on", completed from the config)."""
        return TrainingScope.of(self.config, self.info)

    def defaults(self) -> dict:
        """Sampling defaults the model was validated with (model.json "sampling"; older models: 1 step)."""
        sampling = {"steps": 1, "refine": 0.0, "planes": "both", **self.info.get("sampling", {})}
        sampling.setdefault("refine_planes", sampling["planes"])  # models that do not say refine like they estimate
        return sampling

    @property
    def multiple(self) -> int:
        """What the spatial sizes of the autoencoder's (and so the denoiser's) inputs must be multiples of: latent
        sizes halve cleanly through every denoiser level (and a DiT's patches tile them)."""
        cfg = self.spec
        levels = len(cfg.diffusion.channels) - 1 if cfg.diffusion.denoiser == "unet" else 0
        patch = cfg.diffusion.patch if cfg.diffusion.denoiser == "dit" else 1
        return cfg.autoencoder.factor * (2**levels) * patch

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) replicate-padded at the ends to the sizes the networks take (:attr:`multiple`)."""
        return pad_to_multiple(x, self.multiple)

    def label(self, task: Task, modality: int, level: int = 0) -> int:
        """The denoiser's class label for a trained ``task``, a modality index (medldm.nets.MODALITIES) and a
        condition-noise level."""
        index = self.spec.data.tasks.index(task)
        return int(self.codec.label(torch.tensor(index), torch.tensor(modality), torch.tensor(level)))


def load_model(path: str | Path = "default", *, device: str | torch.device = "cpu") -> LoadedModel:
    """Read a model folder (checksums verified, safetensors only) and build its networks in eval mode."""
    folder = DEFAULT_MODEL if str(path) == "default" else Path(path)
    if str(path) == "default" and not folder.is_dir():
        raise MedldmError("no default model is installed with this copy of medldm; pass --model PATH", folder)
    raw, info = read_model_folder(folder)
    config, _ = parse_config(raw, source=str(folder / "config.json"), check_files=False)
    autoencoder = build_with_weights(lambda: build_autoencoder(config), folder / "autoencoder.safetensors")
    denoiser = build_with_weights(lambda: build_denoiser(config), folder / "denoiser.safetensors")
    optional: dict[str, Any] = {}  # the networks of the optional sections the config has, in eval mode on the device
    for name, builder, section in (
        ("estimator", build_estimator, config.estimator),
        ("uncertainty", build_error_model, config.uncertainty),
        ("second_pass", build_estimator, config.second_pass),
        ("third_pass", build_estimator, config.third_pass),
    ):
        if section is not None:
            net = build_with_weights(partial(builder, config), folder / f"{name}.safetensors")
            optional[name] = net.to(device).eval().requires_grad_(False)
    schedule = build_schedule(config)
    return LoadedModel(
        config,
        info,
        autoencoder.to(device).eval().requires_grad_(False),
        denoiser.to(device).eval().requires_grad_(False),
        schedule,
        ConditionCodec(config),
        folder,
        optional.get("estimator"),
        optional.get("uncertainty"),
        optional.get("second_pass"),
        optional.get("third_pass"),
    )


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the spatial axes of (B, C, *spatial) at their ends to multiples of ``multiple``."""
    pad = [p for n in reversed(x.shape[2:]) for p in (0, (-n) % multiple)]
    return F.pad(x, pad, mode="replicate") if any(pad) else x
