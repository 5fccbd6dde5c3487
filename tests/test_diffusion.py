"""Gaussian diffusion: schedule, forward process, bound terms, respacing and samplers."""
import math

import numpy as np
import pytest
import torch

from ablate.diffusion import (
    GaussianDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    normal_kl,
    space_timesteps,
)

BASE = create_diffusion()  # 1000 steps, the schedule every oracle below is written against


def _acp(t_orig: torch.Tensor) -> torch.Tensor:
    """Original-schedule alphas_cumprod at original timesteps, (N,) -> (N, 1, 1, 1)."""
    return torch.from_numpy(BASE.alphas_cumprod)[t_orig].float().view(-1, 1, 1, 1)


def _x0_oracle(x0: torch.Tensor, v: float = 0.0, seen: list | None = None):
    """An eps-model that knows x0: eps = (x_t - sqrt(acp) x0) / sqrt(1 - acp), plus v channels."""

    def model_fn(x, t, y=None):
        if seen is not None:
            seen.append((t.clone(), y))
        a = _acp(t)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.full_like(eps, v)], dim=1)

    return model_fn



# ---------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------
def test_linear_schedule_alphas_cumprod_endpoints():
    d = BASE
    assert d.num_timesteps == 1000
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    assert d.alphas_cumprod[0] == pytest.approx(1 - 1e-4, abs=1e-15)
    closed = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(1000))
    assert d.alphas_cumprod[-1] == pytest.approx(closed, rel=1e-12)
    assert d.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-4)  # the well-known value
    # ADM's scaling: half the steps, twice the betas, about the same end point.
    b500 = linear_beta_schedule(500)
    assert b500[0] == pytest.approx(2e-4) and b500[-1] == pytest.approx(0.04)


def test_posterior_variance_at_t0_is_zero_and_log_is_clipped():
    d = BASE
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    assert d.posterior_log_variance_clipped[1] == pytest.approx(math.log(d.posterior_variance[1]))
    # beta_1 (1 - acp_0) / (1 - acp_1) by hand
    b0, b1 = d.betas[0], d.betas[1]
    assert d.posterior_variance[1] == pytest.approx(b1 * b0 / (1 - (1 - b0) * (1 - b1)), rel=1e-12)
    # q(x_{t-1} | x_t, x0) at t=0 is x0 itself.
    assert d.posterior_mean_coef1[0] == pytest.approx(1.0) and d.posterior_mean_coef2[0] == 0.0


def test_q_sample_statistics():
    torch.manual_seed(0)
    n = 200_000
    x0 = torch.tensor([0.7, -0.3]).view(1, 2, 1, 1).expand(n, 2, 1, 1)
    for step in (10, 500, 999):
        t = torch.full((n,), step, dtype=torch.long)
        xt = BASE.q_sample(x0, t)
        acp = BASE.alphas_cumprod[step]
        mean = xt.mean(0).flatten()
        var = xt.var(0).flatten()
        expected_mean = math.sqrt(acp) * torch.tensor([0.7, -0.3])
        torch.testing.assert_close(mean, expected_mean, atol=1e-2, rtol=0)
        torch.testing.assert_close(var, torch.full((2,), 1 - acp), atol=0, rtol=1.5e-2)


# ---------------------------------------------------------------------------------
# Gaussian helpers
# ---------------------------------------------------------------------------------
def test_normal_kl():
    m, lv = torch.randn(5), torch.randn(5)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(5), atol=1e-7)
    # KL(N(0, 1) || N(1, 2^2)) = log 2 + (1 + 1) / 8 - 1/2
    kl = normal_kl(torch.tensor(0.0), 0.0, 1.0, math.log(4.0))
    assert kl.item() == pytest.approx(math.log(2) + 0.25 - 0.5, rel=1e-6)


def test_discretized_gaussian_log_likelihood_sums_to_one_over_bins():
    bins = torch.linspace(-1, 1, 256)  # the 256 levels of 8-bit data
    for mean, scale in ((0.1, 0.3), (-0.95, 0.01), (0.0, 2.0)):
        lp = discretized_gaussian_log_likelihood(
            bins, torch.full_like(bins, mean), torch.full_like(bins, math.log(scale))
        )
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # An interior bin against the exact normal CDF (the tanh approximation is within ~1e-3).
    x, mean, scale = 0.2, 0.21, 0.02
    lp = discretized_gaussian_log_likelihood(
        torch.tensor(x), torch.tensor(mean), torch.tensor(math.log(scale))
    )
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    exact = cdf((x - mean + 1 / 255) / scale) - cdf((x - mean - 1 / 255) / scale)
    assert lp.exp().item() == pytest.approx(exact, abs=1e-3)


