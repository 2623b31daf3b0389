// Layer downloads against a faulty S3: a real s3rver over HTTP behind the fault-injecting proxy
// (test/helpers/fault-proxy.ts), through the agent's real BlobStore and S3 client. Each test
// scripts the faults of the requests for one object and checks the exact requests the proxy
// saw (count, Range, If-Match) and the stored bytes.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, afterEach, before, beforeEach, describe, it } from "node:test";
import type { S3Client } from "@aws-sdk/client-s3";
import { backoffDelayMs, retryAfterOf } from "../../agent/blobs/backoff.ts";
import { splitRanges } from "../../agent/blobs/layer-download.ts";
import { BlobStore } from "../../agent/blobs/store.ts";
import { createS3Client, DOWNLOAD_DEFAULTS } from "../../agent/s3/client.ts";
import type { DownloadPolicy, S3Config } from "../../agent/s3/client.ts";
import { S3Error } from "../../agent/s3/errors.ts";
import { LayerValidationError } from "../../agent/layers/validate.ts";
import { buildTar } from "../fixtures/tar-build.ts";
import { listImageLayers } from "../../agent/s3/image-source.ts";
import type { LayerObject } from "../../agent/s3/image-source.ts";
import { startFaultProxy } from "../helpers/fault-proxy.ts";
import type { RecordedRequest, Tamper, TamperProxy } from "../helpers/fault-proxy.ts";
import { startS3rver } from "../helpers/s3rver.ts";
import type { TestS3 } from "../helpers/s3rver.ts";

const bytes = (n: number, seed: number) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 7919 + seed + (i >> 9)) & 0xff));
const SMALL = bytes(100 * 1024, 1); // below the parallel threshold: one GET
const LARGE = bytes(1024 * 1024 + 123, 2); // 17 parts of 64 KiB
// A real layer of about 1.2 MiB (19 parts of 64 KiB), for the validator.
const LAYER_FILES = 40;
let LAYER: Buffer;
const sha256 = (data: Buffer) => `sha256:${createHash("sha256").update(data).digest("hex")}`;

const POLICY: Partial<DownloadPolicy> = {
  attempts: 4,
  backoffMs: 1,
  backoffMaxMs: 5,
  retryAfterMaxMs: 300,
  maxObjectChanges: 2,
  parallelThreshold: 256 * 1024,
  partSize: 64 * 1024,
  partConcurrency: 3,
};
const TIMEOUTS = { connectMs: 1000, requestMs: 400, idleMs: 300 };

let s3: TestS3;
let proxy: TamperProxy;
let cfg: S3Config;
let client: S3Client;
let stateDir: string;
let store: BlobStore;

before(async () => {
  s3 = await startS3rver();
  LAYER = await buildTar(Array.from({ length: LAYER_FILES }, (_, i) => ({ name: `usr/lib/f${i}`, type: "file", mode: 0o644, uid: 0, gid: 0, mtime: 1_700_000_000, content: bytes(30_000, i) })));
  await s3.putMany([
    ["images/small/1.tar", SMALL],
    ["images/large/1.tar", LARGE],
    ["images/layer/1.tar", LAYER],
  ]);
  proxy = await startFaultProxy(s3.endpoint);
  cfg = { endpoint: proxy.endpoint, bucket: s3.bucket, prefix: "images/", region: "us-east-1", timeouts: TIMEOUTS, download: POLICY };
  client = createS3Client(cfg);
});
after(async () => {
  client.destroy();
  await proxy.close();
  await s3.close();
});
beforeEach(async () => {
  stateDir = await mkdtemp(join(tmpdir(), "imgd-faults-"));
  store = new BlobStore(stateDir);
  await store.init();
  proxy.tamper = () => undefined;
});
afterEach(async () => {
  assert.deepEqual(await readdir(join(stateDir, "tmp")), [], "no temp file is left");
  await rm(stateDir, { recursive: true, force: true });
});

const listed = async (image: string): Promise<LayerObject> => (await listImageLayers(client, cfg, image))[0];
const forKey = (image: string) => (req: RecordedRequest) => req.url.split("?")[0] === `/${s3.bucket}/images/${image}/1.tar`;

