"""Figures people would rather look at than read: three-plane before/after views."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medldm.outputs import write_atomically
from medldm.volume import Volume

__all__ = ["three_planes", "before_after"]


def three_planes(volume: Volume, centre_world: np.ndarray | None = None) -> list[np.ndarray]:
    """Sagittal, coronal and axial planes through a world point (default: the volume centre), in canonical
    orientation and displayed with anterior/superior up."""
    can = volume.to_canonical()
    if centre_world is None:
        idx = (np.asarray(can.shape) - 1) / 2.0
    else:
        idx = (np.linalg.inv(can.affine) @ np.append(centre_world, 1.0))[:3]
    i, j, k = (int(np.clip(round(v), 0, n - 1)) for v, n in zip(idx, can.shape, strict=True))
    return [np.rot90(can.data[i]), np.rot90(can.data[:, j]), np.rot90(can.data[:, :, k])]


def _centre(volume: Volume) -> np.ndarray:
    return (volume.affine @ np.append((np.asarray(volume.shape) - 1) / 2.0, 1.0))[:3]


def before_after(before: Volume, after: Volume, path: str | Path, *, titles=("input", "upscaled"),
                 extra: dict[str, Volume] | None = None, overwrite: bool = True) -> Path:
    """PNG with one row per volume (input, output, and any ``extra``), three orthogonal planes each, through the
    same world point, each plane shown with its own voxel aspect (mm-true)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(titles[0], before), (titles[1], after), *(extra or {}).items()]
    centre = _centre(after)
    vmax = float(np.percentile(after.data, 99.5))
    fig, axes = plt.subplots(len(rows), 3, figsize=(10, 3.3 * len(rows)), squeeze=False)
    for r, (title, vol) in enumerate(rows):
        sp = vol.to_canonical().spacing
        aspects = [sp[2] / sp[1], sp[2] / sp[0], sp[1] / sp[0]]
        for c, (plane, aspect) in enumerate(zip(three_planes(vol, centre), aspects, strict=True)):
            ax = axes[r, c]
            ax.imshow(plane, cmap="gray", vmin=0, vmax=vmax, aspect=aspect, interpolation="nearest")
            ax.set_axis_off()
            if c == 0:
                ax.set_title(f"{title}  ({' x '.join(f'{s:.2g}' for s in vol.spacing)} mm)", loc="left", fontsize=9)
    fig.tight_layout()
    try:
        return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110), overwrite=overwrite, suffixes=(".png",))
    finally:
        plt.close(fig)
