import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Catalog, CATALOG_MIGRATIONS } from "../../agent/catalog.ts";
import { migrate, openDatabase } from "../../agent/db.ts";

const CATALOG_MIGRATIONS_V2 = CATALOG_MIGRATIONS.slice(0, 2);

const digest = (c: string) => "sha256:" + c.repeat(64);
const fresh = () => new Catalog(openDatabase(join(mkdtempSync(join(tmpdir(), "imgd-catalog-")), "imgd.db")));

test("thin ids are allocated uniquely across layer devices and activations; a deleted one is reused", () => {
  const catalog = fresh();
  const a = catalog.allocateDevice({ chainId: digest("a"), parentChainId: null, layerDigest: digest("a"), name: "imgd-layer-a" });
  const b = catalog.allocateDevice({ chainId: digest("b"), parentChainId: digest("a"), layerDigest: digest("b"), name: "imgd-layer-b" });
  const act = catalog.allocateActivation({ id: "01ACT", image: "golang", chainId: digest("b"), name: "imgd-act-01act" });
  assert.deepEqual([a.thinId, b.thinId, act.thinId], [1, 2, 3]);
  catalog.deleteActivation("01ACT");
  const next = catalog.allocateActivation({ id: "01ACU", image: "golang", chainId: digest("b"), name: "imgd-act-01acu" });
  assert.equal(next.thinId, 3);
});

test("a device is 'allocated' until marked ready", () => {
  const catalog = fresh();
  catalog.allocateDevice({ chainId: digest("a"), parentChainId: null, layerDigest: digest("a"), name: "imgd-layer-a" });
  assert.equal(catalog.getDevice(digest("a"))?.state, "allocated");
  catalog.markDeviceReady(digest("a"));
  assert.equal(catalog.getDevice(digest("a"))?.state, "ready");
});

test("a device's parent must exist (no dangling chains)", () => {
  const catalog = fresh();
  assert.throws(() => catalog.allocateDevice({ chainId: digest("b"), parentChainId: digest("a"), layerDigest: digest("b"), name: "imgd-layer-b" }), /FOREIGN KEY/);
  assert.equal(catalog.listDevices().length, 0);
});

test("a shared layer is found by ETag and size under another key; multipart ETags only match their key", () => {
  const catalog = fresh();
  catalog.recordBlob({ key: "images/golang/1.tar", etag: '"0123456789abcdef0123456789abcdef"', size: 1024 }, digest("1"));
  assert.equal(catalog.knownBlobFor({ key: "images/node/1.tar", etag: '"0123456789abcdef0123456789abcdef"', size: 1024 }), digest("1"));
  assert.equal(catalog.knownBlobFor({ key: "images/node/1.tar", etag: '"0123456789abcdef0123456789abcdef"', size: 2048 }), undefined);
  catalog.recordBlob({ key: "images/golang/2.tar", etag: '"0123456789abcdef0123456789abcdef-3"', size: 4096 }, digest("2"));
  assert.equal(catalog.knownBlobFor({ key: "images/golang/2.tar", etag: '"0123456789abcdef0123456789abcdef-3"', size: 4096 }), digest("2"));
  assert.equal(catalog.knownBlobFor({ key: "images/node/2.tar", etag: '"0123456789abcdef0123456789abcdef-3"', size: 4096 }), undefined);
});

