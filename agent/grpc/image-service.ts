// imgd.v1.ImageService: validates every request, then answers from the catalog or drives the FSMs.
import type { CallContext } from "nice-grpc";
import { ulid } from "ulid";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  FindingKind,
  ImageService,
  ImageState,
  LayerPhase,
  PoolMode,
  RepairResult,
  RunKind,
  RunStatus,
  type ListImagesRequest,
  type ActivateImageRequest,
  type DeactivateImageRequest,
  type GetImageRequest,
  type ListActivationsRequest,
  type ListRunsRequest,
  type DoctorRequest,
  type DeleteImageRequest,
  type PullImageRequest,
  type ImageSchema,
  type ActivationSchema,
  type PullImageResponseSchema,
  type RunSchema,
} from "../../client/gen/imgd/v1/imgd_pb.js";
import type { Catalog, NamedActivationRow } from "../catalog.ts";
import { versionString } from "../../client/version.ts";
import { runDoctor, type Finding } from "../doctor.ts";
import type { KeyedLock } from "../keyed-lock.ts";
import type { Logger } from "../log.ts";
import { reconcile, type RepairOutcome } from "../reconcile.ts";
import type { RunRecord } from "../fsm/engine.ts";
import type { HelperClient } from "../helper-client.ts";
import type { ActivateFsm } from "../images/activate.ts";
import type { BlobStore } from "../blobs/store.ts";
import type { DeactivateFsm } from "../images/deactivate.ts";
import type { DeleteFsm } from "../images/delete.ts";
import { collectGarbage } from "../images/gc.ts";
import type { DownloadGate } from "../images/download-gate.ts";
import type { PullFsm } from "../images/pull.ts";
import type { PullProgress, PullProgressBoard } from "../images/pull-progress.ts";
import type { PoolGate } from "../pool-identity.ts";
import { validateImageName } from "../s3/image-source.ts";
import { followRun } from "./run-stream.ts";
import { AgentError, invalidArgument, runError } from "./errors.ts";
import { makePageToken, page, pageSize, readPageToken } from "./paging.ts";

type ImageMsg = MessageInitShape<typeof ImageSchema>;
type ActivationMsg = MessageInitShape<typeof ActivationSchema>;
type ProgressMsg = MessageInitShape<typeof PullImageResponseSchema>;

export interface ImageServiceDeps {
  catalog: Catalog;
  helper: HelperClient;
  pull: PullFsm;
  activate: ActivateFsm;
  deactivate: DeactivateFsm;
  remove: DeleteFsm;
  blobs: BlobStore;
  locks: KeyedLock;
  downloads: DownloadGate;
  progress: PullProgressBoard;
  log: Logger;
  tmpDir: string;
  /** Whether the catalog describes the helper's pool (doctor updates it; server.ts guards by it). */
  poolGate: PoolGate;
}

