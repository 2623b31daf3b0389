// The imgd.v1 API's contract (issue 12): typed errors (status code + google.rpc.ErrorInfo in
// grpc-status-details-bin), retry-safe named activations, paging, Timestamps, enums, GetVersion.
// The agent on the host: real s3rver, real SQLite, real gRPC clients and imgctl; the root helper
// is the TEST DOUBLE of test/helpers/fake-helper.ts (no device-mapper on this kernel).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { fromBinary } from "@bufbuild/protobuf";
import { anyUnpack, timestampDate } from "@bufbuild/protobuf/wkt";
import { ClientError, Status, type Metadata } from "nice-grpc";
import { ErrorInfoSchema } from "../../client/gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../client/gen/google/rpc/status_pb.js";
import { ImgdError, PoolMode, RunKind, RunStatus, type ImgdClient } from "../../client/sdk.ts";
import { versionString } from "../../client/version.ts";
import type { FakeHelper } from "../helpers/fake-helper.ts";
import { pullReady, pullUpdates } from "../helpers/pull.ts";
import { TestAgent, type Files } from "../helpers/test-agent.ts";
import type { TestS3 } from "../helpers/s3rver.ts";

const repo = join(import.meta.dirname, "../..");
const shared: Files[] = [{ "base/file": "base\n" }, { "mid/file": "mid\n" }];
const harness = new TestAgent({
  name: "api",
  images: {
    alpha: [...shared, { "alpha/file": "a\n" }],
    beta: [...shared, { "beta/file": "b\n" }],
    gamma: [...shared, { "gamma/file": "c\n" }],
    delta: [...shared, { "delta/file": "d\n" }],
  },
});
let client: ImgdClient;
let helper: FakeHelper;
let s3: TestS3;

before(async () => {
  ({ client, helper, s3 } = await harness.setUp());
});
after(() => harness.tearDown());

/** Asserts a call fails with this status and ErrorInfo reason; returns the error's metadata. */
async function rejectsWith(call: Promise<unknown> | (() => Promise<unknown>), code: Status, reason: string): Promise<Record<string, string>> {
  try {
    await (typeof call === "function" ? call() : call);
  } catch (err) {
    assert.ok(err instanceof ImgdError, `an ImgdError with ErrorInfo, got ${String(err)}`);
    assert.equal(Status[err.code], Status[code], err.message);
    assert.equal(err.reason, reason, err.message);
    assert.equal(err.domain, "imgd");
    return err.metadata;
  }
  assert.fail(`expected ${Status[code]}/${reason}, the call succeeded`);
}

const snapshotsMade = () => helper.calls.filter((c) => c.op === "thin.snapshot").length;
const activationDevicesMade = () => helper.calls.filter((c) => c.op === "device.activate" && (c.args as { name: string }).name.startsWith("imgd-act-")).length;

test("errors carry a google.rpc.Status with one ErrorInfo in grpc-status-details-bin", async () => {
  let trailer: Metadata | undefined;
  await assert.rejects(client.getImage({ image: "nowhere" }, { onTrailer: (t) => (trailer = t) }));
  const bytes = trailer?.get("grpc-status-details-bin");
  assert.ok(bytes instanceof Uint8Array, "the trailer is there");
  const status = fromBinary(StatusSchema, bytes);
  assert.equal(status.code, Status.NOT_FOUND);
  assert.match(status.message, /image nowhere is not known here/);
  assert.equal(status.details.length, 1);
  const info = anyUnpack(status.details[0]!, ErrorInfoSchema);
  assert.deepEqual([info?.domain, info?.reason, info?.metadata], ["imgd", "IMAGE_NOT_FOUND", { image: "nowhere" }]);
});

test("a pull of a name the bucket does not have: NOT_FOUND once, as the status, and no image row", async () => {
  const seen: number[] = [];
  const meta = await rejectsWith(async () => {
    for await (const update of client.pullImage({ image: "no-such-image" })) seen.push(update.status);
  }, Status.NOT_FOUND, "IMAGE_NOT_FOUND");
  assert.equal(meta.image, "no-such-image");
  assert.ok(meta.run_id, "the run that failed");
  assert.ok(!seen.includes(RunStatus.FAILED), "the failure is not also a last message");
  await rejectsWith(client.getImage({ image: "no-such-image" }), Status.NOT_FOUND, "IMAGE_NOT_FOUND");
  assert.ok(!(await client.listImages({})).images.some((i) => i.name === "no-such-image"));
});

