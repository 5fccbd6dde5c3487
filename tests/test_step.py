"""The fast training step (ablate.step.TrainStep) against the plain eager step: same losses
and weights (fp32 exactly enough, bf16 within its tolerance), compiled against eager,
activation checkpointing against none, and what ``compile: auto`` resolves to.

Compiled graphs run on the "aot_eager" backend here: the same capture by dynamo and the
same joint forward/backward graph from AOTAutograd as Inductor gets, run by eager kernels,
since Inductor's C++ code generation takes minutes on a small shared CPU. Inductor's own
kernels are checked on a GPU by benchmarks/gpu_check.sh."""
import copy
from pathlib import Path

import pytest
import torch

import ablate.step as step_mod
from ablate.diffusion import create_diffusion
from ablate.precision import precision_context
from ablate.settings import ConfigError, parse
from ablate.step import TrainStep, make_optimizer, resolve_compile, train_step, trainable, update_ema
from ablate.sampling import SamplingOptions, sample_images
from ablate.step import StepOptions
from ablate.train import TrainSettings
from conftest import tiny as tiny_dit

STEPS, LR = 3, 1e-3


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(step_mod, "BACKEND", "aot_eager")


def tiny(**kw):
    # One block: dynamo traces every block, and tracing is most of a compile's seconds here.
    return tiny_dit(hidden_size=32, depth=1, num_heads=2, **kw)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def plain(precision: str = "fp32"):
    """The eager reference: ``train_step`` (the model draws its own dropped labels) and the EMA."""
    model = tiny()
    ema = copy.deepcopy(model)
    diffusion = create_diffusion(None, learn_sigma=True)
    params = trainable(model)
    opt = make_optimizer(params, LR)
    ema_params = [e for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    x, y = batch()
    torch.manual_seed(5)
    losses = []
    for _ in range(STEPS):
        losses.append(train_step(model, diffusion, opt, params, x, y, precision=precision).item())
        update_ema(ema_params, params, 0.9)
    return losses, model, ema


def fast(precision: str = "fp32", **kw):
    model = tiny()
    ema = copy.deepcopy(model)
    step = TrainStep(model, create_diffusion(None, learn_sigma=True), StepOptions(precision=precision, **{"compile": False, **kw}),
                     lr=LR, ema=ema, ema_decay=0.9)
    x, y = batch()
    torch.manual_seed(5)
    return [step.step(x, y).item() for _ in range(STEPS)], model, ema, step


def max_diff(a, b) -> float:
    return max((p.float() - q.float()).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def assert_trains_like_fp32_within_bf16(losses, model, losses2, model2) -> None:
    """A bf16 run (losses2, model2) against the plain fp32 one from the same start."""
    assert losses2 == pytest.approx(losses, rel=2e-2)
    start = tiny()
    # Adam's first steps are about lr * sign(grad): compare the directions of the updates.
    d1 = torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), start.parameters())])
    d2 = torch.cat([(p - q).flatten() for p, q in zip(model2.parameters(), start.parameters())])
    assert torch.nn.functional.cosine_similarity(d1, d2, dim=0) > 0.95
    assert max_diff(model, model2) <= 2 * STEPS * LR


def test_eager_step_equals_the_plain_step_bit_for_bit():
    # The labels are dropped outside the model, from the same RNG draw, in the same order.
    losses, model, ema = plain()
    losses2, model2, ema2, _ = fast()
    assert losses == losses2
    assert max_diff(model, model2) == 0 and max_diff(ema, ema2) == 0


def test_compiled_step_matches_eager_in_fp32(aot_eager):
    losses, model, ema = plain()
    losses2, model2, ema2, step = fast(compile=True)
    assert losses2 == pytest.approx(losses, rel=1e-5)
    assert max_diff(model, model2) < 1e-5 and max_diff(ema, ema2) < 1e-5
    assert step.compile_s > 0
    assert max_diff(model, tiny()) > STEPS * LR / 2  # the steps moved the weights: the check above bites


def test_regionally_compiled_bf16_step_matches_plain_fp32_within_bf16_tolerance(aot_eager):
    losses, model, _ = plain("fp32")
    losses2, model2, _, _ = fast("bf16", compile=True, compile_scope="blocks")
    assert list(model2.state_dict()) == list(model.state_dict())  # compiled in place: same keys
    assert all(b._ablate_compiled for b in model2.blocks)
    assert_trains_like_fp32_within_bf16(losses, model, losses2, model2)


