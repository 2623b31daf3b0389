// The pull as a pipeline (issue 11): layer i is applied while later layers still download, and a
// failure on one side ends the other cleanly. Through the whole agent on the host: real s3rver
// behind the fault-injecting proxy (which slows chosen layers down), real SQLite, real gRPC; the
// root helper is the TEST DOUBLE of test/helpers/fake-helper.ts.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { ImageState, ImgdError, LayerPhase, RunKind, RunStatus, type ImgdClient, type PullImageResponse } from "../../client/sdk.ts";
import type { FakeHelper } from "../helpers/fake-helper.ts";
import { isObjectGet, type RecordedRequest, type TamperProxy } from "../helpers/fault-proxy.ts";
import { TestAgent, tarOf } from "../helpers/test-agent.ts";

const harness = new TestAgent({
  name: "pipeline",
  proxy: true,
  images: {
    overlap: [{ "a/file": "a\n" }, { "b/file": "b\n" }, { "c/big": "c".repeat(64 * 1024) }],
    "retry-apply": [{ "r/a": "a\n" }, { "r/big": "r".repeat(32 * 1024) }],
  },
});
let client: ImgdClient;
let helper: FakeHelper;
let proxy: TamperProxy;

before(async () => {
  ({ client, helper, proxy } = await harness.setUp());
});
after(() => harness.tearDown());

const GARBAGE = Buffer.alloc(8192, "not a tar archive, whatever its name says. ");
const objectGet = (key: string) => (r: RecordedRequest) => isObjectGet(r) && r.url.split("?")[0] === `/${harness.s3.bucket}/images/${key}`;
const slow = (key: string, bytes: number, delayMs: number) => {
  proxy.tamper = (r) => (objectGet(key)(r) ? { throttle: { bytes, delayMs } } : undefined);
};
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
async function until(check: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting until ${what}`);
    await sleep(10);
  }
}
const appliesSince = (from: number) => helper.calls.slice(from).filter((c) => c.op === "layer.apply").length;
/** Rejects with the stream's error: the SDK's ImgdError, with its reason. */
async function pullFailure(image: string): Promise<ImgdError> {
  try {
    for await (const _ of client.pullImage({ image }));
  } catch (err) {
    assert.ok(err instanceof ImgdError, String(err));
    return err;
  }
  return assert.fail(`pulling ${image} should fail`);
}
/** What a failed pull must not leave: a device row not ready, a thin id or layer device the catalog does not know. */
function assertNothingHalfMade(): void {
  const { catalog } = harness.agent;
  assert.deepEqual(catalog.listDevices().filter((d) => d.state !== "ready").map((d) => d.name), [], "no device row is left allocated");
  const known = new Set([...catalog.listDevices().map((d) => d.thinId), ...catalog.listActivations().map((a) => a.thinId)]);
  assert.deepEqual([...helper.thins.keys()].filter((id) => !known.has(id)), [], "no thin id is left in the pool");
  assert.deepEqual([...helper.active.keys()].filter((name) => name.startsWith("imgd-layer-")), [], "no layer device is left active");
  assert.deepEqual(readdirSync(join(harness.stateDir, "tmp")), [], "no temp file is left");
}

test("layer 1 is applied while the last layer still downloads", async () => {
  // The last layer (64 KiB) arrives in 2 KiB pieces 40 ms apart: about 1.3 s of downloading.
  slow("overlap/3.tar", 2048, 40);
  const seen: { at: number; m: PullImageResponse }[] = [];
  try {
    for await (const m of client.pullImage({ image: "overlap" })) seen.push({ at: performance.now(), m });
  } finally {
    proxy.tamper = () => undefined;
  }
  assert.equal(seen.at(-1)!.m.status, RunStatus.SUCCEEDED);
  const firstApply = seen.find(({ m }) => m.layers.length === 3 && [LayerPhase.APPLYING, LayerPhase.DONE].includes(m.layers[0].phase));
  assert.ok(firstApply, "layer 1 was seen applying");
  const last = firstApply.m.layers[2];
  assert.ok(
    last.phase === LayerPhase.PENDING || (last.phase === LayerPhase.DOWNLOADING && last.bytesDone < last.bytesTotal),
    `when layer 1 was applying, layer 3 was ${LayerPhase[last.phase]} with ${last.bytesDone} of ${last.bytesTotal} bytes`,
  );
  // The same from S3's side: the client heard of the apply before the proxy sent layer 3's last byte.
  const get = proxy.requests.find(objectGet("overlap/3.tar"))!;
  assert.ok(get.end! > firstApply.at, `layer 3's download ended ${(firstApply.at - get.end!).toFixed(0)} ms before layer 1 was seen applying`);
  // And the pipeline gained: every layer applied, in order, on one chain.
  const { image } = await client.getImage({ image: "overlap" });
  assert.deepEqual(helper.thins.get(image!.thinId)!.layers, image!.layers.map((l) => l.digest));
  const pullMs = seen.at(-1)!.at - seen[0].at;
  console.log(`overlap: layer 1 applying ${(firstApply.at - seen[0].at).toFixed(0)} ms into the pull, layer 3 downloaded at ${(get.end! - seen[0].at).toFixed(0)} ms, pull ${pullMs.toFixed(0)} ms`);
});

