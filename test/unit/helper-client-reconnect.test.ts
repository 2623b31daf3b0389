// The agent's helper client waits for a helper that is being restarted instead of failing the
// step at once, but only for requests that never reached it, and only for a bounded time.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { HelperClient, HelperError } from "../../agent/helper-client.ts";
import { HelperServer } from "../../privhelper/server.ts";

const opts = { skip: process.getuid?.() === 0 ? false : "needs root (socket chown)" };

test("a call made while the helper is down waits for it to listen again", opts, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "imgd-reconnect-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const socketPath = join(dir, "run", "helper.sock");
  const client = new HelperClient(socketPath, { reconnectWaitMs: 10_000 });
  t.after(() => client.close());
  const started = Date.now();
  const call = client.call("pool.status", {});
  await new Promise((resolve) => setTimeout(resolve, 600));
  const server = new HelperServer({ socketPath, socketGid: 0, handler: async () => ({ answered: true }), log: () => undefined });
  await server.start();
  t.after(() => server.stop(10));
  assert.deepEqual(await call, { answered: true });
  assert.ok(Date.now() - started >= 600, "it really waited");
});

test("an unreachable helper fails the call once the wait is over", opts, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "imgd-reconnect-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const client = new HelperClient(join(dir, "nothing.sock"), { reconnectWaitMs: 700 });
  t.after(() => client.close());
  const started = Date.now();
  await assert.rejects(client.call("pool.status", {}), (err: unknown) => err instanceof HelperError && err.code === "UNAVAILABLE");
  const waited = Date.now() - started;
  assert.ok(waited >= 450 && waited < 5000, `waited ${waited} ms`);
});

test("closing the client ends the wait", opts, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "imgd-reconnect-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const client = new HelperClient(join(dir, "nothing.sock"), { reconnectWaitMs: 60_000 });
  const call = client.call("pool.status", {});
  setTimeout(() => client.close(), 300);
  await assert.rejects(call, (err: unknown) => err instanceof HelperError && err.code === "CLIENT_CLOSED");
});
