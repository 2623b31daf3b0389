// The pull FSM: list → layers → finish.
//
// list    reads the image's folder in S3 (the folder is the image) and records the layer list.
// layers  downloads the layers and builds the chain of thin devices at the same time:
//         - every layer not already in the blob store is fetched (IMGD_DOWNLOAD_CONCURRENCY at
//           once, across pulls), content-addressed, and validated as a tar WHILE it downloads (a
//           bad entry stops the download at once); a listed size over the layer limit is refused
//           before any byte of any layer is requested; a layer shared with another image is
//           found by its ETag and size and not fetched again;
//         - layer i is applied as soon as layers 1..i are stored, while later layers still
//           download: device i = snapshot of device i-1 + layer i, keyed by chain id, so images
//           with the same leading layers share devices.
//         A permanent failure (a refused layer, a 403, a full pool) aborts the downloads still
//         going; any other failure stops applying but lets them finish, so that the retry finds
//         them stored. Either way the step returns only once every download has ended, and a
//         layer being applied is finished first (only an agent stop cuts it short).
// finish  marks the image ready.
// Every step is idempotent: it checks the catalog (and the blob store) before acting, so a
// resumed run redoes only what is missing: a stored blob is not fetched again, a ready device
// not rebuilt. A device half-made when the agent died is "allocated" in the catalog, never
// "ready": it is discarded and rebuilt. An attempt that fails leaves no checkpoint, so what the
// layers step learns goes to the catalog as it goes (blobs and layer digests, chain ids): a
// failed pull's finalizer finds its half-made devices from there.
import type { Catalog } from "../catalog.ts";
import { crashPoint } from "../crash-points.ts";
import type { Fsm, FsmEngine, StepContext } from "../fsm/engine.ts";
import { abort, AbortError, formatError, interrupted } from "../fsm/errors.ts";
import { HelperError, type HelperClient } from "../helper-client.ts";
import type { KeyedLock } from "../keyed-lock.ts";
import { chainLock, imageLock, objectLock } from "../lock-keys.ts";
import { checkListedSize, LayerValidationError, type LayerLimits } from "../layers/validate.ts";
import type { BlobStore } from "../blobs/store.ts";
import type { S3Config } from "../s3/client.ts";
import type { S3Client } from "@aws-sdk/client-s3";
import { listImageLayers } from "../s3/image-source.ts";
import { chainIds, nextChainId } from "./chain.ts";
import type { DownloadGate } from "./download-gate.ts";
import { classifyStepError } from "./errors.ts";
import { layerSizeOf, spaceProblem } from "./pool-space.ts";
import type { PlannedLayer, PullProgressBoard, RunProgress } from "./pull-progress.ts";
import { AgentError } from "../grpc/errors.ts";
import { allocateLayerDevice, createLayerDevice, layerDeviceReady, removeLayerDevice, unmapLayerDevice } from "../thin-devices.ts";

export interface PullRequest {
  image: string;
}

export interface PulledLayer {
  position: number;
  key: string;
  size: number;
  etag: string;
  digest?: string;
}

export interface PullState {
  layers: PulledLayer[];
  chainIds: string[];
}

export interface PullDeps {
  engine: FsmEngine;
  catalog: Catalog;
  blobs: BlobStore;
  s3: S3Client;
  s3Config: S3Config;
  helper: HelperClient;
  locks: KeyedLock;
  /** The validator's limits, from the agent's settings (IMGD_LAYER_MAX_*); defaults when absent. */
  layerLimits?: Partial<LayerLimits>;
  downloads: DownloadGate;
  /** Per-layer progress of the running pulls, which the PullImage streams read. */
  progress: PullProgressBoard;
}

export type PullFsm = Fsm<PullRequest, PullState>;

type Ctx = StepContext<PullRequest, PullState>;

export function registerPullFsm(deps: PullDeps): PullFsm {
  const { engine, catalog } = deps;
  return engine
    .register<PullRequest, PullState>("pull")
    .start("list", (ctx) => listLayers(deps, ctx))
    // Earlier versions downloaded every layer ("download"), then applied them ("unpack").
    .to("layers", (ctx) => pullLayers(deps, ctx), { replaces: ["download", "unpack"] })
    .to("finish", (ctx) =>
      // Under the image's lock, as a deletion forgets the row: the image is ready, or this
      // pull fails, never "succeeded" with no row.
      ctx.withLock(imageLock(ctx.request.image), async () => {
        try {
          catalog.markImageReady(ctx.request.image, ctx.runId, ctx.state.chainIds.at(-1)!);
        } catch (err) {
          throw abort(formatError(err), err);
        }
      }),
    )
    .end({
      finalizers: [
        async (run) => {
          deps.progress.close(run.id);
          if (run.status !== "failed") return;
          // Only this run's row: a finalizer run again after a crash leaves a newer pull's outcome.
          await deps.locks.run(imageLock(run.request.image), async () => void catalog.markImageFailed(run.request.image, run.error ?? "pull failed", run.id));
          await discardHalfMadeDevices(deps, run.state);
        },
      ],
    });
}

