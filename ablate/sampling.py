"""Sampling from a trained DiT: the EMA samples of training's evaluations and of the
``fid`` measurement, drawn the same way (seeded noise, labels cycling over the classes),
over the ranks of a torchrun launch as in one process.

``SamplingOptions`` are the sampling settings the ``train:`` and ``fid:`` sections share;
``sample_images`` draws with them. A decoder from latents to images belongs here, between
the sampler's output and the returned samples.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .collective import World, gather_to_leader
from .data import to_uint8
from .diffusion import MIN_SAMPLE_STEPS, SAMPLERS, create_diffusion
from .files import replace_with
from .precision import TRUE_BF16, precision_context
from .settings import ConfigError, choice, positive
from .step import compiled


@dataclass
class SamplingOptions:
    """How samples are drawn: the fields the ``train:`` (its evaluations) and ``fid:``
    sections share (both subclass this, so the YAML keys and the measurement keys are
    these names)."""

    sample_steps: int = 50  # respaced diffusion steps (the paper samples with 250)
    sampler: str = "ddpm"  # diffusion.SAMPLERS
    cfg_scale: float = 1.0  # 1: no classifier-free guidance, as in the paper's ablations

    def check(self) -> None:
        positive(self, "sample_steps")
        positive(self, "cfg_scale", allow_zero=True)
        choice(self, "sampler", SAMPLERS)
        # A respaced process needs two steps: its first posterior variance borrows the second's.
        if self.sample_steps < MIN_SAMPLE_STEPS:
            raise ConfigError("sample_steps", f"{self.sample_steps!r} must be >= {MIN_SAMPLE_STEPS} (a respaced "
                                              f"sampler has at least {MIN_SAMPLE_STEPS} steps)")


@torch.no_grad()
def sample_images(model: nn.Module, n: int, options: SamplingOptions = SamplingOptions(), *, image_size: int,
                  precision: str = "fp32", seed: int = 0, batch_size: int = 64,
                  device: torch.device | str = "cpu", compile: bool = False, compile_mode: str = "default",
                  world: World | None = None, uint8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples from a (EMA) DiT with labels cycling 0, 1, ..., num_classes-1, 0, ...,
    drawn with ``options`` (steps, sampler, guidance).

    Returns (samples (n, C, H, W) clamped to [-1, 1], labels (n,)), both on ``device``
    (the samples on the CPU for ``uint8``; none on the other ranks under torchrun, below).
    The noise comes from a generator seeded with ``seed``, so the same seed gives the same
    starting noise at every evaluation and grids over training steps are comparable.

    ``uint8``: each batch is quantised as it is made to the uint8 image that FID scores (the
    same numbers as quantising at the end, in a quarter of the memory) and kept on the CPU,
    where the scoring reads it (50K images at 256 px would hold 9.8 GB of a GPU).

    ``world`` (every rank of a torchrun launch calls this): rank r computes batches r, r + N,
    ...; for the others it only replays their random draws (the sampler run with a denoiser
    that returns zeros: elementwise work, no network), so its generator is where one
    process's would be. Rank 0 gathers the batches (exactly one process's samples) a round of
    N at a time, into the one tensor it returns, so it holds the samples once plus a round
    (not every rank's share and their concatenation at once); the other ranks get no
    samples back (an empty batch), only rank 0 writes and scores them.

    ``precision``: fp32, tf32, bf16 (autocast), or ``bf16-true``: a bf16 copy of the network
    (``ablate.precision.TRUE_BF16``) takes bf16 inputs and its output is read back as fp32,
    so the sampler's own arithmetic (posterior mean and variance) stays fp32; guidance's
    cond/uncond combination runs inside the network's ``forward_with_cfg``, in bf16 (under
    autocast it is bf16 too: the final linear layer's output).

    ``compile``: the denoising network (with guidance) is compiled for one batch shape;
    the last batch is padded to ``batch_size`` (so its noise, drawn for the padded batch,
    differs from the eager path's), and a compile pays only for thousands of images.
    """
    device = torch.device(device)
    cfg_scale, sampler = options.cfg_scale, options.sampler
    if cfg_scale != 1.0 and model.y_embedder.dropout_prob <= 0:
        raise ValueError("cfg_scale != 1 needs a model trained with class dropout (a null class)")
    diffusion = create_diffusion(str(options.sample_steps), learn_sigma=model.learn_sigma)
    diffusion.preload(device)
    generator = torch.Generator(device).manual_seed(seed)
    world = world or World()
    labels = torch.arange(n, device=device) % model.num_classes
    was_training = model.training
    model.eval()
    network = bf16_copy(model) if precision == TRUE_BF16 else model  # the caller's weights stay fp32
    denoise = network if cfg_scale == 1.0 else network.forward_with_cfg
    if precision == TRUE_BF16:
        denoise = _in_bf16(denoise)
    if compile:
        denoise = compiled(denoise, compile_mode)
    home = torch.device("cpu") if uint8 else device  # where the returned samples live
    full = None  # every sample, on rank 0, written in place as its batch arrives (no concatenation)

    def keep(i: int, x: torch.Tensor) -> None:
        nonlocal full
        if full is None:
            full = torch.empty(n, *x.shape[1:], dtype=x.dtype, device=home)
        full[i * batch_size: i * batch_size + len(x)] = x

    batches = labels.split(batch_size) if n else ()  # (split would give one empty batch)
    ready = None  # under torchrun: this rank's batch of the current round, (index, samples on the CPU)
    for i, y in enumerate(batches):
        mine = i % world.size == world.rank
        net = denoise if mine else _replay(model)  # another rank's batch: advance the generator only
        real = len(y)
        if compile and real < batch_size:  # one shape for the compiled network: pad
            y = torch.cat([y, y.new_zeros(batch_size - real)])
        shape = (len(y), model.in_channels, image_size, image_size)
        with precision_context(device, precision):
            if cfg_scale == 1.0:
                x = diffusion.sample(net, shape, {"y": y}, sampler=sampler, device=device, generator=generator)
            else:
                # First half conditional, second half the null class (index num_classes).
                z = torch.randn(*shape, device=device, generator=generator)
                y2 = torch.cat([y, torch.full_like(y, model.num_classes)])
                x = diffusion.sample(net, (2 * len(y), *shape[1:]),
                                     {"y": y2, "cfg_scale": cfg_scale}, sampler=sampler,
                                     noise=torch.cat([z, z]), generator=generator)[: len(y)]
        if mine:
            x = x[:real].float().clamp_(-1, 1)
            x = to_uint8(x).cpu() if uint8 else x
            if world.distributed:
                ready = (i, x.cpu())
            else:
                keep(i, x)
        if world.distributed and (i % world.size == world.size - 1 or i == len(batches) - 1):
            # The end of a round (each rank one batch): its batches to rank 0, every rank in step.
            shares = gather_to_leader(ready)
            ready = None
            for share in shares or ():
                if share is not None:
                    keep(share[0], share[1].to(home))
    model.train(was_training)
    if full is None or (world.distributed and not world.leader):
        # not rank 0 (nothing of the samples is kept here), or no samples asked for
        full = torch.empty(0, model.in_channels, image_size, image_size,
                           dtype=torch.uint8 if uint8 else torch.float32, device=home)
    return full, labels


