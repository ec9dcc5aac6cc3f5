"""Image-quality metrics with their conventions stated: PSNR, NRMSE, SSIM (per-slice and 3D), LPIPS, masks.

Conventions (reported with every result):
- data range: by default the maximum of the reference volume (fastMRI's convention); pass ``data_range`` for a
  fixed range after normalisation.
- SSIM: scikit-image's implementation (7-voxel uniform window, K1 = 0.01, K2 = 0.03); "2d" averages the SSIM of
  every 2D slice along ``axis``; "3d" is one SSIM over the volume with a 7x7x7 window.
- masks: metrics over the voxels of a boolean mask (e.g. the Otsu foreground of the reference).
- LPIPS: the official ``lpips`` package with the real AlexNet backbone (never random weights); volumes are scored
  slice-wise over the three orthogonal planes, intensities mapped to [0, 1] by the data range.
- Volumetry (a proxy, not a clinical segmentation): a 3-class Gaussian mixture (scikit-learn) fitted to the
  reference's intensities inside the mask and applied unchanged to each prediction; per class, Dice and the
  volume error in %; classes by increasing mean intensity (on T1: CSF, grey matter, white matter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from medldm.errors import MedldmError

__all__ = [
    "psnr",
    "psnr_from_mse",
    "nrmse",
    "ssim",
    "lpips",
    "lpips_volume",
    "foreground_mask",
    "uncertainty_calibration",
    "TissueClasses",
    "TISSUE_CLASSES",
    "PER_CLASS_METRICS",
    "METRIC_INFO",
    "SUMMARY_METRICS",
    "HIGHER_IS_BETTER",
    "Metric",
    "metric_label",
]


def _pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise MedldmError(f"shapes differ: prediction {pred.shape}, reference {ref.shape}")
    if pred.ndim not in (2, 3):
        raise MedldmError(f"expected 2D or 3D arrays, got {pred.ndim}D")
    return pred, ref


def _range(ref: np.ndarray, data_range: float | None) -> float:
    value = float(ref.max()) if data_range is None else float(data_range)
    if not value > 0:
        raise MedldmError(f"data range must be positive, got {value}")
    return value


def psnr(pred, ref, *, data_range: float | None = None, mask=None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(R^2 / MSE)``; R is the reference maximum unless given."""
    pred, ref = _pair(pred, ref)
    diff = (pred - ref) if mask is None else (pred - ref)[np.asarray(mask, bool)]
    return psnr_from_mse(float(np.mean(diff**2)), _range(ref, data_range))


def psnr_from_mse(mse: float, data_range: float) -> float:
    """``10 log10(R^2 / MSE)`` in dB, infinite for a perfect match."""
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def nrmse(pred, ref, *, mask=None) -> float:
    """``||pred - ref|| / ||ref||`` (scikit-image's "euclidean" normalisation), over the mask if given."""
    pred, ref = _pair(pred, ref)
    if mask is not None:
        m = np.asarray(mask, bool)
        pred, ref = pred[m], ref[m]
    return float(np.linalg.norm(pred - ref) / np.linalg.norm(ref))


def ssim(pred, ref, *, data_range: float | None = None, mode: str = "2d", axis: int = 2, mask=None) -> float:
    """Structural similarity. For 3D arrays ``mode="2d"`` averages over slices along ``axis`` and ``"3d"`` is
    volumetric; 2D arrays are scored directly. With a mask, the SSIM map is averaged over the mask voxels (slices
    without mask voxels are skipped)."""
    pred, ref = _pair(pred, ref)
    r = _range(ref, data_range)
    m = None if mask is None else np.asarray(mask, bool)

    def score(p, q, mm):
        if mm is None:
            return structural_similarity(p, q, data_range=r)
        _, full = structural_similarity(p, q, data_range=r, full=True)
        return float(full[mm].mean())

    if pred.ndim == 2 or mode == "3d":
        return float(score(pred, ref, m))
    if mode != "2d":
        raise MedldmError(f"unknown SSIM mode {mode!r}: use 2d or 3d")
    values = []
    for i in range(pred.shape[axis]):
        mm = None if m is None else np.take(m, i, axis=axis)
        if mm is not None and not mm.any():
            continue
        values.append(score(np.take(pred, i, axis=axis), np.take(ref, i, axis=axis), mm))
    return float(np.mean(values))


