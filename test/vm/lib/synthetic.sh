# shellcheck shell=bash
# make_synthetic_bucket DIR: DIR/bucket/images/... and DIR/expected/... from
# test/fixtures/make-bucket.ts, run with the repo's Node 24 (sourced by test/vm/e2e and demo).
make_synthetic_bucket() {
  local out=$1 node=./node_modules/.bin/node
  [ -x "$node" ] || { echo "vm: $node missing: run npm ci first" >&2; return 1; }
  echo "vm: generating the synthetic bucket in $out" >&2
  "$node" test/fixtures/make-bucket.ts "$out"
}
