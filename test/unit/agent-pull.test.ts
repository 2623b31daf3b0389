// The agent on the host: real s3rver over HTTP (behind a recording proxy), real SQLite, real
// gRPC client; the root helper is a TEST DOUBLE (test/helpers/fake-helper.ts), because this
// kernel has no device-mapper. The VM end-to-end tests cover the real helper and pool.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import Database from "better-sqlite3";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { startAgent, type RunningAgent } from "../../agent/app.ts";
import { loadAgentConfig } from "../../agent/config.ts";
import { FindingKind, RunKind, RunStatus, ImageState, type ImgdClient } from "../../client/sdk.ts";
import { type FakeHelper } from "../helpers/fake-helper.ts";
import { pullUpdates } from "../helpers/pull.ts";
import { TestAgent, tarOf } from "../helpers/test-agent.ts";
import { fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { createChannel, createClient } from "nice-grpc";
import { HealthDefinition } from "nice-grpc-server-health";
import { reflectionAsker } from "../helpers/reflection.ts";
import { isObjectGet, type RecordedRequest, type TamperProxy, type TestS3 } from "../helpers/s3rver.ts";

let s3: TestS3;
let proxy: TamperProxy;
let helper: FakeHelper;
let agent: RunningAgent;
let client: ImgdClient;
const silent = () => {};

const shared = [1, 2, 3].map((n) => ({ [`layer${n}/file`]: `shared layer ${n}\n` }));
const harness = new TestAgent({
  name: "agent",
  proxy: true,
  env: {
    // Small bounds, so the S3 and concurrency cases at the end of this file can show them.
    IMGD_DOWNLOAD_CONCURRENCY: "2",
    IMGD_APPLY_CONCURRENCY: "1",
    IMGD_S3_MAX_LAYERS: "50",
    IMGD_DOWNLOAD_BACKOFF_MS: "1",
    IMGD_DOWNLOAD_BACKOFF_MAX_MS: "5",
    IMGD_S3_IDLE_TIMEOUT_MS: "1000",
  },
  images: {
    golang: [...shared, { "go/bin/go": "go\n" }, { "go/version": "1.23\n" }],
    node: [...shared, { "node/bin/node": "node\n" }, { "node/version": "22\n" }],
    python: [...shared, { "node/bin/node": "node\n" }, { "python/version": "3.11\n" }],
  },
});
const stateDir = harness.stateDir;

async function start(): Promise<void> {
  await harness.start();
  ({ agent, client } = harness);
}
const stop = () => harness.stop();

before(async () => {
  ({ s3, proxy, helper, agent, client } = await harness.setUp());
  await s3.put("images/broken/1.tar", "this is not a tar archive, whatever its name says");
});
after(() => harness.tearDown());

const pull = (image: string) => pullUpdates(client, image);

/** Object downloads seen by S3 (listings are GETs too, with list-type in the query). */
const objectGets = () => proxy.requests.filter((r) => r.method === "GET" && !r.url.includes("list-type")).map((r) => r.url.split("?")[0]);
const blobCount = () => readdirSync(join(stateDir, "blobs/sha256")).length;

test("pull builds a chain of devices holding the layers in order", async () => {
  const last = (await pull("golang")).at(-1)!;
  assert.equal(last.status, RunStatus.SUCCEEDED);
  const { image } = await client.getImage({ image: "golang" });
  assert.equal(image!.state, ImageState.READY);
  assert.deepEqual(helper.thins.get(image!.thinId)!.layers, image!.layers.map((l) => l.digest));
  assert.equal(helper.active.size, 0, "layer devices are deactivated once built");
  assert.equal(blobCount(), 5);
});

test("a second image downloads and builds only what it does not share", async () => {
  const gets = objectGets().length;
  const thins = helper.thins.size;
  const last = (await pull("node")).at(-1)!;
  assert.equal(last.status, RunStatus.SUCCEEDED);
  assert.deepEqual(objectGets().slice(gets).sort(), ["/imgd-test/images/node/4.tar", "/imgd-test/images/node/5.tar"]);
  assert.equal(helper.thins.size, thins + 2);
  assert.equal(blobCount(), 7);
});

test("re-pulling a ready image starts no run and touches neither S3 nor the helper", async () => {
  const [requests, calls] = [proxy.requests.length, helper.calls.length];
  const updates = await pull("golang");
  assert.equal(updates.length, 1);
  assert.equal(updates[0].runId, "");
  assert.equal(updates[0].status, RunStatus.SUCCEEDED);
  assert.equal(proxy.requests.length, requests);
  assert.equal(helper.calls.length, calls);
});

test("ten concurrent pulls of one image share one run and do each step once", async () => {
  let open!: () => void;
  helper.holdApply(new Promise<void>((resolve) => (open = resolve)));
  const gets = objectGets().length;
  const pulls = Array.from({ length: 10 }, () => pull("python"));
  await new Promise((resolve) => setTimeout(resolve, 300));
  helper.holdApply(undefined);
  open();
  const results = await Promise.all(pulls);
  const runIds = new Set(results.map((u) => u.at(-1)!.runId));
  assert.equal(runIds.size, 1, "all callers followed the same run");
  assert.ok(results.every((u) => u.at(-1)!.status === RunStatus.SUCCEEDED));
  assert.equal(results.filter((u) => u.some((x) => x.joined)).length, 9);
  assert.deepEqual(objectGets().slice(gets), ["/imgd-test/images/python/5.tar"], "python shares node's layer 4 bytes: only 5 is fetched");
});

test("a layer that is not a tar is refused with the image, key, size, ETag and rule; nothing is left behind", async () => {
  const thins = helper.thins.size;
  const updates = await pull("broken").then(
    () => assert.fail("the pull should fail"),
    (err: Error) => err,
  );
  assert.match(updates.message, /image broken: layer images\/broken\/1\.tar \(49 bytes, ETag "[0-9a-f]{32}"\) refused: entry \(archive\): NOT_A_TAR: object is 49 bytes, shorter than one tar header/);
  const { image } = await client.getImage({ image: "broken" });
  assert.equal(image!.state, ImageState.FAILED);
  assert.match(image!.error, /NOT_A_TAR/);
  assert.equal(helper.thins.size, thins, "no device was made");
  assert.equal(blobCount(), 8, "the refused blob is not kept");
  // The publisher fixes the object: the next pull works.
  await s3.put("images/broken/1.tar", await tarOf({ fixed: "yes\n" }));
  assert.equal((await pull("broken")).at(-1)!.status, RunStatus.SUCCEEDED);
});

test("a transient helper failure during apply is retried; the half-made device is discarded", async () => {
  await s3.put("images/retry/1.tar", await tarOf({ a: "1\n" }));
  helper.failNext("layer.apply", "COMMAND_FAILED", "mount: transient");
  const last = (await pull("retry")).at(-1)!;
  assert.equal(last.status, RunStatus.SUCCEEDED);
  const { image } = await client.getImage({ image: "retry" });
  const orphans = [...helper.thins.keys()].filter((id) => !agent.catalog.listDevices().some((d) => d.thinId === id) && !agent.catalog.listActivations().some((a) => a.thinId === id));
  assert.deepEqual(orphans, [], "every thin id in the pool is known to the catalog");
  assert.equal(helper.thins.get(image!.thinId)!.layers.length, 1);
});

test("a layer the applier refuses ends the run at once (never retried), naming the entry and the rule", async () => {
  await s3.put("images/loop/1.tar", await tarOf({ loop: "a layer no other test has\n" }));
  const refusal = `a parent of "root/.ssh/x" is not a directory (entry "root/.ssh/x", rule PARENT_NOT_DIR)`;
  helper.failNext("layer.apply", "LAYER_REFUSED", refusal);
  const applies = helper.calls.filter((c) => c.op === "layer.apply").length;
  const failure = await pull("loop").then(() => assert.fail("the pull should fail"), (err: Error) => err);
  assert.match(failure.message, /rule PARENT_NOT_DIR/);
  const { runs } = await client.listRuns({ fsm: RunKind.PULL, resourceId: "loop", pageSize: 1 });
  assert.equal(runs[0]!.status, RunStatus.FAILED);
  assert.equal(runs[0]!.attempts, 1, runs[0]!.error);
  assert.equal(helper.calls.filter((c) => c.op === "layer.apply").length, applies + 1, "one apply, no retry");
  assert.match(runs[0]!.error, /image loop: layer images\/loop\/1\.tar \(sha256:[0-9a-f]{64}\) refused: LAYER_REFUSED: .*rule PARENT_NOT_DIR\)/);
});

