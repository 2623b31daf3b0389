// End to end, inside the VM (test/vm/run): a real s3rver, the real root helper on the guest's
// device-mapper, the agent as an unprivileged user, and a real gRPC client. The tests share one
// agent and run in order: each builds on the state the previous one left.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmdirSync, writeFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { connectImgd, ImageState, ImgdError, LayerPhase, PoolMode, RunStatus, type ImgdClient, type Image } from "../../client/sdk.ts";
import { pullUpdates } from "../helpers/pull.ts";
import { diffManifests, walkTree, type ManifestEntry } from "../fixtures/tree.ts";

const repo = join(import.meta.dirname, "../..");
const expectedDir = process.env.IMGD_TEST_EXPECTED_DIR ?? join(repo, ".vm/synthetic/expected");
const blobDir = "/var/lib/imgd/blobs/sha256";
const s3Log = process.env.IMGD_TEST_S3_LOG;

let client: ImgdClient;
let close: () => void;

before(() => {
  assert.ok(process.env.IMGD_VM, "these tests run inside the VM: npm run test:vm");
  assert.ok(s3Log, "the VM's S3 server logs its requests (IMGD_TEST_S3_LOG)");
  // Other e2e files share this VM: start from a fresh agent, pool and S3 request log.
  execFileSync("vm-reset", { stdio: "inherit" });
  const c = connectImgd();
  client = c.client;
  close = () => c.channel.close();
});
after(() => close());

const sh = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: "utf8" });
const blobs = () => (existsSync(blobDir) ? readdirSync(blobDir).sort() : []);
const dmDevices = () => sh("/usr/sbin/dmsetup", "ls").split("\n").filter((l) => l.startsWith("imgd-")).map((l) => l.split(/\s/)[0]).sort();
/** Keys of the object GETs the S3 server has answered so far ("GET <key> STATUS BYTES" lines; listings have no key). */
const s3Gets = () =>
  s3Log && existsSync(s3Log)
    ? readFileSync(s3Log, "utf8").split("\n").filter((l) => /^GET [^?]/.test(l)).map((l) => l.split(" ")[1]!.split("?")[0])
    : [];

const pull = (image: string) => pullUpdates(client, image);

async function getImage(name: string): Promise<Image> {
  const { image } = await client.getImage({ image: name });
  return image!;
}

/** Mounts a device read-only (no journal replay, nosuid, nodev), walks it, unmounts. */
async function treeOf(device: string): Promise<ManifestEntry[]> {
  const dir = mkdtempSync("/tmp/imgd-e2e-");
  sh("/usr/bin/mount", "-o", "ro,noload,nosuid,nodev", device, dir);
  try {
    return await walkTree(dir);
  } finally {
    sh("/usr/bin/umount", dir);
    rmdirSync(dir);
  }
}

const expected = (image: string): ManifestEntry[] => JSON.parse(readFileSync(join(expectedDir, `${image}.json`), "utf8"));

test("pull golang: every layer downloaded once, a chain of five thin devices, image ready", async () => {
  const updates = await pull("golang");
  const last = updates.at(-1)!;
  assert.equal(last.status, RunStatus.SUCCEEDED);
  assert.ok(last.runId, "a pull run was started");
  assert.ok(updates.some((u) => u.state === "layers"), "progress went through the layers step (download and apply)");
  // Progress worth reading: every layer DONE at the end, the bytes at their total (each layer
  // downloaded and applied), and a few dozen messages, not one per 64 KiB chunk.
  assert.deepEqual(last.layers.map((l) => l.phase), Array(5).fill(LayerPhase.DONE));
  assert.equal(last.bytesTotal, 2n * last.image!.size);
  assert.equal(last.bytesDone, last.bytesTotal);
  console.log(`pull golang: ${updates.length} progress messages`);
  assert.ok(updates.length < 100, `${updates.length} messages`);
  const image = await getImage("golang");
  assert.equal(image.state, ImageState.READY);
  assert.equal(image.layers.length, 5);
  assert.equal(new Set(image.layers.map((l) => l.thinId)).size, 5, "one thin device per layer");
  assert.equal(image.thinId, image.layers[4].thinId, "the image's device is the last of its chain");
  assert.equal(blobs().length, 5);
  assert.deepEqual(s3Gets().sort(), [1, 2, 3, 4, 5].map((n) => `images/golang/${n}.tar`));
});

