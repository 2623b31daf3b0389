// Downloads one listed layer object into an open temp file and checks that what arrived is the
// object: its sha256 is computed over the whole file (on the hashing thread, digest-thread.ts, as
// the written prefix grows), and when the ETag is a plain MD5 (not a multipart "-N" one) the MD5
// must match it.
// - Small objects: one GET, resumed by Range after a failure (./range-retry.ts).
// - Objects of at least policy.parallelThreshold bytes: parts of policy.partSize bytes fetched by
//   up to policy.partConcurrency ranged GETs at once, each written at its offset.
// Every request is pinned to one ETag (If-Match, and checked in each response). If the object is
// replaced meanwhile, the download starts over with the new version (found by HEAD), at most
// policy.maxObjectChanges times; an object that keeps changing is refused (permanent).
// `inspect` (the layer validator) reads the object in order WHILE it is written
// (./in-order-reader.ts); its refusal stops every request at once and is passed on as it is.
import type { FileHandle } from "node:fs/promises";
import { crashPoint } from "../crash-points.ts";
import { HeadObjectCommand } from "@aws-sdk/client-s3";
import type { S3Client } from "@aws-sdk/client-s3";
import { DOWNLOAD_DEFAULTS } from "../s3/config.ts";
import type { DownloadPolicy, S3Config } from "../s3/config.ts";
import { classifyS3Error, isAbortError, S3Error, S3PermanentError } from "../s3/errors.ts";
import type { LayerObject } from "../s3/image-source.ts";
import { printable } from "../s3/printable.ts";
import { FileDigests, type FileDigestResult } from "./digest-thread.ts";
import { InOrderReader, WrittenPrefix } from "./in-order-reader.ts";
import { fetchRangeWithRetries } from "./range-retry.ts";
import { describeObject, etagValue } from "./ranged-get.ts";
import type { PinnedObject } from "./ranged-get.ts";

export { etagValue } from "./ranged-get.ts";

export interface DownloadOptions<T = unknown> {
  signal?: AbortSignal;
  /** Called after every chunk written; keep it cheap. */
  onProgress?: (done: number, total: number) => void;
  /**
   * Reads the object's bytes in order while they arrive (the layer validator). Its rejection
   * stops the download at once and is what the download rejects with; its result is returned.
   */
  inspect?: (bytes: AsyncIterable<Buffer>) => Promise<T>;
}

export interface FetchedLayer<T = unknown> {
  sha256Hex: string;
  size: number;
  /** ETag (quoted, as S3 lists it) of the version downloaded: the listed one unless the object was replaced. */
  etag: string;
  /** What `inspect` returned (undefined without one). */
  inspected: T | undefined;
}

export async function fetchLayerInto<T>(client: S3Client, cfg: S3Config, obj: LayerObject, file: FileHandle, opts: DownloadOptions<T> = {}): Promise<FetchedLayer<T>> {
  const policy: DownloadPolicy = { ...DOWNLOAD_DEFAULTS, ...cfg.download };
  let pinned: PinnedObject = { bucket: cfg.bucket, key: obj.key, etag: etagValue(obj.etag), size: obj.size };
  for (let changes = 0; ; ) {
    // Hashed on the hashing thread as the written prefix grows (digest-thread.ts).
    const digests = new FileDigests(file.fd, !isMultipart(pinned));
    let inspected: T | undefined;
    let sums: FileDigestResult;
    try {
      inspected = await fetchAndInspect(client, pinned, file, policy, opts, digests);
      sums = await digests.digests(pinned.size);
    } catch (err) {
      await digests.cancel(); // before the file may be truncated or closed
      if (!(err instanceof S3Error) || err.code !== "OBJECT_CHANGED") throw err;
      if (++changes > policy.maxObjectChanges) {
        throw new S3PermanentError("OBJECT_CHANGED", `${describeObject(pinned)}: object keeps changing: replaced ${changes} times during one download (IMGD_DOWNLOAD_MAX_OBJECT_CHANGES=${policy.maxObjectChanges}); last: ${err.message}`, { cause: err });
      }
      pinned = await currentVersion(client, pinned, opts.signal);
      await file.truncate(0); // bytes of the old version are worthless
      continue;
    }
    const { sha256Hex, md5Hex } = sums;
    if (md5Hex !== undefined && md5Hex !== pinned.etag.toLowerCase()) {
      throw new S3PermanentError("CORRUPT", `downloading ${describeObject(pinned)}: content MD5 ${md5Hex} does not match its ETag ${printable(pinned.etag)}`);
    }
    return { sha256Hex, size: pinned.size, etag: `"${pinned.etag}"`, inspected };
  }
}

const isMultipart = (pinned: PinnedObject) => !/^[0-9a-fA-F]{32}$/.test(pinned.etag);

