// imgd.v1.ImageService: validates every request, then answers from the catalog or drives the FSMs.
import { ServerError, Status, type CallContext } from "nice-grpc";
import { ulid } from "ulid";
import type { MessageInitShape } from "@bufbuild/protobuf";
import {
  ImageState,
  RunStatus,
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
import type { ActivationRow, Catalog } from "../catalog.ts";
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
import type { PoolGate } from "../pool-identity.ts";
import { validateImageName } from "../s3/image-source.ts";
import { followRun } from "./run-stream.ts";

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
      updatedAt: row.updatedAt,
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
        yield { state: "ready", status: RunStatus.SUCCEEDED, image: imageMessage(name) };
        return;
      }
      const { runId, joined } = pull.start(name, { image: name }, { layers: [], chainIds: [] });
      yield { runId, state: pull.get(runId)?.step ?? "", status: RunStatus.RUNNING, joined };
      let step = pull.get(runId)?.step ?? "";
      for await (const event of followRun(pull, runId, context.signal)) {
        if (event.type === "step") {
          step = event.step;
          yield { runId, state: step, status: RunStatus.RUNNING, joined };
        } else if (event.type === "progress") {
          const p = event.progress as { layer?: number; layerCount?: number; bytesDone?: number; bytesTotal?: number };
          yield {
            runId,
            state: event.step,
            status: RunStatus.RUNNING,
            joined,
            layer: p.layer ?? 0,
            layerCount: p.layerCount ?? 0,
            bytesDone: BigInt(p.bytesDone ?? 0),
            bytesTotal: BigInt(p.bytesTotal ?? 0),
          };
        } else if (event.type === "finished") {
          const run = event.run;
          if (run.status === "succeeded") {
            yield { runId, state: run.step, status: RunStatus.SUCCEEDED, joined, image: imageMessage(name) };
            return;
          }
          yield { runId, state: run.step, status: RunStatus.FAILED, joined, image: imageMessage(name), error: run.error ?? "" };
          throw new ServerError(Status.ABORTED, `pull of ${name} failed: ${run.error}`);
        }
      }
    },

    async getImage(request: GetImageRequest) {
      const name = imageName(request.image);
      const image = imageMessage(name);
      if (!image) throw new ServerError(Status.NOT_FOUND, `image ${name} is not known here; pull it first`);
      return { image };
    },

    async listImages() {
      return { images: catalog.listImages().map((row) => imageMessage(row.name)!) };
    },

    async activateImage(request: ActivateImageRequest) {
      const name = imageName(request.image);
      const activationId = ulid();
      const { runId } = activate.start(activationId, { image: name, activationId }, {});
      const outcome = await activate.wait(runId);
      if (outcome.status !== "succeeded") {
        // Failed at ensure-image: the image is not available (its pull failed, or failed before
        // and its S3 folder has not changed since): a precondition, not an aborted activation.
        const code = outcome.step === "ensure-image" ? Status.FAILED_PRECONDITION : Status.ABORTED;
        throw new ServerError(code, `activation of ${name} failed: ${outcome.error}`);
      }
      const row = catalog.getActivation(activationId);
      if (!row) throw new ServerError(Status.INTERNAL, `activation ${activationId} finished but has no record`);
      return { activation: activationMessage(row) };
    },

    async deactivateImage(request: DeactivateImageRequest) {
      if (!ACTIVATION_ID.test(request.activationId)) {
        throw new ServerError(Status.INVALID_ARGUMENT, `activation id must be the 26-character id ActivateImage returned, got ${JSON.stringify(request.activationId.slice(0, 64))}`);
      }
      const row = catalog.getActivation(request.activationId);
      if (!row) throw new ServerError(Status.NOT_FOUND, `activation ${request.activationId} is not known`);
      // A half-made activation whose run has ended (failed, and its undo too) may be removed;
      // one whose run is still going may not.
      if (row.state !== "active" && activate.list({ resourceId: row.id, status: "running" }).length > 0) {
        throw new ServerError(Status.FAILED_PRECONDITION, `activation ${row.id} is still being created`);
      }
      const { runId } = deactivate.start(row.id, { activationId: row.id }, {});
      const outcome = await deactivate.wait(runId);
      if (outcome.status !== "succeeded") throw new ServerError(Status.ABORTED, `deactivation of ${row.id} failed: ${outcome.error}`);
      return { activation: activationMessage(row) };
    },

    async listActivations(request: ListActivationsRequest) {
      const image = request.image === "" ? undefined : imageName(request.image);
      return { activations: catalog.listActivations(image).filter((a) => a.state === "active").map(activationMessage) };
    },

    async getPool() {
      const pool = await helper.call("pool.status", {});
      return {
        name: pool.name,
        dataUsedBytes: BigInt(pool.dataUsedBytes),
        dataTotalBytes: BigInt(pool.dataTotalBytes),
        metadataUsedBytes: BigInt(pool.metaUsedBytes),
        metadataTotalBytes: BigInt(pool.metaTotalBytes),
        mode: pool.mode,
        blockSizeBytes: BigInt(pool.blockSizeBytes),
        errorIfNoSpace: pool.errorIfNoSpace,
      };
    },

    async listRuns(request: ListRunsRequest) {
      const limit = request.limit === 0 ? 100 : Math.min(request.limit, 1000);
      const filter = { resourceId: request.resourceId || undefined, limit };
      const fsms = { pull, activate, deactivate, delete: remove } as const;
      if (request.fsm !== "" && !(request.fsm in fsms)) throw new ServerError(Status.INVALID_ARGUMENT, `unknown fsm ${JSON.stringify(request.fsm)}: expected pull, activate, deactivate or delete`);
      const runs: RunRecord<unknown, unknown>[] = [];
      for (const [fsmName, fsm] of Object.entries(fsms)) {
        if (request.fsm === "" || request.fsm === fsmName) runs.push(...(fsm.list(filter) as RunRecord<unknown, unknown>[]));
      }
      runs.sort((a, b) => (a.id < b.id ? 1 : -1));
      return { runs: runs.slice(0, limit).map(runMessage) };
    },

    async deleteImage(request: DeleteImageRequest) {
      const name = imageName(request.image);
      if (!catalog.getImage(name) && remove.list({ resourceId: name, status: "running", limit: 1 }).length === 0) {
        throw new ServerError(Status.NOT_FOUND, `image ${name} is not known here`);
      }
      if (pull.list({ resourceId: name, status: "running", limit: 1 }).length > 0) {
        throw new ServerError(Status.FAILED_PRECONDITION, `image ${name} is being pulled; delete it once the pull has finished`);
      }
      if (activate.list({ status: "running", limit: 100_000 }).some((run) => (run.request as { image: string }).image === name)) {
        throw new ServerError(Status.FAILED_PRECONDITION, `image ${name} is being activated; delete it once the activation has finished`);
      }
      const activations = catalog.listActivations(name);
      if (activations.length > 0 && !request.force) {
        throw new ServerError(
          Status.FAILED_PRECONDITION,
          `image ${name} has ${activations.length} activation(s) (${activations.map((a) => a.id).join(", ")}): deactivate them first, or delete with force`,
        );
      }
      const { runId } = remove.start(name, { image: name, force: request.force }, { deactivated: [], chainIds: [], removedDevices: [] });
      const outcome = await remove.wait(runId);
      if (outcome.status !== "succeeded") throw new ServerError(Status.ABORTED, `deletion of ${name} failed: ${outcome.error}`);
      return { deactivated: outcome.state.deactivated, removedDevices: outcome.state.removedDevices };
    },

    async collectGarbage() {
      const report = await collectGarbage(deps);
      return { ...report, freedBlobBytes: BigInt(report.freedBlobBytes) };
    },

    async doctor(request: DoctorRequest) {
      if (request.adoptPool && request.wipePool) throw new ServerError(Status.INVALID_ARGUMENT, "adopt_pool and wipe_pool exclude each other: keep the unknown thin ids, or delete them");
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
  };
}

