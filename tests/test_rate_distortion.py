"""Rate-distortion of the autoencoder and of the diffusion model (progressive coding, Ho et al. 2020, Sec. 4.3).

The diffusion tests use a Gaussian toy where the exact denoiser E[x0 | x_t] is closed form; expected rates are
recomputed here in numpy float64 from the schedule's alphas_cumprod alone, independently of the module's loop.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from medldm.evaluation.rate_distortion import autoencoder_rd, diffusion_rd, empirical_entropy, model_rd

from medldm.config import load_config, parse_config
from medldm.diffusion import NoiseSchedule
from medldm.errors import MedldmError
from medldm.nets import ConditionCodec, build_autoencoder, build_denoiser

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_2d.yaml"
MU, SD = 0.5, 1.0  # the toy data distribution N(MU, SD^2)
REPORT = [999, 600, 400, 200, 100, 50, 10, 0]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_monai(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195)


def toy_x0(seed: int = 0, shape=(32, 1, 8, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + SD * torch.randn(shape, generator=g, dtype=torch.float64)


def exact_x0_hat(x_t: np.ndarray, ab: float) -> np.ndarray:
    """E[x0 | x_t] for x0 ~ N(MU, SD^2), x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
    return MU + math.sqrt(ab) * SD**2 / (ab * SD**2 + 1.0 - ab) * (x_t - math.sqrt(ab) * MU)


def logging_denoiser(schedule: NoiseSchedule, log: dict | None = None, oracle: torch.Tensor | None = None):
    ab_all = schedule.alphas_cumprod.numpy()

    def denoise(x_t: torch.Tensor, t: torch.Tensor):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],) and (t == t[0]).all()
        s = int(t[0])
        ab = float(ab_all[s])
        if log is not None:
            assert s not in log, "each timestep is visited once"
            log[s] = x_t.numpy().copy()
        x0 = oracle.clone() if oracle is not None else torch.from_numpy(exact_x0_hat(x_t.numpy(), ab))
        return x0, (x_t - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)

    return denoise


def prior_bits(x0: np.ndarray, ab_last: float) -> float:
    kl = 0.5 * (ab_last * x0**2 + (1.0 - ab_last) - 1.0 - np.log(1.0 - ab_last))
    return float(kl.mean() / np.log(2.0))


# ------------------------------------------------------------------------------------------ entropy
def test_empirical_entropy():
    assert empirical_entropy(torch.tensor([0, 1, 2, 3] * 5)) == pytest.approx(2.0, abs=1e-12)
    assert empirical_entropy(torch.full((7, 3), 4.0)) == 0.0
    assert empirical_entropy(torch.tensor([5, 5, -1, -1])) == pytest.approx(1.0, abs=1e-12)
    # p = (1/2, 1/4, 1/4): 1.5 bits
    assert empirical_entropy(torch.tensor([0, 0, 1, 2])) == pytest.approx(1.5, abs=1e-12)
    with pytest.raises(MedldmError):
        empirical_entropy(torch.tensor([]))


