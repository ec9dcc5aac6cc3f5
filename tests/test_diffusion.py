"""Schedule, targets and samplers checked on a Gaussian toy problem whose exact denoiser is known.

Data ``x0 ~ N(MU, S^2)`` elementwise, so ``q(x_t) = N(a MU, a^2 S^2 + 1 - ab)`` with ``a = sqrt(ab)`` and
``E[x0 | x_t] = MU + a S^2 (x_t - a MU) / (ab S^2 + 1 - ab)``: a perfect network in closed form. The exact
probability-flow map from ``x_T`` to ``x0`` is then the affine map that standardises ``q(x_T)`` into the data.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from medldm import MedldmError
from medldm.diffusion import (
    SAMPLERS,
    NoiseSchedule,
    gaussian_kl,
    make_denoiser,
    posterior_mean_var,
    prior_kl,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_ode,
    timesteps_for,
)

MU, S = 0.7, 0.3
SHAPE = (5000, 1, 2, 2)  # 20k iid elements; trailing dims exercise the per-sample broadcasting
SCHED = NoiseSchedule.from_monai(
    num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: two threads on a shared 2-core machine are much slower than one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def toy_denoiser(mu: float = MU, s: float = S, schedule: NoiseSchedule = SCHED):
    def denoise(x_t, t):
        ab = schedule.alphas_cumprod[t].to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))
        a = ab.sqrt()
        x0 = mu + a * s**2 * (x_t - a * mu) / (ab * s**2 + 1 - ab)
        return x0, (x_t - a * x0) / (1 - ab).sqrt()

    return denoise


class Counted:
    """A denoiser that counts its calls."""

    def __init__(self, denoise):
        self.denoise, self.calls = denoise, 0

    def __call__(self, x_t, t):
        self.calls += 1
        return self.denoise(x_t, t)


def x_T(seed: int = 0, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def exact_flow(x: torch.Tensor, mu: float = MU, s: float = S) -> torch.Tensor:
    ab = float(SCHED.alphas_cumprod[-1])
    return mu + s * (x - math.sqrt(ab) * mu) / math.sqrt(ab * s**2 + 1 - ab)


@functools.cache
def run(name: str, seed: int | None = 1, s: float = S, **kw) -> torch.Tensor:
    """Cached sampler output from x_T(0); ``seed=None`` means no generator."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return sample(name, toy_denoiser(s=s), x_T(0) * 1.0, SCHED, generator=gen, **kw)


