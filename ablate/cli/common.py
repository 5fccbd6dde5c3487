"""What every command shares: the one-line error, grid loading, the results folder, table output.

A mistake in the input is one line on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import math
import sys
import unicodedata
from pathlib import Path

import click

from ..settings import ConfigError, one_line

FORMATS = ("markdown", "csv", "json", "parquet")


def fail(message: str, code: int = 2):
    if _follower():
        # Under torchrun every rank meets the same mistake and rank 0 says it once. The others
        # leave quietly with 0: a rank that fails makes torchrun stop the rest, which could
        # stop rank 0 before its line is out; rank 0's exit code is the launch's.
        sys.exit(0)
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _follower() -> bool:
    from ..collective import from_env

    try:
        w = from_env()
    except ValueError:
        return False
    return w.distributed and not w.leader


class OneLineErrors(click.Group):
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
            fail(where + " ".join(e.format_message().split()), e.exit_code)
        except click.ClickException as e:
            fail(" ".join(e.format_message().split()), e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def folder_option(ctx, param, value: str | None) -> str | None:
    """A folder the command writes or reads (``--results``, ``--out``): an empty path would
    be read as the current folder, and the file system's root is nobody's results folder."""
    if value is None:
        return None
    option = param.opts[0]
    if not value.strip():
        fail(f"{option} {value!r}: an empty path; name a folder")
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in value):
        fail(f"{option} {value!r}: a control or invisible character in a folder name; name it plainly")
    real = Path(value).resolve()
    if real == Path(real.anchor):
        fail(f"{option} {value}: the root of the file system; name a folder of its own")
    if real.parts[1:2] in (("proc",), ("sys",)):
        fail(f"{option} {value}: under /{real.parts[1]}, the kernel's own files; name a folder of your own")
    blocked = _file_above(Path(value))
    if blocked is not None:
        fail(f"{option} {value}: {blocked} is a file, not a folder")
    return value


def finite_seconds(ctx, param, value: float | None) -> float | None:
    """A duration in seconds: a number >= 0 (``nan`` compares false with every bound, ``inf``
    would wait forever)."""
    if value is not None and (not math.isfinite(value) or value < 0):
        fail(f"{param.opts[0]} {value:g}: not a number of seconds >= 0")
    return value


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` if it is not a folder (nothing can be made under it)."""
    for above in path.parents:
        try:
            if above.exists():
                return None if above.is_dir() else above
        except OSError:  # a name too long, a folder that cannot be read: said when the folder is opened
            return None
    return None


def load(grid_arg: str | None):
    """The grid named on the command line; a wrong one is one line, exit 2."""
    try:
        return load_or_raise(grid_arg)
    except ConfigError as e:
        fail(str(e))


def load_or_raise(grid_arg: str | None):
    from ..grid import find_grid, load_grid

    path = find_grid(grid_arg)
    if not path.exists() and grid_arg is not None and "/" not in grid_arg and path.suffix not in (".yaml", ".yml"):
        raise ConfigError("", f"no such file and no built-in grid of that name{_grids_did_you_mean(grid_arg)}",
                          file=grid_arg)
    return load_grid(path, shown=grid_arg or str(path), progress=True)


def _grids_did_you_mean(name: str) -> str:
    from ..grid import shipped_grids
    from ..registry import did_you_mean

    shipped = sorted(shipped_grids())
    return f"{did_you_mean(name, shipped)}; built-in grids: {', '.join(shipped)}"


def unknown_grid(name: str, known: list[str]) -> None:
    """Refuse a GRID that is neither a file, a built-in grid nor a results folder."""
    from ..registry import did_you_mean

    fail(f"{name}: no such grid (a YAML file, a built-in grid or a folder of results/)"
         f"{did_you_mean(str(name), known)}; known here: {', '.join(known)}")


def results_dir(results: str | None, grid_name: str) -> Path:
    return Path(results) if results is not None else Path("results") / grid_name


def open_store(root, set_aside: bool = True, warn_unreadable: bool = True):
    """The results folder, refused in one line if it is a file or links out of itself."""
    from ..store import Store, StoreError

    store = Store(root, set_aside=set_aside, warn_unreadable=warn_unreadable)
    blocked = _file_above(store.root)
    if blocked is not None:
        fail(f"{store.root}: {blocked} is a file, not a folder")
    try:
        store.check()
    except StoreError as e:
        fail(e.strerror)
    except OSError as e:  # a name longer than the file system allows, a folder that cannot be read
        fail(f"{root}: {e.strerror or e}")
    return store


def print_table(df, columns, fmt, output=None):
    if columns is None:
        from ..measure import default_columns
        from ..store import shown_columns

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
            fail("--format parquet needs --output FILE")
        try:
            df.to_parquet(output, index=False)
        except (OSError, ImportError) as e:
            fail(f"--output {output}: {one_line(e)}")
        return
    if output:
        try:
            Path(output).write_text(text + "\n")
        except OSError as e:
            fail(f"--output {output}: {e.strerror or e}")
    else:
        click.echo(text)


def show_results(g, store, head: str = ""):
    """Write the tables and print the grid's rows, what failed and what is left."""
    from ..measure import default_columns
    from ..results import failures, grid_cells, pending

    store.write_tables(default_columns())
    cells = grid_cells(store, g)
    if cells:
        print_table(store.table(cells), None, "markdown")
    failed = failures(g, store)
    left = sum(len(m) for _, m in pending(g, store, here=False))
    click.echo(f"\n{head}{len(failed)} failed, {left} pending; table: {store.root / 'table.csv'}")
    for cell, name, err in failed:
        click.echo(f"failed: {cell}: {name}: {err}", err=True)
