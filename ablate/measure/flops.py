"""Gflops of one forward pass of one image, in the DiT paper's convention.

The paper counts one multiply-add as one flop, which is fvcore's convention; the
result is cross-checked against PyTorch's own ``FlopCounterMode`` (which counts two
flops per multiply-add; we halve it).

fvcore has no handler for ``aten::scaled_dot_product_attention`` and would count it as
zero (DiT-XL/2 would read 114.5 instead of 118.6), so a handler is registered here, in
fvcore's table, rather than by switching the fused attention off. Any other op fvcore
cannot count raises ``UncountedOp`` unless it is in ``FREE_OPS``: an op silently counted
as zero is the bug this module exists to prevent. A plugin whose model runs an op of its
own registers its count with ``register_op_flops(op_name, handler)`` (``free`` as the
handler: it costs no multiply-adds), not by editing this file.

The layer choices (``ablate.models.layers``) follow the rules the DiT ops follow:
linear maps (SwiGLU's three, the long skips' ``Linear(2d, d)``, adaLN-single's one
modulation) are counted by fvcore; elementwise arithmetic is free (SwiGLU's gate, the
rotary multiply, adaLN-single's per-block add, as DiT's modulation and residual adds);
``aten::rms_norm`` (RMSNorm, QK-norm) counts as fvcore counts LayerNorm, less the mean and
the centring LayerNorm has and RMSNorm has not: 2 per element, 3 with a learned scale
(LayerNorm: 4 and 5).
"""
from __future__ import annotations

from typing import Any

import warnings

import torch
import torch.nn as nn

# fvcore scripts a helper at import; torch deprecates torch.jit.script. Not our call to fix.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
from fvcore.nn import FlopCountAnalysis  # noqa: E402
from fvcore.nn.jit_handles import get_shape  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ..models.dit import DiT
from . import MODEL_KEYS, register_measure


