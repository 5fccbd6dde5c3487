"""The four conditioning blocks of the DiT paper (section 3.2) and PixArt-alpha's adaLN-single,
each a registered class.

A block type owns four things: the block itself, how the timestep embedding t and the
class embedding y reach it (``condition``/``uncondition``), a module shared by all its
blocks if it has one (``shared``: adaLN-single's modulation), and whether the final layer
is adaLN-modulated. Register a new design with ``@register_block("name")`` and every grid,
table and plot can use it; nothing else changes.

A block is built as ``cls(hidden_size, num_heads, mlp_ratio=..., layers=Layers(...))`` and
takes its norms, attention and MLP from ``layers`` (``ablate.models.layers``), so every
block has every layer choice (norm, qk_norm, mlp, pos_embed). A block whose constructor
takes no ``layers`` is built with DiT's layers only.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn as nn

from ..registry import Registry
# Attention, Mlp and the attention kernels live in layers.py; imported here by their old address.
from .layers import DEFAULT_LAYERS, Attention, CrossAttention, Layers, Mlp, attention, naive_attention  # noqa: F401

BLOCKS: Registry[type] = Registry("block")
register_block = BLOCKS.register


def takes_layers(block_cls: type) -> bool:
    """Whether a block type builds its layers from ``Layers`` (every built-in does)."""
    return "layers" in inspect.signature(block_cls).parameters


def layers_problem(block: str, layers: Layers) -> str | None:
    """Why ``block`` cannot be built with ``layers`` (one line naming the setting), or None."""
    if takes_layers(BLOCKS.get(block)):
        return None
    for f in dataclasses.fields(Layers):
        value = getattr(layers, f.name)
        if f.name != "grid" and value != f.default:
            return (f"block {block!r} builds its own layers (its constructor takes no layers), so it cannot "
                    f"take {f.name}: {str(value).lower()}")
    return None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


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

    @staticmethod
    def shared(hidden_size: int) -> nn.Module | None:
        """A module applied once to cond, whose output every block receives instead of
        cond (the final layer still gets cond); None: the blocks get cond."""
        return None

    @staticmethod
    def initialize_shared(module: nn.Module) -> None:
        pass

    def initialize_weights(self) -> None:
        pass


@register_block("adaln-zero")
class AdaLNZeroBlock(Block):
    """adaLN with per-channel gates before each residual; the modulation starts at zero,
    so each block starts as the identity. This is the official ``DiTBlock``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, layers: Layers = DEFAULT_LAYERS):
        super().__init__()
        self.norm1 = layers.norm_layer(hidden_size)
        self.attn = layers.attention(hidden_size, num_heads)
        self.norm2 = layers.norm_layer(hidden_size)
        self.mlp = layers.mlp_layer(hidden_size, int(hidden_size * mlp_ratio))
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

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, layers: Layers = DEFAULT_LAYERS):
        super().__init__()
        self.norm1 = layers.norm_layer(hidden_size)
        self.attn = layers.attention(hidden_size, num_heads)
        self.norm2 = layers.norm_layer(hidden_size)
        self.mlp = layers.mlp_layer(hidden_size, int(hidden_size * mlp_ratio))
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

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, layers: Layers = DEFAULT_LAYERS):
        super().__init__()
        self.norm1 = layers.norm_layer(hidden_size, affine=True)
        self.attn = layers.attention(hidden_size, num_heads)
        self.norm_cross = layers.norm_layer(hidden_size, affine=True)
        self.cross_attn = layers.cross_attention(hidden_size, num_heads)
        self.norm2 = layers.norm_layer(hidden_size, affine=True)
        self.mlp = layers.mlp_layer(hidden_size, int(hidden_size * mlp_ratio))

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

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, layers: Layers = DEFAULT_LAYERS):
        super().__init__()
        self.norm1 = layers.norm_layer(hidden_size, affine=True)
        self.attn = layers.attention(hidden_size, num_heads)
        self.norm2 = layers.norm_layer(hidden_size, affine=True)
        self.mlp = layers.mlp_layer(hidden_size, int(hidden_size * mlp_ratio))

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


@register_block("adaln-single")
class AdaLNSingleBlock(Block):
    """adaLN-Zero with one modulation for all blocks (PixArt-alpha's adaLN-single): one
    ``Linear(d, 6d)`` on SiLU(t + y) shared by all blocks, plus a learned 6d vector per block.

    The vector (``scale_shift_table``) is added to the shared output; both start at zero, so
    each block starts as the identity, as adaLN-Zero's. Against adaLN-Zero: (depth - 1) x (6d^2 + 6d) fewer
    parameters and depth x 6d more, and (depth - 1) x 6d^2 fewer multiply-adds per image."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, layers: Layers = DEFAULT_LAYERS):
        super().__init__()
        self.norm1 = layers.norm_layer(hidden_size)
        self.attn = layers.attention(hidden_size, num_heads)
        self.norm2 = layers.norm_layer(hidden_size)
        self.mlp = layers.mlp_layer(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.zeros(6 * hidden_size))

    @staticmethod
    def shared(hidden_size):
        return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    @staticmethod
    def initialize_shared(module):
        nn.init.constant_(module[-1].weight, 0)
        nn.init.constant_(module[-1].bias, 0)

    def initialize_weights(self) -> None:
        nn.init.constant_(self.scale_shift_table, 0)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """c: (N, 6D), the shared modulation of t + y."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (c + self.scale_shift_table).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)
