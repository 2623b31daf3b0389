#!/bin/bash
# PID 1 of the test VM after the initramfs switched to the overlay root (see test/vm/init).
# Prepares users, state directories and services, runs the command, prints the exit-code marker
# the host waits for, and powers the VM off. /run/imgd-vm is the host's per-run directory:
#   session.env  shell assignments written by test/vm/run (repo, bucket, options, passed env)
#   command      the command's arguments, NUL-separated
set -u
. /run/imgd-vm/session.env
export IMGD_VM_REPO IMGD_VM_BUCKET IMGD_VM_BUCKET_MD5
. "$IMGD_VM_REPO/test/vm/lib/services.sh"

say() { printf 'vm-guest: %s\n' "$*"; }

setup_environment() {
  export HOME=/root TERM=${IMGD_VM_TERM:-dumb}
  export PATH="$IMGD_VM_REPO/node_modules/.bin:$IMGD_VM_REPO/test/vm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  export IMGD_VM=1
  export IMGD_ADDR=$VM_AGENT_ADDR
  export IMGD_HELPER_SOCKET=$VM_HELPER_SOCKET
  export IMGD_S3_ENDPOINT="http://$VM_S3_ADDR"
  export IMGD_S3_BUCKET=${IMGD_S3_BUCKET:-flyio-platform-hiring-challenge}
  export IMGD_VM_LOG_DIR=$VM_LOG_DIR
  # Kept on the host (.vm/node-compile-cache): later runs skip most JS/TS compilation.
  export NODE_COMPILE_CACHE=${NODE_COMPILE_CACHE:-/run/imgd-vm-node-cache}
  # One line per request the S3 server received ("GET images/golang/1.tar"), for tests.
  export IMGD_TEST_S3_LOG=${IMGD_TEST_S3_LOG:-$VM_S3_REQUEST_LOG}
  mkdir -p "$VM_LOG_DIR" "$VM_PID_DIR"
}

# With the uid test/vm/run chose (and warmed the agent's compile cache as: Node keys it by uid).
create_service_user() {
  local id=${IMGD_VM_SERVICE_UID:-}
  getent group imgd >/dev/null || groupadd --system ${id:+--gid "$id"} imgd
  getent passwd imgd >/dev/null ||
    useradd --system ${id:+--uid "$id"} --gid imgd --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin imgd
}

# Fresh, empty state every run: tmpfs hides whatever the host has at these paths. With a disk
# (test/vm/run --disk), the state lives on it instead and survives to the next boot of that disk.
create_state_dirs() {
  if [ "${IMGD_VM_DISK:-0}" = 1 ]; then
    create_persistent_state_dirs
  else
    mount -t tmpfs -o mode=0750 tmpfs "$VM_STATE_DIR" 2>/dev/null ||
      { mkdir -p "$VM_STATE_DIR" && mount -t tmpfs -o mode=0750 tmpfs "$VM_STATE_DIR"; }
    mkdir -p "$VM_HELPER_STATE_DIR"
    mount -t tmpfs -o mode=0700 tmpfs "$VM_HELPER_STATE_DIR"
  fi
  chown imgd:imgd "$VM_STATE_DIR"
  mkdir -p "$(dirname "$VM_HELPER_SOCKET")"
}

VM_PERSIST_DIR=/persist
create_persistent_state_dirs() {
  local disk=/dev/vda
  [ -b "$disk" ] || { echo "no $disk in the guest" >&2; return 1; }
  # A new disk image is all zeros: give it a filesystem the first time only.
  /usr/sbin/blkid "$disk" >/dev/null 2>&1 || /usr/sbin/mkfs.ext4 -q -F "$disk" || return 1
  mkdir -p "$VM_PERSIST_DIR" && mount -t ext4 "$disk" "$VM_PERSIST_DIR" || return 1
  mkdir -p "$VM_PERSIST_DIR/imgd" "$VM_PERSIST_DIR/imgd-privhelper" "$VM_STATE_DIR" "$VM_HELPER_STATE_DIR"
  chmod 0750 "$VM_PERSIST_DIR/imgd" && chmod 0700 "$VM_PERSIST_DIR/imgd-privhelper"
  mount --bind "$VM_PERSIST_DIR/imgd" "$VM_STATE_DIR" &&
    mount --bind "$VM_PERSIST_DIR/imgd-privhelper" "$VM_HELPER_STATE_DIR"
}

