// Seeding s3rver's store directly (test/fixtures/s3rver-store.ts): a real s3rver serves the
// seeded files through the real S3 client as if they had been uploaded: listing, HEAD and GET
// with ETag = MD5, Range reads; and a later PutObject or CopyObject over a seeded key leaves the
// source file alone. Prints how long ~200 MB take to seed (and start the server).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, readlinkSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { CopyObjectCommand, GetObjectCommand, HeadObjectCommand, ListObjectsV2Command, PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { pseudoRandomBytes } from "../fixtures/prng.ts";
import { seedS3rverStore, updateMd5Cache } from "../fixtures/s3rver-store.ts";
import { startS3rver, type TestS3 } from "../helpers/s3rver.ts";

const MiB = 1024 * 1024;
const source = mkdtempSync(join(tmpdir(), "imgd-seed-src-"));
/** key -> bytes: large layers, a small one, an empty one, a key with several levels. */
const files = new Map<string, Buffer>();
let s3: TestS3;
let client: S3Client;

const md5 = (bytes: Buffer) => createHash("md5").update(bytes).digest("hex");
/** A body of `size` bytes: a random MiB repeated, with the key written in (no two files alike). */
function body(key: string, size: number): Buffer {
  const block = pseudoRandomBytes(key, MiB);
  const out = Buffer.alloc(size);
  for (let at = 0; at < size; at += MiB) block.copy(out, at, 0, Math.min(MiB, size - at));
  out.write(key, 0);
  return out;
}

