// agent/thin-devices.ts on a real catalog, with the helper stubbed as a small pool
// (test/helpers/stub-pool.ts) that records, for every call, what the catalog said at that moment:
// the intent must be on record before each pool operation, the outcome only after it. A fault
// drops an operation (the helper died before it) or loses its answer (the effect happened): a
// crash between intent and outcome, which a re-run finishes.
import { test } from "node:test";
import assert from "node:assert/strict";
import * as thin from "../../agent/thin-devices.ts";
import { chain1, chain2, digest, stubPool } from "../helpers/stub-pool.ts";

test("a layer device is allocated before the pool creates it, and ready only once it is unmapped", async () => {
  const { catalog, pool, thins, mapped, calls, readyDevice } = stubPool();
  const base = await readyDevice();
  const device = thin.allocateLayerDevice(pool, { chainId: chain2, parentChainId: chain1, layerDigest: digest(2) });
  assert.equal(device.state, "allocated");
  assert.deepEqual(calls.splice(0), [`thin.create ${base.thinId}: allocated`, `device.activate ${base.name}: allocated`, `device.deactivate ${base.name}: allocated`]);
  await thin.createLayerDevice(pool, device, base, {});
  assert.equal(mapped.get(device.name), device.thinId);
  await thin.unmapLayerDevice(pool, device);
  assert.equal(catalog.getDevice(chain2)?.state, "allocated", "not ready before the outcome is recorded");
  thin.layerDeviceReady(pool, device);
  assert.equal(catalog.getDevice(chain2)?.state, "ready");
  assert.deepEqual(calls, [`thin.snapshot ${device.thinId}: allocated`, `device.activate ${device.name}: allocated`, `device.deactivate ${device.name}: allocated`]);
  assert.deepEqual([...thins].sort(), [base.thinId, device.thinId]);
  assert.equal(mapped.size, 0);
});

test("a transition starts only from its own state: a ready device is not created or marked ready again", async () => {
  const { pool, calls, readyDevice } = stubPool();
  const device = await readyDevice();
  calls.length = 0;
  await assert.rejects(thin.createLayerDevice(pool, device, null), /is ready, not allocated/);
  assert.throws(() => thin.layerDeviceReady(pool, device), /is ready, not allocated/);
  assert.deepEqual(calls, [], "the pool was not asked");
});

test("removing a ready layer device: 'removing' before every pool operation, the row and thin id go after", async () => {
  const { catalog, pool, thins, mapped, calls, readyDevice } = stubPool();
  const device = await readyDevice();
  mapped.set(device.name, device.thinId); // left mapped: the removal unmaps it first
  calls.length = 0;
  await thin.removeLayerDevice(pool, device);
  assert.deepEqual(calls, [`device.deactivate ${device.name}: removing`, `thin.delete ${device.thinId}: removing`]);
  assert.equal(catalog.getDevice(chain1), undefined);
  assert.equal(thins.size, 0);
  assert.equal(catalog.thinIdAllocated(device.thinId), false, "free for reuse once the pool confirmed");
});

test("a removal cut short between intent and outcome is finished by a re-run; the thin id is never freed early", async () => {
  for (const [op, fault] of [
    ["device.deactivate", "dropped"],
    ["thin.delete", "dropped"],
    ["thin.delete", "answer lost"],
  ] as const) {
    const { catalog, pool, thins, faults, readyDevice } = stubPool();
    const device = await readyDevice();
    faults.set(op, fault);
    await assert.rejects(thin.removeLayerDevice(pool, device), /helper died|connection dropped/);
    assert.equal(catalog.getDevice(chain1)?.state, "removing", `${op} ${fault}: the intent stays on record`);
    assert.equal(catalog.thinIdAllocated(device.thinId), true, `${op} ${fault}: the id is still accounted for`);
    assert.equal(thins.has(device.thinId), !(op === "thin.delete" && fault === "answer lost"));
    await thin.removeLayerDevice(pool, device); // the re-run: the deletion may be done already
    assert.equal(catalog.getDevice(chain1), undefined);
    assert.equal(thins.size, 0);
    assert.equal(catalog.thinIdAllocated(device.thinId), false);
  }
});

