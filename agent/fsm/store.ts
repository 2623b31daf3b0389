// Durable storage of FSM runs and their history in SQLite. Every state change of a run is one
// transaction, and updates are guarded by the expected status/step so that a stale executor
// can never overwrite a newer outcome.
import type Database from "better-sqlite3";
import { migrate } from "../db.ts";
import type { ErrorDetail, RunHistoryEvent, RunRecord, RunStatus } from "./types.ts";

export const FSM_MIGRATIONS: readonly string[] = [
  `CREATE TABLE fsm_runs (
     id           TEXT    PRIMARY KEY,
     fsm          TEXT    NOT NULL,
     resource_id  TEXT    NOT NULL,
     status       TEXT    NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
     steps        TEXT    NOT NULL,
     step_index   INTEGER NOT NULL,
     request      TEXT    NOT NULL,
     state        TEXT    NOT NULL,
     error        TEXT,
     attempt      INTEGER NOT NULL DEFAULT 0,
     in_attempt   INTEGER NOT NULL DEFAULT 0,
     started_at   TEXT    NOT NULL,
     updated_at   TEXT    NOT NULL,
     finished_at  TEXT,
     finalized_at TEXT,
     CHECK ((status = 'running') = (finished_at IS NULL))
   ) STRICT;
   CREATE UNIQUE INDEX fsm_runs_one_running ON fsm_runs (fsm, resource_id) WHERE status = 'running';
   CREATE INDEX fsm_runs_by_resource ON fsm_runs (fsm, resource_id, id);
   CREATE INDEX fsm_runs_by_status ON fsm_runs (fsm, status, id);
   CREATE INDEX fsm_runs_unfinalized ON fsm_runs (fsm) WHERE finalized_at IS NULL;
   CREATE TABLE fsm_events (
     seq      INTEGER PRIMARY KEY AUTOINCREMENT,
     run_id   TEXT    NOT NULL REFERENCES fsm_runs (id) ON DELETE CASCADE,
     type     TEXT    NOT NULL CHECK (type IN ('start', 'resume', 'step', 'error', 'finish')),
     step     TEXT,
     attempt  INTEGER,
     error    TEXT,
     delay_ms INTEGER,
     status   TEXT,
     at       TEXT    NOT NULL
   ) STRICT;
   CREATE INDEX fsm_events_by_run ON fsm_events (run_id, seq);`,
  // Interruptions (the process died, or was stopped, while a step worked) are counted apart
  // from failed attempts; waiting for a queue slot, a lock or another run is not working.
  `ALTER TABLE fsm_runs ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE fsm_runs ADD COLUMN quick_interruptions INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE fsm_runs ADD COLUMN last_interrupted_at TEXT;
   ALTER TABLE fsm_runs ADD COLUMN work_started_at TEXT;
   ALTER TABLE fsm_runs ADD COLUMN waiting_for TEXT;
   CREATE TABLE fsm_events_v2 (
     seq      INTEGER PRIMARY KEY AUTOINCREMENT,
     run_id   TEXT    NOT NULL REFERENCES fsm_runs (id) ON DELETE CASCADE,
     type     TEXT    NOT NULL CHECK (type IN ('start', 'resume', 'step', 'error', 'interrupted', 'finish')),
     step     TEXT,
     attempt  INTEGER,
     error    TEXT,
     delay_ms INTEGER,
     status   TEXT,
     at       TEXT    NOT NULL
   ) STRICT;
   INSERT INTO fsm_events_v2 SELECT seq, run_id, type, step, attempt, error, delay_ms, status, at FROM fsm_events;
   DROP TABLE fsm_events;
   ALTER TABLE fsm_events_v2 RENAME TO fsm_events;
   CREATE INDEX fsm_events_by_run ON fsm_events (run_id, seq);`,
  // What the final error is (ErrorDetail as JSON), for typed API errors.
  `ALTER TABLE fsm_runs ADD COLUMN error_detail TEXT;`,
];

export interface RunRow {
  id: string;
  fsm: string;
  resource_id: string;
  status: RunStatus;
  steps: string;
  step_index: number;
  request: string;
  state: string;
  error: string | null;
  error_detail: string | null;
  attempt: number;
  /** 1 while a step works (not while it waits): a process death then is an interruption. */
  in_attempt: number;
  interruptions: number;
  /** Consecutive interruptions of the current step that came soon after it began working. */
  quick_interruptions: number;
  last_interrupted_at: string | null;
  /** When the current step last began working (after its last wait). */
  work_started_at: string | null;
  waiting_for: string | null;
  started_at: string;
  updated_at: string;
  finished_at: string | null;
  finalized_at: string | null;
}

