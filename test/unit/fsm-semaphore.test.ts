import { test } from "node:test";
import assert from "node:assert/strict";
import { Semaphore } from "../../agent/fsm/semaphore.ts";

test("a semaphore grants up to its limit, then FIFO as slots are released", async () => {
  const sem = new Semaphore("dl", 2);
  const a = await sem.acquire();
  const b = await sem.acquire();
  assert.equal(sem.tryAcquire(), undefined);
  const order: string[] = [];
  const c = sem.acquire().then((slot) => (order.push("c"), slot));
  const d = sem.acquire().then((slot) => (order.push("d"), slot));
  assert.equal(sem.waiting, 2);
  a.release();
  a.release(); // idempotent: must not free a second slot
  const slotC = await c;
  assert.deepEqual(order, ["c"]);
  assert.equal(sem.inUse, 2);
  b[Symbol.dispose]();
  const slotD = await d;
  assert.deepEqual(order, ["c", "d"]);
  slotC.release();
  slotD.release();
  assert.equal(sem.inUse, 0);
  assert.equal(sem.waiting, 0);
});

test("acquire() rejects with the signal's reason and leaves the queue intact", async () => {
  const sem = new Semaphore("dl", 1);
  const held = await sem.acquire();
  const controller = new AbortController();
  const waiting = sem.acquire(controller.signal);
  const next = sem.acquire();
  controller.abort(new Error("shutting down"));
  await assert.rejects(waiting, /shutting down/);
  assert.equal(sem.waiting, 1);
  held.release();
  const slot = await next; // the aborted waiter did not swallow the slot
  assert.equal(sem.inUse, 1);
  slot.release();
  await assert.rejects(sem.acquire(AbortSignal.abort(new Error("already"))), /already/);
  assert.equal(sem.inUse, 0);
});

test("await using releases the slot when the block exits, also on throw", async () => {
  const sem = new Semaphore("dev", 1);
  await assert.rejects(async () => {
    await using _slot = await sem.acquire();
    assert.equal(sem.inUse, 1);
    throw new Error("step failed");
  }, /step failed/);
  assert.equal(sem.inUse, 0);
});

test("limits must be positive integers", () => {
  assert.throws(() => new Semaphore("x", 0), /limit must be an integer >= 1/);
  assert.throws(() => new Semaphore("x", 1.5), /limit/);
});
