// The catalog: what the agent knows about blobs, images, thin devices and activations, in SQLite.
//
// Rows only ever claim what is true: a device row is "ready" only after its layer was applied
// and synced; a thin id is allocated (in a transaction) before the pool is asked to create it, so
// a crash in between leaves an "allocated" row that startup can discard, never an unknown id; a
// removal is recorded ("removing", "deactivating") before the pool deletes anything. The order of
// these writes and the pool's operations is kept in one place: thin-devices.ts.
import type Database from "better-sqlite3";
import { migrate } from "./db.ts";

export const CATALOG_MIGRATIONS: readonly string[] = [
  `
  CREATE TABLE blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    stored_at TEXT NOT NULL
  );
  -- Which blob an S3 object (key, etag, size) turned out to be: a shared layer with the same
  -- ETag and size is not downloaded twice.
  CREATE TABLE s3_objects (
    key TEXT NOT NULL,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    digest TEXT NOT NULL REFERENCES blobs(digest),
    PRIMARY KEY (key, etag, size)
  );
  CREATE INDEX s3_objects_etag ON s3_objects(etag, size);
  CREATE TABLE images (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('pulling', 'ready', 'failed')),
    chain_id TEXT,
    error TEXT,
    updated_at TEXT NOT NULL
  );
  CREATE TABLE image_layers (
    image TEXT NOT NULL REFERENCES images(name) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT NOT NULL,
    digest TEXT,
    chain_id TEXT,
    PRIMARY KEY (image, position)
  );
  -- Thin ids are unique in the pool whoever owns them (layer device or activation).
  CREATE TABLE thin_ids (
    thin_id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    allocated_at TEXT NOT NULL
  );
  CREATE TABLE devices (
    chain_id TEXT PRIMARY KEY,
    thin_id INTEGER NOT NULL UNIQUE REFERENCES thin_ids(thin_id),
    parent_chain_id TEXT REFERENCES devices(chain_id),
    layer_digest TEXT NOT NULL,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('allocated', 'ready')),
    created_at TEXT NOT NULL,
    ready_at TEXT
  );
  CREATE TABLE activations (
    id TEXT PRIMARY KEY,
    image TEXT NOT NULL,
    chain_id TEXT NOT NULL REFERENCES devices(chain_id),
    thin_id INTEGER NOT NULL UNIQUE REFERENCES thin_ids(thin_id),
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('allocated', 'active')),
    created_at TEXT NOT NULL
  );
  `,
  // What validation measured, for the pool space check before an apply.
  `
  ALTER TABLE blobs ADD COLUMN file_bytes INTEGER;
  ALTER TABLE blobs ADD COLUMN entries INTEGER;
  `,
  // 'deactivating': the user's intent, recorded before the device goes, so that neither a
  // repair nor a failure brings the activation back. Which pull run last (re)wrote an image's
  // row, so a run's finalizer only ever updates its own outcome. Thin ids whose deletion the pool
  // confirmed, reused before new ones (the id space is 24 bits); under the old code every id
  // below the high-water mark without a row had been deleted from the pool.
  `
  CREATE TABLE activations_v3 (
    id TEXT PRIMARY KEY,
    image TEXT NOT NULL,
    chain_id TEXT NOT NULL REFERENCES devices(chain_id),
    thin_id INTEGER NOT NULL UNIQUE REFERENCES thin_ids(thin_id),
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('allocated', 'active', 'deactivating')),
    created_at TEXT NOT NULL
  );
  INSERT INTO activations_v3 SELECT id, image, chain_id, thin_id, name, state, created_at FROM activations;
  DROP TABLE activations;
  ALTER TABLE activations_v3 RENAME TO activations;
  ALTER TABLE images ADD COLUMN pull_run TEXT;
  CREATE TABLE free_thin_ids (
    thin_id INTEGER PRIMARY KEY,
    freed_at TEXT NOT NULL
  );
  -- Ids this catalog never allocated that the operator decided to keep (doctor --adopt-pool):
  -- never handed out, never deleted.
  CREATE TABLE adopted_thin_ids (
    thin_id INTEGER PRIMARY KEY,
    adopted_at TEXT NOT NULL
  );
  WITH RECURSIVE n(i) AS (
    SELECT 1 WHERE COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'thin_ids'), 0) >= 1
    UNION ALL SELECT i + 1 FROM n WHERE i < (SELECT seq FROM sqlite_sequence WHERE name = 'thin_ids')
  )
  INSERT INTO free_thin_ids (thin_id, freed_at) SELECT i, datetime('now') FROM n WHERE i NOT IN (SELECT thin_id FROM thin_ids);
  `,
  // Activation names (ActivateImage's client-chosen name, unique on the host) and labels (JSON).
  // Apart from the activations table: the name is reserved when the API call arrives, before
  // the run makes the activation's row (which needs the image pulled and a thin id), so a retry
  // or a resumed run finds it. Activations made before get the name the agent picks.
  `
  CREATE TABLE activation_names (
    name TEXT PRIMARY KEY,
    activation_id TEXT NOT NULL UNIQUE,
    image TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(labels)),
    reserved_at TEXT NOT NULL
  );
  INSERT INTO activation_names (name, activation_id, image, labels, reserved_at)
    SELECT 'act-' || lower(id), id, image, '{}', created_at FROM activations;
  `,
  // The identity of the pool this catalog describes (the helper's pool-id), recorded the first
  // time the agent uses a pool: a database restored elsewhere, or a pool recreated under this
  // one, is then told apart from a catalog that merely lost rows (doctor's POOL_MISMATCH).
  `
  CREATE TABLE pool_identity (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    pool_id TEXT NOT NULL,
    pool_name TEXT NOT NULL,
    recorded_at TEXT NOT NULL
  );
  `,
  // 'removing': the intent to remove a ready layer device, recorded before the pool is touched
  // (thin-devices.ts), so a removal cut short is finished, never taken for a usable device.
  // SQLite cannot change a CHECK, so the table is rebuilt, and activations with it: they refer to
  // it, and a table others refer to cannot be dropped while foreign keys are on (they cannot be
  // turned off inside the migration's transaction). The new tables refer to each other by their
  // new names, which the renames rewrite.
  `
  CREATE TABLE devices_v6 (
    chain_id TEXT PRIMARY KEY,
    thin_id INTEGER NOT NULL UNIQUE REFERENCES thin_ids(thin_id),
    parent_chain_id TEXT REFERENCES devices_v6(chain_id),
    layer_digest TEXT NOT NULL,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('allocated', 'ready', 'removing')),
    created_at TEXT NOT NULL,
    ready_at TEXT
  );
  INSERT INTO devices_v6 SELECT chain_id, thin_id, parent_chain_id, layer_digest, name, state, created_at, ready_at FROM devices;
  CREATE TABLE activations_v6 (
    id TEXT PRIMARY KEY,
    image TEXT NOT NULL,
    chain_id TEXT NOT NULL REFERENCES devices_v6(chain_id),
    thin_id INTEGER NOT NULL UNIQUE REFERENCES thin_ids(thin_id),
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('allocated', 'active', 'deactivating')),
    created_at TEXT NOT NULL
  );
  INSERT INTO activations_v6 SELECT id, image, chain_id, thin_id, name, state, created_at FROM activations;
  DROP TABLE activations;
  DROP TABLE devices;
  ALTER TABLE devices_v6 RENAME TO devices;
  ALTER TABLE activations_v6 RENAME TO activations;
  `,
];