function findingMessage(f: Finding, outcome?: RepairOutcome) {
  return { kind: f.kind, subject: f.subject, detail: f.detail, repair: f.repair, result: outcome?.result ?? "", note: outcome?.note ?? "" };
}

/** Activation ids are ULIDs (Crockford base 32, upper case). */
const ACTIVATION_ID = /^[0-9A-HJKMNP-TV-Z]{26}$/;

function imageName(raw: string): string {
  try {
    validateImageName(raw);
    return raw;
  } catch (err) {
    throw new ServerError(Status.INVALID_ARGUMENT, err instanceof Error ? err.message : String(err));
  }
}

function activationMessage(row: ActivationRow): ActivationMsg {
  return { id: row.id, image: row.image, thinId: row.thinId, devicePath: `/dev/mapper/${row.name}`, createdAt: row.createdAt };
}

function runMessage(run: RunRecord<unknown, unknown>): MessageInitShape<typeof RunSchema> {
  const statuses = { running: RunStatus.RUNNING, succeeded: RunStatus.SUCCEEDED, failed: RunStatus.FAILED } as const;
  const status = statuses[run.status];
  return {
    id: run.id,
    fsm: run.fsm,
    resourceId: run.resourceId,
    state: run.step,
    status,
    error: run.error ?? "",
    attempts: run.attempts,
    startedAt: run.startedAt,
    finishedAt: run.finishedAt ?? "",
  };
}
