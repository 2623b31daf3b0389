// The pool's identity on the agent's side (agent/pool-identity.ts, doctor.ts, reconcile.ts,
// grpc/pool-guard.ts), on the host: real s3rver, real SQLite, real gRPC; the root helper is the
// TEST DOUBLE of test/helpers/fake-helper.ts, whose pool identity a test changes to stand for
// another pool (the real helper's identity is test/unit/privhelper-pool-identity.test.ts's).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startAgent } from "../../agent/app.ts";
import type { HelperClient } from "../../agent/helper-client.ts";
import { DownloadGate } from "../../agent/images/download-gate.ts";
import { KeyedLock } from "../../agent/keyed-lock.ts";
import { reconcile } from "../../agent/reconcile.ts";
import { Catalog } from "../../agent/catalog.ts";
import { loadAgentConfig } from "../../agent/config.ts";
import { openDatabase } from "../../agent/db.ts";
import { connectImgd, FindingKind, ImageState, ImgdError, RepairResult, RunKind, RunStatus, type ImgdClient } from "../../client/sdk.ts";
import type { OpName } from "../../privhelper/protocol.ts";
import { pullOutcome, pullReady } from "../helpers/pull.ts";
import { TestAgent } from "../helpers/test-agent.ts";

/** Doctor's answer with kinds and results by name ("POOL_MISMATCH", "repaired"; "" when not repaired). */
async function doctorNamed(c: ImgdClient, request: { repair?: boolean; adoptPool?: boolean; wipePool?: boolean }) {
  const report = await c.doctor(request);
  const findings = report.findings.map((f) => ({
    ...f,
    kind: FindingKind[f.kind],
    result: f.result === RepairResult.UNSPECIFIED ? "" : RepairResult[f.result].toLowerCase(),
  }));
  return { ...report, findings };
}

const logs: { level: string; msg: string; fields?: Record<string, unknown> }[] = [];
const harness = new TestAgent({
  name: "poolid",
  log: (level, msg, fields) => void logs.push({ level, msg, fields }),
  // Short, so stopping the agent during a held layer.apply leaves the pull unfinished quickly.
  env: { IMGD_FSM_STOP_TIMEOUT_MS: "200" },
  images: {
    golang: [{ "go/bin/go": "go\n" }, { "go/version": "1.23\n" }],
    node: [{ "node/bin/node": "node\n" }, { "node/version": "22\n" }],
    python: [{ "python/version": "3.11\n" }],
  },
});

before(() => harness.setUp());
after(() => harness.tearDown());

const READ_OPS = new Set<OpName>(["pool.status", "pool.ensure", "thin.list", "device.list"]);
/** Helper operations since call number `from` that change the pool or its devices. */
const changesSince = (from: number) => harness.helper.calls.slice(from).filter((c) => !READ_OPS.has(c.op)).map((c) => c.op);
const newPoolId = () => randomBytes(16).toString("hex");
const until = async (what: string, check: () => boolean) => {
  for (let i = 0; i < 200 && !check(); i++) await new Promise((resolve) => setTimeout(resolve, 25));
  assert.ok(check(), what);
};

/** Changes the catalog while the agent is stopped, as an administrator would. */
function withStoppedCatalog(fn: (catalog: Catalog) => void): void {
  const db = openDatabase(join(harness.stateDir, "imgd.db"));
  try {
    fn(new Catalog(db));
  } finally {
    db.close();
  }
}

test("the catalog records the pool it first uses, with its name", async () => {
  const recorded = harness.agent.catalog.poolIdentity();
  assert.equal(recorded?.id, harness.helper.poolId);
  assert.equal(recorded?.name, "fake-pool");
});

