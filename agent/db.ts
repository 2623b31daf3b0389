// SQLite access for the agent: one durable database file, opened the same way everywhere,
// plus a per-component schema migration mechanism (the FSM engine and the catalog each own
// their tables and migrate them independently).
import { createHash } from "node:crypto";
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import BetterSqlite3 from "better-sqlite3";

export type Database = BetterSqlite3.Database;

const BUSY_TIMEOUT_MS = 5000;

/**
 * Opens (creating if needed) the database at `path`.
 * WAL lets readers run beside the writer; synchronous=FULL fsyncs every commit so a state
 * change that was reported as committed survives a power loss, which the FSM relies on.
 */
export function openDatabase(path: string): Database {
  if (path !== ":memory:") mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  const db = new BetterSqlite3(path, { timeout: BUSY_TIMEOUT_MS });
  try {
    const mode = db.pragma("journal_mode = WAL", { simple: true });
    if (path !== ":memory:" && String(mode).toLowerCase() !== "wal") {
      throw new Error(`database ${path}: could not enable WAL journal mode (got ${String(mode)})`);
    }
    db.pragma("synchronous = FULL");
    db.pragma("foreign_keys = ON");
    db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
  } catch (err) {
    db.close();
    throw err;
  }
  return db;
}

const MIGRATIONS_TABLE = `
  CREATE TABLE IF NOT EXISTS schema_migrations (
    component  TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    checksum   TEXT    NOT NULL,
    applied_at TEXT    NOT NULL,
    PRIMARY KEY (component, version)
  ) STRICT`;

function checksum(sql: string): string {
  return createHash("sha256").update(sql).digest("hex");
}

/**
 * Brings `component`'s schema up to date. `migrations[i]` is version i+1; the list is
 * append-only: an applied migration must never be edited (its checksum is verified), add a
 * new one instead. All missing versions are applied in one transaction, so a crash leaves
 * either the old or the new schema. Returns how many migrations were applied.
 */
export function migrate(db: Database, component: string, migrations: readonly string[]): number {
  if (!/^[a-z][a-z0-9_-]*$/.test(component)) {
    throw new Error(`migrate: invalid component name ${JSON.stringify(component)}`);
  }
  db.exec(MIGRATIONS_TABLE);
  const run = db.transaction(() => {
    const done = db
      .prepare("SELECT version, checksum FROM schema_migrations WHERE component = ? ORDER BY version")
      .all(component) as { version: number; checksum: string }[];
    if (done.length > migrations.length) {
      throw new Error(
        `database schema for "${component}" is at version ${done.length}, newer than this code ` +
          `(${migrations.length} migrations): refusing to run an older agent on a newer database`,
      );
    }
    for (const row of done) {
      const expected = checksum(migrations[row.version - 1]!);
      if (row.checksum !== expected) {
        throw new Error(
          `migration ${row.version} of "${component}" was changed after it was applied; ` +
            `never edit applied migrations, append a new one`,
        );
      }
    }
    const insert = db.prepare(
      "INSERT INTO schema_migrations (component, version, checksum, applied_at) VALUES (?, ?, ?, ?)",
    );
    let count = 0;
    for (let version = done.length + 1; version <= migrations.length; version++) {
      const sql = migrations[version - 1]!;
      db.exec(sql);
      insert.run(component, version, checksum(sql), new Date().toISOString());
      count++;
    }
    return count;
  });
  // IMMEDIATE takes the write lock up front, so two processes cannot apply the same version.
  return run.immediate();
}