class UncountedOp(RuntimeError):
    """The model ran an op that neither fvcore nor ablate knows how to count."""


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """q (..., L, E), k (..., S, E), v (..., S, Ev): L*S*E for q.k^T plus L*S*Ev for attn.v."""
    q, k, v = (get_shape(i) for i in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    L, E = q[-2], q[-1]
    S, Ev = k[-2], v[-1]
    return batch * L * S * (E + Ev)


def rms_norm_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """input, normalized_shape, weight, eps: 2 per element (mean of squares, scaling), 3 with
    a weight, as fvcore's LayerNorm handler counts 4 and 5 (it also takes and subtracts a mean)."""
    numel = 1
    for d in get_shape(inputs[0]):
        numel *= d
    return numel * (3 if get_shape(inputs[2]) is not None else 2)


def free(inputs: list[Any], outputs: list[Any]) -> int:
    """The handler of an op that costs no multiply-adds."""
    return 0


# fvcore's handler table, extended (fvcore: ``FlopCountAnalysis.set_op_handle``).
OP_HANDLES = {"aten::scaled_dot_product_attention": sdpa_flop_jit, "aten::rms_norm": rms_norm_flop_jit}


def register_op_flops(op_name: str, handler, *, overwrite: bool = False) -> None:
    """Count ``op_name`` (a traced op's name, ``"mylib::my_op"``) with ``handler(inputs,
    outputs) -> multiply-adds`` (fvcore's handle signature; ``get_shape`` from
    ``fvcore.nn.jit_handles`` reads an input's shape); ``free`` declares it costless."""
    if not overwrite and (op_name in OP_HANDLES or op_name in FREE_OPS):
        raise ValueError(f"op {op_name!r} is already counted; pass overwrite=True to replace its count")
    OP_HANDLES[op_name] = handler

# Ops that cost no multiply-adds in the paper's convention: elementwise arithmetic and
# activations, lookups, shape changes. fvcore skips them (with a warning); we skip them
# knowingly, and anything outside this set is an error.
FREE_OPS = frozenset(
    "aten::" + op
    for op in """add add_ sub rsub mul mul_ div neg exp log cos sin sqrt rsqrt pow tanh sigmoid
    silu gelu relu softmax log_softmax dropout embedding where lt gt ge le eq ne rand
    rand_like randn randn_like zeros zeros_like ones ones_like full_like arange fill_ copy_
    clone contiguous to type_as expand expand_as reshape view flatten unflatten transpose
    permute squeeze unsqueeze cat stack chunk split unbind select slice narrow index
    index_select einsum_reshape detach float mean sum""".split()
)


def _example_inputs(model: nn.Module, batch: int = 1, device="cpu", dtype=torch.float32):
    size = model.input_size
    x = torch.randn(batch, model.in_channels, size, size, device=device, dtype=dtype)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    return x, t, y


def fvcore_count(model: nn.Module, inputs: tuple) -> tuple[int, dict[str, int], dict[str, int]]:
    """Multiply-adds in total, per module and per op, with ablate's handlers; raises
    UncountedOp for an op that is neither counted nor known to be free."""
    fa = FlopCountAnalysis(model, inputs).set_op_handle(**OP_HANDLES)
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    total = fa.total()
    unknown = sorted(set(fa.unsupported_ops()) - FREE_OPS)
    if unknown:
        raise UncountedOp(f"fvcore cannot count {', '.join(unknown)}: register its count with "
                          "ablate.measure.flops.register_op_flops(name, handler) (handler free if it is free)")
    return total, dict(fa.by_module()), dict(fa.by_operator())


def torch_count(model: nn.Module, inputs: tuple) -> tuple[int, dict[str, int]]:
    """Multiply-adds by PyTorch's FlopCounterMode, in total and per module (fvcore's module
    names), attention forced onto the math backend (FlopCounterMode has no formula for the
    fused CPU kernel and would count it as zero)."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(*inputs)
    root = type(model).__name__
    per_module = {name.removeprefix(root).lstrip("."): sum(ops.values()) // 2
                  for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops() // 2, per_module


def _build(model_kwargs: dict, device: str, **override) -> nn.Module:
    """A DiT for counting: on meta (no storage, instant) or on the CPU with zeroed weights
    (counting needs shapes, not values; zeros avoid slow denormals in uninitialised memory)."""
    with torch.device("meta"):
        model = DiT(**{**model_kwargs, **override}).eval()
    if device != "meta":
        model = model.to_empty(device=device)
        with torch.no_grad():
            for p in [*model.parameters(), *model.buffers()]:
                p.zero_()
    return model


@torch.no_grad()
def count_flops(model_kwargs: dict, *, exact: bool = False) -> dict[str, float]:
    """Gflops (multiply-adds, one image, one forward) of ``DiT(**model_kwargs)`` by fvcore
    and by PyTorch's counter, and the attention's share of fvcore's count.

    Both counters run the model op by op (fvcore traces it for real, about 10 s for
    DiT-XL/2 on a CPU). The blocks of a DiT are identical, so the count is affine in depth:
    by default each counter runs the model cut to 2 blocks, and the cost of the second
    block is extended to the full depth, and that of the one long skip (``skips.0``) to
    the depth // 2 pairs, which is exact (a test compares it with the full trace).
    ``exact=True`` runs the full-depth model.
    """
    depth = model_kwargs.get("depth", 28)
    d = depth if exact else min(depth, 2)
    model = _build(model_kwargs, "cpu", depth=d)
    fv_total, by_module, by_op = fvcore_count(model, _example_inputs(model))
    meta = _build(model_kwargs, "meta", depth=d)
    pt_total, pt_by_module = torch_count(meta, _example_inputs(meta, device="meta"))
    extra = depth - d  # blocks not run, each costing what the last one run costs
    last = f"blocks.{d - 1}"
    fv_total += extra * by_module[last]
    pt_total += extra * pt_by_module[last]
    extra_skips = depth // 2 - d // 2  # long skips not run, each costing what skips.0 costs
    if model_kwargs.get("long_skips") and extra_skips:
        fv_total += extra_skips * by_module["skips.0"]
        pt_total += extra_skips * pt_by_module["skips.0"]
    attn_per_block = by_op.get("scaled_dot_product_attention", 0) + by_op.get("matmul", 0)
    return {
        "gflops": fv_total / 1e9,
        "gflops_torch": pt_total / 1e9,
        "gflops_attention": attn_per_block * depth / d / 1e9,
    }


@register_measure("flops", uses=MODEL_KEYS, columns=("gflops", "params_m"))
def flops(cell, progress: bool = True) -> dict:
    """Gflops of one forward pass of one image (fvcore, one multiply-add = one flop) and params."""
    kwargs = cell.model_kwargs
    with torch.device("meta"):
        # Trainable parameters, as the paper counts them (not the fixed pos_embed).
        params = sum(p.numel() for p in DiT(**kwargs).parameters() if p.requires_grad)
    return {**count_flops(kwargs), "params": params, "params_m": round(params / 1e6, 2)}
