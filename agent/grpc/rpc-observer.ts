// The one chokepoint every RPC passes: a nice-grpc server middleware that writes the access log
// (one JSON line per call: method, peer, code, duration, and the image or activation the request
// names) and counts the call for the metrics.
import { ServerError, Status, type CallContext, type ServerMiddlewareCall } from "nice-grpc";
import type { Logger, LogLevel } from "../log.ts";

/** Request fields that name what a call is about, logged when present (strings, capped). */
const SUBJECT_FIELDS = ["image", "activationId", "name", "requestId"];
const MAX_SUBJECT_CHARS = 256;

// Server faults are errors; health checks (every few seconds from a supervisor) are debug.
const FAULT_CODES = new Set([Status.UNKNOWN, Status.INTERNAL, Status.DATA_LOSS]);
const QUIET_PREFIXES = ["/grpc.health.v1.Health/", "/grpc.reflection."];

export type RpcCounter = (method: string, code: string, seconds: number) => void;

export function rpcObserver(log: Logger, count?: RpcCounter) {
  return async function* observeRpc<Request, Response>(call: ServerMiddlewareCall<Request, Response>, context: CallContext) {
    const began = performance.now();
    const method = call.method.path;
    let code = Status.OK;
    try {
      return yield* call.next(call.request, context);
    } catch (err) {
      // nice-grpc answers any other error as UNKNOWN, and an abort as CANCELLED.
      code = err instanceof ServerError ? err.code : isAbortError(err) ? Status.CANCELLED : Status.UNKNOWN;
      throw err;
    } finally {
      // A stream the client cancelled ends its generator without an error.
      if (code === Status.OK && context.signal.aborted) code = Status.CANCELLED;
      const seconds = (performance.now() - began) / 1000;
      const name = Status[code];
      count?.(method, name, seconds);
      const level: LogLevel = FAULT_CODES.has(code) ? "error" : QUIET_PREFIXES.some((p) => method.startsWith(p)) ? "debug" : "info";
      log(level, "rpc", { sys: "access", method, peer: context.peer, code: name, ms: Math.round(seconds * 10_000) / 10, ...subject(call) });
    }
  };
}

function subject(call: { requestStream: boolean; request: unknown }): Record<string, string> {
  if (call.requestStream || typeof call.request !== "object" || call.request === null) return {};
  const fields: Record<string, string> = {};
  for (const key of SUBJECT_FIELDS) {
    const value = (call.request as Record<string, unknown>)[key];
    if (typeof value === "string" && value !== "") fields[key] = value.slice(0, MAX_SUBJECT_CHARS);
  }
  return fields;
}

function isAbortError(err: unknown): boolean {
  return err instanceof Error && err.name === "AbortError";
}
