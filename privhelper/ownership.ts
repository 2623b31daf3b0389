// The one home of "is this device imgd's own?": every operation on a named device asks here first
// (issue 9, finding 3). A device is imgd's when its live table is a single thin target on the
// configured pool, its thin id was made by this helper (it has an origin record), and the
// /dev/mapper node the helper would hand to a program is that very device. Its role (layer or
// activation) is fixed in the origin record when the id is first activated: mkfs and the layer
// applier only ever touch layers, never an activation (a running guest's disk) nor anything else.
import { stat } from "node:fs/promises";
import type { HelperConfig } from "./config.ts";
import { poolDeviceNumber } from "./device.ts";
import { deviceNumber, dmDeviceNumber, dmTable, parseThinTable } from "./dm.ts";
import { HelperFailure } from "./errors.ts";
import { LAYER_NAME } from "./protocol.ts";
import { readOrigin, writeOrigin, type OriginRecord, type Role } from "./thin-origins.ts";

export type OwnDevice = { name: string; path: string; thinId: number; role: Role | undefined };

export function devicePath(name: string): string {
  return `/dev/mapper/${name}`;
}

/** The role a device name claims: protocol.ts admits only the layer and activation shapes. */
export function roleOfName(name: string): Role {
  return LAYER_NAME.test(name) ? "layer" : "activation";
}

/**
 * The device `name` if it is imgd's own; null when no device of that name exists; NOT_OURS or
 * WRONG_ROLE otherwise. `requireRecord: false` accepts any thin device of the pool (removing one
 * is safe and lets an id made before origin records existed be cleaned up).
 */
export async function ownDevice(config: HelperConfig, name: string, options: { requireRecord?: boolean } = {}): Promise<OwnDevice | null> {
  const table = await dmTable(name);
  if (table === null) return null;
  const thin = parseThinTable(table);
  if (!thin) throw new HelperFailure("NOT_OURS", `device ${name} is not a thin device (table ${JSON.stringify(table.slice(0, 200))}); refused`);
  const pool = await poolDeviceNumber(config);
  if (thin.poolDevice !== pool) {
    throw new HelperFailure("NOT_OURS", `device ${name} is a thin device of pool ${thin.poolDevice}, not of ${config.poolName} (${pool}); refused`);
  }
  const record = await readOrigin(config, thin.thinId);
  if (!record && options.requireRecord !== false) {
    throw new HelperFailure("NOT_OURS", `device ${name} is thin id ${thin.thinId}, which this helper did not create; refused`);
  }
  requireRole(name, thin.thinId, record, roleOfName(name));
  return { name, path: devicePath(name), thinId: thin.thinId, role: record?.role };
}

/** A layer device of imgd's being built: the only subject of fs.mkfs and layer.apply. */
export async function ownLayerDevice(config: HelperConfig, name: string): Promise<OwnDevice> {
  if (roleOfName(name) !== "layer") throw new HelperFailure("WRONG_ROLE", `${name} is not a layer device; only layers are formatted or applied to`);
  const device = await ownDevice(config, name);
  if (!device) throw new HelperFailure("NOT_FOUND", `device ${name} is not active (${devicePath(name)} missing)`);
  if (device.role !== "layer") throw new HelperFailure("WRONG_ROLE", `thin id ${device.thinId} was not activated as a layer; refused`);
  // What mkfs or the applier will open by path must be the device whose table was just checked.
  const [number, node] = await Promise.all([dmDeviceNumber(name), stat(device.path).catch(() => null)]);
  if (!node?.isBlockDevice() || number === null || deviceNumber(node.rdev) !== number) {
    throw new HelperFailure("NOT_OURS", `${device.path} is not device ${name} (${number ?? "gone"}); refused`);
  }
  return device;
}

/**
 * Before device.activate: the thin id must be one this helper made, and its role (fixed here on
 * first activation) must be the one the name claims.
 */
export async function claimRole(config: HelperConfig, name: string, thinId: number): Promise<void> {
  const record = await readOrigin(config, thinId);
  if (!record) throw new HelperFailure("NOT_OURS", `thin id ${thinId} was not created by this helper (thin.create/thin.snapshot); refused`);
  const role = roleOfName(name);
  requireRole(name, thinId, record, role);
  if (record.role === undefined) await writeOrigin(config, thinId, record.origin, role);
}

function requireRole(name: string, thinId: number, record: OriginRecord | undefined, role: Role): void {
  if (record?.role !== undefined && record.role !== role) {
    throw new HelperFailure("WRONG_ROLE", `thin id ${thinId} is an ${record.role === "layer" ? "image layer" : "activation"}; it cannot be used as ${name}`);
  }
}
