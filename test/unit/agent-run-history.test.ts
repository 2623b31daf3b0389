// Run history is bounded (issue 10): finished runs beyond IMGD_RUN_HISTORY_MAX, or older than
// IMGD_RUN_HISTORY_DAYS, are deleted with their events; running and unfinalized runs never are.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadAgentConfig } from "../../agent/config.ts";
import { openDatabase } from "../../agent/db.ts";
import { FsmEngine, abort } from "../../agent/fsm/engine.ts";
import { pruneRunHistory, startRunHistoryPruning } from "../../agent/run-history.ts";

test("finished runs beyond the count and the age are pruned with their events; a running run is kept", async () => {
  const db = openDatabase(join(mkdtempSync(join(tmpdir(), "imgd-history-")), "imgd.db"));
  const engine = new FsmEngine(db, { retry: { maxAttempts: 1, baseDelayMs: 1, maxDelayMs: 1 } });
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const fsm = engine
    .register<{ fail?: boolean; hold?: boolean }, Record<string, never>>("job")
    .start("work", async (ctx) => {
      if (ctx.request.hold) await gate;
      if (ctx.request.fail) throw abort("failed on purpose");
    })
    .end();
  await engine.resumeAll();
  const ids: string[] = [];
  for (let i = 0; i < 6; i++) {
    const { runId } = fsm.start(`r${i}`, { fail: i % 2 === 1 }, {});
    await fsm.wait(runId);
    ids.push(runId);
  }
  const held = fsm.start("held", { hold: true }, {});
  const count = (sql: string) => (db.prepare(sql).get() as { n: number }).n;
  assert.equal(count("SELECT count(*) AS n FROM fsm_runs"), 7);

  const logs: string[] = [];
  assert.equal(pruneRunHistory(engine, { maxRuns: 4, maxAgeDays: 30 }, (_l, msg) => void logs.push(msg)), 2);
  assert.deepEqual(fsm.list({}).map((r) => r.id).sort(), [...ids.slice(2), held.runId].sort(), "the two oldest finished runs went");
  assert.equal(count(`SELECT count(*) AS n FROM fsm_events WHERE run_id IN ('${ids[0]}', '${ids[1]}')`), 0, "their events too");
  assert.deepEqual(logs, ["pruned run history"]);

  // Age: a run finished 31 days ago goes even within the count.
  db.prepare("UPDATE fsm_runs SET finished_at = ? WHERE id = ?").run(new Date(Date.now() - 31 * 86_400_000).toISOString(), ids[2]);
  const stop = startRunHistoryPruning(engine, { maxRuns: 100, maxAgeDays: 30 }, () => {});
  stop();
  assert.equal(fsm.get(ids[2]!), undefined, "pruned at start");
  assert.equal(pruneRunHistory(engine, { maxRuns: 1, maxAgeDays: 30 }, () => {}), 2);
  assert.deepEqual(fsm.list({}).map((r) => r.id).sort(), [ids[5], held.runId].sort(), "the running run is never pruned");
  release();
  await fsm.wait(held.runId);
  await engine.shutdown();
  db.close();
});

test("IMGD_RUN_HISTORY_MAX and IMGD_RUN_HISTORY_DAYS: defaults 1000 and 30, bad values refused", () => {
  const c = loadAgentConfig([], {});
  assert.deepEqual([c.runHistoryMax, c.runHistoryDays], [1000, 30]);
  assert.deepEqual(
    (({ runHistoryMax, runHistoryDays }) => [runHistoryMax, runHistoryDays])(loadAgentConfig([], { IMGD_RUN_HISTORY_MAX: "50000", IMGD_RUN_HISTORY_DAYS: "7" })),
    [50000, 7],
  );
  assert.throws(() => loadAgentConfig([], { IMGD_RUN_HISTORY_MAX: "0" }), /IMGD_RUN_HISTORY_MAX="0": expected an integer from 1/);
  assert.throws(() => loadAgentConfig([], { IMGD_RUN_HISTORY_DAYS: "-1" }), /IMGD_RUN_HISTORY_DAYS/);
});
