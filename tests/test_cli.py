"""The `ablate` command as a user meets it: help, listings, dry runs, table queries."""
import textwrap

import pytest

from click.testing import CliRunner

from ablate.cli import main


def grid(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(textwrap.dedent("""
        name: g
        grid: {block: [adaln-zero, in-context], patch_size: [2, 4]}
        base: {size: T, data: {name: digits, image_size: 8}, measure: [flops]}
        """))
    return p


def test_help_explains_the_commands():
    out = CliRunner().invoke(main, ["--help"]).output
    for word in ("run", "table", "validate", "ls", "adaln-zero", "cross-attn"):
        assert word in out


def test_ls_lists_every_registry():
    out = CliRunner().invoke(main, ["ls"]).output
    for name in ("DiT-XL/2", "adaln-zero", "in-context", "digits", "latents", "flops", "timing", "train"):
        assert name in out


def test_ls_lists_each_design_axis_value_and_each_section_field_with_its_default():
    import dataclasses

    from ablate.measure import MEASURES
    from ablate.models import DESIGN_CHOICES, SWITCHES

    rows = {tuple(line.split()[:2]) for line in CliRunner().invoke(main, ["ls", "choices"]).output.splitlines()}
    for setting, registry in DESIGN_CHOICES.items():
        assert {(setting, name) for name in registry.names()} <= rows
    assert {(s, v) for s in SWITCHES for v in ("false", "true")} <= rows
    fields = dict(tuple(line.split(maxsplit=1)) for line in
                  CliRunner().invoke(main, ["ls", "settings"]).output.splitlines()[2:] if line.strip())
    want = {f"{n}.{f.name}" for n, m in MEASURES.items() if m.settings for f in dataclasses.fields(m.settings)}
    assert set(fields) == want
    assert fields["fid.numerics"] == "train" and fields["train.sampler"] == "ddpm" and fields["timing.warmup"] == "3"


def test_dry_run_writes_nothing_and_run_then_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = grid(tmp_path)
    r = CliRunner().invoke(main, ["run", str(g), "--dry-run"])
    assert r.exit_code == 0 and "4 cells" in r.output and "flops:pending" in r.output
    assert not (tmp_path / "results").exists()
    r = CliRunner().invoke(main, ["run", str(g), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "4 measured, 0 reused, 0 failed" in r.output
    r = CliRunner().invoke(main, ["table", str(g), "--pivot", "patch_size:block:gflops", "-f", "csv"])
    lines = r.output.strip().splitlines()
    assert lines[0] == "patch_size,adaln-zero,in-context" and len(lines) == 3
    # in-context adds two tokens: more flops than adaln-zero at every patch size
    for line in lines[1:]:
        _, azero, inctx = line.split(",")
        assert float(inctx) > float(azero) > 0
    r = CliRunner().invoke(main, ["table", str(g), "-q", "patch_size == 4 and block == 'in-context'",
                                  "-c", "model,block,gflops", "-f", "json"])
    assert r.exit_code == 0 and '"model":"DiT-T\\/4"' in r.output.replace(" ", "")
    r = CliRunner().invoke(main, ["table", str(g), "-c", "gflop"])
    assert r.exit_code == 2 and "did you mean 'gflops'" in r.output


def one_line(r, *words, code=2):
    """Exit ``code``, and stderr is exactly one `error:` line containing ``words``."""
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == code, (r.exit_code, r.output, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_empty_or_root_folders_are_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = grid(tmp_path)
    for args in (["run", str(g), "--results", ""], ["run", str(g), "--results", "  "], ["table", "--results", ""],
                 ["table", str(g), "--results", ""], ["report", str(g), "--out", ""],
                 ["report", str(g), "--results", ""], ["run", str(g), "--results", "/"],
                 ["table", "--results", "/"], ["run", str(g), "--results", "/.."], ["report", str(g), "--out", "/"]):
        one_line(CliRunner().invoke(main, args), f"error: {args[-2]} ", ("empty path" if args[-1].strip() == ""
                                                                          else "root of the file system"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.yaml"]


def test_kernel_folders_and_control_characters_in_folder_names_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = grid(tmp_path)
    for args, words in ((["run", str(g), "--results", "/proc/self"], "under /proc"),
                        (["table", "--results", "/sys/kernel"], "under /sys"),
                        (["run", str(g), "--results", "a\nb"], "control or invisible character"),
                        (["report", str(g), "--out", "r\u200bx"], "control or invisible character")):
        one_line(CliRunner().invoke(main, args), f"error: {args[-2]} ", words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.yaml"]


def test_wait_and_worker_are_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = grid(tmp_path)
    for bad in ("nan", "inf", "-inf", "-1"):
        one_line(CliRunner().invoke(main, ["run", str(g), "--wait", bad]), "--wait", "seconds >= 0")
    for bad in ("abc", "3/2", "2/2", "1/0", "-1/2", "1/", "0/2/3"):
        one_line(CliRunner().invoke(main, ["run", str(g), "--worker", bad]), f"--worker: {bad!r}", "0 <= I < N")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.yaml"]


def test_an_unknown_grid_names_the_built_in_grids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line(CliRunner().invoke(main, ["run", "quik"]), "quik", "did you mean 'quick'", "built-in grids:")
    assert "dit-paper-gflops" in line
    one_line(CliRunner().invoke(main, ["run", "quik", "--dry-run"]), "did you mean 'quick'")
    one_line(CliRunner().invoke(main, ["run", "nosuch/grid.yaml"]), "no such file")


def test_a_query_that_matches_nothing_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = grid(tmp_path)
    assert CliRunner().invoke(main, ["run", str(g), "--no-progress"]).exit_code == 0
    one_line(CliRunner().invoke(main, ["table", str(g), "-q", "patch_size == 99"]),
             "no rows match 'patch_size == 99' (of 4)", code=1)
    r = CliRunner().invoke(main, ["table", str(g), "-q", "patch_size == 4", "-f", "csv", "-c", "block"])
    assert r.exit_code == 0 and r.output.split() == ["block", "adaln-zero", "in-context"]


def plugin_grids(tmp_path, body: str, n: int = 2) -> list[str]:
    (tmp_path / "plugin.py").write_text(textwrap.dedent(body))
    paths = []
    for i in range(n):
        p = tmp_path / f"g{i}.yaml"
        p.write_text("name: g\nimports: [plugin.py]\nbase: {size: T, data: {name: digits, image_size: 8}, "
                     "measure: [flops]}\n")
        paths.append(str(p))
    return paths


def test_validate_reports_a_failing_plugin_for_every_grid_that_imports_it(tmp_path):
    paths = plugin_grids(tmp_path, "raise RuntimeError('broken plugin')\n")
    r = CliRunner().invoke(main, ["validate", *paths])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 2 and "ok" not in r.stdout, (r.stdout, r.stderr)
    for path, line in zip(paths, lines):
        assert line.startswith(f"error: {path}") and "broken plugin" in line, line


def test_a_failing_plugin_is_imported_again_by_the_next_grid(tmp_path):
    """In one process (``ablate run`` loading grids), a half-imported plugin is not left behind."""
    from ablate.grid import load_grid
    from ablate.settings import ConfigError

    paths = plugin_grids(tmp_path, "raise RuntimeError('broken plugin')\n")
    for path in paths:
        with pytest.raises(ConfigError, match="broken plugin"):
            load_grid(path)


@pytest.mark.parametrize("body, words", [
    ("raise KeyboardInterrupt\n", ["KeyboardInterrupt"]),
    ("import os\nos._exit(0)\n", ["exited with code 0"]),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", ["killed by signal 9"]),
])
def test_validate_says_when_a_plugin_stops_the_process(tmp_path, body, words):
    path, = plugin_grids(tmp_path, body, n=1)
    one_line(CliRunner().invoke(main, ["validate", path]), path, *words)


def test_ls_usage_fits_a_narrow_terminal():
    usage = CliRunner().invoke(main, ["ls", "--help"], prog_name="ablate", terminal_width=60).output.splitlines()[0]
    assert usage == "Usage: ablate ls [OPTIONS] [WHAT]"


def test_a_folder_under_a_file_or_with_too_long_a_name_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = grid(tmp_path)
    (tmp_path / "afile").write_text("x")
    for args in (["run", str(g), "--results", "afile/sub"], ["table", "--results", "afile/sub"],
                 ["report", str(g), "--out", "afile/r"]):
        one_line(CliRunner().invoke(main, args), "afile is a file, not a folder")
    one_line(CliRunner().invoke(main, ["run", str(g), "--results", "a" * 300]), "File name too long")
    (tmp_path / "results").write_text("x")  # the default results/<grid> under a file
    one_line(CliRunner().invoke(main, ["run", str(g), "--no-progress"]), "results is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x" and (tmp_path / "results").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "g.yaml", "results"]


def test_report_only_reads_the_results_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = grid(tmp_path)
    assert CliRunner().invoke(main, ["run", str(g), "--no-progress"]).exit_code == 0
    record = next((tmp_path / "results" / "g" / "measurements").glob("*.json"))
    record.write_text("{not json")
    r = CliRunner().invoke(main, ["report", str(g), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "unreadable" in r.stderr and record.read_text() == "{not json"  # warned of, not set aside
    assert not list((tmp_path / "results").rglob("*.corrupt"))
