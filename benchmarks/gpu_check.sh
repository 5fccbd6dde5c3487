#!/usr/bin/env bash
# The GPU checks in one script, most important first, under a hard time budget (default
# 290 s: ABLATE_GPU_CHECK_BUDGET; a section that would start with under 15 s left is
# skipped, and listed so in summary.txt). Each table lands in $OUT/ (default /tmp/ablate-gpu-check)
# as it is made (the benchmark tables row by row); exit 0 when every section that ran exited 0,
# else 1 (summary.txt says which; a section skipped for the budget is not a failure, but no
# section run at all is):
#   a1 train_S2.md       DiT-S/2 batch 256: official TF32, official +bf16, ablate plain, ablate default
#   a2 train_S2_cached.md the default row again in a new process: the compile from the disk cache
#   a3 train_XL2.md      DiT-XL/2 batch 64, the same four rows and regional compilation (blocks)
#   b  sample_XL2.md     DiT-XL/2, 64 images, cfg 1.5, 50 steps: official loop bf16 vs ablate
#   d  train_digits.md   `ablate run`: DiT-S/2 on digits 32x32, 300 steps, batch 256 (+ samples png)
#   e  train_S2_extra.md DiT-S/2 batch 256: official +bf16 and the default beside compiled with
#                        CUDA graphs; eager with activation checkpointing (peak memory) beside plain
#   g  train_XL2_attention.md    DiT-XL/2 batch 64, eager: official +bf16, PyTorch's attention choice,
#                        FlashAttention, cuDNN and memory-efficient attention forced (head size 72)
#   h  sample_XL2_extra.md       b's sampling: official +bf16, compiled, compiled with CUDA graphs
#   c  timing_grid.md    `ablate run`: the four blocks at DiT-S/2 and DiT-XL/2, eager, 5 repeats
#   f  train_digits_torchrun.md  d's grid under torchrun, one rank per GPU (DDP over nccl)
#   i  profile_XL2.md    DiT-XL/2 batch 64, plain and default, and where each step's time goes
#                        (torch.profiler: the device time by kind of kernel, the top kernels)
#   j  train_S2_autotune.md      DiT-S/2 batch 256: official +bf16, default, max-autotune (matmuls
#                        timed at compile: minutes)
#   k  sample_XL2_autotune.md    b's sampling: official +bf16 and the denoiser with max-autotune
#   l  sample_XL2_levers.md      b's sampling: official +bf16, compiled, compiled bf16-true (the
#                        network cast to bf16, no autocast), each profiled over 2 denoising steps
#   m  train_S2_levers.md        DiT-S/2 batch 256: official +bf16, default, bf16-residual (the residual
#                        stream in bf16), coordinate-descent (Inductor tunes its fused kernels'
#                        block sizes), each profiled over 3 steps
#   n  train_XL2_levers.md       DiT-XL/2 batch 64: official +bf16, default, bf16-residual, coordinate-descent
# (e, g, h, j, k, l, m and n each carry the official +bf16 row: a ratio is only read within one process.)
# Compiles (about 40-80 s each cold on an H100): a1 1, a2 0 (cache), a3 1 (+1 of one block), b 1, d 1, e 2, h 2,
# i 1, j 2 (one max-autotune: minutes), k 1 (max-autotune), l 2, m 3 (coordinate descent: longer), n 3.
# Measured on an H100: a1 80 s, a2 27 s, a3 131 s, e 120 s, g 27 s, h 82 s, c 69 s, f 87 s
# (b and d: about 60-90 s, estimates): the default budget ends during b. Not yet timed on a
# GPU: l, m, n (caps 170 + 230 + 290 s). To run only the levers l and m (about 7 minutes
# with the set-up; a section cut short keeps the rows it finished):
#   export ABLATE_GPU_CHECK_SECTIONS=sample_XL2_levers,train_S2_levers
#   ABLATE_GPU_CHECK_BUDGET=420 bash benchmarks/gpu_check.sh
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository's root
#   bash benchmarks/gpu_check.sh --tiny     # tiny models on this machine's device (a CPU: ~3 min)
#   bash benchmarks/gpu_check.sh --help     # this text
#   ABLATE_GPU_CHECK_SECTIONS=train_S2_extra,timing_grid bash benchmarks/gpu_check.sh   # only these (commas or spaces)
# (section names: the table names above without .md, e.g. train_XL2, sample_XL2, train_digits_torchrun)
# On a GPU machine without a network, whose image lacks ablate's pure-Python dependencies:
# run `bash benchmarks/gpu_wheels.sh` first where there is a network, and copy the repository
# with its .whl/ folder; the wheels there are installed into /tmp/site before the sections run.
set -u
# A closed stdout (gpu_check.sh | head) must not end the check at its next echo: the tables
# go to $OUT whatever becomes of the console.
trap '' PIPE
export PYTHONUNBUFFERED=1
START=$(date +%s)
for arg in "$@"; do
  case "$arg" in -h|--help) sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;; esac
