"""`ablate report` on a synthetic results folder written with the Store's own writers: every
figure and both renderings are written, the HTML is self-contained and shows every figure in
a real headless browser, the summary statistics are the known numbers put in, one colour per
block in every figure, and a grid without FID still gives a report."""
from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ablate.cli import main
from ablate.grid import load_grid
from ablate.report import stats
from ablate.report.palette import FALLBACK, PALETTE, block_colors
from ablate.store import Store
from ablate.train import save_grid

from ablate.cell import cell_id, measurement_key

BLOCKS = ("adaln-zero", "adaln", "cross-attn", "in-context")
SEEDS = (0, 1, 2)
# Final FID per block and seed: means 11, 16, 14, 22; sample stds 1, 1, 1, 2.
FID = {"adaln-zero": (10.0, 11.0, 12.0), "adaln": (15.0, 16.0, 17.0), "cross-attn": (13.0, 14.0, 15.0),
       "in-context": (20.0, 22.0, 24.0)}
GFLOPS = {"adaln-zero": 0.04485, "adaln": 0.04441, "cross-attn": 0.05162, "in-context": 0.04898}
PARAMS_M = {"adaln-zero": 4.17, "adaln": 3.73, "cross-attn": 3.66, "in-context": 2.77}
STEPS = (50, 100, 150)
FIGURES = ("quality_over_steps", "cost", "loss_curves", "samples")  # gflops_vs_fid needs several models


def write_grid(folder: Path, name: str = "synth", models: tuple[str, ...] = ("DiT-XS/4",),
               seeds: tuple[int, ...] = SEEDS) -> Path:
    p = folder / f"{name}.yaml"
    p.write_text(textwrap.dedent(f"""
        name: {name}
        description: four blocks x three seeds, synthetic results
        grid: {{block: [{", ".join(BLOCKS)}], seed: [{", ".join(map(str, seeds))}], model: [{", ".join(models)}]}}
        base:
          data: {{name: digits, image_size: 16}}
          measure: [flops, timing, train]
          train: {{steps: {STEPS[-1]}, batch_size: 64, eval_every: {STEPS[0]}, log_every: 25}}
        """))
    return p


