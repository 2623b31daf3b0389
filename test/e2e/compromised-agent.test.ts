// Issue 9: the privilege boundary holds against a fully compromised agent. Inside the VM, with
// the real services: an attacker process with the agent's uid and groups (setpriv as imgd, i.e.
// exactly what an exploited agent is) talks to the real helper (test/helpers/attacker.ts). Every
// attack must be refused with a clear code that also appears in the helper's log, nothing foreign
// (a root-only content store, a foreign dm device named like imgd's, an activation) may change,
// and imgd's own pull must keep working while the attacker floods the helper.
//   flock /tmp/imgd-vm.lock test/vm/run --bucket .vm/synthetic/bucket -- node --test test/e2e/compromised-agent.test.ts
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, closeSync, mkdirSync, openSync, readFileSync, readSync, rmSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { HelperClient } from "../../agent/helper-client.ts";
import { withMounted } from "../helpers/mount.ts";

assert.ok(process.env.IMGD_VM === "1" && process.getuid?.() === 0, "runs as root inside the VM: test/vm/run");

const ATTACKER = fileURLToPath(new URL("../helpers/attacker.ts", import.meta.url));
const HELPER_LOG = "/tmp/imgd-vm-logs/helper.log";
const STATE = "/var/lib/imgd";
const SECRET_STORE = "/root/imgd-test-secret-store"; // a root-only content store (like containerd's)
const FOREIGN = `imgd-layer-${"f".repeat(32)}`; // a device imgd did not make, named like its own
const FOREIGN_FILE = "/root/imgd-test-foreign.img";
const ATTACKER_THIN = 0xdead01;

const sh = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: "utf8" });
const dmsetup = (...args: string[]) => sh("/usr/sbin/dmsetup", ...args);
const sha256 = (data: Buffer | string) => createHash("sha256").update(data).digest("hex");
const imgdUid = Number(sh("/usr/bin/id", "-u", "imgd").trim());
/** sha256 of a block device's first 4 MiB (its ext4 superblock, group descriptors, journal start). */
function headHash(device: string): string {
  const fd = openSync(device, "r");
  try {
    const buffer = Buffer.alloc(4 * 1024 * 1024);
    return sha256(buffer.subarray(0, readSync(fd, buffer, 0, buffer.length, 0)));
  } finally {
    closeSync(fd);
  }
}

type Outcome = { attack: string; code: string; message: string };

/** Runs one attack as the agent's user; returns what the helper answered to each step. */
function asAgent(...args: string[]): Promise<Outcome[]> {
  return new Promise((resolve, reject) => {
    const child = spawn("/usr/bin/setpriv", ["--reuid", "imgd", "--regid", "imgd", "--init-groups", "--", process.execPath, ATTACKER, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (c: Buffer) => (out += c.toString()));
    child.stderr.on("data", (c: Buffer) => (err += c.toString()));
    child.once("exit", (code) => {
      if (code !== 0) return reject(new Error(`attacker ${args[0]} exited ${code}: ${err}${out}`));
      resolve(out.trim().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as Outcome));
    });
  });
}

function imgctl(...args: string[]): { status: number | null; out: string } {
  const r = spawnSync("imgctl", args, { encoding: "utf8" });
  return { status: r.status, out: r.stdout + r.stderr };
}

/** The helper's log lines since `from` (a byte offset), parsed. */
function helperLogSince(from: number): Record<string, unknown>[] {
  return readFileSync(HELPER_LOG).subarray(from).toString().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as Record<string, unknown>);
}
const logSize = () => readFileSync(HELPER_LOG).byteLength;

let secret: { digest: string; path: string; hash: string };
let foreign: { table: string; loop: string; hash: string };
let activation: { name: string; thinId: number };
let layerDigest: string;
const root = new HelperClient(process.env.IMGD_HELPER_SOCKET ?? "/run/imgd/privhelper.sock");

