# shellcheck shell=bash
# The imgd services inside the test VM: how each is started, stopped and checked.
# Sourced by test/vm/guest-session.sh and the vm-helper / vm-agent control commands.
# The start lines are the three start_*_process functions below.

VM_SERVICES_LIB=$(readlink -f "${BASH_SOURCE[0]}")
: "${IMGD_VM_REPO:=$(dirname "$(dirname "$(dirname "$(dirname "$VM_SERVICES_LIB")")")")}"
export IMGD_VM_REPO
VM_LOG_DIR=/tmp/imgd-vm-logs
VM_PID_DIR=/run/imgd-vm-pids
# Per service. Generous: under TCG emulation on a loaded 2-core machine a node start has taken
# over 60 s; a failure prints the service's exit status and log instead of waiting longer.
VM_READY_TIMEOUT=${IMGD_VM_READY_TIMEOUT:-180}

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
# recorded pid is the program's own pid (kill -9 must hit it, not a wrapper). The helper and the
# agent run from the bundle, as deployed (dist/, `npm run build`; test/vm/run builds it first).

start_s3_process() {
  # --openssl-legacy-provider: s3rver's listing continuation tokens use DES.
  exec node --openssl-legacy-provider "$IMGD_VM_REPO/test/fixtures/s3-server.ts" \
    --address "${VM_S3_ADDR%:*}" --port "${VM_S3_ADDR##*:}" \
    --data-dir /tmp/s3rver-data --request-log "$VM_S3_REQUEST_LOG" \
    ${IMGD_VM_BUCKET:+--bucket-dir "$IMGD_VM_BUCKET"} ${IMGD_VM_BUCKET_MD5:+--md5-cache "$IMGD_VM_BUCKET_MD5"}
}

start_helper_process() {
  exec env IMGD_HELPER_SOCKET="$VM_HELPER_SOCKET" IMGD_HELPER_GROUP=imgd \
    IMGD_HELPER_STATE_DIR="$VM_HELPER_STATE_DIR" IMGD_BLOB_DIR="$VM_STATE_DIR/blobs" \
    IMGD_POOL_DATA_SIZE="${IMGD_POOL_DATA_SIZE:-1G}" \
    node "$IMGD_VM_REPO/dist/imgd-privhelper.mjs"
}

start_agent_process() {
  # The socket's directory belongs to the agent (systemd: RuntimeDirectory=imgd/agent);
  # /run/imgd itself stays root's, as it holds the helper's socket.
  install -d -o imgd -g imgd -m 0750 "$(dirname "$VM_AGENT_SOCKET")"
  exec env HOME="$VM_STATE_DIR" IMGD_STATE_DIR="$VM_STATE_DIR" IMGD_LISTEN="$VM_AGENT_ADDR" \
    IMGD_HELPER_SOCKET="$VM_HELPER_SOCKET" IMGD_S3_ENDPOINT="http://$VM_S3_ADDR" \
    setpriv --reuid=imgd --regid=imgd --init-groups -- \
    node "$IMGD_VM_REPO/dist/imgd.mjs"
}

# ---- readiness ------------------------------------------------------------------------------
# A listening socket accepts connections (the kernel queues them), so `ss` answers "ready" without
# starting a node process (seconds each under emulation). A killed server leaves its socket file
# behind but no listener, so the file alone is never taken for readiness.