def digits_grid(noise: float, seed: int) -> torch.Tensor:
    """Nine real 16x16 digits in [-1, 1], blurred by ``noise`` (a stand-in for samples)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:9], dtype=torch.float32)[:, None] / 8 - 1
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear")
    g = torch.Generator().manual_seed(seed)
    return (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def write_results(grid_path: Path, root: Path, *, fid: bool = True) -> Store:
    """The results ``ablate run`` would write for the grid, with known numbers, through the Store."""
    g = load_grid(grid_path)
    store = Store(root)
    env = {"device_name": "test CPU", "torch_version": torch.__version__, "git_rev": "abc1234"}
    for index, config in enumerate(g.cells):
        b, seed = config["block"], config["seed"]
        cid = cell_id(config)
        keys = {name: measurement_key(config, name) for name in config["measure"]}
        if fid:
            keys["fid"] = f"fid-{cid}"  # a fixed key: these records are written by hand, not measured
        store.save_cell(cid, config, keys, index)
        smaller_patches = 4 // config["patch_size"]  # DiT-XS/2: 4x the tokens of DiT-XS/4, a better FID
        final = FID[b][seed] / smaller_patches
        metrics = {
            "flops": {"gflops": GFLOPS[b] * smaller_patches**2, "params_m": PARAMS_M[b],
                      "params": int(PARAMS_M[b] * 1e6)},
            "timing": {"step_img_per_s": 200.0 + 10 * index, "step_mfu": 0.5, "fwd_ms": 50.0},
            "train": {"final_loss": 0.08, "train_img_per_s": 240.0 + seed, "train_steps": STEPS[-1],
                      "log": [{"step": s, "loss": final / 50 / (1 + s / 10) + 0.01 * seed, "img_per_s": 240.0}
                              for s in range(25, STEPS[-1] + 1, 25)]},
            "fid": {"fid": final, "kid_mean": final / 1000, "kid_std": 0.001, "precision": 0.5 + seed / 100,
                    "recall": 0.4, "fid_extractor": "digits-cnn", "fid_samples": 1000, "fid_reference": "digits train",
                    "fid_sample_steps": 50, "fid_sampler": "ddpm", "fid_cfg_scale": 1.0,
                    "fid_over_steps": [{"step": s, "fid": final * f, "kid_mean": final * f / 1000, "kid_std": 0.001,
                                        "precision": 0.5, "recall": 0.4} for s, f in zip(STEPS, (3.0, 1.5, 1.0))]},
        }
        for name, key in keys.items():
            store.save_result(key, {"measure": name, "key": key, "status": "ok", "metrics": metrics[name],
                                    "error": None, "env": env, "started": "2026-11-27T19:00:00+00:00",
                                    "finished": "2026-11-27T19:01:00+00:00", "wall_s": 60.0})
        work = store.workdir(keys["train"])
        work.mkdir(parents=True, exist_ok=True)
        for s in STEPS:
            save_grid(digits_grid(0.1 * final / 10, seed), work / f"samples_step{s:07d}.png")
    return store


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One report of the full synthetic grid, made once through the CLI."""
    tmp = tmp_path_factory.mktemp("report")
    grid = write_grid(tmp)
    store = write_results(grid, tmp / "results")
    out = tmp / "out"
    r = CliRunner().invoke(main, ["report", str(grid), "--results", str(store.root), "--out", str(out),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


def test_every_figure_and_both_renderings_are_written(made):
    for name in FIGURES:
        assert (made / f"{name}.png").stat().st_size > 10_000, name
        svg = ET.parse(made / f"{name}.svg").getroot()
        assert svg.tag.endswith("svg"), name
    assert not (made / "gflops_vs_fid.png").exists()
    md = (made / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name}.png)" in md
    assert "Gflops against FID" in md and "left out: the grid has one model (DiT-XS/4)" in md
    # the sample grids the report shows are copied beside it: one per block (the lowest seed)
    copied = sorted(p.name for p in (made / "samples").iterdir())
    assert len(copied) == 4 and all("seed0_step0000150" in n for n in copied)
    assert "FID (digits-cnn, 1K samples)" in md


class _Checker(html.parser.HTMLParser):
    """Well-formedness of the page: every non-void element closed in order; every resource inline."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "source"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.imgs, self.external = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        for key in ("src", "href"):
            if key in a and not (a[key] or "").startswith(("data:", "#")):
                self.external.append(a[key])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unexpected </{tag}> at {self.getpos()}")


def test_html_is_valid_and_self_contained(made):
    page = (made / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    c = _Checker()
    c.feed(page)
    c.close()
    assert c.errors == [] and c.stack == []
    assert c.external == []  # no file, no network: it opens offline and alone
    assert len(c.imgs) == len(FIGURES)
    assert all(i["src"].startswith("data:image/png;base64,") and i.get("alt") for i in c.imgs)
    assert "<table>" in page and "11 ± 1" in page


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("ABLATE_REQUIRE_BROWSER"),
                    reason="no chromium binary (Debian: apt-get install -y chromium; .ci/run installs it)")
def test_every_figure_loads_in_a_headless_browser(made, tmp_path):
    """The browser itself writes each image's decoded width into the page it then dumps."""
    assert CHROMIUM is not None, "ABLATE_REQUIRE_BROWSER is set but there is no chromium binary"
    probe = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
             "img.setAttribute('data-natural-width', img.naturalWidth); "
             "document.body.setAttribute('data-images', document.images.length); });</script>")
    page = tmp_path / "probe.html"
    page.write_text((made / "report.html").read_text().replace("</body>", probe + "</body>"))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                        page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'data-images="{len(FIGURES)}"' in r.stdout
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', r.stdout)]
    assert len(widths) == len(FIGURES) and min(widths) > 300


def _block_colours(svg: Path) -> dict[str, set[str]]:
    """Block -> every colour (fill, stroke) drawn inside the SVG groups the report tags with it."""
    out: dict[str, set[str]] = {}
    for g in ET.parse(svg).getroot().iter():
        gid = g.get("id") or ""
        if not gid.startswith("block_"):
            continue
        block = gid[len("block_"):].rpartition("_")[0]
        for el in g.iter():
            for part in (el.get("style") or "").split(";"):
                key, _, value = part.partition(":")
                if key.strip() in ("fill", "stroke") and value.strip().startswith("#"):
                    out.setdefault(block, set()).add(value.strip().lower())
    return out


