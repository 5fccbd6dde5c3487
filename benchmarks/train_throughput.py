"""Training (and, with --sample, sampling) speed of ablate beside the official DiT code,
on this machine, one table per run.

    python benchmarks/train_throughput.py --model DiT-S/2 --batch 256 --device cuda
    python benchmarks/train_throughput.py --model DiT-XL/2 --batch 64 --sample
    python benchmarks/train_throughput.py --model DiT-T/8 --batch 4 --steps 2 --device cpu   # a smoke run

Training rows (``--rows``; all by default): ``official-tf32`` and ``official-bf16``, the
official train.py step (``benchmarks/official.py``: TF32, "+bf16" autocast around the
loss); ``plain``, ablate's step with compile off at ``precision: auto``; ``default``,
ablate's default step (``compile: auto``: compiled on CUDA); ``blocks``, the default with
regional compilation (``compile_scope: blocks``); ``reduce-overhead``, compiled with CUDA
graphs; ``max-autotune`` and ``coordinate-descent``, compiled with those ``compile_mode``s
(``ablate.step``: tuned matmuls; tuned fused elementwise kernels); ``bf16-residual``, the
default with the residual stream in bf16 under autocast (``DiT.low_precision_residual``);
``checkpointing``, the plain step with activation checkpointing (its peak memory
beside ``plain``'s; eager, so that it costs no compile); ``plain-flash``, ``plain-cudnn``,
``plain-efficient``: the plain step with PyTorch's attention kernel forced to FlashAttention,
cuDNN's or the memory-efficient one (``plain`` lets PyTorch choose; DiT-XL/2's head size
72 is not one FlashAttention is built for, so it pads it to 96: which is fastest is
measured, eager, so that the rows cost no compile).
Inputs are synthetic 32x32x4 latents and 1000 classes (the paper's ImageNet-256 setting).

The recipe is nanoGPT's bench: per row, a model, warm-up steps (the first one compiles;
its seconds are ``first_step_s``, its loss ``loss_1``: every row starts from the same
weights and draws the same t, noise and dropped labels, so these agree to the precision), then ``--steps`` timed steps between two device syncs;
img/s = steps x batch / seconds. MFU: 3 x 2 x the paper's multiply-adds per image (fvcore;
PyTorch's flop counter where fvcore is missing) over
the device's measured dense matmul peak at the row's precision. Peak memory: CUDA
``max_memory_allocated`` from the row's model on (the process's peak RSS on a CPU).
A row that fails (out of memory) is a row with its error.

Sampling rows (--sample): ``--images`` latents with guidance ``--cfg`` (a batch of twice
that through ``forward_with_cfg``) and ``--sample-steps`` respaced DDPM steps: the
official sample.py loop (TF32, and under bf16 autocast) against ablate's
``sample_images`` (``precision: auto``, eager and compiled at its fixed batch shape;
``reduce-overhead``: compiled with CUDA graphs; ``max-autotune``, ``coordinate-descent``:
compiled in those modes; ``bf16-true``: compiled where ``default`` is, the network cast to bf16 instead of
autocast, ``ablate.precision.TRUE_BF16``). ``step_ms`` is one denoising step of the batch.

``--profile N`` adds where the time goes (torch.profiler: the device time of the kernels
by kind of work, and the top kernels) over N more training steps of each row, or over a
sample of N denoising steps of each sampling row.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from tabulate import tabulate

# This checkout's ablate, not whichever one is installed: a benchmark measures the code beside it.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from official import OfficialStep, official_sample  # noqa: E402

from ablate.diffusion import MIN_SAMPLE_STEPS, create_diffusion  # noqa: E402
from ablate.measure.matmul_peak import matmul_peak_tflops  # noqa: E402
from ablate.models import SIZES, create_model, dit_kwargs  # noqa: E402
from ablate.precision import TRUE_BF16, resolve_precision, synchronize  # noqa: E402
from ablate.settings import one_line  # noqa: E402
from ablate.sampling import SamplingOptions, sample_images  # noqa: E402
from ablate.step import StepOptions, TrainStep, peak_memory_mb, reset_peak_memory, resolve_compile  # noqa: E402

# A plain step with one attention kernel forced (torch.nn.attention.SDPBackend's names).
ATTENTION_ROWS = {"plain-flash": "FLASH_ATTENTION", "plain-cudnn": "CUDNN_ATTENTION",
                  "plain-efficient": "EFFICIENT_ATTENTION"}
# Compiled rows and their compile_mode (``ablate.step.COMPILE_MODES``).
COMPILE_ROWS = {"default": "default", "blocks": "default", "reduce-overhead": "reduce-overhead",
                "max-autotune": "max-autotune-no-cudagraphs", "coordinate-descent": "coordinate-descent",
                "bf16-residual": "default"}
TRAIN_ROWS = ("official-tf32", "official-bf16", "plain", "default", "blocks", "reduce-overhead", "max-autotune",
              "coordinate-descent", "bf16-residual", "checkpointing", *ATTENTION_ROWS)
DEFAULT_TRAIN_ROWS = ("official-tf32", "official-bf16", "plain", "default")
SAMPLE_ROWS = ("official-tf32", "official-bf16", "plain", "default", "reduce-overhead", "max-autotune",
               "coordinate-descent", "bf16-true")
DEFAULT_SAMPLE_ROWS = ("official-tf32", "official-bf16", "plain", "default")


def gflops_per_image(kwargs: dict, device: torch.device) -> tuple[float, str]:
    """Forward multiply-adds per image, in G, and who counted them: ablate's fvcore count
    (the paper's Gflops, what ``timing``'s MFU uses) where fvcore is installed, else
    PyTorch's flop counter (2 flops per multiply-add) halved, which omits some of what
    fvcore counts (DiT-S/2: 5.45 against 6.06; DiT-XL/2: 114.4 against 118.7). The paper's
    own Table 4 number where the setting is the paper's (ablate's count is within 0.4%)."""
    import csv

    from ablate.models import model_name

    if (kwargs["input_size"], kwargs["in_channels"], kwargs["num_classes"]) == (32, 4, 1000):
        name = model_name(next(k for k, v in SIZES.items() if v.hidden_size == kwargs["hidden_size"]
                               and v.depth == kwargs["depth"]), kwargs["patch_size"])
        table4 = Path(__file__).resolve().parent.parent / "ablate" / "reference" / "dit_table4_256.csv"
        with open(table4) as f:
            for row in csv.DictReader(f):
                if row["model"] == name:
                    return float(row["gflops"]), "the paper's Table 4"
    try:
        from ablate.measure.flops import count_flops

        return count_flops(kwargs)["gflops"], "fvcore"
    except ImportError:
        pass
    from torch.utils.flop_counter import FlopCounterMode

    from ablate.models import DiT

    with torch.device(device):
        model = DiT(**kwargs).eval()
    s = kwargs["input_size"]
    one = torch.zeros(1, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, kwargs["in_channels"], s, s, device=device), one, one)
    return counter.get_total_flops() / 2 / 1e9, "torch FlopCounterMode"


def peak_precision(precision: str) -> str:
    """The matmul peak a row's MFU is read against: a bf16 network multiplies in bf16."""
    return "bf16" if precision == TRUE_BF16 else precision


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build(args, device: torch.device):
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds for DiT-XL/2 rather than tens
        model = create_model(args.model, input_size=args.input_size, num_classes=args.num_classes).train()
    return model, copy.deepcopy(model).requires_grad_(False)


