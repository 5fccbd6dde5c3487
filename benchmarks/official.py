"""What the official DiT code (facebookresearch/DiT: train.py, sample.py and the ADM
diffusion it ships) does in a training step and a sampling loop, written anew for the
benchmarks, so that ablate's numbers sit beside the official code's on the same machine.

The behaviour kept, because it sets the speed:
- schedule arrays live in numpy (float64) and each lookup copies the array to the device
  and gathers there (``_extract``), several times per loss and per sampling step;
- the respaced sampler maps timesteps with a tensor built from a Python list every step;
- the training step reads ``loss.item()`` every step (a host-device sync), steps
  ``torch.optim.AdamW`` with PyTorch's defaults (lr 1e-4, weight decay 0) and updates the
  EMA with a Python loop of ``mul_``/``add_`` over ``named_parameters`` (all of them);
- TF32 matmuls are on (train.py sets both flags); "+bf16" wraps the loss (or the sampling
  loop) in ``torch.autocast``.
The network is ablate's ``adaln-zero`` DiT, the official model module for module
(tests/test_official.py checks outputs against the official code); its attention calls
``F.scaled_dot_product_attention`` as timm's does. The official code wraps the model in
DDP; on one GPU that adds nothing to the step and is left out.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import numpy as np
import torch

from ablate.diffusion import discretized_gaussian_log_likelihood, linear_beta_schedule, mean_flat, normal_kl
from ablate.diffusion import space_timesteps


def _extract(arr: np.ndarray, t: torch.Tensor, shape) -> torch.Tensor:
    """arr[t] broadcast to ``shape``, copied from numpy at every call as the official code does."""
    out = torch.from_numpy(arr).to(device=t.device)[t].float()
    while out.ndim < len(shape):
        out = out[..., None]
    return out.expand(shape)


class OfficialDiffusion:
    """ADM's GaussianDiffusion as DiT uses it: linear betas, learned sigma (learned range),
    loss = MSE + variational bound on the variance, optionally respaced for sampling."""

    def __init__(self, steps: int | None = None):
        betas = linear_beta_schedule(1000)
        self.timestep_map = list(range(1000))
        if steps is not None:
            kept = sorted(space_timesteps(1000, str(steps)))
            acp = np.cumprod(1.0 - betas)
            last, new = 1.0, []
            for i in kept:
                new.append(1 - acp[i] / last)
                last = acp[i]
            betas, self.timestep_map = np.array(new), kept
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
        self.log_betas = np.log(betas)

    def q_sample(self, x0, t, noise):
        return (_extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)

    def q_posterior(self, x0, xt, t):
        mean = _extract(self.posterior_mean_coef1, t, xt.shape) * x0 + _extract(self.posterior_mean_coef2, t, xt.shape) * xt
        return mean, _extract(self.posterior_log_variance_clipped, t, xt.shape)

    def p_mean_variance(self, model_output, x, t):
        C = x.shape[1]
        eps, v = torch.split(model_output, C, dim=1)
        min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
        max_log = _extract(self.log_betas, t, x.shape)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = _extract(self.sqrt_recip_alphas_cumprod, t, x.shape) * x - _extract(self.sqrt_recipm1_alphas_cumprod, t, x.shape) * eps
        mean, _ = self.q_posterior(x0, x, t)
        return mean, log_var

    def training_losses(self, model, x0, t, model_kwargs):
        noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, **model_kwargs)
        C = x0.shape[1]
        eps, v = torch.split(out, C, dim=1)
        frozen = torch.cat([eps.detach(), v], dim=1)  # the bound trains only the variance
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        mean, log_var = self.p_mean_variance(frozen, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    @torch.no_grad()
    def p_sample_loop(self, model_fn, noise, model_kwargs):
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.tensor([i] * x.shape[0], device=x.device)
            mapped = torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t]
            mean, log_var = self.p_mean_variance(model_fn(x, mapped, **model_kwargs), x, t)
            nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
            x = mean + nonzero * torch.exp(0.5 * log_var) * torch.randn_like(x)
        return x


@contextlib.contextmanager
def official_precision(device: torch.device, bf16: bool):
    """TF32 on, as train.py and sample.py set it; bf16 autocast for the "+bf16" rows."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def official_update_ema(ema, model, decay: float = 0.9999) -> None:
    ema_params = OrderedDict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


class OfficialStep:
    """train.py's step on one batch: t, loss (optionally under autocast), backward, AdamW,
    EMA loop, ``loss.item()``."""

    def __init__(self, model, ema, bf16: bool):
        self.model, self.ema, self.bf16 = model, ema, bf16
        self.diffusion = OfficialDiffusion()
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
        self.running_loss = 0.0

    def step(self, x, y) -> float:
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        with official_precision(x.device, False):  # TF32 for the whole step
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):  # "+bf16": the loss
                loss = self.diffusion.training_losses(self.model, x, t, dict(y=y))["loss"].mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        official_update_ema(self.ema, self.model)
        self.running_loss += loss.item()  # train.py logs a running mean: a sync every step
        return self.running_loss


def official_sample(model, n: int, steps: int, cfg_scale: float, bf16: bool, device: torch.device,
                    seed: int = 0) -> torch.Tensor:
    """sample.py: n latents with guidance (a batch of 2n through forward_with_cfg, the
    guidance on the first 3 channels), ``steps`` respaced DDPM steps; no VAE decode."""
    torch.manual_seed(seed)
    diffusion = OfficialDiffusion(steps)
    z = torch.randn(n, model.in_channels, model.input_size, model.input_size, device=device)
    y = torch.arange(n, device=device) % model.num_classes
    z = torch.cat([z, z], 0)
    y = torch.cat([y, torch.full_like(y, model.num_classes)], 0)

    def model_fn(x, t, y):
        return model.forward_with_cfg(x, t, y, cfg_scale, cfg_channels=3)

    with official_precision(device, bf16):
        samples = diffusion.p_sample_loop(model_fn, z, dict(y=y))
    return samples.chunk(2, dim=0)[0]
