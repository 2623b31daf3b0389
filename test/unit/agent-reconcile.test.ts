// Reconciliation (agent/reconcile.ts) on the host: real s3rver, real SQLite, real gRPC; the root
// helper is the TEST DOUBLE of test/helpers/fake-helper.ts (no device-mapper on this kernel; the
// VM test test/e2e/lifecycle.test.ts plants the same leaks in the real pool).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startAgent, type RunningAgent } from "../../agent/app.ts";
import { loadAgentConfig } from "../../agent/config.ts";
import { Catalog } from "../../agent/catalog.ts";
import { openDatabase } from "../../agent/db.ts";
import { chainIds, layerDeviceName } from "../../agent/images/chain.ts";
import { RepairResult, FindingKind, connectImgd, ImageState, type ImgdClient } from "../../client/sdk.ts";
import { type FakeHelper } from "../helpers/fake-helper.ts";
import { pullReady } from "../helpers/pull.ts";
import { TestAgent } from "../helpers/test-agent.ts";

/** The API's RepairResult as the words these tests compare ("" when not repaired). */
const resultWord = (r: RepairResult) => (r === RepairResult.UNSPECIFIED ? "" : RepairResult[r].toLowerCase());

let helper: FakeHelper;
let agent: RunningAgent;
let client: ImgdClient;
const logs: { level: string; msg: string; fields?: Record<string, unknown> }[] = [];
const shared = [1, 2, 3].map((n) => ({ [`layer${n}/file`]: `shared layer ${n}\n` }));
const harness = new TestAgent({
  name: "reconcile",
  log: (level, msg, fields) => void logs.push({ level, msg, fields }),
  images: {
    golang: [...shared, { "go/bin/go": "go\n" }],
    node: [...shared, { "node/bin/node": "node\n" }, { "node/version": "22\n" }],
    python: [...shared, { "python/version": "3.11\n" }],
  },
});
const stateDir = harness.stateDir;

async function start(): Promise<void> {
  await harness.start();
  ({ agent, client } = harness);
}
const stop = () => harness.stop();

/** Changes the catalog while the agent is stopped, as an administrator (or a crash) would. */
function withStoppedCatalog(fn: (catalog: Catalog) => void): void {
  const db = openDatabase(join(stateDir, "imgd.db"));
  try {
    fn(new Catalog(db));
  } finally {
    db.close();
  }
}

before(async () => {
  ({ helper, agent, client } = await harness.setUp());
});
after(() => harness.tearDown());

const pull = (image: string) => pullReady(client, image);

