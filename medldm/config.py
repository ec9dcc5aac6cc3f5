"""Training configuration: pydantic models of the YAML files in configs/. Unknown keys are errors.

Data paths are globs relative to a data root, given (first found wins) by ``--data-root``, the environment
variable ``MEDLDM_DATA_ROOT``, or ``data.root`` in the file (relative to the file), so the same config runs on
anyone's copy of the data.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from medldm.errors import MedldmError
from medldm.spec import (
    MAX_PATCH,
    NAME_PATTERN,
    THICK_ONLY,
    Autoencoder,
    DataSpec,
    Diffusion,
    Estimator,
    Intensity,
    ModelSpec,
    Task,
    Uncertainty,
    _Strict,
)

__all__ = [
    "Autoencoder",
    "Config",
    "Data",
    "DataSource",
    "Diffusion",
    "Estimator",
    "Intensity",
    "Task",
    "Uncertainty",
    "load_config",
    "resolve_sources",
]

DATA_ROOT_ENV = "MEDLDM_DATA_ROOT"


class DataSource(_Strict):
    """Scans matching ``glob`` (relative to the data root); the last ``holdout`` files, sorted by name, are the
    validation subjects and never used for training."""

    glob: str
    holdout: int = Field(0, ge=0)
    modality: Literal["MR", "CT"] = "MR"


class Data(DataSpec):
    """What the model takes (DataSpec) and where its training data come from."""

    root: str | None = None
    sources: list[DataSource] = Field(min_length=1)
    foreground_fraction: float = Field(0.9, ge=0, le=1)
    # HDF5 file of normalised volumes (h5py): a plain file name, kept in the run folder
    cache: str | None = Field(None, pattern=NAME_PATTERN, max_length=128)
    noise: float = Field(0.0, ge=0, le=0.2)  # Rician noise on LR inputs, fraction of the intensity range
    # share of training samples whose HR slab first goes through a random intensity curve (medldm.data
    # random_contrast), so the networks learn anatomy rather than T1 contrast; the pairs stay exact (the curve is
    # applied before the forward model)
    contrast_augmentation: float = Field(0.0, ge=0, le=1)


class Stage(_Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(0.999, gt=0, lt=1)
    # progressive growing: [[until_step, size...], ...] trains on smaller patches first (None = fixed size)
    progressive: list[list[int]] | None = None

    @field_validator("progressive")
    @classmethod
    def _sizes_bounded(cls, stages):
        for stage in stages or []:
            if len(stage) < 2 or stage[0] < 1 or any(not 8 <= n <= MAX_PATCH for n in stage[1:]):
                raise ValueError(
                    f"each progressive entry is [until_step, size...] with sizes in 8..{MAX_PATCH}, not {stage}"
                )
        return stages


class Training(_Strict):
    seed: int = 0
    # auto: bf16 on CUDA or on CPUs with native bf16 (AVX512-BF16/AMX), where it is fast (docs/performance.md)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    channels_last: bool = False  # channels-last memory layout for the networks (see benchmarks/training.py)
    compile: bool = False  # torch.compile the trained network (see benchmarks/training.py)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    tensorboard: bool = True  # also log the metrics to <run>/<stage>/tensorboard/ when tensorboard is installed
    autoencoder: Stage
    diffusion: Stage
    estimator: Stage | None = None  # needed when the config has an estimator section
    uncertainty: Stage | None = None  # needed when the config has an uncertainty (error model) section
    second_pass: Stage | None = None  # needed when the config has a second_pass section
    third_pass: Stage | None = None  # needed when the config has a third_pass section
    # the estimator's loss: "l1" on its output, or "consistent": L1 on the error the data-consistency projection
    # leaves (the part of the error the acquisition cannot see, medldm.degrade.LinearOperator.unseen), which is
    # what inference returns
    estimator_loss: Literal["l1", "consistent"] = "l1"


# options added after models were shipped: left out of the digest at their defaults, so older digests still hold
_LATER_OPTIONS: tuple[tuple[str, str, object], ...] = (
    ("diffusion", "condition", "lr"),
    ("diffusion", "refine", None),
    ("diffusion", "final_estimate_share", 0.0),
    ("data", "contrasts", None),
    ("data", "region", None),
    ("data", "contrast_augmentation", 0),
    ("estimator", "geometry", False),
    ("estimator", "spatial_dims", 2),
    ("estimator", "patch_size", None),
    ("training", "estimator_loss", "l1"),
    ("second_pass", "kinds", THICK_ONLY),
    ("third_pass", "kinds", THICK_ONLY),
)


class Config(ModelSpec):
    """A training config: the model spec, where its data come from (``data.sources``) and the schedule."""

    data: Data
    training: Training

    @model_validator(mode="after")
    def _estimator_has_a_stage(self):
        if self.estimator is not None and self.training.estimator is None:
            raise ValueError("an estimator section needs training.estimator (its steps, batch size, lr)")
        if self.uncertainty is not None and self.training.uncertainty is None:
            raise ValueError("an uncertainty section needs training.uncertainty (its steps, batch size, lr)")
        if self.second_pass is not None and self.training.second_pass is None:
            raise ValueError("a second_pass section needs training.second_pass (its steps, batch size, lr)")
        if self.third_pass is not None and self.training.third_pass is None:
            raise ValueError("a third_pass section needs training.third_pass (its steps, batch size, lr)")
        return self

    def digest(self) -> str:
        """Short hash of the settings, for reports and caches. Absent optional stages are left out, so configs
        written before they existed keep their digest; so are later options at their defaults."""
        settings = self.model_dump()
        for section in (settings, settings["training"]):
            for stage in ("estimator", "uncertainty", "second_pass", "third_pass"):
                if section.get(stage) is None:
                    section.pop(stage, None)
        for section, key, default in _LATER_OPTIONS:
            values = settings.get(section)
            if values is not None and values[key] == default:
                del values[key]
        for task in settings["data"]["tasks"]:
            if task["scale_range"] is None and task["thickness_range"] is None:
                for key in ("scale_range", "thickness_range", "range_share"):
                    del task[key]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    if first["type"] == "missing":
        return f"{source}: missing key '{key}'"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
    return f"{source}: key '{key}': {message}{more}"


def shipped_configs() -> list[str]:
    """Names of the configs installed with medldm (the repository's configs/ folder, package medldm.configs)."""
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("medldm.configs").iterdir() if p.name.endswith(".yaml"))


