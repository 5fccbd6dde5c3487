"""Training a DiT as the paper does: DDPM loss, AdamW at a constant 1e-4, an EMA copy.

``train`` runs the loop for one grid run and returns one flat row of summary metrics
(plus its ``log`` and ``evals`` lists, which tables skip). It is written for throughput:
the step has no host-device syncs (the loss is summed on the device and read once per
log window), AdamW is fused where PyTorch has the kernel, the EMA is one foreach lerp
over all parameters rather than a Python loop, and the forward can run under bf16
autocast or ``torch.compile``. ``benchmarks/train_throughput.py`` measures what each
of these buys.

A run is resumable exactly: ``workdir/checkpoint.pt`` holds the weights, the EMA, the
optimizer, every RNG state and the data order, so N steps, a restart and N more steps
give the weights of 2N uninterrupted steps.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn as nn

from .diffusion import LOSSES, create_diffusion
from .measure.peak import precision_context, resolve_precision, synchronize
from .settings import ConfigError, choice, positive

PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 where it is native (ablate.measure.peak)
SAMPLERS = ("ddpm", "ddim")
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainSettings:
    """The ``train:`` section of a grid. Defaults are the paper's (AdamW, lr 1e-4, no weight
    decay, constant LR, EMA 0.9999); class-label dropout (0.1) is a model setting."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_clip: float | None = None
    loss: Literal["hybrid", "mse"] = "hybrid"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where bf16 is native
    compile: bool = False
    log_every: int = 50
    eval_every: int | None = None  # None: evaluate only at the end
    checkpoint_every: int = 500
    sample_steps: int = 50  # respaced steps for evaluation samples (the paper uses 250)
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    cfg_scale: float = 1.0  # 1: no classifier-free guidance
    eval_samples: int = 64  # 0: no sampling, no evaluation

    def check(self) -> None:
        positive(self, "steps", "batch_size", "lr", "log_every", "eval_every", "checkpoint_every",
                 "sample_steps", "grad_clip")
        positive(self, "weight_decay", "eval_samples", "cfg_scale", allow_zero=True)
        choice(self, "loss", LOSSES)
        choice(self, "precision", PRECISIONS)
        choice(self, "sampler", SAMPLERS)
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError("ema_decay", f"{self.ema_decay!r} must be in [0, 1]")


# ---------------------------------------------------------------------------------
# The pieces of a step
# ---------------------------------------------------------------------------------
def make_optimizer(params: list[nn.Parameter], lr: float = 1e-4, weight_decay: float = 0.0):
    """AdamW with the fused kernel (one pass over p, grad, m, v) where PyTorch has it for
    this device, else the foreach implementation."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


@torch.no_grad()
def update_ema(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * p, for all tensors in one foreach call.

    Written as lerp(ema, p, 1 - decay): one read of each tensor and one write, where
    mul_ then add_ would pass over the EMA twice; on a CPU this is memory-bound."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    # pos_embed is a fixed Parameter (requires_grad=False): not optimised, not averaged.
    return [p for p in model.parameters() if p.requires_grad]


def train_step(forward: Callable, diffusion, optimizer, params: list[nn.Parameter],
               x: torch.Tensor, y: torch.Tensor, *, precision: str = "fp32",
               grad_clip: float | None = None) -> torch.Tensor:
    """One optimisation step on a batch; returns the mean loss as a detached 0-dim tensor
    on the device (reading it is a sync point, so the caller decides when)."""
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)  # uniform t
    with precision_context(x.device, precision):
        loss = diffusion.training_losses(forward, x, t, {"y": y})["loss"].mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)  # returns a tensor: no sync
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------------------
# Sampling for evaluation
# ---------------------------------------------------------------------------------
@torch.no_grad()
def sample_images(model: nn.Module, n: int, *, image_size: int, steps: int = 50, sampler: str = "ddpm",
                  cfg_scale: float = 1.0, precision: str = "fp32", seed: int = 0,
                  batch_size: int = 64, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples from a (EMA) DiT with labels cycling 0, 1, ..., num_classes-1, 0, ...

    Returns (samples (n, C, H, W) clamped to [-1, 1], labels (n,)), both on ``device``.
    The noise comes from a generator seeded with ``seed``, so the same seed gives the same
    starting noise at every evaluation and grids over training steps are comparable.
    """
    device = torch.device(device)
    if cfg_scale != 1.0 and model.y_embedder.dropout_prob <= 0:
        raise ValueError("cfg_scale != 1 needs a model trained with class dropout (a null class)")
    diffusion = create_diffusion(str(steps), learn_sigma=model.learn_sigma)
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    generator = torch.Generator(device).manual_seed(seed)
    labels = torch.arange(n, device=device) % model.num_classes
    was_training = model.training
    model.eval()
    out = []
    for y in labels.split(batch_size):
        shape = (len(y), model.in_channels, image_size, image_size)
        with precision_context(device, precision):
            if cfg_scale == 1.0:
                x = loop(model, shape, {"y": y}, device=device, generator=generator)
            else:
                # First half conditional, second half the null class (index num_classes).
                z = torch.randn(*shape, device=device, generator=generator)
                y2 = torch.cat([y, torch.full_like(y, model.num_classes)])
                x = loop(model.forward_with_cfg, (2 * len(y), *shape[1:]), {"y": y2, "cfg_scale": cfg_scale},
                         noise=torch.cat([z, z]), generator=generator)[: len(y)]
        out.append(x.float().clamp_(-1, 1))
    model.train(was_training)
    return torch.cat(out), labels


