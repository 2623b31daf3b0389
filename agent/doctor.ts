// Doctor: a read-only comparison of the catalog (SQLite) with the thin pool, the kernel's
// device-mapper devices and the agent's temp directory. It reports what disagrees and what a
// repair would do (in words, and as an action reconcile.ts can carry out); it repairs nothing.
//
// The pool and the devices are read FIRST, then the catalog: rows are written before the pool
// is changed (a thin id is allocated before it is created), so a run that moves on meanwhile
// cannot make a pool id look unknown. Subjects that a running FSM run is working on are skipped:
// their rows and devices are legitimately in between. First of all, the pool's identity is
// compared with the one the catalog recorded (pool-identity.ts): a catalog that describes another
// pool is reported as POOL_MISMATCH, and then no other finding may be repaired.
import type { ActivationRow, Catalog, DeviceRow } from "./catalog.ts";
import type { HelperClient } from "./helper-client.ts";
import type { Fsm } from "./fsm/engine.ts";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { chainIds } from "./images/chain.ts";
import { matchPool, mismatchAdvice, type PoolGate, type PoolMatch } from "./pool-identity.ts";

export type FindingKind =
  | "POOL_MISMATCH"
  | "UNKNOWN_THIN_ID"
  | "FOREIGN_THIN_ID"
  | "MISSING_THIN_ID"
  | "STRAY_DEVICE"
  | "MISSING_DEVICE"
  | "HALF_MADE_DEVICE"
  | "HALF_MADE_ACTIVATION"
  | "UNFINISHED_DEACTIVATION"
  | "UNFINISHED_REMOVAL"
  | "STRAY_TEMP_FILE";

/** What reconcile.ts does for a finding; it re-checks the finding under the right lock first. */
export type RepairAction =
  /** Only on the operator's decision (adopt or wipe): the catalog takes this pool as its own. */
  | { type: "record-pool-identity"; poolId: string; name: string }
  | { type: "delete-thin"; thinId: number; holder?: string }
  /** Nothing is done: only an operator may decide about ids this catalog never allocated. */
  | { type: "refuse-foreign"; thinId: number; holder?: string }
  | { type: "drop-device-chain"; chainId: string }
  /** A half-made layer device, or one whose removal was cut short: removed (thin-devices.ts). */
  | { type: "discard-device"; chainId: string; thinId: number }
  | { type: "drop-activation"; id: string; thinId: number }
  | { type: "remove-device"; name: string; thinId: number }
  | { type: "reactivate"; id: string }
  | { type: "remove-temp"; path: string };

export interface Finding {
  kind: FindingKind;
  subject: string;
  detail: string;
  repair: string;
  action: RepairAction;
}

export interface DoctorReport {
  clean: boolean;
  /** The catalog's recorded pool versus the helper's. */
  pool: PoolMatch;
  poolThinIds: number;
  catalogThinIds: number;
  findings: Finding[];
}

export interface DoctorDeps {
  catalog: Catalog;
  helper: HelperClient;
  // Only their run lists are read.
  pull: Pick<Fsm<any, any>, "list">;
  activate: Pick<Fsm<any, any>, "list">;
  deactivate: Pick<Fsm<any, any>, "list">;
  /** The agent's temp download directory (<state>/tmp); omitted: temp files are not checked. */
  tmpDir?: string;
  /** Told what this pass found about the pool's identity (the agent's gate on mutations). */
  poolGate?: PoolGate;
}

