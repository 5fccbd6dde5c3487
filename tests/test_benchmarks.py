"""The benchmark scripts cannot rot: the official-behaviour copy computes the same loss and
samples as ablate's diffusion, train_throughput.py runs end to end on a tiny config, and so
does every section of the GPU check."""
import sys
from pathlib import Path

import pytest
import torch

from ablate.diffusion import create_diffusion
from conftest import REPO, tiny

sys.path.insert(0, str(REPO / "benchmarks"))
import official  # noqa: E402
import train_throughput  # noqa: E402


def test_official_copy_computes_ablates_loss():
    model = tiny(live_output=True)
    x, y = torch.randn(6, 4, 8, 8), torch.arange(6)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    torch.manual_seed(0)
    ours = create_diffusion(None, learn_sigma=True).training_losses(model, x, t, {"y": y})
    torch.manual_seed(0)
    theirs = official.OfficialDiffusion().training_losses(model, x, t, {"y": y})
    for k in ("mse", "vb", "loss"):
        torch.testing.assert_close(theirs[k], ours[k], rtol=1e-5, atol=1e-6)


def test_official_sampling_loop_matches_ablates_sampler():
    model = tiny(live_output=True).eval()
    d = create_diffusion("5", learn_sigma=True)
    z = torch.randn(4, 4, 8, 8)
    y = torch.tensor([1, 2, 10, 10])  # conditional half, null half
    torch.manual_seed(1)
    fn = lambda x, t, y: model.forward_with_cfg(x, t, y, 1.5, cfg_channels=3)  # noqa: E731
    theirs = official.OfficialDiffusion(5).p_sample_loop(fn, z, {"y": y})
    torch.manual_seed(1)  # both draw each step's noise from the global RNG
    ours = d.sample(fn, z.shape, {"y": y}, noise=z)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_train_throughput_runs_on_a_tiny_config(tmp_path, capsys):
    out = tmp_path / "t.md"
    train_throughput.main(["--model", "DiT-T/8", "--batch", "2", "--steps", "1", "--warmup", "1", "--device", "cpu",
                           "--input-size", "16", "--num-classes", "10", "--rows", "official-tf32,plain",
                           "--out", str(out)])
    text = out.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| official-tf32") or line.startswith("| plain")]
    assert len(lines) == 2 and "DiT-T/8, training step, batch 2" in text
    for row in md_rows(out):  # a batch of 2 per timed step: the two columns agree (to the 3 digits shown)
        assert float(row["img_per_s"]) == pytest.approx(2 / (float(row["step_ms"]) / 1000), rel=0.01), row


def test_kernels_are_grouped_by_the_work_they_do():
    from train_throughput import kernel_kind

    assert kernel_kind("triton_poi_fused_addmm_gelu_3") == "fused elementwise (Inductor)"  # named after its ops
    assert kernel_kind("triton_per_fused__scaled_dot_product_flash_attention_0") == "fused elementwise (Inductor)"
    assert kernel_kind("triton_tem_fused_mm_0") == "matmul"  # Inductor's matmul template
    assert kernel_kind("triton_poi_fused__foreach_lerp_1") == "optimizer + EMA"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kernel_kind("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTN") == "matmul"
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96>>") == "attention"
    assert kernel_kind("void cudnn::engines_precompiled::nchwToNhwcKernel<float>") == "other"
    assert kernel_kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamW>") \
        == "optimizer + EMA"
    assert kernel_kind("aten::addmm") == "matmul" and kernel_kind("aten::addcdiv_") == "optimizer + EMA"
    assert kernel_kind("autograd::engine::evaluate_function: AddmmBackward0") == "other"
    from train_throughput import annotation

    assert annotation("Optimizer.step#AdamW.step") and annotation("ProfilerStep#2")  # spans, not kernels
    assert not annotation("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamW>")


