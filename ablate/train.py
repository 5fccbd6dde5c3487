"""Training a DiT as the paper does: DDPM loss, AdamW at a constant 1e-4, an EMA copy.

``train`` runs the loop for one grid cell and returns one flat row of summary metrics
(plus its ``log`` and ``evals`` lists, which tables skip). It is written for throughput:
the step has no host-device syncs (the loss is summed on the device and read once per
log window), and the step is ``ablate.step.TrainStep``: forward and loss compiled as one
graph (on CUDA by default), bf16 autocast where it is native, fused AdamW, the EMA as one
foreach lerp. ``benchmarks/train_throughput.py`` measures it beside the official code.

A run is resumable exactly: ``workdir/checkpoint.pt`` holds the weights, the EMA, the
optimizer, every RNG state and the data order, so N steps, a restart and N more steps
give the weights of 2N uninterrupted steps. ``workdir/ema_step{N:07d}.pt`` keeps the EMA
at every earlier ``eval_every`` step (``ema_snapshots``), for quality over steps.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .defaults import SAMPLE_GRID
from .diffusion import LOSSES, SAMPLERS, check_sample_steps, create_diffusion
from .distributed import World, all_gather, gather_to_leader, leader_only, mean, world as current_world
from .precision import PRECISIONS as ALL_PRECISIONS
from .precision import TRUE_BF16, precision_context, resolve_precision, synchronize
from .files import replace_with, set_aside
from .settings import ConfigError, added_later, choice, one_line, positive
from .step import (TrainStep, check_compile, compiled, make_optimizer, peak_memory_mb,  # noqa: F401
                   reset_peak_memory, resolve_compile, train_step, trainable, update_ema)

# tf32 is a CUDA matmul mode that timing compares; training runs fp32 or bf16 autocast.
PRECISIONS = tuple(p for p in ALL_PRECISIONS if p != "tf32")
CHECKPOINT = "checkpoint.pt"
EMA_SNAPSHOT = "ema_step{step:07d}.pt"  # the final step's EMA is the checkpoint's


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
    loss: str = "hybrid"  # diffusion.LOSSES
    precision: str = "auto"  # PRECISIONS; auto: bf16 autocast where bf16 is native
    compile: bool | str = "auto"  # auto: on for CUDA, off for CPUs (ablate.step)
    compile_mode: str = "default"  # or reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs
    compile_scope: str = "step"  # or blocks: regional compilation, one graph per distinct block
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory
    # Under bf16 autocast, the residual stream between blocks in bf16 too (Megatron-LM's way;
    # DiT keeps it fp32): half the bytes of the elementwise work around each block.
    low_precision_residual: bool = added_later(False)
    log_every: int = 50
    eval_every: int | None = None  # None: evaluate only at the end
    checkpoint_every: int = 500
    sample_steps: int = 50  # respaced steps for evaluation samples (the paper uses 250)
    sampler: str = "ddpm"  # diffusion.SAMPLERS
    cfg_scale: float = 1.0  # 1: no classifier-free guidance
    eval_samples: int = 64  # 0: no sampling, no evaluation
    # An EMA-only copy of the weights at every eval_every step (ema_step{N:07d}.pt), so that
    # quality over steps (the fid measurement) can be measured later, again, with any setting,
    # without retraining. Costs 4 bytes per parameter each: DiT-XS/4 16 MB, DiT-XL/2 2.7 GB.
    ema_snapshots: bool = True

    def check(self) -> None:
        positive(self, "steps", "batch_size", "lr", "log_every", "eval_every", "checkpoint_every",
                 "sample_steps", "grad_clip")
        positive(self, "weight_decay", "eval_samples", "cfg_scale", allow_zero=True)
        choice(self, "loss", LOSSES)
        choice(self, "precision", PRECISIONS)
        choice(self, "sampler", SAMPLERS)
        check_sample_steps(self)
        check_compile(self)
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError("ema_decay", f"{self.ema_decay!r} must be in [0, 1]")


# ---------------------------------------------------------------------------------
# Sampling for evaluation
# ---------------------------------------------------------------------------------
@torch.no_grad()
def sample_images(model: nn.Module, n: int, *, image_size: int, steps: int = 50, sampler: str = "ddpm",
                  cfg_scale: float = 1.0, precision: str = "fp32", seed: int = 0,
                  batch_size: int = 64, device: torch.device | str = "cpu", compile: bool = False,
                  compile_mode: str = "default", world: World | None = None,
                  uint8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples from a (EMA) DiT with labels cycling 0, 1, ..., num_classes-1, 0, ...

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
    from .quality.extractors import to_uint8 as quantised

    device = torch.device(device)
    if cfg_scale != 1.0 and model.y_embedder.dropout_prob <= 0:
        raise ValueError("cfg_scale != 1 needs a model trained with class dropout (a null class)")
    diffusion = create_diffusion(str(steps), learn_sigma=model.learn_sigma)
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
            x = quantised(x).cpu() if uint8 else x
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
    """Write to a fresh temporary file and rename it over ``path``: a crash or a full disk
    mid-write leaves the previous checkpoint intact and no temporary file behind."""
    replace_with(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_or_set_aside(path: Path, move: bool = True) -> dict | None:
    """The checkpoint, or None if there is none or it cannot be read: a corrupt one (a
    full disk, a copy cut short) is renamed ``*.corrupt`` (by rank 0 alone: ``move``),
    said so, and training starts over."""
    if not path.exists():
        return None
    try:
        return load_checkpoint(path)
    except Exception as e:  # noqa: BLE001  -- torch raises many kinds for a damaged file
        if not move:
            return None
        aside = set_aside(path)
        print(f"warning: {path}: unreadable checkpoint ({one_line(e, with_type=True)[:200]}); kept as "
              f"{aside.name}, training starts over", file=sys.stderr, flush=True)
        return None


def ema_states(workdir: Path | str) -> dict[int, Path]:
    """Training step -> the file holding the EMA weights at that step: the EMA snapshots of
    ``workdir`` and its checkpoint (the last step). Sorted by step."""
    workdir = Path(workdir)
    found = {int(p.stem.removeprefix("ema_step")): p for p in workdir.glob("ema_step*.pt")}
    if (workdir / CHECKPOINT).is_file():
        found[load_ema(workdir / CHECKPOINT)[0]] = workdir / CHECKPOINT
    return dict(sorted(found.items()))


def load_ema(path: Path) -> tuple[int, dict]:
    """(step, EMA state dict) from a snapshot or a checkpoint; memory-mapped, so reading a
    checkpoint does not read its optimizer state."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state["step"], state["ema"]


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
    device = torch.device(device)
    if settings.cfg_scale != 1.0 and settings.eval_samples and model.y_embedder.dropout_prob <= 0:
        raise ValueError("train.cfg_scale != 1 needs a model with class_dropout_prob > 0")
    trainer = Trainer(model, dataset, settings, Path(workdir), seed, device, evaluate)
    trainer.run(progress)
    return {**summarize(trainer.log, trainer.evals, trainer.precision),
            "train_compile": trainer.compile, "train_compile_s": trainer.step.compile_s,
            "train_ranks": trainer.world.size,
            "train_peak_mem_mb": peak_memory_mb(device)}


