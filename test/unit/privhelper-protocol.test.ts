// The helper's request parser is its allow-list: these tests try to get something past it.
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { MAX_LINE_BYTES, OP_NAMES, parseRequestLine, type ParseResult } from "../../privhelper/protocol.ts";
import { parseSize, loadConfig } from "../../privhelper/config.ts";

const LAYER = "imgd-layer-0123456789abcdef0123456789abcdef";
const ACT = "imgd-act-01jd5x7k3m9q2w8e4r6t0y1u3i";
const DIGEST = "sha256:" + "ab".repeat(32);

const line = (value: unknown) => JSON.stringify(value);
const request = (op: string, args: unknown, id: unknown = 7) => line({ id, op, args });

function expectOk(result: ParseResult) {
  assert.equal(result.ok, true, result.ok ? "" : `${result.code} ${result.message}`);
  return result.ok ? result.request : assert.fail();
}

function expectError(result: ParseResult, code: string, field?: string) {
  assert.equal(result.ok, false, "expected a refusal");
  if (result.ok) return;
  assert.equal(result.code, code, result.message);
  if (field !== undefined) assert.equal(result.field, field, result.message);
}

test("every op parses with valid arguments", () => {
  const valid: [string, unknown][] = [
    ["pool.status", {}],
    ["pool.ensure", {}],
    ["thin.create", { thinId: 0 }],
    ["thin.snapshot", { thinId: 16777215, originId: 3 }],
    ["thin.delete", { thinId: 12 }],
    ["thin.list", {}],
    ["device.activate", { name: LAYER, thinId: 1 }],
    ["device.activate", { name: ACT, thinId: 1 }],
    ["device.deactivate", { name: ACT }],
    ["device.list", {}],
    ["fs.mkfs", { name: LAYER }],
    ["layer.apply", { name: LAYER, digest: DIGEST }],
  ];
  assert.deepEqual(new Set(valid.map(([op]) => op)), new Set(OP_NAMES));
  for (const [op, args] of valid) {
    const parsed = expectOk(parseRequestLine(request(op, args)));
    assert.deepEqual(parsed, { id: 7, op, args });
  }
});

test("names: only the two imgd shapes, nothing option-like or path-like", () => {
  const bad = [
    "-imgd-layer-0123456789abcdef0123456789abcdef",
    "--table",
    "-f",
    "imgd-layer-0123456789abcdef0123456789abcde", // 31 hex
    "imgd-layer-0123456789abcdef0123456789abcdef0", // 33 hex
    "imgd-layer-0123456789ABCDEF0123456789ABCDEF", // uppercase
    "imgd-act-01JD5X7K3M9Q2W8E4R6T0Y1U3I",
    "imgd-act-01jd5x7k3m9q2w8e4r6t0y1u3", // 25
    `${LAYER}\n`,
    `${LAYER} `,
    `${LAYER}/../../etc`,
    `../${LAYER}`,
    `/dev/mapper/${LAYER}`,
    `${LAYER}\u0000`,
    "imgd-pool",
    "docker-thinpool",
    "vg0-root",
    "cryptroot",
    "imgd-layer-",
    "",
    ".",
    "..",
  ];
  for (const name of bad) {
    expectError(parseRequestLine(request("device.activate", { name, thinId: 1 })), "BAD_ARGS", "args.name");
  }
  for (const name of [5, null, [LAYER], { name: LAYER }]) {
  }
});

test("thin ids: integers 0..2^24-1 only", () => {
  for (const thinId of [-1, 16777216, 2 ** 31, 2 ** 53, 1e300, 1.5, "5", null, true, [1]]) {
    expectError(parseRequestLine(request("thin.create", { thinId })), "BAD_ARGS", "args.thinId");
    expectError(parseRequestLine(request("thin.snapshot", { thinId: 1, originId: thinId })), "BAD_ARGS", "args.originId");
  }
  // 1e2 is the JSON spelling of the integer 100: still an integer.
  assert.deepEqual(expectOk(parseRequestLine('{"id":1,"op":"thin.delete","args":{"thinId":1e2}}')).args, { thinId: 100 });
});

test("digests are exact; the mount ops are gone (the helper mounts nothing for the agent)", () => {
  for (const digest of ["sha256:" + "AB".repeat(32), "sha256:" + "ab".repeat(31), "sha512:" + "ab".repeat(64), "ab".repeat(32), `${DIGEST}\n`, `${DIGEST}/..`]) {
    expectError(parseRequestLine(request("layer.apply", { name: LAYER, digest })), "BAD_ARGS", "args.digest");
  }
  expectError(parseRequestLine(request("fs.mount", { name: LAYER, readOnly: true })), "UNKNOWN_OP", "op");
  expectError(parseRequestLine(request("fs.unmount", { name: LAYER })), "UNKNOWN_OP", "op");
});

