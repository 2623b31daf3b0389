// Error classification for FSM steps: a plain thrown error is transient (the step is retried
// with backoff, up to the retry policy's cap); an AbortError is permanent (the run fails now).

/** Permanent failure: the engine does not retry; the run ends "failed" with this message. */
export class AbortError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "AbortError";
  }
}

/** `throw abort("layer 3 is not a valid tar", err)` inside a step fails the run at once. */
export function abort(message: string, cause?: unknown): AbortError {
  return cause === undefined ? new AbortError(message) : new AbortError(message, { cause });
}

/**
 * The step was cut short from outside (e.g. the helper's connection dropped mid-operation), not
 * by a fault of its own: the engine records an interruption, not a failed attempt, and runs the
 * step again after a backoff. The step must redo what the interrupted work may have half-done.
 */
export class InterruptedError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "InterruptedError";
  }
}

export function interrupted(message: string, cause?: unknown): InterruptedError {
  return cause === undefined ? new InterruptedError(message) : new InterruptedError(message, { cause });
}

/** The reason the engine gives to step signals when it shuts down. */
export class EngineShutdownError extends Error {
  constructor() {
    super("FSM engine is shutting down; the run will resume on the next start");
    this.name = "EngineShutdownError";
  }
}

/** Text saved in SQLite for a failure: the message, plus the cause's when it adds something. */
export function formatError(err: unknown): string {
  if (!(err instanceof Error)) return typeof err === "string" ? err : safeString(err);
  let text = err.message || err.name;
  const cause = err.cause;
  if (cause !== undefined) {
    const causeText = cause instanceof Error ? cause.message : safeString(cause);
    if (causeText && !text.includes(causeText)) text += `: ${causeText}`;
  }
  return text;
}

function safeString(value: unknown): string {
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}
