import pytest
import torch

from ablate.measure.matmul_peak import matmul_peak_tflops
from ablate.precision import native_bf16, resolve_precision
from ablate.measure.timing import TimingSettings, _peak_mb, _reset_peak, time_model
from ablate.settings import ConfigError, parse
from conftest import tiny


def small():
    return tiny(hidden_size=32, depth=1, num_heads=2)


def test_timing_row_is_self_consistent():
    s = TimingSettings(batch_size=4, precision="fp32", warmup=1, repeats=3)
    gflops = 0.001
    row = time_model(small(), s, torch.device("cpu"), gflops=gflops)
    for prefix in ("fwd", "step"):
        assert row[f"{prefix}_ms"] > 0 and row[f"{prefix}_ms_iqr"] >= 0
        assert row[f"{prefix}_img_per_s"] == pytest.approx(4 / (row[f"{prefix}_ms"] / 1e3))
        assert row[f"{prefix}_peak_mem_mb"] > 10  # the process's resident set: torch alone is more
    peak = row["matmul_peak_tflops"]
    assert row["fwd_mfu"] == pytest.approx(2 * gflops * 1e9 * row["fwd_img_per_s"] / (peak * 1e12))
    assert row["step_mfu"] == pytest.approx(3 * row["fwd_mfu"] * row["step_img_per_s"] / row["fwd_img_per_s"])
    assert row["step_ms"] > row["fwd_ms"] * 0.5  # backward and optimizer cost something


def test_training_step_in_timing_updates_the_weights():
    model = small()
    before = [p.detach().clone() for p in model.parameters()]
    time_model(model, TimingSettings(batch_size=2, precision="fp32", warmup=0, repeats=1, modes=["train"]),
               torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_peak_rss_reset_tracks_a_new_allocation():
    import mmap

    _reset_peak(torch.device("cpu"))
    base = _peak_mb(torch.device("cpu"))
    # Fresh pages straight from the kernel: a tensor could reuse memory the allocator kept
    # resident after earlier tests, and then the resident set would not grow.
    m = mmap.mmap(-1, 64 * 2**20)
    for i in range(0, len(m), 4096):
        m[i] = 1  # touch every page
    assert _peak_mb(torch.device("cpu")) >= base + 50
    m.close()


def test_matmul_peak_is_the_best_reading_of_its_matmul_and_cached():
    import time

    n = 256
    peak = matmul_peak_tflops("cpu", "fp32", n=n, seconds=0.05)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(30):
        t0 = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - t0)
    here = 2 * n**3 / best / 1e12  # the same product timed here: the same TFLOP/s, to the machine's noise
    assert 0.25 < peak / here < 4, (peak, here)
    assert matmul_peak_tflops("cpu", "fp32", n=n, seconds=0.05) is peak  # cached, not measured again


def test_auto_precision_uses_bf16_only_where_native():
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == ("bf16" if native_bf16("cpu") else "fp32")
    assert resolve_precision(cpu, "fp32") == "fp32"


def test_bad_timing_settings_name_the_key():
    with pytest.raises(ConfigError, match="timing.batch_size: 0 must be > 0"):
        parse(TimingSettings, {"batch_size": 0}, "timing")
    with pytest.raises(ConfigError, match="timing.precision: 'fp16' is not one of"):
        parse(TimingSettings, {"precision": "fp16"}, "timing")