/** dm-thin device ids are 24 bits. */
export const MAX_THIN_ID = 0xffffff;

export type ImageState = "pulling" | "ready" | "failed";

export interface ImageRow {
  name: string;
  state: ImageState;
  chainId: string | null;
  error: string | null;
  updatedAt: string;
}

export interface ImageLayerRow {
  image: string;
  position: number;
  key: string;
  size: number;
  etag: string;
  digest: string | null;
  chainId: string | null;
}

export interface DeviceRow {
  chainId: string;
  thinId: number;
  parentChainId: string | null;
  layerDigest: string;
  name: string;
  /** allocated: being built (or half-made); ready: built, usable; removing: on its way out. */
  state: "allocated" | "ready" | "removing";
  createdAt: string;
}

/** An activation's name and labels, reserved before its row exists (and dropped with it). */
export interface ActivationNameRow {
  name: string;
  activationId: string;
  image: string;
  labels: Record<string, string>;
}

/** An activation with its name and labels, as the API lists it. */
export interface NamedActivationRow extends ActivationRow {
  activationName: string;
  labels: Record<string, string>;
}

/** The pool this catalog describes (pool-identity.ts compares it with the helper's). */
export interface PoolIdentityRow {
  id: string;
  name: string;
  recordedAt: string;
}

