"""Run by the distributed tests under ``torchrun --nproc_per_node N``: train a tiny DiT on
digits (``train WORKDIR STEPS``) or draw samples (``sample OUT``) on every rank, the way
the ``train`` and ``fid`` measurements do. Rank 0 saves what the test compares with one
process; the other ranks write nothing."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest, for the tiny DiT

from ablate import collective  # noqa: E402
from ablate.data import build_dataset  # noqa: E402
from ablate.sampling import SamplingOptions, sample_images  # noqa: E402
from ablate.train import TrainSettings, train  # noqa: E402
from conftest import tiny  # noqa: E402

SETTINGS = dict(batch_size=16, lr=1e-3, precision="fp32", log_every=2, checkpoint_every=3, eval_samples=6,
                eval_every=3, sample_steps=3, sampler="ddim", ema_decay=0.9)
SAMPLING = SamplingOptions(sample_steps=3, sampler="ddim")


def model():
    return tiny(input_size=16, patch_size=4, in_channels=1, num_heads=2, live_output=True)


def main(mode: str, *args: str) -> None:
    torch.set_num_threads(1)
    w = collective.init("cpu")
    try:
        if mode == "train":
            workdir, steps = Path(args[0]), int(args[1])
            compiled = len(args) > 2 and args[2] == "compiled"
            if compiled:  # the CUDA default (a compiled step around DDP), traced by aot_eager on the CPU
                import ablate.step

                ablate.step.BACKEND = "aot_eager"
            data = build_dataset({"name": "digits", "image_size": 16}).subset(100)
            out = train(model(), data, TrainSettings(steps=steps, compile=compiled, **SETTINGS), workdir=workdir,
                        seed=0, device="cpu", progress=False)
            if w.leader:
                torch.save({"ranks": out["train_ranks"], "log": out["log"]}, workdir / "result.pt")
        elif mode == "sample":
            kw = dict(image_size=16, seed=5, batch_size=4, world=w)
            x, y = sample_images(model(), 21, SAMPLING, **kw)
            # what the fid measurement gathers; 17 images are 5 batches, a last round of 2 over 3 ranks
            q, _ = sample_images(model(), 17, SAMPLING, uint8=True, **kw)
            assert (y == torch.arange(21) % 10).all()
            assert len(x) == (21 if w.leader else 0) and len(q) == (17 if w.leader else 0)  # only rank 0 keeps them
            if w.leader:
                torch.save({"x": x, "uint8": q}, args[0])
    finally:
        collective.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