test("a later layer refused while an earlier one is being applied ends the run FAILED with LAYER_REFUSED; nothing is half-made", async () => {
  await harness.s3.put("images/refused-late/1.tar", await tarOf({ "ok/file": "fine\n" }));
  await harness.s3.put("images/refused-late/2.tar", GARBAGE);
  // Layer 1's apply is held open; layer 2's first bytes (enough for the validator to refuse it)
  // come only after 300 ms, by when layer 1 is applying.
  let open!: () => void;
  helper.holdApply(new Promise<void>((resolve) => (open = resolve)));
  slow("refused-late/2.tar", 1024, 300);
  const calls = helper.calls.length;
  try {
    const failure = pullFailure("refused-late");
    await until(() => appliesSince(calls) === 1, "layer 1 is being applied");
    await until(() => proxy.requests.find(objectGet("refused-late/2.tar"))?.end !== undefined, "layer 2's download ended");
    await sleep(100); // the refusal reaches the run while layer 1's apply is still held
    assert.equal(appliesSince(calls), 1, "still applying layer 1, and nothing after it");
    helper.holdApply(undefined);
    open();
    const err = await failure;
    assert.equal(err.reason, "LAYER_REFUSED", err.message);
    assert.equal(err.metadata.layer, "images/refused-late/2.tar");
    assert.match(err.message, /image refused-late: layer images\/refused-late\/2\.tar \(8192 bytes, ETag "[0-9a-f]{32}"\) refused: entry .+: [A-Z_]+: /);
  } finally {
    helper.holdApply(undefined);
    open();
    proxy.tamper = () => undefined;
  }
  const { runs } = await client.listRuns({ fsm: RunKind.PULL, resourceId: "refused-late", pageSize: 1 });
  assert.equal(runs[0]!.status, RunStatus.FAILED);
  assert.equal(runs[0]!.attempts, 1, "a refusal is not retried");
  assert.equal((await client.getImage({ image: "refused-late" })).image!.state, ImageState.FAILED);
  assert.equal(appliesSince(calls), 1, "layer 2 was never applied");
  // The apply under way when the refusal came was finished, not abandoned: its device is whole.
  const [first] = harness.agent.catalog.imageLayers("refused-late");
  assert.equal(harness.agent.catalog.getDevice(first!.digest!)?.state, "ready", "layer 1's device (chain id = its digest)");
  assertNothingHalfMade();
});

test("a refused layer stops the other downloads at once: the run does not wait for them", async () => {
  await harness.s3.put("images/refused-early/1.tar", GARBAGE);
  await harness.s3.put("images/refused-early/2.tar", await tarOf({ "big/file": "x".repeat(512 * 1024) }));
  // Layer 2 would take about 50 s to arrive.
  slow("refused-early/2.tar", 1024, 100);
  const began = performance.now();
  try {
    const err = await pullFailure("refused-early");
    assert.equal(err.reason, "LAYER_REFUSED", err.message);
    assert.equal(err.metadata.layer, "images/refused-early/1.tar");
  } finally {
    proxy.tamper = () => undefined;
  }
  const took = performance.now() - began;
  assert.ok(took < 5000, `the run ended after ${took.toFixed(0)} ms`);
  const get = proxy.requests.find(objectGet("refused-early/2.tar"));
  if (get) await until(() => get.end !== undefined, "layer 2's download was cut", 2000);
  assertNothingHalfMade();
});

test("a transient apply failure lets the downloads under way finish: the retry fetches nothing again", async () => {
  // Layer 2 (32 KiB) takes about 0.6 s; layer 1's first apply fails, retryably, long before.
  slow("retry-apply/2.tar", 2048, 40);
  helper.failNext("layer.apply", "COMMAND_FAILED", "mount: transient");
  const from = proxy.requests.length;
  let last: PullImageResponse | undefined;
  try {
    for await (const m of client.pullImage({ image: "retry-apply" })) last = m;
  } finally {
    proxy.tamper = () => undefined;
  }
  assert.equal(last?.status, RunStatus.SUCCEEDED);
  const gets = proxy.requests.slice(from).filter(isObjectGet).map((r) => r.url.split("?")[0].split("/").at(-1)).sort();
  assert.deepEqual(gets, ["1.tar", "2.tar"], "each layer downloaded once");
  const db = new Database(join(harness.stateDir, "imgd.db"), { readonly: true });
  try {
    const errors = db.prepare("SELECT step, error FROM fsm_events WHERE run_id = ? AND type = 'error'").all(last.runId) as { step: string; error: string }[];
    assert.equal(errors.length, 1, "one failed attempt, then success");
    assert.match(errors[0]!.error, /mount: transient/);
  } finally {
    db.close();
  }
  assertNothingHalfMade();
});

