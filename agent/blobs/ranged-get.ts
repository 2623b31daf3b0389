// One GET of a byte range [start, end) of a listed object, written at the same offsets of an open
// file, pinned to the object's ETag: If-Match asks S3 to refuse (412) a replaced object, and the
// ETag of every response is compared as well, for servers that ignore If-Match. The response must
// be exactly what was asked for: status 206 with the right Content-Range for a range (200 for the
// whole object), a Content-Length of exactly the range's length, and no more bytes than that. A
// response that lies about its size is a permanent error; a body that ends early or breaks is
// transient, and `onBytes` has already counted what was written, so the caller resumes there.
// Memory stays bounded: one chunk at a time, written before the next is read.
import type { FileHandle } from "node:fs/promises";
import { addAbortSignal } from "node:stream";
import type { Readable } from "node:stream";
import { GetObjectCommand } from "@aws-sdk/client-s3";
import type { S3Client } from "@aws-sdk/client-s3";
import { classifyS3Error, S3PermanentError, S3TransientError } from "../s3/errors.ts";
import type { S3Error } from "../s3/errors.ts";
import { printable } from "../s3/printable.ts";

/** The object version a download is pinned to. */
export interface PinnedObject {
  bucket: string;
  key: string;
  /** ETag without quotes. */
  etag: string;
  size: number;
}

/** The ETag without its quotes: S3 sends `"<md5>"` or `"<md5>-<parts>"`. */
export function etagValue(etag: string): string {
  return etag.length >= 2 && etag.startsWith('"') && etag.endsWith('"') ? etag.slice(1, -1) : etag;
}

export function describeObject(obj: PinnedObject): string {
  return printable(`s3://${obj.bucket}/${obj.key}`);
}

export async function getRangeInto(
  client: S3Client,
  obj: PinnedObject,
  file: FileHandle,
  start: number,
  end: number,
  onBytes: (n: number) => void,
  signal?: AbortSignal,
): Promise<void> {
  const whole = start === 0 && end === obj.size;
  const range = `bytes=${start}-${end - 1}`;
  const what = `downloading ${describeObject(obj)}${whole ? "" : ` (${range})`}`;
  let out;
  try {
    out = await client.send(
      new GetObjectCommand({ Bucket: obj.bucket, Key: obj.key, IfMatch: `"${obj.etag}"`, ...(whole ? {} : { Range: range }) }),
      { abortSignal: signal },
    );
  } catch (err) {
    throw classifyS3Error(err, what, signal);
  }
  const body = out.Body as Readable | undefined;
  if (!body) throw new S3TransientError("BAD_RESPONSE", `${what}: response has no body`);
  const refuse = (err: S3Error): never => {
    body.destroy(); // frees the connection
    throw err;
  };
  if (out.ETag === undefined) refuse(new S3PermanentError("BAD_RESPONSE", `${what}: response carries no ETag, the object cannot be checked`));
  if (etagValue(out.ETag!) !== obj.etag) {
    refuse(new S3TransientError("OBJECT_CHANGED", `${what}: object changed since it was listed (ETag ${printable(out.ETag!)}, expected "${obj.etag}")`));
  }
  const status = out.$metadata.httpStatusCode;
  if (!whole && (status !== 206 || out.ContentRange !== `bytes ${start}-${end - 1}/${obj.size}`)) {
    refuse(new S3PermanentError("BAD_RESPONSE", `${what}: expected 206 with Content-Range "bytes ${start}-${end - 1}/${obj.size}", got ${status} with ${printable(String(out.ContentRange))}`));
  }
  if (out.ContentLength !== undefined && out.ContentLength !== end - start) {
    refuse(new S3PermanentError("BAD_RESPONSE", `${what}: Content-Length ${out.ContentLength} differs from the ${end - start} bytes expected (listed size ${obj.size}, same ETag): the response lies about its size`));
  }

  if (signal) addAbortSignal(signal, body);
  // The body's chunks (64 KiB or less) are written by one writer loop: each write takes every
  // chunk that arrived while the previous write ran (one positional writev instead of a
  // thread-pool round trip per chunk), so a slow trickle is still written at once. Only written
  // bytes count (onBytes): after a failure the range resumes from the first byte not on disk.
  let position = start;
  let received = start;
  let batch: Buffer[] = [];
  let batchBytes = 0;
  let writeFailure: { error: unknown } | undefined; // a local disk problem (ENOSPC...), not S3's
  let writer: Promise<void> | undefined;
  const writeBatches = async () => {
    try {
      while (batchBytes > 0 && !writeFailure) {
        const [chunks, bytes] = [batch, batchBytes];
        [batch, batchBytes] = [[], 0];
        await writeAllAt(file, chunks, bytes, position);
        position += bytes;
        onBytes(bytes);
      }
    } catch (error) {
      writeFailure = { error };
    } finally {
      writer = undefined;
    }
  };
  try {
    for await (const chunk of body as AsyncIterable<Buffer>) {
      if (writeFailure) break;
      if (received + chunk.length > end) {
        throw new S3PermanentError("BAD_RESPONSE", `${what}: body longer than the ${end - start} bytes expected: the response lies about its size`);
      }
      received += chunk.length;
      batch.push(chunk);
      batchBytes += chunk.length;
      writer ??= writeBatches();
      if (batchBytes >= MAX_BATCH) await writer; // the disk is slower than the network: wait for it
    }
    await writer;
  } catch (err) {
    body.destroy();
    await writer; // what arrived before the failure is written: a retry resumes after it
    if (writeFailure) throw writeFailure.error;
    throw classifyS3Error(err, `${what}: after ${position - start} bytes`, signal);
  }
  if (writeFailure) {
    body.destroy();
    throw writeFailure.error;
  }
  if (position !== end) throw new S3TransientError("NETWORK", `${what}: body ended after ${position - start} of ${end - start} bytes`);
}

/**
 * Bytes received but not yet written, at most (beyond one chunk), per range: a pull has up to
 * IMGD_DOWNLOAD_CONCURRENCY x IMGD_DOWNLOAD_PART_CONCURRENCY ranges going (16 by default), each
 * with a batch waiting and one being written, so this bounds the agent's download buffers (64 MiB
 * at 1 MiB). A 1 MiB writev is already 16 chunks per system call.
 */
const MAX_BATCH = 1024 * 1024;

/** Writes every byte of `chunks` (`total` bytes) at `position`. */
async function writeAllAt(file: FileHandle, chunks: Buffer[], total: number, position: number): Promise<void> {
  const { bytesWritten: first } = await file.writev(chunks, position);
  if (first === total) return;
  // A short writev (a regular file rarely does that): the rest, one write at a time.
  const rest = Buffer.concat(chunks).subarray(first);
  for (let offset = 0; offset < rest.length; ) {
    const { bytesWritten } = await file.write(rest, offset, rest.length - offset, position + first + offset);
    if (bytesWritten === 0) throw Object.assign(new Error("short write: the file took no more bytes"), { code: "EIO" });
    offset += bytesWritten;
  }
}
