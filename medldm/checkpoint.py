"""Checkpoints and model folders: safetensors weights + JSON, written atomically, read without pickles.

A training checkpoint is a folder ``<run>/<stage>/step_0000100/`` holding ``*.safetensors`` (weights and EMA),
``optim.pt`` (optimizer state, read back with ``weights_only=True``) and ``state.json`` (step, config). It is
written under a temporary name and renamed when complete, so a killed run never leaves a half checkpoint under
a real name. A model folder (what ``medldm upscale`` loads) holds ``config.json``, ``model.json``,
``autoencoder.safetensors``, ``denoiser.safetensors`` and ``SHA256SUMS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medldm.errors import MedldmError

__all__ = [
    "save_checkpoint",
    "latest_checkpoint",
    "load_state",
    "load_weights",
    "build_with_weights",
    "write_model_folder",
    "read_model_folder",
    "sha256",
    "load_partial_weights",
]

STEP_PREFIX = "step_"
MODEL_FILES = ("config.json", "model.json", "autoencoder.safetensors", "denoiser.safetensors")  # every model has


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks; an unreadable file is a MedldmError naming it."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as error:
        raise MedldmError(f"cannot read file: {error.strerror or error}", path) from None
    return h.hexdigest()


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone to contiguous standalone tensors
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(
    stage_dir: Path,
    step: int,
    *,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict,
    keep: int = 2,
) -> Path:
    """Write a complete checkpoint atomically and drop all but the ``keep`` newest."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    final = stage_dir / f"{STEP_PREFIX}{step:07d}"
    tmp = stage_dir / f".partial-{final.name}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    for name, module in modules.items():
        save_file(_state_dict(module), str(tmp / f"{name}.safetensors"))
    torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(stage_dir.glob(f"{STEP_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint of a stage (temporary folders of killed writes are ignored)."""
    done = [p for p in sorted(stage_dir.glob(f"{STEP_PREFIX}*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_state(ckpt: Path) -> tuple[dict, dict]:
    """(state.json contents, optimizer state dicts) of a checkpoint."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        optim = torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MedldmError(f"checkpoint cannot be read ({exc})", ckpt) from None
    return state, optim


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights, with a clear error when the file or the architecture does not match."""
    try:
        weights = load_file(str(path))
    except Exception as exc:
        raise MedldmError(f"weights cannot be read ({exc})", path) from None
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise MedldmError(f"weights do not fit the model in its config ({first})", path) from None


def load_partial_weights(module: torch.nn.Module, path: Path, *, new: str) -> None:
    """Load safetensors weights into a module that may also have parameters the file lacks, all of them named
    ``new...`` (a part added to a trained network, which keeps its initialisation). Anything else that does not
    match is a MedldmError."""
    try:
        weights = load_file(str(path))
    except Exception as exc:
        raise MedldmError(f"weights cannot be read ({exc})", path) from None
    try:
        missing, unexpected = module.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise MedldmError(f"weights do not fit the model in its config ({first})", path) from None
    if unexpected or any(not name.startswith(new) for name in missing):
        raise MedldmError(
            f"weights do not fit the model in its config (missing {missing[:3]}, unexpected {unexpected[:3]})", path
        )


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def build_with_weights(build: Callable[[], ModuleT], path: Path) -> ModuleT:
    """``build()`` with the weights of ``path``. The network is first built without memory (meta device) and its
    tensor names and shapes compared with the safetensors header, so a config that does not match its weights,
    however large it claims to be, is refused before anything is allocated."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in build().state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise MedldmError(f"weights cannot be read ({exc})", path) from None
    if found != expected:
        names = sorted(set(found) ^ set(expected))
        what = (
            f"tensor {names[0]} is in only one of them"
            if names
            else next(
                f"{n} is {list(found[n])} in the file, {list(expected[n])} in the config"
                for n in sorted(expected)
                if found[n] != expected[n]
            )
        )
        raise MedldmError(f"weights do not fit the model in its config ({what})", path)
    module = build()
    load_weights(module, path)
    return module


def write_model_folder(out: Path, *, config: dict, info: dict, modules: dict[str, torch.nn.Module]) -> Path:
    """Write a self-contained model folder (atomically: built aside, then renamed into place)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "model.json").write_text(json.dumps(info, indent=1))
    mode = (tmp / "config.json").stat().st_mode & 0o777  # what the umask gives; safetensors writes 0600
    for name, module in modules.items():
        save_file(_state_dict(module), str(tmp / f"{name}.safetensors"))
        os.chmod(tmp / f"{name}.safetensors", mode)
    sums = [f"{sha256(p)}  {p.name}" for p in sorted(tmp.iterdir())]
    (tmp / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _listed_checksums(folder: Path) -> dict[str, str]:
    """SHA256SUMS as {file name: digest}: well-formed lines, names of files directly in the folder, and every
    weight and description file of the folder listed (an empty or partial list must not verify nothing)."""
    listed: dict[str, str] = {}
    for number, line in enumerate((folder / "SHA256SUMS").read_text(errors="replace").splitlines(), 1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        name = parts[1].strip().removeprefix("*") if len(parts) == 2 else ""  # "*": sha256sum's binary mark
        if not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]) or not name:
            raise MedldmError(f"SHA256SUMS line {number} is not '<sha256>  <file name>'", folder)
        if name in (".", "..") or Path(name).name != name or "\\" in name:
            raise MedldmError(f"SHA256SUMS names {name!r}, which is not a file of this folder", folder)
        listed[name] = parts[0].lower()
    unlisted = sorted(
        p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors") and p.name not in listed
    )
    missing = [n for n in MODEL_FILES if n not in listed]
    if unlisted or missing:
        raise MedldmError(f"SHA256SUMS does not list {', '.join(unlisted + missing)} (incomplete or altered)", folder)
    return listed


def _check_info(info, folder: Path) -> dict:
    """model.json: an object with a finite, positive latent_scale and, if present, valid sampling defaults."""
    scale = info.get("latent_scale") if isinstance(info, dict) else None
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale < float("inf"):
        raise MedldmError("model.json needs a positive number latent_scale", folder)
    sampling = info.get("sampling", {})
    if not isinstance(sampling, dict):
        sampling = {"steps": None}
    steps, refine = sampling.get("steps", 1), sampling.get("refine", 0.0)
    if (
        isinstance(steps, bool)
        or not isinstance(steps, int)
        or steps < 1
        or isinstance(refine, bool)
        or not isinstance(refine, int | float)
        or not 0 <= refine < 1
        or sampling.get("planes", "both") not in ("one", "both")
    ):
        raise MedldmError(
            'model.json sampling must be {"steps": integer >= 1, "refine": number in [0, 1), '
            '"planes": "one" or "both"}',
            folder,
        )
    return info


def read_model_folder(folder: Path, *, verify: bool = True) -> tuple[dict, dict]:
    """(config, model info) of a model folder, after checking every file against SHA256SUMS."""
    folder = Path(folder)
    sums = folder / "SHA256SUMS"
    if not folder.exists():
        raise MedldmError("no such model folder", folder)
    if not folder.is_dir() or not sums.is_file():
        raise MedldmError("not a medldm model folder (no SHA256SUMS)", folder)
    listed = _listed_checksums(folder)
    if verify:
        for name, digest in listed.items():
            if not (folder / name).is_file() or sha256(folder / name) != digest:
                raise MedldmError(f"{name} is missing or does not match its checksum (corrupt or altered)", folder)
    try:
        config, info = json.loads((folder / "config.json").read_text()), json.loads((folder / "model.json").read_text())
    except Exception as exc:
        raise MedldmError(f"model description cannot be read ({exc})", folder) from None
    if not isinstance(config, dict):
        raise MedldmError("config.json must hold an object", folder)
    return config, _check_info(info, folder)
