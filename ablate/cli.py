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
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _load(grid_arg: str | None):
    from .grid import find_grid, load_grid

    path = find_grid(grid_arg)
    try:
        return load_grid(path, shown=grid_arg or str(path))
    except ConfigError as e:
        _fail(str(e))


def _results_dir(results: str | None, grid_name: str) -> Path:
    return Path(results) if results else Path("results") / grid_name


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
      ablate ls                   # models, blocks, datasets, measurements you can name
      ablate run experiments/dit-paper-gflops.yaml   # the paper's 48 Gflops cells
    """


@main.command()
@click.argument("grid", required=False)
@click.option("--results", metavar="DIR", help="Results folder (default: results/<grid name>).")
@click.option("--dry-run", is_flag=True, help="List the cells and what is left to measure; run nothing.")
@click.option("--retry-failed", is_flag=True, help="Measure again what failed last time.")
@click.option("--progress/--no-progress", default=True, help="Progress bars (default: on).")
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
@click.option("--wait/--no-wait", "wait_for_jobs", default=True,
              help="[submitit] wait for the tasks and show progress (default), or submit and return.")
def run(grid, results, dry_run, retry_failed, progress, jobs, jobs_per_gpu, worker, launcher, cluster, partition,
        gpus_per_node, cpus_per_task, mem_gb, timeout_min, slurm_array_parallelism, wait_for_jobs):
    """Run GRID (a YAML file, or a name in experiments/; default: quick).

    Cells already measured are skipped, interrupted training resumes from its checkpoint,
    and several `ablate run` processes on one results folder share the work. Exits 1 if
    any cell failed (its error is in the table), 2 on bad input.

    \b
    More than one process:
      ablate run GRID --jobs 4                  # 4 workers here (one GPU each where there are GPUs)
      ablate run GRID --launcher submitit --partition gpu --timeout 720   # a SLURM task per cell
    """
    from .cell import cell_id, label
    from .measure import default_columns
    from .runner import cell_keys, run_grid
    from .store import Store

    g = _load(grid)
    store = Store(_results_dir(results, g.name))
    if dry_run:
        from tabulate import tabulate

        rows = []
        for c in g.cells:
            keys = cell_keys(c)
            state = {n: (store.result(k) or {}).get("status", "pending") for n, k in keys.items()}
            rows.append([cell_id(c), label(c), ", ".join(f"{n}:{s}" for n, s in state.items())])
        click.echo(tabulate(rows, headers=["cell_id", "cell", "measurements"]))
        click.echo(f"{len(g.cells)} cells; results in {store.root}")
        return
    if worker:
        _run_worker(g, store, worker, retry_failed)
    slurm_only = {"--cluster": cluster, "--partition": partition, "--cpus-per-task": cpus_per_task,
                  "--mem-gb": mem_gb, "--slurm-array-parallelism": slurm_array_parallelism,
                  "--gpus-per-node": None if gpus_per_node == 1 else gpus_per_node,
                  "--timeout": None if timeout_min == 60 else timeout_min, "--no-wait": None if wait_for_jobs else True}
    given = [opt for opt, v in slurm_only.items() if v is not None]
    if launcher is None and given:
        _fail(f"{given[0]}: only with --launcher submitit")
    if launcher == "submitit":
        if jobs != 1:
            _fail("--jobs: runs workers on this machine; with --launcher submitit each cell is a SLURM task")
        for opt, v in (("--gpus-per-node", gpus_per_node), ("--timeout", timeout_min), ("--cpus-per-task", cpus_per_task),
                       ("--mem-gb", mem_gb), ("--slurm-array-parallelism", slurm_array_parallelism)):
            if v is not None and v <= 0 and not (opt == "--gpus-per-node" and v == 0):
                _fail(f"{opt}: {v} must be > 0")
        try:
            from .slurm import main_submit
        except ImportError:
            _fail("--launcher submitit: needs submitit (pip install 'ablate[slurm]')")
        code = main_submit(g, store.root, wait_for_jobs=wait_for_jobs, progress=progress, cluster=cluster,
                           partition=partition, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task,
                           mem_gb=mem_gb, timeout_min=timeout_min, array_parallelism=slurm_array_parallelism,
                           retry_failed=retry_failed)
        if wait_for_jobs and code in (0, 1):
            _show_results(g, store)
        sys.exit(code)
    if jobs != 1 or jobs_per_gpu != 1:
        _run_jobs(g, store, jobs, jobs_per_gpu, retry_failed, progress)
        return
    summary = run_grid(g, store, retry_failed=retry_failed, progress=progress)
    df = store.write_tables(default_columns())
    _print_table(df[df["cell_id"].isin([cell_id(c) for c in g.cells])], None, "markdown")
    click.echo(f"\n{summary.measured} measured, {summary.reused} reused, {len(summary.failed)} failed, "
               f"{len(summary.busy)} held by another process; table: {store.root / 'table.csv'}")
    for cell, name, err in summary.failed:
        click.echo(f"failed: {cell}: {name}: {err}", err=True)
    if summary.failed:
        sys.exit(1)


def _show_results(g, store, head: str = ""):
    """Write the tables and print the grid's rows, what failed and what is left."""
    from .cell import cell_id
    from .launch import failures, pending
    from .measure import default_columns

    df = store.write_tables(default_columns())
    if len(df):
        _print_table(df[df["cell_id"].isin([cell_id(c) for c in g.cells])], None, "markdown")
    failed = failures(g, store)
    left = sum(len(m) for _, m in pending(g, store, here=False))
    click.echo(f"\n{head}{len(failed)} failed, {left} pending; table: {store.root / 'table.csv'}")
    for cell, name, err in failed:
        click.echo(f"failed: {cell}: {name}: {err}", err=True)


