// FSM engine behaviour on real SQLite files: ordered steps, checkpoints, joins, retries,
// aborts, finalizers, durable outcomes across restarts, queues and shutdown.
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openDatabase, type Database } from "../../agent/db.ts";
import { migrate } from "../../agent/db.ts";
import { FsmEngine, abort, interrupted, type EngineOptions, type RunEvent } from "../../agent/fsm/engine.ts";
import { FSM_MIGRATIONS } from "../../agent/fsm/store.ts";

const FAST = { maxAttempts: 3, baseDelayMs: 1, maxDelayMs: 5, factor: 2, jitter: 0 };

// A broken engine should fail a test, not hang the suite.
const LIMIT = { timeout: 15_000 };

interface Harness {
  path: string;
  db: Database;
  engine: FsmEngine;
  logs: { level: string; msg: string; fields?: Record<string, unknown> }[];
  /** Simulates a clean restart: shutdown, close, reopen the same file with a new engine. */
  restart(options?: EngineOptions): Promise<void>;
}

function harness(t: TestContext, options: EngineOptions = {}): Harness {
  const dir = mkdtempSync(join(tmpdir(), "imgd-fsm-"));
  const path = join(dir, "imgd.db");
  const logs: Harness["logs"] = [];
  const make = (opts: EngineOptions): { db: Database; engine: FsmEngine } => {
    const db = openDatabase(path);
    const engine = new FsmEngine(db, { retry: FAST, log: (level, msg, fields) => logs.push({ level, msg, fields }), ...opts });
    return { db, engine };
  };
  const h: Harness = {
    path,
    logs,
    ...make(options),
    async restart(opts = options) {
      await h.engine.shutdown();
      h.db.close();
      Object.assign(h, make(opts));
    },
  };
  t.after(async () => {
    // Bounded, so that an engine bug fails the test instead of hanging the suite.
    await Promise.race([h.engine.shutdown(), new Promise((r) => setTimeout(r, 2000).unref())]);
    if (h.db.open) h.db.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return h;
}

function aborted(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => signal.addEventListener("abort", () => reject(signal.reason), { once: true }));
}

function deferred<T = void>(): { promise: Promise<T>; resolve: (v: T) => void } {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

interface PullRequest {
  image: string;
  layers: number[];
}
interface PullState {
  digests: string[];
  device?: string;
  activation?: string;
}

test("typed request and state flow through ordered steps, each checkpoint saved with its step", LIMIT, async (t) => {
  const h = harness(t);
  const seenInStep: { step: string; stepIndex: number; saved: PullState | undefined }[] = [];
  const pull = h.engine
    .register<PullRequest, PullState>("pull")
    .start("download", async (ctx) => {
      assert.equal(ctx.attempt, 0);
      assert.equal(ctx.resumed, false);
      assert.ok(Object.isFrozen(ctx.request) && Object.isFrozen(ctx.request.layers));
      for (const layer of ctx.request.layers) {
        ctx.state.digests.push(`sha256:${layer}`);
        ctx.progress({ layer });
      }
    })
    .to("unpack", async (ctx) => {
      const saved = pull.get(ctx.runId)!;
      seenInStep.push({ step: ctx.step, stepIndex: saved.stepIndex, saved: saved.state });
      ctx.state.device = `imgd-layer-${ctx.state.digests.at(-1)}`;
    })
    .to("activate", async (ctx) => {
      const saved = pull.get(ctx.runId)!;
      seenInStep.push({ step: ctx.step, stepIndex: saved.stepIndex, saved: saved.state });
      // Assigning a new object works as well as mutating.
      ctx.state = { ...ctx.state, activation: `act-${ctx.request.image}` };
    })
    .end();
  await h.engine.resumeAll();

  const { runId, joined } = pull.start("image:golang", { image: "golang", layers: [1, 2] }, { digests: [] });
  assert.equal(joined, false);
  assert.match(runId, /^[0-9A-HJKMNP-TV-Z]{26}$/); // ULID
  const events: RunEvent[] = [];
  pull.subscribe(runId, (e) => events.push(e));

  const run = await pull.wait(runId);
  assert.equal(run.status, "succeeded");
  assert.equal(run.step, "activate");
  assert.equal(run.stepIndex, 3);
  assert.deepEqual(run.steps, ["download", "unpack", "activate"]);
  assert.deepEqual(run.request, { image: "golang", layers: [1, 2] });
  assert.deepEqual(run.state, { digests: ["sha256:1", "sha256:2"], device: "imgd-layer-sha256:2", activation: "act-golang" });
  assert.ok(run.finishedAt);
  assert.equal(run.error, undefined);

  // Inside each step, SQLite already held the previous step's checkpoint and index.
  assert.deepEqual(seenInStep, [
    { step: "unpack", stepIndex: 1, saved: { digests: ["sha256:1", "sha256:2"] } },
    { step: "activate", stepIndex: 2, saved: { digests: ["sha256:1", "sha256:2"], device: "imgd-layer-sha256:2" } },
  ]);

  assert.deepEqual(
    events.map((e) => (e.type === "progress" ? `progress:${e.progress.layer}` : e.type === "step" ? `step:${e.step}` : e.type)),
    ["step:download", "progress:1", "progress:2", "step:unpack", "step:activate", "finished"],
  );
  assert.deepEqual(
    pull.history(runId).map((e) => `${e.type}:${e.step}${e.status ? `:${e.status}` : ""}`),
    ["start:download", "step:download", "step:unpack", "step:activate", "finish:activate:succeeded"],
  );
});

test("a failed attempt's state changes are discarded; the retry starts from the checkpoint", LIMIT, async (t) => {
  const h = harness(t);
  const seen: unknown[] = [];
  const fsm = h.engine
    .register<{}, { n: number; junk?: string }>("retry-state")
    .start("one", async (ctx) => {
      ctx.state.n = 1;
    })
    .to("two", async (ctx) => {
      seen.push(structuredClone(ctx.state));
      ctx.state.junk = "partial";
      if (ctx.attempt === 0) throw new Error("flaky");
      ctx.state.n = 2;
    })
    .end();
  await h.engine.resumeAll();
  const { runId } = fsm.start("r", {}, { n: 0 });
  const run = await fsm.wait(runId);
  assert.deepEqual(seen, [{ n: 1 }, { n: 1 }]);
  assert.deepEqual(run.state, { n: 2, junk: "partial" });
});

test("one unfinished run per (fsm, resourceId): a second start joins it, enforced by SQLite", LIMIT, async (t) => {
  const h = harness(t);
  const gate = deferred();
  let calls = 0;
  const build = (name: string) =>
    h.engine
      .register<{ v: number }, {}>(name)
      .start("work", async (ctx) => {
        calls++;
        await Promise.race([gate.promise, aborted(ctx.signal)]);
      })
      .end();
  const pull = build("pull");
  const other = build("other");
  await h.engine.resumeAll();

  const first = pull.start("img", { v: 1 }, {});
  const second = pull.start("img", { v: 2 }, {});
  assert.equal(second.joined, true);
  assert.equal(second.runId, first.runId);
  assert.equal(pull.get(first.runId)!.request.v, 1, "the joined run keeps its own request");
  const otherId = pull.start("img-2", { v: 3 }, {});
  const otherFsm = other.start("img", { v: 4 }, {});
  assert.equal(otherId.joined, false);
  assert.equal(otherFsm.joined, false, "the same resourceId in another FSM is independent");

  // The partial UNIQUE index refuses a second running row even when memory is bypassed.
  assert.throws(
    () =>
      h.db
        .prepare(
          `INSERT INTO fsm_runs (id, fsm, resource_id, status, steps, step_index, request, state, started_at, updated_at)
           VALUES ('X', 'pull', 'img', 'running', '["work"]', 0, '{}', '{}', 'now', 'now')`,
        )
        .run(),
    /UNIQUE constraint failed/,
  );

  gate.resolve();
  await Promise.all([pull.wait(first.runId), pull.wait(otherId.runId), other.wait(otherFsm.runId)]);
  assert.equal(calls, 3);
  const again = pull.start("img", { v: 5 }, {});
  assert.equal(again.joined, false, "after it finished, a new run starts");
  assert.notEqual(again.runId, first.runId);
  await pull.wait(again.runId);
});

test("transient errors retry with exponential backoff, then succeed", LIMIT, async (t) => {
  const h = harness(t, { retry: { ...FAST, maxAttempts: 5, baseDelayMs: 20, maxDelayMs: 1000 } });
  const attempts: number[] = [];
  const fsm = h.engine
    .register<{}, {}>("flaky")
    .start("fetch", async (ctx) => {
      attempts.push(ctx.attempt);
      if (ctx.attempt < 2) throw new Error(`connection reset ${ctx.attempt}`);
    })
    .end();
  await h.engine.resumeAll();
  const started = performance.now();
  const { runId } = fsm.start("r", {}, {});
  const retries: RunEvent[] = [];
  fsm.subscribe(runId, (e) => e.type === "retry" && retries.push(e));
  const run = await fsm.wait(runId);
  const elapsed = performance.now() - started;

  assert.equal(run.status, "succeeded");
  assert.deepEqual(attempts, [0, 1, 2]);
  assert.equal(run.attempts, 0, "a successful step resets the attempt count");
  assert.deepEqual(retries, [
    { type: "retry", step: "fetch", attempt: 0, error: "connection reset 0", delayMs: 20 },
    { type: "retry", step: "fetch", attempt: 1, error: "connection reset 1", delayMs: 40 },
  ]);
  assert.ok(elapsed >= 55, `backoff slept (${elapsed.toFixed(1)} ms)`);
  const errors = fsm.history(runId).filter((e) => e.type === "error");
  assert.deepEqual(
    errors.map((e) => [e.attempt, e.error, e.delayMs]),
    [
      [0, "connection reset 0", 20],
      [1, "connection reset 1", 40],
    ],
  );
});

test("retries stop at maxAttempts (per-step override) and the run fails with the last error", LIMIT, async (t) => {
  const h = harness(t, { retry: { ...FAST, maxAttempts: 4 } });
  let global = 0;
  let perStep = 0;
  let after = 0;
  const fsm = h.engine
    .register<{}, {}>("capped")
    .start("global-policy", async () => {
      global++;
      if (global <= 3) throw new Error("not yet"); // 4th attempt (the last allowed) succeeds
    })
    .to(
      "step-policy",
      async (ctx) => {
        perStep++;
        throw new Error(`boom ${ctx.attempt}`);
      },
      { retry: { maxAttempts: 2 } },
    )
    .to("never", async () => {
      after++;
    })
    .end();
  await h.engine.resumeAll();
  const { runId } = fsm.start("r", {}, {});
  const run = await fsm.wait(runId);
  assert.equal(global, 4);
  assert.equal(perStep, 2);
  assert.equal(after, 0);
  assert.equal(run.status, "failed");
  assert.equal(run.step, "step-policy");
  assert.equal(run.error, "boom 1");
  assert.equal(run.attempts, 2);
  // No backoff is scheduled after the last allowed attempt.
  const errors = fsm.history(runId).filter((e) => e.type === "error" && e.step === "step-policy");
  assert.deepEqual(errors.map((e) => [e.attempt, e.error, e.delayMs]), [
    [0, "boom 0", 1],
    [1, "boom 1", undefined],
  ]);
  assert.equal(fsm.history(runId).at(-1)!.type, "finish");
});

test("abort() fails the run at once, without retry", LIMIT, async (t) => {
  const h = harness(t);
  let calls = 0;
  let after = 0;
  const fsm = h.engine
    .register<{}, {}>("aborting")
    .start("validate", async () => {
      calls++;
      throw abort("layer 2 is not a valid tar", new Error("unexpected EOF"));
    })
    .to("never", async () => {
      after++;
    })
    .end();
  await h.engine.resumeAll();
  const run = await fsm.wait(fsm.start("r", {}, {}).runId);
  assert.equal(calls, 1);
  assert.equal(after, 0);
  assert.equal(run.status, "failed");
  assert.equal(run.error, "layer 2 is not a valid tar: unexpected EOF");
  assert.equal(run.attempts, 1);
});

test("finalizers run in order with the final, already durable record, also when the run fails", LIMIT, async (t) => {
  const h = harness(t);
  const calls: string[] = [];
  const fsm = h.engine
    .register<{ fail: boolean }, { did: string }>("final")
    .start("work", async (ctx) => {
      ctx.state.did = "work";
      if (ctx.request.fail) throw abort("nope");
    })
    .end({
      finalizers: [
        (run) => {
          const durable = fsm.get(run.id)!;
          assert.equal(durable.status, run.status, "status is written before finalizers run");
          calls.push(`first:${run.resourceId}:${run.status}:${run.error ?? ""}:${run.state.did ?? ""}`);
          throw new Error("a failing finalizer does not stop the next one");
        },
        async (run) => {
          await new Promise((r) => setTimeout(r, 5));
          calls.push(`second:${run.resourceId}`);
        },
      ],
    });
  await h.engine.resumeAll();
  const ok = await fsm.wait(fsm.start("ok", { fail: false }, { did: "" }).runId);
  assert.deepEqual(calls, ["first:ok:succeeded::work", "second:ok"], "wait() resolves after finalizers");
  const bad = await fsm.wait(fsm.start("bad", { fail: true }, { did: "" }).runId);
  assert.equal(ok.status, "succeeded");
  assert.equal(bad.status, "failed");
  assert.deepEqual(calls.slice(2), ["first:bad:failed:nope:", "second:bad"]);
  assert.ok(h.logs.some((l) => l.level === "error" && l.msg === "finalizer failed"));
  const finalized = h.db.prepare("SELECT count(*) FROM fsm_runs WHERE finalized_at IS NOT NULL").pluck().get();
  assert.equal(finalized, 2);
});

test("wait() after a restart returns the durable failed outcome; unknown run ids reject", LIMIT, async (t) => {
  const h = harness(t);
  const define = (engine: FsmEngine) =>
    engine
      .register<{}, { x: number }>("doomed")
      .start("s", async (ctx) => {
        ctx.state.x = 1;
        throw abort("permanently broken");
      })
      .end();
  let fsm = define(h.engine);
  await h.engine.resumeAll();
  const { runId } = fsm.start("r", {}, { x: 0 });
  await fsm.wait(runId);

  await h.restart();
  fsm = define(h.engine);
  await h.engine.resumeAll();
  const run = await fsm.wait(runId);
  assert.equal(run.status, "failed");
  assert.equal(run.error, "permanently broken");
  assert.deepEqual(run.state, { x: 0 }, "the failed step's changes were never checkpointed");
  assert.deepEqual(fsm.list({ status: "failed" }).map((r) => r.id), [runId]);
  await assert.rejects(fsm.wait("01ARZ3NDEKTSV4RRFFQ69G5FAV"), /unknown run/);
  await assert.rejects(fsm.wait(""), /unknown run/);
  assert.throws(() => fsm.subscribe("nope", () => {}), /unknown run/);

  // Subscribing to a finished run delivers its outcome once.
  const events: RunEvent[] = [];
  fsm.subscribe(runId, (e) => events.push(e));
  await new Promise((r) => setImmediate(r));
  assert.equal(events.length, 1);
  assert.equal(events[0]!.type, "finished");
});

test("queue(name) bounds concurrency across runs; unknown names get the default limit", LIMIT, async (t) => {
  const h = harness(t, { queues: { download: 2 } });
  let active = 0;
  let peak = 0;
  const fsm = h.engine
    .register<{}, {}>("dl")
    .start("download", async (ctx) => {
      await using _slot = await h.engine.queue("download").acquire(ctx.signal);
      active++;
      peak = Math.max(peak, active);
      await new Promise((r) => setTimeout(r, 10));
      active--;
    })
    .end();
  await h.engine.resumeAll();
  const ids = ["a", "b", "c", "d", "e", "f"].map((id) => fsm.start(id, {}, {}).runId);
  const runs = await Promise.all(ids.map((id) => fsm.wait(id)));
  assert.ok(runs.every((r) => r.status === "succeeded"));
  assert.equal(peak, 2);
  assert.equal(h.engine.queue("download").inUse, 0);

  // Unknown queue names get the default limit (2) and a warning.
  assert.equal(h.engine.queue("other").limit, 2);
  assert.ok(h.logs.some((l) => l.level === "warn" && l.fields?.queue === "other"));
});

test("shutdown aborts steps without recording failures; the run resumes from that step", LIMIT, async (t) => {
  const h = harness(t);
  const inStep = deferred();
  const calls: { step: string; resumed: boolean; attempt: number; state: unknown }[] = [];
  const define = (engine: FsmEngine, onLong: (signal: AbortSignal) => Promise<void>) =>
    engine
      .register<{}, { a?: boolean; b?: boolean }>("long")
      .start("a", async (ctx) => {
        calls.push({ step: ctx.step, resumed: ctx.resumed, attempt: ctx.attempt, state: structuredClone(ctx.state) });
        ctx.state.a = true;
      })
      .to("b", async (ctx) => {
        calls.push({ step: ctx.step, resumed: ctx.resumed, attempt: ctx.attempt, state: structuredClone(ctx.state) });
        await onLong(ctx.signal);
        ctx.state.b = true;
      })
      .end();
  let fsm = define(h.engine, (signal) => {
    inStep.resolve();
    return aborted(signal);
  });
  await h.engine.resumeAll();
  const { runId } = fsm.start("r", {}, {});
  const pending = fsm.wait(runId);
  await inStep.promise;
  await h.engine.shutdown();
  await assert.rejects(pending, /shut down/);
  assert.throws(() => fsm.start("r2", {}, {}), /shut down/);

  const saved = fsm.get(runId)!;
  assert.equal(saved.status, "running");
  assert.equal(saved.step, "b");
  assert.equal(saved.attempts, 0, "a shutdown is not a failed attempt");
  assert.deepEqual(saved.state, { a: true });
  assert.ok(!fsm.history(runId).some((e) => e.type === "error"));

  await h.restart();
  fsm = define(h.engine, async () => {});
  await h.engine.resumeAll();
  const run = await fsm.wait(runId);
  assert.equal(run.status, "succeeded");
  assert.deepEqual(run.state, { a: true, b: true });
  assert.deepEqual(calls, [
    { step: "a", resumed: false, attempt: 0, state: {} },
    { step: "b", resumed: false, attempt: 0, state: { a: true } },
    { step: "b", resumed: true, attempt: 0, state: { a: true } },
  ]);
  assert.deepEqual(
    fsm.history(runId).map((e) => `${e.type}:${e.step}`),
    ["start:a", "step:a", "interrupted:b", "resume:b", "step:b", "finish:b"],
  );
  assert.equal(run.interruptions, 1, "the stop interrupted step b once");
});

test("a step waiting on another FSM's run does not deadlock shutdown, and both resume", LIMIT, async (t) => {
  const h = harness(t);
  const innerStarted = deferred();
  const joins: boolean[] = [];
  const define = (engine: FsmEngine, hold: boolean) => {
    const inner = engine
      .register<{}, { done?: boolean }>("inner")
      .start("work", async (ctx) => {
        if (hold) {
          innerStarted.resolve();
          await aborted(ctx.signal);
        }
        ctx.state.done = true;
      })
      .end();
    const outer = engine
      .register<{}, { innerOutcome?: string }>("outer")
      .start("needs-inner", async (ctx) => {
        const { runId, joined } = inner.start(ctx.resourceId, {}, {});
        joins.push(joined);
        ctx.state.innerOutcome = (await inner.wait(runId)).status; // deliberately ignores ctx.signal
      })
      .end();
    return { inner, outer };
  };
  let fsms = define(h.engine, true);
  await h.engine.resumeAll();
  const { runId } = fsms.outer.start("img", {}, {});
  await innerStarted.promise;
  await h.engine.shutdown();
  assert.equal(fsms.outer.get(runId)!.status, "running");
  assert.equal(fsms.outer.get(runId)!.attempts, 0);

  await h.restart();
  fsms = define(h.engine, false);
  await h.engine.resumeAll();
  const run = await fsms.outer.wait(runId);
  assert.equal(run.status, "succeeded");
  assert.deepEqual(run.state, { innerOutcome: "succeeded" });
  assert.deepEqual(joins, [false, true], "after the restart the step joined the resumed inner run");
});

test("shutdown during a retry backoff leaves the run resumable with its attempt count", LIMIT, async (t) => {
  const h = harness(t, { retry: { ...FAST, baseDelayMs: 60_000, maxDelayMs: 60_000 } });
  const failed = deferred();
  const define = (engine: FsmEngine, fail: boolean) =>
    engine
      .register<{}, {}>("backoff")
      .start("s", async (ctx) => {
        if (fail) {
          setImmediate(() => failed.resolve());
          throw new Error(`transient ${ctx.attempt}`);
        }
        assert.equal(ctx.attempt, 1);
      })
      .end();
  let fsm = define(h.engine, true);
  await h.engine.resumeAll();
  const { runId } = fsm.start("r", {}, {});
  await failed.promise;
  const started = performance.now();
  await h.engine.shutdown();
  assert.ok(performance.now() - started < 1000, "shutdown does not wait for the backoff");
  assert.equal(fsm.get(runId)!.attempts, 1);
  assert.equal(fsm.get(runId)!.error, "transient 0", "a running run shows its last attempt's error");

  await h.restart();
  fsm = define(h.engine, false);
  await h.engine.resumeAll();
  const run = await fsm.wait(runId);
  assert.equal(run.status, "succeeded");
  assert.equal(run.error, undefined);
});

test("resumeAll fails runs of unregistered FSMs and runs whose remaining steps were removed", LIMIT, async (t) => {
  const h = harness(t);
  const old = h.engine
    .register<{}, {}>("old")
    .start("one", async (ctx) => {
      await aborted(ctx.signal);
    })
    .end();
  const changing = h.engine
    .register<{}, {}>("changing")
    .start("keep", async (ctx) => {
      await aborted(ctx.signal);
    })
    .to("removed", async () => assert.fail("never reached"))
    .end();
  await h.engine.resumeAll();
  const oldRun = old.start("x", {}, {}).runId;
  const changingRun = changing.start("x", {}, {}).runId;
  await new Promise((r) => setTimeout(r, 5));

  await h.restart();
  // "old" is not registered anymore; "changing" lost its second step.
  const next = h.engine
    .register<{}, {}>("changing")
    .start("keep", async () => {})
    .to("renamed", async () => {})
    .end();
  await h.engine.resumeAll();
  const run = await next.wait(changingRun);
  assert.equal(run.status, "failed");
  assert.match(run.error!, /step\(s\) "removed" of FSM "changing" no longer exist/);

  const orphan = h.db.prepare("SELECT status, error FROM fsm_runs WHERE id = ?").get(oldRun) as { status: string; error: string };
  assert.equal(orphan.status, "failed");
  assert.match(orphan.error, /FSM "old" is not registered/);
});

test("a run saved by an earlier version resumes on the step that replaced its steps (StepOptions.replaces)", LIMIT, async (t) => {
  const h = harness(t);
  const saved = new Map<string, string[]>(); // resource -> steps it ran, in order
  const ran = (ctx: { resourceId: string; step: string }) => saved.set(ctx.resourceId, [...(saved.get(ctx.resourceId) ?? []), ctx.step]);
  const v1 = h.engine
    .register<{ stopAt: string }, { trail: string[] }>("pull-like")
    .start("list", async (ctx) => void (ran(ctx), ctx.state.trail.push("list")))
    .to("download", async (ctx) => {
      ran(ctx);
      if (ctx.request.stopAt === "download") await aborted(ctx.signal);
      ctx.state.trail.push("download");
    })
    .to("unpack", async (ctx) => {
      ran(ctx);
      if (ctx.request.stopAt === "unpack") await aborted(ctx.signal);
    })
    .to("finish", async (ctx) => void ran(ctx))
    .end();
  await h.engine.resumeAll();
  const atDownload = v1.start("a", { stopAt: "download" }, { trail: [] }).runId;
  const atUnpack = v1.start("b", { stopAt: "unpack" }, { trail: [] }).runId;
  await new Promise((r) => setTimeout(r, 20));

  // The upgrade: download and unpack merged into one step.
  await h.restart();
  saved.clear();
  const v2 = h.engine
    .register<{ stopAt: string }, { trail: string[] }>("pull-like")
    .start("list", async (ctx) => void ran(ctx))
    .to("layers", async (ctx) => void ran(ctx), { replaces: ["download", "unpack"] })
    .to("finish", async (ctx) => void ran(ctx))
    .end();
  await h.engine.resumeAll();
  for (const [id, resource, trail] of [[atDownload, "a", ["list"]], [atUnpack, "b", ["list", "download"]]] as const) {
    const run = await v2.wait(id);
    assert.equal(run.status, "succeeded", `${resource}: ${run.error}`);
    assert.deepEqual(saved.get(resource), ["layers", "finish"], `${resource} resumed at the merged step, once`);
    assert.deepEqual(run.state.trail, trail, "the checkpoint is kept");
    assert.equal(run.interruptions, 1, "the stop mid-step is still counted as an interruption");
  }
});

test("replaces is refused for a step name that exists or is replaced twice", LIMIT, (t) => {
  const h = harness(t);
  assert.throws(() => h.engine.register("a").start("one", async () => {}).to("two", async () => {}, { replaces: ["one"] }), /replaced twice/);
  assert.throws(() => h.engine.register("b").start("one", async () => {}, { replaces: ["x"] }).to("two", async () => {}, { replaces: ["x"] }), /replaced twice/);
  assert.throws(() => h.engine.register("c").start("one", async () => {}, { replaces: ["two"] }).to("two", async () => {}).end(), /both exists and is replaced/);
});

test("list() filters by resource and status, newest first, with a limit", LIMIT, async (t) => {
  const h = harness(t);
  const fsm = h.engine
    .register<{ fail: boolean }, {}>("listed")
    .start("s", async (ctx) => {
      if (ctx.request.fail) throw abort("no");
    })
    .end();
  await h.engine.resumeAll();
  const ids: string[] = [];
  for (const [resource, fail] of [["a", false], ["b", true], ["a", true], ["c", false]] as const) {
    const { runId } = fsm.start(resource, { fail }, {});
    ids.push(runId);
    await fsm.wait(runId);
  }
  assert.deepEqual(fsm.list().map((r) => r.id), [...ids].reverse());
  assert.deepEqual(fsm.list({ resourceId: "a" }).map((r) => r.id), [ids[2], ids[0]]);
  assert.deepEqual(fsm.list({ status: "failed" }).map((r) => r.id), [ids[2], ids[1]]);
  assert.deepEqual(fsm.list({ limit: 1 }).map((r) => r.id), [ids[3]]);
  assert.throws(() => fsm.list({ limit: -1 }), /limit/);
  assert.equal(h.engine.prune(new Date(Date.now() + 1000)), 4);
  assert.deepEqual(fsm.list(), []);
});

test("registration rules: unique names, start/to/end order, nothing after resumeAll", LIMIT, async (t) => {
  const h = harness(t);
  const noop = async () => {};
  h.engine.register("a").start("x", noop).end();
  assert.throws(() => h.engine.register("a"), /already registered/);
  assert.throws(() => h.engine.register("b").to("x", noop), /call start\(\) first/);
  assert.throws(() => h.engine.register("c").start("x", noop).start("y", noop), /start\(\) must be called once/);
  assert.throws(() => h.engine.register("d").start("x", noop).to("x", noop), /duplicate step name/);
  assert.throws(() => h.engine.register("e").start("x", noop, { retry: { maxAttempts: 0 } }), /maxAttempts/);
  const late = h.engine.register("f").start("x", noop);
  await h.engine.resumeAll();
  assert.throws(() => late.end(), /after resumeAll/);
  assert.throws(() => h.engine.register("g"), /before resumeAll/);
  await assert.rejects(h.engine.resumeAll(), /only once/);
});

test("a state that cannot be saved as JSON fails the run with a clear error", LIMIT, async (t) => {
  const h = harness(t);
  const fsm = h.engine
    .register<{}, { big?: bigint }>("json")
    .start("s", async (ctx) => {
      ctx.state.big = 1n;
    })
    .end();
  await h.engine.resumeAll();
  assert.throws(() => fsm.start("bad", { n: 1n } as {}, {}), /request cannot be saved as JSON/);
  const run = await fsm.wait(fsm.start("r", {}, {}).runId);
  assert.equal(run.status, "failed");
  assert.match(run.error!, /step "s" left a state that cannot be saved as JSON/);
});

test("a stop (SIGTERM) interrupts a working step: recorded as an interruption, never as a failed attempt, also past the stop timeout", LIMIT, async (t) => {
  const h = harness(t);
  const inStep = deferred();
  let release!: () => void;
  const stuck = new Promise<void>((r) => (release = r));
  const fsm = h.engine
    .register<{}, {}>("stubborn")
    .start("work", async () => {
      inStep.resolve();
      await stuck; // ignores its signal: outlives the stop timeout
      throw new Error("failed only because it was stopped");
    })
    .end();
  await h.engine.resumeAll();
  const { runId } = fsm.start("r", {}, {});
  await inStep.promise;
  await h.engine.shutdown(30);
  release();
  await new Promise((r) => setTimeout(r, 20));

  const saved = fsm.get(runId)!;
  assert.equal(saved.status, "running");
  assert.equal(saved.attempts, 0, "not a failed attempt");
  assert.equal(saved.interruptions, 1);
  assert.ok(saved.lastInterruptedAt, "when it was interrupted");
  assert.equal(saved.error, undefined, "the run's last real error is untouched");
  const events = fsm.history(runId).map((e) => e.type);
  assert.deepEqual(events, ["start", "interrupted"]);
  assert.match(fsm.history(runId)[1]!.error!, /stopped \(SIGTERM\)/);
  // Not a crash: the next start does not count it again, nor as a quick (poison) interruption.
  const row = h.db.prepare("SELECT in_attempt, quick_interruptions FROM fsm_runs WHERE id = ?").get(runId) as { in_attempt: number; quick_interruptions: number };
  assert.deepEqual({ ...row }, { in_attempt: 0, quick_interruptions: 0 });
});

test("waiting costs nothing: a run waiting for a queue slot or a lock is WAITING, and a stop charges it nothing", LIMIT, async (t) => {
  const h = harness(t, { queues: { apply: 1, download: 3 } });
  const holding = deferred();
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const ran: string[] = [];
  const define = (engine: FsmEngine, hold: boolean) =>
    engine
      .register<{ lock: string }, {}>("apply")
      .start("apply", async (ctx) => {
        // A slot of "download" first, then a lock: a waiter holding a slot while it waits for
        // the lock is still only waiting.
        await ctx.withQueue("download", () =>
          ctx.withLock(ctx.request.lock, () =>
            ctx.withQueue("apply", async () => {
              ran.push(ctx.resourceId);
              if (hold && ctx.resourceId === "holder") {
                holding.resolve();
                await Promise.race([gate, aborted(ctx.signal)]);
              }
            }),
          ),
        );
      })
      .end();
  let fsm = define(h.engine, true);
  await h.engine.resumeAll();
  const holder = fsm.start("holder", { lock: "chain 1" }, {}).runId;
  await holding.promise;
  const slotWaiter = fsm.start("slot-waiter", { lock: "chain 2" }, {}).runId;
  const lockWaiter = fsm.start("lock-waiter", { lock: "chain 1" }, {}).runId;
  await new Promise((r) => setTimeout(r, 20));

  const inAttempt = (id: string) => (h.db.prepare("SELECT in_attempt FROM fsm_runs WHERE id = ?").get(id) as { in_attempt: number }).in_attempt;
  assert.equal(inAttempt(holder), 1, "the holder works");
  assert.equal(inAttempt(slotWaiter), 0);
  assert.equal(inAttempt(lockWaiter), 0);
  assert.equal(fsm.get(slotWaiter)!.waitingFor, "queue apply");
  assert.equal(fsm.get(lockWaiter)!.waitingFor, "lock chain 1");
  assert.equal(fsm.get(holder)!.waitingFor, undefined);

  await h.engine.shutdown();
  for (const id of [slotWaiter, lockWaiter]) {
    const run = fsm.get(id)!;
    assert.deepEqual([run.attempts, run.interruptions], [0, 0], `${id} was only waiting`);
    assert.ok(!fsm.history(id).some((e) => e.type === "interrupted" || e.type === "error"));
  }
  assert.equal(fsm.get(holder)!.interruptions, 1);
  release();

  await h.restart();
  fsm = define(h.engine, false);
  await h.engine.resumeAll();
  const runs = await Promise.all([holder, slotWaiter, lockWaiter].map((id) => fsm.wait(id)));
  assert.deepEqual(runs.map((r) => [r.status, r.attempts, r.interruptions]), [["succeeded", 0, 1], ["succeeded", 0, 0], ["succeeded", 0, 0]]);
  assert.equal(h.engine.queue("apply").inUse, 0);
});

test("waitFor(another run) is waiting, not work", LIMIT, async (t) => {
  const h = harness(t);
  const other = deferred();
  const fsm = h.engine
    .register<{}, {}>("joiner")
    .start("join", async (ctx) => {
      await ctx.waitFor("pull of golang", () => other.promise);
    })
    .end();
  await h.engine.resumeAll();
  const { runId } = fsm.start("j", {}, {});
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(fsm.get(runId)!.waitingFor, "pull of golang");
  other.resolve();
  const run = await fsm.wait(runId);
  assert.equal(run.status, "succeeded");
  assert.equal(run.waitingFor, undefined);
});

test("interrupted() from a step (e.g. lost helper connection) re-runs it without spending attempts, even 6 times", LIMIT, async (t) => {
  const h = harness(t);
  let calls = 0;
  const fsm = h.engine
    .register<{}, {}>("flaky-helper")
    .start("unpack", async () => {
      calls++;
      if (calls <= 6) throw interrupted("the helper's connection dropped during layer.apply");
    })
    .end();
  await h.engine.resumeAll();
  const run = await fsm.wait(fsm.start("x", {}, {}).runId);
  assert.equal(run.status, "succeeded", run.error);
  assert.equal(calls, 7);
  assert.equal(run.attempts, 0);
  assert.equal(run.interruptions, 6);
  assert.equal(fsm.history(run.id).filter((e) => e.type === "interrupted").length, 6);
});

test("a database from before interruptions were tracked is migrated; its run resumes", LIMIT, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "imgd-fsm-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, "imgd.db");
  const old = openDatabase(path);
  migrate(old, "fsm", FSM_MIGRATIONS.slice(0, 1));
  old.prepare(
    `INSERT INTO fsm_runs (id, fsm, resource_id, status, steps, step_index, request, state, attempt, in_attempt, started_at, updated_at)
     VALUES ('01OLD', 'legacy', 'r', 'running', '["s"]', 0, '{}', '{}', 1, 1, '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')`,
  ).run();
  old.prepare(`INSERT INTO fsm_events (run_id, type, step, at) VALUES ('01OLD', 'start', 's', '2026-01-01T00:00:00.000Z')`).run();
  old.close();

  const db = openDatabase(path);
  const engine = new FsmEngine(db, { retry: FAST, log: () => {} });
  t.after(async () => {
    await engine.shutdown();
    db.close();
  });
  const fsm = engine.register<{}, {}>("legacy").start("s", async () => {}).end();
  await engine.resumeAll();
  const run = await fsm.wait("01OLD");
  assert.equal(run.status, "succeeded");
  assert.equal(run.interruptions, 1, "the old in-attempt flag became an interruption");
  assert.deepEqual(fsm.history("01OLD").map((e) => e.type), ["start", "resume", "interrupted", "step", "finish"]);
});
