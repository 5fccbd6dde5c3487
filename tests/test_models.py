import pytest
import torch

from ablate.models import create_model, register_block, register_size, SIZES, MODELS
from ablate.models.blocks import AdaLNZeroBlock, InContextBlock
from conftest import table4, tiny

ALL_BLOCKS = ["adaln-zero", "adaln", "cross-attn", "in-context"]


def inputs(n=3, size=8, c=4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, c, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


def randomize(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("block", ALL_BLOCKS)
@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_output_shape_every_block_and_patch(block, patch_size):
    model = tiny(block, patch_size=patch_size, input_size=16).eval()
    out = model(*inputs(size=16))
    assert out.shape == (3, 8, 16, 16)  # learned sigma doubles the 4 channels
    m2 = tiny(block, patch_size=patch_size, input_size=16, learn_sigma=False).eval()
    assert m2(*inputs(size=16)).shape == (3, 4, 16, 16)


def test_adaln_zero_blocks_are_identity_and_output_zero_at_init():
    model = tiny("adaln-zero").eval()
    x = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    for blk in model.blocks:
        assert torch.equal(blk(x, c), x)
    assert torch.count_nonzero(model(*inputs())) == 0  # zero-initialised final layer


def test_adaln_blocks_are_not_identity_at_init():
    model = tiny("adaln").eval()
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    assert (model.blocks[0](x, c) - x).abs().max() > 1e-3


def test_in_context_output_has_exactly_the_patch_tokens():
    model = randomize(tiny("in-context")).eval()
    x, t, y = inputs()
    tokens = model.x_embedder(x) + model.pos_embed
    seq, _ = InContextBlock.condition(tokens, model.t_embedder(t), model.y_embedder(y, False))
    assert seq.shape[1] == tokens.shape[1] + 2  # two conditioning tokens appended
    assert InContextBlock.uncondition(seq).shape == tokens.shape
    # The appended tokens are t and y, and they do influence the patch tokens.
    y2 = (y + 1) % 10
    assert (model(x, t, y) - model(x, t, y2)).abs().max() > 1e-4


@pytest.mark.parametrize("row", table4(), ids=lambda r: r["model"])
def test_parameter_counts_match_the_paper(row):
    with torch.device("meta"):  # no storage: XL/2 costs nothing to build here
        model = create_model(row["model"], block="adaln-zero")
    # The paper counts trainable parameters: the fixed sin-cos pos_embed is not one.
    params_m = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    assert round(params_m) == int(row["params_m"])


def test_parameter_count_closed_form():
    # Per adaLN-Zero block: qkv 3D^2+3D, proj D^2+D, MLP 8D^2+5D, modulation 6D^2+6D.
    D, p, C, depth = 384, 2, 4, 12
    block = 18 * D * D + 15 * D
    embed = (C * p * p * D + D) + (256 * D + D + D * D + D) + 1001 * D
    final = (D * p * p * 2 * C + p * p * 2 * C) + (2 * D * D + 2 * D)
    with torch.device("meta"):
        model = create_model("DiT-S/2")
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    assert trainable == depth * block + embed + final


def test_cfg_forward_combines_conditional_and_unconditional_halves():
    model = randomize(tiny("adaln-zero")).eval()
    x, t, y = inputs(n=2)
    x = torch.cat([x[:1], x[:1]])
    t = torch.cat([t[:1], t[:1]])
    y = torch.tensor([3, 10])  # 10 = the null class
    scale = 4.0
    out = model.forward_with_cfg(x, t, y, scale)
    raw = model(x, t, y)
    expected_eps = raw[1, :4] + scale * (raw[0, :4] - raw[1, :4])
    torch.testing.assert_close(out[0, :4], expected_eps)
    torch.testing.assert_close(out[1, :4], expected_eps)
    torch.testing.assert_close(out[:, 4:], raw[:, 4:])  # variance channels are not guided
    official = model.forward_with_cfg(x, t, y, scale, cfg_channels=3)
    torch.testing.assert_close(official[0, 3], raw[0, 3])  # the official code guides 3 channels


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_every_trainable_parameter_gets_a_gradient(block):
    model = randomize(tiny(block)).train()
    out = model(*inputs())
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name == "pos_embed"


def test_users_register_their_own_size_and_block():
    if "U" not in SIZES:
        register_size("U", depth=1, hidden_size=32, num_heads=2, patch_sizes=(2,))

        @register_block("adaln-zero-nomlp")
        class NoMlp(AdaLNZeroBlock):
            def forward(self, x, c):
                shift, scale, gate, *_ = self.adaLN_modulation(c).chunk(6, dim=1)
                from ablate.models.blocks import modulate
                return x + gate.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift, scale))

    assert "DiT-U/2" in MODELS
    model = create_model("DiT-U/2", block="adaln-zero-nomlp", input_size=8, num_classes=10)
    assert model(*inputs()).shape == (3, 8, 8, 8)


