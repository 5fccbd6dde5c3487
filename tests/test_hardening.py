"""What a hostile results folder, grid file or query cannot do: touch a file outside the
folder, destroy a user's files, hang or fill the memory, or end in a traceback."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from ablate import files
from ablate.cli import main
from ablate.grid import load_grid
from ablate.query import QueryError, filter_rows
from ablate.settings import ConfigError
from ablate.store import Store

CID = "0123456789ab"
KEY = "flops-00112233aabb"
CONFIG = {"model": "DiT-T/4", "block": "adaln", "seed": 0, "measure": ["flops"]}


def cell_record(**over) -> dict:
    return {"id": CID, "index": 0, "config": dict(CONFIG), "measurements": {"flops": KEY}, "grids": ["g"], **over}


def put(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def bounded(code: str, timeout: float = 60, memory_gb: int = 6) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that may use ``memory_gb`` of memory and ``timeout``
    seconds: what would hang or fill the memory fails the test instead of the machine."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory_gb} << 30, {memory_gb} << 30))\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent),
                                                       "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})


# ----- 1. nothing outside the results folder ---------------------------------------------
@pytest.mark.parametrize("key", ["../../outside/notes", "../../outside/notes-00112233aabb", "/tmp/x-0123",
                                 "flops-0011223344556", ".flops-00112233aabb"])
def test_a_key_read_from_a_record_is_never_a_path(tmp_path, key, capsys):
    outside = put(tmp_path / "outside" / "notes.json", "not json, a user's notes")
    put(tmp_path / "outside" / "notes-00112233aabb.json", "not json either")
    results = tmp_path / "results"
    put(results / "cells" / f"{CID}.json", cell_record(measurements={"flops": key}))
    store = Store(results)  # as `ablate run` opens it: unreadable records are set aside
    assert store.table().empty
    assert outside.read_text() == "not json, a user's notes"
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["notes-00112233aabb.json", "notes.json"]
    assert sorted(p.name for p in (results / "cells").iterdir()) == [f"{CID}.json.corrupt"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not flops-<12 hex digits>" in err[0]


@pytest.mark.parametrize("linked", ["work", "work/flops-00112233aabb"])
def test_a_work_folder_replaced_by_a_link_receives_nothing(tmp_path, linked):
    results, outside = tmp_path / "results", tmp_path / "outside"
    store = Store(results)
    work = store.workdir(KEY)
    files.make_folder(work)
    files.write_atomic(work / "checkpoint.pt", "before")
    (results / linked).rename(tmp_path / "moved")
    outside.mkdir()
    (results / linked).symlink_to(outside)  # swapped in while the measurement runs
    for write in (lambda: files.write_atomic(work / "checkpoint.pt", "after"),
                  lambda: files.replace_with(work / "samples.png", lambda f: f.write(b"png")),
                  lambda: files.make_folder(work / "sub"),
                  lambda: files.set_aside(work / "checkpoint.pt")):
        with pytest.raises(files.LinkError, match="symbolic link"):
            write()
    assert list(outside.iterdir()) == []


def test_a_lock_file_is_written_only_if_it_is_a_regular_file_of_one_link(tmp_path):
    results = tmp_path / "results"
    precious = put(tmp_path / "precious.txt", "keep me")
    (results / "locks").mkdir(parents=True)
    os.link(precious, results / "locks" / f"{KEY}.lock")
    with pytest.raises(OSError, match="2 hard links"):
        with Store(results).claim(KEY):
            pass
    os.mkfifo(results / "locks" / "flops-aaaaaaaaaaaa.lock")
    with pytest.raises(OSError, match="a FIFO, not a regular file"):
        with Store(results).claim("flops-aaaaaaaaaaaa"):
            pass
    assert precious.read_text() == "keep me"


@pytest.fixture
def reported(tmp_path, monkeypatch):
    """A grid, its results (from test_report's writer) and a report of them in out/."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_report import write_grid, write_results

    monkeypatch.chdir(tmp_path)
    grid = write_grid(tmp_path, seeds=(0, 1))
    store = write_results(grid, tmp_path / "results", fid=False)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["report", str(grid), "--results", str(store.root), "--out", str(out),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    return grid, store, out


def report(grid, store, out):
    return CliRunner().invoke(main, ["report", str(grid), "--results", str(store.root), "--out", str(out),
                                     "--no-progress"])


def test_report_makes_the_checks_of_run_and_only_reads_the_store(reported, tmp_path):
    grid, store, out = reported
    key = store.cells()[0]["measurements"]["flops"]
    bad = put(store.result_path(key), "{not json")
    r = report(grid, store, out)
    assert r.exit_code == 0 and "unreadable (not JSON" in r.output, r.output
    assert bad.read_text() == "{not json" and not bad.with_name(bad.name + ".corrupt").exists()  # only read
    (store.root / "cells" / "link").symlink_to(tmp_path / "outside")
    r = report(grid, store, out)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "symbolic link" in r.output, r.output


@pytest.mark.parametrize("plant", ["link", "file"])
def test_a_store_folder_that_is_a_link_or_a_file_is_refused_up_front(tmp_path, plant):
    results = tmp_path / "results"
    put(results / "cells" / f"{CID}.json", cell_record())
    (tmp_path / "elsewhere").mkdir()
    (results / "measurements").symlink_to(tmp_path / "elsewhere") if plant == "link" else put(
        results / "measurements", "a file")
    r = CliRunner().invoke(main, ["table", "--results", str(results)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "measurements" in r.output, r.output
    (results / "notes").symlink_to(tmp_path / "elsewhere")  # not the store's: never read nor written
    (results / "measurements").unlink()
    assert CliRunner().invoke(main, ["table", "--results", str(results)]).exit_code == 0


def test_report_never_writes_through_a_planted_link(reported, tmp_path):
    grid, store, out = reported
    victim = put(tmp_path / "victim.png", "a user's picture")
    (out / "cost.png").unlink()
    (out / "cost.png").symlink_to(victim)
    r = report(grid, store, out)
    assert r.exit_code == 2 and "cost.png, a symbolic link" in r.output and len(r.output.strip().splitlines()) == 1, \
        r.output
    assert victim.read_text() == "a user's picture"


# ----- 2. the user's files ----------------------------------------------------------------
def test_an_out_folder_with_files_no_report_wrote_is_refused_and_left_alone(reported, tmp_path):
    grid, store, out = reported
    mine = put(out / "samples" / "mine.txt", "mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = report(grid, store, out)
    assert r.exit_code == 2 and "samples/mine.txt, which no report wrote" in r.output, r.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    mine.unlink()
    assert report(grid, store, out).exit_code == 0  # its own files: replaced
    folder = tmp_path / "notes"
    put(folder / "cost.png", "a user's figure, named like the report's")
    r = report(grid, store, folder)
    assert r.exit_code == 2 and (folder / "cost.png").read_text() == "a user's figure, named like the report's"


@pytest.mark.parametrize("stop_at", ["figures", "writing"])
def test_a_report_is_written_whole_or_not_at_all(reported, monkeypatch, stop_at):
    import ablate.report as rep

    grid, store, out = reported
    stamp = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")}
    calls = []

    def stop(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C (or SIGTERM turned into an exception) halfway
        return "left out here" if stop_at == "figures" else write_new(*args)

    if stop_at == "figures":
        monkeypatch.setattr(rep, "FIGURES", {n: stop for n in rep.FIGURES})
    else:
        write_new = files.write_new
        monkeypatch.setattr(files, "write_new", stop)
    with pytest.raises(KeyboardInterrupt):
        rep.write_report(store, out, name="synth", progress=False)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")} == stamp
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary folder
    monkeypatch.undo()
    assert report(grid, store, out).exit_code == 0
    assert set(json.loads((out / ".ablate-report").read_text())) == {
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != ".ablate-report"}


# ----- 3. bounded work ----------------------------------------------------------------------
def test_queries_that_would_run_for_hours_or_fill_the_memory_are_refused_at_once():
    r = bounded("""
        import time, pandas as pd
        from ablate.query import filter_rows, QueryError
        df = pd.DataFrame({"model": ["DiT-S/2", "DiT-B/2"], "gflops": [6.0, 23.0], "n": [1, 2]})
        for q in ["9 ** 9 ** 9 > 0", "'a' * 10 ** 10 == model", "model * 40000000 == model",
                  "(10 ** 3000) * (10 ** 3000) > 0", "'%0999999999d' % 1 == model", "('ab' * 4000) * 2 == model"]:
            t = time.time()
            try:
                filter_rows(df, q)
                print("evaluated", q)
            except QueryError as e:
                print(round(time.time() - t, 1), e)
    """, timeout=60)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 6, r.stdout + r.stderr
    assert all(line.startswith("0.0 ") and ("at most" in line or "formats it" in line) for line in lines), lines


def test_a_float_beyond_its_range_is_said_in_words(tmp_path):
    df = pd.DataFrame({"gflops": [6.0]})
    with pytest.raises(QueryError, match=r"^a number beyond what a float holds"):
        filter_rows(df, "2.0 ** 10000 > gflops")


def test_queries_within_the_bounds_still_work():
    df = pd.DataFrame({"model": ["ab", "b"], "n": [1, 2]})
    assert filter_rows(df, "model * 2 == 'abab'")["n"].tolist() == [1]
    assert filter_rows(df, "n ** 2 + 2 ** 10 > 1025")["n"].tolist() == [2]
    assert filter_rows(df, "(2 ** 9999 > 2 ** 9998) & (n > 0)")["n"].tolist() == [1, 2]


BILLION_LAUGHS = """name: laughs
base: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]
exclude: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
grid: &c {x: [*b, *b, *b, *b, *b, *b, *b, *b, *b]}
description: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
"""
ALIASED_AXES = ("name: aliased\ngrid:\n  seed: &x [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n"
                + "".join(f"  train.{k}: *x\n" for k in ("steps", "batch_size", "log_every", "eval_every"))
                + "  threads: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n  input_size: &y [16, 32, 48, 64]\n"
                + "  num_classes: *x\nbase: {model: DiT-T/4, measure: [train]}\n")


@pytest.mark.parametrize("text, words", [(BILLION_LAUGHS, "aliases (*name) expand to more than"),
                                         (ALIASED_AXES, "a grid has at most 100,000")],
                         ids=["billion-laughs", "aliased-axes"])
def test_a_small_grid_file_that_expands_to_a_huge_one_is_refused_at_once(tmp_path, text, words):
    path = put(tmp_path / "g.yaml", text)
    assert len(text) < 500
    r = bounded(f"""
        from ablate.grid import load_grid
        from ablate.settings import ConfigError
        try:
            load_grid({str(path)!r})
        except ConfigError as e:
            print(e)
    """, timeout=60)
    assert r.returncode == 0 and words in r.stdout and len(r.stdout.splitlines()) == 1, r.stdout + r.stderr[-2000:]
    if "100,000" in words:
        assert "40,000,000 combinations" in r.stdout and "about 6 hours" in r.stdout


@pytest.mark.parametrize("text, key", [
    ("name: a\nname: b\nbase: {model: DiT-T/4}\n", "name"),
    ("name: a\ngrid: {seed: [0]}\nbase: {model: DiT-T/4}\ngrid: {seed: [1]}\n", "grid"),
    ("name: a\nbase: {model: DiT-T/4, train: {lr: 1.0e-4, lr: 1.0e-3}, measure: [train]}\n", "lr"),
])
def test_a_key_given_twice_is_refused_naming_it_and_the_file(tmp_path, text, key):
    path = put(tmp_path / "twice.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_grid(path)
    assert e.value.file == str(path) and e.value.key == key and "given twice" in e.value.message


@pytest.mark.parametrize("make", [os.mkfifo, lambda p: os.mkdir(p)])
def test_a_fifo_or_folder_named_like_a_record_does_not_block_run_or_table(tmp_path, make):
    results = tmp_path / "results"
    put(results / "cells" / "aaaaaaaaaaaa.json", cell_record(id="aaaaaaaaaaaa"))
    (results / "measurements").mkdir()
    make(results / "cells" / f"{CID}.json")
    make(results / "measurements" / f"{KEY}.json")
    r = bounded(f"""
        from ablate.store import Store
        for set_aside in (False, True):
            store = Store({str(results)!r}, set_aside=set_aside)
            print(len(store.cells()), store.result({KEY!r}))
    """, timeout=30)
    assert r.returncode == 0 and r.stdout.splitlines() == ["1 None", "1 None"], r.stdout + r.stderr
    assert "not a regular file" in r.stderr
    assert (results / "cells" / f"{CID}.json.corrupt").exists()  # run sets it aside; table did not


# ----- 4. records that load but are not records ------------------------------------------------
@pytest.mark.parametrize("record, words", [
    (cell_record(grids=5), "grids is 5"),
    (cell_record(config={**CONFIG, "measure": "flops"}), "config.measure is 'flops'"),
    (cell_record(index="first"), "index is 'first'"),
    (cell_record(id="bbbbbbbbbbbb"), "is not its file name"),
    (cell_record(measurements={"timing": KEY}), "not timing-<12 hex digits>"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (cell_record(config={**CONFIG, "data": json.loads("[" * 200 + "]" * 200)}), "nested more than 64 deep"),
])
def test_a_cell_record_of_the_wrong_shape_is_set_aside_by_run_and_recorded_again(tmp_path, capsys, record, words):
    results = tmp_path / "results"
    path = put(results / "cells" / f"{CID}.json", record)
    assert Store(results, set_aside=False).table().empty  # table: counted as missing, left in place
    assert path.exists()
    store = Store(results)
    assert store.cells() == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(words in line for line in err), err
    assert (results / "cells" / f"{CID}.json.corrupt").exists()
    store.save_cell(CID, CONFIG, {"flops": KEY}, grid="g")  # recorded again, as the grid runs
    assert store.cells()[0]["config"]["measure"] == ["flops"]


@pytest.mark.parametrize("result, words", [
    ({"status": "ok", "metrics": {}, "finished": 5}, "finished is 5"),
    ({"status": "ok", "metrics": {}, "error": ["x"]}, "error is ['x']"),
    ({"status": "ok", "metrics": {}, "env": 3}, "no metrics"),
    ({"status": "ok", "metrics": {}, "key": "flops-ffffffffffff"}, "not its file name"),
])
def test_a_result_of_the_wrong_shape_is_measured_again(tmp_path, capsys, result, words):
    results = tmp_path / "results"
    put(results / "cells" / f"{CID}.json", cell_record())
    put(results / "measurements" / f"{KEY}.json", result)
    df = Store(results).table()
    assert df["status"].tolist() == ["pending"] and df["finished"].tolist() == [""]
    assert words in capsys.readouterr().err
    assert (results / "measurements" / f"{KEY}.json.corrupt").exists()


def test_a_cell_record_under_another_name_is_not_shown_twice(tmp_path):
    results = tmp_path / "results"
    put(results / "cells" / f"{CID}.json", cell_record())
    put(results / "cells" / "copy.json", cell_record())
    assert Store(results, set_aside=False).table()["cell_id"].tolist() == [CID]


# ----- 5. one line, not a traceback -----------------------------------------------------------
@pytest.mark.parametrize("name, words", [
    ('"\\ud800"', "surrogate"), ('"a\\u0085b"', "control character"), ('"a\\u202eb"', "bidi"),
    ('"a\\u200bb"', "zero-width"), ('"a\\u00a0b"', "a space other than"), ('"e\\u0301"', "NFC"),
    ("a" * 256, "at most 255"), ('"' + "\\u00e9" * 128 + '"', "256 bytes long"),
])
def test_a_name_that_is_no_safe_folder_name_is_one_line(tmp_path, name, words):
    path = put(tmp_path / "g.yaml", f"name: {name}\nbase: {{model: DiT-T/4}}\n")
    with pytest.raises(ConfigError) as e:
        load_grid(path)
    assert e.value.key == "name" and words in e.value.message and len(str(e.value)) < 300


@pytest.mark.parametrize("text, key, words", [
    ("name: g\nbase: {model: DiT-T/4, measure: [train], train: {lr: " + "9" * 400 + "}}\n",
     "base.train.lr", "400 digits"),
    ("name: g\nbase: {model: DiT-T/4, measure: [train], train: {steps: " + "9" * 30 + "}}\n",
     "base.train.steps", "30 digits) is beyond any number"),
    ("name: g\ndescription: [a, b]\nbase: {model: DiT-T/4}\n", "description", "expected text"),
    ("name: g\ngrid: {model: [DiT-T/8]}\nbase: {data: {name: digits, image_size: 12}}\n", "grid.model",
     "8 does not divide"),
])
def test_bad_values_are_one_line_naming_where_they_are_written(tmp_path, text, key, words):
    path = put(tmp_path / "g.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_grid(path)
    assert e.value.key == key and words in e.value.message


def test_a_grid_file_that_is_a_link_loop_and_an_include_cycle_are_one_line(tmp_path):
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop2.yaml")
    (tmp_path / "loop2.yaml").symlink_to(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="loop of links"):
        load_grid(tmp_path / "loop.yaml")
    put(tmp_path / "a.yaml", "name: a\ninclude: b.yaml\n")
    put(tmp_path / "b.yaml", "include: a.yaml\nbase: {model: DiT-T/4}\n")
    with pytest.raises(ConfigError) as e:
        load_grid(tmp_path / "a.yaml")
    assert e.value.file == str(tmp_path / "b.yaml") and e.value.key == "include"  # b closes the cycle
    assert "'a.yaml' is " in e.value.message and "a cycle" in e.value.message


def test_backticked_names_are_shown_as_written():
    df = pd.DataFrame({"a`b": [1, 2], "n": [1, 2]})
    assert filter_rows(df, "`a``b` > 1")["n"].tolist() == [2]
    for q in ("``a``b`` > 0", "`a``b` + `n`", "`nope` > 1"):
        with pytest.raises(QueryError) as e:
            filter_rows(df, q)
        assert "_ablate_column" not in str(e.value)
    with pytest.raises(QueryError, match="'`a``b` \\+ `n`' is not a condition|not a condition"):
        filter_rows(df, "(`a``b` + `n`) and `n` > 1")


# ----- 7. temporary files ---------------------------------------------------------------------
def aged(path: Path, text: str = "partial", age_s: float = 3600) -> Path:
    put(path, text)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_temporary_files_a_killed_writer_left_are_removed_by_the_next_run(tmp_path):
    results = tmp_path / "results"
    store = Store(results)
    stale = [aged(results / "measurements" / ".x.json.0011aabb.tmp"),
             aged(results / "cells" / f".{CID}.json.22ff3344.tmp"),
             aged(results / ".table.csv.deadbeef.tmp"),
             aged(store.workdir(KEY) / ".checkpoint.pt.0badcafe.tmp", age_s=0)]  # any age, under the claim
    fresh = aged(results / "measurements" / ".y.json.aaaa0000.tmp", age_s=0)  # being written now
    held = aged(results / "measurements" / ".z.json.bbbb0000.tmp")
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # its writer still writes
    outside = put(tmp_path / "outside.txt", "keep")
    (results / "measurements" / ".w.json.cccc0000.tmp").symlink_to(outside)
    not_ours = aged(results / "measurements" / "notes.tmp")
    store.save_result(KEY, {"status": "ok", "metrics": {}})
    with store.claim(KEY):
        pass
    os.close(fd)
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and held.exists() and not_ours.exists() and outside.read_text() == "keep"
    assert (results / "measurements" / ".w.json.cccc0000.tmp").is_symlink()


def test_a_report_folder_a_killed_report_left_is_removed_by_the_next_report(reported):
    grid, store, out = reported
    stale = out.parent / ".out.0011aabb.tmp"
    put(stale / "cost.png", "half a figure")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert report(grid, store, out).exit_code == 0
    assert not stale.exists()


def test_one_deep_merge_in_the_package():
    package = Path(__file__).parent.parent / "ablate"
    defs = [p for p in package.rglob("*.py") if "def deep_merge" in p.read_text() or "def _deep_merge" in p.read_text()]
    assert [p.name for p in defs] == ["settings.py"]


@pytest.mark.parametrize("edit, words", [
    ({"gflops": "lots"}, "metric gflops is 'lots', not a number"),
    ({"gflops": True}, "metric gflops is 'True', not a number"),
    ({"seed": 5}, "metric 'seed' is also the name of a setting"),
])
def test_a_stored_result_whose_metrics_its_measurement_could_not_return_is_measured_again(tmp_path, edit, words):
    """A record that reads as a result but holds what the measurement never returns (a text
    where it declares a number, a metric named like a setting) is set aside by run and
    measured again: the table never shows it."""
    grid = put(tmp_path / "g.yaml", "name: g\nbase: {model: DiT-T/4, data: {name: digits, image_size: 8}, "
                                    "measure: [flops]}\n")
    results = tmp_path / "r"
    assert CliRunner().invoke(main, ["run", str(grid), "--results", str(results), "--no-progress"]).exit_code == 0
    record, = (results / "measurements").glob("flops-*.json")
    stored = json.loads(record.read_text())
    gflops = stored["metrics"]["gflops"]
    stored["metrics"].update(edit)
    record.write_text(json.dumps(stored))
    r = CliRunner().invoke(main, ["run", str(grid), "--results", str(results), "--no-progress"])
    assert r.exit_code == 0 and words in r.output and "1 measured, 0 reused" in r.output
    assert json.loads(record.read_text())["metrics"]["gflops"] == gflops
    assert json.loads(record.with_name(record.name + ".corrupt").read_text())["metrics"] == stored["metrics"]
