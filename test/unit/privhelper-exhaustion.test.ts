// A client of the helper's socket cannot exhaust it (issue 9, finding 2). The REAL server and
// operations run in a child process (test/helpers/helper-server-child.ts, commands recorded, not
// run) so its memory and event loop are its own. While clients flood it (64 KiB chunks of `{}\n`
// written and never read, and 1000 connections each holding a partial line), another client's
// cheap request keeps its latency, the helper's peak RSS stays bounded, every flooding connection
// is cut off and logged once.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createConnection, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";

const isRoot = process.getuid?.() === 0;
const opts = { skip: isRoot ? false : "needs root (socket chown)" };
const CHILD = fileURLToPath(new URL("../helpers/helper-server-child.ts", import.meta.url));
const FLOOD_MS = Number(process.env.IMGD_TEST_FLOOD_MS ?? 8000);
// Smaller than production (10 s, 1 MiB) so the test sees every cut-off within seconds.
const LIMITS = { unreadStallMs: 1500, partialLineIdleMs: 2000, maxUnreadResponseBytes: 64 * 1024 };

let dir = "";
let socketPath = "";
let logFile = "";
let child: ChildProcess;

before(async () => {
  if (!isRoot) return;
  dir = mkdtempSync(join(tmpdir(), "imgd-exhaust-"));
  socketPath = join(dir, "run", "helper.sock");
  logFile = join(dir, "helper.log");
  child = spawn(process.execPath, [CHILD, socketPath, join(dir, "state"), logFile, JSON.stringify(LIMITS)], { stdio: ["ignore", "pipe", "pipe"] });
  let err = "";
  child.stderr!.on("data", (chunk: Buffer) => (err += chunk.toString()));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on("data", (chunk: Buffer) => chunk.toString().includes("ready") && resolve());
    child.once("exit", (code) => reject(new Error(`helper child exited ${code}: ${err}`)));
  });
});

after(() => {
  if (!isRoot) return;
  child.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});

function helperLog(): Record<string, unknown>[] {
  return readFileSync(logFile, "utf8").split("\n").filter((l) => l !== "").map((l) => JSON.parse(l) as Record<string, unknown>);
}

function statusKiB(field: "VmRSS" | "VmHWM"): number {
  const match = new RegExp(`^${field}:\\s+([0-9]+) kB`, "m").exec(readFileSync(`/proc/${child.pid}/status`, "utf8"));
  return Number(match![1]);
}

function connect(): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(socketPath);
    socket.once("connect", () => resolve(socket));
    socket.on("error", reject); // after connecting: a reset by the helper is expected here
  });
}

/**
 * connect(), again while the kernel answers EAGAIN: a Unix socket's listen backlog is full while
 * 1000 connections arrive at once faster than a loaded helper accepts them (CI saw it once).
 * That is the kernel's queue, not the helper refusing; a real client retries it too.
 */
async function connectThroughFullBacklog(): Promise<Socket> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await connect();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EAGAIN" || attempt === 200) throw err;
      await sleep(25);
    }
  }
}

// A well-behaved client in a process of its own (so the flooders' work in this process does not
// count as the helper's latency): one pool.status at a time for `ms`, then prints the latencies.
const PROBE = `
  import { createConnection } from "node:net";
  const [path, ms] = [process.argv[1], Number(process.argv[2])];
  const socket = createConnection(path);
  await new Promise((resolve) => socket.once("connect", resolve));
  console.log("connected");
  const latencies = [];
  let waiter = null, text = "";
  socket.on("data", (chunk) => { text += chunk; if (text.includes("\\n")) { text = text.slice(text.indexOf("\\n") + 1); waiter(); } });
  const end = performance.now() + ms;
  for (let id = 1; performance.now() < end; id++) {
    const started = performance.now();
    await new Promise((resolve) => { waiter = resolve; socket.write(JSON.stringify({ id, op: "pool.status", args: {} }) + "\\n"); });
    latencies.push(performance.now() - started);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  console.log(JSON.stringify(latencies));
  socket.destroy();
`;