vm_listening() { # ADDRESS: HOST:PORT, unix:PATH or PATH
  local addr=${1#unix:}
  case "$addr" in
    /*) [ -n "$(ss -Hxl "src = $addr" 2>/dev/null)" ] ;;
    *) [ -n "$(ss -Htln "sport = :${addr##*:}" 2>/dev/null)" ] ;;
  esac
}

# The lines of a service's log written since its last start.
vm_log_since_start() {
  awk -v start="starting $1\$" '$0 ~ "^---- .* " start { n = 0 } { lines[n++] = $0 } END { for (i = 0; i < n; i++) print lines[i] }' \
    "$VM_LOG_DIR/$1.log" 2>/dev/null
}

ready_check_s3() { vm_log_since_start s3 | grep -q '^s3-server: ready'; }
ready_check_helper() { vm_listening "$VM_HELPER_SOCKET"; }
ready_check_agent() { vm_listening "$VM_AGENT_ADDR"; }

# vm_wait_ready SERVICE: 0 once ready, 1 after VM_READY_TIMEOUT seconds, 2 if it exited first.
vm_wait_ready() {
  local service=$1 pid deadline=$((SECONDS + VM_READY_TIMEOUT))
  pid=$(vm_service_pid "$service")
  until "ready_check_$service"; do
    vm_pid_alive "$pid" || return 2
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# ---- generic process control ----------------------------------------------------------------

vm_pid_alive() { # a zombie counts as dead
  local pid=$1 state
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  state=$(sed 's/^.*) \(.\).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

vm_service_pid() { cat "$VM_PID_DIR/$1.pid" 2>/dev/null || true; }

vm_service_exit_status() { # how the service's current pid ended, as its watcher recorded it
  local pid epid how=""
  pid=$(vm_service_pid "$1")
  for _ in 1 2 3 4 5 6 7 8 9 10; do # the watcher writes it just after the exit
    if [ -s "$VM_PID_DIR/$1.exit" ]; then
      read -r epid how <"$VM_PID_DIR/$1.exit"
      [ "$epid" = "$pid" ] && { echo "$how"; return; }
    fi
    sleep 0.1
  done
  echo "exit status not recorded"
}

vm_service_status() {
  local pid
  pid=$(vm_service_pid "$1")
  if vm_pid_alive "$pid"; then echo "$1: running (pid $pid)"; return 0; fi
  echo "$1: stopped"; return 3
}

vm_service_launch() { # start without waiting for readiness
  local service=$1 pid waited=0
  mkdir -p "$VM_LOG_DIR" "$VM_PID_DIR"
  pid=$(vm_service_pid "$service")
  if vm_pid_alive "$pid"; then echo "$service: already running (pid $pid)" >&2; return 1; fi
  rm -f "$VM_PID_DIR/$service.pid" "$VM_PID_DIR/$service.exit"
  echo "---- $(date +%T.%3N) starting $service" >>"$VM_LOG_DIR/$service.log"
  # setsid: its own session, so nothing aimed at the caller's process group reaches it. The
  # outer subshell exits at once: no shell reports the service's death as a job ("Killed").
  # Inside, a small bash keeps watch: the program's output goes to its log from the first byte,
  # and its exit status is recorded (.exit, and a line in the log), so a service that dies at
  # start says how. The recorded pid is the program's own (start_*_process execs it): kill -9
  # hits the program, not the watcher.
  (
    setsid bash -c '
      source "$1"
      ("start_$2_process") </dev/null >>"$3" 2>&1 &
      pid=$!
      echo "$pid" >"$4.pid.new" && mv "$4.pid.new" "$4.pid"
      wait "$pid"; code=$?
      if [ "$code" -gt 128 ]; then how="killed by signal $((code - 128)) ($(kill -l "$code" 2>/dev/null))"; else how="exit code $code"; fi
      echo "$pid $how" >"$4.exit"
      echo "---- $(date +%T.%3N) $2 (pid $pid) ended: $how" >>"$3"
    ' vm-service "$VM_SERVICES_LIB" "$service" "$VM_LOG_DIR/$service.log" "$VM_PID_DIR/$service" \
      </dev/null >/dev/null 2>&1 &
  )
  # Callers read the pid file as soon as this returns.
  until [ -s "$VM_PID_DIR/$service.pid" ]; do
    [ "$waited" -lt 300 ] || { echo "$service: no pid recorded after 30 s" >&2; return 1; }
    sleep 0.1; waited=$((waited + 1))
  done
}

vm_service_start() {
  vm_service_launch "$1" && vm_service_ready "$1"
}

# Waits until SERVICE is ready. A service that exits before it is ready (seen on loaded machines,
# with nothing in its log) is reported with its exit status and log, and started once more.
vm_service_ready() {
  local service=$1 attempt status
  for attempt in 1 2; do
    vm_wait_ready "$service" && return 0
    status=$?
    if [ "$status" = 2 ]; then
      echo "$service: exited before it was ready ($(vm_service_exit_status "$service")); its log since the start:" >&2
    else
      echo "$service: not ready after ${VM_READY_TIMEOUT} s (IMGD_VM_READY_TIMEOUT); its log since the start:" >&2
    fi
    vm_log_since_start "$service" | tail -n 40 | sed 's/^/    /' >&2
    [ "$status" = 2 ] && [ "$attempt" = 1 ] || return 1
    echo "$service: starting it once more" >&2
    vm_service_launch "$service" || return 1
  done
  return 1
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