test("a database that describes another pool repairs nothing, refuses every mutating RPC and keeps runs waiting; doctor says POOL_MISMATCH; --adopt-pool recovers", async () => {
  const { helper } = harness;
  await pullReady(harness.client, "golang");
  const { activation } = await harness.client.activateImage({ image: "golang" });
  const actName = activation!.devicePath.replace("/dev/mapper/", "");

  // A pull of node held inside layer.apply, then the agent stops: the run stays unfinished.
  let open!: () => void;
  helper.holdApply(new Promise<void>((resolve) => (open = resolve)));
  const applies = helper.calls.filter((c) => c.op === "layer.apply").length;
  const held = pullOutcome(harness.client, "node");
  await until("the node pull reached layer.apply", () => helper.calls.filter((c) => c.op === "layer.apply").length > applies);
  await harness.stop();
  await held;
  helper.holdApply(undefined);
  open();

  // The database now describes another pool (restored from another host, or this pool was
  // recreated under it), and this pool holds what a repair would "fix": the activation's device
  // is gone (MISSING_DEVICE: re-activate), an unknown device is live (STRAY_DEVICE: remove).
  const recordedId = helper.poolId!;
  helper.poolId = newPoolId();
  helper.active.delete(actName);
  const stray = "imgd-act-0000000000000000000000stry";
  helper.active.set(stray, activation!.thinId);
  const thinsBefore = [...helper.thins.keys()].sort();
  const from = helper.calls.length;
  logs.length = 0;
  await harness.start();
  const { client, agent } = harness;

  assert.deepEqual(changesSince(from), [], "nothing in the pool was changed at start");
  assert.ok(!logs.some((l) => /reconcile: repaired/.test(l.msg)), "nothing was repaired: " + logs.map((l) => l.msg + JSON.stringify(l.fields)).join("\n"));
  assert.ok(logs.some((l) => l.level === "error" && /is not the pool this database describes/.test(l.msg) && l.msg.includes(helper.poolId!) && l.msg.includes(recordedId)), logs.map((l) => l.msg).join("\n"));
  const nodeRun = () => client.listRuns({ fsm: RunKind.PULL, resourceId: "node" }).then((r) => r.runs[0]);
  assert.equal((await nodeRun())?.status, RunStatus.RUNNING, "the unfinished pull waits");
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.deepEqual(changesSince(from), [], "and does not resume on its own");

  // Reads are served; every RPC that would change the pool is refused, saying what to do.
  assert.equal((await client.getImage({ image: "golang" })).image!.state, ImageState.READY);
  assert.deepEqual((await client.listActivations({})).activations.map((a) => a.id), [activation!.id]);
  assert.equal((await client.getPool({})).name, "fake-pool");
  const refused = /FAILED_PRECONDITION.*is not the pool this database describes.*--adopt-pool.*--wipe-pool/s;
  await assert.rejects(pullOutcome(client, "python").then((o) => (o.ok ? undefined : Promise.reject(new Error(o.error)))), refused);
  await assert.rejects(client.activateImage({ image: "golang" }), refused);
  await assert.rejects(client.deactivateImage({ activationId: activation!.id }), refused);
  await assert.rejects(client.deleteImage({ image: "golang", force: true }), refused);
  await assert.rejects(client.collectGarbage({}), refused);
  await assert.rejects(client.activateImage({ image: "golang" }), (err: unknown) => err instanceof ImgdError && err.reason === "POOL_MISMATCH");

  const look = await doctorNamed(client, {});
  assert.equal(look.findings[0]?.kind, "POOL_MISMATCH");
  assert.match(look.findings[0]!.detail, new RegExp(`identity ${helper.poolId}.*identity ${recordedId}`));
  assert.deepEqual(look.findings.slice(1).map((f) => f.kind).sort(), ["MISSING_DEVICE", "STRAY_DEVICE"], "what a decision would lead to is shown");
  const repair = await doctorNamed(client, { repair: true });
  assert.ok(repair.findings.length >= 3 && repair.findings.every((f) => f.result === "skipped" && /refused/.test(f.note)), JSON.stringify(repair.findings));
  assert.deepEqual(changesSince(from), [], "an on-demand repair changes nothing either");
  assert.deepEqual([...helper.thins.keys()].sort(), thinsBefore);
  assert.equal(agent.catalog.poolIdentity()?.id, recordedId, "the catalog still names its own pool");

  // The operator knows this pool holds what the database describes: adopt it.
  const adopted = await doctorNamed(client, { adoptPool: true });
  assert.deepEqual(
    adopted.findings.map((f) => [f.kind, f.result]).sort(),
    [["MISSING_DEVICE", "repaired"], ["POOL_MISMATCH", "repaired"], ["STRAY_DEVICE", "repaired"]],
    JSON.stringify(adopted.findings),
  );
  assert.equal(agent.catalog.poolIdentity()?.id, helper.poolId);
  assert.equal(helper.active.get(actName), activation!.thinId, "the activation is active again");
  assert.equal(helper.active.has(stray), false);
  await pullReady(client, "node"); // joins the resumed run
  assert.equal((await nodeRun())?.status, RunStatus.SUCCEEDED);
  await pullReady(client, "python");
  await client.deactivateImage({ activationId: activation!.id });
  assert.equal((await client.doctor({})).clean, true);
});

test("a catalog without an identity (older agent) takes the pool silently when it knows every thin id; a pool without one (older helper) gets one", async () => {
  const { helper } = harness;
  assert.ok(helper.thins.size > 0);
  await harness.stop();
  withStoppedCatalog((catalog) => catalog.db.prepare("DELETE FROM pool_identity").run());
  helper.poolId = null; // and the pool was made by an older helper: pool.ensure gives it one
  logs.length = 0;
  await harness.start();
  assert.match(helper.poolId ?? "", /^[0-9a-f]{32}$/);
  assert.equal(harness.agent.catalog.poolIdentity()?.id, helper.poolId);
  assert.ok(!logs.some((l) => l.level === "error"), logs.filter((l) => l.level === "error").map((l) => l.msg).join("\n"));
  assert.equal((await harness.client.doctor({})).clean, true);
  await pullReady(harness.client, "golang");
});

