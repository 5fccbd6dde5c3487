"""The ``train`` measurement: a short DDPM training run of the cell's DiT on its dataset.

Its work folder holds the checkpoint, so an interrupted run resumes where it stopped; its
result carries the loss log and the evaluations over steps (quality-over-steps curves).
"""
from __future__ import annotations

from . import MODEL_KEYS, register_measure
from ..train import TrainSettings, train as train_loop
from ..watch import watching


@register_measure("train", settings=TrainSettings, uses=MODEL_KEYS + ("seed",),
                  columns=("final_loss", "train_img_per_s", "train_wall_s"), distributed=True,
                  rank_problem=TrainSettings.rank_problem)
def train(cell, progress: bool = True) -> dict:
    """Short DDPM training run: loss curve, images/s, samples over steps."""
    model = cell.build_model()
    with watching(cell.watch) as watch:
        return train_loop(model, cell.dataset, cell.settings("train"), workdir=cell.workdir,
                          seed=cell.config["seed"], device=cell.device, progress=progress, watch=watch)
