// Failing early (issues 8 and 9): a layer is validated WHILE it downloads, so a bad one stops the
// download after its first megabytes; a listed size over the layer limit is refused before any
// GET; a failed image is not pulled again by ActivateImage unless its S3 folder changed.
// Real s3rver behind the recording proxy (which counts the body bytes it served), real SQLite,
// real gRPC; the root helper is the test double. The layer limit comes from a CONFIG FILE only,
// so these tests also show the validator takes its limits from the agent's settings.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startAgent, type RunningAgent } from "../../agent/app.ts";
import { loadAgentConfig } from "../../agent/config.ts";
import { RunKind, connectImgd, ImageState, RunStatus, type ImgdClient } from "../../client/sdk.ts";
import { packTar, rawTar } from "../fixtures/tar-bytes.ts";
import { startFakeHelper, type FakeHelper } from "../helpers/fake-helper.ts";
import { startS3rver, startTamperProxy, isObjectGet, type TamperProxy, type TestS3 } from "../helpers/s3rver.ts";

const MiB = 1024 * 1024;
/** IMGD_LAYER_MAX_BYTES, set in the config file. */
const LAYER_LIMIT = 66 * MiB;

let s3: TestS3;
let proxy: TamperProxy;
let helper: FakeHelper;
let agent: RunningAgent;
let client: ImgdClient;
let closeClient: () => void;
const stateDir = mkdtempSync(join(tmpdir(), "imgd-fail-early-"));

before(async () => {
  s3 = await startS3rver();
  proxy = await startTamperProxy(s3.endpoint);
  helper = await startFakeHelper(join(stateDir, "blobs"));
  const configFile = join(stateDir, "imgd.conf");
  writeFileSync(configFile, `IMGD_LAYER_MAX_BYTES=${LAYER_LIMIT}\n`);
  const config = loadAgentConfig(["--config", configFile], {
    IMGD_STATE_DIR: stateDir,
    IMGD_LISTEN: "127.0.0.1:0",
    IMGD_LISTEN_INSECURE_LOOPBACK: "1",
    IMGD_HELPER_SOCKET: helper.socketPath,
    IMGD_S3_ENDPOINT: proxy.endpoint,
    IMGD_S3_BUCKET: s3.bucket,
  });
  agent = await startAgent(config, () => {}, { poolWaitAttempts: 1 });
  const c = connectImgd(`127.0.0.1:${agent.port}`);
  client = c.client;
  closeClient = () => c.channel.close();
});

after(async () => {
  closeClient();
  await agent.stop();
  await helper.close();
  await proxy.close();
  await s3.close();
});

const pullError = async (image: string): Promise<string> => {
  try {
    for await (const _ of client.pullImage({ image }));
  } catch (err) {
    return (err as Error).message;
  }
  return assert.fail(`pulling ${image} should fail`);
};
const objectRequests = (from: number, key: string) => proxy.requests.slice(from).filter((r) => isObjectGet(r) && r.url.split("?")[0] === `/${s3.bucket}/${key}`);
const servedBytes = (from: number, key: string) => objectRequests(from, key).reduce((sum, r) => sum + r.bytesSent, 0);
/**
 * Bodies are sent at 6.4 MiB/s per connection (64 KiB every 10 ms), so what was served measures
 * how soon the agent stopped, not how much the kernel's loopback buffers took in meanwhile. The
 * old code (validate after the download) had all 64 MiB served, in about 2.5 s.
 */
const throttled = <T>(key: string, run: () => Promise<T>): Promise<T> => {
  proxy.tamper = (r) => (isObjectGet(r) && r.url.split("?")[0] === `/${s3.bucket}/${key}` ? { throttle: { bytes: 64 * 1024, delayMs: 10 } } : undefined);
  return run().finally(() => (proxy.tamper = () => undefined));
};
const leftovers = () => [...readdirSync(join(stateDir, "tmp")), ...readdirSync(join(stateDir, "blobs/sha256"))];

test("a 64 MiB object whose first block is not a tar is refused after a few MiB were served", async (t) => {
  const body = Buffer.alloc(64 * MiB, "this is no tar header; ");
  await s3.put("images/notar/1.tar", body);
  const from = proxy.requests.length;
  const message = await throttled("images/notar/1.tar", () => pullError("notar"));
  assert.match(message, /image notar: layer images\/notar\/1\.tar \(67108864 bytes, ETag "[0-9a-f]{32}"\) refused: entry \(archive\): NOT_A_TAR: bad header checksum at byte 0/);
  // Let the aborted responses finish being counted.
  await new Promise((resolve) => setTimeout(resolve, 200));
  const served = servedBytes(from, "images/notar/1.tar");
  t.diagnostic(`served ${(served / MiB).toFixed(2)} MiB of 64 in ${objectRequests(from, "images/notar/1.tar").length} ranged GETs`);
  assert.ok(objectRequests(from, "images/notar/1.tar").length >= 1);
  assert.ok(served <= 8 * MiB, `served ${(served / MiB).toFixed(1)} MiB of 64 before the refusal stopped the download`);
  assert.deepEqual(leftovers(), [], "no temp file, no blob");
});

