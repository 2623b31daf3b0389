// The Unix socket server: newline-delimited JSON, one request at a time per connection, and one
// privileged operation at a time overall (a single global mutex: simple, and nothing can race).
import { chmod, chown, lstat, mkdir, unlink } from "node:fs/promises";
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { dirname } from "node:path";
import { HelperFailure } from "./errors.ts";
import { encodeResponse, MAX_LINE_BYTES, parseRequestLine, type Request, type Response } from "./protocol.ts";

export type Handler = (request: Request) => Promise<unknown>;
export type LogLine = Record<string, unknown>;

export type ServerOptions = {
  socketPath: string;
  /** group that may connect (socket mode 0660, owner root) */
  socketGid: number;
  handler: Handler;
  log: (line: LogLine) => void;
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

// A client may pipeline requests; past this many queued lines we stop reading its socket.
const MAX_QUEUED_PER_CONNECTION = 16;
// Pure queries (they only read dm tables/status) skip the lock, so a status request is not held
// up for minutes behind a layer.apply. Everything that changes state takes the lock.
const UNLOCKED_OPS = new Set<string>(["pool.status", "device.list"]);

export class HelperServer {
  private readonly options: ServerOptions;
  private readonly mutex = new Mutex();
  private readonly sockets = new Set<Socket>();
  private server: Server | null = null;
  private stopping = false;
  private connections = 0;

  constructor(options: ServerOptions) {
    this.options = options;
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
    for (const socket of this.sockets) socket.destroy();
    await closed;
    await unlink(this.options.socketPath).catch(() => undefined);
    return finished;
  }

  private accept(socket: Socket): void {
    const conn = ++this.connections;
    this.sockets.add(socket);
    socket.on("close", () => this.sockets.delete(socket));
    socket.on("error", () => socket.destroy());

    let partial: Buffer[] = [];
    let partialBytes = 0;
    let queued = 0;
    let chain: Promise<void> = Promise.resolve();

    const enqueue = (work: () => Promise<void>) => {
      queued++;
      if (queued >= MAX_QUEUED_PER_CONNECTION) socket.pause();
      chain = chain.then(work).finally(() => {
        queued--;
        if (queued < MAX_QUEUED_PER_CONNECTION && !socket.destroyed) socket.resume();
      });
    };

    const tooLarge = () => {
      socket.off("data", onData);
      socket.pause();
      enqueue(async () => {
        this.options.log({ conn, ok: false, code: "TOO_LARGE" });
        this.send(socket, { id: null, ok: false, error: { code: "TOO_LARGE", message: `request line exceeds ${MAX_LINE_BYTES} bytes; closing connection` } });
        socket.end(() => socket.destroy());
      });
    };

    const onData = (chunk: Buffer) => {
      let start = 0;
      for (let newline = chunk.indexOf(10); newline !== -1; newline = chunk.indexOf(10, start)) {
        const piece = chunk.subarray(start, newline);
        if (partialBytes + piece.byteLength > MAX_LINE_BYTES) return tooLarge();
        const line = partial.length === 0 ? piece : Buffer.concat([...partial, piece]);
        partial = [];
        partialBytes = 0;
        enqueue(() => this.handleLine(socket, conn, line));
        start = newline + 1;
      }
      const rest = chunk.subarray(start);
      if (partialBytes + rest.byteLength > MAX_LINE_BYTES) return tooLarge();
      if (rest.byteLength > 0) {
        partial.push(Buffer.from(rest)); // copy: the chunk's memory may be reused
        partialBytes += rest.byteLength;
      }
    };
    socket.on("data", onData);
  }

  private async handleLine(socket: Socket, conn: number, line: Buffer): Promise<void> {
    const started = performance.now();
    const parsed = parseRequestLine(line);
    if (!parsed.ok) {
      this.options.log({ conn, id: parsed.id, ok: false, code: parsed.code, field: parsed.field, message: parsed.message, bytes: line.byteLength });
      this.send(socket, { id: parsed.id, ok: false, error: { code: parsed.code, message: parsed.message } });
      return;
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
    this.options.log(response.ok
      ? { conn, id, op, args, ok: true, ms }
      : { conn, id, op, args, ok: false, code: response.error.code, message: response.error.message, ms });
    this.send(socket, response);
  }

  private send(socket: Socket, response: Response): void {
    if (!socket.destroyed && socket.writable) socket.write(encodeResponse(response));
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
