"""Gaussian diffusion as trained and sampled in DiT (which follows OpenAI's ADM).

Epsilon prediction; with ``learn_sigma`` the model also outputs a value v in [-1, 1]
per element that interpolates the log variance between the posterior variance and
beta_t ("learned range"), trained by the variational bound ("hybrid" loss). Without
it the variance is fixed to beta_t ("fixed large"), as DiT does.

The schedule is precomputed in float64 numpy and gathered per timestep into float32
tensors; ``training_losses`` has no host-device syncs, so it can sit in a compiled or
CUDA-graphed training step.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch

ModelFn = Callable[..., torch.Tensor]
LOSSES = ("hybrid", "mse")
SAMPLERS = ("ddpm", "ddim")  # ancestral, and DDIM (Song et al. 2021)
# A respaced process needs two steps: the clipped log-variance of its first posterior step
# borrows the second's (as ADM and DiT do), and one step has no second (SamplingOptions checks it).
MIN_SAMPLE_STEPS = 2


# ---------------------------------------------------------------------------------
# Schedules and respacing
# ---------------------------------------------------------------------------------
def linear_beta_schedule(num_steps: int) -> np.ndarray:
    """ADM's linear schedule: 1e-4 -> 0.02 at 1000 steps, scaled so other lengths match it."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def space_timesteps(num_steps: int, section_counts: int | str | list[int]) -> list[int]:
    """The original timesteps kept by a respacing, sorted ascending.

    ``"ddimN"`` keeps every k-th step from 0 for the integer stride k giving exactly N steps.
    Otherwise the steps are cut into equal sections (``"10,15,20"``; an int is one section)
    and each section keeps its count of steps evenly spread from its first to its last.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        want = int(section_counts[len("ddim"):])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == want:
                return list(range(0, num_steps, stride))
        raise ValueError(f"no integer stride gives exactly {want} of {num_steps} steps")
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        section_counts = [int(s) for s in section_counts.split(",")]

    size_per, extra = divmod(num_steps, len(section_counts))
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot keep {count} steps of a {size}-step section")
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        # Python's round (half to even), as ADM, so the kept steps match the official ones.
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))


def create_diffusion(
    timestep_respacing: int | str | None = None,
    num_steps: int = 1000,
    learn_sigma: bool = True,
    loss: str = "hybrid",
) -> "GaussianDiffusion":
    """DiT's diffusion: linear schedule, optionally respaced to fewer steps for sampling."""
    betas = linear_beta_schedule(num_steps)
    if timestep_respacing is None or timestep_respacing == "":
        return GaussianDiffusion(betas, learn_sigma=learn_sigma, loss=loss)
    kept = space_timesteps(num_steps, timestep_respacing)
    acp = np.cumprod(1.0 - betas)
    # Same alphas_cumprod at the kept steps; each new beta spans the skipped ones.
    acp_kept = acp[kept]
    new_betas = 1.0 - acp_kept / np.append(1.0, acp_kept[:-1])
    return GaussianDiffusion(new_betas, learn_sigma=learn_sigma, loss=loss, timestep_map=kept)