before(() => {
  // imgd's own image and activation, beside which the attacks happen.
  assert.equal(imgctl("pull", "node").status, 0);
  const act = imgctl("activate", "node");
  assert.equal(act.status, 0, act.out);
  const name = /(imgd-act-[0-9a-z]{26})/.exec(act.out)![1]!;
  activation = { name, thinId: Number(/ thin [0-9]+:[0-9]+ ([0-9]+)$/m.exec(dmsetup("table", name).trim())![1]) };
  layerDigest = `sha256:${sh("/usr/bin/ls", `${STATE}/blobs/sha256`).split("\n")[0]!}`;

  // A root-only store holding a valid layer blob (a tar with a secret) under sha256/<hex>.
  const tar = execFileSync("/usr/bin/tar", ["-c", "-C", "/etc", "hostname"]);
  const hex = sha256(tar);
  mkdirSync(`${SECRET_STORE}/sha256`, { recursive: true, mode: 0o700 });
  chmodSync(SECRET_STORE, 0o700);
  writeFileSync(`${SECRET_STORE}/sha256/${hex}`, tar, { mode: 0o600 });
  secret = { digest: `sha256:${hex}`, path: `${SECRET_STORE}/sha256/${hex}`, hash: sha256(tar) };

  // A foreign device named like an imgd layer: linear over a loop file carrying ext4 and a file.
  writeFileSync(FOREIGN_FILE, Buffer.alloc(16 * 1024 * 1024));
  sh("/usr/sbin/mkfs.ext4", "-q", FOREIGN_FILE);
  const loop = sh("/usr/sbin/losetup", "--find", "--show", FOREIGN_FILE).trim();
  dmsetup("create", FOREIGN, "--noudevsync", "--table", `0 32768 linear ${loop} 0`);
  dmsetup("mknodes", FOREIGN);
  foreign = { table: dmsetup("table", FOREIGN), loop, hash: sha256(readFileSync(FOREIGN_FILE)) };
});

after(async () => {
  spawnSync("/usr/sbin/dmsetup", ["remove", FOREIGN]);
  if (foreign) spawnSync("/usr/sbin/losetup", ["--detach", foreign.loop]);
  rmSync(FOREIGN_FILE, { force: true });
  rmSync(SECRET_STORE, { recursive: true, force: true });
  const name = `imgd-layer-${ATTACKER_THIN.toString(16).padStart(32, "a")}`;
  await root.call("device.deactivate", { name }).catch(() => undefined);
  await root.call("thin.delete", { thinId: ATTACKER_THIN }).catch(() => undefined);
  root.close();
});

/** Each outcome refused with its expected code, and each refusal in the helper's log under the agent's uid. */
function assertRefused(outcomes: Outcome[], expected: Record<string, string[]>, logFrom: number): void {
  console.log(outcomes.map((o) => `  ${o.attack}: ${o.code}: ${o.message}`).join("\n"));
  assert.deepEqual(outcomes.map((o) => o.attack).sort(), Object.keys(expected).sort());
  const log = helperLogSince(logFrom);
  for (const o of outcomes) {
    assert.ok(expected[o.attack]!.includes(o.code), `${o.attack}: ${o.code}: ${o.message}`);
    assert.ok(log.some((l) => l.code === o.code && l.uid === imgdUid && l.ok === false), `${o.attack}: no ${o.code} line for uid ${imgdUid} in the helper's log`);
  }
}

test("a symlinked blob directory into a root-only store: the helper never reads the secret", async () => {
  const from = logSize();
  const outcomes = await asAgent("blob-symlink", STATE, SECRET_STORE, secret.digest, String(ATTACKER_THIN));
  assertRefused(outcomes, {
    "apply a root-only blob through a symlinked blobs/": ["BLOB_REFUSED"],
    "apply a root-only blob through a symlinked blobs/sha256/": ["BLOB_REFUSED"],
  }, from);
  // Nothing of the secret reached the attacker's device.
  const name = `imgd-layer-${ATTACKER_THIN.toString(16).padStart(32, "a")}`;
  await withMounted(`/dev/mapper/${name}`, (dir) => assert.deepEqual(sh("/usr/bin/ls", "-A", dir).trim().split("\n").filter((n) => n !== "lost+found" && n !== ""), []));
  assert.equal(sha256(readFileSync(secret.path)), secret.hash);
});

