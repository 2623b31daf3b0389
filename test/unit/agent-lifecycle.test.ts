// DeleteImage and CollectGarbage on the host: real s3rver, real SQLite, real gRPC client and
// imgctl; the root helper is the TEST DOUBLE of test/helpers/fake-helper.ts (no device-mapper on
// this kernel; test/e2e/lifecycle.test.ts runs the same on the real pool in the VM).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { RunningAgent } from "../../agent/app.ts";
import { layerDeviceName } from "../../agent/images/chain.ts";
import { FindingKind, RepairResult, RunKind, ImageState, RunStatus, type Image, type ImgdClient } from "../../client/sdk.ts";
import { type FakeHelper } from "../helpers/fake-helper.ts";
import { pullOutcome, pullReady } from "../helpers/pull.ts";
import { tarOf, TestAgent } from "../helpers/test-agent.ts";

let helper: FakeHelper;
let agent: RunningAgent;
let client: ImgdClient;
const shared = [1, 2, 3].map((n) => ({ [`layer${n}/file`]: `shared layer ${n}\n` }));
const harness = new TestAgent({
  name: "lifecycle",
  images: {
    golang: [...shared, { "go/bin/go": "go\n" }],
    node: [...shared, { "node/bin/node": "node\n" }, { "node/version": "22\n" }],
    python: [...shared, { "node/bin/node": "node\n" }, { "python/version": "3.11\n" }],
  },
});
const stateDir = harness.stateDir;

before(async () => {
  ({ helper, agent, client } = await harness.setUp());
});
after(() => harness.tearDown());

const pull = (image: string): Promise<Image> => pullReady(client, image);

const imgctl = (...args: string[]) =>
  new Promise<{ status: number; stdout: string; stderr: string }>((resolve) => {
    const argv = [join(import.meta.dirname, "../../client/imgctl.ts"), "--addr", `127.0.0.1:${agent.port}`, ...args];
    execFile(process.execPath, argv, { encoding: "utf8" }, (err, stdout, stderr) => resolve({ status: err ? Number(err.code) : 0, stdout, stderr }));
  });
const blobFiles = () => readdirSync(join(stateDir, "blobs/sha256")).sort();
let nodeTopDigest = "";
const thinOf = (image: Image, position: number) => image.layers[position - 1]!.thinId;

test("delete is refused while activated; with force it deactivates first; shared devices stay for python", async () => {
  await pull("golang");
  const node = await pull("node");
  const python = await pull("python");
  const { activation } = await client.activateImage({ image: "node" });
  const actName = activation!.devicePath.replace("/dev/mapper/", "");

  await assert.rejects(client.deleteImage({ image: "node" }), (err: Error) => /FAILED_PRECONDITION/.test(String(err)) && new RegExp(`has 1 activation\\(s\\) \\(${activation!.id}\\): deactivate them first, or delete with force`).test(err.message));
  assert.equal((await client.getImage({ image: "node" })).image!.state, ImageState.READY, "nothing changed");
  assert.equal(helper.active.get(actName), activation!.thinId);
  const cli = await imgctl("delete", "node");
  assert.equal(cli.status, 4, "FAILED_PRECONDITION's exit code");
  assert.match(cli.stderr, /^error: IMAGE_HAS_ACTIVATIONS: .*deactivate them first, or delete with force/m);

  const result = await client.deleteImage({ image: "node", force: true });
  assert.deepEqual(result.deactivated, [activation!.id]);
  assert.equal(helper.active.has(actName), false, "the activation's device is gone");
  assert.equal(helper.thins.has(activation!.thinId), false, "and its snapshot");
  assert.equal(agent.catalog.getActivation(activation!.id), undefined);
  await assert.rejects(client.getImage({ image: "node" }), /NOT_FOUND/);
  // node's own top layer goes; layers 1-4 are python's too (and 1-3 golang's).
  assert.deepEqual(result.removedDevices, [layerDeviceName(node.layers[4]!.chainId)]);
  nodeTopDigest = node.layers[4]!.digest;
  assert.equal(helper.thins.has(thinOf(node, 5)), false);
  for (const position of [1, 2, 3, 4]) assert.ok(helper.thins.has(thinOf(node, position)), `shared layer ${position} kept`);
  assert.deepEqual(helper.thins.get(python.thinId)!.layers, python.layers.map((l) => l.digest), "python is intact");
  assert.equal((await client.getImage({ image: "python" })).image!.state, ImageState.READY);
  const runs = (await client.listRuns({ fsm: RunKind.DELETE, resourceId: "node" })).runs;
  assert.deepEqual(runs.map((r) => [r.status, r.state]), [[RunStatus.SUCCEEDED, "remove-devices"]]);
  assert.equal((await client.doctor({})).clean, true);
});

