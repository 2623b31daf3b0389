import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { activationDeviceName, chainIds, layerDeviceName, nextChainId } from "../../agent/images/chain.ts";

const d = (c: string) => "sha256:" + c.repeat(64);

test("chain id of the first layer is its digest; later ones hash the parent chain and the digest", () => {
  const chain = chainIds([d("a"), d("b")]);
  assert.equal(chain[0], d("a"));
  assert.equal(chain[1], "sha256:" + createHash("sha256").update(`${d("a")} ${d("b")}`).digest("hex"));
});

test("chain ids built one layer at a time are the same as the whole chain's", () => {
  const digests = [d("1"), d("2"), d("3")];
  let parent: string | null = null;
  const oneByOne = digests.map((digest) => (parent = nextChainId(parent, digest)));
  assert.deepEqual(oneByOne, chainIds(digests));
  assert.throws(() => nextChainId(d("1"), "sha256:xyz"), /not a sha256 digest/);
});

test("images sharing leading layers share chain ids, and diverge after", () => {
  const golang = chainIds([d("1"), d("2"), d("3"), d("4"), d("5")]);
  const node = chainIds([d("1"), d("2"), d("3"), d("6"), d("7")]);
  assert.deepEqual(golang.slice(0, 3), node.slice(0, 3));
  assert.notEqual(golang[3], node[3]);
});

test("the same layer at another position gives another chain id", () => {
  assert.notEqual(chainIds([d("1"), d("2")])[1], chainIds([d("2"), d("2")])[1]);
});

test("malformed digests are refused", () => {
  assert.throws(() => chainIds(["sha256:xyz"]), /not a sha256 digest/);
  assert.throws(() => chainIds([d("A")]), /not a sha256 digest/);
});

test("device names have the shape the helper accepts", () => {
  assert.match(layerDeviceName(chainIds([d("c")])[0]), /^imgd-layer-[0-9a-f]{32}$/);
  assert.match(activationDeviceName("01JDEADBEEF0123456789ABCDE"), /^imgd-act-[0-9a-z]{26}$/);
});
