#!/usr/bin/env bash
# Cloud TPU VM launcher: create a TPU VM (or queued resource), install guidedflow on every worker,
# start training on all workers, follow logs, fetch sample grids, delete. Run with --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [--dry-run] SUBCOMMAND

Runs guidedflow on a Cloud TPU VM slice (single- or multi-host) with gcloud. Settings are
environment variables; each subcommand checks only the ones it needs, before running anything.

Subcommands:
  compile   here, without a TPU: `python -m guidedflow.main --mode=compile` compiles CONFIG's
            train step and sampler for ACCELERATOR_TYPE with XLA:TPU (libtpu: pip install -e
            '.[aot]') and fails when they do not fit its HBM. `create` and `all` run it first
            (COMPILE=0 skips it)
  create    create the TPU VM (gcloud compute tpus tpu-vm create), or a queued resource
            (gcloud compute tpus queued-resources create) when QUEUED=1
  wait      wait until the TPU is ready (READY; a queued resource ACTIVE)
  setup     on all workers: clone REPO_URL at REPO_REF into REMOTE_DIR, make a venv there and
            pip install guidedflow[gcs] and JAX_PACKAGE (jax[tpu]); also apt-installs APT_PACKAGES
  train     on all workers: start `python -m guidedflow.main --config CONFIG --workdir WORKDIR
            --config.mesh.distributed=on EXTRA_ARGS` in the background (nohup); output is appended
            to LOG_FILE on each worker, the pid written next to it (train.pid)
  stop      on all workers: SIGTERM the training process (all save a checkpoint at the same step
            and exit; `train` again resumes)
  logs      follow LOG_FILE on worker WORKER (tail -f; Ctrl-C to stop)
  samples   copy WORKDIR/samples (sample grids) to LOCAL_DIR/samples: gcloud storage cp -r for a
            gs:// WORKDIR, else gcloud compute tpus tpu-vm scp from worker 0
  status    describe the TPU (or queued resource) and show whether training runs on each worker
  delete    delete the TPU VM (QUEUED=1: the queued resource and its node); gcloud asks to confirm
  all       (compile,) create, (wait,) setup, train

Options:
  --dry-run   print the commands (gcloud ...) instead of running them; DRY_RUN=1 does the same
  -h, --help  print this help and exit

