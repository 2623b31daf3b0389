// Thin ids inside the pool: create, snapshot, delete (pool messages).
import type { HelperConfig } from "./config.ts";
import { listDevices, poolDeviceNumber } from "./device.ts";
import { dmMessage, dmResume, dmSuspend } from "./dm.ts";
import { HelperFailure } from "./errors.ts";
import { CommandFailed } from "./run.ts";

// Kernel answers to pool messages, as printed by dmsetup ("message ioctl ... failed: <strerror>").
const EXISTS = /File exists/;
const MISSING = /No data available/;

function kernelSays(err: unknown, pattern: RegExp): boolean {
  return err instanceof CommandFailed && pattern.test(err.stderr);
}

/**
 * An existing id is reported as EXISTS, not success: an old id may hold old data, and the caller
 * must decide (delete and retry). Telling "exists with the same origin" apart, so that a repeated
 * request can succeed, needs the pool's metadata (thin_ls): that is the crash-recovery work.
 */
export async function createThin(config: HelperConfig, thinId: number): Promise<void> {
  await poolDeviceNumber(config);
  try {
    await dmMessage(config.poolName, `create_thin ${thinId}`);
  } catch (err) {
    if (kernelSays(err, EXISTS)) throw new HelperFailure("EXISTS", `thin id ${thinId} already exists in pool ${config.poolName}`);
    throw err;
  }
}

export async function snapshotThin(config: HelperConfig, thinId: number, originId: number): Promise<void> {
  await poolDeviceNumber(config);
  if (thinId === originId) throw new HelperFailure("CONFLICT", "a snapshot cannot have its own id as origin");
  // An active origin must be suspended so its in-flight writes reach the pool before the snapshot
  // shares its blocks; otherwise the snapshot may see a torn filesystem.
  const active = (await listDevices(config)).find((device) => device.thinId === originId);
  if (active) await dmSuspend(active.name);
  try {
    await dmMessage(config.poolName, `create_snap ${thinId} ${originId}`);
  } catch (err) {
    if (kernelSays(err, EXISTS)) throw new HelperFailure("EXISTS", `thin id ${thinId} already exists in pool ${config.poolName}`);
    if (kernelSays(err, MISSING)) throw new HelperFailure("NOT_FOUND", `origin thin id ${originId} does not exist in pool ${config.poolName}`);
    throw err;
  } finally {
    if (active) await dmResume(active.name);
  }
}

/** Deleting an id that does not exist counts as success (the wanted end state holds). */
export async function deleteThin(config: HelperConfig, thinId: number): Promise<void> {
  await poolDeviceNumber(config);
  const active = (await listDevices(config)).find((device) => device.thinId === thinId);
  if (active) throw new HelperFailure("BUSY", `thin id ${thinId} is active as ${active.name}; deactivate it first`);
  try {
    await dmMessage(config.poolName, `delete ${thinId}`);
  } catch (err) {
    if (kernelSays(err, MISSING)) return;
    throw err;
  }
}
