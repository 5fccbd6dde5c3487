"""Beyond one process: `ablate run --jobs N` workers split a grid through the store's claims."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ablate.grid import load_grid
from ablate.launch import pending, plan
from ablate.settings import ConfigError
from ablate.store import Store

PROBE = Path(__file__).resolve().parent / "plugins" / "probe.py"


def probe_grid(tmp_path, axes: str, probe: str = "{}", extra: str = "") -> Path:
    p = tmp_path / "grid.yaml"
    p.write_text(textwrap.dedent(f"""
        name: probe-grid
        imports: [{PROBE}]
        grid: {axes}
        base:
          model: DiT-T/4
          data: {{name: digits, image_size: 16}}
          measure: [probe]
          probe: {probe}
        """) + extra)
    return p


def start(grid, results, log, *extra, **kw):
    env = {**os.environ, "ABLATE_PROBE_LOG": str(log), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ablate.cli", "run", str(grid), "--results", str(results),
                             "--no-progress", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def events(log: Path):
    lines = log.read_text().splitlines() if log.exists() else []
    return [tuple(line.split()) for line in lines]  # (start|done, cell id, pid)


def test_two_jobs_measure_every_cell_exactly_once(tmp_path):
    grid = probe_grid(tmp_path, "{seed: [0, 1, 2, 3, 4, 5]}", "{sleep_s: 0.3}")
    results, log = tmp_path / "results", tmp_path / "log"
    proc = start(grid, results, log, "--jobs", "2")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    ev = events(log)
    done = [cid for kind, cid, _ in ev if kind == "done"]
    assert len(done) == 6 and len(set(done)) == 6  # every cell once, none twice
    assert len(ev) == 12  # and no start without its done
    assert len({pid for *_, pid in ev}) <= 2  # the two workers, not the parent
    assert "6 measured by 2 workers, 0 failed, 0 pending" in out
    assert len(re.findall(r"\[worker \d\] start ", out)) == 6  # every running cell shown
    assert len(list((results / "measurements").glob("*.json"))) == 6
    df = Store(results).table()
    assert len(df) == 6 and set(df["status"]) == {"ok"} and sorted(df["probe_value"]) == [0, 1, 2, 3, 4, 5]
    assert len(pending(load_grid(grid), Store(results))) == 0
    again = start(grid, results, log, "--jobs", "2")
    out, _ = again.communicate(timeout=240)
    assert again.returncode == 0 and "0 measured by 2 workers" in out and len(events(log)) == 12


def test_jobs_exit_1_on_a_failed_cell_and_report_it_once(tmp_path):
    grid = probe_grid(tmp_path, "{probe: [{fail: false}, {fail: true}, {nan: true}]}")
    results, log = tmp_path / "results", tmp_path / "log"
    proc = start(grid, results, log, "--jobs", "2")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 1
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and any("probe failed on purpose" in f for f in failed)
    assert "Traceback" not in err
    assert sorted(Store(results).table()["status"]) == ["failed", "failed", "ok"]


def test_ctrl_c_stops_every_worker_and_a_rerun_finishes_the_rest_once(tmp_path):
    grid = probe_grid(tmp_path, "{seed: [0, 1, 2, 3]}", "{sleep_s: 2.0}")
    results, log = tmp_path / "results", tmp_path / "log"
    # Its own session, so that the SIGINT goes to the parent and its workers as a terminal's would.
    proc = start(grid, results, log, "--jobs", "2", start_new_session=True)
    deadline = time.time() + 180
    while sum(e[0] == "start" for e in events(log)) < 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in out
    workers = {pid for *_, pid in events(log)}
    time.sleep(0.5)
    for pid in workers:  # no worker left running
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    first = [cid for kind, cid, _ in events(log) if kind == "done"]
    again = start(grid, results, log, "--jobs", "2")
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    done = [cid for kind, cid, _ in events(log) if kind == "done"]
    assert len(done) == 4 and len(set(done)) == 4  # what was done before was not redone
    assert f"{4 - len(first)} measured by 2 workers" in out


def gpu_grid(tmp_path, device="cuda"):
    p = tmp_path / "gpu.yaml"
    p.write_text(f"name: g\ngrid: {{seed: [0, 1]}}\nbase: {{model: DiT-T/4, device: {device}, "
                 "data: {name: digits, image_size: 16}}\n")
    return load_grid(p)


def test_plan_spreads_workers_over_gpus_and_divides_cpu_threads(tmp_path):
    g = gpu_grid(tmp_path)
    p = plan(g, 4, 2, gpus=["0", "1"], cores=16)
    assert p.gpus == ["0", "0", "1", "1"] and p.threads == 4
    assert p.env(3)["CUDA_VISIBLE_DEVICES"] == "1" and p.env(3)["OMP_NUM_THREADS"] == "4"
    assert plan(g, 3, 1, gpus=["GPU-a", "GPU-b", "GPU-c"], cores=2).gpus == ["GPU-a", "GPU-b", "GPU-c"]
    with pytest.raises(ConfigError, match=r"--jobs: 4 workers at 1 per GPU need 4 GPUs, this machine has 2; "
                                          r"use --jobs-per-gpu 2"):
        plan(g, 4, 1, gpus=["0", "1"], cores=16)
    with pytest.raises(ConfigError, match="pins one GPU"):
        plan(gpu_grid(tmp_path, "cuda:1"), 2, 1, gpus=["0", "1"], cores=16)
    cpu = plan(gpu_grid(tmp_path, "cpu"), 4, 1, gpus=["0"], cores=2)  # CPU cells: no GPU, 1 thread each
    assert cpu.gpus == [] and cpu.threads == 1 and "CUDA_VISIBLE_DEVICES" not in cpu.env(0)
    with pytest.raises(ConfigError, match="--jobs-per-gpu: 0 must be >= 1"):
        plan(g, 2, 0, gpus=["0"], cores=2)


def test_bad_jobs_is_one_line_and_exit_2(tmp_path):
    grid = probe_grid(tmp_path, "{seed: [0]}")
    proc = start(grid, tmp_path / "results", tmp_path / "log", "--jobs", "0")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip() == "error: --jobs: 0 must be >= 1"
    assert not (tmp_path / "results").exists()
