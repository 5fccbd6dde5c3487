"""Grid files: YAML in, validated cells out.

    name: block-ablation        # results go under results/<name>/
    include: base.yaml          # optional: files merged under this one
    imports: [my_blocks.py]     # optional: modules that register your own blocks, sizes, ...
    grid:                       # the cartesian product of these axes (dotted keys allowed)
      model: [DiT-S/2, DiT-S/4]
      block: [adaln-zero, adaln, cross-attn, in-context]
      train.lr: [1.0e-4, 3.0e-4]
    exclude:                    # drop cells matching every key of an entry
      - {model: DiT-S/4, block: cross-attn}
    base:                       # settings shared by every cell
      data: {name: digits, image_size: 32}
      measure: [flops, timing]

Every cell is resolved (``ablate.cell.resolve``) when the file is loaded, so a mistake in
any cell is reported before anything runs, as one ``ConfigError`` naming the file, the key
as written in the file, and the value.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from .registry import did_you_mean
from .cell import cell_id, resolve
from .settings import ConfigError

TOP_KEYS = ("name", "description", "include", "imports", "grid", "exclude", "base")
LARGE_GRID = 2_000  # combinations; checking each cell takes about half a millisecond


def shipped_grids_folder() -> Path:
    """The built-in grids: the package ``ablate.experiments`` of an install (pyproject maps
    it to the repository's experiments/), else experiments/ beside the source tree."""
    # A folder of data files, not a module: a namespace package, so ask for its location.
    spec = importlib.util.find_spec("ablate.experiments")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "quick.yaml").is_file():
            return Path(folder)
    return Path(__file__).resolve().parent.parent / "experiments"  # a source tree on sys.path


EXPERIMENTS = shipped_grids_folder()


def shipped_grids() -> dict[str, Path]:
    """Name -> file of every built-in grid (``ablate ls grids``)."""
    return {p.stem: p for p in sorted(EXPERIMENTS.glob("*.yaml"))}


@dataclass
class Grid:
    name: str
    path: str
    axes: dict[str, list] = field(default_factory=dict)
    exclude: list[dict] = field(default_factory=list)
    base: dict = field(default_factory=dict)
    description: str = ""
    cells: list[dict] = field(default_factory=list)  # resolved settings, one per cell


def find_grid(name_or_path: str | None) -> Path:
    """A path, or the name of a grid shipped in experiments/ (``quick``, ``dit-paper-gflops``)."""
    if name_or_path is None:
        return EXPERIMENTS / "quick.yaml"
    p = Path(name_or_path)
    if p.exists() or p.suffix in (".yaml", ".yml") or "/" in str(name_or_path):
        return p
    shipped = EXPERIMENTS / f"{name_or_path}.yaml"
    return shipped if shipped.exists() else p


def _read_yaml(path: Path, shown: str) -> dict:
    if not path.is_file():
        raise ConfigError("", "no such file" if not path.exists() else "not a file", file=shown)
    try:
        # Bytes, so the YAML reader decodes UTF-8 (or UTF-16 with a BOM) whatever the locale.
        data = yaml.safe_load(path.read_bytes())
    except yaml.reader.ReaderError:
        raise ConfigError("", "not a UTF-8 text file", file=shown) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"invalid YAML: {where}{problem}", file=shown) from None
    except RecursionError:
        raise ConfigError("", "invalid YAML: nested too deeply", file=shown) from None
    if data is None:
        raise ConfigError("", "the file is empty", file=shown)
    if not isinstance(data, dict):
        raise ConfigError("", f"expected a mapping with keys {', '.join(TOP_KEYS)}, got a {type(data).__name__}",
                          file=shown)
    _acyclic(data, "", shown)
    for k in data:
        if k not in TOP_KEYS:
            raise ConfigError(str(k), f"unknown key{did_you_mean(k, TOP_KEYS)}; a grid file has: "
                              f"{', '.join(TOP_KEYS)}", file=shown)
    return data


