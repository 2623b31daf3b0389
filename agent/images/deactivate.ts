// The deactivate FSM: remove-device → delete-snapshot → forget.
//
// The first step records the user's intent (state 'deactivating') before the device goes: from
// then on neither a repair nor a failure brings the activation back. A run that fails leaves the
// row 'deactivating' (doctor: UNFINISHED_DEACTIVATION, which a repair finishes), or forgets it if
// the pool shows the job was done after all.
// Each step checks before acting and tolerates "already gone" (the helper reports success for a
// device or thin id that no longer exists), so a run resumed after a crash finishes the job. The
// row goes last: until the snapshot is gone from the pool, the catalog still accounts for its id.
import type { Catalog } from "../catalog.ts";
import { crashPoint } from "../crash-points.ts";
import type { Fsm, FsmEngine } from "../fsm/engine.ts";
import { abort } from "../fsm/errors.ts";
import type { HelperClient } from "../helper-client.ts";
import type { KeyedLock } from "../keyed-lock.ts";
import { activationLock } from "../lock-keys.ts";
import { classifyStepError } from "./errors.ts";

export interface DeactivateRequest {
  activationId: string;
}

export type DeactivateFsm = Fsm<DeactivateRequest, Record<string, never>>;

export function registerDeactivateFsm({ engine, catalog, helper, locks }: { engine: FsmEngine; catalog: Catalog; helper: HelperClient; locks: KeyedLock }): DeactivateFsm {
  const activation = (id: string) => {
    const row = catalog.getActivation(id);
    if (!row) throw abort(`activation ${id} is not known`);
    return row;
  };
  return engine
    .register<DeactivateRequest, Record<string, never>>("deactivate")
    // Under the activation's lock, which repairs take too: a re-activation cannot interleave.
    .start("remove-device", (ctx) => ctx.withLock(activationLock(ctx.request.activationId), async () => {
      const row = activation(ctx.request.activationId);
      catalog.markActivationDeactivating(row.id);
      await helper.call("device.deactivate", { name: row.name }).catch((err) => {
        throw classifyStepError(err, `deactivation of ${row.id}: remove ${row.name}`);
      });
      crashPoint("deactivate.device-removed");
    }))
    .to("delete-snapshot", async (ctx) => {
      const row = activation(ctx.request.activationId);
      await helper.call("thin.delete", { thinId: row.thinId }).catch((err) => {
        throw classifyStepError(err, `deactivation of ${row.id}: delete thin ${row.thinId}`);
      });
      crashPoint("deactivate.snapshot-deleted");
    })
    .to("forget", async (ctx) => {
      catalog.deleteActivation(ctx.request.activationId);
    })
    .end({
      finalizers: [
        async (run) => {
          if (run.status !== "failed") return;
          const row = catalog.getActivation(run.request.activationId);
          if (row?.state !== "deactivating") return;
          // The catalog says what the pool shows: gone from both, the row goes too.
          const [{ thinIds }, { devices }] = await Promise.all([helper.call("thin.list", {}), helper.call("device.list", {})]);
          if (!thinIds.includes(row.thinId) && !devices.some((d) => d.name === row.name)) catalog.deleteActivation(row.id);
        },
      ],
    });
}
