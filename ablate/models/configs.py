"""Model sizes and named configs (paper Table 1), as a name -> config table.

``DiT-XL/2`` means size XL with patch size 2. Register a size once and its
``DiT-<size>/2``, ``/4`` and ``/8`` names exist; any other patch size can be asked for
directly with ``create_model(size=..., patch_size=...)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..registry import Registry, UnknownName
from .dit import DiT


@dataclass(frozen=True)
class Size:
    depth: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0

    def dit_kwargs(self) -> dict:
        """The ``DiT`` constructor's arguments that this size fixes."""
        return dict(hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio)


SIZES: Registry[Size] = Registry("model size")
MODELS: Registry[tuple[str, int]] = Registry("model")  # "DiT-S/2" -> ("S", 2)
PAPER_PATCH_SIZES = (2, 4, 8)


def register_size(name: str, depth: int, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                  patch_sizes=PAPER_PATCH_SIZES) -> Size:
    size = SIZES.register(name, Size(depth, hidden_size, num_heads, mlp_ratio))
    for p in patch_sizes:
        MODELS.register(model_name(name, p), (name, p))
    return size


def model_name(size: str, patch_size: int) -> str:
    return f"DiT-{size}/{patch_size}"


def parse_model_name(name: str) -> tuple[str, int]:
    """'DiT-S/2' -> ('S', 2); any registered size with any patch size parses."""
    if name in MODELS:
        return MODELS.get(name)
    m = re.fullmatch(r"DiT-(\w+)/(\d+)", str(name))
    if m and m.group(1) in SIZES:
        return m.group(1), int(m.group(2))
    raise UnknownName("model", name, MODELS.names())


# The paper's four sizes (Table 1).
register_size("S", depth=12, hidden_size=384, num_heads=6)
register_size("B", depth=12, hidden_size=768, num_heads=12)
register_size("L", depth=24, hidden_size=1024, num_heads=16)
register_size("XL", depth=28, hidden_size=1152, num_heads=16)
# Smaller sizes that train in minutes on a laptop CPU (not in the paper).
register_size("XS", depth=6, hidden_size=192, num_heads=3)
register_size("T", depth=4, hidden_size=128, num_heads=4)


def dit_kwargs(name: str | None = None, *, size: str | None = None, patch_size: int | None = None,
               block: str = "adaln-zero", input_size: int = 32, in_channels: int = 4,
               num_classes: int = 1000, learn_sigma: bool = True, class_dropout_prob: float = 0.1,
               norm: str = "layernorm", mlp: str = "gelu", pos_embed: str = "sincos", qk_norm: bool = False,
               long_skips: bool = False) -> dict:
    """The ``DiT`` constructor's keywords for a model named ``"DiT-XL/2"`` or given by ``size``
    and ``patch_size``. Defaults are the paper's ImageNet-256 setting: 32x32x4 VAE latents,
    1000 classes, learned sigma, and DiT's layers."""
    if name is not None:
        size, patch_size = parse_model_name(name)
    return dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                **SIZES.get(size).dit_kwargs(), class_dropout_prob=class_dropout_prob,
                num_classes=num_classes, learn_sigma=learn_sigma, block=block, norm=norm, mlp=mlp,
                pos_embed=pos_embed, qk_norm=qk_norm, long_skips=long_skips)


def create_model(name: str | None = None, **kwargs) -> DiT:
    """Build a DiT by name (``"DiT-XL/2"``) or by ``size`` and ``patch_size``; the keywords
    of ``dit_kwargs``."""
    return DiT(**dit_kwargs(name, **kwargs))