def test_throughput_refuses_bad_profile_settings_and_keeps_rows_as_it_goes(tmp_path, monkeypatch):
    import subprocess

    tiny = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--model", "DiT-T/8", "--batch", "4",
            "--input-size", "16", "--num-classes", "10", "--steps", "1", "--warmup", "1", "--device", "cpu"]
    for bad, message in ((["--profile", "-1"], "--profile -1"), (["--profile-top", "0"], "kernels >= 1"),
                         (["--sample", "--sample-rows", "default,bf16-tru"], "unknown row 'bf16-tru'"),
                         (["--sample", "--profile", "1"], "at least 2 denoising steps"),
                         (["--sample", "--sample-steps", "1"], "--sample-steps 1: must be >= 2"),
                         (["--sample", "--images", "0"], "--images 0: must be >= 1"),
                         (["--sample", "--rows", "plain"], "with --sample use --sample-rows"),
                         (["--sample-rows", "plain"], "applies with --sample")):
        r = subprocess.run(tiny + bad, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    # A run stopped during its second row (in the GPU check: by the section's time limit)
    # keeps the first row's table: the table is written after each row.
    out = tmp_path / "t.md"
    real = train_throughput.train_row

    def stopped(name, *args):
        if name == "official-bf16":
            raise KeyboardInterrupt  # not an Exception: the run ends here, as under a kill
        return real(name, *args)

    monkeypatch.setattr(train_throughput, "train_row", stopped)
    with pytest.raises(KeyboardInterrupt):
        train_throughput.main(tiny[2:] + ["--rows", "plain,official-bf16", "--out", str(out)])
    assert [row["row"] for row in md_rows(out)] == ["plain"] and float(md_rows(out)[0]["img_per_s"]) > 0


def test_lever_rows_turn_their_lever_on_and_say_where_it_cannot_act(tmp_path, monkeypatch):
    """Each lever row hands its lever to ablate (``bf16-residual``: the bf16 stream;
    ``coordinate-descent``: that compile mode; ``bf16-true``: a bf16 network), and a row whose
    lever cannot act here (no autocast, no compile) says in its note that it measured the default."""
    from ablate.precision import resolve_precision

    calls = []
    real_step, real_sample = train_throughput.TrainStep, train_throughput.sample_images
    monkeypatch.setattr(train_throughput, "TrainStep", lambda *a, **kw: calls.append(vars(a[2])) or real_step(*a, **kw))
    monkeypatch.setattr(train_throughput, "sample_images", lambda *a, **kw: calls.append(kw) or real_sample(*a, **kw))
    tiny = ["--model", "DiT-T/8", "--input-size", "16", "--num-classes", "10", "--device", "cpu", "--compile", "false"]
    out = tmp_path / "t.md"
    train_throughput.main(tiny + ["--batch", "2", "--steps", "1", "--warmup", "1",
                                  "--rows", "default,bf16-residual,coordinate-descent", "--out", str(out)])
    default, residual, tuned = calls
    assert (default["low_precision_residual"], default["compile_mode"]) == (False, "default")
    assert (residual["low_precision_residual"], residual["compile_mode"]) == (True, "default")
    assert (tuned["low_precision_residual"], tuned["compile_mode"]) == (False, "coordinate-descent")
    notes = {row["row"]: row["note"] for row in md_rows(out)}
    assert notes["default"] == "" and notes["coordinate-descent"].startswith("= default here: not compiled")
    bf16 = resolve_precision(torch.device("cpu"), "auto") == "bf16"
    assert (notes["bf16-residual"] == "") == bf16, notes  # inert only where auto is not bf16 autocast
    assert train_throughput.inert("reduce-overhead", "bf16", True) == (
        "" if torch.cuda.is_available() else "= default here: CUDA graphs need CUDA")
    calls.clear()
    train_throughput.main(tiny + ["--sample", "--images", "2", "--sample-steps", "2", "--sample-rows", "default,bf16-true"])
    assert {c["precision"] for c in calls[:2]} == {resolve_precision(torch.device("cpu"), "auto")}  # warm-up, timed
    assert {c["precision"] for c in calls[2:]} == {"bf16-true"} and len(calls) == 4


def test_mfu_of_a_bf16_network_is_read_against_the_bf16_peak():
    rows = [{"row": "official-bf16", "precision": "bf16", "img_per_s": 10.0},
            {"row": "bf16-true", "precision": "bf16-true", "img_per_s": 20.0}]
    train_throughput.table(rows, 1e11, {"bf16": 2.0, "fp32": 8.0}, "official-bf16", train=False)
    assert rows[1]["mfu"] == pytest.approx(1e11 * 20.0 / 2e12) and rows[1]["vs_official_bf16"] == 2.0
    assert rows[0]["mfu"] == pytest.approx(1e11 * 10.0 / 2e12)


def processes_with_env(entry: str) -> list[str]:
    """The ids of the running processes whose environment holds ``entry`` (``NAME=value``):
    those that one test started, whoever else runs on the machine."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile, or another user's
            continue
        if entry.encode() in environ:
            found.append(proc.name)
    return found


def md_rows(path) -> list[dict]:
    """The rows of a markdown table (tabulate's pipe or github format) as dicts of strings."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_the_gpu_check_runs_on_a_cpu_for_tiny_configs(tmp_path):
    """benchmarks/gpu_check.sh --tiny: every section of the GPU check, on tiny models on this
    CPU (about 2 minutes), so the script run on a GPU cannot rot unseen."""
    import os
    import subprocess

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABLATE_GPU_CHECK_")}  # the whole check
    env.update(OUT=str(out), ABLATE_COMPILE_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    sections = [line.split(":")[0] for line in summary if ": exit" in line]
    assert sections == ["train_S2", "train_S2_cached", "train_XL2", "sample_XL2", "train_digits", "train_S2_extra",
                        "train_XL2_attention", "sample_XL2_extra", "timing_grid", "train_digits_torchrun", "profile_XL2",
                        "train_S2_autotune", "sample_XL2_autotune", "sample_XL2_levers", "train_S2_levers",
                        "train_XL2_levers"], summary
    assert all(": exit 0 " in line for line in summary if ": exit" in line), summary
    # The training step's rows, ablate's and the official copy's, measured side by side.
    assert [row["row"] for row in md_rows(out / "train_S2.md")] == ["official-tf32", "official-bf16", "plain",
                                                                    "default"]
    assert all(float(row["img_per_s"]) > 0 for row in md_rows(out / "train_XL2.md"))
    # The profile of each row: its time by kind of work adds up to the profiled total.
    for table, rows in (("profile_XL2", 2), ("sample_XL2_levers", 3), ("train_S2_levers", 4)):
        text = (out / f"{table}.md").read_text()
        for part in text.split("step's time goes")[1:]:
            total = float(part.split(", ")[1].split(" ms per step")[0])
            kinds = [line.split("|") for line in part.split("\n\n")[1].splitlines()[2:]]
            assert sum(float(cells[2]) for cells in kinds) == pytest.approx(total, rel=0.02)
        assert text.count("step's time goes") == rows, table  # every row profiled
    # Sampling with a bf16 network: its row says so, and its MFU is read against the bf16 peak.
    levers = {row["row"]: row for row in md_rows(out / "sample_XL2_levers.md")}
    assert levers["bf16-true"]["precision"] == "bf16-true" and float(levers["bf16-true"]["img_per_s"]) > 0
    grid = md_rows(out / "timing_grid.md")
    assert [(row["block"], row["status"]) for row in grid] == [
        ("adaln-zero", "ok"), ("adaln", "ok"), ("cross-attn", "ok"), ("in-context", "ok")]
    # The short training run learns, and the same grid under torchrun (2 gloo ranks here,
    # DDP) ends at one process's loss.
    one, = md_rows(out / "train_digits.md")
    two, = md_rows(out / "train_digits_torchrun.md")
    assert float(one["final_loss"]) < float(one["loss_start"])
    assert two["train_ranks"] == "2"
    assert float(two["final_loss"]) == pytest.approx(float(one["final_loss"]), rel=2e-3)  # 4 digits printed


def test_the_gpu_check_refuses_bad_settings_and_stops_on_ctrl_c(tmp_path):
    import os
    import shutil
    import signal
    import subprocess
    import time

    def check(*args, **env):
        return subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OUT": str(tmp_path / "out"), **env}, timeout=300)

    for args, env, message in [(["--tiny", "--oops"], {}, "unknown argument '--oops'"),
                               (["--tiny"], {"ABLATE_GPU_CHECK_BUDGET": "1000000"}, "15 to 999999"),
                               (["--tiny"], {"ABLATE_GPU_CHECK_BUDGET": "14"}, "'14' must be a whole number"),
                               (["--tiny"], {"ABLATE_GPU_CHECK_SECTIONS": "train_S2,*"}, "no section '*'"),
                               (["--tiny"], {"ABLATE_GPU_CHECK_BUDGET": "08"}, "without a leading zero")]:
        r = check(*args, **env)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()  # nothing written
    # A budget the set-up spends before the first section (it starts Python twice): nothing
    # measured is a failure, not a pass.
    r = check("--tiny", ABLATE_GPU_CHECK_BUDGET="15", ABLATE_GPU_CHECK_SECTIONS="sample_XL2")
    assert r.returncode == 1 and "no section ran" in r.stderr, r.stdout + r.stderr
    shutil.rmtree(tmp_path / "out")
    r = check("--help")
    assert r.returncode == 0 and "profile_XL2" in r.stdout and "ABLATE_GPU_CHECK_BUDGET" in r.stdout
    assert not (tmp_path / "out").exists()
    # A section whose `ablate run` fails (here: a python3 that runs it, then exits 1) fails the
    # check, though its table is made: exit 1, and summary.txt says which.
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python3").write_text(f'#!/bin/bash\nif [ "$2 $3" = "ablate.cli run" ]; then {sys.executable} "$@"; exit 1; fi\n'
                                  f'exec {sys.executable} "$@"\n')
    (bin_ / "python3").chmod(0o755)
    r = check("--tiny", ABLATE_GPU_CHECK_SECTIONS="timing_grid", PATH=f"{bin_}:{os.environ['PATH']}")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "timing_grid: exit 1 " in (tmp_path / "out" / "summary.txt").read_text()
    assert len(md_rows(tmp_path / "out" / "timing_grid.md")) == 4
    # A console that goes away (gpu_check.sh | head -1) does not end the check: its tables do not
    # depend on it. The reader closes the pipe before the first line is written.
    p = subprocess.Popen(["bash", "benchmarks/gpu_check.sh", "--tiny"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env={**os.environ, "OUT": str(tmp_path / "closed"),
                                                         "ABLATE_GPU_CHECK_SECTIONS": "sample_XL2"})
    p.stdout.close()
    assert p.wait(timeout=240) == 0
    assert [row["row"] for row in md_rows(tmp_path / "closed" / "sample_XL2.md")] == ["official-bf16", "plain",
                                                                                      "default"]
    # Ctrl-C in a section (one running `ablate run` under its own timeout): the section's
    # processes end, the work folder goes, exit 130.
    out = tmp_path / "run"
    work_before = set(Path("/tmp").glob("ablate-gpu-check.*"))
    p = subprocess.Popen(["bash", "benchmarks/gpu_check.sh", "--tiny"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OUT": str(out), "ABLATE_GPU_CHECK_SECTIONS": "train_digits timing_grid"})
    deadline = time.time() + 120
    while not (out / "train_digits.log").exists():  # the section has started
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.2)
    time.sleep(2)
    p.send_signal(signal.SIGINT)
    text, _ = p.communicate(timeout=30)
    assert p.returncode == 130 and text.rstrip().endswith("interrupted"), text
    assert not (out / "timing_grid.log").exists()  # the next section did not start
    time.sleep(1)
    assert processes_with_env(f"OUT={out}") == []  # none of this check's processes is left
    assert set(Path("/tmp").glob("ablate-gpu-check.*")) <= work_before  # its work folder removed


@pytest.mark.parametrize("bad, message", [
    (["--model", "DiT-Q/3"], "--model: unknown model 'DiT-Q/3'"),
    (["--device", "tpu"], "--device 'tpu': not cpu, cuda or cuda:N"),
    (["--device", "cpu:5"], "--device 'cpu:5'"),
    (["--device", "cuda:99"], "CUDA device"),
    (["--input-size", "15"], "--input-size 15: must be a multiple of DiT-T/8's patch size 8"),
    (["--num-classes", "0"], "--num-classes 0"),
    (["--batch", "x"], "--batch: invalid int value"),
])
def test_throughput_refuses_bad_arguments_in_one_line(bad, message, capsys, tmp_path):
    args = ["--model", "DiT-T/8", "--input-size", "16", "--device", "cpu", "--out", str(tmp_path / "t.md")]
    with pytest.raises(SystemExit) as e:
        train_throughput.main(args + bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "t.md").exists()


def test_throughput_refuses_an_out_under_a_file_before_measuring(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        train_throughput.main(["--model", "DiT-T/8", "--device", "cpu", "--out", str(tmp_path / "file" / "t.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"error: --out {tmp_path / 'file' / 't.md'}: {tmp_path / 'file'} is not a folder"]


def test_throughput_help_says_every_option_and_its_default(capsys):
    with pytest.raises(SystemExit):
        train_throughput.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = {a.option_strings[-1] for a in train_throughput._parser()._actions if a.option_strings}
    for action in train_throughput._parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
    assert all(opt in text for opt in options)
    assert "(default: DiT-S/2)" in text and "(default: 256)" in text and "(default: auto)" in text
    assert "torch.compile the model: true, false, or auto" in text
