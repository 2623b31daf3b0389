import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, afterEach, before, beforeEach, describe, it } from "node:test";
import type { S3Client } from "@aws-sdk/client-s3";
import { BlobStore } from "../../agent/blobs/store.ts";
import { InvalidDigestError } from "../../agent/blobs/digest.ts";
import { createS3Client } from "../../agent/s3/client.ts";
import type { S3Config } from "../../agent/s3/client.ts";
import { S3Error } from "../../agent/s3/errors.ts";
import { listImageLayers } from "../../agent/s3/image-source.ts";
import type { LayerObject } from "../../agent/s3/image-source.ts";
import { startS3rver, startTamperProxy } from "../helpers/s3rver.ts";
import type { TamperProxy, TestS3 } from "../helpers/s3rver.ts";

let s3: TestS3;
let proxy: TamperProxy;
let cfg: S3Config;
let client: S3Client;
let viaProxy: S3Client;
let stateDir: string;
let store: BlobStore;

// 300 KiB of non-repeating bytes: several chunks on the wire.
const LAYER = Buffer.from(Array.from({ length: 300 * 1024 }, (_, i) => (i * 7919 + (i >> 8)) & 0xff));
const sha256 = (data: Buffer | string) => `sha256:${createHash("sha256").update(data).digest("hex")}`;

before(async () => {
  s3 = await startS3rver();
  await s3.putMany([
    ["images/app/1.tar", LAYER],
    ["images/app/2.tar", "second layer"],
    ["images/same/1.tar", LAYER],
  ]);
  proxy = await startTamperProxy(s3.endpoint);
  // One try per request here: retries, resumes and replaced objects are test/unit/blobs-download-faults.test.ts.
  cfg = { endpoint: s3.endpoint, bucket: s3.bucket, prefix: "images/", region: "us-east-1", download: { attempts: 1, maxObjectChanges: 0 } };
  client = createS3Client(cfg);
  viaProxy = createS3Client({ ...cfg, endpoint: proxy.endpoint, timeouts: { idleMs: 300 } });
});
after(async () => {
  client.destroy();
  viaProxy.destroy();
  await proxy.close();
  await s3.close();
});
beforeEach(async () => {
  stateDir = await mkdtemp(join(tmpdir(), "imgd-blobs-"));
  store = new BlobStore(stateDir);
  await store.init();
  proxy.tamper = () => undefined;
});
afterEach(async () => {
  await rm(stateDir, { recursive: true, force: true });
});

const layer = async (image: string, position: number): Promise<LayerObject> => (await listImageLayers(client, cfg, image))[position - 1];
const tmpFiles = () => readdir(join(stateDir, "tmp"));
const blobFiles = () => readdir(join(stateDir, "blobs", "sha256"));

