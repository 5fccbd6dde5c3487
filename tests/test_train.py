"""Training loop: loss falls on digits, exact resume, EMA, checkpoints, sample grids, settings."""
import dataclasses

import pytest
import torch
from PIL import Image

import ablate.train as train_mod
from ablate.data import build_dataset
from ablate.precision import native_bf16
from ablate.models import DiT
from ablate.settings import ConfigError, parse
from ablate.checkpoint import load_checkpoint
from ablate.sampling import SamplingOptions, sample_images
from ablate.step import update_ema
from ablate.train import TrainSettings, train
from conftest import tiny

# No sampling, no periodic checkpoints, fp32: the settings the tests change one at a time.
FAST = TrainSettings(steps=8, batch_size=16, lr=1e-3, precision="fp32", log_every=3,
                     checkpoint_every=1000, eval_samples=0)



@pytest.fixture(scope="module")
def digits():
    return build_dataset({"name": "digits", "image_size": 16})


@pytest.fixture(scope="module")
def small(digits):
    return digits.subset(100)  # 6 batches of 16 per epoch: 8 steps cross an epoch boundary


def digits_dit(seed: int = 0, live_output: bool = False, **choices) -> DiT:
    """A 2-block, 64-wide DiT on 16x16x1 images (16 tokens); ~0.2M parameters; ``choices``:
    the model's design choices (block, norm, mlp, ...)."""
    return tiny(seed=seed, input_size=16, patch_size=4, in_channels=1, num_heads=2, live_output=live_output,
                **choices)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def run(tmp_path, name, settings=FAST, seed=0, data=None, model=None, **kw) -> tuple[dict, DiT]:
    model = model if model is not None else digits_dit()
    out = train(model, data, settings, workdir=tmp_path / name, seed=seed, device="cpu", progress=False, **kw)
    return out, model


# ---------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------
def test_loss_falls_on_digits(tmp_path, digits):
    s = dataclasses.replace(FAST, steps=150, batch_size=32, log_every=25)
    out, _ = run(tmp_path, "run", s, data=digits)
    assert out["train_steps"] == 150 and len(out["log"]) == 6
    assert out["final_loss"] < 0.7 * out["loss_start"], (out["loss_start"], out["final_loss"])
    assert out["train_precision"] == "fp32"
    assert out["train_img_per_s"] > 0 and out["train_wall_s"] > 0
    # Throughput leaves out the first (warm-up) window: it equals the later windows' images over seconds.
    later = out["log"][1:]
    want = sum(e["images"] for e in later) / sum(e["images"] / e["img_per_s"] for e in later)
    assert out["train_img_per_s"] == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------------------------
# Reproducibility and resume
# ---------------------------------------------------------------------------------
def test_same_seed_same_weights_and_resume_matches_uninterrupted(tmp_path, small):
    full, m_full = run(tmp_path, "full", data=small)
    again, m_again = run(tmp_path, "again", data=small)
    assert max_diff(weights(m_full), weights(m_again)) == 0.0

    # 4 steps (mid-epoch), then a fresh start from the checkpoint for 4 more.
    half, _ = run(tmp_path, "resumed", dataclasses.replace(FAST, steps=4), data=small)
    assert half["train_steps"] == 4
    resumed, m_resumed = run(tmp_path, "resumed", data=small, model=digits_dit(seed=123))
    assert max_diff(weights(m_full), weights(m_resumed)) < 1e-6
    ck_full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    ck_res = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert max_diff(ck_full["ema"], ck_res["ema"]) < 1e-6
    # The first run logged its last step too (4); windows that do not touch it match.
    assert [e["step"] for e in resumed["log"]] == [3, 4, 6, 8]
    assert [e["step"] for e in full["log"]] == [3, 6, 8]
    assert resumed["log"][0]["loss"] == pytest.approx(full["log"][0]["loss"], abs=1e-6)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-6)
    # A finished run resumed again trains nothing and returns the same row.
    again_done, _ = run(tmp_path, "resumed", data=small)
    assert again_done["final_loss"] == resumed["final_loss"]


class Crash(Exception):
    pass


class CrashingData:
    """The dataset, but the process "dies" when batch ``after`` is asked for."""

    def __init__(self, data, after: int):
        self.data, self.after = data, after
        self.image_size = data.image_size

    def __len__(self):
        return len(self.data)

    def batches(self, *args, **kwargs):
        for i, batch in enumerate(self.data.batches(*args, **kwargs)):
            if i == self.after:
                raise Crash
            yield batch


