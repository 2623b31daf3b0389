import assert from "node:assert/strict";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { after, before, describe, it } from "node:test";
import { ListObjectsV2Command } from "@aws-sdk/client-s3";
import { createS3Client } from "../../agent/s3/client.ts";
import type { S3Config } from "../../agent/s3/client.ts";
import { classifyS3Error, isPermanentS3Error, S3Error } from "../../agent/s3/errors.ts";
import { startS3rver, startTamperProxy } from "../helpers/s3rver.ts";
import type { TamperProxy, TestS3 } from "../helpers/s3rver.ts";

let s3: TestS3;
let proxy: TamperProxy;

before(async () => {
  s3 = await startS3rver();
  await s3.put("images/x/1.tar", "hello");
  proxy = await startTamperProxy(s3.endpoint);
});
after(async () => {
  await proxy.close();
  await s3.close();
});

const cfgFor = (endpoint: string, extra: Partial<S3Config> = {}): S3Config => ({ endpoint, bucket: s3.bucket, prefix: "images/", region: "us-east-1", ...extra });

async function list(cfg: S3Config) {
  const client = createS3Client(cfg);
  try {
    return await client.send(new ListObjectsV2Command({ Bucket: cfg.bucket, Prefix: "images/" }));
  } finally {
    client.destroy();
  }
}

describe("createS3Client", () => {
  it("sends unsigned, path-style requests when no credentials are configured, whatever the environment holds", async () => {
    // Credentials in the environment must not be picked up: anonymous means anonymous.
    const saved = { id: process.env.AWS_ACCESS_KEY_ID, secret: process.env.AWS_SECRET_ACCESS_KEY };
    process.env.AWS_ACCESS_KEY_ID = "AKIDFROMENV";
    process.env.AWS_SECRET_ACCESS_KEY = "secret-from-env";
    proxy.requests.length = 0;
    try {
      const out = await list(cfgFor(proxy.endpoint));
      assert.deepEqual(out.Contents?.map((o) => o.Key), ["images/x/1.tar"]);
    } finally {
      if (saved.id === undefined) delete process.env.AWS_ACCESS_KEY_ID;
      else process.env.AWS_ACCESS_KEY_ID = saved.id;
      if (saved.secret === undefined) delete process.env.AWS_SECRET_ACCESS_KEY;
      else process.env.AWS_SECRET_ACCESS_KEY = saved.secret;
    }
    assert.equal(proxy.requests.length, 1);
    const [req] = proxy.requests;
    assert.equal(req.headers.authorization, undefined);
    assert.equal(req.headers["x-amz-security-token"], undefined);
    assert.ok(req.url.startsWith(`/${s3.bucket}?`) || req.url.startsWith(`/${s3.bucket}/`), req.url);
  });

  it("signs with SigV4 when credentials are configured", async () => {
    proxy.requests.length = 0;
    const out = await list(cfgFor(proxy.endpoint, { credentials: { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" } }));
    assert.equal(out.KeyCount, 1);
    assert.match(String(proxy.requests[0].headers.authorization), /^AWS4-HMAC-SHA256 Credential=S3RVER\//);
  });

  it("gives up on a server that never answers instead of hanging", async () => {
    const silent = createServer(() => {}); // accepts, never responds
    await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve));
    const started = Date.now();
    try {
      await assert.rejects(list(cfgFor(`http://127.0.0.1:${(silent.address() as AddressInfo).port}`, { timeouts: { requestMs: 300 } })), (err: unknown) => {
        const classified = classifyS3Error(err, "listing");
        return classified instanceof S3Error && classified.code === "TIMEOUT" && !classified.permanent;
      });
    } finally {
      silent.closeAllConnections();
      silent.close();
    }
    assert.ok(Date.now() - started < 5000, "timed out promptly");
  });

  it("reports a refused connection as a transient network error", async () => {
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, "127.0.0.1", resolve));
    const port = (closed.address() as AddressInfo).port;
    await new Promise<void>((resolve) => closed.close(() => resolve()));
    await assert.rejects(list(cfgFor(`http://127.0.0.1:${port}`)), (err: unknown) => {
      const classified = classifyS3Error(err, "listing");
      return classified instanceof S3Error && classified.code === "NETWORK" && !classified.permanent;
    });
  });
});

describe("classifyS3Error", () => {
  const errorReply = (status: number, code: string) => ({
    reply: { status, body: `<?xml version="1.0" encoding="UTF-8"?><Error><Code>${code}</Code><Message>m</Message></Error>` },
  });
  const cases: Array<[number, string, string, boolean]> = [
    [503, "SlowDown", "THROTTLED", false],
    [500, "InternalError", "SERVER_ERROR", false],
    [400, "RequestTimeout", "TIMEOUT", false],
    [403, "AccessDenied", "ACCESS_DENIED", true],
    [404, "NoSuchBucket", "NO_SUCH_BUCKET", true],
    [301, "PermanentRedirect", "WRONG_REGION", true],
    [400, "InvalidArgument", "CLIENT_ERROR", true],
  ];
  for (const [status, code, expected, permanent] of cases) {
    it(`maps HTTP ${status} ${code} to ${permanent ? "permanent" : "transient"} ${expected}`, async () => {
      proxy.tamper = () => errorReply(status, code);
      try {
        await assert.rejects(list(cfgFor(proxy.endpoint)), (err: unknown) => {
          const classified = classifyS3Error(err, "listing");
          assert.ok(classified instanceof S3Error, String(err));
          assert.equal(classified.code, expected);
          assert.equal(classified.permanent, permanent);
          assert.equal(isPermanentS3Error(classified), permanent);
          assert.match(classified.message, /^listing: /);
          return true;
        });
      } finally {
        proxy.tamper = () => undefined;
      }
    });
  }

  it("passes AbortErrors and S3Errors through unchanged", () => {
    const abort = Object.assign(new Error("aborted"), { name: "AbortError" });
    assert.equal(classifyS3Error(abort, "x"), abort);
    const mine = new S3Error("CORRUPT", true, "m");
    assert.equal(classifyS3Error(mine, "x"), mine);
  });
});
