"""The ``fid`` measurement: FID, KID and precision/recall of a trained cell's EMA samples.

It never trains: it reads the EMA weights that ``train`` left in its work folder (the
checkpoint, and an EMA snapshot at every ``eval_every`` step when ``train.ema_snapshots``
is on), samples from each with the same seeded noise (so two cells are compared on the same
noise, and the points over steps of one cell too), and scores the samples against the
cell's dataset with ``ablate.quality``. Its key hashes the ``fid:`` section and the train
key, so changing only ``fid:`` re-measures without retraining, and a resumed training run
keeps the snapshots of its earlier steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import MODEL_KEYS, register_measure
from ..precision import PRECISIONS, TRUE_BF16
from ..sampling import SamplingOptions
from ..settings import ConfigError, added_later, choice, positive

# "train": as the cell trained (its resolved precision); auto has no meaning of its own here.
SAMPLE_PRECISIONS = ("train", *(p for p in PRECISIONS if p != "auto"), TRUE_BF16)


@dataclass
class FidSettings(SamplingOptions):
    """The ``fid:`` section of a grid: how the samples are drawn (``SamplingOptions``: steps,
    sampler, guidance) and scored."""

    # auto: the domain extractor where the dataset has one (digits, mnist), else inception.
    extractor: str = "auto"
    samples: int = 5000  # generated images per evaluated step (FID-5K); the paper reports FID-50K
    batch_size: int = 256  # for sampling and for features
    seed: int = 0  # the sampling noise; the same for every cell and step
    over_steps: bool = True  # also every EMA snapshot of the training run, not only its last step
    # auto: compile the denoiser on CUDA for 2000 samples or more, where the compile pays
    # (it pads the last batch, so its noise differs from the eager path's: compare like with like).
    compile: bool | str = "auto"
    # The denoiser's numeric precision: train (the precision the cell trained in: bf16 autocast
    # where native), fp32, tf32, bf16 (autocast), bf16-true (a bf16 copy of the network itself).
    # Written ``precision`` at first (a measurement key still names it so: RENAMED).
    numerics: str = added_later("train")

    def check(self) -> None:
        from ..quality.extractors import EXTRACTORS

        if self.samples < 2:
            raise ConfigError("samples", f"{self.samples!r} must be >= 2 (FID needs a covariance)")
        positive(self, "batch_size", "cfg_scale")
        SamplingOptions.check(self)
        positive(self, "seed", allow_zero=True)
        choice(self, "extractor", ("auto", *EXTRACTORS.names()))
        if isinstance(self.compile, str) and self.compile != "auto":
            raise ConfigError("compile", f"{self.compile!r} is not auto, true or false")
        choice(self, "numerics", SAMPLE_PRECISIONS)


# Old name -> new name of a field of the section: the old spelling is still read (with a
# note), and results are keyed under the old name, as they were stored.
RENAMED = {"precision": "numerics"}


@register_measure("fid", settings=FidSettings, uses=MODEL_KEYS + ("seed",), needs=("train",),
                  columns=("fid", "kid_mean", "precision", "recall", "fid_extractor"), text_columns=("fid_extractor",), distributed=True,
                  renamed=RENAMED)
def fid(cell, progress: bool = True) -> dict:
    """FID, KID, precision/recall of EMA samples (every snapshot: quality over steps)."""
    import torch
    from tqdm.auto import tqdm

    from ..collective import leader_only, world
    from ..quality.extractors import get_extractor
    from ..quality.metrics import quality
    from ..quality.sources import from_dataset, from_samples
    from ..checkpoint import ema_states, load_ema, trained_precision
    from ..sampling import sample_images
    from ..watch import watching

    s = cell.settings("fid")
    train = cell.needed["train"]
    states = ema_states(train.workdir)
    last = train.metrics["train_steps"]
    states = {step: path for step, path in states.items() if step <= last}
    if last not in states:
        # The train result is stored ok, so a re-run reuses it: only removing it trains again.
        raise FileNotFoundError(f"{train.workdir}: no checkpoint of step {last}; the fid measurement reads the "
                                f"trained weights and does not retrain (to train again, delete "
                                f"{train.record or 'its train result'} and run with --retry-failed)")
    if not s.over_steps:
        states = {last: states[last]}
    # Under torchrun every rank draws its share of the samples; rank 0 alone scores them.
    w = world()
    with leader_only() as lead:
        if lead:
            extractor = get_extractor(s.extractor, cell.config["data"], progress=progress)
            reference = from_dataset(cell.config["data"])
    # "train": the precision the run trained in, as its checkpoint says (a run resumed on
    # another machine keeps its first one), else as its result says.
    precision = s.numerics
    if precision == "train":
        precision = trained_precision(train.workdir) or train.metrics.get("train_precision", "fp32")
    model = cell.build_model()
    image_size = cell.dataset.image_size
    compile = cell.device.type == "cuda" and s.samples >= 2000 if s.compile == "auto" else s.compile
    if compile:  # dynamo keeps a few compiled entries per function: a grid's cells would use them up
        from ..step import fresh_compiles

        fresh_compiles()
    over_steps = []
    with watching(cell.watch if w.leader else None) as watch:  # live: each point as it is scored
        if watch is not None:
            watch.start_quality()
        for step, path in tqdm(states.items(), desc="fid", unit="step", disable=not progress, leave=False):
            model.load_state_dict(load_ema(path)[1])
            samples, _ = sample_images(model, s.samples, s, image_size=image_size, precision=precision, seed=s.seed,
                                       batch_size=s.batch_size, device=cell.device, compile=compile, world=w,
                                       uint8=True)
            with leader_only() as lead:
                if lead:
                    scores = quality(from_samples(samples), reference, extractor, batch_size=s.batch_size,
                                     device=cell.device)
                    over_steps.append({"step": step, **scores})
                    if watch is not None:
                        watch.quality(step, scores)
            del samples
    if cell.device.type == "cuda":
        torch.cuda.empty_cache()
    if not w.leader:
        return {}
    final = over_steps[-1]
    return {
        **{k: v for k, v in final.items() if k != "step"},
        "fid_extractor": extractor.label,
        "fid_samples": s.samples,
        "fid_reference": reference.label,
        "fid_sample_steps": s.sample_steps,
        "fid_sampler": s.sampler,
        "fid_cfg_scale": s.cfg_scale,
        "fid_compile": compile,
        "fid_numerics": precision,
        "fid_step": final["step"],
        **({"fid_extractor_accuracy": extractor.info["accuracy"]} if "accuracy" in extractor.info else {}),
        "fid_over_steps": over_steps,
    }