test("activations are independent snapshots of the image's device", async () => {
  const { activation: a } = await client.activateImage({ image: "golang" });
  const { activation: b } = await client.activateImage({ image: "golang" });
  const { image } = await client.getImage({ image: "golang" });
  assert.notEqual(a!.thinId, b!.thinId);
  for (const x of [a!, b!]) {
    assert.equal(helper.thins.get(x.thinId)!.origin, image!.thinId);
    assert.equal(helper.active.get(x.devicePath.replace("/dev/mapper/", "")), x.thinId);
  }
  const { activations } = await client.listActivations({ image: "golang" });
  assert.deepEqual(activations.map((x) => x.id).sort(), [a!.id, b!.id].sort());
});

test("activating an image that was never pulled pulls it first", async () => {
  await s3.put("images/fresh/1.tar", await tarOf({ f: "1\n" }));
  const { activation } = await client.activateImage({ image: "fresh" });
  assert.equal((await client.getImage({ image: "fresh" })).image!.state, ImageState.READY);
  assert.match(activation!.devicePath, /^\/dev\/mapper\/imgd-act-/);
});

test("a failed activation leaves no snapshot and no row", async () => {
  const before = { thins: helper.thins.size, rows: agent.catalog.listActivations().length };
  helper.failNext("device.activate", "BAD_ARGS", "injected refusal");
  await assert.rejects(client.activateImage({ image: "golang" }), /activation of golang failed: .*BAD_ARGS: injected refusal/);
  assert.equal(helper.thins.size, before.thins);
  assert.equal(agent.catalog.listActivations().length, before.rows);
});

