// Crash recovery: a child Node process runs FSM steps and kills itself (SIGKILL, or exit 137)
// inside a chosen step; this process then opens the same SQLite file, resumes, and checks that
// each run continues from exactly its own step with its own saved state.
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
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
import { appendFileSync } from "node:fs";
import { FsmEngine } from ${JSON.stringify(pathToFileURL(join(REPO, "agent/fsm/engine.ts")).href)};
import { openDatabase } from ${JSON.stringify(pathToFileURL(join(REPO, "agent/db.ts")).href)};

const [scenario, dbPath, marker] = process.argv.slice(2);
const db = openDatabase(dbPath);
const engine = new FsmEngine(db, { retry: ${JSON.stringify(RETRY)}, log: () => {} });
const die = () => process.kill(process.pid, "SIGKILL");
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
}
`;

// A broken engine should fail a test, not hang the suite.
const LIMIT = { timeout: 15_000 };

interface Env {
  dir: string;
  dbPath: string;
  runChild(scenario: string, marker?: string): void;
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
    runChild(scenario, marker = join(dir, "marker")) {
      // process.execPath is the Node 24 running this test.
      const result = spawnSync(process.execPath, [script, scenario, dbPath, marker], { encoding: "utf8", timeout: 20_000 });
      const died = result.signal === "SIGKILL" || result.status === 137;
      assert.ok(died, `child should have crashed: status=${result.status} signal=${result.signal} stderr=${result.stderr}`);
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
    // a was killed inside snapshot: that attempt counts, so this is attempt 1.
    { resourceId: "a", step: "snapshot", resumed: true, attempt: 1, state: { done: ["download", "unpack"], blob: "blob-a", device: "dev-a" } },
    // b was inside unpack (never completed it): unpack runs again, then snapshot.
    { resourceId: "b", step: "snapshot", resumed: true, attempt: 0, state: { done: ["download", "unpack"], blob: "blob-b" } },
    { resourceId: "b", step: "unpack", resumed: true, attempt: 1, state: { done: ["download"], blob: "blob-b" } },
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
    "error:snapshot",
    "step:snapshot",
    "finish:snapshot",
  ]);
  assert.match(fsm.history(a.id)[4]!.error!, /agent stopped while this attempt was running/);
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

test("a step that kills the process every time fails after maxAttempts restarts instead of looping", LIMIT, async (t) => {
  const e = env(t);
  for (let i = 0; i < RETRY.maxAttempts; i++) e.runChild("crashloop");

  const { engine } = e.open();
  let called = 0;
  const fsm = engine
    .register<{}, {}>("loop")
    .start("boom", async () => {
      called++;
    })
    .end();
  await engine.resumeAll();
  const [row] = fsm.list();
  const run = await fsm.wait(row!.id);
  assert.equal(called, 0);
  assert.equal(run.status, "failed");
  assert.equal(run.attempts, RETRY.maxAttempts);
  assert.match(run.error!, /agent stopped while this attempt was running/);
  assert.equal(fsm.history(run.id).filter((ev) => ev.type === "resume").length, RETRY.maxAttempts);
});
