// The thin pool: reporting its usage and creating it (backing files, loop devices, dm table).
import { chmod, lstat, mkdir, rename, rm } from "node:fs/promises";
import type { Stats } from "node:fs";
import { join } from "node:path";
import type { HelperConfig } from "./config.ts";
import { poolDeviceNumber } from "./device.ts";
import { dmCreate, dmReload, dmRemove, dmStatus, dmTable, parsePoolTable } from "./dm.ts";
import { HelperFailure } from "./errors.ts";
import { ensurePoolId, readPoolId, writeNewPoolId } from "./pool-identity.ts";
import type { PoolStatus, PoolUsage } from "./protocol.ts";
import { run } from "./run.ts";

const META_BLOCK_BYTES = 4096;

/**
 * Parses `dmsetup status` of a thin-pool:
 * "0 <len> thin-pool <transaction> <used>/<total meta> <used>/<total data> <held root>
 *  rw|ro|out_of_data_space [no_]discard_passdown error|queue_if_no_space needs_check|- ..."
 * A failed pool reports "Fail" (or "Error") instead of the counters.
 */
export function parsePoolStatus(name: string, status: string, blockSectors: number): PoolUsage {
  const words = status.trim().split(/\s+/);
  if (words.length < 4 || words[0] !== "0" || words[2] !== "thin-pool") {
    throw new HelperFailure("POOL_INVALID", `${name}: unexpected status ${JSON.stringify(status)}`);
  }
  const blockSizeBytes = blockSectors * 512;
  if (words[3] === "Fail" || words[3] === "Error") {
    return { name, dataUsedBytes: 0, dataTotalBytes: 0, metaUsedBytes: 0, metaTotalBytes: 0, mode: "fail", blockSizeBytes, errorIfNoSpace: false };
  }
  const meta = /^([0-9]+)\/([0-9]+)$/.exec(words[4] ?? "");
  const data = /^([0-9]+)\/([0-9]+)$/.exec(words[5] ?? "");
  const mode = words[7];
  if (!meta || !data || (mode !== "rw" && mode !== "ro" && mode !== "out_of_data_space")) {
    throw new HelperFailure("POOL_INVALID", `${name}: unexpected status ${JSON.stringify(status)}`);
  }
  return {
    name,
    dataUsedBytes: Number(data[1]) * blockSizeBytes,
    dataTotalBytes: Number(data[2]) * blockSizeBytes,
    metaUsedBytes: Number(meta[1]) * META_BLOCK_BYTES,
    metaTotalBytes: Number(meta[2]) * META_BLOCK_BYTES,
    mode,
    blockSizeBytes,
    errorIfNoSpace: words.slice(8).includes("error_if_no_space"),
  };
}

export async function poolStatus(config: HelperConfig): Promise<PoolStatus> {
  const table = await dmTable(config.poolName);
  if (table === null) throw new HelperFailure("POOL_MISSING", `thin pool ${config.poolName} does not exist (pool.ensure creates it)`);
  const parsed = parsePoolTable(table);
  if (!parsed) throw new HelperFailure("POOL_INVALID", `device ${config.poolName} exists but is not a thin pool: ${table}`);
  const status = await dmStatus(config.poolName);
  if (status === null) throw new HelperFailure("POOL_MISSING", `thin pool ${config.poolName} disappeared`);
  return { ...parsePoolStatus(config.poolName, status, parsed.blockSectors), id: await readPoolId(config) };
}

/** Creates the pool if it does not exist; either way it leaves with an identity. */
export async function poolEnsure(config: HelperConfig): Promise<PoolStatus> {
  const table = await dmTable(config.poolName);
  if (table === null) {
    await createPool(config);
  } else {
    await poolDeviceNumber(config); // refuses a volume manager's pool before its table is touched
    await failWritesWhenFull(config.poolName, table);
    // A pool made by an older helper (or by hand) gets its identity now.
    await ensurePoolId(config);
  }
  return poolStatus(config);
}

/**
 * A pool made elsewhere (the challenge README's table, for one) keeps the kernel default,
 * queue_if_no_space: once full, every write to every thin device blocks forever. Reload its
 * table with the same devices and error_if_no_space added, so a full pool fails writes instead.
 */
