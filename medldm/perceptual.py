"""LPIPS with real weights, offline: the perceptual training loss and the evaluation metric.

This module is the one place where LPIPS weights are loaded. Nothing is downloaded and random weights are
never used: the backbone (torchvision's ImageNet AlexNet conv layers) and the LPIPS v0.1 linear heads are
read from a folder and checked against SHA-256 sums before ``torch.load(..., weights_only=True)``.

Where the weights come from (first match wins, see :func:`find_lpips_weights`):

1. the ``weights`` argument (a folder);
2. the environment variable ``MEDLDM_LPIPS_WEIGHTS``;
3. ``$MEDLDM_SHARED/weights/lpips`` and ``<repo>/../shared/weights/lpips``;
4. the torch hub cache (``torch.hub.get_dir()/checkpoints``), where torchvision saves
   ``alexnet-owt-7be5be79.pth`` when it downloads AlexNet on a machine with internet.

A weights folder holds the backbone as ``alexnet_features_tv_imagenet1k_v1.pth`` (only the ``features.*``
tensors) or as torchvision's original ``alexnet-owt-7be5be79.pth`` (of which only ``features.*`` is used),
and optionally the heads ``lpips_v0.1_alex.pth`` (otherwise the copy shipped in the ``lpips`` wheel is
used), plus a ``SHA256SUMS`` file. Files not listed there are checked against the checksums known to this
module or, for torchvision's files, against the hash prefix in their name.
"""

from __future__ import annotations

import copy
import os
import re
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import lpips
import numpy as np
import torch
import torch.nn.functional as F

from medldm.checkpoint import sha256
from medldm.errors import MedldmError

__all__ = [
    "ENV_VAR",
    "CHECKSUM_FILE",
    "PerceptualLoss",
    "find_lpips_weights",
    "load_lpips",
    "lpips_distance",
    "min_image_size",
    "verify_checksums",
]

ENV_VAR = "MEDLDM_LPIPS_WEIGHTS"
CHECKSUM_FILE = "SHA256SUMS"
_REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class _NetFiles:
    features_file: str  # features-only state dict, torchvision layout (features.{i}.*)
    torchvision_file: str  # torchvision's full state dict, as torch.hub names it (name-<sha256 prefix>.pth)
    heads_file: str  # LPIPS v0.1 linear heads
    min_size: int  # smallest image side the backbone accepts (pooling would reach 0 pixels below it)


_NETS = {
    "alex": _NetFiles("alexnet_features_tv_imagenet1k_v1.pth", "alexnet-owt-7be5be79.pth", "lpips_v0.1_alex.pth", 31),
    "vgg": _NetFiles("vgg16_features_tv_imagenet1k_v1.pth", "vgg16-397923af.pth", "lpips_v0.1_vgg.pth", 16),
    "squeeze": _NetFiles(
        "squeezenet1_1_features_tv_imagenet1k_v1.pth", "squeezenet1_1-b8a52dc0.pth", "lpips_v0.1_squeeze.pth", 17
    ),
}

# SHA-256 of files whose content is known: used for files that no SHA256SUMS lists (e.g. the heads shipped in
# the lpips 0.1.4 wheel, which are byte-identical to the lpips_v0.1_*.pth files of shared/weights/lpips).
_KNOWN_SHA256 = {
    "alexnet_features_tv_imagenet1k_v1.pth": "1454cf628f565bb39c929b4ab19c33d8c662292055b946c48daaeb6ccaf8811d",
    "lpips_v0.1_alex.pth": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "lpips_v0.1_squeeze.pth": "4a5350f23600cb79923ce65bb07cbf57dca461329894153e05a1346bd531cf76",
    "lpips_v0.1_vgg.pth": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
}
_TORCHVISION_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth$")

_CACHE: dict[tuple, lpips.LPIPS] = {}
_CACHE_LOCK = threading.Lock()


def _net_files(net: str) -> _NetFiles:
    if net not in _NETS:
        raise MedldmError(f"unknown LPIPS network {net!r}: expected one of {', '.join(_NETS)}")
    return _NETS[net]


