"""ablate's adaLN-Zero DiT is the model of facebookresearch/DiT (``models.py``).

Two checks, neither of which needs the official repository:

* the state-dict layout of DiT-S/2 is the official one, key for key and shape for shape,
  so official checkpoints load with ``strict=True`` (the list below is written out by
  hand from the official ``models.py``; a renamed, added or reshaped key fails);
* outputs equal those of HuggingFace diffusers' ``DiTTransformer2DModel``, an independent
  implementation built to run the official DiT checkpoints, when it is given the same
  weights through the official -> diffusers key mapping.

diffusers' DiT timestep embedding spaces its frequencies by ``1 / (half - 1)``
(``downscale_freq_shift=1``) where the official code uses ``1 / half``; the two differ for
every t != 0 (by ~1e-1 on the output of a perturbed DiT-S/2 at t=999). The official
spacing is the one checkpoints were trained with, so the comparison sets diffusers'
``downscale_freq_shift`` to 0; at t = 0 the two agree as shipped, which is checked too.
"""
from __future__ import annotations

import pytest
import torch

from ablate.models import DiT, create_model

# ---------------------------------------------------------------------------------
# State-dict layout (official models.py, DiT-S/2 at 256x256: 32x32x4 latents)
# ---------------------------------------------------------------------------------
D, DEPTH, P, C, T, CLASSES = 384, 12, 2, 4, (32 // 2) ** 2, 1000
C_OUT = 2 * C  # learned sigma

OFFICIAL_TOP_KEYS = [
    ("pos_embed", (1, T, D)),
    ("x_embedder.proj.weight", (D, C, P, P)),
    ("x_embedder.proj.bias", (D,)),
    ("t_embedder.mlp.0.weight", (D, 256)),
    ("t_embedder.mlp.0.bias", (D,)),
    ("t_embedder.mlp.2.weight", (D, D)),
    ("t_embedder.mlp.2.bias", (D,)),
    ("y_embedder.embedding_table.weight", (CLASSES + 1, D)),  # + the null class
]
OFFICIAL_BLOCK_KEYS = [
    ("blocks.{i}.attn.qkv.weight", (3 * D, D)),
    ("blocks.{i}.attn.qkv.bias", (3 * D,)),
    ("blocks.{i}.attn.proj.weight", (D, D)),
    ("blocks.{i}.attn.proj.bias", (D,)),
    ("blocks.{i}.mlp.fc1.weight", (4 * D, D)),
    ("blocks.{i}.mlp.fc1.bias", (4 * D,)),
    ("blocks.{i}.mlp.fc2.weight", (D, 4 * D)),
    ("blocks.{i}.mlp.fc2.bias", (D,)),
    ("blocks.{i}.adaLN_modulation.1.weight", (6 * D, D)),
    ("blocks.{i}.adaLN_modulation.1.bias", (6 * D,)),
]
OFFICIAL_FINAL_KEYS = [
    ("final_layer.linear.weight", (P * P * C_OUT, D)),
    ("final_layer.linear.bias", (P * P * C_OUT,)),
    ("final_layer.adaLN_modulation.1.weight", (2 * D, D)),
    ("final_layer.adaLN_modulation.1.bias", (2 * D,)),
]


def official_layout() -> list[tuple[str, tuple[int, ...]]]:
    blocks = [(k.format(i=i), s) for i in range(DEPTH) for k, s in OFFICIAL_BLOCK_KEYS]
    return OFFICIAL_TOP_KEYS + blocks + OFFICIAL_FINAL_KEYS


# Official initialize_weights: these start at exactly zero; every other tensor does not.
OFFICIAL_ZERO_AT_INIT = (
    {"x_embedder.proj.bias", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.bias"}
    | {k.format(i=i) for i in range(DEPTH) for k, _ in OFFICIAL_BLOCK_KEYS
       if k.endswith(".bias") or "adaLN_modulation" in k}
    | {k for k, _ in OFFICIAL_FINAL_KEYS}
)


# A tiny config for the output tests (4 channels, learned sigma by default).
TINY = dict(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


@pytest.fixture(scope="module")
def dit_s2():
    torch.manual_seed(0)
    return create_model("DiT-S/2", block="adaln-zero")


def test_state_dict_is_official_dit_s2(dit_s2):
    sd = dit_s2.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == official_layout()
    assert not dict(dit_s2.named_buffers())  # everything is a parameter, as official
    assert not dit_s2.pos_embed.requires_grad  # fixed sin-cos, a frozen Parameter


def test_initialisation_is_official(dit_s2):
    sd = dit_s2.state_dict()
    zero = {k for k, v in sd.items() if not v.any()}
    assert zero == OFFICIAL_ZERO_AT_INIT
    # normal(std=0.02) for the label table and the timestep MLP
    for k in ("y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight"):
        assert abs(sd[k].std().item() - 0.02) < 2e-3, k
    # xavier_uniform for the other weights (the patch embedding as a (D, C*p*p) matrix)
    for k in ("x_embedder.proj.weight", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight"):
        w = sd[k].reshape(sd[k].shape[0], -1)
        bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound, k


def test_output_is_zero_at_init():
    """adaLN-Zero: every block starts as the identity and the final layer outputs 0."""
    model = DiT(patch_size=2, block="adaln-zero", **TINY)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, TINY["num_classes"]])
    with torch.no_grad():
        assert not model(x, t, y).any()


# ---------------------------------------------------------------------------------
# Outputs against diffusers' DiTTransformer2DModel
# ---------------------------------------------------------------------------------
def to_diffusers_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Official (= ablate adaln-zero) keys -> diffusers DiTTransformer2DModel keys.

    diffusers gives every block its own copy of the timestep and label embedders (the
    final layer uses block 0's), and splits the fused qkv projection in three.
    """
    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[dst + "norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        for p in ("weight", "bias"):
            out[dst + f"norm1.emb.timestep_embedder.linear_1.{p}"] = sd[f"t_embedder.mlp.0.{p}"]
            out[dst + f"norm1.emb.timestep_embedder.linear_2.{p}"] = sd[f"t_embedder.mlp.2.{p}"]
            out[dst + f"norm1.linear.{p}"] = sd[src + f"adaLN_modulation.1.{p}"]
            q, k, v = sd[src + f"attn.qkv.{p}"].chunk(3, dim=0)
            out[dst + f"attn1.to_q.{p}"], out[dst + f"attn1.to_k.{p}"], out[dst + f"attn1.to_v.{p}"] = q, k, v
            out[dst + f"attn1.to_out.0.{p}"] = sd[src + f"attn.proj.{p}"]
            out[dst + f"ff.net.0.proj.{p}"] = sd[src + f"mlp.fc1.{p}"]
            out[dst + f"ff.net.2.{p}"] = sd[src + f"mlp.fc2.{p}"]
    return out


def tiny_pair(patch_size: int, learn_sigma: bool):
    """A tiny ablate DiT with random non-zero weights, and diffusers' model with the same."""
    import diffusers  # in the test extra: a missing install fails here, loudly

    torch.manual_seed(0)
    ours = DiT(patch_size=patch_size, learn_sigma=learn_sigma, block="adaln-zero", **TINY).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name != "pos_embed":  # fixed sin-cos; diffusers computes its own
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs = diffusers.DiTTransformer2DModel(
        num_attention_heads=TINY["num_heads"],
        attention_head_dim=TINY["hidden_size"] // TINY["num_heads"],
        in_channels=TINY["in_channels"],
        out_channels=ours.out_channels,
        num_layers=TINY["depth"],
        sample_size=TINY["input_size"],
        patch_size=patch_size,
        num_embeds_ada_norm=TINY["num_classes"],
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,  # official LayerNorms use 1e-6 (diffusers' default is 1e-5)
        activation_fn="gelu-approximate",
        attention_bias=True,
    ).eval()
    theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict(), TINY["depth"]), strict=True)
    return ours, theirs


def official_timestep_spacing(model) -> None:
    for blk in model.transformer_blocks:
        blk.norm1.emb.time_proj.downscale_freq_shift = 0


def inputs(n: int = 6, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=g)
    t = torch.tensor([0, 1, 17, 250, 500, 999][:n])
    y = torch.randint(0, TINY["num_classes"] + 1, (n,), generator=g)  # includes the null class
    return x, t, y


@pytest.mark.parametrize("patch_size,learn_sigma", [(2, True), (4, True), (2, False)])
def test_forward_matches_diffusers(patch_size, learn_sigma):
    ours, theirs = tiny_pair(patch_size, learn_sigma)
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed.pos_embed, atol=1e-6, rtol=0)
    x, t, y = inputs()
    with torch.no_grad():
        out = ours(x, t, y)
        assert out.shape == (len(x), 2 * TINY["in_channels"] if learn_sigma else TINY["in_channels"], 8, 8)
        assert out.abs().max() > 0.1  # the weights are non-zero, so is the output
        # at t = 0 the timestep spacing does not matter: diffusers as shipped agrees
        assert t[0] == 0
        torch.testing.assert_close(out[:1], theirs(x, t, y).sample[:1], atol=1e-5, rtol=1e-5)
        official_timestep_spacing(theirs)
        torch.testing.assert_close(out, theirs(x, t, y).sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg_channels", [3, None])
def test_forward_with_cfg_matches_diffusers(cfg_channels):
    """Guided channels: 3 as the official sampler, or all in_channels (diffusers' DiTPipeline)."""
    ours, theirs = tiny_pair(2, True)
    official_timestep_spacing(theirs)
    x, t, _ = inputs(4)
    null = TINY["num_classes"]
    y = torch.tensor([3, 7, null, null])
    scale = 4.0
    with torch.no_grad():
        got = ours.forward_with_cfg(x, t, y, scale, cfg_channels=cfg_channels)
        half = x[:2]
        ref = theirs(torch.cat([half, half]), t, y).sample
    k = TINY["in_channels"] if cfg_channels is None else cfg_channels
    cond, uncond = ref[:2, :k], ref[2:, :k]
    guided = uncond + scale * (cond - uncond)
    expected = torch.cat([torch.cat([guided, guided]), ref[:, k:]], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_official_checkpoint_file_loads_strictly(tmp_path, monkeypatch):
    """A file laid out like DiT-XL-2-256x256.pt (a bare state dict of the official keys)
    loads into the adaLN-Zero model with strict=True and gives the saved model's outputs."""
    from ablate.models import pretrained

    # XL/2 is built on meta for speed; the file holds a real tiny stand-in of the same layout.
    monkeypatch.setitem(pretrained.OFFICIAL, "DiT-XL-2-256x256.pt", ("DiT-T/2", 8))
    torch.manual_seed(3)
    src = create_model("DiT-T/2", input_size=8).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(src.state_dict(), path)
    loaded = pretrained.load_official(str(path))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 999])
    torch.testing.assert_close(loaded(x, t, y), src(x, t, y), rtol=0, atol=0)


def test_official_checkpoint_offline_is_one_clear_error(tmp_path, monkeypatch):
    from ablate.models import pretrained

    monkeypatch.setenv("ABLATE_CACHE", str(tmp_path))

    def offline(url, dst, progress=True):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(pretrained.CheckpointUnavailable, match="place the file at"):
        pretrained.load_official("DiT-XL-2-256x256.pt")
