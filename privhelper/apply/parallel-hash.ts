// SHA-256 of the blob on a second thread while the applier's main thread writes it out.
//
// Why: the applier must hash the exact bytes it applies (the blob store is the agent's, and the
// agent is not trusted), and on hosts without SHA instructions (the VM's emulated CPU: ~70 MiB/s)
// the hash is a fifth to two fifths of the applier's time. The main thread's work is synchronous
// (readSync, the tar reader, writeSync), so the two threads share the read buffers instead of
// passing messages: a ring of slots in one SharedArrayBuffer and a few Atomics counters. The main
// thread reads slice n into slot n % SLOTS, submits it, and applies it while the worker hashes it;
// it reuses a slot only once the worker is done with it (the backpressure).
//
// The worker runs from a string (eval, HASH_WORKER below), since no file is reachable from inside
// the image, and needs only node:crypto, which is built in: it starts even after the applier
// chrooted. Nobody waits for it to start (half a second under emulation): it starts while the
// applier mounts and reads, and the main thread first waits for it when the ring is full or at
// the digest.
import { Worker } from "node:worker_threads";

const SLOTS = 3;
/** How long a wait for the worker may take before the applier gives up (it never should). */
const WORKER_TIMEOUT_MS = 60_000;

// Int32 cells of the control block.
const SUBMITTED = 0; // slices submitted by the main thread
const HASHED = 1; // slices the worker has hashed
const ENDED = 2; // 1 once no more slices come
const SEQ = 3; // bumped with every change the worker must see: it waits on this cell
const STATE = 4; // 0 starting, 1 running, 2 digest written, 3 failed
const CELLS = 5;

/**
 * The worker: hashes slots in order until the main thread says the blob ended. Plain JavaScript in
 * a string, not a function's toString(): the bundle (scripts/bundle.ts) rewrites function bodies
 * (renamed imports, helpers of its own) into code that cannot run alone in a thread (seen: every
 * layer.apply waited out WORKER_TIMEOUT_MS). Any failure once it holds the control block ends in
 * state 3, which the main thread's waits see at once.
 */
const HASH_WORKER = `
"use strict";
const { workerData } = require("node:worker_threads");
const ctl = new Int32Array(workerData.control);
const cells = workerData.cells;
function finish(state) {
  Atomics.store(ctl, cells.STATE, state);
  Atomics.notify(ctl, cells.STATE);
}
try {
  const { createHash } = require("node:crypto");
  const { lengths, data, result, slotBytes, slots } = workerData;
  const sizes = new Int32Array(lengths);
  const hash = createHash("sha256");
  finish(1);
  for (let next = 0; ; ) {
    const seq = Atomics.load(ctl, cells.SEQ);
    if (next < Atomics.load(ctl, cells.SUBMITTED)) {
      const slot = next % slots;
      hash.update(new Uint8Array(data, slot * slotBytes, sizes[slot]));
      next += 1;
      Atomics.store(ctl, cells.HASHED, next);
      Atomics.notify(ctl, cells.HASHED);
    } else if (Atomics.load(ctl, cells.ENDED) === 1) {
      new Uint8Array(result).set(hash.digest());
      finish(2);
      break;
    } else {
      Atomics.wait(ctl, cells.SEQ, seq);
    }
  }
} catch {
  finish(3);
}
`;

function withoutCompileCache(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const { NODE_COMPILE_CACHE: _, ...rest } = env;
  return rest;
}

export class ParallelSha256 {
  readonly #worker: Worker;
  readonly #ctl: Int32Array;
  readonly #lengths: Int32Array;
  readonly #data: SharedArrayBuffer;
  readonly #result: SharedArrayBuffer;
  readonly #slotBytes: number;
  #submitted = 0;

  /** Starts the worker (without waiting for it). */
  constructor(slotBytes: number) {
    this.#slotBytes = slotBytes;
    const control = new SharedArrayBuffer(CELLS * 4);
    const lengths = new SharedArrayBuffer(SLOTS * 4);
    this.#data = new SharedArrayBuffer(SLOTS * slotBytes);
    this.#result = new SharedArrayBuffer(32);
    this.#ctl = new Int32Array(control);
    this.#lengths = new Int32Array(lengths);
    const cells = { SUBMITTED, HASHED, ENDED, SEQ, STATE };
    this.#worker = new Worker(HASH_WORKER, {
      eval: true,
      // No compile cache in this thread: a thread writes its cache when it ends, and this one
      // ends inside the chroot, where the cache's path would be created in the image.
      env: { ...withoutCompileCache(process.env), NODE_DISABLE_COMPILE_CACHE: "1" },
      workerData: { control, lengths, data: this.#data, result: this.#result, slotBytes, slots: SLOTS, cells },
    });
    this.#worker.unref(); // never what keeps the applier alive
  }

  /** The buffer to read the next slice into; waits until the worker is done with its last use. */
  nextSlot(): Buffer {
    const reuses = this.#submitted - SLOTS; // the slice that last used this slot
    if (reuses >= 0) this.#waitFor(HASHED, (hashed) => hashed > reuses, "hash a slice");
    const slot = this.#submitted % SLOTS;
    return Buffer.from(this.#data, slot * this.#slotBytes, this.#slotBytes);
  }

  /** Hands the first `length` bytes of the slot nextSlot() returned to the worker. */
  submit(length: number): void {
    if (!(length > 0 && length <= this.#slotBytes)) throw new RangeError(`bad slice length ${length}`);
    this.#lengths[this.#submitted % SLOTS] = length;
    this.#submitted += 1;
    Atomics.store(this.#ctl, SUBMITTED, this.#submitted);
    this.#bump();
  }

  /** Ends the input and returns "sha256:<hex>" of every byte submitted. */
  digest(): string {
    Atomics.store(this.#ctl, ENDED, 1);
    this.#bump();
    this.#waitFor(STATE, (state) => state >= 2, "finish");
    if (Atomics.load(this.#ctl, STATE) !== 2) throw new Error("the hashing thread failed");
    return `sha256:${Buffer.from(this.#result).toString("hex")}`;
  }

  /** After a failure: the worker is not waited for. */
  stop(): void {
    void this.#worker.terminate();
  }

  #bump(): void {
    Atomics.add(this.#ctl, SEQ, 1);
    Atomics.notify(this.#ctl, SEQ);
  }

  /** Blocks this thread until the cell satisfies `done` (or the worker failed). */
  #waitFor(cell: number, done: (value: number) => boolean, what: string): void {
    const deadline = Date.now() + WORKER_TIMEOUT_MS;
    for (;;) {
      const value = Atomics.load(this.#ctl, cell);
      if (done(value)) return;
      if (Atomics.load(this.#ctl, STATE) === 3) throw new Error(`the hashing thread failed (waiting for it to ${what})`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`the hashing thread did not ${what} within ${WORKER_TIMEOUT_MS} ms`);
      Atomics.wait(this.#ctl, cell, value, Math.min(left, 1000));
    }
  }
}