test("a half-made ('allocated') layer device is discarded as it is; 'already gone' is success", async () => {
  const { catalog, pool, calls } = stubPool();
  const device = thin.allocateLayerDevice(pool, { chainId: chain1, parentChainId: null, layerDigest: digest(1) });
  // A crash right after the allocation: the pool never heard of the id.
  await thin.removeLayerDevice(pool, device);
  assert.deepEqual(calls, [`device.deactivate ${device.name}: allocated`, `thin.delete ${device.thinId}: allocated`]);
  assert.equal(catalog.getDevice(chain1), undefined);
});

test("a removal whose row is gone, or holds another thin id now, does not touch the pool", async () => {
  const { catalog, pool, thins, calls, readyDevice } = stubPool();
  const stale = await readyDevice();
  await thin.removeLayerDevice(pool, stale);
  calls.length = 0;
  await thin.removeLayerDevice(pool, stale);
  assert.deepEqual(calls, [], "already removed");
  // Its freed id is handed out again (another device), and its chain is built again with a new one.
  const reuser = thin.allocateLayerDevice(pool, { chainId: chain2, parentChainId: null, layerDigest: digest(2) });
  await thin.createLayerDevice(pool, reuser, null);
  assert.equal(reuser.thinId, stale.thinId);
  const rebuilt = await readyDevice();
  assert.notEqual(rebuilt.thinId, stale.thinId);
  calls.length = 0;
  await thin.removeLayerDevice(pool, stale);
  assert.deepEqual(calls, [], "the id is someone else's now");
  assert.deepEqual([catalog.getDevice(chain1)?.thinId, catalog.getDevice(chain2)?.thinId], [rebuilt.thinId, reuser.thinId]);
  assert.deepEqual([...thins].sort(), [stale.thinId, rebuilt.thinId].sort());
});

test("an activation is allocated before its snapshot is made, and active only once it is mapped", async () => {
  const { catalog, pool, calls, readyDevice } = stubPool();
  const origin = await readyDevice();
  calls.length = 0;
  const row = thin.allocateActivation(pool, { id: "01J00000000000000000000000", image: "golang", chainId: chain1 });
  await thin.snapshotActivation(pool, row, origin);
  const path = await thin.mapActivation(pool, row);
  assert.equal(catalog.getActivation(row.id)?.state, "allocated");
  thin.activationActive(pool, row);
  assert.equal(catalog.getActivation(row.id)?.state, "active");
  assert.equal(path, `/dev/mapper/${row.name}`);
  assert.deepEqual(calls, [`thin.snapshot ${row.thinId}: allocated`, `device.activate ${row.name}: allocated`]);
  // After a reboot its device is gone: mapped again, from "active".
  calls.length = 0;
  await thin.mapActivation(pool, row);
  assert.deepEqual(calls, [`device.activate ${row.name}: active`]);
});

test("a deactivation records 'deactivating' before the pool is touched; cut short anywhere, a re-run finishes it", async () => {
  const { catalog, pool, thins, mapped, calls, faults, readyDevice } = stubPool();
  const origin = await readyDevice();
  const row = thin.allocateActivation(pool, { id: "01J00000000000000000000000", image: "golang", chainId: chain1 });
  catalog.reserveActivationName({ name: "web-1", activationId: row.id, image: "golang", labels: {} });
  await thin.snapshotActivation(pool, row, origin);
  await thin.mapActivation(pool, row);
  thin.activationActive(pool, row);
  calls.length = 0;

  // The FSM's stages (deactivate.ts): the snapshot is deleted only once the intent is on record.
  await assert.rejects(thin.deleteActivationSnapshot(pool, catalog.getActivation(row.id)!), /is active, not deactivating or allocated/);
  faults.set("device.deactivate", "dropped");
  await assert.rejects(thin.startDeactivation(pool, row));
  assert.equal(catalog.getActivation(row.id)?.state, "deactivating", "the intent is recorded even though the pool was not reached");
  assert.equal(mapped.has(row.name), true);
  await thin.startDeactivation(pool, row);
  faults.set("thin.delete", "answer lost");
  await assert.rejects(thin.deleteActivationSnapshot(pool, row));
  assert.equal(thins.has(row.thinId), false);
  assert.equal(catalog.thinIdAllocated(row.thinId), true, "the catalog accounts for the id until the outcome is recorded");
  await thin.deleteActivationSnapshot(pool, row); // gone already: success
  thin.forgetActivation(pool, row.id);
  assert.equal(catalog.getActivation(row.id), undefined);
  assert.equal(catalog.getActivationName("web-1"), undefined, "the name goes with it");
  assert.equal(catalog.thinIdAllocated(row.thinId), false);
  assert.deepEqual(calls, [
    `device.deactivate ${row.name}: deactivating`,
    `device.deactivate ${row.name}: deactivating`,
    `thin.delete ${row.thinId}: deactivating`,
    `thin.delete ${row.thinId}: deactivating`,
  ]);
});

