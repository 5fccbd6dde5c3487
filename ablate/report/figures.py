"""The report's figures. Each function takes the ``Results`` and returns a matplotlib Figure,
or a sentence saying why the figure is left out (a grid without FID, one model size, ...).

Every artist drawn for a block carries the SVG id ``block_<name>_<n>`` and the block's colour
from ``palette``, so a test can check in the SVG files that a block has one colour everywhere.
"""
from __future__ import annotations

import itertools
import math
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; no display, also on a headless server

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import LogFormatter, MaxNLocator  # noqa: E402

from ..defaults import SAMPLE_GRIDS  # noqa: E402
from .data import Results  # noqa: E402
from .palette import block_order  # noqa: E402

DPI = 150
# seaborn's look, scoped to the report (``with plt.rc_context(THEME)``), never global.
THEME = {
    **sns.axes_style("whitegrid"),
    **sns.plotting_context("notebook", font_scale=0.95),
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "svg.hashsalt": "ablate",  # stable ids: regenerating a report gives the same files
    "legend.frameon": False,
}
SEED_STYLES = ("-", "--", ":", "-.")
PATCH_MARKERS = {2: "o", 4: "s", 8: "^"}
MIN_WIDTH = 7.5  # inches: room for a title and a legend row even with one panel
PAPER_MARK = {"marker": "x", "color": "black", "s": 40, "linewidths": 1.8, "zorder": 5}


class _Ids:
    """``block_<name>_<n>`` ids, unique within a figure."""

    def __init__(self):
        self.n = itertools.count()

    def __call__(self, block: str) -> str:
        return f"block_{block}_{next(self.n)}"


def _panels(n: int, width: float = 5.6, height: float = 4.0, ncols: int = 3):
    ncols = min(n, ncols)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(width * ncols, MIN_WIDTH), height * nrows + 1.2),
                             layout="constrained", squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _block_legend(fig, blocks, colors, ids: _Ids, extra=()):
    """Below the panels (the title stays free above them), as many columns as the width holds."""
    handles = [Line2D([], [], color=colors[b], lw=3, label=b, gid=ids(b)) for b in blocks]
    per_row = max(1, int(fig.get_figwidth() / 1.8))
    fig.legend(handles=[*handles, *extra], loc="outside lower center", ncol=min(len(handles) + len(extra), per_row))


def _log(ax, which: str = "y"):
    """A log axis labelled in plain numbers (0.1, 0.2, 0.3), not powers of ten."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(_PlainLog(labelOnlyBase=False))
    axis.set_minor_formatter(_PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


class _PlainLog(LogFormatter):
    """LogFormatter's choice of which ticks to label, written as 0.06 rather than 6e-02."""

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:g}"


def sample_count(n) -> str:
    """1000 -> '1K', 50000 -> '50K', 1500 -> '1.5K', 500 -> '500'."""
    n = int(n)
    return f"{n / 1000:g}K" if n >= 1000 else str(n)


def fid_source(r: Results) -> str:
    """``digits-cnn, 1K samples``: which extractor and how many samples made the numbers."""
    parts = []
    extractors = r.labels("fid_extractor")
    if extractors:
        parts.append("/".join(map(str, extractors)))
    samples = r.labels("fid_samples")
    if samples:
        parts.append("/".join(sample_count(s) for s in samples) + " samples")
    return ", ".join(parts) or "extractor and sample count not recorded"


def fid_label(r: Results) -> str:
    """``FID (digits-cnn, 1K samples)``, the axis label of every FID."""
    return f"FID ({fid_source(r)})"


def _axis_text(text: str, width: int = 42) -> str:
    """An axis label on two or more lines where one would run past the axis (a long extractor label)."""
    return textwrap.fill(text, width)