test("a fresh catalog on a pool holding ids it never allocated does not take the pool, and says it has never seen it; --wipe-pool takes it", async () => {
  const { helper } = harness;
  await pullReady(harness.client, "golang");
  await harness.stop();
  const config = loadAgentConfig([], {
    IMGD_STATE_DIR: mkdtempSync(join(tmpdir(), "imgd-poolid-fresh-")),
    IMGD_LISTEN: "127.0.0.1:0",
    IMGD_LISTEN_INSECURE_LOOPBACK: "1",
    IMGD_HELPER_SOCKET: helper.socketPath,
    IMGD_S3_ENDPOINT: harness.s3.endpoint,
    IMGD_S3_BUCKET: harness.s3.bucket,
  });
  const thins = new Map(helper.thins);
  const stranger = await startAgent(config, () => {}, { poolWaitAttempts: 1 });
  const c = connectImgd(`127.0.0.1:${stranger.port}`);
  try {
    assert.equal(stranger.catalog.poolIdentity(), undefined, "not recorded: the pool holds what this catalog cannot account for");
    const look = await doctorNamed(c.client, {});
    assert.ok(look.findings.length > 0 && look.findings.every((f) => f.kind === "FOREIGN_THIN_ID"));
    assert.ok(look.findings.every((f) => f.detail.includes(`this catalog has never seen this pool (fake-pool, identity ${helper.poolId})`)), look.findings[0]?.detail);
    assert.deepEqual([...helper.thins.keys()], [...thins.keys()]);
    const wiped = await doctorNamed(c.client, { wipePool: true });
    assert.ok(wiped.findings.every((f) => f.kind === "FOREIGN_THIN_ID" && f.result === "repaired"), JSON.stringify(wiped.findings));
    assert.equal(stranger.catalog.poolIdentity()?.id, helper.poolId, "the operator's decision takes the pool");
    for (const id of thins.keys()) assert.equal(helper.thins.has(id), false, `foreign id ${id} wiped`);
  } finally {
    c.channel.close();
    await stranger.stop();
  }
  // The wipe emptied the first catalog's devices from this pool: its own agent now finds them
  // missing (the same pool, so the usual repairs apply: it re-pulls what it lost).
  await harness.start();
  assert.equal(harness.agent.catalog.poolIdentity()?.id, helper.poolId);
});

test("a decision about a pool that was replaced again since doctor looked takes nothing and repairs nothing", async () => {
  // reconcile() alone on a real catalog; the helper's reads are stubbed, its pool identity
  // changes between doctor's look and the repair's re-check.
  const catalog = new Catalog(openDatabase(":memory:"));
  catalog.recordPoolIdentity("a".repeat(32), "imgd-pool");
  const chain = "sha256:" + "1".repeat(64);
  const device = catalog.allocateDevice({ chainId: chain, parentChainId: null, layerDigest: chain, name: "imgd-layer-" + "1".repeat(32) });
  catalog.markDeviceReady(chain);
  const ids = ["b".repeat(32), "c".repeat(32)];
  const changes: string[] = [];
  const helper = {
    call: async (op: string) => {
      if (op === "pool.status") return { name: "imgd-pool", id: ids.length > 1 ? ids.shift() : ids[0] };
      if (op === "thin.list") return { thinIds: [] }; // the device's thin id is missing: MISSING_THIN_ID
      if (op === "device.list") return { devices: [] };
      changes.push(op);
      return {};
    },
  } as unknown as HelperClient;
  const fsm = { list: () => [] as never };
  const { outcomes } = await reconcile({ catalog, helper, pull: fsm, activate: fsm, deactivate: fsm, locks: new KeyedLock(), downloads: new DownloadGate(), log: () => {}, foreign: "adopt" });
  assert.deepEqual(outcomes.map((o) => [o.finding.kind, o.result]), [["POOL_MISMATCH", "skipped"], ["MISSING_THIN_ID", "skipped"]]);
  assert.match(outcomes[0]!.note, /identity changed since doctor looked/);
  assert.match(outcomes[1]!.note, /describes another pool/);
  assert.equal(catalog.poolIdentity()?.id, "a".repeat(32));
  assert.equal(catalog.getDevice(chain)?.thinId, device.thinId, "the device row is not forgotten");
  assert.deepEqual(changes, []);
});