test("removing an activation whole (undo, repairs): an active one is marked first, a half-made one is removed as it is", async () => {
  const { catalog, pool, calls, faults, readyDevice } = stubPool();
  const origin = await readyDevice();
  const active = thin.allocateActivation(pool, { id: "01J00000000000000000000000", image: "golang", chainId: chain1 });
  await thin.snapshotActivation(pool, active, origin);
  await thin.mapActivation(pool, active);
  thin.activationActive(pool, active);
  const half = thin.allocateActivation(pool, { id: "01J00000000000000000000001", image: "golang", chainId: chain1 });
  calls.length = 0;
  faults.set("thin.delete", "dropped");
  await assert.rejects(thin.removeActivation(pool, active));
  assert.equal(catalog.getActivation(active.id)?.state, "deactivating");
  await thin.removeActivation(pool, active);
  await thin.removeActivation(pool, half);
  await thin.removeActivation(pool, half); // done: nothing more
  assert.deepEqual(catalog.listActivations(), []);
  assert.deepEqual(calls, [
    `device.deactivate ${active.name}: deactivating`,
    `thin.delete ${active.thinId}: deactivating`,
    `device.deactivate ${active.name}: deactivating`,
    `thin.delete ${active.thinId}: deactivating`,
    `device.deactivate ${half.name}: allocated`,
    `thin.delete ${half.thinId}: allocated`,
  ]);
});

test("a failed deactivation is settled by what the pool shows", async () => {
  const { catalog, pool, thins, readyDevice } = stubPool();
  const origin = await readyDevice();
  const row = thin.allocateActivation(pool, { id: "01J00000000000000000000000", image: "golang", chainId: chain1 });
  await thin.snapshotActivation(pool, row, origin);
  await thin.startDeactivation(pool, row);
  await thin.settleFailedDeactivation(pool, row.id);
  assert.equal(catalog.getActivation(row.id)?.state, "deactivating", "its snapshot is still in the pool");
  thins.delete(row.thinId);
  await thin.settleFailedDeactivation(pool, row.id);
  assert.equal(catalog.getActivation(row.id), undefined);
});

test("thin ids without a row: a lost one stays allocated until the pool deleted it; a wiped foreign one is reserved meanwhile", async () => {
  const { catalog, pool, thins, mapped, calls, faults, readyDevice } = stubPool();
  // A lost id: allocated by this catalog, its row gone, mapped under a stray name.
  const lost = thin.allocateActivation(pool, { id: "01J00000000000000000000000", image: "golang", chainId: (await readyDevice()).chainId });
  catalog.db.prepare("DELETE FROM activations WHERE id = ?").run(lost.id);
  catalog.db.prepare("DELETE FROM thin_ids WHERE thin_id = ?").run(lost.thinId);
  thins.add(lost.thinId);
  mapped.set("imgd-act-stray", lost.thinId);
  calls.length = 0;
  faults.set("thin.delete", "dropped");
  await assert.rejects(thin.deleteLostThinId(pool, lost.thinId));
  assert.equal(catalog.thinIdAllocated(lost.thinId), true);
  await thin.deleteLostThinId(pool, lost.thinId);
  assert.equal(catalog.thinIdAllocated(lost.thinId), false, "free once the pool confirmed");
  assert.deepEqual(calls, [
    `device.deactivate imgd-act-stray: no row`,
    `thin.delete ${lost.thinId}: allocated, no row`,
    `thin.delete ${lost.thinId}: allocated, no row`,
  ]);

  // A foreign id (never allocated here): reserved while the pool deletes it.
  thins.add(9000);
  calls.length = 0;
  faults.set("thin.delete", "dropped");
  await assert.rejects(thin.wipeForeignThinId(pool, 9000, "imgd-act-foreign"));
  assert.deepEqual(catalog.adoptedThinIds(), [], "a failed wipe leaves it foreign");
  await thin.wipeForeignThinId(pool, 9000);
  assert.equal(thins.has(9000), false);
  assert.deepEqual(catalog.adoptedThinIds(), []);
  assert.deepEqual(calls, [`device.deactivate imgd-act-foreign: no row`, `thin.delete 9000: reserved`, `thin.delete 9000: reserved`]);
});
