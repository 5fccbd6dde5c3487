"""Training a DiT as the paper does: DDPM loss, AdamW at a constant 1e-4, an EMA copy.

``train`` runs the loop for one grid cell and returns one flat row of summary metrics
(plus its ``log`` and ``evals`` lists, which tables skip). It is written for throughput:
the step has no host-device syncs (the loss is summed on the device and read once per
log window), and the step is ``ablate.step.TrainStep``: forward and loss compiled as one
graph (on CUDA by default), bf16 autocast where it is native, fused AdamW, the EMA as one
foreach lerp. ``benchmarks/train_throughput.py`` measures it beside the official code.

A run is resumable exactly: ``workdir/checkpoint.pt`` holds the weights, the EMA, the
optimizer, every RNG state and the data order, so N steps, a restart and N more steps
give the weights of 2N uninterrupted steps. ``workdir/ema_step{N:07d}.pt`` keeps the EMA
at every earlier ``eval_every`` step (``ema_snapshots``), for quality over steps.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .checkpoint import (CHECKPOINT, EMA_SNAPSHOT, load_or_set_aside, rng_state,
                         save_checkpoint, set_rng_state)
from .files import make_folder, remove_stale_temps
from .collective import all_gather, leader_only, mean, world as current_world
from .diffusion import LOSSES, create_diffusion
from .defaults import SAMPLE_GRID
from .precision import PRECISIONS as ALL_PRECISIONS
from .precision import synchronize
from .sampling import SamplingOptions, sample_images, save_grid
from .settings import ConfigError, choice, positive
from .step import StepOptions, TrainStep, peak_memory_mb, reset_peak_memory
from .watch import Watch  # live curves: TensorBoard, W&B, the progress file

# tf32 is a CUDA matmul mode that timing compares; training runs fp32 or bf16 autocast.
PRECISIONS = tuple(p for p in ALL_PRECISIONS if p != "tf32")


@dataclass
class TrainSettings(StepOptions, SamplingOptions):
    """The ``train:`` section of a grid: the step's options (``ablate.step.StepOptions``),
    the evaluation samples' (``ablate.sampling.SamplingOptions``) and the run's. Defaults are
    the paper's (AdamW, lr 1e-4, no weight decay, constant LR, EMA 0.9999); class-label
    dropout (0.1) is a model setting."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_clip: float | None = None
    loss: str = "hybrid"  # diffusion.LOSSES
    log_every: int = 50
    eval_every: int | None = None  # None: evaluate only at the end
    checkpoint_every: int = 500
    eval_samples: int = 64  # 0: no sampling, no evaluation
    # An EMA-only copy of the weights at every eval_every step (ema_step{N:07d}.pt), so that
    # quality over steps (the fid measurement) can be measured later, again, with any setting,
    # without retraining. Costs 4 bytes per parameter each: DiT-XS/4 16 MB, DiT-XL/2 2.7 GB.
    ema_snapshots: bool = True

    def check(self) -> None:
        positive(self, "steps", "batch_size", "lr", "log_every", "eval_every", "checkpoint_every", "grad_clip")
        positive(self, "weight_decay", "eval_samples", allow_zero=True)
        choice(self, "loss", LOSSES)
        choice(self, "precision", PRECISIONS)
        StepOptions.check(self)
        SamplingOptions.check(self)
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError("ema_decay", f"{self.ema_decay!r} must be in [0, 1]")

    def rank_problem(self, ranks: int) -> str | None:
        """Why this run cannot train over ``ranks`` processes, or None: each rank trains an
        equal share of the global batch (``World.share``)."""
        if self.batch_size % ranks:
            return (f"batch_size: {self.batch_size} does not divide over {ranks} ranks (each trains an equal "
                    f"share of the global batch); use a multiple of {ranks}")
        return None


