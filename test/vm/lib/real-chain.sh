# shellcheck shell=bash
# Real image chains (test/fixtures/real-chain) for the VM harness (sourced by test/vm/e2e, demo
# and bench/run).
#
# real_chain_dir RECIPE: builds the chain once per machine (cached in .vm/real/RECIPE, rebuilt
#   when its recipe changes; as root, from Debian's archive) and prints its directory.
real_chain_dir() {
  test/fixtures/real-chain/build.sh "$1" | tail -n 1
}

# merge_buckets OUT BUCKET...: OUT/images/ holds the images of every BUCKET, hardlinked (the VM
#   serves one bucket directory; image names must not collide).
merge_buckets() {
  local out=$1 bucket image
  shift
  rm -rf "$out"
  mkdir -p "$out/images"
  for bucket in "$@"; do
    for image in "$bucket"/images/*/; do
      image=$(basename "$image")
      [ ! -e "$out/images/$image" ] || { echo "vm: image $image is in two buckets" >&2; return 1; }
      cp -al "$bucket/images/$image" "$out/images/$image"
    done
  done
}
