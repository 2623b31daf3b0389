// An activation and a forced deletion of its image at the same time: the activate, deactivate and
// delete FSMs (agent/images/) on the real engine and a real catalog, with the pool stubbed
// (test/helpers/stub-pool.ts), whose hooks interleave them exactly where the 20-cut power soak
// saw them (seed 50d3ddbb, boot 7): the deletion deactivated an activation still being made, the
// activation's next step made its row again, and the deletion's device removal met that row
// (FOREIGN KEY failure, then a device left "removing" whose thin id was gone).
import { test } from "node:test";
import assert from "node:assert/strict";
import { FsmEngine } from "../../agent/fsm/engine.ts";
import { registerActivateFsm } from "../../agent/images/activate.ts";
import { registerDeactivateFsm } from "../../agent/images/deactivate.ts";
import { registerDeleteFsm } from "../../agent/images/delete.ts";
import type { PullFsm } from "../../agent/images/pull.ts";
import { KeyedLock } from "../../agent/keyed-lock.ts";
import type { S3Client } from "@aws-sdk/client-s3";
import { chain1, digest, stubPool } from "../helpers/stub-pool.ts";

async function setUp() {
  const stub = stubPool();
  const { catalog } = stub;
  const locks = new KeyedLock();
  const engine = new FsmEngine(stub.db, { locks, retry: { maxAttempts: 3, baseDelayMs: 1, maxDelayMs: 1, factor: 1, jitter: 0 }, log: () => {} });
  const helper = stub.pool.helper;
  const log = () => {};
  // golang is ready (its device exists): no pull runs here, and S3 is never asked.
  const pull = { list: () => [] } as unknown as PullFsm;
  const deactivate = registerDeactivateFsm({ engine, catalog, helper, locks });
  const activate = registerActivateFsm({ engine, catalog, helper, pull, log, s3: {} as S3Client, s3Config: { bucket: "b", prefix: "images/", region: "r" } });
  const remove = registerDeleteFsm({ engine, catalog, helper, locks, pull, deactivate, log });
  await engine.resumeAll();
  await stub.readyDevice();
  catalog.beginPull("golang", "pull-1", [{ position: 1, key: "images/golang/1.tar", size: 10, etag: '"e"' }]);
  catalog.setLayerDigest("golang", 1, digest(1));
  catalog.setLayerChain("golang", 1, chain1);
  catalog.markImageReady("golang", "pull-1", chain1);
  let n = 0;
  /** Starts an activation as ActivateImage does (its name reserved first); resolves with its outcome. */
  const activation = (id = `01J0000000000000000000000${n++}`) => {
    catalog.reserveActivationName({ name: `act-${id.toLowerCase()}`, activationId: id, image: "golang", labels: {} });
    return { id, outcome: activate.wait(activate.start(id, { image: "golang", activationId: id }, {}).runId) };
  };
  const forcedDelete = () => remove.wait(remove.start("golang", { image: "golang", force: true }, { deactivated: [], chainIds: [], removedDevices: [] }).runId);
  return { ...stub, engine, activation, forcedDelete };
}

test("an activation deactivated by a forced deletion while it is made ends FAILED as such, and is never made again", async () => {
  const { catalog, thins, mapped, before, engine, activation, forcedDelete } = await setUp();
  let deletion: Awaited<ReturnType<typeof forcedDelete>> | undefined;
  // Its snapshot is made; before it is mapped, the image is deleted with force (all of it).
  before.set("device.activate", async () => void (deletion = await forcedDelete()));
  const { id, outcome } = activation();
  const result = await outcome;
  assert.equal(deletion?.status, "succeeded", deletion?.error);
  assert.equal(result.status, "failed");
  assert.match(result.error ?? "", new RegExp(`activation ${id} of golang was deactivated .* while it was being made`));
  assert.deepEqual(catalog.listActivations(), [], "no activation row is made again");
  assert.deepEqual(catalog.listDevices(), [], "the deletion removed the image's device");
  assert.deepEqual([mapped.size, thins.size], [0, 0], "nothing is left in the pool");
  await engine.shutdown();
});

test("an activation made while a forced deletion runs: the deletion does not drop the image under it", async () => {
  const { catalog, mapped, before, engine, activation, forcedDelete } = await setUp();
  const first = activation();
  assert.equal((await first.outcome).status, "succeeded");
  // While the deletion removes the first activation's device, a second activation is made.
  let second: ReturnType<typeof activation> | undefined;
  before.set("device.deactivate", async () => {
    second = activation();
    assert.equal((await second.outcome).status, "succeeded");
  });
  const deletion = await forcedDelete();
  assert.equal(deletion.status, "failed");
  assert.match(deletion.error ?? "", new RegExp(`activation\\(s\\) ${second!.id} were made while it was being deleted`));
  assert.equal(catalog.getImage("golang")?.state, "ready", "the image stays");
  assert.deepEqual(catalog.listActivations().map((a) => [a.id, a.state]), [[second!.id, "active"]]);
  assert.equal(catalog.getDevice(chain1)?.state, "ready");
  assert.equal(mapped.size, 1);
  await engine.shutdown();
});
