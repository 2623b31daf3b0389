// Reconciliation: carries out the repairs doctor.ts proposes. Run at startup (before unfinished
// FSM runs resume) and on demand (Doctor with repair=true) while the agent serves.
//
// Doctor's findings are a snapshot; by the time a repair runs, a pull or an activation may have
// moved on. So every repair takes the lock the pull takes for that device (`chain <id>`) or the
// activation's own key, re-reads what it is about to change, and does nothing when the finding no
// longer holds. Subjects of running FSM runs are left to their runs (a resumed pull discards its
// own half-made device; see pull.ts ensureLayerDevice). Devices, snapshots and thin ids are
// created, unmapped and deleted through thin-devices.ts, which records each removal's intent
// before the pool is touched and whose operations are idempotent: a repair cut short by a crash
// is finished by the next pass.
// Nothing at all is repaired while the catalog describes another pool (POOL_MISMATCH), unless
// the operator decided (adopt or wipe): then the catalog first takes this pool as its own.
import { rm } from "node:fs/promises";
import type { Catalog } from "./catalog.ts";
import { chainsBeingBuilt, runDoctor, type DoctorDeps, type DoctorReport, type Finding, type RepairAction } from "./doctor.ts";
import { formatError } from "./fsm/errors.ts";
import type { KeyedLock } from "./keyed-lock.ts";
import type { DownloadGate } from "./images/download-gate.ts";
import type { Logger } from "./log.ts";
import { activationLock, chainLock, MAINTENANCE_LOCK } from "./lock-keys.ts";
import { matchPool, mismatchAdvice } from "./pool-identity.ts";
import { deleteLostThinId, mapActivation, removeActivation, removeLayerDevice, unmapDevice, wipeForeignThinId } from "./thin-devices.ts";

export interface ReconcileDeps extends DoctorDeps {
  locks: KeyedLock;
  downloads: DownloadGate;
  log: Logger;
  /**
   * The operator's decision about a pool the catalog does not describe (POOL_MISMATCH: either
   * decision records this pool's identity as the catalog's) and about thin ids the catalog never
   * allocated (FOREIGN_THIN_ID): "adopt" keeps them reserved, "wipe" deletes them. Without one,
   * they are left alone.
   */
  foreign?: "adopt" | "wipe";
}

export interface RepairOutcome {
  finding: Finding;
  /** "repaired", "skipped" (no longer true, or its run owns it) or "failed". */
  result: "repaired" | "skipped" | "failed";
  note: string;
}

export interface ReconcileReport {
  /** What doctor found before repairing, and what was done for each finding. */
  outcomes: RepairOutcome[];
  /** Doctor's report after the repairs. */
  after: DoctorReport;
}

// Removals first (so a device that holds a thin id is gone before the id is deleted), then the
// re-activation of activations that lost their device, then files.
const ORDER: RepairAction["type"][] = ["record-pool-identity", "refuse-foreign", "remove-device", "drop-activation", "discard-device", "drop-device-chain", "delete-thin", "reactivate", "remove-temp"];