def test_one_colour_per_block_in_every_figure(made):
    for name in FIGURES:
        colours = _block_colours(made / f"{name}.svg")
        assert set(colours) == set(BLOCKS), name
        for block, seen in colours.items():
            assert seen == {PALETTE[block]}, (name, block, seen)


def table_rows(md: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``md``, separator rows left out."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ")]


def test_summary_statistics_are_the_known_numbers(made):
    import pandas as pd

    rows = []
    for b in BLOCKS:
        for seed in SEEDS:
            rows.append({"variant": "DiT-XS/4", "block": b, "seed": seed, "fid": FID[b][seed],
                         "gflops": GFLOPS[b], "train_img_per_s": 240.0 + seed})
    s = stats.summary(pd.DataFrame(rows)).set_index("block")
    assert list(s.index) == ["adaln-zero", "cross-attn", "adaln", "in-context"]  # the paper's order
    assert s.loc["adaln-zero", "fid_mean"] == pytest.approx(11.0)
    assert s.loc["adaln-zero", "fid_std"] == pytest.approx(1.0)
    assert s.loc["in-context", "fid_mean"] == pytest.approx(22.0)
    assert s.loc["in-context", "fid_std"] == pytest.approx(2.0)
    assert s.loc["adaln", "train_img_per_s_mean"] == pytest.approx(241.0)
    assert s.loc["cross-attn", "gflops_std"] == 0 and s.loc["cross-attn", "gflops_n"] == 3
    md = (made / "report.md").read_text()
    # the table in the report: mean ± std; exact costs without a spread
    rows = table_rows(md)
    assert ["block", "seeds", "FID", "KID", "precision", "recall", "Gflops", "params (M)", "train img/s"] in rows
    assert ["adaln-zero", "3", "11 ± 1", "0.011 ± 0.001", "0.51 ± 0.01", "0.4", "0.04485", "4.17",
            "241 ± 1"] in rows
    assert ["in-context", "3", "22 ± 2", "0.022 ± 0.002", "0.51 ± 0.01", "0.4", "0.04898", "2.77",
            "241 ± 1"] in rows
    # 11 < 14 < 16 < 22 is the paper's order; 14 vs 16 differs by 2 > std 1; 16 vs 22 by 6 > 2
    assert "adaLN-Zero (11) < cross-attention (14) < adaLN (16) < in-context (22); the same as the paper's" in md
    assert ("cross-attention vs adaLN: FID 14 vs 16; the paper's ordering (cross-attention better) held (difference 2),"
            " and the difference exceeds the spread over seeds (larger std 1") in md
    welch = float(re.search(r"adaLN-Zero vs in-context: .*?p = ([0-9.e-]+)\)", md).group(1))
    from scipy.stats import ttest_ind

    assert welch == pytest.approx(ttest_ind(FID["adaln-zero"], FID["in-context"], equal_var=False).pvalue, rel=0.05)


def test_user_blocks_get_the_spare_colours_and_the_paper_blocks_keep_theirs():
    colors = block_colors(["zeta-block", "adaln", "my-block", "adaln"])
    assert list(colors) == ["adaln", "my-block", "zeta-block"]  # paper's blocks first, then by name
    assert colors == {"adaln": PALETTE["adaln"], "my-block": FALLBACK[0], "zeta-block": FALLBACK[1]}
    assert not set(FALLBACK) & set(PALETTE.values())


def test_a_metric_missing_for_some_seeds_says_how_many_it_has():
    import pandas as pd

    rows = [{"variant": "m", "block": "adaln", "seed": s, "fid": f, "gflops": 1.0}
            for s, f in enumerate((10.0, 12.0, None))]
    headers, table = stats.summary_rows(stats.summary(pd.DataFrame(rows)))
    assert headers == ["block", "seeds", "FID", "Gflops"]
    assert table == [["adaln", "3", "11 ± 1.4 (n=2)", "1"]]


def test_comparison_says_when_the_ordering_did_not_hold_or_is_within_the_spread():
    import pandas as pd

    rows = [{"variant": "m", "block": b, "seed": s, "fid": v}
            for b, vals in {"adaln-zero": (20.0, 24.0), "in-context": (21.0, 19.0)}.items()
            for s, v in enumerate(vals)]
    text = " ".join(stats.comparisons(pd.DataFrame(rows)))
    # means 22 vs 20: adaLN-Zero worse, by 2, within the larger std (2.83)
    assert "did not hold (difference 2)" in text and "is within the spread" in text
    assert "not the paper's" in text


