"""``ablate run``: measure a grid's cells, here, over ``--jobs N`` workers, under torchrun,
or as SLURM tasks (``--launcher submitit``)."""
from __future__ import annotations

import os
import sys

import click

from ..defaults import SLURM_TIMEOUT_MIN, WAIT_S
from ..settings import ConfigError
from .common import fail, finite_seconds, folder_option, load, open_store, print_table, results_dir, show_results

@click.command()
@click.argument("grid", required=False)
@click.option("--results", metavar="DIR", callback=folder_option, help="Results folder (default: results/<grid name>).")
@click.option("--dry-run", is_flag=True, help="List the cells and what is left to measure; run nothing.")
@click.option("--retry-failed", is_flag=True, help="Measure again what failed last time.")
@click.option("--progress/--no-progress", default=True, help="Progress bars (default: on).")
@click.option("--wait", "wait_s", type=float, default=WAIT_S, show_default=True, metavar="SECONDS",
              callback=finite_seconds,
              help="How long to wait for measurements another process holds before giving up on them.")
@click.option("--jobs", "-j", type=int, default=1, show_default=True, metavar="N",
              help="Worker processes on this machine, each measuring its own cells; on GPUs, worker i "
                   "gets GPU i // --jobs-per-gpu; on a CPU, each gets cores // N threads.")
@click.option("--jobs-per-gpu", type=int, default=1, show_default=True, metavar="K",
              help="Workers sharing one GPU (small cells leave most of a GPU idle).")
@click.option("--worker", hidden=True, metavar="I/N", help="Run as worker I of N of `--jobs N` (internal).")
@click.option("--launcher", type=click.Choice(["submitit"]),
              help="submitit: one SLURM job-array task per pending cell, on a shared results folder.")
@click.option("--cluster", type=click.Choice(["slurm", "local"]),
              help="[submitit] slurm (default where sbatch exists) or local (processes here, to try it out).")
@click.option("--partition", metavar="P", help="[submitit] SLURM partition.")
@click.option("--gpus-per-node", type=int, default=1, show_default=True, metavar="N", help="[submitit] GPUs per task.")
@click.option("--cpus-per-task", type=int, metavar="N", help="[submitit] CPU cores per task.")
@click.option("--mem-gb", type=float, metavar="GB", help="[submitit] memory per task.")
@click.option("--timeout", "timeout_min", type=int, default=SLURM_TIMEOUT_MIN, show_default=True, metavar="MIN",
              help="[submitit] time limit of a task; a task cut off is requeued and resumes.")
@click.option("--slurm-array-parallelism", type=int, metavar="N", help="[submitit] tasks running at once.")
@click.option("--ranks-per-task", type=int, metavar="N",
              help="[submitit] processes per task, run by torchrun (DDP training; default: --gpus-per-node).")
@click.option("--detach", is_flag=True, help="[submitit] submit and return, without waiting for the tasks.")
@click.option("--cell", "only_cells", multiple=True, metavar="ID",
              help="Only this cell (its cell_id, as `ablate table` or --dry-run shows it); repeatable.")
@click.option("--log", "log", metavar="BACKENDS",
              help="Live curves of each cell as it trains: tensorboard (the default; in <results>/tensorboard), "
                   "wandb (needs the wandb package), tensorboard,wandb, or none. Enters no measurement key.")