test("startup reconciliation repairs every kind of leak a crash or a person leaves, and logs each repair", async () => {
  const golang = await pull("golang");
  const { activation: kept } = await client.activateImage({ image: "golang" });
  const keptName = kept!.devicePath.replace("/dev/mapper/", "");
  const layer2 = agent.catalog.getDevice(golang.layers[1]!.chainId)!;
  await stop();

  // A thin id the catalog allocated and then lost the row of, active under a stray name; and
  // one it never allocated (someone else's), which no repair may touch.
  let lostId!: number;
  withStoppedCatalog((catalog) => {
    lostId = catalog.allocateActivation({ id: "01JLOSTAAAAAAAAAAAAAAAAAAA", image: "golang", chainId: golang.chainId, name: "imgd-act-01jlostaaaaaaaaaaaaaaaaaaa" }).thinId;
    catalog.db.prepare("DELETE FROM activations WHERE thin_id = ?").run(lostId);
    catalog.db.prepare("DELETE FROM thin_ids WHERE thin_id = ?").run(lostId);
  });
  helper.thins.set(lostId, { origin: null, layers: [], formatted: true });
  helper.active.set("imgd-act-00000000000000000000000009", lostId);
  helper.thins.set(9000, { origin: null, layers: [], formatted: true });
  // A layer device left active (and mounted) although it is ready.
  helper.active.set(layer2.name, layer2.thinId);
  // A device and an activation left "allocated" by a crash, with their thin ids made.
  const [halfChain] = chainIds(["sha256:" + "e".repeat(64)]);
  let half!: { thinId: number; name: string };
  let halfAct!: { thinId: number; name: string; id: string };
  withStoppedCatalog((catalog) => {
    half = catalog.allocateDevice({ chainId: halfChain!, parentChainId: null, layerDigest: "sha256:" + "e".repeat(64), name: layerDeviceName(halfChain!) });
    halfAct = catalog.allocateActivation({ id: "01JAAAAAAAAAAAAAAAAAAAAAAA", image: "golang", chainId: golang.chainId, name: "imgd-act-01jaaaaaaaaaaaaaaaaaaaaaaa" });
  });
  helper.thins.set(half.thinId, { origin: null, layers: [], formatted: true });
  helper.active.set(half.name, half.thinId);
  helper.thins.set(halfAct.thinId, { origin: golang.thinId, layers: [], formatted: true });
  // An active activation whose device vanished (a reboot removes every dm device).
  helper.active.delete(keptName);
  // A leftover download.
  writeFileSync(join(stateDir, "tmp", "leftover.part"), "half a layer");

  logs.length = 0;
  await start();
  assert.equal(helper.thins.has(lostId), false, "the lost id deleted");
  assert.equal(helper.thins.has(9000), true, "the foreign id kept");
  assert.equal(helper.active.has("imgd-act-00000000000000000000000009"), false, "its device removed first");
  assert.equal(helper.active.has(layer2.name), false, "stray layer device removed");
  assert.equal(helper.thins.has(layer2.thinId), true, "its thin id (a ready layer) is kept");
  assert.equal(helper.thins.has(half.thinId), false, "half-made device deleted");
  assert.equal(helper.active.has(half.name), false);
  assert.equal(agent.catalog.getDevice(halfChain!), undefined, "and its row");
  assert.equal(helper.thins.has(halfAct.thinId), false, "half-made activation deleted");
  assert.equal(agent.catalog.getActivation(halfAct.id), undefined);
  assert.equal(helper.active.get(keptName), kept!.thinId, "the lost activation device is active again");
  assert.equal(existsSync(join(stateDir, "tmp", "leftover.part")), false, "temp file removed");
  const repairs = logs.filter((l) => l.msg.startsWith("reconcile: repaired")).map((l) => l.msg.replace("reconcile: repaired ", ""));
  assert.deepEqual(repairs.map((r) => r.split(" ")[0]).sort(), [
    "HALF_MADE_ACTIVATION",
    "HALF_MADE_DEVICE",
    "MISSING_DEVICE",
    "STRAY_DEVICE",
    "STRAY_DEVICE",
    "STRAY_TEMP_FILE",
    "UNKNOWN_THIN_ID",
  ]);
  assert.ok(logs.some((l) => l.level === "error" && /1 thin id\(s\) this catalog never allocated \(9000\); nothing was deleted/.test(l.msg)));
  const report = await client.doctor({});
  assert.deepEqual(report.findings.map((f) => [FindingKind[f.kind], f.subject]), [["FOREIGN_THIN_ID", "thin id 9000"]]);
  helper.thins.delete(9000);
  assert.equal((await client.doctor({})).clean, true);
  assert.equal((await client.getImage({ image: "golang" })).image!.state, ImageState.READY);
  await client.deactivateImage({ activationId: kept!.id });
});

test("doctor shows the repair without doing it; repair=true drops a lost device and all above it, fails the images, a re-pull rebuilds", async () => {
  await pull("golang");
  const node = await pull("node");
  const layer4 = agent.catalog.getDevice(node.layers[3]!.chainId)!;
  const layer5 = agent.catalog.getDevice(node.layers[4]!.chainId)!;
  helper.thins.delete(layer4.thinId);

  const calls = helper.calls.length;
  const look = await client.doctor({});
  assert.deepEqual(look.findings.map((f) => [FindingKind[f.kind], f.subject, resultWord(f.result)]), [["MISSING_THIN_ID", layer4.name, ""]]);
  assert.match(look.findings[0]!.repair, /and the devices built on it, mark the images using them failed/);
  assert.deepEqual([...new Set(helper.calls.slice(calls).map((c) => c.op))].sort(), ["device.list", "pool.status", "thin.list"], "doctor without repair only reads");

  const fixed = await client.doctor({ repair: true });
  assert.deepEqual(fixed.findings.map((f) => [FindingKind[f.kind], resultWord(f.result)]), [["MISSING_THIN_ID", "repaired"]]);
  assert.equal(fixed.clean, true);
  assert.equal(agent.catalog.getDevice(layer4.chainId), undefined);
  assert.equal(agent.catalog.getDevice(layer5.chainId), undefined, "the device above it is dropped too");
  assert.equal(helper.thins.has(layer5.thinId), false, "and deleted from the pool");
  assert.ok(agent.catalog.getDevice(node.layers[2]!.chainId), "the shared layers below stay");
  const failed = (await client.getImage({ image: "node" })).image!;
  assert.equal(failed.state, ImageState.FAILED);
  assert.match(failed.error, new RegExp(`layer device ${layer4.name} .*vanished from the pool; pull the image again`));
  assert.equal((await client.getImage({ image: "golang" })).image!.state, ImageState.READY, "golang does not use them");

  const rebuilt = await pull("node");
  assert.deepEqual(helper.thins.get(rebuilt.thinId)!.layers, rebuilt.layers.map((l) => l.digest));
  assert.equal((await client.doctor({})).clean, true);
});

