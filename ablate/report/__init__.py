"""``ablate report``: a grid's results as a report that says what held.

    reports/<grid>/
      report.md, report.html           # the same report; the HTML embeds everything (opens offline)
      <figure>.png, <figure>.svg       # quality_over_steps, gflops_vs_fid, cost, loss_curves, samples
      samples/                         # the sample grids shown, copied out of results/<grid>/work/

Sections: 1. FID over training steps per block design (the paper's Figure 5); 2. Gflops
against FID over model and patch sizes (its Figure 8); 3. cost per block design beside the
paper's Table 4; 4. loss curves and samples; 5. a summary table (mean ± std over seeds) with
one sentence per comparison of blocks. A figure whose metrics the grid lacks is left out with
a line saying why; the report itself is always written.

The report only reads the results folder (nothing there is set aside or changed) and makes the
same checks ``ablate run`` and ``ablate table`` make. It is written whole: into a new temporary
folder beside ``out``, which then takes ``out``'s place in one rename, so an interrupted report
leaves the previous one as it was. ``out`` is replaced only if it holds nothing but what a
report wrote (listed in its ``MANIFEST``); a folder holding anything else is refused.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
from tqdm.auto import tqdm

from .. import files
from ..store import Store, StoreError
from . import stats
from .data import ReportError, Results
from .figures import FIGURES, THEME, fid_label, fid_source, sample_count, shown_samples
from .palette import block_order, paper_ordering
from .render import Document

__all__ = ["ReportError", "Results", "write_report"]

CAPTIONS = {
    "quality_over_steps": "FID against training steps, one line per block design (the paper's Figure 5)",
    "gflops_vs_fid": "Gflops against final FID over model and patch sizes, one colour per block (the paper's "
                     "Figure 8)",
    "cost": "Cost per block design: Gflops and parameters (paper's Table 4 values as x where the config is "
            "one of the paper's), training throughput and MFU",
    "loss_curves": "Training loss per cell",
    "samples": "Samples of each block design at the final training step",
}


MANIFEST = ".ablate-report"  # the names this report wrote, so the next one knows what it may replace


def write_report(store: Store, out: str | Path, *, name: str, description: str = "",
                 cell_ids: set[str] | None = None, progress: bool = True) -> Path:
    """Write the report of the cells of ``store`` (only ``cell_ids`` if given) into ``out``;
    returns the path of report.md. Raises ReportError before writing anything when there is
    nothing to report, when the results folder fails its checks, or when ``out`` holds files
    no report wrote."""
    store = store.read_only()
    try:
        store.check()
    except StoreError as e:
        raise ReportError(e.strerror) from None
    r = Results.read(store, cell_ids)
    if not r.cells:
        wanted = f"none of the grid's {len(cell_ids)} cells has" if cell_ids is not None else "no cells have"
        raise ReportError(f"{store.root}: {wanted} results here (run `ablate run {name}` first, "
                          "or pass --results DIR)")
    if not any(c.metrics for c in r.cells):
        raise ReportError(f"{store.root}: none of the {len(r.cells)} cells has a finished measurement yet "
                          f"(run `ablate run {name}`)")
    out = Path(out)
    _check_out(out)
    written: dict[str, bytes] = {}
    made: dict[str, object] = {}
    with plt.rc_context(THEME):
        for fig_name, build in tqdm(FIGURES.items(), desc="report", unit="figure", disable=not progress):
            fig = build(r)
            if isinstance(fig, str):
                made[fig_name] = fig
                continue
            for ext, metadata in (("png", {"Software": None}), ("svg", {"Date": None})):
                buf = io.BytesIO()
                fig.savefig(buf, format=ext, metadata=metadata)
                written[f"{fig_name}.{ext}"] = buf.getvalue()
            plt.close(fig)
            made[fig_name] = True
    copied = _samples(r)
    written.update(copied)
    doc = _document(r, store, name, description, made, list(copied))
    written["report.md"] = doc.markdown().encode("utf-8")
    written["report.html"] = doc.html({n.removesuffix(".png"): b for n, b in written.items()
                                       if n.endswith(".png") and "/" not in n}).encode("utf-8")
    _write_whole(out, written)
    return out / "report.md"


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that is a link, a file, or a folder holding what no report wrote."""
    if out.is_symlink():
        raise ReportError(f"--out {out}: a symbolic link; give the folder itself")
    if not out.exists():
        return
    if not out.is_dir():
        raise ReportError(f"--out {out}: not a folder")
    ours = _written_by_a_report(out)
    for folder, dirs, names in os.walk(out):
        for n in dirs + names:
            rel = os.path.relpath(os.path.join(folder, n), out).replace(os.sep, "/")
            if os.path.islink(os.path.join(folder, n)):
                raise ReportError(f"--out {out}: holds {rel}, a symbolic link, which no report wrote; give a new "
                                  "or empty folder (or remove the link)")
            if rel not in ours and not (n in dirs and not os.path.islink(os.path.join(folder, n))
                                        and any(o.startswith(rel + "/") for o in ours)):
                raise ReportError(f"--out {out}: holds {rel}, which no report wrote; the report replaces the whole "
                                  "folder, so give a new or empty one (or move that file)")


