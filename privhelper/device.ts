// Activating thin devices as /dev/mapper/<name>, removing them, and listing ours.
import type { HelperConfig } from "./config.ts";
import { crashPoint } from "./crash-points.ts";
import { dmAllTables, dmCreate, dmDeviceNumber, dmMakeNode, dmRemove, dmUuid, isBusy, parseThinTable } from "./dm.ts";
import { HelperFailure } from "./errors.ts";
import { claimRole, ownDevice } from "./ownership.ts";
import { ACTIVATION_NAME, LAYER_NAME } from "./protocol.ts";

export type ThinDevice = { name: string; thinId: number };

/**
 * The pool's device number, once it is a pool imgd may use: every operation that changes the pool
 * (a thin message, a device on it, its table reloaded) asks here first. A device-mapper uuid
 * marks a device a volume manager made and keeps records of (LVM's thin pools: "LVM-..."): imgd
 * numbers thin devices itself and would collide with the manager's own, so it refuses. Pools
 * made by hand (the challenge README's table) and by this helper have none.
 */
export async function poolDeviceNumber(config: HelperConfig): Promise<string> {
  const number = await dmDeviceNumber(config.poolName);
  if (number === null) throw new HelperFailure("POOL_MISSING", `thin pool ${config.poolName} does not exist (pool.ensure creates it)`);
  const uuid = await dmUuid(number);
  if (uuid) {
    throw new HelperFailure("POOL_INVALID", `thin pool ${config.poolName} belongs to a volume manager (device-mapper uuid ${JSON.stringify(uuid.slice(0, 128))}): imgd allocates thin ids itself and would collide with it; give imgd a pool of its own`);
  }
  return number;
}

/**
 * Devices with one of our names whose table is a thin target on our pool. Callers that already
 * know the pool's device number pass it (and the tables, when they read them): each dmsetup
 * exec costs tens of milliseconds, hundreds under emulation.
 */
export async function listDevices(config: HelperConfig, pool?: string, tables?: Map<string, string>): Promise<ThinDevice[]> {
  pool ??= await poolDeviceNumber(config);
  const devices: ThinDevice[] = [];
  for (const [name, table] of tables ?? (await dmAllTables())) {
    if (!LAYER_NAME.test(name) && !ACTIVATION_NAME.test(name)) continue;
    const thin = parseThinTable(table);
    if (thin && thin.poolDevice === pool) devices.push({ name, thinId: thin.thinId });
  }
  return devices;
}

export async function activateDevice(config: HelperConfig, name: string, thinId: number): Promise<{ path: string }> {
  const pool = await poolDeviceNumber(config);
  const sectors = config.thinBytes / 512;
  const path = `/dev/mapper/${name}`;
  const tables = await dmAllTables();
  const existing = tables.get(name) ?? null;
  if (existing !== null) {
    const thin = parseThinTable(existing);
    if (thin && thin.poolDevice === pool && thin.thinId === thinId && thin.sectors === sectors) {
      // A helper killed between `dmsetup create` and `mknodes` left the device without its node
      // (no udev here): a repeat finishes the job, or the caller gets a path that does not exist.
      await dmMakeNode(name);
      return { path };
    }
    throw new HelperFailure("CONFLICT", `device ${name} already exists with a different table: ${existing}`);
  }
  const holder = (await listDevices(config, pool, tables)).find((device) => device.thinId === thinId);
  // Two live devices on one thin id would write the same blocks through two caches.
  if (holder) throw new HelperFailure("BUSY", `thin id ${thinId} is already active as ${holder.name}`);
  await claimRole(config, name, thinId);
  try {
    await dmCreate(name, `0 ${sectors} thin /dev/mapper/${config.poolName} ${thinId}`);
    crashPoint("helper.device.activate.after-create");
  } catch (err) {
    // A failed load can leave an empty (tableless) device of that name behind.
    await dmRemove(name).catch(() => undefined);
    if (err instanceof Error && /No data available/.test(err.message)) {
      throw new HelperFailure("NOT_FOUND", `thin id ${thinId} does not exist in pool ${config.poolName}`);
    }
    throw err;
  }
  return { path };
}

const REMOVE_ATTEMPTS = 5;

/** Removes the device if it is imgd's (ownership.ts); a device that is already gone counts as success. */
export async function deactivateDevice(config: HelperConfig, name: string): Promise<void> {
  if (!(await ownDevice(config, name, { requireRecord: false }))) return;
  for (let attempt = 1; ; attempt++) {
    try {
      await dmRemove(name);
      return;
    } catch (err) {
      // Brief opens (blkid, a closing mount) make remove fail with EBUSY: retry a little.
      if (!isBusy(err)) throw err;
      if (attempt >= REMOVE_ATTEMPTS) throw new HelperFailure("BUSY", `device ${name} is busy (mounted or open): ${(err as Error).message}`);
      await new Promise((resolve) => setTimeout(resolve, 200 * attempt));
    }
  }
}