def train_row(name: str, args, device: torch.device, auto_precision: str) -> dict:
    """One row: build, warm up (compile), time ``args.steps`` steps."""
    free(device)
    reset_peak_memory(device)
    model, ema = build(args, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.input_size, args.input_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device)
    if name.startswith("official"):
        bf16 = name == "official-bf16"
        precision = "bf16" if bf16 else ("tf32" if device.type == "cuda" else "fp32")
        runner = OfficialStep(model, ema, bf16)
        compile_on = False
    else:
        precision = auto_precision
        compile_on = name in COMPILE_ROWS and resolve_compile(device, args.compile)
        options = StepOptions(precision=precision, compile=compile_on, compile_mode=COMPILE_ROWS.get(name, "default"),
                              compile_scope="blocks" if name == "blocks" else "step",
                              activation_checkpointing=name == "checkpointing",
                              low_precision_residual=name == "bf16-residual")
        runner = TrainStep(model, create_diffusion(None, learn_sigma=True), options, ema=ema)
    with attention(name):
        row = timed_row(name, runner, args, x, y, device, precision, compile_on)
        row["note"] = inert(name, precision, compile_on)
        profiled(row, lambda: [runner.step(x, y) for _ in range(args.profile)], args, device)
    return row


def profiled(row: dict, work, args, device: torch.device) -> None:
    """Add ``row["profile"]``: ``work()`` (``args.profile`` steps) under the profiler. A failed
    profile leaves the row's timing standing and says why it is missing."""
    if not args.profile:
        return
    try:
        row["profile"] = profile_steps(work, args.profile, args.profile_top, device)
    except Exception as e:
        traceback.print_exc()
        row["profile"] = {"error": one_line(e, with_type=True)[:200]}