def lpips(x, y, *, net: str = "alex", weights=None) -> float:
    """LPIPS distance of two 2D images (HxW greyscale or HxWx3 RGB, values in [0, 1])."""
    from medldm.perceptual import lpips_distance

    return lpips_distance(x, y, net=net, weights=weights)


def lpips_volume(
    pred,
    ref,
    *,
    data_range: float | None = None,
    net: str = "alex",
    weights=None,
    max_slices: int | None = 32,
    mask=None,
) -> float:
    """Mean LPIPS over slices of the three orthogonal planes, intensities mapped to [0, 1] by the data range
    (clipped). ``max_slices`` evenly spaced slices per plane (all when None); with a mask, only slices that
    contain mask voxels."""
    import torch

    from medldm.perceptual import load_lpips, min_image_size

    pred, ref = _pair(pred, ref)
    if pred.ndim != 3:
        raise MedldmError("lpips_volume needs 3D arrays; use lpips() for 2D images")
    r = _range(ref, data_range)
    model = load_lpips(net, weights)
    smallest = min_image_size(net)  # slices are never resized: planes with a shorter side are left out
    m = None if mask is None else np.asarray(mask, bool)
    scores = []
    with torch.no_grad():
        for axis in range(3):
            idx = np.arange(pred.shape[axis])
            if m is not None:
                idx = idx[np.any(m, axis=tuple(a for a in range(3) if a != axis))]
            if max_slices is not None and len(idx) > max_slices:
                idx = idx[np.linspace(0, len(idx) - 1, max_slices).round().astype(int)]
            if min(s for a, s in enumerate(pred.shape) if a != axis) < smallest:
                continue
            a = np.clip(np.take(pred, idx, axis=axis) / r, 0, 1)
            b = np.clip(np.take(ref, idx, axis=axis) / r, 0, 1)
            ta = torch.from_numpy(np.moveaxis(a, axis, 0)).float()[:, None].repeat(1, 3, 1, 1) * 2 - 1
            tb = torch.from_numpy(np.moveaxis(b, axis, 0)).float()[:, None].repeat(1, 3, 1, 1) * 2 - 1
            for start in range(0, len(idx), 16):
                scores.append(model(ta[start : start + 16], tb[start : start + 16]).flatten().numpy())
    if not scores:
        raise MedldmError(f"volume too small for LPIPS (needs {smallest} voxels a side)")
    return float(np.concatenate(scores).mean())


def foreground_mask(ref, *, threshold: float | None = None) -> np.ndarray:
    """Foreground of a reference volume: Otsu threshold (or the one given), holes filled, the largest component."""
    from skimage.filters import threshold_otsu

    ref = np.asarray(ref, dtype=np.float64)
    level = threshold_otsu(ref) if threshold is None else threshold
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(ref > level, iterations=2))
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask


def uncertainty_calibration(
    std, pred, ref, *, mask=None, bins: int = 10, max_voxels: int = 500_000, seed: int = 0
) -> dict:
    """How well a per-voxel uncertainty (the standard deviation over samples) predicts the error.

    Returns ``spearman``: Spearman's rank correlation between ``std`` and ``|pred - ref|`` over the voxels (of the
    mask), and per uncertainty decile (``bins`` equal-count groups by ``std``, lowest first) the mean ``std`` and
    the mean absolute error: a calibrated map has errors that rise with its deciles. At most ``max_voxels``
    voxels, drawn at random with ``seed``, are used.
    """
    from scipy.stats import spearmanr

    pred, ref = _pair(pred, ref)
    std = np.asarray(std, dtype=np.float64)
    if std.shape != ref.shape:
        raise MedldmError(f"shapes differ: uncertainty {std.shape}, reference {ref.shape}")
    keep = np.ones(ref.shape, bool) if mask is None else np.asarray(mask, bool)
    u, err = std[keep], np.abs(pred - ref)[keep]
    if len(u) > max_voxels:
        pick = np.random.default_rng(seed).choice(len(u), max_voxels, replace=False)
        u, err = u[pick], err[pick]
    if len(u) < bins or np.ptp(u) == 0:
        raise MedldmError(
            "the uncertainty is constant: draw several samples with sampler steps (e.g. --samples 4 "
            "--steps 8) for an uncertainty map"
        )
    order = np.argsort(u, kind="stable")
    groups = np.array_split(order, bins)
    return {
        "spearman": float(spearmanr(u, err).statistic),
        "std_by_decile": [float(u[g].mean()) for g in groups],
        "error_by_decile": [float(err[g].mean()) for g in groups],
    }


