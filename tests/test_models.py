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
