"""The benchmark scripts cannot rot: the official-behaviour copy computes the same loss and
samples as ablate's diffusion, and train_throughput.py runs end to end on a tiny config."""
import sys

import torch

from ablate.diffusion import create_diffusion
from conftest import REPO, tiny

sys.path.insert(0, str(REPO / "benchmarks"))
import official  # noqa: E402
import train_throughput  # noqa: E402


def test_official_copy_computes_ablates_loss():
    model = tiny(live_output=True)
    x, y = torch.randn(6, 4, 8, 8), torch.arange(6)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    torch.manual_seed(0)
    ours = create_diffusion(None, learn_sigma=True).training_losses(model, x, t, {"y": y})
    torch.manual_seed(0)
    theirs = official.OfficialDiffusion().training_losses(model, x, t, {"y": y})
    for k in ("mse", "vb", "loss"):
        torch.testing.assert_close(theirs[k], ours[k], rtol=1e-5, atol=1e-6)


def test_official_sampling_loop_matches_ablates_sampler():
    model = tiny(live_output=True).eval()
    d = create_diffusion("5", learn_sigma=True)
    z = torch.randn(4, 4, 8, 8)
    y = torch.tensor([1, 2, 10, 10])  # conditional half, null half
    torch.manual_seed(1)
    fn = lambda x, t, y: model.forward_with_cfg(x, t, y, 1.5, cfg_channels=3)  # noqa: E731
    theirs = official.OfficialDiffusion(5).p_sample_loop(fn, z, {"y": y})
    torch.manual_seed(1)  # both draw each step's noise from the global RNG
    ours = d.sample(fn, z.shape, {"y": y}, noise=z)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_train_throughput_runs_on_a_tiny_config(tmp_path, capsys):
    out = tmp_path / "t.md"
    train_throughput.main(["--model", "DiT-T/8", "--batch", "2", "--steps", "1", "--warmup", "1", "--device", "cpu",
                           "--input-size", "16", "--num-classes", "10", "--rows", "official-tf32,plain",
                           "--out", str(out)])
    text = out.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| official-tf32") or line.startswith("| plain")]
    assert len(lines) == 2 and "DiT-T/8, training step, batch 2" in text
    img_per_s = float(lines[1].split("|")[4])
    assert img_per_s > 0