def bf16_copy(model: nn.Module) -> nn.Module:
    """A bf16 copy of ``model`` for sampling (``bf16-true``): one cast of its weights per
    ``sample_images`` call, instead of autocast's cast of every weight at every denoising
    call. Each tensor is cast as it is copied (deepcopy's memo holds the casts), so no second
    fp32 copy exists even for a moment (DiT-XL/2: 2.7 GB)."""
    if any(getattr(b, "_ablate_compiled", False) for b in getattr(model, "blocks", ())):
        # A copy would keep the original's compiled block forwards (closures over fp32 blocks).
        raise ValueError("bf16-true sampling needs a model whose blocks are not compiled in place "
                         "(compile_scope: blocks): sample from its EMA, or compile the sampler instead")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.bfloat16) if t.is_floating_point() else t.detach().clone()

    memo = {id(p): nn.Parameter(cast(p), requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): cast(b) for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _in_bf16(denoise: Callable) -> Callable:
    """A bf16 network as a denoiser of fp32 images: bf16 in, its output back as fp32 (the
    posterior mean and variance the sampler forms from it are fp32 arithmetic)."""

    def call(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return denoise(x.to(torch.bfloat16), t, **kwargs).float()

    return call


def _replay(model: nn.Module) -> Callable:
    """A stand-in denoiser of ``model``'s output shape that returns zeros: the sampler run
    with it makes the same random draws as with the network, at the cost of its arithmetic."""

    def zeros(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return x.new_zeros(x.shape[0], model.out_channels, *x.shape[2:])

    return zeros


def save_grid(samples: torch.Tensor, path: Path) -> None:
    """A square-ish PNG grid (ceil(sqrt(n)) per row), [-1, 1] mapped to [0, 255]; for
    latents (C > 3) the first three channels, a preview rather than the image."""
    from torchvision.utils import save_image

    nrow = math.ceil(math.sqrt(len(samples)))
    x = samples[:, :3].float().cpu()
    if x.shape[-1] < 64:  # tiny images (digits at 16x16): enlarge so a person can read them
        x = torch.nn.functional.interpolate(x, scale_factor=64 // x.shape[-1], mode="nearest")
    # A fresh file renamed into place: a link planted at ``path`` is replaced, not written through.
    replace_with(Path(path), lambda tmp: save_image(x, tmp, format="png", nrow=nrow, normalize=True,
                                                    value_range=(-1, 1), pad_value=1.0))