async function listLayers(deps: PullDeps, ctx: Ctx): Promise<void> {
  const { s3, s3Config, catalog } = deps;
  let objects;
  try {
    objects = await listImageLayers(s3, s3Config, ctx.request.image);
  } catch (err) {
    throw classifyStepError(err, `image ${ctx.request.image}`);
  }
  ctx.state.layers = objects.map((o) => ({ position: o.position, key: o.key, size: o.size, etag: o.etag }));
  ctx.state.chainIds = [];
  // Only now that S3 listed the image does it get a row (under the lock a deletion takes).
  await ctx.withLock(imageLock(ctx.request.image), async () => catalog.beginPull(ctx.request.image, ctx.runId, ctx.state.layers));
  await trackProgress(deps, ctx, true);
}

/**
 * The run's progress, planned from what is already here: a layer whose blob is stored needs no
 * download; one whose blob is stored and whose device exists (its chain id needs the digests of
 * every layer up to it) needs nothing. A run resumed after a restart plans again from its
 * checkpoint (what it built before is then "reused").
 */
async function trackProgress(deps: PullDeps, ctx: Ctx, fresh = false): Promise<RunProgress> {
  const existing = fresh ? undefined : deps.progress.get(ctx.runId);
  if (existing) {
    existing.attach(ctx.progress); // this step's events now
    return existing;
  }
  const plan: PlannedLayer[] = [];
  const digests: string[] = [];
  for (const layer of ctx.state.layers) {
    const digest = layer.digest ?? deps.catalog.knownBlobFor(layer);
    const stored = digest !== undefined && (await deps.blobs.has(digest)) !== undefined;
    // Chain ids need every digest before this one.
    if (digest !== undefined && digests.length === plan.length) digests.push(digest);
    const chainId = digests.length === plan.length + 1 ? chainIds(digests).at(-1)! : undefined;
    const reused = stored && chainId !== undefined && deps.catalog.getDevice(chainId)?.state === "ready";
    plan.push({ position: layer.position, size: layer.size, digest, stored, reused });
  }
  const run = deps.progress.open(ctx.runId, plan);
  run.attach(ctx.progress);
  return run;
}

async function pullLayers(deps: PullDeps, ctx: Ctx): Promise<void> {
  refuseOversizedLayers(deps, ctx);
  const progress = await trackProgress(deps, ctx);
  // Fired by the first permanent failure: the run is over, so the downloads still going stop.
  const stop = new AbortController();
  const signal = AbortSignal.any([ctx.signal, stop.signal]);
  const stopIfPermanent = (err: unknown): never => {
    if (err instanceof AbortError) stop.abort(err);
    throw err;
  };
  const stored = ctx.state.layers.map((layer) => storeLayer(deps, ctx, layer, progress, signal).catch(stopIfPermanent));
  const chain = buildChain(deps, ctx, stored, progress, signal).catch(stopIfPermanent);
  // Every branch ends before the step does: nothing keeps running detached from the run.
  await Promise.allSettled([chain, ...stored]);
  if (stop.signal.aborted) throw stop.signal.reason;
  ctx.state.chainIds = await chain; // any other failure reached the chain: it awaits every layer
}

/** Before any byte is requested: an object listed larger than a layer may be is never fetched. */
function refuseOversizedLayers(deps: PullDeps, ctx: Ctx): void {
  for (const layer of ctx.state.layers) {
    try {
      checkListedSize(layer.size, deps.layerLimits);
    } catch (err) {
      if (!(err instanceof LayerValidationError)) throw err;
      throw refused(ctx, layer, err);
    }
  }
}