def test_crash_mid_window_resumes_to_the_same_log(tmp_path, small):
    full, m_full = run(tmp_path, "full", data=small)
    s = dataclasses.replace(FAST, checkpoint_every=4)
    with pytest.raises(Crash):  # dies drawing batch 6: the checkpoint is at step 4, inside window 4..6
        run(tmp_path, "crashed", s, data=CrashingData(small, after=5))
    resumed, m_resumed = run(tmp_path, "crashed", s, data=small)
    assert max_diff(weights(m_full), weights(m_resumed)) < 1e-6
    assert [e["step"] for e in resumed["log"]] == [3, 6, 8]
    assert [e["loss"] for e in resumed["log"]] == pytest.approx([e["loss"] for e in full["log"]], abs=1e-6)
    assert [e["first_window"] for e in resumed["log"]] == [True, True, False]  # one per process


def test_resume_refuses_another_seed(tmp_path, small):
    run(tmp_path, "run", dataclasses.replace(FAST, steps=2), data=small)
    with pytest.raises(ValueError, match="seed=0.*seed=1"):
        run(tmp_path, "run", data=small, seed=1)


# ---------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------
def test_ema_update_formula():
    ema, p = [torch.tensor([4.0, -2.0]), torch.tensor([1.0])], [torch.tensor([8.0, 2.0]), torch.tensor([3.0])]
    update_ema(ema, p, 0.75)  # 0.75 * e + 0.25 * p, exact in binary
    assert ema[0].tolist() == [5.0, -1.0] and ema[1].tolist() == [1.5]
    g = torch.Generator().manual_seed(0)
    e0, q = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    e = e0.clone()
    update_ema([e], [q], 0.9999)
    # Same formula up to float32 rounding (values up to ~4: an ulp is 2.4e-7 to 4.8e-7).
    assert (e - (0.9999 * e0 + (1 - 0.9999) * q)).abs().max().item() < 1e-6
    assert (e - e0).abs().max().item() > 1e-4  # and it did move toward q


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_ema_in_training_tracks_the_right_parameters(tmp_path, small, decay):
    init = weights(digits_dit())
    _, model = run(tmp_path, "run", dataclasses.replace(FAST, steps=2, ema_decay=decay), data=small)
    ema = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["ema"]
    target = weights(model) if decay == 0.0 else init  # decay 0: a copy of the model; 1: frozen at init
    assert max_diff(ema, target) == 0.0
    assert max_diff(weights(model), init) > 1e-4  # and the model itself did move


# ---------------------------------------------------------------------------------
# Checkpoints and samples
# ---------------------------------------------------------------------------------
def test_checkpoints_written_atomically_with_step(tmp_path, small, monkeypatch):
    saved = []
    real = train_mod.save_checkpoint
    monkeypatch.setattr(train_mod, "save_checkpoint", lambda path, state: (saved.append(state["step"]), real(path, state)))
    _, model = run(tmp_path, "run", dataclasses.replace(FAST, steps=5, checkpoint_every=2, log_every=1), data=small)
    assert saved == [2, 4, 5]
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["checkpoint.pt"]  # no temporary file left behind
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 5 and [e["step"] for e in ck["log"]] == [1, 2, 3, 4, 5]
    assert max_diff(ck["model"], weights(model)) == 0.0
    assert {"optimizer", "ema", "rng", "data", "evals"} <= ck.keys()
    assert ck["data"]["in_epoch"] == 5  # 5 of the epoch's 6 batches drawn


def test_samples_png_grid_and_evals(tmp_path, small):
    seen = []

    def evaluate(ema, samples, step):
        seen.append((step, tuple(samples.shape), samples.min().item(), samples.max().item(), ema.training))
        return {"sample_std": samples.std()}

    s = dataclasses.replace(FAST, steps=2, eval_every=1, eval_samples=6, sample_steps=4)
    out, _ = run(tmp_path, "run", s, data=small, model=digits_dit(live_output=True), evaluate=evaluate)
    assert [x[:2] for x in seen] == [(1, (6, 1, 16, 16)), (2, (6, 1, 16, 16))]
    assert all(-1 <= lo <= hi <= 1 and not training for _, _, lo, hi, training in seen)
    assert [e["step"] for e in out["evals"]] == [1, 2]
    assert isinstance(out["evals"][0]["sample_std"], float) and out["evals"][0]["sample_std"] > 0
    for step in (1, 2):
        with Image.open(tmp_path / "run" / f"samples_step{step:07d}.png") as im:
            # 6 samples, 3 per row, 16 px enlarged 4x to 64 px, torchvision's 2 px padding around each.
            assert im.size == (3 * 66 + 2, 2 * 66 + 2)