# Kernel and op names -> what they do. Inductor names its kernels after the aten ops it fused
# (triton_poi_fused_addmm_gelu_3 is elementwise work beside a matmul), so its prefixes decide
# first: triton_tem* are its matmul templates, other triton_* fused elementwise (or the optimizer's).
# Then cuBLAS/CUTLASS GEMMs (sm90_xmma, nvjet, cutlass), SDPA's kernels, the fused AdamW and
# foreach lerp; on a CPU, aten ops by name.
MATMUL = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::_addmm", "aten::bmm",
          "aten::matmul", "aten::linear")
ATTENTION = ("flash", "fmha", "attention", "sdpa", "softmax")  # softmax: the explicit (non-SDPA) attention
OPTIMIZER = ("adam", "multi_tensor", "foreach", "lerp", "addcdiv")


def kernel_kind(name: str) -> str:
    low = name.lower()
    if low.startswith("autograd::"):
        return "other"  # the autograd engine's bookkeeping around a backward op, not the op's work
    if low.startswith("triton_tem"):
        return "matmul"
    if low.startswith("triton"):
        return "optimizer + EMA" if any(k in low for k in OPTIMIZER) else "fused elementwise (Inductor)"
    for kind, keys in (("attention", ATTENTION), ("matmul", MATMUL), ("optimizer + EMA", OPTIMIZER)):
        if any(k in low for k in keys):
            return kind
    return "other"


def annotation(name: str) -> bool:
    """A user annotation's span on the device timeline (``Optimizer.step#AdamW.step``,
    ``ProfilerStep#3``): it covers kernels that are counted themselves, so it is left out
    (on an H100 it counted the AdamW kernels twice: 7.3 ms of a 128 ms step)."""
    return "#" in name or name.startswith("ProfilerStep")


