# shellcheck shell=bash
# The imgd services inside the test VM: how each is started, stopped and checked.
# Sourced by test/vm/guest-session.sh and the vm-helper / vm-agent control commands.
# The start lines are the three start_*_process functions below.

VM_SERVICES_LIB=$(readlink -f "${BASH_SOURCE[0]}")
: "${IMGD_VM_REPO:=$(dirname "$(dirname "$(dirname "$(dirname "$VM_SERVICES_LIB")")")")}"
export IMGD_VM_REPO
VM_LOG_DIR=/tmp/imgd-vm-logs
VM_PID_DIR=/run/imgd-vm-pids
VM_READY_TIMEOUT=${IMGD_VM_READY_TIMEOUT:-60}

VM_S3_ADDR=127.0.0.1:9000
VM_S3_REQUEST_LOG=$VM_LOG_DIR/s3-requests.log
# The agent's API: its Unix socket (group imgd in the VM, which has no imgd-clients group).
VM_AGENT_SOCKET=/run/imgd/agent/imgd.sock
VM_AGENT_ADDR=unix:$VM_AGENT_SOCKET
VM_HELPER_SOCKET=/run/imgd/privhelper.sock
VM_STATE_DIR=/var/lib/imgd
VM_HELPER_STATE_DIR=/var/lib/imgd-privhelper

# ---- start lines (change these when the programs' interfaces change) -----------------------
# Each runs in its own process (see vm_service_launch) and must exec the program, so that the
# recorded pid is the program's own pid (kill -9 must hit it, not a wrapper).

start_s3_process() {
  # --openssl-legacy-provider: s3rver's listing continuation tokens use DES.
  exec node --openssl-legacy-provider "$IMGD_VM_REPO/test/fixtures/s3-server.ts" \
    --address "${VM_S3_ADDR%:*}" --port "${VM_S3_ADDR##*:}" \
    --data-dir /tmp/s3rver-data --request-log "$VM_S3_REQUEST_LOG" \
    ${IMGD_VM_BUCKET:+--bucket-dir "$IMGD_VM_BUCKET"}
}

start_helper_process() {
  exec env IMGD_HELPER_SOCKET="$VM_HELPER_SOCKET" IMGD_HELPER_GROUP=imgd \
    IMGD_HELPER_STATE_DIR="$VM_HELPER_STATE_DIR" IMGD_BLOB_DIR="$VM_STATE_DIR/blobs" \
    IMGD_POOL_DATA_SIZE="${IMGD_POOL_DATA_SIZE:-1G}" \
    node "$IMGD_VM_REPO/privhelper/main.ts"
}

start_agent_process() {
  # The socket's directory belongs to the agent (systemd: RuntimeDirectory=imgd/agent);
  # /run/imgd itself stays root's, as it holds the helper's socket.
  install -d -o imgd -g imgd -m 0750 "$(dirname "$VM_AGENT_SOCKET")"
  exec env HOME="$VM_STATE_DIR" IMGD_STATE_DIR="$VM_STATE_DIR" IMGD_LISTEN="$VM_AGENT_ADDR" \
    IMGD_HELPER_SOCKET="$VM_HELPER_SOCKET" IMGD_S3_ENDPOINT="http://$VM_S3_ADDR" \
    setpriv --reuid=imgd --regid=imgd --init-groups -- \
    node "$IMGD_VM_REPO/agent/main.ts"
}

# ---- readiness ------------------------------------------------------------------------------

vm_wait_for() { # SERVICE wait-for.ts-arguments...
  local service=$1; shift
  node "$IMGD_VM_REPO/test/vm/wait-for.ts" --timeout "$VM_READY_TIMEOUT" \
    --pid "$(vm_service_pid "$service")" "$@"
}

