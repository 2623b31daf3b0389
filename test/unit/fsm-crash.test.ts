// Crash recovery: a child Node process runs FSM steps and kills itself (SIGKILL, or exit 137)
// inside a chosen step; this process then opens the same SQLite file, resumes, and checks that
// each run continues from exactly its own step with its own saved state. A death while a step
// works is an interruption, not a failed attempt; a death while it waits costs nothing; a step
// that keeps killing the process soon after it starts (a poison step) ends its run.
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { once } from "node:events";
import { createInterface } from "node:readline";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { openDatabase, type Database } from "../../agent/db.ts";
import { FsmEngine } from "../../agent/fsm/engine.ts";

const REPO = resolve(import.meta.dirname, "../..");
const RETRY = { maxAttempts: 3, baseDelayMs: 1, maxDelayMs: 2, factor: 2, jitter: 0 };

// The child: same FSM names and step names as the parent, different step bodies.
const CHILD = `
import { appendFileSync, readFileSync } from "node:fs";
import { FsmEngine } from ${JSON.stringify(pathToFileURL(join(REPO, "agent/fsm/engine.ts")).href)};
import { openDatabase } from ${JSON.stringify(pathToFileURL(join(REPO, "agent/db.ts")).href)};

const [scenario, dbPath, marker] = process.argv.slice(2);
const db = openDatabase(dbPath);
const WINDOW = Number(process.env.QUICK_WINDOW_MS ?? 60000);
const engine = new FsmEngine(db, { retry: ${JSON.stringify(RETRY)}, log: () => {}, queues: { apply: 1 }, interruptions: { quickWindowMs: WINDOW } });
const die = () => process.kill(process.pid, "SIGKILL");
const count = (name) => { appendFileSync(marker, name + "\\n"); return readFileSync(marker, "utf8").split("\\n").filter((l) => l === name).length; };
setTimeout(() => process.exit(3), 10_000); // never reached when the crash happens

if (scenario === "two-runs") {
  let bInUnpack;
  const bReady = new Promise((r) => (bInUnpack = r));
  const fsm = engine.register("pipeline")
    .start("download", async (ctx) => { ctx.state.done.push("download"); ctx.state.blob = "blob-" + ctx.request.name; })
    .to("unpack", async (ctx) => {
      if (ctx.resourceId === "b") { bInUnpack(); await new Promise(() => {}); }
      ctx.state.done.push("unpack"); ctx.state.device = "dev-" + ctx.request.name;
    })
    .to("snapshot", async (ctx) => {
      if (ctx.resourceId === "a") { await bReady; die(); }
      ctx.state.done.push("snapshot");
    })
    .end();
  await engine.resumeAll();
  // c finishes completely first: its completed steps must not leak into a or b on resume.
  await fsm.wait(fsm.start("c", { name: "c" }, { done: [] }).runId);
  fsm.start("a", { name: "a" }, { done: [] });
  fsm.start("b", { name: "b" }, { done: [] });
} else if (scenario === "finalizer") {
  const fsm = engine.register("final")
    .start("work", async (ctx) => { ctx.state.worked = true; })
    .end({ finalizers: [
      () => appendFileSync(marker, "first\\n"),
      () => process.exit(137),
    ] });
  await engine.resumeAll();
  fsm.start("f", {}, { worked: false });
} else if (scenario === "crashloop") {
  const fsm = engine.register("loop").start("boom", async () => die()).end();
  await engine.resumeAll();
  if (fsm.list().length === 0) fsm.start("x", {}, {});
} else if (scenario === "mixed") {
  // Each step kills the process on its first 4 executions, then completes.
  const step = (name) => async () => { if (count(name) <= 4) die(); };
  const fsm = engine.register("mixed").start("one", step("one")).to("two", step("two")).end();
  await engine.resumeAll();
  if (fsm.list().length === 0) fsm.start("m", {}, {});
} else if (scenario === "slowkill") {
  const fsm = engine.register("slow").start("work", async () => { await new Promise((r) => setTimeout(r, 150)); die(); }).end();
  await engine.resumeAll();
  if (fsm.list().length === 0) fsm.start("s", {}, {});
} else if (scenario === "waiting") {
  // "holder" holds the only apply slot and works; "waiter" waits for the slot when the kill comes.
  const fsm = engine.register("queue").start("apply", (ctx) => ctx.withQueue("apply", async () => {
    if (ctx.resourceId === "waiter") throw new Error("the waiter must never get the slot in the child");
    setTimeout(die, 100);
    await new Promise(() => {});
  })).end();
  await engine.resumeAll();
  if (fsm.list().length === 0) { fsm.start("holder", {}, {}); fsm.start("waiter", {}, {}); }
} else if (scenario === "sigterm") {
  // A step that ignores its abort signal: it outlives the stop timeout.
  const fsm = engine.register("term").start("work", async () => { count("in-step"); process.stdout.write("in-step\\n"); await new Promise(() => {}); }).end();
  process.once("SIGTERM", async () => { await engine.shutdown(100); process.exit(0); });
  await engine.resumeAll();
  if (fsm.list().length === 0) fsm.start("t", {}, {});
}
`;

