"""The networks: a part added for fine-tuning starts as a no-op, and the estimator is told the geometry it needs."""

from __future__ import annotations

import math

import pytest
import torch

from medldm.checkpoint import load_partial_weights
from medldm.errors import MedldmError
from medldm.nets import Estimator, _shuffle, _unshuffle, geometry_features


def _estimator(geometry: bool) -> Estimator:
    torch.manual_seed(0)
    return Estimator(slab=3, channels=[8, 16], num_res_blocks=1, num_labels=4, geometry=geometry)


def test_geometry_features_are_log2_factor_and_thickness_minus_one():
    features = geometry_features([2.0, 5.5], [1.0, 0.75])
    assert features.shape == (2, 2)
    torch.testing.assert_close(features, torch.tensor([[1.0, 0.0], [math.log2(5.5), -0.25]]))
    assert geometry_features(4, 1.0).shape == (1, 2)


def test_a_network_fine_tuned_to_take_the_geometry_starts_as_the_one_it_came_from(tmp_path):
    from safetensors.torch import save_file

    plain = _estimator(geometry=False)
    with torch.no_grad():  # a trained network: its output layer is no longer zero
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "estimator.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    told = _estimator(geometry=True)
    load_partial_weights(told, path, new="geometry.")
    x, label = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    with torch.no_grad():
        expected = plain(x, label)
        assert expected.shape == (2, 1, 16, 16)
        torch.testing.assert_close(told(x, label, geometry_features([4.0, 5.5], [1.0, 0.5])), expected)
        told.geometry[2].weight.add_(0.1)  # once trained, the geometry changes the output
        assert not torch.allclose(told(x, label, geometry_features([4.0, 5.5], [1.0, 0.5])), expected)


@pytest.mark.parametrize("geometry", [False, True])
def test_an_untrained_estimator_is_the_identity_on_the_centre_plane(geometry):
    net = Estimator(slab=5, channels=[8, 16, 32], num_res_blocks=1, num_labels=4, geometry=geometry)
    x = torch.rand(3, 5, 32, 48)
    with torch.no_grad():
        out = net(x, torch.tensor([0, 1, 3]), geometry_features([2.0, 4.0, 5.5], 1.0) if geometry else None)
    assert out.shape == (3, 1, 32, 48)
    torch.testing.assert_close(out, x[:, 2:3], rtol=0, atol=0)


def test_the_3d_estimator_is_the_identity_untrained_and_sees_whole_patches():
    net = Estimator(slab=1, channels=[8, 16], num_res_blocks=1, num_labels=4, spatial_dims=3)
    x = torch.rand(2, 1, 16, 24, 8)
    with torch.no_grad():
        out = net(x, torch.tensor([0, 3]))
        assert out.shape == x.shape
        torch.testing.assert_close(out, x, rtol=0, atol=0)
        net.out.weight.add_(0.01)  # trained: a correction that depends on the neighbourhood
        assert not torch.equal(net(x, torch.tensor([0, 3])), x)
    with pytest.raises(MedldmError, match="slab must be 1"):
        Estimator(slab=3, channels=[8, 16], num_res_blocks=1, num_labels=4, spatial_dims=3)


def test_the_3d_pixel_unshuffle_is_lossless_and_orders_channels_like_the_2d_one():
    x = torch.randn(2, 3, 4, 6, 8)
    cells = _unshuffle(x)
    assert cells.shape == (2, 24, 2, 3, 4)
    torch.testing.assert_close(_shuffle(cells), x, rtol=0, atol=0)
    # channel c * 8 + 4 i + 2 j + k holds voxel (2 d + i, 2 h + j, 2 w + k) of channel c, as 2D's c * 4 + 2 i + j
    c, i, j, k, d, h, w = 2, 1, 0, 1, 1, 2, 3
    assert cells[1, c * 8 + 4 * i + 2 * j + k, d, h, w] == x[1, c, 2 * d + i, 2 * h + j, 2 * w + k]
    planes = torch.randn(1, 3, 4, 6)
    torch.testing.assert_close(_unshuffle(planes), torch.nn.functional.pixel_unshuffle(planes, 2))