def test_activation_checkpointing_gives_the_same_gradients():
    x, y = batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny()
        model.activation_checkpointing = checkpointing
        diffusion = create_diffusion(None, learn_sigma=True)
        torch.manual_seed(3)
        t = torch.randint(0, 1000, (len(x),))
        diffusion.training_losses(model, x, t, {"y": y})["loss"].mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainable(model)]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_compile_auto_is_on_for_cuda_and_off_for_cpus():
    assert resolve_compile(torch.device("cuda"), "auto") is True
    assert resolve_compile(torch.device("cpu"), "auto") is False
    assert resolve_compile(torch.device("cpu"), True) is True
    assert resolve_compile(torch.device("cuda"), False) is False
    assert parse(TrainSettings, {}, "train").compile == "auto"
    with pytest.raises(ConfigError, match="train.compile: 'yes' is not one of auto, true, false"):
        parse(TrainSettings, {"compile": "yes"}, "train")
    with pytest.raises(ConfigError, match="train.compile_mode: 'fast' is not one of"):
        parse(TrainSettings, {"compile_mode": "fast"}, "train")
    with pytest.raises(ConfigError, match="train.compile_scope: 'model' is not one of step, blocks"):
        parse(TrainSettings, {"compile_scope": "model"}, "train")


def test_compile_cache_folder_is_the_users(tmp_path, monkeypatch):
    monkeypatch.setenv(step_mod.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert step_mod.compile_cache() == tmp_path / "cache"
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()


def test_every_cache_lives_under_the_one_cache_root(tmp_path, monkeypatch):
    """$ABLATE_CACHE moves the compile cache, the datasets, the extractors, the reference
    statistics and the pretrained checkpoints alike."""
    import os

    from ablate import data
    from ablate.models import pretrained
    from ablate.quality import metrics

    monkeypatch.setenv("ABLATE_CACHE", str(tmp_path / "root"))
    for name in (step_mod.CACHE_ENV, "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert step_mod.compile_cache() == tmp_path / "root" / "compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "root" / "compile")
    assert data._data_root(None) == tmp_path / "root" / "data"
    assert pretrained.cache_dir() == tmp_path / "root" / "checkpoints"
    assert metrics.fidelity_cache() == str(tmp_path / "root" / "fidelity")
    monkeypatch.delenv("ABLATE_CACHE")
    assert data._data_root(None) == Path("~/.cache/ablate/data").expanduser()


def test_compiled_sampling_pads_to_one_shape_and_matches_eager(aot_eager):
    model = tiny(live_output=True)
    kw = dict(image_size=8, seed=0, batch_size=4)
    four = SamplingOptions(sample_steps=4)
    # 8 images = two full batches: padding does not change the noise, so the samples agree.
    a, la = sample_images(model, 8, four, **kw)
    b, lb = sample_images(model, 8, four, compile=True, **kw)
    assert torch.equal(la, lb) and torch.allclose(a, b, atol=1e-5)
    c, lc = sample_images(model, 6, four, compile=True, **kw)  # a padded last batch: 6 images come back
    assert c.shape == (6, 4, 8, 8) and torch.equal(lc, torch.arange(6)) and torch.allclose(c[:4], a[:4], atol=1e-5)


def test_the_compiled_step_and_sampler_are_each_one_graph():
    """What ``compile`` compiles is traced whole: forward + hybrid loss of the training step,
    and the guided denoiser of sampling, are one graph each with no graph break (a break,
    say a ``.item()`` in the loss, would split the fusions silently)."""
    model = tiny_dit(hidden_size=32, depth=2, num_heads=2)
    step = TrainStep(model, create_diffusion(None, learn_sigma=True), StepOptions(precision="bf16", compile=False),
                     lr=LR)
    x, y = batch()
    t, noise, drop = step.draw(x)
    with precision_context(x.device, "bf16"):
        train = torch._dynamo.explain(step.loss)(x, t, noise, y, drop)
        model.eval()
        guided = torch._dynamo.explain(model.forward_with_cfg)(
            torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, model.num_classes)]),
            cfg_scale=1.5)
    assert (train.graph_count, train.graph_break_count) == (1, 0), train.break_reasons
    assert (guided.graph_count, guided.graph_break_count) == (1, 0), guided.break_reasons
    assert train.op_count > guided.op_count  # the loss and its terms are in the graph too