async function measureLatency(ms: number): Promise<{ connected: Promise<void>; latencies: Promise<number[]> }> {
  const probe = spawn(process.execPath, ["--input-type=module", "-e", PROBE, socketPath, String(ms)], { stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  let connected!: () => void;
  const connectedPromise = new Promise<void>((resolve) => (connected = resolve));
  probe.stdout.on("data", (chunk: Buffer) => {
    out += chunk.toString();
    if (out.includes("connected")) connected();
  });
  const latencies = new Promise<number[]>((resolve, reject) => probe.once("exit", (code) => {
    const last = out.trim().split("\n").at(-1) ?? "";
    code === 0 ? resolve(JSON.parse(last) as number[]) : reject(new Error(`latency probe exited ${code}: ${out}`));
  }));
  return { connected: connectedPromise, latencies };
}

type FloodCounters = { connections: number; cutOff: number; refusedAtConnect: number; bytes: number };

/**
 * Writes 64 KiB chunks of `line` as fast as the socket takes them and reads nothing but the first
 * chunk the helper sends (to tell a connection refused at once, while the idle clients hold every
 * slot, from one cut off for flooding); reconnects when cut off. `{}` is refused by the parser; a
 * valid request is performed, and answered.
 */
async function flood(line: string, until: () => boolean, counters: FloodCounters): Promise<void> {
  const chunk = Buffer.from(`${line}\n`.repeat(Math.floor(65536 / (line.length + 1))));
  while (until()) {
    let socket: Socket;
    try {
      socket = await connect();
    } catch {
      await sleep(50);
      continue;
    }
    counters.connections++;
    let refusedAtConnect = false;
    socket.once("data", (first: Buffer) => {
      refusedAtConnect = first.toString().includes("TOO_MANY_CONNECTIONS");
      socket.pause(); // never read again
    });
    socket.on("error", () => undefined);
    let open = true;
    const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
    void closed.then(() => (open = false));
    while (open && until()) {
      const ok = socket.write(chunk);
      counters.bytes += chunk.byteLength;
      if (!ok) {
        let onDrain = () => undefined as void;
        await Promise.race([new Promise<void>((resolve) => socket.once("drain", (onDrain = resolve))), closed, sleep(200)]);
        socket.off("drain", onDrain);
      }
    }
    if (!open) counters[refusedAtConnect ? "refusedAtConnect" : "cutOff"]++;
    socket.destroy();
  }
}

/** Opens `count` connections, each sending half a request and then nothing. */
async function idlePartialLines(count: number): Promise<{ sockets: Socket[]; refused: () => number; closedByServer: () => number }> {
  const sockets: Socket[] = [];
  let refused = 0;
  let closedByServer = 0;
  await Promise.all(Array.from({ length: count }, async () => {
    const socket = await connectThroughFullBacklog();
    sockets.push(socket);
    socket.on("error", () => undefined);
    socket.on("data", (chunk: Buffer) => {
      if (chunk.toString().includes("TOO_MANY_CONNECTIONS")) refused++;
    });
    const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
    void closed.then(() => closedByServer++);
    // A refused connection is answered and closed at once; the others get half a line.
    if (await Promise.race([closed.then(() => true), sleep(200).then(() => false)])) return;
    socket.write('{"id":1,"op":"pool.st');
  }));
  return { sockets, refused: () => refused, closedByServer: () => closedByServer };
}

test("a flood that never reads and 1000 idle partial lines: another client keeps its latency, RSS stays bounded, floods are cut off once each", opts, async () => {
  const rssBefore = statusKiB("VmRSS");
  const end = performance.now() + FLOOD_MS;
  const running = () => performance.now() < end;
  const probe = await measureLatency(FLOOD_MS);
  await probe.connected; // the well-behaved client is connected before the others take the slots
  const garbage: FloodCounters = { connections: 0, cutOff: 0, refusedAtConnect: 0, bytes: 0 };
  const unread: FloodCounters = { connections: 0, cutOff: 0, refusedAtConnect: 0, bytes: 0 };
  const floods = Promise.all([
    flood("{}", running, garbage),
    flood("{}", running, garbage),
    flood(JSON.stringify({ id: 1, op: "device.list", args: {} }), running, unread),
    flood(JSON.stringify({ id: 1, op: "device.list", args: {} }), running, unread),
  ]);
  const idle = await idlePartialLines(1000);
  let peakRss = 0;
  while (running()) {
    peakRss = Math.max(peakRss, statusKiB("VmRSS"));
    await sleep(100);
  }
  const latencies = await probe.latencies;
  await floods;
  peakRss = Math.max(peakRss, statusKiB("VmRSS"));
  await sleep(LIMITS.partialLineIdleMs); // the idle connections' deadline passes
  for (const socket of idle.sockets) socket.destroy();

  await sleep(200); // the last cut-off lines
  const logs = helperLog();
  const sorted = [...latencies].sort((a, b) => a - b);
  const p50 = sorted[Math.floor(sorted.length / 2)]!;
  const p99 = sorted[Math.floor(sorted.length * 0.99)]!;
  const max = sorted.at(-1)!;
  const loopDelay = Math.max(...logs.filter((l) => l.msg === "event loop").map((l) => Number(l.maxDelayMs)));
  const count = (code: string) => logs.filter((l) => l.code === code);
  const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(0);
  console.log(`pool.status: ${latencies.length} answers, p50 ${p50.toFixed(1)} ms, p99 ${p99.toFixed(1)} ms, max ${max.toFixed(1)} ms; helper event loop delay max ${loopDelay} ms; helper RSS ${(rssBefore / 1024).toFixed(0)} -> peak ${(peakRss / 1024).toFixed(0)} MiB; ` +
    `garbage flood: ${mib(garbage.bytes)} MiB over ${garbage.connections} connections, ${garbage.cutOff} cut off, ${garbage.refusedAtConnect} refused at connect; ` +
    `unread flood: ${mib(unread.bytes)} MiB over ${unread.connections} connections, ${unread.cutOff} cut off, ${unread.refusedAtConnect} refused at connect; ` +
    `idle partial lines: ${idle.refused()} of 1000 refused at connect, ${idle.closedByServer()} closed; log lines: ${count("TOO_MANY_REFUSALS").length} TOO_MANY_REFUSALS, ${count("NOT_READING").length} NOT_READING, ` +
    `${count("PARTIAL_LINE_IDLE").length} PARTIAL_LINE_IDLE, ${count("TOO_MANY_CONNECTIONS").length} TOO_MANY_CONNECTIONS, ${logs.length} in all`);

  assert.ok(latencies.length >= FLOOD_MS / 100, `only ${latencies.length} pool.status answers in ${FLOOD_MS} ms`);
  // Three busy processes (and whatever else runs on the machine) share two cores here, so single
  // answers can wait for a CPU: the bound is on p95, with a loose cap on the worst (the unbounded
  // server measured 15 s here, 35 s in issue 9).
  const p95 = sorted[Math.floor(sorted.length * 0.95)]!;
  assert.ok(p95 < 200, `pool.status p95 ${p95.toFixed(0)} ms during the flood`);
  assert.ok(max < 1500, `pool.status took up to ${max.toFixed(0)} ms during the flood`);
  assert.ok(peakRss - rssBefore < 100 * 1024, `helper RSS grew from ${rssBefore} to ${peakRss} KiB`);
  // Every flooding connection was cut off, and each cut-off was logged exactly once.
  for (const [what, counters, code] of [["garbage", garbage, "TOO_MANY_REFUSALS"], ["unread", unread, "NOT_READING"]] as const) {
    const lines = count(code);
    assert.ok(lines.length >= 2, `${what}: only ${lines.length} connections were cut off (${code})`);
    assert.equal(new Set(lines.map((l) => l.conn)).size, lines.length, `${what}: a cut-off was logged twice`);
    assert.ok(lines.length >= counters.cutOff && lines.length <= counters.connections - counters.refusedAtConnect, `${what}: ${lines.length} ${code} lines for ${counters.connections} connections, ${counters.cutOff} seen cut, ${counters.refusedAtConnect} refused at connect`);
  }
  // A flood does not flood the log: refusals are logged a few per connection, then counted.
  const refusalLines = logs.filter((l) => typeof l.code === "string" && /^(BAD_JSON|BAD_ARGS|UNKNOWN_OP)$/.test(l.code));
  assert.ok(refusalLines.length <= 20 * garbage.connections, `${refusalLines.length} refusal lines for ${garbage.connections} connections`);
  // At most the per-uid cap of them was ever held (the rest refused at once); those were closed
  // for idling with half a line; refused connections are logged once per interval, not each.
  assert.equal(idle.closedByServer(), 1000, "every idle connection was closed by the helper");
  assert.ok(count("PARTIAL_LINE_IDLE").length >= 1, "no idle partial line was closed for idling");
  assert.ok(count("TOO_MANY_CONNECTIONS").length <= Math.ceil(FLOOD_MS / 10_000) + 1, `${count("TOO_MANY_CONNECTIONS").length} TOO_MANY_CONNECTIONS lines`);
});