test("activating a name the bucket does not have: NOT_FOUND, no image, no activation, the name free again", async () => {
  await rejectsWith(client.activateImage({ image: "missing", name: "m1" }), Status.NOT_FOUND, "IMAGE_NOT_FOUND");
  await rejectsWith(client.getImage({ image: "missing" }), Status.NOT_FOUND, "IMAGE_NOT_FOUND");
  assert.deepEqual((await client.listActivations({})).activations, []);
  await rejectsWith(client.deactivateImage({ name: "m1" }), Status.NOT_FOUND, "ACTIVATION_NOT_FOUND");
});

test("a refused layer is FAILED_PRECONDITION / LAYER_REFUSED with image, layer, entry and rule", async () => {
  await s3.put("images/broken/1.tar", "this is not a tar archive");
  const meta = await rejectsWith(() => pullUpdates(client, "broken"), Status.FAILED_PRECONDITION, "LAYER_REFUSED");
  assert.deepEqual([meta.image, meta.layer, meta.rule], ["broken", "images/broken/1.tar", "NOT_A_TAR"]);
  assert.ok(meta.entry, "the entry");
  // Activating it reports the pull's reason too (its folder has not changed: no new pull).
  const again = await rejectsWith(client.activateImage({ image: "broken" }), Status.FAILED_PRECONDITION, "LAYER_REFUSED");
  assert.equal(again.rule, "NOT_A_TAR");
});

test("a full pool is RESOURCE_EXHAUSTED / POOL_FULL", async () => {
  await harness.putImage("roomy", [{ "roomy/file": "r\n" }]);
  helper.failNext("layer.apply", "NO_SPACE", "no space left in the pool");
  const meta = await rejectsWith(() => pullUpdates(client, "roomy"), Status.RESOURCE_EXHAUSTED, "POOL_FULL");
  assert.deepEqual([meta.image, meta.layer], ["roomy", "images/roomy/1.tar"]);
});

