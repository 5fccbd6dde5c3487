"""Watching long runs: TensorBoard event files written as a cell trains (one continuous curve
across a kill -9 and a resume, read back with TensorBoard's own reader), W&B offline, and
`ablate status` beside a running and a killed runner."""
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import checkpoint_step, run_cli

from ablate.cli import main

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the domain extractor of fid is trained once."""
    return tmp_path_factory.mktemp("ablate-cache")


def grid(tmp_path, train: str, measure: str = "[flops, train]", fid: str = "{}") -> Path:
    p = tmp_path / "grid.yaml"
    p.write_text(textwrap.dedent(f"""
        name: watch
        base:
          model: DiT-T/4
          data: {{name: digits, image_size: 8}}
          measure: {measure}
          train: {train}
          fid: {fid}
        """))
    return p


def start(g, results, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "ablate.cli", "run", str(g), "--results", str(results),
                             "--no-progress", *extra], env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(proc, cond, what, timeout=300):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"waiting for {what}: exited {proc.returncode}: {proc.stderr.read()}"
        assert time.time() < deadline, f"waiting for {what}: timed out"
        time.sleep(0.02)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


    return 0


def progress_step(results: Path) -> int:
    for p in (results / "work").glob("train-*/progress.json") if (results / "work").exists() else []:
        return (read_json(p) or {}).get("step", 0)
    return 0


def logdir(results: Path) -> Path:
    (d,) = [p for p in (results / "tensorboard").iterdir() if p.is_dir()]
    return d


def raw_events(folder: Path) -> list:
    """Every summary value in the folder's event files as (tag, step), read record by record:
    what any reader sees, duplicates included."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for f in sorted(p for p in folder.iterdir() if "tfevents" in p.name):
        for event in EventFileLoader(str(f)).Load():
            out += [(v.tag, event.step) for v in event.summary.value]
    return out