def _run_worker(g, store, worker: str, retry_failed: bool):
    """One worker of `ablate run --jobs N`: measures, tells the parent what it does, and
    leaves the table to the parent."""
    from .launch import worker_report, worker_summary
    from .runner import run_grid

    i, n = map(int, worker.split("/"))
    summary = run_grid(g, store, retry_failed=retry_failed, progress=False, worker=(i, n),
                       report=worker_report(i))
    worker_summary(summary)
    sys.exit(1 if summary.failed else 0)


def _run_jobs(g, store, jobs: int, jobs_per_gpu: int, retry_failed: bool, progress: bool):
    from .launch import run_jobs

    try:
        summary = run_jobs(g, store.root, jobs, jobs_per_gpu=jobs_per_gpu, retry_failed=retry_failed,
                           progress=progress)
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
              help="pandas query, e.g. \"block == 'adaln-zero' and patch_size == 2\".")
@click.option("--columns", "-c", metavar="COLS",
              help="Comma-separated columns (default: a summary; 'all' for every column).")
@click.option("--pivot", metavar="INDEX:COLUMNS:VALUES", help="e.g. model:block:gflops.")
@click.option("--sort", metavar="COLS", help="Comma-separated columns to sort by.")
@click.option("--format", "-f", "fmt", type=click.Choice(FORMATS), default="markdown", show_default=True)
@click.option("--output", "-o", metavar="FILE", help="Write to FILE instead of the terminal.")
def table(grid, results, query, columns, pivot, sort, fmt, output):
    """Show the results of GRID (default: quick) as one table, one row per cell.

    Columns are the cell's settings (model, block, patch_size, seed, train.lr, ...), every
    metric (gflops, params, fwd_ms, step_img_per_s, final_loss, ...), status, error and
    the environment (device_name, torch_version, git_rev, ...).
    """
    import pandas as pd

    from .cell import cell_id
    from .grid import find_grid
    from .store import Store

    g = _load(grid) if find_grid(grid).is_file() else None
    if results is None:
        results = _results_dir(None, g.name if g else str(grid))
    store = Store(results)
    if not (store.root / "cells").is_dir():
        _fail(f"{store.root}: no results here (run `ablate run` first, or pass --results DIR)")
    df = store.table()
    if g is not None and len(df):  # the grid's cells as the file now defines them
        df = df[df["cell_id"].isin({cell_id(c) for c in g.cells})]
    if query:
        try:
            df = df.query(query)
        except Exception as e:  # noqa: BLE001  -- pandas raises many kinds
            _fail(f"--query {query!r}: {one_line(e)}{_column_hint(e, df)}")
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


def _column_hint(err, df) -> str:
    from .registry import did_you_mean

    if "is not defined" in str(err):
        word = str(err).split("'")[1] if "'" in str(err) else ""
        return did_you_mean(word, [str(c) for c in df.columns])
    return ""


@main.command()
@click.argument("grids", nargs=-1, required=True)
def validate(grids):
    """Check grid files without running them: one line per file."""
    for grid in grids:
        g = _load(grid)
        click.echo(f"{grid}: ok, {len(g.cells)} cells, axes: {', '.join(g.axes) or 'none'}; "
                   f"measure: {', '.join(g.cells[0]['measure'])}")


@main.command(name="ls")
@click.argument("what", required=False,
                type=click.Choice(["models", "sizes", "blocks", "datasets", "measurements"]))
def ls(what):
    """List what a grid can name: models, sizes, blocks, datasets, measurements."""
    from tabulate import tabulate

    from .data import DATASETS
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
    }
    for name in ([what] if what else ["models", "sizes", "blocks", "datasets", "measurements"]):
        headers, rows = tables[name]
        click.echo(tabulate(rows, headers=headers) + "\n")


def _doc(obj) -> str:
    return " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())


if __name__ == "__main__":
    main()