Variables (required by the subcommands in brackets):
  TPU_NAME          TPU VM name                                    [all but samples from gs://]
  ZONE              zone, e.g. us-central2-b (v4), us-east5-a (v5p)  [as TPU_NAME]
  PROJECT           GCP project (default: gcloud's configured project)
  ACCELERATOR_TYPE  e.g. v4-8, v4-32, v5p-64, v5litepod-8, v6e-8   [create, all]
  RUNTIME_VERSION   TPU software version; default by ACCELERATOR_TYPE (Cloud TPU docs, "TPU software
                    versions", for JAX): v6e-* v2-alpha-tpuv6e; v5p-* v2-alpha-tpuv5;
                    v5litepod-*/v5e-* v2-alpha-tpuv5-lite; v2-*/v3-*/v4-* tpu-ubuntu2204-base
  SPOT              1: spot capacity (--spot), preemptible and cheaper        [create] (default 0)
  QUEUED            1: queued resource instead of a plain TPU VM create       [create, wait, status,
                    delete] (default 0)
  QUEUED_RESOURCE   queued resource id (default: TPU_NAME-qr); its node is TPU_NAME
  REPO_URL          git URL of guidedflow that the workers can clone          [setup, all]
  REPO_REF          branch, tag or commit to check out (default: main)
  REMOTE_DIR        checkout on each worker, relative to the home dir (default: guidedflow)
  JAX_PACKAGE       JAX requirement installed with guidedflow (default: jax[tpu])
  APT_PACKAGES      Debian/Ubuntu packages for the data (default: dataset-fashion-mnist, i.e.
                    /usr/share/datasets/fashion-mnist); a failed install only warns
  CONFIG            config file in the repo, e.g. configs/fashion_mnist.py    [compile, train,
                    all; create unless COMPILE=0]
  COMPILE           0: `create` and `all` skip the local compile (default 1)
  LOCAL_PYTHON      Python that runs the local compile (default: this checkout's .venv/bin/python,
                    else python3)
  COMPILE_DIR       workdir of the local compile, gets compile.json (default:
                    ${TMPDIR:-/tmp}/guidedflow-compile-TPU_NAME)
  WORKDIR           checkpoints, samples, TensorBoard; use gs://BUCKET/PATH   [train, all, samples]
                    (multi-host: all workers must share it; a local path works for one host only)
  EXTRA_ARGS        more flags for guidedflow.main, parsed by the workers' shell (quote tuples:
                    EXTRA_ARGS="--config.mesh.shape='(-1,1,1)'"); the local compile gets them too
  REMOTE_ENV        environment for the training process, e.g. "LIBTPU_INIT_ARGS=--xla_foo=true"
  LOG_FILE          training log on each worker, relative to REMOTE_DIR (default: train.log)
  WORKER            worker whose log `logs` follows (default: 0)
  LOCAL_DIR         where `samples` puts the samples/ folder (default: .)
  POLL_SECONDS      how often `wait` polls (default: 60)
  DRY_RUN           1: as --dry-run

Example (a v4-32 slice: 4 hosts, 16 chips):
  export TPU_NAME=gf-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
         REPO_URL=https://github.com/USER/guidedflow.git REPO_REF=main \
         CONFIG=configs/fashion_mnist.py WORKDIR=gs://MY_BUCKET/runs/fmnist
  launch/tpu_vm.sh all        # create, setup, train
  launch/tpu_vm.sh logs       # follow worker 0
  launch/tpu_vm.sh samples    # -> ./samples/*.png
  launch/tpu_vm.sh delete
Spot capacity through the queue: QUEUED=1 SPOT=1 launch/tpu_vm.sh all
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}

# Quotes one word for a POSIX shell: bare when it is safe, else in single quotes.
q() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    local escaped="'\\''"  # ends the quote, an escaped quote, reopens
    printf "'%s'" "${1//\'/$escaped}"
  fi
}

# Prints a command as a shell line: on stdout under --dry-run (the output), else on stderr (a trace).
show() {
  local words=() arg
  for arg in "$@"; do words+=("$(q "$arg")"); done
  if [[ "$DRY_RUN" == 1 ]]; then echo "+ ${words[*]}"; else echo "+ ${words[*]}" >&2; fi
}

# Runs a command, or only prints it under --dry-run.
run() {
  show "$@"
  [[ "$DRY_RUN" == 1 ]] || "$@"
}

# ---------------------------------------------------------------------------------- arguments

DRY_RUN="${DRY_RUN:-0}"
SUBCOMMAND=""
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    -*) die "unknown option '$arg' (see launch/tpu_vm.sh --help)" ;;
    *)
      [[ -z "$SUBCOMMAND" ]] || die "one subcommand at a time, got '$SUBCOMMAND' and '$arg'"
      SUBCOMMAND="$arg" ;;
  esac
done
[[ -n "$SUBCOMMAND" ]] || { usage >&2; die "missing SUBCOMMAND (create, setup, train, ...)"; }

case "$SUBCOMMAND" in
  compile|create|wait|setup|train|stop|logs|samples|status|delete|all) ;;
  *) die "unknown subcommand '$SUBCOMMAND': use one of compile, create, wait, setup, train, stop, logs, samples, status, delete, all" ;;
esac