def test_unknown_block_suggests_the_closest_name():
    with pytest.raises(KeyError, match="did you mean 'adaln-zero'"):
        tiny("adaln-zer")


# ---------------------------------------------------------------------------------
# The successors' design choices: adaLN-single, norm, qk_norm, mlp, pos_embed, long_skips
# ---------------------------------------------------------------------------------
CHOICES = [dict(block="adaln-single"), dict(norm="rmsnorm"), dict(qk_norm=True), dict(mlp="swiglu"),
           dict(pos_embed="rope"), dict(long_skips=True)]
CHOICE_IDS = ["-".join(f"{k}={v}" for k, v in c.items()) for c in CHOICES]
ALL_ON = dict(norm="rmsnorm", qk_norm=True, mlp="swiglu", pos_embed="rope", long_skips=True)


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_default_model_has_exactly_the_official_keys():
    model = tiny("adaln-zero", depth=1)
    block = ["norm1", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight",
             "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]
    assert list(model.state_dict()) == [
        "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
        *(f"blocks.0.{k}" for k in block if k != "norm1"),
        "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias"]
    explicit = tiny("adaln-zero", depth=1, norm="layernorm", mlp="gelu", pos_embed="sincos", qk_norm=False,
                    long_skips=False)
    for (k, a), b in zip(model.state_dict().items(), explicit.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("block", ALL_BLOCKS + ["adaln-single"])
@pytest.mark.parametrize("choices", [{}, *CHOICES[1:], ALL_ON], ids=["dit", *CHOICE_IDS[1:], "all"])
def test_every_block_with_every_choice_runs_and_every_parameter_learns(block, choices):
    model = randomize(tiny(block, input_size=16, depth=3, **choices)).train()
    out = model(*inputs(size=16))
    assert out.shape == (3, 8, 16, 16)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name == "pos_embed"


def test_adaln_single_blocks_are_identity_and_share_one_modulation():
    model = tiny("adaln-single", depth=3).eval()
    x, cond = torch.randn(2, 16, 64), torch.randn(2, 64)
    c = model.blocks_shared(cond)  # (N, 6D): every block's modulation of t + y
    assert c.shape == (2, 6 * 64) and torch.count_nonzero(c) == 0
    for blk in model.blocks:
        assert torch.equal(blk(x, c), x)  # zero gates: each block starts as the identity
    assert torch.count_nonzero(model(*inputs())) == 0
    assert [n for n, _ in model.named_parameters() if "modulation" in n or "shared" in n or "shift_table" in n] == [
        "blocks.0.scale_shift_table", "blocks.1.scale_shift_table", "blocks.2.scale_shift_table",
        "blocks_shared.1.weight", "blocks_shared.1.bias", "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias"]
    # A block's modulation is the shared one of t + y plus its own vector.
    randomize(model)
    blk = model.blocks[1]
    cond = torch.randn(2, 64)
    shared = model.blocks_shared(cond)
    mine = torch.nn.Linear(64, 6 * 64)
    with torch.no_grad():
        mine.weight.copy_(model.blocks_shared[1].weight)
        mine.bias.copy_(model.blocks_shared[1].bias + blk.scale_shift_table)
    reference = AdaLNZeroBlock(64, 4)
    reference.load_state_dict({**{k: v for k, v in blk.state_dict().items() if k != "scale_shift_table"},
                               "adaLN_modulation.1.weight": mine.weight, "adaLN_modulation.1.bias": mine.bias})
    torch.testing.assert_close(blk(x, shared), reference(x, cond))


@pytest.mark.parametrize("block", ["adaln-zero", "cross-attn"])
def test_parameters_of_each_choice_against_the_closed_form(block):
    """Per block of width d and depth L: adaLN-single -(L-1)(6d^2+6d) + 6dL; rmsnorm the
    affine norms' biases less (d per norm); qk_norm 2 Dh per attention; swiglu
    3dh + 2h + d for 8d^2 + 5d; long skips L//2 (2d^2 + d); rope the fixed table is gone."""
    d, L, heads = 64, 5, 4
    base = trainable_params(tiny(block, depth=L))
    diff = {k: trainable_params(tiny(block, depth=L, **{k: v})) - base
            for k, v in (("norm", "rmsnorm"), ("qk_norm", True), ("mlp", "swiglu"), ("long_skips", True))}
    affine_norms = 0 if block == "adaln-zero" else 3 * L + 1  # cross-attn: 3 per block and the final one
    attentions = L if block == "adaln-zero" else 2 * L
    h = 8 * -(-int(2 * 4 * d / 3) // 8)  # 2/3 of 4d, rounded up to a multiple of 8: 176
    assert h == 176
    assert diff == {"norm": -d * affine_norms, "qk_norm": attentions * 2 * (d // heads),
                    "mlp": L * ((3 * d * h + 2 * h + d) - (8 * d * d + 5 * d)), "long_skips": (L // 2) * (2 * d * d + d)}
    assert abs(diff["mlp"]) <= L * (7 * (3 * d + 2) + d)  # SwiGLU's params are GELU's to within the rounding
    if block == "adaln-zero":
        assert trainable_params(tiny("adaln-single", depth=L)) - base == -(L - 1) * (6 * d * d + 6 * d) + L * 6 * d
    rope = tiny(block, depth=L, pos_embed="rope")
    assert rope.pos_embed is None and "pos_embed" not in rope.state_dict()
    assert trainable_params(rope) == base  # the rotation has no parameters; its tables are no state


def test_swiglu_hidden_is_two_thirds_rounded_up_to_eight():
    from ablate.models.layers import swiglu_hidden
    assert [swiglu_hidden(4 * d) for d in (64, 384, 768, 1152)] == [176, 1024, 2048, 3072]
    m = tiny(mlp="swiglu").blocks[0].mlp
    assert (m.w12.in_features, m.w12.out_features, m.w3.in_features) == (64, 2 * 176, 176)
    x = torch.randn(2, 5, 64)
    a, b = m.w12(x).chunk(2, dim=-1)
    torch.testing.assert_close(m(x), m.w3(torch.nn.functional.silu(a) * b))


def test_rmsnorm_replaces_every_layernorm_with_the_same_affine_choice():
    for block in ("adaln-zero", "in-context"):
        ln, rms = tiny(block), tiny(block, norm="rmsnorm")
        ln_norms = [(n, m.elementwise_affine) for n, m in ln.named_modules() if isinstance(m, torch.nn.LayerNorm)]
        rms_norms = [(n, m.elementwise_affine) for n, m in rms.named_modules() if isinstance(m, torch.nn.RMSNorm)]
        assert ln_norms == rms_norms and len(ln_norms) == 2 * 2 + 1
        assert not any(isinstance(m, torch.nn.LayerNorm) for m in rms.modules())
        assert all(m.eps == 1e-6 for m in rms.modules() if isinstance(m, torch.nn.RMSNorm))
    x = torch.randn(3, 64) * 5 + 2
    norm = tiny(norm="rmsnorm").blocks[0].norm1
    torch.testing.assert_close(norm(x), x / x.square().mean(-1, keepdim=True).add(1e-6).sqrt())


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    attn = randomize(tiny(qk_norm=True)).blocks[0].attn
    assert attn.q_norm.weight.shape == (16,) and attn.k_norm.weight.requires_grad  # over the head dim, learned
    x = torch.randn(2, 16, 64)
    before = attn(x)
    with torch.no_grad():
        attn.qkv.weight[:128] *= 7.0  # q and k rows
        attn.qkv.bias[:128] *= 7.0
    torch.testing.assert_close(attn(x), before, rtol=1e-4, atol=1e-5)
    plain = randomize(tiny()).blocks[0].attn
    out = plain(x)
    with torch.no_grad():
        plain.qkv.weight[:128] *= 7.0
        plain.qkv.bias[:128] *= 7.0
    assert (plain(x) - out).abs().max() > 1e-2


def test_rope_rotates_by_row_and_column_so_scores_depend_on_offsets():
    from ablate.models.layers import Rotary2D
    rot = Rotary2D(head_dim=16, grid=4)  # tokens t = 4 * row + col
    q, k = torch.randn(16), torch.randn(16)

    def score(tq, tk):
        x = torch.zeros(1, 1, 16, 16)
        x[0, 0, tq], y = q, torch.zeros(1, 1, 16, 16)
        y[0, 0, tk] = k
        return (rot(x)[0, 0, tq] * rot(y)[0, 0, tk]).sum()

    torch.testing.assert_close(score(0, 5), score(10, 15))  # (0,0)-(1,1) and (2,2)-(3,3): one offset
    assert (score(0, 5) - score(0, 6)).abs() > 1e-3
    # Rows move only the first half of the channels, columns only the second.
    x = torch.randn(1, 1, 16, 16)
    r = rot(x)
    torch.testing.assert_close(r[..., 4, 8:], x[..., 4, 8:])  # token 4 = row 1, col 0
    torch.testing.assert_close(r[..., 1, :8], x[..., 1, :8])  # token 1 = row 0, col 1
    torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1))  # a rotation
    # In-context's two extra tokens have no position: they are not rotated.
    x = torch.randn(1, 1, 18, 16)
    assert torch.equal(rot(x)[..., 16:, :], x[..., 16:, :])
    with pytest.raises(ValueError, match="multiple of 4"):
        Rotary2D(head_dim=18, grid=4)


def test_long_skips_join_block_i_to_block_depth_minus_one_minus_i():
    model = randomize(tiny(depth=5, long_skips=True)).eval()
    assert len(model.skips) == 2 and model.skips[0].in_features == 128 and model.skips[0].out_features == 64
    ins, outs = {}, {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: ins.__setitem__(i, a[0]))
        blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
    model(*inputs())
    for i, j in ((0, 4), (1, 3)):
        torch.testing.assert_close(ins[j], model.skips[i](torch.cat([outs[j - 1], outs[i]], dim=-1)))
    torch.testing.assert_close(ins[2], outs[1])  # the middle block of an odd depth is unpaired
    # Skips that pass the stream through and drop the skipped tensor give the model without skips.
    plain = tiny(depth=5)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("skips")})
    with torch.no_grad():
        for s in model.skips:
            s.weight.zero_(), s.bias.zero_()
            s.weight[:, :64].copy_(torch.eye(64))
    torch.testing.assert_close(model(*inputs()), plain.eval()(*inputs()))


def test_unknown_choices_suggest_the_closest_name():
    for key, bad, good in (("norm", "rmsnrom", "rmsnorm"), ("mlp", "swiglo", "swiglu"), ("pos_embed", "rop", "rope"),
                           ("block", "adaln-singel", "adaln-single")):
        with pytest.raises(KeyError, match=f"unknown {key} '{bad}' \\(did you mean '{good}'\\?\\)"):
            tiny(**({"block": bad} if key == "block" else {key: bad}))


def test_design_choices_lists_every_value_of_every_setting_defaults_first():
    from ablate.models import design_choices
    builtin = {"block": ["adaln-zero", "adaln", "cross-attn", "in-context", "adaln-single"],
               "norm": ["layernorm", "rmsnorm"], "mlp": ["gelu", "swiglu"], "pos_embed": ["sincos", "rope"],
               "qk_norm": ["false", "true"], "long_skips": ["false", "true"]}
    rows = design_choices()
    values = {}
    for setting, value, text in rows:
        values.setdefault(setting, []).append(value)
        assert text or value not in builtin[setting], (setting, value)  # blocks other tests register may lack one
    assert {k: v[:len(builtin[k])] for k, v in values.items()} == builtin
    assert all(v == builtin[k] for k, v in values.items() if k != "block")


def test_a_block_that_builds_its_own_layers_takes_dit_layers_only():
    from ablate.models import BLOCKS
    from ablate.models.blocks import modulate

    if "own-layers" not in BLOCKS:
        @register_block("own-layers")
        class OwnLayers(AdaLNZeroBlock):  # a block written before the layer choices existed
            def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
                super().__init__(hidden_size, num_heads, mlp_ratio)

            def forward(self, x, c):
                shift, scale, gate, *_ = self.adaLN_modulation(c).chunk(6, dim=1)
                return x + gate.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift, scale))

    assert tiny("own-layers", long_skips=True)(*inputs()).shape == (3, 8, 8, 8)  # skips are the model's, not the block's
    with pytest.raises(ValueError, match=r"^block 'own-layers' builds its own layers \(its constructor takes no "
                                         r"layers\), so it cannot take qk_norm: true$"):
        tiny("own-layers", qk_norm=True)