test("gc removes the blobs only deleted images used, and devices nothing references; keeps the rest", async () => {
  const golang = await pull("golang");
  const before = blobFiles();
  assert.equal(before.length, 7, "3 shared + golang 4 + node 4 (python's) + node 5 + python 5");
  // As a crash between "forget" and "remove-devices" would leave it: golang's row gone, its
  // devices still there.
  agent.catalog.deleteImage("golang");
  writeFileSync(join(stateDir, "tmp", "leftover.part"), "x");

  const cli = await imgctl("gc");
  assert.equal(cli.status, 0, cli.stderr);
  assert.match(cli.stdout, /^removed 1 device\(s\), 2 blob\(s\) \([0-9.]+ MiB\), 1 temp file\(s\)$/m);
  assert.equal(helper.thins.has(thinOf(golang, 4)), false, "golang's own layer device removed");
  for (const position of [1, 2, 3]) assert.ok(helper.thins.has(thinOf(golang, position)), "layers python uses stay");
  const removed = before.filter((hex) => !blobFiles().includes(hex)).map((hex) => `sha256:${hex}`).sort();
  assert.deepEqual(removed, [golang.layers[3]!.digest, nodeTopDigest].sort(), "golang's own layer and node's own top layer");
  assert.equal(agent.catalog.listBlobs().length, 5, "python's five stay");
  for (const digest of removed) {
    assert.equal(agent.catalog.blobObjects(digest).length, 0, "its s3_objects rows are gone");
    assert.equal(agent.catalog.blobReferenced(digest), false);
  }
  assert.equal(existsSync(join(stateDir, "tmp", "leftover.part")), false);
  assert.deepEqual((await client.collectGarbage({})).removedBlobs, [], "a second gc finds nothing");
  assert.equal((await client.doctor({})).clean, true);
  // Everything python needs is still there: it activates without touching S3 or building.
  const { activation } = await client.activateImage({ image: "python" });
  await client.deactivateImage({ activationId: activation!.id });
});

test("gc and delete beside a running pull: its layers count as references; delete of a pulling image is refused", async () => {
  let open!: () => void;
  helper.holdApply(new Promise<void>((resolve) => (open = resolve)));
  const calls = helper.calls.length;
  const pulling = pull("node");
  while (!helper.calls.slice(calls).some((c) => c.op === "layer.apply")) await new Promise((r) => setTimeout(r, 10));
  try {
    await assert.rejects(client.deleteImage({ image: "node" }), /FAILED_PRECONDITION.*|being pulled/);
    const report = await client.collectGarbage({});
    assert.deepEqual([report.removedDevices, report.removedBlobs, report.removedTempFiles], [[], [], 0], "nothing the pull uses is touched");
  } finally {
    helper.holdApply(undefined);
    open();
  }
  const node = await pulling;
  assert.deepEqual(helper.thins.get(node.thinId)!.layers, node.layers.map((l) => l.digest));
  await assert.rejects(client.deleteImage({ image: "nothing-here" }), /NOT_FOUND/);
  await assert.rejects(client.deleteImage({ image: "../etc" }), /INVALID_ARGUMENT/);
});

test("deleting every image and collecting garbage leaves an empty pool and blob store", async () => {
  for (const image of ["node", "python"]) await client.deleteImage({ image });
  const report = await client.collectGarbage({});
  assert.deepEqual(report.removedDevices, [], "delete already removed every device");
  assert.equal(helper.thins.size, 0);
  assert.equal(agent.catalog.listDevices().length, 0);
  assert.ok(report.removedBlobs.length > 0);
  assert.deepEqual(blobFiles(), []);
  assert.equal(agent.catalog.listBlobs().length, 0);
  assert.equal((await client.doctor({})).clean, true);
});

test("a deactivation that fails after removing the device stays deactivated: repair finishes it, never re-activates it", async () => {
  await pull("golang");
  const { activation } = await client.activateImage({ image: "golang" });
  const name = activation!.devicePath.replace("/dev/mapper/", "");
  // The device goes, then the snapshot's deletion is refused for good: the run fails.
  helper.failNext("thin.delete", "BAD_ARGS", "injected refusal");
  await assert.rejects(client.deactivateImage({ activationId: activation!.id }), /deactivation of .* failed: .*injected refusal/);
  assert.equal(helper.active.has(name), false, "the device was removed");
  assert.deepEqual((await client.listActivations({ image: "golang" })).activations, [], "not listed as active");
  const look = await client.doctor({});
  assert.deepEqual(look.findings.map((f) => FindingKind[f.kind]), ["UNFINISHED_DEACTIVATION"], "doctor says what is left, not MISSING_DEVICE");
  const repaired = await client.doctor({ repair: true });
  assert.equal(repaired.clean, true, JSON.stringify(repaired.findings));
  assert.equal(helper.active.has(name), false, "the user's deactivation is not undone");
  assert.equal(helper.thins.has(activation!.thinId), false, "the repair finished it");
  assert.equal(agent.catalog.getActivation(activation!.id), undefined);
});

