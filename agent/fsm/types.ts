// Public types of the FSM engine (re-exported by engine.ts).
import type { RetryPolicy } from "./retry.ts";

export type LogLevel = "debug" | "info" | "warn" | "error";
export type LogFn = (level: LogLevel, msg: string, fields?: Record<string, unknown>) => void;

export interface EngineOptions {
  log?: LogFn;
  /** Global retry policy; each step may override parts of it. */
  retry?: Partial<RetryPolicy>;
  /** Concurrency limit per queue name, for engine.queue(name). */
  queues?: Record<string, number>;
  /** Limit for queue names missing from `queues` (default 2; a warning is logged once per name). */
  defaultQueueLimit?: number;
  /** Keyed locks for ctx.withLock; share it with code outside steps that takes the same keys. */
  locks?: LockProvider;
  /** The poison rule (see README): when a run ends because its step keeps killing the process. */
  interruptions?: Partial<InterruptionPolicy>;
  /** Told how every step attempt and every run ends (the agent's metrics). */
  observer?: EngineObserver;
  /**
   * What a run's final failure is, kept with the run (RunRecord.errorDetail) so its callers get a
   * typed reason even after a restart. Undefined: only the message is kept.
   */
  describeError?: (err: unknown) => ErrorDetail | undefined;
}

/** A failure in a form callers branch on: a stable reason and string metadata. */
export interface ErrorDetail {
  reason: string;
  metadata: Record<string, string>;
}

/** How a step attempt ended: done, failed (an attempt spent), interrupted (runs again), or stopped by shutdown. */
export type StepOutcome = "completed" | "failed" | "interrupted" | "stopped";

/**
 * Why a run finished: its steps all completed; a step gave up after its attempts (step_error)
 * or failed for good at once (aborted); a poison step (interrupted too often, too soon); a run
 * this version cannot resume (not_resumable); or an engine error (internal_error).
 */
export type RunEndReason = "completed" | "step_error" | "aborted" | "poison" | "not_resumable" | "internal_error";

export interface EngineObserver {
  stepEnded(fsm: string, step: string, outcome: StepOutcome, seconds: number): void;
  runFinished(fsm: string, status: "succeeded" | "failed", reason: RunEndReason): void;
}

export interface InterruptionPolicy {
  /** Consecutive quick interruptions of one step after which the run fails (>= 1). */
  maxQuick: number;
  /** An interruption is quick when it comes within this many ms of the step beginning to work. */
  quickWindowMs: number;
}

/** Mutual exclusion per key; acquire resolves with the release function. */
export interface LockProvider {
  acquire(key: string, signal?: AbortSignal): Promise<() => void>;
}

export interface StepOptions {
  retry?: Partial<RetryPolicy>;
  /**
   * Steps of an earlier version of this FSM that this step took over (renamed or merged): a run
   * saved by that version at one of them resumes here, and a run past them resumes after here.
   * Without this, such a run could not resume after an upgrade and would fail.
   */
  replaces?: string[];
}

export interface WaitOptions {
  /**
   * Stops waiting when it fires (rejecting with its reason), besides the engine's own stop: a
   * step that runs branches in parallel stops those still waiting once one of them failed.
   */
  signal?: AbortSignal;
}

export type StepFn<R, W> = (ctx: StepContext<R, W>) => Promise<void>;

export interface StepContext<R, W> {
  runId: string;
  fsm: string;
  resourceId: string;
  step: string;
  /** Saved once at start; frozen (changes would not be persisted). */
  request: Readonly<R>;
  /**
   * The checkpoint. Mutate it (or assign a new value): the engine saves it as JSON atomically
   * with the step's completion. Each attempt starts from the last saved checkpoint, so changes
   * made by a failed attempt are discarded, exactly as they would be by a crash.
   */
  state: W;
  /**
   * 0 on the first attempt of this step in this run. Counts failed attempts only (persisted
   * across restarts): interruptions (crashes, kills, stops) and waits do not count.
   */
  attempt: number;
  /** Interruptions of this run so far (informational). */
  interruptions: number;
  /** True for every step of an execution that resumed after a restart. */
  resumed: boolean;
  /** Fires on engine shutdown: stop, and let the step throw (nothing is recorded as failed). */
  signal: AbortSignal;
  /**
   * Runs `fn` holding a slot of the named queue (limits from EngineOptions.queues). The time
   * spent waiting for the slot is not work: a process death then is neither a failed attempt
   * nor an interruption, and the resumed step simply waits again.
   */
  withQueue<T>(queue: string, fn: () => Promise<T>, options?: WaitOptions): Promise<T>;
  /** Same as withQueue, for a keyed lock (EngineOptions.locks). */
  withLock<T>(key: string, fn: () => Promise<T>, options?: WaitOptions): Promise<T>;
  /**
   * Waits for something outside the run (another run's outcome, ...) without it counting as
   * work. `what` is shown as RunRecord.waitingFor. `wait` gets the step's signal.
   */
  waitFor<T>(what: string, wait: (signal: AbortSignal) => Promise<T>): Promise<T>;
  /** Ephemeral progress for subscribers (not persisted). */
  progress(p: Record<string, unknown>): void;
  log: LogFn;
}

export type RunStatus = "running" | "succeeded" | "failed";

export interface RunRecord<R, W> {
  id: string;
  fsm: string;
  resourceId: string;
  status: RunStatus;
  /** Current step (running) or the last step reached (finished). */
  step: string;
  /** Index of `step` in `steps`; equals steps.length once every step succeeded. */
  stepIndex: number;
  /** The ordered step list saved when the run started (the run follows this list). */
  steps: string[];
  request: R;
  /** Last saved checkpoint. */
  state: W;
  /** Failed: the final error. Running: the last failed attempt's error, if the step is retrying. */
  error?: string;
  /** Failed: what the final error is (EngineOptions.describeError), when that said. */
  errorDetail?: ErrorDetail;
  /** Failed attempts of the current (or last) step (interruptions are not failed attempts). */
  attempts: number;
  /** Times a step of this run was interrupted (process death, stop, lost helper connection). */
  interruptions: number;
  lastInterruptedAt?: string;
  /** Running and waiting (not working): for what (a queue, a lock, another run). */
  waitingFor?: string;
  startedAt: string;
  updatedAt: string;
  finishedAt?: string;
}

export type RunEvent =
  | { type: "step"; step: string }
  | { type: "progress"; step: string; progress: Record<string, unknown> }
  /** `attempt` is the attempt that failed (numbered like StepContext.attempt). */
  | { type: "retry"; step: string; attempt: number; error: string; delayMs: number }
  | { type: "finished"; run: RunRecord<any, any> };

/**
 * Called once the run has finished (success or failure), after the outcome is durable, in
 * order, also for resumed runs. At-least-once: if the process dies before every finalizer of a
 * run has returned, they all run again on the next resumeAll(). Errors are logged, not retried.
 * Keep them idempotent and quick.
 */
export type Finalizer<R, W> = (run: RunRecord<R, W>) => void | Promise<void>;

/** One row of a run's durable history (fsm_events). */
export interface RunHistoryEvent {
  seq: number;
  runId: string;
  type: "start" | "resume" | "step" | "error" | "interrupted" | "finish";
  step?: string;
  attempt?: number;
  error?: string;
  delayMs?: number;
  status?: RunStatus;
  at: string;
}

export interface ListFilter {
  resourceId?: string;
  status?: RunStatus;
  limit?: number;
  /** Only runs with an id below this one (newest first: the next page after it). */
  beforeId?: string;
}