test("a layer with a bad entry after its first MiB is refused after reading only its first megabytes", async (t) => {
  const body = rawTar([
    [{ name: "usr/share/first" }, Buffer.alloc(MiB, 1)],
    [{ name: "usr/../../etc/passwd" }, "root::0:0::/:/bin/sh\n"],
    [{ name: "usr/share/rest" }, Buffer.alloc(63 * MiB, 2)],
  ]);
  await s3.put("images/badentry/1.tar", body);
  const from = proxy.requests.length;
  const message = await throttled("images/badentry/1.tar", () => pullError("badentry"));
  assert.match(message, /image badentry: layer images\/badentry\/1\.tar \(\d+ bytes, ETag "[0-9a-f]{32}"\) refused: entry usr\/\.\.\/\.\.\/etc\/passwd: DOTDOT: name has a "\.\." component/);
  await new Promise((resolve) => setTimeout(resolve, 200));
  const served = servedBytes(from, "images/badentry/1.tar");
  t.diagnostic(`served ${(served / MiB).toFixed(2)} MiB of ${(body.length / MiB).toFixed(1)} in ${objectRequests(from, "images/badentry/1.tar").length} ranged GETs`);
  assert.ok(served <= 8 * MiB, `served ${(served / MiB).toFixed(1)} MiB of ${(body.length / MiB).toFixed(1)} before the refusal stopped the download`);
  assert.deepEqual(leftovers(), []);
  assert.equal((await client.getImage({ image: "badentry" })).image!.state, ImageState.FAILED);
});

test("an object listed larger than IMGD_LAYER_MAX_BYTES (from the config file) is refused with zero GET requests", async () => {
  await s3.put("images/huge/1.tar", await packTar([{ header: { name: "small" }, body: "fine" }]));
  await s3.put("images/huge/2.tar", Buffer.alloc(LAYER_LIMIT + 1));
  const from = proxy.requests.length;
  const message = await pullError("huge");
  assert.match(message, new RegExp(`image huge: layer images/huge/2\\.tar \\(${LAYER_LIMIT + 1} bytes, .*\\) refused: entry \\(archive\\): LAYER_TOO_LARGE: the object is listed with ${LAYER_LIMIT + 1} bytes, more than the layer limit of ${LAYER_LIMIT} bytes`));
  assert.deepEqual(proxy.requests.slice(from).filter(isObjectGet).map((r) => r.url), [], "no layer of the image was requested, not even the good one");
  assert.deepEqual(leftovers(), []);
});

test("ActivateImage does not pull a failed image again unless its S3 folder changed; PullImage retries it", async () => {
  await s3.put("images/failing/1.tar", "no tar at all");
  assert.match(await pullError("failing"), /NOT_A_TAR/);
  const pullRuns = async () => (await client.listRuns({ fsm: RunKind.PULL, resourceId: "failing" })).runs;
  assert.equal((await pullRuns()).length, 1);

  // Unchanged bucket: the failure comes back at once, after one listing and no download.
  let from = proxy.requests.length;
  await assert.rejects(client.activateImage({ image: "failing" }), (err: Error) => {
    assert.match(String(err), /FAILED_PRECONDITION/);
    assert.match(err.message, /image failing is not pulled again: its last pull failed and its S3 folder has not changed since \(PullImage retries it\): .*NOT_A_TAR/);
    return true;
  });
  const requests = proxy.requests.slice(from);
  assert.equal(requests.filter(isObjectGet).length, 0, "nothing downloaded");
  assert.equal(requests.filter((r) => r.url.includes("list-type")).length, 1, "one listing");
  assert.equal((await pullRuns()).length, 1, "no new pull run");
  assert.equal(helper.calls.filter((c) => c.op === "thin.snapshot").length, 0);

  // An explicit PullImage still retries (and fails the same way).
  from = proxy.requests.length;
  assert.match(await pullError("failing"), /NOT_A_TAR/);
  assert.equal((await pullRuns()).length, 2);
  assert.equal(proxy.requests.slice(from).filter(isObjectGet).length, 1);

  // The publisher fixes the layer (a new ETag): ActivateImage pulls it and activates.
  await s3.put("images/failing/1.tar", await packTar([{ header: { name: "fixed" }, body: "yes\n" }]));
  const { activation } = await client.activateImage({ image: "failing" });
  assert.match(activation!.devicePath, /^\/dev\/mapper\/imgd-act-/);
  assert.equal((await client.getImage({ image: "failing" })).image!.state, ImageState.READY);
  const runs = await pullRuns();
  assert.equal(runs.length, 3);
  assert.equal(runs.filter((r) => r.status === RunStatus.SUCCEEDED).length, 1);
});
