// Client for the root helper's socket (protocol in privhelper/protocol.ts, whose types it shares).
// Requests carry increasing ids and responses are matched by id. The helper answers one
// connection's requests in order, so long operations (layer.apply can take minutes) get their own
// connection: a status query is not stuck behind them. Connections open on demand and are
// reopened after an error.
//
// A helper restart is transparent: when the connection drops mid-operation, an idempotent
// operation is sent again once the helper listens (with backoff, bounded by the caller's signal
// and a deadline). The others (fs.mkfs, layer.apply) may have half-happened: they fail
// with CONNECTION_LOST (`connectionLost`), for the caller to redo its work from a clean state.
import { createConnection, type Socket } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";
import type { OpArgs, OpName, OpResult, Response } from "../privhelper/protocol.ts";

/** Codes that will not change on retry: the request or the content itself is refused. */
// NOT_OURS / WRONG_ROLE / BLOB_REFUSED: the helper refuses the subject itself (issue 9).
const PERMANENT_CODES = new Set(["BAD_JSON", "BAD_ARGS", "UNKNOWN_OP", "TOO_LARGE", "LAYER_REFUSED", "HAS_FILESYSTEM", "NOT_OURS", "WRONG_ROLE", "BLOB_REFUSED"]);

export class HelperError extends Error {
  readonly code: string;
  readonly op: string;
  constructor(op: string, code: string, message: string) {
    super(message);
    this.name = "HelperError";
    this.op = op;
    this.code = code;
  }
  /** True when retrying the same request cannot succeed. */
  get permanent(): boolean {
    return PERMANENT_CODES.has(this.code);
  }
  /** The connection dropped while the helper had the request: its effect is unknown. */
  get connectionLost(): boolean {
    return this.code === "CONNECTION_LOST";
  }
}

/**
 * Operations whose repetition is harmless (privhelper/operations.ts): creating a thin id with
 * the same origin, activating the same id under the same name, deleting or removing what is
 * gone, and queries all succeed. Not here: fs.mkfs and layer.apply (they may have half-written
 * the device).
 */
const REISSUABLE = new Set<OpName>([
  "pool.status",
  "pool.ensure",
  "thin.create",
  "thin.snapshot",
  "thin.delete",
  "thin.list",
  "device.activate",
  "device.deactivate",
  "device.list",
]);

// The helper always answers: its programs have timeouts (layer.apply: 30 min). Every operation
// that changes state may first wait for the helper's lock behind a running layer.apply, so it
// gets more than that; the two lock-free queries answer at once.
const TIMEOUTS_MS: Partial<Record<OpName, number>> = {
  "pool.status": 30_000,
  "device.list": 30_000,
};
const DEFAULT_TIMEOUT_MS = 40 * 60_000;
const CONNECT_TIMEOUT_MS = 5_000;
const SLOW_OPS = new Set<OpName>(["layer.apply", "fs.mkfs", "pool.ensure"]);

// A helper that is not listening is usually being restarted by its supervisor and back within
// seconds: wait for it rather than fail the step at once (a step has few attempts, and a run
// whose steps all failed while the helper restarted would end failed for nothing).
const RECONNECT_WAIT_MS = 30_000;
const RECONNECT_FIRST_DELAY_MS = 100;
const RECONNECT_MAX_DELAY_MS = 2_000;

/**
 * Told of every request to the helper when its answer (or failure) comes: the op, "ok" or the
 * error's code, how long it took, and the result (the agent's metrics read pool figures and
 * applied bytes from it).
 */
export type HelperCallObserver = <Op extends OpName>(op: Op, outcome: string, seconds: number, result: OpResult<Op> | undefined) => void;

export type HelperClientOptions = {
  timeoutsMs?: Partial<Record<OpName, number>>;
  observer?: HelperCallObserver;
  /** How long a call waits for an unreachable helper to listen again (0: fail at once). */
  reconnectWaitMs?: number;
};

export type CallOptions = {
  /** Stops waiting (for the answer, or for the helper to come back); rejects with its reason. */
  signal?: AbortSignal;
};

export class HelperClient {
  private readonly timeouts: Partial<Record<OpName, number>>;
  private readonly reconnectWaitMs: number;
  private readonly observer: HelperCallObserver | undefined;
  private readonly fast: Connection;
  private readonly slow: Connection;
  private nextId = 1;
  private closed = false;

  constructor(socketPath: string, options: HelperClientOptions = {}) {
    this.timeouts = { ...TIMEOUTS_MS, ...options.timeoutsMs };
    this.reconnectWaitMs = options.reconnectWaitMs ?? RECONNECT_WAIT_MS;
    this.observer = options.observer;
    this.fast = new Connection(socketPath);
    this.slow = new Connection(socketPath);
  }