def min_image_size(net: str = "alex") -> int:
    """The smallest image side the LPIPS backbone ``net`` accepts without resizing (31 for AlexNet)."""
    return _net_files(net).min_size


def _backbone_file(folder: Path, net: str) -> Path | None:
    files = _NETS[net]
    for name in (files.features_file, files.torchvision_file):
        if (folder / name).is_file():
            return folder / name
    return None


def _heads_file(folder: Path, net: str) -> tuple[Path, bool]:
    """The heads file and whether it comes from the folder (True) or from the lpips wheel (False)."""
    name = _NETS[net].heads_file
    if (folder / name).is_file():
        return folder / name, True
    return Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / f"{net}.pth", False


def _expected_files(net: str) -> str:
    files = _NETS[net]
    return (
        f"{files.features_file} (or torchvision's {files.torchvision_file}), {files.heads_file} "
        f"(optional: the copy in the lpips package is used otherwise) and {CHECKSUM_FILE}"
    )


def find_lpips_weights(path: str | os.PathLike | None = None, *, net: str = "alex") -> Path:
    """The folder holding the LPIPS weights for ``net``.

    Args:
        path: the weights folder. When given (or when ``MEDLDM_LPIPS_WEIGHTS`` is set) it must hold the files;
            there is no fallback to other places.
        net: "alex" (provided in shared/weights/lpips), "vgg" or "squeeze" (only if their torchvision backbone
            files are found).

    Raises:
        MedldmError: no folder has the backbone file; the message says which files are expected and how to
            point medldm at them. Random weights are never used.
    """
    _net_files(net)
    explicit = [(path, "the `weights` argument")] if path is not None else []
    if path is None and os.environ.get(ENV_VAR):
        explicit = [(os.environ[ENV_VAR], f"${ENV_VAR}")]
    if explicit:
        value, source = explicit[0]
        folder = Path(value).expanduser()
        if not folder.is_dir():
            raise MedldmError(
                f"the LPIPS weights path given by {source} is not a folder: "
                f"expected a folder with {_expected_files(net)}",
                folder,
            )
        if _backbone_file(folder, net) is None:
            raise MedldmError(
                f"no LPIPS-{net} backbone weights in the folder given by {source}: expected {_expected_files(net)}",
                folder,
            )
        return folder

    candidates = []
    if os.environ.get("MEDLDM_SHARED"):
        candidates.append(Path(os.environ["MEDLDM_SHARED"]).expanduser() / "weights" / "lpips")
    candidates.append(_REPO.parent / "shared" / "weights" / "lpips")
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints")
    for folder in candidates:
        if _backbone_file(folder, net) is not None:
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise MedldmError(
        f"no LPIPS-{net} weights found (looked in {looked}): pass the weights folder (the `weights` argument or "
        f"the matching CLI/config option) or set {ENV_VAR} to a folder holding {_expected_files(net)}. "
        "medldm never downloads them and never falls back to random weights."
    )


def _read_checksums(folder: Path) -> dict[str, str]:
    sums_path = folder / CHECKSUM_FILE
    try:
        text = sums_path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise MedldmError(f"no {CHECKSUM_FILE} file: cannot verify the weights", folder) from error
    except (OSError, UnicodeDecodeError) as error:
        raise MedldmError(f"cannot read checksums: {error}", sums_path) from error
    sums = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if match is None:
            raise MedldmError(f"line {number} is not '<sha256>  <filename>'", sums_path)
        sums[match.group(2).strip()] = match.group(1).lower()
    if not sums:
        raise MedldmError("lists no files", sums_path)
    return sums


def _check(path: Path, expected: str, what: str) -> None:
    actual = sha256(path)
    if not actual.startswith(expected):
        raise MedldmError(
            f"checksum mismatch ({what}): SHA-256 is {actual}, expected {expected}; the file is corrupt or was "
            "replaced, get a fresh copy",
            path,
        )