# --------------------------------------------------------------------------------------------- schedule
def test_from_monai_matches_monai_in_float64():
    monai = DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
    assert SCHED.alphas_cumprod.dtype == torch.float64 and SCHED.num_train_timesteps == 1000
    np.testing.assert_allclose(SCHED.alphas_cumprod.numpy(), monai.alphas_cumprod.double().numpy(), rtol=1e-5)
    cosine = NoiseSchedule.from_monai(num_train_timesteps=50, schedule="cosine")
    assert cosine.num_train_timesteps == 50 and bool((cosine.alphas_cumprod.diff() < 0).all())
    with pytest.raises(MedldmError, match="scaled_linear_beta"):
        NoiseSchedule.from_monai(schedule="quadratic")
    with pytest.raises(MedldmError, match="cosine"):
        NoiseSchedule.from_monai(schedule="cosine", beta_start=0.1)
    with pytest.raises(MedldmError, match="decreasing"):
        NoiseSchedule(torch.tensor([0.5, 0.9]))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_add_noise_target_and_inversion_are_consistent(prediction):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(7, 2, 3, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 17, 500, 998, 999, 250])
    x_t = SCHED.add_noise(x0, noise, t)
    ab = SCHED.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    target = SCHED.training_target(x0, noise, t, prediction)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction]
    torch.testing.assert_close(target, expected)
    x0_hat, eps_hat = SCHED.to_x0_eps(target, x_t, t, prediction)
    torch.testing.assert_close(x0_hat, x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(eps_hat, noise, atol=1e-6, rtol=0)
    # float32 in, float32 out (schedule maths in float64, cast at use)
    x0_hat32, _ = SCHED.to_x0_eps(target.float(), x_t.float(), t, prediction)
    assert x0_hat32.dtype == torch.float32


def test_prediction_and_timestep_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(MedldmError, match="v_prediction"):
        SCHED.training_target(x, x, torch.tensor([0, 1]), "velocity")
    with pytest.raises(MedldmError, match="0 .. 999"):
        SCHED.add_noise(x, x, torch.tensor([0, 1000]))


def test_snr_and_log_snr():
    t = torch.arange(1000)
    ab = SCHED.alphas_cumprod
    torch.testing.assert_close(SCHED.snr(t), ab / (1 - ab))
    torch.testing.assert_close(SCHED.log_snr(t).exp(), SCHED.snr(t))
    assert bool((SCHED.log_snr(t).diff() < 0).all())


def test_vp_sde_view_interpolates_the_schedule():
    T = SCHED.num_train_timesteps
    for t in (0, 1, 500, 999):
        assert SCHED.vp_alpha_bar(t / (T - 1)) == pytest.approx(float(SCHED.alphas_cumprod[t]), rel=1e-12)
        assert SCHED.vp_timestep(t / (T - 1)) == t
    # beta(u) = -d/du log alpha_bar(u): integrating beta recovers log alpha_bar
    u = np.linspace(0.0, 1.0, 20001)
    beta = np.array([SCHED.vp_beta(v) for v in u])
    integral = np.sum(0.5 * np.diff(u) * (beta[1:] + beta[:-1]))
    assert -integral == pytest.approx(math.log(SCHED.vp_alpha_bar(1.0) / SCHED.vp_alpha_bar(0.0)), rel=2e-3)


def test_make_denoiser_with_a_perfect_network_and_clipping():
    g = torch.Generator().manual_seed(4)
    x0 = 2 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 100, 400, 800, 999])
    x_t = SCHED.add_noise(x0, noise, t)
    for prediction in ("epsilon", "v_prediction", "sample"):

        def model(x, tt, prediction=prediction):
            assert torch.equal(tt, t)
            return SCHED.training_target(x0, noise, tt, prediction)

        x0_hat, eps_hat = make_denoiser(model, SCHED, prediction)(x_t, t)
        torch.testing.assert_close(x0_hat, x0, atol=1e-6, rtol=0)
        torch.testing.assert_close(eps_hat, noise, atol=1e-6, rtol=0)
        x0_c, eps_c = make_denoiser(model, SCHED, prediction, clip_x0=1.0)(x_t, t)
        torch.testing.assert_close(x0_c, x0.clamp(-1, 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(SCHED.add_noise(x0_c, eps_c, t), x_t)  # eps recomputed consistently
        assert not torch.allclose(eps_c, noise)


# --------------------------------------------------------------------------------------------- timesteps
def test_timesteps_for_spacing():
    assert timesteps_for(SCHED, 8).tolist() == [999, 856, 714, 571, 428, 285, 143, 0]
    assert torch.equal(timesteps_for(SCHED, 1000), torch.arange(999, -1, -1))
    assert torch.equal(timesteps_for(SCHED, 5000), torch.arange(999, -1, -1))
    assert timesteps_for(SCHED, 8, start=0.5).tolist() == [500, 333, 167, 0]
    assert timesteps_for(SCHED, 1).tolist() == [999]
    assert timesteps_for(SCHED, 10, start=1e-3).tolist() == [1]
    for bad in (0, -1, 2.5):
        with pytest.raises(MedldmError, match="steps"):
            timesteps_for(SCHED, bad)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(MedldmError, match="start"):
            timesteps_for(SCHED, 8, start=bad)


# --------------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize(
    "name, kw",
    [
        ("ddpm", {"steps": 1000}),
        ("ddim", {"steps": 1000}),
        ("ddim", {"steps": 1000, "eta": 1.0}),
        ("dpmpp-2m", {"steps": 200}),
        ("sde", {"steps": 1000}),
        ("ode", {"steps": 50}),
        ("ode", {"steps": 200, "method": "euler"}),
    ],
)
def test_samplers_reproduce_the_data_distribution(name, kw):
    out = run(name, **kw)
    assert out.shape == SHAPE and out.dtype == torch.float64
    assert float(out.mean()) == pytest.approx(MU, rel=0.02)
    assert float(out.std()) == pytest.approx(S, rel=0.04)


def test_ddpm_with_all_steps_is_ddim_with_eta_one():
    ddpm, ddim = run("ddpm", steps=1000), run("ddim", steps=1000, eta=1.0)
    assert float(ddpm.std()) == pytest.approx(float(ddim.std()), rel=1e-3)
    assert float(ddpm.mean()) == pytest.approx(float(ddim.mean()), abs=1e-3)
    # same noise draws, same algebra: the paths coincide, not only the statistics
    torch.testing.assert_close(ddpm, ddim, atol=1e-8, rtol=0)
    # and strided DDPM is not DDIM(eta=0)
    assert not torch.allclose(run("ddpm", steps=20), run("ddim", steps=20))


@pytest.mark.parametrize(
    "name, kw, tol",
    [
        ("ddim", {"steps": 1000}, 0.03),
        ("dpmpp-2m", {"steps": 200}, 0.04),
        ("ode", {"steps": 50}, 0.02),
        ("ode", {"steps": 200, "method": "euler"}, 0.01),
    ],
)
def test_deterministic_samplers_are_the_exact_flow_map(name, kw, tol):
    out = run(name, seed=None, **kw)
    assert torch.equal(out, sample(name, toy_denoiser(), x_T(0), SCHED, **kw))  # same input, same output
    # the same map with a generator: no randomness used when start = 1
    assert torch.equal(out, run(name, seed=123, **kw))
    # a deterministic function of x_T: per sample close to the exact probability-flow map
    assert float((out - exact_flow(x_T(0))).abs().max()) < tol


@pytest.mark.parametrize("s", [0.3, 1.0])
@pytest.mark.parametrize("steps", [8, 10])
def test_dpmpp_2m_is_at_least_as_good_as_ddim_with_few_steps(steps, s):
    ddim, dpm = run("ddim", seed=None, s=s, steps=steps), run("dpmpp-2m", seed=None, s=s, steps=steps)
    assert abs(float(dpm.std()) - s) <= abs(float(ddim.std()) - s)
    exact = exact_flow(x_T(0), s=s)
    assert float((dpm - exact).abs().max()) <= float((ddim - exact).abs().max())


@pytest.mark.parametrize(
    "name, kw, order",
    [
        ("ddim", {}, 1),
        ("dpmpp-2m", {}, 2),
        ("ode", {"method": "euler"}, 1),
        ("ode", {"method": "heun"}, 2),
    ],
)
def test_convergence_order_of_deterministic_samplers(name, kw, order):
    """Error at t = 100 (a grid point for 21 and 41 steps) against the exact flow: halving the step divides
    it by 2 ** order."""
    x = x_T(3, (2000, 1))
    ab, ab_T = float(SCHED.alphas_cumprod[100]), float(SCHED.alphas_cumprod[-1])
    exact = math.sqrt(ab) * MU + math.sqrt((ab * S**2 + 1 - ab) / (ab_T * S**2 + 1 - ab_T)) * (x - math.sqrt(ab_T) * MU)
    errors = []
    for steps in (21, 41):
        k = timesteps_for(SCHED, steps).tolist().index(100)
        states = {}
        keep = functools.partial(lambda i, n, x_, st: st.setdefault(i, x_), st=states)
        sample(name, toy_denoiser(), x, SCHED, steps=steps, callback=keep, **kw)
        errors.append(float((states[k - 1] - exact).abs().max()))
    assert 0.8 * 2**order < errors[0] / errors[1] < 1.25 * 2**order


@pytest.mark.parametrize("name, kw", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("ddim", {"eta": 0.3}), ("sde", {})])
def test_stochastic_samplers_follow_the_generator(name, kw):
    x = x_T(5, (64, 3))
    a = sample(name, toy_denoiser(), x, SCHED, steps=20, generator=torch.Generator().manual_seed(7), **kw)
    b = sample(name, toy_denoiser(), x, SCHED, steps=20, generator=torch.Generator().manual_seed(7), **kw)
    c = sample(name, toy_denoiser(), x, SCHED, steps=20, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.01


@pytest.mark.parametrize("name, kw", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("sde", {})])
def test_one_generator_per_element_makes_each_sample_independent_of_its_batch(name, kw):
    x = x_T(5, (3, 64))
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = sample(name, toy_denoiser(), x, SCHED, steps=20, generator=gens(1, 2, 3), **kw)
    for i, seed in enumerate((1, 2, 3)):  # the same element alone, with its own stream, is the same sample
        alone = sample(name, toy_denoiser(), x[i : i + 1], SCHED, steps=20, generator=gens(seed), **kw)
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-12)
    with pytest.raises(MedldmError, match="2 generators for a batch of 3"):
        sample(name, toy_denoiser(), x, SCHED, steps=20, generator=gens(1, 2), **kw)


