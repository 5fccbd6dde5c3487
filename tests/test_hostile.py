"""What a new user and a hostile or unlucky input hit (issue 9), run as a user runs them:
the `ablate` command in a fresh process. Bad input is one line, exit 2, no traceback."""
import textwrap

import pytest

from conftest import run_cli


def one_error_line(r, *words):
    """Exit 2, and stderr is exactly one `error:` line containing ``words``."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def flops_grid(tmp_path_factory):
    """Two measured cells: patch sizes 2 and 4 of a tiny DiT."""
    tmp = tmp_path_factory.mktemp("flops")
    g = tmp / "g.yaml"
    g.write_text(textwrap.dedent("""
        name: g
        grid: {patch_size: [2, 4]}
        base: {size: T, data: {name: digits, image_size: 8}, measure: [flops]}
        """))
    r = run_cli("run", g, "--results", tmp / "res", "--no-progress", cwd=tmp)
    assert r.returncode == 0, r.stderr
    return g, tmp / "res"


# ----- 3. a query reads columns and nothing else -----------------------------------------
def test_query_cannot_run_code(flops_grid, tmp_path):
    g, res = flops_grid
    r = run_cli("table", g, "--results", res, "-q",
                "gflops > 0 and @pd.io.common.os.system('id > pwned.txt') == 0", cwd=tmp_path)
    one_error_line(r, "--query", "'@'")
    assert not (tmp_path / "pwned.txt").exists() and r.stdout == ""
    r = run_cli("table", g, "--results", res, "-q", "gflops > 0 and __import__('os').system('id > pwned.txt') == 0",
                cwd=tmp_path)
    one_error_line(r, "--query", "a function call is not allowed")
    assert not (tmp_path / "pwned.txt").exists()


def test_query_that_is_not_a_condition_is_one_line(flops_grid):
    g, res = flops_grid
    one_error_line(run_cli("table", g, "--results", res, "-q", "1"), "--query '1'", "not a condition")


def test_query_of_columns_literals_in_and_arithmetic(flops_grid):
    g, res = flops_grid
    r = run_cli("table", g, "--results", res, "-f", "csv", "-c", "patch_size,gflops",
                "-q", "patch_size in [4, 8] and not gflops * 1000 <= 0 and `data.image_size` == 8")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "patch_size,gflops" and len(lines) == 2 and lines[1].startswith("4,")
    assert float(lines[1].split(",")[1]) > 0


# ----- 2. a non-editable install finds its built-in grids -------------------------------
def test_non_editable_install_ships_the_grids(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("ablate", "experiments"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # --no-build-isolation: build with the setuptools installed here, no download
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(tmp_path / "site"), str(src)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    assert (tmp_path / "site" / "ablate" / "experiments" / "quick.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(tmp_path / "site")}  # the installed copy only, not this checkout
    r = run_cli("ls", "grids", cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr
    for name in ("quick", "dit-paper-gflops", "cpu-timing"):
        assert name in r.stdout
    assert str(tmp_path / "site" / "ablate" / "experiments" / "quick.yaml") in r.stdout
    r = run_cli("run", "--dry-run", cwd=elsewhere, env=env)  # the default grid, quick
    assert r.returncode == 0, r.stderr
    assert "4 cells" in r.stdout and "train:pending" in r.stdout
    assert not (elsewhere / "results").exists()


# ----- 8. grid files: names, non-finite numbers, anchors, encoding, plugins, size ------
BAD_GRIDS = {  # file -> (YAML text, words its one error line must contain)
    "nul.yaml": ('name: "a\\0b"\nbase: {model: DiT-T/4}\n', ["name", "control character"]),
    "newline.yaml": ('name: "a\\nb"\nbase: {model: DiT-T/4}\n', ["name", "control character"]),
    "space.yaml": ('name: " padded"\nbase: {model: DiT-T/4}\n', ["name", "begins or ends with a space"]),
    "long.yaml": ("name: " + "é" * 128 + "\nbase: {model: DiT-T/4}\n", ["name", "256 bytes", "at most 255"]),
    "nan_lr.yaml": ("base: {model: DiT-T/4, measure: [train], train: {lr: .nan}}\n",
                    ["base.train.lr", "nan is not a finite number"]),
    "inf_clip.yaml": ("grid: {train.grad_clip: [1.0, .inf]}\nbase: {model: DiT-T/4, measure: [train]}\n",
                      ["grid.train.grad_clip", "inf is not a finite number"]),
    "nan_scale.yaml": ("base: {model: DiT-T/4, data: {name: latents, root: x, scale: .nan}}\n",
                       ["base.data.scale", "nan is not a finite number"]),
    "anchor.yaml": ("base: &b\n  model: DiT-T/4\n  extra: *b\n", ["base.extra", "refers to the anchor it is inside"]),
    "exits.yaml": ("imports: [exits.py]\nbase: {model: DiT-T/4}\n", ["imports", "'exits.py' called sys.exit(0)"]),
}


def test_bad_grid_files_are_one_line_each_and_yaml_is_utf8_whatever_the_locale(tmp_path):
    for name, (text, _) in BAD_GRIDS.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    # Not ASCII, read under an ASCII locale: UTF-8 is the encoding of a grid file.
    (tmp_path / "accents.yaml").write_text("description: café, naïve\nbase: {model: DiT-T/4}  # ü\n",
                                           encoding="utf-8")
    seeds = ", ".join(map(str, range(2001)))  # above LARGE_GRID: say so before checking it all
    (tmp_path / "large.yaml").write_text(f"grid: {{seed: [{seeds}]}}\nbase: {{model: DiT-T/4}}\n")
    env = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    r = run_cli("validate", *BAD_GRIDS, "accents.yaml", "large.yaml", cwd=tmp_path, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(BAD_GRIDS), r.stderr
    for line, (name, (_, words)) in zip(errors, BAD_GRIDS.items()):
        assert line.startswith(f"error: {name}: ")
        for w in words:
            assert w in line.encode("ascii", "backslashreplace").decode("unicode_escape"), (w, line)
    assert r.stdout.splitlines() == [
        "accents.yaml: ok, 1 cells, axes: none; measure: flops",
        "large.yaml: ok, 2001 cells, axes: seed; measure: flops"]
    assert "warning: large.yaml: 2,001 combinations" in r.stderr
    assert not (tmp_path / "results").exists()


def test_unknown_format_is_the_error_line_not_the_usage_text(tmp_path):
    one_error_line(run_cli("table", "-f", "xml", cwd=tmp_path), "--format", "'xml'", "csv")
