// The Unix socket server: newline-delimited JSON, one request at a time per connection, and one
// privileged operation at a time overall (a single global mutex: simple, and nothing can race).
//
// Every client is treated as possibly hostile (an exploited agent has the agent's uid), so every
// resource a client can make the helper spend is bounded (ServerLimits): connections (globally and
// per peer uid), lines parsed ahead (one line is taken off the buffer at a time, never a whole
// chunk), unread response bytes (reading stops while they are over the cap; a client that stays
// over it is cut off), a partial line's size and idle time. Each request first yields to the event
// loop, so one connection's stream of cheap refusals cannot starve the others.
import { chmod, chown, lstat, mkdir, unlink } from "node:fs/promises";
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { dirname } from "node:path";
import { setImmediate as yieldToEventLoop } from "node:timers/promises";
import { HelperFailure } from "./errors.ts";
import type { LogLevel } from "./log.ts";
import { peerOf, type Peer } from "./peer.ts";
import { encodeResponse, MAX_LINE_BYTES, parseRequestLine, type Request, type Response } from "./protocol.ts";

export type Handler = (request: Request) => Promise<unknown>;
/** One log line's fields; its level says how severe it is (main.ts writes it as JSON, privhelper/log.ts). */
export type LogLine = { level: LogLevel; msg: string } & Record<string, unknown>;

export type ServerLimits = {
  /** connections open at once, all clients together */
  maxConnections: number;
  /** connections open at once from one uid (SO_PEERCRED), so one client cannot take them all */
  maxConnectionsPerUid: number;
  /** request lines taken off a connection and not yet answered; reading stops at this many */
  maxQueuedPerConnection: number;
  /** response bytes the client has not read yet; reading stops above this */
  maxUnreadResponseBytes: number;
  /** a client that stays above maxUnreadResponseBytes this long is cut off */
  unreadStallMs: number;
  /** a connection holding an incomplete line this long without completing it is closed */
  partialLineIdleMs: number;
  /** refused (unparsable) requests after which a connection is cut off: the agent sends none */
  maxRefusalsPerConnection: number;
  /** refusals logged one by one per connection; the rest are counted in the line that closes it */
  maxLoggedRefusalsPerConnection: number;
};

export const DEFAULT_LIMITS: ServerLimits = {
  maxConnections: 128,
  maxConnectionsPerUid: 32,
  maxQueuedPerConnection: 16,
  maxUnreadResponseBytes: 1024 * 1024,
  unreadStallMs: 10_000,
  partialLineIdleMs: 10_000,
  maxRefusalsPerConnection: 1000,
  maxLoggedRefusalsPerConnection: 20,
};

export type ServerOptions = {
  socketPath: string;
  /** group that may connect (socket mode 0660, owner root) */
  socketGid: number;
  handler: Handler;
  log: (line: LogLine) => void;
  limits?: Partial<ServerLimits>;
};

/** Runs functions one after another, in call order. */
export class Mutex {
  private tail: Promise<unknown> = Promise.resolve();
  run<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.tail.then(fn);
    this.tail = result.catch(() => undefined);
    return result;
  }
  /** Resolves once everything queued so far has finished. */
  idle(): Promise<void> {
    return this.tail.then(() => undefined);
  }
}

// Pure queries (they only read dm tables/status) skip the lock, so a status request is not held
// up for minutes behind a layer.apply. Everything that changes state takes the lock.
const UNLOCKED_OPS = new Set<string>(["pool.status", "device.list"]);
// Connections refused for a cap are logged once, then counted into one line per this interval.
const REFUSAL_LOG_INTERVAL_MS = 10_000;

export class HelperServer {
  private readonly options: ServerOptions;
  readonly limits: ServerLimits;
  private readonly mutex = new Mutex();
  private readonly connections = new Set<Connection>();
  private server: Server | null = null;
  private stopping = false;
  private connectionCount = 0;
  private readonly refusedLog = { lastAt: -Infinity, unlogged: 0 };

  constructor(options: ServerOptions) {
    this.options = options;
    this.limits = { ...DEFAULT_LIMITS, ...options.limits };
  }

