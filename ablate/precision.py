"""Numeric precision of a forward or training step: the choices, whether bf16 is native on a
device, the autocast context, and the device synchronisation timings need.

Training (``ablate.train``), sampling and the measurements (``ablate.measure``) import
this module; it imports none of them.
"""
from __future__ import annotations

import contextlib
import functools

import torch

# auto: bf16 where it is native, else tf32 on CUDA and fp32 on CPUs (``resolve_precision``).
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
# Sampling only (``ablate.sampling.sample_images``): the network itself in bf16, its weights
# and activations (Lightning's name, beside "bf16" autocast over fp32 weights). Autocast
# casts every weight at every call and keeps the residual stream, LayerNorms and
# modulation in fp32; a bf16 network moves half the bytes there, at bf16's rounding in
# every layer. Training keeps fp32 weights: AdamW moves a weight by about lr = 1e-4 a step,
# under half of bf16's spacing (8 bits of mantissa) for any weight above 0.05, so most
# steps would round away.
TRUE_BF16 = "bf16-true"


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
    bf16: autocast to bfloat16 (on CPUs with AMX or AVX512-BF16 too); bf16-true: neither
    (the tensors are bf16 themselves)."""
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
