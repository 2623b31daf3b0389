// The helper's socket server with a fake operation handler, driven by the agent's real client and
// by raw sockets: framing, ordering, the global mutex, error mapping, socket safety.
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { HelperClient, HelperError } from "../../agent/helper-client.ts";
import { HelperFailure } from "../../privhelper/errors.ts";
import { MAX_LINE_BYTES, type Request } from "../../privhelper/protocol.ts";
import { HelperServer, type Handler, type LogLine } from "../../privhelper/server.ts";

const isRoot = process.getuid?.() === 0;
const opts = { skip: isRoot ? false : "needs root (socket chown)" };
const LAYER = "imgd-layer-0123456789abcdef0123456789abcdef";

type Harness = { socketPath: string; server: HelperServer; logs: LogLine[]; client: HelperClient };

async function start(t: TestContext, handler: Handler, socketPath?: string): Promise<Harness> {
  const dir = mkdtempSync(join(tmpdir(), "imgd-srv-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = socketPath ?? join(dir, "run", "helper.sock");
  const logs: LogLine[] = [];
  const server = new HelperServer({ socketPath: path, socketGid: 0, handler, log: (line) => logs.push(line) });
  await server.start();
  const client = new HelperClient(path, { reconnectWaitMs: 0 });
  t.after(async () => {
    client.close();
    await server.stop(100);
  });
  return { socketPath: path, server, logs, client };
}

/** Sends raw bytes; collects answer lines until the server closes or `count` lines arrived. */
function rawExchange(socketPath: string, payload: string | Buffer, count: number): Promise<{ lines: unknown[]; closed: boolean }> {
  return new Promise((resolve) => {
    const socket = createConnection(socketPath);
    let text = "";
    const lines: unknown[] = [];
    const finish = (closed: boolean) => {
      socket.destroy();
      resolve({ lines, closed });
    };
    socket.on("data", (chunk) => {
      text += chunk.toString();
      let newline;
      while ((newline = text.indexOf("\n")) !== -1) {
        lines.push(JSON.parse(text.slice(0, newline)));
        text = text.slice(newline + 1);
      }
      if (lines.length >= count) setTimeout(() => finish(socket.readableEnded), 50);
    });
    socket.on("end", () => finish(true));
    socket.on("error", () => finish(true));
    socket.write(payload);
  });
}

test("typed round trip, errors become HelperError, every request is logged", opts, async (t) => {
  const seen: Request[] = [];
  const h = await start(t, async (request) => {
    seen.push(request);
    if (request.op === "thin.create" && request.args.thinId === 9) throw new HelperFailure("EXISTS", "thin id 9 already exists");
    if (request.op === "device.activate") return { path: `/dev/mapper/${request.args.name}` };
    if (request.op === "fs.mkfs") throw new Error("boom");
    return {};
  });
  assert.deepEqual(await h.client.call("device.activate", { name: LAYER, thinId: 3 }), { path: `/dev/mapper/${LAYER}` });
  assert.deepEqual(await h.client.call("thin.create", { thinId: 1 }), {});
  await assert.rejects(h.client.call("thin.create", { thinId: 9 }), (err: unknown) =>
    err instanceof HelperError && err.code === "EXISTS" && err.message === "thin id 9 already exists" && !err.permanent);
  await assert.rejects(h.client.call("fs.mkfs", { name: LAYER }), (err: unknown) => err instanceof HelperError && err.code === "INTERNAL");
  // A bad request never reaches the handler.
  await assert.rejects(h.client.call("thin.create", { thinId: -1 }), (err: unknown) =>
    err instanceof HelperError && err.code === "BAD_ARGS" && err.permanent && /args\.thinId/.test(err.message));
  assert.deepEqual(seen.map((r) => r.op), ["device.activate", "thin.create", "thin.create", "fs.mkfs"]);
  assert.deepEqual(seen[0], { id: 1, op: "device.activate", args: { name: LAYER, thinId: 3 } });

  assert.equal(h.logs.length, 5);
  assert.deepEqual(h.logs.map((l) => [l.op, l.ok, l.code]), [
    ["device.activate", true, undefined], ["thin.create", true, undefined], ["thin.create", false, "EXISTS"],
    ["fs.mkfs", false, "INTERNAL"], [undefined, false, "BAD_ARGS"],
  ]);
  assert.ok(h.logs.slice(0, 4).every((l) => typeof l.ms === "number" && l.args !== undefined));
  // Every line has a level: done is info, a refusal or failure warn, a helper bug (INTERNAL) error.
  assert.deepEqual(h.logs.map((l) => l.level), ["info", "info", "warn", "error", "warn"]);
});

test("socket is 0660 root:<group>, in a 0755 root directory", opts, async (t) => {
  const h = await start(t, async () => ({}));
  const info = statSync(h.socketPath);
  assert.ok(info.isSocket());
  assert.deepEqual([info.mode & 0o777, info.uid, info.gid], [0o660, 0, 0]);
  const parent = statSync(join(h.socketPath, ".."));
  assert.deepEqual([parent.mode & 0o777, parent.uid], [0o755, 0]);
});

test("one operation at a time across connections; in order within a connection", opts, async (t) => {
  let running = 0;
  let maxRunning = 0;
  const order: number[] = [];
  const h = await start(t, async (request) => {
    running++;
    maxRunning = Math.max(maxRunning, running);
    await new Promise((resolve) => setTimeout(resolve, 5));
    if (request.op === "thin.delete") order.push(request.args.thinId);
    running--;
    return {};
  });
  const second = new HelperClient(h.socketPath);
  t.after(() => second.close());
  await Promise.all([
    ...[1, 2, 3, 4, 5].map((thinId) => h.client.call("thin.delete", { thinId })),
    ...[11, 12, 13].map((thinId) => second.call("thin.delete", { thinId })),
  ]);
  assert.equal(maxRunning, 1);
  assert.deepEqual(order.filter((id) => id < 10), [1, 2, 3, 4, 5]);
  assert.deepEqual(order.filter((id) => id > 10), [11, 12, 13]);
});

test("queries are not held up by a long operation on another connection", opts, async (t) => {
  let release: (() => void) | null = null;
  const h = await start(t, async (request) => {
    if (request.op === "layer.apply") await new Promise<void>((resolve) => (release = resolve));
    return request.op === "pool.status" ? { mode: "rw" } : {};
  });
  const apply = h.client.call("layer.apply", { name: LAYER, digest: `sha256:${"a".repeat(64)}` });
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.deepEqual(await h.client.call("pool.status", {}), { mode: "rw" });
  assert.deepEqual(await h.client.call("device.list", {}), {});
  // A mutation waits for the lock.
  let created = false;
  const create = h.client.call("thin.create", { thinId: 1 }).then(() => (created = true));
  await new Promise((resolve) => setTimeout(resolve, 30));
  assert.equal(created, false);
  release!();
  await apply;
  await create;
});

test("bad JSON is answered and the connection stays usable; an oversized line closes it", opts, async (t) => {
  const h = await start(t, async () => ({}));
  const good = JSON.stringify({ id: 4, op: "pool.status", args: {} });
  const mixed = await rawExchange(h.socketPath, `{nope\n${good}\n`, 2);
  assert.deepEqual(mixed.lines, [
    { id: null, ok: false, error: { code: "BAD_JSON", message: (mixed.lines[0] as { error: { message: string } }).error.message } },
    { id: 4, ok: true, result: {} },
  ]);
  assert.equal(mixed.closed, false);

  // A request queued before the oversized line is still answered, then the connection ends.
  const huge = `${good}\n${"x".repeat(MAX_LINE_BYTES + 10)}`;
  const big = await rawExchange(h.socketPath, huge, 2);
  assert.equal((big.lines[0] as { ok: boolean }).ok, true);
  assert.equal((big.lines[1] as { error: { code: string } }).error.code, "TOO_LARGE");
  assert.equal(big.closed, true);

  // Split across many writes without a newline: refused as soon as it passes the limit.
  const chunks = await rawExchange(h.socketPath, Buffer.alloc(MAX_LINE_BYTES + 1, 0x20), 1);
  assert.equal((chunks.lines[0] as { error: { code: string } }).error.code, "TOO_LARGE");
  assert.equal(chunks.closed, true);
});

test("stale sockets are replaced; other files and live helpers are not", opts, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "imgd-srv-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));

  const notSocket = join(dir, "file.sock");
  writeFileSync(notSocket, "precious");
  const refused = new HelperServer({ socketPath: notSocket, socketGid: 0, handler: async () => ({}), log: () => undefined });
  await assert.rejects(refused.start(), /not a socket/);

  // A socket nobody listens on any more (a crashed helper) is removed.
  const stale = join(dir, "stale.sock");
  const old = createServer();
  await new Promise<void>((resolve) => old.listen(stale, resolve));
  await new Promise<void>((resolve) => {
    old.close(() => resolve());
  });
  writeFileSync(join(dir, "marker"), ""); // keep the directory non-empty
  const h = await start(t, async () => ({}), stale);
  assert.deepEqual(await h.client.call("pool.status", {}), {});

  // A second helper on a live socket refuses to start instead of stealing it.
  const second = new HelperServer({ socketPath: stale, socketGid: 0, handler: async () => ({}), log: () => undefined });
  await assert.rejects(second.start(), /already listening/);

  // A group- or world-writable parent directory is refused.
  const open = join(dir, "open");
  mkdirSync(open);
  chmodSync(open, 0o777);
  const loose = new HelperServer({ socketPath: join(open, "h.sock"), socketGid: 0, handler: async () => ({}), log: () => undefined });
  await assert.rejects(loose.start(), /not writable by group or others/);
});

test("client: reconnects after the helper restarts, times out, fails in-flight calls on disconnect", opts, async (t) => {
  let release: (() => void) | null = null;
  const h = await start(t, async (request) => {
    if (request.op === "fs.mkfs") await new Promise<void>((resolve) => (release = resolve));
    return {};
  });
  assert.deepEqual(await h.client.call("pool.status", {}), {});

  // In flight while the helper goes away: rejected with CONNECTION_LOST.
  const inFlight = h.client.call("fs.mkfs", { name: LAYER });
  // Once the helper is working on it (it yields to the event loop before each request).
  for (const deadline = Date.now() + 10_000; release === null && Date.now() < deadline; ) await new Promise((resolve) => setTimeout(resolve, 5));
  assert.ok(release, "the helper took the request");
  const stopped = h.server.stop(50);
  await assert.rejects(inFlight, (err: unknown) => err instanceof HelperError && err.code === "CONNECTION_LOST");
  (release as () => void)();
  await stopped;
  // (CONNECTION_LOST if the idle connection's close had not been seen yet, else UNAVAILABLE)
  await assert.rejects(h.client.call("pool.status", {}), (err: unknown) => err instanceof HelperError && ["UNAVAILABLE", "CONNECTION_LOST"].includes(err.code));
  await assert.rejects(h.client.call("pool.status", {}), (err: unknown) => err instanceof HelperError && err.code === "UNAVAILABLE");

  // A new helper on the same path: the same client object works again.
  const logs: LogLine[] = [];
  const again = new HelperServer({ socketPath: h.socketPath, socketGid: 0, handler: async () => new Promise(() => undefined), log: (l) => logs.push(l) });
  await again.start();
  t.after(() => again.stop(10));
  const slow = new HelperClient(h.socketPath, { timeoutsMs: { "pool.status": 50 } });
  t.after(() => slow.close());
  await assert.rejects(slow.call("pool.status", {}), (err: unknown) => err instanceof HelperError && err.code === "TIMEOUT");
});