SPOT="${SPOT:-0}"
QUEUED="${QUEUED:-0}"
COMPILE="${COMPILE:-1}"
[[ "$COMPILE" =~ ^[01]$ ]] || die "COMPILE=$COMPILE: use COMPILE=1 or COMPILE=0"
[[ "$SPOT" =~ ^[01]$ ]] || die "SPOT=$SPOT: use SPOT=1 or SPOT=0"
[[ "$QUEUED" =~ ^[01]$ ]] || die "QUEUED=$QUEUED: use QUEUED=1 or QUEUED=0"
[[ "$DRY_RUN" =~ ^[01]$ ]] || die "DRY_RUN=$DRY_RUN: use DRY_RUN=1 or DRY_RUN=0"
REPO_REF="${REPO_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-guidedflow}"
JAX_PACKAGE="${JAX_PACKAGE:-jax[tpu]}"
APT_PACKAGES="${APT_PACKAGES-dataset-fashion-mnist}"
LOG_FILE="${LOG_FILE:-train.log}"
PID_FILE="${LOG_FILE%.log}.pid"
WORKER="${WORKER:-0}"
LOCAL_DIR="${LOCAL_DIR:-.}"
POLL_SECONDS="${POLL_SECONDS:-60}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
REMOTE_ENV="${REMOTE_ENV:-}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-${TPU_NAME:-}-qr}"

# Variables each subcommand needs; checked all at once, before anything runs.
needed=()
case "$SUBCOMMAND" in
  compile) needed=(ACCELERATOR_TYPE CONFIG) ;;
  create) needed=(TPU_NAME ZONE ACCELERATOR_TYPE); [[ "$COMPILE" == 0 ]] || needed+=(CONFIG) ;;
  setup) needed=(TPU_NAME ZONE REPO_URL) ;;
  train) needed=(TPU_NAME ZONE CONFIG WORKDIR) ;;
  samples) needed=(WORKDIR); [[ "${WORKDIR:-}" == gs://* ]] || needed+=(TPU_NAME ZONE) ;;
  all) needed=(TPU_NAME ZONE ACCELERATOR_TYPE REPO_URL CONFIG WORKDIR) ;;
  *) needed=(TPU_NAME ZONE) ;;
esac
missing=()
for name in "${needed[@]}"; do
  [[ -n "${!name:-}" ]] || missing+=("$name")
