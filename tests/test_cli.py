"""The `ablate` command as a user meets it: help, listings, dry runs, table queries."""
import textwrap

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
