// The lifecycle of thin devices, layer devices and activation snapshots alike: the one module that
// asks the pool to create, map, unmap or delete a thin id, and that keeps the catalog in step.
//
// Each transition has the shape of containerd's devmapper PoolDevice.transition: the intent is
// committed to SQLite BEFORE the pool is asked, the outcome AFTER the pool answered. Whatever a
// crash interrupts, the catalog then accounts for every thin id the pool may hold and says what was
// under way:
//
//   layer device  allocate ─► allocated ─ create, map, (the pull writes it), unmap ─► ready
//                 ready ─► removing ─ unmap, delete ─► row gone, thin id free
//   activation    allocate ─► allocated ─ snapshot, map ─► active
//                 active ─► deactivating ─ unmap, delete ─► row and name gone, thin id free
//
// An "allocated" row is removed as it is: it already says "never use me", and whoever finds it
// with no run working on it discards it (doctor's HALF_MADE_*). A thin id is free for reuse only
// once the pool confirmed its deletion (catalog.ts, "thin ids").
//
// Every pool operation here is idempotent (the helper reports success for what is already made
// the same way, or already gone), so doing a transition again after a crash finishes it. A removal
// whose row is gone, or holds another thin id, does nothing: that id may belong to someone else now.
// Callers hold the subject's lock (`chain <id>`, `activation <id>`) or own it through their run,
// and keep their own error mapping and crash points (test-only kill points, named by the caller
// because the crash tests arm them by name) between these calls.
import type { ActivationRow, Catalog, DeviceRow } from "./catalog.ts";
import type { CallOptions, HelperClient } from "./helper-client.ts";
import { activationDeviceName, layerDeviceName } from "./images/chain.ts";

/** What the lifecycle works on: the catalog and the pool (through the root helper). */
export interface ThinPool {
  catalog: Catalog;
  helper: HelperClient;
}

// --- layer devices ---------------------------------------------------------------------------

/** Intent to build: a thin id is allocated and the row recorded "allocated", before the pool is asked. */
export function allocateLayerDevice({ catalog }: ThinPool, d: { chainId: string; parentChainId: string | null; layerDigest: string }): DeviceRow {
  return catalog.allocateDevice({ ...d, name: layerDeviceName(d.chainId) });
}

/** Creates the allocated device's thin id (empty, or a snapshot of its parent) and maps it, for the pull to write. */
export async function createLayerDevice({ catalog, helper }: ThinPool, device: DeviceRow, parent: DeviceRow | null, opts: CallOptions = {}): Promise<void> {
  expectState("layer device", device, catalog.getDevice(device.chainId), ["allocated"]);
  if (parent) await helper.call("thin.snapshot", { thinId: device.thinId, originId: parent.thinId }, opts);
  else await helper.call("thin.create", { thinId: device.thinId }, opts);
  await helper.call("device.activate", { name: device.name, thinId: device.thinId }, opts);
}

/** Unmaps a device once it is written (layer devices are mapped only while they are built). */
export async function unmapLayerDevice({ catalog, helper }: ThinPool, device: DeviceRow, opts: CallOptions = {}): Promise<void> {
  expectState("layer device", device, catalog.getDevice(device.chainId), ["allocated"]);
  await helper.call("device.deactivate", { name: device.name }, opts);
}

/** The outcome of a build: written, synced and unmapped, the device is ready to be snapshotted. */
export function layerDeviceReady({ catalog }: ThinPool, device: DeviceRow): void {
  expectState("layer device", device, catalog.getDevice(device.chainId), ["allocated"]);
  catalog.markDeviceReady(device.chainId);
}

/**
 * Removes a layer device from the pool and then from the catalog: a ready one is marked
 * "removing" first. Finishes a removal (or a discard) cut short; does nothing once it is done.
 */
export async function removeLayerDevice({ catalog, helper }: ThinPool, device: DeviceRow, opts: CallOptions = {}): Promise<void> {
  const row = catalog.getDevice(device.chainId);
  if (row?.thinId !== device.thinId) return;
  if (row.state === "ready") catalog.markDeviceRemoving(row.chainId);
  await helper.call("device.deactivate", { name: row.name }, opts);
  await helper.call("thin.delete", { thinId: row.thinId }, opts);
  catalog.deleteDevice(row.chainId);
}

// --- activation snapshots --------------------------------------------------------------------

/** Intent to activate: a thin id is allocated and the row recorded "allocated", before the pool is asked. */
export function allocateActivation({ catalog }: ThinPool, a: { id: string; image: string; chainId: string }): ActivationRow {
  return catalog.allocateActivation({ ...a, name: activationDeviceName(a.id) });
}

/** Creates the activation's thin id as a snapshot of its image's device (which is never written itself). */
export async function snapshotActivation({ catalog, helper }: ThinPool, row: ActivationRow, origin: DeviceRow, opts: CallOptions = {}): Promise<void> {
  expectState("activation", row, catalog.getActivation(row.id), ["allocated"]);
  await helper.call("thin.snapshot", { thinId: row.thinId, originId: origin.thinId }, opts);
}

/**
 * Maps the activation's snapshot as /dev/mapper/<name> and returns that path: while it is made,
 * and again for an active one whose device is gone (after a reboot).
 */