def shipped_config(name: str) -> Path | None:
    """The installed config called ``name`` (with or without .yaml), or None."""
    from importlib.resources import as_file, files

    stem = name[:-5] if name.endswith(".yaml") else name
    if stem not in shipped_configs():
        return None
    with as_file(files("medldm.configs") / f"{stem}.yaml") as path:  # a real file in a checkout or a wheel
        return Path(path)


def load_config(
    path: str | os.PathLike, *, data_root: str | os.PathLike | None = None, check_files: bool = True
) -> tuple[Config, Path]:
    """Read and validate a YAML config (a path, or the name of a config shipped with medldm, e.g. "brain_mri");
    return it and the resolved data root.

    Raises:
        MedldmError: bad YAML, an unknown key, a wrong type or value, or data that cannot be found; the
            message names the key.
    """
    path = Path(path)
    if not path.is_file() and path.parent == Path(".") and (shipped := shipped_config(path.name)):
        path = shipped
    if not path.is_file():
        raise MedldmError(
            f"config file not found (the configs shipped with medldm: {', '.join(shipped_configs())})", path
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise MedldmError(f"not valid YAML{where} ({problem or str(exc).splitlines()[0]})", path) from None
    return parse_config(raw, source=str(path), base=path.parent, data_root=data_root, check_files=check_files)


def parse_config(
    raw, *, source: str = "config", base: Path = Path("."), data_root=None, check_files: bool = True
) -> tuple[Config, Path]:
    """Validate an already-parsed config mapping (e.g. the JSON stored in a checkpoint)."""
    if not isinstance(raw, dict):
        raise MedldmError(f"{source}: expected a mapping of keys at the top level")
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        raise MedldmError(_describe(err, source)) from None
    root = Path(data_root or os.environ.get(DATA_ROOT_ENV) or base / (config.data.root or "."))
    if check_files:
        resolve_sources(config, root, source=source)
    return config, root


def resolve_sources(
    config: Config, root: Path, *, source: str = "config"
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(train, validation) lists of (file, modality), split by subject within each source."""
    if not root.is_dir():
        raise MedldmError(f"{source}: data root {root} not found (set --data-root or {DATA_ROOT_ENV})")
    train: list[tuple[Path, str]] = []
    validation: list[tuple[Path, str]] = []
    for i, src in enumerate(config.data.sources):
        files = sorted(Path(p) for p in glob.glob(str(root / src.glob)))
        if not files:
            raise MedldmError(f"{source}: key 'data.sources.{i}.glob': no files match {src.glob!r} under {root}")
        if src.holdout >= len(files):
            raise MedldmError(
                f"{source}: key 'data.sources.{i}.holdout': {src.holdout} leaves no training files of {len(files)}"
            )
        cut = len(files) - src.holdout
        train += [(f, src.modality) for f in files[:cut]]
        validation += [(f, src.modality) for f in files[cut:]]
    return train, validation