test("an activation is never mounted, formatted, applied to, or re-activated as a layer", async () => {
  const from = logSize();
  const before = headHash(`/dev/mapper/${activation.name}`);
  const outcomes = await asAgent("activation", activation.name, String(activation.thinId), layerDigest);
  assertRefused(outcomes, {
    "mount an activation (fs.mount)": ["UNKNOWN_OP"],
    "format an activation": ["WRONG_ROLE"],
    "apply a layer to an activation": ["WRONG_ROLE"],
    "activate an activation's thin id under a layer name": ["WRONG_ROLE", "BUSY"],
  }, from);
  assert.equal(headHash(`/dev/mapper/${activation.name}`), before);
});

test("a foreign device named like an imgd layer is never applied to, formatted or removed", async () => {
  const from = logSize();
  const outcomes = await asAgent("foreign", FOREIGN, layerDigest);
  assertRefused(outcomes, {
    "apply a layer to a foreign device named like a layer": ["NOT_OURS"],
    "format a foreign device": ["NOT_OURS"],
    "deactivate a foreign device": ["NOT_OURS"],
    "activate over a foreign device's name": ["CONFLICT", "NOT_OURS"],
  }, from);
  assert.equal(dmsetup("table", FOREIGN), foreign.table, "the foreign device is still there, unchanged");
  spawnSync("/usr/bin/sync");
  assert.equal(sha256(readFileSync(FOREIGN_FILE)), foreign.hash, "its content is unchanged");
});

test("a flood and hundreds of connections: capped, logged boundedly, while imgd's own pull keeps working", async () => {
  const from = logSize();
  const flood = asAgent("flood", "25");
  await new Promise((r) => setTimeout(r, 2000)); // the flood is under way
  // imgd's own work during the flood: a pull of another image, and root's status queries.
  const started = performance.now();
  const pulled = imgctl("pull", "python");
  const pullSeconds = (performance.now() - started) / 1000;
  const latencies: number[] = [];
  for (let i = 0; i < 20; i++) {
    const t = performance.now();
    await root.call("pool.status", {});
    latencies.push(performance.now() - t);
  }
  const [done] = await flood;
  const log = helperLogSince(from);
  const codes = (code: string) => log.filter((l) => l.code === code && l.uid === imgdUid);
  console.log(`flood: ${done!.message}; pull of python during it: ${pullSeconds.toFixed(1)} s (status ${pulled.status}); ` +
    `root's pool.status max ${Math.max(...latencies).toFixed(0)} ms; helper log: ${codes("TOO_MANY_REFUSALS").length} TOO_MANY_REFUSALS, ${codes("NOT_READING").length} NOT_READING, ` +
    `${codes("PARTIAL_LINE_IDLE").length} PARTIAL_LINE_IDLE, ${codes("TOO_MANY_CONNECTIONS").length} TOO_MANY_CONNECTIONS, ${log.length} lines in all`);
  assert.equal(pulled.status, 0, `imgd's pull failed during the flood: ${pulled.out}`);
  assert.ok(Math.max(...latencies) < 2000, `root's pool.status took ${Math.max(...latencies).toFixed(0)} ms`);
  // On the VM's emulated CPU the helper answers fewer than 1000 refusals per flooding connection
  // in 25 s, so the cut-off itself may not come (test/unit/privhelper-exhaustion.test.ts checks
  // it); what must hold here: each connection's refusals are logged at most 20 times, each
  // cut-off once.
  const cutOffs = log.filter((l) => (l.code === "TOO_MANY_REFUSALS" || l.code === "NOT_READING") && l.uid === imgdUid);
  assert.equal(new Set(cutOffs.map((l) => l.conn)).size, cutOffs.length, "a cut-off was logged twice");
  const refusals = log.filter((l) => l.code === "BAD_ARGS" && l.uid === imgdUid);
  const perConnection = new Map<unknown, number>();
  for (const l of refusals) perConnection.set(l.conn, (perConnection.get(l.conn) ?? 0) + 1);
  assert.ok(Math.max(0, ...perConnection.values()) <= 20, "a flooding connection's refusals flood the log");
  assert.ok(codes("TOO_MANY_CONNECTIONS").length >= 1, "the connection cap never refused anyone");
  assert.ok(codes("TOO_MANY_CONNECTIONS").length <= 5, "refused connections flood the log");
  assert.ok(log.length < 5000, `${log.length} log lines for one flood`);
  // The helper is still fine afterwards.
  assert.equal((await root.call("pool.status", {})).mode, "rw");
});
