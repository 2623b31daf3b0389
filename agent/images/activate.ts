// The activate FSM: ensure-image → snapshot → activate.
//
// ensure-image  pulls the image first when it is not ready (joining a pull already running).
//               An image whose last pull FAILED is not pulled again unless its S3 folder changed
//               (one listing: keys, ETags, sizes): its error is returned at once. PullImage
//               still retries it on request.
// snapshot      allocates a thin id (the row says "allocated" before the pool is touched) and
//               creates a thin snapshot of the image's device: the image's device itself is
//               never written.
// activate      maps the snapshot as /dev/mapper/imgd-act-<id>, then records it "active".
// Both steps are idempotent (the helper's snapshot and mapping succeed again when already made
// the same way), so a run resumed after a crash finishes the job. An activation deactivated while
// it is made (a forced DeleteImage deactivates every activation of the image) ends the run: its
// row is never made again. A failed activation is undone (device removed, snapshot deleted, row
// dropped), so no row claims a device that does not exist, and its name is freed. The pool operations and their catalog records: thin-devices.ts.
//
// Names (retry safety): the API reserves the activation's name (catalog activation_names) in the
// same transaction that starts this run, before any step: a retry of the same request, a
// cancelled or timed-out caller, and a run resumed after a restart all find the activation by its
// name while it is made, and after. The name goes with the row (deactivation, undo, repair).
import type { ActivationRow, Catalog } from "../catalog.ts";
import { crashPoint } from "../crash-points.ts";
import type { Fsm, FsmEngine, StepContext } from "../fsm/engine.ts";
import { abort, formatError } from "../fsm/errors.ts";
import type { HelperClient } from "../helper-client.ts";
import type { Logger } from "../log.ts";
import type { S3Client } from "@aws-sdk/client-s3";
import type { S3Config } from "../s3/client.ts";
import { listImageLayers } from "../s3/image-source.ts";
import { isPermanentS3Error } from "../s3/errors.ts";
import { classifyStepError } from "./errors.ts";
import { AgentError, type Reason } from "../grpc/errors.ts";
import type { RunRecord } from "../fsm/engine.ts";
import type { PullFsm } from "./pull.ts";
import { activationActive, allocateActivation, mapActivation, removeActivation, snapshotActivation } from "../thin-devices.ts";

export interface ActivateRequest {
  image: string;
  activationId: string;
}

export interface ActivateState {
  chainId?: string;
  devicePath?: string;
}

export interface ActivateDeps {
  engine: FsmEngine;
  catalog: Catalog;
  helper: HelperClient;
  pull: PullFsm;
  log: Logger;
  /** To tell whether a failed image's folder changed since its failed pull. */
  s3: S3Client;
  s3Config: S3Config;
}

export type ActivateFsm = Fsm<ActivateRequest, ActivateState>;
type Ctx = StepContext<ActivateRequest, ActivateState>;

export function registerActivateFsm(deps: ActivateDeps): ActivateFsm {
  const { engine, catalog } = deps;
  return engine
    .register<ActivateRequest, ActivateState>("activate")
    .start("ensure-image", (ctx) => ensureImage(deps, ctx))
    .to("snapshot", async (ctx) => {
      const row = activationRow(deps, ctx);
      if (row.state === "active") return;
      if (row.state === "deactivating") throw abort(removedWhileMade(ctx));
      const origin = catalog.getDevice(row.chainId);
      if (origin?.state !== "ready") throw abort(`image ${ctx.request.image}: its device ${row.chainId} is not ready`);
      crashPoint("activate.thin-id-allocated");
      await snapshotActivation(deps, row, origin, { signal: ctx.signal }).catch((err) => {
        throw classifyStepError(err, `activation ${row.id} of ${ctx.request.image}: snapshot`);
      });
    })
    .to("activate", async (ctx) => {
      // Allocated by the snapshot step; gone or going now only if something removed it meanwhile.
      const row = catalog.getActivation(ctx.request.activationId);
      if (!row || row.state === "deactivating") throw abort(removedWhileMade(ctx));
      const path = await mapActivation(deps, row, { signal: ctx.signal }).catch((err) => {
        throw classifyStepError(err, `activation ${row.id} of ${ctx.request.image}: activate`);
      });
      crashPoint("activate.device-activated");
      activationActive(deps, row);
      ctx.state.devicePath = path;
    })
    .end({
      finalizers: [
        async (run) => {
          if (run.status !== "failed") return;
          const row = catalog.getActivation(run.request.activationId);
          if (row) await undoActivation(deps, row);
          // Never made (failed before its snapshot): nothing holds the name any more.
          else catalog.releaseActivationName(run.request.activationId);
        },
      ],
    });
}