test("a pull that starts while a deletion of the same image runs never claims success without an image", async () => {
  await pull("golang");
  const { activation } = await client.activateImage({ image: "golang" });
  // The publisher adds a layer (so a pull has a device to build) and the image is failed, as a
  // repair leaves it: a pull of it starts a run.
  await harness.s3.put("images/golang/5.tar", await tarOf({ "go/version": "1.24\n" }));
  agent.catalog.db.prepare("UPDATE images SET state = 'failed' WHERE name = 'golang'").run();
  // The deletion's forced deactivation is retried once (a transient error): the pull starts then.
  helper.failNext("device.deactivate", "COMMAND_FAILED", "injected: busy");
  let open!: () => void;
  helper.holdApply(new Promise<void>((resolve) => (open = resolve)));
  const calls = helper.calls.length;
  const deleting = client.deleteImage({ image: "golang", force: true }).then(
    (r) => ({ ok: true as const, r }),
    (err: Error) => ({ ok: false as const, err }),
  );
  while (!helper.calls.slice(calls).some((c) => c.op === "device.deactivate")) await new Promise((r) => setTimeout(r, 5));
  const pulling = pullOutcome(client, "golang");
  await new Promise((r) => setTimeout(r, 1500));
  helper.holdApply(undefined);
  open();
  const [outcome, deleted] = await Promise.all([pulling, deleting]);
  const image = await client.getImage({ image: "golang" }).then((r) => r.image, () => undefined);
  if (outcome.ok) {
    assert.equal(image?.state, ImageState.READY, "a pull that succeeded left a ready image");
    assert.equal(deleted.ok, false, "and the deletion did not happen");
  } else {
    assert.match(outcome.error, /deleted/);
    assert.equal(image, undefined, "the deletion happened");
    assert.equal(deleted.ok, true);
  }
  assert.equal(agent.catalog.getActivation(activation!.id), undefined);
  assert.equal((await client.doctor({})).clean, true);
});

test("a device removal cut short stays 'removing': doctor reports it; a pull of its chain rebuilds it, the next GC or a repair finishes it", async () => {
  const python = await pull("python");
  const cutShort = async () => {
    // As a crash between "forget" and "remove-devices" leaves it; then the pool refuses GC's first deletion.
    agent.catalog.deleteImage("python");
    helper.failNext("thin.delete", "BAD_ARGS", "injected refusal");
    await assert.rejects(client.collectGarbage({}), /injected refusal/);
    const removing = agent.catalog.listDevices().filter((d) => d.state === "removing");
    assert.equal(removing.length, 1, "the device GC was removing says so");
    assert.ok(helper.thins.has(removing[0]!.thinId), "its thin id is still in the pool");
    return removing[0]!;
  };
  const first = await cutShort();
  assert.deepEqual((await client.doctor({})).findings.map((f) => [FindingKind[f.kind], f.subject]), [["UNFINISHED_REMOVAL", first.name]]);
  // Never reused as if it were ready: the pull finishes the removal and builds the device again.
  const again = await pull("python");
  assert.equal(agent.catalog.getDevice(first.chainId)?.state, "ready");
  assert.deepEqual(helper.thins.get(again.thinId)!.layers, python.layers.map((l) => l.digest));
  assert.equal((await client.doctor({})).clean, true);

  const second = await cutShort();
  const report = await client.collectGarbage({});
  assert.ok(report.removedDevices.includes(second.name), "GC finished the removal");
  assert.equal(helper.thins.has(second.thinId), false);
  assert.equal(agent.catalog.getDevice(second.chainId), undefined);
  assert.equal((await client.doctor({})).clean, true);

  await pull("python");
  const third = await cutShort();
  const repaired = await client.doctor({ repair: true });
  assert.deepEqual(repaired.findings.map((f) => [FindingKind[f.kind], f.subject, RepairResult[f.result]]), [["UNFINISHED_REMOVAL", third.name, "REPAIRED"]]);
  assert.equal(helper.thins.has(third.thinId), false);
  assert.equal(agent.catalog.getDevice(third.chainId), undefined);
});
