// The helper's durable record of each thin id's origin. The pool's metadata does not say which
// id a snapshot was taken from, yet a repeated thin.create/thin.snapshot (an agent retrying after
// a crash) must succeed when the id exists with the origin it asks for, and only then. So the
// origin is written (fsynced) BEFORE the pool message, and removed after the id is deleted: an id
// in the pool always has its record, and a record without an id is just stale.
// The record also holds the id's role once it is known (ownership.ts): "layer" or "activation",
// set when the id is first activated under a layer or activation name (or inherited by a snapshot
// of an activation), so an activation's data can never be handed to mkfs or the layer applier.
// One small file per id: $IMGD_HELPER_STATE_DIR/thin-origins/<id>,
// content {"origin":N|null} or {"origin":N|null,"role":"layer"|"activation"}.
import { readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import type { HelperConfig } from "./config.ts";
import { syncDir, writeFileDurably } from "./durable-file.ts";

export type Role = "layer" | "activation";
export type OriginRecord = { origin: number | null; role?: Role };

function dir(config: HelperConfig): string {
  return join(config.stateDir, "thin-origins");
}

/** The recorded origin of `thinId` (null: created empty); undefined when there is no (valid) record. */
export async function readOrigin(config: HelperConfig, thinId: number): Promise<OriginRecord | undefined> {
  let text;
  try {
    text = await readFile(join(dir(config), String(thinId)), "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
  // A record we cannot read proves nothing: treated as absent, so the caller stays strict.
  const match = /^\{"origin":(null|[0-9]{1,8})(?:,"role":"(layer|activation)")?\}\n?$/.exec(text);
  if (!match) return undefined;
  const origin = match[1] === "null" ? null : Number(match[1]);
  return match[2] === undefined ? { origin } : { origin, role: match[2] as Role };
}

export async function writeOrigin(config: HelperConfig, thinId: number, origin: number | null, role?: Role): Promise<void> {
  await writeFileDurably(join(dir(config), String(thinId)), JSON.stringify(role === undefined ? { origin } : { origin, role }) + "\n");
}

export async function removeOrigin(config: HelperConfig, thinId: number): Promise<void> {
  const folder = dir(config);
  await rm(join(folder, String(thinId)), { force: true });
  await syncDir(folder).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== "ENOENT") throw err;
  });
}
