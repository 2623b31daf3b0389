// SHA-256 (and MD5, for the ETag check) of a download, computed on a worker thread that reads the
// temp file itself as its written prefix grows.
//
// Why a thread: hashing every byte twice is the largest CPU cost of a download on a host without
// SHA instructions (the VM's emulated CPU: SHA-256 ~70 MiB/s, MD5 ~290 MiB/s). On the agent's one
// thread it came after the HTTP streams, the writes and the layer validator; on its own thread it
// runs beside them. The worker reads the file by its descriptor (descriptors are the process's,
// shared by its threads), so no bytes are copied between threads and nothing queues in memory.
// One worker serves every download, the oldest job with bytes to hash first, a 1 MiB slice at a
// time; it is started on first use and keeps the process alive only while a job is under way.
//
// The contract a caller keeps: `available(n)` only for bytes on disk, and `digests()` or
// `cancel()` awaited before the file is truncated or closed (the worker may be reading it).
import { Worker } from "node:worker_threads";

export interface FileDigestResult {
  sha256Hex: string;
  md5Hex?: string;
}

type Message =
  | { job: number; type: "start"; fd: number; md5: boolean }
  | { job: number; type: "upTo"; upTo: number }
  | { job: number; type: "end"; size: number }
  | { job: number; type: "cancel" };
type Reply = { job: number; error?: string; cancelled?: boolean; sha256Hex?: string; md5Hex?: string };

/** The worker (runs from this function's source: it may use nothing from this module's scope). */
function hashJobs(): void {
  const { parentPort } = require("node:worker_threads") as typeof import("node:worker_threads");
  const { readSync } = require("node:fs") as typeof import("node:fs");
  const { createHash } = require("node:crypto") as typeof import("node:crypto");
  type Hash = ReturnType<typeof createHash>;
  type Job = { fd: number; position: number; upTo: number; size?: number; sha256: Hash; md5: Hash | null };
  // In the order the jobs started (a Map keeps it): the oldest job with bytes to hash goes first.
  // A pull's layers start downloading in order and are applied in order, so layer 1's digest is
  // not kept waiting behind the bytes of layers 2 to 4 that arrived meanwhile (seen in the VM: a
  // 13 s gap between layer 1's last byte and its apply when the thread took messages in order).
  const jobs = new Map<number, Job>();
  const buffer = Buffer.allocUnsafe(1024 * 1024);
  let scheduled = false;
  const fail = (id: number, err: unknown) => {
    jobs.delete(id);
    parentPort!.postMessage({ job: id, error: err instanceof Error ? err.message : String(err) });
  };
  /** One slice of work (a read and hash of at most 1 MiB, or a finished job), then the messages. */
  const pump = () => {
    scheduled = false;
    for (const [id, job] of jobs) {
      if (job.position < job.upTo) {
        try {
          const n = readSync(job.fd, buffer, 0, Math.min(buffer.length, job.upTo - job.position), job.position);
          if (n === 0) throw new Error(`the download's file ends at ${job.position}, before the ${job.upTo} bytes written`);
          job.sha256.update(buffer.subarray(0, n));
          job.md5?.update(buffer.subarray(0, n));
          job.position += n;
        } catch (err) {
          fail(id, err);
        }
      } else if (job.size !== undefined) {
        jobs.delete(id);
        if (job.position !== job.size) fail(id, new Error(`hashed ${job.position} of the download's ${job.size} bytes`));
        else parentPort!.postMessage({ job: id, sha256Hex: job.sha256.digest("hex"), md5Hex: job.md5?.digest("hex") });
      } else {
        continue; // waiting for its next bytes
      }
      schedule(); // after the messages that arrived meanwhile (setImmediate runs after them)
      return;
    }
  };
  const schedule = () => {
    if (!scheduled) setImmediate(pump);
    scheduled = true;
  };
  parentPort!.on("message", (m: Message) => {
    if (m.type === "start") {
      jobs.set(m.job, { fd: m.fd, position: 0, upTo: 0, sha256: createHash("sha256"), md5: m.md5 ? createHash("md5") : null });
      return;
    }
    const job = jobs.get(m.job);
    if (!job) return; // failed already: its error was sent
    if (m.type === "upTo") job.upTo = Math.max(job.upTo, m.upTo);
    else if (m.type === "end") job.size = m.size;
    else {
      // Between slices: the thread is not reading the file now, nor will it again.
      jobs.delete(m.job);
      parentPort!.postMessage({ job: m.job, cancelled: true });
      return;
    }
    schedule();
  });
}

class DigestThread {
  readonly #worker: Worker;
  readonly #waiters = new Map<number, (reply: Reply) => void>();
  #nextJob = 1;
  #stopped: string | undefined;

  constructor(onExit: () => void) {
    this.#worker = new Worker(`(${hashJobs.toString()})()`, { eval: true });
    this.#worker.unref();
    this.#worker.on("message", (reply: Reply) => {
      const waiter = this.#waiters.get(reply.job);
      this.#waiters.delete(reply.job);
      if (this.#waiters.size === 0) this.#worker.unref();
      waiter?.(reply);
    });
    const stop = (why: string) => {
      this.#stopped ??= why;
      onExit();
      for (const waiter of this.#waiters.values()) waiter({ job: 0, error: `the hashing thread stopped: ${why}` });
      this.#waiters.clear();
    };
    this.#worker.on("error", (err) => stop(err.message));
    this.#worker.on("exit", (code) => stop(`exit code ${code}`));
  }

  newJob(): number {
    return this.#nextJob++;
  }

  send(message: Message): void {
    if (this.#stopped === undefined) this.#worker.postMessage(message);
  }

  /** The job's final reply (its digests, its cancellation or its error). */
  reply(job: number): Promise<Reply> {
    if (this.#stopped !== undefined) return Promise.resolve({ job, error: `the hashing thread stopped: ${this.#stopped}` });
    // A job waited for keeps the agent's event loop alive (an idle thread does not).
    this.#worker.ref();
    return new Promise((resolve) => this.#waiters.set(job, resolve));
  }
}

let thread: DigestThread | undefined;
const sharedThread = (): DigestThread => (thread ??= new DigestThread(() => (thread = undefined)));

/** The digests of one file being written, computed on the shared hashing thread. */
export class FileDigests {
  readonly #thread = sharedThread();
  readonly #job = this.#thread.newJob();
  readonly #reply: Promise<Reply>;
  #available = 0;

  constructor(fd: number, withMd5: boolean) {
    this.#reply = this.#thread.reply(this.#job);
    this.#thread.send({ job: this.#job, type: "start", fd, md5: withMd5 });
  }

  /** Bytes [0, n) of the file are on disk. */
  available(n: number): void {
    if (n <= this.#available) return;
    this.#available = n;
    this.#thread.send({ job: this.#job, type: "upTo", upTo: n });
  }

  /** The digests of the file's first `size` bytes, once all of them are available. */
  async digests(size: number): Promise<FileDigestResult> {
    this.available(size);
    this.#thread.send({ job: this.#job, type: "end", size });
    const reply = await this.#reply;
    if (reply.error !== undefined || reply.sha256Hex === undefined) throw new Error(`hashing the download failed: ${reply.error ?? "no digest"}`);
    return { sha256Hex: reply.sha256Hex, ...(reply.md5Hex === undefined ? {} : { md5Hex: reply.md5Hex }) };
  }

  /** Stops hashing; resolves once the thread no longer reads the file. */
  async cancel(): Promise<void> {
    this.#thread.send({ job: this.#job, type: "cancel" });
    await this.#reply;
  }
}
