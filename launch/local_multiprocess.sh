#!/usr/bin/env bash
# Runs N copies of a command on this machine as one multi-process JAX job on simulated CPU devices:
# the multi-host code path (jax.distributed, per-process data, checkpoint agreement) without a
# cluster. Run with --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh [-n N] [-d D] [--port P] [--log-dir DIR] [--grace S] -- CMD [ARGS...]

Starts N processes of CMD ARGS on localhost that form one JAX job through jax.distributed
(e.g. CMD = python -m guidedflow.main ... --config.mesh.distributed=auto). Process i gets
  JAX_PLATFORMS=cpu
  XLA_FLAGS="$XLA_FLAGS --xla_force_host_platform_device_count=D"   (D CPU devices per process)
  JAX_COORDINATOR_ADDRESS=127.0.0.1:P  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
runs in the background with stdout and stderr in DIR/process_<i>.log and its pid in
DIR/process_<i>.pid. The script waits for all, prints each exit code and exits with the first
non-zero one (0 if all succeeded). Once a process fails the others get S seconds to finish, then
SIGTERM, then (10 s later) SIGKILL. SIGTERM or Ctrl-C (SIGINT) to this script sends SIGTERM to
every process (guidedflow checkpoints and exits 0); a second one sends SIGKILL.

Options:
  -n, --num-processes N   processes (default 2)
  -d, --devices D         simulated CPU devices per process (default 2)
  --port P                coordinator port on 127.0.0.1 (default: a free port)
  --log-dir DIR           logs and pid files (default: a new temporary directory, printed)
  --grace S               seconds the others may run on after a process fails (default 30)
  -h, --help              print this help and exit
  -- CMD ARGS...          the command every process runs

Environment: XLA_FLAGS (kept, the device-count flag appended); PYTHON (default python3) finds the
free port.

Example (2 processes x 2 CPU devices = a 4-device mesh):
  launch/local_multiprocess.sh -n 2 -d 2 --log-dir /tmp/mp -- \
    .venv/bin/python -m guidedflow.main --config configs/tiny.py --workdir /tmp/mp/workdir
EOF
}

die() {
  echo "local_multiprocess.sh: error: $*" >&2
  exit 2
}

num_processes=2
devices=2
port=""
log_dir=""
grace=30
kill_after=10

while (( $# )); do
  option="$1"
  value=""
  if [[ "$option" == --*=* ]]; then
    value="${option#*=}"
    option="${option%%=*}"
  fi
  case "$option" in
    -h|--help) usage; exit 0 ;;
    -n|--num-processes|-d|--devices|--port|--log-dir|--grace)
      if [[ "$1" != *=* ]]; then
        (( $# >= 2 )) || die "$option needs a value (see --help)"
        value="$2"
        shift
      fi
      case "$option" in
        -n|--num-processes) num_processes="$value" ;;
        -d|--devices) devices="$value" ;;
        --port) port="$value" ;;
        --log-dir) log_dir="$value" ;;
        --grace) grace="$value" ;;
      esac ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) break ;;
  esac
  shift
done

(( $# )) || die "missing command: give it after --, e.g. launch/local_multiprocess.sh -n 2 -- python -m guidedflow.main --config configs/tiny.py --workdir /tmp/w"
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die "-n $num_processes: need a positive number of processes"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "-d $devices: need a positive number of devices per process"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace $grace: need a whole number of seconds"
command -v "$1" >/dev/null || die "command '$1' not found"
if [[ -z "$port" ]]; then
  port="$("${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
    || die "could not find a free port with ${PYTHON:-python3}; give one with --port"
fi
if ! [[ "$port" =~ ^[1-9][0-9]*$ ]] || (( port > 65535 )); then
  die "--port $port: need a port number (1-65535)"
fi
if [[ -z "$log_dir" ]]; then
  log_dir="$(mktemp -d "${TMPDIR:-/tmp}/guidedflow_multiprocess.XXXXXX")"
else
  mkdir -p "$log_dir"
fi

pids=()
codes=()  # exit code of process i once it has exited

# Sends signal $1 to every process that is still running.
signal_running() {
  local i
  for i in "${!pids[@]}"; do  # the processes started so far
    [[ -n "${codes[i]:-}" ]] || kill -"$1" "${pids[i]}" 2>/dev/null || true
  done
}

signals_received=0
starting=1  # a signal while the processes start is acted on once all have started
# shellcheck disable=SC2329  # called by the traps below
on_signal() {
  signals_received=$(( signals_received + 1 ))
  if (( starting )); then
    return
  elif (( signals_received == 1 )); then
    echo "local_multiprocess.sh: SIG$1: sending SIGTERM to all processes (again: SIGKILL)" >&2
    signal_running TERM
  else
    echo "local_multiprocess.sh: SIG$1 again: sending SIGKILL" >&2
    signal_running KILL
  fi
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

for (( i = 0; i < num_processes; i++ )); do
  (
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port"
    export JAX_NUM_PROCESSES="$num_processes"
    export JAX_PROCESS_ID="$i"
    exec "$@"
  ) > "$log_dir/process_$i.log" 2>&1 < /dev/null &
  pids[i]=$!
  echo "${pids[i]}" > "$log_dir/process_$i.pid"
done
echo "Started $num_processes processes x $devices CPU devices (pids ${pids[*]}), coordinator" \
     "127.0.0.1:$port; logs in $log_dir"
starting=0
if (( signals_received == 1 )); then
  echo "local_multiprocess.sh: signal while starting: sending SIGTERM to all processes" >&2
  signal_running TERM
elif (( signals_received > 1 )); then
  echo "local_multiprocess.sh: signals while starting: sending SIGKILL to all processes" >&2
  signal_running KILL
fi

first_failure=0     # exit code of the first process that failed
failed_at=""        # $SECONDS when it failed
terminated_at=""    # $SECONDS when the others were sent SIGTERM after a failure
killed=0
running=$num_processes
while (( running > 0 )); do
  for (( i = 0; i < num_processes; i++ )); do
    [[ -z "${codes[i]:-}" ]] || continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    code=0
    wait "${pids[i]}" || code=$?
    codes[i]=$code
    running=$(( running - 1 ))
    echo "process $i exited with code $code"
    if (( code != 0 && first_failure == 0 )); then
      first_failure=$code
      failed_at=$SECONDS
      echo "--- last lines of $log_dir/process_$i.log:"
      tail -n 20 "$log_dir/process_$i.log" | sed 's/^/    /'
      (( running == 0 )) || echo "Waiting up to $grace s for the other $running process(es)."
    fi
  done
  (( running > 0 )) || break
  if [[ -n "$failed_at" ]]; then
    if [[ -z "$terminated_at" ]] && (( SECONDS - failed_at >= grace )); then
      echo "Grace period over: sending SIGTERM to the $running process(es) still running."
      signal_running TERM
      terminated_at=$SECONDS
    elif [[ -n "$terminated_at" ]] && (( !killed && SECONDS - terminated_at >= kill_after )); then
      echo "Still running $kill_after s after SIGTERM: sending SIGKILL."
      signal_running KILL
      killed=1
    fi
  fi
  sleep 0.2
done

for (( i = 0; i < num_processes; i++ )); do
  echo "process $i: exit code ${codes[i]}  (log $log_dir/process_$i.log)"
done
exit "$first_failure"
