// Thin ids inside the pool: create, snapshot, delete (pool messages), list (pool metadata).
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import type { HelperConfig } from "./config.ts";
import { crashPoint } from "./crash-points.ts";
import { listDevices, poolDeviceNumber } from "./device.ts";
import { deviceNumber, dmMessage, dmResume, dmSuspend, dmTable, parsePoolTable, SYSFS } from "./dm.ts";
import { HelperFailure } from "./errors.ts";
import { CommandFailed, run } from "./run.ts";
import { readOrigin, removeOrigin, writeOrigin, type Role } from "./thin-origins.ts";

// Kernel answers to pool messages, as printed by dmsetup ("message ioctl ... failed: <strerror>").
const EXISTS = /File exists/;
const MISSING = /No data available/;

function kernelSays(err: unknown, pattern: RegExp): boolean {
  return err instanceof CommandFailed && pattern.test(err.stderr);
}

/**
 * Creating an id that already exists succeeds only when the helper's record says it was created
 * the same way (thin-origins.ts): a repeated request after a crash. An id with no record, or
 * recorded with another origin, is EXISTS: it may hold other data, the caller must delete it.
 */
export async function createThin(config: HelperConfig, thinId: number): Promise<void> {
  await poolDeviceNumber(config);
  await createRecorded(config, thinId, null, undefined, async () => {
    await dmMessage(config.poolName, `create_thin ${thinId}`);
    crashPoint("helper.thin.create.after-message");
  });
}

export async function snapshotThin(config: HelperConfig, thinId: number, originId: number): Promise<void> {
  const pool = await poolDeviceNumber(config);
  if (thinId === originId) throw new HelperFailure("CONFLICT", "a snapshot cannot have its own id as origin");
  // A copy of an activation's data stays an activation: never a layer for mkfs or the applier.
  const role = (await readOrigin(config, originId))?.role === "activation" ? "activation" : undefined;
  await createRecorded(config, thinId, originId, role, async () => {
    // An active origin must be suspended so its in-flight writes reach the pool before the
    // snapshot shares its blocks; otherwise the snapshot may see a torn filesystem.
    const active = (await listDevices(config, pool)).find((device) => device.thinId === originId);
    if (active) await dmSuspend(active.name);
    try {
      await dmMessage(config.poolName, `create_snap ${thinId} ${originId}`);
    } finally {
      if (active) await dmResume(active.name);
    }
    crashPoint("helper.thin.snapshot.after-message");
  });
}

/** Records the origin durably, then sends the pool message; see createThin for what EXISTS means. */
async function createRecorded(config: HelperConfig, thinId: number, origin: number | null, role: Role | undefined, send: () => Promise<void>): Promise<void> {
  const how = (o: number | null) => (o === null ? "as an empty device" : `as a snapshot of ${o}`);
  const previous = await readOrigin(config, thinId);
  const same = previous !== undefined && previous.origin === origin;
  // A record with another origin is stale unless the id is in the pool (the pool says).
  if (previous !== undefined && !same && (await listThinIds(config)).includes(thinId)) {
    throw new HelperFailure("EXISTS", `thin id ${thinId} already exists in pool ${config.poolName}, created ${how(previous.origin)}, not ${how(origin)}`);
  }
  if (!same) await writeOrigin(config, thinId, origin, role);
  try {
    await send();
  } catch (err) {
    if (kernelSays(err, EXISTS)) {
      if (same) return; // a repeat of a request that already succeeded
      await removeOrigin(config, thinId);
      throw new HelperFailure("EXISTS", `thin id ${thinId} already exists in pool ${config.poolName} and the helper has no record of creating it ${how(origin)}`);
    }
    if (!same) await removeOrigin(config, thinId);
    if (origin !== null && kernelSays(err, MISSING)) throw new HelperFailure("NOT_FOUND", `origin thin id ${origin} does not exist in pool ${config.poolName}`);
    throw err;
  }
}

