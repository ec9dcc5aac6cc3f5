"""Previews (issue 22): planes through the place the upscale changed most, and a zoom of it, input beside output."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np

from medldm.figures import before_after, display_window, most_changed_point
from medldm.volume import Volume


def _pair():
    """A thick-slice 'input' and an 'output' that differ from it only in a blob around voxel (40, 20, 30)."""
    rng = np.random.default_rng(0)
    after = Volume(rng.random((64, 48, 40)).astype(np.float32) * 0.01 + 1.0, np.diag([1.0, 1.0, 1.0, 1.0]))
    before = Volume(np.ones((64, 48, 10), np.float32), np.diag([1.0, 1.0, 4.0, 1.0]) @ np.eye(4))
    before.affine[:3, 3] = [0.0, 0.0, 1.5]  # thick voxel m covers HR voxels 4m .. 4m + 3
    after.data[36:45, 16:25, 26:35] += 2.0
    return before, after


def test_the_most_changed_point_is_where_the_output_departs_from_the_input():
    before, after = _pair()
    assert np.allclose(most_changed_point(before, after), [40, 20, 30], atol=2.0)


def test_a_preview_shows_every_row_and_a_zoom_row(tmp_path):
    before, after = _pair()
    path = before_after(before, after, tmp_path / "p.png", extra={"truth": after})
    pixels = mpimg.imread(path)
    assert pixels.shape[1] >= 1300 and pixels.shape[0] > pixels.shape[1]  # three rows of volumes + the zoom row


def test_ct_is_shown_in_a_soft_tissue_window():
    ct = Volume(np.full((8, 8, 8), -1000, np.float32), np.eye(4), {"modality": "CT"})
    ct.data[2:6, 2:6, 2:6] = 40
    assert display_window(ct)[:2] == (-150.0, 250.0)  # CT_WINDOWS["soft-tissue"]: L50 W400
