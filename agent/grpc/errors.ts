// The one table of the API's errors: every failure becomes a gRPC status code and a
// google.rpc.ErrorInfo (domain "imgd", a stable reason, metadata) in the status details
// (the grpc-status-details-bin trailer, a serialized google.rpc.Status), so a client in any
// language branches on the reason, never on the message.
//
// The agent's code throws AgentError for what it knows (with the metadata it has); errors of the
// layers below (S3, the helper, the layer validator) are recognised here, in the cause chain of
// whatever a step or a handler threw. A failed FSM run keeps its ErrorDetail in SQLite (the
// engine's describeError option is describeError below), so its reason survives a restart.
import { create, toBinary } from "@bufbuild/protobuf";
import { anyPack } from "@bufbuild/protobuf/wkt";
import { ServerError, Status, type CallContext, type ServerMiddlewareCall } from "nice-grpc";
import { ErrorInfoSchema } from "../../client/gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../client/gen/google/rpc/status_pb.js";
import type { ErrorDetail, RunRecord } from "../fsm/types.ts";
import { HelperError } from "../helper-client.ts";
import { LayerValidationError } from "../layers/errors.ts";
import { S3Error } from "../s3/errors.ts";

export const ERROR_DOMAIN = "imgd";

/** reason -> status code. Append reasons; never rename one (clients match on them). */
export const REASONS = {
  IMAGE_NOT_FOUND: Status.NOT_FOUND,
  ACTIVATION_NOT_FOUND: Status.NOT_FOUND,
  INVALID_ARGUMENT: Status.INVALID_ARGUMENT,
  ACTIVATION_NAME_TAKEN: Status.ALREADY_EXISTS,
  /** A pull, activation or deletion of the image is running. */
  IMAGE_BUSY: Status.FAILED_PRECONDITION,
  IMAGE_HAS_ACTIVATIONS: Status.FAILED_PRECONDITION,
  /** The activation is still being created (deactivation asked too early). */
  ACTIVATION_BUSY: Status.FAILED_PRECONDITION,
  /** The image's S3 folder is not an image (keys other than <n>.tar). */
  IMAGE_INVALID: Status.FAILED_PRECONDITION,
  LAYER_REFUSED: Status.FAILED_PRECONDITION,
  /** The catalog describes another pool (doctor's POOL_MISMATCH): changes wait for the operator. */
  POOL_MISMATCH: Status.FAILED_PRECONDITION,
  POOL_FULL: Status.RESOURCE_EXHAUSTED,
  S3_UNAVAILABLE: Status.UNAVAILABLE,
  HELPER_UNAVAILABLE: Status.UNAVAILABLE,
  /** A run failed for another reason (metadata run_id, step). */
  RUN_FAILED: Status.ABORTED,
  INTERNAL: Status.INTERNAL,
} as const satisfies Record<string, Status>;

export type Reason = keyof typeof REASONS;

/** A failure the agent's own code recognised, with what it knows about it. */
export class AgentError extends Error {
  readonly reason: Reason;
  readonly metadata: Record<string, string>;
  constructor(reason: Reason, message: string, metadata: Record<string, string> = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "AgentError";
    this.reason = reason;
    this.metadata = metadata;
  }
}

/** INVALID_ARGUMENT for one request field. */
export function invalidArgument(field: string, message: string): AgentError {
  return new AgentError("INVALID_ARGUMENT", message, { field });
}

/** The ServerError the API answers with: its code from the table, plus the ErrorInfo. */
export class ImgdServerError extends ServerError {
  readonly reason: Reason;
  readonly metadata: Record<string, string>;
  constructor(reason: Reason, message: string, metadata: Record<string, string>) {
    super(REASONS[reason], message);
    this.reason = reason;
    this.metadata = metadata;
  }

  /** The grpc-status-details-bin trailer's value: a google.rpc.Status holding one ErrorInfo. */
  statusDetails(): Uint8Array {
    const info = create(ErrorInfoSchema, { reason: this.reason, domain: ERROR_DOMAIN, metadata: this.metadata });
    return toBinary(StatusSchema, create(StatusSchema, { code: this.code, message: this.details, details: [anyPack(ErrorInfoSchema, info)] }));
  }
}