# -------------------------------------------------------------------------------------- diffusion rate
def test_rate_matches_closed_form_gaussian_kls(schedule):
    x0 = toy_x0()
    log: dict[int, np.ndarray] = {}
    records = diffusion_rd(logging_denoiser(schedule, log), x0, schedule, timesteps=REPORT, voxels_per_dim=4.0, seed=3)
    assert [r["t"] for r in records] == REPORT
    assert sorted(log) == list(range(1000)), "the KL sum must visit every timestep"

    # independent numpy float64 computation of rate(t) and distortion(t) from the logged trajectory
    ab = schedule.alphas_cumprod.numpy()
    x = x0.numpy()
    rate = {999: prior_bits(x, ab[999])}
    total = rate[999]
    for s in range(999, 0, -1):
        beta = 1.0 - ab[s] / ab[s - 1]
        c0 = math.sqrt(ab[s - 1]) * beta / (1.0 - ab[s])
        var = (1.0 - ab[s - 1]) / (1.0 - ab[s]) * beta
        kl = c0**2 * (x - exact_x0_hat(log[s], ab[s])) ** 2 / (2.0 * var)
        total += kl.mean() / math.log(2.0)
        rate[s - 1] = total
    for r in records:
        t = r["t"]
        assert r["bits_per_dim"] == pytest.approx(rate[t], rel=1e-6), t
        assert r["bits_per_voxel"] == pytest.approx(rate[t] / 4.0, rel=1e-6)
        mse = float(np.mean((exact_x0_hat(log[t], ab[t]) - x) ** 2))
        assert r["rmse"] == pytest.approx(math.sqrt(mse), rel=1e-6)
        assert r["psnr"] == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-6)

    # along t: rate decreases and distortion increases as t increases; i.e. as t goes from T-1 down to 0
    # (records are in decreasing t) more bits have been sent and the reconstruction gets better
    bits = [r["bits_per_dim"] for r in records]
    rmse = [r["rmse"] for r in records]
    assert all(b2 > b1 for b1, b2 in zip(bits, bits[1:], strict=False)), bits
    assert all(d2 < d1 for d1, d2 in zip(rmse, rmse[1:], strict=False)), rmse
    # the exact denoiser's MSE is the posterior variance SD^2 (1 - ab) / (ab SD^2 + 1 - ab) on average
    for r in records:
        a = ab[r["t"]]
        assert r["rmse"] ** 2 == pytest.approx(SD**2 * (1 - a) / (a * SD**2 + 1 - a), rel=0.2)


def test_trajectory_follows_the_forward_process(schedule):
    """x_{T-1} ~ q(x_{T-1} | x0) and every x_{s-1} ~ q(x_{s-1} | x_s, x0): standardised residuals are N(0, 1)."""
    x0 = toy_x0(seed=1)
    log: dict[int, np.ndarray] = {}
    diffusion_rd(logging_denoiser(schedule, log), x0, schedule, timesteps=[0], seed=11)
    ab, x = schedule.alphas_cumprod.numpy(), x0.numpy()
    start = (log[999] - math.sqrt(ab[999]) * x) / math.sqrt(1 - ab[999])
    steps = []
    for s in range(999, 0, -1):
        beta = 1.0 - ab[s] / ab[s - 1]
        mean = (math.sqrt(ab[s - 1]) * beta * x + math.sqrt(1 - beta) * (1 - ab[s - 1]) * log[s]) / (1 - ab[s])
        steps.append((log[s - 1] - mean) / math.sqrt((1 - ab[s - 1]) / (1 - ab[s]) * beta))
    steps = np.stack(steps)
    for z, tol in ((start, 0.1), (steps, 0.01)):  # 2048 and 2 million samples
        assert abs(z.mean()) < tol and abs(z.var() - 1.0) < 1.2 * tol
    # the marginals stay those of q(x_t | x0)
    for t in (500, 100, 0):
        z = (log[t] - math.sqrt(ab[t]) * x) / math.sqrt(1 - ab[t])
        assert abs(z.mean()) < 0.1 and abs(z.var() - 1.0) < 0.12


def test_prior_term_alone(schedule):
    x0 = toy_x0(seed=2, shape=(4, 3, 5, 5))
    calls = []

    def denoise(x_t, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x_t), x_t

    (rec,) = diffusion_rd(denoise, x0, schedule, timesteps=[999], voxels_per_dim=8.0)
    expected = prior_bits(x0.numpy(), float(schedule.alphas_cumprod[-1]))
    assert calls == [999]
    assert rec["bits_per_dim"] == pytest.approx(expected, rel=1e-9)
    assert rec["prior_bits_per_dim"] == pytest.approx(expected, rel=1e-9)
    assert rec["bits_per_voxel"] == pytest.approx(expected / 8.0, rel=1e-9)


