// The deactivate FSM: remove-device → delete-snapshot → forget.
//
// remove-device    records the user's intent (state 'deactivating') before the device goes:
//                  from then on neither a repair nor a failure brings the activation back; then
//                  unmaps its device.
// delete-snapshot  deletes the snapshot's thin id from the pool.
// forget           drops the row and the name: the thin id is free for reuse only now, once the
//                  pool confirmed its deletion, so the catalog accounts for it until then.
// Each step tolerates "already gone" (the helper reports success for a device or thin id that no
// longer exists), so a run resumed after a crash finishes the job; a row that is gone means
// something else finished the removal (another deactivation, an undo, a repair): the step is
// done. A run that fails leaves the row 'deactivating' (doctor: UNFINISHED_DEACTIVATION, which a
// repair finishes), or forgets it if the pool shows the job was done after all. The pool
// operations and their records: thin-devices.ts.
import type { Catalog } from "../catalog.ts";
import { crashPoint } from "../crash-points.ts";
import type { Fsm, FsmEngine } from "../fsm/engine.ts";
import type { HelperClient } from "../helper-client.ts";
import type { KeyedLock } from "../keyed-lock.ts";
import { activationLock } from "../lock-keys.ts";
import { deleteActivationSnapshot, forgetActivation, settleFailedDeactivation, startDeactivation } from "../thin-devices.ts";
import { classifyStepError } from "./errors.ts";

export interface DeactivateRequest {
  activationId: string;
}

export type DeactivateFsm = Fsm<DeactivateRequest, Record<string, never>>;

export function registerDeactivateFsm(deps: { engine: FsmEngine; catalog: Catalog; helper: HelperClient; locks: KeyedLock }): DeactivateFsm {
  const { engine, catalog } = deps;
  return engine
    .register<DeactivateRequest, Record<string, never>>("deactivate")
    // Under the activation's lock, which repairs take too: a re-activation cannot interleave.
    .start("remove-device", (ctx) => ctx.withLock(activationLock(ctx.request.activationId), async () => {
      const row = catalog.getActivation(ctx.request.activationId);
      if (!row) return; // removed already: the user's goal holds
      await startDeactivation(deps, row).catch((err) => {
        throw classifyStepError(err, `deactivation of ${row.id}: remove ${row.name}`);
      });
      crashPoint("deactivate.device-removed");
    }))
    .to("delete-snapshot", async (ctx) => {
      const row = catalog.getActivation(ctx.request.activationId);
      if (!row) return;
      await deleteActivationSnapshot(deps, row).catch((err) => {
        throw classifyStepError(err, `deactivation of ${row.id}: delete thin ${row.thinId}`);
      });
      crashPoint("deactivate.snapshot-deleted");
    })
    .to("forget", async (ctx) => {
      forgetActivation(deps, ctx.request.activationId);
    })
    .end({
      finalizers: [
        async (run) => {
          if (run.status !== "failed") return;
          await settleFailedDeactivation(deps, run.request.activationId);
        },
      ],
    });
}
