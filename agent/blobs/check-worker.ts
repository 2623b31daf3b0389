// The download check thread's code (check-thread.ts starts it and is its only user). Per job, it
// reads a download's temp file as its written prefix grows, hashes every slice (SHA-256, and MD5
// for the ETag) and, for a layer, hands the same slice to the layer validator: the file is read
// once, and none of this runs on the agent's event loop.
//
// The oldest job with work goes first, one slice (1 MiB at most) at a time, with the messages that
// arrived meanwhile handled between slices. A pull's layers start downloading in order and are
// applied in order, so layer 1's check is not kept waiting behind the bytes of layers 2 to 4 (seen
// in the VM: a 13 s gap between layer 1's last byte and its apply). A job whose validator is still
// busy with its previous slice is passed over until it asks for the next one.
import { createHash, type Hash } from "node:crypto";
import { readSync } from "node:fs";
import { parentPort } from "node:worker_threads";
import { detectCompression, LayerValidationError, validateLayer, type LayerSummary } from "../layers/validate.ts";
import type { CheckMessage, CheckReply } from "./check-thread.ts";

const SLICE = 1024 * 1024;
/** Hashing is synchronous: the jobs without a validator share one buffer. */
const hashOnly = Buffer.allocUnsafe(SLICE);

/** The validator's input: one slice at a time, handed over when it asks for the next. */
class Feed implements AsyncIterableIterator<Uint8Array> {
  readonly #onWant: () => void;
  #waiting: ((result: IteratorResult<Uint8Array>) => void) | null = null;
  #ended = false;

  constructor(onWant: () => void) {
    this.#onWant = onWant;
  }

  /** The validator waits for its next slice. */
  get wanting(): boolean {
    return this.#waiting !== null;
  }

  push(slice: Uint8Array): void {
    const waiting = this.#waiting!;
    this.#waiting = null;
    waiting({ value: slice, done: false });
  }

  end(): void {
    this.#ended = true;
    const waiting = this.#waiting;
    this.#waiting = null;
    waiting?.({ value: undefined, done: true });
  }

  next(): Promise<IteratorResult<Uint8Array>> {
    if (this.#ended) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => {
      this.#waiting = resolve;
      this.#onWant();
    });
  }

  /** The validator stopped reading (it refused the layer). */
  return(): Promise<IteratorResult<Uint8Array>> {
    this.end();
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<Uint8Array> {
    return this;
  }
}

interface Job {
  fd: number;
  position: number;
  /** Bytes [0, upTo) are on disk. */
  upTo: number;
  /** Set by "end": the file's whole size. */
  size?: number;
  sha256: Hash;
  md5: Hash | null;
  /** For a layer: the validator's input, and its summary once it accepted every byte. */
  feed?: Feed;
  summary?: LayerSummary;
  /**
   * The buffer every slice of this job is read into, when that is safe: for hashing alone, and
   * for a plain tar, whose validator is done with a slice when it asks for the next (the tar
   * reader copies what it keeps). A compressed layer's decoder may still hold its input: each of
   * its slices gets a buffer of its own. (With a fresh 1 MiB buffer for every slice, the agent's
   * RSS high-water mark in the real-size bench was 282 MiB; 251 MiB with this.)
   */
  reusable?: Buffer;
}

const jobs = new Map<number, Job>(); // in the order the jobs started
const post = (reply: CheckReply) => parentPort!.postMessage(reply);

function fail(id: number, err: unknown): void {
  const job = jobs.get(id);
  if (!job) return; // ended already
  jobs.delete(id);
  job.feed?.end();
  if (err instanceof LayerValidationError) post({ job: id, refusal: { rule: err.rule, entry: err.entry, message: err.message } });
  else post({ job: id, error: err instanceof Error ? err.message : String(err) });
}

/** One slice of work (a read, hashed and fed; or a job finished), then the messages. */
function pump(): void {
  scheduled = false;
  for (const [id, job] of jobs) {
    if (job.feed && !job.feed.wanting && job.summary === undefined) continue; // its validator is busy
    if (job.position < job.upTo) {
      const slice = job.reusable ?? Buffer.allocUnsafe(SLICE);
      let n;
      try {
        n = readSync(job.fd, slice, 0, Math.min(SLICE, job.upTo - job.position), job.position);
        if (n === 0) throw new Error(`the download's file ends at ${job.position}, before the ${job.upTo} bytes written`);
      } catch (err) {
        fail(id, err);
        schedule();
        return;
      }
      const bytes = slice.subarray(0, n);
      job.sha256.update(bytes);
      job.md5?.update(bytes);
      if (job.feed && job.position === 0 && n >= 8 && detectCompression(bytes) === "none") job.reusable = Buffer.allocUnsafe(SLICE);
      job.position += n;
      job.feed?.push(bytes);
    } else if (job.size === undefined) {
      continue; // waiting for its next bytes
    } else if (job.position !== job.size) {
      fail(id, new Error(`hashed ${job.position} of the download's ${job.size} bytes`));
    } else if (job.feed && job.summary === undefined) {
      job.feed.end(); // every byte was fed: the validator finishes, then schedules the reply
      continue;
    } else {
      jobs.delete(id);
      post({ job: id, sha256Hex: job.sha256.digest("hex"), md5Hex: job.md5?.digest("hex"), summary: job.summary });
    }
    schedule();
    return;
  }
}

let scheduled = false;
function schedule(): void {
  if (!scheduled) setImmediate(pump); // after the messages that arrived meanwhile
  scheduled = true;
}

parentPort!.on("message", (m: CheckMessage) => {
  if (m.type === "start") {
    const job: Job = { fd: m.fd, position: 0, upTo: 0, sha256: createHash("sha256"), md5: m.md5 ? createHash("md5") : null };
    if (!m.validate) job.reusable = hashOnly;
    jobs.set(m.job, job);
    if (m.validate) {
      job.feed = new Feed(schedule);
      validateLayer(job.feed, m.validate).then(
        (summary) => {
          job.summary = summary;
          schedule();
        },
        (err: unknown) => fail(m.job, err),
      );
    }
    return;
  }
  const job = jobs.get(m.job);
  if (!job) return; // ended already: its reply was sent
  if (m.type === "upTo") {
    job.upTo = Math.max(job.upTo, m.upTo);
  } else if (m.type === "end") {
    job.size = m.size;
  } else {
    // Between slices: the thread is not reading the file now, nor will it again.
    jobs.delete(m.job);
    job.feed?.end();
    post({ job: m.job, cancelled: true });
    return;
  }
  schedule();
});
