// Refuses the RPCs that change the pool while the catalog describes another pool
// (pool-identity.ts: POOL_MISMATCH). Reads, GetPool and Doctor (whose repairs reconcile.ts
// refuses by itself until the operator decides) go through.
import type { CallContext, ServerMiddlewareCall } from "nice-grpc";
import { ImageService } from "../../client/gen/imgd/v1/imgd_pb.js";
import { PoolMismatchError, type PoolGate } from "../pool-identity.ts";
import { AgentError } from "./errors.ts";

/** Method name -> what it would do, for the refusal's message. */
const MUTATING: Record<string, string> = {
  PullImage: "pull",
  ActivateImage: "activate",
  DeactivateImage: "deactivate",
  DeleteImage: "delete an image",
  CollectGarbage: "collect garbage",
};
const BY_PATH = new Map(Object.entries(MUTATING).map(([method, what]) => [`/${ImageService.typeName}/${method}`, what]));

export function poolGuard(gate: PoolGate) {
  return async function* guardPool<Request, Response>(call: ServerMiddlewareCall<Request, Response>, context: CallContext) {
    const what = BY_PATH.get(call.method.path);
    if (what !== undefined) {
      try {
        gate.assertMayChange(what);
      } catch (err) {
        if (err instanceof PoolMismatchError) throw new AgentError("POOL_MISMATCH", err.message, {}, { cause: err });
        throw err;
      }
    }
    return yield* call.next(call.request, context);
  };
}

/** For tests: the methods the guard refuses. */
export const MUTATING_METHODS = Object.keys(MUTATING);
