"""What a model was trained on, and how a scan lies outside it.

A model folder's ``model.json`` may carry ``"trained_on"`` (written at export from the training volumes):
modalities, contrasts, body region, the voxel spacings, factors and slice thicknesses it saw, and intensity
statistics in normalised units. Models without that record still know their modalities and factors from their
config. :meth:`TrainingScope.warnings` turns the differences into one line each, for ``medldm upscale`` to
print (or refuse, with ``--strict``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medldm.intensity import guess_modality

__all__ = ["TrainingScope", "scan_statistics", "contrast_hint", "measured_scope"]

FOREGROUND = 0.05  # normalised intensity above which a voxel counts as foreground (as in training)
SPACING_MARGIN = 1.25  # in-plane spacings within this factor of the trained range count as seen
INTENSITY_MARGIN = 0.05  # normalised foreground mean within this of the trained range counts as seen
_CONTRASTS = {
    "t1": "T1",
    "t1w": "T1",
    "mprage": "T1",
    "t1c": "T1",
    "t2": "T2",
    "t2w": "T2",
    "flair": "FLAIR",
    "pd": "PD",
    "pdw": "PD",
    "dwi": "DWI",
    "swi": "SWI",
}


def contrast_hint(*names: str | None) -> str | None:
    """The MR contrast a file name, BIDS suffix or DICOM series description names (``sub-1_T2w``, ``ax FLAIR``,
    ``remind_t2_space``), or None when none says."""
    for name in names:
        for token in re.split(r"[^a-z0-9]+", (name or "").lower()):
            for key in (token, token.removesuffix("space"), token.removesuffix("tse")):
                if key in _CONTRASTS:
                    return _CONTRASTS[key]
    return None


def scan_statistics(normalised: np.ndarray) -> dict[str, float]:
    """Intensity statistics of a scan in the model's normalised units: the mean of its foreground."""
    fg = normalised[normalised > FOREGROUND]
    return {"foreground_mean": float(fg.mean()) if fg.size else 0.0}


