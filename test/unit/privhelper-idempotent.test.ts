// Idempotence of the helper's state-changing ops (privhelper/thin.ts, device.ts, fs.ts), and the
// ownership checks every device op makes first (privhelper/ownership.ts, issue 9 finding 3), on the
// host. This kernel has no device-mapper, so dmsetup and thin_ls are replaced (through the
// PROGRAMS seam of privhelper/run.ts) by a TEST DOUBLE script that models a thin pool in a JSON
// file and answers with the kernel's wording. The real pool is exercised by
// test/e2e/lifecycle.test.ts in the VM.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadConfig } from "../../privhelper/config.ts";
import { applyLayerToDevice } from "../../privhelper/apply/layer-apply.ts";
import { activateDevice, deactivateDevice } from "../../privhelper/device.ts";
import { SYSFS } from "../../privhelper/dm.ts";
import { makeFilesystem } from "../../privhelper/fs.ts";
import { PROGRAMS } from "../../privhelper/run.ts";
import { poolEnsure } from "../../privhelper/pool.ts";
import { createThin, deleteThin, listThinIds, snapshotThin } from "../../privhelper/thin.ts";
import { readOrigin } from "../../privhelper/thin-origins.ts";

const dir = mkdtempSync(join(tmpdir(), "imgd-helper-idem-"));
const poolFile = join(dir, "pool.json");
const config = loadConfig({ IMGD_HELPER_STATE_DIR: join(dir, "state"), IMGD_POOL_NAME: "imgd-pool" });
const saved = { ...PROGRAMS };

// The double: `dmsetup` verbs the helper uses, and `thin_ls` printing the pool's ids. The
// pool's metadata device is the host's /dev/loop0 (7:0; named in the fake sysfs), which thin.list
// checks is that very block device.
// Device numbers come from a fake sysfs (dm.ts's SYSFS seam): the pool is dm-0 (253:0), and each
// device the double creates gets the next dm-N.
const sysfsRoot = join(dir, "sys");
const DMSETUP = `#!${process.execPath}
const fs = require("node:fs");
const file = ${JSON.stringify(poolFile)};
const sysfs = ${JSON.stringify(sysfsRoot)};
const pool = JSON.parse(fs.readFileSync(file, "utf8"));
const save = () => fs.writeFileSync(file, JSON.stringify(pool));
const args = process.argv.slice(2).filter((a) => a !== "--noudevsync");
const die = (msg) => { process.stderr.write(msg + "\\n"); process.exit(1); };
const missing = () => die("Device does not exist.\\nCommand failed.");
const table = (name) => name === "imgd-pool" ? "0 2048 thin-pool 7:0 7:1 128 0 1 error_if_no_space" : pool.devices[name];
pool.log.push(args.join(" ")); save();
switch (args[0]) {
  case "table":
    if (args.length === 1) { for (const name of ["imgd-pool", ...Object.keys(pool.devices)]) console.log(name + ": " + table(name)); break; }
    { const t = table(args[1]); if (!t) missing(); console.log(t); break; }
  case "create": // the kernel shows the pool as major:minor, and the new device in sysfs
    pool.devices[args[1]] = args[3].replace("/dev/mapper/imgd-pool", "253:0"); pool.minor += 1;
    fs.mkdirSync(sysfs + "/block/dm-" + pool.minor + "/dm", { recursive: true });
    fs.writeFileSync(sysfs + "/block/dm-" + pool.minor + "/dm/name", args[1] + "\\n");
    fs.writeFileSync(sysfs + "/block/dm-" + pool.minor + "/dev", "253:" + pool.minor + "\\n");
    save(); break;
  case "remove":
    if (!pool.devices[args[1]]) missing(); delete pool.devices[args[1]];
    for (const dm of fs.readdirSync(sysfs + "/block")) if (fs.readFileSync(sysfs + "/block/" + dm + "/dm/name", "utf8").trim() === args[1]) fs.rmSync(sysfs + "/block/" + dm, { recursive: true });
    save(); break;
  case "mknodes": case "suspend": case "resume": break;
  case "message": {
    const [verb, a, b] = args[3].split(" ");
    const fail = (why) => die("device-mapper: message ioctl on imgd-pool  failed: " + why + "\\nCommand failed.");
    if (verb === "create_thin") { if (pool.thins[a] !== undefined) fail("File exists"); pool.thins[a] = null; }
    else if (verb === "create_snap") { if (pool.thins[a] !== undefined) fail("File exists"); if (pool.thins[b] === undefined) fail("No data available"); pool.thins[a] = Number(b); }
    else if (verb === "delete") { if (pool.thins[a] === undefined) fail("No data available"); delete pool.thins[a]; }
    save(); break;
  }
  default: die("fake dmsetup: unexpected " + args.join(" "));
}
`;
const THIN_LS = `#!${process.execPath}
const pool = JSON.parse(require("node:fs").readFileSync(${JSON.stringify(poolFile)}, "utf8"));
console.log(Object.keys(pool.thins).join("\\n"));
`;

