// A TEST DOUBLE of the root helper, for host-side agent tests only (the end-to-end tests in the
// VM use the real helper and the kernel's thin pool). It speaks the real socket protocol, parsed
// by the real privhelper/protocol.ts, and models the pool as thin ids with origins: each thin
// device carries the list of layer digests applied to it, inherited by its snapshots, so a test
// can check what an image's device would contain.
import { randomBytes } from "node:crypto";
import { createServer, type Server } from "node:net";
import { existsSync, rmSync } from "node:fs";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseRequestLine, type OpName, type Request } from "../../privhelper/protocol.ts";

export interface FakeThin {
  origin: number | null;
  layers: string[];
  formatted: boolean;
}

export interface FakeHelper {
  socketPath: string;
  thins: Map<number, FakeThin>;
  active: Map<string, number>;
  calls: { op: OpName; args: unknown }[];
  /**
   * The pool's identity, as the real helper keeps it (privhelper/pool-identity.ts): set it to
   * another value to stand for another pool (or a recreated one), to null for a pool an older
   * helper made (pool.ensure then gives it one, pool.status reports null).
   */
  poolId: string | null;
  /** Makes the next call of `op` fail with this code (and message). */
  failNext(op: OpName, code: string, message?: string): void;
  /** Makes every layer.apply wait for this promise (to hold runs mid-step). */
  holdApply(gate: Promise<void> | undefined): void;
  /**
   * Simulates a helper restart in the middle of the next `op`: the operation takes effect (a
   * layer.apply only half: the device gets `partial:<digest>`), then every connection is cut
   * without an answer and the socket is gone for `downMs` before the helper listens again with
   * the same pool. Resolves when it listens again.
   */
  restartDuring(op: OpName, downMs?: number): Promise<void>;
  restarts: number;
  close(): Promise<void>;
}