# ---------------------------------------------------------------------------------
# Data order that survives a restart
# ---------------------------------------------------------------------------------
class _Batches:
    """``dataset.batches`` plus a resumable position.

    ``batches`` draws one permutation per epoch from the generator, when the epoch's first
    batch is asked for. So the position is the generator's state at the start of the
    current epoch and how many batches of that epoch were drawn: restoring the state and
    skipping that many batches replays the same permutation.
    """

    def __init__(self, dataset, batch_size: int, generator: torch.Generator, device: torch.device,
                 state: dict | None = None):
        self.per_epoch = len(dataset) // batch_size
        self.generator = generator
        self.in_epoch = 0
        if state is not None:
            generator.set_state(state["epoch_rng"])
        self.epoch_rng = generator.get_state()
        self._it: Iterator = dataset.batches(batch_size, generator, device)
        for _ in range(state["in_epoch"] if state is not None else 0):
            next(self)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.in_epoch == self.per_epoch:
            self.in_epoch = 0
        if self.in_epoch == 0:
            self.epoch_rng = self.generator.get_state()  # the state the next permutation is drawn from
        self.in_epoch += 1
        return next(self._it)

    def state(self) -> dict:
        return {"epoch_rng": self.epoch_rng, "in_epoch": self.in_epoch}


def _plain(v: Any) -> Any:
    # Metrics come back as numpy or 0-dim tensor scalars; checkpoints store plain numbers.
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if hasattr(v, "item") and getattr(v, "shape", None) == ():
        return v.item()
    return v


# ---------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------
def train(model: nn.Module, dataset, settings: TrainSettings, *, workdir: Path | str, seed: int,
          device: torch.device | str, progress: bool = True,
          evaluate: Callable[[nn.Module, torch.Tensor, int], dict] | None = None,
          watch: Watch | None = None) -> dict:
    """Train ``model`` on ``dataset`` for ``settings.steps`` steps, resuming from
    ``workdir/checkpoint.pt`` if it exists.

    Every ``eval_every`` steps and at the end, ``eval_samples`` EMA samples are drawn,
    saved as ``workdir/samples_step{step:07d}.png`` and passed to
    ``evaluate(ema_model, samples, step)`` (samples (n, C, H, W) in [-1, 1] on ``device``,
    labels i % num_classes), whose dict is recorded in ``evals``. ``watch`` (ablate.watch)
    is told of each log window and evaluation as they happen. Returns the summary row:
    train_steps, loss_start, final_loss, train_img_per_s, train_wall_s, train_precision,
    and the non-scalar ``log`` and ``evals``.
    """
    settings.check()
    device = torch.device(device)
    if settings.cfg_scale != 1.0 and settings.eval_samples and model.y_embedder.dropout_prob <= 0:
        raise ValueError("train.cfg_scale != 1 needs a model with class_dropout_prob > 0")
    trainer = Trainer(model, dataset, settings, Path(workdir), seed, device, evaluate, watch)
    trainer.run(progress)
    return {**summarize(trainer.log, trainer.evals, trainer.precision),
            "train_compile": trainer.compile, "train_compile_s": trainer.step.compile_s,
            "train_ranks": trainer.world.size,
            "train_peak_mem_mb": peak_memory_mb(device)}


