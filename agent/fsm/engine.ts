// Durable finite-state-machine engine on SQLite, modelled on superfly/fsm (FSMv2) without its
// flaws: every run resumes from its OWN first incomplete step with its own checkpoint, retries
// are capped, outcomes (including failures) are durable and readable after restarts. An
// interruption (the process died or stopped while a step worked) is not a failed attempt: the
// step runs again, unless it keeps killing the process soon after it starts (a poison step).
// Queue slots and locks are taken through the step context, so waiting for them is not work.
//
// Execution model: a run is a linear list of named steps. A step runs at least once: if the
// process dies after its side effects but before its completion is committed, it runs again
// on resume, so steps must be idempotent. One engine per database: two processes resuming
// the same runs would execute them twice. Semantics and choices: agent/fsm/README.md.
import type Database from "better-sqlite3";
import { monotonicFactory } from "ulid";
import { crashPoint } from "../crash-points.ts";
import { KeyedLock } from "../keyed-lock.ts";
import { AbortError, EngineShutdownError, InterruptedError, formatError } from "./errors.ts";
import { backoffDelayMs, resolveRetryPolicy, sleep, type RetryPolicy } from "./retry.ts";
import { Semaphore } from "./semaphore.ts";
import { RunStore, StaleRunError, toRecord, type RunRow } from "./store.ts";
import { WorkTracker } from "./work-tracker.ts";
import type {
  EngineObserver,
  EngineOptions,
  ErrorDetail,
  InterruptionPolicy,
  LockProvider,
  Finalizer,
  ListFilter,
  LogFn,
  RunEvent,
  RunHistoryEvent,
  RunEndReason,
  RunRecord,
  StepContext,
  StepFn,
  StepOptions,
  WaitOptions,
} from "./types.ts";

export type {
  EngineObserver,
  EngineOptions,
  Finalizer,
  InterruptionPolicy,
  ListFilter,
  LockProvider,
  LogFn,
  LogLevel,
  RunEvent,
  RunHistoryEvent,
  RunRecord,
  RunEndReason,
  RunStatus,
  StepContext,
  StepFn,
  StepOptions,
  StepOutcome,
  WaitOptions,
} from "./types.ts";
export type { RetryPolicy } from "./retry.ts";
export { Semaphore, type SemaphoreSlot } from "./semaphore.ts";
export { AbortError, abort, InterruptedError, interrupted } from "./errors.ts";

export interface FsmBuilder<R, W> {
  start(step: string, fn: StepFn<R, W>, opts?: StepOptions): FsmBuilder<R, W>;
  to(step: string, fn: StepFn<R, W>, opts?: StepOptions): FsmBuilder<R, W>;
  end(opts?: { finalizers?: Finalizer<R, W>[] }): Fsm<R, W>;
}

interface StepDef {
  name: string;
  fn: StepFn<any, any>;
  retry: RetryPolicy;
}

interface FsmDef {
  name: string;
  steps: StepDef[];
  byName: Map<string, StepDef>;
  /** An earlier version's step name -> the step that replaces it (StepOptions.replaces). */
  replaced: Map<string, string>;
  finalizers: Finalizer<any, any>[];
}

interface Waiter {
  resolve(run: RunRecord<any, any>): void;
  reject(err: Error): void;
}

type Listener = (event: RunEvent) => void;

/** What an Fsm handle needs from its engine (kept off the engine's public surface). */
interface FsmHost {
  start(fsm: string, resourceId: string, request: unknown, initialState: unknown): { runId: string; joined: boolean };
  wait(fsm: string, runId: string): Promise<RunRecord<any, any>>;
  subscribe(fsm: string, runId: string, listener: Listener): () => void;
  get(fsm: string, runId: string): RunRecord<any, any> | undefined;
  list(fsm: string, filter: ListFilter): RunRecord<any, any>[];
  history(fsm: string, runId: string): RunHistoryEvent[];
}

type Phase = "registering" | "running" | "stopping" | "stopped";

export const DEFAULT_INTERRUPTION_POLICY: Readonly<InterruptionPolicy> = Object.freeze({ maxQuick: 5, quickWindowMs: 60_000 });

