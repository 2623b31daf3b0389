import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import type { S3Client } from "@aws-sdk/client-s3";
import { createS3Client } from "../../agent/s3/client.ts";
import type { S3Config } from "../../agent/s3/client.ts";
import { S3Error } from "../../agent/s3/errors.ts";
import { listImageLayers, validateImageName } from "../../agent/s3/image-source.ts";
import { startS3rver, startTamperProxy } from "../helpers/s3rver.ts";
import type { TamperProxy, TestS3 } from "../helpers/s3rver.ts";

let s3: TestS3;
let proxy: TamperProxy;
let cfg: S3Config;
let client: S3Client;

const layersOf = (image: string, n: number) => Array.from({ length: n }, (_, i): [string, string] => [`images/${image}/${i + 1}.tar`, `layer ${i + 1} of ${image}`]);

before(async () => {
  s3 = await startS3rver();
  await s3.putMany([
    ...layersOf("twelve", 12),
    ...layersOf("many", 1005),
    ["images/gap/1.tar", "a"],
    ["images/gap/3.tar", "c"],
    ["images/leading-zero/1.tar", "a"],
    ["images/leading-zero/01.tar", "a"],
    ["images/upper/1.TAR", "a"],
    ["images/nested/1.tar", "a"],
    ["images/nested/sub/2.tar", "b"],
    ["images/readme/1.tar", "a"],
    ["images/readme/README", "read me"],
    ["images/empty-layer/1.tar", "a"],
    ["images/empty-layer/2.tar", ""],
    ["images/no-first/2.tar", "b"],
    ["images/plus/+1.tar", "a"],
    ["images/seven-digits/1.tar", "a"],
    ["images/seven-digits/1000000.tar", "a"],
    ["images/evil/1.tar\u202e\u001b[2J", "a"],
    ["images/prefix-twin/1.tar", "a"],
    ["images/prefix-twin2/1.tar", "a"],
    ["images/prefix-twin2/2.tar", "b"],
    ["elsewhere/solo/1.tar", "x"],
    // Hostile keys (issue 3). s3rver stores "a/../b" as "b" (the path is normalised on the way):
    // one more reason a key is never treated as a path.
    ["images/dotdot/1.tar", "a"],
    ["images/dotdot/..", "a"],
    ["images/dotdot-nested/1.tar", "a"],
    ["images/dotdot-nested/2.tar/..", "a"],
    ["images/space/1.tar", "a"],
    ["images/space/2 .tar", "a"],
    ["images/newline/1.tar\n", "a"],
    ["images/accent/1.tar\u00e9", "a"],
    ["images/percent/1%2Etar", "a"],
    ["images/marker-only/", ""],
  ]);
  proxy = await startTamperProxy(s3.endpoint);
  cfg = { endpoint: s3.endpoint, bucket: s3.bucket, prefix: "images/", region: "us-east-1" };
  client = createS3Client(cfg);
});
after(async () => {
  client.destroy();
  await proxy.close();
  await s3.close();
});

