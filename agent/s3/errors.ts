// Errors of S3 access, split by what the caller should do about them:
// - S3PermanentError: retrying cannot help (image not found, bad layout, access denied, corrupt
//   data). The pull FSM aborts.
// - S3TransientError: the same request may succeed later (network, timeouts, 5xx, throttling,
//   an object that changed while we read it). The pull FSM retries, a bounded number of times.
// Cancellation through an AbortSignal is neither: the AbortError is passed through unchanged.

export type S3ErrorCode =
  | "INVALID_IMAGE_NAME"
  | "IMAGE_NOT_FOUND"
  | "BAD_LAYOUT"
  | "BAD_RESPONSE"
  | "NO_SUCH_BUCKET"
  | "NOT_FOUND"
  | "ACCESS_DENIED"
  | "WRONG_REGION"
  | "CLIENT_ERROR"
  | "CORRUPT"
  | "OBJECT_CHANGED"
  | "THROTTLED"
  | "SERVER_ERROR"
  | "TIMEOUT"
  | "NETWORK"
  | "UNKNOWN";

export class S3Error extends Error {
  readonly code: S3ErrorCode;
  readonly permanent: boolean;

  constructor(code: S3ErrorCode, permanent: boolean, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.permanent = permanent;
  }
}

export class S3PermanentError extends S3Error {
  constructor(code: S3ErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, true, message, options);
    this.name = "S3PermanentError";
  }
}

export class S3TransientError extends S3Error {
  constructor(code: S3ErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, false, message, options);
    this.name = "S3TransientError";
  }
}

export function isPermanentS3Error(err: unknown): err is S3Error {
  return err instanceof S3Error && err.permanent;
}

export function isTransientS3Error(err: unknown): err is S3Error {
  return err instanceof S3Error && !err.permanent;
}

/** True for the error an aborted AbortSignal produces (ours, the SDK's or a stream's). */
export function isAbortError(err: unknown, signal?: AbortSignal): boolean {
  if (signal?.aborted) return true;
  return err instanceof Error && err.name === "AbortError";
}

// Node's codes for a connection that failed or broke; all worth another try.
const NETWORK_CODES = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "ECONNABORTED",
  "EPIPE",
  "ENOTFOUND",
  "EAI_AGAIN",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENETDOWN",
  "EHOSTDOWN",
  "ERR_STREAM_PREMATURE_CLOSE",
]);

const THROTTLING_NAMES = new Set(["SlowDown", "Throttling", "ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded"]);
const ACCESS_NAMES = new Set(["AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccountProblem", "InvalidToken", "ExpiredToken"]);

/**
 * Turns an error from the SDK or from reading a response body into an S3Error saying whether a
 * retry can help. `what` names the operation for the message ("listing images/node/").
 * AbortErrors and S3Errors are returned unchanged.
 */
export function classifyS3Error(err: unknown, what: string, signal?: AbortSignal): unknown {
  if (err instanceof S3Error || isAbortError(err, signal)) return err;
  const e = (err ?? {}) as { name?: unknown; code?: unknown; message?: unknown; $metadata?: { httpStatusCode?: unknown } };
  const name = typeof e.name === "string" ? e.name : "Error";
  const code = typeof e.code === "string" ? e.code : undefined;
  const status = typeof e.$metadata?.httpStatusCode === "number" ? e.$metadata.httpStatusCode : undefined;
  const detail = `${what}: ${name}${status ? ` (HTTP ${status})` : ""}: ${typeof e.message === "string" ? e.message : String(err)}`;
  const permanent = (c: S3ErrorCode) => new S3PermanentError(c, detail, { cause: err });
  const transient = (c: S3ErrorCode) => new S3TransientError(c, detail, { cause: err });

  if (name === "NoSuchBucket") return permanent("NO_SUCH_BUCKET");
  if (name === "PreconditionFailed" || status === 412) return transient("OBJECT_CHANGED"); // If-Match lost: object replaced
  if (THROTTLING_NAMES.has(name) || status === 429) return transient("THROTTLED");
  if (name === "RequestTimeout" || status === 408) return transient("TIMEOUT"); // S3 reports its own timeouts as HTTP 400
  if (name === "RequestTimeTooSkewed") return transient("CLIENT_ERROR"); // the SDK corrects its clock offset on retry
  if (ACCESS_NAMES.has(name) || status === 401 || status === 403) return permanent("ACCESS_DENIED");
  if (name === "NoSuchKey" || name === "NotFound" || status === 404) return permanent("NOT_FOUND");
  if (name === "PermanentRedirect" || name === "AuthorizationHeaderMalformed" || status === 301) return permanent("WRONG_REGION");
  if (status !== undefined && status >= 500) return transient("SERVER_ERROR");
  if (status !== undefined && status >= 400) return permanent("CLIENT_ERROR");
  // The SDK checks S3's own checksum (x-amz-checksum-*) of a body when S3 sends one.
  if (typeof e.message === "string" && e.message.startsWith("Checksum mismatch")) return permanent("CORRUPT");
  if (name === "TimeoutError" || code === "ETIMEDOUT" || code === "ESOCKETTIMEDOUT") return transient("TIMEOUT");
  if (code !== undefined && NETWORK_CODES.has(code)) return transient("NETWORK");
  // Anything else (a garbled response the SDK could not parse, an unexpected status): assume
  // the fault may pass; the FSM's retry limit bounds how long we keep trying.
  return transient("UNKNOWN");
}