interface EventRow {
  seq: number;
  run_id: string;
  type: RunHistoryEvent["type"];
  step: string | null;
  attempt: number | null;
  error: string | null;
  delay_ms: number | null;
  status: RunStatus | null;
  at: string;
}

export interface NewRun {
  id: string;
  fsm: string;
  resourceId: string;
  steps: string[];
  request: string;
  state: string;
}

const now = (): string => new Date().toISOString();

export function toRecord<R, W>(row: RunRow): RunRecord<R, W> {
  const steps = JSON.parse(row.steps) as string[];
  const record: RunRecord<R, W> = {
    id: row.id,
    fsm: row.fsm,
    resourceId: row.resource_id,
    status: row.status,
    step: steps[Math.min(row.step_index, steps.length - 1)] ?? "",
    stepIndex: row.step_index,
    steps,
    request: JSON.parse(row.request) as R,
    state: JSON.parse(row.state) as W,
    attempts: row.attempt,
    interruptions: row.interruptions,
    startedAt: row.started_at,
    updatedAt: row.updated_at,
  };
  if (row.error !== null) record.error = row.error;
  if (row.error_detail !== null) record.errorDetail = JSON.parse(row.error_detail) as ErrorDetail;
  if (row.finished_at !== null) record.finishedAt = row.finished_at;
  if (row.last_interrupted_at !== null) record.lastInterruptedAt = row.last_interrupted_at;
  if (row.waiting_for !== null && row.status === "running") record.waitingFor = row.waiting_for;
  return record;
}

function toHistoryEvent(row: EventRow): RunHistoryEvent {
  const event: RunHistoryEvent = { seq: row.seq, runId: row.run_id, type: row.type, at: row.at };
  if (row.step !== null) event.step = row.step;
  if (row.attempt !== null) event.attempt = row.attempt;
  if (row.error !== null) event.error = row.error;
  if (row.delay_ms !== null) event.delayMs = row.delay_ms;
  if (row.status !== null) event.status = row.status;
  return event;
}

/** Thrown when a guarded update finds the run in another state than the executor expected. */
export class StaleRunError extends Error {
  constructor(runId: string, what: string) {
    super(`run ${runId}: ${what}: the run changed underneath this executor (is a second engine using this database?)`);
    this.name = "StaleRunError";
  }
}

export class RunStore {
  readonly #db: Database.Database;
  readonly #event: Database.Statement;