  async start(): Promise<void> {
    const { socketPath, socketGid } = this.options;
    await prepareSocketPath(socketPath);
    const server = createServer((socket) => this.accept(socket));
    // Created 0600 (umask), then opened to the group: it is never reachable by anyone else.
    const umask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(socketPath, () => {
          server.off("error", reject);
          resolve();
        });
      });
    } finally {
      process.umask(umask);
    }
    await chown(socketPath, 0, socketGid);
    await chmod(socketPath, 0o660);
    this.server = server;
  }

  /** Stops accepting, lets the running operation finish (up to graceMs), then drops clients. */
  async stop(graceMs: number): Promise<boolean> {
    this.stopping = true;
    const closed = new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    let timer: NodeJS.Timeout | undefined;
    const finished = await Promise.race([
      this.mutex.idle().then(() => true),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), graceMs))),
    ]);
    clearTimeout(timer);
    for (const connection of this.connections) connection.socket.destroy();
    await closed;
    await unlink(this.options.socketPath).catch(() => undefined);
    return finished;
  }

  log(line: LogLine): void {
    this.options.log(line);
  }

  private accept(socket: Socket): void {
    const conn = ++this.connectionCount;
    const peer = peerOf(socket);
    socket.on("error", () => socket.destroy());
    const fromSameUid = peer === null ? 0 : [...this.connections].filter((c) => c.peer?.uid === peer.uid).length;
    const refusal = this.connections.size >= this.limits.maxConnections
      ? `the helper already has ${this.connections.size} connections (limit ${this.limits.maxConnections})`
      : peer !== null && fromSameUid >= this.limits.maxConnectionsPerUid
        ? `uid ${peer.uid} already has ${fromSameUid} connections (limit ${this.limits.maxConnectionsPerUid})`
        : null;
    if (refusal !== null) {
      this.logRefusedConnection({ conn, uid: peer?.uid, pid: peer?.pid, reason: refusal });
      socket.end(encodeResponse({ id: null, ok: false, error: { code: "TOO_MANY_CONNECTIONS", message: refusal } }), () => socket.destroy());
      return;
    }
    const connection = new Connection(this, socket, conn, peer);
    this.connections.add(connection);
    socket.on("close", () => {
      this.connections.delete(connection);
      connection.closed();
    });
  }

  private logRefusedConnection(line: Record<string, unknown>): void {
    const now = performance.now();
    if (now - this.refusedLog.lastAt < REFUSAL_LOG_INTERVAL_MS) {
      this.refusedLog.unlogged++;
      return;
    }
    const alsoRefused = this.refusedLog.unlogged;
    this.refusedLog.lastAt = now;
    this.refusedLog.unlogged = 0;
    this.log({ level: "warn", msg: "connection refused", ...line, ok: false, code: "TOO_MANY_CONNECTIONS", ...(alsoRefused > 0 ? { refusedSinceLastLine: alsoRefused } : {}) });
  }

  /**
   * Parses and performs one request line; always resolves with the response to send. A line that
   * does not parse is logged only while `logRefusal` is true (the connection's quota).
   */
  async handleLine(conn: number, peer: Peer | null, line: Buffer, logRefusal: () => boolean): Promise<{ response: Response; refused: boolean }> {
    const started = performance.now();
    const who = peer === null ? {} : { uid: peer.uid, pid: peer.pid };
    const parsed = parseRequestLine(line);
    if (!parsed.ok) {
      if (logRefusal()) this.log({ level: "warn", msg: "request refused", conn, ...who, id: parsed.id, ok: false, code: parsed.code, field: parsed.field, message: parsed.message, bytes: line.byteLength });
      return { response: { id: parsed.id, ok: false, error: { code: parsed.code, message: parsed.message } }, refused: true };
    }
    const { id, op, args } = parsed.request;
    let response: Response;
    if (this.stopping) {
      response = { id, ok: false, error: { code: "SHUTTING_DOWN", message: "the helper is shutting down" } };
    } else {
      try {
        const work = () => this.options.handler(parsed.request);
        const result = await (UNLOCKED_OPS.has(op) ? work() : this.mutex.run(work));
        response = { id, ok: true, result };
      } catch (err) {
        const error = err instanceof HelperFailure
          ? { code: err.code, message: err.message }
          : { code: "INTERNAL", message: err instanceof Error ? err.message : String(err) };
        response = { id, ok: false, error };
      }
    }
    const ms = Math.round(performance.now() - started);
    // A refused or failed operation is the caller's to handle (warn); INTERNAL is a helper bug.
    this.log(response.ok
      ? { level: "info", msg: "request done", conn, ...who, id, op, args, ok: true, ms }
      : { level: response.error.code === "INTERNAL" ? "error" : "warn", msg: "request failed", conn, ...who, id, op, args, ok: false, code: response.error.code, message: response.error.message, ms });
    return { response, refused: false };
  }
}