def test_a_killed_and_resumed_cell_has_one_curve_with_its_samples_and_fid(tmp_path, cache):
    """kill -9 after a checkpoint, with windows logged after it; the resumed run rewrites the
    event files to the checkpoint's step and logs on: each step once, the losses the record's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    g = grid(tmp_path, "{steps: 300, batch_size: 16, precision: fp32, log_every: 5, checkpoint_every: 20, "
                       "eval_every: 100, eval_samples: 4, sample_steps: 5}",
             "[flops, train, fid]", "{samples: 20, batch_size: 20, sample_steps: 5}")
    results = tmp_path / "results"
    env = {"ABLATE_CACHE": str(cache)}
    proc = start(g, results, env=env)
    # After a checkpoint, with at least two windows logged after it, well before the end.
    wait_for(proc, lambda: checkpoint_step(results) >= 20 and progress_step(results) >= checkpoint_step(results) + 10,
             "windows logged after a checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = checkpoint_step(results)
    before = raw_events(logdir(results))
    logged = max(s for t, s in before if t == "train/loss")
    assert saved < logged < 300  # steps after the checkpoint are in the files: the resume must drop them

    again = start(g, results, env=env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    (train,) = [json.loads(p.read_text()) for p in (results / "measurements").glob("train-*.json")]
    (fid,) = [json.loads(p.read_text()) for p in (results / "measurements").glob("fid-*.json")]
    (flops,) = [json.loads(p.read_text()) for p in (results / "measurements").glob("flops-*.json")]
    log = train["metrics"]["log"]
    assert [e["step"] for e in log] == list(range(5, 301, 5))

    folder = logdir(results)
    assert folder.name == "DiT-T_4 adaln-zero seed=0"
    pairs = raw_events(folder)
    assert len(pairs) == len(set(pairs))  # no (tag, step) twice, in any file
    assert sorted(s for t, s in pairs if t == "train/loss") == list(range(5, 301, 5))
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == [e["step"] for e in log]
    assert [e.value for e in loss] == pytest.approx([e["loss"] for e in log], rel=1e-6)  # float32 in the file
    assert [e.value for e in ea.Scalars("train/img_per_s")] == pytest.approx([e["img_per_s"] for e in log], rel=1e-6)
    for tag in ("train/lr", "train/grad_norm", "train/peak_mem_mb", "train/step_ms"):
        assert [e.step for e in ea.Scalars(tag)] == list(range(5, 301, 5)), tag
    assert [e.value for e in ea.Scalars("train/lr")] == pytest.approx([1e-4] * len(log))
    assert all(e.value > 0 for e in ea.Scalars("train/grad_norm"))
    images = ea.Images("eval/samples")
    assert [e.step for e in images] == [100, 200, 300]
    png = (results / "work" / train["key"] / "samples_step0000300.png").read_bytes()
    assert images[-1].encoded_image_string[:8] == png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    import io

    assert Image.open(io.BytesIO(images[-1].encoded_image_string)).size == Image.open(io.BytesIO(png)).size
    points = fid["metrics"]["fid_over_steps"]
    assert [p["step"] for p in points] == [100, 200, 300]
    for metric in ("fid", "kid_mean", "precision", "recall"):
        got = ea.Scalars(f"quality/{metric}")
        assert [e.step for e in got] == [100, 200, 300]
        assert [e.value for e in got] == pytest.approx([p[metric] for p in points], rel=1e-6, abs=1e-7)
    # The settings and the measured cost as the hparams dashboard's row.
    start_info = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = HParamsPluginData.FromString(start_info).session_start_info.hparams
    assert hp["train.steps"].number_value == 300 and hp["model"].string_value == "DiT-T/4"
    assert hp["cost.gflops"].number_value == pytest.approx(flops["metrics"]["gflops"])

    # fid measured again (--retry-failed has nothing to redo; a removed result is measured
    # anew): its points replace the earlier ones instead of doubling them.
    next((results / "measurements").glob("fid-*.json")).unlink()
    assert run_cli("run", g, "--results", results, "--no-progress", env=env).returncode == 0
    pairs = raw_events(logdir(results))
    assert len(pairs) == len(set(pairs)) and sorted(s for t, s in pairs if t == "quality/fid") == [100, 200, 300]
    assert sorted(s for t, s in pairs if t == "train/loss") == list(range(5, 301, 5))


def status(g, results) -> str:
    r = run_cli("status", g, "--results", results)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_status_shows_a_running_cell_its_holder_step_and_rate_and_a_dead_holders_cell_as_pending(tmp_path):
    g = grid(tmp_path, "{steps: 100000, batch_size: 8, precision: fp32, log_every: 5, checkpoint_every: 50, "
                       "eval_samples: 0}")
    results = tmp_path / "results"
    assert "1 cells: 0 done, 0 running, 0 failed, 1 pending" in status(g, results)  # nothing run yet
    assert not results.exists()  # and nothing written
    proc = start(g, results, "--log", "none")
    wait_for(proc, lambda: progress_step(results) >= 10, "two log windows")
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file() and "work" not in p.parts}
    text = status(g, results)
    row = next(line for line in text.splitlines() if "DiT-T/4" in line)
    assert " running " in row and "flops done, train running" in row
    assert f"{os.uname().nodename} pid {proc.pid}" in row  # the claimer, from its lock file
    step = int(row.split("/100000")[0].split()[-1])
    assert step >= 10 and step % 5 == 0
    assert "steps/s" in row and "img/s" in row and " ago)" in row
    assert "1 cells: 0 done, 1 running, 0 failed, 0 pending" in text
    assert not (results / "tensorboard").exists()  # --log none
    # --watch: shown again until Ctrl-C, which ends it quietly.
    watcher = subprocess.Popen([sys.executable, "-m", "ablate.cli", "status", str(g), "--results", str(results),
                                "--watch", "0.2"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shown = []
    while sum("1 cells: 0 done, 1 running" in line for line in shown) < 2:
        shown.append(watcher.stdout.readline())
        assert shown[-1] or watcher.poll() is None, watcher.stderr.read()
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    out = "".join(shown) + out
    later = [int(line.split("/100000")[0].split()[-1]) for line in out.splitlines() if "/100000" in line]
    assert later[-1] > step  # it moved on, and the view with it

    os.killpg(proc.pid, signal.SIGKILL)  # the holder dies: its lock with it
    proc.wait()
    text = status(g, results)
    row = next(line for line in text.splitlines() if "DiT-T/4" in line)
    assert " pending " in row and "flops done, train pending" in row and "pid" not in row
    assert "1 cells: 0 done, 0 running, 0 failed, 1 pending" in text
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file() and "work" not in p.parts}
    assert {p: t for p, t in after.items() if p in before} == before  # status wrote nothing


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file (a LevelDB log of Record protos after a
    7-byte header): what `wandb sync` would upload."""
    from wandb.proto import wandb_internal_pb2

    data, pos, buf, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        buf = (b"" if kind in (1, 2) else buf) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last piece
            record = wandb_internal_pb2.Record.FromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_logs_the_same_values_one_run_per_cell(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb); it is optional")
    g = grid(tmp_path, "{steps: 20, batch_size: 16, precision: fp32, log_every: 5, eval_every: 10, eval_samples: 4, "
                       "sample_steps: 5}")
    results = tmp_path / "results"
    home = tmp_path / "home"
    home.mkdir()
    r = run_cli("run", g, "--results", results, "--no-progress", "--log", "tensorboard,wandb",
                env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "HOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert [p for p in home.rglob("*") if p.is_file()] == []  # W&B wrote its files under the results folder too
    (train,) = [json.loads(p.read_text()) for p in (results / "measurements").glob("train-*.json")]
    (run_file,) = (results / "wandb").glob(f"offline-run-*-{train['key']}/run-{train['key']}.wandb")
    rows = wandb_history(run_file)
    windows = [row for row in rows if "train/loss" in row]
    assert [row["train_step"] for row in windows] == [5, 10, 15, 20]
    assert [row["train/loss"] for row in windows] == pytest.approx([e["loss"] for e in train["metrics"]["log"]])
    images = [row for row in rows if row.get("eval/samples/_type") == "image-file"]
    assert [row["train_step"] for row in images] == [10, 20]
    assert all((run_file.parent / "files" / row["eval/samples/path"]).is_file() for row in images)
    assert list((results / "tensorboard").iterdir())  # and TensorBoard beside it


def test_log_wandb_without_the_package_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError, as where it is absent
    monkeypatch.delenv("ABLATE_LOG", raising=False)
    g = grid(tmp_path, "{steps: 5, batch_size: 8, eval_samples: 0}")
    r = CliRunner().invoke(main, ["run", str(g), "--results", str(tmp_path / "results"), "--log", "wandb"])
    assert r.exit_code == 2
    assert r.output == "error: --log wandb needs the wandb package, which is not installed (pip install wandb)\n"
    r = CliRunner().invoke(main, ["run", str(g), "--results", str(tmp_path / "results"), "--log", "tensorbord"])
    assert r.exit_code == 2
    assert r.output == ("error: --log: 'tensorbord' is not a log backend (did you mean 'tensorboard'?); known: "
                        "tensorboard, wandb, none\n")
    assert not (tmp_path / "results").exists()


def test_live_logs_are_never_written_through_a_symbolic_link(tmp_path):
    g = grid(tmp_path, "{steps: 5, batch_size: 8, precision: fp32, eval_samples: 0}")
    results = tmp_path / "results"
    (results / "elsewhere").mkdir(parents=True)
    (results / "tensorboard").symlink_to(results / "elsewhere")
    r = run_cli("run", g, "--results", results, "--no-progress")  # refused up front, as a link at cells/ is
    assert r.returncode == 2 and "tensorboard is a symbolic link" in r.stderr and len(r.stderr.splitlines()) == 1
    assert list((results / "elsewhere").iterdir()) == [] and not (results / "cells").exists()
    # A link planted below it, once the run is under way, fails the cell, never written through.
    (results / "tensorboard").unlink()
    (results / "tensorboard").mkdir()
    from ablate.watch import Target

    (results / "tensorboard" / "cell").symlink_to(results / "elsewhere")
    with pytest.raises(OSError, match="a symbolic link; live logs are written only into real folders"):
        Target(results, "cell", "train-0123456789ab", "g").logdir()
    assert list((results / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("label, name", [
    ("DiT-XS/4 adaln-zero seed=0", "DiT-XS_4 adaln-zero seed=0"),
    ("DiT-S/2 adaln seed=1 data.path=../../etc", "DiT-S_2 adaln seed=1 data.path=.._.._etc"),
    ("../..", "_"),
    ("...", "cell"),
])
def test_a_cell_label_becomes_one_folder_name_inside_the_results_folder(label, name):
    from ablate.watch import folder_name

    assert folder_name(label) == name
