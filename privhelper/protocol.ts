// The helper's socket protocol: one JSON object per line in each direction.
// This module is the allow-list: a request that does not parse here is never acted on.
// It is shared with agent/helper-client.ts so both sides use the same types.
import { z } from "zod";

export const MAX_LINE_BYTES = 64 * 1024;
export const MAX_THIN_ID = 2 ** 24 - 1;

export const LAYER_NAME = /^imgd-layer-[0-9a-f]{32}$/;
export const ACTIVATION_NAME = /^imgd-act-[0-9a-z]{26}$/;
export const DIGEST = /^sha256:[0-9a-f]{64}$/;
/** A pool's identity (pool-identity.ts): 128 random bits, lowercase hex. */
export const POOL_ID = /^[0-9a-f]{32}$/;

const thinId = z.int().min(0).max(MAX_THIN_ID);
// Names become dmsetup arguments and path components: only these two exact shapes exist.
const deviceName = z.string().max(64).refine((s) => LAYER_NAME.test(s) || ACTIVATION_NAME.test(s), {
  message: "must be imgd-layer-<32 hex> or imgd-act-<26 lowercase ulid chars>",
});
const digest = z.string().regex(DIGEST, "must be sha256:<64 lowercase hex>");
const noArgs = z.strictObject({});

export const OP_ARGS = {
  "pool.status": noArgs,
  "pool.ensure": noArgs,
  "thin.create": z.strictObject({ thinId }),
  "thin.snapshot": z.strictObject({ thinId, originId: thinId }),
  "thin.delete": z.strictObject({ thinId }),
  "thin.list": noArgs,
  "device.activate": z.strictObject({ name: deviceName, thinId }),
  "device.deactivate": z.strictObject({ name: deviceName }),
  "device.list": noArgs,
  "fs.mkfs": z.strictObject({ name: deviceName }),
  "layer.apply": z.strictObject({ name: deviceName, digest }),
} as const;

export type OpName = keyof typeof OP_ARGS;
export const OP_NAMES = Object.keys(OP_ARGS) as OpName[];
export type OpArgs<Op extends OpName> = z.infer<(typeof OP_ARGS)[Op]>;

/** What the kernel reports of the pool (parsed from `dmsetup status`). */
export type PoolUsage = {
  name: string;
  dataUsedBytes: number;
  dataTotalBytes: number;
  metaUsedBytes: number;
  metaTotalBytes: number;
  /** "rw", "ro", "out_of_data_space" as reported by the kernel, or "fail" */
  mode: string;
  blockSizeBytes: number;
  errorIfNoSpace: boolean;
};
export type PoolStatus = PoolUsage & {
  /**
   * The pool's identity (POOL_ID), given when its metadata was created; null only from
   * pool.status on a pool made by an older helper (pool.ensure gives it one).
   */
  id: string | null;
};
export type Empty = Record<string, never>;

export type OpResults = {
  "pool.status": PoolStatus;
  "pool.ensure": PoolStatus;
  "thin.create": Empty;
  "thin.snapshot": Empty;
  "thin.delete": Empty;
  /** every thin id in the pool's metadata, ascending */
  "thin.list": { thinIds: number[] };
  "device.activate": { path: string };
  "device.deactivate": Empty;
  "device.list": { devices: { name: string; thinId: number }[] };
  "fs.mkfs": Empty;
  /** entries: tar entries processed; bytes: size of the layer blob read (and hashed) */
  "layer.apply": { entries: number; bytes: number };
};
export type OpResult<Op extends OpName> = OpResults[Op];

export type Request = { [Op in OpName]: { id: number; op: Op; args: OpArgs<Op> } }[OpName];

export type ErrorBody = { code: string; message: string };
export type Response =
  | { id: number | null; ok: true; result: unknown }
  | { id: number | null; ok: false; error: ErrorBody };

/** Codes produced while parsing a line, before any operation runs. */
export type ParseErrorCode = "TOO_LARGE" | "BAD_JSON" | "UNKNOWN_OP" | "BAD_ARGS";
export type ParseFailure = {
  ok: false;
  /** the request id when it could be read, so the client can match the error */
  id: number | null;
  code: ParseErrorCode;
  message: string;
  field?: string;
};
export type ParseResult = { ok: true; request: Request } | ParseFailure;

const envelope = z.strictObject({
  id: z.int().min(0),
  op: z.string().max(64),
  // Checked by the op's own strict schema, on the object exactly as JSON.parse built it (copying
  // it first would turn an own "__proto__" key into a prototype and hide it from the check).
  args: z.unknown(),
});

function fieldOf(issue: z.core.$ZodIssue, prefix: string[]): string {
  const path = [...prefix, ...issue.path.map(String)];
  // An unknown key is reported on the object; name the key itself.
  if (issue.code === "unrecognized_keys") return [...path, issue.keys[0] ?? ""].join(".");
  return path.join(".") || "(request)";
}

function failure(id: number | null, code: ParseErrorCode, message: string, field?: string): ParseFailure {
  return field === undefined ? { ok: false, id, code, message } : { ok: false, id, code, message, field };
}

/** Parses one request line (without its newline). Never throws. */
export function parseRequestLine(line: string | Uint8Array): ParseResult {
  const bytes = typeof line === "string" ? Buffer.byteLength(line) : line.byteLength;
  if (bytes > MAX_LINE_BYTES) return failure(null, "TOO_LARGE", `request line exceeds ${MAX_LINE_BYTES} bytes`);
  const text = typeof line === "string" ? line : Buffer.from(line).toString("utf8");

  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    return failure(null, "BAD_JSON", `request is not valid JSON: ${(err as Error).message}`);
  }

  const candidateId = typeof value === "object" && value !== null && "id" in value ? (value as { id: unknown }).id : undefined;
  const id = Number.isSafeInteger(candidateId) && (candidateId as number) >= 0 ? (candidateId as number) : null;

  const env = envelope.safeParse(value);
  if (!env.success) {
    const issue = env.error.issues[0]!;
    const field = fieldOf(issue, []);
    return failure(id, "BAD_ARGS", `${field}: ${issue.message}`, field);
  }

  const op = env.data.op;
  // Own-property check: "constructor" or "__proto__" must not find an inherited member.
  if (!Object.hasOwn(OP_ARGS, op)) return failure(env.data.id, "UNKNOWN_OP", `unknown op ${JSON.stringify(op)}`, "op");

  const args = OP_ARGS[op as OpName].safeParse(env.data.args);
  if (!args.success) {
    const issue = args.error.issues[0]!;
    const field = fieldOf(issue, ["args"]);
    return failure(env.data.id, "BAD_ARGS", `${field}: ${issue.message}`, field);
  }
  return { ok: true, request: { id: env.data.id, op, args: args.data } as Request };
}

export function encodeResponse(response: Response): string {
  return JSON.stringify(response) + "\n";
}
