// agent/blobs/check-thread.ts: the download's digests and the layer validator, computed on the
// check thread from the file itself as its written prefix grows; a real temp file and the real
// worker.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { open } from "node:fs/promises";
import { tmpdir } from "node:os";
import { gzipSync } from "node:zlib";
import { join } from "node:path";
import { FileCheck } from "../../agent/blobs/check-thread.ts";
import { LayerValidationError } from "../../agent/layers/validate.ts";
import { buildTar } from "../fixtures/tar-build.ts";
import type { LayerEntry } from "../fixtures/layer-model.ts";

const hex = (algorithm: string, data: Buffer) => createHash(algorithm).update(data).digest("hex");

async function withFile(fn: (file: Awaited<ReturnType<typeof open>>) => Promise<void>) {
  const dir = mkdtempSync(join(tmpdir(), "imgd-digest-"));
  const file = await open(join(dir, "blob"), "w+");
  try {
    await fn(file);
  } finally {
    await file.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

test("digests of a file written piece by piece, several at once on the one thread", async () => {
  await withFile(async (file) => {
    const data = randomBytes(5 * 1024 * 1024 + 123);
    const withMd5 = new FileCheck(file.fd, { md5: true });
    const without = new FileCheck(file.fd, { md5: false });
    for (let at = 0; at < data.length; at += 700_000) {
      const piece = data.subarray(at, at + 700_000);
      await file.write(piece, 0, piece.length, at);
      withMd5.available(at + piece.length);
    }
    assert.deepEqual(await withMd5.result(data.length), { sha256Hex: hex("sha256", data), md5Hex: hex("md5", data) });
    assert.deepEqual(await without.result(data.length), { sha256Hex: hex("sha256", data) });
  });
});

test("a file shorter than what was said to be written is an error, not a digest", async () => {
  await withFile(async (file) => {
    await file.write(Buffer.from("short"), 0, 5, 0);
    const digests = new FileCheck(file.fd, { md5: true });
    await assert.rejects(digests.result(10), /checking the download failed: the download's file ends at 5, before the 10 bytes written/);
  });
});

test("a cancelled job stops; a new job on the same file starts from its first byte", async () => {
  await withFile(async (file) => {
    await file.write(Buffer.from("old version"), 0, 11, 0);
    const old = new FileCheck(file.fd, { md5: false });
    old.available(11);
    await old.cancel();
    await file.truncate(0);
    const fresh = Buffer.from("new");
    await file.write(fresh, 0, 3, 0);
    assert.deepEqual(await new FileCheck(file.fd, { md5: false }).result(3), { sha256Hex: hex("sha256", fresh) });
  });
});

test("the oldest job goes first: its digest is not kept behind a later job's bytes", async () => {
  await withFile(async (first) => {
    await withFile(async (later) => {
      // The later job's 64 MiB and its end are sent before the first job's bytes and end; taken
      // in message order, the first job's digest would wait for all of them to be hashed.
      const small = randomBytes(1024 * 1024);
      const big = randomBytes(64 * 1024 * 1024);
      await first.write(small, 0, small.length, 0);
      await later.write(big, 0, big.length, 0);
      const older = new FileCheck(first.fd, { md5: true });
      const newer = new FileCheck(later.fd, { md5: true });
      const order: string[] = [];
      const newerDone = newer.result(big.length).then((d) => (order.push("later"), d));
      const olderDone = older.result(small.length).then((d) => (order.push("first"), d));
      assert.deepEqual(await olderDone, { sha256Hex: hex("sha256", small), md5Hex: hex("md5", small) });
      assert.deepEqual(await newerDone, { sha256Hex: hex("sha256", big), md5Hex: hex("md5", big) });
      assert.deepEqual(order, ["first", "later"]);
    });
  });
});

const file = (name: string, content: Buffer): LayerEntry => ({ name, type: "file", mode: 0o644, uid: 0, gid: 0, mtime: 1_700_000_000, content });
const dir = (name: string): LayerEntry => ({ name, type: "directory", mode: 0o755, uid: 0, gid: 0, mtime: 1_700_000_000 });

for (const compressed of [false, true]) {
  // A plain tar's slices share one buffer (the validator is done with each when it asks for the
  // next); a compressed one's each get their own (the decoder may still hold its input).
  test(`a ${compressed ? "gzip" : "plain"} layer is validated on the same thread from the same reads: its summary comes with the digests`, async () => {
    await withFile(async (f) => {
      const tar = await buildTar([dir("etc/"), file("etc/hostname", Buffer.from("imgd\n")), file("usr/lib/big", randomBytes(3 * 1024 * 1024)), file("usr/lib/small", randomBytes(70_000))]);
      const layer = compressed ? gzipSync(tar) : tar;
      const check = new FileCheck(f.fd, { md5: true, validate: {} });
      for (let at = 0; at < layer.length; at += 300_000) {
        const piece = layer.subarray(at, at + 300_000);
        await f.write(piece, 0, piece.length, at);
        check.available(at + piece.length);
      }
      const result = await check.result(layer.length);
      assert.equal(result.sha256Hex, hex("sha256", layer));
      assert.equal(result.md5Hex, hex("md5", layer));
      assert.equal(result.summary?.compression, compressed ? "gzip" : "none");
      assert.equal(result.summary?.files, 3);
      assert.equal(result.summary?.directories, 1);
      assert.equal(result.summary?.tarBytes, tar.length);
    });
  });
}

test("a refusal is reported as soon as the validator meets it, before the rest of the file exists", async () => {
  await withFile(async (f) => {
    const layer = await buildTar([file("ok", randomBytes(4096)), file("/etc/passwd", Buffer.from("x")), file("later", randomBytes(2 * 1024 * 1024))]);
    const check = (refused: (err: LayerValidationError) => void) => new FileCheck(f.fd, { md5: false, validate: {}, onRefusal: refused });
    let seen!: LayerValidationError;
    const refusal = new Promise<void>((resolve) => {
      const c = check((err) => ((seen = err), resolve()));
      void (async () => {
        const head = layer.subarray(0, 64 * 1024); // both bad member and its predecessor, not the rest
        await f.write(head, 0, head.length, 0);
        c.available(head.length);
      })();
    });
    await refusal;
    assert.ok(seen instanceof LayerValidationError);
    assert.equal(seen.rule, "ABSOLUTE_PATH");
    assert.equal(seen.entry, "/etc/passwd");
  });
});

test("a refused layer's result rejects with the refusal; a cancel after it is harmless", async () => {
  await withFile(async (f) => {
    const notATar = randomBytes(8192);
    await f.write(notATar, 0, notATar.length, 0);
    const check = new FileCheck(f.fd, { md5: true, validate: {} });
    await assert.rejects(check.result(notATar.length), (err) => err instanceof LayerValidationError && err.rule === "NOT_A_TAR");
    await check.cancel();
  });
});