// A broken engine should fail a test, not hang the suite.
const LIMIT = { timeout: 60_000 }; // a child takes 0.3-2 s to start on a busy 2-core machine

interface Env {
  dir: string;
  dbPath: string;
  runChild(scenario: string, marker?: string, options?: { env?: Record<string, string> }): void;
  /** Runs the child until it prints "in-step", then stops it with SIGTERM; it must exit 0. */
  stopChild(scenario: string, marker: string): Promise<void>;
  open(): { db: Database; engine: FsmEngine };
}

function env(t: TestContext): Env {
  const dir = mkdtempSync(join(tmpdir(), "imgd-fsm-crash-"));
  const dbPath = join(dir, "imgd.db");
  const script = join(dir, "child.mjs");
  writeFileSync(script, CHILD);
  const opened: { db: Database; engine: FsmEngine }[] = [];
  t.after(async () => {
    for (const o of opened) {
      await o.engine.shutdown();
      o.db.close();
    }
    rmSync(dir, { recursive: true, force: true });
  });
  return {
    dir,
    dbPath,
    runChild(scenario, marker = join(dir, "marker"), options = {}) {
      // process.execPath is the Node 24 running this test.
      const result = spawnSync(process.execPath, [script, scenario, dbPath, marker], { encoding: "utf8", env: { ...process.env, ...options.env }, timeout: 20_000 });
      const died = result.signal === "SIGKILL" || result.status === 137;
      assert.ok(died, `child should have crashed: status=${result.status} signal=${result.signal} stderr=${result.stderr}`);
    },
    async stopChild(scenario, marker) {
      const child = spawn(process.execPath, [script, scenario, dbPath, marker], { stdio: ["ignore", "pipe", "pipe"] });
      let stderr = "";
      child.stderr.on("data", (chunk) => (stderr += chunk));
      const exited = once(child, "exit");
      for await (const line of createInterface({ input: child.stdout })) {
        if (line === "in-step") break;
      }
      child.kill("SIGTERM");
      const [code, signal] = await exited;
      assert.equal(code, 0, `child should have stopped cleanly on SIGTERM: signal=${signal} stderr=${stderr}`);
    },
    open() {
      const db = openDatabase(dbPath);
      const engine = new FsmEngine(db, { retry: RETRY, log: () => {} });
      opened.push({ db, engine });
      return { db, engine };
    },
  };
}

interface PipelineState {
  done: string[];
  blob?: string;
  device?: string;
}