def verify_checksums(folder: str | os.PathLike, names: list[str] | None = None) -> dict[str, str]:
    """Check files in ``folder`` against its ``SHA256SUMS`` (lines ``<sha256>  <filename>``).

    Args:
        folder: the weights folder.
        names: the files to check (each must be listed); default every listed file (each must exist).

    Returns:
        {filename: sha256} of the files checked.

    Raises:
        MedldmError: naming the file whose checksum differs, is not listed or that is missing, or naming
            SHA256SUMS when it is missing or malformed.
    """
    folder = Path(folder)
    sums = _read_checksums(folder)
    for name in names if names is not None else list(sums):
        if name not in sums:
            raise MedldmError(f"not listed in {folder / CHECKSUM_FILE}: cannot verify it", folder / name)
        if not (folder / name).is_file():
            raise MedldmError(f"listed in {CHECKSUM_FILE} but missing", folder / name)
        _check(folder / name, sums[name], CHECKSUM_FILE)
    return {name: sums[name] for name in (names if names is not None else sums)}


def _verify(path: Path, sums: Mapping[str, str] | None, known_as: str | None = None) -> None:
    """Verify one file: by SHA256SUMS when it lists it, else by a known checksum, else by a torchvision name."""
    known_as = known_as or path.name
    if sums is not None and path.name in sums:
        _check(path, sums[path.name], CHECKSUM_FILE)
    elif known_as in _KNOWN_SHA256:
        _check(path, _KNOWN_SHA256[known_as], f"known checksum of {known_as}")
    elif (match := _TORCHVISION_NAME.search(path.name)) is not None:
        _check(path, match.group(1), "hash prefix in torchvision's file name")
    else:
        raise MedldmError(f"cannot verify this file: list its SHA-256 in {CHECKSUM_FILE} beside it", path)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors: all mean "not a usable weights file"
        raise MedldmError(f"cannot load weights: {error}", path) from error
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise MedldmError("not a state dict of tensors", path)
    return dict(state)