def run(grid, results, dry_run, retry_failed, progress, wait_s, jobs, jobs_per_gpu, worker, launcher, only_cells,
        log, **slurm):
    """Run GRID (a YAML file, or the name of a built-in grid, see `ablate ls grids`; default: quick).

    Cells already measured are skipped, interrupted training resumes from its checkpoint,
    and several `ablate run` processes on one results folder share the work (each waits up
    to --wait seconds for what another holds). Exits 1 if any cell failed (its error is in
    the table) or is still held by another process, 2 on bad input.

    \b
    More than one process:
      ablate run GRID --jobs 4                  # 4 workers here (one GPU each where there are GPUs)
      torchrun --nproc_per_node 4 -m ablate run GRID   # each training cell over 4 GPUs (DDP)
      ablate run GRID --launcher submitit --partition gpu --timeout 720   # a SLURM task per cell
      ablate run GRID --launcher submitit --gpus-per-node 8   # ... each task torchrun over 8 GPUs
    """
    from ..collective import from_env

    g = load(grid)
    choose_log(log)
    only = _only_cells(g, only_cells)
    if only and (jobs != 1 or launcher or worker):
        fail("--cell: not with --jobs or --launcher (run it alone, or under torchrun)")
    position = _worker_position(worker) if worker is not None else None
    try:
        ranks = from_env()
    except ValueError as e:
        fail(str(e))
    device = None  # under torchrun: the grid's device setting, which picks the backend
    if ranks.distributed:
        if jobs != 1 or jobs_per_gpu != 1 or launcher or worker:
            fail("--jobs, --launcher: not under torchrun, which starts the processes itself")
        device = _torchrun_checks(g, results, only, ranks.size)
        if not ranks.leader:  # a follower: trains its share of what rank 0 sends (ablate.torchrun)
            if not dry_run:
                sys.exit(_follow(device))
            return
    store = open_store(results_dir(results, g.name), set_aside=not dry_run)
    if dry_run:
        _dry_run(g, store, only)
        return
    if position is not None:
        _run_worker(g, store, position, retry_failed, wait_s)
    _check_slurm_options(launcher, jobs, slurm)
    if launcher == "submitit":
        _submitit(g, store, progress, retry_failed, slurm)
    if jobs != 1 or jobs_per_gpu != 1:
        _run_jobs(g, store, jobs, jobs_per_gpu, retry_failed, progress, wait_s)
        return
    _run_here(g, store, device, only, retry_failed, progress, wait_s)


def choose_log(log: str | None) -> None:
    """``--log``, checked (a missing package is one line), for this process and those it
    starts (workers, SLURM tasks, torchrun ranks), which inherit the environment."""
    import os

    from ..watch import LOG_ENV, WatchUnavailable, backends, check_available

    try:
        names = backends(log)
        check_available(names)
    except ValueError as e:
        fail(f"--log: {e}")
    except WatchUnavailable as e:
        fail(str(e))
    os.environ[LOG_ENV] = ",".join(names) or "none"


def _only_cells(g, only_cells) -> set[str] | None:
    """The cells named by --cell, each checked to be one of the grid's."""
    from ..cell import cell_id
    from ..registry import did_you_mean

    known = [cell_id(c) for c in g.cells]
    for cid in only_cells:
        if cid not in known:
            fail(f"--cell: {g.name} has no cell {cid!r}{did_you_mean(cid, known)}")
    return set(only_cells) or None


def _worker_position(worker: str) -> tuple[int, int]:
    """``--worker I/N``: worker I of N, 0 <= I < N."""
    i, _, n = worker.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        fail(f"--worker: {worker!r} is not I/N with 0 <= I < N (e.g. 0/4)")
    return int(i), int(n)


# ---------------------------------------------------------------------------------
# Under torchrun
# ---------------------------------------------------------------------------------
def _torchrun_checks(g, results, only, world_size: int) -> str:
    """Refuse a grid that cannot run over ``world_size`` ranks; returns its device setting."""
    from .. import torchrun as distributed
    from ..cell import cell_id
    from ..results import trained

    try:
        distributed.timeout_min()
    except ValueError as e:
        fail(str(e))
    device = _grid_device(g)
    # Every rank reads the folder alike, read-only and quietly (rank 0's run says what is
    # unreadable and sets it aside), to know which cells are still to train.
    done = trained(open_store(results_dir(results, g.name), set_aside=False, warn_unreadable=False))
    problem = distributed.rank_problems([c for c in g.cells if not only or cell_id(c) in only], world_size, done)
    if problem:
        fail(f"{g.path}: {problem} (torchrun --nproc_per_node)")
    return device


def _grid_device(g) -> str:
    """The one device setting of a grid run under torchrun (it picks the backend: gloo or nccl)."""
    from ..device import resolve_device

    devices = {c["device"] for c in g.cells}
    if len({resolve_device(d).type for d in devices}) > 1:
        fail(f"under torchrun every cell of {g.name} must use the same kind of device (one backend, gloo "
             f"or nccl, serves them all); it has device: {', '.join(sorted(devices))}")
    return min(devices) if devices else "auto"  # one kind of device: any of them picks the backend alike


