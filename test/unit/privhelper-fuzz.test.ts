// Fuzzes the REAL helper: its socket server and its real operations table (perform), with only
// the process spawner swapped for a recorder. Thousands of random and mutated requests go over a
// Unix socket; none that is invalid may reach the operations or start a command, each must get a
// specific error code and a log line. Valid requests are the control: they must get through.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { createConnection, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { loadConfig, type HelperConfig } from "../../privhelper/config.ts";
import { perform } from "../../privhelper/operations.ts";
import { MAX_LINE_BYTES, MAX_THIN_ID, OP_NAMES, parseRequestLine, type Request } from "../../privhelper/protocol.ts";
import { replaceSpawnerForTests } from "../../privhelper/run.ts";
import { HelperServer, type LogLine } from "../../privhelper/server.ts";

const isRoot = process.getuid?.() === 0;
const opts = { skip: isRoot ? false : "needs root (socket chown)" };
const SEED = 20261122;

type Reply = { id: number | null; ok: boolean; result?: unknown; error?: { code: string; message: string } };
type Command = { file: string; args: string[] };

const commands: Command[] = [];
const handled: Request[] = [];
const logs: LogLine[] = [];
let dir = "";
let socketPath = "";
let config: HelperConfig;
let server: HelperServer;
let restoreSpawner: () => void = () => undefined;

before(async () => {
  if (!isRoot) return;
  dir = mkdtempSync(join(tmpdir(), "imgd-fuzz-"));
  socketPath = join(dir, "run", "helper.sock");
  mkdirSync(join(dir, "blobs", "sha256"), { recursive: true });
  config = loadConfig({
    IMGD_HELPER_SOCKET: socketPath,
    IMGD_HELPER_STATE_DIR: join(dir, "state"),
    IMGD_BLOB_DIR: join(dir, "blobs"),
    IMGD_HELPER_GROUP: "0",
  });
  // Every program the helper could start goes through this recorder: nothing real ever runs.
  // It answers like a failing program, so an operation stops at its first command.
  restoreSpawner = replaceSpawnerForTests(async (file, args) => {
    commands.push({ file, args: [...args] });
    return { exitCode: 1, stdout: "", stderr: "recorder: not run", timedOut: false, isCanceled: false };
  });
  server = new HelperServer({
    socketPath,
    socketGid: 0,
    handler: (request) => {
      handled.push(structuredClone(request));
      return perform(config, request);
    },
    log: (line) => logs.push(line),
    // This suite sends thousands of refused lines on one connection and checks each is logged;
    // the per-connection refusal caps (privhelper-exhaustion.test.ts) would cut it off first.
    limits: { maxRefusalsPerConnection: Infinity, maxLoggedRefusalsPerConnection: Infinity },
  });
  await server.start();
});

after(async () => {
  if (!isRoot) return;
  await server.stop(100);
  restoreSpawner();
  rmSync(dir, { recursive: true, force: true });
});

/** One connection that sends raw bytes and hands out the answer lines in order. */
class Connection {
  private readonly socket: Socket;
  private buffered = "";
  private readonly lines: Reply[] = [];
  private readonly waiters: ((reply: Reply | null) => void)[] = [];
  closed = false;

  constructor(path: string) {
    this.socket = createConnection(path);
    this.socket.on("data", (chunk) => {
      this.buffered += chunk.toString("utf8");
      let newline;
      while ((newline = this.buffered.indexOf("\n")) !== -1) {
        const reply = JSON.parse(this.buffered.slice(0, newline)) as Reply;
        this.buffered = this.buffered.slice(newline + 1);
        const waiter = this.waiters.shift();
        if (waiter) waiter(reply);
        else this.lines.push(reply);
      }
    });
    const onClose = () => {
      this.closed = true;
      for (const waiter of this.waiters.splice(0)) waiter(null);
    };
    this.socket.on("close", onClose);
    this.socket.on("error", () => undefined);
  }

  write(bytes: string | Uint8Array): Promise<void> {
    return new Promise((resolve, reject) => this.socket.write(bytes, (err) => (err ? reject(err) : resolve())));
  }

  /** The next answer line, or null when the server closed the connection first. */
  next(): Promise<Reply | null> {
    const line = this.lines.shift();
    if (line) return Promise.resolve(line);
    if (this.closed) return Promise.resolve(null);
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  async exchange(line: string | Uint8Array): Promise<Reply> {
    await this.write(typeof line === "string" ? line + "\n" : Buffer.concat([line, Buffer.from("\n")]));
    const reply = await this.next();
    assert.ok(reply, "the server closed the connection instead of answering");
    return reply;
  }

  /** Waits until the server has closed the connection (or fails after `ms`). */
  async waitClosed(ms = 2000): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.closed && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
    return this.closed;
  }

