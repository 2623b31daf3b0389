// The FSM's run history (fsm_runs, fsm_events) is kept for a while for ListRuns and debugging,
// not forever: finished runs older than IMGD_RUN_HISTORY_DAYS, and all but the newest
// IMGD_RUN_HISTORY_MAX finished runs, are deleted at start and then every hour. Running runs and
// runs whose finalizers have not completed are never deleted.
import type { FsmEngine } from "./fsm/engine.ts";
import type { Logger } from "./log.ts";

export interface RunHistoryPolicy {
  maxRuns: number;
  maxAgeDays: number;
}

const PRUNE_EVERY_MS = 60 * 60 * 1000;
const DAY_MS = 24 * 60 * 60 * 1000;

export function pruneRunHistory(engine: FsmEngine, policy: RunHistoryPolicy, log: Logger, now = Date.now()): number {
  const pruned = engine.prune(new Date(now - policy.maxAgeDays * DAY_MS), policy.maxRuns);
  if (pruned > 0) log("info", "pruned run history", { pruned, ...policy });
  return pruned;
}

/** Prunes now, then every hour until the returned function is called. */
export function startRunHistoryPruning(engine: FsmEngine, policy: RunHistoryPolicy, log: Logger): () => void {
  const prune = () => {
    try {
      pruneRunHistory(engine, policy, log);
    } catch (err) {
      log("error", "could not prune run history", { error: err instanceof Error ? err.message : String(err) });
    }
  };
  prune();
  const timer = setInterval(prune, PRUNE_EVERY_MS);
  timer.unref();
  return () => clearInterval(timer);
}
