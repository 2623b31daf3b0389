import { test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { KeyedLock } from "../../agent/keyed-lock.ts";

test("work under one key runs one at a time, in arrival order; other keys run alongside", async () => {
  const lock = new KeyedLock();
  const log: string[] = [];
  const job = (key: string, name: string, ms: number) =>
    lock.run(key, async () => {
      log.push(`start ${name}`);
      await sleep(ms);
      log.push(`end ${name}`);
    });
  await Promise.all([job("a", "a1", 20), job("a", "a2", 1), job("b", "b1", 5)]);
  assert.deepEqual(log, ["start a1", "start b1", "end b1", "end a1", "start a2", "end a2"]);
});

test("a failure releases the key", async () => {
  const lock = new KeyedLock();
  await assert.rejects(lock.run("k", async () => { throw new Error("boom"); }), /boom/);
  assert.equal(await lock.run("k", async () => 42), 42);
});

test("acquire(key, signal): a waiter that gives up neither gets the key nor lets those behind it overtake the holder", async () => {
  const lock = new KeyedLock();
  const release = await lock.acquire("k");
  const controller = new AbortController();
  const quitter = lock.acquire("k", controller.signal);
  let thirdGot = false;
  const third = lock.acquire("k").then((r) => ((thirdGot = true), r));
  controller.abort(new Error("stopping"));
  await assert.rejects(quitter, /stopping/);
  await sleep(10);
  assert.equal(thirdGot, false, "the holder still has the key");
  release();
  (await third)();
  assert.equal(await lock.run("k", async () => "free"), "free");
});