export async function mapActivation({ catalog, helper }: ThinPool, row: ActivationRow, opts: CallOptions = {}): Promise<string> {
  expectState("activation", row, catalog.getActivation(row.id), ["allocated", "active"]);
  return (await helper.call("device.activate", { name: row.name, thinId: row.thinId }, opts)).path;
}

/** The outcome of an activation: its device is mapped. */
export function activationActive({ catalog }: ThinPool, row: ActivationRow): void {
  catalog.markActivationActive(row.id);
}

/**
 * The user's deactivation, first stage: records "deactivating" whatever the row's state (from
 * now on nothing brings it back, and it is never marked active), then unmaps its device.
 */
export async function startDeactivation({ catalog, helper }: ThinPool, row: ActivationRow, opts: CallOptions = {}): Promise<void> {
  catalog.markActivationDeactivating(row.id);
  await helper.call("device.deactivate", { name: row.name }, opts);
}

/** Deletes the activation's snapshot from the pool, once its removal is recorded (or it was never made). */
export async function deleteActivationSnapshot({ catalog, helper }: ThinPool, row: ActivationRow, opts: CallOptions = {}): Promise<void> {
  expectState("activation", row, catalog.getActivation(row.id), ["deactivating", "allocated"]);
  await helper.call("thin.delete", { thinId: row.thinId }, opts);
}

/** The outcome of a removal the pool confirmed: the row and its name go, its thin id is free for reuse. */
export function forgetActivation({ catalog }: ThinPool, id: string): void {
  catalog.deleteActivation(id);
}

/**
 * A deactivation that failed: the catalog says what the pool shows. If neither the snapshot nor
 * its device is left, the removal did happen and is recorded; otherwise the row stays
 * "deactivating" for a repair to finish.
 */
export async function settleFailedDeactivation({ catalog, helper }: ThinPool, id: string): Promise<void> {
  const row = catalog.getActivation(id);
  if (row?.state !== "deactivating") return;
  const [{ thinIds }, { devices }] = await Promise.all([helper.call("thin.list", {}), helper.call("device.list", {})]);
  if (!thinIds.includes(row.thinId) && !devices.some((d) => d.name === row.name)) catalog.deleteActivation(row.id);
}

/**
 * The whole removal, for undoing a failed activation and for repairs: an active row is marked
 * "deactivating" first. Finishes a removal cut short; does nothing once it is done.
 */
export async function removeActivation(pool: ThinPool, row: ActivationRow, opts: CallOptions = {}): Promise<void> {
  const { catalog, helper } = pool;
  const current = catalog.getActivation(row.id);
  if (current?.thinId !== row.thinId) return;
  if (current.state === "active") catalog.markActivationDeactivating(current.id);
  await helper.call("device.deactivate", { name: current.name }, opts);
  await deleteActivationSnapshot(pool, current, opts);
  forgetActivation(pool, current.id);
}

// --- thin ids without a row, and stray mappings ------------------------------------------------

/**
 * Deletes a thin id this catalog allocated and lost the row of (doctor's UNKNOWN_THIN_ID), after
 * unmapping any device holding it. The id stays allocated (never handed out) until the pool
 * confirmed the deletion; then it is free. The caller checks that it is still rowless.
 */
export async function deleteLostThinId({ catalog, helper }: ThinPool, thinId: number, holder?: string): Promise<void> {
  await unmapHolders(helper, thinId, holder);
  await helper.call("thin.delete", { thinId });
  catalog.releaseThinId(thinId);
}

/**
 * Deletes a thin id this catalog never allocated (the operator's `doctor --wipe-pool`). It is
 * reserved first, so no allocation hands it out while the pool deletes it; the reservation ends
 * with the outcome (deleted: free; failed: foreign again).
 */
export async function wipeForeignThinId({ catalog, helper }: ThinPool, thinId: number, holder?: string): Promise<void> {
  catalog.adoptThinId(thinId);
  try {
    await unmapHolders(helper, thinId, holder);
    await helper.call("thin.delete", { thinId });
  } catch (err) {
    catalog.forgetAdoptedThinId(thinId, false);
    throw err;
  }
  catalog.forgetAdoptedThinId(thinId, true);
}

/** Unmaps a device-mapper device by name, leaving its thin id alone (a stray or left-over mapping). */
export async function unmapDevice({ helper }: ThinPool, name: string): Promise<void> {
  await helper.call("device.deactivate", { name });
}

/** The pool refuses to delete a mapped thin id: unmap the holder doctor saw, and any mapping it has now. */
async function unmapHolders(helper: HelperClient, thinId: number, holder: string | undefined): Promise<void> {
  if (holder) await helper.call("device.deactivate", { name: holder });
  const now = (await helper.call("device.list", {})).devices.find((d) => d.thinId === thinId);
  if (now) await helper.call("device.deactivate", { name: now.name });
}

/** A transition starts only from the state it is defined for, on the row it was given. */
function expectState<S extends string>(what: string, given: { thinId: number; name: string }, current: { thinId: number; state: S } | undefined, states: S[]): void {
  if (current?.thinId === given.thinId && states.includes(current.state)) return;
  const actual = current === undefined ? "gone" : current.thinId !== given.thinId ? `now thin id ${current.thinId}` : current.state;
  throw new Error(`${what} ${given.name} (thin id ${given.thinId}) is ${actual}, not ${states.join(" or ")}`);
}