/** Scripts the next requests for the object, downloads it, and returns the requests it made. */
async function download(image: string, plans: Array<Tamper | undefined>, policy: Partial<DownloadPolicy> = {}, via: S3Client = client) {
  const obj = await listed(image);
  proxy.script(forKey(image), plans);
  const from = proxy.requests.length;
  const started = performance.now();
  const result = await store.downloadLayer(via, { ...cfg, download: { ...POLICY, ...policy } }, obj).then(
    (stored) => ({ stored, error: undefined }),
    (error: unknown) => ({ stored: undefined, error }),
  );
  const requests = proxy.requests.slice(from).filter(forKey(image));
  return { ...result, obj, requests, ms: performance.now() - started, summary: requests.map((r) => `${r.method} ${r.headers.range ?? "-"} ${r.status ?? "no answer"}`) };
}

async function assertStored(stored: { digest: string } | undefined, error: unknown, data: Buffer) {
  assert.equal(error, undefined, String(error));
  assert.equal(stored!.digest, sha256(data));
  assert.ok((await readFile(store.pathFor(stored!.digest))).equals(data), "stored bytes are the object's");
}

function assertS3Error(error: unknown, code: string, permanent: boolean, message: RegExp) {
  assert.ok(error instanceof S3Error, `expected an S3Error, got ${String(error)}`);
  assert.equal(error.code, code, error.message);
  assert.equal(error.permanent, permanent, error.message);
  assert.match(error.message, message);
}

const xmlError = (status: number, code: string, headers: Record<string, string> = {}): Tamper => ({
  reply: { status, body: `<Error><Code>${code}</Code><Message>injected</Message></Error>`, headers: { "content-type": "application/xml", ...headers } },
});
const last = SMALL.length - 1;

