"""Training and sampling over several processes (torchrun, gloo on the CPU) compute what
one process computes: the same global batch, data order and noise; a checkpoint written by
two ranks resumes on one; `torchrun -m ablate run` fills the same table as `ablate run`."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from ablate.data import build_dataset, to_uint8
from ablate.sampling import sample_images
from ablate.train import TrainSettings, train

sys.path.insert(0, str(Path(__file__).resolve().parent / "plugins"))
import ddp_worker  # noqa: E402

WORKER = Path(ddp_worker.__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    # A rank left waiting in a collective would show here as a timeout, not as a long wait.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ABLATE_DDP_TIMEOUT_MIN": "20",
           **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def one_process(workdir: Path, steps: int) -> dict:
    torch.set_num_threads(1)
    data = build_dataset({"name": "digits", "image_size": 16}).subset(100)
    out = train(ddp_worker.model(), data, TrainSettings(steps=steps, **ddp_worker.SETTINGS), workdir=workdir,
                seed=0, device="cpu", progress=False)
    return out


def state(workdir: Path) -> dict:
    return torch.load(workdir / "checkpoint.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Six steps of one process: the reference."""
    workdir = tmp_path_factory.mktemp("single") / "run"
    out = one_process(workdir, 6)
    return out, state(workdir)


def test_two_ranks_train_what_one_process_trains(tmp_path, single):
    r = torchrun(2, WORKER, "train", tmp_path / "run", 6)
    assert r.returncode == 0, r.stderr[-3000:]
    out, ref = single
    got = state(tmp_path / "run")
    assert torch.load(tmp_path / "run" / "result.pt")["ranks"] == 2
    # Same global batch, data, noise and dropped labels; only the order of float sums differs.
    losses = [e["loss"] for e in got["log"]]
    assert losses == pytest.approx([e["loss"] for e in out["log"]], rel=1e-5, abs=1e-6)
    assert max_diff(got["model"], ref["model"]) < 1e-5
    assert max_diff(got["ema"], ref["ema"]) < 1e-5
    assert max_diff(got["model"], ddp_worker.model().state_dict()) > 1e-3  # it did train
    # Rank 0 alone wrote: one checkpoint, the step-3 snapshot and two sample grids, no temporary files.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.pt", "ema_step0000003.pt", "result.pt", "samples_step0000003.png", "samples_step0000006.png"]


def test_the_compiled_step_around_ddp_trains_what_one_process_trains(tmp_path, single):
    """The CUDA default (forward + loss compiled, calling the DDP-wrapped model: dynamo splits
    the graph at DDP's gradient buckets), captured by dynamo and run by aot_eager here."""
    r = torchrun(2, WORKER, "train", tmp_path / "run", 6, "compiled")
    assert r.returncode == 0, r.stderr[-3000:]
    _, ref = single
    got = state(tmp_path / "run")
    assert max_diff(got["model"], ref["model"]) < 1e-5 and max_diff(got["ema"], ref["ema"]) < 1e-5


