// agent/doctor.ts on a real catalog, with the helper's two read ops and the FSMs' run lists
// stubbed: half-made rows, and what a running run makes doctor leave alone.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Catalog } from "../../agent/catalog.ts";
import { openDatabase } from "../../agent/db.ts";
import { runDoctor } from "../../agent/doctor.ts";
import type { HelperClient } from "../../agent/helper-client.ts";
import { chainIds, layerDeviceName } from "../../agent/images/chain.ts";

const digest = (n: number) => "sha256:" + String(n).repeat(64).slice(0, 64);

function setup() {
  const catalog = new Catalog(openDatabase(":memory:"));
  const pool = { thinIds: [] as number[], devices: [] as { name: string; thinId: number }[] };
  const helper = {
    call: async (op: string) => (op === "thin.list" ? { thinIds: pool.thinIds } : { devices: pool.devices }),
  } as unknown as HelperClient;
  const runs = { pull: [] as string[], activate: [] as string[], deactivate: [] as string[] };
  const fsm = (ids: string[]) => ({ list: () => ids.map((resourceId) => ({ resourceId })) as never });
  const doctor = () => runDoctor({ catalog, helper, pull: fsm(runs.pull), activate: fsm(runs.activate), deactivate: fsm(runs.deactivate) });
  return { catalog, pool, runs, doctor };
}

test("allocated rows with no running run are half-made; with one they are left alone", async () => {
  const { catalog, pool, runs, doctor } = setup();
  const [chain] = chainIds([digest(1)]);
  const device = catalog.allocateDevice({ chainId: chain!, parentChainId: null, layerDigest: digest(1), name: layerDeviceName(chain!) });
  catalog.markDeviceReady(chain!);
  const act = catalog.allocateActivation({ id: "01J00000000000000000000000", image: "golang", chainId: chain!, name: "imgd-act-01j00000000000000000000000" });
  pool.thinIds = [device.thinId, act.thinId];
  pool.devices = [{ name: act.name, thinId: act.thinId }];
  const half = await doctor();
  assert.deepEqual(half.findings.map((f) => [f.kind, f.subject]), [["HALF_MADE_ACTIVATION", `activation ${act.id}`]]);
  assert.match(half.findings[0]!.repair, new RegExp(`delete thin id ${act.thinId} from the pool`));
  assert.deepEqual([half.poolThinIds, half.catalogThinIds], [2, 2]);

  runs.activate.push(act.id);
  assert.equal((await doctor()).clean, true, "its activate run is still going");
  catalog.markActivationActive(act.id);
  runs.activate.length = 0;
  assert.equal((await doctor()).clean, true);

  pool.devices = [];
  assert.deepEqual((await doctor()).findings.map((f) => f.kind), ["MISSING_DEVICE"]);
  // Its activate run unfinished (a power cut after the mapping was recorded: the run only ends on
  // resume) or a deactivation not started yet: the device is still missing, and nothing else
  // would map it again.
  runs.activate.push(act.id);
  runs.deactivate.push(act.id);
  assert.deepEqual((await doctor()).findings.map((f) => f.kind), ["MISSING_DEVICE"]);
  runs.activate.length = 0;
  runs.deactivate.length = 0;
  pool.devices = [{ name: act.name, thinId: act.thinId }];

  // A pull building layer 2: allocated, active, not yet in the pool.
  catalog.beginPull("node", "run1", [{ position: 1, key: "images/node/1.tar", size: 1, etag: "e1" }, { position: 2, key: "images/node/2.tar", size: 1, etag: "e2" }]);
  catalog.setLayerDigest("node", 1, digest(1));
  catalog.setLayerDigest("node", 2, digest(2));
  const chain2 = chainIds([digest(1), digest(2)])[1]!;
  const building = catalog.allocateDevice({ chainId: chain2, parentChainId: chain!, layerDigest: digest(2), name: layerDeviceName(chain2) });
  pool.devices.push({ name: building.name, thinId: building.thinId });
  runs.pull.push("node");
  assert.equal((await doctor()).clean, true, "the running pull is building it");
  runs.pull.length = 0;
  assert.deepEqual((await doctor()).findings.map((f) => [f.kind, f.subject]), [["HALF_MADE_DEVICE", building.name]]);
});

test("a removal cut short is one finding, UNFINISHED_REMOVAL, whatever the pool and the mappings still hold", async () => {
  const { catalog, pool, runs, doctor } = setup();
  const [chain] = chainIds([digest(1)]);
  const device = catalog.allocateDevice({ chainId: chain!, parentChainId: null, layerDigest: digest(1), name: layerDeviceName(chain!) });
  catalog.markDeviceReady(chain!);
  catalog.markDeviceRemoving(chain!);
  for (const [thinIds, devices] of [
    [[device.thinId], [{ name: device.name, thinId: device.thinId }]], // nothing done yet
    [[device.thinId], []], // unmapped
    [[], []], // deleted from the pool, the row left
  ] as const) {
    pool.thinIds = [...thinIds];
    pool.devices = [...devices];
    const report = await doctor();
    assert.deepEqual(report.findings.map((f) => [f.kind, f.subject]), [["UNFINISHED_REMOVAL", device.name]]);
    assert.deepEqual(report.findings[0]!.action, { type: "discard-device", chainId: chain, thinId: device.thinId });
  }
  // A pull of its chain finishes it itself (and rebuilds the device).
  catalog.beginPull("golang", "run1", [{ position: 1, key: "images/golang/1.tar", size: 1, etag: "e1" }]);
  catalog.setLayerDigest("golang", 1, digest(1));
  runs.pull.push("golang");
  assert.equal((await doctor()).clean, true);
});