async function ensureImage(deps: ActivateDeps, ctx: Ctx): Promise<void> {
  const { catalog, pull } = deps;
  const image = catalog.getImage(ctx.request.image);
  if (image?.state === "failed") await refuseUnchangedFailure(deps, ctx.request.image, image.error ?? "pull failed");
  if (image?.state !== "ready") {
    const { runId } = pull.start(ctx.request.image, { image: ctx.request.image }, { layers: [], chainIds: [] });
    // Waiting for the pull is not work: a kill meanwhile costs this run nothing.
    const outcome = await ctx.waitFor(`pull of ${ctx.request.image}`, () => pull.wait(runId));
    if (outcome.status !== "succeeded") throw abort(`image ${ctx.request.image} could not be pulled: ${outcome.error}`, pullFailure(outcome, ctx.request.image));
  }
  const ready = catalog.getImage(ctx.request.image);
  if (ready?.state !== "ready" || !ready.chainId) throw abort(`image ${ctx.request.image} is not ready`);
  ctx.state.chainId = ready.chainId;
}

/**
 * An image whose last pull failed is pulled again only when its S3 folder changed since: the
 * same keys, ETags and sizes would fail the same way (and fetch the same bytes again). Throws the
 * failure, unchanged, when the listing is the same (or still cannot be listed).
 */
async function refuseUnchangedFailure({ catalog, s3, s3Config, pull }: ActivateDeps, image: string, failure: string): Promise<void> {
  const failed = catalog.imageLayers(image).map((l) => `${l.position} ${l.key} ${l.etag} ${l.size}`);
  let now: string[];
  try {
    now = (await listImageLayers(s3, s3Config, image)).map((l) => `${l.position} ${l.key} ${l.etag} ${l.size}`);
  } catch (err) {
    if (!isPermanentS3Error(err)) throw err; // transient: the step is retried
    throw abort(`image ${image} failed to pull and still cannot be listed (${err.message}); its last pull failed with: ${failure}`, err);
  }
  if (failed.length > 0 && now.join("\n") === failed.join("\n")) {
    const lastPull = pull.list({ resourceId: image, status: "failed", limit: 1 })[0];
    const message = `image ${image} is not pulled again: its last pull failed and its S3 folder has not changed since (PullImage retries it): ${failure}`;
    throw abort(message, lastPull ? pullFailure(lastPull, image) : undefined);
  }
}

/** The failed pull's typed reason, as the activation's (an image not found is NOT_FOUND here too). */
function pullFailure(pull: RunRecord<unknown, unknown>, image: string): AgentError {
  const reason = (pull.errorDetail?.reason ?? "RUN_FAILED") as Reason;
  return new AgentError(reason, `pull of ${image} failed: ${pull.error ?? "no reason recorded"}`, { ...pull.errorDetail?.metadata, image, run_id: pull.id, step: pull.step });
}

/**
 * The activation's row, allocated on first use (before the pool is asked); a resumed run finds the
 * one it made. Allocated only while the activation's name is still reserved (a deactivation, say a
 * forced deletion of the image, removed it and released the name: it must not come back) and the
 * image is still ready on that chain (DeleteImage's forget step drops the image row only when no
 * activation of it exists). Both checks and the insert are one synchronous stretch: nothing else
 * in the agent runs in between.
 */
function activationRow(deps: ActivateDeps, ctx: Ctx): ActivationRow {
  const { catalog } = deps;
  const { activationId, image } = ctx.request;
  const existing = catalog.getActivation(activationId);
  if (existing) return existing;
  if (!catalog.activationNameOf(activationId)) throw abort(removedWhileMade(ctx));
  const current = catalog.getImage(image);
  if (current?.state !== "ready" || current.chainId !== ctx.state.chainId) throw abort(`image ${image} was deleted or changed while activation ${activationId} was being made`);
  return allocateActivation(deps, { id: activationId, image, chainId: ctx.state.chainId! });
}

const removedWhileMade = (ctx: Ctx) => `activation ${ctx.request.activationId} of ${ctx.request.image} was deactivated (a forced deletion of the image, say) while it was being made`;

async function undoActivation(deps: ActivateDeps, row: ActivationRow): Promise<void> {
  try {
    await removeActivation(deps, row);
  } catch (err) {
    deps.log("error", "could not undo a failed activation; doctor will find it", { activation: row.id, error: formatError(err) });
  }
}