export async function reconcile(deps: ReconcileDeps): Promise<ReconcileReport> {
  return deps.locks.run(MAINTENANCE_LOCK, async () => {
    const before = await runDoctor(deps);
    const findings = [...before.findings].sort((a, b) => ORDER.indexOf(a.action.type) - ORDER.indexOf(b.action.type));
    // While the catalog describes another pool, every finding is measured against the wrong
    // pool: deleting, re-activating or forgetting anything on that basis would destroy the wrong
    // things. Nothing is repaired but the operator's decision to take this pool (ordered first).
    let otherPool = before.pool.state === "mismatch";
    if (before.pool.state === "mismatch" && deps.foreign === undefined) {
      deps.log("error", `reconcile: refused every repair: ${mismatchAdvice(before.pool)}`, { poolId: before.pool.id, recordedPoolId: before.pool.recorded.id, findings: findings.length });
    }
    // The first use of a pool by this catalog: taken as its own when it holds nothing the
    // catalog cannot account for, or when the operator decided about what it does hold.
    if (before.pool.state === "unrecorded" && (deps.foreign !== undefined || !findings.some((f) => f.kind === "FOREIGN_THIN_ID"))) {
      deps.catalog.recordPoolIdentity(before.pool.id, before.pool.name);
      deps.log("info", "reconcile: recorded the pool's identity in the catalog", { pool: before.pool.name, poolId: before.pool.id });
    }
    const outcomes: RepairOutcome[] = [];
    for (const finding of findings) {
      let outcome: RepairOutcome;
      if (otherPool && finding.action.type !== "record-pool-identity") {
        outcome = { finding, result: "skipped", note: "refused: this database describes another pool (POOL_MISMATCH); nothing is repaired until an operator decides" };
      } else {
        try {
          const note = await repair(deps, finding.action);
          outcome = { finding, result: note === undefined ? "repaired" : "skipped", note: note ?? finding.repair };
        } catch (err) {
          outcome = { finding, result: "failed", note: formatError(err) };
        }
        if (finding.action.type === "record-pool-identity" && outcome.result === "repaired") otherPool = false;
      }
      const level = outcome.result === "failed" ? "error" : outcome.result === "skipped" ? "info" : "warn";
      deps.log(level, `reconcile: ${outcome.result} ${finding.kind} ${finding.subject}`, { detail: finding.detail, note: outcome.note });
      outcomes.push(outcome);
    }
    const foreign = findings.flatMap((f) => (f.action.type === "refuse-foreign" ? [f.action.thinId] : []));
    if (foreign.length > 0 && deps.foreign === undefined && !otherPool) {
      deps.log(
        "error",
        `reconcile: the pool holds ${foreign.length} thin id(s) this catalog never allocated (${foreign.slice(0, 20).join(", ")}${foreign.length > 20 ? ", ..." : ""}); ` +
          "nothing was deleted. Is this the right state directory for this pool? An operator must decide: restore the right database, " +
          "or keep those ids reserved (imgctl doctor --adopt-pool), or delete them (imgctl doctor --wipe-pool)",
        { thinIds: foreign, highWater: deps.catalog.thinIdHighWater() },
      );
    }
    // This look also tells the agent's gate the outcome (an adopted pool allows changes again).
    return { outcomes, after: await runDoctor(deps) };
  });
}

/** Performs one repair; returns undefined when done, or why it was skipped. */
async function repair(deps: ReconcileDeps, action: RepairAction): Promise<string | undefined> {
  const { catalog, helper, locks } = deps;
  switch (action.type) {
    case "record-pool-identity": {
      if (deps.foreign === undefined) return "refused: an operator must decide (imgctl doctor --adopt-pool or --wipe-pool)";
      // Re-checked: the decision is about the pool doctor saw, not one that replaced it since.
      const now = matchPool(catalog, await helper.call("pool.status", {}));
      if (now.state === "same") return "the catalog already describes this pool";
      if (now.state === "unidentified" || now.id !== action.poolId) return `the pool's identity changed since doctor looked (now ${now.state === "unidentified" ? "none" : now.id})`;
      const previous = catalog.poolIdentity();
      catalog.recordPoolIdentity(action.poolId, action.name);
      deps.log("warn", "reconcile: the operator made this pool the catalog's", { pool: action.name, poolId: action.poolId, previousPoolId: previous?.id, decision: deps.foreign });
      return undefined;
    }
    case "refuse-foreign": {
      if (deps.foreign === undefined) {
        return `refused: thin id ${action.thinId} was never allocated by this catalog; an operator must decide (imgctl doctor --adopt-pool or --wipe-pool), the agent deletes nothing it cannot account for`;
      }
      // Re-checked: the catalog may have allocated it meanwhile (then it is not foreign).
      if (thinOwner(catalog, action.thinId) || catalog.thinIdAllocated(action.thinId)) return `thin id ${action.thinId} is now this catalog's`;
      if (deps.foreign === "adopt") catalog.adoptThinId(action.thinId);
      else await wipeForeignThinId(deps, action.thinId, action.holder);
      return undefined;
    }
    case "delete-thin": {
      // Ids are allocated in SQLite before the pool creates them, and only an id whose deletion
      // the pool confirmed is handed out again: an allocated id without a row is never reused
      // while this repair deletes it.
      if (thinOwner(catalog, action.thinId)) return `thin id ${action.thinId} is now known to the catalog`;
      if (!catalog.thinIdAllocated(action.thinId)) return `thin id ${action.thinId} is no longer this catalog's`;
      await deleteLostThinId(deps, action.thinId, action.holder);
      return undefined;
    }
    case "discard-device":
      return locks.run(chainLock(action.chainId), async () => {
        // Under the chain lock no pull is building this device, so "allocated" means half-made
        // (and "removing" a removal cut short).
        const row = catalog.getDevice(action.chainId);
        if (row === undefined || row.state === "ready" || row.thinId !== action.thinId) return "the device is no longer half-made or being removed";
        await removeLayerDevice(deps, row);
        return undefined;
      });
    case "drop-device-chain":
      return locks.run(chainLock(action.chainId), () => dropDeviceChain(deps, action.chainId));
    case "drop-activation":
      return locks.run(activationLock(action.id), async () => {
        const row = catalog.getActivation(action.id);
        if (!row || row.thinId !== action.thinId) return "the activation is gone";
        if (activationBusy(deps, row.id)) return "a run is working on this activation";
        // Active with its thin id in the pool: nothing is wrong any more (a deactivating one is
        // finished whatever the pool holds).
        if (row.state === "active" && (await helper.call("thin.list", {})).thinIds.includes(row.thinId)) return "its thin id is in the pool";
        await removeActivation(deps, row);
        return undefined;
      });
    case "remove-device":
      return removeStrayDevice(deps, action.name, action.thinId);
    case "reactivate":
      return locks.run(activationLock(action.id), async () => {
        const row = catalog.getActivation(action.id);
        // Whatever run of it is unfinished (see doctor's MISSING_DEVICE): mapping is idempotent,
        // and a deactivation changes the row under this same lock before it unmaps.
        if (row?.state !== "active") return "the activation is no longer active";
        await mapActivation(deps, row);
        return undefined;
      });
    case "remove-temp": {
      // Between downloads only (download-gate.ts): a download starting after doctor looked
      // makes its own file, which this must not remove.
      const swept = await deps.downloads.trySweep(() => rm(action.path, { force: true }));
      return swept.swept ? undefined : "a download is in flight (the file may be its own)";
    }
  }
}

