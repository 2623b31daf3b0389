// PullImage's progress stream, through the whole agent on the host: real s3rver behind the
// fault-injecting proxy (to make a download last), real SQLite, real gRPC client, and the real
// imgctl; the root helper is the TEST DOUBLE of test/helpers/fake-helper.ts.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { fromJsonString } from "@bufbuild/protobuf";
import {
  LayerPhase,
  ListImagesResponseSchema,
  PullImageResponseSchema,
  RunStatus,
  type ImgdClient,
  type PullImageResponse,
} from "../../client/sdk.ts";
import { RunProgress } from "../../agent/images/pull-progress.ts";
import type { FakeHelper } from "../helpers/fake-helper.ts";
import { isObjectGet, type TamperProxy } from "../helpers/fault-proxy.ts";
import { TestAgent, type Files } from "../helpers/test-agent.ts";

const BIG = 2 * 1024 * 1024; // 32 chunks of 64 KiB: per-chunk messages would show
const shared: Files[] = [{ "base/lib": "x".repeat(BIG) }, { "base/etc": "etc\n" }, { "base/usr": "usr\n" }];
const harness = new TestAgent({
  name: "progress",
  proxy: true,
  images: {
    alpha: [...shared, { "alpha/bin": "alpha\n" }, { "alpha/version": "1\n" }],
    beta: [...shared, { "beta/bin": "beta\n" }, { "beta/version": "2\n" }],
    gamma: [{ "gamma/a": "a\n" }, { "gamma/b": "b\n" }, { "gamma/c": "c\n" }],
    delta: [{ "delta/a": "a\n" }, { "delta/b": "b\n" }],
    epsilon: [{ "epsilon/a": "a\n" }],
  },
});
let client: ImgdClient;
let helper: FakeHelper;
let proxy: TamperProxy;

before(async () => {
  ({ client, helper, proxy } = await harness.setUp());
  await harness.s3.put("images/broken/1.tar", "this is not a tar archive");
});
after(() => harness.tearDown());

type Received = { at: number; m: PullImageResponse };
async function follow(image: string): Promise<Received[]> {
  const got: Received[] = [];
  for await (const m of client.pullImage({ image })) got.push({ at: performance.now(), m });
  return got;
}

const ORDER = [LayerPhase.PENDING, LayerPhase.DOWNLOADING, LayerPhase.APPLYING, LayerPhase.DONE];
const phases = (m: PullImageResponse) => m.layers.map((l) => l.phase).join(",");
/** What a message says, without the run id, as a comparable string. */
const said = (m: PullImageResponse) =>
  JSON.stringify([m.state, m.status, String(m.bytesDone), String(m.bytesTotal), m.layers.map((l) => [l.position, l.digest, l.phase, String(l.bytesDone), String(l.bytesTotal)])]);

