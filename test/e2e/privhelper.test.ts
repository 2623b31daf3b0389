// The real helper against a real device-mapper kernel, inside the test VM (npm run test:vm):
//   test/vm/run --no-services -- node --test test/e2e/privhelper.test.ts
// Uses its own pool name, socket, state and blob directories, so it does not disturb services.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { appendFileSync, chownSync, existsSync, mkdirSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createConnection } from "node:net";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import tar from "tar-stream";
import { HelperClient, HelperError } from "../../agent/helper-client.ts";
import { withMounted } from "../helpers/mount.ts";

const opts = {};
assert.ok(process.env.IMGD_VM === "1" && process.getuid?.() === 0, "device-mapper tests run as root inside the VM: npm run test:vm");

// The helper as deployed: its bundle (test/vm/run builds it before the VM boots).
const MAIN = fileURLToPath(new URL("../../dist/imgd-privhelper.mjs", import.meta.url));
const POOL = "imgd-vmtest-pool";
const SOCKET = "/run/imgd-vmtest/privhelper.sock";
const STATE = "/var/lib/imgd-privhelper-vmtest";
const BLOBS = "/var/lib/imgd-vmtest/blobs";
const LOG = "/tmp/imgd-vmtest-helper.log";
const ACT = "imgd-act-01jd5x7k3m9q2w8e4r6t0y1u3i";
const layer = (n: number) => `imgd-layer-${n.toString(16).padStart(32, "0")}`;
const MiB = 1024 * 1024;

let helper: ChildProcess | null = null;
let client: HelperClient;

