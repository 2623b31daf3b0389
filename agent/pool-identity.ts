// Whether the catalog describes the pool the helper serves. The helper gives each pool a random
// identity when it creates its metadata (privhelper/pool-identity.ts); the catalog records it the
// first time the agent uses the pool. A catalog that lost rows still describes its pool (doctor's
// UNKNOWN and FOREIGN thin ids cover it); a catalog recorded for ANOTHER pool (a database
// restored from another host, a pool recreated under an old database) describes nothing here:
// acting on it would delete, re-activate or forget the wrong things. Then nothing changes the
// pool (reconcile repairs nothing, mutating RPCs are refused, unfinished runs wait) until the
// operator decides with `imgctl doctor --adopt-pool` or `--wipe-pool`.
import type { Catalog, PoolIdentityRow } from "./catalog.ts";
import { POOL_ID, type PoolStatus } from "../privhelper/protocol.ts";

export type PoolMatch =
  /** The catalog describes this pool. */
  | { state: "same"; id: string; name: string }
  /** The catalog has never recorded a pool (a new or pre-identity database). */
  | { state: "unrecorded"; id: string; name: string }
  /** The catalog describes another pool. */
  | { state: "mismatch"; id: string; name: string; recorded: PoolIdentityRow }
  /** The helper reports no identity (an older helper's pool.status): nothing to compare. */
  | { state: "unidentified"; name: string };

export function matchPool(catalog: Catalog, pool: Pick<PoolStatus, "name" | "id">): PoolMatch {
  // An older helper's answer has no field at all.
  if (pool.id === null || pool.id === undefined) return { state: "unidentified", name: pool.name };
  if (typeof pool.id !== "string" || !POOL_ID.test(pool.id)) throw new Error(`the helper reported an invalid pool identity ${JSON.stringify(pool.id)}`);
  const recorded = catalog.poolIdentity();
  if (!recorded) return { state: "unrecorded", id: pool.id, name: pool.name };
  if (recorded.id === pool.id) return { state: "same", id: pool.id, name: pool.name };
  return { state: "mismatch", id: pool.id, name: pool.name, recorded };
}

/** What a mismatch means and what the operator can do; said by doctor, the start log and refused RPCs. */
export function mismatchAdvice(m: Extract<PoolMatch, { state: "mismatch" }>): string {
  return (
    `thin pool ${m.name} (identity ${m.id}) is not the pool this database describes (pool ${m.recorded.name}, identity ${m.recorded.id}, recorded ${m.recorded.recordedAt}): ` +
    "the database was restored from another host or pool, or the pool was recreated under it. Nothing in the pool is changed until an operator decides: " +
    "restart the agent with the database that belongs to this pool; or `imgctl doctor --adopt-pool` if this pool holds what this database describes " +
    "(its identity is recorded, thin ids the database never allocated are kept reserved, and the usual repairs follow); " +
    "or `imgctl doctor --wipe-pool` (its identity is recorded, and thin ids the database never allocated are deleted)"
  );
}

/** Thrown by PoolGate.assertMayChange: the caller must not change the pool. */
export class PoolMismatchError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "PoolMismatchError";
  }
}

/**
 * The agent's current view of the match, set at start (pool.ensure) and by every doctor pass.
 * Mutating RPCs ask it first (grpc/pool-guard.ts); unfinished runs resume only once it allows.
 */
export class PoolGate {
  #mismatch: Extract<PoolMatch, { state: "mismatch" }> | undefined;
  #whenAllowed: (() => void)[] = [];

  observe(match: PoolMatch): void {
    this.#mismatch = match.state === "mismatch" ? match : undefined;
    if (this.#mismatch) return;
    for (const fn of this.#whenAllowed.splice(0)) fn();
  }

  get mismatch(): Extract<PoolMatch, { state: "mismatch" }> | undefined {
    return this.#mismatch;
  }

  /** Runs `fn` now, or once the operator resolved a mismatch. */
  whenAllowed(fn: () => void): void {
    if (this.#mismatch) this.#whenAllowed.push(fn);
    else fn();
  }

  /** Throws PoolMismatchError when the catalog describes another pool. */
  assertMayChange(what: string): void {
    if (this.#mismatch) throw new PoolMismatchError(`refusing to ${what}: ${mismatchAdvice(this.#mismatch)}`);
  }
}