def test_oracle_denoiser_sends_only_the_prior(schedule):
    x0 = toy_x0(seed=4, shape=(8, 2, 4, 4))
    records = diffusion_rd(logging_denoiser(schedule, oracle=x0), x0, schedule, timesteps=REPORT)
    prior = prior_bits(x0.numpy(), float(schedule.alphas_cumprod[-1]))
    for r in records:
        assert r["bits_per_dim"] == pytest.approx(prior, rel=1e-12, abs=1e-15)
        assert r["rmse"] == 0.0 and r["psnr"] == math.inf


def test_seed_decode_and_arguments(schedule):
    short = NoiseSchedule(schedule.alphas_cumprod[::20].clone())  # T = 50
    x0 = toy_x0(seed=5, shape=(4, 1, 4, 4))

    def run(seed):
        return diffusion_rd(
            logging_denoiser(short),
            x0,
            short,
            timesteps=[49, 10, 0],
            seed=seed,
            decode=lambda z: 2.0 * z,
            reference=2.0 * x0,
            image_data_range=2.0,
        )

    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert a[-1]["bits_per_dim"] != c[-1]["bits_per_dim"]
    for r in a:
        assert r["image_rmse"] == pytest.approx(2.0 * r["rmse"], rel=1e-12)
        assert r["image_psnr"] == pytest.approx(r["psnr"], rel=1e-12)  # both the error and the range doubled
    default = diffusion_rd(logging_denoiser(short), x0, short)
    assert [r["t"] for r in default] == sorted({math.floor(49 * (1 - i / 10) + 0.5) for i in range(11)}, reverse=True)
    for bad in ([50], [-1], [1.5], []):
        with pytest.raises(MedldmError):
            diffusion_rd(logging_denoiser(short), x0, short, timesteps=bad)
    with pytest.raises(MedldmError):
        diffusion_rd(logging_denoiser(short), x0, short, decode=lambda z: z)


# ------------------------------------------------------------------------------------------ autoencoder
def tiny_config(**autoencoder):
    config, _ = load_config(TINY, check_files=False)
    if not autoencoder:
        return config
    raw = copy.deepcopy(yaml.safe_load(TINY.read_text()))
    raw["autoencoder"].update(autoencoder)
    return parse_config(raw, check_files=False)[0]


def smooth_images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 1, size // 4, size // 4), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def channel_entropy(codes: np.ndarray) -> float:
    out = []
    for k in range(codes.shape[1]):
        _, counts = np.unique(codes[:, k], return_counts=True)
        p = counts / counts.sum()
        out.append(-(p * np.log2(p)).sum())
    return float(np.mean(out))


