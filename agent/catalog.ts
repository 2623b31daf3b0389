// The catalog: what the agent knows about blobs, images, thin devices and activations, in SQLite.
//
// Rows only ever claim what is true: a device row is "ready" only after its layer was applied
// and synced; a thin id is allocated (in a transaction) before the pool is asked to create it, so
// a crash in between leaves an "allocated" row that startup can discard, never an unknown id.
import type Database from "better-sqlite3";
import { migrate } from "./db.ts";

const MIGRATIONS = [
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
];

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
  state: "allocated" | "ready";
  createdAt: string;
}

export interface ActivationRow {
  id: string;
  image: string;
  chainId: string;
  thinId: number;
  name: string;
  state: "allocated" | "active";
  createdAt: string;
}

const now = () => new Date().toISOString();

export class Catalog {
  readonly db: Database.Database;

  constructor(db: Database.Database) {
    this.db = db;
    migrate(db, "catalog", MIGRATIONS);
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

  listImages(): ImageRow[] {
    return this.db.prepare("SELECT name, state, chain_id AS chainId, error, updated_at AS updatedAt FROM images ORDER BY name").all() as ImageRow[];
  }

  imageLayers(name: string): ImageLayerRow[] {
    return this.db
      .prepare("SELECT image, position, key, size, etag, digest, chain_id AS chainId FROM image_layers WHERE image = ? ORDER BY position")
      .all(name) as ImageLayerRow[];
  }

  /** Records the layer list of a pull in progress, replacing the previous one. */
  beginPull(name: string, layers: { position: number; key: string; size: number; etag: string }[]): void {
    this.db.transaction(() => {
      this.db
        .prepare(
          `INSERT INTO images (name, state, chain_id, error, updated_at) VALUES (?, 'pulling', NULL, NULL, ?)
           ON CONFLICT(name) DO UPDATE SET state = 'pulling', error = NULL, updated_at = excluded.updated_at`,
        )
        .run(name, now());
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

  markImageReady(name: string, chainId: string): void {
    this.db.prepare("UPDATE images SET state = 'ready', chain_id = ?, error = NULL, updated_at = ? WHERE name = ?").run(chainId, now(), name);
  }

  /** Forgets an image (its layer list goes with it); its devices and blobs are not touched. */
  deleteImage(name: string): void {
    this.db.prepare("DELETE FROM images WHERE name = ?").run(name);
  }

  markImageFailed(name: string, error: string): void {
    this.db
      .prepare(
        `INSERT INTO images (name, state, chain_id, error, updated_at) VALUES (?, 'failed', NULL, ?, ?)
         ON CONFLICT(name) DO UPDATE SET state = 'failed', error = excluded.error, updated_at = excluded.updated_at`,
      )
      .run(name, error, now());
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

  /** Forgets a device whose thin device no longer exists in the pool. */
  deleteDevice(chainId: string): void {
    this.db.transaction(() => {
      const row = this.getDevice(chainId);
      if (!row) return;
      this.db.prepare("DELETE FROM devices WHERE chain_id = ?").run(chainId);
      this.db.prepare("DELETE FROM thin_ids WHERE thin_id = ?").run(row.thinId);
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
    this.db.prepare("UPDATE activations SET state = 'active' WHERE id = ?").run(id);
  }

  deleteActivation(id: string): void {
    this.db.transaction(() => {
      const row = this.getActivation(id);
      if (!row) return;
      this.db.prepare("DELETE FROM activations WHERE id = ?").run(id);
      this.db.prepare("DELETE FROM thin_ids WHERE thin_id = ?").run(row.thinId);
    })();
  }

  private allocateThinId(owner: string): number {
    const result = this.db.prepare("INSERT INTO thin_ids (owner, allocated_at) VALUES (?, ?)").run(owner, now());
    const id = Number(result.lastInsertRowid);
    // dm-thin device ids are 24 bits.
    if (id > 0xffffff) throw new Error("thin id space exhausted");
    return id;
  }
}

const DEVICE_SELECT =
  "SELECT chain_id AS chainId, thin_id AS thinId, parent_chain_id AS parentChainId, layer_digest AS layerDigest, name, state, created_at AS createdAt FROM devices";
const ACTIVATION_SELECT = "SELECT id, image, chain_id AS chainId, thin_id AS thinId, name, state, created_at AS createdAt FROM activations";