/** An attempt executing now, as shutdown needs to see it. */
interface LiveAttempt {
  stepIndex: number;
  step: string;
  tracker: WorkTracker;
}

const defaultLog: LogFn = (level, msg, fields) => {
  if (level === "warn" || level === "error") console.error(JSON.stringify({ level, msg, ...fields }));
};

export class FsmEngine {
  readonly #store: RunStore;
  readonly #log: LogFn;
  readonly #observer: EngineObserver | undefined;
  readonly #describeError: (err: unknown) => ErrorDetail | undefined;
  readonly #retry: RetryPolicy;
  readonly #queueLimits: Record<string, number>;
  readonly #defaultQueueLimit: number;
  readonly #queues = new Map<string, Semaphore>();
  readonly #locks: LockProvider;
  readonly #interruptions: InterruptionPolicy;
  readonly #live = new Map<string, LiveAttempt>();
  readonly #reserved = new Set<string>();
  readonly #defs = new Map<string, FsmDef>();
  /** Runs this process is executing or finalizing right now. */
  readonly #executing = new Map<string, Promise<void>>();
  readonly #waiters = new Map<string, Waiter[]>();
  readonly #listeners = new Map<string, Set<Listener>>();
  readonly #stop = new AbortController();
  readonly #newId = monotonicFactory();
  readonly #host: FsmHost;
  #phase: Phase = "registering";
  #shutdown: Promise<void> | undefined;