  close(): void {
    this.socket.destroy();
  }
}

// ---- generators -------------------------------------------------------------------------------

const hex = (length: number) => fc.string({ unit: fc.constantFrom(..."0123456789abcdef"), minLength: length, maxLength: length });
const ulidChars = fc.constantFrom(..."0123456789abcdefghjkmnpqrstvwxyz");
const layerName = hex(32).map((h) => `imgd-layer-${h}`);
const actName = fc.string({ unit: ulidChars, minLength: 26, maxLength: 26 }).map((u) => `imgd-act-${u}`);
const deviceName = fc.oneof(layerName, actName);
const thinId = fc.oneof(fc.integer({ min: 0, max: MAX_THIN_ID }), fc.constantFrom(0, MAX_THIN_ID));
const digest = hex(64).map((h) => `sha256:${h}`);

type Wire = { id: number; op: string; args: Record<string, unknown> };

// Every op with valid arguments: the starting point of every mutation.
const validRequest: fc.Arbitrary<Wire> = fc.oneof(
  ...OP_NAMES.map((op) => {
    const args: Record<string, fc.Arbitrary<unknown>> = {
      "thin.create": { thinId }, "thin.delete": { thinId }, "thin.snapshot": { thinId, originId: thinId },
      "device.activate": { name: deviceName, thinId }, "device.deactivate": { name: deviceName },
      "fs.mkfs": { name: deviceName }, "layer.apply": { name: deviceName, digest },
    }[op as string] ?? {};
    return fc.record({ id: fc.nat(), op: fc.constant(op as string), args: fc.record(args) });
  }),
);

// Values that are wrong for EVERY field kind (not an int in range, not a name, not a digest, not
// a boolean), so a mutation that uses them is invalid by construction.
const hostileString = fc.oneof(
  fc.constantFrom(
    "-f", "--table", "-", "--", "-imgd-layer-0123456789abcdef0123456789abcdef", "--help",
    "/etc/passwd", "../../../../etc/shadow", "..", ".", "", "/dev/mapper/imgd-pool", "imgd-pool",
    "docker-8:1-1234-pool", "docker-8:1-1234-0123456789abcdef", "cryptroot", "vg0-root", "loop0",
    "imgd-layer-0123456789abcdef0123456789abcdef/../../etc", "imgd-layer-0123456789abcdef0123456789abcde/",
    "imgd-layer-../../../../../../etc/passwd0000", "imgd-act-01jd5x7k3m9q2w8e4r6t0y1u3i\n",
    "imgd-act-01jd5x7k3m9q2w8e4r6t0y1u3i\u0000", "imgd-layer-0123456789abcdef0123456789abcde\u0000",
    "imgd-layer-０１２３４５６７８９abcdef0123456789abcdef", "imgd-act-01JD5X7K3M9Q2W8E4R6T0Y1U3I",
    "imgd-layer-0123456789ABCDEF0123456789ABCDEF", " imgd-layer-0123456789abcdef0123456789abcdef",
    "sha256:../../../../etc/passwd", "sha256:" + "A".repeat(64), "sha512:" + "a".repeat(128),
    "sha256:" + "a".repeat(63) + "\u0000", "sha256:" + "a".repeat(64) + "/", "1", "0", "-1", "1e3", "true",
    "__proto__", "constructor", "toString", "\u202eimgd", "😀", "\ud800",
  ),
  fc.string({ unit: "binary", maxLength: 80 }).filter((s) => !/^(imgd-(layer|act)-|sha256:)/.test(s)),
  fc.string({ minLength: 1, maxLength: 10 }).map((s) => `-${s}`),
  fc.string({ unit: "binary", maxLength: 20 }).map((s) => `imgd-layer-0123456789abcdef0123456789abcdef${s}/`),
  fc.string({ maxLength: 20 }).map((s) => `../${s}`),
  fc.string({ maxLength: 30 }).map((s) => `docker-${s}`),
);
const hostileNumber = fc.oneof(
  fc.constantFrom(-1, -0.5, 1.5, MAX_THIN_ID + 1, 2 ** 31, 2 ** 32, 2 ** 53, 2 ** 53 + 2, -(2 ** 53), 1e308, Number.MAX_VALUE, Number.MIN_VALUE, -MAX_THIN_ID),
  fc.integer({ max: -1 }),
  fc.integer({ min: MAX_THIN_ID + 1 }),
  fc.double({ noNaN: true, noDefaultInfinity: true }).filter((n) => !Number.isInteger(n)),
);
const hostileValue: fc.Arbitrary<unknown> = fc.oneof(
  hostileString,
  hostileNumber,
  fc.constantFrom(null, [], {}, [0], ["-f"], { thinId: -1 }, { name: "-f" }, { __proto__: null }),
  fc.anything().filter((v) => typeof v !== "boolean" && !Number.isInteger(v)),
);
const hostileKey = fc.oneof(
  fc.constantFrom("__proto__", "constructor", "prototype", "toString", "valueOf", "hasOwnProperty", "-f", "--table", "thinid", "Name", "args", "op", "id", "", "\u0000"),
  fc.string({ unit: "binary", maxLength: 16 }),
);
const unknownOp = fc.oneof(
  fc.constantFrom(
    "__proto__", "constructor", "toString", "hasOwnProperty", "valueOf", "prototype", "", " ", "pool.status ",
    " pool.status", "POOL.STATUS", "pool.Status", "pool", "pool.", ".status", "pool.status\u0000", "pool.create",
    "pool.remove", "thin.create\n", "device.remove", "dmsetup", "exec", "run", "shell", "layer.apply/..", "fs.mount2",
    "thin.create.", "device.list;", "device.list --all",
  ),
  fc.string({ unit: "binary", maxLength: 64 }),
).filter((op) => !(OP_NAMES as string[]).includes(op));