def _build(net: str, backbone: Path, heads: Path, heads_in_folder: bool, folder: Path) -> lpips.LPIPS:
    sums = _read_checksums(folder) if (folder / CHECKSUM_FILE).is_file() else None
    _verify(backbone, sums)
    _verify(heads, sums if heads_in_folder else None, known_as=_NETS[net].heads_file)

    # torchvision's full file also holds the classifier, which LPIPS does not use.
    features = {k: v for k, v in _torch_load(backbone).items() if k.startswith("features.")}
    if not features:
        raise MedldmError("no features.* tensors: not a torchvision backbone state dict", backbone)
    head_state = _torch_load(heads)

    # pnet_rand=True: no backbone download; pretrained=False: the heads are loaded below from the verified file.
    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" warnings, raised inside lpips
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.")
        model = lpips.LPIPS(pretrained=False, net=net, version="0.1", pnet_rand=True, verbose=False)

    # lpips keeps torchvision's feature indices inside its slices: features.{i}.* -> net.slice{k}.{i}.*
    owner = {index: name for name, part in model.net.named_children() for index, _ in part.named_children()}
    state = {}
    for key, tensor in features.items():
        _, index, rest = key.split(".", 2)
        if index not in owner:
            raise MedldmError(f"unexpected backbone tensor {key!r} for LPIPS-{net}", backbone)
        state[f"net.{owner[index]}.{index}.{rest}"] = tensor
    state.update(head_state)
    try:
        _, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatch
        raise MedldmError(f"weights do not fit LPIPS-{net}: {error}", backbone) from error
    # lpips registers every head twice (lin{k} and lins.{k}); named_parameters() lists each tensor once.
    not_loaded = sorted(name for name, _ in model.named_parameters() if name not in state)
    if not_loaded or unexpected:
        raise MedldmError(
            f"weights do not fit LPIPS-{net}: tensors not loaded {not_loaded}, unexpected tensors {sorted(unexpected)}",
            folder,
        )
    model.eval()
    model.requires_grad_(False)
    return model


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def load_lpips(
    net: str = "alex", weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> lpips.LPIPS:
    """The official ``lpips.LPIPS`` module with the real backbone and heads, in eval mode, frozen.

    Args:
        net: "alex"; "vgg" and "squeeze" only where their torchvision backbone files are found.
        weights: the weights folder (see :func:`find_lpips_weights`).
        device: where the module lives.

    Returns:
        A cached module, shared by every call with the same (net, folder, device) while the files are unchanged:
        do not train, move or modify it (PerceptualLoss takes its own copy).

    Raises:
        MedldmError: weights missing, failing their checksums or not fitting the network.
    """
    _net_files(net)
    folder = find_lpips_weights(weights, net=net)
    backbone = cast(Path, _backbone_file(folder, net))  # find_lpips_weights only returns folders that have it
    heads, heads_in_folder = _heads_file(folder, net)
    if not heads.is_file():
        raise MedldmError(f"no LPIPS heads: expected {_expected_files(net)}", folder)
    sums = folder / CHECKSUM_FILE
    device = torch.device(device)
    key = (net, str(folder.resolve()), str(device), _stamp(backbone), _stamp(heads), sums.is_file() and _stamp(sums))
    with _CACHE_LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = _build(net, backbone, heads, heads_in_folder, folder).to(device)
            _CACHE[key] = model
    return model


def _to_lpips_input(x: torch.Tensor, dtype: torch.dtype, min_size: int, resize: bool) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] with C = 1 or 3 -> (N, 3, H', W') in [-1, 1]."""
    if x.shape[1] not in (1, 3):
        raise MedldmError(f"LPIPS needs 1 (greyscale) or 3 (RGB) channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    x = x.to(dtype)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    height, width = x.shape[-2:]
    if min(height, width) < min_size:
        if not resize:
            raise MedldmError(f"images must be at least {min_size} pixels on each side for LPIPS, got {height}x{width}")
        scale = min_size / min(height, width)
        size = (max(min_size, int(np.ceil(height * scale))), max(min_size, int(np.ceil(width * scale))))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return 2 * x - 1


class PerceptualLoss(torch.nn.Module):
    """Mean LPIPS between greyscale (or RGB) images or volumes in [0, 1], for training; frozen real weights.

    ``forward(input, target)`` takes (B, C, H, W) or (B, C, D, H, W) tensors with C = 1 (repeated to 3) or 3,
    intensities in [0, 1] (mapped to [-1, 1] for LPIPS; not clipped, so gradients reach values outside it), and
    returns the mean LPIPS as a 0-d tensor, differentiable with respect to both inputs. Volumes are cut into
    slices along each of the three axes (D, H and W); the loss is the mean over the three planes of the mean
    over their slices. Slices or images with a side shorter than the backbone accepts (31 pixels for AlexNet)
    are upsampled bilinearly to that size.

    The LPIPS network is deliberately not a registered submodule: it is absent from ``parameters()`` and
    ``state_dict()`` (checkpoints of a model holding this loss stay small and loadable without it), and
    ``model.train()`` cannot switch on the dropout of its heads. ``.to()``, ``.cuda()``, ``.half()`` etc.
    still move and cast it.

    Args:
        net: LPIPS backbone, "alex" by default.
        weights: the weights folder (see :func:`find_lpips_weights`).
        slices_per_plane: for volumes, how many slices per plane to draw at random (torch's global RNG, the
            same slices for input and target) at each call; None uses every slice.
    """

    lpips: lpips.LPIPS  # set with object.__setattr__ in __init__, not a submodule

    def __init__(
        self,
        net: str = "alex",
        weights: str | os.PathLike | None = None,
        *,
        slices_per_plane: int | None = None,
    ):
        super().__init__()
        if slices_per_plane is not None and slices_per_plane < 1:
            raise MedldmError(f"slices_per_plane must be a positive number or None, got {slices_per_plane}")
        self.net = net
        self.slices_per_plane = slices_per_plane
        self.min_size = _net_files(net).min_size
        # A private copy of the cached module, kept out of _modules (see the class docstring).
        object.__setattr__(self, "lpips", copy.deepcopy(load_lpips(net, weights, device="cpu")))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.lpips._apply(fn)
        return self

    def extra_repr(self) -> str:
        return f"net={self.net!r}, slices_per_plane={self.slices_per_plane}"

    def _mean_lpips(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = self.lpips.scaling_layer.shift.dtype
        x = _to_lpips_input(x, dtype, self.min_size, resize=True)
        y = _to_lpips_input(y, dtype, self.min_size, resize=True)
        return self.lpips(x, y).mean()

    def _plane(self, x: torch.Tensor, y: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slices across ``axis`` (2, 3 or 4) of (B, C, D, H, W) volumes, as a (B * n, C, h, w) batch."""
        count = x.shape[axis]
        if self.slices_per_plane is not None and self.slices_per_plane < count:
            index = torch.randperm(count)[: self.slices_per_plane].to(x.device)
            x, y = x.index_select(axis, index), y.index_select(axis, index)

        def flatten(v: torch.Tensor) -> torch.Tensor:
            v = v.movedim(axis, 1)  # (B, n, C, h, w)
            return v.reshape(-1, *v.shape[2:])

        return flatten(x), flatten(y)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise MedldmError(f"input and target shapes differ: {tuple(input.shape)} vs {tuple(target.shape)}")
        if input.ndim == 4:
            return self._mean_lpips(input, target)
        if input.ndim == 5:
            planes = [self._mean_lpips(*self._plane(input, target, axis)) for axis in (2, 3, 4)]
            return torch.stack(planes).mean()
        raise MedldmError(f"expected (B, C, H, W) or (B, C, D, H, W) tensors, got shape {tuple(input.shape)}")