# The service user must reach the repo (node_modules, agent/); a clone under /root (0700)
# would hide it. Only the overlay's copies of the directories change, never the host's.
open_repo_path() {
  local dir=$IMGD_VM_REPO
  while [ "$dir" != / ]; do
    [ -n "$(find "$dir" -maxdepth 0 -perm -o=x)" ] || chmod o+x "$dir"
    dir=$(dirname "$dir")
  done
}

# A real host runs udev, and udev sees every device imgd makes: it probes new block devices
# (blkid opens them, which can make a remove fail with EBUSY), watches them for writes, and its dm
# rules read the flags libdevmapper puts in each uevent. The helper must hold with it running, so
# the guest runs Debian's udevd as a host would (IMGD_VM_UDEV=0: without it).
start_udev() {
  [ "${IMGD_VM_UDEV:-1}" = 1 ] || return 0
  local udevd=/lib/systemd/systemd-udevd t0=$SECONDS
  [ -x "$udevd" ] || { echo "no $udevd: install Debian's udev (test/vm/lib/prepare.sh does)" >&2; return 1; }
  mkdir -p /run/udev
  "$udevd" --daemon || return 1
  udevadm trigger --action=add --type=subsystems && udevadm trigger --action=add --type=devices || return 1
  udevadm settle --timeout=120 || return 1
  say "udevd running, devices settled after $((SECONDS - t0)) s"
}

start_services() {
  say "starting s3, helper, agent"
  local t0=$SECONDS
  # All three at once (node start-up is the slow part under emulation); the agent waits for the
  # helper's pool by itself.
  vm_service_launch s3 && vm_service_launch helper && vm_service_launch agent || return 1
  local service ready=()
  for service in helper agent s3; do
    vm_service_ready "$service" || return 1
    ready+=("$service $((SECONDS - t0)) s")
  done
  say "services ready after $((SECONDS - t0)) s ($(IFS=,; echo "${ready[*]}" | sed 's/,/, /g'))"
}

run_command() {
  local -a cmd
  mapfile -d '' cmd </run/imgd-vm/command
  cd "$IMGD_VM_REPO" || return 1
  if [ "${IMGD_VM_HOST_TTY:-0}" = 1 ]; then
    # The serial console does not know the host terminal's size.
    if [ -n "${IMGD_VM_TTY_SIZE:-}" ]; then
      stty rows "${IMGD_VM_TTY_SIZE% *}" cols "${IMGD_VM_TTY_SIZE#* }" </dev/console 2>/dev/null || true
    fi
    "${cmd[@]}" </dev/null
  else
    # The host's output is not a terminal: give the command none either (plain test reports).
    "${cmd[@]}" </dev/null 2>&1 | cat
    return "${PIPESTATUS[0]}"
  fi
}

session() {
  setup_environment
  start_udev || { echo "IMGD-VM-SETUP-FAILED: udevd did not start"; return 1; }
  create_service_user || { echo "IMGD-VM-SETUP-FAILED: cannot create user imgd"; return 1; }
  create_state_dirs || { echo "IMGD-VM-SETUP-FAILED: cannot create state directories"; return 1; }
  open_repo_path
  if [ "$IMGD_VM_SERVICES" = 1 ]; then
    if ! start_services; then
      echo "IMGD-VM-SETUP-FAILED: services did not start"
      vm_log_tails 40
      return 1
    fi
  fi
  say "running: $(tr '\0' ' ' </run/imgd-vm/command)"
  local code=0
  run_command || code=$?
  if [ "$code" != 0 ] && [ "$IMGD_VM_SERVICES" = 1 ]; then
    say "command failed with exit code $code; service logs follow"
    vm_log_tails 60
  fi
  # Written before the marker: the host falls back to this file if the console loses the line.
  echo "$code" >/run/imgd-vm/exit-code
  sync
  echo "IMGD-VM-EXIT:$IMGD_VM_NONCE:$code"
}

power_off() {
  sleep 0.2 # let the serial line drain
  sync
  /bin/busybox poweroff -f
  echo o >/proc/sysrq-trigger
  sleep 10
}

# A subshell, so that nothing in the session (exit, errors) can end PID 1 before power-off.
(session)
power_off