before(async () => {
  for (const [key, size] of [["images/golang/1.tar", 120 * MiB], ["images/golang/2.tar", 60 * MiB], ["images/node/1.tar", 20 * MiB + 17], ["images/node/2.tar", 1234], ["images/empty/1.tar", 0], ["a/b/c/d/deep.bin", 10]] as const) {
    const bytes = body(key, size);
    files.set(key, bytes);
    mkdirSync(dirname(join(source, key)), { recursive: true });
    writeFileSync(join(source, key), bytes);
  }
  const t0 = performance.now();
  s3 = await startS3rver("seeded", { seedFrom: source });
  const total = [...files.values()].reduce((n, b) => n + b.length, 0);
  console.log(`seeded ${files.size} objects, ${(total / MiB).toFixed(0)} MiB, into s3rver's store and started it in ${((performance.now() - t0) / 1000).toFixed(2)} s`);
  client = new S3Client({ endpoint: s3.endpoint, region: "us-east-1", forcePathStyle: true, credentials: { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" }, requestChecksumCalculation: "WHEN_REQUIRED" });
});

after(async () => {
  client?.destroy();
  await s3?.close();
  rmSync(source, { recursive: true, force: true });
});

test("the store holds a link, the MD5 and the metadata per object: no object bytes are copied", async () => {
  const data = mkdtempSync(join(tmpdir(), "imgd-seed-store-"));
  try {
    const seeded = await seedS3rverStore(data, "b", source);
    assert.deepEqual(seeded, { objects: files.size, bytes: [...files.values()].reduce((n, b) => n + b.length, 0) });
    for (const [key, bytes] of files) {
      const object = join(data, "b", `${key}._S3rver_object`);
      assert.equal(readlinkSync(object), join(source, key), key);
      assert.equal(readFileSync(`${object}.md5`, "utf8"), md5(bytes), key);
      assert.deepEqual(JSON.parse(readFileSync(join(data, "b", `${key}._S3rver_metadata.json`), "utf8")), { "content-type": "application/octet-stream" });
    }
  } finally {
    rmSync(data, { recursive: true, force: true });
  }
});

test("a listing shows every seeded key with its size and MD5 ETag, across pages", async () => {
  const listed = new Map<string, { size: number; etag: string }>();
  let token: string | undefined;
  do {
    const page = await client.send(new ListObjectsV2Command({ Bucket: "seeded", MaxKeys: 2, ContinuationToken: token }));
    for (const o of page.Contents ?? []) listed.set(o.Key!, { size: o.Size!, etag: o.ETag! });
    token = page.NextContinuationToken;
  } while (token);
  assert.deepEqual([...listed.keys()].sort(), [...files.keys()].sort());
  for (const [key, bytes] of files) assert.deepEqual(listed.get(key), { size: bytes.length, etag: `"${md5(bytes)}"` }, key);
  const prefixed = await client.send(new ListObjectsV2Command({ Bucket: "seeded", Prefix: "images/golang/" }));
  assert.deepEqual(prefixed.Contents!.map((o) => o.Key), ["images/golang/1.tar", "images/golang/2.tar"]);
});

test("HEAD and GET give the bytes, the length and ETag = MD5", async () => {
  for (const [key, bytes] of files) {
    const head = await client.send(new HeadObjectCommand({ Bucket: "seeded", Key: key }));
    assert.equal(head.ContentLength, bytes.length, key);
    assert.equal(head.ETag, `"${md5(bytes)}"`, key);
    if (bytes.length > 30 * MiB) continue; // the large ones are read by range below
    const got = await client.send(new GetObjectCommand({ Bucket: "seeded", Key: key }));
    assert.equal(got.ETag, head.ETag);
    assert.ok(Buffer.from(await got.Body!.transformToByteArray()).equals(bytes), key);
  }
});

test("Range reads return exactly the bytes asked for", async () => {
  const key = "images/golang/1.tar";
  const bytes = files.get(key)!;
  for (const [start, end] of [[0, 99], [MiB - 10, MiB + 9], [bytes.length - 100, bytes.length - 1], [50 * MiB, 58 * MiB - 1]] as const) {
    const got = await client.send(new GetObjectCommand({ Bucket: "seeded", Key: key, Range: `bytes=${start}-${end}`, IfMatch: `"${md5(bytes)}"` }));
    assert.equal(got.ContentRange, `bytes ${start}-${end}/${bytes.length}`);
    assert.ok(Buffer.from(await got.Body!.transformToByteArray()).equals(bytes.subarray(start, end + 1)), `${start}-${end}`);
  }
});

test("PutObject and CopyObject over a seeded key store a new object; the source files stay as they were", async () => {
  const key = "images/node/2.tar";
  await client.send(new PutObjectCommand({ Bucket: "seeded", Key: key, Body: "replaced" }));
  const got = await client.send(new GetObjectCommand({ Bucket: "seeded", Key: key }));
  assert.equal(await got.Body!.transformToString(), "replaced");
  assert.ok(readFileSync(join(source, key)).equals(files.get(key)!), "the source file is unchanged");

  await client.send(new CopyObjectCommand({ Bucket: "seeded", Key: "images/empty/1.tar", CopySource: "seeded/images/node/1.tar" }));
  const copied = await client.send(new HeadObjectCommand({ Bucket: "seeded", Key: "images/empty/1.tar" }));
  assert.equal(copied.ContentLength, files.get("images/node/1.tar")!.length);
  assert.equal(readFileSync(join(source, "images/empty/1.tar")).length, 0, "the copy's source file is unchanged");
  // A copy of a seeded object is a link to the same source: a later write to it is guarded too.
  await client.send(new PutObjectCommand({ Bucket: "seeded", Key: "images/empty/1.tar", Body: "x" }));
  assert.ok(readFileSync(join(source, "images/node/1.tar")).equals(files.get("images/node/1.tar")!));
});

test("an MD5 cache made beforehand is used for unchanged files; a changed file is hashed again", async () => {
  const dir = mkdtempSync(join(tmpdir(), "imgd-seed-cache-"));
  try {
    mkdirSync(join(dir, "src/images/a"), { recursive: true });
    writeFileSync(join(dir, "src/images/a/1.tar"), "one");
    writeFileSync(join(dir, "src/images/a/2.tar"), "two");
    const cachePath = join(dir, "md5.json");
    await updateMd5Cache(join(dir, "src"), cachePath);
    const cache = JSON.parse(readFileSync(cachePath, "utf8"));
    assert.equal(cache["images/a/1.tar"].md5, md5(Buffer.from("one")));
    // A planted value shows the cache is read; 2.tar then changes (same size, new mtime).
    cache["images/a/1.tar"].md5 = "0123456789abcdef0123456789abcdef";
    writeFileSync(cachePath, JSON.stringify(cache));
    writeFileSync(join(dir, "src/images/a/2.tar"), "TWO");
    utimesSync(join(dir, "src/images/a/2.tar"), new Date(), new Date(Date.now() + 5000));
    await seedS3rverStore(join(dir, "store"), "b", join(dir, "src"), { md5Cache: cachePath });
    assert.equal(readFileSync(join(dir, "store/b/images/a/1.tar._S3rver_object.md5"), "utf8"), "0123456789abcdef0123456789abcdef");
    assert.equal(readFileSync(join(dir, "store/b/images/a/2.tar._S3rver_object.md5"), "utf8"), md5(Buffer.from("TWO")));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
