// The pool's identity (privhelper/pool-identity.ts, pool.ts): made with the pool's metadata,
// kept while the metadata file is, given to a pool an older helper made, reported by pool.status
// and pool.ensure. This kernel has no device-mapper, so dmsetup, losetup and fallocate are
// replaced (through the PROGRAMS seam of privhelper/run.ts) by TEST DOUBLE scripts that keep the
// devices in a JSON file; the real pool is created by the VM tests (test/e2e/privhelper.test.ts).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadConfig } from "../../privhelper/config.ts";
import { SYSFS } from "../../privhelper/dm.ts";
import { poolEnsure, poolStatus } from "../../privhelper/pool.ts";
import { POOL_ID } from "../../privhelper/protocol.ts";
import { PROGRAMS } from "../../privhelper/run.ts";

const dir = mkdtempSync(join(tmpdir(), "imgd-helper-poolid-"));
const devicesFile = join(dir, "devices.json");
const state = join(dir, "state");
const config = loadConfig({ IMGD_HELPER_STATE_DIR: state, IMGD_POOL_NAME: "imgd-pool", IMGD_POOL_DATA_SIZE: "32M", IMGD_POOL_META_SIZE: "1M" });
const saved = { ...PROGRAMS };

const DMSETUP = `#!${process.execPath}
const fs = require("node:fs");
const file = ${JSON.stringify(devicesFile)};
const devices = JSON.parse(fs.readFileSync(file, "utf8"));
const args = process.argv.slice(2).filter((a) => a !== "--noudevsync");
const missing = () => { process.stderr.write("Device does not exist.\\nCommand failed.\\n"); process.exit(1); };
switch (args[0]) {
  case "table": if (!devices[args[1]]) missing(); console.log(devices[args[1]]); break;
  case "status": if (!devices[args[1]]) missing(); console.log("0 65536 thin-pool 0 34/256 0/16 - rw discard_passdown error_if_no_space - 64"); break;
  case "create": case "reload":
    devices[args[1]] = args[3];
    if (args[0] === "create") devices.identityAtCreate = fs.existsSync(${JSON.stringify(join(dir, "state", "pool-id"))}) ? fs.readFileSync(${JSON.stringify(join(dir, "state", "pool-id"))}, "utf8") : null;
    fs.writeFileSync(file, JSON.stringify(devices)); break;
  case "mknodes": case "resume": break;
  default: process.stderr.write("fake dmsetup: unexpected " + args.join(" ") + "\\n"); process.exit(1);
}
`;
// Attaching a file prints a new loop device; nothing is attached twice in these tests.
const LOSETUP = `#!${process.execPath}
const args = process.argv.slice(2);
if (args[0] === "--associated") process.exit(0);
if (args[0] === "--find") { console.log("/dev/loop" + (Date.now() % 1000)); process.exit(0); }
process.exit(1);
`;
const FALLOCATE = `#!${process.execPath}
const [, length, path] = process.argv.slice(2);
require("node:fs").writeFileSync(path, "");
require("node:fs").truncateSync(path, Number(length));
`;

const devices = (): Record<string, string> => JSON.parse(readFileSync(devicesFile, "utf8"));
const idFile = join(state, "pool-id");
const removePool = () => writeFileSync(devicesFile, "{}"); // as after a reboot: the files stay

before(() => {
  writeFileSync(devicesFile, "{}");
  // pool.ensure looks an existing pool up in sysfs (device.ts, whose pool it is): the kernel
  // would show it as dm-0, with no device-mapper uuid (one made by hand or by the helper).
  mkdirSync(join(dir, "sys/block/dm-0/dm"), { recursive: true });
  writeFileSync(join(dir, "sys/block/dm-0/dm/name"), "imgd-pool\n");
  writeFileSync(join(dir, "sys/block/dm-0/dev"), "253:0\n");
  SYSFS.root = join(dir, "sys");
  for (const [name, text] of [["dmsetup", DMSETUP], ["losetup", LOSETUP], ["fallocate", FALLOCATE]] as const) {
    writeFileSync(join(dir, name), text);
    chmodSync(join(dir, name), 0o755);
  }
  const programs = PROGRAMS as Record<string, string>;
  programs.dmsetup = join(dir, "dmsetup");
  programs.losetup = join(dir, "losetup");
  programs.fallocate = join(dir, "fallocate");
});

after(() => {
  Object.assign(PROGRAMS as Record<string, string>, saved);
  SYSFS.root = "/sys";
  rmSync(dir, { recursive: true, force: true });
});

test("a new pool gets an identity, written durably before the pool exists, and keeps it across re-creations of the same files", async () => {
  const created = await poolEnsure(config);
  assert.match(created.id ?? "", POOL_ID);
  assert.ok(devices()["imgd-pool"], "the pool was created");
  assert.equal(devices().identityAtCreate, `${created.id}\n`, "the identity was on disk before the pool's table was loaded");
  assert.equal(readFileSync(idFile, "utf8"), `${created.id}\n`);
  assert.equal(statSync(idFile).mode & 0o777, 0o600);
  assert.equal(existsSync(`${idFile}.tmp`), false);
  assert.equal((await poolStatus(config)).id, created.id, "pool.status reports it");
  assert.equal((await poolEnsure(config)).id, created.id, "an existing pool keeps it");

  removePool(); // a reboot: the device is gone, the backing files (the pool's metadata) stay
  assert.equal((await poolEnsure(config)).id, created.id, "the same metadata is the same pool");
});

test("new metadata is a new pool: a new identity, even when the old identity file is still there", async () => {
  const old = (await poolEnsure(config)).id;
  removePool();
  rmSync(join(state, "pool"), { recursive: true }); // the backing files deleted: the pool's content is gone
  const fresh = await poolEnsure(config);
  assert.match(fresh.id ?? "", POOL_ID);
  assert.notEqual(fresh.id, old, "a database describing the old pool must not match the new one");
});

test("a pool made by an older helper (no identity) gets one on the next pool.ensure; status alone reports none", async () => {
  await poolEnsure(config);
  rmSync(idFile); // as an older helper left it
  assert.equal((await poolStatus(config)).id, null, "pool.status only reads");
  const given = await poolEnsure(config);
  assert.match(given.id ?? "", POOL_ID);
  assert.equal(readFileSync(idFile, "utf8"), `${given.id}\n`);

  // The same when the device is gone too (a reboot before the upgrade): the files are the pool.
  rmSync(idFile);
  removePool();
  const afterReboot = await poolEnsure(config);
  assert.match(afterReboot.id ?? "", POOL_ID);
  assert.equal((await poolStatus(config)).id, afterReboot.id);
});

test("a pool made by hand (someone else's table) gets an identity too; a garbled identity file is replaced, never trusted", async () => {
  rmSync(join(state, "pool"), { recursive: true, force: true });
  rmSync(idFile, { force: true });
  writeFileSync(devicesFile, JSON.stringify({ "imgd-pool": "0 65536 thin-pool 7:0 7:1 128 0 1 error_if_no_space" }));
  const made = await poolEnsure(config);
  assert.match(made.id ?? "", POOL_ID);

  writeFileSync(idFile, "not-an-identity\n");
  assert.equal((await poolStatus(config)).id, null);
  const replaced = await poolEnsure(config);
  assert.match(replaced.id ?? "", POOL_ID);
  assert.notEqual(replaced.id, made.id);
});
