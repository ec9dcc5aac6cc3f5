"""LPIPS with real offline weights: medldm.perceptual (loss and metric)."""

from __future__ import annotations

import hashlib
import shutil
import warnings

import lpips
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from medldm import perceptual, volume
from medldm.errors import MedldmError
from tests.helpers import shared_path

BACKBONE = "alexnet_features_tv_imagenet1k_v1.pth"
HEADS = "lpips_v0.1_alex.pth"
TORCHVISION_NAME = "alexnet-owt-7be5be79.pth"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the 2-core machine, 2 threads next to other busy processes are several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights_dir():
    return shared_path("weights/lpips")


@pytest.fixture(scope="module")
def mri_slice() -> np.ndarray:
    """Middle axial slice of Colin27, normalised to [0, 1]."""
    vol = volume.load(shared_path("data/mri/colin27-mricron/ch2.nii.gz"))
    axis = volume.resolve_axis(vol, "z")
    image = np.take(vol.data, vol.shape[axis] // 2, axis=axis).astype(np.float64)
    return (image - image.min()) / (image.max() - image.min())


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sums(folder) -> dict[str, str]:
    lines = (folder / "SHA256SUMS").read_text().split("\n")
    return {name: digest for digest, name in (line.split() for line in lines if line.strip())}


def _write_sums(folder) -> None:
    names = sorted(p.name for p in folder.glob("*.pth"))
    (folder / "SHA256SUMS").write_text("".join(f"{_sha256(folder / n)}  {n}\n" for n in names))


def _fresh_lpips() -> lpips.LPIPS:
    """The official module with a random backbone and random heads (nothing downloaded, nothing loaded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net="alex", pnet_rand=True, pretrained=False, verbose=False).eval()


def _synthetic_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two fixed uint8 RGB images (smooth pattern + noise, and a shifted, re-noised copy)."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:72, 0:80]
    base = np.stack([np.sin(xx / 7.0), np.cos(yy / 5.0), np.sin((xx + yy) / 11.0)], axis=-1)
    img0 = np.clip(127.5 + 90 * base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    img1 = np.clip(127.5 + 90 * np.roll(base, 3, axis=1) + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return img0, img1


# --- metric ---------------------------------------------------------------------------------------------------


def test_identical_images_give_zero(weights_dir, mri_slice):
    assert abs(perceptual.lpips_distance(mri_slice, mri_slice, weights=weights_dir)) < 1e-6
    rgb = _synthetic_pair()[0] / 255.0
    assert abs(perceptual.lpips_distance(rgb, torch.from_numpy(rgb), weights=weights_dir)) < 1e-6


def test_backbone_is_the_pretrained_one(weights_dir):
    assert _sha256(weights_dir / BACKBONE) == _sums(weights_dir)[BACKBONE]
    assert _sha256(weights_dir / HEADS) == _sums(weights_dir)[HEADS]
    features = torch.load(weights_dir / BACKBONE, map_location="cpu", weights_only=True)
    heads = torch.load(weights_dir / HEADS, map_location="cpu", weights_only=True)
    model = perceptual.load_lpips("alex", weights_dir)
    assert torch.equal(model.net.slice1[0].weight, features["features.0.weight"])
    layers = {"1": 0, "2": 3, "3": 6, "4": 8, "5": 10}
    for slice_number, index in layers.items():
        part = getattr(model.net, f"slice{slice_number}")
        assert torch.equal(getattr(part, str(index)).weight, features[f"features.{index}.weight"])
        assert torch.equal(getattr(part, str(index)).bias, features[f"features.{index}.bias"])
    for k in range(5):
        assert torch.equal(getattr(model, f"lin{k}").model[1].weight, heads[f"lin{k}.model.1.weight"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_pretrained_backbone_differs_from_random(weights_dir, mri_slice):
    blurred = gaussian_filter(mri_slice, 1.0)
    pretrained = perceptual.lpips_distance(mri_slice, blurred, weights=weights_dir)

    torch.manual_seed(0)
    random_backbone = _fresh_lpips()
    random_backbone.load_state_dict(
        torch.load(weights_dir / HEADS, map_location="cpu", weights_only=True), strict=False
    )

    def as_input(image):
        return torch.from_numpy(image).float()[None, None].expand(-1, 3, -1, -1) * 2 - 1

    with torch.no_grad():
        random = float(random_backbone(as_input(mri_slice), as_input(blurred)))
    assert pretrained > 3 * random > 0, (pretrained, random)


def test_stronger_blur_is_farther_on_real_mri(weights_dir, mri_slice):
    mild = perceptual.lpips_distance(mri_slice, gaussian_filter(mri_slice, 0.7), weights=weights_dir)
    strong = perceptual.lpips_distance(mri_slice, gaussian_filter(mri_slice, 3.0), weights=weights_dir)
    assert strong > mild > 0, (mild, strong)


def test_matches_official_lpips_code_path(weights_dir):
    """The official pipeline (lpips.im2tensor on uint8 RGB, LPIPS.forward) with our weights = lpips_distance."""
    img0, img1 = _synthetic_pair()
    official = _fresh_lpips()
    official.load_state_dict(perceptual.load_lpips("alex", weights_dir).state_dict())
    with torch.no_grad():
        expected_rgb = float(official(lpips.im2tensor(img0), lpips.im2tensor(img1)))
        grey0, grey1 = img0[..., :1].repeat(3, axis=-1), img1[..., :1].repeat(3, axis=-1)
        expected_grey = float(official(lpips.im2tensor(grey0), lpips.im2tensor(grey1)))
        # normalize=True is the official [0, 1] -> [-1, 1] switch
        expected_normalize = float(
            official(lpips.im2tensor(img0) / 2 + 0.5, lpips.im2tensor(img1) / 2 + 0.5, normalize=True)
        )
    assert expected_rgb > 0.01
    assert perceptual.lpips_distance(img0 / 255.0, img1 / 255.0, weights=weights_dir) == pytest.approx(
        expected_rgb, abs=1e-6
    )
    assert expected_normalize == pytest.approx(expected_rgb, abs=1e-6)
    grey = perceptual.lpips_distance(img0[..., 0] / 255.0, torch.from_numpy(img1[..., 0] / 255.0), weights=weights_dir)
    assert grey == pytest.approx(expected_grey, abs=1e-6)


def test_metric_rejects_bad_images(weights_dir):
    good = np.zeros((40, 40))
    with pytest.raises(MedldmError, match=r"\[0, 1\]"):
        perceptual.lpips_distance(good, np.full((40, 40), 255.0), weights=weights_dir)
    with pytest.raises(MedldmError, match="differ in shape"):
        perceptual.lpips_distance(good, np.zeros((40, 41)), weights=weights_dir)
    with pytest.raises(MedldmError, match="at least 31"):
        perceptual.lpips_distance(np.zeros((20, 40)), np.zeros((20, 40)), weights=weights_dir)
    with pytest.raises(MedldmError, match="HxW"):
        perceptual.lpips_distance(np.zeros((40, 40, 4)), np.zeros((40, 40, 4)), weights=weights_dir)


# --- finding and verifying the weights ------------------------------------------------------------------------


def test_refuses_to_run_without_weights(tmp_path, monkeypatch):
    with pytest.raises(MedldmError) as caught:
        perceptual.load_lpips("alex", tmp_path)
    assert BACKBONE in str(caught.value) and HEADS in str(caught.value)

    with pytest.raises(MedldmError, match="not a folder"):
        perceptual.find_lpips_weights(tmp_path / "missing")

    monkeypatch.setenv(perceptual.ENV_VAR, str(tmp_path))
    with pytest.raises(MedldmError, match=perceptual.ENV_VAR) as caught:
        perceptual.PerceptualLoss()
    assert BACKBONE in str(caught.value)


def test_nothing_found_anywhere_names_the_option(tmp_path, monkeypatch):
    monkeypatch.delenv(perceptual.ENV_VAR, raising=False)
    monkeypatch.delenv("MEDLDM_SHARED", raising=False)
    monkeypatch.setattr(perceptual, "_REPO", tmp_path / "repo")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MedldmError, match=perceptual.ENV_VAR) as caught:
        perceptual.find_lpips_weights()
    assert BACKBONE in str(caught.value) and "random" in str(caught.value)


@pytest.mark.parametrize("name", [BACKBONE, HEADS])
def test_tampered_file_is_refused(weights_dir, tmp_path, name):
    for file in (BACKBONE, HEADS, "SHA256SUMS"):
        shutil.copy(weights_dir / file, tmp_path / file)
    data = bytearray((tmp_path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(MedldmError, match="checksum mismatch") as caught:
        perceptual.load_lpips("alex", tmp_path)
    assert name in str(caught.value)
    with pytest.raises(MedldmError, match="checksum mismatch") as caught:
        perceptual.verify_checksums(tmp_path, [BACKBONE, HEADS])
    assert name in str(caught.value)


def test_verify_checksums(weights_dir, tmp_path):
    checked = perceptual.verify_checksums(weights_dir)
    assert checked == _sums(weights_dir) and BACKBONE in checked
    with pytest.raises(MedldmError, match="SHA256SUMS"):
        perceptual.verify_checksums(tmp_path)
    (tmp_path / "SHA256SUMS").write_text("not a checksum line\n")
    with pytest.raises(MedldmError, match="line 1"):
        perceptual.verify_checksums(tmp_path)
    shutil.copy(weights_dir / "SHA256SUMS", tmp_path / "SHA256SUMS")
    with pytest.raises(MedldmError, match="missing"):
        perceptual.verify_checksums(tmp_path)


def test_folder_without_sums_uses_known_checksums(weights_dir, tmp_path, mri_slice):
    shutil.copy(weights_dir / BACKBONE, tmp_path / BACKBONE)  # heads: the copy in the lpips wheel
    blurred = gaussian_filter(mri_slice, 1.0)
    assert perceptual.lpips_distance(mri_slice, blurred, weights=tmp_path) == perceptual.lpips_distance(
        mri_slice, blurred, weights=weights_dir
    )


def test_torchvision_full_state_dict_from_the_hub_cache(weights_dir, tmp_path, monkeypatch, mri_slice):
    """torchvision's own file (features + classifier) in the torch hub cache is found and only features used."""
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = torch.load(weights_dir / BACKBONE, map_location="cpu", weights_only=True)
    state["classifier.1.weight"] = torch.zeros(3, 4)
    torch.save(state, checkpoints / TORCHVISION_NAME)
    monkeypatch.delenv(perceptual.ENV_VAR, raising=False)
    monkeypatch.delenv("MEDLDM_SHARED", raising=False)
    monkeypatch.setattr(perceptual, "_REPO", tmp_path / "repo")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert perceptual.find_lpips_weights() == checkpoints

    # Not the real torchvision bytes, so its name's hash prefix does not match: refused.
    with pytest.raises(MedldmError, match="checksum mismatch") as caught:
        perceptual.load_lpips()
    assert TORCHVISION_NAME in str(caught.value)
    # Listed in a SHA256SUMS beside it: accepted, and equal to the features-only file.
    _write_sums(checkpoints)
    blurred = gaussian_filter(mri_slice, 1.0)
    assert perceptual.lpips_distance(mri_slice, blurred) == perceptual.lpips_distance(
        mri_slice, blurred, weights=weights_dir
    )


def test_only_alex_backbone_is_provided(weights_dir):
    with pytest.raises(MedldmError, match="vgg16"):
        perceptual.load_lpips("vgg", weights_dir)
    with pytest.raises(MedldmError, match="unknown LPIPS network"):
        perceptual.load_lpips("resnet", weights_dir)


def test_load_is_cached(weights_dir):
    assert perceptual.load_lpips("alex", weights_dir) is perceptual.load_lpips("alex", str(weights_dir), "cpu")


# --- training loss --------------------------------------------------------------------------------------------


def test_perceptual_loss_2d_is_differentiable(weights_dir):
    torch.manual_seed(0)
    loss_fn = perceptual.PerceptualLoss(weights=weights_dir)
    target = torch.rand(2, 1, 64, 64)
    prediction = (target + 0.1 * torch.randn_like(target)).requires_grad_(True)
    loss = loss_fn(prediction, target)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert prediction.grad is not None and torch.isfinite(prediction.grad).all() and prediction.grad.abs().sum() > 0
    assert float(loss_fn(target, target.clone())) == pytest.approx(0.0, abs=1e-6)


def test_perceptual_loss_is_frozen_and_outside_the_state_dict(weights_dir):
    loss_fn = perceptual.PerceptualLoss(weights=weights_dir)
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}
    assert not any(p.requires_grad for p in loss_fn.lpips.parameters())
    loss_fn.train()  # must not switch on the heads' dropout
    x, y = torch.rand(1, 1, 48, 48), torch.rand(1, 1, 48, 48)
    assert float(loss_fn(x, y)) == float(loss_fn(x, y))
    loss_fn.to(torch.float64)  # moves/casts the private network too, leaves the shared cached one alone
    assert loss_fn.lpips.net.slice1[0].weight.dtype == torch.float64
    assert perceptual.load_lpips("alex", weights_dir).net.slice1[0].weight.dtype == torch.float32
    assert float(loss_fn(x.double(), y.double())) > 0


def test_perceptual_loss_3d(weights_dir):
    torch.manual_seed(0)
    volume_batch = torch.rand(1, 1, 16, 32, 32)
    other = gaussian_filter(volume_batch.numpy(), (0, 0, 1, 1, 1))
    loss = perceptual.PerceptualLoss(weights=weights_dir)(volume_batch, torch.from_numpy(other))
    assert loss.ndim == 0 and torch.isfinite(loss) and float(loss) > 0
    sampled = perceptual.PerceptualLoss(weights=weights_dir, slices_per_plane=3)
    prediction = volume_batch.clone().requires_grad_(True)
    value = sampled(prediction, torch.from_numpy(other))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(prediction.grad).all()
    assert float(sampled(volume_batch, volume_batch)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(MedldmError, match="shapes differ"):
        sampled(volume_batch, volume_batch[..., :16])
