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


# ---------------------------------------------------------------------------------
# The successors' design choices, each against its closed form
# ---------------------------------------------------------------------------------
def closed_form_choices(input_size, patch_size, in_channels, hidden_size, depth, num_heads, torch_counter=False,
                        block="adaln-zero", norm="layernorm", qk_norm=False, mlp="gelu", pos_embed="sincos",
                        long_skips=False, **_):
    """adaLN-Zero's count (above) changed term by term by each choice. Convention: linear maps
    count their multiply-adds; elementwise arithmetic is free (SwiGLU's gate, the rotary
    multiply, adaLN-single's added vector); fvcore counts LayerNorm 4 per element, RMSNorm 2
    (3 with a learned scale: QK-norm's); PyTorch's counter counts no normalisation."""
    T, D, L = (input_size // patch_size) ** 2, hidden_size, depth
    kw = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=D, depth=L)
    total = closed_form_adaln_zero(**kw, norms=not torch_counter)
    if block == "adaln-single":
        total -= (L - 1) * 6 * D * D  # one Linear(d, 6d) per image instead of one per block
    if norm == "rmsnorm" and not torch_counter:
        total -= (2 * L + 1) * T * D * (4 - 2)  # every LayerNorm of the blocks and the final layer
    if qk_norm and not torch_counter:
        total += L * 2 * T * D * 3  # q and k: T x heads x head dim elements each, with a scale
    if mlp == "swiglu":
        h = 8 * -(-int(2 * 4 * D / 3) // 8)
        total += L * T * (3 * D * h - 8 * D * D)
    if long_skips:
        total += (L // 2) * T * 2 * D * D  # Linear(2d, d) per token per pair
    return total  # pos_embed: rope rotates elementwise: free; the sin-cos table's add is free too


CHOICES = [dict(block="adaln-single"), dict(norm="rmsnorm"), dict(qk_norm=True), dict(mlp="swiglu"),
           dict(pos_embed="rope"), dict(long_skips=True),
           dict(block="adaln-single", norm="rmsnorm", qk_norm=True, mlp="swiglu", pos_embed="rope", long_skips=True)]


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_each_choice_counts_its_closed_form(choice):
    kw = {**TINY, "depth": 5, **choice}  # 5 blocks: 2 long-skip pairs, the middle block unpaired
    got = F.count_flops(kw, exact=True)
    assert got["gflops"] * 1e9 == pytest.approx(closed_form_choices(**kw), abs=0.5)
    assert got["gflops_torch"] * 1e9 == pytest.approx(closed_form_choices(**kw, torch_counter=True), abs=0.5)
    # The counts cut to 2 blocks and extended to the depth (1 long skip extended to depth // 2) are exact.
    for depth in (5, 6):
        assert F.count_flops({**kw, "depth": depth}) == pytest.approx(F.count_flops({**kw, "depth": depth}, exact=True),
                                                                       rel=1e-12)


def test_choices_at_dit_xl2_against_the_paper_scale_formulas():
    """At the paper's scale: adaLN-single saves (28 - 1) x 6 x 1152^2 multiply-adds (0.21 Gflops of 118.6),
    long skips cost 14 x 256 x 2 x 1152^2 (9.5 Gflops)."""
    base = F.count_flops(paper_kwargs("DiT-XL/2"))["gflops"]
    single = F.count_flops(paper_kwargs("DiT-XL/2", "adaln-single"))["gflops"]
    skips = F.count_flops({**paper_kwargs("DiT-XL/2"), "long_skips": True})["gflops"]
    assert (base - single) * 1e9 == pytest.approx(27 * 6 * 1152**2, abs=1)
    assert (skips - base) * 1e9 == pytest.approx(14 * 256 * 2 * 1152**2, abs=1)


def test_a_plugin_registers_the_count_of_its_own_op(monkeypatch):
    monkeypatch.setattr(F, "OP_HANDLES", dict(F.OP_HANDLES))  # registrations end with the test

    @torch.library.custom_op("ablate_test::outer_sum", mutates_args=())
    def outer_sum(x: torch.Tensor) -> torch.Tensor:  # (N, K) -> (N, K, K): K*K multiply-adds per row
        return x.unsqueeze(-1) * x.unsqueeze(-2)

    @outer_sum.register_fake
    def _(x):
        return x.new_empty(*x.shape, x.shape[-1])

    class Plugin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 4)

        def forward(self, x):
            return outer_sum(self.lin(x))

    x = torch.randn(3, 5)
    with pytest.raises(F.UncountedOp, match=r"ablate_test::outer_sum: register its count with .*register_op_flops"):
        F.fvcore_count(Plugin(), (x,))

    def outer_sum_flops(inputs, outputs):
        n, k = F.get_shape(inputs[0])
        return n * k * k

    F.register_op_flops("ablate_test::outer_sum", outer_sum_flops)
    total, by_module, by_op = F.fvcore_count(Plugin(), (x,))
    assert (total, by_op) == (3 * 5 * 4 + 3 * 4 * 4, {"linear": 60, "outer_sum": 48})
    with pytest.raises(ValueError, match="already counted"):
        F.register_op_flops("ablate_test::outer_sum", F.free)
    F.register_op_flops("ablate_test::outer_sum", F.free, overwrite=True)  # declared free
    assert F.fvcore_count(Plugin(), (x,))[0] == 60
    with pytest.raises(ValueError, match="already counted"):
        F.register_op_flops("aten::add", outer_sum_flops)