export function imageService(deps: ImageServiceDeps) {
  const { catalog, helper, pull, activate, deactivate, remove } = deps;
  const imageMessage = (name: string): ImageMsg | undefined => {
    const row = catalog.getImage(name);
    if (!row) return undefined;
    const layers = catalog.imageLayers(name);
    return {
      name: row.name,
      state: { pulling: ImageState.PULLING, ready: ImageState.READY, failed: ImageState.FAILED }[row.state],
      layers: layers.map((l) => ({
        position: l.position,
        key: l.key,
        digest: l.digest ?? "",
        size: BigInt(l.size),
        chainId: l.chainId ?? "",
        thinId: l.chainId ? (catalog.getDevice(l.chainId)?.thinId ?? 0) : 0,
      })),
      thinId: row.chainId ? (catalog.getDevice(row.chainId)?.thinId ?? 0) : 0,
      chainId: row.chainId ?? "",
      size: BigInt(layers.reduce((sum, l) => sum + l.size, 0)),
      error: row.error ?? "",
      updatedAt: timestamp(row.updatedAt),
    };
  };

  /** Ready means: the catalog says so and every device of the chain is recorded complete. */
  const isReady = (name: string): boolean => {
    const row = catalog.getImage(name);
    if (row?.state !== "ready") return false;
    return catalog.imageLayers(name).every((l) => l.chainId && catalog.getDevice(l.chainId)?.state === "ready");
  };

  return {
    async *pullImage(request: PullImageRequest, context: CallContext): AsyncGenerator<ProgressMsg> {
      const name = imageName(request.image);
      if (isReady(name)) {
        const image = imageMessage(name)!;
        const layers = image.layers!.map((l) => ({ position: l.position, digest: l.digest, phase: LayerPhase.REUSED, bytesDone: l.size, bytesTotal: l.size }));
        yield { state: "ready", status: RunStatus.SUCCEEDED, image, layers };
        return;
      }
      const { runId, joined } = pull.start(name, { image: name }, { layers: [], chainIds: [] });
      // The run's progress as it is now (a joined stream starts where the run is), then as the
      // run reports it: the pull already throttles its updates, so each one is sent.
      let progress = deps.progress.get(runId)?.snapshot();
      let step = pull.get(runId)?.step ?? "";
      const message = (status: RunStatus, image?: ImageMsg): ProgressMsg => ({ runId, state: step, status, joined, image, ...(progress ? progressFields(progress) : {}) });
      yield message(RunStatus.RUNNING);
      for await (const event of followRun(pull, runId, context.signal)) {
        if (event.type === "step") {
          step = event.step;
          yield message(RunStatus.RUNNING);
        } else if (event.type === "progress") {
          progress = event.progress as PullProgress;
          yield message(RunStatus.RUNNING);
        } else if (event.type === "finished") {
          const run = event.run;
          step = run.step;
          if (run.status === "succeeded") {
            yield message(RunStatus.SUCCEEDED, imageMessage(name));
            return;
          }
          // Once, as the stream's status (with its ErrorInfo), not also in a last message.
          throw runError(run, `pull of ${name}`, { image: name });
        }
      }
    },

    async getImage(request: GetImageRequest) {
      const name = imageName(request.image);
      const image = imageMessage(name);
      if (!image) throw new AgentError("IMAGE_NOT_FOUND", `image ${name} is not known here; pull it first`, { image: name });
      return { image };
    },

    async listImages(request: ListImagesRequest) {
      const size = pageSize(request.pageSize);
      const after = readPageToken(request.pageToken, "images", {}, isImageName);
      const rows = catalog.listImages({ after, limit: size + 1 });
      const { items, nextPageToken } = page(rows, size, (last) => makePageToken("images", {}, last.name));
      return { images: items.map((row) => imageMessage(row.name)!), nextPageToken };
    },

    async activateImage(request: ActivateImageRequest) {
      const image = imageName(request.image);
      const name = request.name === "" ? undefined : activationName(request.name);
      const labels = activationLabels(request.labels);
      const { activationId, runId } = startActivation(image, name, labels);
      // The run does not depend on this call: a caller gone (deadline, cancel) finds the
      // activation by its name later, done or rolled back.
      const outcome = runId === undefined ? undefined : await activate.wait(runId);
      const context = { image, activation: activationId, ...(name ? { name } : {}) };
      if (outcome && outcome.status !== "succeeded") throw runError(outcome, `activation ${name ? `${name} ` : ""}of ${image}`, context);
      const row = catalog.listNamedActivations({ id: activationId })[0];
      if (!row) throw new AgentError("INTERNAL", `activation ${activationId} finished but has no record`, context);
      return { activation: activationMessage(row) };
    },

    async deactivateImage(request: DeactivateImageRequest) {
      const activationId = activationToDeactivate(request);
      if (activationId === undefined) return {}; // allow_missing, and there is none
      const row = catalog.getActivation(activationId);
      const named = catalog.listNamedActivations({ id: activationId })[0];
      // Still being made (its name is reserved, its run is going): not yet.
      if (activate.list({ resourceId: activationId, status: "running", limit: 1 }).length > 0) {
        throw new AgentError("ACTIVATION_BUSY", `activation ${activationId} is still being created; deactivate it once ActivateImage has answered`, { activation: activationId });
      }
      if (!row) {
        if (request.allowMissing) return {};
        throw new AgentError("ACTIVATION_NOT_FOUND", `activation ${request.name || request.activationId} is not known`, { activation: activationId });
      }
      // A half-made activation whose run has ended (failed, and its undo too) may be removed too.
      const { runId } = deactivate.start(row.id, { activationId: row.id }, {});
      const outcome = await deactivate.wait(runId);
      if (outcome.status !== "succeeded") throw runError(outcome, `deactivation of ${row.id}`, { activation: row.id, image: row.image });
      return named ? { activation: activationMessage(named) } : {};
    },

    async listActivations(request: ListActivationsRequest) {
      const image = request.image === "" ? undefined : imageName(request.image);
      const size = pageSize(request.pageSize);
      const filters = { image: image ?? "" };
      const after = readPageToken(request.pageToken, "activations", filters, (id) => ACTIVATION_ID.test(id));
      const rows = catalog.listNamedActivations({ image, after, limit: size + 1 });
      const { items, nextPageToken } = page(rows, size, (last) => makePageToken("activations", filters, last.id));
      return { activations: items.map(activationMessage), nextPageToken };
    },

    async getPool() {
      const pool = await helper.call("pool.status", {});
      return {
        name: pool.name,
        dataUsedBytes: BigInt(pool.dataUsedBytes),
        dataTotalBytes: BigInt(pool.dataTotalBytes),
        metadataUsedBytes: BigInt(pool.metaUsedBytes),
        metadataTotalBytes: BigInt(pool.metaTotalBytes),
        mode: POOL_MODES[pool.mode] ?? PoolMode.UNSPECIFIED,
        blockSizeBytes: BigInt(pool.blockSizeBytes),
        errorIfNoSpace: pool.errorIfNoSpace,
      };
    },

    async listRuns(request: ListRunsRequest) {
      const size = pageSize(request.pageSize);
      if (!(request.fsm in RunKind)) throw invalidArgument("fsm", `unknown run kind ${request.fsm}`);
      if (request.resourceId.length > 256) throw invalidArgument("resource_id", "resource_id is longer than 256 characters");
      const filters = { fsm: String(request.fsm), resource_id: request.resourceId };
      const beforeId = readPageToken(request.pageToken, "runs", filters, (id) => RUN_ID.test(id));
      const filter = { resourceId: request.resourceId || undefined, limit: size + 1, ...(beforeId ? { beforeId } : {}) };
      const fsms = { pull, activate, deactivate, delete: remove } as const;
      const runs: RunRecord<unknown, unknown>[] = [];
      for (const [fsmName, fsm] of Object.entries(fsms)) {
        if (request.fsm === RunKind.UNSPECIFIED || RUN_KINDS[fsmName] === request.fsm) runs.push(...(fsm.list(filter) as RunRecord<unknown, unknown>[]));
      }
      // Run ids are ULIDs from one monotonic source: newest first across the FSMs.
      runs.sort((a, b) => (a.id < b.id ? 1 : -1));
      const { items, nextPageToken } = page(runs.slice(0, size + 1), size, (last) => makePageToken("runs", filters, last.id));
      return { runs: items.map(runMessage), nextPageToken };
    },

    async deleteImage(request: DeleteImageRequest) {
      const name = imageName(request.image);
      const meta = { image: name };
      if (!catalog.getImage(name) && remove.list({ resourceId: name, status: "running", limit: 1 }).length === 0) {
        throw new AgentError("IMAGE_NOT_FOUND", `image ${name} is not known here`, meta);
      }
      if (pull.list({ resourceId: name, status: "running", limit: 1 }).length > 0) {
        throw new AgentError("IMAGE_BUSY", `image ${name} is being pulled; delete it once the pull has finished`, meta);
      }
      if (activate.list({ status: "running", limit: 100_000 }).some((run) => (run.request as { image: string }).image === name)) {
        throw new AgentError("IMAGE_BUSY", `image ${name} is being activated; delete it once the activation has finished`, meta);
      }
      const activations = catalog.listActivations(name);
      if (activations.length > 0 && !request.force) {
        throw new AgentError(
          "IMAGE_HAS_ACTIVATIONS",
          `image ${name} has ${activations.length} activation(s) (${activations.map((a) => a.id).join(", ")}): deactivate them first, or delete with force`,
          meta,
        );
      }
      const { runId } = remove.start(name, { image: name, force: request.force }, { deactivated: [], chainIds: [], removedDevices: [] });
      const outcome = await remove.wait(runId);
      if (outcome.status !== "succeeded") throw runError(outcome, `deletion of ${name}`, meta);
      return { deactivated: outcome.state.deactivated, removedDevices: outcome.state.removedDevices };
    },

    async collectGarbage() {
      const report = await collectGarbage(deps);
      return { ...report, freedBlobBytes: BigInt(report.freedBlobBytes) };
    },

    async doctor(request: DoctorRequest) {
      if (request.adoptPool && request.wipePool) throw invalidArgument("wipe_pool", "adopt_pool and wipe_pool exclude each other: keep the unknown thin ids, or delete them");
      const foreign = request.adoptPool ? "adopt" : request.wipePool ? "wipe" : undefined;
      if (!request.repair && !foreign) {
        const report = await runDoctor(deps);
        return { ...report, findings: report.findings.map((f) => findingMessage(f)) };
      }
      const { outcomes, after } = await reconcile({ ...deps, foreign, log: (level, msg, fields) => deps.log(level, msg, { sys: "reconcile", ...fields }) });
      // What was found and done, then anything a fresh look finds that the pass did not see.
      const seen = new Set(outcomes.map((o) => `${o.finding.kind} ${o.finding.subject}`));
      const remaining = after.findings.filter((f) => !seen.has(`${f.kind} ${f.subject}`)).map((f) => findingMessage(f));
      return { clean: after.clean, poolThinIds: after.poolThinIds, catalogThinIds: after.catalogThinIds, findings: [...outcomes.map((o) => findingMessage(o.finding, o)), ...remaining] };
    },

    async getVersion() {
      return { version: versionString(), api: API_PACKAGE };
    },
  };

  /**
   * The activation a request names: an existing one (same name, same image: retry-safe), or a
   * new run, its name reserved in the transaction that starts it (so a retry, or the run resumed
   * after a restart, finds it). JavaScript runs this synchronously: concurrent calls with one name
   * cannot both reserve it.
   */
  function startActivation(image: string, name: string | undefined, labels: Record<string, string>): { activationId: string; runId?: string } {
    return catalog.db.transaction(() => {
      const held = name === undefined ? undefined : catalog.getActivationName(name);
      if (held) {
        if (held.image !== image) {
          throw new AgentError("ACTIVATION_NAME_TAKEN", `activation name ${name} is taken by activation ${held.activationId} of image ${held.image}`, { name: name!, activation: held.activationId, image: held.image });
        }
        const running = activate.list({ resourceId: held.activationId, status: "running", limit: 1 })[0];
        if (running) return { activationId: held.activationId, runId: running.id };
        const row = catalog.getActivation(held.activationId);
        if (row?.state === "active") return { activationId: held.activationId };
        if (row?.state === "deactivating") {
          throw new AgentError("ACTIVATION_BUSY", `activation ${name} (${held.activationId}) is being deactivated; try again once it is gone`, { name: name!, activation: held.activationId, image });
        }
        // Its run ended without an activation (and its undo could not free the name): it is free.
        catalog.releaseActivationName(held.activationId);
      }
      const activationId = ulid();
      catalog.reserveActivationName({ name: name ?? `act-${activationId.toLowerCase()}`, activationId, image, labels });
      const { runId } = activate.start(activationId, { image, activationId }, {});
      return { activationId, runId };
    })();
  }

  /** The activation id a DeactivateImage request names; undefined: none, and allow_missing. */
  function activationToDeactivate(request: DeactivateImageRequest): string | undefined {
    if ((request.activationId === "") === (request.name === "")) throw invalidArgument("activation_id", "give exactly one of activation_id and name");
    if (request.activationId !== "") {
      if (!ACTIVATION_ID.test(request.activationId)) {
        throw invalidArgument("activation_id", `activation id must be the 26-character id ActivateImage returned, got ${JSON.stringify(request.activationId.slice(0, 64))}`);
      }
      return request.activationId;
    }
    const held = catalog.getActivationName(activationName(request.name, "name"));
    if (held) return held.activationId;
    if (request.allowMissing) return undefined;
    throw new AgentError("ACTIVATION_NOT_FOUND", `no activation is named ${request.name}`, { name: request.name });
  }
}