test("pull node: downloads only node's own layers and creates only the missing devices", async () => {
  const blobsBefore = blobs();
  const getsBefore = s3Gets().length;
  const golang = await getImage("golang");
  const last = (await pull("node")).at(-1)!;
  assert.equal(last.status, RunStatus.SUCCEEDED);
  const { REUSED, DONE } = LayerPhase;
  assert.deepEqual(last.layers.map((l) => l.phase), [REUSED, REUSED, REUSED, DONE, DONE], "layers 1-3 were reused, not unpacked again");
  const node = await getImage("node");
  const newBlobs = blobs().filter((b) => !blobsBefore.includes(b));
  assert.equal(newBlobs.length, 2, "only layers 4 and 5 are new bytes");
  assert.deepEqual(newBlobs.map((b) => "sha256:" + b).sort(), [node.layers[3].digest, node.layers[4].digest].sort());
  assert.deepEqual(s3Gets().slice(getsBefore).sort(), [node.layers[3].key, node.layers[4].key].sort());
  assert.deepEqual(node.layers.slice(0, 3).map((l) => l.thinId), golang.layers.slice(0, 3).map((l) => l.thinId), "layers 1-3 share golang's devices");
  const golangIds = new Set(golang.layers.map((l) => l.thinId));
  assert.ok(node.layers.slice(3).every((l) => !golangIds.has(l.thinId)), "layers 4-5 get new devices");
});

test("pull python: shares node's layer-4 device, and the three images fit the pool together", async () => {
  const last = (await pull("python")).at(-1)!;
  assert.equal(last.status, RunStatus.SUCCEEDED);
  const [node, python] = [await getImage("node"), await getImage("python")];
  assert.deepEqual(python.layers.slice(0, 4).map((l) => l.thinId), node.layers.slice(0, 4).map((l) => l.thinId));
  assert.notEqual(python.thinId, node.thinId);
  const pool = await client.getPool({});
  assert.equal(pool.errorIfNoSpace, true, "a full pool fails writes instead of hanging them");
  assert.ok(pool.dataUsedBytes > 0n && pool.dataUsedBytes < pool.dataTotalBytes);
});

for (const name of ["golang", "node", "python"]) {
  test(`activate ${name}: the snapshot holds exactly the expected root filesystem`, async () => {
    const { activation } = await client.activateImage({ image: name });
    assert.match(activation!.devicePath, /^\/dev\/mapper\/imgd-act-[0-9a-z]{26}$/);
    assert.ok(existsSync(activation!.devicePath));
    const differences = diffManifests(expected(name), await treeOf(activation!.devicePath));
    assert.deepEqual(differences, [], `tree of ${name} differs from the expected one:\n${differences.slice(0, 40).join("\n")}`);
  });
}

test("re-pulling a ready image is a no-op: no run, no S3 data request, no device change", async () => {
  const before = { blobs: blobs(), gets: s3Gets().length, devices: dmDevices(), pool: await client.getPool({}), image: await getImage("golang") };
  const updates = await pull("golang");
  assert.equal(updates.length, 1);
  assert.equal(updates[0].status, RunStatus.SUCCEEDED);
  assert.equal(updates[0].runId, "", "no FSM run was started");
  assert.deepEqual(blobs(), before.blobs);
  assert.equal(s3Gets().length, before.gets);
  assert.deepEqual(dmDevices(), before.devices);
  assert.equal((await client.getPool({})).dataUsedBytes, before.pool.dataUsedBytes);
  assert.deepEqual((await getImage("golang")).layers.map((l) => l.thinId), before.image.layers.map((l) => l.thinId));
});

test("two activations of one image are independent devices", async () => {
  const { activation: a } = await client.activateImage({ image: "python" });
  const { activation: b } = await client.activateImage({ image: "python" });
  assert.notEqual(a!.id, b!.id);
  assert.notEqual(a!.thinId, b!.thinId);
  const dir = mkdtempSync("/tmp/imgd-e2e-");
  sh("/usr/bin/mount", "-o", "nosuid,nodev", a!.devicePath, dir);
  try {
    writeFileSync(join(dir, "written-in-a"), "only in a\n");
    sh("/usr/bin/rm", "-rf", join(dir, "etc"));
  } finally {
    sh("/usr/bin/umount", dir);
    rmdirSync(dir);
  }
  const treeB = await treeOf(b!.devicePath);
  assert.ok(!treeB.some((e) => e.path === "written-in-a"));
  assert.deepEqual(diffManifests(expected("python"), treeB), [], "b is untouched by writes to a");
  const { activation: c } = await client.activateImage({ image: "python" });
  assert.deepEqual(diffManifests(expected("python"), await treeOf(c!.devicePath)), [], "the image's device is untouched too");
  const { activations } = await client.listActivations({ image: "python" });
  assert.ok([a, b, c].every((x) => activations.some((y) => y.id === x!.id)));
});

