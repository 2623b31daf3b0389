#!/bin/bash
# Smoke test of device-mapper thin provisioning inside the test VM:
#   test/vm/run --no-services -- bash test/vm/smoke-dm.sh
# Pool on loop devices over tmpfs files, a thin device with ext4, a write, a snapshot that shows
# the origin's data, and a clean teardown. Prints "smoke-dm: ok" and the time each step took.
set -euo pipefail

[ "${IMGD_VM:-}" = 1 ] || { echo "smoke-dm: run me inside the VM (test/vm/run)" >&2; exit 2; }

work=$(mktemp -d /tmp/smoke-dm.XXXXXX)
pool=smoke-pool
data_loop="" meta_loop=""
t0=$EPOCHREALTIME
step() { printf 'smoke-dm: %-34s %6.2f s\n' "$1" "$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')"; t0=$EPOCHREALTIME; }

cleanup() {
  set +e
  umount "$work/snap" "$work/origin" 2>/dev/null
  for dev in smoke-snap smoke-thin "$pool"; do dmsetup remove "$dev" 2>/dev/null; done
  [ -n "$data_loop" ] && losetup -d "$data_loop"
  [ -n "$meta_loop" ] && losetup -d "$meta_loop"
  rm -rf "$work"
}
trap cleanup EXIT

# The challenge README's pool: 1 MiB metadata, 2 GiB data, 2048-sector (1 MiB) blocks.
truncate -s 1M "$work/meta"
truncate -s 2G "$work/data"
meta_loop=$(losetup --find --show "$work/meta")
data_loop=$(losetup --find --show "$work/data")
step "loop devices"

data_sectors=$(blockdev --getsz "$data_loop")
dmsetup create "$pool" --table "0 $data_sectors thin-pool $meta_loop $data_loop 2048 0 1 skip_block_zeroing"
dmsetup mknodes
step "thin-pool"

dmsetup message "$pool" 0 "create_thin 1"
dmsetup create smoke-thin --table "0 $((8 * 1024 * 1024 * 2)) thin /dev/mapper/$pool 1"
dmsetup mknodes
step "thin device (8 GiB virtual)"

mkfs.ext4 -q -E lazy_itable_init=1,lazy_journal_init=1,nodiscard /dev/mapper/smoke-thin
step "mkfs.ext4"

mkdir "$work/origin" "$work/snap"
mount /dev/mapper/smoke-thin "$work/origin"
echo "written before the snapshot" >"$work/origin/hello"
dd if=/dev/urandom of="$work/origin/blob" bs=1M count=64 status=none
sync
step "mount + write 64 MiB"

# A snapshot of an active origin needs the origin suspended while the metadata is updated.
dmsetup suspend smoke-thin
dmsetup message "$pool" 0 "create_snap 2 1"
dmsetup resume smoke-thin
dmsetup create smoke-snap --table "0 $((8 * 1024 * 1024 * 2)) thin /dev/mapper/$pool 2"
dmsetup mknodes
step "create_snap + activate"

echo "written after the snapshot" >"$work/origin/hello"
sync
mount -o ro,noload /dev/mapper/smoke-snap "$work/snap"
[ "$(cat "$work/snap/hello")" = "written before the snapshot" ] || { echo "smoke-dm: snapshot does not show the origin's old data" >&2; exit 1; }
cmp "$work/origin/blob" "$work/snap/blob"
step "snapshot shows origin data"

dmsetup status "$pool"
umount "$work/snap" "$work/origin"
dmsetup remove smoke-snap
dmsetup remove smoke-thin
dmsetup message "$pool" 0 "delete 2"
dmsetup message "$pool" 0 "delete 1"
dmsetup remove "$pool"
step "teardown"
echo "smoke-dm: ok"