test("unknown or extra fields are refused, and the refusal names them", () => {
  expectError(parseRequestLine(request("thin.create", { thinId: 1, force: true })), "BAD_ARGS", "args.force");
  expectError(parseRequestLine(request("pool.status", { verbose: 1 })), "BAD_ARGS", "args.verbose");
  expectError(parseRequestLine(request("thin.list", { device: "/dev/loop0" })), "BAD_ARGS", "args.device");
  expectError(parseRequestLine('{"id":1,"op":"thin.create","args":{"thinId":1,"__proto__":{"x":1}}}'), "BAD_ARGS", "args.__proto__");
  expectError(parseRequestLine(line({ id: 1, op: "pool.status", args: {}, sudo: true })), "BAD_ARGS", "sudo");
  expectError(parseRequestLine(line({ id: 1, op: "pool.status" })), "BAD_ARGS", "args");
  expectError(parseRequestLine(line({ id: 1, op: "pool.status", args: [] })), "BAD_ARGS", "args");
  expectError(parseRequestLine(line({ op: "pool.status", args: {} })), "BAD_ARGS", "id");
  expectError(parseRequestLine(line({ id: -1, op: "pool.status", args: {} })), "BAD_ARGS", "id");
  expectError(parseRequestLine(line({ id: "1", op: "pool.status", args: {} })), "BAD_ARGS", "id");
  expectError(parseRequestLine(request("device.activate", { name: LAYER })), "BAD_ARGS", "args.thinId");
});

test("unknown ops, including inherited property names", () => {
  for (const op of ["thin.format", "exec", "POOL.STATUS", "pool.status ", "__proto__", "constructor", "toString", "hasOwnProperty", ""]) {
    const result = parseRequestLine(request(op, {}));
    expectError(result, "UNKNOWN_OP", "op");
    assert.equal(result.ok ? -1 : result.id, 7, "the id is echoed so the client can match the error");
  }
  expectError(parseRequestLine(line({ id: 7, op: 5, args: {} })), "BAD_ARGS", "op");
});

test("bad JSON and oversized lines", () => {
  for (const text of ["", "{", "{'id':1}", "nul", '{"id":1,"op":"pool.status","args":{}}}']) {
    expectError(parseRequestLine(text), "BAD_JSON");
  }
  for (const text of ["null", "[]", "5", '"pool.status"']) expectError(parseRequestLine(text), "BAD_ARGS");
  const padded = (size: number) => {
    const base = request("pool.status", {});
    return base.slice(0, -1) + " ".repeat(size - base.length) + "}";
  };
  assert.equal(Buffer.byteLength(padded(MAX_LINE_BYTES)), MAX_LINE_BYTES);
  expectOk(parseRequestLine(padded(MAX_LINE_BYTES)));
  expectError(parseRequestLine(padded(MAX_LINE_BYTES + 1)), "TOO_LARGE");
  expectError(parseRequestLine(Buffer.from(padded(MAX_LINE_BYTES + 1))), "TOO_LARGE");
  // Multi-byte characters count as bytes, not characters.
  expectError(parseRequestLine(request("fs.mkfs", { name: "é".repeat(MAX_LINE_BYTES / 2) })), "TOO_LARGE");
});

// An independent statement of the allow-list (no zod), to check the parser against.
const EXPECTED_KEYS: Record<string, string[]> = {
  "pool.status": [], "pool.ensure": [], "device.list": [], "thin.list": [],
  "thin.create": ["thinId"], "thin.delete": ["thinId"], "thin.snapshot": ["thinId", "originId"],
  "device.activate": ["name", "thinId"], "device.deactivate": ["name"], "fs.mkfs": ["name"],
  "layer.apply": ["name", "digest"],
};

function withinAllowList(request: { id: unknown; op: unknown; args: unknown }): boolean {
  if (!Number.isSafeInteger(request.id) || (request.id as number) < 0) return false;
  if (typeof request.op !== "string" || !Object.hasOwn(EXPECTED_KEYS, request.op)) return false;
  const args = request.args as Record<string, unknown>;
  if (Object.getPrototypeOf(args) !== Object.prototype) return false;
  const keys = Object.keys(args).sort();
  if (keys.join(",") !== [...EXPECTED_KEYS[request.op]!].sort().join(",")) return false;
  return keys.every((key) => {
    const value = args[key];
    switch (key) {
      case "thinId": case "originId": return Number.isInteger(value) && (value as number) >= 0 && (value as number) <= 0xffffff;
      case "name": return typeof value === "string" && /^(imgd-layer-[0-9a-f]{32}|imgd-act-[0-9a-z]{26})$/.test(value);
      case "digest": return typeof value === "string" && /^sha256:[0-9a-f]{64}$/.test(value);
      case "readOnly": return typeof value === "boolean";
      default: return false;
    }
  });
}