export const API_PACKAGE = ImageService.typeName.replace(/\.[^.]+$/, "");

function findingMessage(f: Finding, outcome?: RepairOutcome) {
  const results = { repaired: RepairResult.REPAIRED, skipped: RepairResult.SKIPPED, failed: RepairResult.FAILED } as const;
  return {
    kind: FindingKind[f.kind],
    subject: f.subject,
    detail: f.detail,
    repair: f.repair,
    result: outcome ? results[outcome.result] : RepairResult.UNSPECIFIED,
    note: outcome?.note ?? "",
  };
}

const LAYER_PHASES = {
  pending: LayerPhase.PENDING,
  reused: LayerPhase.REUSED,
  downloading: LayerPhase.DOWNLOADING,
  applying: LayerPhase.APPLYING,
  done: LayerPhase.DONE,
} as const;

function progressFields(p: PullProgress): Pick<ProgressMsg, "bytesDone" | "bytesTotal" | "layers"> {
  return {
    bytesDone: BigInt(p.bytesDone),
    bytesTotal: BigInt(p.bytesTotal),
    layers: p.layers.map((l) => ({ position: l.position, digest: l.digest, phase: LAYER_PHASES[l.phase], bytesDone: BigInt(l.bytesDone), bytesTotal: BigInt(l.bytesTotal) })),
  };
}