test("a pull streams every layer's phases in order and the bytes up to their totals, at most ~4 byte updates a second", async () => {
  // The big layer arrives in 64 KiB pieces 40 ms apart: about 1.3 s of downloading.
  proxy.tamper = (r) => (isObjectGet(r) && r.url.includes("/alpha/1.tar") ? { throttle: { bytes: 65536, delayMs: 40 } } : undefined);
  const got = await follow("alpha");
  proxy.tamper = () => undefined;
  const messages = got.map((r) => r.m);
  const last = messages.at(-1)!;
  assert.equal(last.status, RunStatus.SUCCEEDED);
  assert.ok(messages.slice(0, -1).every((m) => m.status === RunStatus.RUNNING));
  const sizes = last.image!.layers.map((l) => l.size);
  const sum = sizes.reduce((a, b) => a + b, 0n);
  assert.ok(sizes[0] > BigInt(BIG));

  // Every message once the layers are listed carries all of them, in order, with their sizes.
  const listed = messages.filter((m) => m.layers.length > 0);
  assert.ok(listed.length > 0 && messages.indexOf(listed[0]) <= 2, "the layers are known right after the listing");
  for (const m of listed) {
    assert.deepEqual(m.layers.map((l) => l.position), [1, 2, 3, 4, 5]);
    assert.deepEqual(m.layers.map((l) => l.bytesTotal), sizes);
    assert.equal(m.bytesTotal, 2n * sum, "nothing was here: every layer is downloaded and applied");
  }
  // Whole-image bytes never go back and end at the total.
  for (let i = 1; i < listed.length; i++) assert.ok(listed[i].bytesDone >= listed[i - 1].bytesDone, `bytes went back at message ${i}`);
  assert.equal(last.bytesDone, last.bytesTotal);
  // Each layer goes PENDING → DOWNLOADING → APPLYING → DONE, skipping none, never back; its
  // downloaded bytes grow to its size (shown as such while it waits for the layers before it,
  // or followed at once by APPLYING when nothing before it is left to apply).
  for (let i = 0; i < 5; i++) {
    const seen = listed.map((m) => m.layers[i]);
    const order = seen.map((l) => ORDER.indexOf(l.phase));
    assert.ok(order.every((o, k) => o >= 0 && (k === 0 || o >= order[k - 1])), `layer ${i + 1} phases: ${order}`);
    assert.deepEqual([...new Set(order)], [0, 1, 2, 3], `layer ${i + 1} went through every phase`);
    const downloading = seen.filter((l) => l.phase === LayerPhase.DOWNLOADING);
    for (let k = 1; k < downloading.length; k++) assert.ok(downloading[k].bytesDone >= downloading[k - 1].bytesDone);
    const lastDownloading = downloading.at(-1)!;
    const next = seen[seen.lastIndexOf(lastDownloading) + 1];
    assert.ok(lastDownloading.bytesDone === sizes[i] || next?.phase === LayerPhase.APPLYING, `layer ${i + 1}: downloaded all of it`);
    assert.match(seen.at(-1)!.digest, /^sha256:[0-9a-f]{64}$/);
    assert.equal(seen.at(-1)!.bytesDone, sizes[i]);
  }
  // The big layer was seen part-way: bytes are reported while they move, not only at the end.
  const partial = listed.filter((m) => m.layers[0].phase === LayerPhase.DOWNLOADING && m.layers[0].bytesDone > 0n && m.layers[0].bytesDone < sizes[0]);
  assert.ok(partial.length >= 2, `${partial.length} updates part-way through the big layer`);

  // The throttle: a message that changes no step and no phase only carries bytes, and those
  // come at most once per 250 ms (a message per 64 KiB chunk would be ~32 of them here).
  const byteOnly = got.filter((r, k) => k > 0 && r.m.state === got[k - 1].m.state && phases(r.m) === phases(got[k - 1].m) && r.m.status === got[k - 1].m.status);
  const seconds = (got.at(-1)!.at - got[0].at) / 1000;
  assert.ok(byteOnly.length <= Math.ceil(seconds * 4) + 1, `${byteOnly.length} byte-only messages in ${seconds.toFixed(2)} s`);
  // Phase changes: 3 steps and 3 per layer (the initial table counts as one); a handful more.
  assert.ok(messages.length <= 1 + 3 + 1 + 5 * 3 + byteOnly.length, `${messages.length} messages`);
  console.log(`alpha: ${messages.length} messages (${byteOnly.length} byte-only) in ${seconds.toFixed(2)} s`);
});

test("a second image sharing layers reports them REUSED from the start and counts only what it does", async () => {
  const messages = (await follow("beta")).map((r) => r.m);
  const last = messages.at(-1)!;
  assert.equal(last.status, RunStatus.SUCCEEDED);
  const sizes = last.image!.layers.map((l) => l.size);
  const listed = messages.filter((m) => m.layers.length > 0);
  for (const m of listed) {
    assert.deepEqual(m.layers.slice(0, 3).map((l) => l.phase), [LayerPhase.REUSED, LayerPhase.REUSED, LayerPhase.REUSED]);
    assert.equal(m.bytesTotal, 2n * (sizes[3] + sizes[4]), "reused layers count 0");
  }
  assert.deepEqual(last.layers.map((l) => l.phase), [LayerPhase.REUSED, LayerPhase.REUSED, LayerPhase.REUSED, LayerPhase.DONE, LayerPhase.DONE]);
  assert.equal(last.bytesDone, last.bytesTotal);

  // Pulled again: already ready, one message, every layer reused, nothing to do.
  const again = (await follow("beta")).map((r) => r.m);
  assert.equal(again.length, 1);
  assert.equal(again[0].runId, "");
  assert.ok(again[0].layers.every((l) => l.phase === LayerPhase.REUSED));
  assert.equal(again[0].bytesTotal, 0n);
});

test("a second caller joins the run and sees the same progress", async () => {
  let open!: () => void;
  helper.holdApply(new Promise<void>((resolve) => (open = resolve)));
  const calls = helper.calls.length;
  const first = follow("gamma");
  // Wait until the run is held at its first apply, then join it.
  while (!helper.calls.slice(calls).some((c) => c.op === "layer.apply")) await new Promise((r) => setTimeout(r, 5));
  const second = follow("gamma");
  await new Promise((r) => setTimeout(r, 100));
  helper.holdApply(undefined);
  open();
  const [a, b] = [(await first).map((r) => r.m), (await second).map((r) => r.m)];
  assert.ok(b.every((m) => m.joined) && !a.some((m) => m.joined));
  assert.equal(b[0].layers.length, 3, "the joined stream starts with the run's layer table");
  assert.equal(b[0].layers[0].phase, LayerPhase.APPLYING, "where the run is: applying layer 1");
  assert.equal(b[0].runId, a[0].runId);
  const fromFirst = new Set(a.map(said));
  for (const m of b.slice(1)) assert.ok(fromFirst.has(said(m)), `the joined stream saw what the first did: ${said(m)}`);
  assert.equal(said(b.at(-1)!), said(a.at(-1)!));
});

