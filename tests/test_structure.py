"""The shape of the package: a measurement is one file, layers import downwards only,
metric names never overwrite each other or a setting.

The layer rule is read off the import statements themselves (every ``import`` and
``from ... import``, at the top of a module or inside a function, relative ones resolved),
not off ``sys.modules``: an import inside a function runs only when it is called."""
import ast
import textwrap
from pathlib import Path

import pytest

from ablate.grid import load_grid
from ablate.measure import register_measure
from ablate.runner import run_grid
from ablate.store import Store
from conftest import REPO, run_cli

NOTES = Path(__file__).resolve().parent / "plugins" / "notes.py"
PACKAGE = REPO / "ablate"

# The engine: training, sampling, the model and the maths, the data, quality, collectives,
# devices. It reaches none of the layers above it, which are built on it.
ENGINE = ("train", "step", "sampling", "checkpoint", "models", "diffusion", "data", "quality", "collective",
          "device", "precision")
ABOVE_ENGINE = ("cell", "measure", "runner", "grid", "cli", "launch", "slurm", "report", "torchrun", "store")


def module_sources(root: Path = PACKAGE) -> dict[str, tuple[str, bool]]:
    """Dotted module name -> (source, whether it is a package's __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path.read_text(), package)
    return out


def imported(name: str, source: str, package: bool, modules) -> set[str]:
    """The modules of ``modules`` that ``source`` (module ``name``) imports anywhere in it;
    importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` too, so they count."""
    here = name if package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            targets.add(mod)
            targets |= {f"{mod}.{alias.name}" for alias in node.names}  # from pkg import submodule
    found = set()
    for t in targets:
        parts = t.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(modules)
    return found - {name}


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    return {name: imported(name, src, package, sources) for name, (src, package) in sources.items()}


def path_to(graph: dict[str, set[str]], start: str, goals: set[str]) -> list[str] | None:
    """The first import chain from ``start`` to a module in ``goals`` (breadth first), or None."""
    seen, frontier = {start: [start]}, [start]
    while frontier:
        nxt = []
        for m in frontier:
            for dep in sorted(graph.get(m, ())):
                if dep in seen:
                    continue
                seen[dep] = seen[m] + [dep]
                if dep in goals:
                    return seen[dep]
                nxt.append(dep)
        frontier = nxt
    return None


def within(graph, names) -> set[str]:
    """The modules named ``ablate.<name>`` and, for a package, its submodules."""
    return {m for m in graph for n in names if m == f"ablate.{n}" or m.startswith(f"ablate.{n}.")}


def layer_violations(graph, lower, upper) -> list[list[str]]:
    goals = within(graph, upper)
    return [p for m in sorted(within(graph, lower)) if (p := path_to(graph, m, goals))]


def test_the_engine_reaches_no_layer_above_it():
    graph = import_graph(module_sources())
    assert within(graph, ENGINE) >= {"ablate.train", "ablate.sampling", "ablate.checkpoint", "ablate.collective",
                                     "ablate.device", "ablate.quality.extractors", "ablate.models.dit"}
    assert layer_violations(graph, ENGINE, ABOVE_ENGINE) == []


def test_the_runner_reaches_neither_the_launchers_nor_the_torchrun_protocol():
    graph = import_graph(module_sources())
    assert "ablate.torchrun" in graph and "ablate.cell" in graph["ablate.torchrun"]
    assert layer_violations(graph, ["runner"], ["torchrun", "cli", "launch", "slurm"]) == []


def test_collectives_and_devices_import_only_torch_and_the_standard_library():
    import sys

    for name in ("collective", "device", "paths"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        assert not any(n.level for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)), name
        assert roots - {"__future__", "torch"} <= set(sys.stdlib_module_names), (name, roots)


def test_an_inversion_inside_a_function_or_through_a_package_is_found():
    """The check itself, on a planted package: a lazy import in a function, a relative import
    two levels up, and an import of a submodule (which runs its package's __init__)."""
    planted = {
        "ablate": ("", True),
        "ablate.step": ("import torch\n\ndef f():\n    from .cell import Cell\n", False),
        "ablate.cell": ("from .measure.timing import x\n", False),
        "ablate.measure": ("", True),
        "ablate.measure.timing": ("from ..step import f\n", False),
        "ablate.models": ("from . import dit\n", True),
        "ablate.models.dit": ("def g():\n    from ..measure import flops\n", False),
        "ablate.measure.flops": ("", False),
        "ablate.data": ("import ablate.report.figures\n", False),
        "ablate.report": ("", True),
        "ablate.report.figures": ("", False),
        "ablate.diffusion": ("import math\nfrom .precision import x\n", False),
        "ablate.precision": ("import torch\n", False),
    }
    graph = import_graph(planted)
    assert graph["ablate.step"] == {"ablate", "ablate.cell"}  # the package's __init__ runs first
    assert graph["ablate.measure.timing"] == {"ablate", "ablate.step"}
    assert graph["ablate.models.dit"] == {"ablate", "ablate.measure", "ablate.measure.flops"}
    assert graph["ablate.data"] == {"ablate", "ablate.report", "ablate.report.figures"}
    assert layer_violations(graph, ENGINE, ABOVE_ENGINE) == [
        ["ablate.data", "ablate.report"], ["ablate.models", "ablate.models.dit", "ablate.measure"],
        ["ablate.models.dit", "ablate.measure"], ["ablate.step", "ablate.cell"]]
    assert path_to(graph, "ablate.diffusion", within(graph, ABOVE_ENGINE)) is None


def test_measurements_import_no_higher_layer():
    graph = import_graph(module_sources())
    assert {"ablate.measure.flops", "ablate.measure.timing", "ablate.measure.training"} <= graph["ablate.measure"]
    assert layer_violations(graph, ["measure"], ["cell", "grid", "runner", "store", "cli", "torchrun", "launch",
                                                  "slurm", "report"]) == []


def test_load_grid_from_python_needs_no_extra_call():
    import subprocess
    import sys

    code = ("import sys; from ablate.grid import load_grid; assert load_grid('experiments/quick.yaml').cells[0]"
            "['measure']; print(' '.join(m for m in sys.modules if m.startswith('ablate')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert "ablate.measure.flops" in out.stdout.split()


def notes_grid(tmp_path, read_note: str = "{}") -> Path:
    p = tmp_path / "notes.yaml"
    p.write_text(textwrap.dedent(f"""
        name: notes
        imports: [{NOTES}]
        grid: {{seed: [0, 1]}}
        base:
          model: DiT-T/4
          data: {{name: digits, image_size: 8}}
          measure: [read_note]
          note: {{text: hi}}
          read_note: {read_note}
        """))
    return p


def test_a_measurement_from_one_file_reads_its_prerequisites_folder(tmp_path):
    results = tmp_path / "results"
    r = run_cli("run", notes_grid(tmp_path), "--results", results, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "4 measured" in r.stdout  # note and read_note, two cells
    df = Store(results).table()
    for _, row in df.iterrows():
        assert row["read_note_text"] == f"hi from {row['cell_id']}"
        assert row["read_note_chars"] == row["note_chars"] == len(f"hi from {row['cell_id']}")
    md = (results / "table.md").read_text().splitlines()[0]  # the default columns, the plugin's too
    assert [c.strip() for c in md.strip("|").split("|")] == ["model", "block", "seed", "status", "note_chars",
                                                              "read_note_text"]


@pytest.mark.parametrize("name, error", [
    ("seed", "metric 'seed' is also the name of a setting"),
    ("read_note.extra_metric", "metric 'read_note.extra_metric' is also the name of a setting"),
    ("note_chars", "metric 'note_chars' is also a metric of note"),
])
def test_a_metric_named_like_a_setting_or_another_metric_fails_the_measurement(tmp_path, name, error):
    store = Store(tmp_path / "results")
    summary = run_grid(load_grid(notes_grid(tmp_path, f"{{extra_metric: {name}}}")), store, progress=False)
    assert summary.measured == 2 and len(summary.failed) == 2  # note ok, read_note refused, per cell
    df = store.table()
    assert set(df["status"]) == {"failed"} and set(df["note_chars"]) == {len("hi from ") + 12}
    assert all(e.startswith(f"read_note: MetricNameClash: {error}") and "\n" not in e for e in df["error"])
    assert "read_note_text" not in df.columns  # nothing of the refused result is stored


def test_a_default_column_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="column 'gflops' is already a column of 'flops'"):
        register_measure("gflops_again", columns=("gflops",))(lambda cell: {})