@dataclass(frozen=True)
class TrainingScope:
    modalities: tuple[str, ...] = ("MR",)
    contrasts: tuple[str, ...] | None = None  # None: not recorded
    region: str | None = None
    factors: dict[str, tuple[float, ...]] = field(default_factory=dict)  # per degradation kind
    # per kind, the factor ranges its tasks drew from (scale_range); a factor inside one counts as seen
    factor_ranges: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    thickness: tuple[float, float] = (1.0, 1.0)  # slice thickness / spacing, min and max
    spacing_mm: tuple[float, float] | None = None  # voxel spacings of the training volumes, min and max
    foreground_mean: tuple[float, float] | None = None  # scan_statistics over the training volumes, min and max

    @classmethod
    def of(cls, config, info: dict) -> TrainingScope:
        """The scope recorded in ``model.json`` (``info``), completed from the config for older models."""
        factors: dict[str, list[float]] = {}
        ranges: dict[str, list[tuple[float, float]]] = {}
        thickness = [1.0, 1.0]
        for task in config.data.tasks:
            factors.setdefault(task.kind, []).append(task.scale)
            if task.scale_range is not None:
                ranges.setdefault(task.kind, []).append(tuple(task.scale_range))
            if task.thickness_range is not None:
                thickness = [min(thickness[0], task.thickness_range[0]), max(thickness[1], task.thickness_range[1])]
        derived: dict[str, Any] = {
            # a training config's sources say it; a bare model spec has none
            "modalities": tuple(sorted({s.modality for s in getattr(config.data, "sources", ())})) or ("MR",),
            "factors": {k: tuple(sorted(v)) for k, v in factors.items()},
            "factor_ranges": {k: tuple(sorted(v)) for k, v in ranges.items()},
            "thickness": tuple(thickness),
        }
        derived["contrasts"] = tuple(config.data.contrasts) if config.data.contrasts else None
        derived["region"] = config.data.region
        recorded = info.get("trained_on", {})
        values = {**derived, **{k: v for k, v in recorded.items() if k in cls.__dataclass_fields__}}
        for key in ("modalities", "contrasts", "thickness", "spacing_mm", "foreground_mean"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        values["factors"] = {k: tuple(v) for k, v in values["factors"].items()}
        values["factor_ranges"] = {k: tuple(tuple(r) for r in v) for k, v in values["factor_ranges"].items()}
        return cls(**values)

    def to_json(self) -> dict:
        return asdict(self)

    def knows_factor(self, kind: str, scale: float) -> bool:
        """Whether the model was trained at this factor of this kind (one of its factors, or inside a range)."""
        trained, ranges = self.factors.get(kind, ()), self.factor_ranges.get(kind, ())
        return any(abs(scale - f) < 1e-6 for f in trained) or any(lo <= scale <= hi for lo, hi in ranges)

    def warnings(self, volume, plan, *, statistics: dict | None = None) -> list[str]:
        """One line per way ``volume`` (to be upscaled as ``plan``, a medldm.pipeline.Plan) lies outside this
        scope. ``statistics``: :func:`scan_statistics` of the normalised scan, when known."""
        out = []
        modality = guess_modality(volume.data, volume.meta.get("modality"))
        if modality not in self.modalities:
            out.append(f"the scan looks like {modality}; the model was trained on {'/'.join(self.modalities)} only")
        contrast = contrast_hint(
            volume.path and str(volume.path).rsplit("/", 1)[-1], volume.meta.get("series_description")
        )
        if modality == "MR" and self.contrasts and contrast and contrast not in self.contrasts:
            out.append(f"its name says {contrast}; the model was trained on {'/'.join(self.contrasts)}")
        trained, ranges = self.factors.get(plan.task.kind, ()), self.factor_ranges.get(plan.task.kind, ())
        if trained and not self.knows_factor(plan.task.kind, plan.scale):
            listed = ", ".join([f"x{f:g}" for f in trained] + [f"x{lo:g}-{hi:g}" for lo, hi in ranges])
            where = "between" if min(trained) < plan.scale < max(trained) else "outside"
            out.append(
                f"factor x{plan.scale:.3g} lies {where} the trained factors ({listed}); the networks run at "
                f"x{plan.task.scale:g} and their estimate is interpolated onto the output grid (docs/grids.md); "
                "--adapt fine-tunes them to the scan's own slices"
            )
        lo, hi = self.thickness
        if plan.task.kind == "slice-profile" and not lo - 1e-3 <= plan.thickness <= hi + 1e-3:
            kind = "gaps between slices" if plan.thickness < 1 else "overlapping slices"
            seen = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
            out.append(f"slice thickness {plan.thickness:.2f} x the spacing ({kind}); the model was trained on {seen}")
        if self.spacing_mm is not None:
            in_plane = float(np.delete(np.asarray(volume.spacing), plan.axis).min())
            lo, hi = self.spacing_mm
            if not lo / SPACING_MARGIN <= in_plane <= hi * SPACING_MARGIN:
                out.append(f"in-plane spacing {in_plane:.2f} mm; the model was trained on {lo:.2f}-{hi:.2f} mm")
        if self.foreground_mean is not None and statistics is not None:
            lo, hi = self.foreground_mean
            value = statistics["foreground_mean"]
            if not lo - INTENSITY_MARGIN <= value <= hi + INTENSITY_MARGIN:
                out.append(
                    f"normalised foreground mean {value:.2f}; the training scans had {lo:.2f}-{hi:.2f} "
                    "(another contrast or body region?)"
                )
        return out


def measured_scope(config, root, volumes) -> dict:
    """The ``trained_on`` record (model.json) of a model trained on ``config``'s sources under ``root``: the scope
    its config gives, plus the voxel spacings of the source files and the intensity statistics of ``volumes``
    (medldm.data.TrainingVolume: the normalised training scans)."""
    import nibabel as nib

    from medldm.config import resolve_sources

    train, _ = resolve_sources(config, root)
    # nibabel types load() as FileBasedImage (its docs say SpatialImage): the header type has no get_zooms
    spacings = [
        float(z)
        for path, _ in train
        for z in nib.load(str(path)).header.get_zooms()[:3]  # type: ignore[attr-defined]
    ]
    means = [scan_statistics(np.asarray(v.data, dtype=np.float32))["foreground_mean"] for v in volumes]
    record = TrainingScope.of(config, {}).to_json()
    record["spacing_mm"] = [round(min(spacings), 4), round(max(spacings), 4)] if spacings else None
    record["foreground_mean"] = [round(min(means), 4), round(max(means), 4)] if means else None
    return record
