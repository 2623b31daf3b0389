// Downloads one listed layer object into an open temp file and checks that what arrived is the
// object: its sha256 is computed over the whole file (on the check thread, check-thread.ts, as
// the written prefix grows), and when the ETag is a plain MD5 (not a multipart "-N" one) the MD5
// must match it.
// - Small objects: one GET, resumed by Range after a failure (./range-retry.ts).
// - Objects of at least policy.parallelThreshold bytes: parts of policy.partSize bytes fetched by
//   up to policy.partConcurrency ranged GETs at once, each written at its offset.
// Every request is pinned to one ETag (If-Match, and checked in each response). If the object is
// replaced meanwhile, the download starts over with the new version (found by HEAD), at most
// policy.maxObjectChanges times; an object that keeps changing is refused (permanent).
// With `validate`, the layer validator checks the object on the same thread, in order, WHILE it is
// written; its refusal stops every request at once and is passed on as it is.
import type { FileHandle } from "node:fs/promises";
import { crashPoint } from "../crash-points.ts";
import { HeadObjectCommand } from "@aws-sdk/client-s3";
import type { S3Client } from "@aws-sdk/client-s3";
import { DOWNLOAD_DEFAULTS } from "../s3/config.ts";
import type { DownloadPolicy, S3Config } from "../s3/config.ts";
import { classifyS3Error, isAbortError, S3Error, S3PermanentError } from "../s3/errors.ts";
import type { LayerObject } from "../s3/image-source.ts";
import { printable } from "../s3/printable.ts";
import type { LayerLimits, LayerSummary, LayerValidationError } from "../layers/validate.ts";
import { FileCheck, type CheckResult } from "./check-thread.ts";
import { WrittenPrefix } from "./written-prefix.ts";
import { fetchRangeWithRetries } from "./range-retry.ts";
import { describeObject, etagValue } from "./ranged-get.ts";
import type { PinnedObject } from "./ranged-get.ts";

export { etagValue } from "./ranged-get.ts";

export interface DownloadOptions {
  signal?: AbortSignal;
  /** Called after every chunk written; keep it cheap. */
  onProgress?: (done: number, total: number) => void;
  /**
   * Validate the object as a layer, with these limits (defaults for those absent), while it
   * arrives. A refusal (LayerValidationError) stops the download at once and is what the download
   * rejects with; the validator's summary is returned.
   */
  validate?: Partial<LayerLimits>;
}

export interface FetchedLayer {
  sha256Hex: string;
  size: number;
  /** ETag (quoted, as S3 lists it) of the version downloaded: the listed one unless the object was replaced. */
  etag: string;
  /** The validator's summary (with `validate`). */
  summary?: LayerSummary;
}

export async function fetchLayerInto(client: S3Client, cfg: S3Config, obj: LayerObject, file: FileHandle, opts: DownloadOptions = {}): Promise<FetchedLayer> {
  const policy: DownloadPolicy = { ...DOWNLOAD_DEFAULTS, ...cfg.download };
  let pinned: PinnedObject = { bucket: cfg.bucket, key: obj.key, etag: etagValue(obj.etag), size: obj.size };
  for (let changes = 0; ; ) {
    // A refusal by the validator stops every request of this version at once.
    const refused = new AbortController();
    const check = new FileCheck(file.fd, {
      md5: !isMultipart(pinned),
      ...(opts.validate ? { validate: opts.validate, onRefusal: (refusal: LayerValidationError) => refused.abort(refusal) } : {}),
    });
    const signal = opts.signal ? AbortSignal.any([opts.signal, refused.signal]) : refused.signal;
    let sums: CheckResult;
    try {
      const ranges = splitRanges(pinned.size, policy);
      const prefix = new WrittenPrefix(ranges);
      await fetchVersion(client, pinned, file, ranges, policy, { ...opts, signal }, (index, n) => check.available(prefix.wrote(index, n)));
      sums = await check.result(pinned.size);
    } catch (err) {
      await check.cancel(); // before the file may be truncated or closed
      // The validator's refusal is the cause; the aborted requests are its consequence.
      if (refused.signal.aborted && !opts.signal?.aborted) throw refused.signal.reason;
      if (!(err instanceof S3Error) || err.code !== "OBJECT_CHANGED") throw err;
      if (++changes > policy.maxObjectChanges) {
        throw new S3PermanentError("OBJECT_CHANGED", `${describeObject(pinned)}: object keeps changing: replaced ${changes} times during one download (IMGD_DOWNLOAD_MAX_OBJECT_CHANGES=${policy.maxObjectChanges}); last: ${err.message}`, { cause: err });
      }
      pinned = await currentVersion(client, pinned, opts.signal);
      await file.truncate(0); // bytes of the old version are worthless
      continue;
    }
    const { sha256Hex, md5Hex, summary } = sums;
    if (md5Hex !== undefined && md5Hex !== pinned.etag.toLowerCase()) {
      throw new S3PermanentError("CORRUPT", `downloading ${describeObject(pinned)}: content MD5 ${md5Hex} does not match its ETag ${printable(pinned.etag)}`);
    }
    return { sha256Hex, size: pinned.size, etag: `"${pinned.etag}"`, ...(summary ? { summary } : {}) };
  }
}

const isMultipart = (pinned: PinnedObject) => !/^[0-9a-fA-F]{32}$/.test(pinned.etag);

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