ready_s3() {
  local waited=0 pid
  pid=$(vm_service_pid s3)
  until grep -q '^s3-server: ready' "$VM_LOG_DIR/s3.log" 2>/dev/null; do
    vm_pid_alive "$pid" || { echo "s3 server exited before it was ready" >&2; return 1; }
    [ "$waited" -lt $((VM_READY_TIMEOUT * 10)) ] || { echo "s3 server not ready after ${VM_READY_TIMEOUT}s" >&2; return 1; }
    sleep 0.1; waited=$((waited + 1))
  done
}
ready_helper() { vm_wait_for helper --unix "$VM_HELPER_SOCKET"; }
ready_agent() { vm_wait_for agent --unix "$VM_AGENT_SOCKET"; }

# ---- generic process control ----------------------------------------------------------------

vm_pid_alive() { # a zombie counts as dead
  local pid=$1 state
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  state=$(sed 's/^.*) \(.\).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

vm_service_pid() { cat "$VM_PID_DIR/$1.pid" 2>/dev/null || true; }

vm_service_status() {
  local pid
  pid=$(vm_service_pid "$1")
  if vm_pid_alive "$pid"; then echo "$1: running (pid $pid)"; return 0; fi
  echo "$1: stopped"; return 3
}

vm_service_launch() { # start without waiting for readiness
  local service=$1 pid
  mkdir -p "$VM_LOG_DIR" "$VM_PID_DIR"
  pid=$(vm_service_pid "$service")
  if vm_pid_alive "$pid"; then echo "$service: already running (pid $pid)" >&2; return 1; fi
  echo "---- $(date +%T.%3N) starting $service" >>"$VM_LOG_DIR/$service.log"
  # setsid: its own session, so nothing aimed at the caller's process group reaches it. The
  # outer subshell exits at once: the service becomes PID 1's child and no shell reports its
  # death as a job ("Killed").
  (
    setsid bash -c 'source "$1" && "start_$2_process"' vm-service "$VM_SERVICES_LIB" "$service" \
      </dev/null >>"$VM_LOG_DIR/$service.log" 2>&1 &
    echo $! >"$VM_PID_DIR/$service.pid"
  )
}

vm_service_start() {
  local service=$1
  vm_service_launch "$service" || return 1
  vm_service_ready "$service"
}

vm_service_ready() {
  local service=$1
  if ! "ready_$service"; then
    echo "$service: not ready; last lines of $VM_LOG_DIR/$service.log:" >&2
    tail -n 40 "$VM_LOG_DIR/$service.log" >&2
    return 1
  fi
}

vm_service_stop() { # SERVICE [SIGNAL]: after TERM, waits IMGD_VM_STOP_TIMEOUT (30) s, then KILL
  local service=$1 signal=${2:-TERM} pid waited=0 limit=$((${IMGD_VM_STOP_TIMEOUT:-30} * 10))
  pid=$(vm_service_pid "$service")
  if ! vm_pid_alive "$pid"; then echo "$service: not running" >&2; return 0; fi
  kill "-$signal" "$pid"
  while vm_pid_alive "$pid"; do
    if [ "$waited" = "$limit" ]; then
      echo "$service: still running $((limit / 10)) s after SIG$signal, sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
    sleep 0.1; waited=$((waited + 1))
  done
}

vm_service_command() { # SERVICE start|stop|kill|restart|status
  local service=$1 action=${2:-}
  case "$action" in
    start) vm_service_start "$service" ;;
    stop) vm_service_stop "$service" TERM ;;
    kill) vm_service_stop "$service" KILL ;;
    restart) vm_service_stop "$service" TERM && vm_service_start "$service" ;;
    status) vm_service_status "$service" ;;
    *) echo "usage: vm-$service start|stop|kill|restart|status" >&2; return 2 ;;
  esac
}

vm_log_tails() {
  local f
  for f in "$VM_LOG_DIR"/*.log; do
    [ -e "$f" ] || continue
    echo "==== last lines of $f"
    tail -n "${1:-40}" "$f"
  done
}