/** Activation and run ids are ULIDs (Crockford base 32, upper case). */
const ACTIVATION_ID = /^[0-9A-HJKMNP-TV-Z]{26}$/;
const RUN_ID = ACTIVATION_ID;
const ACTIVATION_NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;
const LABEL_KEY = /^[a-z][a-z0-9_.-]{0,62}$/;
const MAX_LABELS = 64;
const MAX_LABEL_VALUE_BYTES = 256;

const RUN_KINDS: Record<string, RunKind> = { pull: RunKind.PULL, activate: RunKind.ACTIVATE, deactivate: RunKind.DEACTIVATE, delete: RunKind.DELETE };
/** The kernel's words (dm-thin status) for the pool's mode. */
const POOL_MODES: Record<string, PoolMode> = { rw: PoolMode.READ_WRITE, ro: PoolMode.READ_ONLY, out_of_data_space: PoolMode.OUT_OF_DATA_SPACE, fail: PoolMode.FAILED };

function isImageName(raw: string): boolean {
  try {
    validateImageName(raw);
    return true;
  } catch {
    return false;
  }
}

function imageName(raw: string): string {
  try {
    validateImageName(raw);
    return raw;
  } catch (err) {
    throw invalidArgument("image", err instanceof Error ? err.message : String(err));
  }
}

