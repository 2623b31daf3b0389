import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { loadS3Config, S3ConfigError } from "../../agent/s3/client.ts";
import { bucketNameProblem } from "../../agent/s3/config.ts";
import { printable } from "../../agent/s3/printable.ts";

describe("loadS3Config", () => {
  it("defaults to the public challenge bucket, anonymous, on AWS", () => {
    assert.deepEqual(loadS3Config({}), { bucket: "flyio-platform-hiring-challenge", prefix: "images/", region: "us-east-1" });
  });

  it("reads every setting", () => {
    const cfg = loadS3Config({
      IMGD_S3_ENDPOINT: "http://127.0.0.1:4568",
      IMGD_S3_BUCKET: "my.bucket-1",
      IMGD_S3_PREFIX: "a/b/",
      IMGD_S3_REGION: "eu-west-3",
      AWS_ACCESS_KEY_ID: "AKIDEXAMPLE",
      AWS_SECRET_ACCESS_KEY: "secret/key+1",
      AWS_SESSION_TOKEN: "tok",
    });
    assert.deepEqual(cfg, {
      endpoint: "http://127.0.0.1:4568",
      bucket: "my.bucket-1",
      prefix: "a/b/",
      region: "eu-west-3",
      credentials: { accessKeyId: "AKIDEXAMPLE", secretAccessKey: "secret/key+1", sessionToken: "tok" },
    });
  });

  it("accepts an empty prefix (images at the bucket root) and treats other empty settings as unset", () => {
    const cfg = loadS3Config({ IMGD_S3_PREFIX: "", IMGD_S3_ENDPOINT: "", IMGD_S3_BUCKET: "", AWS_ACCESS_KEY_ID: "" });
    assert.deepEqual(cfg, { bucket: "flyio-platform-hiring-challenge", prefix: "", region: "us-east-1" });
  });

  const bad: Array<[string, Record<string, string>, RegExp]> = [
    ["prefix without trailing slash", { IMGD_S3_PREFIX: "images" }, /IMGD_S3_PREFIX="images": must be empty or end with "\/"/],
    ["prefix with a leading slash", { IMGD_S3_PREFIX: "/images/" }, /IMGD_S3_PREFIX/],
    ["prefix with ..", { IMGD_S3_PREFIX: "a/../" }, /IMGD_S3_PREFIX/],
    ["prefix with a space", { IMGD_S3_PREFIX: "my images/" }, /IMGD_S3_PREFIX/],
    ["uppercase bucket", { IMGD_S3_BUCKET: "MyBucket" }, /IMGD_S3_BUCKET/],
    ["short bucket", { IMGD_S3_BUCKET: "ab" }, /IMGD_S3_BUCKET/],
    ["bucket with ..", { IMGD_S3_BUCKET: "a..b" }, /IMGD_S3_BUCKET/],
    ["IP bucket", { IMGD_S3_BUCKET: "192.168.1.1" }, /IMGD_S3_BUCKET/],
    ["ftp endpoint", { IMGD_S3_ENDPOINT: "ftp://example.com" }, /IMGD_S3_ENDPOINT.*http/],
    ["non-URL endpoint", { IMGD_S3_ENDPOINT: "localhost:9000" }, /IMGD_S3_ENDPOINT/],
    ["endpoint with credentials", { IMGD_S3_ENDPOINT: "http://u:p@host" }, /IMGD_S3_ENDPOINT.*credentials/],
    ["bad region", { IMGD_S3_REGION: "US East" }, /IMGD_S3_REGION/],
    ["key without secret", { AWS_ACCESS_KEY_ID: "AKID" }, /must be set together/],
    ["secret without key", { AWS_SECRET_ACCESS_KEY: "s" }, /must be set together/],
    ["zero timeout", { IMGD_S3_IDLE_TIMEOUT_MS: "0" }, /IMGD_S3_IDLE_TIMEOUT_MS="0": expected an integer from 1 to 3600000/],
    ["negative attempts", { IMGD_DOWNLOAD_ATTEMPTS: "-1" }, /IMGD_DOWNLOAD_ATTEMPTS/],
    ["tiny part size", { IMGD_DOWNLOAD_PART_SIZE: "10" }, /IMGD_DOWNLOAD_PART_SIZE="10": expected an integer from 1024/],
    ["unit suffix", { IMGD_DOWNLOAD_PARALLEL_THRESHOLD: "64M" }, /IMGD_DOWNLOAD_PARALLEL_THRESHOLD/],
    ["zero max layers", { IMGD_S3_MAX_LAYERS: "0" }, /IMGD_S3_MAX_LAYERS/],
  ];
  for (const [what, env, message] of bad) {
    it(`refuses ${what}`, () => {
      assert.throws(() => loadS3Config(env), (err: unknown) => err instanceof S3ConfigError && message.test(err.message));
    });
  }

  it("reads the timeouts, the max layer count and the download policy", () => {
    const cfg = loadS3Config({
      IMGD_S3_CONNECT_TIMEOUT_MS: "500",
      IMGD_S3_FIRST_BYTE_TIMEOUT_MS: "700",
      IMGD_S3_IDLE_TIMEOUT_MS: "900",
      IMGD_S3_MAX_LAYERS: "20",
      IMGD_DOWNLOAD_ATTEMPTS: "3",
      IMGD_DOWNLOAD_BACKOFF_MS: "0",
      IMGD_DOWNLOAD_BACKOFF_MAX_MS: "50",
      IMGD_DOWNLOAD_RETRY_AFTER_MAX_MS: "1000",
      IMGD_DOWNLOAD_MAX_OBJECT_CHANGES: "0",
      IMGD_DOWNLOAD_PARALLEL_THRESHOLD: "1048576",
      IMGD_DOWNLOAD_PART_SIZE: "262144",
      IMGD_DOWNLOAD_PART_CONCURRENCY: "8",
    });
    assert.deepEqual(cfg.timeouts, { connectMs: 500, requestMs: 700, idleMs: 900 });
    assert.equal(cfg.maxLayers, 20);
    assert.deepEqual(cfg.download, {
      attempts: 3,
      backoffMs: 0,
      backoffMaxMs: 50,
      retryAfterMaxMs: 1000,
      maxObjectChanges: 0,
      parallelThreshold: 1048576,
      partSize: 262144,
      partConcurrency: 8,
    });
  });

  it("reports every wrong setting at once and never echoes secrets", () => {
    assert.throws(
      () => loadS3Config({ IMGD_S3_PREFIX: "x", IMGD_S3_BUCKET: "X", AWS_SECRET_ACCESS_KEY: "hunter2 hunter2" }),
      (err: unknown) => err instanceof S3ConfigError && /IMGD_S3_BUCKET/.test(err.message) && /IMGD_S3_PREFIX/.test(err.message) && !err.message.includes("hunter2"),
    );
  });

  it("knows the bucket naming rules", () => {
    assert.equal(bucketNameProblem("flyio-platform-hiring-challenge"), undefined);
    assert.equal(bucketNameProblem("a.b-c"), undefined);
    for (const name of ["-abc", "abc-", "a_b", "xn--abc", "abc-s3alias", "a".repeat(64), "a.-b"]) {
      assert.notEqual(bucketNameProblem(name), undefined, name);
    }
  });
});

describe("printable", () => {
  it("quotes and escapes everything outside printable ASCII", () => {
    assert.equal(printable("images/a/1.tar"), '"images/a/1.tar"');
    assert.equal(printable('a"b\\c'), '"a\\"b\\\\c"');
    assert.equal(printable("x\n\u001b[31m\u202eé"), '"x\\u{a}\\u{1b}[31m\\u{202e}\\u{e9}"');
  });

  it("cuts long text", () => {
    const shown = printable("k".repeat(5000));
    assert.ok(shown.length < 250, shown);
    assert.match(shown, /\.\.\.\(5000 chars\)$/);
  });
});
