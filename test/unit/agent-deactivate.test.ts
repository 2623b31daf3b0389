// The deactivate FSM (agent/images/deactivate.ts) on the real engine and a real catalog, with the
// pool stubbed (test/helpers/stub-pool.ts): a deactivation whose activation something else removed
// meanwhile (another deactivation, a failed activation's undo, a repair) has reached the user's
// goal, and succeeds. The 20-cut power soak saw two such runs end FAILED with "is not known".
import { test } from "node:test";
import assert from "node:assert/strict";
import { FsmEngine } from "../../agent/fsm/engine.ts";
import { registerDeactivateFsm } from "../../agent/images/deactivate.ts";
import { KeyedLock } from "../../agent/keyed-lock.ts";
import { activationLock } from "../../agent/lock-keys.ts";
import * as thin from "../../agent/thin-devices.ts";
import { chain1, stubPool } from "../helpers/stub-pool.ts";

async function activated() {
  const stub = stubPool();
  const locks = new KeyedLock();
  const engine = new FsmEngine(stub.db, { locks, retry: { maxAttempts: 2, baseDelayMs: 1, maxDelayMs: 1, factor: 1, jitter: 0 }, log: () => {} });
  const deactivate = registerDeactivateFsm({ engine, catalog: stub.catalog, helper: stub.pool.helper, locks });
  await engine.resumeAll();
  const origin = await stub.readyDevice();
  const row = thin.allocateActivation(stub.pool, { id: "01J00000000000000000000000", image: "golang", chainId: chain1 });
  await thin.snapshotActivation(stub.pool, row, origin);
  await thin.mapActivation(stub.pool, row);
  thin.activationActive(stub.pool, row);
  const run = async () => deactivate.wait(deactivate.start(row.id, { activationId: row.id }, {}).runId);
  return { ...stub, locks, engine, row, run };
}

test("a deactivation that finds its activation already removed (under the lock a repair holds) succeeds", async () => {
  const { catalog, pool, thins, mapped, locks, engine, row, run } = await activated();
  // A repair holds the activation's lock and removes it whole; the user's deactivation waits.
  const release = await locks.acquire(activationLock(row.id));
  const outcome = run();
  await thin.removeActivation(pool, row);
  release();
  const result = await outcome;
  assert.equal(result.status, "succeeded", result.error);
  assert.equal(catalog.getActivation(row.id), undefined);
  assert.equal(thins.has(row.thinId), false);
  assert.equal(mapped.has(row.name), false);
  await engine.shutdown();
});

test("a deactivation whose row goes between its steps succeeds without touching the pool again", async () => {
  const { catalog, pool, thins, calls, before, engine, row, run } = await activated();
  // Something finishes the removal while the first step unmaps the device.
  before.set("device.deactivate", () => thin.removeActivation(pool, catalog.getActivation(row.id)!));
  calls.length = 0;
  const result = await run();
  assert.equal(result.status, "succeeded", result.error);
  assert.equal(catalog.getActivation(row.id), undefined);
  assert.equal(thins.has(row.thinId), false);
  assert.equal(calls.filter((c) => c.startsWith(`thin.delete ${row.thinId}`)).length, 1, `the snapshot is deleted once: ${calls.join("; ")}`);
  await engine.shutdown();
});
