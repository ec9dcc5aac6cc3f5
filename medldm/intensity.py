"""Intensity normalisation with its parameters kept, so every mapping has an exact inverse.

MRI has no absolute scale: percentiles of the foreground are mapped to [0, 1]. CT is in Hounsfield units:
a window (centre, width) is mapped to [0, 1]. Neither clips, so ``inverse(forward(x)) == x`` up to float
rounding; models that want a bounded input clip themselves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from medldm.errors import MedldmError

__all__ = ["IntensityTransform", "normaliser", "percentile_scaling", "hu_window", "CT_WINDOWS", "guess_modality"]

# Common CT windows (centre, width) in HU.
CT_WINDOWS = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "bone": (600.0, 2800.0),
    "soft-tissue": (50.0, 400.0),
    "lung": (-600.0, 1500.0),
    "head": (400.0, 2800.0),
}


MAX_INTENSITY = 1e30  # far beyond any real scan (HU, MR signal), far below float32's 3.4e38


@dataclass(frozen=True)
class IntensityTransform:
    """``y = (x - low) / (high - low)``; ``x = y * (high - low) + low``. Stored in checkpoints and outputs.

    Args:
        kind: "percentile" (MRI) or "window" (CT), for the record.
        low: input value mapped to 0.
        high: input value mapped to 1.
    """

    kind: str
    low: float
    high: float

    def __post_init__(self):
        if not (np.isfinite(self.low) and np.isfinite(self.high)) or self.high <= self.low:
            raise MedldmError(f"intensity range [{self.low}, {self.high}] is empty: a constant image?")
        if max(abs(self.low), abs(self.high)) > MAX_INTENSITY:  # outputs may overshoot: float32 would overflow
            raise MedldmError(
                f"intensities reach {max(abs(self.low), abs(self.high)):.3g}, beyond the "
                f"{MAX_INTENSITY:.0e} float32 arithmetic can upscale safely; rescale the scan"
            )

    def forward(self, x):
        return (x - self.low) / (self.high - self.low)

    def inverse(self, y, *, out=None):
        """Back to the scan's intensities; ``out=y`` writes over ``y`` instead of allocating (volumes are large)."""
        if out is None:
            return y * (self.high - self.low) + self.low
        np.multiply(y, self.high - self.low, out=out)
        out += self.low
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IntensityTransform:
        return cls(str(d["kind"]), float(d["low"]), float(d["high"]))


def percentile_scaling(
    data: np.ndarray, *, lower: float = 0.5, upper: float = 99.5, foreground_only: bool = True
) -> IntensityTransform:
    """MRI: map the ``lower`` and ``upper`` percentiles of the (non-zero) voxels to 0 and 1.

    ``low`` is 0 when the image has a zero background, so the background stays exactly 0.
    """
    values = np.asarray(data, dtype=np.float64)
    fg = values[values > values.min()] if foreground_only else values.ravel()
    if fg.size == 0:
        raise MedldmError("the image is constant: nothing to normalise")
    low, high = np.percentile(fg, [lower, upper])
    if values.min() >= 0:
        low = 0.0
    return IntensityTransform("percentile", float(low), float(high))


def hu_window(
    *, centre: float | None = None, width: float | None = None, preset: str | None = None
) -> IntensityTransform:
    """CT: map the window ``[centre - width/2, centre + width/2]`` (HU) to [0, 1]; presets in ``CT_WINDOWS``."""
    if preset is not None:
        if preset not in CT_WINDOWS:
            raise MedldmError(f"unknown CT window {preset!r}; choose from {', '.join(CT_WINDOWS)}")
        centre, width = CT_WINDOWS[preset]
    if centre is None or width is None or width <= 0:
        raise MedldmError("a CT window needs a centre and a positive width (HU)")
    return IntensityTransform("window", centre - width / 2.0, centre + width / 2.0)


def normaliser(settings, data: np.ndarray) -> IntensityTransform:
    """The intensity transform a model's settings (its config's ``data.intensity``: kind, lower/upper percentiles or
    a CT window preset) ask for, fitted to one scan."""
    if settings.kind == "window":
        return hu_window(preset=settings.window or "brain")
    return percentile_scaling(data, lower=settings.lower, upper=settings.upper)


def guess_modality(data: np.ndarray, hint: str | None = None) -> str:
    """ "CT" or "MR": the DICOM Modality when known, else CT if air sits near -1000 HU."""
    if hint:
        return "CT" if hint.upper() == "CT" else "MR"
    return "CT" if float(np.percentile(data, 1)) < -500 else "MR"
