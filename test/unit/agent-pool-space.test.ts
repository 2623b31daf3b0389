import { test } from "node:test";
import assert from "node:assert/strict";
import { estimatedDataBytes, spaceProblem } from "../../agent/images/pool-space.ts";

const MiB = 1048576;
const pool = (over: Partial<Parameters<typeof spaceProblem>[1]> = {}) => ({
  name: "imgd-pool",
  dataUsedBytes: 0,
  dataTotalBytes: 1024 * MiB,
  metaUsedBytes: 100 * 1024,
  metaTotalBytes: 1 * MiB,
  mode: "rw",
  blockSizeBytes: MiB,
  errorIfNoSpace: true,
  ...over,
});

test("a small layer fits an empty pool", () => {
  assert.equal(spaceProblem({ fileBytes: 10 * MiB, entries: 1000 }, pool()), undefined);
});

test("the estimate counts content, a block per entry and a fixed overhead, in whole pool blocks", () => {
  assert.equal(estimatedDataBytes({ fileBytes: 0, entries: 0 }, pool()), 16 * MiB);
  assert.equal(estimatedDataBytes({ fileBytes: 1, entries: 256 }, pool()), 18 * MiB);
});

test("a layer larger than the free data space is refused with both figures", () => {
  const problem = spaceProblem({ fileBytes: 1024 * MiB, entries: 1 }, pool({ dataUsedBytes: 100 * MiB }));
  assert.match(problem ?? "", /pool imgd-pool has 924\.0 MiB of data space free; the layer needs about 1041\.0 MiB/);
});

test("metadata is kept from running out: a 10% reserve stays free", () => {
  assert.equal(spaceProblem({ fileBytes: MiB, entries: 1 }, pool({ metaUsedBytes: 0.85 * MiB })), undefined);
  assert.match(spaceProblem({ fileBytes: MiB, entries: 1 }, pool({ metaUsedBytes: 0.9 * MiB })) ?? "", /metadata space/);
});

test("a pool that is not writable refuses everything", () => {
  assert.match(spaceProblem({ fileBytes: 0, entries: 1 }, pool({ mode: "out_of_data_space" })) ?? "", /is out_of_data_space, not writable/);
});

test("a first layer also pays for its new filesystem", () => {
  assert.equal(estimatedDataBytes({ fileBytes: 0, entries: 0 }, pool(), true), 32 * MiB);
  // 20 MiB free: enough for a small layer on a snapshot, not for one that needs mkfs first.
  const nearlyFull = pool({ dataUsedBytes: 1004 * MiB });
  assert.equal(spaceProblem({ fileBytes: MiB, entries: 1 }, nearlyFull), undefined);
  assert.match(spaceProblem({ fileBytes: MiB, entries: 1 }, nearlyFull, true) ?? "", /has 20\.0 MiB of data space free; the layer needs about 34\.0 MiB/);
});
