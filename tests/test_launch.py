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
from ablate.launch import plan
from ablate.results import pending
from ablate.settings import ConfigError
from ablate.cell import cell_id as _id
from ablate.store import Store
from conftest import checkpoint_step, probe_grid


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


def test_workers_stop_at_once_when_started_with_sigint_ignored(tmp_path):
    """A parent started under an ignored SIGINT (``nohup``, ``&`` in a script) passes it to its
    workers, which Python then leaves ignored: they must still stop on the parent's signal
    within moments, not at the grace period's SIGKILL."""
    grid = probe_grid(tmp_path, "{seed: [0, 1]}", "{sleep_s: 60.0}")
    results, log = tmp_path / "results", tmp_path / "log"
    proc = start(grid, results, log, "--jobs", "2", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 180
    while sum(e[0] == "start" for e in events(log)) < 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)  # the parent's stop: it sends SIGINT to each worker
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in out, err
    assert time.time() - t0 < 8  # the grace period before SIGKILL is 15 s
    assert not [e for e in events(log) if e[0] == "done"]


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
    proc = start(grid, tmp_path / "results", tmp_path / "log", "--partition", "gpu")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip() == "error: --partition: only with --launcher submitit"
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------
# Shared results across machines: a timing's key names the device it ran on
# ---------------------------------------------------------------------------------
def quick_cell(**over):
    from ablate.grid import find_grid

    return {**load_grid(find_grid("quick")).cells[0], **over}


def test_device_independent_keys_are_those_results_were_stored_under():
    from ablate.cell import measurement_key

    c = quick_cell()
    # Pinned keys of the quick grid's first cell (as quick.yaml stands): naming the device in
    # timing keys must leave these alone, so results already measured are found, not redone.
    # A change of quick.yaml or of a settings section changes them on purpose: re-pin then.
    assert measurement_key(c, "flops") == "flops-cdc707ce5960"
    assert measurement_key(c, "train") == "train-5cd3cdd67b6c"
    assert measurement_key(c, "fid") == "fid-c2a2dfe35f81"
    assert measurement_key(quick_cell(device="cuda"), "flops") == "flops-cdc707ce5960"


