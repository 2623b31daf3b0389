// The checks of a download, on a worker thread (check-worker.ts) that reads the temp file itself
// as its written prefix grows: SHA-256, MD5 (for the ETag check) and, for a layer, the layer
// validator, all from one read of each byte.
//
// Why a thread: hashing every byte twice and parsing the tar are most of a download's CPU on a
// host without SHA instructions (the VM's emulated CPU: SHA-256 ~70 MiB/s, MD5 ~290 MiB/s). On the
// agent's one thread they came after the HTTP streams and the writes of every download under way,
// and the validator fell behind them: in the real-size bench, layer 1 was applied 12-14 s after
// its last byte arrived. The worker reads the file by its descriptor (descriptors are the
// process's, shared by its threads), so no bytes are copied between threads and nothing queues in
// memory. One worker serves every download, the oldest job first; it is started on first use and
// keeps the process alive only while a job is under way.
//
// The contract a caller keeps: `available(n)` only for bytes on disk, and `result()` or `cancel()`
// awaited before the file is truncated or closed (the worker may be reading it).
import { Worker } from "node:worker_threads";
import { LayerValidationError, type LayerLimits, type LayerRule, type LayerSummary } from "../layers/validate.ts";
import { entryPointPath } from "../../privhelper/entry-points.ts";

export type CheckMessage =
  | { job: number; type: "start"; fd: number; md5: boolean; validate?: Partial<LayerLimits> }
  | { job: number; type: "upTo"; upTo: number }
  | { job: number; type: "end"; size: number }
  | { job: number; type: "cancel" };

export type CheckReply = {
  job: number;
  error?: string;
  refusal?: { rule: LayerRule; entry: string; message: string };
  cancelled?: boolean;
  sha256Hex?: string;
  md5Hex?: string;
  summary?: LayerSummary;
};

export interface CheckResult {
  sha256Hex: string;
  md5Hex?: string;
  /** The validator's summary, for a download checked as a layer. */
  summary?: LayerSummary;
}

class CheckThread {
  readonly #worker: Worker;
  readonly #waiters = new Map<number, (reply: CheckReply) => void>();
  #nextJob = 1;
  #stopped: string | undefined;

  constructor(onExit: () => void) {
    this.#worker = new Worker(entryPointPath("imgd-check-worker"));
    this.#worker.unref();
    this.#worker.on("message", (reply: CheckReply) => {
      const waiter = this.#waiters.get(reply.job);
      this.#waiters.delete(reply.job);
      if (this.#waiters.size === 0) this.#worker.unref();
      waiter?.(reply);
    });
    const stop = (why: string) => {
      this.#stopped ??= why;
      onExit();
      for (const waiter of this.#waiters.values()) waiter({ job: 0, error: `the download check thread stopped: ${why}` });
      this.#waiters.clear();
    };
    this.#worker.on("error", (err) => stop(err.message));
    this.#worker.on("exit", (code) => stop(`exit code ${code}`));
  }

  newJob(): number {
    return this.#nextJob++;
  }

  send(message: CheckMessage): void {
    if (this.#stopped === undefined) this.#worker.postMessage(message);
  }

  /** The job's final reply (its result, refusal, cancellation or error). */
  reply(job: number): Promise<CheckReply> {
    if (this.#stopped !== undefined) return Promise.resolve({ job, error: `the download check thread stopped: ${this.#stopped}` });
    // A job waited for keeps the agent's event loop alive (an idle thread does not).
    this.#worker.ref();
    return new Promise((resolve) => this.#waiters.set(job, resolve));
  }
}

let thread: CheckThread | undefined;
const sharedThread = (): CheckThread => (thread ??= new CheckThread(() => (thread = undefined)));

export interface FileCheckOptions {
  /** Also the MD5 (the ETag of an object uploaded in one part). */
  md5: boolean;
  /** Validate the bytes as a layer, with these limits (defaults for those absent). */
  validate?: Partial<LayerLimits>;
  /** Called as soon as the validator refuses the layer, while the download may still be going. */
  onRefusal?: (refusal: LayerValidationError) => void;
}

/** The checks of one file being written, on the shared check thread. */
export class FileCheck {
  readonly #thread = sharedThread();
  readonly #job = this.#thread.newJob();
  readonly #reply: Promise<CheckReply>;
  #available = 0;

  constructor(fd: number, options: FileCheckOptions) {
    this.#reply = this.#thread.reply(this.#job);
    this.#thread.send({ job: this.#job, type: "start", fd, md5: options.md5, ...(options.validate ? { validate: options.validate } : {}) });
    const { onRefusal } = options;
    if (onRefusal) void this.#reply.then((reply) => reply.refusal && onRefusal(refusalError(reply.refusal)));
  }

  /** Bytes [0, n) of the file are on disk. */
  available(n: number): void {
    if (n <= this.#available) return;
    this.#available = n;
    this.#thread.send({ job: this.#job, type: "upTo", upTo: n });
  }

  /**
   * The digests (and the validator's summary) of the file's first `size` bytes, once all of them
   * are available. Rejects with the validator's LayerValidationError when it refused the layer.
   */
  async result(size: number): Promise<CheckResult> {
    this.available(size);
    this.#thread.send({ job: this.#job, type: "end", size });
    const reply = await this.#reply;
    if (reply.refusal) throw refusalError(reply.refusal);
    if (reply.error !== undefined || reply.sha256Hex === undefined) throw new Error(`checking the download failed: ${reply.error ?? "no digest"}`);
    return { sha256Hex: reply.sha256Hex, ...(reply.md5Hex === undefined ? {} : { md5Hex: reply.md5Hex }), ...(reply.summary ? { summary: reply.summary } : {}) };
  }

  /** Stops the checks; resolves once the thread no longer reads the file. */
  async cancel(): Promise<void> {
    this.#thread.send({ job: this.#job, type: "cancel" });
    await this.#reply;
  }
}

const refusalError = (refusal: NonNullable<CheckReply["refusal"]>) => new LayerValidationError(refusal.rule, refusal.entry, refusal.message);
