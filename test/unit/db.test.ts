import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { migrate, openDatabase } from "../../agent/db.ts";

function tempDir(t: { after: (fn: () => void) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), "imgd-db-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test("openDatabase sets WAL, synchronous=FULL, foreign keys and a busy timeout", (t) => {
  const path = join(tempDir(t), "nested", "imgd.db");
  const db = openDatabase(path);
  t.after(() => db.close());
  assert.equal(db.pragma("journal_mode", { simple: true }), "wal");
  assert.equal(db.pragma("synchronous", { simple: true }), 2); // 2 = FULL
  assert.equal(db.pragma("foreign_keys", { simple: true }), 1);
  assert.equal(db.pragma("busy_timeout", { simple: true }), 5000);
});

test("migrate applies missing versions once, per component", (t) => {
  const path = join(tempDir(t), "imgd.db");
  const a = ["CREATE TABLE a1 (x INTEGER)", "CREATE TABLE a2 (y INTEGER)"];
  const b = ["CREATE TABLE b1 (z INTEGER)"];
  let db = openDatabase(path);
  assert.equal(migrate(db, "alpha", a.slice(0, 1)), 1);
  assert.equal(migrate(db, "beta", b), 1);
  assert.equal(migrate(db, "alpha", a.slice(0, 1)), 0);
  db.close();

  // A later agent version appends a migration: only that one runs.
  db = openDatabase(path);
  t.after(() => db.close());
  assert.equal(migrate(db, "alpha", a), 1);
  assert.equal(migrate(db, "alpha", a), 0);
  const rows = db
    .prepare("SELECT component, version FROM schema_migrations ORDER BY component, version")
    .all();
  assert.deepEqual(rows, [
    { component: "alpha", version: 1 },
    { component: "alpha", version: 2 },
    { component: "beta", version: 1 },
  ]);
  const tables = db
    .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('a1','a2','b1') ORDER BY name")
    .pluck()
    .all();
  assert.deepEqual(tables, ["a1", "a2", "b1"]);
});

test("a failing migration rolls back every version of that batch", (t) => {
  const db = openDatabase(join(tempDir(t), "imgd.db"));
  t.after(() => db.close());
  assert.throws(
    () => migrate(db, "gamma", ["CREATE TABLE g1 (x INTEGER)", "CREATE TABLE broken ("]),
    /syntax error|incomplete input/,
  );
  const g1 = db.prepare("SELECT count(*) FROM sqlite_master WHERE name = 'g1'").pluck().get();
  assert.equal(g1, 0);
  const versions = db.prepare("SELECT count(*) FROM schema_migrations WHERE component = 'gamma'").pluck().get();
  assert.equal(versions, 0);
});

test("migrate refuses an edited migration and a database newer than the code", (t) => {
  const db = openDatabase(join(tempDir(t), "imgd.db"));
  t.after(() => db.close());
  migrate(db, "delta", ["CREATE TABLE d1 (x INTEGER)", "CREATE TABLE d2 (x INTEGER)"]);
  assert.throws(
    () => migrate(db, "delta", ["CREATE TABLE d1 (x TEXT)", "CREATE TABLE d2 (x INTEGER)"]),
    /migration 1 of "delta" was changed/,
  );
  assert.throws(() => migrate(db, "delta", ["CREATE TABLE d1 (x INTEGER)"]), /newer than this code/);
  assert.throws(() => migrate(db, "Bad Name", []), /invalid component name/);
});
