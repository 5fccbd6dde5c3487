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
as written in the file, and the value. A key given twice in a mapping is such a mistake, and
so is a file too large to be a grid: more than MAX_YAML_NODES values once its aliases are
expanded, or more than MAX_COMBINATIONS combinations of its axes (refused before any is made).
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import itertools
import math
import os
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from .registry import did_you_mean
from .cell import IMPLIED_BY, cell_id, resolve
from .settings import ConfigError, deep_merge

TOP_KEYS = ("name", "description", "include", "imports", "grid", "exclude", "base")
LARGE_GRID = 2_000  # combinations; checking each cell takes about half a millisecond
CHECK_S = 5e-4


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


MAX_YAML_NODES = 200_000  # values in a grid file once its aliases are expanded: a billion laughs is refused
MAX_COMBINATIONS = 100_000  # a grid's cells before exclusions: checked at about half a millisecond each
MAX_YAML_BYTES = 4 * 2**20


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that names a key twice (YAML says keys are
    unique; PyYAML keeps the last silently) and a document whose aliases expand past
    MAX_YAML_NODES values (a few hundred bytes can otherwise expand to gigabytes)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # PyYAML says so itself
            if key in seen:
                raise _Duplicate(key, key_node.start_mark, seen[key])
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node)
        return node


class _Duplicate(Exception):
    def __init__(self, key, mark, first):
        self.key, self.mark, self.first = key, mark, first


class _TooLarge(Exception):
    pass


