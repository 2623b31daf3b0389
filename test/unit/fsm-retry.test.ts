import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffDelayMs, resolveRetryPolicy, sleep, DEFAULT_RETRY_POLICY } from "../../agent/fsm/retry.ts";
import { abort, AbortError, formatError } from "../../agent/fsm/errors.ts";

test("backoff grows by factor, is capped, and jitter only shortens it", () => {
  const policy = resolveRetryPolicy({ baseDelayMs: 100, maxDelayMs: 1000, factor: 3, jitter: 0 });
  assert.deepEqual([1, 2, 3, 4, 5].map((n) => backoffDelayMs(policy, n)), [100, 300, 900, 1000, 1000]);
  const jittered = resolveRetryPolicy({ baseDelayMs: 100, maxDelayMs: 1000, factor: 2, jitter: 0.5 });
  assert.equal(backoffDelayMs(jittered, 1, () => 0), 100);
  assert.equal(backoffDelayMs(jittered, 1, () => 1), 50);
  for (let i = 0; i < 100; i++) {
    const d = backoffDelayMs(jittered, 2);
    assert.ok(d >= 100 && d <= 200, String(d));
  }
});

test("policies merge over the defaults and are validated", () => {
  assert.deepEqual(resolveRetryPolicy(), DEFAULT_RETRY_POLICY);
  assert.equal(DEFAULT_RETRY_POLICY.maxAttempts, 5);
  const merged = resolveRetryPolicy({ maxAttempts: 3 }, { baseDelayMs: 7, maxAttempts: undefined });
  assert.equal(merged.maxAttempts, 3);
  assert.equal(merged.baseDelayMs, 7);
  assert.throws(() => resolveRetryPolicy({ maxAttempts: 0 }), /maxAttempts/);
  assert.throws(() => resolveRetryPolicy({ jitter: 1.5 }), /jitter/);
  assert.throws(() => resolveRetryPolicy({ baseDelayMs: 10, maxDelayMs: 5 }), /maxDelayMs/);
  assert.throws(() => resolveRetryPolicy({ factor: 0.5 }), /factor/);
});

test("sleep() ends early when the signal fires", async () => {
  const controller = new AbortController();
  const started = performance.now();
  const pending = sleep(10_000, controller.signal);
  controller.abort();
  assert.equal(await pending, false);
  assert.ok(performance.now() - started < 1000);
  assert.equal(await sleep(1, new AbortController().signal), true);
});

test("abort() builds a permanent error; formatError adds a cause only when it says something new", () => {
  const err = abort("digest mismatch", new Error("got sha256:aa"));
  assert.ok(err instanceof AbortError);
  assert.equal(formatError(err), "digest mismatch: got sha256:aa");
  assert.equal(formatError(abort("read failed: EIO", new Error("EIO"))), "read failed: EIO");
  assert.equal(formatError("plain"), "plain");
  assert.equal(formatError({ code: 1 }), '{"code":1}');
});