done
TINY=${ABLATE_GPU_CHECK_TINY:-0}
if [ "$TINY" != 0 ] && [ "$TINY" != 1 ]; then
  echo "error: ABLATE_GPU_CHECK_TINY: '$TINY' is not 0 or 1 (or use --tiny)" >&2; exit 2
fi
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    *) echo "error: $0: unknown argument '$arg' (the only ones are --tiny and --help)" >&2; exit 2 ;;
  esac
done
# A small shared CPU starts Python and torch in seconds, not the GPU box's one: --tiny
# stretches every cap (SLOW) and the budget.
if [ "$TINY" = 1 ]; then SLOW=3; else SLOW=1; fi
BUDGET=${ABLATE_GPU_CHECK_BUDGET:-$((290 * SLOW))}
SECTIONS=${ABLATE_GPU_CHECK_SECTIONS:-}
ALL_SECTIONS="train_S2 train_S2_cached train_XL2 sample_XL2 train_digits train_S2_extra train_XL2_attention \
sample_XL2_extra timing_grid train_digits_torchrun profile_XL2 train_S2_autotune sample_XL2_autotune \
sample_XL2_levers train_S2_levers train_XL2_levers"
# Bad settings: one line, exit 2, nothing written.
# Under 15 s no section could start: such a budget is refused, not run. (A budget that the
# set-up spends before the first section starts fails at the end: nothing was measured.)
if ! [[ "$BUDGET" =~ ^[1-9][0-9]{0,5}$ ]] || [ "$BUDGET" -lt 15 ]; then
  echo "error: ABLATE_GPU_CHECK_BUDGET: '$BUDGET' must be a whole number of seconds, 15 to 999999, without a leading zero" >&2; exit 2
fi
# Sections: names separated by commas and/or spaces (split without glob expansion).
IFS=', ' read -r -a CHOSEN <<< "$SECTIONS"
for s in "${CHOSEN[@]}"; do
  if [[ " $ALL_SECTIONS " != *" $s "* ]]; then
    echo "error: ABLATE_GPU_CHECK_SECTIONS: no section '$s'; the sections: $ALL_SECTIONS" >&2; exit 2
  fi
done
SECTIONS=" ${CHOSEN[*]} "
OUT=${OUT:-/tmp/ablate-gpu-check}
if [ -e "$OUT" ] && [ ! -d "$OUT" ]; then
  echo "error: OUT: '$OUT' is not a folder" >&2; exit 2
fi
mkdir -p "$OUT" || { echo "error: OUT: cannot create '$OUT'" >&2; exit 2; }
WORK=$(mktemp -d /tmp/ablate-gpu-check.XXXX)  # results folders with checkpoints: not under $OUT
# Ctrl-C or a kill: stop the running section (timeout passes the signal on to its process
# group), remove the work folder, and exit as interrupted.
RUNNING=""
FAILED=0
RAN=0
stop() {
  [ -n "$RUNNING" ] && kill -TERM "$RUNNING" 2>/dev/null && wait "$RUNNING" 2>/dev/null
  rm -rf "$WORK"
  echo "interrupted" >&2
  exit "$1"
}
trap 'stop 130' INT
trap 'stop 143' TERM
trap 'rm -rf "$WORK"' EXIT
export ABLATE_COMPILE_CACHE=${ABLATE_COMPILE_CACHE:-/tmp/ablate-compile-cache}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
PY=python3

{
  date -u
  git rev-parse --short HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  $PY -c "import fvcore" 2>&1 | tail -1 && echo "fvcore importable"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# section NAME CAP_S CMD...: run CMD with at most CAP_S seconds, and never past the budget.
section() {
  local name=$1 cap=$2
  shift 2
  if [ "$SECTIONS" != "  " ] && [[ "$SECTIONS" != *" $name "* ]]; then
    return  # not chosen
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  cap=$((cap * SLOW))
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 15 ]; then
    echo "$name: skipped, budget spent" | tee -a "$OUT/summary.txt"
    return
  fi
  RAN=$((RAN + 1))
  echo "== $name (at most ${t} s)"
  local s=$(date +%s)
  export SECTION_S=$t
  timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1 &
  RUNNING=$!
  wait "$RUNNING"
  local rc=$?
  RUNNING=""
  [ "$rc" = 0 ] || FAILED=1
  echo "$name: exit $rc after $(($(date +%s) - s)) s$([ $rc = 124 ] && echo ', TIMED OUT')" | tee -a "$OUT/summary.txt"
  tail -n 14 "$OUT/$name.log"
}