def profile_steps(work, steps: int, top_n: int, device: torch.device) -> dict:
    """Where a step's time goes: ``work()``, which makes ``steps`` steps, under torch.profiler;
    each kernel's self time on the device (the CPU's ops on a CPU) per step, the top
    ``top_n`` and the sums by kind."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=acts) as prof:
        work()
        synchronize(device)
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    if cuda:  # the kernels themselves, not the CPU-side ops that launched them
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                  and not annotation(e.key)] or events
    ms = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps for e in events}
    calls = {e.key: e.count / steps for e in events}
    total = sum(ms.values())
    kinds: dict[str, float] = {}
    for k, v in ms.items():
        kind = kernel_kind(k)
        kinds[kind] = kinds.get(kind, 0.0) + v
    top = sorted(ms, key=ms.get, reverse=True)[:top_n]
    return {"total_ms": total, "kinds": kinds,
            "top": [{"kernel" if cuda else "op": k[:90], "kind": kernel_kind(k), "calls_per_step": calls[k],
                     "ms_per_step": ms[k], "share": ms[k] / total} for k in top]}


def profile_text(rows: list[dict], device: torch.device) -> str:
    out = []
    for r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        if "error" in prof:
            out.append(f"\nThe `{r['row']}` step was not profiled: {prof['error']}\n")
            continue
        what = "device time of its kernels" if device.type == "cuda" else "self CPU time of its ops"
        kinds = [{"kind": k, "ms_per_step": v, "share": v / prof["total_ms"]}
                 for k, v in sorted(prof["kinds"].items(), key=lambda kv: -kv[1])]
        out.append(f"\nWhere the `{r['row']}` step's time goes ({what}, {prof['total_ms']:.1f} ms per step; "
                   f"the wall step is {r['step_ms']:.1f} ms):\n\n"
                   + tabulate(kinds, headers="keys", floatfmt=".3g", tablefmt="github") + "\n\n"
                   + tabulate(prof["top"], headers="keys", floatfmt=".3g", tablefmt="github") + "\n")
    return "".join(out)


def attention(row: str):
    """The attention kernel a row forces (``ATTENTION_ROWS``), else PyTorch's own choice."""
    import contextlib

    if row not in ATTENTION_ROWS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, ATTENTION_ROWS[row]))


def inert(name: str, precision: str, compile_on: bool) -> str:
    """Why a lever's row measures the ``default`` step here, if it does: its lever needs
    autocast (``bf16-residual``), the compile (a compile mode or scope), or CUDA (CUDA graphs)."""
    if name == "bf16-residual" and precision != "bf16":
        return f"= default here: {precision} has no autocast, the residual stream is fp32 anyway"
    if name in COMPILE_ROWS and name not in ("default", "bf16-residual") and not compile_on:
        return "= default here: not compiled (--compile true compiles it)"
    if name == "reduce-overhead" and not torch.cuda.is_available():
        return "= default here: CUDA graphs need CUDA"
    return ""


def timed_row(name, runner, args, x, y, device, precision, compile_on) -> dict:
    t0 = time.perf_counter()
    loss_1 = float(runner.step(x, y))  # same seed, same draws in every row: agree to the precision
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        runner.step(x, y)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        runner.step(x, y)
    synchronize(device)  # a CPU-GPU sync point: the steps' work is done when this returns
    seconds = time.perf_counter() - t0
    row = {"row": name, "precision": precision, "compiled": compile_on, "img_per_s": args.steps * args.batch / seconds,
           "step_ms": 1e3 * seconds / args.steps, "peak_mem_gib": peak_memory_mb(device) / 1024,
           "first_step_s": first, "loss_1": loss_1}
    return row


