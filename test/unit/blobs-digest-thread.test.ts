// agent/blobs/digest-thread.ts: the download's digests computed on the hashing thread from the
// file itself, as its written prefix grows; a real temp file and the real worker.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { open } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FileDigests } from "../../agent/blobs/digest-thread.ts";

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
    const withMd5 = new FileDigests(file.fd, true);
    const without = new FileDigests(file.fd, false);
    for (let at = 0; at < data.length; at += 700_000) {
      const piece = data.subarray(at, at + 700_000);
      await file.write(piece, 0, piece.length, at);
      withMd5.available(at + piece.length);
    }
    assert.deepEqual(await withMd5.digests(data.length), { sha256Hex: hex("sha256", data), md5Hex: hex("md5", data) });
    assert.deepEqual(await without.digests(data.length), { sha256Hex: hex("sha256", data) });
  });
});

test("a file shorter than what was said to be written is an error, not a digest", async () => {
  await withFile(async (file) => {
    await file.write(Buffer.from("short"), 0, 5, 0);
    const digests = new FileDigests(file.fd, true);
    await assert.rejects(digests.digests(10), /hashing the download failed: the download's file ends at 5, before the 10 bytes written/);
  });
});

test("a cancelled job stops; a new job on the same file starts from its first byte", async () => {
  await withFile(async (file) => {
    await file.write(Buffer.from("old version"), 0, 11, 0);
    const old = new FileDigests(file.fd, false);
    old.available(11);
    await old.cancel();
    await file.truncate(0);
    const fresh = Buffer.from("new");
    await file.write(fresh, 0, 3, 0);
    assert.deepEqual(await new FileDigests(file.fd, false).digests(3), { sha256Hex: hex("sha256", fresh) });
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
      const older = new FileDigests(first.fd, true);
      const newer = new FileDigests(later.fd, true);
      const order: string[] = [];
      const newerDone = newer.digests(big.length).then((d) => (order.push("later"), d));
      const olderDone = older.digests(small.length).then((d) => (order.push("first"), d));
      assert.deepEqual(await olderDone, { sha256Hex: hex("sha256", small), md5Hex: hex("md5", small) });
      assert.deepEqual(await newerDone, { sha256Hex: hex("sha256", big), md5Hex: hex("md5", big) });
      assert.deepEqual(order, ["first", "later"]);
    });
  });
});