@pytest.mark.parametrize(
    "name, kw, calls",
    [
        ("ddpm", {}, 5),
        ("ddim", {}, 5),
        ("dpmpp-2m", {}, 5),
        ("sde", {}, 5),
        ("ode", {}, 9),
        ("ode", {"method": "euler"}, 5),
    ],
)
def test_sdedit_start_runs_fewer_calls_and_small_start_keeps_x_init(name, kw, calls):
    x_init = MU + S * x_T(9, (256, 2))
    gen = torch.Generator().manual_seed(0)
    full, half, tiny = Counted(toy_denoiser()), Counted(toy_denoiser()), Counted(toy_denoiser())
    seen = []
    sample(name, full, x_T(1, (256, 2)), SCHED, steps=10, generator=gen, **kw)
    sample(
        name,
        half,
        x_init,
        SCHED,
        steps=10,
        start=0.5,
        generator=gen,
        callback=lambda i, total, x: seen.append((i, total)),
        **kw,
    )
    assert half.calls == calls < full.calls
    assert seen == [(i, 5) for i in range(5)]
    out = sample(name, tiny, x_init, SCHED, steps=10, start=1e-3, generator=gen, **kw)
    assert tiny.calls == 1
    assert float((out - x_init).abs().mean()) < 0.06 and float((out - x_init).abs().max()) < 0.3


