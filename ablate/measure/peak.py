"""The device's own dense matmul peak, measured, so MFU reads alike on a laptop and an H100."""
from __future__ import annotations

import contextlib
import functools
import time

import torch

PRECISIONS = ("auto", "fp32", "tf32", "bf16")


@functools.lru_cache(maxsize=None)
def native_bf16(device: str) -> bool:
    """Whether bf16 matmuls run natively (CUDA with bf16, CPUs with AMX or AVX512-BF16);
    elsewhere bf16 is emulated and slower than fp32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(device: torch.device, precision: str) -> str:
    """'auto' -> bf16 where it is native, else tf32 on CUDA and fp32 on CPUs."""
    if precision != "auto":
        return precision
    if native_bf16(str(device)):
        return "bf16"
    return "tf32" if device.type == "cuda" else "fp32"


@contextlib.contextmanager
def precision_context(device: torch.device, precision: str):
    """fp32: strict fp32 matmuls; tf32: fp32 tensors, TF32 tensor cores (CUDA only);
    bf16: autocast to bfloat16 (on CPUs with AMX or AVX512-BF16 too)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