class Trainer:
    """The state of one training run, fresh or restored from its checkpoint, and its steps:
    ``run`` trains; each step is ``_train_step``; a log window ends in ``_end_window``; an
    evaluation or a checkpoint pauses the clock (``_pause``)."""

    def __init__(self, model: nn.Module, dataset, settings: TrainSettings, workdir: Path, seed: int,
                 device: torch.device, evaluate: Callable | None, watch: Watch | None = None):
        make_folder(workdir)
        self.dataset, self.settings, self.workdir, self.seed, self.device = dataset, settings, workdir, seed, device
        self.evaluate = evaluate
        # Under torchrun: every rank trains its share, rank 0 alone writes (ablate.collective).
        self.world = current_world()
        problem = settings.rank_problem(self.world.size)  # refused on every rank alike
        if problem:
            raise ValueError(f"train.{problem}")
        self.watch = watch if self.world.leader else None  # live curves: rank 0 alone
        torch.manual_seed(seed)  # timesteps, noise and label dropout all draw from the global RNG
        self.model = model.to(device).train()
        self.path = workdir / CHECKPOINT
        if self.world.leader:  # what a killed writer left behind (rank 0 alone writes here)
            remove_stale_temps(workdir, older_than_s=0)  # a live writer holds its file's lock
        ck = load_or_set_aside(self.path, move=self.world.leader, weights=self.model.state_dict())
        steps = all_gather(None if ck is None else ck["step"])
        if len(set(steps)) > 1:  # a checkpoint replaced while the ranks read it
            raise RuntimeError(f"{self.path}: the ranks read different checkpoints (steps {steps}); run again")
        options = settings.resolved(device)
        if ck is not None and settings.precision == "auto" and "precision" in ck:
            # auto as the run began: resumed on another machine (bf16 native or not), it trains
            # on, and its EMA snapshots are sampled, in one precision.
            options = StepOptions(**{**asdict(options), "precision": ck["precision"]})
        self.precision, self.compile = options.precision, options.compile
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.diffusion = create_diffusion(None, learn_sigma=self.model.learn_sigma, loss=settings.loss)
        self.step = TrainStep(self.model, self.diffusion, options, lr=settings.lr, weight_decay=settings.weight_decay,
                              ema=self.ema, ema_decay=settings.ema_decay, grad_clip=settings.grad_clip)
        self.optimizer = self.step.optimizer
        self.start, self.log, self.evals, self.wall_before = 0, [], [], 0.0
        # The loss of the current log window, summed on the device: no sync per step.
        self.loss_sum = torch.zeros((), device=device)
        self.window_steps = 0
        data_rng = torch.Generator().manual_seed(seed)
        data_state = self._restore(ck) if ck is not None else None
        self.batches = _Batches(dataset, settings.batch_size, data_rng, device, data_state)
        self.timed_steps = 0  # steps of the window run by this process (a resumed window began before it)
        self.first_window = True  # this process's first window carries compile and allocator warm-up
        self.last_loss = self.log[-1]["loss"] if self.log else float("nan")

    def _restore(self, ck: dict) -> dict:
        """Load the checkpoint into this run; returns the saved data order."""
        for key, want in (("seed", self.seed), ("batch_size", self.settings.batch_size)):
            if ck[key] != want:
                raise ValueError(f"{self.path}: saved with {key}={ck[key]}, asked to resume with {key}={want}; "
                                 "use a new workdir")
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.optimizer.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"], self.device)
        self.start, self.log, self.evals, self.wall_before = ck["step"], ck["log"], ck["evals"], ck["train_wall_s"]
        self.loss_sum += ck["window"]["loss_sum"].to(self.device)
        self.window_steps = ck["window"]["steps"]
        return ck["data"]

    def run(self, progress: bool) -> None:
        from tqdm.auto import tqdm

        s = self.settings
        bar = tqdm(total=s.steps, initial=self.start, disable=not progress, desc="train", unit="step")
        synchronize(self.device)
        reset_peak_memory(self.device)
        self.t_start = self.t_window = time.perf_counter()
        self.paused = self.window_paused = 0.0  # seconds spent evaluating and checkpointing, not training
        if self.watch is not None:  # resumed: what was logged after the checkpoint is logged again
            self.watch.start(self.start, s.steps)
        for step in range(self.start + 1, s.steps + 1):
            self._train_step()
            bar.update(1)
            if step % s.log_every == 0 or step == s.steps:
                self._end_window(step)
                bar.set_postfix(loss=f"{self.last_loss:.4f}", img_s=f"{self.log[-1]['img_per_s']:.1f}")
            due_eval = s.eval_samples > 0 and (
                step == s.steps or (s.eval_every is not None and step % s.eval_every == 0))
            # An evaluation step is a checkpoint too: a short run (fewer steps than
            # checkpoint_every) interrupted late would otherwise start over from step 0.
            due_checkpoint = step % s.checkpoint_every == 0 or step == s.steps or due_eval
            due_snapshot = (s.ema_snapshots and s.eval_every is not None and step % s.eval_every == 0
                            and step != s.steps)
            if due_eval or due_checkpoint or due_snapshot:
                self._pause(step, due_eval, due_checkpoint, due_snapshot)
        bar.close()

    def _train_step(self) -> None:
        x, y = next(self.batches)
        self.loss_sum += self.step.step(x, y)  # forward, loss, backward, AdamW, EMA
        self.window_steps += 1
        self.timed_steps += 1

    def _wall(self) -> float:
        """Training seconds so far, over every process, evaluations and checkpoints excluded."""
        return self.wall_before + (time.perf_counter() - self.t_start - self.paused)

    def _end_window(self, step: int) -> None:
        """Log the window's mean loss and throughput, and start a new window."""
        # The sync point, once per window; the mean over the ranks' shares is the global batch's.
        self.last_loss = mean(self.loss_sum / self.window_steps).item()
        now = time.perf_counter()
        seconds = now - self.t_window - self.window_paused
        images = self.timed_steps * self.settings.batch_size
        self.log.append({"step": step, "loss": self.last_loss, "step_ms": 1e3 * seconds / self.timed_steps,
                         "img_per_s": images / seconds, "images": images, "train_wall_s": self._wall(),
                         "first_window": self.first_window})
        self.loss_sum.zero_()
        self.window_steps = self.timed_steps = 0
        self.first_window, self.t_window, self.window_paused = False, now, 0.0
        if self.watch is not None:  # live curves; the clock is stopped meanwhile
            self.watch.window(self.log[-1], self.optimizer, self.device)
            self.t_window = time.perf_counter()
            self.paused += self.t_window - now

    def _pause(self, step: int, due_eval: bool, due_checkpoint: bool, due_snapshot: bool = False) -> None:
        """Evaluate, snapshot the EMA and/or checkpoint with the training clock stopped."""
        synchronize(self.device)
        t0, train_wall = time.perf_counter(), self._wall()
        # Every rank: the samples (each draws its share) and the window's loss over the ranks.
        samples = self._sample() if due_eval else None
        window_loss = mean(self.loss_sum) if due_checkpoint else None
        with leader_only() as lead:  # rank 0 writes; a failure there (a full disk) ends every rank's share
            if lead and due_snapshot:
                save_checkpoint(self.workdir / EMA_SNAPSHOT.format(step=step),
                                {"step": step, "ema": self.ema.state_dict(), "train_wall_s": train_wall,
                                 "precision": self.precision})
            if lead and due_eval:
                self._record_evaluation(step, samples, train_wall)
            if lead and due_checkpoint:
                self._checkpoint(step, train_wall, window_loss)
        spent = time.perf_counter() - t0
        self.paused += spent
        self.window_paused += spent

    def _sample(self) -> torch.Tensor:
        s = self.settings
        samples, _ = sample_images(self.ema, s.eval_samples, s, image_size=self.dataset.image_size,
                                   precision=self.precision, seed=self.seed, batch_size=s.batch_size,
                                   device=self.device, world=self.world)
        return samples

    def _record_evaluation(self, step: int, samples: torch.Tensor, train_wall: float) -> None:
        grid = self.workdir / SAMPLE_GRID.format(step=step)
        save_grid(samples, grid)
        metrics = self.evaluate(self.ema, samples, step) if self.evaluate is not None else {}
        self.evals.append({"step": step, "train_loss": self.last_loss, "train_wall_s": train_wall,
                           **{k: _plain(v) for k, v in metrics.items()}})
        if self.watch is not None:
            self.watch.evaluation(self.evals[-1], grid)

    def _checkpoint(self, step: int, train_wall: float, window_loss: torch.Tensor) -> None:
        """``window_loss``: the log window's loss sum so far, averaged over the ranks (each
        rank's is its share's), which every rank of a resumed run starts from."""
        save_checkpoint(self.path, {
            "step": step, "seed": self.seed, "batch_size": self.settings.batch_size, "precision": self.precision,
            "settings": asdict(self.settings), "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "rng": rng_state(self.device),
            "data": self.batches.state(),
            "window": {"loss_sum": window_loss.cpu(), "steps": self.window_steps},
            "log": self.log, "evals": self.evals, "train_wall_s": train_wall,
        })


def summarize(log: list[dict], evals: list[dict], precision: str) -> dict:
    """The run's row: first and last window losses, throughput after warm-up, wall time."""
    if not log:
        raise ValueError("no training steps were logged")
    # Throughput from the windows after each process's first (compile, allocator warm-up);
    # a run too short to have any falls back to all windows.
    steady = [e for e in log if not e["first_window"]] or log
    images = sum(e["images"] for e in steady)
    seconds = sum(e["images"] / e["img_per_s"] for e in steady)
    return {
        "train_steps": log[-1]["step"],
        "loss_start": log[0]["loss"],
        "final_loss": log[-1]["loss"],
        "train_img_per_s": images / seconds,
        "train_wall_s": log[-1]["train_wall_s"],
        "train_precision": precision,
        "log": log,
        "evals": evals,
    }