def _as_image(x, name: str) -> torch.Tensor:
    """An HxW or HxWx3 (or HxWx1) array or tensor in [0, 1] -> (1, C, H, W) float32 tensor."""
    if torch.is_tensor(x):
        image = x.detach()
    else:
        array = np.asarray(x)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise MedldmError(f"{name} must be a numeric array, got dtype {array.dtype}")
        image = torch.from_numpy(np.ascontiguousarray(array))
    if image.is_complex():
        raise MedldmError(f"{name} must be real-valued")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise MedldmError(f"{name} must be an HxW greyscale or HxWx3 RGB image, got shape {tuple(image.shape)}")
    image = image.to(torch.float32)
    if not torch.isfinite(image).all():
        raise MedldmError(f"{name} holds NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < -1e-4 or high > 1 + 1e-4:
        raise MedldmError(f"{name} must hold values in [0, 1], got [{low:.4g}, {high:.4g}]: normalise or clip it first")
    return image.clamp(0, 1).permute(2, 0, 1)[None]


def lpips_distance(x, y, *, net: str = "alex", weights: str | os.PathLike | None = None) -> float:
    """LPIPS distance between two 2D images with values in [0, 1].

    Args:
        x, y: HxW greyscale or HxWx3 RGB numpy arrays or tensors of the same shape; greyscale is repeated to
            3 channels. Each side must be at least 31 pixels (AlexNet); images are never resized.
        net: LPIPS backbone, "alex" by default.
        weights: the weights folder (see :func:`find_lpips_weights`).

    Raises:
        MedldmError: bad shapes or values, or missing/corrupt weights.
    """
    a, b = _as_image(x, "x"), _as_image(y, "y")
    if a.shape != b.shape:
        raise MedldmError(f"images differ in shape: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])} (C, H, W)")
    min_size = _net_files(net).min_size
    a = _to_lpips_input(a, torch.float32, min_size, resize=False)
    b = _to_lpips_input(b, torch.float32, min_size, resize=False)
    model = load_lpips(net, weights, device=a.device)
    with torch.no_grad():
        return float(model(a, b.to(a.device)).item())