def test_guided_sampling_at_scale_one_matches_unguided():
    model = digits_dit(live_output=True).eval()
    kw = dict(image_size=16, seed=3)
    plain, labels = sample_images(model, 12, SamplingOptions(sample_steps=5, sampler="ddim"), **kw)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    # The guided path (null-label half, forward_with_cfg) at a scale of ~1 gives the same DDIM samples.
    near_one, _ = sample_images(model, 12, SamplingOptions(5, "ddim", cfg_scale=1.0 + 1e-6), **kw)
    assert (near_one - plain).abs().max().item() < 1e-4
    guided, _ = sample_images(model, 12, SamplingOptions(5, "ddim", cfg_scale=4.0), **kw)
    assert (guided - plain).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, key", [
    ({"steps": -1}, "train.steps"),
    ({"batch_size": 0}, "train.batch_size"),
    ({"precision": "fp16"}, "train.precision"),
    ({"sampler": "euler"}, "train.sampler"),
    ({"ema_decay": 1.5}, "train.ema_decay"),
    ({"eval_every": 0}, "train.eval_every"),
    ({"stpes": 10}, "train.stpes"),
])
def test_bad_settings_name_the_key(bad, key):
    with pytest.raises(ConfigError) as e:
        parse(TrainSettings, bad, "train")
    assert e.value.key == key


def test_settings_parse_defaults_and_yaml_numbers():
    s = parse(TrainSettings, {"lr": "1e-4", "steps": 10, "grad_clip": 1}, "train")
    assert (s.lr, s.steps, s.grad_clip, s.ema_decay, s.weight_decay, s.precision) == (1e-4, 10, 1, 0.9999, 0.0, "auto")


def test_auto_precision_is_bf16_only_where_native(tmp_path, small):
    out, _ = run(tmp_path, "run", dataclasses.replace(FAST, steps=1, precision="auto"), data=small)
    # Emulated bf16 (AVX2 CPUs) trains ~20x slower than fp32, so auto must not pick it there.
    assert out["train_precision"] == ("bf16" if native_bf16("cpu") else "fp32")


def test_low_precision_residual_setting_reaches_the_step(tmp_path, small):
    """train.low_precision_residual: the blocks of the trained model see bf16 tokens under bf16
    autocast (the step itself is tested against fp32 in test_step)."""
    model = digits_dit()
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    s = dataclasses.replace(FAST, steps=2, precision="bf16", low_precision_residual=True)
    out, _ = run(tmp_path, "run", s, data=small, model=model)
    assert seen == [torch.bfloat16, torch.bfloat16] and model.low_precision_residual
    assert out["train_precision"] == "bf16" and out["final_loss"] > 0
    assert parse(TrainSettings, {}, "train").low_precision_residual is False


def test_an_evaluation_step_is_a_checkpoint(tmp_path, small):
    """A run shorter than checkpoint_every, killed after an evaluation, resumes from that
    evaluation's step instead of step 0, and ends with the weights of an uninterrupted run."""
    s = dataclasses.replace(FAST, steps=6, eval_every=3, eval_samples=2, sample_steps=2)
    full, m_full = run(tmp_path, "full", s, data=small)
    with pytest.raises(Crash):  # dies drawing batch 5, after the evaluation at step 3
        run(tmp_path, "crashed", s, data=CrashingData(small, after=4))
    assert load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["step"] == 3
    resumed, m_resumed = run(tmp_path, "crashed", s, data=small)
    assert max_diff(weights(m_full), weights(m_resumed)) < 1e-6
    assert [e["step"] for e in resumed["evals"]] == [3, 6]


def test_sampling_no_images_returns_an_empty_batch():
    from ablate.models import create_model

    model = create_model("DiT-T/8", input_size=16, num_classes=10)
    for cfg, uint8 in ((1.0, False), (1.5, False), (1.5, True)):  # guidance once raised on an empty batch
        x, y = sample_images(model, 0, SamplingOptions(sample_steps=2, cfg_scale=cfg), image_size=16, uint8=uint8)
        assert x.shape == (0, 4, 16, 16) and x.dtype == (torch.uint8 if uint8 else torch.float32) and len(y) == 0