def _acyclic(value: Any, key: str, shown: str, parents: tuple = (), checked: set | None = None) -> None:
    """An anchor used inside itself (``a: &x [*x]``) makes a value that contains itself."""
    checked = set() if checked is None else checked
    if not isinstance(value, (dict, list)) or id(value) in checked:
        return  # an alias used twice is checked once
    if any(value is p for p in parents):
        raise ConfigError(key, "a YAML alias refers to the anchor it is inside (a value that contains itself)",
                          file=shown)
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        _acyclic(v, f"{key}.{k}" if key and isinstance(value, dict) else f"{key}[{k}]" if key else str(k),
                 shown, parents + (value,), checked)
    checked.add(id(value))


def deep_merge(a: dict, b: dict) -> dict:
    """b over a, recursively for mappings; lists and scalars in b replace a's."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def set_dotted(d: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[last] = copy.deepcopy(value)


def _load_raw(path: Path, shown: str, seen: tuple = ()) -> dict:
    """The file's mapping with its includes merged under it."""
    if path.resolve() in seen:
        raise ConfigError("include", f"{shown} includes itself", file=shown)
    data = _read_yaml(path, shown)
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError("include", f"{includes!r} is not a file name or a list of them", file=shown)
    merged: dict = {}
    for inc in includes:
        inc_path = (path.parent / inc)
        try:
            sub = _load_raw(inc_path, str(inc_path), seen + (path.resolve(),))
        except ConfigError as e:
            if e.file == str(inc_path) and e.message in ("no such file", "not a file"):
                raise ConfigError("include", f"{inc!r}: {e.message}", file=shown) from None
            raise
        merged = _merge_grid_files(merged, sub)
    return _merge_grid_files(merged, data)