# ---------------------------------------------------------------------------------
# Respacing
# ---------------------------------------------------------------------------------
def test_respacing_all_steps_reproduces_betas():
    d = create_diffusion(timestep_respacing=1000)
    np.testing.assert_allclose(d.betas, BASE.betas, rtol=1e-10)
    np.testing.assert_array_equal(d.timestep_map, np.arange(1000))


def test_respacing_to_250_keeps_alphas_cumprod_and_original_timesteps():
    d = create_diffusion(timestep_respacing=250)
    kept = d.timestep_map
    assert d.num_timesteps == 250 and len(d.betas) == 250
    assert kept[0] == 0 and kept[-1] == 999 and (np.diff(kept) > 0).all()
    assert set(np.diff(kept)) == {4, 5}  # 999 / 249 = 4.012 rounded
    np.testing.assert_allclose(d.alphas_cumprod, BASE.alphas_cumprod[kept], rtol=1e-12)
    assert d.betas[1] == pytest.approx(1 - BASE.alphas_cumprod[4] / BASE.alphas_cumprod[0])
    assert d.timestep_map.tolist() == space_timesteps(1000, "250")

    seen = []
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    y = torch.tensor([3, 7])
    d.sample(_x0_oracle(x0, seen=seen), x0.shape, model_kwargs={"y": y})
    ts = torch.stack([t for t, _ in seen])  # (250, N)
    assert ts[:, 0].tolist() == kept[::-1].tolist()  # the model only ever sees original steps
    assert all(got is y for _, got in seen)  # model_kwargs reach the model


def test_space_timesteps_strings():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    # Three sections of 334, 333, 333 steps; each keeps its first and last step.
    steps = space_timesteps(1000, "2,3,4")
    assert steps == [0, 333, 334, 500, 666, 667, 778, 888, 999]
    assert create_diffusion("ddim50").num_timesteps == 50
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim300")  # strides 3 and 4 give 334 and 250 steps
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


# ---------------------------------------------------------------------------------
# Training losses
# ---------------------------------------------------------------------------------
def _true_noise_oracle(noise, v):
    return lambda x, t: torch.cat([noise, torch.full_like(noise, v)], dim=1)


def test_oracle_losses_are_zero_for_t_positive():
    torch.manual_seed(0)
    x0 = torch.rand(6, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 2, 10, 100, 500, 999])
    # v = -1 puts the model's log variance at the true posterior's (clipped) one.
    out = BASE.training_losses(_true_noise_oracle(noise, -1.0), x0, t, noise=noise)
    assert out["mse"].shape == (6,) and out["vb"].shape == (6,) and out["loss"].shape == (6,)
    assert torch.equal(out["mse"], torch.zeros(6))
    assert out["vb"].abs().max().item() < 1e-4
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    # v = +1: right mean, variance beta_t; the bound is the KL between the two variances.
    wrong = BASE.training_losses(_true_noise_oracle(noise, 1.0), x0, t, noise=noise)
    ratio = BASE.posterior_variance[t.numpy()] / BASE.betas[t.numpy()]
    kl_bits = 0.5 * (-1 - np.log(ratio) + ratio) / math.log(2)
    assert kl_bits[0] == pytest.approx(0.1751, abs=1e-4)  # t=1: posterior var ~ beta / 2
    torch.testing.assert_close(wrong["vb"], torch.from_numpy(kl_bits).float(), atol=1e-6, rtol=1e-4)


