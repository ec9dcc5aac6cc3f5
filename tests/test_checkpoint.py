"""Checkpoints and weights: complete or absent, the newest kept, and weights that do not fit refused by name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from medldm import MedldmError
from medldm.checkpoint import (
    build_with_weights,
    latest_checkpoint,
    load_partial_weights,
    load_state,
    load_weights,
    read_model_folder,
    save_checkpoint,
)
from medldm.config import parse_config


def _net(extra: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    if extra:
        net.add_module("geometry", nn.Linear(2, 2))  # a part added to a trained network
    return net


def test_checkpoints_keep_the_newest_and_a_killed_write_is_ignored(tmp_path):
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, modules={"model": net}, optimizers={"model": opt}, state={"s": step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000020", "step_0000030"]
    (tmp_path / "step_0000040").mkdir()  # what a write killed before its state.json leaves
    (tmp_path / ".partial-step_0000050-abc").mkdir()
    newest = latest_checkpoint(tmp_path)
    assert newest is not None and newest.name == "step_0000030"
    state, optim = load_state(newest)
    assert state == {"s": 30, "step": 30} and set(optim) == {"model"}
    restored = _net()
    with torch.no_grad():
        for p in restored.parameters():
            p.zero_()
    load_weights(restored, newest / "model.safetensors")
    for a, b in zip(restored.parameters(), net.parameters(), strict=True):
        assert torch.equal(a, b)
    assert latest_checkpoint(tmp_path / "none") is None


def test_partial_weights_load_the_old_part_and_leave_only_the_new_one(tmp_path):
    old = _net()
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(path))
    grown = _net(extra=True)
    before = grown.geometry.weight.clone()
    load_partial_weights(grown, path, new="geometry.")
    assert torch.equal(grown[0].weight, old[0].weight) and torch.equal(grown.geometry.weight, before)
    with pytest.raises(MedldmError, match="do not fit"):
        load_partial_weights(grown, path, new="other.")  # geometry.* missing, and not the part said to be new
    with pytest.raises(MedldmError, match="do not fit"):
        load_weights(grown, path)


def test_weights_that_do_not_fit_are_refused_before_anything_is_allocated(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _net().state_dict().items()}, str(path))
    assert isinstance(build_with_weights(_net, path), nn.Sequential)
    with pytest.raises(MedldmError, match=r"tensor geometry\.\S+ is in only one of them"):
        build_with_weights(lambda: _net(extra=True), path)
    wide = lambda: nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))  # noqa: E731
    with pytest.raises(MedldmError, match=r"0\.bias is \[4\] in the file, \[5\] in the config"):
        build_with_weights(wide, path)
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    with pytest.raises(MedldmError, match="cannot be read") as err:
        build_with_weights(_net, tmp_path / "bad.safetensors")
    assert "bad.safetensors" in str(err.value)


def test_the_shipped_config_is_the_shipped_models_and_its_checksums_hold():
    """configs/brain_mri.yaml retrains the shipped model: its settings equal the folder's config (an unused
    adversarial_start in the folder's config.json does not count) and give the digest model.json records."""
    from medldm.config import load_config
    from medldm.model import DEFAULT_MODEL

    raw, info = read_model_folder(DEFAULT_MODEL)  # verifies every file against SHA256SUMS
    shipped, _ = parse_config(raw, check_files=False)
    config, _ = load_config("configs/brain_mri.yaml", check_files=False)
    assert config.model_dump() == shipped.model_dump()
    assert config.digest() == shipped.digest() == info["config_digest"]
    raw["autoencoder"]["adversarial_start"] = 1500  # as in folders written before 2026-12-05: unused, so not counted
    older, _ = parse_config(raw, check_files=False)
    assert older.autoencoder.adversarial_start is None and older.digest() == shipped.digest()