test("bad arguments are INVALID_ARGUMENT with the field", async () => {
  assert.equal((await rejectsWith(client.getImage({ image: "../etc" }), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT")).field, "image");
  assert.equal((await rejectsWith(client.activateImage({ image: "alpha", name: "Bad_Name" }), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT")).field, "name");
  assert.equal((await rejectsWith(client.activateImage({ image: "alpha", labels: { "9x": "y" } }), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT")).field, "labels");
  const many = Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, "v"]));
  assert.equal((await rejectsWith(client.activateImage({ image: "alpha", labels: many }), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT")).field, "labels");
  assert.equal((await rejectsWith(client.activateImage({ image: "alpha", labels: { k: "x".repeat(257) } }), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT")).field, "labels");
  assert.equal((await rejectsWith(client.deactivateImage({}), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT")).field, "activation_id");
  assert.equal((await rejectsWith(client.listImages({ pageSize: -1 }), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT")).field, "page_size");
  assert.equal((await rejectsWith(client.listRuns({ pageToken: "made-up" }), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT")).field, "page_token");
  assert.equal(snapshotsMade(), 0, "nothing was activated");
});

test("ActivateImage with a name is retry-safe; the name of another image's activation is ALREADY_EXISTS", async () => {
  await pullReady(client, "alpha");
  const labels = { "team.io": "infra", owner: "cp-7" };
  const first = (await client.activateImage({ image: "alpha", name: "web-1", labels })).activation!;
  const devices = activationDevicesMade();
  const second = (await client.activateImage({ image: "alpha", name: "web-1", labels })).activation!;
  assert.equal(second.id, first.id, "the same activation");
  assert.equal(activationDevicesMade(), devices, "no second device");
  assert.deepEqual([first.name, first.labels, first.image], ["web-1", labels, "alpha"]);
  const age = Date.now() - timestampDate(first.createdAt!).getTime();
  assert.ok(age >= 0 && age < 60_000, `created_at is a Timestamp of now (${age} ms ago)`);

  await pullReady(client, "beta");
  const taken = await rejectsWith(client.activateImage({ image: "beta", name: "web-1" }), Status.ALREADY_EXISTS, "ACTIVATION_NAME_TAKEN");
  assert.deepEqual([taken.activation, taken.image], [first.id, "alpha"]);

  // Without a name the agent picks one, and each call is a new activation.
  const a = (await client.activateImage({ image: "beta" })).activation!;
  const b = (await client.activateImage({ image: "beta" })).activation!;
  assert.notEqual(a.id, b.id);
  assert.match(a.name, /^act-[0-9a-z]{26}$/);

  const listed = (await client.listActivations({ image: "alpha" })).activations;
  assert.deepEqual(listed.map((x) => [x.id, x.name, x.labels]), [[first.id, "web-1", labels]]);

  // Deactivate by name; again: NOT_FOUND, or nothing with allow_missing; the name is free again.
  const gone = (await client.deactivateImage({ name: "web-1" })).activation!;
  assert.equal(gone.id, first.id);
  await rejectsWith(client.deactivateImage({ name: "web-1" }), Status.NOT_FOUND, "ACTIVATION_NOT_FOUND");
  await rejectsWith(client.deactivateImage({ activationId: first.id }), Status.NOT_FOUND, "ACTIVATION_NOT_FOUND");
  assert.equal((await client.deactivateImage({ name: "web-1", allowMissing: true })).activation, undefined);
  assert.equal((await client.deactivateImage({ activationId: first.id, allowMissing: true })).activation, undefined);
  const reused = (await client.activateImage({ image: "beta", name: "web-1" })).activation!;
  assert.notEqual(reused.id, first.id);
  await client.deactivateImage({ activationId: reused.id });
  for (const x of [a, b]) await client.deactivateImage({ activationId: x.id });
});

test("a call cancelled after ~50 ms leaves an activation its retry finds; concurrent same-name calls make one device", async () => {
  let release!: () => void;
  helper.holdApply(new Promise<void>((resolve) => (release = resolve)));
  const devices = activationDevicesMade();
  // gamma is not pulled yet: the activation waits for its pull, held at the first apply.
  let results;
  try {
    await assert.rejects(
      client.activateImage({ image: "gamma", name: "slow-1" }, { signal: AbortSignal.timeout(50) }),
      (err: Error) => ["AbortError", "TimeoutError"].includes(err.name) || (err instanceof ClientError && err.code === Status.CANCELLED),
    );
    const concurrent = [1, 2, 3].map(() => client.activateImage({ image: "gamma", name: "slow-1" }));
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.equal(activationDevicesMade(), devices, "still held: nothing activated yet");
    helper.holdApply(undefined);
    release();
    results = await Promise.all(concurrent);
  } finally {
    helper.holdApply(undefined);
    release();
  }
  const ids = new Set(results.map((r) => r.activation!.id));
  assert.equal(ids.size, 1, "one activation for the name");
  assert.equal(activationDevicesMade() - devices, 1, "one device made");
  const retry = (await client.activateImage({ image: "gamma", name: "slow-1" })).activation!;
  assert.equal(retry.id, [...ids][0]);
  const listed = (await client.listActivations({ image: "gamma" })).activations;
  assert.deepEqual(listed.map((x) => x.name), ["slow-1"]);
  await client.deactivateImage({ name: "slow-1" });
});

test("the name survives an agent restart: a retry after it finds the same activation", async () => {
  await pullReady(client, "delta");
  const made = (await client.activateImage({ image: "delta", name: "keep-1", labels: { a: "1" } })).activation!;
  await harness.stop();
  await harness.start();
  client = harness.client;
  const again = (await client.activateImage({ image: "delta", name: "keep-1" })).activation!;
  assert.deepEqual([again.id, again.labels], [made.id, { a: "1" }]);
  // The reason of a run that failed before the restart is kept too.
  await rejectsWith(client.activateImage({ image: "broken" }), Status.FAILED_PRECONDITION, "LAYER_REFUSED");
  await client.deactivateImage({ name: "keep-1" });
});

test("ListImages, ListActivations and ListRuns page with opaque tokens made for their filters", async () => {
  const all = (await client.listImages({})).images.map((i) => i.name);
  assert.ok(all.length >= 4, all.join(","));
  const paged: string[] = [];
  let pageToken = "";
  let pages = 0;
  do {
    const page = await client.listImages({ pageSize: 2, pageToken });
    assert.ok(page.images.length <= 2);
    paged.push(...page.images.map((i) => i.name));
    pageToken = page.nextPageToken;
    pages++;
  } while (pageToken);
  assert.deepEqual(paged, all);
  assert.equal(pages, Math.ceil(all.length / 2));

  const acts = [];
  for (const n of [1, 2, 3]) acts.push((await client.activateImage({ image: "alpha", name: `page-${n}` })).activation!);
  const first = await client.listActivations({ image: "alpha", pageSize: 2 });
  assert.deepEqual(first.activations.map((a) => a.name), ["page-1", "page-2"]);
  const rest = await client.listActivations({ image: "alpha", pageSize: 2, pageToken: first.nextPageToken });
  assert.deepEqual([rest.activations.map((a) => a.name), rest.nextPageToken], [["page-3"], ""]);
  // A token made for other filters (another image, or all images) is refused.
  await rejectsWith(client.listActivations({ image: "beta", pageToken: first.nextPageToken }), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT");
  await rejectsWith(client.listActivations({ pageToken: first.nextPageToken }), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT");
  await rejectsWith(client.listImages({ pageToken: first.nextPageToken }), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT");
  const tampered = first.nextPageToken.replace(/^./, (c) => (c === "e" ? "f" : "e"));
  await rejectsWith(client.listActivations({ image: "alpha", pageToken: tampered }), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT");
  for (const a of acts) await client.deactivateImage({ activationId: a.id });

  const runs = (await client.listRuns({ pageSize: 1000 })).runs;
  assert.ok(runs.length > 5);
  const pagedRuns: string[] = [];
  pageToken = "";
  do {
    const page = await client.listRuns({ pageSize: 3, pageToken });
    pagedRuns.push(...page.runs.map((r) => r.id));
    pageToken = page.nextPageToken;
  } while (pageToken);
  assert.deepEqual(pagedRuns, runs.map((r) => r.id), "newest first, each once");
  const pulls = (await client.listRuns({ fsm: RunKind.PULL, pageSize: 1 }));
  assert.equal(pulls.runs[0]!.fsm, RunKind.PULL);
  await rejectsWith(client.listRuns({ fsm: RunKind.ACTIVATE, pageToken: pulls.nextPageToken }), Status.INVALID_ARGUMENT, "INVALID_ARGUMENT");
  const finished = runs.find((r) => r.status !== RunStatus.RUNNING)!;
  assert.ok(timestampDate(finished.finishedAt!) >= timestampDate(finished.startedAt!));
  // Larger than the maximum is read as the maximum, not refused.
  assert.equal((await client.listImages({ pageSize: 5000 })).images.length, all.length);
});

test("enums and GetVersion", async () => {
  assert.equal((await client.getPool({})).mode, PoolMode.READ_WRITE);
  assert.deepEqual(await client.getVersion({}).then((v) => [v.version, v.api]), [versionString(), "imgd.v1"]);
  const report = await client.doctor({});
  assert.equal(report.clean, true, JSON.stringify(report.findings));
});

test("imgctl prints error: REASON: message and exits by status class", async () => {
  // Not spawnSync: the agent answering it runs in this process.
  const imgctl = (...args: string[]) =>
    new Promise<{ status: number; stdout: string; stderr: string }>((resolve) => {
      const argv = [join(repo, "client/imgctl.ts"), "--addr", `127.0.0.1:${harness.agent.port}`, ...args];
      execFile(process.execPath, argv, { encoding: "utf8" }, (err, stdout, stderr) => resolve({ status: err ? Number(err.code) : 0, stdout, stderr }));
    });
  const missing = await imgctl("image", "nowhere");
  assert.equal(missing.status, 3, missing.stderr);
  assert.match(missing.stderr, /^error: IMAGE_NOT_FOUND: image nowhere is not known here/m);
  const refused = await imgctl("activate", "broken");
  assert.equal(refused.status, 4, refused.stderr);
  assert.match(refused.stderr, /^error: LAYER_REFUSED: /m);
  const bad = await imgctl("image", "../x");
  assert.equal(bad.status, 2, bad.stderr);
  assert.match(bad.stderr, /^error: INVALID_ARGUMENT: /m);
  const made = await imgctl("activate", "--name", "cli-1", "--label", "env=test", "alpha");
  assert.equal(made.status, 0, made.stderr);
  assert.match(made.stdout, /^activated alpha: cli-1 [0-9A-Z]{26} \/dev\/mapper\/imgd-act-/m);
  const json = await imgctl("--json", "activations", "alpha");
  // The answer as one proto3 JSON line (every page in one ListActivationsResponse).
  const { activations } = JSON.parse(json.stdout) as { activations: { name: string; labels: unknown }[] };
  assert.deepEqual(activations.map((a) => [a.name, a.labels]), [["cli-1", { env: "test" }]]);
  assert.equal((await imgctl("deactivate", "--name", "cli-1")).status, 0);
  const again = await imgctl("deactivate", "--name", "cli-1", "--allow-missing");
  assert.equal(again.status, 0, again.stderr);
  assert.match((await imgctl("--help")).stdout, /3 NOT_FOUND/);
  // imgctl version asks the agent too (GetVersion).
  assert.match((await imgctl("version")).stdout, /^imgctl .*\nagent: imgd [0-9.]+.*, API imgd\.v1$/m);
});
