"""The layers a block is built of, and the design choices of DiT's successors as registries.

Each choice is a registered entry, named as a grid names it; DiT's own choice is the
default of each, so a model that sets none of them is the official DiT:

- ``norm`` (``NORMS``): the blocks' and the final layer's normalisation. ``layernorm``
  (DiT) or ``rmsnorm`` (LightningDiT, SD3; Zhang & Sennrich 2019: no mean, no centring).
  Where DiT's LayerNorm has no affine parameters (``elementwise_affine=False, eps=1e-6``:
  the adaLN blocks, whose scale and shift are regressed) neither has RMSNorm; where DiT's
  has them (cross-attention, in-context blocks) RMSNorm has its learned scale.
- ``mlp`` (``MLPS``): the feed-forward. ``gelu`` (DiT: fc1, GELU-tanh, fc2 with 4d hidden)
  or ``swiglu`` (Shazeer 2020, LLaMA): ``w3(silu(x W1) * (x W2))`` with W1 and W2 one
  ``Linear(d, 2h)``, all with biases as DiT's, and h = 2/3 of GELU's hidden size rounded
  *up* to a multiple of 8 (LLaMA's rule, ``multiple_of * ceil(int(2/3 * 4d) / multiple_of)``,
  with LLaMA's 256 scaled down to 8 for models 64 to 1152 wide), so that its parameters are
  GELU's to within the rounding: at most 7 hidden units, (3d + 2) parameters each, more.
- ``pos_embed`` (``POS_EMBEDS``): ``sincos`` (DiT: a fixed 2-D sin-cos table added to the
  patch tokens) or ``rope`` (axial 2-D rotary embedding on q and k in self-attention, as
  LightningDiT: the first half of each head's channels rotates with the token's row, the
  second half with its column, each half in rotate-half pairs at frequencies
  10000^(-k/(Dh/4)), k < Dh/4; the head dim must be a multiple of 4). Tokens that are not
  patches (the in-context block's t and y) are not rotated: they have no position.
- ``qk_norm``: an RMSNorm with a learned scale over the head dimension of q and k before
  attention (LightningDiT, SD3), in self- and cross-attention.

``Layers`` carries one model's choices to its blocks: a block builds its norms, attention and
MLP with ``layers.norm(...)``, ``layers.attention(...)``, ``layers.mlp(...)``, and gets every
choice, present and registered later, without knowing any of them. Register a new
normalisation with ``@register_norm("name")`` on ``factory(dim, affine) -> nn.Module``, an MLP
with ``@register_mlp("name")`` on a class ``(dim, hidden)``, a positional embedding with
``@register_pos_embed("name")`` on a ``PositionalEmbedding`` subclass.

Cost, in the paper's convention (``ablate.measure.flops``): linear maps count their
multiply-adds, elementwise arithmetic is free (as DiT's modulation and residual adds are),
so SwiGLU's gate and the rotary multiply count nothing; a normalisation counts per element
as fvcore counts LayerNorm: 4 (mean, centring, variance, scaling), RMSNorm 2 (mean of
squares, scaling), a learned scale one more.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import Registry

NORM_EPS = 1e-6  # DiT's LayerNorm eps, for every normalisation

NORMS: Registry[Callable[[int, bool], nn.Module]] = Registry("norm")
MLPS: Registry[type] = Registry("mlp")
POS_EMBEDS: Registry[type] = Registry("pos_embed")
register_norm, register_mlp, register_pos_embed = NORMS.register, MLPS.register, POS_EMBEDS.register


# ---------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------
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


class Attention(nn.Module):
    """Multi-head self-attention with timm's key names (``qkv``, ``proj``; ``q_norm``,
    ``k_norm`` with QK-norm)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, rotary: nn.Module | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if qk_norm:
            self.q_norm = nn.RMSNorm(dim // num_heads, eps=NORM_EPS)
            self.k_norm = nn.RMSNorm(dim // num_heads, eps=NORM_EPS)
        self.qk_norm = qk_norm
        self.rotary = rotary
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, T, Dh) each
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        x = attention(q, k, v).transpose(1, 2).reshape(N, T, D)
        return self.proj(x)  # (N, T, D)


class CrossAttention(nn.Module):
    """Image tokens attend to a short conditioning sequence (which has no positions: no
    rotary embedding here)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        if qk_norm:
            self.q_norm = nn.RMSNorm(dim // num_heads, eps=NORM_EPS)
            self.k_norm = nn.RMSNorm(dim // num_heads, eps=NORM_EPS)
        self.qk_norm = qk_norm
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        H, Dh = self.num_heads, D // self.num_heads
        q = self.q(x).reshape(N, T, H, Dh).transpose(1, 2)  # (N, H, T, Dh)
        k, v = self.kv(ctx).reshape(N, ctx.shape[1], 2, H, Dh).permute(2, 0, 3, 1, 4)  # (N, H, S, Dh) each
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        x = attention(q, k, v).transpose(1, 2).reshape(N, T, D)
        return self.proj(x)  # (N, T, D)


# ---------------------------------------------------------------------------------
# Normalisations
# ---------------------------------------------------------------------------------
@register_norm("layernorm")
def layernorm(dim: int, affine: bool) -> nn.Module:
    """LayerNorm (DiT)."""
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=NORM_EPS)


@register_norm("rmsnorm")
def rmsnorm(dim: int, affine: bool) -> nn.Module:
    """RMSNorm: x / rms(x), a learned scale where LayerNorm would be affine (LightningDiT, SD3)."""
    return nn.RMSNorm(dim, elementwise_affine=affine, eps=NORM_EPS)


# ---------------------------------------------------------------------------------
# MLPs: a class (dim, hidden), hidden being the 4d of DiT's GELU MLP
# ---------------------------------------------------------------------------------
@register_mlp("gelu")
class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation, as DiT) -> fc2, with timm's key names (DiT)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden(hidden: int, multiple_of: int = 8) -> int:
    """SwiGLU's hidden size for GELU's ``hidden``: 2/3 of it, rounded up to ``multiple_of``
    (LLaMA's rule): three matrices of this size hold what two of GELU's do."""
    return multiple_of * math.ceil(int(2 * hidden / 3) / multiple_of)


@register_mlp("swiglu")
class SwiGLU(nn.Module):
    """w3(silu(a) * b) with (a, b) = w12(x) (LLaMA, LightningDiT), the parameters of GELU's MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        h = swiglu_hidden(hidden)
        self.w12 = nn.Linear(dim, 2 * h)
        self.w3 = nn.Linear(h, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)  # (N, T, h) each
        return self.w3(F.silu(a) * b)  # (N, T, D)


# ---------------------------------------------------------------------------------
# Positional embeddings
# ---------------------------------------------------------------------------------
class PositionalEmbedding:
    """How tokens learn where they are: a fixed table added to the patch tokens
    (``table``), a rotation of q and k in self-attention (``rotary``), or both."""

    @staticmethod
    def table(dim: int, grid: int) -> np.ndarray | None:
        """(grid*grid, dim) added to the patch tokens, or None."""
        return None

    @staticmethod
    def rotary(head_dim: int, grid: int) -> nn.Module | None:
        """A module (N, H, T', Dh) -> (N, H, T', Dh) applied to q and k, or None."""
        return None


@register_pos_embed("sincos")
class SinCos(PositionalEmbedding):
    """Fixed 2-D sin-cos added to the patch tokens (DiT, MAE's layout)."""

    @staticmethod
    def table(dim, grid):
        return get_2d_sincos_pos_embed(dim, grid)


@register_pos_embed("rope")
class Rope(PositionalEmbedding):
    """Axial 2-D rotary embedding on q and k: half of each head's channels by row, half by
    column (LightningDiT); no additive table."""

    @staticmethod
    def rotary(head_dim, grid):
        return Rotary2D(head_dim, grid)


class Rotary2D(nn.Module):
    """Rotates q or k by the 2-D position of each of the first grid*grid tokens.

    The cos/sin tables are buffers left out of the state dict (they follow from the shape,
    like ``pos_embed``, but unlike it are no key of official checkpoints)."""

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"rope needs a head dim that is a multiple of 4, got {head_dim}")
        quarter = head_dim // 4
        freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (Dh/4,)
        pos = torch.arange(grid * grid)
        rows, cols = (pos // grid).double(), (pos % grid).double()  # token t = row * grid + col
        angles = torch.cat([rows[:, None] * freqs, rows[:, None] * freqs,
                            cols[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (T, Dh)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        """Within each of the row and column halves, (a, b) -> (-b, a)."""
        a, b, c, d = x.chunk(4, dim=-1)
        return torch.cat([-b, a, -d, c], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = self.cos.shape[0]
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)  # (T, Dh)
        if x.shape[-2] == T:
            return x * cos + self.rotate_half(x) * sin
        # Tokens past the patches (in-context conditioning) keep their values.
        patches, rest = x[..., :T, :], x[..., T:, :]
        return torch.cat([patches * cos + self.rotate_half(patches) * sin, rest], dim=-2)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w first, as the official code
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)  # (T, D)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


# ---------------------------------------------------------------------------------
# One model's choices, as its blocks see them
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layers:
    """The layer choices of one model; the defaults are DiT's. ``grid`` (patches per side)
    is the model's, for positional embeddings."""

    norm: str = "layernorm"
    mlp: str = "gelu"
    pos_embed: str = "sincos"
    qk_norm: bool = False
    grid: int = 16

    def __post_init__(self):
        NORMS.get(self.norm), MLPS.get(self.mlp), POS_EMBEDS.get(self.pos_embed)  # UnknownName early

    def norm_layer(self, dim: int, affine: bool = False) -> nn.Module:
        return NORMS.get(self.norm)(dim, affine)

    def attention(self, dim: int, num_heads: int) -> Attention:
        rotary = POS_EMBEDS.get(self.pos_embed).rotary(dim // num_heads, self.grid)
        return Attention(dim, num_heads, qk_norm=self.qk_norm, rotary=rotary)

    def cross_attention(self, dim: int, num_heads: int) -> CrossAttention:
        return CrossAttention(dim, num_heads, qk_norm=self.qk_norm)

    def mlp_layer(self, dim: int, hidden: int) -> nn.Module:
        return MLPS.get(self.mlp)(dim, hidden)

    def pos_table(self, dim: int) -> np.ndarray | None:
        return POS_EMBEDS.get(self.pos_embed).table(dim, self.grid)


DEFAULT_LAYERS = Layers()