test("after an agent restart everything is intact", async () => {
  const before = { images: (await client.listImages({})).images, activations: (await client.listActivations({})).activations, devices: dmDevices() };
  sh("vm-agent", "restart");
  close();
  const c = connectImgd();
  client = c.client;
  close = () => c.channel.close();
  const images = (await client.listImages({})).images;
  assert.deepEqual(images.map((i) => [i.name, i.state, i.thinId]), before.images.map((i) => [i.name, i.state, i.thinId]));
  assert.deepEqual((await client.listActivations({})).activations.map((a) => a.id), before.activations.map((a) => a.id));
  assert.deepEqual(dmDevices(), before.devices);
  const updates = await pull("node");
  assert.equal(updates.length, 1, "node is still ready: re-pull is a no-op after restart");
  assert.equal(updates[0].status, RunStatus.SUCCEEDED);
  const { activation } = await client.activateImage({ image: "golang" });
  assert.deepEqual(diffManifests(expected("golang"), await treeOf(activation!.devicePath)), []);
});

test("deactivation removes the device from the kernel; the image and other activations stay", async () => {
  const { activations } = await client.listActivations({ image: "python" });
  assert.ok(activations.length >= 3);
  // The newest was only ever read; the second one was written to by the independence test.
  const [drop, keep] = [activations[0], activations.at(-1)!];
  const nameOf = (path: string) => path.replace("/dev/mapper/", "");
  assert.match(sh("imgctl", "deactivate", drop.id), /deactivated python/);
  assert.ok(!existsSync(drop.devicePath), "the device node is gone");
  assert.ok(!dmDevices().includes(nameOf(drop.devicePath)), "the dm table is gone");
  assert.ok(dmDevices().includes(nameOf(keep.devicePath)));
  assert.deepEqual(diffManifests(expected("python"), await treeOf(keep.devicePath)), []);
  assert.ok(!(await client.listActivations({ image: "python" })).activations.some((a) => a.id === drop.id));
  await assert.rejects(client.deactivateImage({ activationId: drop.id }), /not known/);
});

test("a named activation is retry-safe on the real pool: one device, found again by its name, deactivated by it", async () => {
  const before = dmDevices().length;
  const labels = { owner: "e2e" };
  const first = (await client.activateImage({ image: "golang", name: "e2e-retry", labels })).activation!;
  const again = (await client.activateImage({ image: "golang", name: "e2e-retry", labels })).activation!;
  assert.deepEqual([again.id, again.name, again.labels], [first.id, "e2e-retry", labels]);
  assert.equal(dmDevices().length, before + 1, "one device for the name");
  await assert.rejects(client.activateImage({ image: "node", name: "e2e-retry" }), (err: Error) => err instanceof ImgdError && err.reason === "ACTIVATION_NAME_TAKEN");
  assert.equal((await client.deactivateImage({ name: "e2e-retry" })).activation!.id, first.id);
  assert.equal(dmDevices().length, before);
  assert.equal((await client.deactivateImage({ name: "e2e-retry", allowMissing: true })).activation, undefined);
});

test("imgctl shows images, activations and the pool", () => {
  const images = sh("imgctl", "images");
  for (const name of ["golang", "node", "python"]) assert.match(images, new RegExp(`^${name}\\s+ready`, "m"));
  assert.match(sh("imgctl", "activations"), /\/dev\/mapper\/imgd-act-/);
  assert.match(sh("imgctl", "pool"), /error_if_no_space/);
});