def _merge_grid_files(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if k in ("grid", "base") and isinstance(v, dict) and isinstance(a.get(k), dict):
            out[k] = deep_merge(a[k], v) if k == "base" else {**a[k], **v}
        elif k == "exclude" and isinstance(v, list) and isinstance(a.get(k), list):
            out[k] = a[k] + v
        else:
            out[k] = v
    return out


def load_grid(path: str | Path, shown: str | None = None, progress: bool = False) -> Grid:
    """Read, merge includes, validate and expand a grid file. Raises ConfigError.

    With ``progress``, a grid of more than LARGE_GRID combinations says so on stderr before
    checking them (a minute for 100,000) and shows a progress bar on a terminal."""
    path = Path(path)
    shown = shown or str(path)
    raw = _load_raw(path, shown)
    err = lambda key, msg: ConfigError(key, msg, file=shown)  # noqa: E731

    name = raw.get("name", path.stem)
    problem = _name_problem(name)
    if problem:
        raise err("name", f"{name!r} is not a plain folder name: {problem}")
    description = raw.get("description", "")
    import_plugins(raw.get("imports") or [], path.parent, shown)
    axes = raw.get("grid") or {}
    if not isinstance(axes, dict):
        raise err("grid", f"expected a mapping of axis -> list of values, got {axes!r}")
    _string_keys(axes, "grid", err)
    for k, values in list(axes.items()):
        if not isinstance(values, list):
            values = axes[k] = [values]  # a single value is an axis of one
        if not values:
            raise err(f"grid.{k}", "an axis needs at least one value, got []")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise err("base", f"expected a mapping of settings, got {base!r}")
    _string_keys(base, "base", err)
    exclude = raw.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise err("exclude", "expected a list of mappings such as {model: DiT-S/2, block: adaln}")
    for i, entry in enumerate(exclude):
        for k in entry:
            if k not in axes:
                raise err(f"exclude[{i}].{k}", f"not an axis of the grid{did_you_mean(k, list(axes))}; "
                          f"axes: {', '.join(axes) or 'none'}")

    cells, seen_ids = [], set()
    keys = list(axes)
    combos = math.prod(len(v) for v in axes.values())
    if progress and combos > LARGE_GRID:
        print(f"warning: {shown}: {combos:,} combinations of the grid's axes to check; this takes a while",
              file=sys.stderr, flush=True)
    with tqdm(total=combos, desc=f"checking {name}", unit="cell", file=sys.stderr, leave=False,
              disable=None if progress and combos > LARGE_GRID else True) as bar:
        for combo in itertools.product(*(axes[k] for k in keys)):
            bar.update(1)
            point = dict(zip(keys, combo))
            if any(all(_matches(point[k], v) for k, v in e.items()) for e in exclude):
                continue
            settings = copy.deepcopy(base)
            for k, v in point.items():
                set_dotted(settings, k, v)
            try:
                config = resolve(settings)
            except ConfigError as e:
                raise err(_written_at(e.key, keys), e.message) from None
            cid = cell_id(config)
            if cid not in seen_ids:  # two spellings of one cell (DiT-S/2 vs size S + patch 2) run once
                seen_ids.add(cid)
                cells.append(config)
    if not cells:
        raise err("grid", "the grid has no cells (every cell is excluded)" if exclude else "the grid has no cells")
    return Grid(name=name, path=str(path), axes=axes, exclude=exclude, base=base,
                description=description, cells=cells)


def _name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be the results folder results/<name>/, or None."""
    if not isinstance(name, str):
        return f"a name is text, not {type(name).__name__}"
    if not name.strip():
        return "it is empty"
    if name != name.strip():
        return "it begins or ends with a space"
    if any(c in name for c in "/\\"):
        return "it contains a path separator"
    if name.startswith("."):
        return "it begins with '.'"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it contains a control character (a newline, a tab, NUL, ...)"
    if len(name.encode("utf-8")) > 255:
        return f"it is {len(name.encode('utf-8'))} bytes long; a folder name has at most 255"
    return None


def import_plugins(imports, folder: Path, shown: str) -> None:
    """Import user modules (a dotted name or a .py file relative to the grid file) whose
    import registers sizes, blocks, datasets or measurements."""
    if isinstance(imports, str):
        imports = [imports]
    if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
        raise ConfigError("imports", f"{imports!r} is not a module name or a list of them", file=shown)
    for item in imports:
        try:
            if item.endswith(".py"):
                file = (folder / item).resolve()
                name = f"ablate_plugin_{file.stem}_{abs(hash(str(file))) % 10**8}"
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, file)
                if spec is None or not file.is_file():
                    raise ConfigError("imports", f"{item!r}: no such file", file=shown)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:  # half imported: the next grid naming it must import it again
                    sys.modules.pop(name, None)
                    raise
            else:
                importlib.import_module(item)
        except ConfigError:
            raise
        except KeyboardInterrupt:
            raise ConfigError("imports", f"{item!r} raised KeyboardInterrupt while being imported", file=shown) from None
        except SystemExit as e:  # a script's sys.exit() at import time would end ablate silently
            raise ConfigError("imports", f"{item!r} called sys.exit({e.code!r}) while being imported",
                              file=shown) from None
        except Exception as e:  # noqa: BLE001  -- the user's module failed; say so in one line
            raise ConfigError("imports", f"{item!r} failed to import: {type(e).__name__}: {e}", file=shown) from None


def _string_keys(d: dict, where: str, err) -> None:
    """Setting names are text; YAML also allows numbers and booleans as keys."""
    for k, v in d.items():
        if not isinstance(k, str):
            raise err(f"{where}.{k}", f"a setting name must be text, got {k!r}")
        if isinstance(v, dict) and where != "grid":
            _string_keys(v, f"{where}.{k}", err)


def _matches(value: Any, pattern: Any) -> bool:
    return value in pattern if isinstance(pattern, list) else value == pattern


def _written_at(key: str, axes: list[str]) -> str:
    """The key as the user wrote it: under grid: if an axis set it, else under base:."""
    for a in axes:
        if key == a or key.startswith(a + ".") or a.startswith(key + "."):
            return f"grid.{a}"
    return f"base.{key}" if key else "base"