describe("retried faults resume and succeed", () => {
  it("500: one retry, the whole object again (nothing was written)", async () => {
    const r = await download("small", [xmlError(500, "InternalError")]);
    await assertStored(r.stored, r.error, SMALL);
    assert.deepEqual(r.summary, ["GET - 500", "GET - 200"]);
    assert.ok(r.requests.every((q) => q.headers["if-match"] === r.obj.etag), "every GET is pinned to the listed ETag");
  });

  it("503 without Retry-After: retried after the jittered backoff only", async () => {
    const r = await download("small", [xmlError(503, "SlowDown")]);
    await assertStored(r.stored, r.error, SMALL);
    assert.deepEqual(r.summary, ["GET - 503", "GET - 200"]);
    const gap = r.requests[1].start - r.requests[0].start;
    assert.ok(gap < 250, `no Retry-After wait (${gap} ms between the requests)`);
  });

  it("503 with Retry-After: 1 waits, capped at IMGD_DOWNLOAD_RETRY_AFTER_MAX_MS (300 ms here)", async () => {
    const r = await download("small", [xmlError(503, "SlowDown", { "retry-after": "1" })]);
    await assertStored(r.stored, r.error, SMALL);
    assert.deepEqual(r.summary, ["GET - 503", "GET - 200"]);
    const gap = r.requests[1].start - r.requests[0].start;
    assert.ok(gap >= 290 && gap < 900, `waited ${gap} ms: the 1 s Retry-After, capped at 300 ms`);
  });

  it("connection reset mid-body: resumed from the first missing byte", async () => {
    const r = await download("small", [{ cutAfter: 40_000 }]);
    await assertStored(r.stored, r.error, SMALL);
    assert.deepEqual(r.summary, ["GET - 200", `GET bytes=40000-${last} 206`]);
    assert.equal(r.requests[1].headers["if-match"], r.obj.etag, "the resume is pinned to the same ETag");
  });

  it("body shorter than its Content-Length (connection closed early): resumed", async () => {
    const r = await download("small", [{ truncateAfter: 70_000 }]);
    await assertStored(r.stored, r.error, SMALL);
    assert.deepEqual(r.summary, ["GET - 200", `GET bytes=70000-${last} 206`]);
  });

  it("body longer than its Content-Length: the bytes after the announced end are not taken", async () => {
    const r = await download("small", [{ body: Buffer.concat([SMALL, Buffer.from("trailing garbage")]), contentLength: SMALL.length }]);
    await assertStored(r.stored, r.error, SMALL);
    assert.deepEqual(r.summary, ["GET - 200"]);
  });

  it("slow (throttled) body: no retry, just slower, even past the first-byte timeout (which ends at the headers)", async () => {
    const r = await download("small", [{ throttle: { bytes: 16 * 1024, delayMs: 70 } }]);
    await assertStored(r.stored, r.error, SMALL);
    assert.deepEqual(r.summary, ["GET - 200"]);
    assert.ok(r.ms >= 7 * 70 && r.ms > TIMEOUTS.requestMs, `took ${r.ms} ms`);
  });

  it("stall after the headers and some bytes: the idle timeout (300 ms) fires, then resumes", async () => {
    const r = await download("small", [{ stallAfter: 50_000 }]);
    await assertStored(r.stored, r.error, SMALL);
    assert.deepEqual(r.summary, ["GET - 200", `GET bytes=50000-${last} 206`]);
    assert.ok(r.ms >= 290 && r.ms < 2000, `${r.ms} ms`);
  });

  it("stall before any header: the first-byte timeout (400 ms) fires, then retries", async () => {
    const patient = createS3Client({ ...cfg, timeouts: { ...TIMEOUTS, idleMs: 5000 } }); // so the first-byte timeout is the one that fires
    const r = await download("small", [{ stallHeaders: true }], {}, patient).finally(() => patient.destroy());
    await assertStored(r.stored, r.error, SMALL);
    assert.deepEqual(r.summary, ["GET - no answer", "GET - 200"]);
    assert.ok(r.ms >= 390 && r.ms < 2000, `${r.ms} ms`);
  });

  it("a changed ETag on one response: 412 (If-Match), HEAD, then the object again", async () => {
    const r = await download("small", [{ headers: { etag: '"0123456789abcdef0123456789abcdef"' } }]);
    await assertStored(r.stored, r.error, SMALL);
    assert.deepEqual(r.summary, ["GET - 412", "HEAD - 200", "GET - 200"]);
    assert.equal(r.stored!.etag, r.obj.etag);
  });

  it("an object replaced after the listing: the new version is downloaded, pinned to its ETag", async () => {
    const newer = bytes(90 * 1024, 9);
    const obj = await listed("small");
    const newEtag = await s3.put("images/small/1.tar", newer);
    try {
      const from = proxy.requests.length;
      const stored = await store.downloadLayer(client, cfg, obj);
      const requests = proxy.requests.slice(from).filter(forKey("small"));
      assert.deepEqual(requests.map((q) => `${q.method} ${q.status} ${q.headers["if-match"] ?? "-"}`), [`GET 412 ${obj.etag}`, "HEAD 200 -", `GET 200 ${newEtag}`]);
      await assertStored(stored, undefined, newer);
      assert.deepEqual({ etag: stored.etag, size: stored.size }, { etag: newEtag, size: newer.length });
    } finally {
      await s3.put("images/small/1.tar", SMALL);
    }
  });
});