/** Deleting an id that does not exist counts as success (the wanted end state holds). */
export async function deleteThin(config: HelperConfig, thinId: number): Promise<void> {
  const pool = await poolDeviceNumber(config);
  const active = (await listDevices(config, pool)).find((device) => device.thinId === thinId);
  if (active) throw new HelperFailure("BUSY", `thin id ${thinId} is active as ${active.name}; deactivate it first`);
  try {
    await dmMessage(config.poolName, `delete ${thinId}`);
    crashPoint("helper.thin.delete.after-message");
  } catch (err) {
    if (!kernelSays(err, MISSING)) throw err;
  }
  // Only once the id is gone: until then its origin must stay known.
  await removeOrigin(config, thinId);
}

/**
 * Every thin id in the pool, read from its metadata while the pool is live: the kernel writes a
 * consistent copy of the metadata root (reserve_metadata_snap), thin_ls reads that copy, and the
 * copy is always released again (a held snapshot pins metadata blocks).
 */
export async function listThinIds(config: HelperConfig): Promise<number[]> {
  await poolDeviceNumber(config); // the metadata snapshot is a message to the pool: ours only
  const metaDevice = await poolMetadataDevice(config);
  await reserveMetadataSnapshot(config.poolName);
  try {
    const { stdout } = await run("thinLs", ["--metadata-snap", "--no-headers", "-o", "DEV", metaDevice]);
    return parseThinLsIds(stdout);
  } finally {
    await dmMessage(config.poolName, "release_metadata_snap");
  }
}

async function reserveMetadataSnapshot(pool: string): Promise<void> {
  try {
    await dmMessage(pool, "reserve_metadata_snap");
  } catch (err) {
    if (!kernelSays(err, BUSY)) throw err;
    // Already held: only by a helper that died between reserve and release (we hold the global
    // lock), or by an administrator's thin_ls. Take it over: release, then reserve a fresh one.
    await dmMessage(pool, "release_metadata_snap");
    await dmMessage(pool, "reserve_metadata_snap");
  }
}

const BUSY = /Device or resource busy/;

/** thin_ls -o DEV --no-headers prints one decimal id per line; anything else is refused. */
export function parseThinLsIds(stdout: string): number[] {
  const ids: number[] = [];
  for (const line of stdout.split("\n")) {
    const word = line.trim();
    if (word === "") continue;
    if (!/^[0-9]{1,8}$/.test(word)) throw new HelperFailure("COMMAND_FAILED", `thin_ls printed an unexpected line ${JSON.stringify(line.slice(0, 80))}`);
    ids.push(Number(word));
  }
  return ids.sort((a, b) => a - b);
}

/** The pool's metadata device as a /dev path (the table names it only as major:minor). */
async function poolMetadataDevice(config: HelperConfig): Promise<string> {
  const table = await dmTable(config.poolName);
  if (table === null) throw new HelperFailure("POOL_MISSING", `thin pool ${config.poolName} does not exist (pool.ensure creates it)`);
  const pool = parsePoolTable(table);
  if (!pool) throw new HelperFailure("POOL_INVALID", `device ${config.poolName} exists but is not a thin pool: ${table}`);
  const number = /^([0-9]+):([0-9]+)$/.exec(pool.metaDevice);
  if (!number) throw new HelperFailure("POOL_INVALID", `unexpected metadata device ${JSON.stringify(pool.metaDevice)} in the table of ${config.poolName}`);
  const uevent = await readFile(join(SYSFS.root, `dev/block/${number[1]}:${number[2]}/uevent`), "utf8");
  const devname = /^DEVNAME=([a-z0-9_-]+(?:\/[a-z0-9_-]+)*)$/m.exec(uevent)?.[1];
  if (!devname) throw new HelperFailure("POOL_INVALID", `cannot tell the name of metadata device ${pool.metaDevice}`);
  const path = `/dev/${devname}`;
  // The node must be that very device, not whatever someone left under that name.
  const node = await stat(path);
  if (!node.isBlockDevice() || deviceNumber(node.rdev) !== pool.metaDevice) {
    throw new HelperFailure("POOL_INVALID", `${path} is not block device ${pool.metaDevice}`);
  }
  return path;
}