test("an agent stop while layer 1 applies and layer 2 downloads is an interruption: the resumed run redoes only what is missing", async () => {
  await harness.s3.put("images/stopped/1.tar", await tarOf({ "st/a": "a\n" }));
  await harness.s3.put("images/stopped/2.tar", await tarOf({ "st/big": "s".repeat(64 * 1024) }));
  let open!: () => void;
  helper.holdApply(new Promise<void>((resolve) => (open = resolve)));
  slow("stopped/2.tar", 2048, 40); // about 1.3 s
  const calls = helper.calls.length;
  const from = proxy.requests.length;
  // The caller goes away first, so that the agent's stop does not wait for its stream.
  const caller = new AbortController();
  const following = (async () => {
    for await (const _ of client.pullImage({ image: "stopped" }, { signal: caller.signal }));
  })().catch(() => undefined);
  try {
    await until(() => appliesSince(calls) === 1, "layer 1 is being applied");
    caller.abort();
    await following;
    assert.equal(proxy.requests.find(objectGet("stopped/2.tar"))?.end, undefined, "layer 2 is still downloading");
    await harness.stop();
  } finally {
    helper.holdApply(undefined);
    open();
    proxy.tamper = () => undefined;
  }
  await harness.start();
  client = harness.client;
  // The run resumed on its own; a pull follows it to its end.
  let last: PullImageResponse | undefined;
  for await (const m of client.pullImage({ image: "stopped" })) last = m;
  assert.equal(last?.status, RunStatus.SUCCEEDED);
  const db = new Database(join(harness.stateDir, "imgd.db"), { readonly: true });
  try {
    const run = db.prepare("SELECT interruptions, (SELECT count(*) FROM fsm_events e WHERE e.run_id = r.id AND e.type = 'error') AS failures FROM fsm_runs r WHERE fsm = 'pull' AND resource_id = 'stopped'").get() as { interruptions: number; failures: number };
    assert.deepEqual(run, { interruptions: 1, failures: 0 }, "one interruption, no failed attempt");
  } finally {
    db.close();
  }
  const gets = proxy.requests.slice(from).filter(isObjectGet).map((r) => r.url.split("?")[0].split("/").at(-1));
  assert.deepEqual(gets.filter((key) => key === "1.tar"), ["1.tar"], "layer 1, stored before the stop, is not fetched again");
  assert.deepEqual(gets.filter((key) => key === "2.tar"), ["2.tar", "2.tar"], "layer 2, cut by the stop, is fetched again");
  const { image } = await client.getImage({ image: "stopped" });
  assert.deepEqual(helper.thins.get(image!.thinId)!.layers, image!.layers.map((l) => l.digest), "layer 1's half-made device was rebuilt");
  assertNothingHalfMade();
});

test("a run that failed stops waiting for download slots other runs hold: it ends at once", async () => {
  const base = await tarOf({ "w/base": "base\n" });
  await harness.s3.put("images/waiter-base/1.tar", base);
  for await (const _ of client.pullImage({ image: "waiter-base" }));
  // Its blob stays in the store (only GC removes blobs), its device goes: the waiter applies it again.
  await client.deleteImage({ image: "waiter-base" });
  // Another image takes every download slot (IMGD_DOWNLOAD_CONCURRENCY, 4) for about 6 s.
  for (let i = 1; i <= 4; i++) await harness.s3.put(`images/hog/${i}.tar`, await tarOf({ [`hog/${i}`]: "h".repeat(64 * 1024) }));
  // The waiter's layer 1 is already stored (the same object as waiter-base's); its apply fails
  // for good (the pool is full) while its layer 2 waits for a slot.
  await harness.s3.put("images/waiter/1.tar", base);
  await harness.s3.put("images/waiter/2.tar", await tarOf({ "w/two": "2\n" }));
  proxy.tamper = (r) => (isObjectGet(r) && r.url.includes("/images/hog/") ? { throttle: { bytes: 2048, delayMs: 200 } } : undefined);
  const hog = (async () => {
    for await (const _ of client.pullImage({ image: "hog" }));
  })();
  try {
    await until(() => proxy.requests.filter((r) => isObjectGet(r) && r.url.includes("/images/hog/")).length === 4, "the hog holds every slot");
    helper.failNext("layer.apply", "NO_SPACE", "pool is out of data space");
    const began = performance.now();
    const err = await pullFailure("waiter");
    const tookMs = performance.now() - began;
    assert.equal(err.reason, "POOL_FULL", err.message);
    assert.ok(proxy.requests.filter((r) => isObjectGet(r) && r.url.includes("/images/hog/")).every((r) => r.end === undefined), "the hog still holds its slots");
    assert.ok(tookMs < 2000, `the failed run ended after ${tookMs.toFixed(0)} ms, not when a slot came free`);
    assert.equal(proxy.requests.find(objectGet("waiter/2.tar")), undefined, "layer 2 was never requested");
  } finally {
    proxy.tamper = () => undefined;
  }
  await hog;
  assertNothingHalfMade();
});
