"""The training step that ``train`` runs and ``timing`` times, fast by default.

One step: draw the timesteps, the noise and the dropped labels (eagerly, from the global
RNG), forward + hybrid DDPM loss (one ``torch.compile``d graph when compile is on; its
backward is compiled with it by AOTAutograd), backward, fused AdamW, and the EMA as one
foreach lerp. No host-device sync: the loss comes back as a 0-dim device tensor.

What each part buys and how to turn it off:

- ``compile`` (``auto``: on for CUDA, off for CPUs, where a short run does not pay for
  the compile): the forward and the loss are one graph, so Inductor fuses the elementwise
  work (autocast casts, adaLN modulation, LayerNorm, the loss terms) that dominates an
  eager step of a small DiT. Drawing the random numbers outside the graph means the
  compiled step consumes the RNG exactly as the eager one does (same t, noise, labels).
- ``compile_scope``: ``step`` (the above) or ``blocks`` (regional compilation: each DiT
  block alone; identical blocks reuse one graph, so compiling costs about one block, at
  the price of the fusions across blocks and in the loss).
- ``compile_mode``: ``default``; ``reduce-overhead`` adds CUDA graphs (fixed shapes,
  fewer launches; on an H100 it bought 2% for DiT-S/2 training and 1% for DiT-XL/2
  sampling, too little to make it the default: a replay overwrites the previous outputs
  and the graphs keep their own memory pool); ``max-autotune-no-cudagraphs`` tunes
  matmuls (long compiles); ``coordinate-descent`` tunes Inductor's own fused kernels only
  (not yet measured on a GPU).
- The optimizer and the EMA are not compiled: fused AdamW already makes one pass over
  parameters, gradients and moments, and the EMA is one foreach lerp; compiling them
  would cost compile time for a few percent of a step.
- ``activation_checkpointing``: each DiT block's activations are recomputed in the
  backward pass (less memory, about a third more compute).
- ``low_precision_residual`` (off, the setting ``low_precision_residual: true`` in
  ``train:``/``timing:``; not the default until a GPU table shows it pays): under bf16
  autocast the residual stream between blocks is bf16 too (``DiT.low_precision_residual``).

Compiled code is cached on disk (``compile_cache``), so cells that share architecture
and shapes reuse it across processes.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .collective import world
from .paths import cache_root
from .precision import PRECISIONS, precision_context, resolve_precision, synchronize
from .settings import ConfigError, added_later, choice

COMPILE_CHOICES = ("auto", True, False)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "coordinate-descent")
# ablate's own modes: Inductor options (torch.compile takes a mode or options, not both).
# coordinate-descent: Inductor times neighbouring block sizes of each of its fused
# elementwise and reduction kernels (LayerNorm, modulation, GELU, the loss) while compiling
# and keeps the fastest; no matmul autotuning (gpt-fast compiles its decoder so).
MODE_OPTIONS = {"coordinate-descent": {"coordinate_descent_tuning": True}}
# step: forward + loss as one graph; blocks: each DiT block alone (regional compilation:
# identical blocks share one compiled graph, so the compile costs about one block).
COMPILE_SCOPES = ("step", "blocks")
CACHE_ENV = "ABLATE_COMPILE_CACHE"  # folder of the persistent compile caches
# Inductor generates kernels; the CPU tests swap in "aot_eager" (the same capture and
# autograd graphs, run by eager kernels), since Inductor's C++ compile takes minutes there.
BACKEND = "inductor"


@dataclass
class StepOptions:
    """How the training step runs: the fields the ``train:`` and ``timing:`` sections share
    (both subclass this, so the YAML keys and each measurement's key are these names).
    ``resolved(device)`` gives what ``TrainStep`` takes: ``precision`` and ``compile`` of
    this device (never ``auto``)."""

    precision: str = "auto"  # ablate.precision.PRECISIONS; auto: bf16 autocast where bf16 is native
    compile: bool | str = "auto"  # auto: on for CUDA, off for CPUs (resolve_compile)
    compile_mode: str = "default"  # COMPILE_MODES: or reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs
    compile_scope: str = "step"  # or blocks: regional compilation, one graph per distinct block
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory
    # Under bf16 autocast, the residual stream between blocks in bf16 too (Megatron-LM's way;
    # DiT keeps it fp32): half the bytes of the elementwise work around each block.
    low_precision_residual: bool = added_later(False)

    def check(self) -> None:
        choice(self, "precision", PRECISIONS)
        if self.compile not in COMPILE_CHOICES or not isinstance(self.compile, (bool, str)):
            raise ConfigError("compile", f"{self.compile!r} is not one of auto, true, false")
        choice(self, "compile_mode", COMPILE_MODES)
        choice(self, "compile_scope", COMPILE_SCOPES)

    def resolved(self, device: torch.device | str) -> StepOptions:
        """The step options alone (not the section's other fields), on ``device``: auto
        precision and auto compile decided."""
        device = torch.device(device)
        mine = {f.name: getattr(self, f.name) for f in fields(StepOptions)}
        return StepOptions(**{**mine, "precision": resolve_precision(device, self.precision),
                              "compile": resolve_compile(device, self.compile)})


def resolve_compile(device: torch.device, compile: bool | str) -> bool:
    """'auto' -> on for CUDA, off for CPUs. On a 2-core CPU compiling a DiT step takes tens
    of seconds (README, "Speed") while a 150-step run of a small DiT gains less than that."""
    if compile == "auto":
        return torch.device(device).type == "cuda"
    return bool(compile)


def compile_cache(folder: str | Path | None = None) -> Path:
    """Point PyTorch's persistent compile caches (Inductor's FX graph cache, the AOTAutograd
    cache, Triton kernels) at one folder and return it: ``folder``, else
    $ABLATE_COMPILE_CACHE, else $TORCHINDUCTOR_CACHE_DIR, else ``compile/`` in the cache root
    (``ablate.paths``: $ABLATE_CACHE, default ~/.cache/ablate).
    A second process compiling the same architecture at the same shapes then loads the
    kernels instead of generating them."""
    path = folder or os.environ.get(CACHE_ENV) or os.environ.get("TORCHINDUCTOR_CACHE_DIR") \
        or cache_root() / "compile"
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by Inductor at each lookup
    return path


def compiled(fn: Callable, mode: str = "default") -> Callable:
    """``torch.compile`` with the settings every ablate graph uses: static shapes (a new
    shape recompiles instead of turning every kernel dynamic) and the shared disk cache."""
    compile_cache()
    if BACKEND != "inductor":
        return torch.compile(fn, backend=BACKEND, dynamic=False)
    if mode in MODE_OPTIONS:
        return torch.compile(fn, options=MODE_OPTIONS[mode], dynamic=False)
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)


def fresh_compiles() -> None:
    """Forget the in-process compiled code before compiling a new model: dynamo keeps a
    few entries per function and falls back to eager silently once a grid of cells has
    used them up. The disk cache keeps the kernels, so this costs tracing only."""
    torch._dynamo.reset()


def compile_blocks(model: nn.Module, mode: str = "default") -> None:
    """Regional compilation: compile each DiT block's forward in place (names and state-dict
    keys stay). Identical blocks share the compiled graph; a block compiled already is kept.
    Copy the model (an EMA) before this: a copy would call the original's blocks."""
    for block in model.blocks:
        if not getattr(block, "_ablate_compiled", False):
            block.forward = compiled(block.forward, mode)
            block._ablate_compiled = True


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
    """The plain eager step (the reference ``TrainStep`` is tested against): the model
    draws its own dropped labels. Returns the mean loss as a detached 0-dim device tensor."""
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)  # uniform t
    with precision_context(x.device, precision):
        loss = diffusion.training_losses(forward, x, t, {"y": y})["loss"].mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)  # returns a tensor: no sync
    optimizer.step()
    return loss.detach()