/**
 * What a failure is by the table, from the first error in its cause chain the table knows; none:
 * undefined (the caller decides: RUN_FAILED for a run, INTERNAL for a handler).
 */
export function describeError(err: unknown): (ErrorDetail & { reason: Reason }) | undefined {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 10; e = e.cause, depth++) {
    if (e instanceof AgentError) return { reason: e.reason, metadata: e.metadata };
    if (e instanceof LayerValidationError) return { reason: "LAYER_REFUSED", metadata: { entry: e.entry, rule: e.rule } };
    if (e instanceof S3Error) return s3Detail(e);
    if (e instanceof HelperError) {
      const detail = helperDetail(e);
      if (detail) return detail;
    }
  }
  return undefined;
}

function s3Detail(e: S3Error): ErrorDetail & { reason: Reason } {
  const metadata = { s3_code: e.code };
  switch (e.code) {
    case "IMAGE_NOT_FOUND":
      return { reason: "IMAGE_NOT_FOUND", metadata };
    case "INVALID_IMAGE_NAME":
      return { reason: "INVALID_ARGUMENT", metadata: { ...metadata, field: "image" } };
    case "BAD_LAYOUT":
      return { reason: "IMAGE_INVALID", metadata };
    case "CORRUPT":
    case "OBJECT_CHANGED":
    case "BAD_RESPONSE":
    case "NOT_FOUND":
      // The bucket answered, but not with a usable layer.
      return { reason: "RUN_FAILED", metadata };
    default:
      // Network, throttling, 5xx, and a bucket this agent cannot read (access, region, missing).
      return { reason: "S3_UNAVAILABLE", metadata };
  }
}

function helperDetail(e: HelperError): (ErrorDetail & { reason: Reason }) | undefined {
  const metadata = { helper_code: e.code, op: e.op };
  if (e.code === "NO_SPACE") return { reason: "POOL_FULL", metadata };
  if (e.code === "LAYER_REFUSED") return { reason: "LAYER_REFUSED", metadata };
  if (["UNAVAILABLE", "CONNECTION_LOST", "TIMEOUT", "CLIENT_CLOSED"].includes(e.code)) return { reason: "HELPER_UNAVAILABLE", metadata };
  return undefined;
}

/**
 * The ServerError for anything a handler threw: ImgdServerErrors pass, other ServerErrors keep
 * their code (reason INVALID_ARGUMENT or INTERNAL), the rest goes through the table (INTERNAL
 * when it knows nothing). `context` is metadata the caller knows (the image asked for).
 */
export function grpcError(err: unknown, context: Record<string, string> = {}): ImgdServerError {
  if (err instanceof ImgdServerError) return err;
  if (err instanceof ServerError) return new ImgdServerError(err.code === Status.INVALID_ARGUMENT ? "INVALID_ARGUMENT" : "INTERNAL", err.details, context);
  const detail = describeError(err);
  const message = err instanceof Error ? err.message : String(err);
  return new ImgdServerError(detail?.reason ?? "INTERNAL", message, { ...context, ...detail?.metadata });
}

/** The ServerError for a failed run: its recorded reason, or RUN_FAILED, with run_id and step. */
export function runError(run: RunRecord<unknown, unknown>, what: string, context: Record<string, string> = {}): ImgdServerError {
  const recorded = run.errorDetail?.reason;
  const reason: Reason = recorded !== undefined && recorded in REASONS ? (recorded as Reason) : "RUN_FAILED";
  return new ImgdServerError(reason, `${what} failed: ${run.error ?? "no reason recorded"}`, {
    ...context,
    ...run.errorDetail?.metadata,
    run_id: run.id,
    step: run.step,
  });
}

/**
 * Server middleware: every error a handler throws leaves as an ImgdServerError with its
 * ErrorInfo in the trailer. A call the client cancelled is left alone (nobody reads its status).
 */
export async function* errorMiddleware<Req, Res>(call: ServerMiddlewareCall<Req, Res>, context: CallContext) {
  try {
    return yield* call.next(call.request, context);
  } catch (err) {
    if (context.signal.aborted) throw err;
    const error = grpcError(err);
    context.trailer.set("grpc-status-details-bin", error.statusDetails());
    throw error;
  }
}
