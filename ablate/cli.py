"""The ``ablate`` command: run a grid, query its table, validate grid files, list registries.

A mistake in the input is one line on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .settings import ConfigError, one_line

FORMATS = ("markdown", "csv", "json", "parquet")


def _fail(message: str, code: int = 2):
    if _follower():
        # Under torchrun every rank meets the same mistake and rank 0 says it once. The others
        # leave quietly with 0: a rank that fails makes torchrun stop the rest, which could
        # stop rank 0 before its line is out; rank 0's exit code is the launch's.
        sys.exit(0)
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _follower() -> bool:
    from .collective import from_env

    try:
        w = from_env()
    except ValueError:
        return False
    return w.distributed and not w.leader


def _load(grid_arg: str | None):
    try:
        return _load_or_raise(grid_arg)
    except ConfigError as e:
        _fail(str(e))


def _load_or_raise(grid_arg: str | None):
    from .grid import find_grid, load_grid

    path = find_grid(grid_arg)
    return load_grid(path, shown=grid_arg or str(path), progress=True)


def _results_dir(results: str | None, grid_name: str) -> Path:
    return Path(results) if results else Path("results") / grid_name


class _OneLineErrors(click.Group):
    """Click's own usage errors (an unknown option, ``-f xml``) as the one ``error:`` line
    that every other mistake gets, instead of the usage text."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help() if e.ctx else "", err=True)
            sys.exit(2)
        except click.UsageError as e:
            where = f"{e.ctx.command_path}: " if e.ctx else ""
            _fail(where + " ".join(e.format_message().split()), e.exit_code)
        except click.ClickException as e:
            _fail(" ".join(e.format_message().split()), e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ablate")
def main():
    """Measure what a Diffusion Transformer design choice costs and what it buys.

    \b
    A grid file (YAML) names the cells: model sizes x patch sizes x conditioning blocks
    (adaln-zero, adaln, cross-attn, in-context) x seeds x any setting; each cell is measured
    (flops, timing, train) and becomes one row of a results table.

    \b
    Start here:
      ablate run                  # the shipped quick grid: 4 blocks on digits, a few minutes on a CPU
      ablate table                # its results
      ablate report               # its figures and tables, in reports/quick/
      ablate ls                   # models, blocks, datasets, measurements you can name
      ablate ls grids             # the built-in grids
      ablate run dit-paper-gflops # the paper's 48 Gflops cells
    """


@main.command()
@click.argument("grid", required=False)
@click.option("--results", metavar="DIR", help="Results folder (default: results/<grid name>).")
@click.option("--dry-run", is_flag=True, help="List the cells and what is left to measure; run nothing.")
@click.option("--retry-failed", is_flag=True, help="Measure again what failed last time.")
@click.option("--progress/--no-progress", default=True, help="Progress bars (default: on).")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=300, show_default=True, metavar="SECONDS",
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
@click.option("--timeout", "timeout_min", type=int, default=60, show_default=True, metavar="MIN",
              help="[submitit] time limit of a task; a task cut off is requeued and resumes.")
@click.option("--slurm-array-parallelism", type=int, metavar="N", help="[submitit] tasks running at once.")
@click.option("--ranks-per-task", type=int, metavar="N",
              help="[submitit] processes per task, run by torchrun (DDP training; default: --gpus-per-node).")
@click.option("--detach", is_flag=True, help="[submitit] submit and return, without waiting for the tasks.")
@click.option("--cell", "only_cells", multiple=True, metavar="ID",
              help="Only this cell (its cell_id, as `ablate table` or --dry-run shows it); repeatable.")
@click.option("--log", "log", metavar="BACKENDS",
              help="Live curves of each cell as it trains: tensorboard (the default; in <results>/tensorboard), "
                   "wandb (needs the wandb package), tensorboard,wandb, or none.")
def run(grid, results, dry_run, retry_failed, progress, wait_s, jobs, jobs_per_gpu, worker, launcher, cluster,
        partition, gpus_per_node, cpus_per_task, mem_gb, timeout_min, slurm_array_parallelism, ranks_per_task, detach,
        only_cells, log):
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
    from .cell import cell_id
    from .collective import from_env
    from .measure import default_columns
    from .runner import cell_keys, describe, run_grid

    g = _load(grid)
    _choose_log(log)
    if only_cells:
        known = [cell_id(c) for c in g.cells]
        for cid in only_cells:
            if cid not in known:
                from .registry import did_you_mean

                _fail(f"--cell: {g.name} has no cell {cid!r}{did_you_mean(cid, known)}")
    only = set(only_cells) or None
    if only and (jobs != 1 or launcher or worker):
        _fail("--cell: not with --jobs or --launcher (run it alone, or under torchrun)")
    try:
        ranks = from_env()
    except ValueError as e:
        _fail(str(e))
    device = None  # under torchrun: the grid's device setting, which picks the backend
    if ranks.distributed:
        from . import torchrun as distributed

        if jobs != 1 or jobs_per_gpu != 1 or launcher or worker:
            _fail("--jobs, --launcher: not under torchrun, which starts the processes itself")
        try:
            distributed.timeout_min()
        except ValueError as e:
            _fail(str(e))
        device = _grid_device(g)
        # Every rank reads the folder alike, read-only and quietly (rank 0's run reports and
        # sets aside unreadable records), to know which cells are still to train.
        done = _trained(_open_store(_results_dir(results, g.name), set_aside=False, report=False))
        problem = distributed.rank_problems([c for c in g.cells if not only or cell_id(c) in only], ranks.size,
                                            done)
        if problem:
            _fail(f"{g.path}: {problem} (torchrun --nproc_per_node)")
        if not ranks.leader:  # a follower: trains its share of what rank 0 sends (ablate.torchrun)
            if not dry_run:
                sys.exit(_follow(device))
            return
    store = _open_store(_results_dir(results, g.name), set_aside=not dry_run)
    if dry_run:
        from tabulate import tabulate

        rows = []
        for c in g.cells:
            if only and cell_id(c) not in only:
                continue
            keys = cell_keys(c)
            state = {n: (store.result(k) or {}).get("status", "pending") for n, k in keys.items()}
            rows.append([cell_id(c), describe(c, g.axes), ", ".join(f"{n}:{s}" for n, s in state.items())])
        click.echo(tabulate(rows, headers=["cell_id", "cell", "measurements"]))
        click.echo(f"{len(rows)} cells; results in {store.root}")
        return
    if worker:
        _run_worker(g, store, worker, retry_failed, wait_s)
    slurm_only = {"--cluster": cluster, "--partition": partition, "--cpus-per-task": cpus_per_task,
                  "--mem-gb": mem_gb, "--slurm-array-parallelism": slurm_array_parallelism,
                  "--ranks-per-task": ranks_per_task,
                  "--gpus-per-node": None if gpus_per_node == 1 else gpus_per_node,
                  "--timeout": None if timeout_min == 60 else timeout_min, "--detach": detach or None}
    given = [opt for opt, v in slurm_only.items() if v is not None]
    if launcher is None and given:
        _fail(f"{given[0]}: only with --launcher submitit")
    if launcher == "submitit":
        if jobs != 1:
            _fail("--jobs: runs workers on this machine; with --launcher submitit each cell is a SLURM task")
        for opt, v in (("--gpus-per-node", gpus_per_node), ("--timeout", timeout_min), ("--cpus-per-task", cpus_per_task),
                       ("--mem-gb", mem_gb), ("--slurm-array-parallelism", slurm_array_parallelism),
                       ("--ranks-per-task", ranks_per_task)):
            if v is not None and v <= 0 and not (opt == "--gpus-per-node" and v == 0):
                _fail(f"{opt}: {v} must be > 0")
        try:
            from .slurm import main_submit
        except ImportError:
            _fail("--launcher submitit: needs submitit (pip install 'ablate[slurm]')")
        from .torchrun import rank_problems

        problem = rank_problems(g.cells, ranks_per_task or max(1, gpus_per_node), _trained(store))
        if problem:
            _fail(f"{g.path}: {problem} (--ranks-per-task, or --gpus-per-node)")
        code = main_submit(g, store.root, wait_for_jobs=not detach, progress=progress, cluster=cluster,
                           partition=partition, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task,
                           mem_gb=mem_gb, timeout_min=timeout_min, array_parallelism=slurm_array_parallelism,
                           retry_failed=retry_failed, ranks_per_task=ranks_per_task)
        if not detach and code in (0, 1):
            _show_results(g, store)
        sys.exit(code)
    if jobs != 1 or jobs_per_gpu != 1:
        _run_jobs(g, store, jobs, jobs_per_gpu, retry_failed, progress, wait_s)
        return
    from .runner import RunStopped

    try:
        with _ranks(device):
            summary = run_grid(g, store, retry_failed=retry_failed, progress=progress, wait_s=wait_s, only=only,
                               report=None if progress else _log_line, **_ranks.execute(device))
    except KeyboardInterrupt:  # 130, as a shell reports SIGINT: not 1, which means a failed cell
        click.echo(f"\ninterrupted: finished measurements are kept in {store.root}; run again to resume",
                   err=True)
        sys.exit(130)
    except RunStopped as e:
        store.write_tables(default_columns())
        _fail(f"stopped: {e}; the failure is recorded and the other cells are left: run again to go on "
              "(--retry-failed to measure it again)", 1)
    store.write_tables(default_columns())
    _print_table(store.table(_grid_cells(store, g)), None, "markdown")
    click.echo(f"\n{summary.measured} measured, {summary.reused} reused, {len(summary.failed)} failed, "
               f"{len(summary.busy)} held by another process; table: {store.root / 'table.csv'}")
    for cell, name, err in summary.failed:
        click.echo(f"failed: {cell}: {name}: {err}", err=True)
    for cell, name in summary.busy:
        click.echo(f"not done: {cell}: {name}: still held by another process after {wait_s:g} s; "
                   "run again to finish it", err=True)
    if summary.failed or summary.busy:
        sys.exit(1)


def _choose_log(log: str | None) -> None:
    """``--log``, checked (a missing package is one line), for this process and those it
    starts (workers, SLURM tasks, torchrun ranks), which inherit the environment."""
    import os

    from .watch import LOG_ENV, WatchUnavailable, backends, check_available

    try:
        names = backends(log)
        check_available(names)
    except ValueError as e:
        _fail(f"--log: {e}")
    except WatchUnavailable as e:
        _fail(str(e))
    os.environ[LOG_ENV] = ",".join(names) or "none"


@main.command()
@click.argument("grid", required=False)
@click.option("--results", metavar="DIR", help="Results folder (default: results/<grid name>).")
@click.option("--watch", "every", type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="Show it again every SECONDS, until Ctrl-C.")
def status(grid, results, every):
    """What each cell of GRID (default: quick) is doing now: done, running (which process
    holds it: host, pid, since when; its training step, rate and time left), failed or
    pending. Reads the results folder only, so it runs from any machine that sees it (a
    login node) and starts and writes nothing."""
    import time

    from .status import grid_status, render

    g = _load(grid)
    store = _open_store(_results_dir(results, g.name), set_aside=False)
    try:
        while True:
            text = render(grid_status(g, store), store.root)
            if every and sys.stdout.isatty():
                click.clear()
            click.echo(text)
            if not every:
                return
            time.sleep(every)
            click.echo()
    except KeyboardInterrupt:  # the way out of --watch
        return


def _log_line(event: str, step) -> None:
    """Without progress bars (a log file, a batch job): one line as each measurement starts and ends."""
    import time

    click.echo(f"{time.strftime('%H:%M:%S')} {event:6} {step.label}: {step.name}")


def _grid_device(g) -> str:
    """The one device setting of a grid run under torchrun (it picks the backend: gloo or nccl)."""
    from .cell import resolve_device

    devices = {c["device"] for c in g.cells}
    if len({resolve_device(d).type for d in devices}) > 1:
        _fail(f"under torchrun every cell of {g.name} must use the same kind of device (one backend, gloo "
              f"or nccl, serves them all); it has device: {', '.join(sorted(devices))}")
    return min(devices) if devices else "auto"  # one kind of device: any of them picks the backend alike


def _follow(device: str) -> int:
    from . import torchrun as distributed

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
        from .torchrun import execute

        return {"execute": execute}

    def __enter__(self):
        from . import torchrun as distributed

        if self.device is not None:
            distributed.init(self.device)
        return self

    def __exit__(self, exc_type, exc, tb):
        from . import torchrun as distributed
        from .runner import RunStopped

        # After Ctrl-C the followers may be inside a collective, where an order would hang:
        # the leader just exits, and torchrun ends the other ranks.
        if distributed.world().distributed and (exc_type is None or issubclass(exc_type, RunStopped)):
            distributed.stop_followers()
            distributed.close()
        return False


def _trained(store):
    """Whether a cell's measurement is done already (ok) in ``store``: it runs no more."""
    from .runner import measurement_key

    return lambda config, name: (store.result(measurement_key(config, name)) or {}).get("status") == "ok"


def _open_store(root, set_aside: bool = True, report: bool = True):
    """The results folder, refused in one line if it is a file or links out of itself."""
    from .store import Store, StoreError

    store = Store(root, set_aside=set_aside, warn=report)
    try:
        store.check()
    except StoreError as e:
        _fail(e.strerror)
    return store


def _grid_cells(store, g) -> list[dict]:
    """The records of the grid's cells that are in the folder, with the measurements this
    grid asks for (another grid sharing a cell may have asked for more)."""
    from .cell import cell_id, device_dependent
    from .runner import cell_keys

    stored = {c["id"]: c for c in store.cells()}
    out = []
    for i, c in enumerate(g.cells):
        if (cid := cell_id(c)) not in stored:
            continue
        keys = cell_keys(c)
        # A device-dependent result (timing) measured on another machine (a GPU node's
        # table read on a laptop) is shown from the key that the cell's runner stored.
        for name, key in keys.items():
            theirs = stored[cid].get("measurements", {}).get(name)
            if theirs and theirs != key and device_dependent(name) and store.result(key) is None:
                keys[name] = theirs
        out.append({"id": cid, "index": i, "config": c, "measurements": keys})
    return out


def _holdings(store) -> str:
    """'4 cells of grid 'quick', 2 cells of grid 'other'' for a message."""
    from collections import Counter

    count = Counter(name for c in store.cells() for name in (c.get("grids") or ["(unnamed)"]))
    if not count:
        return "no cells"
    return ", ".join(f"{n} cells of grid {name!r}" for name, n in count.most_common())


def _show_results(g, store, head: str = ""):
    """Write the tables and print the grid's rows, what failed and what is left."""
    from .launch import failures, pending, stored_cells
    from .measure import default_columns

    store.write_tables(default_columns())
    cells = stored_cells(g, store)  # as their runners stored them: a timing's key names their device
    if cells:
        _print_table(store.table(cells), None, "markdown")
    failed = failures(g, store)
    left = sum(len(m) for _, m in pending(g, store, here=False))
    click.echo(f"\n{head}{len(failed)} failed, {left} pending; table: {store.root / 'table.csv'}")
    for cell, name, err in failed:
        click.echo(f"failed: {cell}: {name}: {err}", err=True)


def _run_worker(g, store, worker: str, retry_failed: bool, wait_s: float):
    """One worker of `ablate run --jobs N`: measures, tells the parent what it does, and
    leaves the table to the parent."""
    from .launch import worker_report, worker_summary
    from .runner import run_grid

    i, n = map(int, worker.split("/"))
    summary = run_grid(g, store, retry_failed=retry_failed, progress=False, wait_s=wait_s, worker=(i, n),
                       report=worker_report(i))
    worker_summary(summary)
    sys.exit(1 if summary.failed else 0)


def _run_jobs(g, store, jobs: int, jobs_per_gpu: int, retry_failed: bool, progress: bool, wait_s: float):
    from .launch import run_jobs

    try:
        summary = run_jobs(g, store.root, jobs, jobs_per_gpu=jobs_per_gpu, retry_failed=retry_failed,
                           progress=progress, wait_s=wait_s)
    except ConfigError as e:
        _fail(str(e))
    _show_results(g, store, f"{summary.measured} measured by {jobs} workers, ")
    if summary.interrupted:
        sys.exit(130)
    if summary.failed or summary.pending or summary.crashed:
        sys.exit(1)


def _print_table(df, columns, fmt, output=None):
    if columns is None:
        from .measure import default_columns
        from .store import shown_columns

        columns = shown_columns(df, default_columns())
    df = df[columns]
    if fmt == "markdown":
        text = df.to_markdown(index=False, floatfmt=".4g")
    elif fmt == "csv":
        text = df.to_csv(index=False)
    elif fmt == "json":
        text = df.to_json(orient="records", indent=1)
    else:
        if not output:
            _fail("--format parquet needs --output FILE")
        try:
            df.to_parquet(output, index=False)
        except (OSError, ImportError) as e:
            _fail(f"--output {output}: {one_line(e)}")
        return
    if output:
        try:
            Path(output).write_text(text + "\n")
        except OSError as e:
            _fail(f"--output {output}: {e.strerror or e}")
    else:
        click.echo(text)


@main.command()
@click.argument("grid", required=False)
@click.option("--results", metavar="DIR", help="Results folder (default: results/<grid name>).")
@click.option("--query", "-q", metavar="EXPR",
              help="Rows where EXPR is true, e.g. \"block == 'adaln-zero' and patch_size == 2\": column "
                   "names, literals, comparisons, in, and/or/not, arithmetic; nothing else.")
@click.option("--columns", "-c", metavar="COLS",
              help="Comma-separated columns (default: a summary; 'all' for every column).")
@click.option("--pivot", metavar="INDEX:COLUMNS:VALUES", help="e.g. model:block:gflops.")
@click.option("--sort", metavar="COLS", help="Comma-separated columns to sort by.")
@click.option("--format", "-f", "fmt", type=click.Choice(FORMATS), default="markdown", show_default=True)
@click.option("--output", "-o", metavar="FILE", help="Write to FILE instead of the terminal.")
def table(grid, results, query, columns, pivot, sort, fmt, output):
    """Show the results of GRID (default: quick) as one table, one row per cell; with
    --results DIR and no GRID, every cell in DIR.

    Columns are the cell's settings (model, block, patch_size, seed, train.lr, ...), every
    metric (gflops, params, fwd_ms, step_img_per_s, final_loss, ...), status, error and
    the environment (device_name, torch_version, git_rev, ...).
    """
    import pandas as pd

    from .grid import find_grid

    if grid is None and results is not None:
        g = None  # every cell in the folder
    else:
        g = _load(grid) if find_grid(grid).is_file() else None
    named_only = results is None
    if results is None:
        results = _results_dir(None, g.name if g else str(grid))
    store = _open_store(results, set_aside=False)
    if not (store.root / "cells").is_dir():
        if grid is not None and g is None and named_only:  # a name that is neither a grid nor a results folder
            from .grid import EXPERIMENTS
            from .registry import did_you_mean

            known = sorted({p.stem for p in EXPERIMENTS.glob("*.yaml")}
                           | {p.name for p in Path("results").glob("*") if (p / "cells").is_dir()})
            _fail(f"{grid}: no such grid (a YAML file, a built-in grid or a folder of results/)"
                  f"{did_you_mean(str(grid), known)}; known here: {', '.join(known)}")
        _fail(f"{store.root}: no results here (run `ablate run` first, or pass --results DIR)")
    if g is None:
        df = store.table()
    else:  # the grid's cells as the file now defines them, with what it asks of them
        cells = _grid_cells(store, g)
        if not cells:
            _fail(f"{store.root}: none of the {len(g.cells)} cells of grid {g.name!r} is here; "
                  f"it holds {_holdings(store)} (`ablate table --results {store.root}` shows them all)")
        df = store.table(cells)
    if query is not None:
        from .query import QueryError, filter_rows

        try:
            df = filter_rows(df, query)
        except QueryError as e:
            _fail(f"--query {query!r}: {e}")
    if sort:
        keys = sort.split(",")
        _check_columns(keys, df, "--sort")
        df = df.sort_values(keys)
    if pivot:
        parts = pivot.split(":")
        if len(parts) != 3 or len(set(parts)) != 3:
            _fail(f"--pivot {pivot!r}: expected INDEX:COLUMNS:VALUES, three different columns, "
                  "e.g. model:block:gflops")
        _check_columns(parts, df, "--pivot")
        numeric = pd.api.types.is_numeric_dtype(df[parts[2]])
        try:
            df = pd.pivot_table(df, index=parts[0], columns=parts[1], values=parts[2],
                                aggfunc="mean" if numeric else "first", sort=False).reset_index()
        except (TypeError, ValueError) as e:
            _fail(f"--pivot {pivot!r}: {one_line(e)}")
        df.columns = [str(c) for c in df.columns]
        columns = ",".join(df.columns) if columns is None else columns
    if columns == "all":
        cols = list(df.columns)
    elif columns:
        cols = columns.split(",")
        _check_columns(cols, df, "--columns")
    else:
        cols = None
    _print_table(df, cols, fmt, output)


def _check_columns(cols, df, option):
    from .registry import did_you_mean

    for c in cols:
        if c not in df.columns:
            _fail(f"{option}: no column {c!r}{did_you_mean(c, [str(x) for x in df.columns])}")


@main.command(name="fid")
@click.argument("input1")
@click.argument("input2")
@click.option("--extractor", "-e", default="auto", show_default=True, metavar="NAME",
              help="inception (standard FID), domain (a CNN trained on the dataset), or auto: domain for "
                   "digits and mnist, else inception.")
@click.option("--samples", "-n", type=int, metavar="N", help="Use a fixed random N images of each input.")
@click.option("--image-size", type=click.IntRange(min=1), metavar="PX",
              help="Size of a dataset input (default: the other input's, if a folder, else the dataset's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per batch for features.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--format", "-f", "fmt", type=click.Choice(FORMATS[:3]), default="markdown", show_default=True)
def fid_command(input1, input2, extractor, samples, image_size, batch_size, device, fmt):
    """FID, KID and precision/recall between INPUT1 (e.g. generated samples) and INPUT2 (the
    reference), each a folder of images or a dataset name (digits, mnist, ...; dataset:mnist
    where a folder here has that name too). Offline.

    \b
      ablate fid samples/ digits                      # a folder of samples against the digits
      ablate fid a/ b/ --extractor inception -f json  # the standard Inception FID of two folders
    """
    import pandas as pd
    import torch

    from .data import DatasetUnavailable
    from .quality.extractors import ExtractorUnavailable, default_extractor, get_extractor
    from .quality.metrics import quality
    from .quality.sources import SourceError, dataset_name, names_folder, open_source
    from .registry import UnknownName

    if samples is not None and samples < 2:
        _fail(f"--samples: {samples} must be >= 2 (FID needs a covariance)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        _fail(f"--device: {device!r} is not auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        _fail(f"--device: {device!r}: no CUDA device on this machine")
    try:
        # A dataset compared with a folder is taken at the folder's image size unless told otherwise.
        # Different seeds: a dataset against itself compares two random subsets, not one twice.
        first, second = (open_source(x, samples=samples, seed=i) if names_folder(x) else None
                         for i, x in enumerate((input1, input2)))
        size = image_size or next((s.images.shape[-1] for s in (first, second) if s is not None), None)
        first = first or open_source(input1, image_size=size, samples=samples, seed=0)
        second = second or open_source(input2, image_size=size, samples=samples, seed=1)
        dataset = next((dataset_name(x) for x in (input2, input1) if not names_folder(x)), None)
        name = default_extractor(dataset) if extractor == "auto" else extractor
        cfg = None
        if dataset is not None:
            cfg = {"name": dataset, **({"image_size": size} if size else {})}
        ext = get_extractor(name, cfg, progress=True)
        scores = quality(first, second, ext, batch_size=batch_size, device=device)
    except (SourceError, ExtractorUnavailable, DatasetUnavailable, UnknownName, ConfigError, ValueError,
            OSError) as e:
        _fail(one_line(e))
    row = {"input1": first.label, "input2": second.label, **scores, "fid_extractor": ext.label}
    _print_table(pd.DataFrame([row]), list(row), fmt)


@main.command()
@click.argument("grids", nargs=-1, required=True)
def validate(grids):
    """Check grid files without running them: one line per file; exit 2 if any is wrong."""
    bad = False
    for grid in grids:
        try:
            g = _load_or_raise(grid)
        except ConfigError as e:
            click.echo(f"error: {e}", err=True)
            bad = True
            continue
        click.echo(f"{grid}: ok, {len(g.cells)} cells, axes: {', '.join(g.axes) or 'none'}; "
                   f"measure: {', '.join(g.cells[0]['measure'])}")
    if bad:
        sys.exit(2)


@main.command()
@click.argument("grid", required=False)
@click.option("--results", metavar="DIR", help="Results folder (default: results/<grid name>).")
@click.option("--out", metavar="DIR", help="Report folder (default: reports/<grid name>).")
@click.option("--progress/--no-progress", default=True, help="Progress bar (default: on).")
def report(grid, results, out, progress):
    """Write the report of GRID (default: quick): report.md, a self-contained report.html, and
    each figure as PNG and SVG.

    \b
    FID over training steps per block design, Gflops against FID, cost beside the paper's
    Table 4, loss curves and samples, and a summary (mean ± std over seeds) saying whether
    the paper's ordering of the blocks held. Figures a grid has no metrics for are left out
    with the reason. A GRID that is not a file but has a results folder reports every cell
    there.
    """
    from .cell import cell_id
    from .grid import EXPERIMENTS, find_grid
    from .registry import did_you_mean
    from .report import ReportError, write_report
    from .store import Store

    path = find_grid(grid)
    looks_like_path = grid is not None and (Path(grid).suffix in (".yaml", ".yml") or "/" in grid)
    g = _load(grid) if path.is_file() or looks_like_path else None
    name = g.name if g else grid
    store = Store(_results_dir(results, name))
    if g is None and not (store.root / "cells").is_dir():
        shipped = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
        _fail(f"{grid}: unknown grid: no such file, no experiments/{grid}.yaml and no results/{grid}/"
              f"{did_you_mean(grid, shipped)}; shipped grids: {', '.join(shipped)}")
    if not (store.root / "cells").is_dir():
        how = f"ablate run {grid}" if grid else "ablate run"
        _fail(f"{store.root}: no results here (run `{how}` first, or pass --results DIR)")
    try:
        md = write_report(store, Path(out) if out else Path("reports") / name, name=name,
                          description=g.description if g else "",
                          cell_ids={cell_id(c) for c in g.cells} if g else None, progress=progress)
    except ReportError as e:
        _fail(str(e))
    except OSError as e:  # an --out that cannot be written
        _fail(f"--out {e.filename or out}: {e.strerror or e}")
    click.echo(f"report: {md} and {md.with_suffix('.html')}")


@main.command(name="ls")
@click.argument("what", required=False,
                type=click.Choice(["models", "sizes", "blocks", "datasets", "measurements", "grids"]))
def ls(what):
    """List what a grid can name (models, sizes, blocks, datasets, measurements) and the
    built-in grids that `ablate run NAME` runs."""
    from tabulate import tabulate

    from .data import DATASETS
    from .grid import shipped_grids
    from .measure import MEASURES
    from .models import BLOCKS, MODELS, SIZES

    tables = {
        "sizes": (["size", "depth", "hidden_size", "num_heads"],
                  [[n, s.depth, s.hidden_size, s.num_heads] for n, s in SIZES.items()]),
        "models": (["model", "size", "patch_size"], [[n, *v] for n, v in MODELS.items()]),
        "blocks": (["block", "description"], [[n, _doc(c)] for n, c in BLOCKS.items()]),
        "datasets": (["dataset", "description"], [[n, _doc(f)] for n, f in DATASETS.items()]),
        "measurements": (["measurement", "settings section", "needs", "description"],
                         [[n, n if m.settings else "", ", ".join(m.needs), m.doc] for n, m in MEASURES.items()]),
        "grids": (["grid", "description", "file"],
                  [[n, _grid_description(p), str(p)] for n, p in shipped_grids().items()]),
    }
    for name in ([what] if what else ["models", "sizes", "blocks", "datasets", "measurements", "grids"]):
        headers, rows = tables[name]
        click.echo(tabulate(rows, headers=headers) + "\n")


def _grid_description(path) -> str:
    import yaml

    try:
        return str(yaml.safe_load(path.read_text(encoding="utf-8")).get("description", ""))
    except Exception:  # noqa: BLE001  -- a listing, not a validation: `ablate validate` says what is wrong
        return ""


def _doc(obj) -> str:
    return " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())


if __name__ == "__main__":
    main()