/** Returns the digest of the layer's blob once it is stored, downloading it unless it already is. */
async function storeLayer(deps: PullDeps, ctx: Ctx, layer: PulledLayer, progress: RunProgress, signal: AbortSignal): Promise<string> {
  // Known and stored (another image's layer, or fetched before a restart): no download slot needed.
  let digest = deps.catalog.knownBlobFor(layer);
  if (digest !== undefined && (await deps.blobs.has(digest))) {
    deps.catalog.recordBlob(layer, digest);
  } else {
    // Through the gate GC's sweep of unrecorded files takes: the blob is renamed into the store
    // before it is recorded.
    digest = await ctx.withQueue(
      "download",
      () => deps.downloads.download(() => fetchLayer(deps, ctx, layer, signal, (bytes) => progress.downloading(layer.position, bytes))),
      { signal }, // a run that failed stops waiting for a slot another run holds
    );
  }
  layer.digest = digest;
  deps.catalog.setLayerDigest(ctx.request.image, layer.position, digest);
  progress.stored(layer.position, digest, layer.size);
  return digest;
}

/** Returns the digest of the layer's bytes, downloading and validating them if not yet stored. */
async function fetchLayer(deps: PullDeps, ctx: Ctx, layer: PulledLayer, signal: AbortSignal, onBytes: (n: number) => void): Promise<string> {
  const { catalog, blobs } = deps;
  // One download per S3 object at a time, even across images sharing the layer.
  return ctx.withLock(objectLock(layer), async () => {
    const known = catalog.knownBlobFor(layer);
    if (known && (await blobs.has(known))) {
      catalog.recordBlob(layer, known);
      return known;
    }
    let digest: string;
    let summary;
    try {
      // Validated while it downloads: a refusal stops the download and deletes the temp file.
      const stored = await blobs.downloadLayer(deps.s3, deps.s3Config, layer, {
        signal,
        onProgress: (bytes) => onBytes(bytes),
        validate: deps.layerLimits ?? {},
      });
      digest = stored.digest;
      summary = stored.summary!;
      if (stored.etag !== layer.etag) {
        // Replaced since the listing: the publisher's newer version is what this image gets.
        ctx.log("warn", "layer object changed since it was listed; using the new version", { key: layer.key, listed: layer.etag, stored: stored.etag });
        Object.assign(layer, { etag: stored.etag, size: stored.size });
      }
    } catch (err) {
      if (err instanceof LayerValidationError) throw refused(ctx, layer, err);
      throw classifyStepError(err, `image ${ctx.request.image}: layer ${layer.key}`);
    }
    catalog.recordBlob(layer, digest, layerSizeOf(summary));
    return digest;
  }, { signal });
}

/** The run's error for a layer the validator refused (while downloading: its digest is not known yet). */
function refused(ctx: Ctx, layer: PulledLayer, err: LayerValidationError): Error {
  const message = `image ${ctx.request.image}: layer ${layer.key} (${layer.size} bytes, ETag ${layer.etag}) refused: entry ${err.entry}: ${err.rule}: ${err.message}`;
  return abort(message, new AgentError("LAYER_REFUSED", message, { image: ctx.request.image, layer: layer.key, entry: err.entry, rule: err.rule }, { cause: err }));
}

/**
 * Applies the layers in order, each as soon as it and every layer before it are stored, while
 * later layers still download. Returns the chain ids.
 */
async function buildChain(deps: PullDeps, ctx: Ctx, stored: Promise<string>[], progress: RunProgress, signal: AbortSignal): Promise<string[]> {
  const chain: string[] = [];
  for (const [i, layer] of ctx.state.layers.entries()) {
    const digest = await stored[i]!;
    signal.throwIfAborted(); // another layer ended the run: build nothing more
    const parent = chain.at(-1) ?? null;
    const chainId = nextChainId(parent, digest);
    // The device in progress is finished even if the run fails meanwhile: only an agent stop
    // (ctx.signal) cuts it short, and the device then stays "allocated", to be rebuilt.
    const built = await ctx.withLock(chainLock(chainId), () =>
      ensureLayerDevice(deps, ctx, chainId, parent, digest, layer.key, () => progress.applying(layer.position)),
    );
    deps.catalog.setLayerChain(ctx.request.image, layer.position, chainId);
    if (built) progress.applied(layer.position);
    else progress.reused(layer.position);
    chain.push(chainId);
  }
  return chain;
}