TISSUE_CLASSES = 3
# the per-class scores TissueClasses.compare gives (besides their means, "dice" and "volume_error")
PER_CLASS_METRICS = tuple(f"{kind}_{c}" for c in range(1, TISSUE_CLASSES + 1) for kind in ("dice", "volume_error"))
TISSUES = ("class 1 (T1: CSF)", "class 2 (T1: GM)", "class 3 (T1: WM)")  # intensity classes, darkest first


@dataclass(frozen=True)
class Metric:
    label: str  # as reports show it
    higher_is_better: bool


# every score a report may show, in one place: medldm evaluate scores SUMMARY_METRICS per volume (and the per-class
# ones); the report labels and orders them from here
METRIC_INFO: dict[str, Metric] = {
    "psnr": Metric("PSNR (dB)", True),
    "ssim": Metric("SSIM", True),
    "ssim3d": Metric("SSIM 3D", True),
    "lpips": Metric("LPIPS", False),
    "nrmse": Metric("NRMSE", False),
    "dice": Metric("tissue Dice", True),
    "volume_error": Metric("tissue volume error (%)", False),
    **{f"dice_{c + 1}": Metric(f"Dice {t}", True) for c, t in enumerate(TISSUES)},
    **{f"volume_error_{c + 1}": Metric(f"volume error (%) {t}", False) for c, t in enumerate(TISSUES)},
}
SUMMARY_METRICS = ("psnr", "ssim", "ssim3d", "lpips", "nrmse", "dice", "volume_error")
HIGHER_IS_BETTER = {name: metric.higher_is_better for name, metric in METRIC_INFO.items()}


def metric_label(name: str) -> str:
    """How reports show a metric (its name when it is not registered)."""
    return METRIC_INFO[name].label if name in METRIC_INFO else name


class TissueClasses:
    """Three intensity classes of a reference volume (a Gaussian mixture fitted inside ``mask`` on at most
    ``max_voxels`` voxels, fixed seed), ordered by mean intensity, applied unchanged to any prediction."""

    def __init__(self, ref, mask=None, *, max_voxels: int = 200_000, seed: int = 0):
        from sklearn.mixture import GaussianMixture

        ref = np.asarray(ref, dtype=np.float64)
        self.mask = np.ones(ref.shape, bool) if mask is None else np.asarray(mask, bool)
        values = ref[self.mask]
        if values.size < 10 * TISSUE_CLASSES or np.ptp(values) == 0:
            raise MedldmError("too few distinct voxels in the mask for a tissue segmentation")
        rng = np.random.default_rng(seed)
        fit = values if values.size <= max_voxels else rng.choice(values, max_voxels, replace=False)
        self.gmm = GaussianMixture(TISSUE_CLASSES, random_state=seed).fit(fit[:, None])
        self.order = np.argsort(np.argsort(self.gmm.means_[:, 0]))  # component -> class by mean intensity
        self.ref_labels = self.labels(ref)

    def labels(self, volume) -> np.ndarray:
        """Class (0 .. 2, darkest first) of every voxel inside the mask."""
        return self.order[self.gmm.predict(np.asarray(volume, dtype=np.float64)[self.mask][:, None])]

    def compare(self, pred) -> dict:
        """Per class c (1-based): ``dice_c``, ``volume_change_c`` (signed, % of the reference's class volume) and
        ``volume_error_c`` (its absolute value); and the means over classes: ``dice`` and ``volume_error``."""
        labels = self.labels(pred)
        out = {}
        for c in range(1, TISSUE_CLASSES + 1):
            a, b = labels == c - 1, self.ref_labels == c - 1
            out[f"dice_{c}"] = float(2 * np.count_nonzero(a & b) / max(a.sum() + b.sum(), 1))
            out[f"volume_change_{c}"] = float(100 * (int(a.sum()) - int(b.sum())) / max(int(b.sum()), 1))
            out[f"volume_error_{c}"] = abs(out[f"volume_change_{c}"])
        out["dice"] = float(np.mean([out[f"dice_{c}"] for c in range(1, TISSUE_CLASSES + 1)]))
        out["volume_error"] = float(np.mean([out[f"volume_error_{c}"] for c in range(1, TISSUE_CLASSES + 1)]))
        return out
