// Pool-full cases, inside the VM (test/vm/run) on a small real thin pool: a layer whose real cost
// is more than the pool's free space once it applies, metadata space nearly full, and many images
// until the pool is nearly full. Every failure must be a clear error, leave nothing behind (no
// thin device, dm table, mount or temp file), and leave the pool writable and usable.
// Images are generated here and uploaded to the guest's S3 server. The tests run in order on one
// pool; the file starts and ends with vm-reset (the last one restores the default pool).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { connectImgd, ImageState, PoolMode, type ImgdClient } from "../../client/sdk.ts";
import { pullOutcome } from "../helpers/pull.ts";
import { chainIds, layerDeviceName } from "../../agent/images/chain.ts";
import { estimatedDataBytes } from "../../agent/images/pool-space.ts";
import { packTar } from "../fixtures/tar-bytes.ts";

const MiB = 1024 * 1024;
const POOL_DATA_SIZE = "224M";
const POOL_NAME = "imgd-pool";
const STATE_DIR = "/var/lib/imgd";
const HELPER_MNT = "/var/lib/imgd-privhelper/mnt";
/** Pool blocks the mid-way case leaves free for the apply: less than its layer needs. */
const LEFT_FOR_THE_APPLY = 6;

let client: ImgdClient;
let close = () => {};
let s3: S3Client;

function connect(): void {
  const c = connectImgd();
  client = c.client;
  close = () => c.channel.close();
}

function vmReset(env: Record<string, string>): void {
  const clean = { ...process.env };
  delete clean.IMGD_POOL_DATA_SIZE;
  delete clean.IMGD_POOL_META_SIZE;
  execFileSync("vm-reset", [], { env: { ...clean, ...env }, stdio: ["ignore", "ignore", "inherit"] });
}