def test_vb_at_t0_is_the_decoder_nll():
    torch.manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4) * 1.8 - 0.9  # interior values: two-sided bins
    noise = torch.randn_like(x0)
    t = torch.zeros(2, dtype=torch.long)
    vb = BASE.training_losses(_true_noise_oracle(noise, -1.0), x0, t, noise=noise)["vb"]
    # The model mean at t=0 is x0 itself; the std is sqrt(posterior_variance[1]).
    sigma = math.sqrt(BASE.posterior_variance[1])
    p_bin = math.erf((1 / 255) / (sigma * math.sqrt(2)))
    expected = -math.log2(p_bin)
    assert expected == pytest.approx(1.305, abs=1e-3)
    torch.testing.assert_close(vb, torch.full((2,), expected), atol=5e-3, rtol=0)


def test_mse_only_variants_have_no_vb():
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 5, 900])
    out = create_diffusion(loss="mse").training_losses(
        _true_noise_oracle(noise + 0.5, 0.0), x0, t, noise=noise
    )
    assert "vb" not in out and torch.equal(out["loss"], out["mse"])
    torch.testing.assert_close(out["mse"], torch.full((3,), 0.25))
    fixed = create_diffusion(learn_sigma=False)  # loss="hybrid" but nothing to learn
    out = fixed.training_losses(lambda x, t: noise, x0, t, noise=noise)
    assert "vb" not in out and torch.equal(out["loss"], torch.zeros(3))
    with pytest.raises(ValueError):
        fixed.training_losses(_true_noise_oracle(noise, 0.0), x0, t, noise=noise)


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    torch.manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    t = torch.tensor([0, 3, 300, 999])
    out_param = torch.randn(4, 6, 4, 4).mul_(0.5).requires_grad_()
    losses = BASE.training_losses(lambda x, t: out_param, x0, t)

    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out_param, retain_graph=True)
    assert torch.equal(g_vb[:, :3], torch.zeros_like(g_vb[:, :3]))  # eps channels frozen
    assert (g_vb[:, 3:].abs() > 0).float().mean() > 0.99
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out_param)
    assert torch.equal(g_mse[:, 3:], torch.zeros_like(g_mse[:, 3:]))
    assert (g_mse[:, :3].abs() > 0).all()


# ---------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------
def test_ddim_eta0_with_x0_oracle_recovers_x0():
    torch.manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    for d in (create_diffusion("ddim50"), create_diffusion(250)):
        sample = d.sample(_x0_oracle(x0), x0.shape, eta=0.0, sampler="ddim")
        torch.testing.assert_close(sample, x0, atol=1e-5, rtol=0)


def test_ddpm_with_x0_oracle_lands_on_x0():
    torch.manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    sample = create_diffusion(100).sample(_x0_oracle(x0), x0.shape, clip_denoised=True)
    torch.testing.assert_close(sample, x0, atol=1e-4, rtol=0)


def _gaussian_data_eps_model(mu: float, s: float):
    """The exact E[eps | x_t] when every element of x0 is N(mu, s^2) independently."""

    def model_fn(x, t):
        a = _acp(t)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)
        return torch.cat([eps, torch.full_like(eps, -1.0)], dim=1)  # posterior variance

    return model_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_reproduce_gaussian_data(sampler):
    """With the exact eps-model, samples follow the data distribution, not just its mean."""
    mu, s = 0.3, 0.5
    g = torch.Generator().manual_seed(0)
    shape = (64, 1, 8, 8)  # 4096 scalar samples: standard errors 0.008 (mean), 0.006 (std)
    model = _gaussian_data_eps_model(mu, s)
    if sampler == "ddpm":
        x = BASE.sample(model, shape, generator=g)
    else:
        # 250 steps: with 50 the ODE's discretisation error alone shrinks the std by 5%.
        x = create_diffusion(250).sample(model, shape, generator=g, sampler="ddim")
    assert x.mean().item() == pytest.approx(mu, abs=0.025)
    assert x.std().item() == pytest.approx(s, abs=0.02)


def test_sampling_is_reproducible_with_a_generator():
    model = _gaussian_data_eps_model(0.0, 1.0)
    d = create_diffusion(20)
    a = d.sample(model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    b = d.sample(model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    c = d.sample(model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(2, 1, 4, 4)
    assert torch.equal(d.sample(model, noise.shape, noise=noise, sampler="ddim"),
                       d.sample(model, noise.shape, noise=noise, sampler="ddim"))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        GaussianDiffusion(linear_beta_schedule(10), loss="l1")
    with pytest.raises(ValueError):
        GaussianDiffusion(np.array([0.1, 1.5]))