export interface ActivationRow {
  id: string;
  image: string;
  chainId: string;
  thinId: number;
  name: string;
  state: "allocated" | "active" | "deactivating";
  createdAt: string;
}

const now = () => new Date().toISOString();

export class Catalog {
  readonly db: Database.Database;
  readonly #maxThinId: number;

  /** `maxThinId` is for tests that allocate past the end of the id space. */
  constructor(db: Database.Database, options: { maxThinId?: number } = {}) {
    this.db = db;
    this.#maxThinId = options.maxThinId ?? MAX_THIN_ID;
    migrate(db, "catalog", CATALOG_MIGRATIONS);
  }

  // --- blobs -------------------------------------------------------------------------------

  /** Records a validated blob (with what validation measured) and the S3 object it came from. */
  recordBlob(obj: { key: string; etag: string; size: number }, digest: string, measured?: { fileBytes: number; entries: number }): void {
    this.db.transaction(() => {
      this.db.prepare("INSERT OR IGNORE INTO blobs (digest, size, stored_at) VALUES (?, ?, ?)").run(digest, obj.size, now());
      if (measured) this.db.prepare("UPDATE blobs SET file_bytes = ?, entries = ? WHERE digest = ?").run(measured.fileBytes, measured.entries, digest);
      this.db.prepare("INSERT OR REPLACE INTO s3_objects (key, etag, size, digest) VALUES (?, ?, ?, ?)").run(obj.key, obj.etag, obj.size, digest);
    })();
  }

  /**
   * The blob an S3 object is known to be, by the same key, or by another key with the same
   * plain-MD5 ETag and size (a layer shared between images). Multipart ETags ("...-N") are not
   * content hashes, so they only match their own key.
   */
  knownBlobFor(obj: { key: string; etag: string; size: number }): string | undefined {
    const sameKey = this.db.prepare("SELECT digest FROM s3_objects WHERE key = ? AND etag = ? AND size = ?").get(obj.key, obj.etag, obj.size) as { digest: string } | undefined;
    if (sameKey) return sameKey.digest;
    if (!/^"?[0-9a-f]{32}"?$/.test(obj.etag)) return undefined;
    const sameContent = this.db.prepare("SELECT digest FROM s3_objects WHERE etag = ? AND size = ? LIMIT 1").get(obj.etag, obj.size) as { digest: string } | undefined;
    return sameContent?.digest;
  }

  /** What validation measured of a blob, if it was recorded. */
  blobContent(digest: string): { fileBytes: number; entries: number } | undefined {
    const row = this.db.prepare("SELECT file_bytes AS fileBytes, entries FROM blobs WHERE digest = ? AND file_bytes IS NOT NULL").get(digest);
    return row as { fileBytes: number; entries: number } | undefined;
  }

  forgetBlob(digest: string): void {
    this.db.transaction(() => {
      this.db.prepare("DELETE FROM s3_objects WHERE digest = ?").run(digest);
      this.db.prepare("DELETE FROM blobs WHERE digest = ?").run(digest);
    })();
  }