def test_a_checkpoint_of_two_ranks_resumes_on_one(tmp_path, single):
    r = torchrun(2, WORKER, "train", tmp_path / "run", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert state(tmp_path / "run")["step"] == 3
    one_process(tmp_path / "run", 6)  # steps 4..6 in this process, from the 2-rank checkpoint
    _, ref = single
    got = state(tmp_path / "run")
    assert got["step"] == 6
    assert max_diff(got["model"], ref["model"]) < 1e-5 and max_diff(got["ema"], ref["ema"]) < 1e-5


def test_sampling_split_over_ranks_draws_the_same_images(tmp_path):
    r = torchrun(3, WORKER, "sample", tmp_path / "x.pt")  # 6 batches of 4 (the last of 1) over 3 ranks
    assert r.returncode == 0, r.stderr[-3000:]
    torch.set_num_threads(1)
    x, _ = sample_images(ddp_worker.model(), 21, ddp_worker.SAMPLING, image_size=16, seed=5, batch_size=4)
    saved = torch.load(tmp_path / "x.pt")
    got = saved["x"]
    assert got.shape == x.shape == (21, 1, 16, 16)
    assert (got - x).abs().max().item() < 1e-5
    assert (x[0] - x[4]).abs().max().item() > 0.1  # batches do get different noise
    # Quantised batch by batch on the ranks (17 images: the last round has a batch for 2 of the
    # 3 ranks): one process's uint8 images (a float ulp apart can round to a neighbouring
    # level: allow one level on a few pixels).
    q = saved["uint8"]
    one, _ = sample_images(ddp_worker.model(), 17, ddp_worker.SAMPLING, image_size=16, seed=5, batch_size=4,
                           uint8=True)
    assert q.dtype == one.dtype == torch.uint8 and q.shape == one.shape == (17, 1, 16, 16)
    assert torch.equal(one[:16], to_uint8(x[:16]))  # in one process: exactly the end's quantisation
    diff = (q.int() - one.int()).abs()
    assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 1e-3


GRID = """
name: ddp-grid
imports: [{plugin}]
grid:
  block: [adaln-zero, in-context]
base:
  model: DiT-T/4
  seed: 0
  threads: 1
  data: {{name: digits, image_size: 16}}
  measure: [flops, {extra}train, fid]
  # fp32: N ranks compute what one process computes to fp32's rounding; under bf16 autocast
  # (precision auto on a CPU with native bf16) the split batch rounds differently.
  train: {{steps: 6, batch_size: 16, lr: 1.0e-3, ema_decay: 0.9, log_every: 3, eval_every: 3, eval_samples: 4,
          sampler: ddim, sample_steps: 2, precision: fp32}}
  fid: {{samples: 24, sampler: ddim, sample_steps: 2, batch_size: 8}}
"""


def write_grid(tmp_path, extra: str = "") -> Path:
    p = tmp_path / "grid.yaml"
    p.write_text(textwrap.dedent(GRID.format(plugin=WORKER.parent / "rank_fault.py", extra=extra)))
    return p


def test_torchrun_ablate_run_fills_the_table_of_one_process(tmp_path):
    grid = write_grid(tmp_path)
    one = subprocess.run([sys.executable, "-m", "ablate", "run", grid, "--results", tmp_path / "one",
                          "--no-progress"], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, "-m", "ablate", "run", grid, "--results", tmp_path / "two", "--no-progress")
    assert two.returncode == 0, two.stderr[-3000:]
    a = pd.read_csv(tmp_path / "one" / "table.csv").set_index("block")
    b = pd.read_csv(tmp_path / "two" / "table.csv").set_index("block")
    assert list(b["status"]) == ["ok", "ok"]
    for col in ("final_loss", "fid", "kid_mean", "gflops"):
        assert b[col].to_numpy() == pytest.approx(a[col].to_numpy(), rel=1e-4), col
    assert (b["train_ranks"] == 2).all() and (a["train_ranks"] == 1).all()
    # The leader alone printed the table.
    assert two.stdout.count("| DiT-T/4") == 2, two.stdout

    # Trained already, FID still to measure: 3 ranks sample it although the batch of 16 does
    # not divide by 3 (only training needs that), and score what one process scored.
    import shutil

    from ablate.cell import measurement_key
    from ablate.grid import load_grid

    shutil.copytree(tmp_path / "one", tmp_path / "three")
    for config in load_grid(grid).cells:
        (tmp_path / "three" / "measurements" / f"{measurement_key(config, 'fid')}.json").unlink()
    three = torchrun(3, "-m", "ablate", "run", grid, "--results", tmp_path / "three", "--no-progress")
    assert three.returncode == 0, three.stderr[-3000:]
    c = pd.read_csv(tmp_path / "three" / "table.csv").set_index("block")
    for col in ("fid", "kid_mean", "final_loss"):
        assert c[col].to_numpy() == pytest.approx(a[col].to_numpy(), rel=1e-4), col


def test_a_failure_on_one_rank_is_recorded_and_stops_the_run(tmp_path):
    grid = write_grid(tmp_path, extra="rank_fault, ")
    # Rank 0 waits for rank 1 in a collective until the timeout (20 s here), then both report.
    r = torchrun(2, "-m", "ablate", "run", grid, "--results", tmp_path / "r", "--no-progress",
                 env={"ABLATE_DDP_TIMEOUT_MIN": "0.33"})
    assert r.returncode != 0
    # One line from the leader; the failing rank's own traceback is printed too (a DDP
    # failure is debugged from it), and torchrun reports the exit codes.
    assert ("error: stopped: DiT-T/4 adaln-zero seed=0: rank_fault: rank 1 of 2: RuntimeError: injected on rank 1;"
            in r.stderr), r.stderr[-3000:]
    rows = pd.read_csv(tmp_path / "r" / "table.csv")
    first = rows[rows.block == "adaln-zero"].iloc[0]
    assert first["status"] == "failed" and "rank 1 of 2: RuntimeError: injected on rank 1" in first["error"]
    # The run stopped after recording it: the second cell was left for the next run, and
    # the next run (one process now) goes on with it and keeps what is done.
    again = subprocess.run([sys.executable, "-m", "ablate", "run", grid, "--results", tmp_path / "r",
                            "--no-progress"], capture_output=True, text=True, timeout=600)
    rows = pd.read_csv(tmp_path / "r" / "table.csv").set_index("block")
    assert rows.loc["in-context", "status"] == "ok" and rows.loc["adaln-zero", "status"] == "failed", again.stderr


def test_a_submitit_task_runs_its_cell_under_torchrun(tmp_path):
    """`--launcher submitit --ranks-per-task 2` (submitit's local executor here; on SLURM,
    `--gpus-per-node 2`): the task trains its cell over two ranks and stores one result."""
    pytest.importorskip("submitit")
    grid = tmp_path / "grid.yaml"
    grid.write_text(textwrap.dedent("""
        name: slurm-ddp
        base:
          model: DiT-T/4
          threads: 1
          data: {name: digits, image_size: 8}
          measure: [train]
          train: {steps: 4, batch_size: 8, precision: fp32, log_every: 2, eval_samples: 0}
        """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "ablate", "run", grid, "--results", tmp_path / "r", "--no-progress",
                        "--launcher", "submitit", "--cluster", "local", "--gpus-per-node", "0",
                        "--ranks-per-task", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    rows = pd.read_csv(tmp_path / "r" / "table.csv")
    assert list(rows["status"]) == ["ok"] and list(rows["train_ranks"]) == [2]
    logs = "".join(p.read_text() for p in (tmp_path / "r" / "slurm").glob("*_log.out"))
    assert "--nproc_per_node=2" in logs and "--cell" in logs


def test_a_failure_of_rank_0_alone_ends_every_rank_at_once(tmp_path):
    """Rank 0 fails where it works alone (a full disk as it writes): the others, waiting for
    it, leave too; nothing waits for a collective's timeout."""
    grid = write_grid(tmp_path, extra="rank_fault, ")
    r = torchrun(2, "-m", "ablate", "run", grid, "--results", tmp_path / "r", "--no-progress", timeout=240,
                 env={"ABLATE_RANK_FAULT": "leader"})
    assert r.returncode != 0
    assert "rank_fault: rank 0 of 2: OSError: [Errno 28] No space left on device;" in r.stderr, r.stderr[-3000:]


def test_rank_0_failing_to_write_in_training_ends_the_run_at_once(tmp_path):
    """The train measurement's own leader-only writes: a sample grid that cannot be written."""
    from ablate.cell import measurement_key
    from ablate.grid import load_grid

    grid = write_grid(tmp_path)
    config = load_grid(grid).cells[0]
    (tmp_path / "r" / "work" / measurement_key(config, "train") / "samples_step0000003.png").mkdir(parents=True)
    r = torchrun(2, "-m", "ablate", "run", grid, "--results", tmp_path / "r", "--no-progress", timeout=240)
    assert r.returncode != 0
    assert "adaln-zero seed=0: train: rank 0 of 2: IsADirectoryError" in r.stderr, r.stderr[-3000:]


def test_a_batch_that_does_not_divide_over_the_ranks_is_refused_before_anything_runs(tmp_path):
    grid = write_grid(tmp_path)
    r = torchrun(3, "-m", "ablate", "run", grid, "--results", tmp_path / "r", "--no-progress")
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert lines == [f"error: {grid}: train.batch_size: 16 does not divide over 3 ranks (each trains an equal "
                     "share of the global batch); use a multiple of 3 (DiT-T/4 adaln-zero seed=0 is still to "
                     "measure train) (torchrun --nproc_per_node)"], r.stderr
    assert not (tmp_path / "r").exists()
    # A results folder that is a file: said as for one process, before the batch.
    (tmp_path / "afile").write_text("")
    r = torchrun(3, "-m", "ablate", "run", grid, "--results", tmp_path / "afile", "--no-progress")
    assert r.returncode != 0  # rank 0's exit 2 (the others leave quietly with 0)
    assert [x for x in r.stderr.splitlines() if x.startswith("error:")] == [f"error: {tmp_path / 'afile'}: not a folder"], \
        r.stderr[-3000:]