test("a failed pull ends the stream with its error, once: no message says FAILED", async () => {
  const messages: PullImageResponse[] = [];
  const err = await (async () => {
    for await (const m of client.pullImage({ image: "broken" })) messages.push(m);
  })().then(
    () => assert.fail("the pull should fail"),
    (e: Error) => e,
  );
  assert.match(err.message, /NOT_A_TAR|not a tar/i);
  assert.ok(messages.length > 0 && messages.every((m) => m.status === RunStatus.RUNNING));
});

// imgctl, run as a user would (not on a terminal: the log form).
const repo = join(import.meta.dirname, "../..");
function imgctl(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const argv = [join(repo, "client/imgctl.ts"), "--addr", `127.0.0.1:${harness.agent.port}`, ...args];
  return new Promise((resolve) =>
    execFile(process.execPath, argv, { encoding: "utf8" }, (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr })),
  );
}

test("imgctl pull in a log: one line per layer phase change, then a summary", async () => {
  const r = await imgctl("pull", "delta");
  assert.equal(r.code, 0, r.stderr);
  const lines = r.stdout.trimEnd().split("\n");
  const runLine = /^pull delta: run [0-9A-Z]{26}$/;
  const layerLine = /^pull delta: layer [12]\/2 (downloading \(\d+(\.\d)? (B|KiB), sha256:[0-9a-f]{12}\)|downloading \(\d+(\.\d)? (B|KiB)\)|applying \(.*\)|done \(.*, applied in \d+\.\d s\))$/;
  const summary = /^pull delta: ready in \d+\.\d s: 2 layers \(0 reused\), \d+\.\d KiB downloaded, \d+\.\d KiB, thin id \d+$/;
  assert.match(lines[0], runLine);
  assert.match(lines.at(-1)!, summary);
  for (const line of lines.slice(1, -1)) assert.match(line, layerLine);
  for (const n of [1, 2]) {
    const phasesOf = lines.filter((l) => l.includes(`layer ${n}/2`)).map((l) => l.split(" ")[4]);
    assert.deepEqual(phasesOf, ["downloading", "applying", "done"], `layer ${n}: ${phasesOf}`);
  }
  console.log(r.stdout);
});

test("imgctl --json prints each stream message as one proto3 JSON line; --quiet prints nothing", async () => {
  const r = await imgctl("--json", "pull", "epsilon");
  assert.equal(r.code, 0, r.stderr);
  const lines = r.stdout.trimEnd().split("\n");
  assert.ok(lines.length >= 3);
  for (const line of lines) {
    assert.doesNotMatch(line, /\$typeName/);
    const value = JSON.parse(line) as Record<string, unknown>;
    // Proto3 JSON: enum names, camelCase, 64-bit integers as strings; it parses back as the message.
    assert.ok(["RUN_STATUS_RUNNING", "RUN_STATUS_SUCCEEDED"].includes(value.status as string), line);
    fromJsonString(PullImageResponseSchema, line);
  }
  const last = JSON.parse(lines.at(-1)!);
  assert.equal(last.status, "RUN_STATUS_SUCCEEDED");
  assert.deepEqual(last.layers.map((l: { phase: string }) => l.phase), ["LAYER_PHASE_DONE"]);
  assert.equal(typeof last.bytesTotal, "string");
  assert.equal(last.bytesDone, last.bytesTotal);
  assert.equal(last.image.state, "IMAGE_STATE_READY");

  const images = await imgctl("--json", "images");
  assert.equal(images.code, 0, images.stderr);
  assert.equal(images.stdout.trimEnd().split("\n").length, 1, "one message, one line");
  const parsed = fromJsonString(ListImagesResponseSchema, images.stdout);
  assert.ok(parsed.images.some((i) => i.name === "epsilon"));

  const quiet = await imgctl("--quiet", "pull", "epsilon");
  assert.deepEqual([quiet.code, quiet.stdout], [0, ""]);
  const failed = await imgctl("--quiet", "pull", "broken");
  assert.equal(failed.code, 4, "a refused layer is FAILED_PRECONDITION: exit 4");
  assert.equal(failed.stdout, "");
  assert.match(failed.stderr, /broken/);
  assert.equal((await imgctl("--json", "--quiet", "images")).code, 2, "the two exclude each other");
});

test("a layer this run applied stays DONE when the step, retried, finds its device ready", () => {
  const digest = `sha256:${"a".repeat(64)}`;
  const run = new RunProgress([1, 2].map((position) => ({ position, size: 100, stored: false, reused: false })));
  run.downloading(1, 100);
  run.stored(1, digest, 100);
  run.applying(1);
  run.applied(1);
  // The step fails on layer 2 and runs again: layer 1's device is there, built by this run.
  run.reused(1);
  const { layers, bytesDone, bytesTotal } = run.snapshot();
  assert.equal(layers[0].phase, "done");
  assert.deepEqual([bytesDone, bytesTotal], [200, 400], "layer 1's download and apply still count");
  run.close();
});