def test_autoencoder_rd_kl_bookkeeping():
    torch.manual_seed(0)
    ae = build_autoencoder(tiny_config()).train()
    x = smooth_images()
    scale = 3.0
    with torch.no_grad():
        z = ae.eval().encode(x) * scale
        recon = ae.decode(z / scale)
    ae.train()
    spread = float(z.std())
    steps = [None, 1e-5, spread / 20, spread / 5, spread, 4 * spread]
    records = autoencoder_rd(ae, x, steps=steps, label="tiny", latent_scale=scale, batch_size=3)
    assert ae.training, "the module's mode is restored"
    voxels, symbols = x.numel(), z.numel()
    assert symbols == 4 * 2 * 16 * 16
    for r, q in zip(records, steps, strict=True):
        assert r["label"] == "tiny" and r["kind"] == "kl" and r["step"] == q
        assert r["voxels"] == voxels and r["symbols"] == symbols and r["compression_factor"] == voxels / symbols
        assert r["bits_per_voxel"] == pytest.approx(r["bits_per_latent"] * symbols / voxels, rel=1e-12)
        assert r["psnr"] == pytest.approx(-20 * math.log10(r["rmse"]), rel=1e-9)
        if q is not None:
            codes = np.round(z.double().numpy() / q)
            assert r["bits_per_latent"] == pytest.approx(channel_entropy(codes), abs=1e-9)
    unquantised = records[0]
    assert unquantised["bits_per_latent"] == 32.0
    assert unquantised["rmse"] == pytest.approx(float((recon - x).pow(2).mean().sqrt()), rel=1e-5)
    assert records[1]["rmse"] == pytest.approx(unquantised["rmse"], rel=1e-3)  # a tiny step changes nothing
    rates = [r["bits_per_latent"] for r in records]
    assert all(b < a for a, b in zip(rates, rates[1:], strict=False)), rates  # the rate falls as the step grows
    assert records[1]["bits_per_latent"] <= math.log2(symbols // 2) + 1e-9  # at most all values distinct
    with pytest.raises(MedldmError):
        autoencoder_rd(ae, x, steps=[0.0])
    with pytest.raises(MedldmError):
        autoencoder_rd(ae, x[:, :, :31, :31])  # not divisible by the downsampling factor


def test_autoencoder_rd_vq():
    torch.manual_seed(0)
    ae = build_autoencoder(tiny_config(kind="vq", num_embeddings=16)).train()
    codebook = ae.net.quantizer.quantizer.embedding.weight.detach().clone()
    x = smooth_images(n=3, seed=1)
    (r,) = autoencoder_rd(ae, x, steps=[None, 0.1])
    assert ae.training and torch.equal(codebook, ae.net.quantizer.quantizer.embedding.weight), "no EMA update"
    with torch.no_grad():
        ae.eval()
        indices = ae.net.index_quantize(x)
        recon = ae.decode(ae.encode(x))
    codes = indices.numel()
    assert codes == 3 * 16 * 16
    _, counts = np.unique(indices.numpy(), return_counts=True)
    p = counts / codes
    entropy = float(-(p * np.log2(p)).sum())
    assert r["kind"] == "vq" and r["codebook_size"] == 16 and r["bits_per_code"] == 4.0
    assert r["entropy_bits_per_code"] == pytest.approx(entropy, abs=1e-9) and r["bits_per_latent"] <= 4.0
    assert r["bits_per_voxel"] == pytest.approx(entropy * codes / x.numel(), rel=1e-12)
    assert r["log2_codebook_bits_per_voxel"] == pytest.approx(4.0 * codes / x.numel(), rel=1e-12)
    assert r["compression_factor"] == x.numel() / codes
    assert r["rmse"] == pytest.approx(float((recon - x).pow(2).mean().sqrt()), rel=1e-5)


# -------------------------------------------------------------------------------------------- whole model
def test_model_rd_structure():
    torch.manual_seed(0)
    config = tiny_config()
    d = config.diffusion
    model = SimpleNamespace(
        config=config,
        info={"latent_scale": 0.8},
        codec=ConditionCodec(config),
        autoencoder=build_autoencoder(config).eval().requires_grad_(False),
        denoiser=build_denoiser(config).eval().requires_grad_(False),
        schedule=NoiseSchedule.from_monai(
            num_train_timesteps=d.timesteps, schedule=d.schedule, beta_start=d.beta_start, beta_end=d.beta_end
        ),
    )
    hr = smooth_images(n=2, seed=2)
    cond = torch.nn.functional.avg_pool2d(hr, (4, 1)).repeat_interleave(4, dim=2)
    out = model_rd(model, hr, cond_images=cond, label=[0, 1], timesteps=[999, 995], qsteps=[None, 0.5])
    assert set(out) == {"autoencoder", "diffusion"}
    assert [r["step"] for r in out["autoencoder"]] == [None, 0.5]
    assert [r["t"] for r in out["diffusion"]] == [999, 995]
    for r in out["diffusion"]:
        assert r["label"] == "tiny_2d"
        assert r["bits_per_voxel"] == pytest.approx(r["bits_per_dim"] / 2.0, rel=1e-12)  # 32^2 voxels / (2 x 16^2)
        assert math.isfinite(r["image_rmse"]) and math.isfinite(r["rmse"])
    assert out["diffusion"][1]["bits_per_dim"] >= out["diffusion"][0]["bits_per_dim"]
    with pytest.raises(MedldmError):
        model_rd(model, hr, cond_images=cond, label=[0, 1, 2], timesteps=[999], qsteps=[None])