def save_grid(samples: torch.Tensor, path: Path) -> None:
    """A square-ish PNG grid (ceil(sqrt(n)) per row), [-1, 1] mapped to [0, 255]; for
    latents (C > 3) the first three channels, a preview rather than the image."""
    from torchvision.utils import save_image

    nrow = math.ceil(math.sqrt(len(samples)))
    x = samples[:, :3].float().cpu()
    if x.shape[-1] < 64:  # tiny images (digits at 16x16): enlarge so a person can read them
        x = torch.nn.functional.interpolate(x, scale_factor=64 // x.shape[-1], mode="nearest")
    save_image(x, path, nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=1.0)


# ---------------------------------------------------------------------------------
# Data order that survives a restart
# ---------------------------------------------------------------------------------
class _Batches:
    """``dataset.batches`` plus a resumable position.

    ``batches`` draws one permutation per epoch from the generator, when the epoch's first
    batch is asked for. So the position is the generator's state at the start of the
    current epoch and how many batches of that epoch were drawn: restoring the state and
    skipping that many batches replays the same permutation.
    """

    def __init__(self, dataset, batch_size: int, generator: torch.Generator, device: torch.device,
                 state: dict | None = None):
        self.per_epoch = len(dataset) // batch_size
        self.generator = generator
        self.in_epoch = 0
        if state is not None:
            generator.set_state(state["epoch_rng"])
        self.epoch_rng = generator.get_state()
        self._it: Iterator = dataset.batches(batch_size, generator, device)
        for _ in range(state["in_epoch"] if state is not None else 0):
            next(self)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.in_epoch == self.per_epoch:
            self.in_epoch = 0
        if self.in_epoch == 0:
            self.epoch_rng = self.generator.get_state()  # the state the next permutation is drawn from
        self.in_epoch += 1
        return next(self._it)

    def state(self) -> dict:
        return {"epoch_rng": self.epoch_rng, "in_epoch": self.in_epoch}


# ---------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file and rename it over ``path``: a crash mid-write leaves the
    previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _plain(v: Any) -> Any:
    # Metrics come back as numpy or 0-dim tensor scalars; checkpoints store plain numbers.
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if hasattr(v, "item") and getattr(v, "shape", None) == ():
        return v.item()
    return v


# ---------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------
def train(model: nn.Module, dataset, settings: TrainSettings, *, workdir: Path | str, seed: int,
          device: torch.device | str, progress: bool = True,
          evaluate: Callable[[nn.Module, torch.Tensor, int], dict] | None = None) -> dict:
    """Train ``model`` on ``dataset`` for ``settings.steps`` steps, resuming from
    ``workdir/checkpoint.pt`` if it exists.

    Every ``eval_every`` steps and at the end, ``eval_samples`` EMA samples are drawn,
    saved as ``workdir/samples_step{step:07d}.png`` and passed to
    ``evaluate(ema_model, samples, step)`` (samples (n, C, H, W) in [-1, 1] on ``device``,
    labels i % num_classes), whose dict is recorded in ``evals``. Returns the summary row:
    train_steps, loss_start, final_loss, train_img_per_s, train_wall_s, train_precision,
    and the non-scalar ``log`` and ``evals``.
    """
    settings.check()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    precision = resolve_precision(device, settings.precision)
    if settings.cfg_scale != 1.0 and settings.eval_samples and model.y_embedder.dropout_prob <= 0:
        raise ValueError("train.cfg_scale != 1 needs a model with class_dropout_prob > 0")

    torch.manual_seed(seed)  # timesteps, noise and label dropout all draw from the global RNG
    model = model.to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = trainable(model)
    ema_params = [e for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    optimizer = make_optimizer(params, settings.lr, settings.weight_decay)
    diffusion = create_diffusion(None, learn_sigma=model.learn_sigma, loss=settings.loss)
    forward = torch.compile(model) if settings.compile else model
    data_rng = torch.Generator().manual_seed(seed)

    path = workdir / CHECKPOINT
    start, log, evals, wall_before, window = 0, [], [], 0.0, None
    data_state = None
    if path.exists():
        ck = load_checkpoint(path)
        for key, want in (("seed", seed), ("batch_size", settings.batch_size)):
            if ck[key] != want:
                raise ValueError(f"{path}: saved with {key}={ck[key]}, asked to resume with {key}={want}; "
                                 "use a new workdir")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        optimizer.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"], device)
        data_state = ck["data"]
        start, log, evals, wall_before = ck["step"], ck["log"], ck["evals"], ck["train_wall_s"]
        window = ck["window"]
    batches = _Batches(dataset, settings.batch_size, data_rng, device, data_state)

    # The loss of the current log window, summed on the device: no sync per step.
    loss_sum = torch.zeros((), device=device)
    window_steps = 0
    if window is not None:
        loss_sum += window["loss_sum"].to(device)
        window_steps = window["steps"]
    timed_steps = 0  # steps of the window run by this process (a resumed window began before it)
    first_window = True  # this process's first window carries compile and allocator warm-up
    last_loss = log[-1]["loss"] if log else float("nan")

    def wall() -> float:
        return wall_before + (time.perf_counter() - t_start - paused)

    def checkpoint(step: int, train_wall: float) -> None:
        save_checkpoint(path, {
            "step": step, "seed": seed, "batch_size": settings.batch_size, "settings": asdict(settings),
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": _rng_state(device), "data": batches.state(),
            "window": {"loss_sum": loss_sum.cpu(), "steps": window_steps},
            "log": log, "evals": evals, "train_wall_s": train_wall,
        })

    def run_eval(step: int, train_wall: float) -> None:
        samples, _ = sample_images(ema, settings.eval_samples, image_size=dataset.image_size,
                                   steps=settings.sample_steps, sampler=settings.sampler,
                                   cfg_scale=settings.cfg_scale, precision=precision, seed=seed,
                                   batch_size=settings.batch_size, device=device)
        save_grid(samples, workdir / f"samples_step{step:07d}.png")
        metrics = evaluate(ema, samples, step) if evaluate is not None else {}
        evals.append({"step": step, "train_loss": last_loss, "train_wall_s": train_wall,
                      **{k: _plain(v) for k, v in metrics.items()}})

    from tqdm.auto import tqdm

    bar = tqdm(total=settings.steps, initial=start, disable=not progress, desc="train", unit="step")
    synchronize(device)
    t_start = t_window = time.perf_counter()
    paused = window_paused = 0.0  # seconds spent evaluating and checkpointing, not training
    for step in range(start + 1, settings.steps + 1):
        x, y = next(batches)
        loss_sum += train_step(forward, diffusion, optimizer, params, x, y, precision=precision,
                               grad_clip=settings.grad_clip)
        update_ema(ema_params, params, settings.ema_decay)
        window_steps += 1
        timed_steps += 1
        bar.update(1)

        if step % settings.log_every == 0 or step == settings.steps:
            last_loss = (loss_sum / window_steps).item()  # the sync point: once per window
            now = time.perf_counter()
            seconds = now - t_window - window_paused
            log.append({"step": step, "loss": last_loss, "step_ms": 1e3 * seconds / timed_steps,
                        "img_per_s": timed_steps * settings.batch_size / seconds,
                        "images": timed_steps * settings.batch_size, "train_wall_s": wall(),
                        "first_window": first_window})
            bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{log[-1]['img_per_s']:.1f}")
            loss_sum.zero_()
            window_steps = timed_steps = 0
            first_window, t_window, window_paused = False, now, 0.0

        due_eval = settings.eval_samples > 0 and (
            step == settings.steps or (settings.eval_every is not None and step % settings.eval_every == 0))
        due_checkpoint = step % settings.checkpoint_every == 0 or step == settings.steps
        if due_eval or due_checkpoint:
            synchronize(device)
            t0, train_wall = time.perf_counter(), wall()
            if due_eval:
                run_eval(step, train_wall)
            if due_checkpoint:
                checkpoint(step, train_wall)
            spent = time.perf_counter() - t0
            paused += spent
            window_paused += spent
    bar.close()
    return summarize(log, evals, precision)


def summarize(log: list[dict], evals: list[dict], precision: str) -> dict:
    """The run's row: first and last window losses, throughput after warm-up, wall time."""
    if not log:
        raise ValueError("no training steps were logged")
    # Throughput from the windows after each process's first (compile, allocator warm-up);
    # a run too short to have any falls back to all windows.
    steady = [e for e in log if not e["first_window"]] or log
    images = sum(e["images"] for e in steady)
    seconds = sum(e["images"] / e["img_per_s"] for e in steady)
    return {
        "train_steps": log[-1]["step"],
        "loss_start": log[0]["loss"],
        "final_loss": log[-1]["loss"],
        "train_img_per_s": images / seconds,
        "train_wall_s": log[-1]["train_wall_s"],
        "train_precision": precision,
        "log": log,
        "evals": evals,
    }