test("bad names are refused before anything runs", async () => {
  for (const bad of ["", "../etc", "Golang", "a/b", "-rf", "x".repeat(200)]) {
    await assert.rejects(client.getImage({ image: bad }), /INVALID_ARGUMENT|image name/i, bad);
    await assert.rejects(pull(bad), /INVALID_ARGUMENT|image name/i, bad);
  }
  await assert.rejects(client.getImage({ image: "never" }), /not known/);
  await assert.rejects(pull("never"), /never/);
});

test("a second agent on the same state directory is refused", async () => {
  const config = loadAgentConfig([], { IMGD_STATE_DIR: stateDir, IMGD_LISTEN: "127.0.0.1:0", IMGD_LISTEN_INSECURE_LOOPBACK: "1", IMGD_HELPER_SOCKET: helper.socketPath, IMGD_S3_ENDPOINT: proxy.endpoint, IMGD_S3_BUCKET: s3.bucket });
  await assert.rejects(startAgent(config, silent, { poolWaitAttempts: 1 }), /another imgd is running on .*imgd\.lock is locked/);
});

test("after a restart the agent answers from SQLite and still knows every device", async () => {
  const before = (await client.listImages({})).images.map((i) => [i.name, i.state, i.thinId]);
  await stop();
  await start();
  assert.deepEqual((await client.listImages({})).images.map((i) => [i.name, i.state, i.thinId]), before);
  const requests = proxy.requests.length;
  assert.equal((await pull("node")).length, 1);
  assert.equal(proxy.requests.length, requests);
  const runs = (await client.listRuns({ fsm: RunKind.PULL })).runs;
  assert.ok(runs.some((r) => r.resourceId === "broken" && r.status === RunStatus.FAILED && /NOT_A_TAR/.test(r.error)), "failed outcomes are durable");
});

test("a pull finalizer run again after a crash does not overwrite a newer pull's outcome; a name S3 lacks leaves no image row", async () => {
  assert.equal((await client.getImage({ image: "golang" })).image!.state, ImageState.READY);
  await stop();
  // An older pull of golang that failed, and whose finalizer the crash cut short: the next
  // start runs it again, after a newer pull made golang ready.
  const db = new Database(join(stateDir, "imgd.db"));
  db.prepare(
    `INSERT INTO fsm_runs (id, fsm, resource_id, status, steps, step_index, request, state, error, attempt, in_attempt, started_at, updated_at, finished_at, finalized_at)
     SELECT '00000000000000000000000001', fsm, resource_id, 'failed', steps, 1, request, state, 'an old failure', 0, 0, started_at, updated_at, updated_at, NULL
     FROM fsm_runs WHERE fsm = 'pull' AND resource_id = 'golang' AND status = 'succeeded' ORDER BY id DESC LIMIT 1`,
  ).run();
  db.close();
  await start();
  const { image } = await client.getImage({ image: "golang" });
  assert.equal(image!.state, ImageState.READY, image!.error);
  await assert.rejects(pull("no-such-image"), /no-such-image/);
  await assert.rejects(client.getImage({ image: "no-such-image" }), /NOT_FOUND/);
});

