// A helper restart is transparent to the agent: the client reconnects and re-issues idempotent
// operations; an operation that may have half-happened (layer.apply, fs.mkfs) fails as
// connectionLost, and the pull step rebuilds that device as an interruption, not a failed
// attempt. Real s3rver, real SQLite, real gRPC; the helper is the TEST DOUBLE
// (test/helpers/fake-helper.ts), restarted with the same pool as a supervisor would.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import Database from "better-sqlite3";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startAgent } from "../../agent/app.ts";
import { loadAgentConfig } from "../../agent/config.ts";
import { HelperClient, HelperError } from "../../agent/helper-client.ts";
import { connectImgd, ImageState, RunStatus } from "../../client/sdk.ts";
import { packTar } from "../fixtures/tar-bytes.ts";
import { startFakeHelper, type FakeHelper } from "../helpers/fake-helper.ts";
import { startS3rver, type TestS3 } from "../helpers/s3rver.ts";

const LIMIT = { timeout: 60_000 };
const NAME_901 = `imgd-layer-${"9".repeat(29)}901`;
const NAME_902 = `imgd-layer-${"9".repeat(29)}902`;
const stateDir = mkdtempSync(join(tmpdir(), "imgd-helper-restart-"));
let helper: FakeHelper;
let s3: TestS3;

before(async () => {
  helper = await startFakeHelper(join(stateDir, "blobs"));
  s3 = await startS3rver();
  for (let i = 1; i <= 4; i++) {
    await s3.put(`images/restarts/${i}.tar`, await packTar([{ header: { name: `layer${i}/file`, mode: 0o644 }, body: `layer ${i}\n` }]));
  }
});

after(async () => {
  await helper.close();
  await s3.close();
  rmSync(stateDir, { recursive: true, force: true });
});

test("a dropped connection re-issues an idempotent operation: thin.create takes effect once and succeeds", LIMIT, async (t) => {
  const client = new HelperClient(helper.socketPath, { reconnectWaitMs: 10_000 });
  t.after(() => client.close());
  const restarted = helper.restartDuring("thin.create");
  const before = helper.restarts;
  assert.deepEqual(await client.call("thin.create", { thinId: 900 }), {});
  await restarted;
  assert.equal(helper.restarts, before + 1, "the helper really restarted mid-call");
  assert.equal(helper.calls.filter((c) => c.op === "thin.create" && (c.args as { thinId: number }).thinId === 900).length, 2, "sent again");
  assert.deepEqual(helper.thins.get(900), { origin: null, layers: [], formatted: false });
  await client.call("thin.delete", { thinId: 900 });
});

test("a dropped layer.apply is not re-issued: it fails as connectionLost (its effect is unknown)", LIMIT, async (t) => {
  const client = new HelperClient(helper.socketPath, { reconnectWaitMs: 10_000 });
  t.after(() => client.close());
  await client.call("thin.create", { thinId: 901 });
  await client.call("device.activate", { name: NAME_901, thinId: 901 });
  await client.call("fs.mkfs", { name: NAME_901 });
  const applies = () => helper.calls.filter((c) => c.op === "layer.apply").length;
  const before = applies();
  const restarted = helper.restartDuring("layer.apply");
  const digest = `sha256:${"0".repeat(64)}`;
  await assert.rejects(client.call("layer.apply", { name: NAME_901, digest }), (err: unknown) => err instanceof HelperError && err.connectionLost);
  await restarted;
  assert.equal(applies(), before + 1, "sent once");
  await client.call("device.deactivate", { name: NAME_901 });
  await client.call("thin.delete", { thinId: 901 });
});

test("the abort signal ends a call waiting for a helper that is down", LIMIT, async (t) => {
  const client = new HelperClient(join(stateDir, "nothing.sock"), { reconnectWaitMs: 60_000 });
  t.after(() => client.close());
  const controller = new AbortController();
  const started = Date.now();
  setTimeout(() => controller.abort(new Error("agent stopping")), 300);
  await assert.rejects(client.call("pool.status", {}, { signal: controller.signal }), /agent stopping/);
  assert.ok(Date.now() - started < 5000, "did not wait for the reconnect deadline");
});

test("the abort signal ends a call the helper is still working on", LIMIT, async (t) => {
  const client = new HelperClient(helper.socketPath);
  t.after(() => client.close());
  await client.call("thin.create", { thinId: 902 });
  await client.call("device.activate", { name: NAME_902, thinId: 902 });
  await client.call("fs.mkfs", { name: NAME_902 });
  const digest = `sha256:${"1".repeat(64)}`;
  mkdirSync(join(stateDir, "blobs", "sha256"), { recursive: true });
  writeFileSync(join(stateDir, "blobs", "sha256", "1".repeat(64)), "a blob");
  let open!: () => void;
  helper.holdApply(new Promise<void>((r) => (open = r)));
  t.after(() => helper.holdApply(undefined));
  const controller = new AbortController();
  setTimeout(() => controller.abort(new Error("agent stopping")), 200);
  await assert.rejects(client.call("layer.apply", { name: NAME_902, digest }, { signal: controller.signal }), /agent stopping/);
  open();
  await client.call("device.deactivate", { name: NAME_902 });
  await client.call("thin.delete", { thinId: 902 });
  rmSync(join(stateDir, "blobs", "sha256", "1".repeat(64)));
});

test("five helper restarts while a pull builds its devices: the pull succeeds, no failed attempt, the half-applied device is rebuilt", LIMIT, async (t) => {
  const config = loadAgentConfig([], {
    IMGD_STATE_DIR: stateDir,
    IMGD_LISTEN: "127.0.0.1:0",
    IMGD_LISTEN_INSECURE_LOOPBACK: "1",
    IMGD_HELPER_SOCKET: helper.socketPath,
    IMGD_S3_ENDPOINT: s3.endpoint,
    IMGD_S3_BUCKET: s3.bucket,
  });
  const agent = await startAgent(config, () => {}, { poolWaitAttempts: 1 });
  const { client, channel } = connectImgd(`127.0.0.1:${agent.port}`);
  t.after(async () => {
    channel.close();
    await agent.stop();
  });
  // Across the device builds: two re-issued operations, a mkfs and two layer.apply cut mid-way.
  const restarts = ["thin.create", "fs.mkfs", "thin.snapshot", "layer.apply", "layer.apply"] as const;
  const before = helper.restarts;
  const restarted = Promise.all(restarts.map((op) => helper.restartDuring(op, 200)));

  let last;
  for await (const update of client.pullImage({ image: "restarts" })) last = update;
  assert.equal(last!.status, RunStatus.SUCCEEDED);
  await restarted;
  assert.equal(helper.restarts - before, 5);

  const { image } = await client.getImage({ image: "restarts" });
  assert.equal(image!.state, ImageState.READY);
  // No partial apply survives: the device holds exactly the four layers, in order.
  assert.deepEqual(helper.thins.get(image!.thinId)!.layers, image!.layers.map((l) => l.digest));
  for (const thin of helper.thins.values()) assert.ok(!thin.layers.some((l) => l.startsWith("partial:")), "no half-applied device is left");

  const db = new Database(join(stateDir, "imgd.db"), { readonly: true });
  t.after(() => db.close());
  const run = db.prepare("SELECT status, attempt, interruptions, error FROM fsm_runs WHERE fsm = 'pull' AND resource_id = 'restarts'").get() as Record<string, unknown>;
  assert.deepEqual(run, { status: "succeeded", attempt: 0, interruptions: 3, error: null }, "only mkfs and the two applies interrupted the step");
});