type Mutation = { line: string; code: string; keepsId: boolean; what: string };

/** Applies one mutation to a valid request; every mutation yields an invalid request. */
const mutatedRequest: fc.Arbitrary<Mutation & { base: Wire; kind: number }> = fc
  .tuple(validRequest, fc.nat(), hostileValue, hostileKey, unknownOp, fc.nat(12))
  .map(([base, pick, value, key, op, kind]) => {
    const argKeys = Object.keys(base.args);
    const json = (v: unknown) => JSON.stringify(v);
    const with_ = (fields: Record<string, unknown>) => ({ ...base, ...fields });
    let m: Mutation;
    const chosen = argKeys.length === 0 && kind <= 1 ? kind + 2 : kind;
    switch (chosen) {
      case 0: {
        // a field of the op gets a wrong value (type, sign, range, shape)
        const field = argKeys[pick % argKeys.length]!;
        m = { line: json(with_({ args: { ...base.args, [field]: value } })), code: "BAD_ARGS", keepsId: true, what: `args.${field}=${json(value)}` };
        break;
      }
      case 1: {
        // a required field is missing
        const field = argKeys[pick % argKeys.length]!;
        const args = { ...base.args };
        delete args[field];
        m = { line: json(with_({ args })), code: "BAD_ARGS", keepsId: true, what: `missing args.${field}` };
        break;
      }
      case 2: {
        // an extra argument; written by hand so "__proto__" stays an own key on the wire
        const extra = `${json(key)}:${json(value) ?? "null"}`;
        const inner = json(base.args).slice(1, -1);
        const args = `{${inner}${inner ? "," : ""}${extra}}`;
        const same = argKeys.includes(key);
        m = { line: `{"id":${base.id},"op":${json(base.op)},"args":${args}}`, code: "BAD_ARGS", keepsId: true, what: `extra args key ${json(key)}${same ? " (duplicate)" : ""}` };
        if (same) m = { ...m, line: `{"id":${base.id},"op":${json(base.op)},"args":{${inner},${json(key)}:${json(value) ?? "null"}}}` };
        break;
      }
      case 3:
        m = { line: json(with_({ op })), code: op.length > 64 ? "BAD_ARGS" : "UNKNOWN_OP", keepsId: true, what: `op=${json(op)}` };
        break;
      case 4: {
        // {} would be the valid args of a no-argument op: give it an unknown key instead
        const args = json(value) === "{}" ? { [key || "x"]: value } : value;
        m = { line: json(with_({ args })), code: "BAD_ARGS", keepsId: true, what: `args=${json(args)}` };
        break;
      }
      case 5:
        m = { line: json({ id: base.id, op: base.op }), code: "BAD_ARGS", keepsId: true, what: "no args" };
        break;
      case 6:
        m = { line: json({ op: base.op, args: base.args }), code: "BAD_ARGS", keepsId: false, what: "no id" };
        break;
      case 7: {
        // any non-negative safe integer is a valid id
        const id = Number.isSafeInteger(value) && (value as number) >= 0 ? -1 - (value as number) : value;
        m = { line: json(with_({ id })), code: "BAD_ARGS", keepsId: false, what: `id=${json(id)}` };
        break;
      }
      case 8: {
        // an extra top-level key, including __proto__ (written by hand to stay an own key)
        const extra = ["id", "op", "args"].includes(key) ? `${key}2` : key;
        m = { line: `${json(base).slice(0, -1)},${json(extra)}:${json(value) ?? "null"}}`, code: "BAD_ARGS", keepsId: true, what: `extra key ${json(extra)}` };
        break;
      }
      case 9:
        // the request is cut short: not JSON any more
        m = { line: json(base).slice(0, 1 + (pick % (json(base).length - 1))), code: "BAD_JSON", keepsId: false, what: "truncated" };
        break;
      case 10:
        // not an object at all
        m = { line: json([base.id, base.op, base.args]), code: "BAD_ARGS", keepsId: false, what: "array" };
        break;
      case 11:
        m = { line: json(with_({ op: base.op.toUpperCase() })), code: "UNKNOWN_OP", keepsId: true, what: "op upper case" };
        break;
      default:
        // garbage glued to a valid request
        m = { line: json(base) + (pick % 2 === 0 ? json(base) : "\u0000"), code: "BAD_JSON", keepsId: false, what: "trailing bytes" };
    }
    return { ...m, base, kind: chosen };
  });