  // --- images ------------------------------------------------------------------------------

  getImage(name: string): ImageRow | undefined {
    const row = this.db.prepare("SELECT name, state, chain_id AS chainId, error, updated_at AS updatedAt FROM images WHERE name = ?").get(name);
    return row as ImageRow | undefined;
  }

  /** By name; `after` and `limit` page through them. */
  listImages(page: { after?: string; limit?: number } = {}): ImageRow[] {
    return this.db
      .prepare("SELECT name, state, chain_id AS chainId, error, updated_at AS updatedAt FROM images WHERE name > @after ORDER BY name LIMIT @limit")
      .all({ after: page.after ?? "", limit: page.limit ?? -1 }) as ImageRow[];
  }

  imageLayers(name: string): ImageLayerRow[] {
    return this.db
      .prepare("SELECT image, position, key, size, etag, digest, chain_id AS chainId FROM image_layers WHERE image = ? ORDER BY position")
      .all(name) as ImageLayerRow[];
  }

  /**
   * Records the layer list of a pull in progress (run `runId`), replacing the previous one. Only
   * called once S3 has listed the image: a name S3 does not have never gets a row.
   */
  beginPull(name: string, runId: string, layers: { position: number; key: string; size: number; etag: string }[]): void {
    this.db.transaction(() => {
      this.db
        .prepare(
          `INSERT INTO images (name, state, chain_id, error, updated_at, pull_run) VALUES (?, 'pulling', NULL, NULL, ?, ?)
           ON CONFLICT(name) DO UPDATE SET state = 'pulling', error = NULL, updated_at = excluded.updated_at, pull_run = excluded.pull_run`,
        )
        .run(name, now(), runId);
      this.db.prepare("DELETE FROM image_layers WHERE image = ?").run(name);
      const insert = this.db.prepare("INSERT INTO image_layers (image, position, key, size, etag) VALUES (?, ?, ?, ?, ?)");
      for (const l of layers) insert.run(name, l.position, l.key, l.size, l.etag);
    })();
  }

  setLayerDigest(name: string, position: number, digest: string): void {
    this.db.prepare("UPDATE image_layers SET digest = ? WHERE image = ? AND position = ?").run(digest, name, position);
  }

  setLayerChain(name: string, position: number, chainId: string): void {
    this.db.prepare("UPDATE image_layers SET chain_id = ? WHERE image = ? AND position = ?").run(chainId, name, position);
  }

  /** The outcome of pull run `runId`; throws when the row is gone or a newer pull owns it. */
  markImageReady(name: string, runId: string, chainId: string): void {
    const { changes } = this.db
      .prepare("UPDATE images SET state = 'ready', chain_id = ?, error = NULL, updated_at = ? WHERE name = ? AND (pull_run = ? OR pull_run IS NULL)")
      .run(chainId, now(), name, runId);
    if (changes !== 1) throw new Error(`image ${name} is no longer this pull's (${runId}): it was deleted or pulled again meanwhile`);
  }

  /** Forgets an image (its layer list goes with it); its devices and blobs are not touched. */
  deleteImage(name: string): void {
    this.db.prepare("DELETE FROM images WHERE name = ?").run(name);
  }

  /**
   * Marks an existing image failed; never creates a row. With `runId` (a pull's finalizer), only
   * if that run still owns the row: a finalizer run again after a crash cannot overwrite the
   * outcome of a newer pull. Returns whether the row changed.
   */
  markImageFailed(name: string, error: string, runId?: string): boolean {
    // A row from before pull_run existed (NULL) belongs to whichever run asks.
    const guard = runId === undefined ? "" : " AND (pull_run = @runId OR pull_run IS NULL)";
    return (
      this.db
        .prepare(`UPDATE images SET state = 'failed', error = @error, updated_at = @at WHERE name = @name${guard}`)
        .run({ name, error, at: now(), ...(runId === undefined ? {} : { runId }) }).changes === 1
    );
  }

  // --- devices -----------------------------------------------------------------------------