class TrainStep:
    """A model's optimizer, EMA and step function; ``step(x, y)`` trains on one batch and
    returns the mean loss (a detached 0-dim device tensor; reading it is a sync point).

    ``options``: the step's options resolved for the model's device (``StepOptions.resolved``).
    ``ema`` is a module whose trainable parameters follow the model's (None: no EMA).
    Under torchrun (``ablate.collective``) the model is wrapped in DistributedDataParallel
    and each rank trains on its share of the global batch; the returned loss is the share's.
    ``compile_s`` is the wall time of the first step when compiled (tracing and code
    generation, or loading them from the disk cache), 0 otherwise.
    """

    def __init__(self, model: nn.Module, diffusion, options: StepOptions = StepOptions(precision="fp32", compile=False),
                 *, lr: float = 1e-4, weight_decay: float = 0.0, ema: nn.Module | None = None,
                 ema_decay: float = 0.9999, grad_clip: float | None = None):
        if options.precision == "auto" or options.compile == "auto":
            raise ValueError("TrainStep takes options resolved for its device (StepOptions.resolved)")
        self.model, self.diffusion, self.options = model, diffusion, options
        self.precision = options.precision
        self.device = next(model.parameters()).device
        # Under torchrun: this rank's share of each global batch, and DDP averaging the
        # gradients over the ranks (ablate.collective). ``net`` is what the loss calls.
        self.world = world()
        self.net = model
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None)
        self.params = trainable(model)
        self.ema_params = None if ema is None else [
            e for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
        self.ema_decay, self.grad_clip = ema_decay, grad_clip
        self.optimizer = make_optimizer(self.params, lr, weight_decay)
        model.activation_checkpointing = options.activation_checkpointing
        model.low_precision_residual = options.low_precision_residual
        self.compile = bool(options.compile)
        self.compile_s = 0.0
        self._first = True
        diffusion.preload(self.device)
        if self.compile:
            fresh_compiles()
            if options.compile_scope == "blocks":
                compile_blocks(model, options.compile_mode)
            else:
                self.loss = compiled(self.loss, options.compile_mode)

    def loss(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor,
             drop: torch.Tensor | None) -> torch.Tensor:
        """Mean hybrid loss of a batch (this rank's share); the part that is compiled."""
        kwargs = {"y": y, "force_drop_ids": drop}
        return self.diffusion.training_losses(self.net, x, t, kwargs, noise=noise)["loss"].mean()

    def draw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Timesteps, noise and dropped labels, in the order the eager step draws them."""
        n = x.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), device=x.device)
        noise = torch.randn_like(x)
        p = self.model.y_embedder.dropout_prob
        drop = torch.rand(n, device=x.device) < p if self.model.training and p > 0 else None
        return t, noise, drop

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Train on the global batch (x, y); under torchrun, on this rank's slice of it, with
        the random draws of the whole batch (so N ranks draw what one process would)."""
        t0 = time.perf_counter() if self._first else 0.0
        t, noise, drop = self.draw(x)
        if self.world.distributed:
            mine = self.world.share(x.shape[0])
            x, y, t, noise = x[mine], y[mine], t[mine], noise[mine]
            drop = None if drop is None else drop[mine]
        with precision_context(x.device, self.precision):
            loss = self.loss(x, t, noise, y, drop)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)  # a tensor: no sync
        self.optimizer.step()
        if self.ema_params is not None:
            update_ema(self.ema_params, self.params, self.ema_decay)
        if self._first:
            self._first = False
            if self.compile:
                synchronize(x.device)
                self.compile_s = time.perf_counter() - t0
        return loss.detach()


# ---------------------------------------------------------------------------------
# Peak memory of a step
# ---------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory tensors held since the last reset; CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