export async function startFakeHelper(blobDir: string): Promise<FakeHelper> {
  const socketPath = join(mkdtempSync(join(tmpdir(), "imgd-fake-helper-")), "helper.sock");
  const thins = new Map<number, FakeThin>();
  const active = new Map<string, number>();
  const calls: { op: OpName; args: unknown }[] = [];
  const failures = new Map<OpName, { code: string; message: string }>();
  let applyGate: Promise<void> | undefined;
  const restartOps = new Map<OpName, { downMs: number; done: () => void }[]>();
  const sockets = new Set<import("node:net").Socket>();
  let restarts = 0;
  let poolId: string | null = randomBytes(16).toString("hex");
  let server: Server;
  const listen = () => new Promise<void>((resolve) => server.listen(socketPath, resolve));
  const restart = async (downMs: number) => {
    restarts++;
    for (const socket of sockets) socket.destroy();
    sockets.clear();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    rmSync(socketPath, { force: true });
    await new Promise((resolve) => setTimeout(resolve, downMs));
    await listen();
  };

  const pool = () => ({
    name: "fake-pool",
    dataUsedBytes: [...thins.values()].reduce((n, t) => n + t.layers.length * 1048576, 0),
    dataTotalBytes: 2 ** 31,
    metaUsedBytes: 4096 * thins.size,
    metaTotalBytes: 2 ** 20,
    mode: "rw",
    blockSizeBytes: 1048576,
    errorIfNoSpace: true,
    id: poolId,
  });

  const fail = (code: string, message: string) => Object.assign(new Error(message), { code });

  /** Returns true when the helper "died" during this request (no answer is sent). */
  function diesDuring(request: Request): boolean {
    const pending = restartOps.get(request.op)?.shift();
    if (!pending) return false;
    if (request.op === "layer.apply") {
      calls.push({ op: request.op, args: request.args });
      const thin = thins.get(active.get(request.args.name) ?? -1);
      thin?.layers.push(`partial:${request.args.digest}`);
    } else {
      void handle(request).catch(() => undefined); // the effect happens; the answer is lost
    }
    void restart(pending.downMs).then(pending.done);
    return true;
  }

  async function handle(request: Request): Promise<unknown> {
    calls.push({ op: request.op, args: request.args });
    const injected = failures.get(request.op);
    if (injected) {
      failures.delete(request.op);
      throw fail(injected.code, injected.message);
    }
    switch (request.op) {
      case "pool.status":
        return pool();
      case "pool.ensure":
        poolId ??= randomBytes(16).toString("hex");
        return pool();
      // Idempotent as the real helper: an existing id with the same origin is success.
      case "thin.create": {
        const existing = thins.get(request.args.thinId);
        if (existing?.origin === null) return {};
        if (existing) throw fail("EXISTS", `thin ${request.args.thinId} exists`);
        thins.set(request.args.thinId, { origin: null, layers: [], formatted: false });
        return {};
      }
      case "thin.snapshot": {
        const origin = thins.get(request.args.originId);
        if (!origin) throw fail("NOT_FOUND", `origin ${request.args.originId} does not exist`);
        const existing = thins.get(request.args.thinId);
        if (existing?.origin === request.args.originId) return {};
        if (existing) throw fail("EXISTS", `thin ${request.args.thinId} exists`);
        thins.set(request.args.thinId, { origin: request.args.originId, layers: [...origin.layers], formatted: origin.formatted });
        return {};
      }
      case "thin.delete": {
        if ([...active.values()].includes(request.args.thinId)) throw fail("BUSY", `thin ${request.args.thinId} is active`);
        thins.delete(request.args.thinId);
        return {};
      }
      case "thin.list":
        return { thinIds: [...thins.keys()].sort((a, b) => a - b) };
      case "device.activate": {
        if (!thins.has(request.args.thinId)) throw fail("NOT_FOUND", `thin ${request.args.thinId} does not exist`);
        const current = active.get(request.args.name);
        if (current !== undefined && current !== request.args.thinId) throw fail("CONFLICT", `${request.args.name} maps thin ${current}`);
        const holder = [...active].find(([name, id]) => id === request.args.thinId && name !== request.args.name);
        if (holder) throw fail("BUSY", `thin ${request.args.thinId} is active as ${holder[0]}`);
        active.set(request.args.name, request.args.thinId);
        return { path: `/dev/mapper/${request.args.name}` };
      }
      case "device.deactivate":
        active.delete(request.args.name);
        return {};
      case "device.list":
        return { devices: [...active].map(([name, thinId]) => ({ name, thinId })) };
      case "fs.mkfs": {
        const thin = thins.get(active.get(request.args.name) ?? -1);
        if (!thin) throw fail("NOT_FOUND", `${request.args.name} is not active`);
        if (thin.formatted) throw fail("HAS_FILESYSTEM", `${request.args.name} already has a filesystem`);
        thin.formatted = true;
        return {};
      }
      case "layer.apply": {
        const thin = thins.get(active.get(request.args.name) ?? -1);
        if (!thin?.formatted) throw fail("NOT_FOUND", `${request.args.name} is not an active formatted device`);
        if (!existsSync(join(blobDir, "sha256", request.args.digest.slice(7)))) throw fail("BLOB_MISSING", `no blob ${request.args.digest}`);
        await applyGate;
        thin.layers.push(request.args.digest);
        return { entries: 1, bytes: 1 };
      }
    }
  }

  server = createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    let buffered = "";
    let queue = Promise.resolve();
    socket.on("data", (chunk) => {
      buffered += chunk.toString("utf8");
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        queue = queue.then(async () => {
          const parsed = parseRequestLine(line);
          let response;
          if (!parsed.ok) response = { id: parsed.id, ok: false, error: { code: parsed.code, message: parsed.message } };
          else if (diesDuring(parsed.request)) return;
          else {
            try {
              response = { id: parsed.request.id, ok: true, result: await handle(parsed.request) };
            } catch (err) {
              const e = err as Error & { code?: string };
              response = { id: parsed.request.id, ok: false, error: { code: e.code ?? "INTERNAL", message: e.message } };
            }
          }
          if (!socket.destroyed) socket.write(JSON.stringify(response) + "\n");
        });
      }
    });
    socket.on("error", () => {});
  });
  await listen();

  return {
    socketPath,
    thins,
    active,
    calls,
    failNext: (op, code, message = `injected ${code}`) => void failures.set(op, { code, message }),
    holdApply: (gate) => void (applyGate = gate),
    restartDuring: (op, downMs = 300) =>
      new Promise<void>((done) => {
        const list = restartOps.get(op) ?? [];
        list.push({ downMs, done });
        restartOps.set(op, list);
      }),
    get restarts() {
      return restarts;
    },
    get poolId() {
      return poolId;
    },
    set poolId(id: string | null) {
      poolId = id;
    },
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