/** One client connection: framing, flow control and its limits. */
class Connection {
  private pending: Buffer = Buffer.alloc(0); // received bytes not yet taken as lines
  private queued = 0; // lines taken, not yet answered
  private refusals = 0;
  private chain: Promise<void> = Promise.resolve();
  private partialTimer: NodeJS.Timeout | undefined;
  private stallTimer: NodeJS.Timeout | undefined;
  private ended = false;
  /** no more lines are taken: the queued ones are answered, then the connection is cut off */
  private draining = false;

  private readonly server: HelperServer;
  readonly socket: Socket;
  private readonly conn: number;
  readonly peer: Peer | null;

  constructor(server: HelperServer, socket: Socket, conn: number, peer: Peer | null) {
    this.server = server;
    this.socket = socket;
    this.conn = conn;
    this.peer = peer;
    socket.on("data", (chunk: Buffer) => {
      if (this.ended || this.draining) return;
      // Bounded: reading stops (pump) long before this grows past a line and a chunk or two.
      this.pending = this.pending.byteLength === 0 ? chunk : Buffer.concat([this.pending, chunk]);
      this.pump();
    });
    socket.on("drain", () => this.pump());
  }

  private get limits(): ServerLimits {
    return this.server.limits;
  }

  /** Takes complete lines while the queue has room, then decides whether to keep reading. */
  private pump(): void {
    if (this.ended || this.draining) return;
    while (this.queued < this.limits.maxQueuedPerConnection) {
      const newline = this.pending.indexOf(10);
      if (newline === -1) break;
      if (newline > MAX_LINE_BYTES) return this.tooLarge();
      const line = Buffer.from(this.pending.subarray(0, newline)); // a copy: the rest may go on
      this.pending = this.pending.subarray(newline + 1);
      this.take(line);
    }
    const hasLine = this.pending.includes(10);
    if (!hasLine && this.pending.byteLength > MAX_LINE_BYTES) return this.tooLarge();
    // A line must be complete within partialLineIdleMs of its first byte (a byte now and then
    // does not keep a connection and its buffer alive).
    if (!hasLine && this.pending.byteLength > 0) {
      this.partialTimer ??= setTimeout(() => this.cutOff("PARTIAL_LINE_IDLE", `an incomplete request line (${this.pending.byteLength} bytes) was not completed within ${this.limits.partialLineIdleMs} ms`), this.limits.partialLineIdleMs);
    } else {
      clearTimeout(this.partialTimer);
      this.partialTimer = undefined;
    }
    this.flowControl();
  }

  private take(line: Buffer): void {
    this.queued++;
    this.chain = this.chain
      .then(() => yieldToEventLoop())
      .then(() => (this.ended ? null : this.server.handleLine(this.conn, this.peer, line, () => this.refusals < this.limits.maxLoggedRefusalsPerConnection)))
      .then((handled) => {
        if (!handled) return;
        this.send(handled.response);
        if (handled.refused && ++this.refusals >= this.limits.maxRefusalsPerConnection) {
          this.cutOff("TOO_MANY_REFUSALS", `${this.refusals} requests were refused on this connection`);
        }
      })
      .finally(() => {
        this.queued--;
        this.pump();
      });
  }

  private send(response: Response): void {
    if (this.ended || !this.socket.writable) return;
    this.socket.write(encodeResponse(response));
  }