  constructor(db: Database.Database, options: EngineOptions = {}) {
    this.#store = new RunStore(db);
    this.#log = options.log ?? defaultLog;
    this.#observer = options.observer;
    this.#describeError = options.describeError ?? (() => undefined);
    this.#retry = resolveRetryPolicy(options.retry);
    this.#queueLimits = { ...options.queues };
    this.#defaultQueueLimit = options.defaultQueueLimit ?? 2;
    this.#locks = options.locks ?? new KeyedLock();
    this.#interruptions = { ...DEFAULT_INTERRUPTION_POLICY, ...options.interruptions };
    const { maxQuick, quickWindowMs } = this.#interruptions;
    if (!Number.isInteger(maxQuick) || maxQuick < 1) throw new RangeError(`interruptions.maxQuick must be an integer >= 1, got ${maxQuick}`);
    if (!(quickWindowMs >= 0) || !Number.isFinite(quickWindowMs)) throw new RangeError(`interruptions.quickWindowMs must be >= 0, got ${quickWindowMs}`);
    new Semaphore("default", this.#defaultQueueLimit); // validates the limit
    for (const [name, limit] of Object.entries(this.#queueLimits)) this.#queues.set(name, new Semaphore(name, limit));
    this.#host = {
      start: (fsm, resourceId, request, initialState) => this.#start(fsm, resourceId, request, initialState),
      wait: (fsm, runId) => this.#wait(fsm, runId),
      subscribe: (fsm, runId, listener) => this.#subscribe(fsm, runId, listener),
      get: (fsm, runId) => {
        const row = this.#store.get(runId);
        return row && row.fsm === fsm ? toRecord(row) : undefined;
      },
      list: (fsm, filter) => {
        if (filter.limit !== undefined && !(Number.isInteger(filter.limit) && filter.limit >= 0)) {
          throw new RangeError(`list: limit must be an integer >= 0, got ${filter.limit}`);
        }
        return this.#store.list(fsm, filter).map((row) => toRecord(row));
      },
      history: (fsm, runId) => {
        const row = this.#store.get(runId);
        return row && row.fsm === fsm ? this.#store.history(runId) : [];
      },
    };
  }

  /** Declares an FSM; finish the chain with end(). Only before resumeAll(). */
  register<R, W>(name: string): FsmBuilder<R, W> {
    if (this.#phase !== "registering") throw new Error(`register("${name}"): FSMs must be registered before resumeAll()`);
    if (typeof name !== "string" || name.length === 0) throw new TypeError("register: FSM name must be a non-empty string");
    if (this.#reserved.has(name)) throw new Error(`register: FSM "${name}" is already registered`);
    this.#reserved.add(name);
    return this.#builder<R, W>(name);
  }

  /**
   * Relaunches every unfinished run of every registered FSM from its own saved step and state,
   * fails runs of FSMs that are no longer registered, and re-runs the finalizers of runs that
   * finished without all of them returning. Returns once everything is launched. Call once.
   */
  async resumeAll(): Promise<void> {
    if (this.#phase !== "registering") throw new Error("resumeAll() may be called only once, before shutdown()");
    this.#phase = "running";
    for (const row of this.#store.running()) {
      const def = this.#defs.get(row.fsm);
      if (!def) {
        const error = `FSM "${row.fsm}" is not registered in this version of the agent; run abandoned`;
        this.#finish("not_resumable", row, "failed", currentStep(row), error);
        this.#log("warn", "failed a run of an unknown FSM", { fsm: row.fsm, runId: row.id, resourceId: row.resource_id });
        continue;
      }
      this.#launch(def, row.id, true);
    }
    for (const def of this.#defs.values()) {
      for (const row of this.#store.unfinalized(def.name)) this.#launch(def, row.id, true);
    }
  }

  /**
   * Aborts executing steps (their signal fires) and waits for them. Unfinished runs stay
   * "running" in SQLite and resume on the next start. With `timeoutMs`, stops waiting after
   * that long; steps still executing then are ignored (nothing more is written for them).
   * Pending wait() calls for unfinished runs reject. Idempotent.
   */
  shutdown(timeoutMs?: number): Promise<void> {
    this.#shutdown ??= this.#doShutdown(timeoutMs);
    return this.#shutdown;
  }

  /**
   * Bounded concurrency for use inside steps. Limits come from options.queues; a name missing
   * there gets options.defaultQueueLimit (2) and a warning, rather than an exception in the
   * middle of a run.
   */
  queue(name: string): Semaphore {
    let queue = this.#queues.get(name);
    if (!queue) {
      this.#log("warn", "queue has no configured limit; using the default", { queue: name, limit: this.#defaultQueueLimit });
      queue = new Semaphore(name, this.#defaultQueueLimit);
      this.#queues.set(name, queue);
    }
    return queue;
  }

  /**
   * Deletes finished runs (and their history) that finished before `before`, and with `keep`
   * all but the newest `keep` finished runs. Returns the count.
   */
  prune(before: Date, keep?: number): number {
    return this.#store.prune(before, keep);
  }

  #builder<R, W>(name: string): FsmBuilder<R, W> {
    const steps: StepDef[] = [];
    const replaced = new Map<string, string>();
    let ended = false;
    const add = (kind: "start" | "to", step: string, fn: StepFn<R, W>, opts?: StepOptions): void => {
      const where = `FSM "${name}" ${kind}("${step}")`;
      if (ended) throw new Error(`${where}: the FSM has already ended`);
      if (kind === "start" && steps.length > 0) throw new Error(`${where}: start() must be called once, first`);
      if (kind === "to" && steps.length === 0) throw new Error(`${where}: call start() first`);
      if (typeof step !== "string" || step.length === 0) throw new TypeError(`${where}: step name must be a non-empty string`);
      if (steps.some((s) => s.name === step)) throw new Error(`${where}: duplicate step name`);
      if (typeof fn !== "function") throw new TypeError(`${where}: step function missing`);
      for (const old of opts?.replaces ?? []) {
        if (steps.some((s) => s.name === old || replaced.has(old)) || old === step) throw new Error(`${where}: step "${old}" is replaced twice`);
        replaced.set(old, step);
      }
      steps.push({ name: step, fn: fn as StepFn<any, any>, retry: resolveRetryPolicy(this.#retry, opts?.retry) });
    };
    const builder: FsmBuilder<R, W> = {
      start: (step, fn, opts) => (add("start", step, fn, opts), builder),
      to: (step, fn, opts) => (add("to", step, fn, opts), builder),
      end: (opts) => {
        if (ended) throw new Error(`FSM "${name}": end() called twice`);
        if (steps.length === 0) throw new Error(`FSM "${name}": end() without any step`);
        if (this.#phase !== "registering") throw new Error(`FSM "${name}": end() after resumeAll()`);
        ended = true;
        const finalizers = (opts?.finalizers ?? []) as Finalizer<any, any>[];
        for (const old of replaced.keys()) if (steps.some((s) => s.name === old)) throw new Error(`FSM "${name}": step "${old}" both exists and is replaced`);
        this.#defs.set(name, { name, steps, byName: new Map(steps.map((s) => [s.name, s])), replaced, finalizers });
        return new Fsm<R, W>(name, this.#host);
      },
    };
    return builder;
  }

  #start(fsm: string, resourceId: string, request: unknown, initialState: unknown): { runId: string; joined: boolean } {
    const def = this.#defs.get(fsm)!;
    if (this.#phase === "stopping" || this.#phase === "stopped") throw new Error(`start ${fsm}: the FSM engine is shut down`);
    if (typeof resourceId !== "string" || resourceId.length === 0) throw new TypeError(`start ${fsm}: resourceId must be a non-empty string`);
    const { row, joined } = this.#store.insertOrJoin({
      id: this.#newId(),
      fsm,
      resourceId,
      steps: def.steps.map((s) => s.name),
      request: toJson(request, `start ${fsm}: request`),
      state: toJson(initialState, `start ${fsm}: initial state`),
    });
    if (joined) {
      this.#log("debug", "joined the running run", { fsm, runId: row.id, resourceId });
    } else {
      this.#log("info", "run started", { fsm, runId: row.id, resourceId });
      this.#launch(def, row.id, false);
    }
    return { runId: row.id, joined };
  }

  #launch(def: FsmDef, runId: string, resumed: boolean): void {
    if (this.#executing.has(runId)) return; // never execute one run twice in this process
    const done = this.#drive(def, runId, resumed)
      .catch((err: unknown) => this.#onExecutorError(runId, err))
      .finally(() => {
        if (this.#executing.get(runId) === done) this.#executing.delete(runId);
      });
    this.#executing.set(runId, done);
  }

  async #drive(def: FsmDef, runId: string, resumed: boolean): Promise<void> {
    await Promise.resolve(); // let start() return (and callers subscribe) before step 1 begins
    let row = this.#store.get(runId);
    if (!row) throw new Error(`run ${runId} vanished from the database`);
    if (row.status === "running") {
      if (resumed) row = this.#prepareResume(def, row);
      const finished = row.status === "running" ? await this.#runSteps(def, row, resumed) : row;
      if (!finished) {
        // Shutdown: the run stays "running" and resumes on the next start. Release its waiters
        // now, not at the end of shutdown: a step of another run may be awaiting this one.
        this.#executing.delete(runId);
        this.#rejectWaiters(runId, unfinishedError(runId));
        return;
      }
      row = finished;
    }
    await this.#finalize(def, row);
  }

  #prepareResume(def: FsmDef, row: RunRow): RunRow {
    row = this.#adoptRenamedSteps(def, row);
    const steps = JSON.parse(row.steps) as string[];
    const missing = steps.slice(row.step_index).filter((s) => !def.byName.has(s));
    if (missing.length > 0) {
      const error = `cannot resume: step(s) ${missing.map((s) => `"${s}"`).join(", ")} of FSM "${def.name}" no longer exist in this version of the agent`;
      this.#log("error", "run cannot resume", { fsm: def.name, runId: row.id, error });
      return this.#finish("not_resumable", row, "failed", currentStep(row), error);
    }
    const step = currentStep(row);
    this.#log("info", "resuming run", { fsm: def.name, runId: row.id, resourceId: row.resource_id, step });
    const resumed = this.#store.recordResume(row.id, step, this.#interruptions.quickWindowMs);
    if (resumed.in_attempt !== row.in_attempt) {
      this.#log("warn", "the agent stopped while the step was working: interruption recorded", { fsm: def.name, runId: row.id, step, interruptions: resumed.interruptions, quick: resumed.quick_interruptions });
    }
    const { maxQuick, quickWindowMs } = this.#interruptions;
    if (resumed.quick_interruptions >= maxQuick) {
      const error = `step "${step}" was interrupted ${resumed.quick_interruptions} times within ${quickWindowMs / 1000}s of starting: poison step? (the agent died each time soon after the step began; the run is ended to stop a crash loop)`;
      this.#log("error", "poison step: run failed", { fsm: def.name, runId: row.id, step, error });
      return this.#finish("poison", row, "failed", step, error);
    }
    return resumed;
  }

  /**
   * A run saved by an earlier version whose remaining steps were renamed or merged since
   * (StepOptions.replaces) continues on this version's steps: at the step that replaced the one it
   * was at, keeping its attempt counters. Unchanged when its steps are this version's, or when a
   * step is neither here nor replaced (then it cannot resume).
   */
  #adoptRenamedSteps(def: FsmDef, row: RunRow): RunRow {
    const saved = JSON.parse(row.steps) as string[];
    const current = def.steps.map((s) => s.name);
    if (JSON.stringify(saved) === JSON.stringify(current)) return row;
    const now = (step: string) => (def.byName.has(step) ? step : def.replaced.get(step));
    const remaining = saved.slice(row.step_index).map(now);
    if (remaining.length === 0 || remaining.some((s) => s === undefined)) return row;
    const stepIndex = current.indexOf(remaining[0]!);
    // The remaining steps must be this version's, in its order, from that point on.
    if (remaining.some((s, i) => i > 0 && current.indexOf(s!) < current.indexOf(remaining[i - 1]!))) return row;
    this.#log("info", "run resumes on renamed steps", { fsm: def.name, runId: row.id, from: saved[row.step_index], to: current[stepIndex] });
    return this.#store.adoptSteps(row.id, row.step_index, current, stepIndex);
  }

  /** Executes the remaining steps. Returns the finished row, or undefined if shutdown interrupted. */
  async #runSteps(def: FsmDef, row: RunRow, resumed: boolean): Promise<RunRow | undefined> {
    const runId = row.id;
    const steps = JSON.parse(row.steps) as string[];
    const request: unknown = deepFreeze(JSON.parse(row.request));
    const signal = this.#stop.signal;
    let announced = -1;
    let inProcessInterruptions = 0; // for the backoff between re-runs of an interrupted step
    for (;;) {
      if (signal.aborted) return undefined;
      const index = row.step_index;
      if (index >= steps.length) {
        this.#log("info", "run succeeded", { fsm: def.name, runId, resourceId: row.resource_id });
        return this.#finish("completed", row, "succeeded", steps[steps.length - 1]!);
      }
      const stepName = steps[index]!;
      const step = def.byName.get(stepName);
      if (!step) {
        return this.#finish("not_resumable", row, "failed", stepName, `step "${stepName}" of FSM "${def.name}" no longer exists in this version of the agent`);
      }
      if (row.attempt >= step.retry.maxAttempts) {
        // Only reachable after a crash between recording the last failed attempt and finishing.
        return this.#finish("step_error", row, "failed", stepName, row.error ?? `step "${stepName}" exhausted its ${step.retry.maxAttempts} attempts`);
      }
      if (announced !== index) {
        announced = index;
        inProcessInterruptions = 0;
        this.#emit(runId, { type: "step", step: stepName });
      }

      const fields = { fsm: def.name, runId, resourceId: row.resource_id, step: stepName, attempt: row.attempt };
      this.#store.setWorking(runId, index, true);
      const tracker = new WorkTracker((working, waitingFor) => {
        this.#store.setWorking(runId, index, working, waitingFor);
        if (!working) this.#log("debug", "step waiting", { ...fields, waitingFor });
      });
      const live: LiveAttempt = { stepIndex: index, step: stepName, tracker };
      this.#live.set(runId, live);
      const ctx: StepContext<any, unknown> = {
        runId,
        fsm: def.name,
        resourceId: row.resource_id,
        step: stepName,
        request: request as Readonly<any>,
        state: JSON.parse(row.state) as unknown, // fresh copy of the checkpoint for every attempt
        attempt: row.attempt,
        interruptions: row.interruptions,
        resumed,
        signal,
        withQueue: (queue, fn, options) =>
          tracker.hold(`queue ${queue}`, async () => {
            const slot = await this.queue(queue).acquire(waitSignal(signal, options));
            return () => slot.release();
          }, fn),
        withLock: (key, fn, options) => tracker.hold(`lock ${key}`, () => this.#locks.acquire(key, waitSignal(signal, options)), fn),
        waitFor: (what, wait) => tracker.wait(what, () => wait(signal)),
        progress: (progress) => this.#emit(runId, { type: "progress", step: stepName, progress }),
        log: (level, msg, extra) => this.#log(level, msg, { ...fields, ...extra }),
      };
      let failure: unknown;
      let succeeded = false;
      crashPoint(`fsm.${def.name}.${stepName}.before`);
      const began = performance.now();
      try {
        await step.fn(ctx);
        succeeded = true;
      } catch (err) {
        failure = err;
      } finally {
        tracker.freeze();
        if (this.#live.get(runId) === live) this.#live.delete(runId);
      }
      const outcome = succeeded ? "completed" : signal.aborted ? "stopped" : failure instanceof InterruptedError ? "interrupted" : "failed";
      this.#observer?.stepEnded(def.name, stepName, outcome, (performance.now() - began) / 1000);
      if (this.#phase === "stopped") return undefined; // shutdown stopped waiting: write nothing more

      if (succeeded) {
        let state: string;
        try {
          state = toJson(ctx.state, `step "${stepName}" left a state that`);
        } catch (err) {
          this.#store.recordFailedAttempt(runId, index, stepName, row.attempt, formatError(err));
          return this.#finish("step_error", row, "failed", stepName, formatError(err));
        }
        this.#store.completeStep(runId, index, stepName, state);
        crashPoint(`fsm.${def.name}.${stepName}.committed`);
        this.#log("debug", "step completed", fields);
        row = this.#store.get(runId)!;
        continue;
      }

      if (signal.aborted) {
        // The interruption (if the step was working) was recorded when the stop began.
        this.#log("info", "step stopped by shutdown; the run resumes on the next start", fields);
        return undefined;
      }
      if (failure instanceof InterruptedError) {
        // Cut short from outside (not the step's fault): no attempt spent, the step runs again.
        const reason = formatError(failure);
        this.#store.recordInterruption(runId, index, stepName, reason);
        inProcessInterruptions++;
        const delayMs = backoffDelayMs(step.retry, inProcessInterruptions);
        this.#log("warn", "step interrupted; running it again", { ...fields, reason, delayMs });
        if (!(await sleep(delayMs, signal))) return undefined;
        row = this.#store.get(runId)!;
        continue;
      }
      const error = formatError(failure);
      const failed = row.attempt + 1;
      if (failure instanceof AbortError || failed >= step.retry.maxAttempts) {
        this.#store.recordFailedAttempt(runId, index, stepName, row.attempt, error);
        const why = failure instanceof AbortError ? "aborted" : `gave up after ${failed} attempts`;
        this.#log("warn", `run failed: step ${why}`, { ...fields, error });
        return this.#finish(failure instanceof AbortError ? "aborted" : "step_error", row, "failed", stepName, error, this.#describeError(failure));
      }
      const delayMs = backoffDelayMs(step.retry, failed);
      this.#store.recordFailedAttempt(runId, index, stepName, row.attempt, error, delayMs);
      this.#log("warn", "step failed; retrying", { ...fields, error, delayMs });
      this.#emit(runId, { type: "retry", step: stepName, attempt: row.attempt, error, delayMs });
      if (!(await sleep(delayMs, signal))) return undefined;
      row = this.#store.get(runId)!;
    }
  }

  /** Ends a run in SQLite (one place, so the observer hears of every end and why). */
  #finish(reason: RunEndReason, row: RunRow, status: "succeeded" | "failed", step: string, error?: string, detail?: ErrorDetail): RunRow {
    const finished = this.#store.finish(row.id, status, step, error, detail);
    this.#observer?.runFinished(row.fsm, status, reason);
    return finished;
  }

  /** Finalizers (at least once: the durable finalized_at mark comes last), then notifications. */
  async #finalize(def: FsmDef, row: RunRow): Promise<void> {
    if (row.finalized_at === null) {
      crashPoint(`fsm.${def.name}.finalizers.before`);
      for (const finalizer of def.finalizers) {
        try {
          await finalizer(toRecord(row));
        } catch (err) {
          this.#log("error", "finalizer failed", { fsm: def.name, runId: row.id, error: formatError(err) });
        }
      }
      if (this.#phase === "stopped") return;
      crashPoint(`fsm.${def.name}.finalizers.after`);
      this.#store.markFinalized(row.id);
    }
    this.#executing.delete(row.id); // before notifying, so a wait() from a listener reads SQLite
    this.#notifyFinished(toRecord(row));
  }

  #notifyFinished(run: RunRecord<any, any>): void {
    this.#emit(run.id, { type: "finished", run });
    this.#listeners.delete(run.id);
    const waiters = this.#waiters.get(run.id) ?? [];
    this.#waiters.delete(run.id);
    for (const waiter of waiters) waiter.resolve(run);
  }

  #onExecutorError(runId: string, err: unknown): void {
    const error = formatError(err);
    this.#log("error", "FSM executor error", { runId, error });
    if (this.#phase === "stopped") return;
    try {
      let row = this.#store.get(runId);
      if (row?.status === "running" && !(err instanceof StaleRunError)) {
        row = this.#finish("internal_error", row, "failed", currentStep(row), `internal FSM engine error: ${error}`);
      }
      if (row && row.status !== "running") {
        this.#notifyFinished(toRecord(row));
        return;
      }
    } catch (inner) {
      this.#log("error", "could not record the executor error", { runId, error: formatError(inner) });
    }
    this.#rejectWaiters(runId, new Error(`run ${runId}: ${error}`));
  }

  #rejectWaiters(runId: string, err: Error): void {
    const waiters = this.#waiters.get(runId) ?? [];
    this.#waiters.delete(runId);
    for (const waiter of waiters) waiter.reject(err);
  }

  #wait(fsm: string, runId: string): Promise<RunRecord<any, any>> {
    const row = this.#store.get(runId);
    if (!row || row.fsm !== fsm) return Promise.reject(new Error(`unknown run ${JSON.stringify(runId)} of FSM "${fsm}"`));
    if (row.status !== "running" && !this.#executing.has(runId)) return Promise.resolve(toRecord(row));
    if (this.#phase === "stopped" || this.#phase === "stopping") return Promise.reject(unfinishedError(runId));
    return new Promise((resolve, reject) => {
      const list = this.#waiters.get(runId) ?? [];
      list.push({ resolve, reject });
      this.#waiters.set(runId, list);
    });
  }

  #subscribe(fsm: string, runId: string, listener: Listener): () => void {
    const row = this.#store.get(runId);
    if (!row || row.fsm !== fsm) throw new Error(`unknown run ${JSON.stringify(runId)} of FSM "${fsm}"`);
    let active = true;
    const unsubscribe = (): void => {
      active = false;
      this.#listeners.get(runId)?.delete(listener);
    };
    if (row.status !== "running" && !this.#executing.has(runId)) {
      // Already over: tell the listener once, asynchronously, like a live run would.
      queueMicrotask(() => {
        if (active) this.#safeCall(listener, { type: "finished", run: toRecord(row) }, runId);
      });
      return unsubscribe;
    }
    let set = this.#listeners.get(runId);
    if (!set) this.#listeners.set(runId, (set = new Set()));
    set.add(listener);
    return unsubscribe;
  }

  #emit(runId: string, event: RunEvent): void {
    const set = this.#listeners.get(runId);
    if (!set) return;
    for (const listener of [...set]) this.#safeCall(listener, event, runId);
  }

  #safeCall(listener: Listener, event: RunEvent, runId: string): void {
    try {
      listener(event);
    } catch (err) {
      this.#log("warn", "run event listener threw", { runId, event: event.type, error: formatError(err) });
    }
  }

  async #doShutdown(timeoutMs?: number): Promise<void> {
    this.#phase = "stopping";
    // Steps working now are interrupted by this stop: recorded at once, so it holds even if a
    // step outlives the timeout or the process is killed before the step returns. Steps that
    // only wait cost nothing.
    for (const [runId, live] of this.#live) {
      live.tracker.freeze();
      if (!live.tracker.working) continue;
      try {
        this.#store.recordInterruption(runId, live.stepIndex, live.step, "the agent was stopped (SIGTERM) while this step was working");
      } catch (err) {
        this.#log("error", "could not record an interruption", { runId, error: formatError(err) });
      }
    }
    this.#stop.abort(new EngineShutdownError());
    for (const runId of [...this.#waiters.keys()]) {
      if (!this.#executing.has(runId)) this.#rejectWaiters(runId, unfinishedError(runId));
    }
    const all = Promise.allSettled([...this.#executing.values()]);
    if (timeoutMs === undefined) {
      await all;
    } else {
      let timer: NodeJS.Timeout | undefined;
      const timedOut = await Promise.race([
        all.then(() => false),
        new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), timeoutMs))),
      ]);
      clearTimeout(timer);
      if (timedOut) this.#log("warn", "shutdown timed out; steps still running are abandoned", { runs: [...this.#executing.keys()] });
    }
    this.#phase = "stopped";
    for (const runId of [...this.#waiters.keys()]) this.#rejectWaiters(runId, unfinishedError(runId));
    this.#listeners.clear();
  }
}

/** Handle on one registered FSM. Obtained from FsmEngine.register(...).end(). */
export class Fsm<R, W> {
  readonly name: string;
  readonly #host: FsmHost;

  constructor(name: string, host: FsmHost) {
    this.name = name;
    this.#host = host;
  }

  /**
   * Starts a run for `resourceId`, or joins the one already running (joined=true; nothing new
   * starts). request and initialState must be plain JSON data (they are stored as JSON).
   */
  start(resourceId: string, request: R, initialState: W): { runId: string; joined: boolean } {
    return this.#host.start(this.name, resourceId, request, initialState);
  }

  /** The durable outcome once the run has finished (also for runs from before a restart). */
  wait(runId: string): Promise<RunRecord<R, W>> {
    return this.#host.wait(this.name, runId);
  }

  /** Step changes, progress, retries and finish. Throws for unknown runs. Returns unsubscribe. */
  subscribe(runId: string, listener: (event: RunEvent) => void): () => void {
    return this.#host.subscribe(this.name, runId, listener);
  }

  get(runId: string): RunRecord<R, W> | undefined {
    return this.#host.get(this.name, runId);
  }

  /** Newest first. */
  list(filter: ListFilter = {}): RunRecord<R, W>[] {
    return this.#host.list(this.name, filter);
  }

  /** The run's durable event log (start, resume, step, error, finish), oldest first. */
  history(runId: string): RunHistoryEvent[] {
    return this.#host.history(this.name, runId);
  }
}

function unfinishedError(runId: string): Error {
  return new Error(`run ${runId} is unfinished and the FSM engine is shut down; it resumes on the next start`);
}

function currentStep(row: RunRow): string {
  const steps = JSON.parse(row.steps) as string[];
  return steps[Math.min(row.step_index, steps.length - 1)] ?? "";
}

function toJson(value: unknown, what: string): string {
  let json: string | undefined;
  try {
    json = JSON.stringify(value);
  } catch (err) {
    throw new TypeError(`${what} cannot be saved as JSON: ${formatError(err)}`);
  }
  if (json === undefined) throw new TypeError(`${what} cannot be saved as JSON (got ${typeof value})`);
  return json;
}

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === "object" && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const child of Object.values(value)) deepFreeze(child);
  }
  return value;
}

/** What ends a wait: the engine's stop, and the step's own signal if it gave one. */
function waitSignal(stop: AbortSignal, options: WaitOptions | undefined): AbortSignal {
  return options?.signal ? AbortSignal.any([stop, options.signal]) : stop;
}
