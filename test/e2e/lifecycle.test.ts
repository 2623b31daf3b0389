// End to end, inside the VM (test/vm/run), on the kernel's real thin pool: the helper's
// idempotent ops, DeleteImage (refused while activated, forced, shared devices kept), GC, and the
// agent's startup reconciliation repairing leaks planted while it was stopped.
// The tests run in order and build on each other; the file starts from vm-reset.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { chownSync, existsSync, readFileSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { HelperClient } from "../../agent/helper-client.ts";
import { connectImgd, type Image, type ImgdClient } from "../../client/sdk.ts";
import { pullReady } from "../helpers/pull.ts";

const stateDir = "/var/lib/imgd";
const blobDir = join(stateDir, "blobs/sha256");
const pool = process.env.IMGD_POOL_NAME ?? "imgd-pool";
const THIN_SECTORS = 16777216; // IMGD_THIN_SIZE 8G

let client: ImgdClient;
let close: () => void;
let helper: HelperClient;

before(() => {
  assert.ok(process.env.IMGD_VM, "these tests run inside the VM: npm run test:vm");
  execFileSync("vm-reset", { stdio: "inherit" });
  connect();
  helper = new HelperClient(process.env.IMGD_HELPER_SOCKET ?? "/run/imgd/privhelper.sock");
});
after(() => {
  close();
  helper.close();
});

function connect(): void {
  const c = connectImgd();
  client = c.client;
  close = () => c.channel.close();
}

const sh = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: "utf8" });
const dmsetup = (...args: string[]) => sh("/usr/sbin/dmsetup", ...args);
/** Our layer and activation devices that are active (the pool itself is not listed). */
const dmNames = () => dmsetup("ls").split("\n").map((l) => l.split(/\s/)[0]!).filter((n) => /^imgd-(layer|act)-/.test(n)).sort();
const thinIds = async () => (await helper.call("thin.list", {})).thinIds;
const blobs = () => (existsSync(blobDir) ? readdirSync(blobDir).sort() : []);
const imgctl = (...args: string[]) => spawnSync("imgctl", args, { encoding: "utf8" });

const pull = (image: string): Promise<Image> => pullReady(client, image);

const rejectsWith = (promise: Promise<unknown>, code: string) =>
  assert.rejects(promise, (err: Error & { code?: string }) => {
    assert.equal(err.code, code, err.message);
    return true;
  });

test("helper: create/snapshot repeated with the same origin succeed; another origin, or an id made by hand, is EXISTS", async () => {
  await helper.call("thin.create", { thinId: 7000 });
  await helper.call("thin.create", { thinId: 7000 });
  await helper.call("thin.create", { thinId: 7002 });
  await helper.call("thin.snapshot", { thinId: 7001, originId: 7000 });
  await helper.call("thin.snapshot", { thinId: 7001, originId: 7000 });
  await rejectsWith(helper.call("thin.snapshot", { thinId: 7001, originId: 7002 }), "EXISTS");
  await rejectsWith(helper.call("thin.create", { thinId: 7001 }), "EXISTS");
  dmsetup("message", pool, "0", "create_thin 7003");
  await rejectsWith(helper.call("thin.create", { thinId: 7003 }), "EXISTS");
  const name = "imgd-act-01jaaaaaaaaaaaaaaaaaaaaaaa";
  await helper.call("device.activate", { name, thinId: 7001 });
  await helper.call("device.activate", { name, thinId: 7001 });
  await rejectsWith(helper.call("device.activate", { name, thinId: 7002 }), "CONFLICT");
  await helper.call("device.deactivate", { name });
  await helper.call("device.deactivate", { name });
  for (const thinId of [7001, 7000, 7002, 7003, 7003]) await helper.call("thin.delete", { thinId });
  assert.deepEqual(await thinIds(), []);
});

let python: Image;

test("delete: refused while activated; forced, it deactivates first; python keeps the layers it shares with node", async () => {
  const node = await pull("node");
  python = await pull("python");
  const { activation } = await client.activateImage({ image: "node" });
  const refused = imgctl("delete", "node");
  assert.equal(refused.status, 4, "FAILED_PRECONDITION exits 4");
  assert.match(refused.stderr, /^error: IMAGE_HAS_ACTIVATIONS: /m);
  assert.match(refused.stderr, new RegExp(`image node has 1 activation\\(s\\) \\(${activation!.id}\\): deactivate them first, or delete with force`));
  assert.ok(dmNames().includes(activation!.devicePath.slice("/dev/mapper/".length)), "still active");

  const forced = imgctl("delete", "--force", "node");
  assert.equal(forced.status, 0, forced.stderr);
  assert.match(forced.stdout, new RegExp(`deactivated ${activation!.id}\\ndeleted node: 1 device\\(s\\) removed`));
  assert.deepEqual(dmNames(), [], "no activation device, no layer device left active");
  const ids = await thinIds();
  assert.equal(ids.includes(node.thinId), false, "node's own top device is gone");
  assert.equal(ids.includes(activation!.thinId), false, "and the activation's snapshot");
  for (const layer of python.layers) assert.ok(ids.includes(layer.thinId), `python's layer ${layer.position} device stays`);
  assert.deepEqual(ids, python.layers.map((l) => l.thinId).sort((a, b) => a - b));
  assert.equal(imgctl("image", "node").status, 3, "node is forgotten: NOT_FOUND exits 3");
});

