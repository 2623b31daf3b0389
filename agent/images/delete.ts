// The delete FSM: deactivate → plan → forget → remove-devices.
//
// deactivate      with force, deactivates the image's activations (through the deactivate FSM,
//                 joining a deactivation already running); without force, refuses if any exist.
// plan            records the image's chain ids in the checkpoint, before the row goes.
// forget          deletes the image's row (and its layer list), unless a pull of it started or an
//                 activation of it was made since the deactivate step.
// remove-devices  removes, top-most first, each device of that chain that nothing else uses:
//                 shared leading layers stay for the images that share them. Each device is
//                 judged under the lock a pull takes to build it (gc.ts) and removed through
//                 thin-devices.ts (marked "removing" before the pool deletes it).
// Blobs stay: CollectGarbage removes those no image uses. Every step checks before acting, and a
// removal cut short is finished when met again, so a run resumed after a crash finishes the job.
import type { Catalog } from "../catalog.ts";
import type { Fsm, FsmEngine } from "../fsm/engine.ts";
import { abort } from "../fsm/errors.ts";
import type { HelperClient } from "../helper-client.ts";
import type { KeyedLock } from "../keyed-lock.ts";
import type { Logger } from "../log.ts";
import { imageLock, MAINTENANCE_LOCK } from "../lock-keys.ts";
import type { DeactivateFsm } from "./deactivate.ts";
import { removeDeviceIfUnreferenced } from "./gc.ts";
import type { PullFsm } from "./pull.ts";

export interface DeleteRequest {
  image: string;
  force: boolean;
}

export interface DeleteState {
  deactivated: string[];
  chainIds: string[];
  removedDevices: string[];
}

export type DeleteFsm = Fsm<DeleteRequest, DeleteState>;

export interface DeleteDeps {
  engine: FsmEngine;
  catalog: Catalog;
  helper: HelperClient;
  locks: KeyedLock;
  pull: PullFsm;
  deactivate: DeactivateFsm;
  log: Logger;
}

export function registerDeleteFsm(deps: DeleteDeps): DeleteFsm {
  const { engine, catalog, deactivate } = deps;
  return engine
    .register<DeleteRequest, DeleteState>("delete")
    .start("deactivate", async (ctx) => {
      const activations = catalog.listActivations(ctx.request.image);
      if (activations.length > 0 && !ctx.request.force) {
        throw abort(`image ${ctx.request.image} has ${activations.length} activation(s) (${activations.map((a) => a.id).join(", ")}): deactivate them first, or delete with force`);
      }
      for (const activation of activations) {
        const { runId } = deactivate.start(activation.id, { activationId: activation.id }, {});
        const outcome = await ctx.waitFor(`deactivation of ${activation.id}`, () => deactivate.wait(runId));
        if (outcome.status !== "succeeded" && catalog.getActivation(activation.id)) {
          throw new Error(`deactivation of ${activation.id} failed: ${outcome.error}`);
        }
        if (!ctx.state.deactivated.includes(activation.id)) ctx.state.deactivated.push(activation.id);
      }
    })
    .to("plan", async (ctx) => {
      const image = catalog.getImage(ctx.request.image);
      if (!image) throw abort(`image ${ctx.request.image} is not known`);
      const chains = catalog.imageLayers(ctx.request.image).flatMap((l) => (l.chainId ? [l.chainId] : []));
      if (image.chainId && !chains.includes(image.chainId)) chains.push(image.chainId);
      ctx.state.chainIds = chains.reverse();
    })
    .to("forget", (ctx) =>
      // Under the image's lock, as a pull records its start and its outcome: a pull that
      // started while this deletion ran (after DeleteImage checked) wins, and the deletion
      // says so, rather than the pull "succeeding" with no image.
      ctx.withLock(imageLock(ctx.request.image), async () => {
        if (deps.pull.list({ resourceId: ctx.request.image, status: "running", limit: 1 }).length > 0) {
          throw abort(`image ${ctx.request.image}: a pull of it started while it was being deleted; delete it again once the pull has finished`);
        }
        // An activation made since the deactivate step: this check and the row's deletion are one
        // synchronous stretch, as the activation's allocation is (activate.ts), so one of the two
        // sees the other.
        const made = catalog.listActivations(ctx.request.image);
        if (made.length > 0) {
          throw abort(`image ${ctx.request.image}: activation(s) ${made.map((a) => a.id).join(", ")} were made while it was being deleted; delete it again (with force to deactivate them)`);
        }
        catalog.deleteImage(ctx.request.image);
      }),
    )
    .to("remove-devices", async (ctx) => {
      // Through the engine (the same locks as GC's): waiting for GC or a repair is not work.
      await ctx.withLock(MAINTENANCE_LOCK, async () => {
        for (const chainId of ctx.state.chainIds) {
          const name = catalog.getDevice(chainId)?.name;
          const kept = await removeDeviceIfUnreferenced(deps, chainId);
          if (kept === undefined && name && !ctx.state.removedDevices.includes(name)) ctx.state.removedDevices.push(name);
          if (kept !== undefined && kept !== "already gone") ctx.log("info", "device kept", { chainId, reason: kept });
        }
      });
    })
    .end();
}
