// Streams one listed layer object from S3 into an open file, hashing as it goes, and checks that
// what arrived is what was listed: same ETag (else the object changed since the listing: a
// transient error, the caller lists again), same size, and, when the ETag is a plain MD5 (not a
// multipart "-N" one), the same MD5. Memory stays bounded: one chunk at a time, written before
// the next is read.
import { createHash } from "node:crypto";
import { crashPoint } from "../crash-points.ts";
import type { FileHandle } from "node:fs/promises";
import { addAbortSignal } from "node:stream";
import type { Readable } from "node:stream";
import { GetObjectCommand } from "@aws-sdk/client-s3";
import type { S3Client } from "@aws-sdk/client-s3";
import type { S3Config } from "../s3/config.ts";
import { classifyS3Error, S3Error, S3PermanentError, S3TransientError } from "../s3/errors.ts";
import type { LayerObject } from "../s3/image-source.ts";
import { printable } from "../s3/printable.ts";

export interface DownloadOptions {
  signal?: AbortSignal;
  /** Called after every chunk written; keep it cheap. */
  onProgress?: (done: number, total: number) => void;
}

export interface FetchedLayer {
  sha256Hex: string;
  size: number;
}

/** The ETag without its quotes: S3 sends `"<md5>"` or `"<md5>-<parts>"`. */
export function etagValue(etag: string): string {
  return etag.length >= 2 && etag.startsWith('"') && etag.endsWith('"') ? etag.slice(1, -1) : etag;
}

export async function fetchLayerInto(client: S3Client, cfg: S3Config, obj: LayerObject, file: FileHandle, opts: DownloadOptions = {}): Promise<FetchedLayer> {
  const { signal } = opts;
  const where = printable(`s3://${cfg.bucket}/${obj.key}`);
  const listedEtag = etagValue(obj.etag);

  let out;
  try {
    // If-Match makes real S3 refuse (412) an object replaced since the listing; servers that
    // ignore it (s3rver) are caught by the ETag comparison below.
    out = await client.send(new GetObjectCommand({ Bucket: cfg.bucket, Key: obj.key, IfMatch: `"${listedEtag}"` }), { abortSignal: signal });
  } catch (err) {
    throw classifyS3Error(err, `downloading ${where}`, signal);
  }
  const body = out.Body as Readable | undefined;
  if (!body) throw new S3TransientError("BAD_RESPONSE", `downloading ${where}: response has no body`);

  const refuse = (err: S3Error): never => {
    body.destroy(); // frees the connection
    throw err;
  };
  if (out.ETag === undefined) refuse(new S3PermanentError("BAD_RESPONSE", `downloading ${where}: response carries no ETag, the object cannot be checked`));
  if (etagValue(out.ETag!) !== listedEtag) {
    refuse(new S3TransientError("OBJECT_CHANGED", `downloading ${where}: object changed since it was listed (ETag ${printable(out.ETag!)}, listed ${printable(obj.etag)})`));
  }
  if (out.ContentLength !== undefined && out.ContentLength !== obj.size) {
    refuse(new S3PermanentError("BAD_RESPONSE", `downloading ${where}: Content-Length ${out.ContentLength} differs from the listed size ${obj.size} for the same ETag`));
  }

  const sha256 = createHash("sha256");
  const md5 = /^[0-9a-fA-F]{32}$/.test(listedEtag) ? createHash("md5") : undefined;
  if (signal) addAbortSignal(signal, body);
  let received = 0;
  let localFailure = false;
  try {
    for await (const chunk of body as AsyncIterable<Buffer>) {
      received += chunk.length;
      if (received > obj.size) throw new S3PermanentError("BAD_RESPONSE", `downloading ${where}: more bytes than the listed size ${obj.size}`);
      sha256.update(chunk);
      md5?.update(chunk);
      try {
        await writeAll(file, chunk);
      } catch (err) {
        localFailure = true; // a local disk problem, not S3's: passed on unchanged
        throw err;
      }
      crashPoint("download.chunk-written");
      opts.onProgress?.(received, obj.size);
    }
  } catch (err) {
    body.destroy();
    if (localFailure) throw err;
    throw classifyS3Error(err, `downloading ${where} (after ${received} bytes)`, signal);
  }
  if (received !== obj.size) {
    throw new S3TransientError("NETWORK", `downloading ${where}: body ended after ${received} of ${obj.size} bytes`);
  }
  if (md5) {
    const actual = md5.digest("hex");
    if (actual !== listedEtag.toLowerCase()) {
      throw new S3PermanentError("CORRUPT", `downloading ${where}: content MD5 ${actual} does not match its ETag ${printable(obj.etag)}`);
    }
  }
  return { sha256Hex: sha256.digest("hex"), size: received };
}

async function writeAll(file: FileHandle, chunk: Buffer): Promise<void> {
  for (let offset = 0; offset < chunk.length; ) {
    const { bytesWritten } = await file.write(chunk, offset, chunk.length - offset);
    offset += bytesWritten;
  }
}