def test_sdedit_keeps_the_data_distribution():
    x_init = MU + S * x_T(2)
    out = sample_ddpm(toy_denoiser(), x_init, SCHED, steps=1000, start=0.2, generator=torch.Generator().manual_seed(0))
    assert float(out.mean()) == pytest.approx(MU, rel=0.02) and float(out.std()) == pytest.approx(S, rel=0.05)
    # x_init -> x_200 -> x0 keeps corr(x0, x_init) = Var(E[x0 | x_200]) / S^2 = ab S^2 / (ab S^2 + 1 - ab)
    ab = float(SCHED.alphas_cumprod[200])
    corr = float(torch.corrcoef(torch.stack([out.flatten(), x_init.flatten()]))[0, 1])
    assert corr == pytest.approx(ab * S**2 / (ab * S**2 + 1 - ab), abs=0.03)


def test_samplers_keep_float32_and_report_progress():
    x = x_T(0, (4, 1, 3, 3)).float()
    seen = []
    out = sample_ode(toy_denoiser(), x, SCHED, steps=4, callback=lambda i, total, x_: seen.append((i, total)))
    assert out.dtype == torch.float32 and seen == [(0, 4), (1, 4), (2, 4), (3, 4)]
    out = sample_ddim(toy_denoiser(), x, SCHED, steps=3, eta=0.5, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_sample_dispatch_and_unknown_names():
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp-2m", "sde", "ode"}
    x = x_T(0, (3, 2))
    torch.testing.assert_close(
        sample("ddim", toy_denoiser(), x, SCHED, steps=4), sample_ddim(toy_denoiser(), x, SCHED, steps=4)
    )
    with pytest.raises(MedldmError, match="dpmpp-2m"):
        sample("nope", toy_denoiser(), x, SCHED, steps=4)
    with pytest.raises(MedldmError, match="heun"):
        sample("ode", toy_denoiser(), x, SCHED, steps=4, method="rk4")
    with pytest.raises(MedldmError, match="eta"):
        sample("ddim", toy_denoiser(), x, SCHED, steps=4, eta=-1.0)


# ----------------------------------------------------------------------------------- variational bound
def test_gaussian_kl():
    m, v = torch.tensor([0.3, -2.0]), torch.tensor([0.5, 4.0])
    torch.testing.assert_close(gaussian_kl(m, v, m, v), torch.zeros(2))
    # by hand: ln(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2 for N(1, 2) and N(-0.5, 0.5)
    assert float(gaussian_kl(1.0, 2.0, -0.5, 0.5)) == pytest.approx(math.log(0.5) + (2.0 + 2.25) / 1.0 - 0.5)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, v.sqrt()), torch.distributions.Normal(-m, (2 * v).sqrt())
    )
    torch.testing.assert_close(gaussian_kl(m, v, -m, 2 * v), ref)


