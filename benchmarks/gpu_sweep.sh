#!/usr/bin/env bash
# The GPU rows of issue 12 in one go: DiT-S/2 (W1) and DiT-XL/2 bf16 train steps over batch
# sizes, attention implementations, remat policies and block layouts, then 50-step CFG sampling,
# with `step_throughput.py` (MFU = train GFLOP/s over the measured bf16 8192² matmul peak).
#
#   benchmarks/gpu_sweep.sh [RESULTS_DIR]      # default gpu_results/; PYTHON=python3
#
# Each part runs in its own process (a part that fails or runs out of memory leaves the others),
# writes RESULTS_DIR/PART.json after every row (stderr to RESULTS_DIR/stderr.log); the merged
# table is printed last.
# Parts stop being started after BUDGET_S seconds (default 420).
set -u
cd "$(dirname "$0")/.."
dir=${1:-gpu_results}
mkdir -p "$dir"
python=${PYTHON:-python3}
budget=${BUDGET_S:-420}
# Most of the card for the largest batches (JAX takes 75 % by default).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
start=$SECONDS

part() {  # part NAME TIMEOUT_S ARGS...
  local name=$1 limit=$2
  shift 2
  if (( SECONDS - start > budget )); then
    echo "skipped $name (budget ${budget}s spent)"
    return
  fi
  local t0=$SECONDS
  timeout "$limit" "$python" benchmarks/step_throughput.py --dtypes bf16 --matmul_size 8192 \
    --steps 10 --rounds 3 --json --out "$dir/$name.json" "$@" >/dev/null 2>>"$dir/stderr.log"
  echo "$name: rc $? in $((SECONDS - t0)) s"
}

part s2_batch 150 --cases W1 --train_only --attention_impl cudnn --train_batch 32,128,256,512,1024
part xl_batch 200 --cases XL --train_only --attention_impl cudnn --steps 5 --rounds 2 \
  --train_batch 128,256 --remat none,dots_with_no_batch_dims_saveable
part attention 150 --cases W1,XL --train_only --attention_impl einsum,xla --train_batch 256 \
  --steps 5 --rounds 2
part sampling 150 --cases W1,XL --attention_impl cudnn --sample_steps 50 --steps 5 --rounds 2
part xl_layout 150 --cases XL --train_only --attention_impl cudnn --remat full \
  --scan_blocks true,false --train_batch 512 --steps 5 --rounds 2

"$python" benchmarks/step_throughput.py --print "$dir"/*.json