// ---- checks -----------------------------------------------------------------------------------

/** Sends one invalid line and checks: the specific error, one log line, nothing handled or run. */
async function expectRefused(conn: Connection, line: string | Uint8Array, code: string | string[], id: number | null, what: string): Promise<void> {
  const before = { commands: commands.length, handled: handled.length, logs: logs.length };
  const reply = await conn.exchange(line);
  const codes = Array.isArray(code) ? code : [code];
  assert.equal(reply.ok, false, `${what}: accepted: ${JSON.stringify(reply)}`);
  assert.ok(codes.includes(reply.error!.code), `${what}: code ${reply.error!.code}, wanted ${codes.join("|")}: ${reply.error!.message}`);
  assert.ok(reply.error!.message.length > 0);
  if (id !== null) assert.equal(reply.id, id, `${what}: id not echoed`);
  assert.equal(handled.length, before.handled, `${what}: reached the operations: ${JSON.stringify(handled.at(-1))}`);
  assert.equal(commands.length, before.commands, `${what}: started ${JSON.stringify(commands.at(-1))}`);
  assert.equal(logs.length, before.logs + 1, `${what}: not logged exactly once`);
  const logged = logs.at(-1)!;
  assert.equal(logged.ok, false);
  assert.equal(logged.code, reply.error!.code);
}

// Ops that cannot get anywhere without a command (their first step asks dmsetup or the pool).
const OPS_THAT_RUN_FIRST = new Set(["pool.status", "pool.ensure", "device.deactivate"]);
// Ops whose first step looks the pool's device number up in sysfs (and checks whose pool it is):
// this host has no pool, so they answer POOL_MISSING before any command.
const OPS_THAT_FIND_THE_POOL_FIRST = new Set(["thin.create", "thin.snapshot", "thin.delete", "thin.list", "device.activate", "device.list"]);
// fs.mkfs and layer.apply read the device's table first (ownership.ts), but refuse an activation
// name (WRONG_ROLE) before any command.
const runsFirst = (request: Wire) =>
  OPS_THAT_RUN_FIRST.has(request.op) || ((request.op === "fs.mkfs" || request.op === "layer.apply") && String(request.args.name).startsWith("imgd-layer-"));

