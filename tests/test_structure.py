"""The shape of the package: a measurement is one file, layers import downwards only,
metric names never overwrite each other or a setting."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ablate.grid import load_grid
from ablate.measure import register_measure
from ablate.runner import run_grid
from ablate.store import Store
from conftest import REPO, run_cli

NOTES = Path(__file__).resolve().parent / "plugins" / "notes.py"


def imported_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(m for m in sys.modules if m.startswith('ablate')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return set(out.stdout.split())


def test_training_does_not_import_the_measurements():
    assert "ablate.train" in imported_by("import ablate.train")
    assert not any(m.startswith("ablate.measure") for m in imported_by("import ablate.train"))


def test_measurements_import_no_higher_layer():
    mods = imported_by("import ablate.measure")
    assert {"ablate.measure.flops", "ablate.measure.timing", "ablate.measure.training"} <= mods
    assert not mods & {"ablate.cell", "ablate.grid", "ablate.runner", "ablate.store", "ablate.cli"}


def test_load_grid_from_python_needs_no_extra_call():
    mods = imported_by("from ablate.grid import load_grid; "
                       "assert load_grid('experiments/quick.yaml').cells[0]['measure']")
    assert "ablate.measure.flops" in mods


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
