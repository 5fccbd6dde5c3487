import pytest
import torch

from ablate.measure import flops as F
from ablate.models import create_model, dit_kwargs, naive_attention
from conftest import table4


def paper_kwargs(name, block="adaln-zero"):
    return dit_kwargs(name, block=block)  # the paper's setting: 32x32x4 latents, 1000 classes


TINY = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
            num_classes=10, learn_sigma=True)


def closed_form_adaln_zero(input_size, patch_size, in_channels, hidden_size, depth, norms: bool, **_):
    """Multiply-adds of one adaLN-Zero DiT forward for one image, term by term."""
    T, D, p, C = (input_size // patch_size) ** 2, hidden_size, patch_size, in_channels
    block = 12 * T * D * D + 2 * T * T * D + 6 * D * D  # qkv, proj, MLP; attention; modulation
    block += 2 * 4 * T * D if norms else 0  # fvcore: 4 flops per element of an affine-free LayerNorm
    embed = T * D * C * p * p + 256 * D + D * D  # patch conv, timestep MLP
    final = 2 * D * D + T * D * p * p * 2 * C + (4 * T * D if norms else 0)
    # fvcore's einsum handler charges the unpatchify permutation (official code uses einsum)
    # half a flop per output element; a pure permutation has no multiply-add.
    unpatchify = (2 * C * input_size**2) // 2 if norms else 0
    return depth * block + embed + final + unpatchify


def test_fvcore_count_matches_the_closed_form():
    got = F.count_flops({**TINY, "block": "adaln-zero"}, exact=True)
    assert got["gflops"] * 1e9 == pytest.approx(closed_form_adaln_zero(**TINY, norms=True), abs=0.5)
    # PyTorch's counter ignores normalisation: the same formula without it.
    assert got["gflops_torch"] * 1e9 == pytest.approx(closed_form_adaln_zero(**TINY, norms=False), abs=0.5)
    T, D = (16 // 2) ** 2, 64
    assert got["gflops_attention"] * 1e9 == pytest.approx(3 * 2 * T * T * D)


def test_attention_is_counted_and_an_uncounted_op_fails_loudly(monkeypatch):
    monkeypatch.setattr(F, "OP_HANDLES", {})  # as fvcore alone: no SDPA handler
    with pytest.raises(F.UncountedOp, match="scaled_dot_product_attention"):
        F.count_flops({**TINY, "block": "adaln-zero"})


def test_naive_attention_counts_the_same_as_the_fused_kernel():
    fused = F.count_flops({**TINY, "block": "cross-attn"}, exact=True)
    with naive_attention():
        naive = F.count_flops({**TINY, "block": "cross-attn"}, exact=True)
    assert naive["gflops"] == pytest.approx(fused["gflops"], rel=1e-12)


@pytest.mark.parametrize("block", ["adaln-zero", "adaln", "cross-attn", "in-context"])
def test_depth_extrapolation_equals_the_full_trace(block):
    kw = {**TINY, "depth": 5, "block": block}
    assert F.count_flops(kw) == pytest.approx(F.count_flops(kw, exact=True), rel=1e-12)


@pytest.mark.parametrize("row", table4(), ids=lambda r: r["model"])
def test_paper_gflops_within_half_a_percent(row):
    got = F.count_flops(paper_kwargs(row["model"]))
    paper = float(row["gflops"])
    assert got["gflops"] == pytest.approx(paper, rel=5e-3)
    assert got["gflops_torch"] == pytest.approx(got["gflops"], rel=2e-3)  # the two counters agree
    # Without the attention matmuls the count would be off by 2*T^2*D per block.
    T = (32 // paper_kwargs(row["model"])["patch_size"]) ** 2
    if T >= 256:
        assert got["gflops"] - got["gflops_attention"] < paper * 0.99


def test_paper_block_comparison_on_xl2():
    g = {b: F.count_flops(paper_kwargs("DiT-XL/2", b))["gflops"]
         for b in ["adaln-zero", "adaln", "cross-attn", "in-context"]}
    assert g["cross-attn"] / g["adaln-zero"] == pytest.approx(1.15, abs=0.03)  # paper: ~15% more
    assert g["in-context"] / g["adaln-zero"] == pytest.approx(1.0, abs=0.01)
    assert g["adaln"] / g["adaln-zero"] == pytest.approx(1.0, abs=0.01)


def test_meta_built_and_real_models_agree_with_parameter_count():
    kw = {**TINY, "block": "adaln"}
    with torch.device("meta"):
        meta = create_model(size="T", patch_size=2, input_size=16, num_classes=10, block="adaln")
    real = create_model(size="T", patch_size=2, input_size=16, num_classes=10, block="adaln")
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())
    assert F.count_flops(kw)["gflops"] > 0