  async call<Op extends OpName>(op: Op, args: OpArgs<Op>, options: CallOptions = {}): Promise<OpResult<Op>> {
    const { signal } = options;
    if (this.closed) throw new HelperError(op, "CLIENT_CLOSED", "helper client is closed");
    const connection = SLOW_OPS.has(op) ? this.slow : this.fast;
    let deadline: number | undefined; // set by the first failure: how long to wait for the helper
    let delay = RECONNECT_FIRST_DELAY_MS;
    for (;;) {
      signal?.throwIfAborted();
      const began = performance.now();
      try {
        const result = (await connection.request(this.nextId++, op, args, this.timeouts[op] ?? DEFAULT_TIMEOUT_MS, signal)) as OpResult<Op>;
        this.observer?.(op, "ok", (performance.now() - began) / 1000, result);
        return result;
      } catch (err) {
        const outcome = err instanceof HelperError ? err.code : signal?.aborted ? "ABORTED" : "ERROR";
        this.observer?.(op, outcome, (performance.now() - began) / 1000, undefined);
        // A request that never reached the helper is sent again; one the helper had is sent
        // again only when repeating it is harmless.
        const unreachable = err instanceof HelperError && err.code === "UNAVAILABLE";
        const lost = err instanceof HelperError && err.connectionLost && REISSUABLE.has(op);
        deadline ??= Date.now() + this.reconnectWaitMs;
        if (!(unreachable || lost) || this.closed || Date.now() >= deadline) throw err;
      }
      const pause = Math.min(delay, deadline - Date.now());
      await sleep(pause, undefined, signal ? { signal } : {}).catch(() => signal?.throwIfAborted());
      delay = Math.min(delay * 2, RECONNECT_MAX_DELAY_MS);
      if (this.closed) throw new HelperError(op, "CLIENT_CLOSED", "helper client is closed");
    }
  }

  close(): void {
    this.closed = true;
    this.fast.drop("CLIENT_CLOSED", "helper client closed");
    this.slow.drop("CLIENT_CLOSED", "helper client closed");
  }
}

type Pending = { op: string; resolve: (value: unknown) => void; reject: (err: Error) => void; timer: NodeJS.Timeout };

/** One socket to the helper, with its in-flight requests. */
class Connection {
  private readonly socketPath: string;
  private socket: Socket | null = null;
  private connecting: Promise<Socket> | null = null;
  private readonly pending = new Map<number, Pending>();
  private buffered = "";

  constructor(socketPath: string) {
    this.socketPath = socketPath;
  }

  async request(id: number, op: string, args: unknown, timeoutMs: number, signal?: AbortSignal): Promise<unknown> {
    const socket = await this.connect(op);
    signal?.throwIfAborted();
    return new Promise((resolve, reject) => {
      // The caller stops waiting; the helper still finishes the operation (its answer is ignored).
      const onAbort = (): void => {
        const pending = this.pending.get(id);
        if (!pending) return;
        this.pending.delete(id);
        clearTimeout(pending.timer);
        reject(signal!.reason);
      };
      const timer = setTimeout(() => {
        this.pending.delete(id);
        signal?.removeEventListener("abort", onAbort);
        reject(new HelperError(op, "TIMEOUT", `no answer from the helper within ${timeoutMs} ms`));
      }, timeoutMs);
      const settle = <T,>(fn: (value: T) => void) => (value: T) => {
        signal?.removeEventListener("abort", onAbort);
        fn(value);
      };
      this.pending.set(id, { op, resolve: settle(resolve), reject: settle(reject), timer });
      signal?.addEventListener("abort", onAbort, { once: true });
      socket.write(JSON.stringify({ id, op, args }) + "\n");
    });
  }

  private connect(op: string): Promise<Socket> {
    if (this.socket) return Promise.resolve(this.socket);
    this.connecting ??= new Promise<Socket>((resolve, reject) => {
      const socket = createConnection(this.socketPath);
      const timer = setTimeout(() => socket.destroy(new Error(`connect timed out after ${CONNECT_TIMEOUT_MS} ms`)), CONNECT_TIMEOUT_MS);
      socket.setEncoding("utf8");
      socket.once("connect", () => {
        clearTimeout(timer);
        this.socket = socket;
        this.connecting = null;
        resolve(socket);
      });
      socket.on("data", (chunk: string) => this.onData(chunk));
      socket.on("error", (err) => {
        clearTimeout(timer);
        if (this.socket !== socket) {
          this.connecting = null;
          reject(new HelperError(op, "UNAVAILABLE", `cannot connect to the helper at ${this.socketPath}: ${err.message}`));
        }
        this.dropSocket(socket, err.message);
      });
      socket.on("close", () => this.dropSocket(socket, "connection closed by the helper"));
    });
    return this.connecting;
  }

  private onData(chunk: string): void {
    this.buffered += chunk;
    for (let newline = this.buffered.indexOf("\n"); newline !== -1; newline = this.buffered.indexOf("\n")) {
      const line = this.buffered.slice(0, newline);
      this.buffered = this.buffered.slice(newline + 1);
      this.onLine(line);
    }
  }

  private onLine(line: string): void {
    let response: Response;
    try {
      response = JSON.parse(line) as Response;
    } catch {
      return this.drop("PROTOCOL", `unreadable answer from the helper: ${line.slice(0, 200)}`);
    }
    if (response.id === null) {
      // The helper could not read a request's id (a client bug): fail everything in flight.
      return response.ok ? this.drop("PROTOCOL", "answer without id") : this.drop(response.error.code, response.error.message);
    }
    const pending = this.pending.get(response.id);
    if (!pending) return; // its caller already timed out
    this.pending.delete(response.id);
    clearTimeout(pending.timer);
    if (response.ok) pending.resolve(response.result);
    else pending.reject(new HelperError(pending.op, response.error.code, response.error.message));
  }

  private dropSocket(socket: Socket, message: string): void {
    if (this.socket === socket) this.drop("CONNECTION_LOST", message);
  }

  /** Forgets the socket (the next request reconnects) and fails every request in flight. */
  drop(code: string, message: string): void {
    const socket = this.socket;
    this.socket = null;
    this.buffered = "";
    socket?.destroy();
    for (const [id, pending] of this.pending) {
      clearTimeout(pending.timer);
      this.pending.delete(id);
      pending.reject(new HelperError(pending.op, code, message));
    }
  }
}