# ---------------------------------------------------------------------------------
# Checkpoints that cannot be resumed from, full disks, what a killed writer leaves
# ---------------------------------------------------------------------------------
def _valid_checkpoint(tmp_path, small) -> dict:
    run(tmp_path, "donor", dataclasses.replace(FAST, steps=3), data=small)
    return load_checkpoint(tmp_path / "donor" / "checkpoint.pt")


@pytest.mark.parametrize("case", ["no keys", "step a string", "a list", "log a dict", "rng without torch",
                                  "another model's weights", "step negative"])
def test_a_checkpoint_that_loads_but_is_not_one_is_set_aside_and_training_starts_over(tmp_path, small, capfd,
                                                                                       case):
    reference, m_ref = run(tmp_path, "fresh", data=small)
    ck = _valid_checkpoint(tmp_path, small)
    bad = {"no keys": {"hello": 1}, "step a string": {**ck, "step": "3"}, "a list": [ck],
           "log a dict": {**ck, "log": {}}, "rng without torch": {**ck, "rng": {}},
           "another model's weights": {**ck, "model": {"w": torch.zeros(2)}},
           "step negative": {**ck, "step": -1}}[case]
    work = tmp_path / "run"
    work.mkdir()
    torch.save(bad, work / "checkpoint.pt")
    capfd.readouterr()
    for _ in range(2):  # and the next run resumes from the new checkpoint
        out, model = run(tmp_path, "run", data=small)
        assert out["train_steps"] == FAST.steps and max_diff(weights(m_ref), weights(model)) < 1e-6
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and "not a checkpoint to resume from (" in err[0] and "; kept as checkpoint.pt.corrupt, training starts over" in err[0], err
    assert (work / "checkpoint.pt.corrupt").is_file() and not (work / "checkpoint.pt.corrupt1").exists()
    assert [e["step"] for e in out["log"]] == [e["step"] for e in reference["log"]]


def test_a_full_disk_while_saving_a_checkpoint_says_no_space_left(tmp_path, small, monkeypatch):
    """torch.save reports a failed write as an opaque inline_container.cc error: named here."""
    import shutil
    from collections import namedtuple

    import ablate.checkpoint as ck_mod
    from ablate.settings import one_line

    def full(obj, f, *a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4416 vs 4310")

    monkeypatch.setattr(ck_mod.torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(100, 100, 0))
    with pytest.raises(OSError) as e:
        run(tmp_path, "run", dataclasses.replace(FAST, steps=2), data=small)
    assert "No space left on device" in one_line(e.value) and "checkpoint.pt" in one_line(e.value)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no temporary file left
    # An error that is not the disk's (space is left) stays torch's own.
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(2**40, 0, 2**40))
    with pytest.raises(RuntimeError, match="inline_container"):
        run(tmp_path, "run", dataclasses.replace(FAST, steps=2), data=small)


def test_a_run_removes_the_temporary_files_a_killed_writer_left_and_nothing_else(tmp_path, small):
    from ablate.files import own, remove_stale_temps

    own(tmp_path)  # as the store owns its results folder: no link below it is followed
    work = tmp_path / "run"
    work.mkdir()
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"keep")
    stale = [".checkpoint.pt.0123abcd.tmp", ".ema_step0000003.pt.deadbeef.tmp", ".samples_step0000003.png.00ff00ff.tmp",
             ".other.pt.0123abcd.tmp"]
    kept = [".checkpoint.pt.xyz.tmp", "notes.tmp", ".checkpoint.pt.0123abcd.tmp.keep"]
    for name in stale + kept:
        (work / name).write_bytes(b"x" * 10)
    (work / ".checkpoint.pt.aaaaaaaa.tmp").symlink_to(outside)  # a link: not ours to remove, never followed
    (work / ".checkpoint.pt.bbbbbbbb.tmp").mkdir()
    out, _ = run(tmp_path, "run", dataclasses.replace(FAST, steps=2), data=small)
    left = sorted(p.name for p in work.iterdir())
    assert left == sorted(kept + [".checkpoint.pt.aaaaaaaa.tmp", ".checkpoint.pt.bbbbbbbb.tmp", "checkpoint.pt"])
    assert outside.read_bytes() == b"keep" and out["train_steps"] == 2
    # A work folder that is a link is not cleaned through it.
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / stale[0]).write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert remove_stale_temps(tmp_path / "link") == [] and (tmp_path / "real" / stale[0]).exists()