  /** Reads only while the queue has room and the client reads its answers. */
  private flowControl(): void {
    const unread = this.socket.writableLength;
    const backlogged = this.queued >= this.limits.maxQueuedPerConnection || unread > this.limits.maxUnreadResponseBytes || this.pending.includes(10);
    if (backlogged) this.socket.pause();
    else this.socket.resume();
    if (unread > this.limits.maxUnreadResponseBytes) {
      this.stallTimer ??= setTimeout(() => this.cutOff("NOT_READING", `the client left ${this.socket.writableLength} bytes of responses unread for ${this.limits.unreadStallMs} ms`), this.limits.unreadStallMs);
    } else {
      clearTimeout(this.stallTimer);
      this.stallTimer = undefined;
    }
  }

  /** The lines before the oversized one are still answered, in order; then TOO_LARGE and close. */
  private tooLarge(): void {
    this.draining = true;
    this.pending = Buffer.alloc(0);
    clearTimeout(this.partialTimer);
    this.socket.pause();
    const message = `request line exceeds ${MAX_LINE_BYTES} bytes; closing connection`;
    this.chain = this.chain.then(() => {
      this.send({ id: null, ok: false, error: { code: "TOO_LARGE", message } });
      this.cutOff("TOO_LARGE", message);
    });
  }

  /** Closes the connection for a broken limit: logged once, whatever the client sends after. */
  private cutOff(code: string, message: string): void {
    if (this.ended) return;
    this.ended = true;
    this.pending = Buffer.alloc(0);
    this.clearTimers();
    const who = this.peer === null ? {} : { uid: this.peer.uid, pid: this.peer.pid };
    const unlogged = Math.max(0, this.refusals - this.limits.maxLoggedRefusalsPerConnection);
    this.server.log({ level: "warn", msg: "connection cut off", conn: this.conn, ...who, ok: false, code, message: `${message}; connection closed`, ...(unlogged > 0 ? { refusalsNotLogged: unlogged } : {}) });
    this.socket.pause();
    // Whatever was already answered goes out if the client reads it; a client that does not is
    // not waited for.
    this.socket.end(() => this.socket.destroy());
    setTimeout(() => this.socket.destroy(), 1000).unref();
  }

  closed(): void {
    const unlogged = Math.max(0, this.refusals - this.limits.maxLoggedRefusalsPerConnection);
    if (!this.ended && unlogged > 0) {
      const who = this.peer === null ? {} : { uid: this.peer.uid, pid: this.peer.pid };
      this.server.log({ level: "warn", msg: "connection closed", conn: this.conn, ...who, refusals: this.refusals, refusalsNotLogged: unlogged });
    }
    this.ended = true;
    this.pending = Buffer.alloc(0);
    this.clearTimers();
  }

  private clearTimers(): void {
    clearTimeout(this.partialTimer);
    clearTimeout(this.stallTimer);
  }
}

/** Makes sure the socket can be created safely: a root-owned parent, no live helper, no non-socket. */
async function prepareSocketPath(socketPath: string): Promise<void> {
  const parent = dirname(socketPath);
  await mkdir(parent, { recursive: true, mode: 0o755 });
  const dir = await lstat(parent);
  // Someone else able to write the directory could swap the socket for their own.
  if (!dir.isDirectory() || dir.uid !== 0 || (dir.mode & 0o022) !== 0) {
    throw new Error(`${parent} must be a directory owned by root and not writable by group or others`);
  }
  const existing = await lstat(socketPath).catch((err: NodeJS.ErrnoException) => {
    if (err.code === "ENOENT") return null;
    throw err;
  });
  if (!existing) return;
  if (!existing.isSocket()) throw new Error(`${socketPath} exists and is not a socket; refusing to remove it`);
  if (await isListening(socketPath)) throw new Error(`another helper is already listening on ${socketPath}`);
  await unlink(socketPath);
}

function isListening(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = createConnection(socketPath);
    probe.once("connect", () => {
      probe.destroy();
      resolve(true);
    });
    probe.once("error", () => resolve(false));
  });
}
