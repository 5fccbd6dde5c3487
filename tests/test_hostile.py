"""What a new user and a hostile or unlucky input hit, run as a user runs them:
the `ablate` command in a fresh process. Bad input is one line, exit 2, no traceback."""
import os
import textwrap
from pathlib import Path

import pytest
import torch

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
    # every subpackage of the source tree is installed (pyproject lists them one by one)
    wanted = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "ablate").rglob("__init__.py")}
    got = {p.parent.relative_to(tmp_path / "site").as_posix()
           for p in (tmp_path / "site" / "ablate").rglob("__init__.py")}
    assert wanted <= got, sorted(wanted - got)
    assert (tmp_path / "site" / "ablate" / "reference" / "dit_table4_256.csv").is_file()
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


# ----- the results store: shared cells, bad records, full disks, links ------------------
PLUGINS = Path(__file__).resolve().parent / "plugins"


def probe_grid(folder: Path, name: str, measure: str, axes: str = "{seed: [0, 1]}", probe: str = "{}") -> Path:
    p = folder / f"{name}.yaml"
    p.write_text(textwrap.dedent(f"""
        name: {name}
        imports: [{PLUGINS / 'probe.py'}, {PLUGINS / 'faults.py'}]
        grid: {axes}
        base:
          model: DiT-T/4
          data: {{name: digits, image_size: 8}}
          measure: [{measure}]
          probe: {probe}
        """))
    return p