# ---------------------------------------------------------------------------------
# The model's design choices train in the same loop
# ---------------------------------------------------------------------------------
CHOICES = [dict(block="adaln-single"), dict(norm="rmsnorm"), dict(qk_norm=True), dict(mlp="swiglu"),
           dict(pos_embed="rope"), dict(long_skips=True, depth=3),
           dict(block="in-context", norm="rmsnorm", qk_norm=True, mlp="swiglu", pos_embed="rope", long_skips=True)]


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_each_design_choice_learns_and_resumes_exactly(tmp_path, small, choice):
    s = dataclasses.replace(FAST, steps=30, log_every=10)
    out, _ = run(tmp_path, "learn", s, data=small, model=digits_dit(**choice))
    assert out["final_loss"] < 0.7 * out["loss_start"], (out["loss_start"], out["final_loss"])
    # 4 steps, then a fresh process's model (another seed) resumed from the checkpoint for 4 more.
    full, m_full = run(tmp_path, "full", data=small, model=digits_dit(**choice))
    run(tmp_path, "resumed", dataclasses.replace(FAST, steps=4), data=small, model=digits_dit(**choice))
    resumed, m_resumed = run(tmp_path, "resumed", data=small, model=digits_dit(seed=123, **choice))
    assert max_diff(weights(m_full), weights(m_resumed)) < 1e-6
    ck_full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    ck_res = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert max_diff(ck_full["ema"], ck_res["ema"]) < 1e-6
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-6)


@pytest.mark.parametrize("block", ["adaln-single", "in-context"])
def test_the_design_choices_sample_evaluate_and_snapshot_like_dit(tmp_path, small, block):
    every = dict(block=block, norm="rmsnorm", qk_norm=True, mlp="swiglu", pos_embed="rope", long_skips=True)
    seen = []

    def evaluate(ema, samples, step):
        seen.append((step, tuple(samples.shape), bool(samples.isfinite().all())))
        return {"sample_std": samples.std()}

    s = dataclasses.replace(FAST, steps=2, eval_every=1, eval_samples=4, sample_steps=3, cfg_scale=2.0)
    out, model = run(tmp_path, "run", s, data=small, model=digits_dit(live_output=True, **every), evaluate=evaluate)
    assert seen == [(1, (4, 1, 16, 16), True), (2, (4, 1, 16, 16), True)] and out["evals"][1]["sample_std"] > 0
    snapshot = torch.load(tmp_path / "run" / "ema_step0000001.pt", weights_only=True)  # the last step: the checkpoint
    ema = digits_dit(seed=5, **every)
    ema.load_state_dict(snapshot if "ema" not in snapshot else snapshot["ema"], strict=True)
    # Sampling in bf16 (its rotary tables cast with the weights) stays near fp32's.
    opts = SamplingOptions(sample_steps=3, sampler="ddim")
    fp32, _ = sample_images(ema.eval(), 4, opts, image_size=16, seed=1)
    bf16, _ = sample_images(ema, 4, opts, image_size=16, seed=1, precision="bf16-true")
    assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().max().item() < 0.1


@pytest.mark.parametrize("scope", ["step", "blocks"])
def test_the_compiled_step_of_every_design_choice_matches_eager(monkeypatch, scope):
    """All the layer choices at once, with adaLN-single (its shared modulation outside the
    blocks) and long skips (between them): compiled whole or block by block, as eager."""
    import copy

    import ablate.step as step_mod
    from ablate.diffusion import create_diffusion
    from ablate.step import StepOptions, TrainStep

    monkeypatch.setattr(step_mod, "BACKEND", "aot_eager")  # dynamo's graphs without inductor's C++ build
    every = dict(block="adaln-single", norm="rmsnorm", qk_norm=True, mlp="swiglu", pos_embed="rope", long_skips=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)

    def steps(**kw):
        model = tiny(hidden_size=32, depth=3, num_heads=2, **every)
        step = TrainStep(model, create_diffusion(None, learn_sigma=True), StepOptions(precision="fp32", **kw),
                         lr=1e-3, ema=copy.deepcopy(model), ema_decay=0.9)
        torch.manual_seed(5)
        return [step.step(x, y).item() for _ in range(3)], model

    losses, model = steps(compile=False)
    losses2, model2 = steps(compile=True, compile_scope=scope)
    assert losses2 == pytest.approx(losses, rel=1e-5)
    assert max_diff(weights(model), weights(model2)) < 1e-5
    assert max_diff(weights(model), weights(tiny(hidden_size=32, depth=3, num_heads=2, **every))) > 1e-3