async function failWritesWhenFull(name: string, table: string): Promise<void> {
  const parsed = parsePoolTable(table);
  if (!parsed) throw new HelperFailure("POOL_INVALID", `device ${name} exists but is not a thin pool: ${table.trim()}`);
  if (parsed.features.includes("error_if_no_space")) return;
  const head = table.trim().split(/\s+/).slice(0, 7);
  const features = [...parsed.features, "error_if_no_space"];
  await dmReload(name, [...head, String(features.length), ...features].join(" "));
}

async function createPool(config: HelperConfig): Promise<void> {
  const dir = join(config.stateDir, "pool");
  await mkdir(dir, { recursive: true, mode: 0o700 });
  // Existing files are kept: the metadata file is the pool's only record of its thin devices,
  // and the identity goes with it. A new metadata file is a new, empty pool: its new identity is
  // written (fsynced) first, so no crash can leave it under the identity of the pool it replaces.
  const metaFile = join(dir, "meta");
  if ((await lstatOrNull(metaFile)) === null) await writeNewPoolId(config);
  else await ensurePoolId(config);
  await ensureBackingFile(metaFile, config.poolMetaBytes);
  await ensureBackingFile(join(dir, "data"), config.poolDataBytes);

  const attached: string[] = [];
  try {
    const meta = await loopDeviceFor(metaFile, attached);
    const data = await loopDeviceFor(join(dir, "data"), attached);
    const dataSectors = config.poolDataBytes / 512;
    const dataBlocks = dataSectors / config.poolBlockSectors;
    // The low-water mark only raises a dm event for a userspace extender; we have none, but a
    // sane value (10% of the blocks) keeps `dmsetup status` readable.
    const lowWater = Math.max(1, Math.ceil(dataBlocks / 10));
    // error_if_no_space: a full pool fails writes instead of queueing them forever (the kernel
    // default would hang every writer when a hostile layer fills the pool).
    const table = `0 ${dataSectors} thin-pool ${meta} ${data} ${config.poolBlockSectors} ${lowWater} 1 error_if_no_space`;
    await dmCreate(config.poolName, table);
  } catch (err) {
    // A failed table load can leave an empty device behind that would block every later attempt.
    if ((await dmTable(config.poolName).catch(() => null)) === "") await dmRemove(config.poolName).catch(() => undefined);
    for (const loop of attached) await run("losetup", ["--detach", loop]).catch(() => undefined);
    throw err;
  }
}

/** Creates a fully allocated file of `bytes` (fallocate: zeros, no holes), or checks an existing one. */
async function ensureBackingFile(path: string, bytes: number): Promise<void> {
  const existing = await lstatOrNull(path);
  if (existing) {
    if (!existing.isFile()) throw new HelperFailure("POOL_INVALID", `${path} is not a regular file`);
    if (existing.size !== bytes) {
      throw new HelperFailure("POOL_INVALID", `${path} is ${existing.size} bytes but the configuration asks for ${bytes}; refusing to resize pool storage`);
    }
    return;
  }
  // Allocate under a temporary name so a crash or a full disk never leaves a short file that
  // a later start would mistake for a complete one.
  const temporary = `${path}.new`;
  await rm(temporary, { force: true });
  try {
    await run("fallocate", ["--length", String(bytes), temporary], { timeoutMs: 10 * 60_000 });
    await chmod(temporary, 0o600);
    await rename(temporary, path);
  } catch (err) {
    await rm(temporary, { force: true });
    throw err;
  }
}

/** The loop device already backed by `file`, or a newly attached one (recorded in `attached`). */
async function loopDeviceFor(file: string, attached: string[]): Promise<string> {
  const { stdout } = await run("losetup", ["--associated", file]);
  const existing = /^(\/dev\/loop[0-9]+):/m.exec(stdout);
  if (existing) return existing[1]!;
  const created = (await run("losetup", ["--find", "--show", file])).stdout.trim();
  if (!/^\/dev\/loop[0-9]+$/.test(created)) throw new HelperFailure("COMMAND_FAILED", `losetup printed ${JSON.stringify(created)}`);
  attached.push(created);
  return created;
}

async function lstatOrNull(path: string): Promise<Stats | null> {
  return lstat(path).catch((err: NodeJS.ErrnoException) => {
    if (err.code === "ENOENT") return null;
    throw err;
  });
}