def _follow(device: str) -> int:
    from .. import torchrun as distributed

    distributed.init(device)
    try:
        return distributed.follow()
    finally:
        distributed.close()


class _ranks:
    """Under torchrun (``device``: the grid's, else None), the leader's side: join the process
    group, and let the followers go when the grid is done (or stopped)."""

    def __init__(self, device: str | None):
        self.device = device

    @staticmethod
    def execute(device: str | None) -> dict:
        """Under torchrun, ``run_grid``'s way to run a measurement over the ranks."""
        if device is None:
            return {}
        from ..torchrun import execute

        return {"execute": execute}

    def __enter__(self):
        from .. import torchrun as distributed

        if self.device is not None:
            distributed.init(self.device)
        return self

    def __exit__(self, exc_type, exc, tb):
        from .. import torchrun as distributed
        from ..runner import RunStopped

        # After Ctrl-C the followers may be inside a collective, where an order would hang:
        # the leader just exits, and torchrun ends the other ranks.
        if distributed.world().distributed and (exc_type is None or issubclass(exc_type, RunStopped)):
            distributed.stop_followers()
            distributed.close()
        return False


# ---------------------------------------------------------------------------------
# --dry-run
# ---------------------------------------------------------------------------------
def _dry_run(g, store, only) -> None:
    from tabulate import tabulate

    from ..cell import cell_id
    from ..runner import cell_keys, describe

    rows = []
    for c in g.cells:
        if only and cell_id(c) not in only:
            continue
        state = {n: (store.result(k) or {}).get("status", "pending") for n, k in cell_keys(c).items()}
        rows.append([cell_id(c), describe(c, g.axes), ", ".join(f"{n}:{s}" for n, s in state.items())])
    click.echo(tabulate(rows, headers=["cell_id", "cell", "measurements"]))
    click.echo(f"{len(rows)} cells; results in {store.root}")


# ---------------------------------------------------------------------------------
# --launcher submitit
# ---------------------------------------------------------------------------------
def _check_slurm_options(launcher, jobs: int, slurm: dict) -> None:
    """The [submitit] options: only with --launcher submitit, and each > 0."""
    given = {"--cluster": slurm["cluster"], "--partition": slurm["partition"],
             "--cpus-per-task": slurm["cpus_per_task"], "--mem-gb": slurm["mem_gb"],
             "--slurm-array-parallelism": slurm["slurm_array_parallelism"],
             "--ranks-per-task": slurm["ranks_per_task"],
             "--gpus-per-node": None if slurm["gpus_per_node"] == 1 else slurm["gpus_per_node"],
             "--timeout": None if slurm["timeout_min"] == SLURM_TIMEOUT_MIN else slurm["timeout_min"],
             "--detach": slurm["detach"] or None}
    named = [opt for opt, v in given.items() if v is not None]
    if launcher is None and named:
        fail(f"{named[0]}: only with --launcher submitit")
    if launcher != "submitit":
        return
    if jobs != 1:
        fail("--jobs: runs workers on this machine; with --launcher submitit each cell is a SLURM task")
    for opt, v in (("--gpus-per-node", slurm["gpus_per_node"]), ("--timeout", slurm["timeout_min"]),
                   ("--cpus-per-task", slurm["cpus_per_task"]), ("--mem-gb", slurm["mem_gb"]),
                   ("--slurm-array-parallelism", slurm["slurm_array_parallelism"]),
                   ("--ranks-per-task", slurm["ranks_per_task"])):
        if v is not None and v <= 0 and not (opt == "--gpus-per-node" and v == 0):
            fail(f"{opt}: {v} must be > 0")


