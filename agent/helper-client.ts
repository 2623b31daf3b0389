// Client for the root helper's socket (protocol in privhelper/protocol.ts, whose types it shares).
// Requests carry increasing ids and responses are matched by id. The helper answers one
// connection's requests in order, so long operations (layer.apply can take minutes) get their own
// connection: a status query is not stuck behind them. Connections open on demand and are
// reopened after an error.
import { createConnection, type Socket } from "node:net";
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
}

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
const RECONNECT_POLL_MS = 250;

export type HelperClientOptions = {
  timeoutsMs?: Partial<Record<OpName, number>>;
  /** How long a call waits for an unreachable helper to listen again (0: fail at once). */
  reconnectWaitMs?: number;
};

export class HelperClient {
  private readonly timeouts: Partial<Record<OpName, number>>;
  private readonly reconnectWaitMs: number;
  private readonly fast: Connection;
  private readonly slow: Connection;
  private nextId = 1;
  private closed = false;

  constructor(socketPath: string, options: HelperClientOptions = {}) {
    this.timeouts = { ...TIMEOUTS_MS, ...options.timeoutsMs };
    this.reconnectWaitMs = options.reconnectWaitMs ?? RECONNECT_WAIT_MS;
    this.fast = new Connection(socketPath);
    this.slow = new Connection(socketPath);
  }

  async call<Op extends OpName>(op: Op, args: OpArgs<Op>): Promise<OpResult<Op>> {
    if (this.closed) throw new HelperError(op, "CLIENT_CLOSED", "helper client is closed");
    const connection = SLOW_OPS.has(op) ? this.slow : this.fast;
    const deadline = Date.now() + this.reconnectWaitMs;
    for (;;) {
      try {
        const result = await connection.request(this.nextId++, op, args, this.timeouts[op] ?? DEFAULT_TIMEOUT_MS);
        return result as OpResult<Op>;
      } catch (err) {
        // Only a request that never reached the helper is sent again: its effect is unknown otherwise.
        const unreachable = err instanceof HelperError && err.code === "UNAVAILABLE";
        if (!unreachable || this.closed || Date.now() + RECONNECT_POLL_MS > deadline) throw err;
      }
      await new Promise((resolve) => setTimeout(resolve, RECONNECT_POLL_MS));
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

  async request(id: number, op: string, args: unknown, timeoutMs: number): Promise<unknown> {
    const socket = await this.connect(op);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new HelperError(op, "TIMEOUT", `no answer from the helper within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { op, resolve, reject, timer });
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
