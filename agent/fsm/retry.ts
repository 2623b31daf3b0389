// Retry policy for transient step failures: exponential backoff with jitter and a hard cap on
// attempts (superfly/fsm retries forever; we do not).

export interface RetryPolicy {
  /** Total attempts of one step, including the first (>= 1). */
  maxAttempts: number;
  baseDelayMs: number;
  maxDelayMs: number;
  /** Growth per failed attempt (>= 1). */
  factor: number;
  /** Fraction (0..1) of each delay that is randomised away, so retries of many runs spread out. */
  jitter: number;
}

export const DEFAULT_RETRY_POLICY: Readonly<RetryPolicy> = Object.freeze({
  maxAttempts: 5,
  baseDelayMs: 500,
  maxDelayMs: 30_000,
  factor: 2,
  jitter: 0.2,
});

/** Merges partial policies over the defaults (later wins) and validates the result. */
export function resolveRetryPolicy(...layers: (Partial<RetryPolicy> | undefined)[]): RetryPolicy {
  const policy: RetryPolicy = { ...DEFAULT_RETRY_POLICY };
  for (const layer of layers) {
    if (!layer) continue;
    for (const key of Object.keys(DEFAULT_RETRY_POLICY) as (keyof RetryPolicy)[]) {
      const value = layer[key];
      if (value !== undefined) policy[key] = value;
    }
  }
  const bad = (what: string): never => {
    throw new RangeError(`invalid retry policy: ${what} (${JSON.stringify(policy)})`);
  };
  if (!Number.isInteger(policy.maxAttempts) || policy.maxAttempts < 1) bad("maxAttempts must be an integer >= 1");
  if (!(policy.baseDelayMs >= 0) || !Number.isFinite(policy.baseDelayMs)) bad("baseDelayMs must be >= 0");
  if (!(policy.maxDelayMs >= policy.baseDelayMs) || !Number.isFinite(policy.maxDelayMs)) bad("maxDelayMs must be >= baseDelayMs");
  if (!(policy.factor >= 1) || !Number.isFinite(policy.factor)) bad("factor must be >= 1");
  if (!(policy.jitter >= 0 && policy.jitter <= 1)) bad("jitter must be within 0..1");
  return policy;
}

/** Delay before the next attempt, after `failedAttempts` (>= 1) failures of the step. */
export function backoffDelayMs(policy: RetryPolicy, failedAttempts: number, random: () => number = Math.random): number {
  const exponential = policy.baseDelayMs * policy.factor ** Math.max(0, failedAttempts - 1);
  const capped = Math.min(policy.maxDelayMs, exponential);
  return Math.round(capped * (1 - policy.jitter * random()));
}

/** Resolves true after `ms`, or false as soon as `signal` fires. */
export function sleep(ms: number, signal: AbortSignal): Promise<boolean> {
  if (signal.aborted) return Promise.resolve(false);
  return new Promise((resolve) => {
    const onAbort = (): void => {
      clearTimeout(timer);
      resolve(false);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve(true);
    }, ms);
    signal.addEventListener("abort", onAbort, { once: true });
  });
}