type Pool = { thins: Record<string, number | null>; devices: Record<string, string>; log: string[]; minor: number };
const readPool = (): Pool => JSON.parse(readFileSync(poolFile, "utf8"));
const writePool = (p: Pool) => writeFileSync(poolFile, JSON.stringify(p));

before(() => {
  writePool({ thins: {}, devices: {}, log: [], minor: 0 });
  mkdirSync(join(sysfsRoot, "block/dm-0/dm"), { recursive: true });
  writeFileSync(join(sysfsRoot, "block/dm-0/dm/name"), "imgd-pool\n");
  writeFileSync(join(sysfsRoot, "block/dm-0/dev"), "253:0\n");
  mkdirSync(join(sysfsRoot, "dev/block/7:0"), { recursive: true });
  writeFileSync(join(sysfsRoot, "dev/block/7:0/uevent"), "MAJOR=7\nMINOR=0\nDEVNAME=loop0\nDEVTYPE=disk\n");
  SYSFS.root = sysfsRoot;
  for (const [name, text] of [["dmsetup", DMSETUP], ["thin_ls", THIN_LS]]) {
    writeFileSync(join(dir, name!), text!);
    chmodSync(join(dir, name!), 0o755);
  }
  const programs = PROGRAMS as Record<string, string>;
  programs.dmsetup = join(dir, "dmsetup");
  programs.thinLs = join(dir, "thin_ls");
});

after(() => {
  Object.assign(PROGRAMS as Record<string, string>, saved);
  SYSFS.root = "/sys";
  rmSync(dir, { recursive: true, force: true });
});

test("thin.create: a repeat succeeds; an id made by someone else (no record) stays EXISTS", async () => {
  await createThin(config, 1);
  assert.deepEqual(await readOrigin(config, 1), { origin: null }, "the origin is recorded");
  await createThin(config, 1);
  assert.equal(readPool().thins["1"], null);

  const p = readPool();
  p.thins["7"] = null; // as `dmsetup message imgd-pool 0 "create_thin 7"` by hand
  writePool(p);
  await assert.rejects(createThin(config, 7), { code: "EXISTS", message: /no record of creating it as an empty device/ });
  assert.equal(await readOrigin(config, 7), undefined, "the refused request leaves no record behind");
});

test("thin.snapshot: a repeat with the same origin succeeds; another origin is EXISTS; a missing origin NOT_FOUND", async () => {
  await createThin(config, 2);
  await snapshotThin(config, 3, 1);
  await snapshotThin(config, 3, 1);
  assert.deepEqual(await readOrigin(config, 3), { origin: 1 });
  await assert.rejects(snapshotThin(config, 3, 2), { code: "EXISTS", message: /created as a snapshot of 1, not as a snapshot of 2/ });
  await assert.rejects(createThin(config, 3), { code: "EXISTS", message: /created as a snapshot of 1, not as an empty device/ });
  assert.equal(readPool().thins["3"], 1, "the pool is untouched");
  assert.deepEqual(await readOrigin(config, 3), { origin: 1 }, "and so is the record");
  await assert.rejects(snapshotThin(config, 4, 99), { code: "NOT_FOUND", message: /origin thin id 99 does not exist/ });
  assert.equal(await readOrigin(config, 4), undefined);
});