def _submitit(g, store, progress: bool, retry_failed: bool, slurm: dict):
    from ..torchrun import rank_problems
    from ..results import trained

    try:
        from ..slurm import main_submit
    except ImportError:
        fail("--launcher submitit: needs submitit (pip install 'ablate[slurm]')")
    gpus_per_node, ranks_per_task = slurm["gpus_per_node"], slurm["ranks_per_task"]
    problem = rank_problems(g.cells, ranks_per_task or max(1, gpus_per_node), trained(store))
    if problem:
        fail(f"{g.path}: {problem} (--ranks-per-task, or --gpus-per-node)")
    detach = slurm["detach"]
    code = main_submit(g, store.root, wait_for_jobs=not detach, progress=progress, cluster=slurm["cluster"],
                       partition=slurm["partition"], gpus_per_node=gpus_per_node,
                       cpus_per_task=slurm["cpus_per_task"], mem_gb=slurm["mem_gb"],
                       timeout_min=slurm["timeout_min"], array_parallelism=slurm["slurm_array_parallelism"],
                       retry_failed=retry_failed, ranks_per_task=ranks_per_task)
    if not detach and code in (0, 1):
        show_results(g, store)
    sys.exit(code)


# ---------------------------------------------------------------------------------
# --jobs N, and its workers
# ---------------------------------------------------------------------------------
def _run_jobs(g, store, jobs: int, jobs_per_gpu: int, retry_failed: bool, progress: bool, wait_s: float):
    from ..launch import run_jobs

    try:
        summary = run_jobs(g, store.root, jobs, jobs_per_gpu=jobs_per_gpu, retry_failed=retry_failed,
                           progress=progress, wait_s=wait_s)
    except ConfigError as e:
        fail(str(e))
    show_results(g, store, f"{summary.measured} measured by {jobs} workers, ")
    if summary.interrupted:
        sys.exit(130)
    if summary.failed or summary.pending or summary.crashed:
        sys.exit(1)


def _run_worker(g, store, position: tuple[int, int], retry_failed: bool, wait_s: float):
    """One worker of `ablate run --jobs N`: measures, tells the parent what it does, and
    leaves the table to the parent."""
    from ..launch import worker_events, worker_summary
    from ..runner import run_grid

    summary = run_grid(g, store, retry_failed=retry_failed, progress=False, wait_s=wait_s, worker=position,
                       on_event=worker_events(position[0]))
    worker_summary(summary)
    sys.exit(1 if summary.failed else 0)


# ---------------------------------------------------------------------------------
# In this process
# ---------------------------------------------------------------------------------
def _run_here(g, store, device, only, retry_failed: bool, progress: bool, wait_s: float):
    from ..measure import default_columns
    from ..runner import RunStopped, run_grid

    try:
        with _ranks(device):
            summary = run_grid(g, store, retry_failed=retry_failed, progress=progress, wait_s=wait_s, only=only,
                               on_event=None if progress else _log_line, **_ranks.execute(device))
    except KeyboardInterrupt:  # 130, as a shell reports SIGINT: not 1, which means a failed cell
        click.echo(f"\ninterrupted: finished measurements are kept in {store.root}; run again to resume",
                   err=True)
        # Every record and checkpoint is already whole on disk (atomic writes). End now, with
        # 130: unwinding the interpreter (joining a live-log writer's thread) can raise the
        # interrupt again and end the process by SIGINT instead of this exit code.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except RunStopped as e:
        store.write_tables(default_columns())
        fail(f"stopped: {e}; the failure is recorded and the other cells are left: run again to go on "
             "(--retry-failed to measure it again)", 1)
    _summary(g, store, summary, wait_s)


def _summary(g, store, summary, wait_s: float):
    """The grid's table, the counts, and a line for each measurement that failed or is left."""
    from ..measure import default_columns
    from ..results import grid_cells

    store.write_tables(default_columns())
    print_table(store.table(grid_cells(store, g)), None, "markdown")
    click.echo(f"\n{summary.measured} measured, {summary.reused} reused, {len(summary.failed)} failed, "
               f"{len(summary.busy)} held by another process; table: {store.root / 'table.csv'}")
    for cell, name, err in summary.failed:
        click.echo(f"failed: {cell}: {name}: {err}", err=True)
    for cell, name in summary.busy:
        click.echo(f"not done: {cell}: {name}: still held by another process after {wait_s:g} s; "
                   "run again to finish it", err=True)
    if summary.failed or summary.busy:
        sys.exit(1)


def _log_line(event: str, task) -> None:
    """Without progress bars (a log file, a batch job): one line as each measurement starts and ends."""
    import time

    click.echo(f"{time.strftime('%H:%M:%S')} {event:6} {task.label}: {task.name}")
