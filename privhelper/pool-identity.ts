// The pool's identity: a random 128-bit id the helper gives a pool when it creates its metadata,
// kept in $IMGD_HELPER_STATE_DIR/pool-id beside the origin records. The agent records it in its
// catalog and compares it at every start, so a database that describes ANOTHER pool (restored
// from another host, or a pool recreated under an old database) is told apart from one that
// merely lost rows: the first must change nothing until an operator decides.
// The pool's own metadata has no room for such a mark; the file lives as long as the backing
// files it describes (pool.ts writes a new one before it creates a new metadata file).
import { randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import type { HelperConfig } from "./config.ts";
import { writeFileDurably } from "./durable-file.ts";
import { POOL_ID } from "./protocol.ts";

function file(config: HelperConfig): string {
  return join(config.stateDir, "pool-id");
}

/** The pool's identity; null when it has none (a pool made by an older helper, or by hand). */
export async function readPoolId(config: HelperConfig): Promise<string | null> {
  let text;
  try {
    text = await readFile(file(config), "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw err;
  }
  // Written atomically, so anything else was put there by someone else: it proves nothing, and
  // is replaced by the next pool.ensure (a new identity makes the agent stop and ask).
  const id = text.trim();
  return POOL_ID.test(id) && text === `${id}\n` ? id : null;
}

/** Gives the pool a new identity (fsynced before it returns). */
export async function writeNewPoolId(config: HelperConfig): Promise<string> {
  const id = randomBytes(16).toString("hex");
  await writeFileDurably(file(config), `${id}\n`);
  return id;
}

/** The pool's identity, made now if it has none. */
export async function ensurePoolId(config: HelperConfig): Promise<string> {
  return (await readPoolId(config)) ?? writeNewPoolId(config);
}