test("a pull records its layers; ready and failed states are kept with their reason", () => {
  const catalog = fresh();
  catalog.beginPull("golang", "run1", [
    { position: 1, key: "images/golang/1.tar", size: 10, etag: "e1" },
    { position: 2, key: "images/golang/2.tar", size: 20, etag: "e2" },
  ]);
  assert.equal(catalog.getImage("golang")?.state, "pulling");
  assert.deepEqual(catalog.imageLayers("golang").map((l) => l.position), [1, 2]);
  catalog.markImageFailed("golang", "layer refused", "run1");
  assert.deepEqual([catalog.getImage("golang")?.state, catalog.getImage("golang")?.error], ["failed", "layer refused"]);
  catalog.beginPull("golang", "run2", [{ position: 1, key: "images/golang/1.tar", size: 10, etag: "e1" }]);
  assert.equal(catalog.getImage("golang")?.error, null);
  assert.equal(catalog.imageLayers("golang").length, 1);
  catalog.markImageReady("golang", "run2", digest("c"));
  assert.equal(catalog.getImage("golang")?.state, "ready");
  // An older run's outcome (its finalizer run again after a crash) does not touch the newer one.
  assert.equal(catalog.markImageFailed("golang", "old failure", "run1"), false);
  assert.equal(catalog.getImage("golang")?.state, "ready");
  assert.throws(() => catalog.markImageReady("golang", "run1", digest("c")), /no longer this pull's/);
  // A deleted image is not brought back by an outcome, nor is a row made for an unknown name.
  catalog.deleteImage("golang");
  assert.throws(() => catalog.markImageReady("golang", "run2", digest("c")), /deleted or pulled again/);
  assert.equal(catalog.markImageFailed("golang", "late", "run2"), false);
  assert.equal(catalog.markImageFailed("nothing", "no such image"), false);
  assert.deepEqual(catalog.listImages(), []);
});

test("thin ids: an id is reused once the pool confirmed its deletion; allocation goes past the id space by reuse only", () => {
  const catalog = new Catalog(openDatabase(":memory:"), { maxThinId: 3 });
  const device = (n: number, parent: string | null = null) =>
    catalog.allocateDevice({ chainId: digest(String(n)), parentChainId: parent, layerDigest: digest(String(n)), name: `imgd-layer-${n}` });
  assert.deepEqual([device(1).thinId, device(2).thinId, device(3).thinId], [1, 2, 3]);
  assert.throws(() => device(4), /thin id space exhausted: all 3 ids are in use/);
  assert.equal(catalog.listDevices().length, 3, "the failed allocation left no row");
  catalog.deleteDevice(digest("2")); // as after thin.delete returned
  assert.equal(catalog.thinIdAllocated(2), false, "a deleted id is not the catalog's any more");
  assert.equal(device(5).thinId, 2, "the freed id is reused");
  catalog.deleteDevice(digest("1"));
  catalog.deleteDevice(digest("3"));
  const act = catalog.allocateActivation({ id: "A", image: "x", chainId: digest("5"), name: "imgd-act-a" });
  assert.equal(act.thinId, 1, "the lowest free id first, for activations too");
  catalog.deleteActivation("A");
  // Many allocate/delete cycles (a crash-and-rebuild each) never exhaust the 3 ids.
  for (let i = 0; i < 1000; i++) {
    const d = device(100 + i);
    assert.ok(d.thinId >= 1 && d.thinId <= 3);
    catalog.deleteDevice(d.chainId);
  }
  assert.equal(catalog.thinIdHighWater(), 3);
  assert.equal(catalog.thinIdAllocated(4), false, "above the high-water mark: never this catalog's");
});

test("the migration frees the ids an older catalog deleted, and keeps the ones in use", () => {
  const db = openDatabase(":memory:");
  migrate(db, "catalog", CATALOG_MIGRATIONS_V2);
  const insert = db.prepare("INSERT INTO thin_ids (owner, allocated_at) VALUES ('x', 'now')");
  for (let i = 0; i < 5; i++) insert.run();
  db.prepare("DELETE FROM thin_ids WHERE thin_id IN (2, 4)").run();
  const catalog = new Catalog(db);
  assert.deepEqual([1, 2, 3, 4, 5, 6].map((id) => catalog.thinIdAllocated(id)), [true, false, true, false, true, false]);
  assert.equal(catalog.allocateDevice({ chainId: digest("z"), parentChainId: null, layerDigest: digest("z"), name: "imgd-layer-z" }).thinId, 2);
});

test("adopted thin ids (the operator's decision) are never handed out and do not make other ids look allocated", () => {
  const catalog = new Catalog(openDatabase(":memory:"));
  const device = (n: number) => catalog.allocateDevice({ chainId: digest(String(n)), parentChainId: null, layerDigest: digest(String(n)), name: `imgd-layer-${n}` });
  device(1);
  catalog.adoptThinId(2);
  catalog.adoptThinId(9000);
  assert.deepEqual(catalog.adoptedThinIds(), [2, 9000]);
  assert.equal(catalog.thinIdAllocated(500), false, "adopting 9000 does not claim the ids below it");
  assert.equal(device(3).thinId, 3, "2 is stepped over");
  catalog.forgetAdoptedThinId(2, true); // wiped from the pool: below the mark, so free for reuse
  assert.equal(device(4).thinId, 2);
  catalog.forgetAdoptedThinId(9000, false); // a failed wipe: foreign again, not free
  assert.equal(catalog.thinIdAllocated(9000), false);
  assert.deepEqual(catalog.adoptedThinIds(), []);
});

test("the 'removing' migration keeps every device and activation row, and the foreign keys between them", () => {
  const db = openDatabase(":memory:");
  migrate(db, "catalog", CATALOG_MIGRATIONS.slice(0, 5));
  const at = "2025-01-01T00:00:00.000Z";
  for (const id of [1, 2, 3]) db.prepare("INSERT INTO thin_ids (thin_id, owner, allocated_at) VALUES (?, 'x', ?)").run(id, at);
  db.prepare("INSERT INTO devices VALUES (?, 1, NULL, ?, 'imgd-layer-a', 'ready', ?, ?)").run(digest("a"), digest("a"), at, at);
  db.prepare("INSERT INTO devices VALUES (?, 2, ?, ?, 'imgd-layer-b', 'allocated', ?, NULL)").run(digest("b"), digest("a"), digest("b"), at);
  db.prepare("INSERT INTO activations VALUES ('01ACT', 'golang', ?, 3, 'imgd-act-01act', 'deactivating', ?)").run(digest("a"), at);
  const catalog = new Catalog(db); // applies the rest
  assert.deepEqual(catalog.listDevices().map((d) => [d.chainId, d.thinId, d.parentChainId, d.state]), [
    [digest("a"), 1, null, "ready"],
    [digest("b"), 2, digest("a"), "allocated"],
  ]);
  assert.equal(catalog.getActivation("01ACT")?.state, "deactivating");
  catalog.markDeviceRemoving(digest("a"));
  assert.equal(catalog.getDevice(digest("a"))?.state, "removing");
  catalog.markDeviceRemoving(digest("b"));
  assert.equal(catalog.getDevice(digest("b"))?.state, "allocated", "only a ready device is marked removing");
  assert.deepEqual(db.pragma("foreign_key_check"), []);
  assert.throws(() => db.prepare("DELETE FROM devices WHERE chain_id = ?").run(digest("a")), /FOREIGN KEY/, "a device built on it, and an activation of it, still refer to it");
  assert.throws(() => catalog.allocateActivation({ id: "01ACU", image: "golang", chainId: digest("c"), name: "imgd-act-01acu" }), /FOREIGN KEY/);
});