/**
 * A ready device whose thin id is gone from the pool cannot be used, nor can anything built on
 * it (their chain says they contain it). Drops them all, top-most first, and marks the images
 * that used them failed, so a re-pull rebuilds. Refused while an activation uses one of them:
 * its snapshot is independent data that a repair must not destroy.
 */
async function dropDeviceChain(deps: ReconcileDeps, chainId: string): Promise<string | undefined> {
  const { catalog, helper } = deps;
  const row = catalog.getDevice(chainId);
  if (row?.state !== "ready") return "the device is no longer recorded ready";
  if ((await helper.call("thin.list", {})).thinIds.includes(row.thinId)) return `thin id ${row.thinId} is in the pool`;
  const doomed = [...catalog.devicesAbove(chainId), row];
  const chains = doomed.map((d) => d.chainId);
  const building = chainsBeingBuilt(catalog, runningPulls(deps));
  if (chains.some((c) => building.has(c))) return "a running pull uses this chain; it will fail or rebuild";
  const users = catalog.listActivations().filter((a) => chains.includes(a.chainId));
  if (users.length > 0) return `activations ${users.map((a) => a.id).join(", ")} use it: deactivate them first`;
  // The images first: they are failed from now on, whether or not every removal below completes.
  for (const name of catalog.imagesUsing(chains).filter((name) => catalog.getImage(name)?.state !== "pulling")) {
    catalog.markImageFailed(name, `layer device ${row.name} (chain ${chainId}, thin id ${row.thinId}) vanished from the pool; pull the image again to rebuild it`);
  }
  for (const device of doomed) await removeLayerDevice(deps, device);
  return undefined;
}

async function removeStrayDevice(deps: ReconcileDeps, name: string, thinId: number): Promise<string | undefined> {
  const { catalog, helper, locks } = deps;
  const device = catalog.listDevices().find((d) => d.name === name);
  if (device) {
    // Layer devices are active only inside their build, which holds this lock.
    return locks.run(chainLock(device.chainId), async () => {
      await unmapDevice(deps, name);
      return undefined;
    });
  }
  const activation = catalog.listActivations().find((a) => a.name === name);
  if (activation) {
    return locks.run(activationLock(activation.id), async () => {
      const row = catalog.getActivation(activation.id);
      if (row && activationBusy(deps, row.id)) return "a run is working on this activation";
      if (row?.state === "active" && row.thinId === thinId) return "the device is the activation's own";
      await unmapDevice(deps, name);
      return undefined;
    });
  }
  await unmapDevice(deps, name);
  return undefined;
}

function thinOwner(catalog: Catalog, thinId: number): boolean {
  return catalog.listDevices().some((d) => d.thinId === thinId) || catalog.listActivations().some((a) => a.thinId === thinId);
}

function runningPulls(deps: ReconcileDeps): string[] {
  return deps.pull.list({ status: "running", limit: 100_000 }).map((run) => run.resourceId);
}

function activationBusy(deps: ReconcileDeps, id: string): boolean {
  return [deps.activate, deps.deactivate].some((fsm) => fsm.list({ resourceId: id, status: "running", limit: 1 }).length > 0);
}