const validRequest = fc.oneof(
  fc.record({ id: fc.nat(), op: fc.constant("thin.snapshot"), args: fc.record({ thinId: fc.nat(0xffffff), originId: fc.nat(0xffffff) }) }),
  fc.record({ id: fc.nat(), op: fc.constantFrom("device.activate"), args: fc.record({ name: fc.constantFrom(LAYER, ACT), thinId: fc.nat(0xffffff) }) }),
  fc.record({ id: fc.nat(), op: fc.constantFrom("layer.apply"), args: fc.record({ name: fc.constantFrom(LAYER, ACT), digest: fc.constant(DIGEST) }) }),
  fc.record({ id: fc.nat(), op: fc.constantFrom(...OP_NAMES), args: fc.constant({}) }),
);

// Mutations of valid requests: replace a value, add a key, edit a string, change the op.
const mutatedRequest = fc.tuple(validRequest, fc.nat(), fc.anything(), fc.string({ unit: "binary" }), fc.nat(80), fc.integer()).map(
  ([req, pick, anything, text, position, number]) => {
    const copy = structuredClone(req) as { id: unknown; op: unknown; args: Record<string, unknown> } & Record<string, unknown>;
    const keys = Object.keys(copy.args);
    const key = keys.length ? keys[pick % keys.length]! : "thinId";
    switch (pick % 8) {
      case 0: copy.args[key] = anything; break;
      case 1: copy.args[`x${text}`] = anything; break;
      case 2: { const value = String(copy.args[key] ?? ""); copy.args[key] = value.slice(0, position) + text + value.slice(position); break; }
      case 3: copy.args[key] = number; break;
      case 4: copy.op = `${copy.op}${text}`; break;
      case 5: copy.id = anything; break;
      case 6: copy[text] = anything; break;
      case 7: copy.args = anything as Record<string, unknown>; break;
    }
    return JSON.stringify(copy) ?? "";
  },
);

test("property: random and mutated lines never parse into anything outside the allow-list", () => {
  const lines = fc.oneof(
    mutatedRequest,
    fc.json(),
    fc.string({ unit: "binary" }),
    validRequest.map((r) => JSON.stringify(r)),
  );
  fc.assert(
    fc.property(lines, (text) => {
      const result = parseRequestLine(text);
      if (result.ok) assert.ok(withinAllowList(result.request), `accepted ${text}`);
      else assert.ok(["BAD_JSON", "TOO_LARGE", "UNKNOWN_OP", "BAD_ARGS"].includes(result.code));
    }),
    { numRuns: 3000, seed: 20261122 },
  );
});

test("config sizes are parsed strictly", () => {
  assert.equal(parseSize("2G"), 2 * 1024 ** 3);
  assert.equal(parseSize("1M"), 1024 ** 2);
  assert.equal(parseSize("512K"), 512 * 1024);
  assert.equal(parseSize("4096"), 4096);
  for (const bad of ["", "0", "2g", "2 G", "2GB", "2GiB", "-1G", "1.5G", "02G", "G", "2G ", "0x10", "1e3", "99999999999999999G"]) {
    assert.throws(() => parseSize(bad), /size/, bad);
  }
  const config = loadConfig({});
  assert.equal(config.poolDataBytes, 2 * 1024 ** 3);
  assert.equal(config.poolMetaBytes, 1024 ** 2);
  assert.equal(config.thinBytes, 8 * 1024 ** 3);
  assert.equal(config.poolName, "imgd-pool");
  assert.throws(() => loadConfig({ IMGD_POOL_NAME: "-pool" }), /IMGD_POOL_NAME/);
  assert.throws(() => loadConfig({ IMGD_POOL_NAME: "imgd-layer-x" }), /IMGD_POOL_NAME/);
  for (const bad of ["100", "2048.0", " 2048", "0x800", "4194304"]) {
    assert.throws(() => loadConfig({ IMGD_POOL_BLOCK_SECTORS: bad }), /BLOCK_SECTORS/, bad);
  }
  assert.equal(loadConfig({ IMGD_POOL_BLOCK_SECTORS: "128", IMGD_POOL_DATA_SIZE: "64M" }).poolBlockSectors, 128);
  assert.throws(() => loadConfig({ IMGD_HELPER_STATE_DIR: "/" }), /STATE_DIR/);
  assert.throws(() => loadConfig({ IMGD_POOL_DATA_SIZE: "1000K" }), /DATA_SIZE/);
  assert.throws(() => loadConfig({ IMGD_HELPER_STATE_DIR: "relative/dir" }), /STATE_DIR/);
  assert.throws(() => loadConfig({ IMGD_HELPER_STATE_DIR: "/var/lib/../etc" }), /STATE_DIR/);
});