  getDevice(chainId: string): DeviceRow | undefined {
    return this.db.prepare(`${DEVICE_SELECT} WHERE chain_id = ?`).get(chainId) as DeviceRow | undefined;
  }

  listDevices(): DeviceRow[] {
    return this.db.prepare(`${DEVICE_SELECT} ORDER BY thin_id`).all() as DeviceRow[];
  }

  /** Allocates a thin id and records the device as "allocated", in one transaction. */
  allocateDevice(d: { chainId: string; parentChainId: string | null; layerDigest: string; name: string }): DeviceRow {
    return this.db.transaction(() => {
      const thinId = this.allocateThinId(`device ${d.chainId}`);
      this.db
        .prepare("INSERT INTO devices (chain_id, thin_id, parent_chain_id, layer_digest, name, state, created_at) VALUES (?, ?, ?, ?, ?, 'allocated', ?)")
        .run(d.chainId, thinId, d.parentChainId, d.layerDigest, d.name, now());
      return this.getDevice(d.chainId)!;
    })();
  }

  markDeviceReady(chainId: string): void {
    this.db.prepare("UPDATE devices SET state = 'ready', ready_at = ? WHERE chain_id = ?").run(now(), chainId);
  }

  /** The intent to remove a ready device: from now on nothing uses it, and whoever finds it finishes the removal. */
  markDeviceRemoving(chainId: string): void {
    this.db.prepare("UPDATE devices SET state = 'removing' WHERE chain_id = ? AND state = 'ready'").run(chainId);
  }

  /**
   * Forgets a device whose thin device no longer exists in the pool: call it only once the pool
   * confirmed the deletion (thin.delete returned), since its thin id becomes free for reuse.
   */
  deleteDevice(chainId: string): void {
    this.db.transaction(() => {
      const row = this.getDevice(chainId);
      if (!row) return;
      this.db.prepare("DELETE FROM devices WHERE chain_id = ?").run(chainId);
      this.freeThinId(row.thinId);
    })();
  }

  /** Devices built on `chainId` (its snapshots, their snapshots...), the top-most first. */
  devicesAbove(chainId: string): DeviceRow[] {
    const rows = this.db
      .prepare(
        `WITH RECURSIVE above(chain_id, depth) AS (
           SELECT chain_id, 1 FROM devices WHERE parent_chain_id = ?
           UNION ALL SELECT d.chain_id, above.depth + 1 FROM devices d JOIN above ON d.parent_chain_id = above.chain_id
         )
         SELECT chain_id AS chainId, MAX(depth) AS depth FROM above GROUP BY chain_id ORDER BY depth DESC, chain_id`,
      )
      .all(chainId) as { chainId: string }[];
    return rows.map((r) => this.getDevice(r.chainId)!);
  }

  /** Images whose chain (or any layer's chain) is one of `chainIds`. */
  imagesUsing(chainIds: string[]): string[] {
    if (chainIds.length === 0) return [];
    const marks = chainIds.map(() => "?").join(",");
    const rows = this.db
      .prepare(
        `SELECT name FROM images WHERE chain_id IN (${marks})
         UNION SELECT image FROM image_layers WHERE chain_id IN (${marks}) ORDER BY 1`,
      )
      .all(...chainIds, ...chainIds) as { name: string }[];
    return rows.map((r) => r.name);
  }

  /**
   * Why a device must stay: an image (in any state: a failed image is re-pulled from what it
   * has) names it, an activation (even half-made) is a snapshot of it, or a device is built on it.
   * Undefined when nothing references it.
   */
  deviceReference(chainId: string): string | undefined {
    const image = this.db
      .prepare("SELECT name FROM images WHERE chain_id = ? UNION SELECT image FROM image_layers WHERE chain_id = ? LIMIT 1")
      .get(chainId, chainId) as { name: string } | undefined;
    if (image) return `image ${image.name} uses it`;
    const activation = this.db.prepare("SELECT id FROM activations WHERE chain_id = ? LIMIT 1").get(chainId) as { id: string } | undefined;
    if (activation) return `activation ${activation.id} is a snapshot of it`;
    const child = this.db.prepare("SELECT name FROM devices WHERE parent_chain_id = ? LIMIT 1").get(chainId) as { name: string } | undefined;
    if (child) return `device ${child.name} is built on it`;
    return undefined;
  }

