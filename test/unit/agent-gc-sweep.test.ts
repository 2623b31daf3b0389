// GC's sweep of leftover files beside a download (issue 10): a download that has renamed its
// blob into the store but not yet recorded it must not lose the file. Real SQLite catalog, real
// blob store directory; the pull is simulated by the exact sequence a download performs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { BlobStore } from "../../agent/blobs/store.ts";
import { Catalog } from "../../agent/catalog.ts";
import { openDatabase } from "../../agent/db.ts";
import { DownloadGate } from "../../agent/images/download-gate.ts";
import { collectGarbage, type GcDeps } from "../../agent/images/gc.ts";
import type { HelperClient } from "../../agent/helper-client.ts";
import { KeyedLock } from "../../agent/keyed-lock.ts";

async function setup() {
  const stateDir = mkdtempSync(join(tmpdir(), "imgd-gc-sweep-"));
  const blobs = new BlobStore(stateDir);
  await blobs.init();
  const catalog = new Catalog(openDatabase(join(stateDir, "imgd.db")));
  const downloads = new DownloadGate();
  const deps: GcDeps = {
    catalog,
    blobs,
    downloads,
    locks: new KeyedLock(),
    helper: { call: () => Promise.reject(new Error("GC must not call the helper here")) } as unknown as HelperClient,
    // The check of main's GC: "no pull running" is what it sees at the start of its sweep.
    pull: { list: () => [] },
    log: () => {},
  };
  return { blobs, catalog, downloads, deps };
}

const content = Buffer.from("layer bytes\n");
const digest = "sha256:" + createHash("sha256").update(content).digest("hex");
const obj = { key: "images/x/1.tar", etag: '"0123456789abcdef0123456789abcdef"', size: content.length };

test("a blob renamed into the store but not yet recorded survives a GC that runs meanwhile", async () => {
  const { blobs, catalog, downloads, deps } = await setup();
  let record!: () => void;
  const recorded = new Promise<void>((resolve) => (record = resolve));
  let renamed!: () => void;
  const isRenamed = new Promise<void>((resolve) => (renamed = resolve));
  const pull = downloads.download(async () => {
    const temp = join(blobs.tmpDir, "blob-0123.part");
    writeFileSync(temp, content);
    writeFileSync(blobs.pathFor(digest), content); // the rename, as BlobStore.commit does it
    renamed();
    await recorded; // validation runs here, between the rename and the record
    catalog.recordBlob(obj, digest);
  });
  await isRenamed;
  const report = await collectGarbage(deps);
  assert.deepEqual(report.removedBlobs, [], "the download's blob is not swept");
  record();
  await pull;
  assert.ok(existsSync(blobs.pathFor(digest)), "the recorded blob has its file");
  assert.ok(await blobs.has(digest));
});

test("with no download in flight the sweep removes leftovers; a download arriving during a sweep waits for it", async () => {
  const { blobs, downloads, deps } = await setup();
  writeFileSync(join(blobs.tmpDir, "blob-dead.part"), "x");
  writeFileSync(blobs.pathFor(digest), content);
  const report = await collectGarbage(deps);
  assert.deepEqual([report.removedTempFiles, report.removedBlobs], [1, [digest]]);
  assert.equal(existsSync(blobs.pathFor(digest)), false);

  const order: string[] = [];
  let finish!: () => void;
  const sweeping = downloads.trySweep(async () => {
    order.push("sweep start");
    await new Promise<void>((resolve) => (finish = resolve));
    order.push("sweep end");
  });
  const download = downloads.download(async () => void order.push("download"));
  await sleep(20);
  assert.deepEqual(order, ["sweep start"], "the download waits");
  assert.deepEqual(await downloads.trySweep(async () => order.push("second sweep")), { swept: false }, "one sweep at a time");
  finish();
  await Promise.all([sweeping, download]);
  assert.deepEqual(order, ["sweep start", "sweep end", "download"]);
});