def _written_by_a_report(out: Path) -> set[str]:
    """The names in ``out`` a report wrote: its MANIFEST's, or for a report written before
    reports kept one, those a report writes (report.md begins so, figures, samples/*.png)."""
    try:
        names = json.loads(files.read_text(out / MANIFEST, 2**20))
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return {*names, MANIFEST}
    except (OSError, ValueError):
        pass
    try:
        if not files.read_text(out / "report.md", 2**24).startswith("# Report: "):
            return set()
    except (OSError, ValueError):
        return set()
    known = {"report.md", "report.html"} | {f"{f}.{e}" for f in FIGURES for e in ("png", "svg")}
    samples = out / "samples"
    if samples.is_dir() and not samples.is_symlink():
        known |= {f"samples/{p.name}" for p in samples.iterdir() if p.suffix == ".png" and not p.is_symlink()
                  and p.is_file()}
    return known


def _write_whole(out: Path, written: dict[str, bytes]) -> None:
    """``written`` (relative name -> bytes) as the folder ``out``, in one rename."""
    files.remove_stale_folders(out)
    with files.fresh_folder(out) as (parent, fd, tmp):
        for rel, data in written.items():
            d = fd
            if "/" in rel:
                sub, rel = rel.split("/", 1)
                try:
                    os.mkdir(sub, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
                d = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            try:
                files.write_new(d, rel, data)
            finally:
                if d != fd:
                    os.close(d)
        files.write_new(fd, MANIFEST, (json.dumps(sorted(written), indent=1) + "\n").encode())
        os.fsync(fd)
        try:
            os.stat(out.name, dir_fd=parent, follow_symlinks=False)
            exists = True
        except FileNotFoundError:
            exists = False
        if not exists:
            os.rename(tmp, out.name, src_dir_fd=parent, dst_dir_fd=parent)
        elif not files.exchange(parent, tmp, out.name):
            # No atomic swap here: the old report goes aside under the temporary name first.
            old = files.temp_name(out.name)
            os.rename(out.name, old, src_dir_fd=parent, dst_dir_fd=parent)
            os.rename(tmp, out.name, src_dir_fd=parent, dst_dir_fd=parent)
            os.rename(old, tmp, src_dir_fd=parent, dst_dir_fd=parent)
        # tmp now names the previous report (or nothing): fresh_folder removes it.


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _samples(r: Results) -> dict[str, bytes]:
    """The sample grids the report shows, to copy beside it (so it does not need results/work),
    read without following links out of the results folder."""
    out = {}
    for variant, block, c in shown_samples(r):
        name = f"samples/{_slug(variant)}_{_slug(block)}_seed{c.seed}_{c.samples.stem.rpartition('_')[2]}.png"
        try:
            out[name] = files.read_bytes(c.samples, 2**28)
        except OSError as e:
            raise ReportError(f"{c.samples}: cannot be read: {e.strerror or e}") from None
    return out


def _figure(doc: Document, made: dict, name: str, caption: str = "") -> None:
    if made[name] is True:
        doc.figure(name, caption or CAPTIONS[name])
    else:
        doc.left_out(f"{CAPTIONS[name]}: {made[name]}.")


def _document(r: Results, store: Store, name: str, description: str, made: dict, copied: list[str]) -> Document:
    t = r.table
    doc = Document(f"Report: {name}")
    if description:
        doc.para(description)
    doc.para(_setup(r, store))
    ranking = [s for s in stats.comparisons(t) if "ranking by mean FID" in s]
    if ranking:
        doc.para("**Result:** " + " ".join(ranking) + " Details in the summary (section 5).")
    problems = [f"`{c.config.get('model')} {c.block} seed={c.seed}`: {m} {s}"
                + (f" ({c.errors[m]})" if c.errors.get(m) else "")
                for c in r.cells for m, s in c.status.items() if s != "ok"]
    if problems:
        doc.para(f"Not every measurement is in ({len(problems)}); what they would add is missing below:")
        doc.bullets(problems)

    doc.heading("1. Quality over training steps")
    _figure(doc, made, "quality_over_steps",
            f"{CAPTIONS['quality_over_steps']}: {fid_label(r)}, lower is better; line: mean over seeds, "
            "band: ± 1 standard deviation over seeds (sample std).")
    doc.heading("2. Gflops against FID")
    _figure(doc, made, "gflops_vs_fid")

    doc.heading("3. Cost per block design")
    _figure(doc, made, "cost")
    _cost_tables(doc, r)

    doc.heading("4. Training: loss curves and samples")
    _figure(doc, made, "loss_curves")
    _figure(doc, made, "samples")
    if copied:
        doc.para("The sample grids, copied beside this report: " + ", ".join(f"`{c}`" for c in copied) + ".")

    doc.heading("5. Summary")
    headers, rows = stats.summary_rows(stats.summary(t))
    doc.table(headers, rows)
    doc.para("Mean ± sample standard deviation (ddof=1) over seeds; one value where there is one seed or no "
             f"spread. FID and KID ({fid_source(r)}): lower is better; precision and recall: higher is better.")
    sentences = stats.comparisons(t)
    if sentences:
        doc.para(f"Did the paper's ordering hold? The paper: {paper_ordering()}. "
                 "A difference counts as beyond the spread over seeds when the "
                 "difference of the mean FIDs is larger than the larger of the two standard deviations; Welch's "
                 "t-test p is given beside it (few seeds: a hint, not the criterion).")
        doc.bullets(sentences)
    else:
        doc.left_out("The paper's FID ordering cannot be checked: this grid has no FID for two or more of "
                     "the paper's blocks.")
    return doc


def _setup(r: Results, store: Store) -> str:
    """One paragraph: what was measured, on what, with which settings."""
    t = r.table
    blocks = ", ".join(f"`{b}`" for b in block_order(t["block"]))
    parts = [f"{len(r.cells)} cells from `{store.root}`: block designs {blocks}; "
             f"{t['seed'].nunique()} seed{'s' if t['seed'].nunique() > 1 else ''} "
             f"({', '.join(map(str, sorted(t['seed'].unique())))})"]
    parts[0] += (f"; variants by {', '.join(f'`{k}`' for k in r.keys)}" if r.keys
                 else f"; model `{t['model'].iloc[0]}`")
    trained = any(c.metrics.get("log") for c in r.cells)
    data = [d for d in r.setting("data.name") if d] if trained else []  # cost alone needs no data
    if data:
        sizes = r.setting("data.image_size")
        parts.append(f"data: {', '.join(map(str, data))}" + (f" at {'/'.join(map(str, sizes))} px" if sizes else ""))
    steps, batch = r.setting("train.steps"), r.setting("train.batch_size")
    if steps and trained:
        parts.append(f"training: {'/'.join(map(str, steps))} steps at batch {'/'.join(map(str, batch))}")
    if r.labels("fid_extractor"):
        fid = [f"extractor {'/'.join(map(str, r.labels('fid_extractor')))}",
               f"{'/'.join(sample_count(s) for s in r.labels('fid_samples'))} samples"]
        for key, what in (("fid_reference", "reference"), ("fid_sampler", "sampler"),
                          ("fid_sample_steps", "sampling steps"), ("fid_cfg_scale", "guidance scale")):
            if r.labels(key):
                fid.append(f"{what} {'/'.join(map(str, r.labels(key)))}")
        parts.append("FID: " + ", ".join(fid))
    env = {k: sorted({str(c.env[k]) for c in r.cells if c.env.get(k)})
           for k in ("device_name", "torch_version", "git_rev")}
    if env["device_name"]:
        parts.append(f"measured on {' / '.join(env['device_name'])}"
                     + (f" with torch {'/'.join(env['torch_version'])}" if env["torch_version"] else "")
                     + (f" at commit {'/'.join(env['git_rev'])}" if env["git_rev"] else ""))
    return "; ".join(parts) + "."


def _cost_tables(doc: Document, r: Results) -> None:
    t = r.table
    cost_cols = [c for c in ("gflops", "params_m") if c in t and t[c].notna().any()]
    if cost_cols:
        has_paper = t["paper_gflops"].notna().any()
        headers = [_variant_header(r), "block", "Gflops"] + (["paper Gflops", "Gflops vs paper"] if has_paper else []) \
            + ["params (M)"] + (["paper params (M)"] if has_paper else [])
        rows = []
        for variant in t["variant"].unique():
            vt = t[t["variant"] == variant]
            for b in block_order(vt["block"]):
                row = vt[vt["block"] == b].iloc[0]  # cost does not depend on the seed
                g, p = row.get("gflops"), row.get("params_m")
                line = [variant, b, _num(g)]
                if has_paper:
                    pg = row["paper_gflops"]
                    line += [_num(pg), f"{100 * (g / pg - 1):+.1f}%" if _ok(g) and _ok(pg) else "–"]
                line.append(_num(p))
                if has_paper:
                    line.append(_num(row["paper_params_m"]))
                rows.append(line)
        doc.table(headers, rows)
        if has_paper:
            doc.para("Paper values: Table 4 of Peebles & Xie (2023), adaLN-Zero only, at 32x32x4 latents and "
                     "1000 classes; the paper gives no cost for the other blocks.")
        else:
            doc.para("No cell is one of the paper's configs (Table 4: adaLN-Zero at 32x32x4 latents, 1000 "
                     "classes), so there are no paper values beside these.")
    speed = [c for c in ("train_img_per_s", "step_img_per_s", "step_mfu") if c in t and t[c].notna().any()]
    if speed:
        titles = {"train_img_per_s": "train img/s", "step_img_per_s": "timed step img/s", "step_mfu": "step MFU (%)"}
        rows = []
        for row in t.to_dict("records"):
            rows.append([row["variant"], row["block"], str(row["seed"])]
                        + [_num(100 * row[c] if c == "step_mfu" and _ok(row.get(c)) else row.get(c)) for c in speed])
        doc.para("Training throughput per cell: `train img/s` over the training run (after its first logging "
                 "window), `timed step img/s` and its MFU from the `timing` measurement (against the device's "
                 "measured matmul peak).")
        doc.table([_variant_header(r), "block", "seed"] + [titles[c] for c in speed], rows)


def _variant_header(r: Results) -> str:
    return "model" if r.keys in ([], ["model"]) else "variant"


def _ok(v) -> bool:
    return v is not None and v == v


def _num(v) -> str:
    return f"{v:.4g}" if _ok(v) else "–"