def _seeds_note(df: pd.DataFrame) -> str:
    n = df.groupby(["variant", "block"])["seed"].nunique()
    lo, hi = int(n.min()), int(n.max())
    return f"{lo} seed{'s' if lo > 1 else ''}" if lo == hi else f"{lo}-{hi} seeds"


def _spread_note(df: pd.DataFrame, mark: str, spread: str) -> str:
    """What a mark and its spread show; one seed has no spread to show, so says so."""
    if int(df.groupby(["variant", "block"])["seed"].nunique().max()) < 2:
        return f"{mark}: one seed, so no spread between seeds is shown"
    return f"{mark}: mean over {_seeds_note(df)}, {spread}: ± 1 std"


# ----- 1. quality over training steps (the paper's Figure 5) ---------------------------------
def quality_over_steps(r: Results):
    df = r.series("fid_over_steps")
    if df.empty or "fid" not in df or df["fid"].notna().sum() == 0:
        return ("left out: no cell has a `fid` result with `fid_over_steps` (measure `fid` with "
                "`train.eval_every` set to get FID at several training steps)")
    df = df[df["fid"].notna()]
    variants = list(df["variant"].unique())
    fig, axes = _panels(len(variants))
    ids = _Ids()
    for ax, variant in zip(axes, variants):
        vd = df[df["variant"] == variant]
        for b in block_order(vd["block"]):
            g = vd[vd["block"] == b].groupby("step")["fid"]
            mean, std = g.mean(), g.std(ddof=1)
            color = r.colors[b]
            if std.notna().any():
                ax.fill_between(mean.index, (mean - std).to_numpy(), (mean + std).to_numpy(), color=color,
                                alpha=0.18, linewidth=0, gid=ids(b))
            ax.plot(mean.index, mean.to_numpy(), color=color, lw=2, marker="o", ms=4, gid=ids(b))
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(_axis_text(fid_label(r)))
        if len(variants) > 1:
            ax.set_title(variant)
    fig.suptitle(f"FID over training, lower is better\n({_spread_note(df, 'line', 'band')})")
    _block_legend(fig, block_order(df["block"]), r.colors, ids)
    return fig


# ----- 2. Gflops against FID (the paper's Figure 8) ----------------------------------------
def gflops_vs_fid(r: Results):
    t = r.table
    for col, why in (("fid", "no cell has an FID (measure `fid`)"), ("gflops", "no cell has Gflops (measure `flops`)")):
        if col not in t or t[col].notna().sum() == 0:
            return f"left out: {why}"
    t = t[t["fid"].notna() & t["gflops"].notna()]
    if t["model"].nunique() < 2:
        return (f"left out: the grid has one model ({t['model'].iloc[0]}); Gflops against FID needs "
                "several model sizes or patch sizes")
    facets = list(t["other"].unique())
    fig, axes = _panels(len(facets), width=6.4, height=4.6, ncols=2)
    ids = _Ids()
    for ax, other in zip(axes, facets):
        ft = t[t["other"] == other]
        points = ft.groupby(["block", "model", "patch_size"], sort=False).agg(
            gflops=("gflops", "mean"), fid=("fid", "mean"), fid_std=("fid", "std")).reset_index()
        labelled = set()
        for b in block_order(points["block"]):
            color = r.colors[b]
            for patch, pp in points[points["block"] == b].groupby("patch_size"):
                pp = pp.sort_values("gflops")
                ax.plot(pp["gflops"], pp["fid"], color=color, lw=1.5, marker=PATCH_MARKERS.get(patch, "D"), ms=6,
                        gid=ids(b))
                if pp["fid_std"].notna().any():
                    ax.errorbar(pp["gflops"], pp["fid"], yerr=pp["fid_std"].fillna(0), fmt="none", color=color,
                                ecolor=color, elinewidth=1, capsize=2, gid=ids(b))
                for _, p in pp.iterrows():
                    if p["model"] not in labelled:  # one name per model; the blocks sit close together
                        labelled.add(p["model"])
                        ax.annotate(p["model"], (p["gflops"], p["fid"]), xytext=(5, 4), textcoords="offset points",
                                    fontsize=8, color="0.3")
        _log(ax, "x")
        ax.set_xlabel("Gflops per image (one forward pass, log scale)")
        ax.set_ylabel(_axis_text(fid_label(r)))
        if other:
            ax.set_title(other)
    markers = [Line2D([], [], color="0.4", lw=0, marker=PATCH_MARKERS.get(p, "D"), label=f"patch {p}")
               for p in sorted(t["patch_size"].dropna().unique())]
    fig.suptitle(f"Gflops against final FID, lower is better\n({_spread_note(t, 'point', 'bars')})")
    _block_legend(fig, block_order(t["block"]), r.colors, ids, extra=markers)
    return fig


