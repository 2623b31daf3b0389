import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Catalog } from "../../agent/catalog.ts";
import { openDatabase } from "../../agent/db.ts";

const digest = (c: string) => "sha256:" + c.repeat(64);
const fresh = () => new Catalog(openDatabase(join(mkdtempSync(join(tmpdir(), "imgd-catalog-")), "imgd.db")));

test("thin ids are allocated uniquely across layer devices and activations, never reused", () => {
  const catalog = fresh();
  const a = catalog.allocateDevice({ chainId: digest("a"), parentChainId: null, layerDigest: digest("a"), name: "imgd-layer-a" });
  const b = catalog.allocateDevice({ chainId: digest("b"), parentChainId: digest("a"), layerDigest: digest("b"), name: "imgd-layer-b" });
  const act = catalog.allocateActivation({ id: "01ACT", image: "golang", chainId: digest("b"), name: "imgd-act-01act" });
  assert.deepEqual([a.thinId, b.thinId, act.thinId], [1, 2, 3]);
  catalog.deleteActivation("01ACT");
  const next = catalog.allocateActivation({ id: "01ACU", image: "golang", chainId: digest("b"), name: "imgd-act-01acu" });
  assert.equal(next.thinId, 4);
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
  catalog.beginPull("golang", [
    { position: 1, key: "images/golang/1.tar", size: 10, etag: "e1" },
    { position: 2, key: "images/golang/2.tar", size: 20, etag: "e2" },
  ]);
  assert.equal(catalog.getImage("golang")?.state, "pulling");
  assert.deepEqual(catalog.imageLayers("golang").map((l) => l.position), [1, 2]);
  catalog.markImageFailed("golang", "layer refused");
  assert.deepEqual([catalog.getImage("golang")?.state, catalog.getImage("golang")?.error], ["failed", "layer refused"]);
  catalog.beginPull("golang", [{ position: 1, key: "images/golang/1.tar", size: 10, etag: "e1" }]);
  assert.equal(catalog.getImage("golang")?.error, null);
  assert.equal(catalog.imageLayers("golang").length, 1);
  catalog.markImageReady("golang", digest("c"));
  assert.equal(catalog.getImage("golang")?.state, "ready");
});
