"""``ablate run GRID --launcher submitit``: one SLURM job-array task per pending cell.

Each task runs its cell's pending measurements in its own process, through the same runner
as ``ablate run``, on the grid's results folder (a shared file system): the store's claims
keep tasks and any other runner apart, and a task's results are files like any other.
Nothing is kept about the jobs themselves: what is pending is what the store lacks, so
``ablate run`` again resubmits exactly what failed to finish (a task killed, out of time,
or a node lost). On SLURM's pre-emption or time-limit signal, submitit calls the task's
``checkpoint`` and requeues it; the requeued task finds its cell's finished measurements
in the store and training resumes from its last checkpoint.

A task with more than one rank (``--gpus-per-node 8``, or ``--ranks-per-task``) runs its
cell under torchrun on its node: DDP training over its GPUs (``ablate.torchrun``).
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from .cell import cell_id
from .defaults import SLURM_POLL_S, SLURM_TIMEOUT_MIN, WAIT_S
from .grid import Grid, load_grid
from .results import failures, pending
from .runner import describe, run_grid
from .store import Store


class CellTask(submitit.helpers.Checkpointable):
    """One array task: the pending measurements of one cell. Checkpointable: on pre-emption
    submitit requeues the same call (the store and the training checkpoint hold the state)."""

    def __call__(self, grid_path: str, results: str, cell: str, retry_failed: bool = False, ranks: int = 1) -> dict:
        if ranks > 1:
            return _torchrun(grid_path, results, cell, retry_failed, ranks)
        grid = load_grid(grid_path)  # imports the grid's plugins in this process too
        config = next((c for c in grid.cells if cell_id(c) == cell), None)
        if config is None:
            raise RuntimeError(f"{grid_path} has no cell {cell} any more (the file changed after submission)")
        # The runner of `ablate run`, on this one cell: its keys resolved on this node (a
        # timing's names its GPU), what another process holds waited for as there.
        s = run_grid(grid, Store(results), retry_failed=retry_failed, progress=False, only={cell})
        print(f"{describe(config, grid.axes)}: {s.measured} measured, {s.reused} reused, {len(s.failed)} failed, "
              f"{len(s.busy)} held by another process", flush=True)
        return {"measured": s.measured, "reused": s.reused, "failed": s.failed, "busy": s.busy}


def _torchrun(grid_path: str, results: str, cell: str, retry_failed: bool, ranks: int) -> dict:
    """The task's cell over ``ranks`` processes on this node (one per GPU): ``torchrun
    --standalone -m ablate run GRID --cell ID``, whose rank 0 claims and stores as above."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "ablate", "run", grid_path, "--results", results, "--cell", cell, "--no-progress",
           "--wait", str(WAIT_S), *(["--retry-failed"] if retry_failed else [])]
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd)  # its output goes to the task's log
    if proc.returncode not in (0, 1):  # 1: a measurement failed, and is recorded in the store
        raise RuntimeError(f"torchrun over {ranks} ranks exited with {proc.returncode} (see the task's log)")
    return {"torchrun_exit": proc.returncode, "ranks": ranks}


@dataclass
class Submitted:
    jobs: list = field(default_factory=list)  # submitit jobs, one per cell
    cells: list[dict] = field(default_factory=list)
    cluster: str = ""
    folder: Path | None = None


def default_cluster() -> str:
    return "slurm" if shutil.which("sbatch") else "local"


def submit(grid: Grid, results: Path, *, cluster: str | None = None, partition: str | None = None,
           gpus_per_node: int = 1, cpus_per_task: int | None = None, mem_gb: float | None = None,
           timeout_min: int = SLURM_TIMEOUT_MIN, array_parallelism: int | None = None, retry_failed: bool = False,
           ranks_per_task: int | None = None) -> Submitted:
    """Submit one array task per cell with something pending; returns the jobs.

    ``ranks_per_task`` (default: ``gpus_per_node``): a task runs its cell under torchrun
    over that many processes (DDP training, ``ablate.torchrun``) when it is above 1."""
    store = Store(results)
    todo = pending(grid, store, retry_failed, here=False)
    cluster = cluster or default_cluster()
    folder = store.root / "slurm"
    out = Submitted(cluster=cluster, folder=folder)
    if not todo:
        return out
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = {"name": f"ablate-{grid.name}", "timeout_min": timeout_min, "gpus_per_node": gpus_per_node,
              "nodes": 1, "tasks_per_node": 1}
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if mem_gb:
        params["mem_gb"] = mem_gb
    if partition:
        params["slurm_partition"] = partition
    if array_parallelism:
        params["slurm_array_parallelism"] = array_parallelism
    executor.update_parameters(**params)
    cells = [config for config, _ in todo]
    n = len(cells)
    ranks = ranks_per_task or max(1, gpus_per_node)
    out.jobs = executor.map_array(CellTask(), [str(Path(grid.path).resolve())] * n, [str(store.root.resolve())] * n,
                                  [cell_id(c) for c in cells], [retry_failed] * n, [ranks] * n)
    out.cells = cells
    return out


def wait(grid: Grid, results: Path, submitted: Submitted, progress: bool = True,
         poll_s: float = SLURM_POLL_S) -> list[str]:
    """Wait for the tasks, showing the grid's measurements done (from the store); returns a
    line for each task that ended without finishing its cell (killed, out of time, crashed)."""
    from tqdm.auto import tqdm

    store = Store(results)
    total = sum(len(c["measure"]) for c in grid.cells)
    bar = tqdm(total=total, desc=grid.name, unit="measurement", disable=not progress, dynamic_ncols=True)
    while True:
        finished = all(j.done() for j in submitted.jobs)
        bar.n = total - sum(len(left) for _, left in pending(grid, store, here=False))
        bar.refresh()
        if finished:
            break
        time.sleep(poll_s)
    bar.close()
    lost = []
    for job, config in zip(submitted.jobs, submitted.cells):
        try:
            err = job.exception()
        except submitit.core.utils.UncompletedJobError as e:  # killed before it could say why
            err = e
        if err is not None:
            lost.append(f"task {job.job_id} ({describe(config, grid.axes)}): {str(err).strip().splitlines()[0][:300]}")
    return lost


def main_submit(grid: Grid, results: Path, *, wait_for_jobs: bool, progress: bool, out=sys.stdout, **kw) -> int:
    """The CLI's submitit path; returns the exit code (0, 1 when a cell failed or is left)."""
    submitted = submit(grid, results, **kw)
    if not submitted.jobs:
        print(f"nothing to submit: every measurement of {grid.name} is done", file=out)
        return 1 if failures(grid, Store(results)) else 0
    first = submitted.jobs[0].job_id.split("_")[0]
    print(f"submitted {len(submitted.jobs)} tasks ({submitted.cluster}), job {first}; "
          f"logs in {submitted.folder}/", file=out, flush=True)
    for job, config in zip(submitted.jobs, submitted.cells):
        print(f"  task {job.job_id}: {describe(config, grid.axes)}", file=out)
    if not wait_for_jobs:
        print("`ablate run` again (same options) resubmits what did not finish; `ablate table` shows the results",
              file=out)
        return 0
    try:
        lost = wait(grid, results, submitted, progress=progress)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; the tasks go on (scancel {first} stops them)", file=out)
        return 130
    for line in lost:
        print(f"lost: {line}", file=sys.stderr)
    return 1 if lost or failures(grid, Store(results)) or pending(grid, Store(results), here=False) else 0