const startedAt = Date.now();
before(() => {
  assert.ok(process.env.IMGD_VM, "these tests run inside the VM: npm run test:vm");
  vmReset({ IMGD_POOL_DATA_SIZE: POOL_DATA_SIZE });
  connect();
  s3 = new S3Client({
    endpoint: process.env.IMGD_S3_ENDPOINT,
    region: "us-east-1",
    forcePathStyle: true,
    credentials: { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" },
  });
});
after(() => {
  close();
  s3?.destroy();
  // Later files in the shared VM get the default pool again.
  vmReset({});
  console.log(`pool-full: ${((Date.now() - startedAt) / 1000).toFixed(1)} s in the VM`);
});

// ---- generated images -----------------------------------------------------------------------

type Layer = { tar: Buffer; digest: string; fileBytes: number; entries: number };

/** A layer of one regular file of `bytes`, filled with a pattern unique to `tag` (no zero runs). */
async function fileLayer(tag: string, bytes: number): Promise<Layer> {
  const body = Buffer.alloc(bytes, `${tag}:0123456789abcdefghijklmnopqrstuvwxyz\n`);
  const tar = await packTar([{ header: { name: `${tag}.bin`, type: "file", mode: 0o644, size: bytes }, body }]);
  return { tar, digest: "sha256:" + createHash("sha256").update(tar).digest("hex"), fileBytes: bytes, entries: 1 };
}

async function upload(image: string, layers: Layer[]): Promise<void> {
  for (const [i, layer] of layers.entries()) {
    await s3.send(new PutObjectCommand({ Bucket: process.env.IMGD_S3_BUCKET, Key: `images/${image}/${i + 1}.tar`, Body: layer.tar }));
  }
}

const pull = (image: string) => pullOutcome(client, image);

async function pullOk(image: string): Promise<void> {
  const result = await pull(image);
  assert.ok(result.ok, `${image}: ${result.ok ? "" : result.error}`);
  assert.equal((await client.getImage({ image })).image!.state, ImageState.READY);
}

// ---- the pool and what is left behind ------------------------------------------------------

/** The kernel's words for the pool's mode (the API's PoolMode). */
const POOL_MODE_WORDS: Record<PoolMode, string> = { [PoolMode.UNSPECIFIED]: "?", [PoolMode.READ_WRITE]: "rw", [PoolMode.READ_ONLY]: "ro", [PoolMode.OUT_OF_DATA_SPACE]: "out_of_data_space", [PoolMode.FAILED]: "fail" };
type Pool = { used: number; total: number; free: number; metaUsed: number; metaTotal: number; mode: string; block: number; blockSizeBytes: number };
async function pool(): Promise<Pool> {
  const p = await client.getPool({});
  const [used, total] = [Number(p.dataUsedBytes), Number(p.dataTotalBytes)];
  return { used, total, free: total - used, metaUsed: Number(p.metadataUsedBytes), metaTotal: Number(p.metadataTotalBytes), mode: POOL_MODE_WORDS[p.mode], block: Number(p.blockSizeBytes), blockSizeBytes: Number(p.blockSizeBytes) };
}
const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB`;

const sh = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: "utf8" });
const dmDevices = () => sh("/usr/sbin/dmsetup", "ls").split("\n").filter((l) => l.startsWith("imgd-")).map((l) => l.split(/\s/)[0]!).sort();

/** Everything a failed pull could leave behind. */
function leftovers() {
  const dir = (path: string) => (existsSync(path) ? readdirSync(path).sort() : []);
  return {
    devices: dmDevices(),
    mounts: readFileSync("/proc/self/mounts", "utf8").split("\n").filter((l) => /imgd/.test(l)),
    agentTmp: dir(`${STATE_DIR}/tmp`),
    helperMnt: dir(HELPER_MNT),
  };
}

/** The kernel's own view: the pool is writable (not read-only, failed or out of space) and fails writes when full. */
function assertPoolHealthy(): void {
  const status = sh("/usr/sbin/dmsetup", "status", POOL_NAME).trim();
  const words = status.split(/\s+/);
  assert.equal(words[2], "thin-pool", status);
  assert.equal(words[7], "rw", `pool mode: ${status}`);
  assert.ok(words.includes("error_if_no_space"), status);
  assert.ok(!words.includes("needs_check"), status);
}

function assertDoctorClean(): void {
  const result = spawnSync("imgctl", ["doctor"], { encoding: "utf8" });
  assert.equal(result.status, 0, result.stdout + result.stderr);
  assert.match(result.stdout, /^clean$/m);
}

async function assertFailedImage(image: string, pattern: RegExp): Promise<void> {
  const { image: row } = await client.getImage({ image });
  assert.equal(row!.state, ImageState.FAILED);
  assert.match(row!.error, pattern);
}

/** Sends messages to the pool, a few dmsetup processes at a time (each costs a process start). */
function dmMessages(messages: string[]): void {
  if (messages.length === 0) return;
  execFileSync("/usr/bin/xargs", ["-d", "\n", "-P", "3", "-I{}", "/usr/sbin/dmsetup", "message", POOL_NAME, "0", "{}"], { input: messages.join("\n") });
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- the cases --------------------------------------------------------------------------------

let base: Layer;

test("a first image: what a layer really costs the pool, against the agent's estimate", async () => {
  base = await fileLayer("base", 8 * MiB);
  await upload("base", [base]);
  const before = await pool();
  await pullOk("base");
  const after = await pool();
  const estimate = estimatedDataBytes(base, after, true);
  console.log(`pool ${mib(after.total)} data, ${mib(after.metaTotal)} metadata, ${mib(after.block)} blocks; ` +
    `first layer (8 MiB file + mkfs) cost ${mib(after.used - before.used)} data, ${((after.metaUsed - before.metaUsed) / 1024).toFixed(0)} KiB metadata; estimate ${mib(estimate)}`);
  assert.ok(after.used - before.used <= estimate, `the estimate ${mib(estimate)} must not underrate the real cost ${mib(after.used - before.used)}`);
});

test("a layer that runs the pool out of space mid-way fails within seconds, cleanly; the pool is usable after", async () => {
  // Something else (a machine writing into its activation) takes the pool's free space while the
  // layer applies. To make the timing exact the layer device is suspended as soon as it exists
  // (the apply's I/O waits), the activation fills the pool, and the device is resumed: the apply
  // then finds no space.
  const big = await fileLayer("midway", 12 * MiB);
  await upload("midway", [base, big]);
  const device = layerDeviceName(chainIds([base.digest, big.digest])[1]!);
  const { activation } = await client.activateImage({ image: "base" });
  const start = await pool();
  assert.ok(estimatedDataBytes(big, start) <= start.free, "the layer passes the space check");
  const before = leftovers();

  const pulling = pull("midway");
  const deadline = Date.now() + 60_000;
  while (!existsSync(`/dev/mapper/${device}`)) {
    assert.ok(Date.now() < deadline, `${device} never appeared`);
    await sleep(10);
  }
  // --nolockfs: a plain suspend also freezes the block device, and a mount meanwhile fails at
  // once with EBUSY ("blockdev is frozen") instead of waiting for the resume; the applier, quick
  // to start with its compile cache, got there first and the pull was retried (seen in CI).
  sh("/usr/sbin/dmsetup", "suspend", "--nolockfs", device);
  let resumedAt = 0;
  try {
    const free = await pool();
    // One write per pool block, past the activation's filesystem, until only a few blocks are
    // left: the apply gets its filesystem mounted and part of its data written, then no more.
    const blocks = free.free / free.block - LEFT_FOR_THE_APPLY;
    spawnSync("/usr/bin/dd", ["if=/dev/zero", `of=${activation!.devicePath}`, `bs=${free.block}`, `count=${blocks}`, `seek=${(4096 * MiB) / free.block}`, "oflag=direct", "conv=fsync"], { encoding: "utf8" });
    const full = await pool();
    assert.equal(full.free, LEFT_FOR_THE_APPLY * full.block, `the pool is nearly full (${mib(full.used)} of ${mib(full.total)}, ${full.mode})`);
  } finally {
    resumedAt = Date.now();
    sh("/usr/sbin/dmsetup", "resume", device);
  }
  const result = await pulling;
  const seconds = (Date.now() - resumedAt) / 1000;
  console.log(`mid-way failure: ${seconds.toFixed(1)} s after the pool filled: ${result.ok ? "SUCCEEDED?" : result.error}`);
  assert.equal(result.ok, false, "the pull must fail");
  assert.ok(seconds < 30, `failed within seconds, not ${seconds} s`);
  const error = result.ok ? "" : result.error;
  assert.match(error, /midway/);
  assert.match(error, /images\/midway\/2\.tar/);
  assert.match(error, /midway: layer images\/midway\/2\.tar \(sha256:[0-9a-f]{64}\) failed: NO_SPACE: thin pool imgd-pool ran out of data space while applying/);
  await assertFailedImage("midway", /images\/midway\/2\.tar/);

  // Nothing of the failed layer is left: its device, table, mounts, temp files.
  const now = leftovers();
  assert.ok(!now.devices.includes(device), `${device} is left: ${now.devices.join(" ")}`);
  assert.deepEqual(now, before);

  // The space comes back when the activation goes; the pool is writable again and the same
  // image now pulls.
  await client.deactivateImage({ activationId: activation!.id });
  for (let i = 0; i < 50 && (await pool()).mode !== "rw"; i++) await sleep(100);
  assertPoolHealthy();
  const retry = await pool();
  await pullOk("midway");
  const done = await pool();
  console.log(`the same ${mib(big.fileBytes)} layer on a snapshot, with room: cost ${mib(done.used - retry.used)} data, ${((done.metaUsed - retry.metaUsed) / 1024).toFixed(0)} KiB metadata; estimate ${mib(estimatedDataBytes(big, done))}`);
  assert.ok(done.used - retry.used <= estimatedDataBytes(big, done), "the estimate does not underrate a snapshot layer");
  assertDoctorClean();
});

test("metadata space nearly full: the agent refuses the layer instead of running metadata out; usable after", async () => {
  // Thin devices made behind the agent's back stand in for metadata used by others: each costs
  // at least one 4 KiB metadata block. Fill to just above the agent's 10% reserve.
  const layer = await fileLayer("meta", 1 * MiB);
  await upload("meta", [layer]);
  const fillers: number[] = [];
  let p = await pool();
  const target = p.metaTotal * 0.9 + 4096;
  try {
    // Small steps: running the metadata out for real would fail the pool, which is not this case.
    let perDevice = 3 * 4096; // assumed until measured
    while (p.metaUsed <= target) {
      const count = fillers.length === 0 ? 8 : Math.max(1, Math.floor((target - p.metaUsed) / perDevice / 2));
      const batch = Array.from({ length: count }, (_, i) => 16_000_000 + fillers.length + i);
      dmMessages(batch.map((id) => `create_thin ${id}`));
      fillers.push(...batch);
      const before = p.metaUsed;
      p = await pool();
      perDevice = Math.max(perDevice, (p.metaUsed - before) / count);
    }
    console.log(`metadata: ${(p.metaUsed / 1024).toFixed(0)} of ${(p.metaTotal / 1024).toFixed(0)} KiB used (${((100 * p.metaUsed) / p.metaTotal).toFixed(1)}%) after ${fillers.length} extra thin devices`);
    const before = { ...leftovers(), meta: p.metaUsed, data: p.used };
    const result = await pull("meta");
    assert.equal(result.ok, false, "refused");
    assert.match(result.ok ? "" : result.error, /meta: layer images\/meta\/1\.tar \(sha256:[0-9a-f]{64}\) does not fit: pool imgd-pool has [0-9.]+ MiB of metadata space free above its 10% reserve; the layer needs about [0-9.]+ MiB/);
    const after = await pool();
    assert.deepEqual({ ...leftovers(), meta: after.metaUsed, data: after.used }, before, "nothing was made");
    assertPoolHealthy();
    await assertFailedImage("meta", /metadata space/);
  } finally {
    dmMessages(fillers.map((id) => `delete ${id}`));
  }
  await pullOk("meta");
  assertPoolHealthy();
  assertDoctorClean();
});

test("many images until the pool is nearly full: each pull fits, a layer that would not is refused, the pool stays usable", async () => {
  const MEDIUM = 4 * MiB;
  let p = await pool();
  const costs: number[] = [];
  let first: Layer | undefined;
  // Distinct images while there is room for two more; then fill to the brim with one sized to fit.
  for (let n = 1; estimatedDataBytes({ fileBytes: MEDIUM, entries: 1 }, p, true) * 2 <= p.free; n++) {
    const layer = await fileLayer(`many-${n}`, MEDIUM);
    first ??= layer;
    await upload(`many-${n}`, [layer]);
    const before = p;
    await pullOk(`many-${n}`);
    p = await pool();
    costs.push(p.used - before.used);
    assert.ok(p.used - before.used <= estimatedDataBytes(layer, p, true), `many-${n} cost ${mib(p.used - before.used)}, more than the estimate`);
  }
  assert.ok(costs.length >= 2, "at least two distinct images fit before the pool is nearly full");

  // An image sized to what is left still fits and pulls: the estimate is safe at the brim.
  const fill = await fileLayer("fill", p.free - estimatedDataBytes({ fileBytes: 0, entries: 1 }, p, true) - 2 * MiB);
  await upload("fill", [fill]);
  const beforeFill = p;
  await pullOk("fill");
  p = await pool();
  costs.push(p.used - beforeFill.used);
  console.log(`many images: ${costs.length - 1} of ${mib(MEDIUM)}, then one of ${mib(fill.fileBytes)} (costs ${costs.map(mib).join(", ")}); ` +
    `pool ${mib(p.used)} of ${mib(p.total)} used (${((100 * p.used) / p.total).toFixed(1)}%), ${mib(p.free)} free`);

  // Nearly full: the next distinct image is refused by the space check, before any device.
  const next = await fileLayer("next", MEDIUM);
  await upload("next", [next]);
  const before = { ...leftovers(), used: p.used, meta: p.metaUsed };
  const refused = await pull("next");
  assert.equal(refused.ok, false, "next must be refused");
  const message = refused.ok ? "" : refused.error;
  const numbers = /next: layer images\/next\/1\.tar \(sha256:[0-9a-f]{64}\) does not fit: pool imgd-pool has ([0-9.]+) MiB of data space free; the layer needs about ([0-9.]+) MiB/.exec(message);
  assert.ok(numbers, message);
  assert.ok(Number(numbers[2]) > Number(numbers[1]));
  assert.ok(Math.abs(Number(numbers[1]) * MiB - p.free) < 0.1 * MiB, "the free space it names is the pool's");
  const now = await pool();
  assert.deepEqual({ ...leftovers(), used: now.used, meta: now.metaUsed }, before, "nothing half-made");
  await assertFailedImage("next", /does not fit/);

  // Still usable: an image made of layers already in the pool pulls (no new space needed), and
  // activation and deactivation work on the nearly full pool.
  await upload("many-1-again", [first!]);
  await pullOk("many-1-again");
  assert.equal((await client.getImage({ image: "many-1-again" })).image!.thinId, (await client.getImage({ image: "many-1" })).image!.thinId);
  const { activation } = await client.activateImage({ image: "many-1" });
  assert.ok(existsSync(activation!.devicePath));
  await client.deactivateImage({ activationId: activation!.id });
  assert.ok(!existsSync(activation!.devicePath));
  assertPoolHealthy();
  assertDoctorClean();
});