test("server reflection lists and describes the API, as grpcurl asks; health reports SERVING", async () => {
  const channel = createChannel(`127.0.0.1:${agent.port}`);
  try {
    const ask = reflectionAsker(channel);
    const listed = await ask((r) => r.setListServices(""));
    assert.deepEqual(listed.getListServicesResponse()!.getServiceList().map((s) => s.getName()), ["imgd.v1.ImageService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]);
    const described = await ask((r) => r.setFileContainingSymbol("imgd.v1.ImageService"));
    const [file] = described.getFileDescriptorResponse()!.getFileDescriptorProtoList_asU8().map((bytes) => fromBinary(FileDescriptorProtoSchema, bytes));
    assert.deepEqual(file.service[0].method.map((m) => m.name), ["PullImage", "GetImage", "ListImages", "ActivateImage", "DeactivateImage", "ListActivations", "GetPool", "ListRuns", "Doctor", "DeleteImage", "CollectGarbage", "GetVersion"]);
    const health = createClient(HealthDefinition, channel);
    assert.equal((await health.check({ service: "imgd.v1.ImageService" })).status, 1 /* SERVING */);
  } finally {
    channel.close();
  }
});

test("deactivation removes the device and the snapshot, and only those", async () => {
  const { activation: keep } = await client.activateImage({ image: "node" });
  const { activation: drop } = await client.activateImage({ image: "node" });
  const dropName = drop!.devicePath.replace("/dev/mapper/", "");
  const { activation } = await client.deactivateImage({ activationId: drop!.id });
  assert.equal(activation!.id, drop!.id);
  assert.equal(helper.active.has(dropName), false, "device removed");
  assert.equal(helper.thins.has(drop!.thinId), false, "snapshot deleted");
  assert.equal(agent.catalog.getActivation(drop!.id), undefined, "row gone");
  assert.equal(helper.active.get(keep!.devicePath.replace("/dev/mapper/", "")), keep!.thinId, "the other activation is untouched");
  assert.equal((await client.getImage({ image: "node" })).image!.state, ImageState.READY);
  await assert.rejects(client.deactivateImage({ activationId: drop!.id }), /NOT_FOUND|not known/);
  await assert.rejects(client.deactivateImage({ activationId: "../../etc" }), /INVALID_ARGUMENT|activation id/);
  await assert.rejects(client.deactivateImage({ activationId: "" }), /INVALID_ARGUMENT|activation id/);
  const runs = (await client.listRuns({ fsm: RunKind.DEACTIVATE, resourceId: drop!.id })).runs;
  assert.deepEqual(runs.map((r) => r.status), [RunStatus.SUCCEEDED]);
});

test("a deactivation that fails on a transient helper error is retried to the end", async () => {
  const { activation } = await client.activateImage({ image: "golang" });
  helper.failNext("thin.delete", "BUSY", "injected busy");
  await client.deactivateImage({ activationId: activation!.id });
  assert.equal(helper.thins.has(activation!.thinId), false);
  assert.equal(agent.catalog.getActivation(activation!.id), undefined);
});

test("doctor: clean after all of the above; then reports exactly a planted unknown id, a stray device and a lost id", async () => {
  // Asynchronous: the agent answering imgctl runs in this very process.
  const imgctlDoctor = (...flags: string[]) =>
    new Promise<{ status: number; stdout: string; stderr: string }>((resolve) => {
      const args = [join(import.meta.dirname, "../../client/imgctl.ts"), "--addr", `127.0.0.1:${agent.port}`, ...flags, "doctor"];
      execFile(process.execPath, args, { encoding: "utf8" }, (err, stdout, stderr) => resolve({ status: err ? Number(err.code) : 0, stdout, stderr }));
    });
  const clean = await client.doctor({});
  assert.deepEqual(clean.findings, [], "the earlier tests (failures, retries, deactivations) left nothing behind");
  assert.equal(clean.clean, true);
  assert.equal(clean.poolThinIds, helper.thins.size);
  assert.equal(clean.catalogThinIds, helper.thins.size);
  const cleanCli = await imgctlDoctor();
  assert.equal(cleanCli.status, 0, cleanCli.stderr);
  assert.match(cleanCli.stdout, new RegExp(`^thin ids: ${helper.thins.size} in the pool, ${helper.thins.size} in the catalog\\nclean$`, "m"));

  const { image } = await client.getImage({ image: "golang" });
  const lostId = image!.thinId;
  const lost = helper.thins.get(lostId)!;
  const stray = "imgd-act-00000000000000000000000000";
  // An id the catalog allocated and lost the row of (as a crash or a person would leave it).
  const planted = agent.catalog.allocateActivation({ id: "01JLOSTAAAAAAAAAAAAAAAAAAA", image: "golang", chainId: image!.chainId, name: "imgd-act-01jlostaaaaaaaaaaaaaaaaaaa" }).thinId;
  agent.catalog.db.prepare("DELETE FROM activations WHERE thin_id = ?").run(planted);
  agent.catalog.db.prepare("DELETE FROM thin_ids WHERE thin_id = ?").run(planted);
  const calls = helper.calls.length;
  helper.thins.set(planted, { origin: null, layers: [], formatted: true });
  helper.active.set(stray, planted);
  helper.thins.delete(lostId);
  try {
    const report = await client.doctor({});
    assert.equal(report.clean, false);
    const byKind = Object.fromEntries(report.findings.map((f) => [FindingKind[f.kind], f]));
    assert.deepEqual(report.findings.map((f) => FindingKind[f.kind]).sort(), ["MISSING_THIN_ID", "STRAY_DEVICE", "UNKNOWN_THIN_ID"]);
    assert.equal(byKind.UNKNOWN_THIN_ID!.subject, `thin id ${planted}`);
    assert.match(byKind.UNKNOWN_THIN_ID!.repair, new RegExp(`remove device ${stray}, then delete thin id ${planted} from the pool`));
    assert.equal(byKind.STRAY_DEVICE!.subject, stray);
    assert.match(byKind.STRAY_DEVICE!.repair, new RegExp(`remove device ${stray}`));
    const lostName = agent.catalog.listDevices().find((d) => d.thinId === lostId)!.name;
    assert.equal(byKind.MISSING_THIN_ID!.subject, lostName);
    assert.match(byKind.MISSING_THIN_ID!.detail, new RegExp(`thin id ${lostId}, which is not in the pool`));
    const cli = await imgctlDoctor();
    assert.equal(cli.status, 1, "not clean: exit 1");
    assert.match(cli.stdout, new RegExp(`^UNKNOWN_THIN_ID thin id ${planted}: .*\\n  repair: remove device imgd-act-0+, then delete thin id ${planted} from the pool$`, "m"));
    const json = await imgctlDoctor("--json");
    assert.equal(json.status, 1);
    assert.equal(JSON.parse(json.stdout).findings.length, 3);
    const ops = new Set(helper.calls.slice(calls).map((c) => c.op));
    assert.deepEqual([...ops].sort(), ["device.list", "pool.status", "thin.list"], "doctor only reads");
  } finally {
    helper.active.delete(stray);
    helper.thins.delete(planted);
    helper.thins.set(lostId, lost);
  }
  agent.catalog.releaseThinId(planted);
  assert.equal((await client.doctor({})).clean, true);
});

// S3 faults and concurrency (issues 3 and 4), through the whole agent: gRPC, FSM, queues, locks.
const forKeys = (...keys: string[]) => (r: RecordedRequest) => keys.includes(r.url.split("?")[0].replace(`/${s3.bucket}/`, ""));
const pullError = (image: string) =>
  pull(image).then(
    () => assert.fail(`pulling ${image} should fail`),
    (err: Error) => err.message,
  );
const applied = (from: number) => helper.calls.slice(from).filter((c) => c.op === "layer.apply").map((c) => (c.args as { digest: string }).digest);

test("two images needing the same missing layer fetch it once and apply it once", async () => {
  const common = await tarOf({ "common/lib": "needed by both\n" });
  await s3.putMany([
    ["images/twin-a/1.tar", common],
    ["images/twin-a/2.tar", await tarOf({ a: "a\n" })],
    ["images/twin-b/1.tar", common],
    ["images/twin-b/2.tar", await tarOf({ b: "b\n" })],
  ]);
  const [requests, calls] = [proxy.requests.length, helper.calls.length];
  const [a, b] = await Promise.all([pull("twin-a"), pull("twin-b")]);
  assert.equal(a.at(-1)!.status, RunStatus.SUCCEEDED);
  assert.equal(b.at(-1)!.status, RunStatus.SUCCEEDED);
  const firstLayers = proxy.requests.slice(requests).filter(forKeys("images/twin-a/1.tar", "images/twin-b/1.tar"));
  assert.equal(firstLayers.filter(isObjectGet).length, 1, "the common layer is downloaded once, under one of its keys");
  const [imgA, imgB] = [(await client.getImage({ image: "twin-a" })).image!, (await client.getImage({ image: "twin-b" })).image!];
  const commonDigest = imgA.layers[0].digest;
  assert.equal(imgB.layers[0].digest, commonDigest);
  assert.deepEqual(applied(calls).filter((d) => d === commonDigest), [commonDigest], "and applied once");
  assert.equal(applied(calls).length, 3, "common + a/2 + b/2");
});

test("download and apply concurrency are bounded by their queues (IMGD_DOWNLOAD_CONCURRENCY=2, IMGD_APPLY_CONCURRENCY=1)", async () => {
  const wide = await Promise.all(Array.from({ length: 6 }, (_, i) => tarOf({ [`wide/${i}`]: `layer ${i} `.repeat(200) })));
  await s3.putMany(wide.map((body, i): [string, Buffer] => [`images/wide/${i + 1}.tar`, body]));
  await s3.put("images/other-wide/1.tar", await tarOf({ other: "x\n" }));
  const wideKeys = wide.map((_, i) => `images/wide/${i + 1}.tar`);
  // Slow bodies so downloads overlap in time; applies held so both runs wait at the apply queue.
  proxy.tamper = (r) => (isObjectGet(r) && forKeys(...wideKeys)(r) ? { throttle: { bytes: 512, delayMs: 30 } } : undefined);
  let open!: () => void;
  helper.holdApply(new Promise<void>((resolve) => (open = resolve)));
  const calls = helper.calls.length;
  try {
    const pulls = [pull("wide"), pull("other-wide")];
    const deadline = Date.now() + 5000;
    while (applied(calls).length === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
    await new Promise((resolve) => setTimeout(resolve, 300)); // time for a second apply to start, were the queue not bounded
    assert.equal(applied(calls).length, 1, "one layer.apply at a time");
    helper.holdApply(undefined);
    open();
    const results = await Promise.all(pulls);
    assert.ok(results.every((u) => u.at(-1)!.status === RunStatus.SUCCEEDED));
  } finally {
    helper.holdApply(undefined);
    open();
    proxy.tamper = () => undefined;
  }
  const gets = proxy.requests.filter((r) => isObjectGet(r) && forKeys(...wideKeys)(r));
  assert.equal(gets.length, 6);
  assert.equal(proxy.maxConcurrent((r) => isObjectGet(r) && forKeys(...wideKeys)(r)), 2, "two downloads at a time, never more");
  assert.equal(applied(calls).length, 7);
});

test("S3 faults in a pull are retried inside the download and resumed by Range: one step attempt", async () => {
  const body = await tarOf({ "flaky/file": "x".repeat(50_000) });
  await s3.put("images/flaky/1.tar", body);
  const key = forKeys("images/flaky/1.tar");
  proxy.script((r) => isObjectGet(r) && key(r), [{ reply: { status: 503, body: "<Error><Code>SlowDown</Code><Message>m</Message></Error>" } }, { cutAfter: 20_000 }]);
  const from = proxy.requests.length;
  const last = (await pull("flaky")).at(-1)!;
  proxy.tamper = () => undefined;
  assert.equal(last.status, RunStatus.SUCCEEDED);
  const gets = proxy.requests.slice(from).filter((r) => isObjectGet(r) && key(r));
  assert.deepEqual(gets.map((r) => `${r.status} ${r.headers.range ?? "-"}`), ["503 -", "200 -", `206 bytes=20000-${body.length - 1}`]);
  const db = new Database(join(stateDir, "imgd.db"), { readonly: true });
  try {
    const errors = db.prepare("SELECT count(*) AS n FROM fsm_events WHERE run_id = ? AND type = 'error'").get(last.runId) as { n: number };
    assert.equal(errors.n, 0, "the FSM step itself never failed: the download absorbed the faults");
  } finally {
    db.close();
  }
});

test("permanent S3 failures end the run at once, naming the image, the key and what went wrong", async () => {
  await s3.put("images/denied/1.tar", await tarOf({ d: "1\n" }));
  await s3.put("images/unstable/1.tar", await tarOf({ u: "1\n" }));
  const tmp = () => readdirSync(join(stateDir, "tmp"));
  proxy.tamper = (r) => (isObjectGet(r) && forKeys("images/denied/1.tar")(r) ? { reply: { status: 403, body: "<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>" } } : undefined);
  const from = proxy.requests.length;
  assert.match(await pullError("denied"), /image denied: layer images\/denied\/1\.tar: downloading "s3:\/\/imgd-test\/images\/denied\/1\.tar": AccessDenied \(HTTP 403\): Access Denied/);
  assert.equal(proxy.requests.slice(from).filter(isObjectGet).length, 1, "no retry");
  assert.equal((await client.getImage({ image: "denied" })).image!.state, ImageState.FAILED);

  let n = 0;
  proxy.tamper = (r) => (forKeys("images/unstable/1.tar")(r) ? { headers: { etag: `"${(++n).toString(16).padStart(32, "0")}"` } } : undefined);
  assert.match(await pullError("unstable"), /image unstable: layer images\/unstable\/1\.tar: .*object keeps changing: replaced 4 times during one download/);
  proxy.tamper = () => undefined;
  assert.deepEqual(tmp(), [], "no temp file left");
});

test("S3 listings that are not an image are refused before anything is downloaded", async () => {
  await s3.putMany(Array.from({ length: 51 }, (_, i): [string, string] => [`images/toomany/${i + 1}.tar`, "x"]));
  await s3.putMany([
    ["images/odd/1.tar", "x"],
    ["images/odd/2 .tar", "x"],
    ["images/climb/1.tar", "x"],
    ["images/climb/..", "x"],
    ["images/hollow/", Buffer.alloc(0)],
  ]);
  const from = proxy.requests.length;
  assert.match(await pullError("toomany"), /image toomany: image refused: s3:\/\/imgd-test\/images\/toomany\/: more than 50 objects; an image may have at most 50 layers \(IMGD_S3_MAX_LAYERS\)/);
  assert.match(await pullError("odd"), /"images\/odd\/2 \.tar" is not a layer/);
  assert.match(await pullError("climb"), /"images\/climb\/\.\." is not a layer/);
  assert.match(await pullError("hollow"), /images\/hollow\/ exists but holds no layers/);
  assert.deepEqual(proxy.requests.slice(from).filter(isObjectGet), [], "only listings were made");
  assert.equal((await client.doctor({})).clean, true, "and the pool is clean after all the S3 cases");
});

test("a failed pull whose own cleanup failed leaves no half-made device: its finalizer discards it", async () => {
  await s3.put("images/halfmade/1.tar", await tarOf({ half: "made\n" }));
  // The apply is refused (the run ends at once) and the attempt's own discard fails as well.
  helper.failNext("layer.apply", "LAYER_REFUSED", "injected refusal");
  helper.failNext("device.deactivate", "COMMAND_FAILED", "injected: device busy");
  assert.match(await pullError("halfmade"), /injected refusal/);
  assert.equal((await client.getImage({ image: "halfmade" })).image!.state, ImageState.FAILED);
  assert.deepEqual(agent.catalog.listDevices().filter((d) => d.state !== "ready").map((d) => d.name), [], "no device row is left allocated");
  const known = new Set([...agent.catalog.listDevices().map((d) => d.thinId), ...agent.catalog.listActivations().map((a) => a.thinId)]);
  assert.deepEqual([...helper.thins.keys()].filter((id) => !known.has(id)), [], "no thin id is left in the pool");
  assert.deepEqual([...helper.active.keys()].filter((name) => name.startsWith("imgd-layer-")), [], "no layer device is left active");
});