test("a record left by a crash before the pool message does not block a later request with another origin", async () => {
  await snapshotThin(config, 5, 1);
  const p = readPool();
  delete p.thins["5"]; // the message never reached the pool
  writePool(p);
  await snapshotThin(config, 5, 2);
  assert.equal(readPool().thins["5"], 2);
  assert.deepEqual(await readOrigin(config, 5), { origin: 2 });
});

test("thin.delete: deleting removes the record; deleting what is gone succeeds", async () => {
  await deleteThin(config, 5);
  assert.equal(readPool().thins["5"], undefined);
  assert.equal(existsSync(join(config.stateDir, "thin-origins", "5")), false);
  await deleteThin(config, 5);
  await deleteThin(config, 424242);
  // Recreating a deleted id with another origin is a fresh create, not EXISTS.
  await snapshotThin(config, 5, 3);
  assert.equal(readPool().thins["5"], 3);
});

test("device.activate: the same thin id again succeeds, another is CONFLICT; deactivate of what is gone succeeds", async () => {
  const name = "imgd-act-01jaaaaaaaaaaaaaaaaaaaaaaa";
  assert.deepEqual(await activateDevice(config, name, 3), { path: `/dev/mapper/${name}` });
  const creates = () => readPool().log.filter((l) => l.startsWith("create ")).length;
  const before = creates();
  assert.deepEqual(await activateDevice(config, name, 3), { path: `/dev/mapper/${name}` });
  assert.equal(creates(), before, "nothing is created again");
  // A helper killed between create and mknodes left the device without its /dev/mapper node
  // (no udev): the repeat makes it.
  assert.equal(readPool().log.at(-1), `mknodes ${name}`, "the repeat makes sure the node exists");
  await assert.rejects(activateDevice(config, name, 2), { code: "CONFLICT" });
  await deactivateDevice(config, name);
  assert.equal(readPool().devices[name], undefined);
  await deactivateDevice(config, name);
});

// ---- ownership (issue 9, finding 3) ---------------------------------------------------------------

const LAYER_A = `imgd-layer-${"a".repeat(32)}`;
const LAYER_B = `imgd-layer-${"b".repeat(32)}`;
const ACT_A = "imgd-act-01jbbbbbbbbbbbbbbbbbbbbbbb";
const DIGEST = `sha256:${"0".repeat(64)}`;
const removes = () => readPool().log.filter((l) => l.startsWith("remove ")).length;
const plant = (name: string, table: string) => {
  const p = readPool();
  p.devices[name] = table;
  writePool(p);
};

test("a foreign device named like a layer: apply, mkfs, deactivate and activate over it are refused, nothing removed", async () => {
  plant(LAYER_A, "0 32768 linear 7:3 0");
  const before = removes();
  await assert.rejects(applyLayerToDevice(config, LAYER_A, DIGEST), { code: "NOT_OURS", message: /is not a thin device/ });
  await assert.rejects(makeFilesystem(config, LAYER_A), { code: "NOT_OURS" });
  await assert.rejects(deactivateDevice(config, LAYER_A), { code: "NOT_OURS" });
  await assert.rejects(activateDevice(config, LAYER_A, 1), { code: "CONFLICT" });
  assert.equal(removes(), before, "dmsetup remove never ran");
  assert.equal(readPool().devices[LAYER_A], "0 32768 linear 7:3 0");
  // A thin device of another pool is not ours either.
  plant(LAYER_A, "0 16777216 thin 253:5 1");
  await assert.rejects(deactivateDevice(config, LAYER_A), { code: "NOT_OURS", message: /not of imgd-pool/ });
  await assert.rejects(applyLayerToDevice(config, LAYER_A, DIGEST), { code: "NOT_OURS", message: /not of imgd-pool/ });
  const p = readPool();
  delete p.devices[LAYER_A];
  writePool(p);
});