describe("permanent failures end the download with a clear reason", () => {
  it("403: no retry", async () => {
    const r = await download("small", [xmlError(403, "AccessDenied")]);
    assertS3Error(r.error, "ACCESS_DENIED", true, /downloading "s3:\/\/imgd-test\/images\/small\/1\.tar": AccessDenied \(HTTP 403\)/);
    assert.deepEqual(r.summary, ["GET - 403"]);
  });

  it("404: no retry", async () => {
    const r = await download("small", [xmlError(404, "NoSuchKey")]);
    assertS3Error(r.error, "NOT_FOUND", true, /images\/small\/1\.tar": NoSuchKey \(HTTP 404\)/);
    assert.deepEqual(r.summary, ["GET - 404"]);
  });

  it("an object whose ETag changes on every request: refused after IMGD_DOWNLOAD_MAX_OBJECT_CHANGES (2)", async () => {
    let n = 0;
    const fresh = (): Tamper => ({ headers: { etag: `"${(++n).toString(16).padStart(32, "0")}"` } });
    const r = await download("small", Array.from({ length: 10 }, fresh));
    assertS3Error(r.error, "OBJECT_CHANGED", true, /images\/small\/1\.tar": object keeps changing: replaced 3 times during one download/);
    assert.deepEqual(r.summary, ["GET - 412", "HEAD - 200", "GET - 412", "HEAD - 200", "GET - 412"]);
  });

  it("a Content-Length that lies about the size (shorter than the object): no retry", async () => {
    const r = await download("small", [{ body: SMALL.subarray(0, 1000), contentLength: 1000 }]);
    assertS3Error(r.error, "BAD_RESPONSE", true, /Content-Length 1000 differs from the 102400 bytes expected.*lies about its size/);
    assert.deepEqual(r.summary, ["GET - 200"]);
  });

  it("a body without Content-Length that runs past the object's size: no retry", async () => {
    const r = await download("small", [{ body: Buffer.concat([SMALL, SMALL]), noContentLength: true }]);
    assertS3Error(r.error, "BAD_RESPONSE", true, /body longer than the 102400 bytes expected: the response lies about its size/);
    assert.deepEqual(r.summary, ["GET - 200"]);
  });

  it("a server that keeps failing (503): gives up after IMGD_DOWNLOAD_ATTEMPTS (4), still transient for the FSM", async () => {
    const r = await download("small", Array.from({ length: 4 }, () => xmlError(503, "SlowDown")));
    assertS3Error(r.error, "THROTTLED", false, /gave up after 4 attempts/);
    assert.deepEqual(r.summary, ["GET - 503", "GET - 503", "GET - 503", "GET - 503"]);
  });
});

describe("large layers: parallel ranged GETs pinned to one ETag", () => {
  const parts = splitRanges(LARGE.length, { parallelThreshold: POLICY.parallelThreshold!, partSize: POLICY.partSize! });
  const rangeHeaders = parts.map((p) => `bytes=${p.start}-${p.end - 1}`);

  it("splits into parts of IMGD_DOWNLOAD_PART_SIZE, runs at most IMGD_DOWNLOAD_PART_CONCURRENCY at once, and stores identical bytes", async () => {
    assert.equal(parts.length, 17);
    const slow: Tamper = { throttle: { bytes: 16 * 1024, delayMs: 15 } }; // so parts overlap in time
    const r = await download("large", Array.from({ length: 17 }, () => slow));
    await assertStored(r.stored, r.error, LARGE);
    assert.deepEqual(r.requests.map((q) => q.headers.range).sort(), [...rangeHeaders].sort(), "each part asked for exactly once");
    assert.ok(r.requests.every((q) => q.method === "GET" && q.status === 206 && q.headers["if-match"] === r.obj.etag), "all 206, all pinned to the listed ETag");
    assert.equal(proxy.maxConcurrent(forKey("large")), 3);
  });

  it("a part cut mid-body is resumed alone; the others are not fetched again", async () => {
    const plans: Array<Tamper | undefined> = [undefined, undefined, undefined, { cutAfter: 10_000 }];
    const r = await download("large", plans, { partConcurrency: 1 });
    await assertStored(r.stored, r.error, LARGE);
    assert.equal(r.requests.length, 18);
    const fourth = parts[3];
    assert.deepEqual(r.requests.slice(3, 5).map((q) => q.headers.range), [rangeHeaders[3], `bytes=${fourth.start + 10_000}-${fourth.end - 1}`]);
  });

  it("the MD5 of the whole file is still checked against the single-part ETag", async () => {
    const flipped = Buffer.from(LARGE.subarray(parts[5].start, parts[5].end));
    flipped[7] ^= 0xff;
    const plans: Array<Tamper | undefined> = Array.from({ length: 17 }, (_, i) => (i === 5 ? { body: flipped } : undefined));
    const r = await download("large", plans, { partConcurrency: 1 });
    assertS3Error(r.error, "CORRUPT", true, /content MD5 [0-9a-f]{32} does not match its ETag/);
    assert.equal(r.requests.length, 17);
    assert.deepEqual(await readdir(store.blobDir), [], "nothing stored");
  });

  it("stops every part at once when the pull is cancelled (shutdown), leaving no temp file", async () => {
    const obj = await listed("large");
    proxy.script(forKey("large"), Array.from({ length: 17 }, () => ({ stallAfter: 1000 })));
    const from = proxy.requests.length;
    const controller = new AbortController();
    let progressed = 0;
    const download = store.downloadLayer(client, cfg, obj, {
      signal: controller.signal,
      onProgress: () => {
        if (++progressed === 3) controller.abort();
      },
    });
    await assert.rejects(download, { name: "AbortError" });
    assert.equal(proxy.requests.length - from, 3, "three parts were in flight, no more were started");
  });

  it("a part answered 200 (Range ignored) is refused rather than written at the wrong place", async () => {
    const r = await download("large", [{ headers: { "content-range": null } }], { partConcurrency: 1 });
    assertS3Error(r.error, "BAD_RESPONSE", true, /expected 206 with Content-Range "bytes 0-65535\/1048699"/);
  });
});

describe("validating a layer while it downloads (the check thread reads the temp file's contiguous prefix)", () => {
  it("validates every byte in order while the parts arrive out of order (one resumed); the digest is the object's", async () => {
    const obj = await listed("layer");
    // Part 0 is the slowest and part 3 is cut and resumed: later parts land first.
    const parts = splitRanges(LAYER.length, { ...DOWNLOAD_DEFAULTS, ...POLICY }).length;
    const plans: Array<Tamper | undefined> = Array.from({ length: parts }, (_, i) => ({ throttle: { bytes: 16 * 1024, delayMs: i === 0 ? 40 : 5 } }));
    plans[3] = { cutAfter: 10_000 };
    proxy.script(forKey("layer"), plans);
    const stored = await store.downloadLayer(client, cfg, obj, { validate: {} });
    // A byte out of place would have broken the tar (a header checksum, a member's size).
    assert.equal(stored.summary?.tarBytes, LAYER.length);
    assert.equal(stored.summary?.files, LAYER_FILES);
    assert.equal(stored.digest, sha256(LAYER));
  });

  it("a refusal stops every part at once, deletes the temp file and is thrown as it is", async () => {
    const obj = await listed("large"); // not a tar
    proxy.script(forKey("large"), Array.from({ length: 17 }, () => ({ stallAfter: 20_000 })));
    const from = proxy.requests.length;
    const started = performance.now();
    const download = store.downloadLayer(client, cfg, obj, { validate: {} });
    await assert.rejects(download, (err) => err instanceof LayerValidationError && err.rule === "NOT_A_TAR");
    assert.ok(performance.now() - started < 2000, "not after a timeout");
    assert.equal(proxy.requests.length - from, 3, "the three parts in flight, no more");
    assert.deepEqual(await readdir(store.blobDir), []);
  });

  it("a download error while validating is what the download rejects with", async () => {
    const obj = await listed("small");
    proxy.script(forKey("small"), [{ reply: { status: 403, body: "<Error><Code>AccessDenied</Code><Message>no</Message></Error>" } }]);
    await assert.rejects(store.downloadLayer(client, cfg, obj, { validate: {} }), (err) => err instanceof S3Error && err.code === "ACCESS_DENIED");
  });
});

describe("backoffDelayMs", () => {
  const policy = { ...DOWNLOAD_DEFAULTS, backoffMs: 100, backoffMaxMs: 1000, retryAfterMaxMs: 5000 };
  it("is full jitter: uniform in [0, min(max, base * 2^n)]", () => {
    assert.equal(backoffDelayMs(0, policy, undefined, () => 0.999), 99);
    assert.equal(backoffDelayMs(3, policy, undefined, () => 0.5), 400);
    assert.equal(backoffDelayMs(10, policy, undefined, () => 0.999), 999);
    assert.equal(backoffDelayMs(10, policy, undefined, () => 0), 0);
  });
  it("never waits less than Retry-After, which is capped", () => {
    assert.equal(backoffDelayMs(0, policy, 2000, () => 0.5), 2000);
    assert.equal(backoffDelayMs(0, policy, 60_000, () => 0.5), 5000);
  });
  it("reads Retry-After as seconds or as an HTTP date, and ignores anything else", () => {
    const failed = (value: string) => ({ cause: { $response: { headers: { "retry-after": value } } } });
    const now = Date.parse("2026-11-22T05:00:00Z");
    assert.equal(retryAfterOf(failed("3"), now), 3000);
    assert.equal(retryAfterOf(failed("Sun, 22 Nov 2026 05:00:10 GMT"), now), 10_000);
    assert.equal(retryAfterOf(failed("Sun, 22 Nov 2026 04:00:00 GMT"), now), 0);
    assert.equal(retryAfterOf(failed("soon"), now), undefined);
    assert.equal(retryAfterOf(failed("-5"), now), undefined);
    assert.equal(retryAfterOf(new Error("no response"), now), undefined);
  });
});