  constructor(db: Database.Database) {
    migrate(db, "fsm", FSM_MIGRATIONS);
    this.#db = db;
    this.#event = db.prepare(
      `INSERT INTO fsm_events (run_id, type, step, attempt, error, delay_ms, status, at)
       VALUES (@runId, @type, @step, @attempt, @error, @delayMs, @status, @at)`,
    );
  }

  #addEvent(e: { runId: string; type: RunHistoryEvent["type"]; step?: string; attempt?: number; error?: string; delayMs?: number; status?: RunStatus; at: string }): void {
    this.#event.run({
      runId: e.runId,
      type: e.type,
      step: e.step ?? null,
      attempt: e.attempt ?? null,
      error: e.error ?? null,
      delayMs: e.delayMs ?? null,
      status: e.status ?? null,
      at: e.at,
    });
  }

  #update(runId: string, what: string, sql: string, params: Record<string, unknown>): void {
    const result = this.#db.prepare(sql).run({ id: runId, ...params });
    if (result.changes !== 1) throw new StaleRunError(runId, what);
  }

  get(runId: string): RunRow | undefined {
    return this.#db.prepare("SELECT * FROM fsm_runs WHERE id = ?").get(runId) as RunRow | undefined;
  }

  findRunning(fsm: string, resourceId: string): RunRow | undefined {
    return this.#db
      .prepare("SELECT * FROM fsm_runs WHERE fsm = ? AND resource_id = ? AND status = 'running'")
      .get(fsm, resourceId) as RunRow | undefined;
  }

  /**
   * Inserts a run and its start event, unless the (fsm, resourceId) pair already has a running
   * run: then returns that run instead (the UNIQUE partial index decides, not memory).
   */
  insertOrJoin(run: NewRun): { row: RunRow; joined: boolean } {
    const insert = this.#db.transaction((): RunRow => {
      const at = now();
      this.#db
        .prepare(
          `INSERT INTO fsm_runs (id, fsm, resource_id, status, steps, step_index, request, state, started_at, updated_at)
           VALUES (@id, @fsm, @resourceId, 'running', @steps, 0, @request, @state, @at, @at)`,
        )
        .run({ ...run, steps: JSON.stringify(run.steps), at });
      this.#addEvent({ runId: run.id, type: "start", step: run.steps[0]!, at });
      return this.get(run.id)!;
    });
    try {
      return { row: insert.immediate(), joined: false };
    } catch (err) {
      if ((err as { code?: string }).code !== "SQLITE_CONSTRAINT_UNIQUE") throw err;
      const existing = this.findRunning(run.fsm, run.resourceId);
      if (!existing) throw err;
      return { row: existing, joined: true };
    }
  }

  /**
   * Marks the resumption of a run. If the previous process died while a step was working (not
   * waiting), that is an interruption: counted apart from failed attempts, leaving the attempt
   * count and the last real error alone. It counts towards the poison rule only if it came
   * within `quickWindowMs` of the step beginning to work (measured now, at the next start).
   */
  recordResume(runId: string, step: string, quickWindowMs: number): RunRow {
    return this.#db.transaction((): RunRow => {
      const row = this.get(runId);
      if (!row || row.status !== "running") throw new StaleRunError(runId, "resume");
      const at = now();
      this.#addEvent({ runId, type: "resume", step, attempt: row.attempt, at });
      if (row.in_attempt) {
        const since = row.work_started_at === null ? Infinity : Date.parse(at) - Date.parse(row.work_started_at);
        const quick = since <= quickWindowMs;
        const when = Number.isFinite(since) ? `${Math.round(since / 1000)} s after it began` : "start time unknown";
        this.#interrupt(row, step, at, quick, `the agent stopped while this step was working (crash, kill or power loss; ${when})`);
      }
      return this.get(runId)!;
    }).immediate();
  }

  /**
   * Records an interruption seen by the running process itself (a graceful stop, a lost helper
   * connection): never quick, since the process did not die.
   */
  recordInterruption(runId: string, stepIndex: number, step: string, reason: string): void {
    this.#db.transaction(() => {
      const row = this.get(runId);
      if (!row || row.status !== "running" || row.step_index !== stepIndex) throw new StaleRunError(runId, "record interruption");
      this.#interrupt(row, step, now(), false, reason);
    }).immediate();
  }

  #interrupt(row: RunRow, step: string, at: string, quick: boolean, reason: string): void {
    this.#update(
      row.id,
      "record interruption",
      `UPDATE fsm_runs SET in_attempt = 0, waiting_for = NULL, interruptions = interruptions + 1,
         quick_interruptions = quick_interruptions + @quick, last_interrupted_at = @at, updated_at = @at
       WHERE id = @id AND status = 'running'`,
      { quick: quick ? 1 : 0, at },
    );
    this.#addEvent({ runId: row.id, type: "interrupted", step, attempt: row.attempt, error: reason, at });
  }

  /**
   * Durably notes whether the step is working (a process death then is an interruption) or
   * waiting for `waitingFor` (a death then costs nothing). Beginning to work restarts the clock
   * of the poison rule.
   */
  setWorking(runId: string, stepIndex: number, working: boolean, waitingFor?: string): void {
    const at = now();
    this.#update(
      runId,
      working ? "begin work" : "begin wait",
      working
        ? `UPDATE fsm_runs SET in_attempt = 1, waiting_for = NULL, work_started_at = @at, updated_at = @at
           WHERE id = @id AND status = 'running' AND step_index = @stepIndex`
        : `UPDATE fsm_runs SET in_attempt = 0, waiting_for = @waitingFor, updated_at = @at
           WHERE id = @id AND status = 'running' AND step_index = @stepIndex`,
      working ? { stepIndex, at } : { stepIndex, waitingFor: waitingFor ?? null, at },
    );
  }

  /** A run saved by an earlier version continues on this version's steps (engine: StepOptions.replaces). */
  adoptSteps(runId: string, fromIndex: number, steps: string[], stepIndex: number): RunRow {
    this.#update(
      runId,
      "adopt renamed steps",
      `UPDATE fsm_runs SET steps = @steps, step_index = @stepIndex, updated_at = @at
       WHERE id = @id AND status = 'running' AND step_index = @fromIndex`,
      { steps: JSON.stringify(steps), stepIndex, fromIndex, at: now() },
    );
    return this.get(runId)!;
  }

  /** The step succeeded: its checkpoint and the next step index are saved in one transaction. */
  completeStep(runId: string, stepIndex: number, step: string, state: string): void {
    this.#db.transaction(() => {
      const at = now();
      this.#update(
        runId,
        `complete step ${step}`,
        `UPDATE fsm_runs SET state = @state, step_index = @stepIndex + 1, attempt = 0, in_attempt = 0, error = NULL,
           quick_interruptions = 0, waiting_for = NULL, work_started_at = NULL, updated_at = @at
         WHERE id = @id AND status = 'running' AND step_index = @stepIndex`,
        { state, stepIndex, at },
      );
      this.#addEvent({ runId, type: "step", step, at });
    }).immediate();
  }

  recordFailedAttempt(runId: string, stepIndex: number, step: string, attempt: number, error: string, delayMs?: number): void {
    this.#db.transaction(() => {
      const at = now();
      this.#update(
        runId,
        `record failed attempt of ${step}`,
        `UPDATE fsm_runs SET attempt = @attempt + 1, in_attempt = 0, error = @error, quick_interruptions = 0, waiting_for = NULL, updated_at = @at
         WHERE id = @id AND status = 'running' AND step_index = @stepIndex AND attempt = @attempt`,
        { stepIndex, attempt, error, at },
      );
      this.#addEvent({ runId, type: "error", step, attempt, error, ...(delayMs === undefined ? {} : { delayMs }), at });
    }).immediate();
  }

  finish(runId: string, status: "succeeded" | "failed", step: string, error?: string, detail?: ErrorDetail): RunRow {
    return this.#db.transaction((): RunRow => {
      const at = now();
      this.#update(
        runId,
        `finish (${status})`,
        `UPDATE fsm_runs SET status = @status, error = @error, error_detail = @detail, in_attempt = 0, waiting_for = NULL, updated_at = @at, finished_at = @at
         WHERE id = @id AND status = 'running'`,
        { status, error: error ?? null, detail: detail ? JSON.stringify(detail) : null, at },
      );
      this.#addEvent({ runId, type: "finish", step, status, ...(error === undefined ? {} : { error }), at });
      return this.get(runId)!;
    }).immediate();
  }

  markFinalized(runId: string): void {
    this.#db.prepare("UPDATE fsm_runs SET finalized_at = ? WHERE id = ? AND status <> 'running'").run(now(), runId);
  }

  /** Every unfinished run, oldest first. */
  running(): RunRow[] {
    return this.#db.prepare("SELECT * FROM fsm_runs WHERE status = 'running' ORDER BY id").all() as RunRow[];
  }

  /** Finished runs of `fsm` whose finalizers have not all returned yet. */
  unfinalized(fsm: string): RunRow[] {
    return this.#db
      .prepare("SELECT * FROM fsm_runs WHERE fsm = ? AND finalized_at IS NULL AND status <> 'running' ORDER BY id")
      .all(fsm) as RunRow[];
  }

  list(fsm: string, filter: { resourceId?: string; status?: RunStatus; limit?: number; beforeId?: string }): RunRow[] {
    const where = ["fsm = @fsm"];
    if (filter.resourceId !== undefined) where.push("resource_id = @resourceId");
    if (filter.beforeId !== undefined) where.push("id < @beforeId");
    if (filter.status !== undefined) where.push("status = @status");
    const limit = filter.limit === undefined ? -1 : filter.limit;
    return this.#db
      .prepare(`SELECT * FROM fsm_runs WHERE ${where.join(" AND ")} ORDER BY id DESC LIMIT @limit`)
      .all({ fsm, resourceId: filter.resourceId ?? null, status: filter.status ?? null, beforeId: filter.beforeId ?? null, limit }) as RunRow[];
  }

  history(runId: string): RunHistoryEvent[] {
    const rows = this.#db.prepare("SELECT * FROM fsm_events WHERE run_id = ? ORDER BY seq").all(runId) as EventRow[];
    return rows.map(toHistoryEvent);
  }

  /**
   * Deletes finished, finalized runs (and their events) that finished before `before`, and with
   * `keep`, every finished, finalized run beyond the newest `keep`.
   */
  prune(before: Date, keep?: number): number {
    const finished = "status <> 'running' AND finalized_at IS NOT NULL";
    let count = this.#db.prepare(`DELETE FROM fsm_runs WHERE ${finished} AND finished_at < ?`).run(before.toISOString()).changes;
    if (keep !== undefined) {
      count += this.#db.prepare(`DELETE FROM fsm_runs WHERE id IN (SELECT id FROM fsm_runs WHERE ${finished} ORDER BY id DESC LIMIT -1 OFFSET ?)`).run(keep).changes;
    }
    return count;
  }
}
