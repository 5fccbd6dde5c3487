"""Wall time of a grid at 1, 2 and 4 jobs: `ablate run GRID --jobs N`.

The grid is the four conditioning blocks of DiT-S/2 on 16x16x4 latents (128-pixel images;
the paper's 32x32 makes a CPU cell take minutes), 1000 classes, each cell its flop count
and its timing (forward and training step, batch 4). Each
job count starts from an empty results folder, and the wall time is the whole command's,
Python's start included, as a user sees it.

    python benchmarks/jobs.py [--jobs 1 2 4] [--device cpu|auto] [--input-size 16] [--batch-size 4] [--repeats 3]

On a CPU, workers divide the cores (cores // N torch threads each): more jobs than cores
oversubscribe, and each cell's step gets slower while the grid may still finish sooner (the
parts of a cell that run on one thread: tracing for flops, Python overhead). On GPUs, worker
i gets GPU i // --jobs-per-gpu.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

GRID = """\
name: jobs-benchmark
grid:
  block: [adaln-zero, adaln, cross-attn, in-context]
base:
  model: DiT-S/2
  input_size: {input_size}
  in_channels: 4
  num_classes: 1000
  device: {device}
  measure: [flops, timing]
  timing: {{batch_size: {batch_size}, precision: fp32, warmup: 1, repeats: {repeats}}}
"""


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--jobs-per-gpu", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--input-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "jobs.yaml"
        grid.write_text(GRID.format(device=args.device, input_size=args.input_size, batch_size=args.batch_size,
                                    repeats=args.repeats))
        for jobs in args.jobs:
            results = Path(tmp) / f"results-{jobs}"
            cmd = [sys.executable, "-m", "ablate.cli", "run", str(grid), "--results", str(results), "--no-progress",
                   "--jobs", str(jobs), "--jobs-per-gpu", str(args.jobs_per_gpu)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"--jobs {jobs} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            res = [json.loads(p.read_text()) for p in (results / "measurements").glob("timing-*.json")]
            cell_s = [r["wall_s"] for r in res]
            cell_s += [json.loads(p.read_text())["wall_s"] for p in (results / "measurements").glob("flops-*.json")]
            rows.append({
                "jobs": jobs,
                "threads_per_job": res[0]["env"]["torch_threads"],
                "grid_wall_s": wall,
                "speedup": rows[0]["grid_wall_s"] / wall if rows else 1.0,
                "cell_wall_s_mean": sum(cell_s) / len(res),  # flops + timing of one cell
                "step_ms_median": statistics.median(r["metrics"]["step_ms"] for r in res),
                "fwd_ms_median": statistics.median(r["metrics"]["fwd_ms"] for r in res),
            })
            print(f"--jobs {jobs}: {wall:.1f} s", file=sys.stderr, flush=True)
    device = res[0]["env"]["device_name"] if args.device != "cpu" else cpu_name()
    print(f"DiT-S/2 on {args.input_size}x{args.input_size}x4, 4 blocks, flops + timing (batch {args.batch_size}, "
          f"fp32, {args.repeats} repeats) on "
          f"{device}, {len(os.sched_getaffinity(0))} cores\n")
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".1f"))


if __name__ == "__main__":
    main()
