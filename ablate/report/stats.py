"""The numbers of the summary: mean and standard deviation over seeds per block design, and
whether the paper's FID ordering of the blocks held.

Spread is the sample standard deviation over seeds (ddof=1; undefined with one seed). A
difference between two blocks counts as beyond the spread when the difference of their mean
FIDs is larger than the larger of their two standard deviations; Welch's t-test p-value is
given beside it (with three seeds it has little power, so it is a hint, not the criterion).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

from .palette import PAPER_FID_ORDER, PAPER_NAMES, block_order

# (metric, column title) of the summary table, in the order shown.
SUMMARY_METRICS = (
    ("fid", "FID"),
    ("kid_mean", "KID"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("gflops", "Gflops"),
    ("params_m", "params (M)"),
    ("train_img_per_s", "train img/s"),
)


def paper_name(block: str) -> str:
    return PAPER_NAMES.get(block, block)


@dataclass
class Spread:
    mean: float
    std: float  # nan with fewer than two seeds
    n: int
    values: tuple[float, ...]


def spread(values) -> Spread:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return Spread(math.nan, math.nan, 0, ())
    return Spread(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v), tuple(v))


def fmt(mean: float, std: float, n: int) -> str:
    """``12.35 ± 0.83``; the mean alone with one seed or no spread at all (flops are exact)."""
    if n == 0:
        return "–"
    if n == 1 or std <= 1e-9 * max(1.0, abs(mean)):  # equal values give a std of rounding noise
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {std:.2g}"


def summary(cells: pd.DataFrame) -> pd.DataFrame:
    """Per variant and block: ``seeds`` and, for each metric some cell has, ``<metric>_mean``,
    ``<metric>_std`` (over seeds) and ``<metric>_n``."""
    rows = []
    for variant in cells["variant"].unique():
        vc = cells[cells["variant"] == variant]
        for block in block_order(vc["block"]):
            bc = vc[vc["block"] == block]
            row = {"variant": variant, "block": block, "seeds": int(bc["seed"].nunique())}
            for metric, _ in SUMMARY_METRICS:
                if metric in bc and bc[metric].notna().any():
                    s = spread(bc[metric].dropna())
                    row.update({f"{metric}_mean": s.mean, f"{metric}_std": s.std, f"{metric}_n": s.n})
            rows.append(row)
    return pd.DataFrame(rows)


def summary_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """``summary()`` as text: headers and rows of ``mean ± std``, the variant only where several."""
    shown = [(m, title) for m, title in SUMMARY_METRICS if f"{m}_mean" in table]
    several = table["variant"].nunique() > 1
    headers = (["variant"] if several else []) + ["block", "seeds"] + [t for _, t in shown]
    rows = []
    for r in table.to_dict("records"):
        cells = []
        for m, _ in shown:
            n = 0 if pd.isna(r[f"{m}_n"]) else int(r[f"{m}_n"])
            # fewer values than seeds: a measurement failed or is pending for some of them
            cells.append(fmt(r[f"{m}_mean"], r[f"{m}_std"], n) + (f" (n={n})" if 0 < n < r["seeds"] else ""))
        rows.append(([r["variant"]] if several else []) + [r["block"], str(r["seeds"])] + cells)
    return headers, rows


def welch_p(a: Spread, b: Spread) -> float:
    """Two-sided Welch's t-test p-value; nan where it is undefined (one seed, no variance)."""
    if a.n < 2 or b.n < 2 or (a.std == 0 and b.std == 0):
        return math.nan
    from scipy.stats import ttest_ind

    return float(ttest_ind(a.values, b.values, equal_var=False).pvalue)


def comparisons(cells: pd.DataFrame, metric: str = "fid") -> list[str]:
    """One sentence per pair of the paper's blocks (per variant): did the paper's FID ordering
    hold, and does the difference exceed the spread over seeds. Empty without the metric."""
    if metric not in cells or cells[metric].notna().sum() == 0:
        return []
    out = []
    several = cells["variant"].nunique() > 1
    for variant in cells["variant"].unique():
        vc = cells[(cells["variant"] == variant) & cells[metric].notna()]
        stats = {b: spread(vc[vc["block"] == b][metric]) for b in PAPER_FID_ORDER if (vc["block"] == b).any()}
        where = f"{variant}: " if several else ""
        if len(stats) < 2:
            continue
        ranked = sorted(stats, key=lambda b: stats[b].mean)
        paper = [b for b in PAPER_FID_ORDER if b in stats]
        held = "the same as" if ranked == paper else "not"
        out.append(f"{where}ranking by mean FID at this scale: "
                   + " < ".join(f"{paper_name(b)} ({stats[b].mean:.4g})" for b in ranked)
                   + f"; {held} the paper's ({' < '.join(paper_name(b) for b in paper)}).")
        for better, worse in combinations(paper, 2):  # paper order: `better` has the lower FID
            a, b = stats[better], stats[worse]
            diff = b.mean - a.mean
            verdict = "held" if diff > 0 else "did not hold"
            larger = max(a.std, b.std)
            if math.isnan(larger):
                beyond = "one seed, so the spread over seeds is unknown"
            else:
                beyond = (f"the difference {'exceeds' if abs(diff) > larger else 'is within'} the spread "
                          f"over seeds (larger std {larger:.2g}")
                p = welch_p(a, b)
                beyond += f"; Welch's t-test p = {p:.2g})" if not math.isnan(p) else ")"
            out.append(f"{where}{paper_name(better)} vs {paper_name(worse)}: FID {a.mean:.4g} vs {b.mean:.4g}; "
                       f"the paper's ordering ({paper_name(better)} better) {verdict} "
                       f"(difference {abs(diff):.2g}), and {beyond}.")
    return out