TT=benchmarks/train_throughput.py
if [ "$TINY" = 1 ]; then
  DEV=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
  S=(--model DiT-T/8 --batch 4 --input-size 16 --num-classes 10 --steps 2 --warmup 1 --device "$DEV")
  XL=(--model DiT-T/4 --batch 2 --input-size 16 --num-classes 10 --steps 2 --warmup 1 --device "$DEV")
  SAMPLE=(--model DiT-T/8 --input-size 16 --num-classes 10 --images 4 --sample-steps 3 --device "$DEV")
  GRID_MODELS="[DiT-T/8]"; GRID_BASE="input_size: 16, num_classes: 10, device: $DEV"; GRID_BATCH=4; GRID_WARMUP=1; GRID_REPEATS=2
  TRAIN="model: DiT-T/8, data: {name: digits, image_size: 16}, device: $DEV"
  TRAIN_S="{steps: 20, batch_size: 32, lr: 1.0e-3, ema_decay: 0.99, log_every: 10, eval_samples: 16, sample_steps: 5}"
  EXTRA_ROWS=official-bf16,default,plain,checkpointing
  ATTENTION_ROWS=official-bf16,plain,plain-flash
  AUTOTUNE=(--compile true)  # compile auto is off on a CPU: make the max-autotune rows compile
else
  S=(--model DiT-S/2 --batch 256 --steps 20 --warmup 3 --device cuda)
  XL=(--model DiT-XL/2 --batch 64 --steps 10 --warmup 3 --device cuda)
  SAMPLE=(--model DiT-XL/2 --images 64 --sample-steps 50 --cfg 1.5 --device cuda)
  GRID_MODELS="[DiT-S/2, DiT-XL/2]"; GRID_BASE="input_size: 32, num_classes: 1000, device: cuda"; GRID_BATCH=64; GRID_WARMUP=2; GRID_REPEATS=5
  TRAIN="model: DiT-S/2, data: {name: digits, image_size: 32}, device: cuda"
  TRAIN_S="{steps: 300, batch_size: 256, lr: 5.0e-4, ema_decay: 0.99, log_every: 50, eval_samples: 64, sample_steps: 50}"
  EXTRA_ROWS=official-bf16,default,reduce-overhead,plain,checkpointing
  ATTENTION_ROWS=official-bf16,plain,plain-flash,plain-cudnn,plain-efficient
  AUTOTUNE=()
fi

# (a) training step tables
section train_S2 120 $PY $TT "${S[@]}" --out "$OUT/train_S2.md"
section train_S2_cached 45 $PY $TT "${S[@]}" --rows default --out "$OUT/train_S2_cached.md"
section train_XL2 150 $PY $TT "${XL[@]}" --rows official-tf32,official-bf16,plain,default,blocks --out "$OUT/train_XL2.md"

# (b) sampling table
section sample_XL2 90 $PY $TT "${SAMPLE[@]}" --sample --sample-rows official-bf16,plain,default --out "$OUT/sample_XL2.md"

# (d) a short training run through `ablate run` (the default path, compiled on CUDA)
cat > "$WORK/train.yaml" <<EOF
name: gpu-check-train
grid: {seed: [0]}
base: {$TRAIN, measure: [train], train: $TRAIN_S}
EOF
# table GRID RESULTS FILE COLUMNS: the chosen columns, or every column if one is missing (a failed cell).
table() {
  $PY -m ablate.cli table "$1" --results "$2" -o "$3" -c "$4" || $PY -m ablate.cli table "$1" --results "$2" -o "$3" -c all
  cat "$3"
}
# The three `ablate run` sections end with the run's status (a failed cell: 1, its timeout: 124),
# not the table's.
run_train() {
  # leave 20 s of the section for the table
  timeout --foreground -k 5 $((SECTION_S > 40 ? SECTION_S - 20 : SECTION_S / 2)) $PY -m ablate.cli run "$WORK/train.yaml" --results "$WORK/train" --no-progress
  local rc=$?
  table "$WORK/train.yaml" "$WORK/train" "$OUT/train_digits.md" \
    model,status,loss_start,final_loss,train_img_per_s,train_compile,train_compile_s,train_peak_mem_mb,train_wall_s,train_precision,device_name,error
  cp "$(find "$WORK/train" -name 'samples_step*.png' | sort | tail -n 1)" "$OUT/train_digits_samples.png"
  return $rc
}
export PY WORK OUT
export -f table run_train
section train_digits 110 bash -c run_train