test("two runs killed at different steps each resume at their own step with their own state", LIMIT, async (t) => {
  const e = env(t);
  e.runChild("two-runs");

  const { engine } = e.open();
  const calls: { resourceId: string; step: string; resumed: boolean; attempt: number; state: PipelineState }[] = [];
  const record = (ctx: { resourceId: string; step: string; resumed: boolean; attempt: number; state: PipelineState }) =>
    calls.push({ resourceId: ctx.resourceId, step: ctx.step, resumed: ctx.resumed, attempt: ctx.attempt, state: structuredClone(ctx.state) });
  const fsm = engine
    .register<{ name: string }, PipelineState>("pipeline")
    .start("download", async (ctx) => {
      record(ctx);
      ctx.state.done.push("download");
    })
    .to("unpack", async (ctx) => {
      record(ctx);
      ctx.state.done.push("unpack");
    })
    .to("snapshot", async (ctx) => {
      record(ctx);
      ctx.state.done.push("snapshot");
    })
    .end();

  // Before resuming: SQLite holds each run's own step index and checkpoint.
  const byResource = (id: string) => fsm.list({ resourceId: id })[0]!;
  const [a, b, c] = ["a", "b", "c"].map(byResource) as [ReturnType<typeof byResource>, ReturnType<typeof byResource>, ReturnType<typeof byResource>];
  assert.deepEqual([a.status, a.step, a.stepIndex], ["running", "snapshot", 2]);
  assert.deepEqual(a.state, { done: ["download", "unpack"], blob: "blob-a", device: "dev-a" });
  assert.deepEqual([b.status, b.step, b.stepIndex], ["running", "unpack", 1]);
  assert.deepEqual(b.state, { done: ["download"], blob: "blob-b" });
  assert.equal(c.status, "succeeded");

  await engine.resumeAll();
  const [ra, rb] = await Promise.all([fsm.wait(a.id), fsm.wait(b.id)]);

  calls.sort((x, y) => x.resourceId.localeCompare(y.resourceId) || x.step.localeCompare(y.step));
  assert.deepEqual(calls, [
    // a was killed inside snapshot: an interruption, not a failed attempt.
    { resourceId: "a", step: "snapshot", resumed: true, attempt: 0, state: { done: ["download", "unpack"], blob: "blob-a", device: "dev-a" } },
    // b was inside unpack (never completed it): unpack runs again, then snapshot.
    { resourceId: "b", step: "snapshot", resumed: true, attempt: 0, state: { done: ["download", "unpack"], blob: "blob-b" } },
    { resourceId: "b", step: "unpack", resumed: true, attempt: 0, state: { done: ["download"], blob: "blob-b" } },
  ]);
  assert.equal(ra.status, "succeeded");
  assert.deepEqual(ra.state.done, ["download", "unpack", "snapshot"]);
  assert.equal(rb.status, "succeeded");
  assert.deepEqual(rb.state, { done: ["download", "unpack", "snapshot"], blob: "blob-b" });
  assert.equal(fsm.get(c.id)!.status, "succeeded", "the finished run was not touched");

  const history = fsm.history(a.id).map((ev) => `${ev.type}:${ev.step}`);
  assert.deepEqual(history, [
    "start:download",
    "step:download",
    "step:unpack",
    "resume:snapshot",
    "interrupted:snapshot",
    "step:snapshot",
    "finish:snapshot",
  ]);
  assert.match(fsm.history(a.id)[4]!.error!, /agent stopped while this step was working/);
  assert.deepEqual([ra.attempts, ra.interruptions, ra.error], [0, 1, undefined]);
});

test("a process killed during finalizers: the outcome is durable and finalizers run again on resume", LIMIT, async (t) => {
  const e = env(t);
  const marker = join(e.dir, "marker");
  e.runChild("finalizer", marker);
  assert.equal(readFileSync(marker, "utf8"), "first\n", "the child got as far as its finalizers");

  const { engine } = e.open();
  let worked = 0;
  const finalized: string[] = [];
  const fsm = engine
    .register<{}, { worked: boolean }>("final")
    .start("work", async () => {
      worked++;
    })
    .end({ finalizers: [(run) => void finalized.push(`${run.status}:${run.state.worked}`)] });
  const [run] = fsm.list();
  assert.equal(run!.status, "succeeded", "the status was durable before finalizers ran");

  await engine.resumeAll();
  const done = await fsm.wait(run!.id);
  assert.equal(done.status, "succeeded");
  assert.equal(worked, 0, "steps are not re-run");
  assert.deepEqual(finalized, ["succeeded:true"]);
});

test("a poison step (kills the process every time, soon after it starts) ends its run FAILED after 5 interruptions; the engine stays up", LIMIT, async (t) => {
  const e = env(t);
  // The first child starts the run; each later one resumes it (one more quick interruption).
  for (let i = 0; i < 5; i++) e.runChild("crashloop");

  const { engine } = e.open();
  let called = 0;
  const fsm = engine
    .register<{}, {}>("loop")
    .start("boom", async () => {
      called++;
    })
    .end();
  const other = engine.register<{}, {}>("healthy").start("fine", async () => {}).end();
  await engine.resumeAll();
  const [row] = fsm.list();
  const run = await fsm.wait(row!.id);
  assert.equal(called, 0, "the poison step is not run a 6th time");
  assert.equal(run.status, "failed");
  assert.equal(run.attempts, 0, "interruptions are not failed attempts");
  assert.equal(run.interruptions, 5);
  assert.equal(run.error, 'step "boom" was interrupted 5 times within 60s of starting: poison step? (the agent died each time soon after the step began; the run is ended to stop a crash loop)');
  assert.equal(fsm.history(run.id).filter((ev) => ev.type === "resume").length, 5);
  // The engine stays up and serves other runs.
  const ok = await other.wait(other.start("y", {}, {}).runId);
  assert.equal(ok.status, "succeeded");
});