def test_timing_key_names_the_resolved_device(monkeypatch):
    import torch

    from ablate.cell import measurement_key
    from ablate.device import device_identity

    key = lambda **over: measurement_key(quick_cell(**over), "timing")  # noqa: E731
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    on_cpu = key(device="auto")
    assert on_cpu == key(device="cpu")  # auto on a machine without a GPU is the CPU
    assert on_cpu == key(device="cpu", threads=2)  # the default thread count, written out
    assert on_cpu != key(device="cpu", threads=1)  # a worker of --jobs 2 on 2 cores
    assert device_identity("auto")["type"] == "cpu" and device_identity("auto")["threads"] == 2

    gpu = {"name": "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: gpu["name"])
    from ablate import device

    device._device_name.cache_clear()
    on_h100 = key(device="auto")
    assert on_h100 != on_cpu and on_h100 == key(device="cuda")
    assert device_identity("auto") == {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}
    gpu["name"] = "NVIDIA A100-SXM4-40GB"
    device._device_name.cache_clear()
    assert key(device="auto") not in (on_h100, on_cpu)  # another GPU model, another timing
    assert measurement_key(quick_cell(), "flops") == "flops-cdc707ce5960"  # flops are the same anywhere
    device._device_name.cache_clear()


def test_pending_from_another_machine_reads_the_device_keys_its_runner_stored(tmp_path):
    """A login node without the cells' GPU asks what is left: the timing key the compute
    node stored decides, not the key the login node would give it."""
    from ablate.runner import cell_keys

    p = tmp_path / "g.yaml"
    p.write_text("name: g\ngrid: {block: [adaln-zero, adaln]}\nbase: {model: DiT-T/4, "
                 "data: {name: digits, image_size: 16}, measure: [flops, timing]}\n")
    g = load_grid(p)
    store = Store(tmp_path / "results")
    assert [left for _, left in pending(g, store, here=False)] == [["flops", "timing"]] * 2
    config = g.cells[0]
    keys = {**cell_keys(config), "timing": "timing-0123456789ab"}  # as the GPU node resolved it
    store.save_cell(_id(config), config, keys)
    for key in keys.values():
        store.save_result(key, {"status": "ok", "metrics": {}})
    assert [c["block"] for c, _ in pending(g, store, here=False)] == ["adaln"]
    # Here (a CPU) the first cell's timing is another measurement, still to do.
    assert [(c["block"], left) for c, left in pending(g, store)] == [
        ("adaln-zero", ["timing"]), ("adaln", ["flops", "timing"])]


# ---------------------------------------------------------------------------------
# --launcher submitit, on submitit's local executor
# ---------------------------------------------------------------------------------
def _lock_pid(results: Path, prefix: str) -> int | None:
    for p in (results / "locks").glob(f"{prefix}-*.lock") if (results / "locks").exists() else []:
        text = p.read_text().split()
        return int(text[1]) if len(text) == 2 else None
    return None


    return 0


def test_submitit_task_preempted_then_killed_resumes_its_training(tmp_path):
    """One cell as a submitit task (local executor). Pre-empted (SIGUSR2, as SLURM sends):
    submitit requeues it and training resumes. Killed (SIGKILL): the task is lost, `ablate
    run` says so and exits 1; run again, it resubmits the cell, which resumes again and
    finishes with one continuous training log; flops are measured once."""
    pytest.importorskip("submitit")
    grid = tmp_path / "grid.yaml"
    grid.write_text(textwrap.dedent("""
        name: slurm
        base:
          model: DiT-T/4
          data: {name: digits, image_size: 8}
          measure: [flops, train]
          train: {steps: 300, batch_size: 8, precision: fp32, log_every: 10, checkpoint_every: 10,
                  eval_samples: 0}
        """))
    results = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ablate.cli", "run", str(grid), "--results", str(results), "--no-progress",
           "--launcher", "submitit", "--cluster", "local", "--gpus-per-node", "0", "--timeout", "10"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for(cond, what):
        deadline = time.time() + 180
        while not cond():
            assert time.time() < deadline and proc.poll() is None, f"waiting for {what}: {proc.poll()}"
            time.sleep(0.05)

    wait_for(lambda: checkpoint_step(results) >= 20 and _lock_pid(results, "train"), "a checkpoint")
    first = _lock_pid(results, "train")
    os.kill(first, signal.SIGUSR2)  # pre-emption: submitit checkpoints and requeues the task
    preempted_at = checkpoint_step(results)
    wait_for(lambda: _lock_pid(results, "train") not in (None, first)
             and checkpoint_step(results) >= preempted_at + 20, "the requeued task")
    assert checkpoint_step(results) < 300
    os.kill(_lock_pid(results, "train"), signal.SIGKILL)  # lost: no signal to checkpoint on
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "lost: task" in err and "0 failed, 1 pending" in out
    assert [p.name.split("-")[0] for p in (results / "measurements").glob("*.json")] == ["flops"]
    flops = next((results / "measurements").glob("flops-*.json")).read_text()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "submitted 1 tasks" in again.stdout and "0 failed, 0 pending" in again.stdout
    assert next((results / "measurements").glob("flops-*.json")).read_text() == flops  # not measured again
    import json

    (train,) = [json.loads(p.read_text()) for p in (results / "measurements").glob("train-*.json")]
    log = train["metrics"]["log"]
    assert train["status"] == "ok" and [e["step"] for e in log] == list(range(10, 301, 10))
    # Three processes trained it: the first, the requeued one, the resubmitted one; each
    # resumed where the checkpoint was, none started over.
    starts = [e["step"] for e in log if e["first_window"]]
    assert len(starts) == 3 and starts[0] == 10 and starts[1] > 20 and starts[2] > starts[1]
    nothing = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 0 and "nothing to submit" in nothing.stdout