class Trainer:
    """The state of one training run, fresh or restored from its checkpoint, and its steps:
    ``run`` trains; each step is ``_train_step``; a log window ends in ``_end_window``; an
    evaluation or a checkpoint pauses the clock (``_pause``)."""

    def __init__(self, model: nn.Module, dataset, settings: TrainSettings, workdir: Path, seed: int,
                 device: torch.device, evaluate: Callable | None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.dataset, self.settings, self.workdir, self.seed, self.device = dataset, settings, workdir, seed, device
        self.evaluate = evaluate
        # Under torchrun: every rank trains its share, rank 0 alone writes (ablate.distributed).
        self.world = current_world()
        self.world.share(settings.batch_size)  # refused here, on every rank alike, if it does not divide
        self.precision = resolve_precision(device, settings.precision)
        torch.manual_seed(seed)  # timesteps, noise and label dropout all draw from the global RNG
        self.model = model.to(device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.diffusion = create_diffusion(None, learn_sigma=self.model.learn_sigma, loss=settings.loss)
        self.compile = resolve_compile(device, settings.compile)
        self.step = TrainStep(self.model, self.diffusion, precision=self.precision, lr=settings.lr,
                              weight_decay=settings.weight_decay, ema=self.ema, ema_decay=settings.ema_decay,
                              grad_clip=settings.grad_clip, compile=self.compile,
                              compile_mode=settings.compile_mode, compile_scope=settings.compile_scope,
                              activation_checkpointing=settings.activation_checkpointing,
                              low_precision_residual=settings.low_precision_residual)
        self.optimizer = self.step.optimizer
        self.path = workdir / CHECKPOINT
        self.start, self.log, self.evals, self.wall_before = 0, [], [], 0.0
        # The loss of the current log window, summed on the device: no sync per step.
        self.loss_sum = torch.zeros((), device=device)
        self.window_steps = 0
        data_rng = torch.Generator().manual_seed(seed)
        ck = _load_or_set_aside(self.path, move=self.world.leader)
        steps = all_gather(None if ck is None else ck["step"])
        if len(set(steps)) > 1:  # a checkpoint replaced while the ranks read it
            raise RuntimeError(f"{self.path}: the ranks read different checkpoints (steps {steps}); run again")
        data_state = self._restore(ck) if ck is not None else None
        self.batches = _Batches(dataset, settings.batch_size, data_rng, device, data_state)
        self.timed_steps = 0  # steps of the window run by this process (a resumed window began before it)
        self.first_window = True  # this process's first window carries compile and allocator warm-up
        self.last_loss = self.log[-1]["loss"] if self.log else float("nan")

    def _restore(self, ck: dict) -> dict:
        """Load the checkpoint into this run; returns the saved data order."""
        for key, want in (("seed", self.seed), ("batch_size", self.settings.batch_size)):
            if ck[key] != want:
                raise ValueError(f"{self.path}: saved with {key}={ck[key]}, asked to resume with {key}={want}; "
                                 "use a new workdir")
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.optimizer.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"], self.device)
        self.start, self.log, self.evals, self.wall_before = ck["step"], ck["log"], ck["evals"], ck["train_wall_s"]
        self.loss_sum += ck["window"]["loss_sum"].to(self.device)
        self.window_steps = ck["window"]["steps"]
        return ck["data"]

    def run(self, progress: bool) -> None:
        from tqdm.auto import tqdm

        s = self.settings
        bar = tqdm(total=s.steps, initial=self.start, disable=not progress, desc="train", unit="step")
        synchronize(self.device)
        reset_peak_memory(self.device)
        self.t_start = self.t_window = time.perf_counter()
        self.paused = self.window_paused = 0.0  # seconds spent evaluating and checkpointing, not training
        for step in range(self.start + 1, s.steps + 1):
            self._train_step()
            bar.update(1)
            if step % s.log_every == 0 or step == s.steps:
                self._end_window(step)
                bar.set_postfix(loss=f"{self.last_loss:.4f}", img_s=f"{self.log[-1]['img_per_s']:.1f}")
            due_eval = s.eval_samples > 0 and (
                step == s.steps or (s.eval_every is not None and step % s.eval_every == 0))
            # An evaluation step is a checkpoint too: a short run (fewer steps than
            # checkpoint_every) interrupted late would otherwise start over from step 0.
            due_checkpoint = step % s.checkpoint_every == 0 or step == s.steps or due_eval
            due_snapshot = (s.ema_snapshots and s.eval_every is not None and step % s.eval_every == 0
                            and step != s.steps)
            if due_eval or due_checkpoint or due_snapshot:
                self._pause(step, due_eval, due_checkpoint, due_snapshot)
        bar.close()

    def _train_step(self) -> None:
        x, y = next(self.batches)
        self.loss_sum += self.step.step(x, y)  # forward, loss, backward, AdamW, EMA
        self.window_steps += 1
        self.timed_steps += 1

    def _wall(self) -> float:
        """Training seconds so far, over every process, evaluations and checkpoints excluded."""
        return self.wall_before + (time.perf_counter() - self.t_start - self.paused)

    def _end_window(self, step: int) -> None:
        """Log the window's mean loss and throughput, and start a new window."""
        # The sync point, once per window; the mean over the ranks' shares is the global batch's.
        self.last_loss = mean(self.loss_sum / self.window_steps).item()
        now = time.perf_counter()
        seconds = now - self.t_window - self.window_paused
        images = self.timed_steps * self.settings.batch_size
        self.log.append({"step": step, "loss": self.last_loss, "step_ms": 1e3 * seconds / self.timed_steps,
                         "img_per_s": images / seconds, "images": images, "train_wall_s": self._wall(),
                         "first_window": self.first_window})
        self.loss_sum.zero_()
        self.window_steps = self.timed_steps = 0
        self.first_window, self.t_window, self.window_paused = False, now, 0.0

    def _pause(self, step: int, due_eval: bool, due_checkpoint: bool, due_snapshot: bool = False) -> None:
        """Evaluate, snapshot the EMA and/or checkpoint with the training clock stopped."""
        synchronize(self.device)
        t0, train_wall = time.perf_counter(), self._wall()
        # Every rank: the samples (each draws its share) and the window's loss over the ranks.
        samples = self._sample() if due_eval else None
        window_loss = mean(self.loss_sum) if due_checkpoint else None
        with leader_only() as lead:  # rank 0 writes; a failure there (a full disk) ends every rank's share
            if lead and due_snapshot:
                save_checkpoint(self.workdir / EMA_SNAPSHOT.format(step=step),
                                {"step": step, "ema": self.ema.state_dict(), "train_wall_s": train_wall})
            if lead and due_eval:
                self._record_evaluation(step, samples, train_wall)
            if lead and due_checkpoint:
                self._checkpoint(step, train_wall, window_loss)
        spent = time.perf_counter() - t0
        self.paused += spent
        self.window_paused += spent

    def _sample(self) -> torch.Tensor:
        s = self.settings
        samples, _ = sample_images(self.ema, s.eval_samples, image_size=self.dataset.image_size,
                                   steps=s.sample_steps, sampler=s.sampler, cfg_scale=s.cfg_scale,
                                   precision=self.precision, seed=self.seed, batch_size=s.batch_size,
                                   device=self.device, world=self.world)
        return samples

    def _record_evaluation(self, step: int, samples: torch.Tensor, train_wall: float) -> None:
        save_grid(samples, self.workdir / SAMPLE_GRID.format(step=step))
        metrics = self.evaluate(self.ema, samples, step) if self.evaluate is not None else {}
        self.evals.append({"step": step, "train_loss": self.last_loss, "train_wall_s": train_wall,
                           **{k: _plain(v) for k, v in metrics.items()}})

    def _checkpoint(self, step: int, train_wall: float, window_loss: torch.Tensor) -> None:
        """``window_loss``: the log window's loss sum so far, averaged over the ranks (each
        rank's is its share's), which every rank of a resumed run starts from."""
        save_checkpoint(self.path, {
            "step": step, "seed": self.seed, "batch_size": self.settings.batch_size,
            "settings": asdict(self.settings), "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "rng": _rng_state(self.device),
            "data": self.batches.state(),
            "window": {"loss_sum": window_loss.cpu(), "steps": self.window_steps},
            "log": self.log, "evals": self.evals, "train_wall_s": train_wall,
        })


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
