"""Training data: (HR, LR) pairs made on the fly from real Volumes with the shared forward model.

A batch is a pure function of (seed, step, rank), so a run resumed at step k draws exactly the batches an
uninterrupted run would, and data-parallel ranks draw different ones. Slices (2D) come from all three planes;
patches (3D) from anywhere; both are biased towards the foreground. With ``data.slab`` > 1 (2D, "2.5D") the LR
condition holds the target plane and its neighbours along the slicing axis, one channel each.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import torch

from medldm.config import Config, resolve_sources
from medldm.degrade import add_rician_noise, make_operator
from medldm.errors import MedldmError
from medldm.intensity import normaliser
from medldm.nets import MODALITIES, geometry_features
from medldm.resample import upsample
from medldm.spec import THICK_ONLY
from medldm.volume import load

__all__ = [
    "TrainingVolume",
    "load_volumes",
    "PairSampler",
    "random_contrast",
    "PassEstimate",
    "pass_estimates",
    "LaterPassSampler",
]

FOREGROUND_LEVEL = 0.05  # normalised intensity above which a voxel counts as foreground
FOREGROUND_SAMPLES = 20000  # foreground coordinates kept per volume for biased sampling


@dataclass
class TrainingVolume:
    name: str
    data: np.ndarray  # canonical (RAS) orientation, normalised, float16
    modality: int  # index into nets.MODALITIES
    foreground: np.ndarray  # (N, 3) voxel coordinates above FOREGROUND_LEVEL

    def __post_init__(self):
        # C order: a slab (np.take) of a Fortran-ordered volume (nibabel's) copies the whole volume first, which
        # made a batch 3-5x slower
        self.data = np.ascontiguousarray(self.data)


def _prepare(path: Path, modality: str, config: Config) -> TrainingVolume:
    vol = load(path).to_canonical()
    data = normaliser(config.data.intensity, vol.data).forward(vol.data).astype(np.float16)
    coords = np.argwhere(data > FOREGROUND_LEVEL)
    if len(coords) > FOREGROUND_SAMPLES:
        coords = coords[np.random.default_rng(0).choice(len(coords), FOREGROUND_SAMPLES, replace=False)]
    return TrainingVolume(path.name, data, MODALITIES.index(modality), coords.astype(np.int32))


def load_volumes(
    config: Config, root: Path, *, split: str = "train", cache: Path | None = None, progress=None
) -> list[TrainingVolume]:
    """Load and normalise the split's scans, through an HDF5 cache when ``cache`` is given.

    Args:
        progress: optional callable(done, total) for a progress bar.
    """
    train, validation = resolve_sources(config, root)
    items = train if split == "train" else validation
    h5 = None
    if cache is not None:
        import h5py

        cache.parent.mkdir(parents=True, exist_ok=True)
        h5 = h5py.File(cache, "a")
    key_settings = config.data.intensity.model_dump_json()
    volumes = []
    try:
        for i, (path, modality) in enumerate(items):
            stat = os.stat(path)
            key = f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}"
            if h5 is not None and key in h5 and h5[key].attrs.get("intensity") == key_settings:
                g = h5[key]
                volumes.append(TrainingVolume(path.name, g["data"][()], int(g.attrs["modality"]), g["fg"][()]))
            else:
                tv = _prepare(path, modality, config)
                volumes.append(tv)
                if h5 is not None:
                    if key in h5:
                        del h5[key]
                    g = h5.create_group(key)
                    g.create_dataset("data", data=tv.data, compression="lzf")
                    g.create_dataset("fg", data=tv.foreground)
                    g.attrs["modality"], g.attrs["intensity"] = tv.modality, key_settings
            if progress is not None:
                progress(i + 1, len(items))
    finally:
        if h5 is not None:
            h5.close()
    return volumes


def random_contrast(data: np.ndarray, rng: np.random.Generator, *, knots: int = 6) -> np.ndarray:
    """``data`` (normalised intensities) through a random piecewise-linear intensity curve: values at ``knots``
    evenly spaced levels in [0, 1] drawn uniformly, 0 kept at 0 (background stays dark), the curve scaled to a
    maximum of 1, levels outside [0, 1] held at the end values. It can invert or reorder tissues (T1 to T2- or
    FLAIR-like), so a network trained on T1 sees many contrasts of the same anatomy (as in SynthSR)."""
    levels = np.linspace(0.0, 1.0, knots)
    values = rng.uniform(0.0, 1.0, knots)
    values[0] = 0.0
    values /= max(float(values.max()), 1e-3)
    return np.interp(data, levels, values).astype(data.dtype)


class PairSampler:
    """Draws batches of (HR patch, interpolated LR patch, task, modality) from training volumes.

    ``batch()["hr"]`` is (B, 1, *patch); ``batch()["lr"]`` is (B, slab, *patch): for 2D slabs, channel k is the
    degraded plane ``centre - slab // 2 + k`` (replicated at the volume border), so the centre plane is channel
    ``slab // 2``; otherwise one channel.
    """

    def __init__(
        self,
        volumes: list[TrainingVolume],
        config: Config,
        *,
        rank: int = 0,
        slab: int | None = None,
        tasks=None,
        plane_axes: tuple[int, ...] | None = None,
        thick_axes: tuple[int, ...] | None = None,
        spatial_dims: int | None = None,
    ):
        if not volumes:
            raise MedldmError("no training volumes")
        self.volumes, self.config, self.rank = volumes, config, rank
        self.dims = spatial_dims or config.data.spatial_dims  # a 3D estimator draws 3D patches beside 2D models
        self.tasks = tasks or config.data.tasks  # batch["task"] indexes this list (--adapt: the scan's own task)
        self.slab = slab or config.data.slab  # the estimator sees its own slab
        self.plane_axes = plane_axes  # 2D: planes are cut across one of these axes (None: any of the three)
        self.thick_axes = thick_axes  # thick slices along one of these patch axes (None: any)

    def patch_size(self, step: int, progressive: list[list[int]] | None = None) -> tuple[int, ...]:
        """The configured patch size, or the progressive-growing size scheduled for this step."""
        for entry in progressive or []:
            if step < entry[0]:
                return tuple(entry[1:]) if len(entry) > 2 else (entry[1],) * self.dims
        return tuple(self.config.data.patch_size)

    def batch(self, step: int, batch_size: int, patch_size=None, *, stream: int = 0) -> dict[str, torch.Tensor]:
        """Batch number ``step`` of this rank; ``stream`` picks an independent sequence (e.g. for measurements)."""
        rng = np.random.default_rng([self.config.training.seed, step, self.rank, stream])
        # the contrast augmentation draws from its own stream, so the patches are the same with it and without
        looks = np.random.default_rng([self.config.training.seed, step, self.rank, stream, 1])
        size = tuple(patch_size or self.config.data.patch_size)
        hr, lr, task, modality, axes, scales, thicknesses = [], [], [], [], [], [], []
        for _ in range(batch_size):
            vol = self.volumes[rng.integers(len(self.volumes))]
            t = int(rng.integers(len(self.tasks)))
            h, low, axis, scale, thickness = self._pair(vol, self.tasks[t], size, rng, looks)
            hr.append(h)
            lr.append(low)
            task.append(t)
            modality.append(vol.modality)
            axes.append(-1 if axis is None else axis)
            scales.append(scale)
            thicknesses.append(thickness)
        return {
            "hr": torch.stack(hr)[:, None],
            "lr": torch.stack(lr),
            "task": torch.tensor(task),
            "modality": torch.tensor(modality),
            "geometry": geometry_features(scales, thicknesses),
            # each sample's forward model (with its task): the slice axis of the patch (-1: the in-plane kinds),
            # the exact factor and the slice thickness / spacing
            "axis": torch.tensor(axes),
            "scale": torch.tensor(scales, dtype=torch.float64),
            "thickness": torch.tensor(thicknesses, dtype=torch.float64),
        }

    @staticmethod
    def _geometry(task, rng) -> tuple[float, float]:
        """The factor and slice thickness / spacing of one sample: the task's, or for a share of the samples of a
        task with ranges, drawn from them (factor log-uniform, thickness uniform)."""
        if not (task.scale_range or task.thickness_range) or rng.random() >= task.range_share:
            return task.scale, 1.0
        lo, hi = task.scale_range or (task.scale, task.scale)
        scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        lo, hi = task.thickness_range or (1.0, 1.0)
        return scale, float(rng.uniform(lo, hi))

    def _pair(
        self, vol: TrainingVolume, task, size, rng: np.random.Generator, looks: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, int | None, float, float]:
        """One HR patch (*size), its interpolated LR channels (C, *size), and the slice axis (None for the in-plane
        kinds in 2D), exact factor and slice thickness / spacing used. The RNG draws do not depend on the slab, so a
        slab's centre channel is exactly the slab-1 LR patch of the same draw; ``looks`` draws the contrast
        augmentation."""
        data = vol.data
        if self.dims == 2:
            axes = self.plane_axes or (0, 1, 2)
            plane_axis = axes[int(rng.integers(len(axes)))]  # slice perpendicular to this axis
        centre = (
            vol.foreground[rng.integers(len(vol.foreground))]
            if len(vol.foreground) and rng.random() < self.config.data.foreground_fraction
            else np.array([rng.integers(n) for n in data.shape])
        )
        if self.dims == 2:
            # the slab of planes around the centre, index clamped at the border (the pipeline's rule too)
            r = self.slab // 2
            index = np.clip(np.arange(-r, r + 1) + int(centre[plane_axis]), 0, data.shape[plane_axis] - 1)
            data = np.moveaxis(np.take(data, index, axis=plane_axis), plane_axis, 0)  # (slab, H, W)
            centre = np.delete(centre, plane_axis)
        else:
            r, data = 0, data[None]  # one channel
        # degraded axes: one in-plane axis for thick slices (random orientation), all axes otherwise
        scale, thickness = task.scale, 1.0
        axis: int | None
        if task.kind == "slice-profile":
            axes = self.thick_axes or tuple(range(self.dims))
            axis = axes[int(rng.integers(len(axes)))]
            scale, thickness = self._geometry(task, rng)
            degraded = [axis]
        else:
            axis = None if self.dims == 2 else int(rng.integers(3))
            degraded = [a for a in range(self.dims) if a != axis]
        region = self._region(data, centre, size, degraded, scale, rng)
        if task.kind == "slice-profile":  # the exact factor of the region's whole LR samples (docs/grids.md)
            n = region.shape[1 + cast(int, axis)]  # set for slice-profile above
            scale = n / round(n / scale) if not isinstance(scale, int) else scale
        op = make_operator(
            task.kind, axis=axis, scale=scale, spatial_dims=self.dims, profile=task.profile, thickness=thickness
        )
        share = self.config.data.contrast_augmentation
        if share > 0 and looks.random() < share:
            region = random_contrast(region, looks)
        hr = torch.from_numpy(region.astype(np.float32))  # (C, *spatial)
        if rng.random() < 0.5:  # mirror augmentation, the same for every plane of a slab
            hr = hr.flip(1 + int(rng.integers(self.dims)))
        if self.config.data.noise > 0:
            # every plane through the same operator and noise level, one at a time; the centre plane first, so that
            # it draws the same noise as it would alone
            g = torch.Generator().manual_seed(int(rng.integers(2**31)))
            sigma = float(rng.random()) * self.config.data.noise
            up_planes: list[torch.Tensor | None] = [None] * len(hr)
            for k in [r, *(k for k in range(len(hr)) if k != r)]:
                low = add_rician_noise(op.forward(hr[k]), sigma, generator=g)
                up_planes[k] = upsample(low[None, None], hr.shape[1:])[0, 0]
            up = torch.stack(cast(list[torch.Tensor], up_planes))  # the loop set every plane
        else:  # no noise to draw in order: the whole slab in one call (the same values, faster)
            up = upsample(op.forward(hr)[:, None], hr.shape[1:])[:, 0]
        margin = [(m - s) // 2 for m, s in zip(hr.shape[1:], size, strict=True)]
        crop = tuple(slice(m, m + s) for m, s in zip(margin, size, strict=True))
        return hr[r][crop].contiguous(), up[(slice(None), *crop)].contiguous(), axis, scale, thickness

    @staticmethod
    def _region(data, centre, size, degraded, scale, rng) -> np.ndarray:
        """The patch around ``centre`` plus a margin, zero-padded at the volume border; degraded axes hold whole LR
        samples (a multiple of an integer ``scale``; ``round(m * scale)`` voxels otherwise) so the operator
        applies, and the margin keeps edge effects out of the patch. ``data`` is (C, *spatial): every channel is
        cut the same way."""
        starts, stops, pads = [], [], []
        for a, (n, c, s) in enumerate(zip(data.shape[1:], centre, size, strict=True)):
            margin = 2 * math.ceil(scale) if a in degraded else 0
            length = s + 2 * margin
            if a in degraded and isinstance(scale, int):
                length += (-length) % scale
            elif a in degraded:
                length = round(math.ceil(length / scale) * scale)
            start = int(c) - length // 2 + int(rng.integers(-s // 4, s // 4 + 1))
            lo, hi = max(start, 0), min(start + length, n)
            starts.append(lo)
            stops.append(hi)
            pads.append((lo - start, start + length - hi))
        region = data[(slice(None), *(slice(a, b) for a, b in zip(starts, stops, strict=True)))]
        return np.pad(region, [(0, 0), *pads])


@dataclass
class PassEstimate:
    """One training volume thickened along ``axis`` (a thick-slice task of the config) and the trained passes'
    consistent estimate of it: the input the next pass learns from, and its truth (both normalised, float16)."""

    estimate: np.ndarray
    truth: np.ndarray
    task: int  # index into the config's tasks
    axis: int
    volume: TrainingVolume
    scale: float | None = None  # the exact factor, where it is not the task's (a scan's own pairs, medldm.adapt)
    thickness: float = 1.0  # slice thickness / spacing of the pairs

    def __post_init__(self):  # C order, as TrainingVolume's
        self.estimate, self.truth = np.ascontiguousarray(self.estimate), np.ascontiguousarray(self.truth)


def pass_estimates(
    volumes: list[TrainingVolume],
    config: Config,
    passes: Sequence,
    cache: Path,
    *,
    earlier: list[PassEstimate] | None = None,
    kinds: Sequence[str] = THICK_ONLY,
    progress=None,
) -> list[PassEstimate]:
    """The consistent estimate after ``passes`` (the estimator, then its later passes in order, each run as
    inference runs it and then projected) of every training volume degraded by each task of ``kinds``: thickened
    along each axis (both stacks of planes across the other axes), or k-space truncated across each axis (the
    planes across it), through an HDF5 ``cache`` kept for resumed runs; a cache made with other weights is
    rebuilt. Only the last pass runs: on the interpolated input (the estimator alone) or on ``earlier``.
    ``PassEstimate.axis`` is the thick axis, or for k-space the axis the acquired planes are cut across.

    Args:
        earlier: this function's result for ``passes[:-1]`` (same volumes and kinds); needed when there are later
            passes.
        kinds: the task kinds to degrade with (those of the pass that learns from the estimates).
        progress: optional callable(done, total) for a progress bar.
    """
    import hashlib

    import h5py

    from medldm.degrade import enforce_consistency
    from medldm.nets import ConditionCodec
    from medldm.pipeline import estimate_planes, interpolated, planes_of, planes_per_call

    weights = hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for net in passes for t in net.state_dict().values()))
    codec, device = ConditionCodec(config), next(passes[0].parameters()).device
    tasks = [(i, t) for i, t in enumerate(config.data.tasks) if t.kind in kinds]
    if not tasks:
        raise MedldmError(f"later passes learn {', '.join(kinds)}, but the config has no such task")
    cache.parent.mkdir(parents=True, exist_ok=True)
    items: list[PassEstimate] = []
    with h5py.File(cache, "a") as h5:
        if h5.attrs.get("estimator") != weights.hexdigest():
            for key in list(h5):
                del h5[key]
            h5.attrs["estimator"] = weights.hexdigest()
        todo = [(v, i, t, a) for v in volumes for i, t in tasks for a in range(3)]
        if len(passes) > 1 and (earlier is None or len(earlier) != len(todo)):
            raise MedldmError(f"a later pass needs the earlier passes' estimates of all {len(todo)} items")
        for done, (vol, index, task, axis) in enumerate(todo, 1):
            key = f"{vol.name}/{index}/{axis}"
            if key not in h5:
                op = make_operator(task.kind, axis=axis, scale=task.scale, profile=task.profile)
                hr = torch.from_numpy(vol.data.astype(np.float32))
                for d in op.axes:  # whole LR samples along the degraded axes
                    hr = hr.narrow(d, 0, hr.shape[d] - hr.shape[d] % task.scale)
                hr = hr.contiguous()
                lr = op.forward(hr)
                label = int(codec.task_label(index, vol.modality))
                source = interpolated(lr, hr.shape)
                if len(passes) > 1:  # refine the earlier passes' estimate (as float32, as inference would)
                    source = planes_of(torch.from_numpy(cast(list, earlier)[done - 1].estimate.astype(np.float32)))
                net = passes[-1]
                estimate, _ = estimate_planes(
                    (net, None), source, hr.shape, [d for d in range(3) if d not in op.axes], label,
                    geometry_features(task.scale, 1.0), device=device,
                    per_call=partial(planes_per_call, device=device, multiple=net.multiple),
                )  # fmt: skip
                h5.create_dataset(key, data=enforce_consistency(estimate, lr, op).numpy().astype(np.float16))
                h5.flush()
            estimate = h5[key][()]
            truth = vol.data[tuple(slice(0, n) for n in estimate.shape)]  # a view: the estimate's whole LR slices
            items.append(PassEstimate(estimate, truth, index, axis, vol))
            if progress is not None:
                progress(done, len(todo))
    return items


class LaterPassSampler:
    """Batches for a later pass: a slab of planes of the earlier passes' estimate, across one of the two axes that
    are not thick (k-space: across the axis the acquired planes are cut across), and the truth's centre plane,
    cut to the patch size (zero beyond the volume, as the first pass's patches are), mirrored at random; biased
    towards the foreground like :class:`PairSampler`. A batch is a pure function of (seed, step, rank, stream)."""

    def __init__(self, items: list[PassEstimate], config: Config, *, slab: int, rank: int = 0, across=None):
        if not items:
            raise MedldmError("no earlier estimates to train a later pass on")
        self.items, self.config, self.slab, self.rank = items, config, slab, rank
        self.tasks = config.data.tasks
        self.across = across  # planes are cut across one of these axes (None: either axis that is not thick)

    def patch_size(self, step: int, progressive=None) -> tuple[int, ...]:
        """The configured patch size (the first pass's estimates do not grow)."""
        return tuple(self.config.data.patch_size)

    def batch(self, step: int, batch_size: int, patch_size=None, *, stream: int = 0) -> dict[str, torch.Tensor]:
        """Batch number ``step`` of this rank, with the keys of :meth:`PairSampler.batch`."""
        rng = np.random.default_rng([self.config.training.seed, step, self.rank, stream])
        size, r = tuple(patch_size or self.config.data.patch_size), self.slab // 2
        lr, hr, task, modality, scale, thickness, axes = [], [], [], [], [], [], []
        for _ in range(batch_size):
            item = self.items[rng.integers(len(self.items))]
            shape = item.estimate.shape
            thick = self.tasks[item.task].kind == "slice-profile"  # else k-space: the acquired planes only
            choices = (self.across or [d for d in range(3) if d != item.axis]) if thick else [item.axis]
            across = choices[rng.integers(len(choices))]
            fg = item.volume.foreground
            centre = (
                fg[rng.integers(len(fg))]
                if len(fg) and rng.random() < self.config.data.foreground_fraction
                else np.array([rng.integers(n) for n in shape])
            )
            centre = np.minimum(centre, np.array(shape) - 1)  # the estimate may have lost a few end planes
            index = np.clip(np.arange(-r, r + 1) + centre[across], 0, shape[across] - 1)
            corner = np.delete(centre, across) - np.array(size) // 2 + rng.integers(-size[0] // 4, size[0] // 4 + 1, 2)
            factor = item.scale or self.tasks[item.task].scale
            in_plane = [d for d in range(3) if d != across].index(item.axis) if thick else -1  # the thick axis
            if thick and float(factor).is_integer():  # the patch starts at an LR slice's edge, as training pairs do
                corner[in_plane] -= corner[in_plane] % int(factor)
            x = self._cut(np.take(item.estimate, index, axis=across), across, corner, size)
            y = self._cut(np.take(item.truth, index[r : r + 1], axis=across), across, corner, size)
            if rng.random() < 0.5:
                flip = 1 + int(rng.integers(2))
                x, y = np.flip(x, flip), np.flip(y, flip)
            lr.append(torch.from_numpy(np.ascontiguousarray(x)))
            hr.append(torch.from_numpy(np.ascontiguousarray(y)))
            task.append(item.task)
            modality.append(item.volume.modality)
            scale.append(float(factor))
            thickness.append(item.thickness)
            axes.append(in_plane)
        return {
            "hr": torch.stack(hr),
            "lr": torch.stack(lr),
            "task": torch.tensor(task),
            "modality": torch.tensor(modality),
            "geometry": geometry_features(scale, thickness),
            "axis": torch.tensor(axes),
            "scale": torch.tensor(scale, dtype=torch.float64),
            "thickness": torch.tensor(thickness, dtype=torch.float64),
        }

    @staticmethod
    def _cut(block: np.ndarray, across: int, corner, size) -> np.ndarray:
        """(C, *size) float32 from ``block`` (planes across ``across``) at ``corner`` of the plane, zero outside."""
        planes = np.moveaxis(block, across, 0).astype(np.float32)
        out = np.zeros((len(planes), *size), np.float32)
        src = [slice(max(c, 0), min(c + s, n)) for c, s, n in zip(corner, size, planes.shape[1:], strict=True)]
        dst = [slice(a.start - c, a.stop - c) for a, c in zip(src, corner, strict=True)]
        out[(slice(None), *dst)] = planes[(slice(None), *src)]
        return out