test("control: valid requests of every op reach the operations and, where they must, the recorder", opts, async () => {
  const conn = new Connection(socketPath);
  try {
    const seenOps = new Set<string>();
    await fc.assert(
      fc.asyncProperty(validRequest, async (request) => {
        const before = { commands: commands.length, handled: handled.length };
        const reply = await conn.exchange(JSON.stringify(request));
        assert.equal(reply.id, request.id);
        assert.equal(handled.length, before.handled + 1, `${request.op} did not reach the operations`);
        assert.deepEqual(handled.at(-1), JSON.parse(JSON.stringify(request)));
        const ran = commands.slice(before.commands);
        if (runsFirst(request)) {
          assert.ok(ran.length >= 1, `${request.op} ran no command`);
          // The recorder's failure comes back as the command's failure, not as a success.
          assert.equal(reply.ok, false);
          assert.equal(reply.error!.code, "COMMAND_FAILED", reply.error!.message);
          assert.match(reply.error!.message, /recorder: not run/);
        }
        if (OPS_THAT_FIND_THE_POOL_FIRST.has(request.op)) {
          assert.deepEqual(ran, [], `${request.op} ran a command without a pool`);
          assert.equal(reply.error?.code, "POOL_MISSING", reply.error?.message);
        }
        // Whatever ran was an allow-listed absolute program with only validated values in it.
        for (const command of ran) {
          assert.match(command.file, /^\/usr\/s?bin\/[a-z_.0-9]+$/);
          for (const arg of command.args) assert.ok(!arg.includes("\u0000") && !arg.includes("\n"), JSON.stringify(arg));
        }
        seenOps.add(request.op);
      }),
      { numRuns: 600, seed: SEED },
    );
    assert.deepEqual(new Set(seenOps), new Set(OP_NAMES));
    // fs.mkfs and layer.apply on an activation: refused for its role before any command.
    const before = commands.length;
    for (const op of ["fs.mkfs", "layer.apply"]) {
      const reply = await conn.exchange(JSON.stringify({ id: 1, op, args: { name: "imgd-act-" + "0".repeat(26), ...(op === "layer.apply" ? { digest: "sha256:" + "0".repeat(64) } : {}) } }));
      assert.equal(reply.error?.code, "WRONG_ROLE");
    }
    assert.equal(commands.length, before);
  } finally {
    conn.close();
  }
});

test("thousands of mutated requests: each refused with its code, logged, and none reaches a command", opts, async () => {
  const conn = new Connection(socketPath);
  const seen = new Map<number, number>();
  try {
    await fc.assert(
      fc.asyncProperty(mutatedRequest, async (m) => {
        await expectRefused(conn, m.line, m.code, m.keepsId ? m.base.id : null, m.what);
        seen.set(m.kind, (seen.get(m.kind) ?? 0) + 1);
      }),
      { numRuns: 4000, seed: SEED },
    );
  } finally {
    conn.close();
  }
  // The mutations really are varied (guards against a generator that collapsed to one case).
  assert.equal(seen.size, 13, JSON.stringify([...seen]));
});

test("random lines: garbage, JSON of any shape, binary; never handled, always answered", opts, async () => {
  const conn = new Connection(socketPath);
  try {
    const line = fc.oneof(
      fc.string({ unit: "binary", maxLength: 300 }).map((s) => Buffer.from(s)),
      fc.uint8Array({ maxLength: 300 }).map((b) => Buffer.from(b)),
      fc.json().map((s) => Buffer.from(s)),
      fc.anything().map((v) => Buffer.from(JSON.stringify(v) ?? "undefined")),
      fc.record({ id: fc.anything(), op: fc.oneof(fc.constantFrom(...OP_NAMES), fc.string()), args: fc.anything() }, { requiredKeys: [] }).map((v) => Buffer.from(JSON.stringify(v))),
    )
      .map((bytes) => bytes.filter((b) => b !== 0x0a)) // one line each
      // The record branch can shrink to a real request (id 0, pool.status, {}): those are the
      // control test's business; here only lines the parser refuses.
      .filter((bytes) => !parseRequestLine(bytes).ok);
    await fc.assert(
      fc.asyncProperty(line, async (bytes) => {
        // Any of the parse codes, but never a success and never the operations.
        await expectRefused(conn, bytes, ["BAD_JSON", "BAD_ARGS", "UNKNOWN_OP"], null, `line ${JSON.stringify(Buffer.from(bytes).toString("latin1").slice(0, 80))}`);
      }),
      { numRuns: 2000, seed: SEED },
    );
  } finally {
    conn.close();
  }
});