def live(model):
    """Every zero-initialised weight (adaLN-Zero's gates, the output layer) drawn small, so that
    each block changes its input and the network's rounding reaches the output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.02)
    return model.eval()


def test_bf16_true_sampling_rounds_like_autocast_and_keeps_the_fp32_weights(aot_eager):
    """``bf16-true``: the network cast to bf16 (weights and activations) instead of autocast. One
    denoiser call is off fp32 by bf16's rounding, of the order of autocast's error;
    the sampler's own arithmetic stays fp32; the caller's weights are neither cast nor changed;
    compiled, it samples what it samples eagerly."""
    from ablate.precision import TRUE_BF16
    from ablate.sampling import _in_bf16, bf16_copy

    model = live(tiny_dit(hidden_size=64, depth=2, num_heads=4))
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(8, 4, 8, 8, generator=g), torch.tensor([0, 1, 10, 100, 500, 900, 998, 999]), torch.arange(8)
    with torch.no_grad():
        ref = model(x, t, y)
        true = _in_bf16(bf16_copy(model))(x, t, y=y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x, t, y).float()
    err = lambda o: ((o - ref).norm() / ref.norm()).item()  # noqa: E731
    assert true.dtype == torch.float32
    # bf16 rounding: more than none, and of autocast's order (here 6.2e-3 against 3.9e-3)
    assert 1e-4 < err(true) < min(2e-2, 3 * err(auto)), (err(true), err(auto))
    kw = dict(image_size=8, batch_size=4, seed=0)
    guided = SamplingOptions(sample_steps=4, cfg_scale=1.5)
    a, _ = sample_images(model, 8, guided, precision="fp32", **kw)
    b, _ = sample_images(model, 8, guided, precision=TRUE_BF16, **kw)
    c, _ = sample_images(model, 8, guided, precision="bf16", **kw)
    assert b.dtype == torch.float32 and 0 < (a - b).abs().mean() < 3 * (a - c).abs().mean()
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    d, _ = sample_images(model, 8, guided, precision=TRUE_BF16, compile=True, **kw)  # two full batches: no padding
    assert torch.allclose(b, d, atol=1e-6)
    # Blocks compiled in place would be copied as closures over the fp32 blocks: refused, not a dtype crash.
    step_mod.compile_blocks(model)
    with pytest.raises(ValueError, match="blocks are not compiled in place"):
        sample_images(model, 8, guided, precision=TRUE_BF16, **kw)


def test_coordinate_descent_mode_compiles_with_options_this_inductor_has(monkeypatch):
    """ablate's own compile mode is a set of Inductor options (torch.compile takes a mode or
    options): each option must exist in the installed Inductor, where a renamed one would raise
    only on a GPU, at the first call."""
    import torch._inductor.config as inductor_config

    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)
    step_mod.compiled(lambda v: v, "coordinate-descent")
    assert seen["options"] == {"coordinate_descent_tuning": True} and "mode" not in seen
    assert all(hasattr(inductor_config, k) for k in step_mod.MODE_OPTIONS["coordinate-descent"])
    step_mod.compiled(lambda v: v, "reduce-overhead")
    assert seen["mode"] == "reduce-overhead"
    assert parse(TrainSettings, {"compile_mode": "coordinate-descent"}, "train").compile_mode == "coordinate-descent"



def test_bf16_residual_stream_is_bf16_and_trains_like_fp32_within_bf16_tolerance(aot_eager):
    """``low_precision_residual``: under bf16 autocast the tokens between blocks are bf16 (a hook
    on each block sees its input), without autocast or with the flag off they stay fp32; the
    compiled step's losses and updates agree with the plain fp32 step to bf16's tolerance."""
    model = tiny_dit(hidden_size=32, depth=2, num_heads=2, block="in-context")  # its cond tokens are fp32
    seen = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x, y = batch()
    t = torch.arange(len(x))
    for flag, precision, dtype in ((True, "bf16", torch.bfloat16), (False, "bf16", torch.float32),
                                   (True, "fp32", torch.float32)):
        seen.clear()
        model.low_precision_residual = flag
        with precision_context(x.device, precision):
            model(x, t, y)
        assert seen == [dtype, dtype], (flag, precision, seen)
    losses, model, _ = plain("fp32")
    losses2, model2, _, _ = fast("bf16", compile=True, low_precision_residual=True)
    assert model2.low_precision_residual
    assert_trains_like_fp32_within_bf16(losses, model, losses2, model2)
