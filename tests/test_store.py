"""The results store: nothing lost, nothing done twice, failures become rows."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd

from ablate.files import write_json
from ablate.store import Store, flatten
from conftest import PROBE, probe_grid



def start(grid, results, log, *extra):
    env = {**os.environ, "ABLATE_PROBE_LOG": str(log), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ablate.cli", "run", str(grid), "--results", str(results),
                             "--no-progress", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def events(log: Path):
    lines = log.read_text().splitlines() if log.exists() else []
    return [tuple(line.split()[:2]) for line in lines]


def test_atomic_write_leaves_no_partial_file(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary files left


def test_flatten_dotted_columns():
    assert flatten({"train": {"lr": 1e-4, "steps": 5}, "measure": ["flops", "train"], "seed": 0}) == {
        "train.lr": 1e-4, "train.steps": 5, "measure": "flops,train", "seed": 0}


def test_claim_is_exclusive_between_processes(tmp_path):
    store = Store(tmp_path)
    code = ("import sys; from ablate.store import Store\n"
            f"with Store({str(tmp_path)!r}).claim('probe-0123456789ab') as mine: print(mine)")
    with store.claim("probe-0123456789ab") as mine:
        assert mine
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.stdout.strip() == "False"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert other.stdout.strip() == "True"  # released when its holder let go


def test_resume_after_kill_9_finishes_every_cell_exactly_once(tmp_path):
    grid = probe_grid(tmp_path, "{seed: [0, 1, 2]}", "{sleep_s: 1.5}")
    results, log = tmp_path / "results", tmp_path / "log"
    proc = start(grid, results, log)
    deadline = time.time() + 120
    while sum(e[0] == "start" for e in events(log)) < 2:  # first cell done, second in flight
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = events(log)[-1][1]
    assert Store(results).table()["status"].tolist().count("ok") == 1  # the store loads after kill -9
    again = start(grid, results, log)
    assert again.wait(timeout=120) == 0, again.stderr.read()
    ev = events(log)
    done = [rid for kind, rid in ev if kind == "done"]
    assert len(done) == 3 and len(set(done)) == 3  # every cell finished exactly once
    starts = [rid for kind, rid in ev if kind == "start"]
    assert starts.count(killed) == 2 and len(starts) == 4  # only the interrupted one was redone
    df = Store(results).table()
    assert sorted(df["probe_value"]) == [0.0, 1.0, 2.0] and set(df["status"]) == {"ok"}
    # A third run finds everything done and measures nothing.
    third = start(grid, results, log)
    assert third.wait(timeout=120) == 0
    assert "0 measured, 3 reused" in third.stdout.read()
    assert len(events(log)) == len(ev)


def test_two_concurrent_runners_neither_duplicate_nor_lose(tmp_path):
    grid = probe_grid(tmp_path, "{seed: [0, 1, 2, 3, 4, 5]}", "{sleep_s: 0.4}")
    results, log = tmp_path / "results", tmp_path / "log"
    a, b = start(grid, results, log), start(grid, results, log)
    assert a.wait(timeout=180) == 0 and b.wait(timeout=180) == 0
    ev = events(log)
    done = [rid for kind, rid in ev if kind == "done"]
    assert len(done) == 6 and len(set(done)) == 6
    pids = {line.split()[2] for line in log.read_text().splitlines()}
    assert pids <= {str(a.pid), str(b.pid)}  # the runners measured, nobody else
    measured = [int(re.search(r"(\d+) measured", p.stdout.read()).group(1)) for p in (a, b)]
    assert sum(measured) == 6  # each cell counted by exactly one runner
    df = Store(results).table()
    assert len(df) == 6 and set(df["status"]) == {"ok"}


def test_a_failing_cell_is_a_row_and_the_others_go_on(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(textwrap.dedent(f"""
        name: failing
        imports: [{PROBE}]
        grid:
          probe: [{{fail: false}}, {{fail: true}}, {{nan: true}}]
        base:
          model: DiT-T/4
          data: {{name: digits, image_size: 16}}
          measure: [probe]
        """))
    results, log = tmp_path / "results", tmp_path / "log"
    proc = start(grid, results, log)
    assert proc.wait(timeout=120) == 1
    err = proc.stderr.read()
    assert "RuntimeError: probe failed on purpose" in err and "Traceback" not in err
    df = Store(results).table().sort_values("probe.fail")
    assert sorted(df["status"]) == ["failed", "failed", "ok"]
    errors = set(df["error"])
    assert "probe: RuntimeError: probe failed on purpose" in errors
    assert "probe: FloatingPointError: probe_value is nan" in errors
    assert (results / "table.csv").exists()
    assert len(pd.read_csv(results / "table.csv")) == 3
    # Failed cells are not retried unless asked.
    n = len(events(log))
    assert start(grid, results, log).wait(timeout=120) == 1 and len(events(log)) == n
    assert start(grid, results, log, "--retry-failed").wait(timeout=120) == 1
    assert len(events(log)) == n + 3  # both ran again: start (fail), start + done (nan)


def test_interrupted_training_resumes_and_keeps_the_cost_measurements(tmp_path):
    """kill -9 during training: flops and timing are not measured again, training resumes
    from its checkpoint instead of starting over, and the cell finishes once."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(textwrap.dedent("""
        name: resume
        base:
          model: DiT-T/4
          data: {name: digits, image_size: 8}
          measure: [flops, timing, train]
          timing: {batch_size: 4, precision: fp32, warmup: 1, repeats: 2}
          train: {steps: 200, batch_size: 16, precision: fp32, log_every: 10, checkpoint_every: 20,
                  eval_samples: 4, sample_steps: 5}
        """))
    results, log = tmp_path / "results", tmp_path / "log"
    proc = start(grid, results, log)
    deadline = time.time() + 180
    ckpt = None
    while ckpt is None:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        found = list((results / "work").glob("train-*/checkpoint.pt")) if (results / "work").exists() else []
        ckpt = found[0] if found else None
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import torch

    saved_step = torch.load(ckpt, weights_only=False)["step"]
    assert 20 <= saved_step < 200
    cost = {p.name: p.read_text() for p in (results / "measurements").glob("*.json")}
    assert {n.split("-")[0] for n in cost} == {"flops", "timing"}  # training never finished
    again = start(grid, results, log)
    # generous: a loaded 2-core machine once took over 300 s here; an idle one about 30 s
    assert again.wait(timeout=900) == 0, again.stderr.read()
    assert "2 reused" in again.stdout.read()  # flops and timing
    for name, text in cost.items():
        assert (results / "measurements" / name).read_text() == text  # untouched
    train = [json.loads(p.read_text()) for p in (results / "measurements").glob("train-*.json")]
    assert len(train) == 1 and train[0]["status"] == "ok"
    m = train[0]["metrics"]
    assert m["train_steps"] == 200
    steps_logged = [e["step"] for e in m["log"]]
    assert steps_logged == list(range(10, 201, 10))  # one continuous log across the restart
    assert m["final_loss"] < m["loss_start"]