/**
 * Fetches one pinned version while `digests` hashes and `opts.inspect` reads its written prefix
 * in order. A refusal by the inspector aborts every request and is thrown as it is; a download
 * error ends the inspection. Returns what the inspector returned.
 */
async function fetchAndInspect<T>(client: S3Client, pinned: PinnedObject, file: FileHandle, policy: DownloadPolicy, opts: DownloadOptions<T>, digests: FileDigests): Promise<T | undefined> {
  const ranges = splitRanges(pinned.size, policy);
  const prefix = new WrittenPrefix(ranges);
  if (!opts.inspect) {
    await fetchVersion(client, pinned, file, ranges, policy, opts, (index, n) => digests.available(prefix.wrote(index, n)));
    return undefined;
  }
  const reader = new InOrderReader(file, pinned.size);
  const stop = new AbortController();
  let refusal: { error: unknown } | undefined;
  let inspected: T | undefined;
  const inspection = opts.inspect(reader.bytes()).then(
    (result) => void (inspected = result),
    (error: unknown) => {
      refusal = { error };
      stop.abort(error);
    },
  );
  const signal = opts.signal ? AbortSignal.any([opts.signal, stop.signal]) : stop.signal;
  const grew = (index: number, n: number) => {
    const reach = prefix.wrote(index, n);
    digests.available(reach);
    reader.grew(reach);
  };
  try {
    await fetchVersion(client, pinned, file, ranges, policy, { ...opts, signal }, grew);
    reader.finish();
  } catch (err) {
    reader.fail(err);
    await inspection; // never rejects; done before the caller may truncate the file
    // The inspector's refusal is the cause; the aborted requests are its consequence.
    if (refusal && !opts.signal?.aborted) throw refusal.error;
    throw err;
  }
  await inspection;
  if (refusal) throw refusal.error;
  return inspected;
}

/** Fetches every byte of one pinned version; the first failing range stops the others. */
async function fetchVersion(
  client: S3Client,
  pinned: PinnedObject,
  file: FileHandle,
  ranges: Array<{ start: number; end: number }>,
  policy: DownloadPolicy,
  opts: Pick<DownloadOptions, "signal" | "onProgress">,
  onPartBytes?: (index: number, n: number) => void,
): Promise<void> {
  let done = 0;
  const onBytes = (n: number) => {
    crashPoint("download.chunk-written"); // called once the chunk is written
    opts.onProgress?.((done += n), pinned.size);
  };
  const stopOthers = new AbortController();
  const signal = opts.signal ? AbortSignal.any([opts.signal, stopOthers.signal]) : stopOthers.signal;
  let firstError: unknown;
  let next = 0;
  const worker = async () => {
    while (next < ranges.length && firstError === undefined) {
      const index = next++;
      const range = ranges[index]!;
      try {
        await fetchRangeWithRetries(client, pinned, file, range, policy, (n) => (onPartBytes?.(index, n), onBytes(n)), signal);
      } catch (err) {
        // A sibling's abort is the consequence of the first error, not news.
        if (firstError === undefined && !(isAbortError(err) && stopOthers.signal.aborted && !opts.signal?.aborted)) {
          firstError = err;
          stopOthers.abort();
        }
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(policy.partConcurrency, ranges.length) }, worker));
  if (firstError !== undefined) throw firstError;
}

/** One range for the whole object, or parts of policy.partSize bytes for a large one. */
export function splitRanges(size: number, policy: Pick<DownloadPolicy, "parallelThreshold" | "partSize">): Array<{ start: number; end: number }> {
  if (size < policy.parallelThreshold) return [{ start: 0, end: size }];
  const ranges = [];
  for (let start = 0; start < size; start += policy.partSize) ranges.push({ start, end: Math.min(size, start + policy.partSize) });
  return ranges;
}

/** The object's current ETag and size, after a GET found it replaced. */
async function currentVersion(client: S3Client, old: PinnedObject, signal?: AbortSignal): Promise<PinnedObject> {
  const what = `re-reading ${describeObject(old)} after it changed`;
  let head;
  try {
    head = await client.send(new HeadObjectCommand({ Bucket: old.bucket, Key: old.key }), { abortSignal: signal });
  } catch (err) {
    throw classifyS3Error(err, what, signal);
  }
  const size = head.ContentLength;
  if (typeof head.ETag !== "string" || !/^[\x21-\x7e]{1,200}$/.test(head.ETag)) throw new S3PermanentError("BAD_RESPONSE", `${what}: no valid ETag`);
  if (typeof size !== "number" || !Number.isSafeInteger(size) || size < 1) throw new S3PermanentError("BAD_RESPONSE", `${what}: size ${String(size)} is not a layer's`);
  return { ...old, etag: etagValue(head.ETag), size };
}
