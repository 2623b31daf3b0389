// Fetches one byte range [start, end) of a pinned object, retrying transient failures with
// backoff (./backoff.ts) and RESUMING from the first byte not yet written: a body cut after N
// bytes is followed by a GET of "bytes=<start+N>-<end-1>", never by a restart. An object that
// changed (OBJECT_CHANGED) is not retried here: bytes of another version cannot be resumed, the
// caller starts over. After `policy.attempts` tries the last error is passed on, still transient,
// for the pull FSM to retry the whole step later.
import type { FileHandle } from "node:fs/promises";
import type { S3Client } from "@aws-sdk/client-s3";
import type { DownloadPolicy } from "../s3/config.ts";
import { isTransientS3Error, S3TransientError } from "../s3/errors.ts";
import { backoffDelayMs, retryAfterOf, sleep } from "./backoff.ts";
import { getRangeInto } from "./ranged-get.ts";
import type { PinnedObject } from "./ranged-get.ts";

export async function fetchRangeWithRetries(
  client: S3Client,
  obj: PinnedObject,
  file: FileHandle,
  range: { start: number; end: number },
  policy: DownloadPolicy,
  onBytes: (n: number) => void,
  signal?: AbortSignal,
): Promise<void> {
  let position = range.start;
  for (let failures = 0; ; ) {
    try {
      await getRangeInto(client, obj, file, position, range.end, (n) => ((position += n), onBytes(n)), signal);
      return;
    } catch (err) {
      if (!isTransientS3Error(err) || err.code === "OBJECT_CHANGED") throw err;
      failures++;
      if (failures >= policy.attempts) throw new S3TransientError(err.code, `${err.message} (gave up after ${failures} attempts)`, { cause: err });
      await sleep(backoffDelayMs(failures - 1, policy, retryAfterOf(err)), signal);
    }
  }
}