test("gc removes the blob only node used, and keeps python's", async () => {
  const before = blobs();
  assert.equal(before.length, 6, "node 1-5 + python 5");
  const result = await client.collectGarbage({});
  assert.equal(result.removedBlobs.length, 1);
  assert.deepEqual(blobs(), python.layers.map((l) => l.digest.slice(7)).sort());
  assert.equal(imgctl("doctor").status, 0);
});

test("startup reconciliation repairs leaks planted while the agent was stopped; then gc empties the pool", async () => {
  sh("vm-agent", "stop");
  close();
  // 1. a thin id made behind the agent's back (never allocated by its catalog: kept, reported,
  // left to the operator), and one the catalog allocated and lost the row of (repaired)
  dmsetup("message", pool, "0", "create_thin 9000");
  // 2. an "allocated" device row (a crash mid-build), its thin id made and active
  const chain = "sha256:" + "ab".repeat(32);
  const halfName = "imgd-layer-" + "ab".repeat(16);
  const dbPath = join(stateDir, "imgd.db");
  const owner = statSync(dbPath);
  const db = new Database(dbPath);
  const now = new Date().toISOString();
  const lostId = Number(db.prepare("INSERT INTO thin_ids (owner, allocated_at) VALUES ('lost', ?)").run(now).lastInsertRowid);
  db.prepare("DELETE FROM thin_ids WHERE thin_id = ?").run(lostId);
  const halfId = Number(db.prepare("INSERT INTO thin_ids (owner, allocated_at) VALUES (?, ?)").run(`device ${chain}`, now).lastInsertRowid);
  db.prepare("INSERT INTO devices (chain_id, thin_id, parent_chain_id, layer_digest, name, state, created_at) VALUES (?, ?, NULL, ?, ?, 'allocated', ?)").run(chain, halfId, chain, halfName, now);
  // ... and python forgotten, as a crash between a deletion's "forget" and "remove-devices" leaves it
  db.prepare("DELETE FROM images WHERE name = 'python'").run();
  db.close();
  // Files root just created next to the database must stay the agent's.
  for (const file of readdirSync(stateDir).filter((f) => f.startsWith("imgd.db"))) chownSync(join(stateDir, file), owner.uid, owner.gid);
  dmsetup("message", pool, "0", `create_thin ${halfId}`);
  dmsetup("message", pool, "0", `create_thin ${lostId}`);
  dmsetup("create", halfName, "--noudevsync", "--table", `0 ${THIN_SECTORS} thin /dev/mapper/${pool} ${halfId}`);
  // 3. a ready layer device left active
  const stray = python.layers[1]!;
  const strayName = "imgd-layer-" + stray.chainId.slice(7, 39);
  dmsetup("create", strayName, "--noudevsync", "--table", `0 ${THIN_SECTORS} thin /dev/mapper/${pool} ${stray.thinId}`);
  // 4. a leftover download
  const temp = join(stateDir, "tmp", "leftover-download.part");
  writeFileSync(temp, "half a layer");
  chownSync(temp, owner.uid, owner.gid);
  assert.deepEqual(dmNames(), [halfName, strayName].sort());

  sh("vm-agent", "start");
  connect();
  const ids = await thinIds();
  assert.equal(ids.includes(lostId), false, "the catalog's lost thin id deleted");
  assert.equal(ids.includes(9000), true, "a thin id the catalog never allocated is kept");
  assert.equal(ids.includes(halfId), false, "half-made device's thin id deleted");
  assert.ok(ids.includes(stray.thinId), "the stray device's thin id (a ready layer) is kept");
  assert.deepEqual(dmNames(), [], "both devices removed");
  assert.equal(existsSync(temp), false, "temp file removed");
  const log = readFileSync("/tmp/imgd-vm-logs/agent.log", "utf8");
  for (const kind of [`UNKNOWN_THIN_ID thin id ${lostId}`, `HALF_MADE_DEVICE ${halfName}`, `STRAY_DEVICE ${strayName}`, "STRAY_TEMP_FILE leftover-download.part"]) {
    assert.match(log, new RegExp(`reconcile: repaired ${kind}`), kind);
  }
  assert.match(log, /reconcile: the pool holds 1 thin id\(s\) this catalog never allocated \(9000\); nothing was deleted/);
  const foreign = imgctl("doctor");
  assert.equal(foreign.status, 1, foreign.stdout);
  assert.match(foreign.stdout, /^FOREIGN_THIN_ID thin id 9000: /m);
  const wiped = imgctl("doctor", "--wipe-pool");
  assert.equal(wiped.status, 0, wiped.stdout);
  assert.equal((await thinIds()).includes(9000), false, "the operator's --wipe-pool deleted it");
  const doctor = imgctl("doctor");
  assert.equal(doctor.status, 0, doctor.stdout);
  assert.match(doctor.stdout, /^clean$/m);

  // python's devices are referenced by nothing now: gc removes them and every blob.
  const gc = await client.collectGarbage({});
  assert.equal(gc.removedDevices.length, 5);
  assert.deepEqual(await thinIds(), []);
  assert.deepEqual(blobs(), []);
  assert.equal((await client.listImages({})).images.length, 0);
  assert.equal(imgctl("doctor").status, 0);
});
