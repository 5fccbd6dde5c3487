"""The Diffusion Transformer, with the paper's four ways of conditioning a block and the
design choices of its successors.

With ``block="adaln-zero"`` and every other choice at its default this is the model of
facebookresearch/DiT: the same modules, key names, shapes and initialisation, so official
checkpoints load with ``strict=True``. What varies:

- ``block``: each block type is a registered class (``ablate.models.blocks``) that also
  says how the timestep and class embeddings reach it (adaLN-single: PixArt-alpha).
- ``norm``, ``mlp``, ``pos_embed``, ``qk_norm``: the layers the blocks are built of
  (``ablate.models.layers``: RMSNorm, SwiGLU, 2-D RoPE, QK-norm, as LightningDiT and SD3).
- ``long_skips`` (U-ViT, Bao et al. 2023): the output of block i is concatenated to the
  input of block depth-1-i and mapped back to d by a ``Linear(2d, d)`` (``skips.i``), for
  the depth // 2 pairs i < depth // 2. With an even depth the innermost pair's skip carries
  the stream itself (U-ViT's depths are odd, its middle block unpaired). Cost: depth // 2 x
  2d x d multiply-adds per token, depth // 2 x (2d^2 + d) parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .blocks import BLOCKS, layers_problem, takes_layers
from .layers import DEFAULT_LAYERS, Layers, get_2d_sincos_pos_embed  # noqa: F401  (the table's old address)


# ---------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a stride-p convolution (timm's key names)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal frequencies, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        # cos first, then sin: the official layout, which checkpoints depend on.
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb  # (N, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D); a no-op cast in fp32


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; one extra row is the null class for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids=None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


# ---------------------------------------------------------------------------------
# Final layers: the block type chooses one (adaptive for adaLN blocks, plain otherwise)
# ---------------------------------------------------------------------------------
class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from D to p*p*C_out per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, layers: Layers = DEFAULT_LAYERS):
        super().__init__()
        self.norm_final = layers.norm_layer(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        x = self.norm_final(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return self.linear(x)  # (N, T, p*p*C_out)


class PlainFinalLayer(nn.Module):
    """LayerNorm then linear, for blocks that see the conditioning as tokens."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, layers: Layers = DEFAULT_LAYERS):
        super().__init__()
        self.norm_final = layers.norm_layer(hidden_size, affine=True)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(self.norm_final(x))  # (N, T, p*p*C_out)


# ---------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------
class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    Constructor keywords are the official ones, plus ``block``: one of the names in
    ``ablate.models.BLOCKS`` (``adaln-zero``, ``adaln``, ``cross-attn``, ``in-context``,
    ``adaln-single`` or one a user registered); ``norm``, ``mlp``, ``pos_embed`` (names in
    ``ablate.models.layers``' registries), ``qk_norm`` and ``long_skips``.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        block: str = "adaln-zero",
        norm: str = "layernorm",
        mlp: str = "gelu",
        pos_embed: str = "sincos",
        qk_norm: bool = False,
        long_skips: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide input_size {input_size}")
        if hidden_size % num_heads:
            raise ValueError(f"num_heads {num_heads} does not divide hidden_size {hidden_size}")
        block_cls = BLOCKS.get(block)
        layers = Layers(norm=norm, mlp=mlp, pos_embed=pos_embed, qk_norm=qk_norm, grid=input_size // patch_size)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # A fixed table (sin-cos): a Parameter (not a buffer) only so that the key and its
        # place in official checkpoints match. None where positions enter the attention.
        self.layers = layers
        additive = layers.pos_table(hidden_size) is not None  # the table itself: initialize_weights
        self.pos_embed = (nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
                          if additive else None)

        problem = layers_problem(block, layers)
        if problem:
            raise ValueError(problem)
        with_layers = dict(layers=layers) if takes_layers(block_cls) else {}
        self.blocks = nn.ModuleList(
            [block_cls(hidden_size, num_heads, mlp_ratio=mlp_ratio, **with_layers) for _ in range(depth)]
        )
        self.blocks_shared = block_cls.shared(hidden_size)  # None for all but adaLN-single
        self.skips = (nn.ModuleList([nn.Linear(2 * hidden_size, hidden_size) for _ in range(depth // 2)])
                      if long_skips else None)
        final_cls = FinalLayer if block_cls.adaptive_final_layer else PlainFinalLayer
        self.final_layer = final_cls(hidden_size, patch_size, self.out_channels, layers)
        # Recompute each block's activations in the backward pass instead of keeping them
        # (timm's grad_checkpointing): less memory, about one more forward of compute.
        self.activation_checkpointing = False
        # Under autocast, the residual stream between blocks in the autocast dtype instead of
        # fp32 (Megatron-LM's default; DiT keeps fp32): half the bytes of the elementwise work
        # around each block (residual adds, LayerNorm forward and backward), at bf16's rounding
        # of every residual add. LayerNorm itself still computes in fp32 (autocast's rule).
        self.low_precision_residual = False
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        if self.pos_embed is not None:
            pos = self.layers.pos_table(self.pos_embed.shape[-1])
            self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        # Patch embedding initialised like nn.Linear, not like a convolution.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for blk in self.blocks:
            blk.initialize_weights()  # adaLN-Zero zeroes its modulation here
        if self.blocks_shared is not None:
            type(self.blocks[0]).initialize_shared(self.blocks_shared)
        # Zero output: the model starts by predicting 0 (noise-free eps), as in DiT.
        if isinstance(self.final_layer, FinalLayer):
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W) noisy inputs, t: (N,) timesteps, y: (N,) labels -> (N, C_out, H, W).

        ``force_drop_ids`` (N,): which labels become the null class, drawn by the caller
        instead of here (a compiled training step draws its random numbers outside the
        graph, so that it consumes the RNG exactly as the eager step does)."""
        x = self.x_embedder(x)  # (N, T, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        block_cls = type(self.blocks[0])
        x, cond = block_cls.condition(x, t, y)  # the block type decides what "cond" is
        block_cond = cond if self.blocks_shared is None else self.blocks_shared(cond)  # (N, 6D) for adaLN-single
        if self.low_precision_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # (N, T', D) in bf16
        depth, pairs = len(self.blocks), len(self.skips) if self.skips is not None else 0
        skipped = []  # outputs of blocks 0 .. pairs-1, for blocks depth-1 .. depth-pairs
        for i, blk in enumerate(self.blocks):
            if i >= depth - pairs:
                x = self.skips[depth - 1 - i](torch.cat([x, skipped.pop()], dim=-1))  # (N, T', D)
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, block_cond, use_reentrant=False)  # (N, T', D)
            else:
                x = blk(x, block_cond)  # (N, T', D)
            if i < pairs:
                skipped.append(x)
        x = block_cls.uncondition(x)  # (N, T, D)
        x = self.final_layer(x, cond)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale: float, cfg_channels: int | None = None):
        """Classifier-free guidance: the first half of the batch is conditional, the second
        half carries the null label. ``cfg_channels`` is how many output channels are guided:
        all ``in_channels`` by default; the official sampler guides 3 (``cfg_channels=3``)."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        k = self.in_channels if cfg_channels is None else cfg_channels
        eps, rest = model_out[:, :k], model_out[:, k:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)