done
if (( ${#missing[@]} )); then
  for name in "${missing[@]}"; do
    echo "tpu_vm.sh: error: $name is not set; '$SUBCOMMAND' needs it. Set it in the environment," \
         "e.g. export $name=...  (see launch/tpu_vm.sh --help)" >&2
  done
  exit 2
fi

if [[ "$SUBCOMMAND" == create || "$SUBCOMMAND" == all ]] && [[ -z "${RUNTIME_VERSION:-}" ]]; then
  case "$ACCELERATOR_TYPE" in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v2-*|v3-*|v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION (see 'TPU software versions' in the Cloud TPU docs)" ;;
  esac
fi
[[ "$WORKER" =~ ^[0-9]+$ ]] || die "WORKER=$WORKER: use a worker number (0, 1, ...)"
[[ "$POLL_SECONDS" =~ ^[1-9][0-9]*$ ]] || die "POLL_SECONDS=$POLL_SECONDS: use a positive number of seconds"
if [[ "$DRY_RUN" != 1 && "$SUBCOMMAND" != compile ]] && ! command -v gcloud >/dev/null; then
  die "gcloud not found on PATH: install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install), or use --dry-run to print the commands"
fi

# ---------------------------------------------------------------------------------- gcloud

# Expanded as ${project_flag[@]+"${project_flag[@]}"}: macOS's bash 3.2 calls an empty array unset.
project_flag=()
[[ -z "${PROJECT:-}" ]] || project_flag=("--project=$PROJECT")

# Runs COMMAND (one line of POSIX shell) on WORKER (a number or "all") over ssh.
on_workers() {
  local worker="$1" command="$2"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${project_flag[@]+"${project_flag[@]}"} \
    --worker="$worker" --command="$command"
}

# On a worker: cd into the checkout, or say that `setup` has not run.
cd_checkout="cd $(q "$REMOTE_DIR") 2>/dev/null && [ -x .venv/bin/python ] || { echo \"\$(hostname): no $REMOTE_DIR/.venv; run 'launch/tpu_vm.sh setup' first\" >&2; exit 1; }"
# Shell test: the training process of an earlier `train` still runs on this worker.
is_running="[ -f $(q "$PID_FILE") ] && kill -0 \"\$(cat $(q "$PID_FILE"))\" 2>/dev/null"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Compiles CONFIG for ACCELERATOR_TYPE here with XLA:TPU (nothing runs): fails, with
# guidedflow's one-line reason above, when it does not fit or does not compile.
do_compile() {
  local extra=() python="${LOCAL_PYTHON:-}" dir="${COMPILE_DIR:-${TMPDIR:-/tmp}/guidedflow-compile-${TPU_NAME:-tpu}}"
  [[ -z "$EXTRA_ARGS" ]] || eval "extra=($EXTRA_ARGS)"  # word-split as the workers' shell does
  [[ "$dir" == /* ]] || dir="$PWD/$dir"
  if [[ -z "$python" ]]; then
    python=python3
    [[ ! -x "$REPO_ROOT/.venv/bin/python" ]] || python="$REPO_ROOT/.venv/bin/python"
  fi
  local command=(env JAX_PLATFORMS=cpu "$python" -m guidedflow.main --mode=compile --config "$CONFIG"
                 --workdir "$dir" --config.compile.topology="$ACCELERATOR_TYPE" ${extra[@]+"${extra[@]}"})
  echo "Compiling $CONFIG for $ACCELERATOR_TYPE on this machine (XLA:TPU; COMPILE=0 skips this)." >&2
  show "${command[@]}"
  [[ "$DRY_RUN" == 0 ]] || return 0
  # In the checkout (CONFIG is relative to it, as on the workers); the table goes to stderr.
  if ! (cd "$REPO_ROOT" && "${command[@]}" >/dev/null); then
    die "$CONFIG did not compile for $ACCELERATOR_TYPE (the reason is above); no TPU was created. Fix the config, or set COMPILE=0 to skip this check"
  fi
  echo "$CONFIG fits $ACCELERATOR_TYPE: $dir/compile.json" >&2
}

do_create() {
  [[ "$COMPILE" == 0 ]] || do_compile
  local flags=(--zone="$ZONE" ${project_flag[@]+"${project_flag[@]}"} --accelerator-type="$ACCELERATOR_TYPE")
  [[ "$SPOT" == 0 ]] || flags+=(--spot)
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
      "${flags[@]}" --runtime-version="$RUNTIME_VERSION"
    echo "Queued resource $QUEUED_RESOURCE requested; 'launch/tpu_vm.sh wait' waits until it is ACTIVE." >&2
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" --version="$RUNTIME_VERSION"
  fi
}

do_wait() {
  local command ready state
  if [[ "$QUEUED" == 1 ]]; then
    command=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE"
             ${project_flag[@]+"${project_flag[@]}"} --format='value(state.state)')
    ready=ACTIVE
  else
    command=(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" ${project_flag[@]+"${project_flag[@]}"}
             --format='value(state)')
    ready=READY
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    show "${command[@]}"
    echo "(repeated every $POLL_SECONDS s until the state is $ready)" >&2
    return
  fi
  while true; do
    show "${command[@]}"
    state="$("${command[@]}")"
    case "$state" in
      "$ready") echo "State $state." >&2; return ;;
      FAILED|SUSPENDED|SUSPENDING|DELETING|PREEMPTED|TERMINATED)
        die "state $state: the TPU will not become $ready; 'launch/tpu_vm.sh delete' and create again" ;;
      *) echo "State ${state:-unknown}; checking again in $POLL_SECONDS s." >&2; sleep "$POLL_SECONDS" ;;
    esac
  done
}

do_setup() {
  local dir venv pkgs
  dir="$(q "$REMOTE_DIR")"
  [[ "$REMOTE_DIR" == /* ]] || dir="./$dir"  # pip reads a bare name as a package, not a folder
  venv="$dir/.venv"
  pkgs=""
  [[ -z "$APT_PACKAGES" ]] || pkgs="sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 install -y $APT_PACKAGES || echo \"\$(hostname): warning: apt-get install $APT_PACKAGES failed; point --config.input.data_dir at the data\" >&2; "
  on_workers all "set -e; \
sudo apt-get -qq -o DPkg::Lock::Timeout=600 update; \
python3 -c 'import ensurepip' 2>/dev/null && command -v git >/dev/null || sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 install -y python3-venv git; \
$pkgs\
[ -d $dir/.git ] || git clone -q $(q "$REPO_URL") $dir; \
git -C $dir fetch -q origin $(q "$REPO_REF"); \
git -C $dir checkout -q --detach FETCH_HEAD; \
[ -x $venv/bin/python ] || python3 -m venv $venv; \
$venv/bin/pip install -q --upgrade pip; \
$venv/bin/pip install -q -e $dir'[gcs]' $(q "$JAX_PACKAGE"); \
echo \"\$(hostname): guidedflow \$(git -C $dir rev-parse --short HEAD), jax \$($venv/bin/python -c 'import jax; print(jax.__version__)')\""
}

do_train() {
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "Warning: WORKDIR=$WORKDIR is not gs://; on a multi-host slice every worker needs the same WORKDIR (a GCS bucket)." >&2
  fi
  local main log
  main=".venv/bin/python -m guidedflow.main --config $(q "$CONFIG") --workdir $(q "$WORKDIR") --config.mesh.distributed=on"
  [[ -z "$EXTRA_ARGS" ]] || main+=" $EXTRA_ARGS"
  [[ -z "$REMOTE_ENV" ]] || main="env $REMOTE_ENV $main"
  log="$(q "$LOG_FILE")"
  on_workers all "$cd_checkout; \
if $is_running; then echo \"\$(hostname): already training (pid \$(cat $(q "$PID_FILE"))); run 'launch/tpu_vm.sh stop' first\" >&2; exit 1; fi; \
mkdir -p \"\$(dirname $log)\"; \
echo \"=== \$(date -u +%FT%TZ)\" $(q "$TPU_NAME") $(q "$REPO_REF") >> $log; \
nohup $main >> $log 2>&1 < /dev/null & \
echo \$! > $(q "$PID_FILE"); \
echo \"\$(hostname): training, pid \$!, log in \$(pwd):\" $log"
}

do_stop() {
  on_workers all "$cd_checkout; \
if $is_running; then kill -TERM \"\$(cat $(q "$PID_FILE"))\" && echo \"\$(hostname): sent SIGTERM to pid \$(cat $(q "$PID_FILE"))\"; \
else echo \"\$(hostname): not training\"; fi"
}

do_logs() {
  on_workers "$WORKER" "$cd_checkout; tail -n 100 -f $(q "$LOG_FILE")"
}

do_samples() {
  local remote_path
  if [[ "$DRY_RUN" != 1 ]]; then mkdir -p "$LOCAL_DIR"; fi
  if [[ "$WORKDIR" == gs://* ]]; then
    run gcloud storage cp -r "${WORKDIR%/}/samples" "$LOCAL_DIR/" ${project_flag[@]+"${project_flag[@]}"}
  else
    remote_path="${WORKDIR%/}/samples"
    [[ "$remote_path" == /* ]] || remote_path="$REMOTE_DIR/$remote_path"  # train runs in REMOTE_DIR
    run gcloud compute tpus tpu-vm scp "$TPU_NAME:$remote_path" "$LOCAL_DIR/" --recurse \
      --worker=0 --zone="$ZONE" ${project_flag[@]+"${project_flag[@]}"}
  fi
  echo "Sample grids in $LOCAL_DIR/samples/." >&2
}

do_status() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE" ${project_flag[@]+"${project_flag[@]}"}
  fi
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" ${project_flag[@]+"${project_flag[@]}"}
  on_workers all "$cd_checkout; \
if $is_running; then echo \"\$(hostname): training (pid \$(cat $(q "$PID_FILE")))\"; tail -n 1 $(q "$LOG_FILE"); \
else echo \"\$(hostname): not training\"; fi"
}

do_delete() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" --zone="$ZONE" ${project_flag[@]+"${project_flag[@]}"} --force
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" ${project_flag[@]+"${project_flag[@]}"}
  fi
}

case "$SUBCOMMAND" in
  all)
    do_create
    [[ "$QUEUED" == 0 ]] || do_wait
    do_setup
    do_train ;;
  *) "do_$SUBCOMMAND" ;;
esac