# (e) the optional levers at DiT-S/2: CUDA graphs, activation checkpointing
section train_S2_extra 150 $PY $TT "${S[@]}" --rows "$EXTRA_ROWS" --out "$OUT/train_S2_extra.md"

# (g) which attention kernel DiT-XL/2 (head size 72) is fastest with, eager
section train_XL2_attention 90 $PY $TT "${XL[@]}" --rows "$ATTENTION_ROWS" --out "$OUT/train_XL2_attention.md"

# (h) the sampler compiled with CUDA graphs beside compiled alone (with b's cache: one new compile)
section sample_XL2_extra 150 $PY $TT "${SAMPLE[@]}" --sample --sample-rows official-bf16,default,reduce-overhead \
  --out "$OUT/sample_XL2_extra.md"

# (c) a timing grid of the four blocks through `ablate run` (eager: 8 compiles would not fit)
cat > "$WORK/timing.yaml" <<EOF
name: gpu-check-timing
grid:
  model: $GRID_MODELS
  block: [adaln-zero, adaln, cross-attn, in-context]
base: {$GRID_BASE, in_channels: 4, measure: [flops, timing],
       timing: {batch_size: $GRID_BATCH, warmup: $GRID_WARMUP, repeats: $GRID_REPEATS, compile: false}}
EOF
run_grid() {
  timeout --foreground -k 5 $((SECTION_S > 40 ? SECTION_S - 20 : SECTION_S / 2)) $PY -m ablate.cli run "$WORK/timing.yaml" --results "$WORK/timing" --no-progress
  local rc=$?
  table "$WORK/timing.yaml" "$WORK/timing" "$OUT/timing_grid.md" \
    model,block,status,gflops,fwd_img_per_s,step_img_per_s,step_mfu,step_peak_mem_mb,timing_precision,error
  return $rc
}
export -f run_grid
section timing_grid 100 bash -c run_grid

# (f) the torchrun path with one rank per GPU: nccl, DDP, rank 0's orders; the
# same training grid as (d) with its own results folder, so its table sits beside d's
run_ddp() {
  n=$($PY -c "import torch; print(max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 2)")
  timeout --foreground -k 5 $((SECTION_S > 40 ? SECTION_S - 20 : SECTION_S / 2)) $PY -m torch.distributed.run --standalone \
    --nproc_per_node "$n" -m ablate run "$WORK/train.yaml" --results "$WORK/ddp" --no-progress
  local rc=$?
  table "$WORK/train.yaml" "$WORK/ddp" "$OUT/train_digits_torchrun.md" \
    model,status,final_loss,train_ranks,train_img_per_s,train_compile_s,train_peak_mem_mb,train_wall_s,error
  return $rc
}
export -f run_ddp
section train_digits_torchrun 110 bash -c run_ddp

# (i) where the XL/2 step's time goes, eager and compiled (one compile)
section profile_XL2 150 $PY $TT "${XL[@]}" --rows plain,default --profile 3 --out "$OUT/profile_XL2.md"

# (j, k) max-autotune: Inductor times matmul choices while compiling (DiT-S/2: over 185 s on an H100)
section train_S2_autotune 240 $PY $TT "${S[@]}" "${AUTOTUNE[@]}" --rows official-bf16,default,max-autotune --out "$OUT/train_S2_autotune.md"
section sample_XL2_autotune 200 $PY $TT "${SAMPLE[@]}" "${AUTOTUNE[@]}" --sample --sample-rows official-bf16,max-autotune \
  --out "$OUT/sample_XL2_autotune.md"

# (l, m, n) levers against the elementwise time of the step (docs/speed.md), each a setting:
# sampling with a bf16 network; a bf16 residual stream; Inductor's tuning of its fused kernels.
section sample_XL2_levers 170 $PY $TT "${SAMPLE[@]}" --sample --sample-rows official-bf16,default,bf16-true \
  --profile 2 --out "$OUT/sample_XL2_levers.md"
section train_S2_levers 230 $PY $TT "${S[@]}" --rows official-bf16,default,bf16-residual,coordinate-descent --profile 3 \
  --out "$OUT/train_S2_levers.md"
section train_XL2_levers 290 $PY $TT "${XL[@]}" --rows official-bf16,default,bf16-residual,coordinate-descent \
  --out "$OUT/train_XL2_levers.md"

echo "total $(($(date +%s) - START)) s" | tee -a "$OUT/summary.txt"
if [ "$RAN" = 0 ]; then
  echo "error: no section ran: the budget (${BUDGET} s) was spent before the first one could start" | tee -a "$OUT/summary.txt" >&2
  FAILED=1
fi
rm -rf "$WORK"
exit "$FAILED"