# ---------------------------------------------------------------------------------
# Gaussian helpers
# ---------------------------------------------------------------------------------
def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise; scalars broadcast."""
    ref = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor))
    mean1, logvar1, mean2, logvar2 = (
        torch.as_tensor(a, dtype=ref.dtype, device=ref.device)
        for a in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF via the tanh approximation that ADM's bits/dim numbers use."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-probability (nats) of data in [-1, 1] under a Gaussian binned into 256 levels.

    Bins are 2/255 wide around each level; the two edge bins extend to +-infinity so the
    256 probabilities sum to 1.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # Clamps keep log finite where the approximate CDF saturates to exactly 0 or 1.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


# ---------------------------------------------------------------------------------
# The diffusion process
# ---------------------------------------------------------------------------------
class GaussianDiffusion:
    """Forward process, model posterior, training losses and samplers for one beta schedule.

    ``timestep_map[i]`` is the original timestep of (respaced) step i; the model is always
    called with original timesteps, so a model trained on 1000 steps samples with fewer.
    """

    def __init__(
        self,
        betas: np.ndarray,
        learn_sigma: bool = True,
        loss: str = "hybrid",
        timestep_map: list[int] | None = None,
    ):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.learn_sigma = learn_sigma
        self.loss = loss
        self.num_timesteps = len(betas)
        self.timestep_map = None if timestep_map is None else np.asarray(timestep_map, np.int64)
        if self.timestep_map is not None and len(self.timestep_map) != self.num_timesteps:
            raise ValueError("timestep_map needs one original timestep per step")

        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        self.betas = betas
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = acp_prev
        self.alphas_cumprod_next = np.append(acp[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1.0)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        # The variance is 0 at t=0; its log is clipped to the t=1 value to stay finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
        self.log_betas = np.log(betas)
        # "Fixed large" variance: beta_t, with the posterior variance at t=0 (a better decoder).
        self.fixed_large_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    # -- schedule lookup ------------------------------------------------------------
    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        # One host-to-device copy per array and device; after that only on-device gathers.
        tables = self._tables.setdefault(device, {})
        if name not in tables:
            tables[name] = torch.from_numpy(getattr(self, name)).to(device)
        return tables[name]

    def preload(self, device: torch.device) -> None:
        """Copy every schedule array to ``device`` now, so a compiled step finds them there
        (and the graph holds no host-to-device copies)."""
        for name, value in list(vars(self).items()):
            if isinstance(value, np.ndarray):
                self._table(name, torch.device(device))

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Gather schedule array ``name`` at timesteps t: (N,) -> (N, 1, ..., 1) float32."""
        return self._table(name, t.device)[t].float().view(-1, *([1] * (ndim - 1)))

    def _call_model(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs):
        if self.timestep_map is not None:
            t = self._table("timestep_map", t.device)[t]  # respaced step -> original timestep
        out = model_fn(x, t, **(model_kwargs or {}))
        want = 2 * x.shape[1] if self.learn_sigma else x.shape[1]
        if out.shape[1] != want:
            raise ValueError(f"model_fn returned {out.shape[1]} channels, expected {want}")
        return out

    # -- forward process ------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None):
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(acp_t) x_0, (1 - acp_t) I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            self._extract("sqrt_alphas_cumprod", t, x0.ndim) * x0
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise
        )

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.ndim) * x0
            + self._extract("posterior_mean_coef2", t, x_t.ndim) * x_t
        )
        var = self._extract("posterior_variance", t, x_t.ndim)
        log_var = self._extract("posterior_log_variance_clipped", t, x_t.ndim)
        return mean, var, log_var

    # -- model posterior ------------------------------------------------------------
    def _predict_x0_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps
        )

    def _predict_eps_from_x0(self, x_t, t, x0):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - x0
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim)

    def _p_mean_variance_from_output(self, out, x, t, clip_denoised: bool):
        C = x.shape[1]
        if self.learn_sigma:
            eps, v = out[:, :C], out[:, C:]  # (N, C, H, W) each
            min_log = self._extract("posterior_log_variance_clipped", t, x.ndim)
            max_log = self._extract("log_betas", t, x.ndim)
            frac = (v + 1) / 2  # v in [-1, 1] -> [0, 1]
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            eps = out
            log_var = self._extract("fixed_large_log_variance", t, x.ndim).expand_as(x)
        x0 = self._predict_x0_from_eps(x, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(x0, x, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_var),
            "log_variance": log_var,
            "pred_xstart": x0,
            "eps": eps,
        }

    def p_mean_variance(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
    ) -> dict:
        """p(x_{t-1} | x_t): dict of mean, variance, log_variance, pred_xstart, eps."""
        out = self._call_model(model_fn, x, t, model_kwargs)
        return self._p_mean_variance_from_output(out, x, t, clip_denoised)

    # -- training -------------------------------------------------------------------
    def _vb_bits_per_dim(self, p: dict, x0, x_t, t) -> torch.Tensor:
        """One term of the variational bound in bits/dim, (N,): KL for t>0, decoder NLL at t=0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]))
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        )
        # torch.where, not a Python branch: no device sync in the training step.
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict:
        """Per-sample losses, each (N,): "loss", "mse" and, for the hybrid loss, "vb"."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = self._call_model(model_fn, x_t, t, model_kwargs)
        C = x0.shape[1]
        terms = {"mse": mean_flat((noise - out[:, :C]) ** 2)}
        if self.learn_sigma and self.loss == "hybrid":
            # The bound trains only the variance: the mean comes from a detached eps.
            frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
            p = self._p_mean_variance_from_output(frozen, x_t, t, clip_denoised=False)
            # The bound sums num_timesteps terms; the factor keeps its weight that of 1000
            # steps (improved-diffusion's rescaled MSE; DiT's plain MSE omits it, which is
            # the same thing at 1000 training steps).
            terms["vb"] = self._vb_bits_per_dim(p, x0, x_t, t) * (self.num_timesteps / 1000.0)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # -- sampling -------------------------------------------------------------------
    @staticmethod
    def _randn(shape, device, generator):
        return torch.randn(*shape, device=device, generator=generator)

    def _steps(self, progress: bool):
        steps = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps)
        return steps

    @torch.no_grad()
    def p_sample(self, model_fn, x, t, model_kwargs=None, clip_denoised=False, generator=None):
        """One ancestral step x_t -> x_{t-1}; no noise is added at t=0."""
        p = self.p_mean_variance(model_fn, x, t, model_kwargs, clip_denoised)
        noise = self._randn(x.shape, x.device, generator)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": p["pred_xstart"]}

    @torch.no_grad()
    def ddim_sample(
        self, model_fn, x, t, model_kwargs=None, clip_denoised=False, eta=0.0, generator=None
    ):
        """One DDIM step x_t -> x_{t-1}; eta=0 is deterministic, eta=1 matches DDPM's variance."""
        p = self.p_mean_variance(model_fn, x, t, model_kwargs, clip_denoised)
        # eps re-derived from the (possibly clipped) x0 so the two stay consistent.
        eps = self._predict_eps_from_x0(x, t, p["pred_xstart"])
        acp = self._extract("alphas_cumprod", t, x.ndim)
        acp_prev = self._extract("alphas_cumprod_prev", t, x.ndim)
        sigma = eta * torch.sqrt((1 - acp_prev) / (1 - acp)) * torch.sqrt(1 - acp / acp_prev)
        mean = p["pred_xstart"] * torch.sqrt(acp_prev) + torch.sqrt(1 - acp_prev - sigma**2) * eps
        noise = self._randn(x.shape, x.device, generator)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean + nonzero * sigma * noise, "pred_xstart": p["pred_xstart"]}

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        model_kwargs: dict | None = None,
        *,
        sampler: str = "ddpm",
        noise: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        clip_denoised: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Samples x_0 from pure noise over all steps: ancestral (``sampler="ddpm"``) or DDIM
        (``"ddim"``, with ``eta``: 0 deterministic, 1 DDPM's variance)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        step = self.p_sample if sampler == "ddpm" else functools.partial(self.ddim_sample, eta=eta)
        x = noise if noise is not None else self._randn(shape, device or "cpu", generator)
        for i in self._steps(progress):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            x = step(model_fn, x, t, model_kwargs, clip_denoised, generator=generator)["sample"]
        return x