  listBlobs(): { digest: string; size: number }[] {
    return this.db.prepare("SELECT digest, size FROM blobs ORDER BY digest").all() as { digest: string; size: number }[];
  }

  /** The S3 objects (ETag and size) known to be this blob: the keys a pull locks its download by. */
  blobObjects(digest: string): { key: string; etag: string; size: number }[] {
    return this.db.prepare("SELECT key, etag, size FROM s3_objects WHERE digest = ? ORDER BY key").all(digest) as { key: string; etag: string; size: number }[];
  }

  /**
   * Whether any image's layer list uses the blob: by digest, or (for a pull that has listed its
   * layers but not yet recorded their digests) by an S3 object with the same ETag and size.
   */
  blobReferenced(digest: string): boolean {
    const row = this.db
      .prepare(
        `SELECT 1 FROM image_layers WHERE digest = ?
         UNION ALL SELECT 1 FROM image_layers l JOIN s3_objects o ON o.etag = l.etag AND o.size = l.size WHERE o.digest = ?
         LIMIT 1`,
      )
      .get(digest, digest);
    return row !== undefined;
  }

  // --- activations -------------------------------------------------------------------------

  allocateActivation(a: { id: string; image: string; chainId: string; name: string }): ActivationRow {
    return this.db.transaction(() => {
      const thinId = this.allocateThinId(`activation ${a.id}`);
      this.db
        .prepare("INSERT INTO activations (id, image, chain_id, thin_id, name, state, created_at) VALUES (?, ?, ?, ?, ?, 'allocated', ?)")
        .run(a.id, a.image, a.chainId, thinId, a.name, now());
      return this.getActivation(a.id)!;
    })();
  }

  getActivation(id: string): ActivationRow | undefined {
    return this.db.prepare(`${ACTIVATION_SELECT} WHERE id = ?`).get(id) as ActivationRow | undefined;
  }

  listActivations(image?: string): ActivationRow[] {
    if (image) return this.db.prepare(`${ACTIVATION_SELECT} WHERE image = ? ORDER BY created_at, id`).all(image) as ActivationRow[];
    return this.db.prepare(`${ACTIVATION_SELECT} ORDER BY created_at, id`).all() as ActivationRow[];
  }

  markActivationActive(id: string): void {
    this.db.prepare("UPDATE activations SET state = 'active' WHERE id = ? AND state = 'allocated'").run(id);
  }

  /** The user asked for it to go: from now on nothing brings it back (doctor, reconcile). */
  markActivationDeactivating(id: string): void {
    this.db.prepare("UPDATE activations SET state = 'deactivating' WHERE id = ?").run(id);
  }

  /** Forgets an activation whose snapshot the pool confirmed deleted (its thin id is reused), and its name. */
  deleteActivation(id: string): void {
    this.db.transaction(() => {
      this.releaseActivationName(id);
      const row = this.getActivation(id);
      if (!row) return;
      this.db.prepare("DELETE FROM activations WHERE id = ?").run(id);
      this.freeThinId(row.thinId);
    })();
  }

  /** Active activations with their names, by id (ids are ULIDs: creation order); paged by `after`. */
  listNamedActivations(filter: { id?: string; image?: string; after?: string; limit?: number } = {}): NamedActivationRow[] {
    const rows = this.db
      .prepare(
        `SELECT a.id, a.image, a.chain_id AS chainId, a.thin_id AS thinId, a.name, a.state, a.created_at AS createdAt,
                n.name AS activationName, n.labels AS labels
         FROM activations a JOIN activation_names n ON n.activation_id = a.id
         WHERE a.state = 'active' AND (@id IS NULL OR a.id = @id) AND (@image IS NULL OR a.image = @image) AND a.id > @after ORDER BY a.id LIMIT @limit`,
      )
      .all({ id: filter.id ?? null, image: filter.image ?? null, after: filter.after ?? "", limit: filter.limit ?? -1 }) as (ActivationRow & { activationName: string; labels: string })[];
    return rows.map((r) => ({ ...r, labels: JSON.parse(r.labels) as Record<string, string> }));
  }