def test_table_of_a_folder_shows_every_cell_and_a_grid_that_is_not_there_says_so(flops_grid, tmp_path):
    g, res = flops_grid
    r = run_cli("table", "--results", res, "-f", "csv", "-c", "patch_size,gflops", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.strip().splitlines()
    assert rows[0] == "patch_size,gflops" and sorted(x.split(",")[0] for x in rows[1:]) == ["2", "4"]
    other = probe_grid(tmp_path, "other", "probe", "{seed: [5, 6]}")
    one_error_line(run_cli("table", other, "--results", res, cwd=tmp_path),
                   "none of the 2 cells of grid 'other' is here", "2 cells of grid 'g'")


def test_a_cell_shared_by_two_grids_keeps_what_each_asked(tmp_path):
    res = tmp_path / "res"
    b = probe_grid(tmp_path, "b", "probe_after")  # probe, then probe_after
    a = probe_grid(tmp_path, "a", "probe")
    assert run_cli("run", b, "--results", res, "--no-progress").returncode == 0
    r = run_cli("run", a, "--results", res, "--no-progress")
    assert r.returncode == 0 and "0 measured, 2 reused" in r.stdout, r.stderr
    r = run_cli("table", b, "--results", res, "-f", "csv", "-c", "seed,probe_value,probe_after_value")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["seed,probe_value,probe_after_value", "0,0.0,1.0", "1,1.0,2.0"]
    r = run_cli("table", "--results", res, "-f", "csv", "-c", "seed,probe_after_value,status")
    assert r.stdout.split() == ["seed,probe_after_value,status", "0,1.0,ok", "1,2.0,ok"]


def test_a_runner_waits_for_what_another_holds_and_fails_if_it_stays_held(tmp_path):
    import subprocess
    import sys
    import time

    res, log, gate = tmp_path / "res", tmp_path / "log", tmp_path / "gate"
    probe = f"{{wait_for: {gate}}}"
    a = probe_grid(tmp_path, "a", "probe", "{seed: [0]}", probe)
    b = probe_grid(tmp_path, "b", "probe_after", "{seed: [0]}", probe)
    env = {**os.environ, "ABLATE_PROBE_LOG": str(log)}
    cmd = [sys.executable, "-m", "ablate.cli", "run", "--results", str(res), "--no-progress"]
    holder = subprocess.Popen(cmd + [str(a)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (log.exists() and "start" in log.read_text()):
        assert time.time() < deadline and holder.poll() is None
        time.sleep(0.05)
    # Held past --wait: not done, so not a success.
    r = run_cli("run", b, "--results", res, "--no-progress", "--wait", "0.5", env={"ABLATE_PROBE_LOG": str(log)})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "0 measured, 0 reused, 0 failed, 2 held by another process" in r.stdout
    assert "not done: DiT-T/4 adaln-zero seed=0: probe: still held by another process after 0.5 s" in r.stderr
    # Waiting: it measures probe_after as soon as the holder is done with probe.
    err = open(tmp_path / "waiter.err", "w")
    waiter = subprocess.Popen(cmd + [str(b)], env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    while "waiting up to 300 s for 2 measurement(s)" not in (tmp_path / "waiter.err").read_text():
        assert time.time() < deadline and waiter.poll() is None, (tmp_path / "waiter.err").read_text()
        time.sleep(0.05)
    gate.touch()
    assert holder.wait(timeout=120) == 0 and waiter.wait(timeout=120) == 0, (tmp_path / "waiter.err").read_text()
    assert "1 measured, 1 reused, 0 failed, 0 held" in waiter.stdout.read()
    kinds = [line.split()[0] for line in log.read_text().splitlines()]
    assert kinds == ["start", "done", "after"]  # probe measured once, by the holder


def test_corrupt_records_are_set_aside_and_measured_again(tmp_path):
    import json

    res = tmp_path / "res"
    g = probe_grid(tmp_path, "g", "probe")
    assert run_cli("run", g, "--results", res, "--no-progress").returncode == 0
    results = sorted((res / "measurements").glob("*.json"))
    cells = sorted((res / "cells").glob("*.json"))
    assert len(results) == 2 and len(cells) == 2
    results[0].write_bytes(b'{"status": "ok", "metrics": {"probe_value": \xff\xfe}}')  # not UTF-8
    results[1].write_text("{}")
    cells[0].write_text(cells[0].read_text()[:40])  # cut short
    cells[1].write_text("[]")
    for args in (["table", "--results", res], ["run", g, "--results", res, "--dry-run"]):
        r = run_cli(*args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        warnings = r.stderr.strip().splitlines()
        assert all(w.startswith("warning: ") and "unreadable" in w for w in warnings), r.stderr
        assert " ok " not in r.stdout and "probe:ok" not in r.stdout
    assert not list(res.rglob("*.corrupt"))  # table and --dry-run write nothing
    r = run_cli("run", g, "--results", res, "--no-progress")
    assert r.returncode == 0 and "2 measured, 0 reused" in r.stdout, r.stderr
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 4 and all("kept as" in w and ".corrupt" in w for w in warnings), r.stderr
    assert len(list(res.rglob("*.corrupt"))) == 4
    assert sorted(json.loads(p.read_text())["status"] for p in results) == ["ok", "ok"]
    assert sorted(json.loads(p.read_text())["id"] for p in cells) == sorted(p.stem for p in cells)


def test_results_as_a_file_is_one_line_for_run_and_dry_run(tmp_path):
    g = probe_grid(tmp_path, "g", "probe")
    (tmp_path / "res").write_text("a file")
    one_error_line(run_cli("run", g, "--results", tmp_path / "res", "--dry-run"), "res: not a folder")
    one_error_line(run_cli("run", g, "--results", tmp_path / "res"), "res: not a folder")
    assert (tmp_path / "res").read_text() == "a file"


def test_a_read_only_folder_runs_when_nothing_is_left_and_fails_in_one_line_per_cell(tmp_path):
    res = tmp_path / "res"
    g = probe_grid(tmp_path, "g", "probe")
    assert run_cli("run", g, "--results", res, "--no-progress").returncode == 0
    before = {p: p.read_bytes() for p in res.rglob("*") if p.is_file()}
    ro = {"ABLATE_READ_ONLY": str(res)}
    r = run_cli("run", g, "--results", res, "--no-progress", env=ro)
    assert r.returncode == 0 and "0 measured, 2 reused" in r.stdout and r.stderr == "", r.stderr
    assert run_cli("run", g, "--results", res, "--dry-run", env=ro).returncode == 0
    next(res.glob("measurements/*.json")).unlink()
    r = run_cli("run", g, "--results", res, "--no-progress", env=ro)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and "Read-only file system" in failed[0] and "seed=" in failed[0], r.stderr
    assert {p: p.read_bytes() for p in res.rglob("*") if p.is_file()} == {
        p: b for p, b in before.items() if p.exists()}


TRAIN_GRID = """
    name: t
    imports: [{faults}]
    grid: {{train.lr: [1.0e-3, 2.0e-3]}}
    base:
      model: DiT-T/4
      data: {{name: digits, image_size: 8}}
      measure: [train]
      train: {{steps: 4, batch_size: 8, log_every: 2, checkpoint_every: 2, eval_samples: 0, precision: fp32}}
    """


def test_a_full_disk_fails_each_cell_in_one_line_leaves_no_temporary_file_and_goes_on(tmp_path):
    import json

    g = tmp_path / "t.yaml"
    g.write_text(textwrap.dedent(TRAIN_GRID.format(faults=PLUGINS / "faults.py")))
    res = tmp_path / "res"
    r = run_cli("run", g, "--results", res, "--no-progress", env={"ABLATE_FULL_DISK": "checkpoint"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    failed = sorted(line for line in r.stderr.splitlines() if line.startswith("failed: "))
    assert len(failed) == 2, r.stderr  # the second cell ran after the first failed
    for line, lr in zip(failed, ("0.001", "0.002")):  # the whole cell: the axis that varies too
        assert line.startswith(f"failed: DiT-T/4 adaln-zero seed=0 train.lr={lr}: train: ") and \
            "No space left on device" in line, line
    assert not [p for p in res.rglob("*") if p.name.endswith(".tmp")]
    records = [json.loads(p.read_text()) for p in res.glob("measurements/*.json")]
    assert [r["status"] for r in records] == ["failed", "failed"]  # recorded: the JSON still fits
    # A disk too full for the records too: still one line per cell, nothing half-written.
    r = run_cli("run", g, "--results", tmp_path / "res2", "--no-progress", env={"ABLATE_FULL_DISK": "all"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and all("No space left on device" in line for line in failed), r.stderr
    assert not [p for p in (tmp_path / "res2").rglob("*") if p.name.endswith(".tmp")]


def test_a_corrupt_checkpoint_is_named_kept_aside_and_training_starts_over(tmp_path):
    import json

    g = tmp_path / "t.yaml"
    g.write_text(textwrap.dedent(TRAIN_GRID.format(faults=PLUGINS / "faults.py")).replace(
        "[1.0e-3, 2.0e-3]", "[1.0e-3]"))
    res = tmp_path / "res"
    assert run_cli("run", g, "--results", res, "--no-progress").returncode == 0
    (ckpt,) = res.glob("work/train-*/checkpoint.pt")
    (record,) = res.glob("measurements/train-*.json")
    first = json.loads(record.read_text())["metrics"]
    record.unlink()
    ckpt.write_bytes(b"\x00" * 100)
    r = run_cli("run", g, "--results", res, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"warning: {ckpt}: unreadable checkpoint" in r.stderr and "training starts over" in r.stderr
    assert ckpt.with_name("checkpoint.pt.corrupt").read_bytes() == b"\x00" * 100
    again = json.loads(record.read_text())["metrics"]
    assert [e["step"] for e in again["log"]] == [2, 4]  # from the start, not resumed
    assert again["final_loss"] == pytest.approx(first["final_loss"], rel=1e-5)  # same seed, same run


def test_links_out_of_the_results_folder_are_refused(tmp_path):
    res = tmp_path / "res"
    g = probe_grid(tmp_path, "g", "probe")
    assert run_cli("run", g, "--results", res, "--no-progress").returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = next(res.glob("locks/probe-*.lock"))
    next(res.glob("measurements/*.json")).unlink()
    lock.unlink()
    lock.symlink_to(victim)
    one_error_line(run_cli("run", g, "--results", res, "--no-progress"),
                   f"{lock.relative_to(res)} is a symbolic link to {victim}, outside the results folder")
    lock.unlink()
    png = res / "work" / "train-0123" / "samples_step0000010.png"
    png.parent.mkdir(parents=True)
    png.symlink_to(victim)
    one_error_line(run_cli("run", g, "--results", res, "--dry-run"), "samples_step0000010.png is a symbolic link")
    assert victim.read_text() == "precious"


def test_store_files_honour_the_umask(tmp_path):
    res = tmp_path / "res"
    g = probe_grid(tmp_path, "g", "probe")
    old = os.umask(0o022)
    try:
        assert run_cli("run", g, "--results", res, "--no-progress").returncode == 0
    finally:
        os.umask(old)
    modes = {(p.relative_to(res).parts[0], oct(p.stat().st_mode & 0o777)) for p in res.rglob("*") if p.is_file()}
    assert modes == {("cells", "0o644"), ("measurements", "0o644"), ("locks", "0o644"), ("table.csv", "0o644"),
                     ("table.md", "0o644")}


# ----- a GPU grid's table on a CPU machine, fid --device, Ctrl-C -----
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_gpu_grids_committed_table_reads_on_a_machine_without_a_gpu():
    from conftest import REPO

    r = run_cli("table", "gpu-block-ablation", "-c", "block,fid,step_img_per_s", "-f", "csv", cwd=REPO)
    assert r.returncode == 0, r.stderr
    rows = dict(line.split(",", 1) for line in r.stdout.strip().splitlines()[1:])
    assert set(rows) == {"adaln-zero", "adaln", "cross-attn", "in-context"}
    for values in rows.values():  # FID and the H100's timed step, both read from the stored results
        fid, img_s = map(float, values.split(","))
        assert fid > 0 and img_s > 1000
    dry = run_cli("run", "gpu-block-ablation", "--dry-run", cwd=REPO)
    assert dry.returncode == 0, dry.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cpu:0x"])
def test_fid_with_a_device_that_is_not_here_is_one_line(tmp_path, device):
    r = run_cli("fid", "digits", "digits", "--device", device, "-n", "10", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --device")


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "g.yaml").write_text(
        "name: g\nbase: {model: DiT-T/4, data: {name: digits, image_size: 8}, measure: [train],\n"
        "       train: {steps: 100000, batch_size: 8, precision: fp32, eval_samples: 0}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "ablate.cli", "run", "g.yaml", "--no-progress"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list((tmp_path / "results" / "g" / "work").glob("train-*")):  # training has started
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run again to resume" in err and "Traceback" not in err


# ----- ablate fid: devices, sizes and counts checked first, every image read faithfully or refused -----
def write_images(folder, n: int, size: int, mode: str = "L", value: int = 128):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.new(mode, (size, size), value + i if mode == "L" else value).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize("device", ["meta", "cpu:5", "cudafoo", "cuda:x", "cuda:99"])
def test_fid_refuses_a_device_it_would_replace_or_fail_on_later(tmp_path, device):
    one_error_line(run_cli("fid", "digits", "digits", "-n", "10", "--device", device, cwd=tmp_path), "--device")


def test_fid_checks_sizes_and_counts_before_reading_or_training(tmp_path):
    one_error_line(run_cli("fid", "digits", "digits", "--image-size", "100000", cwd=tmp_path),
                   "--image-size: 100000 px; at most 1024")
    few = write_images(tmp_path / "few", 3, 8)
    one_error_line(run_cli("fid", few, "digits", "-n", "5", cwd=tmp_path),
                   "--samples 5, but the folder holds 3 images")
    one_error_line(run_cli("fid", "digits", "digits", "-n", "100000", cwd=tmp_path),
                   "--samples 100000, but the dataset holds 1797 images")
    one_error_line(run_cli("fid", write_images(tmp_path / "one", 1, 8), "digits", cwd=tmp_path), "at least 2 images")
    # Sample mosaics: a domain extractor would be trained at 300 px; refused at once, with the reason
    mosaics = write_images(tmp_path / "mosaics", 3, 300)
    r = one_error_line(run_cli("fid", mosaics, "digits", cwd=tmp_path, timeout=60),
                       "the folder's images are 300x300", "digits is made at 32x32", "mosaic")
    assert "--extractor inception" in r
    one_error_line(run_cli("fid", "digits", "digits", cwd=tmp_path), "the same 1797 images", "FID is 0")


def test_fid_refuses_unreadable_and_oversized_images(tmp_path):
    from PIL import Image

    bad = write_images(tmp_path / "bad", 2, 8)
    (bad / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    one_error_line(run_cli("fid", bad, "digits", cwd=tmp_path), "002.png: not a readable image")
    # A header claiming more pixels than PIL's limit, though the file is small (a decompression bomb)
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    Image.new("1", (10000, 10000)).save(bomb / "000.png")
    Image.new("1", (10000, 10000)).save(bomb / "001.png")
    assert (bomb / "000.png").stat().st_size < 100_000
    # 100 Mpixel: refused from its header, never decoded
    one_error_line(run_cli("fid", bomb, "digits", cwd=tmp_path), "000.png: refused", "decompression bomb")


def test_folders_refuse_decompression_bombs_in_one_line(tmp_path, monkeypatch):
    from PIL import Image

    from ablate.quality.sources import SourceError, from_folder

    write_images(tmp_path / "big", 2, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a warning above this, an error above twice it
    with pytest.raises(SourceError, match="000.png: refused: .*decompression bomb"):
        from_folder(tmp_path / "big")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 pixels: only PIL's warning, made an error
    with pytest.raises(SourceError, match="000.png: refused"):
        from_folder(tmp_path / "big")


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from ablate.quality.sources import from_folder

    folder = tmp_path / "deep"
    folder.mkdir()
    for i, v in enumerate((0, 257 * 64, 257 * 128, 65535)):
        Image.fromarray(np.full((4, 4), v, dtype=np.uint16)).save(folder / f"{i}.png")
    with Image.open(folder / "1.png") as im:
        assert im.mode.startswith("I")  # read back as 16-bit (or 32-bit) grey, not 8-bit
    src = from_folder(folder)
    assert src.images.dtype == torch.uint8 and tuple(src.images.shape) == (4, 3, 4, 4)
    assert src.images[:, :, 0, 0].tolist() == [[0] * 3, [64] * 3, [128] * 3, [255] * 3]
    write_images(tmp_path / "rgb", 1, 4, mode="RGB", value=(10, 20, 30))
    assert from_folder(tmp_path / "rgb").images[0, :, 0, 0].tolist() == [10, 20, 30]  # 8-bit RGB unchanged


# ----- what the quick grid writes stays out of git -----
def test_the_quick_grids_outputs_are_ignored_by_git():
    import subprocess

    from conftest import REPO

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    written = ["results/quick/table.csv", "results/quick/table.md", "results/quick/cells/0123.json",
               "results/quick/measurements/flops-0123456789ab.json", "results/quick/work/train-0123/samples_step0000010.png",
               "reports/quick/report.md", "reports/quick/report.html", "reports/quick/samples/x.png"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=REPO, capture_output=True, text=True)
    assert r.stdout.split() == written, r.stdout
    tracked = subprocess.run(["git", "ls-files", "results/quick", "reports/quick"], cwd=REPO, capture_output=True,
                             text=True)
    assert tracked.stdout == ""
    # the committed grids' results and reports stay tracked
    r = subprocess.run(["git", "check-ignore", "--no-index", "results/block-ablation/table.csv",
                        "reports/block-ablation/report.md"], cwd=REPO, capture_output=True, text=True)
    assert r.stdout == ""