async function rejectsWith(promise: Promise<unknown>, code: string, permanent: boolean, message?: RegExp) {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof S3Error, `expected an S3Error, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.equal(err.permanent, permanent, err.message);
    if (message) assert.match(err.message, message);
    return true;
  });
}

describe("BlobStore layout", () => {
  it("creates blobs/sha256 and tmp with mode 0750", async () => {
    for (const dir of ["blobs", "blobs/sha256", "tmp"]) {
      assert.equal((await stat(join(stateDir, dir))).mode & 0o777, 0o750, dir);
    }
  });

  it("init deletes temp files left by a crash, and nothing else", async () => {
    const leftover = join(stateDir, "tmp", `blob-${"ab".repeat(16)}.part`);
    const foreign = join(stateDir, "tmp", "somebody-elses-file");
    await writeFile(leftover, "half a layer");
    await writeFile(foreign, "x");
    await store.init();
    assert.deepEqual(await tmpFiles(), ["somebody-elses-file"]);
  });

  it("names blobs only by validated digests", () => {
    const hex = "0123456789abcdef".repeat(4);
    assert.equal(store.pathFor(`sha256:${hex}`), join(stateDir, "blobs", "sha256", hex));
    for (const bad of ["", hex, `sha256:${hex.toUpperCase()}`, `sha256:${hex}0`, "sha256:../../etc/passwd", `sha512:${hex}`, `sha256:${hex}\n`]) {
      assert.throws(() => store.pathFor(bad), InvalidDigestError, bad);
    }
  });

  it("refuses a relative state dir", () => {
    assert.throws(() => new BlobStore("var/lib/imgd"), /absolute/);
  });
});

describe("BlobStore.downloadLayer", () => {
  it("stores the layer under its sha256, 0640, with no temp file left", async () => {
    const obj = await layer("app", 1);
    const progress: number[] = [];
    const got = await store.downloadLayer(client, cfg, obj, { onProgress: (done, total) => (assert.equal(total, LAYER.length), progress.push(done)) });
    assert.deepEqual(got, { digest: sha256(LAYER), size: LAYER.length, etag: obj.etag });
    const path = store.pathFor(got.digest);
    assert.ok((await readFile(path)).equals(LAYER));
    assert.equal((await stat(path)).mode & 0o777, 0o640);
    assert.deepEqual(await tmpFiles(), []);
    assert.deepEqual(await store.has(got.digest), { size: LAYER.length });
    assert.equal(await store.verify(got.digest), "ok");
    assert.ok(progress.length >= 1);
    assert.deepEqual(progress, [...progress].sort((a, b) => a - b), "progress only grows");
    assert.equal(progress.at(-1), LAYER.length);
  });

  it("is idempotent: the same bytes again (even from another key) keep the one stored blob", async () => {
    const first = await store.downloadLayer(client, cfg, await layer("app", 1));
    const before = await stat(store.pathFor(first.digest));
    const again = await store.downloadLayer(client, cfg, await layer("same", 1));
    assert.deepEqual(again, first);
    assert.deepEqual(await blobFiles(), [first.digest.slice("sha256:".length)]);
    assert.equal((await stat(store.pathFor(first.digest))).ino, before.ino, "existing blob kept");
    assert.deepEqual(await tmpFiles(), []);
  });

  it("handles concurrent downloads of the same bytes", async () => {
    const obj = await layer("app", 1);
    const results = await Promise.all([1, 2, 3].map(() => store.downloadLayer(client, cfg, obj)));
    assert.ok(results.every((r) => r.digest === sha256(LAYER)));
    assert.equal((await blobFiles()).length, 1);
    assert.deepEqual(await tmpFiles(), []);
  });

  it("with no object changes allowed, refuses an object overwritten between listing and download", async () => {
    const stale = await layer("app", 2);
    await s3.put("images/app/2.tar", "second layer, rewritten");
    try {
      await rejectsWith(store.downloadLayer(client, cfg, stale), "OBJECT_CHANGED", true, /object keeps changing: replaced 1 times.*changed since it was listed/);
    } finally {
      await s3.put("images/app/2.tar", "second layer");
    }
    assert.deepEqual(await tmpFiles(), []);
    assert.deepEqual(await blobFiles(), []);
  });

  it("sends If-Match with the listed ETag, and takes a 412 for a replaced object", async () => {
    const obj = await layer("app", 2);
    proxy.tamper = (req) => (req.method === "GET" && req.url.includes("2.tar") ? { reply: { status: 412, body: "<Error><Code>PreconditionFailed</Code><Message>m</Message></Error>" } } : undefined);
    await rejectsWith(store.downloadLayer(viaProxy, cfg, obj), "OBJECT_CHANGED", true, /PreconditionFailed/);
    assert.equal(proxy.requests.at(-1)?.headers["if-match"], obj.etag);
    assert.deepEqual(await tmpFiles(), []);
  });

  it("refuses bytes whose MD5 is not the ETag (permanent CORRUPT)", async () => {
    const obj = await layer("app", 1);
    const flipped = Buffer.from(LAYER);
    flipped[1000] ^= 0xff;
    proxy.tamper = (req) => (req.method === "GET" ? { body: flipped } : undefined);
    await rejectsWith(store.downloadLayer(viaProxy, cfg, obj), "CORRUPT", true, /does not match its ETag/);
    assert.deepEqual(await tmpFiles(), []);
    assert.deepEqual(await blobFiles(), []);
  });

  it("refuses bytes that fail S3's own checksum, as the SDK checks it (permanent CORRUPT)", async () => {
    const obj = await layer("app", 2);
    proxy.tamper = (req) => (req.method === "GET" ? { headers: { "x-amz-checksum-crc32": "AAAAAA==" } } : undefined);
    await rejectsWith(store.downloadLayer(viaProxy, cfg, obj), "CORRUPT", true, /Checksum mismatch/);
    assert.equal(proxy.requests.at(-1)?.headers["x-amz-checksum-mode"], "ENABLED");
    assert.deepEqual(await tmpFiles(), []);
    assert.deepEqual(await blobFiles(), []);
  });

  it("skips the MD5 check for multipart ETags but still checks they match", async () => {
    const obj = { ...(await layer("app", 2)), etag: '"0123456789abcdef0123456789abcdef-3"' };
    proxy.tamper = (req) => (req.method === "GET" ? { headers: { etag: obj.etag } } : undefined);
    const got = await store.downloadLayer(viaProxy, cfg, obj);
    assert.equal(got.digest, sha256("second layer"));
  });

  it("refuses a Content-Length that differs from the listed size (permanent)", async () => {
    const obj = { ...(await layer("app", 2)) };
    obj.size += 1;
    await rejectsWith(store.downloadLayer(client, cfg, obj), "BAD_RESPONSE", true, /Content-Length 12 differs from the 13 bytes expected \(listed size 13, same ETag\): the response lies about its size/);
    assert.deepEqual(await tmpFiles(), []);
  });

  it("refuses a response without an ETag (permanent)", async () => {
    const obj = await layer("app", 2);
    proxy.tamper = (req) => (req.method === "GET" ? { headers: { etag: null } } : undefined);
    await rejectsWith(store.downloadLayer(viaProxy, cfg, obj), "BAD_RESPONSE", true, /no ETag/);
  });

  it("reports a body cut short as transient and deletes the temp file", async () => {
    const obj = await layer("app", 1);
    proxy.tamper = (req) => (req.method === "GET" ? { cutAfter: 100_000 } : undefined);
    await rejectsWith(store.downloadLayer(viaProxy, cfg, obj), "NETWORK", false);
    assert.deepEqual(await tmpFiles(), []);
    assert.deepEqual(await blobFiles(), []);
  });

  it("times out a body that stalls (transient TIMEOUT) and deletes the temp file", async () => {
    const obj = await layer("app", 1);
    proxy.tamper = (req) => (req.method === "GET" ? { stallAfter: 100_000 } : undefined);
    const started = Date.now();
    await rejectsWith(store.downloadLayer(viaProxy, cfg, obj), "TIMEOUT", false);
    assert.ok(Date.now() - started < 5000);
    assert.deepEqual(await tmpFiles(), []);
  });

  it("stops on abort, passing the AbortError through and deleting the temp file", async () => {
    const obj = await layer("app", 1);
    proxy.tamper = (req) => (req.method === "GET" ? { stallAfter: 100_000 } : undefined);
    const controller = new AbortController();
    const download = store.downloadLayer(viaProxy, cfg, obj, {
      signal: controller.signal,
      onProgress: () => controller.abort(),
    });
    await assert.rejects(download, { name: "AbortError" });
    assert.deepEqual(await tmpFiles(), []);
  });

  it("reports a deleted object as permanent NOT_FOUND", async () => {
    const obj = { ...(await layer("app", 2)), key: "images/app/9.tar" };
    await rejectsWith(store.downloadLayer(client, cfg, obj), "NOT_FOUND", true);
    assert.deepEqual(await tmpFiles(), []);
  });

  it("works anonymously against s3rver (no Authorization header sent)", async () => {
    proxy.requests.length = 0;
    await store.downloadLayer(viaProxy, cfg, await layer("app", 2));
    assert.equal(proxy.requests.length, 1);
    assert.equal(proxy.requests[0].headers.authorization, undefined);
  });
});

describe("BlobStore has / verify / remove", () => {
  it("detects a corrupted blob and removes it", async () => {
    const { digest } = await store.downloadLayer(client, cfg, await layer("app", 2));
    await writeFile(store.pathFor(digest), "tampered bytes");
    assert.equal(await store.verify(digest), "corrupt");
    await store.remove(digest);
    assert.equal(await store.has(digest), undefined);
    assert.equal(await store.verify(digest), "missing");
    await store.remove(digest); // no error when already gone
  });
});