# ----- 3. cost per block design ------------------------------------------------------------
COST_PANELS = (  # (metric, axis label, scale)
    ("gflops", "Gflops per image (forward)", 1.0),
    ("params_m", "parameters (M)", 1.0),
    ("train_img_per_s", "training throughput (img/s)", 1.0),
    ("step_mfu", "training-step MFU (%)", 100.0),
)


def cost(r: Results):
    t = r.table
    panels = [p for p in COST_PANELS if p[0] in t and t[p[0]].notna().any()]
    if not panels:
        return "left out: no cell has Gflops, parameters, throughput or MFU (measure `flops`, `timing`, `train`)"
    variants = list(t["variant"].unique())
    blocks = block_order(t["block"])
    many = len(variants) > 3
    width = max(7.0, 0.32 * len(variants) * len(blocks) + 2) if many else 4.4
    fig, axes = _panels(len(panels), width=width, height=3.6, ncols=1 if many else 2)
    ids = _Ids()
    bar_w = 0.8 / len(blocks)
    x = np.arange(len(variants))
    shown_paper = False
    for ax, (metric, label, scale) in zip(axes, panels):
        for i, b in enumerate(blocks):
            bt = t[t["block"] == b]
            xs = x + (i - (len(blocks) - 1) / 2) * bar_w
            per = [bt[bt["variant"] == v][metric].dropna() * scale for v in variants]
            means = [s.mean() if len(s) else np.nan for s in per]
            for xi, m in zip(xs, means):
                if not np.isnan(m):
                    ax.bar(xi, m, width=bar_w * 0.92, color=r.colors[b], linewidth=0, gid=ids(b))
            for xi, s in zip(xs, per):  # one dot per seed where seeds differ (throughput, MFU)
                if len(s) > 1 and s.std() > 0:
                    ax.scatter([xi] * len(s), s, s=9, color="black", zorder=4, linewidths=0)
            paper_col = {"gflops": "paper_gflops", "params_m": "paper_params_m"}.get(metric)
            if paper_col:
                pv = [bt[bt["variant"] == v][paper_col].dropna() for v in variants]
                pts = [(xi, s.iloc[0]) for xi, s in zip(xs, pv) if len(s)]
                if pts:
                    ax.scatter(*zip(*pts), **PAPER_MARK)
                    shown_paper = True
        values = t[metric].dropna() * scale
        if len(values) and values.min() > 0 and values.max() / values.min() > 50:
            _log(ax)
        ax.grid(axis="x", visible=False)
        ax.set_ylabel(label)
        if many:
            ax.set_xticks(x, variants, rotation=40, ha="right", rotation_mode="anchor")
        else:
            ax.set_xticks(x, variants)
    extra = [Line2D([], [], lw=0, **{k: v for k, v in PAPER_MARK.items() if k in ("marker", "color")},
                    markersize=7, label="paper (Table 4)")] if shown_paper else []
    if (t.groupby(["variant", "block"])["seed"].nunique() > 1).any():
        extra.append(Line2D([], [], lw=0, marker="o", color="black", markersize=3, label="one seed"))
    fig.suptitle("Cost per block design (bars: mean over seeds)")
    _block_legend(fig, blocks, r.colors, ids, extra=extra)
    return fig


