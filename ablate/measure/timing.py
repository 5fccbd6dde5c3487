"""Wall time and memory of a forward pass and of a full training step.

The recipe is nanoGPT's bench: synthetic inputs, warm-up steps excluded, then timed steps
each ended by a device synchronisation (CUDA runs asynchronously: without it we would time
the launch, not the work). Reported: median and interquartile range over repeats, images
per second, peak memory, and MFU against the device's own measured matmul peak.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..diffusion import create_diffusion
from ..settings import ConfigError, positive
from . import MODEL_KEYS, register_measure
from ..precision import precision_context, synchronize
from ..step import (StepOptions, TrainStep, compile_blocks, compiled, fresh_compiles,
                    peak_memory_mb as _peak_mb, reset_peak_memory as _reset_peak)
from .matmul_peak import matmul_peak_tflops

MODES = ("forward", "train")


@dataclass
class TimingSettings(StepOptions):
    """The ``timing:`` section: the step's options (``ablate.step.StepOptions``; tf32 is a
    CUDA matmul mode timing compares) and how it is timed."""

    batch_size: int = 32
    warmup: int = 3
    repeats: int = 10
    modes: list[str] = field(default_factory=lambda: list(MODES))

    def check(self) -> None:
        positive(self, "batch_size", "repeats")
        positive(self, "warmup", allow_zero=True)
        StepOptions.check(self)
        for m in self.modes:
            if m not in MODES:
                raise ConfigError("modes", f"{m!r} is not one of {', '.join(MODES)}")


def _time(fn, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)  # a CPU-GPU sync point: the step's work is done when this returns
        times.append(time.perf_counter() - t0)
    return times


def _summary(prefix: str, times: list[float], batch: int) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    med = statistics.median(times)
    return {f"{prefix}_ms": med * 1e3, f"{prefix}_ms_iqr": (q[2] - q[0]) * 1e3,
            f"{prefix}_img_per_s": batch / med}


def time_model(model: torch.nn.Module, s: TimingSettings, device: torch.device,
               gflops: float | None = None) -> dict:
    """Time forward and training step of ``model`` (a DiT) on synthetic inputs."""
    options = s.resolved(device)
    s = dataclasses.replace(s, precision=options.precision, compile=options.compile)
    n, c, size = s.batch_size, model.in_channels, model.input_size
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, c, size, size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (n,), generator=g).to(device)
    t = torch.randint(0, 1000, (n,), generator=g).to(device)  # for the forward pass
    # batch size is the cell's timing.batch_size column; compile_s is the first calls'
    # seconds (tracing and code generation, or loading them from the disk cache).
    out: dict = {"timing_precision": s.precision, "timing_compile": s.compile, "compile_s": 0.0}

    if "forward" in s.modes:
        model.eval()
        if s.compile:
            fresh_compiles()
        fwd = model
        if s.compile and s.compile_scope == "blocks":
            compile_blocks(model, s.compile_mode)
        elif s.compile:
            fwd = compiled(model, s.compile_mode)

        @torch.no_grad()
        def forward():
            with precision_context(device, s.precision):
                fwd(x, t, y)

        t0 = time.perf_counter()
        forward()  # the first call compiles when compile is on
        synchronize(device)
        out["compile_s"] += time.perf_counter() - t0 if s.compile else 0.0
        _reset_peak(device)
        out.update(_summary("fwd", _time(forward, device, s.warmup, s.repeats), n))
        out["fwd_peak_mem_mb"] = _peak_mb(device)

    if "train" in s.modes:
        # The step that training runs (ablate.step.TrainStep): forward, hybrid loss,
        # backward, fused AdamW, EMA update, compiled as training compiles it.
        model.train()
        # Only a holder of the averaged weights (never run), so a copy of compiled blocks is harmless.
        ema = copy.deepcopy(model).requires_grad_(False)
        diffusion = create_diffusion(None, learn_sigma=model.learn_sigma)
        train_step = TrainStep(model, diffusion, options, ema=ema)

        def step():
            train_step.step(x, y)

        step()
        out["compile_s"] += train_step.compile_s
        _reset_peak(device)
        out.update(_summary("step", _time(step, device, s.warmup, s.repeats), n))
        out["step_peak_mem_mb"] = _peak_mb(device)

    if gflops is not None:
        peak = matmul_peak_tflops(str(device), s.precision)
        out["matmul_peak_tflops"] = peak
        # 2 flops per multiply-add; a training step is forward + backward = 3 forwards.
        if "fwd_img_per_s" in out:
            out["fwd_mfu"] = 2 * gflops * 1e9 * out["fwd_img_per_s"] / (peak * 1e12)
        if "step_img_per_s" in out:
            out["step_mfu"] = 6 * gflops * 1e9 * out["step_img_per_s"] / (peak * 1e12)
    out["memory_kind"] = "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"
    return out


@register_measure("timing", settings=TimingSettings, uses=MODEL_KEYS + ("device", "threads"), needs=("flops",),
                  columns=("fwd_ms", "fwd_img_per_s", "step_ms", "step_img_per_s", "step_mfu"))
def timing(cell, progress: bool = True) -> dict:
    """Forward and training-step latency (median, IQR), images/s, peak memory, MFU."""
    model = cell.build_model()
    return time_model(model, cell.settings("timing"), cell.device, gflops=cell.needed["flops"].metrics["gflops"])