test("a layer that cannot fit in the pool is refused before any device is made", async () => {
  const before = { devices: dmDevices(), pool: await client.getPool({}) };
  const failure = await pull("toobig").then(
    () => assert.fail("toobig must not be pulled"),
    (err: Error) => err,
  );
  assert.ok(failure instanceof ImgdError && failure.reason === "POOL_FULL", `RESOURCE_EXHAUSTED/POOL_FULL: ${String(failure)}`);
  assert.deepEqual([failure.metadata.image, failure.metadata.layer], ["toobig", "images/toobig/1.tar"]);
  assert.match(failure.message, /toobig: layer images\/toobig\/1\.tar \(sha256:[0-9a-f]{64}\) does not fit: pool imgd-pool has [0-9.]+ MiB of data space free; the layer needs about 10[0-9]{2}\.0 MiB/);
  assert.deepEqual(dmDevices(), before.devices);
  const pool = await client.getPool({});
  assert.equal(pool.mode, PoolMode.READ_WRITE);
  assert.equal(pool.dataUsedBytes, before.pool.dataUsedBytes, "nothing was written");
  const { image } = await client.getImage({ image: "toobig" });
  assert.equal(image!.state, ImageState.FAILED);
  assert.match(image!.error, /does not fit/);
});

test("bad requests get clear errors", async () => {
  await assert.rejects(client.getImage({ image: "../etc" }), /INVALID_ARGUMENT|image name/i);
  await assert.rejects(client.getImage({ image: "never-pulled" }), /not known/);
  const last = await pull("does-not-exist").then(
    (u) => u.at(-1),
    (err: Error) => err,
  );
  assert.ok(last instanceof Error, "pulling a missing image fails");
  assert.match(last.message, /does-not-exist/);
});

/** imgctl's exit status and output (it exits 1 when doctor finds something). */
function imgctl(...args: string[]): { status: number; stdout: string } {
  const result = spawnSync("imgctl", args, { encoding: "utf8" });
  return { status: result.status ?? -1, stdout: result.stdout + result.stderr };
}

test("doctor: the catalog and the real pool agree after all of the above; a thin id made behind its back is reported", () => {
  const started = performance.now();
  const clean = imgctl("doctor");
  const doctorMs = Math.round(performance.now() - started);
  assert.equal(clean.status, 0, clean.stdout);
  assert.match(clean.stdout, /^thin ids: ([0-9]+) in the pool, \1 in the catalog\nclean$/m);
  // What thin_ls itself costs on this pool (the helper reads the same metadata snapshot).
  sh("/usr/sbin/dmsetup", "message", "imgd-pool", "0", "reserve_metadata_snap");
  const meta = sh("/usr/sbin/dmsetup", "table", "imgd-pool").split(" ")[3];
  const metaDev = "/dev/" + /^DEVNAME=(.*)$/m.exec(readFileSync(`/sys/dev/block/${meta}/uevent`, "utf8"))![1];
  const lsStarted = performance.now();
  try {
    sh("/usr/sbin/thin_ls", "--metadata-snap", "--no-headers", "-o", "DEV", metaDev);
  } finally {
    sh("/usr/sbin/dmsetup", "message", "imgd-pool", "0", "release_metadata_snap");
  }
  const thinLsMs = Math.round(performance.now() - lsStarted);
  const helperMs = readFileSync("/tmp/imgd-vm-logs/helper.log", "utf8").split("\n").filter((l) => l.includes('"op":"thin.list"')).map((l) => JSON.parse(l).ms);
  console.log(`doctor measured: imgctl doctor ${doctorMs} ms, thin.list in the helper ${helperMs.join(",")} ms, bare thin_ls ${thinLsMs} ms`);

  sh("/usr/sbin/dmsetup", "message", "imgd-pool", "0", "create_thin 4242");
  try {
    const dirty = imgctl("doctor");
    assert.equal(dirty.status, 1, dirty.stdout);
    assert.match(dirty.stdout, /^FOREIGN_THIN_ID thin id 4242: .*never allocated it.*\n  repair: none by itself: an operator decides/m);
    // --json is the API's proto3 JSON: enums by their full names.
    const report = JSON.parse(imgctl("--json", "doctor").stdout);
    assert.deepEqual(report.findings.map((f: { kind: string; subject: string }) => [f.kind, f.subject]), [["FINDING_KIND_FOREIGN_THIN_ID", "thin id 4242"]]);
  } finally {
    sh("/usr/sbin/dmsetup", "message", "imgd-pool", "0", "delete 4242");
  }
  assert.equal(imgctl("doctor").status, 0);
});