test("a lost device an activation still uses is not dropped: the repair says why", async () => {
  const golang = await pull("golang");
  const { activation } = await client.activateImage({ image: "golang" });
  const top = helper.thins.get(golang.thinId)!;
  helper.thins.delete(golang.thinId);
  try {
    const report = await client.doctor({ repair: true });
    const lost = report.findings.find((f) => f.kind === FindingKind.MISSING_THIN_ID)!;
    assert.equal(lost.result, RepairResult.SKIPPED);
    assert.match(lost.note, new RegExp(`activations ${activation!.id} use it: deactivate them first`));
    assert.equal(report.clean, false);
    assert.ok(agent.catalog.getDevice(golang.chainId), "kept");
  } finally {
    helper.thins.set(golang.thinId, top);
  }
  await client.deactivateImage({ activationId: activation!.id });
  assert.equal((await client.doctor({})).clean, true);
});

test("repair on demand beside a running pull leaves the pull's half-built device and its download alone", async () => {
  let open!: () => void;
  helper.holdApply(new Promise<void>((resolve) => (open = resolve)));
  const calls = helper.calls.length;
  const pulling = pull("python");
  while (!helper.calls.slice(calls).some((c) => c.op === "layer.apply")) await new Promise((r) => setTimeout(r, 10));
  writeFileSync(join(stateDir, "tmp", "maybe-a-download.part"), "x");
  const building = agent.catalog.listDevices().filter((d) => d.state === "allocated");
  assert.equal(building.length, 1, "python's layer 4 is being built");
  try {
    const report = await client.doctor({ repair: true });
    assert.deepEqual(report.findings, [], "nothing to repair while the pull owns its device and its temp dir");
    assert.ok(agent.catalog.getDevice(building[0]!.chainId), "the half-built device is kept");
    assert.ok(existsSync(join(stateDir, "tmp", "maybe-a-download.part")), "temp files are kept while a pull runs");
  } finally {
    helper.holdApply(undefined);
    open();
  }
  await pulling;
  const after = await client.doctor({ repair: true });
  assert.deepEqual(after.findings.map((f) => [FindingKind[f.kind], resultWord(f.result)]), [["STRAY_TEMP_FILE", "repaired"]]);
  assert.equal(existsSync(join(stateDir, "tmp", "maybe-a-download.part")), false);
  assert.equal(after.clean, true);
});

test("an activation whose snapshot vanished from the pool is forgotten (and its device removed)", async () => {
  await pull("golang");
  const { activation } = await client.activateImage({ image: "golang" });
  const name = activation!.devicePath.replace("/dev/mapper/", "");
  helper.thins.delete(activation!.thinId);
  const report = await client.doctor({ repair: true });
  assert.deepEqual(report.findings.map((f) => [FindingKind[f.kind], f.subject, resultWord(f.result)]), [["MISSING_THIN_ID", `activation ${activation!.id}`, "repaired"]]);
  assert.equal(report.clean, true);
  assert.equal(agent.catalog.getActivation(activation!.id), undefined);
  assert.equal(helper.active.has(name), false);
  assert.equal((await client.listActivations({ image: "golang" })).activations.length, 0);
});