def test_prior_kl_on_the_toy_problem():
    x0 = MU + S * x_T(4)
    ab = float(SCHED.alphas_cumprod[-1])
    kl = prior_kl(SCHED, x0)
    assert kl.shape == x0.shape and bool((kl >= 0).all())
    expected = 0.5 * (-math.log(1 - ab) + (1 - ab) + ab * x0.numpy() ** 2 - 1)
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-7, atol=1e-15)
    # expectation over the data distribution, in closed form
    mean_kl = 0.5 * (-math.log(1 - ab) + (1 - ab) + ab * (MU**2 + S**2) - 1)
    assert float(kl.mean()) == pytest.approx(mean_kl, rel=0.01)


def test_posterior_mean_var():
    monai = DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    x_t = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 500, 999])
    mean, var = posterior_mean_var(SCHED, x0, x_t, t, t - 1)
    beta = monai.betas.double()[t].reshape(-1, 1, 1)
    ab, ab_prev = (SCHED.alphas_cumprod[i].reshape(-1, 1, 1) for i in (t, t - 1))
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta  # Ho et al. 2020, eq. 7
    mu_tilde = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x_t
    torch.testing.assert_close(var, beta_tilde, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean, mu_tilde, rtol=1e-5, atol=1e-7)
    # between arbitrary timesteps it composes with the forward process: q(x_s | x0) is recovered
    t, s = torch.tensor([999, 700, 300, 10]), torch.tensor([0, 12, 299, 9])
    mean_x0, var = posterior_mean_var(SCHED, x0, torch.zeros_like(x0), t, s)  # coefficient of x0
    mean_xt, _ = posterior_mean_var(SCHED, torch.zeros_like(x0), torch.ones_like(x0), t, s)  # coefficient of x_t
    ab_t, ab_s = (SCHED.alphas_cumprod[i].reshape(-1, 1, 1) for i in (t, s))
    torch.testing.assert_close(mean_x0 + mean_xt * ab_t.sqrt() * x0, ab_s.sqrt() * x0)
    torch.testing.assert_close(mean_xt**2 * (1 - ab_t) + var, (1 - ab_s).expand_as(x0))
    # to clean data: mean x0, no variance
    mean, var = posterior_mean_var(SCHED, x0, x_t, 0, -1)
    torch.testing.assert_close(mean, x0)
    torch.testing.assert_close(var, torch.zeros_like(var))
    with pytest.raises(MedldmError, match="t_prev < t"):
        posterior_mean_var(SCHED, x0, x_t, t, t)
