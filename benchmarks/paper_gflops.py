"""Gflops of the paper's 48 cells beside the DiT paper's Table 4, and how long counting took.

    python benchmarks/paper_gflops.py [--reference ablate/reference/dit_table4_256.csv]

Prints a markdown table and writes it to results/dit-paper-gflops/paper_comparison.md.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from tabulate import tabulate

from ablate.env import device_name, git_revision
from ablate.grid import EXPERIMENTS, load_grid
from ablate.measure.flops import count_flops
from ablate.cell import Cell

BLOCKS = ["adaln-zero", "adaln", "cross-attn", "in-context"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = Path(__file__).resolve().parent.parent
    ap.add_argument("--reference", default=repo / "ablate" / "reference" / "dit_table4_256.csv")
    ap.add_argument("--out", default=repo / "results" / "dit-paper-gflops" / "paper_comparison.md")
    args = ap.parse_args()
    ref = {r["model"]: r for r in csv.DictReader(open(args.reference))}
    grid = load_grid(EXPERIMENTS / "dit-paper-gflops.yaml")

    t0 = time.perf_counter()
    counts = {}
    for cell in grid.cells:
        kw = Cell(cell, Path("/nonexistent")).model_kwargs
        counts[cell["model"], cell["block"]] = count_flops(kw)
    with torch.device("meta"):
        from ablate.models import create_model
        params = {m: sum(p.numel() for p in create_model(m).parameters() if p.requires_grad) / 1e6 for m in ref}
    seconds = time.perf_counter() - t0

    rows, worst, worst_torch = [], 0.0, 0.0
    for model, r in ref.items():
        paper = float(r["gflops"])
        ours = counts[model, "adaln-zero"]["gflops"]
        torch_ = counts[model, "adaln-zero"]["gflops_torch"]
        worst = max(worst, abs(ours / paper - 1))
        worst_torch = max(worst_torch, max(abs(c["gflops_torch"] / c["gflops"] - 1)
                                           for (m, _), c in counts.items() if m == model))
        rows.append([model, paper, ours, f"{100 * (ours / paper - 1):+.2f}%", torch_, r["params_m"],
                     f"{params[model]:.1f}"] + [counts[model, b]["gflops"] for b in BLOCKS[1:]]
                    + [f"{100 * (counts[model, 'cross-attn']['gflops'] / ours - 1):+.1f}%"])
    headers = ["model", "paper Gflops", "adaln-zero (fvcore)", "diff", "FlopCounterMode", "paper params M",
               "params M", "adaln", "cross-attn", "in-context", "cross-attn vs adaln-zero"]
    table = tabulate(rows, headers=headers, tablefmt="github", floatfmt=".2f")
    footer = (f"\n48 cells counted in {seconds:.1f} s on {device_name(torch.device('cpu'))} "
              f"({torch.get_num_threads()} threads), torch {torch.__version__}, ablate {git_revision()}.\n"
              f"Largest difference from the paper: {100 * worst:.2f}%; largest fvcore vs FlopCounterMode "
              f"difference over all 48 cells: {100 * worst_torch:.2f}% (FlopCounterMode skips LayerNorm).\n")
    print(table + footer)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Gflops of the DiT paper's configs (one image, one forward, multiply-adds)\n\n"
                   + table + "\n" + footer)


if __name__ == "__main__":
    main()
