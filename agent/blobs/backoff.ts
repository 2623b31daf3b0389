// How long to wait before retrying a download request: exponential backoff with full jitter
// (a random wait in [0, min(cap, base * 2^n)], so many agents hitting one failing server spread
// out), but never less than the server's Retry-After, which is itself capped so a hostile or
// confused server cannot park a download for hours.
import type { DownloadPolicy } from "../s3/config.ts";

export function backoffDelayMs(retry: number, policy: DownloadPolicy, retryAfterMs?: number, random: () => number = Math.random): number {
  const ceiling = Math.min(policy.backoffMaxMs, policy.backoffMs * 2 ** Math.min(retry, 30));
  const jittered = Math.floor(random() * ceiling);
  if (retryAfterMs === undefined) return jittered;
  return Math.max(jittered, Math.min(retryAfterMs, policy.retryAfterMaxMs));
}

/** The Retry-After of a failed SDK request (delay-seconds or an HTTP date), in ms; undefined if absent or unreadable. */
export function retryAfterOf(err: unknown, now = Date.now()): number | undefined {
  const response = (err as { cause?: { $response?: { headers?: Record<string, string> } } } | undefined)?.cause?.$response;
  const value = response?.headers?.["retry-after"];
  if (typeof value !== "string") return undefined;
  if (/^\s*\d{1,9}\s*$/.test(value)) return Number(value) * 1000;
  // Only the HTTP date format (RFC 9110 IMF-fixdate): Date.parse alone takes "-5" for a year.
  if (!/^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$/.test(value.trim())) return undefined;
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

/** Waits `ms`, or rejects with the signal's reason when it fires first. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