/** Expects a rejection with an S3Error of this code and permanence whose message matches. */
async function rejectsWith(promise: Promise<unknown>, code: string, permanent: boolean, message?: RegExp) {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof S3Error, `expected an S3Error, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.equal(err.permanent, permanent);
    if (message) assert.match(err.message, message);
    return true;
  });
}

describe("validateImageName", () => {
  it("accepts image names", () => {
    for (const name of ["golang", "node", "python", "a", "0", "my-image_2.1", "a".repeat(128)]) assert.equal(validateImageName(name), name);
  });
  it("refuses anything else, permanently and with a clear message", () => {
    for (const name of ["", "Node", "-x", ".x", "_x", "a/b", "a..b", "a b", "a\n", "é", "a".repeat(129), "x/../y"]) {
      assert.throws(
        () => validateImageName(name),
        (err: unknown) => err instanceof S3Error && err.code === "INVALID_IMAGE_NAME" && err.permanent && /invalid image name/.test(err.message),
        JSON.stringify(name),
      );
    }
    assert.throws(() => validateImageName(42), (err: unknown) => err instanceof S3Error && err.code === "INVALID_IMAGE_NAME");
  });
});

describe("listImageLayers", () => {
  it("lists layers in numeric order (1, 2, ... 9, 10, 11, 12), with keys, sizes and ETags", async () => {
    const layers = await listImageLayers(client, cfg, "twelve");
    assert.deepEqual(layers.map((l) => l.position), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    assert.deepEqual(layers.map((l) => l.key), Array.from({ length: 12 }, (_, i) => `images/twelve/${i + 1}.tar`));
    assert.equal(layers[9].size, Buffer.byteLength("layer 10 of twelve"));
    assert.match(layers[0].etag, /^"[0-9a-f]{32}"$/);
  });

  it("does not mix in a folder whose name extends the image's (prefix-twin vs prefix-twin2)", async () => {
    const layers = await listImageLayers(client, cfg, "prefix-twin");
    assert.deepEqual(layers.map((l) => l.key), ["images/prefix-twin/1.tar"]);
  });

  it("follows pagination over more than 1000 keys (server pages of 1000)", async () => {
    proxy.requests.length = 0;
    const viaProxy = createS3Client({ ...cfg, endpoint: proxy.endpoint });
    try {
      const layers = await listImageLayers(viaProxy, { ...cfg, maxLayers: 2000 }, "many");
      assert.equal(layers.length, 1005);
      assert.deepEqual(layers.map((l) => l.position), Array.from({ length: 1005 }, (_, i) => i + 1));
      assert.equal(layers[1004].key, "images/many/1005.tar");
    } finally {
      viaProxy.destroy();
    }
    assert.equal(proxy.requests.length, 2, "two pages");
    assert.match(proxy.requests[1].url, /continuation-token=/);
  });

  it("follows pagination with small pages", async () => {
    const layers = await listImageLayers(client, cfg, "twelve", { pageSize: 5 });
    assert.deepEqual(layers.map((l) => l.position), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
  });

  it("honours the prefix setting", async () => {
    const layers = await listImageLayers(client, { ...cfg, prefix: "elsewhere/" }, "solo");
    assert.deepEqual(layers.map((l) => l.key), ["elsewhere/solo/1.tar"]);
    await rejectsWith(listImageLayers(client, { ...cfg, prefix: "" }, "solo"), "IMAGE_NOT_FOUND", true);
  });

  const refusals: Array<[string, RegExp]> = [
    ["gap", /layer 2\.tar is missing.*"images\/gap\/3\.tar"/],
    ["no-first", /layer 1\.tar is missing/],
    ["leading-zero", /"images\/leading-zero\/01\.tar" is not a layer/],
    ["upper", /"images\/upper\/1\.TAR" is not a layer/],
    ["nested", /"images\/nested\/sub\/2\.tar" is nested/],
    ["readme", /"images\/readme\/README" is not a layer/],
    ["empty-layer", /"images\/empty-layer\/2\.tar" is empty/],
    ["plus", /"images\/plus\/\+1\.tar" is not a layer/],
    ["seven-digits", /"images\/seven-digits\/1000000\.tar" is not a layer/],
  ];
  for (const [image, message] of refusals) {
    it(`refuses image ${image} permanently, naming the offending key`, async () => {
      await rejectsWith(listImageLayers(client, cfg, image), "BAD_LAYOUT", true, message);
    });
  }

  it("escapes hostile key text in the refusal", async () => {
    await rejectsWith(listImageLayers(client, cfg, "evil"), "BAD_LAYOUT", true, /"images\/evil\/1\.tar\\u\{202e\}\\u\{1b\}\[2J" is not a layer/);
  });

  const hostileKeys: Array<[string, RegExp]> = [
    ["dotdot", /"images\/dotdot\/\.\." is not a layer/],
    ["dotdot-nested", /"images\/dotdot-nested\/2\.tar\/\.\." is nested/],
    ["space", /"images\/space\/2 \.tar" is not a layer/],
    ["newline", /"images\/newline\/1\.tar\\u\{a\}" is not a layer/],
    ["accent", /"images\/accent\/1\.tar\\u\{e9\}" is not a layer/],
    ["percent", /"images\/percent\/1%2Etar" is not a layer/],
  ];
  for (const [image, message] of hostileKeys) {
    it(`refuses a folder holding a hostile key (${image}), naming it escaped`, async () => {
      await rejectsWith(listImageLayers(client, cfg, image), "BAD_LAYOUT", true, message);
    });
  }

  it("a folder with 0 layers (only its marker object) is a clear IMAGE_NOT_FOUND", async () => {
    await rejectsWith(listImageLayers(client, cfg, "marker-only"), "IMAGE_NOT_FOUND", true, /s3:\/\/imgd-test\/images\/marker-only\/ exists but holds no layers/);
  });

  it("refuses a folder above the max layer count (default 1000) after reading only the pages needed", async () => {
    proxy.requests.length = 0;
    const viaProxy = createS3Client({ ...cfg, endpoint: proxy.endpoint });
    try {
      await rejectsWith(listImageLayers(viaProxy, cfg, "many"), "BAD_LAYOUT", true, /more than 1000 objects; an image may have at most 1000 layers \(IMGD_S3_MAX_LAYERS\)/);
    } finally {
      viaProxy.destroy();
    }
    assert.equal(proxy.requests.length, 2, "two listing pages, nothing else");
  });

  it("a folder of 10,000 objects: read page by page; refused above the max, listed at or under it", async () => {
    // 10,000 objects in s3rver would take ~40 s to seed; the proxy serves the listing pages
    // instead (1000 keys each, as S3 pages them), the rest of the path is the real client.
    const viaProxy = createS3Client({ ...cfg, endpoint: proxy.endpoint });
    const page = (n: number) => {
      const keys = Array.from({ length: 1000 }, (_, i) => `<Contents><Key>images/huge/${n * 1000 + i + 1}.tar</Key><Size>10</Size><ETag>"e${n}-${i}"</ETag></Contents>`).join("");
      const more = n < 9 ? `<IsTruncated>true</IsTruncated><NextContinuationToken>page${n + 1}</NextContinuationToken>` : "<IsTruncated>false</IsTruncated>";
      return `<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>${s3.bucket}</Name><KeyCount>1000</KeyCount>${more}${keys}</ListBucketResult>`;
    };
    proxy.tamper = (req) => {
      const token = /continuation-token=page(\d)/.exec(req.url);
      return { reply: { status: 200, body: page(token ? Number(token[1]) : 0) } };
    };
    try {
      proxy.requests.length = 0;
      await rejectsWith(listImageLayers(viaProxy, { ...cfg, maxLayers: 2500 }, "huge"), "BAD_LAYOUT", true, /more than 2500 objects/);
      assert.equal(proxy.requests.length, 3, "stopped at the page that passed the limit");
      proxy.requests.length = 0;
      const layers = await listImageLayers(viaProxy, { ...cfg, maxLayers: 10_000 }, "huge");
      assert.equal(layers.length, 10_000);
      assert.equal(layers[9999].key, "images/huge/10000.tar");
      assert.equal(proxy.requests.length, 10);
      assert.ok(proxy.requests.every((r) => r.url.includes("list-type=2")), "listing only, nothing downloaded");
    } finally {
      proxy.tamper = () => undefined;
      viaProxy.destroy();
    }
  });

  it("reports an unknown image as permanent IMAGE_NOT_FOUND", async () => {
    await rejectsWith(listImageLayers(client, cfg, "no-such-image"), "IMAGE_NOT_FOUND", true, /no objects under s3:\/\/imgd-test\/images\/no-such-image\//);
  });

  it("reports a missing bucket as permanent NO_SUCH_BUCKET", async () => {
    await rejectsWith(listImageLayers(client, { ...cfg, bucket: "no-such-bucket" }, "twelve"), "NO_SUCH_BUCKET", true);
  });

  it("refuses an invalid image name before asking S3", async () => {
    await rejectsWith(listImageLayers(client, cfg, "../etc"), "INVALID_IMAGE_NAME", true);
  });

  it("reports server errors as transient", async () => {
    const viaProxy = createS3Client({ ...cfg, endpoint: proxy.endpoint });
    proxy.tamper = () => ({ reply: { status: 500, body: "<Error><Code>InternalError</Code><Message>boom</Message></Error>" } });
    try {
      await rejectsWith(listImageLayers(viaProxy, cfg, "twelve"), "SERVER_ERROR", false);
    } finally {
      proxy.tamper = () => undefined;
      viaProxy.destroy();
    }
  });

  it("refuses a listing that leaves the requested prefix or loops", async () => {
    const viaProxy = createS3Client({ ...cfg, endpoint: proxy.endpoint });
    const listing = (keys: string[], extra = "") =>
      `<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>${s3.bucket}</Name><KeyCount>${keys.length}</KeyCount>${extra}` +
      keys.map((k) => `<Contents><Key>${k}</Key><Size>1</Size><ETag>"e"</ETag></Contents>`).join("") +
      `</ListBucketResult>`;
    try {
      proxy.tamper = () => ({ reply: { status: 200, body: listing(["images/other/1.tar"], "<IsTruncated>false</IsTruncated>") } });
      await rejectsWith(listImageLayers(viaProxy, cfg, "twelve"), "BAD_RESPONSE", true, /outside the requested prefix/);
      proxy.tamper = () => ({ reply: { status: 200, body: listing(["images/twelve/1.tar"], "<IsTruncated>true</IsTruncated><NextContinuationToken>same</NextContinuationToken>") } });
      await rejectsWith(listImageLayers(viaProxy, cfg, "twelve"), "BAD_LAYOUT", true, /duplicates position 1/);
      proxy.tamper = () => ({ reply: { status: 200, body: listing([], "<IsTruncated>true</IsTruncated><NextContinuationToken>same</NextContinuationToken>") } });
      await rejectsWith(listImageLayers(viaProxy, cfg, "twelve"), "BAD_RESPONSE", true, /continuation token/);
      // Keys the server url-encoded (as S3 does when asked) are decoded before they are judged.
      proxy.tamper = () => ({ reply: { status: 200, body: listing(["images/twelve/1%2Etar", "images/twelve/my+file"], "<EncodingType>url</EncodingType>") } });
      await rejectsWith(listImageLayers(viaProxy, cfg, "twelve"), "BAD_LAYOUT", true, /"images\/twelve\/my file" is not a layer/);
    } finally {
      proxy.tamper = () => undefined;
      viaProxy.destroy();
    }
  });

  it("stops when its AbortSignal fires", async () => {
    await assert.rejects(listImageLayers(client, cfg, "many", { signal: AbortSignal.abort() }), { name: "AbortError" });
  });
});