test("pipelined and split: many requests on one connection, cut at random points", opts, async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(fc.oneof(mutatedRequest, validRequest), { minLength: 1, maxLength: 40 }), fc.array(fc.nat(), { maxLength: 30 }), async (items, cuts) => {
      const conn = new Connection(socketPath);
      try {
        const before = { commands: commands.length, handled: handled.length, logs: logs.length };
        const lines = items.map((item) => ("line" in item ? item.line : JSON.stringify(item)));
        const valid = items.filter((item) => !("line" in item)) as Wire[];
        const payload = Buffer.from(lines.join("\n") + "\n");
        // Deliver in random pieces (a piece may end mid-character or mid-line).
        const points = [...new Set(cuts.map((c) => c % payload.length))].sort((a, b) => a - b);
        let start = 0;
        for (const point of [...points, payload.length]) {
          if (point <= start) continue;
          await conn.write(payload.subarray(start, point));
          start = point;
        }
        const replies: Reply[] = [];
        for (let i = 0; i < items.length; i++) {
          const reply = await conn.next();
          assert.ok(reply, "connection closed early");
          replies.push(reply);
        }
        // Answers come in request order; only the valid ones reached the operations.
        items.forEach((item, i) => {
          if ("line" in item) {
            assert.equal(replies[i]!.ok, false, item.what);
            assert.equal(replies[i]!.error!.code, item.code, item.what);
          } else {
            assert.equal(replies[i]!.id, item.id);
          }
        });
        assert.deepEqual(handled.slice(before.handled), JSON.parse(JSON.stringify(valid)));
        assert.equal(logs.length, before.logs + items.length);
        if (valid.every((r) => !runsFirst(r))) assert.equal(commands.length, before.commands);
      } finally {
        conn.close();
      }
    }),
    { numRuns: 150, seed: SEED },
  );
});

test("oversized lines and endless garbage close the connection after a TOO_LARGE error", opts, async () => {
  const cases: [string, Buffer][] = [
    ["valid request padded past the limit", Buffer.from(JSON.stringify({ id: 1, op: "thin.create", args: { thinId: 1, pad: "x".repeat(MAX_LINE_BYTES) } }) + "\n")],
    ["one byte over, with newline", Buffer.concat([Buffer.alloc(MAX_LINE_BYTES + 1, 0x41), Buffer.from("\n")])],
    ["binary garbage without newline", Buffer.from(Array.from({ length: 3 * MAX_LINE_BYTES }, (_, i) => (i * 7919 + 13) % 256).map((b) => (b === 10 ? 11 : b)))],
    ["NUL bytes", Buffer.alloc(MAX_LINE_BYTES * 2, 0)],
  ];
  for (const [what, payload] of cases) {
    const before = { commands: commands.length, handled: handled.length, logs: logs.length };
    const conn = new Connection(socketPath);
    // Written in pieces, the way a slow client would.
    for (let i = 0; i < payload.length && !conn.closed; i += 4096) await conn.write(payload.subarray(i, i + 4096)).catch(() => undefined);
    const reply = await conn.next();
    assert.equal(reply?.error?.code, "TOO_LARGE", what);
    assert.equal(await conn.waitClosed(), true, `${what}: connection left open`);
    assert.equal(handled.length, before.handled, what);
    assert.equal(commands.length, before.commands, what);
    assert.ok(logs.slice(before.logs).some((l) => l.code === "TOO_LARGE"), `${what}: not logged`);
    conn.close();
  }
  // A line of exactly the limit is still parsed (and refused for what it is, not for its size).
  const conn = new Connection(socketPath);
  try {
    const exact = JSON.stringify({ id: 3, op: "pool.status", args: {} });
    await expectRefused(conn, exact + " ".repeat(MAX_LINE_BYTES - exact.length - 1) + "x", "BAD_JSON", null, "exactly at limit");
  } finally {
    conn.close();
  }
});

test("nothing was polluted and nothing was written outside the helper's own state", opts, () => {
  const probe = {} as Record<string, unknown>;
  for (const key of ["thinId", "name", "polluted", "0", "-f"]) assert.equal(probe[key], undefined, key);
  assert.equal(Object.getPrototypeOf(probe), Object.prototype);
  assert.equal(typeof Object.prototype.toString, "function");
  // The temp dir only holds what start-up made: the socket, the (empty) blob dir, and at most the
  // pool directory pool.ensure creates before its first command.
  assert.deepEqual(readdirSync(join(dir, "blobs", "sha256")), []);
  assert.deepEqual(readdirSync(join(dir, "run")), ["helper.sock"]);
  // The recorder is the only spawner: everything recorded is a known tool or the applier.
  for (const command of commands) assert.match(command.file, /^\/usr\/(s?bin)\/(dmsetup|losetup|blkid|mkfs\.ext4|fallocate|mount|umount|unshare|thin_ls)$/);
});
