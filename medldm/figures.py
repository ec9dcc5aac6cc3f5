"""Figures people would rather look at than read: three-plane before/after views."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medldm.outputs import write_atomically
from medldm.volume import Volume

__all__ = ["three_planes", "before_after", "display_window", "most_changed_point"]


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


def display_window(volume: Volume, preset: str | None = None) -> tuple[float, float, str]:
    """Grey-scale limits for showing a scan: CT through a window in HU (``preset``, a name in
    medldm.intensity.CT_WINDOWS; soft tissue by default), anything else from the 0.5th to the 99.5th percentile."""
    from medldm.errors import MedldmError
    from medldm.intensity import CT_WINDOWS, guess_modality

    if guess_modality(volume.data, volume.meta.get("modality")) == "CT":
        preset = preset or "soft-tissue"
        if preset not in CT_WINDOWS:
            raise MedldmError(f"unknown CT window {preset!r}; choose from {', '.join(CT_WINDOWS)}")
        centre, width = CT_WINDOWS[preset]
        return centre - width / 2, centre + width / 2, f"CT {preset} window L{centre:g} W{width:g}"
    if preset is not None:
        raise MedldmError(f"the {preset!r} window is a CT window (HU); this scan looks like MR", volume.path)
    lo, hi = np.percentile(volume.data, [0.5, 99.5])
    return float(lo), float(hi), "0.5-99.5th percentile"


def most_changed_point(before: Volume, after: Volume, *, max_voxels: int = 1 << 22) -> np.ndarray:
    """The world point (mm) where ``after`` differs most from ``before`` interpolated onto its grid (the mean
    absolute difference over a ~10 mm neighbourhood), found on a subsampled grid of at most ``max_voxels``."""
    from scipy.ndimage import map_coordinates, uniform_filter

    step = max(1, int(np.ceil((np.prod(after.shape) / max_voxels) ** (1 / 3))))
    grid = np.stack(np.meshgrid(*[np.arange(0, n, step) for n in after.shape], indexing="ij"), axis=0)
    world = np.tensordot(after.affine[:3, :3], grid, axes=1) + after.affine[:3, 3, None, None, None]
    index = (
        np.tensordot(np.linalg.inv(before.affine)[:3, :3], world, axes=1)
        + np.linalg.inv(before.affine)[:3, 3, None, None, None]
    )
    resampled = map_coordinates(before.data, index, order=1, mode="nearest")
    diff = np.abs(after.data[::step, ::step, ::step] - resampled)
    size = max(3, int(round(10.0 / (step * min(after.spacing)))))
    peak = np.unravel_index(int(np.argmax(uniform_filter(diff, size=size))), diff.shape)
    return (after.affine @ np.append(np.asarray(peak) * step, 1.0))[:3]


def _plane(can: Volume, axis: int, point: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The plane of a canonical (RAS) volume across ``axis`` through ``point`` as an image (rows: the second
    remaining axis, upwards) and its extent in mm [left, right, bottom, top], for imshow(origin="lower")."""
    idx = (np.linalg.inv(can.affine) @ np.append(point, 1.0))[:3]
    k = int(np.clip(round(idx[axis]), 0, can.shape[axis] - 1))
    a, b = (d for d in range(3) if d != axis)
    image = np.take(can.data, k, axis=axis).T  # (n_b, n_a)
    lo = can.affine[:3, 3] - 0.5 * np.diag(can.affine)[:3]
    hi = lo + np.asarray(can.shape) * np.diag(can.affine)[:3]
    return image, [lo[a], hi[a], lo[b], hi[b]]


PLANE_NAMES = ("sagittal", "coronal", "axial")  # the canonical plane across voxel axis 0, 1, 2


def before_after(
    before: Volume,
    after: Volume,
    path: str | Path,
    *,
    titles=("input", "upscaled"),
    extra: dict[str, Volume] | None = None,
    overwrite: bool = True,
    zoom_mm: float | None = None,
    window: str | None = None,
) -> Path:
    """PNG with one row per volume (input, output, and any ``extra``): three orthogonal planes each, through the
    point where the output differs most from the input, in millimetres (so every panel is mm-true) and in the
    modality's display window; then a zoom row: a ``zoom_mm`` square (default: a quarter of the smallest field of
    view, at least 40 mm) around that point in a plane containing the upscaled axis, input beside output (and the
    extras) at the same zoom. ``window``: a CT window preset (see :func:`display_window`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = [
        (title, vol.to_canonical()) for title, vol in [(titles[0], before), (titles[1], after), *(extra or {}).items()]
    ]
    point = most_changed_point(before, after)
    vmin, vmax, window = display_window(after, window)
    # the zoom plane: across the first axis that was not upscaled, so the upscaled axis lies in it
    ratio = np.asarray(rows[0][1].spacing) / np.asarray(rows[1][1].spacing)
    upscaled = int(np.argmax(ratio))
    zoom_axis = next(d for d in (0, 1, 2) if d != upscaled)
    if zoom_mm is None:
        zoom_mm = max(40.0, min(n * sp for n, sp in zip(after.shape, after.spacing, strict=True)) / 4)
    box = {a: (point[a] - zoom_mm / 2, point[a] + zoom_mm / 2) for a in range(3)}  # world RAS mm
    fig, axes = plt.subplots(
        len(rows) + 1, max(3, len(rows)), figsize=(4.2 * max(3, len(rows)), 3.9 * (len(rows) + 1)), squeeze=False
    )
    for r, (title, vol) in enumerate(rows):
        for c in range(3):
            image, extent = _plane(vol, c, point)
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", extent=extent, interpolation="nearest")
            ax.set_axis_off()
            if c == zoom_axis:
                a, b = (d for d in range(3) if d != c)
                ax.add_patch(Rectangle((box[a][0], box[b][0]), zoom_mm, zoom_mm, fill=False, ec="#ffb000", lw=1.2))
            if c == 0:
                ax.set_title(f"{title}  ({' x '.join(f'{s:.2g}' for s in vol.spacing)} mm)", loc="left", fontsize=10)
        for c in range(3, axes.shape[1]):
            axes[r, c].set_axis_off()
    a, b = (d for d in range(3) if d != zoom_axis)
    for c, (title, vol) in enumerate(rows):
        image, extent = _plane(vol, zoom_axis, point)
        ax = axes[len(rows), c]
        ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", extent=extent, interpolation="nearest")
        ax.set_xlim(*box[a])
        ax.set_ylim(*box[b])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{title}: {PLANE_NAMES[zoom_axis]} zoom, {zoom_mm:g} mm", loc="left", fontsize=10)
    for c in range(len(rows), axes.shape[1]):
        axes[len(rows), c].set_axis_off()
    fig.suptitle(
        f"planes through the point the output changed most ({', '.join(f'{v:.0f}' for v in point)} mm "
        f"RAS); grey scale: {window}",
        fontsize=10,
    )
    fig.tight_layout()
    try:
        return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110), overwrite=overwrite, suffixes=(".png",))
    finally:
        plt.close(fig)