test("an agent started on an empty database against a pool that holds devices deletes nothing, and says why", async () => {
  await pull("golang");
  const { activation } = await client.activateImage({ image: "golang" });
  const pool = new Map(helper.thins);
  const active = new Map(helper.active);
  assert.ok(pool.size >= 5);
  await stop();
  const mainStateDir = stateDir;
  const fresh = mkdtempSync(join(tmpdir(), "imgd-reconcile-fresh-"));
  const config = loadAgentConfig([], {
    IMGD_STATE_DIR: fresh,
    IMGD_LISTEN: "127.0.0.1:0",
    IMGD_LISTEN_INSECURE_LOOPBACK: "1",
    IMGD_HELPER_SOCKET: helper.socketPath,
    IMGD_S3_ENDPOINT: harness.s3.endpoint,
    IMGD_S3_BUCKET: harness.s3.bucket,
  });
  logs.length = 0;
  const stranger = await startAgent(config, (level, msg, fields) => void logs.push({ level, msg, fields }), { poolWaitAttempts: 1 });
  try {
    assert.deepEqual([...helper.thins.keys()].sort(), [...pool.keys()].sort(), "every thin id is still in the pool");
    assert.deepEqual([...helper.active.keys()].sort(), [...active.keys()].sort(), "and every device");
    assert.ok(!logs.some((l) => /reconcile: repaired/.test(l.msg)), "nothing was repaired");
    assert.ok(logs.some((l) => l.level === "error" && /thin id\(s\) this catalog never allocated \(.*\); nothing was deleted/.test(l.msg)), logs.map((l) => l.msg).join("\n"));
    const c = connectImgd(`127.0.0.1:${stranger.port}`);
    try {
      const report = await c.client.doctor({ repair: true });
      assert.equal(report.clean, false);
      assert.deepEqual([...new Set(report.findings.map((f) => FindingKind[f.kind]))], ["FOREIGN_THIN_ID"]);
      assert.ok(report.findings.every((f) => f.result === RepairResult.SKIPPED && /operator/.test(f.note)), JSON.stringify(report.findings));
      assert.equal(helper.thins.size, pool.size, "an on-demand repair deletes nothing either");
      // The operator keeps them: reserved, never handed out; this agent's own ids come after them.
      const adopted = await c.client.doctor({ adoptPool: true });
      assert.ok(adopted.findings.every((f) => f.kind === FindingKind.FOREIGN_THIN_ID && f.result === RepairResult.REPAIRED));
      assert.equal(adopted.clean, true);
      assert.equal((await c.client.doctor({})).clean, true, "not reported again");
      assert.deepEqual([...helper.thins.keys()].sort(), [...pool.keys()].sort(), "and still nothing deleted");
      assert.equal(stranger.catalog.allocateDevice({ chainId: "sha256:" + "9".repeat(64), parentChainId: null, layerDigest: "sha256:" + "9".repeat(64), name: "imgd-layer-x" }).thinId, Math.max(...pool.keys()) + 1);
    } finally {
      c.channel.close();
    }
  } finally {
    await stranger.stop();
  }
  assert.equal(stateDir, mainStateDir);
  await start();
  assert.equal((await client.doctor({})).clean, true, "the real catalog still accounts for all of it");
  await client.deactivateImage({ activationId: activation!.id });
});

test("the operator's decision: --wipe-pool deletes foreign ids (and their devices), --adopt-pool keeps them; both at once is refused", async () => {
  await pull("golang");
  const mine = new Map(helper.thins);
  helper.thins.set(7777, { origin: null, layers: [], formatted: true });
  helper.active.set("imgd-act-00000000000000000000007777", 7777);
  helper.thins.set(7778, { origin: null, layers: [], formatted: true });
  await assert.rejects(client.doctor({ adoptPool: true, wipePool: true }), /INVALID_ARGUMENT.*exclude each other/);
  const look = await client.doctor({});
  assert.deepEqual(look.findings.map((f) => [FindingKind[f.kind], f.subject]), [["FOREIGN_THIN_ID", "thin id 7777"], ["FOREIGN_THIN_ID", "thin id 7778"]], "the device mapping 7777 is part of that finding");
  const kept = 7778;
  helper.thins.delete(7778); // decide about 7777 alone first
  const wiped = await client.doctor({ wipePool: true });
  assert.deepEqual(wiped.findings.map((f) => [FindingKind[f.kind], resultWord(f.result)]), [["FOREIGN_THIN_ID", "repaired"]]);
  assert.equal(helper.thins.has(7777), false);
  assert.equal(helper.active.has("imgd-act-00000000000000000000007777"), false, "its device removed first");
  for (const id of mine.keys()) assert.ok(helper.thins.has(id), `the catalog's own id ${id} kept`);
  helper.thins.set(kept, { origin: null, layers: [], formatted: true });
  const adopted = await client.doctor({ adoptPool: true });
  assert.deepEqual(adopted.findings.map((f) => [FindingKind[f.kind], resultWord(f.result)]), [["FOREIGN_THIN_ID", "repaired"]]);
  assert.equal(helper.thins.has(kept), true);
  assert.equal((await client.doctor({ repair: true })).clean, true);
  assert.equal(helper.thins.has(kept), true, "an adopted id is never repaired away");
  helper.thins.delete(kept);
});