def test_a_grid_without_fid_still_gives_a_report_and_the_same_one_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = write_grid(tmp_path, "nofid")
    write_results(grid, tmp_path / "results" / "nofid", fid=False)
    r = CliRunner().invoke(main, ["report", str(grid), "--no-progress"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "reports" / "nofid"
    md = (out / "report.md").read_text()
    assert "left out: no cell has a `fid` result with `fid_over_steps`" in md
    assert "left out: no cell has an FID" in md
    assert "The paper's FID ordering cannot be checked" in md
    for name in ("cost", "loss_curves", "samples"):
        assert (out / f"{name}.png").exists()
    assert not (out / "quality_over_steps.png").exists()
    assert ["adaln-zero", "3", "0.04485", "4.17", "241 ± 1"] in table_rows(md)
    # Without its grid file, a name with a results folder reports every cell there; the
    # figures are the same bytes (a committed report regenerates to itself).
    grid.unlink()
    r = CliRunner().invoke(main, ["report", "nofid", "--out", "again", "--no-progress"])
    assert r.exit_code == 0, r.output
    again = (tmp_path / "again" / "report.md").read_text()
    assert "12 cells from `results/nofid`" in again
    assert again == md.replace("four blocks x three seeds, synthetic results\n\n", "")
    for name in ("cost", "loss_curves", "samples"):
        for ext in ("png", "svg"):
            assert (out / f"{name}.{ext}").read_bytes() == (tmp_path / "again" / f"{name}.{ext}").read_bytes()


def test_gflops_against_fid_over_model_sizes(tmp_path):
    grid = write_grid(tmp_path, models=("DiT-XS/2", "DiT-XS/4"), seeds=(0, 1))
    store = write_results(grid, tmp_path / "results")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["report", str(grid), "--results", str(store.root), "--out", str(out),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    colours = _block_colours(out / "gflops_vs_fid.svg")
    assert colours == {b: {PALETTE[b]} for b in BLOCKS}
    md = (out / "report.md").read_text()
    rows = [row[:4] for row in table_rows(md)]
    # one summary row per model and block; DiT-XS/2's FID is half of DiT-XS/4's: 10.5 ± 0.71 vs 21 ± 1.4
    assert ["variant", "block", "seeds", "FID"] in rows
    assert ["DiT-XS/2", "in-context", "2", "10.5 ± 0.71"] in rows and ["DiT-XS/4", "in-context", "2", "21 ± 1.4"] in rows
    assert "DiT-XS/4: ranking by mean FID at this scale" in md and "DiT-XS/2: adaLN-Zero vs adaLN" in md


def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = write_grid(tmp_path)
    cases = [
        (["report", str(grid)], "no results here"),  # no results folder
        (["report", "quik"], "unknown grid"),  # neither a file, a shipped grid nor a results folder
        (["report", str(tmp_path / "nope.yaml")], "no such file"),
    ]
    other = write_grid(tmp_path, "other")  # a results folder of another grid: none of this grid's cells
    Store(tmp_path / "elsewhere").save_cell("0123456789ab", {"block": "adaln", "seed": 0}, {})
    cases.append((["report", str(other), "--results", str(tmp_path / "elsewhere")],
                  "none of the grid's 12 cells has results here"))
    pending = Store(tmp_path / "pending")  # the grid's cells, none measured yet
    for i, config in enumerate(load_grid(grid).cells):
        pending.save_cell(cell_id(config), config, {"flops": f"flops-{i}"}, i)
    cases.append((["report", str(grid), "--results", str(pending.root)],
                  "none of the 12 cells has a finished measurement yet"))
    for args, words in cases:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, r.output)
    assert "did you mean 'quick'" in CliRunner().invoke(main, ["report", "quik"]).output
    write_results(grid, tmp_path / "results" / "synth", fid=False)
    (tmp_path / "file").write_text("")
    r = CliRunner().invoke(main, ["report", str(grid), "--out", str(tmp_path / "file" / "out"), "--no-progress"])
    assert r.exit_code == 2 and r.output.startswith("error: --out ") and len(r.output.splitlines()) == 1, r.output
    assert not (tmp_path / "reports").exists()