def sample_row(name: str, args, device: torch.device, auto_precision: str) -> dict:
    free(device)
    reset_peak_memory(device)
    model, _ = build(args, device)
    model.eval()
    if name.startswith("official"):
        bf16 = name == "official-bf16"
        precision = "bf16" if bf16 else ("tf32" if device.type == "cuda" else "fp32")
        compile_on = False

        def run(steps):
            official_sample(model, args.images, steps, args.cfg, bf16, device)
    else:
        precision = TRUE_BF16 if name == "bf16-true" else auto_precision
        compile_on = name != "plain" and resolve_compile(device, args.compile)

        mode = COMPILE_ROWS.get(name, "default")

        def run(steps):
            sample_images(model, args.images, SamplingOptions(sample_steps=steps, cfg_scale=args.cfg),
                          image_size=args.input_size,
                          precision=precision, batch_size=args.images, device=device, compile=compile_on,
                          compile_mode=mode)
    t0 = time.perf_counter()
    run(2)  # warm-up: kernels, the compile when compiled
    synchronize(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(args.sample_steps)
    synchronize(device)
    seconds = time.perf_counter() - t0
    row = {"row": name, "precision": precision, "compiled": compile_on, "img_per_s": args.images / seconds,
           "seconds": seconds, "step_ms": 1e3 * seconds / args.sample_steps,
           "peak_mem_gib": peak_memory_mb(device) / 1024, "warmup_s": first,
           "note": inert(name, precision, compile_on)}
    profiled(row, lambda: run(args.profile), args, device)  # one sample of --profile denoising steps
    return row


def table(rows: list[dict], flop_per_img: float, peaks: dict, base: str, train: bool) -> str:
    ref = next((r["img_per_s"] for r in rows if r["row"] == base and "img_per_s" in r), None)
    for r in rows:
        if "img_per_s" not in r:
            continue
        r["vs_official_bf16"] = r["img_per_s"] / ref if ref else float("nan")
        r["mfu"] = flop_per_img * r["img_per_s"] / (peaks[peak_precision(r["precision"])] * 1e12)
    cols = ["row", "precision", "compiled", "img_per_s", "vs_official_bf16", "mfu", "peak_mem_gib", "step_ms",
            "first_step_s" if train else "warmup_s"] + (["loss_1"] if train else ["seconds"]) + ["note", "error"]
    out = [{c: r.get(c, "") for c in cols} for r in rows]
    return tabulate(out, headers="keys", floatfmt=".3g", tablefmt="github")


class _OneLineParser(argparse.ArgumentParser):
    """Every mistake in the arguments as one ``error:`` line and exit code 2, as the ``ablate`` command does."""

    def error(self, message: str):
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


def _parser() -> _OneLineParser:
    ap = _OneLineParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="DiT-S/2", help="the model, DiT-<size>/<patch size> (`ablate ls models`)")
    ap.add_argument("--batch", type=int, default=256, help="images per training step")
    ap.add_argument("--input-size", type=int, default=32, help="latent side in pixels; a multiple of the patch size")
    ap.add_argument("--num-classes", type=int, default=1000, help="class labels of the model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per row (the first compiles)")
    ap.add_argument("--rows", default=None, help=f"training rows, comma-separated (default "
                                                f"{','.join(DEFAULT_TRAIN_ROWS)}): {', '.join(TRAIN_ROWS)}")
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                    help="torch.compile the model: true, false, or auto (as each row's default)")
    ap.add_argument("--sample", action="store_true", help="the sampling table instead of the training table")
    ap.add_argument("--sample-rows", default=None, help=f"with --sample, sampling rows, comma-separated (default "
                                                       f"{','.join(DEFAULT_SAMPLE_ROWS)}): {', '.join(SAMPLE_ROWS)}")
    ap.add_argument("--images", type=int, default=64, help="with --sample, images sampled per row")
    ap.add_argument("--sample-steps", type=int, default=50, help="with --sample, denoising steps per image")
    ap.add_argument("--cfg", type=float, default=1.5, help="with --sample, classifier-free guidance scale")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="profile this many more steps of each row (torch.profiler; with --sample: a sample of "
                         "this many denoising steps) and add where the time goes")
    ap.add_argument("--profile-top", type=int, default=15, help="kernels listed per profiled row")
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    return ap


