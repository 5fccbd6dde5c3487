"""Training throughput of DiT-S/4 (32x32x4 synthetic latents, batch 32): the obvious
implementation against ablate.train's step, one change at a time.

    python benchmarks/train_throughput.py [--steps 8] [--bf16-steps N] [--no-compile] [--device cpu]

"obvious" is what one writes first: explicit softmax(QK^T)V attention, fp32,
torch.optim.AdamW(foreach=False), and the EMA as a Python loop over parameters
(``ema.mul_(d).add_(p, alpha=1 - d)``, as the official DiT train.py). The other rows
add ablate's choices one by one; the step is ``ablate.train.train_step`` plus
``update_ema``, exactly what ``train`` runs.

The recipe is nanoGPT's bench.py: synthetic inputs, a burn-in step per configuration
(compilation happens there and is reported as ``first_step_s``), then timed steps ended
by a sync. Timed steps go round-robin over the configurations, so a burst of load from
other processes on a shared machine slows all of them alike; the table reports the
median. MFU counts 3x the forward flops per image (forward = 2 x multiply-adds, the
paper's Gflops) over the dense matmul peak measured here for that dtype
(``ablate.measure.peak``); where bf16 is emulated, over the fp32 peak, the best this
hardware does.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
from tabulate import tabulate

from ablate.diffusion import create_diffusion
from ablate.measure.flops import count_flops
from ablate.measure.peak import matmul_peak_tflops
from ablate.precision import native_bf16, synchronize
from ablate.models import create_model, dit_kwargs, naive_attention
from ablate.models.blocks import attention
from ablate.train import make_optimizer, train_step, trainable, update_ema

MODEL = "DiT-S/4"
MODEL_KWARGS = dit_kwargs(MODEL, input_size=32, in_channels=4, num_classes=1000)
BATCH = 32


@dataclass
class Config:
    name: str
    attention: str = "sdpa"  # or "naive"
    optimizer: str = "fused"  # "fused" (ablate) or "loop" (foreach=False)
    ema: str = "foreach"  # "foreach" (ablate) or "loop"
    precision: str = "fp32"
    compile: bool = False
    threads: int | None = None  # None: PyTorch's default


def configs(compile: bool) -> list[Config]:
    rows = [
        Config("obvious", attention="naive", optimizer="loop", ema="loop"),
        Config("+ fused SDPA attention", optimizer="loop", ema="loop"),
        Config("+ fused AdamW, foreach EMA (ablate eager)"),
        Config("ablate eager, 1 thread", threads=1),
    ]
    if compile:
        rows.append(Config("ablate + torch.compile", compile=True))
    rows.append(Config("ablate, bf16 autocast", precision="bf16"))
    if compile:
        rows.append(Config("ablate, bf16 autocast + torch.compile", precision="bf16", compile=True))
    return rows


class Runner:
    """One configuration's model, optimizer and EMA, and a ``step()`` on fixed synthetic data."""

    def __init__(self, cfg: Config, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.model = create_model(MODEL, input_size=32, in_channels=4, num_classes=1000).to(device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.params = trainable(self.model)
        self.ema_params = [e for e, p in zip(self.ema.parameters(), self.model.parameters()) if p.requires_grad]
        if cfg.optimizer == "fused":
            self.opt = make_optimizer(self.params, lr=1e-4)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0, foreach=False)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.diffusion = create_diffusion(None, learn_sigma=True)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(BATCH, 4, 32, 32, generator=g).to(device)
        self.y = torch.randint(0, 1000, (BATCH,), generator=g).to(device)
        self.times: list[float] = []
        self.first_step_s = float("nan")

    def step(self) -> float:
        """One timed training step, in seconds, ended by reading the loss (the sync point)."""
        cfg = self.cfg
        threads = torch.get_num_threads()
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        attention = naive_attention() if cfg.attention == "naive" else contextlib.nullcontext()
        t0 = time.perf_counter()
        with attention:
            loss = train_step(self.forward, self.diffusion, self.opt, self.params, self.x, self.y,
                              precision=cfg.precision)
        if cfg.ema == "foreach":
            update_ema(self.ema_params, self.params, 0.9999)
        else:
            with torch.no_grad():
                for e, p in zip(self.ema_params, self.params):
                    e.mul_(0.9999).add_(p, alpha=1 - 0.9999)
        loss.item()
        seconds = time.perf_counter() - t0
        torch.set_num_threads(threads)
        return seconds


def component_ms(device: torch.device, repeats: int = 15) -> list[dict]:
    """Median ms of the pieces ablate changed, alone: optimizer step, EMA update, and
    attention forward+backward of all 12 blocks. Short and steady where whole steps are noisy."""
    torch.manual_seed(0)
    model = create_model(MODEL, input_size=32, in_channels=4, num_classes=1000).to(device)
    params = trainable(model)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    ema = [p.detach().clone() for p in params]

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    def ema_loop():
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(0.9999).add_(p, alpha=1 - 0.9999)

    # (N, H, T, Dh) = (32, 6, 64, 64): DiT-S/4's attention on 32x32 latents.
    q, k, v = (torch.randn(BATCH, 6, 64, 64, device=device, requires_grad=True) for _ in range(3))

    def attention_x12(naive: bool):
        with naive_attention() if naive else contextlib.nullcontext():
            for _ in range(12):
                attention(q, k, v).sum().backward()

    rows = [
        ("AdamW step", "foreach=False (obvious)",
         median_ms(torch.optim.AdamW(params, lr=1e-4, foreach=False).step)),
        ("AdamW step", "foreach=True", median_ms(torch.optim.AdamW(params, lr=1e-4, foreach=True).step)),
        ("AdamW step", "make_optimizer (ablate)", median_ms(make_optimizer(params).step)),
        ("EMA update", "mul_/add_ loop (obvious)", median_ms(ema_loop)),
        ("EMA update", "update_ema (ablate)", median_ms(lambda: update_ema(ema, params, 0.9999))),
        ("attention fwd+bwd x12", "naive softmax(QK^T)V (obvious)", median_ms(lambda: attention_x12(True))),
        ("attention fwd+bwd x12", "SDPA (ablate)", median_ms(lambda: attention_x12(False))),
    ]
    return [{"component": c, "implementation": i, "ms": ms} for c, i, ms in rows]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    ap.add_argument("--bf16-steps", type=int, default=None,
                    help="timed steps for bf16 rows (default: --steps where bf16 is native, else 1)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--cold-compile", action="store_true",
                    help="disable inductor's on-disk caches, so first_step_s is a cold compile")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.cold_compile:
        from torch._inductor import config as inductor_config

        inductor_config.force_disable_caches = True
    native = native_bf16(str(device))
    bf16_steps = args.bf16_steps if args.bf16_steps is not None else (args.steps if native else 1)

    load_before = os.getloadavg()
    # The peak is a best-of over products; measured again after the steps (bypassing the
    # module's cache) and the higher kept, so a burst of load at the start cannot lower it.
    peak_fp32 = matmul_peak_tflops.__wrapped__(str(device), "fp32", None, 2.0)
    # Emulated bf16 (AVX2 CPUs) runs a 2048^3 product at well under 1 GFLOP/s: a minute per
    # product. Measure it small, and take MFU of bf16 rows against the hardware's fp32 peak,
    # the best this device does, rather than against the emulation.
    peak_bf16 = matmul_peak_tflops(str(device), "bf16", n=None if native else 512)
    train_gflop = 3 * 2 * count_flops(MODEL_KWARGS)["gflops"]  # per image: forward 2x MACs, backward 2x forward

    cfgs = [c for c in configs(not args.no_compile) if not (args.no_bf16 and c.precision == "bf16")]
    runners = [Runner(cfg, device) for cfg in cfgs]
    for r in runners:  # burn-in: compilation, allocator and library warm-up
        t0 = time.perf_counter()
        r.step()
        r.first_step_s = time.perf_counter() - t0
        print(f"burn-in {r.cfg.name}: {r.first_step_s:.1f} s", flush=True)
    for i in range(args.steps):  # round-robin, so load from other processes hits every row alike
        for r in runners:
            if r.cfg.precision == "fp32" or i < bf16_steps:
                r.times.append(r.step())
        print(f"round {i + 1}/{args.steps}: " + ", ".join(f"{r.times[-1]:.2f}" for r in runners), flush=True)
    components = component_ms(device)
    peak_fp32 = max(peak_fp32, matmul_peak_tflops.__wrapped__(str(device), "fp32", None, 2.0))
    peak = {"fp32": peak_fp32, "bf16": peak_bf16 if native else peak_fp32}
    load_after = os.getloadavg()

    base = statistics.median(runners[0].times)
    rows = []
    for r in runners:
        med = statistics.median(r.times)
        img_per_s = BATCH / med
        rows.append({
            "config": r.cfg.name,
            "precision": r.cfg.precision,
            "compile": r.cfg.compile,
            "img_per_s": img_per_s,
            "step_ms": 1e3 * med,
            "step_ms_min": 1e3 * min(r.times),
            "mfu_pct": 100 * img_per_s * train_gflop / (1e3 * peak[r.cfg.precision]),
            "speedup": base / med,
            "first_step_s": r.first_step_s,
            "timed_steps": len(r.times),
        })
    print()
    print(f"{MODEL}, 32x32x4 synthetic inputs, batch {BATCH}, {device} ({cpu_name()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"train flops/image {train_gflop:.2f} GFLOP; matmul peak fp32 {1e3 * peak_fp32:.1f} GFLOP/s, "
          f"bf16 {1e3 * peak_bf16:.1f} GFLOP/s ({'native' if native else 'emulated, n=512; bf16 MFU is vs the fp32 peak'})")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); "
          f"inductor caches {'off' if args.cold_compile else 'on'}")
    print(tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github"))
    print()
    print(tabulate(components, headers="keys", floatfmt=".1f", tablefmt="github"))


if __name__ == "__main__":
    main()