/** Builds the layer's device unless it exists; true when it was built (onBuild: just before). */
async function ensureLayerDevice(
  deps: PullDeps,
  ctx: Ctx,
  chainId: string,
  parentChainId: string | null,
  digest: string,
  key: string,
  onBuild: () => void,
): Promise<boolean> {
  const { catalog, helper } = deps;
  const existing = catalog.getDevice(chainId);
  if (existing?.state === "ready") return false;
  // A device left "allocated" by a crash may be half-applied: never trust it, rebuild it (one
  // left "removing" is finished first).
  if (existing) await removeLayerDevice(deps, existing);

  const parent = parentChainId === null ? null : catalog.getDevice(parentChainId);
  if (parentChainId !== null && parent?.state !== "ready") throw new Error(`parent device ${parentChainId} is not ready`);
  // One apply at a time (by default): the space check below must not be raced by another apply.
  const built = await ctx.withQueue("apply", async () => {
    await checkPoolSpace(deps, ctx, digest, key, parent === null);
    onBuild();
    const device = allocateLayerDevice(deps, { chainId, parentChainId, layerDigest: digest });
    crashPoint("pull.thin-id-allocated");
    ctx.log("info", "building layer device", { chainId, thinId: device.thinId, parent: parent?.thinId, digest });
    try {
      const opts = { signal: ctx.signal }; // a stop reaches the helper calls
      await createLayerDevice(deps, device, parent ?? null, opts);
      if (!parent) await helper.call("fs.mkfs", { name: device.name }, opts);
      await helper.call("layer.apply", { name: device.name, digest }, opts);
      crashPoint("pull.layer-applied");
      await unmapLayerDevice(deps, device, opts);
    } catch (err) {
      // Stopping: the device stays "allocated" and the resumed step discards and rebuilds it.
      if (ctx.signal.aborted) throw err;
      await removeLayerDevice(deps, device).catch((cleanupErr) =>
        ctx.log("error", "could not discard a failed layer device", { chainId, error: formatError(cleanupErr) }),
      );
      // The helper went away mid-operation (restarted): the device may hold half an apply, so it
      // is rebuilt, and that is an interruption of the step, not a failed attempt.
      if (err instanceof HelperError && err.connectionLost) {
        throw interrupted(`image ${ctx.request.image}: layer ${key} (${digest}): the helper's connection dropped during ${err.op}; rebuilding the device`, err);
      }
      // Out of space mid-apply: not retried. A retry would only meet the space check, whose
      // "pool is out_of_data_space" would replace the real reason as the run's error.
      if (err instanceof HelperError && err.code === "NO_SPACE") {
        const message = `image ${ctx.request.image}: layer ${key} (${digest}) failed: ${err.code}: ${err.message}`;
        throw abort(message, new AgentError("POOL_FULL", message, { image: ctx.request.image, layer: key }, { cause: err }));
      }
      if (err instanceof HelperError && err.code === "LAYER_REFUSED") {
        // The helper's own checks while applying (the agent's validator passed the layer).
        const message = `image ${ctx.request.image}: layer ${key} (${digest}) refused: ${err.code}: ${err.message}`;
        throw abort(message, new AgentError("LAYER_REFUSED", message, { image: ctx.request.image, layer: key, rule: "HELPER_REFUSED" }, { cause: err }));
      }
      throw classifyStepError(err, `image ${ctx.request.image}: layer ${key} (${digest}) refused`);
    }
    return device;
  });
  crashPoint("pull.device-built");
  layerDeviceReady(deps, built);
  return true;
}

/** Refuses a layer the pool cannot hold, before any device is made for it. */
async function checkPoolSpace({ catalog, blobs, helper }: PullDeps, ctx: Ctx, digest: string, key: string, freshFilesystem: boolean): Promise<void> {
  const content = catalog.blobContent(digest) ?? { fileBytes: (await blobs.has(digest))?.size ?? 0, entries: 0 };
  const pool = await helper.call("pool.status", {}, { signal: ctx.signal });
  const problem = spaceProblem(content, pool, freshFilesystem);
  if (problem) {
    const message = `image ${ctx.request.image}: layer ${key} (${digest}) does not fit: ${problem}`;
    throw abort(message, new AgentError("POOL_FULL", message, { image: ctx.request.image, layer: key }));
  }
}

/**
 * A failed pull leaves no half-made device of its chain behind (the failed attempt's own cleanup
 * may have failed too, e.g. with the helper gone), rather than waiting for the next pull or
 * restart. Under the chain's lock: a device being built by another pull is never touched.
 */
async function discardHalfMadeDevices(deps: PullDeps, state: PullState): Promise<void> {
  // The failed attempt's digests are not in its checkpoint: the catalog knows the blobs it stored.
  const digests: string[] = [];
  for (const layer of state.layers) {
    const digest = layer.digest ?? deps.catalog.knownBlobFor(layer);
    if (!digest) break;
    digests.push(digest);
  }
  for (const chainId of chainIds(digests)) {
    await deps.locks.run(chainLock(chainId), async () => {
      const device = deps.catalog.getDevice(chainId);
      if (device?.state === "allocated") await removeLayerDevice(deps, device);
    });
  }
}