export async function runDoctor({ catalog, helper, pull, activate, deactivate, tmpDir, poolGate }: DoctorDeps): Promise<DoctorReport> {
  const pool = matchPool(catalog, await helper.call("pool.status", {}));
  poolGate?.observe(pool);
  const { thinIds } = await helper.call("thin.list", {});
  const { devices: live } = await helper.call("device.list", {});
  const devices = catalog.listDevices();
  const activations = catalog.listActivations();

  const running = (fsm: Pick<Fsm<any, any>, "list">) => fsm.list({ status: "running", limit: 100_000 });
  const busyActivations = new Set([...running(activate), ...running(deactivate)].map((run) => run.resourceId));
  const busyChains = chainsBeingBuilt(catalog, running(pull).map((run) => run.resourceId));
  const isBusy = (owner: Owner) => (owner.type === "device" ? busyChains.has(owner.row.chainId) : busyActivations.has(owner.row.id));

  type Owner = { type: "device"; row: DeviceRow } | { type: "activation"; row: ActivationRow };
  const owners = new Map<number, Owner>();
  for (const row of devices) owners.set(row.thinId, { type: "device", row });
  for (const row of activations) owners.set(row.thinId, { type: "activation", row });
  const inPool = new Set(thinIds);
  const liveByName = new Map(live.map((d) => [d.name, d.thinId]));
  const findings: Finding[] = [];

  if (pool.state === "mismatch") {
    findings.push({
      kind: "POOL_MISMATCH",
      subject: `pool ${pool.name}`,
      detail: `${mismatchAdvice(pool)}. Until then no finding below is repaired.`,
      repair: "none by itself: an operator decides (imgctl doctor --adopt-pool or --wipe-pool records this pool's identity as the database's)",
      action: { type: "record-pool-identity", poolId: pool.id, name: pool.name },
    });
  }
  // An empty or pre-identity catalog: it takes the pool as its own only when the pool holds
  // nothing it does not know (reconcile.ts), so foreign ids say the pool is new to it.
  const unseen = pool.state === "unrecorded" ? `; this catalog has never seen this pool (${pool.name}, identity ${pool.id})` : "";

  // (a) thin ids: pool versus catalog. An id without a row is this catalog's own lost id (a
  // crash, a lost row) only if the catalog allocated it and never saw it deleted; any other id
  // (an empty, wrong or restored database, someone else's device) is not the agent's to delete.
  const foreign = new Set<number>();
  const adopted = new Set(catalog.adoptedThinIds());
  for (const thinId of thinIds) {
    if (owners.has(thinId) || adopted.has(thinId)) continue;
    const holder = live.find((d) => d.thinId === thinId);
    if (!catalog.thinIdAllocated(thinId)) {
      foreign.add(thinId);
      findings.push({
        kind: "FOREIGN_THIN_ID",
        subject: `thin id ${thinId}`,
        detail:
          `thin id ${thinId} exists in the pool${holder ? ` (active as ${holder.name})` : ""} but this catalog never allocated it ` +
          `(its ids go up to ${catalog.thinIdHighWater()})${unseen}: the database may be empty, wrong or restored from a backup`,
        repair: "none by itself: an operator decides (the right database; or imgctl doctor --adopt-pool to keep it reserved, --wipe-pool to delete it)",
        action: { type: "refuse-foreign", thinId, holder: holder?.name },
      });
      continue;
    }
    findings.push({
      kind: "UNKNOWN_THIN_ID",
      subject: `thin id ${thinId}`,
      detail: `thin id ${thinId} exists in the pool but the catalog has no device or activation for it${holder ? ` (active as ${holder.name})` : ""}`,
      repair: holder ? `remove device ${holder.name}, then delete thin id ${thinId} from the pool` : `delete thin id ${thinId} from the pool`,
      action: { type: "delete-thin", thinId, holder: holder?.name },
    });
  }
  for (const [thinId, owner] of owners) {
    // An allocated row may not have created its thin id yet: reported as half-made below; a
    // deactivating or removing one is reported as unfinished, whatever the pool holds.
    if (inPool.has(thinId) || owner.row.state === "allocated" || owner.row.state === "deactivating" || owner.row.state === "removing" || isBusy(owner)) continue;
    if (owner.type === "device") {
      findings.push({
        kind: "MISSING_THIN_ID",
        subject: owner.row.name,
        detail: `layer device ${owner.row.name} (chain ${owner.row.chainId}) is recorded ready with thin id ${thinId}, which is not in the pool`,
        repair: `forget device ${owner.row.name} and the devices built on it, mark the images using them failed; the next pull of such an image rebuilds them`,
        action: { type: "drop-device-chain", chainId: owner.row.chainId },
      });
    } else {
      findings.push({
        kind: "MISSING_THIN_ID",
        subject: `activation ${owner.row.id}`,
        detail: `activation ${owner.row.id} of ${owner.row.image} is recorded active with thin id ${thinId}, which is not in the pool (its data is gone)`,
        repair: `remove device ${owner.row.name} if present and forget activation ${owner.row.id}`,
        action: { type: "drop-activation", id: owner.row.id, thinId },
      });
    }
  }

  // (b) dm devices: what is live versus what should be (only active activations; layer devices
  // are active only while a pull builds them)
  const activationByName = new Map(activations.map((a) => [a.name, a]));
  const deviceByName = new Map(devices.map((d) => [d.name, d]));
  for (const { name, thinId } of live) {
    const activation = activationByName.get(name);
    const device = deviceByName.get(name);
    if (activation && (activation.state !== "active" || isBusy({ type: "activation", row: activation }))) continue;
    // A device of a foreign thin id is part of what the operator decides about (or decided).
    if (foreign.has(thinId) || (adopted.has(thinId) && !activation && !device)) continue;
    // A ready layer device is never legitimately active (a build activates only its own
    // allocated device), so it is stray even while a pull of its image runs. An allocated or
    // removing one is reported below, and its repair removes the device too.
    if (device !== undefined && device.state !== "ready") continue;
    if (activation?.state === "active" && activation.thinId === thinId) continue;
    const why = activation
      ? `activation ${activation.id} records thin id ${activation.thinId}, the device maps thin id ${thinId}`
      : device
        ? `layer device of chain ${device.chainId} is left active (layer devices are active only while a pull builds them)`
        : "the catalog has no activation of that name";
    findings.push({
      kind: "STRAY_DEVICE",
      subject: name,
      detail: `/dev/mapper/${name} (thin id ${thinId}) is active: ${why}`,
      repair: `remove device ${name}${!owners.has(thinId) ? "" : ` (thin id ${thinId} itself is kept)`}`,
      action: { type: "remove-device", name, thinId },
    });
  }
  for (const activation of activations) {
    // Reported even while a run of it is unfinished: "active" is recorded after the mapping, so
    // no run maps it again (an activate run resumed after a reboot only ends; a deactivation
    // marks it "deactivating" first, under the lock the repair takes too). A reboot unmaps every
    // device, so an activation whose run the power cut after its mapping lost its device for
    // good (seen in the power-cut soak, seed 50d3ddbb).
    if (activation.state !== "active" || liveByName.has(activation.name)) continue;
    // Without its thin id there is nothing to reactivate: MISSING_THIN_ID covers it.
    if (!inPool.has(activation.thinId)) continue;
    findings.push({
      kind: "MISSING_DEVICE",
      subject: activation.name,
      detail: `activation ${activation.id} of ${activation.image} is recorded active but /dev/mapper/${activation.name} does not exist`,
      repair: `activate thin id ${activation.thinId} as ${activation.name} again`,
      action: { type: "reactivate", id: activation.id },
    });
  }

  // (c) rows in a non-final state that no running run will finish
  for (const device of devices) {
    if (device.state !== "allocated" || busyChains.has(device.chainId)) continue;
    findings.push({
      kind: "HALF_MADE_DEVICE",
      subject: device.name,
      detail: `layer device ${device.name} (thin id ${device.thinId}) was allocated but never completed, and no pull is building it${inPool.has(device.thinId) ? "" : " (its thin id is not in the pool)"}`,
      repair: `remove device ${device.name} if active, delete thin id ${device.thinId} from the pool, forget the row (the next pull rebuilds it)`,
      action: { type: "discard-device", chainId: device.chainId, thinId: device.thinId },
    });
  }
  for (const device of devices) {
    if (device.state !== "removing" || busyChains.has(device.chainId)) continue;
    findings.push({
      kind: "UNFINISHED_REMOVAL",
      subject: device.name,
      detail: `layer device ${device.name} (thin id ${device.thinId}) was being removed, and nothing finished it${liveByName.has(device.name) ? ` (/dev/mapper/${device.name} still exists)` : ""}`,
      repair: `finish the removal: remove device ${device.name} if active, delete thin id ${device.thinId} from the pool, forget the row`,
      action: { type: "discard-device", chainId: device.chainId, thinId: device.thinId },
    });
  }
  for (const activation of activations) {
    if (activation.state !== "allocated" || busyActivations.has(activation.id)) continue;
    findings.push({
      kind: "HALF_MADE_ACTIVATION",
      subject: `activation ${activation.id}`,
      detail: `activation ${activation.id} of ${activation.image} (thin id ${activation.thinId}) was allocated but never completed, and no run is working on it`,
      repair: `remove device ${activation.name} if present, delete thin id ${activation.thinId} from the pool, forget activation ${activation.id}`,
      action: { type: "drop-activation", id: activation.id, thinId: activation.thinId },
    });
  }

  for (const activation of activations) {
    if (activation.state !== "deactivating" || busyActivations.has(activation.id)) continue;
    findings.push({
      kind: "UNFINISHED_DEACTIVATION",
      subject: `activation ${activation.id}`,
      detail: `activation ${activation.id} of ${activation.image} (thin id ${activation.thinId}) was being deactivated, and no run is finishing it${liveByName.has(activation.name) ? ` (/dev/mapper/${activation.name} still exists)` : ""}`,
      repair: `finish the deactivation: remove device ${activation.name} if present, delete thin id ${activation.thinId} from the pool, forget activation ${activation.id}`,
      action: { type: "drop-activation", id: activation.id, thinId: activation.thinId },
    });
  }

  // (d) temp files: downloads happen only inside pull runs, so with no pull running every file
  // in the temp directory is a leftover (the run list is read first: a download starting later
  // makes a new name).
  if (tmpDir && running(pull).length === 0) {
    for (const name of listTempFiles(tmpDir)) {
      findings.push({
        kind: "STRAY_TEMP_FILE",
        subject: name,
        detail: `${join(tmpDir, name)} is left over from a download (no pull is running)`,
        repair: `delete ${join(tmpDir, name)}`,
        action: { type: "remove-temp", path: join(tmpDir, name) },
      });
    }
  }

  return { clean: findings.length === 0, pool, poolThinIds: thinIds.length, catalogThinIds: owners.size, findings };
}

/**
 * Chain ids the running pulls may be building. A pull records each layer's digest once it is
 * downloaded, so the chain is known up to the first layer still downloading.
 */
export function chainsBeingBuilt(catalog: Catalog, images: string[]): Set<string> {
  const chains = new Set<string>();
  for (const image of images) {
    const digests: string[] = [];
    for (const layer of catalog.imageLayers(image)) {
      if (!layer.digest) break;
      digests.push(layer.digest);
    }
    for (const chain of chainIds(digests)) chains.add(chain);
  }
  return chains;
}

function listTempFiles(tmpDir: string): string[] {
  try {
    return readdirSync(tmpDir, { withFileTypes: true })
      .filter((entry) => entry.isFile())
      .map((entry) => entry.name)
      .sort();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw err;
  }
}
