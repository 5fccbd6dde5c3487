"""The four conditioning blocks of the DiT paper (section 3.2), each a registered class.

A block type owns three things: the block itself, how the timestep embedding t and the
class embedding y reach it (``condition``/``uncondition``), and whether the final layer
is adaLN-modulated. Register a new design with ``@register_block("name")`` and every grid,
table and plot can use it; nothing else changes.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import Registry

BLOCKS: Registry[type] = Registry("block")
register_block = BLOCKS.register

# The obvious implementation of attention (explicit softmax(QK^T)V) exists only so that
# benchmarks can measure what the fused kernel buys; models always use the fused path.
_FUSED_ATTENTION = True


@contextlib.contextmanager
def naive_attention():
    """Within this context, attention is computed with explicit matmuls and softmax."""
    global _FUSED_ATTENTION
    old, _FUSED_ATTENTION = _FUSED_ATTENTION, False
    try:
        yield
    finally:
        _FUSED_ATTENTION = old


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: (N, H, Tq, Dh), k, v: (N, H, Tk, Dh) -> (N, H, Tq, Dh)."""
    if _FUSED_ATTENTION:
        return F.scaled_dot_product_attention(q, k, v)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, H, Tq, Tk)
    return attn.softmax(dim=-1) @ v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with timm's key names (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, T, Dh) each
        x = attention(q, k, v).transpose(1, 2).reshape(N, T, D)
        return self.proj(x)  # (N, T, D)


class CrossAttention(nn.Module):
    """Image tokens attend to a short conditioning sequence."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        H, Dh = self.num_heads, D // self.num_heads
        q = self.q(x).reshape(N, T, H, Dh).transpose(1, 2)  # (N, H, T, Dh)
        kv = self.kv(ctx).reshape(N, ctx.shape[1], 2, H, Dh).permute(2, 0, 3, 1, 4)
        x = attention(q, kv[0], kv[1]).transpose(1, 2).reshape(N, T, D)
        return self.proj(x)  # (N, T, D)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation, as DiT) -> fc2, with timm's key names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Base of the conditioning blocks: by default t + y is one vector per image."""

    adaptive_final_layer = True

    @staticmethod
    def condition(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """Patch tokens (N, T, D), embeddings (N, D) -> (tokens the blocks see, cond)."""
        return x, t + y  # (N, T, D), (N, D)

    @staticmethod
    def uncondition(x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block -> the patch tokens the final layer sees."""
        return x

    def initialize_weights(self) -> None:
        pass


@register_block("adaln-zero")
class AdaLNZeroBlock(Block):
    """adaLN with per-channel gates before each residual; the modulation starts at zero,
    so each block starts as the identity. This is the official ``DiTBlock``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def initialize_weights(self) -> None:
        nn.init.constant_(self.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.adaLN_modulation[-1].bias, 0)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


@register_block("adaln")
class AdaLNBlock(Block):
    """LayerNorm whose scale and shift are regressed from t + y; no gates, no zero init."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 4 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


@register_block("cross-attn")
class CrossAttnBlock(Block):
    """t and y as a separate length-2 sequence; cross-attention follows self-attention."""

    adaptive_final_layer = False

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    @staticmethod
    def condition(x, t, y):
        return x, torch.stack([t, y], dim=1)  # (N, T, D), (N, 2, D)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_cross(x), ctx)
        x = x + self.mlp(self.norm2(x))
        return x  # (N, T, D)


@register_block("in-context")
class InContextBlock(Block):
    """t and y appended to the sequence as two tokens; plain ViT blocks; the two tokens
    are removed after the last block."""

    adaptive_final_layer = False
    num_cond_tokens = 2

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    @staticmethod
    def condition(x, t, y):
        return torch.cat([x, t.unsqueeze(1), y.unsqueeze(1)], dim=1), None  # (N, T+2, D)

    @classmethod
    def uncondition(cls, x):
        return x[:, : -cls.num_cond_tokens]  # (N, T, D)

    def forward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x  # (N, T+2, D)
