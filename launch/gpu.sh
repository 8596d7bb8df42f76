#!/usr/bin/env bash
# Single-host GPU launcher: one process drives all local GPUs (JAX SPMD over the local device
# mesh), with XLA GPU settings added to, not replacing, the user's. Run with --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: CONFIG=... WORKDIR=... launch/gpu.sh [--dry-run] [-- MAIN_FLAGS...]

Trains (or samples/evaluates) with guidedflow on all GPUs of this machine in one process:
  PYTHON -m guidedflow.main --config CONFIG --workdir WORKDIR --config.mesh.distributed=off MAIN_FLAGS
The mesh (config.mesh.shape, default (-1, 1, 1): data parallel) spans every visible GPU;
CUDA_VISIBLE_DEVICES=0,1 restricts it. For several machines use launch/slurm.sbatch.

Options:
  --dry-run   print the GPU check and the command instead of running them (also without GPUs);
              DRY_RUN=1 does the same
  -h, --help  print this help and exit
  -- FLAGS    everything after -- goes to guidedflow.main, e.g. --mode=sample or
              --config.train.num_steps=1000 (later flags override earlier ones)

Variables:
  CONFIG     (required) config file, e.g. configs/fashion_mnist.py or configs/fashion_mnist.py:B/4
  WORKDIR    (required) checkpoints, samples/*.png, tensorboard/; rerunning resumes from it
  PYTHON     Python with guidedflow and jax[cuda12] installed (default: the repo's .venv/bin/python
             if it exists, else python3)
  XLA_PYTHON_CLIENT_MEM_FRACTION
             share of each GPU's memory JAX preallocates (default here 0.90; JAX's own is 0.75)
  GPU_XLA_FLAGS
             XLA flags added to XLA_FLAGS (default: --xla_gpu_enable_latency_hiding_scheduler=true,
             which overlaps the gradient all-reduce with compute); a flag already named in your
             XLA_FLAGS is left as you set it; GPU_XLA_FLAGS= adds none
  XLA_FLAGS  your own XLA flags, kept
  DRY_RUN    1: as --dry-run

Example:
  CONFIG=configs/fashion_mnist.py WORKDIR=runs/fmnist_gpu launch/gpu.sh -- --config.train.num_steps=5000
EOF
}

die() {
  echo "gpu.sh: error: $*" >&2
  exit 2
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
main_flags=()
while (( $# )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; main_flags=("$@"); break ;;
    *) die "unknown argument '$1'; flags for guidedflow.main go after --, e.g. launch/gpu.sh -- $1" ;;
  esac
  shift
done

missing=0
for name in CONFIG WORKDIR; do
  if [[ -z "${!name:-}" ]]; then
    echo "gpu.sh: error: $name is not set. Set it in the environment, e.g." \
         "CONFIG=configs/fashion_mnist.py WORKDIR=runs/fmnist launch/gpu.sh  (see --help)" >&2
    missing=1
  fi
done
(( missing == 0 )) || exit 2
[[ -f "${CONFIG%%:*}" ]] || die "CONFIG=$CONFIG: no file ${CONFIG%%:*} (relative to $PWD)"

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ ! -x "$REPO/.venv/bin/python" ]] || PYTHON="$REPO/.venv/bin/python"
fi
if [[ "$DRY_RUN" != 1 ]] && ! command -v "$PYTHON" >/dev/null; then
  die "PYTHON=$PYTHON not found; set PYTHON to a Python with guidedflow installed"
fi

if [[ "$DRY_RUN" == 1 ]]; then
  echo "(dry run: GPUs not checked)"
else
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this launcher is for NVIDIA GPU machines (install the driver), or use --dry-run"
  gpus="$(nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader)" \
    || die "nvidia-smi failed: is the NVIDIA driver loaded?"
  num_gpus="$(grep -c . <<<"$gpus" || true)"
  (( num_gpus > 0 )) || die "nvidia-smi lists no GPU"
  echo "$num_gpus GPU(s) on $(hostname)${CUDA_VISIBLE_DEVICES+ (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES restricts JAX to those)}:"
  printf '  %s\n' "${gpus//$'\n'/$'\n'  }"
fi

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
xla_flags="${XLA_FLAGS:-}"
for flag in ${GPU_XLA_FLAGS---xla_gpu_enable_latency_hiding_scheduler=true}; do
  [[ " $xla_flags " == *" ${flag%%=*}"[=\ ]* ]] || xla_flags="${xla_flags:+$xla_flags }$flag"
done
export XLA_FLAGS="$xla_flags"

cmd=("$PYTHON" -m guidedflow.main --config "$CONFIG" --workdir "$WORKDIR"
     --config.mesh.distributed=off "${main_flags[@]}")
line="$(printf ' %q' "${cmd[@]}")"
echo "+ XLA_FLAGS=$(printf '%q' "$XLA_FLAGS") XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION$line"
[[ "$DRY_RUN" == 1 ]] || exec "${cmd[@]}"