async function startHelper(): Promise<void> {
  const child = spawn(process.execPath, [MAIN], {
    env: { ...process.env, IMGD_HELPER_SOCKET: SOCKET, IMGD_HELPER_GROUP: "0", IMGD_HELPER_STATE_DIR: STATE, IMGD_BLOB_DIR: BLOBS, IMGD_POOL_NAME: POOL, IMGD_POOL_DATA_SIZE: "256M" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  child.stderr!.on("data", (chunk) => appendFileSync(LOG, chunk));
  helper = child;
  const connectable = () => new Promise<boolean>((resolve) => {
    const socket = createConnection(SOCKET);
    socket.once("connect", () => { socket.destroy(); resolve(true); });
    socket.once("error", () => resolve(false));
  });
  for (let i = 0; i < 600 && !(await connectable()); i++) await new Promise((r) => setTimeout(r, 100));
  assert.ok(await connectable(), `helper did not listen; log:\n${readFileSync(LOG, "utf8")}`);
  client = new HelperClient(SOCKET);
}

/**
 * Stops the helper, then closes the client. `pending`: calls that must first see the connection
 * lost (the process's exit can be reported before the client's socket closes; closing the client
 * first would end them with CLIENT_CLOSED instead).
 */
async function stopHelper(signal: NodeJS.Signals = "SIGTERM", pending: Promise<unknown>[] = []): Promise<void> {
  const child = helper!;
  helper = null;
  if (child.exitCode === null) {
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill(signal);
    await exited;
  }
  await Promise.all(pending);
  client.close();
}

async function blob(entries: { header: Partial<tar.Header> & { name: string }; body?: string | Buffer }[]): Promise<string> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const done = (async () => { for await (const chunk of pack) chunks.push(chunk as Buffer); })();
  for (const { header, body } of entries) {
    await new Promise<void>((resolve, reject) => {
      const callback = (err?: Error | null) => (err ? reject(err) : resolve());
      if (body === undefined) pack.entry(header as tar.Header, callback);
      else pack.entry(header as tar.Header, body, callback);
    });
  }
  pack.finalize();
  await done;
  const data = Buffer.concat(chunks);
  const hex = createHash("sha256").update(data).digest("hex");
  plantBlob(hex, data);
  return `sha256:${hex}`;
}

// The helper applies only blobs owned by the agent's user (IMGD_AGENT_USER, default imgd).
const imgdUid = Number(execFileSync("/usr/bin/id", ["-u", "imgd"]).toString().trim());
function plantBlob(hex: string, data: Buffer): void {
  const path = join(BLOBS, "sha256", hex);
  writeFileSync(path, data);
  chownSync(path, imgdUid, imgdUid);
}

async function refused(promise: Promise<unknown>, code: string): Promise<HelperError> {
  let caught: unknown;
  await assert.rejects(promise, (err: unknown) => ((caught = err), err instanceof HelperError && err.code === code));
  return caught as HelperError;
}

const dmsetup = (...args: string[]) => execFileSync("/usr/sbin/dmsetup", args).toString();
const mountinfo = () => readFileSync("/proc/self/mountinfo", "utf8");
const applierRunning = () => readdirSync("/proc").filter((p) => /^[0-9]+$/.test(p)).some((p) => {
  try { return readFileSync(`/proc/${p}/cmdline`, "utf8").includes("dist/imgd-applier.mjs"); } catch { return false; }
});

/** Removes everything this file created in the kernel (devices, pool, loop devices). */
function teardownKernelState(): void {
  const names = dmsetup("info", "-c", "--noheadings", "-o", "name").split("\n").map((l) => l.trim());
  for (const name of names.filter((n) => n.startsWith("imgd-") && n !== POOL)) {
    const table = dmsetup("table", name);
    if (table.includes(" thin ")) execFileSync("/usr/sbin/dmsetup", ["remove", name], { stdio: "ignore" });
  }
  if (names.includes(POOL)) execFileSync("/usr/sbin/dmsetup", ["remove", POOL], { stdio: "ignore" });
  for (const file of ["meta", "data"]) {
    const out = execFileSync("/usr/sbin/losetup", ["--associated", join(STATE, "pool", file)]).toString();
    for (const match of out.matchAll(/^(\/dev\/loop[0-9]+):/gm)) execFileSync("/usr/sbin/losetup", ["--detach", match[1]!]);
  }
}

before(async () => {
  for (const dir of [STATE, "/var/lib/imgd-vmtest"]) rmSync(dir, { recursive: true, force: true });
  mkdirSync(join(BLOBS, "sha256"), { recursive: true });
  writeFileSync(LOG, "");
  await startHelper();
});

after(async () => {
  if (helper) await stopHelper();
  teardownKernelState();
});

test("pool.ensure creates the pool from config; pool.status reads it", opts, async () => {
  await refused(client.call("pool.status", {}), "POOL_MISSING");
  const pool = await client.call("pool.ensure", {});
  assert.deepEqual({ ...pool, metaUsedBytes: 0, id: "" }, {
    name: POOL, dataUsedBytes: 0, dataTotalBytes: 256 * MiB, metaUsedBytes: 0, metaTotalBytes: MiB,
    mode: "rw", blockSizeBytes: MiB, errorIfNoSpace: true, id: "",
  });
  // Its identity (privhelper/pool-identity.ts), on disk beside the origin records.
  assert.match(pool.id ?? "", /^[0-9a-f]{32}$/);
  assert.equal(readFileSync(join(STATE, "pool-id"), "utf8"), `${pool.id}\n`);
  assert.equal(statSync(join(STATE, "pool/data")).size, 256 * MiB);
  assert.equal(statSync(join(STATE, "pool/meta")).mode & 0o777, 0o600);
  assert.match(dmsetup("table", POOL), /^0 524288 thin-pool \d+:\d+ \d+:\d+ 2048 \d+ 1 error_if_no_space/);
  assert.deepEqual(await client.call("pool.ensure", {}), await client.call("pool.status", {}));
});

test("thin.create, device.activate (repeats succeed, conflicts refused), fs.mkfs", opts, async () => {
  await client.call("thin.create", { thinId: 1 });
  await client.call("thin.create", { thinId: 1 }); // a repeat (after a crash): same request, success
  const { path } = await client.call("device.activate", { name: layer(1), thinId: 1 });
  assert.equal(path, `/dev/mapper/${layer(1)}`);
  assert.ok(statSync(path).isBlockDevice());
  assert.deepEqual(await client.call("device.activate", { name: layer(1), thinId: 1 }), { path });
  await refused(client.call("device.activate", { name: layer(1), thinId: 2 }), "CONFLICT");
  await refused(client.call("device.activate", { name: layer(2), thinId: 1 }), "BUSY");
  await refused(client.call("device.activate", { name: layer(2), thinId: 99 }), "NOT_OURS"); // not made by the helper
  assert.equal(existsSync(`/dev/mapper/${layer(2)}`), false);
  assert.doesNotMatch(dmsetup("info", "-c", "--noheadings", "-o", "name"), new RegExp(layer(2)));

  await client.call("fs.mkfs", { name: layer(1) });
  await refused(client.call("fs.mkfs", { name: layer(1) }), "HAS_FILESYSTEM");
  const used = (await client.call("pool.status", {})).dataUsedBytes;
  assert.ok(used < 64 * MiB, `mkfs of an 8 GiB thin device provisioned ${used} bytes`);
});

const precious = "/etc/imgd-vmtest-precious";

test("layer.apply: content lands in the device, never on the host; refusals", opts, async () => {
  writeFileSync(precious, "host data");
  const first = await blob([
    { header: { name: "etc/", type: "directory", mode: 0o755 } },
    { header: { name: "etc/os-release", mode: 0o644 }, body: "ID=vmtest\n" },
    { header: { name: "usr/bin/su", mode: 0o4755 }, body: "su" },
    { header: { name: "bin", type: "symlink", linkname: "usr/bin" } },
    { header: { name: "escape", type: "symlink", linkname: precious } },
    { header: { name: "old/a", mode: 0o644 }, body: "lower" },
    { header: { name: "opq/lower", mode: 0o644 }, body: "lower" },
    { header: { name: "big", mode: 0o644 }, body: Buffer.alloc(8 * MiB, 7) },
  ]);
  assert.deepEqual(await client.call("layer.apply", { name: layer(1), digest: first }), { entries: 8, bytes: statSync(join(BLOBS, "sha256", first.slice(7))).size });
  assert.doesNotMatch(mountinfo(), /apply-/);
  assert.equal(existsSync(join(STATE, "mnt", `apply-${layer(1)}`)), false);
  // The applier's compiled code is kept for the next layer, in a directory only root can write.
  const cache = statSync(join(STATE, "compile-cache"));
  assert.equal(cache.mode & 0o777, 0o700);
  assert.ok(readdirSync(join(STATE, "compile-cache")).length > 0, "the applier left no compile cache");

  await refused(client.call("layer.apply", { name: layer(1), digest: `sha256:${"0".repeat(64)}` }), "BLOB_MISSING");
  const notTar = Buffer.from("not a tar");
  const notTarHex = createHash("sha256").update(notTar).digest("hex");
  plantBlob(notTarHex, notTar);
  await refused(client.call("layer.apply", { name: layer(1), digest: `sha256:${notTarHex}` }), "LAYER_REFUSED");
  plantBlob("2".repeat(64), readFileSync(join(BLOBS, "sha256", first.slice(7))));
  // A blob the agent does not own is not read at all.
  writeFileSync(join(BLOBS, "sha256", "3".repeat(64)), "root's");
  assert.match((await refused(client.call("layer.apply", { name: layer(1), digest: `sha256:${"3".repeat(64)}` }), "BLOB_REFUSED")).message, /owned by uid 0/);
  await refused(client.call("layer.apply", { name: layer(1), digest: `sha256:${"2".repeat(64)}` }), "BLOB_MISMATCH");
  // (Device nodes apply now, as real root filesystems need; a foreign xattr namespace is refused.)
  const foreign = await blob([{ header: { name: "x", mode: 0o644, pax: { "SCHILY.xattr.trusted.overlay.opaque": "y" } }, body: "" }]);
  const err = await refused(client.call("layer.apply", { name: layer(1), digest: foreign }), "LAYER_REFUSED");
  assert.match(err.message, /BAD_XATTR/);
  await refused(client.call("layer.apply", { name: layer(5), digest: first }), "NOT_FOUND");
});

test("thin.snapshot of an active origin; a second layer with whiteouts on the snapshot", opts, async () => {
  await client.call("thin.snapshot", { thinId: 2, originId: 1 });
  await client.call("thin.snapshot", { thinId: 2, originId: 1 }); // a repeat: success
  const exists = await refused(client.call("thin.create", { thinId: 2 }), "EXISTS"); // made otherwise
  assert.match(exists.message, /snapshot of 1/);
  await refused(client.call("thin.snapshot", { thinId: 3, originId: 77 }), "NOT_FOUND");
  await refused(client.call("thin.delete", { thinId: 1 }), "BUSY");
  await client.call("device.deactivate", { name: layer(1) });
  await client.call("device.deactivate", { name: layer(1) });
  assert.equal(existsSync(`/dev/mapper/${layer(1)}`), false);

  await client.call("device.activate", { name: layer(2), thinId: 2 });
  const second = await blob([
    { header: { name: ".wh.old", mode: 0o644 }, body: "" },
    { header: { name: "opq/", type: "directory", mode: 0o755 } },
    { header: { name: "opq/.wh..wh..opq", mode: 0o644 }, body: "" },
    { header: { name: "opq/upper", mode: 0o644 }, body: "upper" },
    { header: { name: "escape", mode: 0o644 }, body: "written into the image" },
  ]);
  assert.equal((await client.call("layer.apply", { name: layer(2), digest: second })).entries, 5);
  assert.deepEqual((await client.call("device.list", {})).devices, [{ name: layer(2), thinId: 2 }]);
  await client.call("device.deactivate", { name: layer(2) });
  assert.equal(readFileSync(precious, "utf8"), "host data");
});

test("an activation: snapshot of the image with its exact content; never formatted, applied to, or reused as a layer", opts, async () => {
  await client.call("thin.snapshot", { thinId: 3, originId: 2 });
  await client.call("device.activate", { name: ACT, thinId: 3 });
  await withMounted(`/dev/mapper/${ACT}`, async (mnt) => {
    assert.equal(readFileSync(join(mnt, "etc/os-release"), "utf8"), "ID=vmtest\n");
    assert.equal(statSync(join(mnt, "usr/bin/su")).mode & 0o7777, 0o4755);
    assert.equal(readlinkSync(join(mnt, "bin")), "usr/bin");
    assert.equal(readFileSync(join(mnt, "escape"), "utf8"), "written into the image");
    assert.equal(existsSync(join(mnt, "old")), false);
    assert.deepEqual(readdirSync(join(mnt, "opq")), ["upper"]);
    assert.equal(statSync(join(mnt, "big")).size, 8 * MiB);
    await refused(client.call("device.deactivate", { name: ACT }), "BUSY");
  });
  // The helper mounts nothing in the host's namespace any more: no op for it exists.
  await refused(client.call("fs.mount" as "fs.mkfs", { name: ACT, readOnly: true } as never), "UNKNOWN_OP");
  await refused(client.call("fs.mkfs", { name: ACT }), "WRONG_ROLE");
  await refused(client.call("layer.apply", { name: ACT, digest: `sha256:${"2".repeat(64)}` }), "WRONG_ROLE");
  await client.call("device.deactivate", { name: ACT });
  // An activation's thin id stays an activation, and so does a snapshot of it.
  await refused(client.call("device.activate", { name: layer(9), thinId: 3 }), "WRONG_ROLE");
  await client.call("thin.snapshot", { thinId: 4, originId: 3 });
  await refused(client.call("device.activate", { name: layer(9), thinId: 4 }), "WRONG_ROLE");
  await client.call("thin.delete", { thinId: 4 });
});

test("restart and 'reboot': the pool is found again, or rebuilt from its files with its thin devices", opts, async () => {
  const before = await client.call("pool.status", {});
  await stopHelper();
  assert.equal(existsSync(SOCKET), false, "socket removed on SIGTERM");
  await startHelper();
  assert.equal((await client.call("pool.ensure", {})).dataUsedBytes, before.dataUsedBytes);
  await stopHelper();
  teardownKernelState(); // what a reboot does: no dm devices, no loop devices
  await startHelper();
  const rebuilt = await client.call("pool.ensure", {});
  assert.equal(rebuilt.dataUsedBytes, before.dataUsedBytes);
  assert.equal(rebuilt.id, before.id, "the same metadata is the same pool: its identity is kept");
  await client.call("device.activate", { name: ACT, thinId: 3 });
  await withMounted(`/dev/mapper/${ACT}`, (path) => assert.equal(readFileSync(join(path, "etc/os-release"), "utf8"), "ID=vmtest\n"));
  await client.call("device.deactivate", { name: ACT });
  for (const id of [3, 2, 1, 1]) await client.call("thin.delete", { thinId: id });
  assert.equal((await client.call("pool.status", {})).dataUsedBytes, 0);
});

test("an existing pool that queues writes when full is switched to error_if_no_space", opts, async () => {
  const table = dmsetup("table", POOL).trim();
  assert.match(table, / 1 error_if_no_space$/);
  await stopHelper();
  // What the challenge README's table gives: no feature arguments, the kernel's queue_if_no_space.
  dmsetup("reload", POOL, "--table", table.replace(/ 1 error_if_no_space$/, ""));
  dmsetup("resume", POOL);
  assert.match(dmsetup("status", POOL), /queue_if_no_space/);
  await startHelper();
  assert.equal((await client.call("pool.ensure", {})).errorIfNoSpace, true);
  assert.equal(dmsetup("table", POOL).trim(), table);
});

test("a volume manager's pool (a device-mapper uuid, as LVM gives its thin pools) is refused and left as it is", opts, async () => {
  await stopHelper();
  // A pool made elsewhere, with the kernel's default queue_if_no_space, then given LVM's kind of uuid.
  dmsetup("reload", POOL, "--table", dmsetup("table", POOL).trim().replace(/ 1 error_if_no_space$/, ""));
  dmsetup("resume", POOL);
  dmsetup("rename", POOL, "--setuuid", "LVM-imgdvmtestXq3W0DlZsYc7AbCdEfGhIjKlMnOpQrSt-tpool");
  const table = dmsetup("table", POOL);
  try {
    await startHelper();
    for (const call of [client.call("pool.ensure", {}), client.call("thin.create", { thinId: 20 }), client.call("thin.list", {})]) {
      const err = await refused(call, "POOL_INVALID");
      assert.match(err.message, /belongs to a volume manager \(device-mapper uuid "LVM-imgdvmtest.*-tpool"\)/);
    }
    assert.equal(dmsetup("table", POOL), table, "its table is not reloaded");
    assert.doesNotMatch(dmsetup("status", POOL), /error_if_no_space/);
  } finally {
    // A uuid cannot be taken off a device: back to a pool of imgd's own, as after a reboot.
    if (helper) await stopHelper();
    teardownKernelState();
    await startHelper();
  }
  assert.equal((await client.call("pool.ensure", {})).errorIfNoSpace, true);
  await client.call("thin.create", { thinId: 20 });
  await client.call("thin.delete", { thinId: 20 });
});

test("a layer larger than the pool fails with NO_SPACE (no hang) and the pool recovers", opts, async () => {
  await client.call("thin.create", { thinId: 10 });
  await client.call("device.activate", { name: layer(10), thinId: 10 });
  await client.call("fs.mkfs", { name: layer(10) });
  const huge = await blob([{ header: { name: "huge", mode: 0o644 }, body: Buffer.alloc(300 * MiB, 1) }]);
  await refused(client.call("layer.apply", { name: layer(10), digest: huge }), "NO_SPACE");
  assert.equal((await client.call("pool.status", {})).mode, "out_of_data_space");
  await client.call("device.deactivate", { name: layer(10) });
  await client.call("thin.delete", { thinId: 10 });
  const pool = await client.call("pool.status", {});
  assert.deepEqual([pool.mode, pool.dataUsedBytes], ["rw", 0]);
});

test("helper killed (-9) during layer.apply: the applier dies too; the device can be discarded", opts, async () => {
  await client.call("thin.create", { thinId: 11 });
  await client.call("device.activate", { name: layer(11), thinId: 11 });
  await client.call("fs.mkfs", { name: layer(11) });
  const slow = await blob(Array.from({ length: 40 }, (_, i) => ({ header: { name: `f${i}`, mode: 0o644 }, body: Buffer.alloc(2 * MiB, i) })));
  const pending = client.call("layer.apply", { name: layer(11), digest: slow }).catch((err: unknown) => err);
  // Node's start under emulation takes seconds, and more on a loaded machine (5 s were once too few).
  for (const deadline = Date.now() + 30_000; Date.now() < deadline && !applierRunning(); ) await new Promise((r) => setTimeout(r, 25));
  if (!applierRunning()) {
    const outcome = await Promise.race([pending, new Promise((r) => setTimeout(() => r("still pending"), 100))]);
    assert.fail(`the applier was never seen running; layer.apply: ${outcome instanceof Error ? outcome.message : String(outcome)}`);
  }
  await stopHelper("SIGKILL", [pending]);
  assert.equal(((await pending) as HelperError).code, "CONNECTION_LOST");
  for (let i = 0; i < 100 && applierRunning(); i++) await new Promise((r) => setTimeout(r, 50));
  assert.equal(applierRunning(), false, "the applier died with the helper");
  await startHelper(); // over the stale socket the killed helper left
  await client.call("device.deactivate", { name: layer(11) });
  await client.call("thin.delete", { thinId: 11 });
  assert.doesNotMatch(mountinfo(), new RegExp(`${STATE}/mnt`));
  rmSync(precious, { force: true });
});
