"""The device's own dense matmul peak, measured, so MFU reads alike on a laptop and an H100."""
from __future__ import annotations

import functools
import time

import torch

from ..precision import native_bf16, precision_context, resolve_precision, synchronize


@functools.lru_cache(maxsize=None)
def matmul_peak_tflops(device: str = "cpu", precision: str = "fp32", n: int | None = None,
                       seconds: float = 1.0) -> float:
    """Best achieved TFLOP/s (2 flops per multiply-add) of an n x n x n matmul, once per
    process and (device, precision). A best-of over ``seconds``: load from other processes
    only ever lowers a reading, so the best one is the closest to the device's peak."""
    dev = torch.device(device)
    precision = resolve_precision(dev, precision)
    emulated = precision == "bf16" and not native_bf16(device)
    # Emulated bf16 (AVX2 CPUs) runs at a few GFLOP/s: a smaller product keeps this short.
    n = n or (8192 if dev.type == "cuda" else 512 if emulated else 2048)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    # a @ b.T: the layout nn.Linear multiplies in (on some CPUs the only fast bf16 path).
    with precision_context(dev, "tf32" if precision == "tf32" else "fp32"):
        for _ in range(2):  # warm-up: kernel selection, first-touch of memory
            a @ b.T
        synchronize(dev)
        best, spent = float("inf"), 0.0
        while spent < seconds:
            t0 = time.perf_counter()
            a @ b.T
            synchronize(dev)
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
    return 2 * n**3 / best / 1e12