test("a thin id the helper did not make is never activated, formatted or applied to (removing it is allowed)", async () => {
  const p = readPool();
  p.thins["40"] = null; // made by hand: no origin record
  writePool(p);
  await assert.rejects(activateDevice(config, LAYER_A, 40), { code: "NOT_OURS", message: /not created by this helper/ });
  plant(LAYER_A, "0 16777216 thin 253:0 40");
  await assert.rejects(makeFilesystem(config, LAYER_A), { code: "NOT_OURS", message: /did not create/ });
  await assert.rejects(applyLayerToDevice(config, LAYER_A, DIGEST), { code: "NOT_OURS", message: /did not create/ });
  await deactivateDevice(config, LAYER_A);
  assert.equal(readPool().devices[LAYER_A], undefined);
});

test("roles: an activation (and a snapshot of one) is never formatted, applied to, or activated as a layer", async () => {
  await createThin(config, 50);
  await snapshotThin(config, 51, 50);
  await activateDevice(config, ACT_A, 51);
  assert.deepEqual(await readOrigin(config, 51), { origin: 50, role: "activation" });
  const commands = () => readPool().log.length;
  const before = commands();
  await assert.rejects(makeFilesystem(config, ACT_A), { code: "WRONG_ROLE" });
  await assert.rejects(applyLayerToDevice(config, ACT_A, DIGEST), { code: "WRONG_ROLE" });
  assert.equal(commands(), before, "refused by name, before any command");
  await deactivateDevice(config, ACT_A);
  await assert.rejects(activateDevice(config, LAYER_B, 51), { code: "WRONG_ROLE", message: /is an activation/ });
  await snapshotThin(config, 52, 51);
  assert.deepEqual(await readOrigin(config, 52), { origin: 51, role: "activation" }, "a copy of an activation stays one");
  await assert.rejects(activateDevice(config, LAYER_B, 52), { code: "WRONG_ROLE" });
  // The layer itself: activated as a layer, it cannot become an activation's device either.
  await activateDevice(config, LAYER_B, 50);
  assert.deepEqual(await readOrigin(config, 50), { origin: null, role: "layer" });
  await deactivateDevice(config, LAYER_B);
  await assert.rejects(activateDevice(config, ACT_A, 50), { code: "WRONG_ROLE", message: /is an image layer/ });
});

test("a layer of ours passes the table checks; the node handed to programs must be that very device", async () => {
  await activateDevice(config, LAYER_B, 50);
  // The double has no /dev/mapper node for it (this host has no device-mapper): refused for that.
  await assert.rejects(makeFilesystem(config, LAYER_B), { code: "NOT_OURS", message: /\/dev\/mapper\/imgd-layer-b+ is not device/ });
  await deactivateDevice(config, LAYER_B);
});

test("a pool with a device-mapper uuid (a volume manager's, LVM's say) is refused before any change to it", async () => {
  // What LVM gives its thin pools; the kernel shows it in sysfs, where the helper reads it.
  const uuidFile = join(sysfsRoot, "dev/block/253:0/dm/uuid");
  mkdirSync(join(uuidFile, ".."), { recursive: true });
  writeFileSync(uuidFile, "LVM-Xq3W0DlZsYc7AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefghij-tpool\n");
  try {
    const before = readPool();
    const refusal = { code: "POOL_INVALID", message: /imgd-pool belongs to a volume manager \(device-mapper uuid "LVM-.*-tpool"\)/ };
    await assert.rejects(poolEnsure(config), refusal);
    await assert.rejects(createThin(config, 60), refusal);
    await assert.rejects(snapshotThin(config, 61, 50), refusal);
    await assert.rejects(deleteThin(config, 50), refusal);
    await assert.rejects(activateDevice(config, LAYER_B, 50), refusal);
    await assert.rejects(listThinIds(config), refusal);
    const after = readPool();
    assert.deepEqual(after.thins, before.thins, "no thin id made or deleted");
    assert.deepEqual(after.log.filter((line) => !/^table/.test(line)), before.log.filter((line) => !/^table/.test(line)), "nothing but tables read");
  } finally {
    rmSync(join(sysfsRoot, "dev/block/253:0"), { recursive: true, force: true });
  }
  // Without the uuid (a pool made by hand or by the helper) the same calls work again.
  await activateDevice(config, LAYER_B, 50);
  await deactivateDevice(config, LAYER_B);
});