def _check_target(ap, args) -> torch.device:
    """The model, input size, device and --out, checked before anything is built or measured."""
    from ablate.models import parse_model_name
    from ablate.registry import UnknownName

    try:
        _, patch = parse_model_name(args.model)
    except UnknownName as e:
        ap.error(f"--model: {e}")
    if args.input_size < patch or args.input_size % patch:
        ap.error(f"--input-size {args.input_size}: must be a multiple of {args.model}'s patch size {patch}")
    if args.num_classes < 1:
        ap.error(f"--num-classes {args.num_classes}: must be >= 1")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        ap.error(f"--device {args.device!r}: not cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            ap.error(f"--device {args.device!r}: this machine has {count} CUDA device{'s' * (count != 1)}")
    if args.out is not None:
        parent = Path(args.out).parent
        if not parent.is_dir() or Path(args.out).is_dir():
            ap.error(f"--out {args.out}: {'is a folder' if Path(args.out).is_dir() else f'{parent} is not a folder'}")
    return device


def main(argv=None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    args.compile = {"auto": "auto", "true": True, "false": False}[args.compile]
    device = _check_target(ap, args)
    auto_precision = resolve_precision(device, "auto")
    if args.sample and args.rows is not None:
        ap.error("--rows names training rows; with --sample use --sample-rows")
    if not args.sample and args.sample_rows is not None:
        ap.error("--sample-rows applies with --sample (the sampling table)")
    for name, least in (("batch", 1), ("steps", 1), ("warmup", 1), ("images", 1), ("sample_steps", MIN_SAMPLE_STEPS)):
        if getattr(args, name) < least:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {least}")
    if args.sample and args.profile == 1:
        ap.error(f"--profile 1 with --sample: a sample has at least {MIN_SAMPLE_STEPS} denoising steps; profile 2 or more")
    given = args.sample_rows if args.sample else args.rows
    rows_wanted = (given if given is not None else ",".join(DEFAULT_SAMPLE_ROWS if args.sample
                                                            else DEFAULT_TRAIN_ROWS)).split(",")
    known = SAMPLE_ROWS if args.sample else TRAIN_ROWS
    for r in rows_wanted:
        if r not in known:
            ap.error(f"unknown row {r!r}; choose from {', '.join(known)}")
    if args.profile < 0 or args.profile_top < 1:
        ap.error(f"--profile {args.profile} / --profile-top {args.profile_top}: steps >= 0, kernels >= 1")

    kwargs = dit_kwargs(args.model, input_size=args.input_size, num_classes=args.num_classes)
    gflop, counted_by = gflops_per_image(kwargs, device)
    rows = []
    for name in rows_wanted:
        t0 = time.perf_counter()
        try:
            row = (sample_row if args.sample else train_row)(name, args, device, auto_precision)
        except Exception as e:  # out of memory, a compile error: a row, not a crash
            traceback.print_exc()
            row = {"row": name, "error": one_line(e, with_type=True)[:200]}
        rows.append(row)
        if args.out:  # the rows so far: a run stopped at its time limit keeps what it measured
            Path(args.out).write_text(report(rows, args, device, kwargs, gflop, counted_by))
        print(f"{name}: {row.get('img_per_s', float('nan')):.1f} img/s ({time.perf_counter() - t0:.0f} s)", flush=True)
    text = report(rows, args, device, kwargs, gflop, counted_by)
    print("\n" + text, flush=True)
    if args.out:
        Path(args.out).write_text(text)


def report(rows: list[dict], args, device: torch.device, kwargs: dict, gflop: float, counted_by: str) -> str:
    """The markdown of the rows so far: a line saying what was measured, the table, the profiles."""
    rows = [dict(r) for r in rows]  # table() adds columns
    precisions = {peak_precision(r["precision"]) for r in rows if "precision" in r}
    peaks = {p: matmul_peak_tflops(str(device), p) for p in precisions}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    what = (f"sampling {args.images} images, cfg {args.cfg}, {args.sample_steps} steps" if args.sample
            else f"training step, batch {args.batch}")
    head = (f"{args.model}, {what}, {args.input_size}x{args.input_size}x4 latents, {args.num_classes} classes; "
            f"{name}, torch {torch.__version__}; {gflop:.2f} Gflops/image ({counted_by}); matmul peak TFLOP/s "
            + ", ".join(f"{p} {v:.0f}" if v >= 1 else f"{p} {v:.3f}" for p, v in sorted(peaks.items())))
    # 2 flops per multiply-add; a training step is forward + backward = 3 forwards; a sampled
    # image is one forward per step, two with guidance (the conditional and the null class).
    flop_per_img = 1e9 * gflop * (6 if not args.sample else 2 * (2 if args.cfg != 1 else 1) * args.sample_steps)
    text = head + "\n\n" + table(rows, flop_per_img, peaks, "official-bf16", not args.sample) + "\n"
    return text + profile_text(rows, device)


if __name__ == "__main__":
    main()