function activationName(raw: string, field = "name"): string {
  if (!ACTIVATION_NAME.test(raw)) throw invalidArgument(field, `activation name must match ${ACTIVATION_NAME.source}, got ${JSON.stringify(raw.slice(0, 80))}`);
  return raw;
}

function activationLabels(labels: Record<string, string>): Record<string, string> {
  const entries = Object.entries(labels);
  if (entries.length > MAX_LABELS) throw invalidArgument("labels", `at most ${MAX_LABELS} labels, got ${entries.length}`);
  for (const [key, value] of entries) {
    if (!LABEL_KEY.test(key)) throw invalidArgument("labels", `label key must match ${LABEL_KEY.source}, got ${JSON.stringify(key.slice(0, 80))}`);
    if (Buffer.byteLength(value) > MAX_LABEL_VALUE_BYTES) throw invalidArgument("labels", `label ${key}: value is longer than ${MAX_LABEL_VALUE_BYTES} bytes`);
  }
  return Object.fromEntries(entries.sort(([a], [b]) => (a < b ? -1 : 1)));
}

const timestamp = (iso: string) => timestampFromDate(new Date(iso));

function activationMessage(row: NamedActivationRow): ActivationMsg {
  return { id: row.id, image: row.image, thinId: row.thinId, devicePath: `/dev/mapper/${row.name}`, createdAt: timestamp(row.createdAt), name: row.activationName, labels: row.labels };
}

function runMessage(run: RunRecord<unknown, unknown>): MessageInitShape<typeof RunSchema> {
  const statuses = { running: RunStatus.RUNNING, succeeded: RunStatus.SUCCEEDED, failed: RunStatus.FAILED } as const;
  const status = statuses[run.status];
  return {
    id: run.id,
    fsm: RUN_KINDS[run.fsm] ?? RunKind.UNSPECIFIED,
    resourceId: run.resourceId,
    state: run.step,
    status,
    error: run.error ?? "",
    attempts: run.attempts,
    startedAt: timestamp(run.startedAt),
    ...(run.finishedAt ? { finishedAt: timestamp(run.finishedAt) } : {}),
  };
}