test("a run interrupted 8 times (4 quick kills in each of two steps) still completes: a completed step resets the count", LIMIT, async (t) => {
  const e = env(t);
  const marker = join(e.dir, "marker");
  for (let i = 0; i < 8; i++) e.runChild("mixed", marker);

  const { engine } = e.open();
  const ran: string[] = [];
  const fsm = engine
    .register<{}, {}>("mixed")
    .start("one", async () => void ran.push("one"))
    .to("two", async () => void ran.push("two"))
    .end();
  await engine.resumeAll();
  const run = await fsm.wait(fsm.list()[0]!.id);
  assert.equal(run.status, "succeeded", run.error);
  assert.deepEqual(ran, ["two"], "one completed in a child; two runs again here");
  assert.equal(run.attempts, 0);
  assert.equal(run.interruptions, 8);
  assert.equal(fsm.history(run.id).filter((ev) => ev.type === "error").length, 0, "no failed attempt recorded");
});

test("kills long after the step began are interruptions but not poison: 5 of them (limit 2), and the run completes", LIMIT, async (t) => {
  const e = env(t);
  for (let i = 0; i < 5; i++) e.runChild("slowkill", undefined, { env: { QUICK_WINDOW_MS: "100" } });

  const db = openDatabase(e.dbPath);
  const engine = new FsmEngine(db, { retry: RETRY, log: () => {}, interruptions: { quickWindowMs: 100, maxQuick: 2 } });
  t.after(async () => {
    await engine.shutdown();
    db.close();
  });
  const fsm = engine.register<{}, {}>("slow").start("work", async () => {}).end();
  await engine.resumeAll();
  const run = await fsm.wait(fsm.list()[0]!.id);
  assert.equal(run.status, "succeeded", run.error);
  assert.deepEqual([run.attempts, run.interruptions], [0, 5]);
});

test("a run killed 5 times while it waits for a queue slot is charged nothing", LIMIT, async (t) => {
  const e = env(t);
  // Window 0: the holder's kills are not quick, so it is not ended as a poison step either.
  for (let i = 0; i < 5; i++) e.runChild("waiting", undefined, { env: { QUICK_WINDOW_MS: "0" } });

  const { engine } = e.open();
  const fsm = engine
    .register<{}, {}>("queue")
    .start("apply", (ctx) => ctx.withQueue("apply", async () => {}))
    .end();
  const [holder, waiter] = ["holder", "waiter"].map((id) => fsm.list({ resourceId: id })[0]!);
  assert.equal(waiter!.waitingFor, "queue apply", "the waiter was waiting when killed");
  await engine.resumeAll();
  const [h, w] = await Promise.all([fsm.wait(holder!.id), fsm.wait(waiter!.id)]);
  assert.deepEqual([h.status, h.attempts, h.interruptions], ["succeeded", 0, 5]);
  assert.deepEqual([w.status, w.attempts, w.interruptions], ["succeeded", 0, 0]);
  assert.ok(!fsm.history(w.id).some((ev) => ev.type === "interrupted" || ev.type === "error"));
});

test("SIGTERM during a step records an interruption (the step outlived the stop timeout), never a failed attempt", LIMIT, async (t) => {
  const e = env(t);
  const marker = join(e.dir, "marker");
  for (let i = 0; i < 5; i++) await e.stopChild("sigterm", marker);
  assert.equal(readFileSync(marker, "utf8").split("\n").filter((l) => l === "in-step").length, 5, "each child was in the step when stopped");

  const { engine } = e.open();
  const fsm = engine.register<{}, {}>("term").start("work", async () => {}).end();
  const [row] = fsm.list();
  assert.deepEqual([row!.attempts, row!.interruptions], [0, 5]);
  assert.equal(fsm.history(row!.id).filter((ev) => ev.type === "interrupted").length, 5);
  await engine.resumeAll();
  const run = await fsm.wait(row!.id);
  assert.equal(run.status, "succeeded", "five stops are not a poison step");
});