  // --- activation names --------------------------------------------------------------------

  /** Reserves `name` for activation `activationId` of `image`; the name must be free. */
  reserveActivationName(r: { name: string; activationId: string; image: string; labels: Record<string, string> }): void {
    this.db.prepare("INSERT INTO activation_names (name, activation_id, image, labels, reserved_at) VALUES (?, ?, ?, ?, ?)").run(r.name, r.activationId, r.image, JSON.stringify(r.labels), now());
  }

  getActivationName(name: string): ActivationNameRow | undefined {
    return this.#nameRow(this.db.prepare(`${NAME_SELECT} WHERE name = ?`).get(name));
  }

  activationNameOf(activationId: string): ActivationNameRow | undefined {
    return this.#nameRow(this.db.prepare(`${NAME_SELECT} WHERE activation_id = ?`).get(activationId));
  }

  /** Frees the name of an activation that is gone, or was never made (its run failed). */
  releaseActivationName(activationId: string): void {
    this.db.prepare("DELETE FROM activation_names WHERE activation_id = ?").run(activationId);
  }

  #nameRow(row: unknown): ActivationNameRow | undefined {
    if (!row) return undefined;
    const r = row as Omit<ActivationNameRow, "labels"> & { labels: string };
    return { ...r, labels: JSON.parse(r.labels) as Record<string, string> };
  }

  // --- the pool ----------------------------------------------------------------------------

  /** The identity of the pool this catalog describes; undefined until the agent first used one. */
  poolIdentity(): PoolIdentityRow | undefined {
    return this.db.prepare("SELECT pool_id AS id, pool_name AS name, recorded_at AS recordedAt FROM pool_identity").get() as PoolIdentityRow | undefined;
  }

  /** Records (or, by the operator's decision, replaces) the identity of the pool this catalog describes. */
  recordPoolIdentity(id: string, name: string): void {
    this.db
      .prepare(
        `INSERT INTO pool_identity (only_row, pool_id, pool_name, recorded_at) VALUES (1, ?, ?, ?)
         ON CONFLICT(only_row) DO UPDATE SET pool_id = excluded.pool_id, pool_name = excluded.pool_name, recorded_at = excluded.recorded_at`,
      )
      .run(id, name, now());
  }

  // --- thin ids ----------------------------------------------------------------------------
  // Every id this catalog hands out is at or below its high-water mark (sqlite_sequence); an id
  // leaves use only once the pool confirmed its deletion, and is then kept in free_thin_ids for
  // reuse. So an id is "allocated by this catalog" exactly when it is at or below the mark and
  // not free: the pool's other ids were made by someone else, or are from a catalog this one
  // does not descend from, and no repair may touch them (doctor's FOREIGN_THIN_ID).

  /** Whether this catalog allocated `thinId` and has not seen it deleted (owned, or lost in a crash). */
  thinIdAllocated(thinId: number): boolean {
    if (thinId < 1 || thinId > this.thinIdHighWater()) return false;
    return this.db.prepare("SELECT 1 FROM free_thin_ids WHERE thin_id = ? UNION ALL SELECT 1 FROM adopted_thin_ids WHERE thin_id = ?").get(thinId, thinId) === undefined;
  }

  /**
   * Records that the pool confirmed the deletion of an allocated id that has no row any more (a
   * repair of UNKNOWN_THIN_ID): the id becomes free for reuse.
   */
  releaseThinId(thinId: number): void {
    this.db.transaction(() => {
      if (!this.thinIdAllocated(thinId)) return;
      if (this.db.prepare("SELECT 1 FROM thin_ids WHERE thin_id = ?").get(thinId)) return;
      this.db.prepare("INSERT OR IGNORE INTO free_thin_ids (thin_id, freed_at) VALUES (?, ?)").run(thinId, now());
    })();
  }

  /**
   * The operator's decision to keep a thin id the catalog never allocated (doctor --adopt-pool):
   * it is reserved (never handed out, never deleted, not reported again). Kept apart from
   * thin_ids so that it does not move the high-water mark (ids below it would look allocated).
   */
  adoptThinId(thinId: number): void {
    this.db.transaction(() => {
      this.db.prepare("DELETE FROM free_thin_ids WHERE thin_id = ?").run(thinId);
      this.db.prepare("INSERT OR IGNORE INTO adopted_thin_ids (thin_id, adopted_at) VALUES (?, ?)").run(thinId, now());
    })();
  }

  /**
   * Ends a reservation (doctor --wipe-pool): `deleted` once the pool confirmed the id's deletion
   * (then an id below the mark becomes free), or not (a failed wipe: the id is foreign again).
   */
  forgetAdoptedThinId(thinId: number, deleted: boolean): void {
    this.db.transaction(() => {
      if (this.db.prepare("DELETE FROM adopted_thin_ids WHERE thin_id = ?").run(thinId).changes === 0) return;
      if (deleted && thinId <= this.thinIdHighWater()) this.db.prepare("INSERT OR IGNORE INTO free_thin_ids (thin_id, freed_at) VALUES (?, ?)").run(thinId, now());
    })();
  }

  /** Thin ids kept by the operator's decision (adoptThinId). */
  adoptedThinIds(): number[] {
    return (this.db.prepare("SELECT thin_id AS id FROM adopted_thin_ids ORDER BY thin_id").all() as { id: number }[]).map((r) => r.id);
  }

  thinIdHighWater(): number {
    const row = this.db.prepare("SELECT seq FROM sqlite_sequence WHERE name = 'thin_ids'").get() as { seq: number } | undefined;
    return row?.seq ?? 0;
  }

  private freeThinId(thinId: number): void {
    this.db.prepare("DELETE FROM thin_ids WHERE thin_id = ?").run(thinId);
    this.db.prepare("INSERT OR IGNORE INTO free_thin_ids (thin_id, freed_at) VALUES (?, ?)").run(thinId, now());
  }

  /** The lowest free id, else the next above the high-water mark. Call inside a transaction. */
  private allocateThinId(owner: string): number {
    const free = this.db.prepare("SELECT thin_id AS id FROM free_thin_ids ORDER BY thin_id LIMIT 1").get() as { id: number } | undefined;
    let id = free?.id ?? this.thinIdHighWater() + 1;
    // Above the mark, step over ids the operator adopted (a free id is never an adopted one).
    const adopted = this.db.prepare("SELECT 1 FROM adopted_thin_ids WHERE thin_id = ?");
    while (!free && adopted.get(id)) id++;
    if (id > this.#maxThinId) throw new Error(`thin id space exhausted: all ${this.#maxThinId} ids are in use`);
    if (free) this.db.prepare("DELETE FROM free_thin_ids WHERE thin_id = ?").run(id);
    this.db.prepare("INSERT INTO thin_ids (thin_id, owner, allocated_at) VALUES (?, ?, ?)").run(id, owner, now());
    return id;
  }
}

const DEVICE_SELECT =
  "SELECT chain_id AS chainId, thin_id AS thinId, parent_chain_id AS parentChainId, layer_digest AS layerDigest, name, state, created_at AS createdAt FROM devices";
const NAME_SELECT = "SELECT name, activation_id AS activationId, image, labels FROM activation_names";
const ACTIVATION_SELECT = "SELECT id, image, chain_id AS chainId, thin_id AS thinId, name, state, created_at AS createdAt FROM activations";