# ----- 4. loss curves and samples ----------------------------------------------------------
def loss_curves(r: Results):
    df = r.series("log")
    if df.empty or "loss" not in df:
        return "left out: no cell has a `train` result with a loss log (measure `train`)"
    variants = list(df["variant"].unique())
    fig, axes = _panels(len(variants))
    ids = _Ids()
    seeds = sorted(df["seed"].unique())
    style = {s: SEED_STYLES[i % len(SEED_STYLES)] for i, s in enumerate(seeds)}
    for ax, variant in zip(axes, variants):
        vd = df[df["variant"] == variant]
        for b in block_order(vd["block"]):
            for seed, cd in vd[vd["block"] == b].groupby("seed"):
                ax.plot(cd["step"], cd["loss"], color=r.colors[b], ls=style[seed], lw=1.6, gid=ids(b))
        _log(ax)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"training loss ({_loss_kind(r)}, log scale)")
        if len(variants) > 1:
            ax.set_title(variant)
    extra = [Line2D([], [], color="0.4", ls=style[s], label=f"seed {s}") for s in seeds] if len(seeds) > 1 else []
    fig.suptitle("Training loss per cell\n(mean over each logging window)")
    _block_legend(fig, block_order(df["block"]), r.colors, ids, extra=extra)
    return fig


def _loss_kind(r: Results) -> str:
    kinds = r.setting("train.loss")
    names = {"hybrid": "hybrid: MSE + VLB", "mse": "MSE"}
    return "/".join(names.get(k, str(k)) for k in kinds) or "diffusion loss"


def shown_samples(r: Results) -> list:
    """The sample grid shown per (variant, block): the lowest seed's last one."""
    chosen = {}
    for c in sorted(r.cells, key=lambda c: c.seed):
        if c.samples is not None:
            chosen.setdefault((r.table.loc[r.table["cell_id"] == c.id, "variant"].iloc[0], c.block), c)
    return [(variant, block, c) for (variant, block), c in chosen.items()]


def sample_step(path) -> int | None:
    digits = path.stem.rpartition("step")[2]
    return int(digits) if digits.isdigit() else None


def samples(r: Results):
    shown = shown_samples(r)
    if not shown:
        return "left out: no `train` work folder has a sample grid (`" + SAMPLE_GRIDS + "`; `train.eval_samples` > 0)"
    variants = list(dict.fromkeys(v for v, _, _ in shown))
    blocks = block_order(b for _, b, _ in shown)
    by = {(v, b): c for v, b, c in shown}
    fig, axes = plt.subplots(len(variants), len(blocks), figsize=(2.9 * len(blocks), 3.2 * len(variants) + 0.5),
                             layout="constrained", squeeze=False)
    ids = _Ids()
    for i, v in enumerate(variants):
        for j, b in enumerate(blocks):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            c = by.get((v, b))
            if c is None:
                ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes, color="0.4")
            else:
                ax.imshow(plt.imread(c.samples), interpolation="nearest")
                step = sample_step(c.samples)
                ax.set_xlabel(f"seed {c.seed}" + (f", step {step}" if step is not None else ""), fontsize=9)
            ax.set_title(b, color=r.colors[b], fontweight="bold", gid=ids(b))
            if len(variants) > 1 and j == 0:
                ax.set_ylabel(v)
            for spine in ax.spines.values():
                spine.set_edgecolor(r.colors[b])
                spine.set_linewidth(2)
    fig.suptitle("Samples at the final training step (EMA weights)")
    return fig


FIGURES = {  # file name -> builder, in the order of the report
    "quality_over_steps": quality_over_steps,
    "gflops_vs_fid": gflops_vs_fid,
    "cost": cost,
    "loss_curves": loss_curves,
    "samples": samples,
}