def _expanded_size(root) -> int:
    """The number of values ``root`` stands for with every alias expanded, counted once per
    node (memoised), without recursion; a node inside itself counts once (``_acyclic`` says so)."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes and not done:
            continue
        children = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        if not done:
            sizes[id(node)] = 1  # in progress: a cycle through it counts it once
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
        if sizes[id(node)] > MAX_YAML_NODES:
            raise _TooLarge()
    return sizes[id(root)]


def _read_yaml(path: Path, shown: str) -> dict:
    if not path.is_file():
        problem = "no such file" if not path.exists() and not path.is_symlink() else "not a file"
        if path.is_symlink() and not path.exists():
            problem = "a symbolic link to nothing (or a loop of links)"
        raise ConfigError("", problem, file=shown)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError("", f"cannot be read: {e.strerror or e}", file=shown) from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError("", f"{len(raw):,} bytes; a grid file has at most {MAX_YAML_BYTES:,}", file=shown)
    try:
        # Bytes, so the YAML reader decodes UTF-8 (or UTF-16 with a BOM) whatever the locale.
        data = yaml.load(raw, Loader=_Loader)  # noqa: S506  -- a SafeLoader
    except yaml.reader.ReaderError:
        raise ConfigError("", "not a UTF-8 text file", file=shown) from None
    except _Duplicate as e:
        raise ConfigError(str(e.key), f"given twice (line {e.first.line + 1}, column {e.first.column + 1} and line "
                          f"{e.mark.line + 1}, column {e.mark.column + 1}); "
                          "a key may appear once in a mapping", file=shown) from None
    except _TooLarge:
        raise ConfigError("", f"its aliases (*name) expand to more than {MAX_YAML_NODES:,} values; "
                          "a grid file is not that large", file=shown) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"invalid YAML: {where}{problem}", file=shown) from None
    except RecursionError:
        raise ConfigError("", "invalid YAML: nested too deeply", file=shown) from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise ConfigError("", f"invalid YAML: {' '.join(str(e).split())[:200]}", file=shown) from None
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


def set_dotted(d: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[last] = copy.deepcopy(value)


def _real(path: Path) -> str:
    return os.path.realpath(path)  # unlike Path.resolve, no RuntimeError on a loop of links


def _load_raw(path: Path, shown: str, chain: tuple = ()) -> dict:
    """The file's mapping with its includes merged under it; ``chain`` the files that
    include it, outermost first (as (real path, shown) pairs)."""
    data = _read_yaml(path, shown)
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError("include", f"{includes!r} is not a file name or a list of them", file=shown)
    chain = chain + ((_real(path), shown),)
    merged: dict = {}
    for inc in includes:
        inc_path = (path.parent / inc)
        cycle = [s for real, s in chain if real == _real(inc_path)]
        if cycle:
            loop = " -> ".join([s for _, s in chain[[r for r, _ in chain].index(_real(inc_path)):]] + [cycle[0]])
            raise ConfigError("include", f"{inc!r} is {cycle[0]}, which includes this file: a cycle ({loop})"
                              if cycle[0] != shown else f"{inc!r} is this file itself", file=shown)
        try:
            sub = _load_raw(inc_path, str(inc_path), chain)
        except ConfigError as e:
            if e.file == str(inc_path) and not e.key and (
                    e.message in ("no such file", "not a file") or e.message.startswith("a symbolic link to nothing")):
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
        raise err("name", f"{_short(name)} is not a plain folder name: {problem}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise err("description", f"expected text, got {type(description).__name__} {_short(description)}")
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
    if combos > MAX_COMBINATIONS:
        sizes = " x ".join(f"{len(v):,} {k}" for k, v in axes.items())
        raise err("grid", f"{combos:,} combinations ({sizes}); checking them would take about "
                  f"{_duration(combos * CHECK_S)}; a grid has at most {MAX_COMBINATIONS:,}: "
                  "split it into several grids")
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
                raise err(_written_at(e.key, keys, base), e.message) from None
            cid = cell_id(config)
            if cid not in seen_ids:  # two spellings of one cell (DiT-S/2 vs size S + patch 2) run once
                seen_ids.add(cid)
                cells.append(config)
    if not cells:
        raise err("grid", "the grid has no cells (every cell is excluded)" if exclude else "the grid has no cells")
    return Grid(name=name, path=str(path), axes=axes, exclude=exclude, base=base,
                description=description, cells=cells)


def _name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be the results folder results/<name>/, or None. Besides what no
    file system allows, refused: what a terminal shows as nothing or as something else
    (control, format, bidi and zero-width characters, spaces other than the space), so that
    two folder names never look alike, and a name not in Unicode's composed form (NFC)."""
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
    for i, c in enumerate(name):
        category = unicodedata.category(c)
        if category == "Cs":
            return f"character {i + 1} is U+{ord(c):04X}, half of a surrogate pair (not a character)"
        if category in ("Cc", "Zl", "Zp"):
            return f"it contains a control character (U+{ord(c):04X}: a newline, a tab, NUL, ...)"
        if category in ("Cf", "Co", "Cn") or (category == "Zs" and c != " "):
            what = {"Cf": "an invisible formatting character (bidi or zero-width)", "Co": "a private-use character",
                    "Cn": "an unassigned code point", "Zs": "a space other than ' '"}[category]
            return f"character {i + 1} is U+{ord(c):04X}, {what}, which makes a name look like another"
    if unicodedata.normalize("NFC", name) != name:
        return "it is not in composed Unicode form (NFC); the same name written another way would be another folder"
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


def _written_at(key: str, axes: list[str], base: dict) -> str:
    """The key as the user wrote it: under grid: if an axis set it, under base: if base sets
    it, else where the setting it is implied by (``IMPLIED_BY``: patch_size by model) is written."""
    for a in axes:
        if key == a or key.startswith(a + ".") or a.startswith(key + "."):
            return f"grid.{a}"
    if not key:
        return "base"
    node = base
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            origin = IMPLIED_BY.get(key)
            return _written_at(origin, axes, base) if origin else f"base.{key}"
        node = node[part]
    return f"base.{key}"


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _duration(seconds: float) -> str:
    for unit, s in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= s:
            return f"{seconds / s:,.0f} {unit}"
    return f"{seconds:.0f} seconds"
