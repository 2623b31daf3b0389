// How imgd's programs declare and read their settings: one schema per program (agent/config.ts,
// privhelper/config.ts, client/connect.ts), each entry a name, a type with its range (zod), a
// default and a one-line meaning. The same schema reads a KEY=VALUE file, the environment and
// command-line flags (file < environment < flag) and generates the README's table
// (agent/config-doc.ts), so the three sources mean the same and the table cannot drift.
//
// It lives under privhelper/ because the root helper imports nothing from outside its directory;
// the agent and the clients import it from here.
import { readFileSync } from "node:fs";
import { isAbsolute, normalize } from "node:path";
import { parseArgs, parseEnv } from "node:util";
import { z } from "zod";

/** A kind of value: how its text is parsed (zod, with the message a person reads) and how the table names it. */
export interface Kind<T> {
  type: string;
  schema: z.ZodType<T, string>;
  /** "" is a value of its own (an empty S3 prefix), not "unset". */
  emptyIsValue?: boolean;
}

export interface Setting<T = unknown> {
  kind: Kind<T>;
  /** As written in a file; undefined = unset (the module that reads it decides what that means). */
  default: string | undefined;
  /** Shown instead of the default in the table when the default depends on the host. */
  defaultText?: string;
  doc: string;
  /** Never echoed in error messages. */
  secret?: boolean;
  /** Names the file itself (IMGD_CONFIG): refused inside it. */
  notInFile?: boolean;
  /** No command-line flag (secrets: flags show in `ps`). */
  noFlag?: boolean;
}

export type Schema = Record<string, Setting<any>>;
export type Values<S extends Schema> = { [K in keyof S]: S[K] extends Setting<infer T> ? T : never };

/** A setting with a default: always has a value. */
export function setting<T>(kind: Kind<T>, defaultValue: string, doc: string, extra: Partial<Setting<T>> = {}): Setting<T> {
  return { kind, default: defaultValue, doc, ...extra };
}

/** A setting without a default: undefined when unset. */
export function optional<T>(kind: Kind<T>, doc: string, extra: Partial<Setting<T>> = {}): Setting<T | undefined> {
  return { kind: kind as Kind<T | undefined>, default: undefined, doc, ...extra };
}

// ---- kinds ---------------------------------------------------------------------------------------

export function int(min: number, max: number): Kind<number> {
  const message = `expected an integer from ${min} to ${max}`;
  return {
    type: `integer ${min}..${max}`,
    schema: z.string().regex(/^[0-9]{1,16}$/, message).transform(Number).refine((n) => n >= min && n <= max, message),
  };
}

const UNITS: Record<string, number> = { "": 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

/** "2G", "1M", "512K", "4096": digits without leading zeros and one binary unit letter. */
export function parseSize(text: string): number {
  const match = /^([1-9][0-9]{0,15})([KMGT]?)$/.exec(text);
  if (!match) throw new Error(`invalid size ${JSON.stringify(text)} (expected e.g. 2G, 1M, 512K or bytes)`);
  const bytes = Number(match[1]) * UNITS[match[2]!]!;
  if (!Number.isSafeInteger(bytes)) throw new Error(`size ${text} is too large`);
  return bytes;
}

export function size(): Kind<number> {
  return {
    type: "size (bytes, or K/M/G/T)",
    schema: z.string().transform((text, ctx) => {
      try {
        return parseSize(text);
      } catch (err) {
        ctx.addIssue({ code: "custom", message: (err as Error).message });
        return z.NEVER;
      }
    }),
  };
}

export function oneOf<const T extends string>(...values: T[]): Kind<T> {
  return { type: values.join(" | "), schema: z.enum(values as [T, ...T[]], { error: `expected one of ${values.join(", ")}` }) };
}

/** "1"/"0" (also true/false, yes/no). */
export function flag(): Kind<boolean> {
  return {
    type: "boolean (1/0)",
    schema: z.enum(["1", "0", "true", "false", "yes", "no"], { error: "expected 1 or 0" }).transform((v) => v === "1" || v === "true" || v === "yes"),
  };
}

/** A normalized absolute path (no "..", no "//", no trailing "/"). */
export function path(): Kind<string> {
  return {
    type: "absolute path",
    schema: z.string().refine((p) => isAbsolute(p) && p !== "/" && !p.includes("\0") && normalize(p) === p && !p.endsWith("/") && p.length <= 1024, "must be a normalized absolute path"),
  };
}

/** Free text checked by a pattern (or a function returning the problem). */
export function text(type: string, check: RegExp | ((value: string) => string | undefined), message = `expected ${type}`, options: { emptyIsValue?: boolean } = {}): Kind<string> {
  const schema =
    check instanceof RegExp
      ? z.string().regex(check, message)
      : z.string().superRefine((value, ctx) => {
          const problem = check(value);
          if (problem) ctx.addIssue({ code: "custom", message: problem });
        });
  return { type, schema, ...options };
}

// ---- reading -------------------------------------------------------------------------------------

/** The command-line flag of a setting: IMGD_STATE_DIR → --state-dir (one rule, no list to keep). */
export function flagName(key: string): string {
  return key.replace(/^IMGD_/, "").toLowerCase().replaceAll("_", "-");
}

export class SettingsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "SettingsError";
  }
}

/** Names of test harnesses and benchmarks (IMGD_VM_*, IMGD_TEST_*, IMGD_BENCH_*): never a program's setting. */
export const HARNESS_PREFIXES = ["IMGD_VM", "IMGD_TEST_", "IMGD_BENCH_"];

export interface Sources {
  /** KEY=VALUE file (--config / IMGD_CONFIG): every key must be in the schema. */
  file?: string;
  env: Record<string, string | undefined>;
  /** Flags already parsed, by setting name. */
  flags?: Record<string, string>;
  /** IMGD_* names other imgd programs read: tolerated in the environment (one environment often serves several). */
  otherPrograms?: Iterable<string>;
  /** Only these IMGD_* names are checked in the environment (the helper owns a few prefixes). */
  ownsEnvName?: (key: string) => boolean;
}

export interface Loaded<S extends Schema> {
  values: Values<S>;
  /** Every raw setting after precedence (file < environment < flag), for modules still reading keys. */
  raw: Record<string, string | undefined>;
}

/** Reads every setting of `schema` from the sources; throws SettingsError naming every bad or unknown key. */
export function loadSettings<S extends Schema>(schema: S, sources: Sources): Loaded<S> {
  const problems: string[] = [];
  const fromFile = sources.file !== undefined ? readSettingsFile(sources.file) : {};
  for (const key of Object.keys(fromFile)) {
    if (!(key in schema)) problems.push(`${sources.file}: unknown setting ${key}`);
    else if (schema[key]!.notInFile) problems.push(`${sources.file}: ${key} cannot be set inside the file`);
  }
  const others = new Set(sources.otherPrograms ?? []);
  const owns = sources.ownsEnvName ?? (() => true);
  for (const key of Object.keys(sources.env)) {
    if (!key.startsWith("IMGD_") || key in schema || others.has(key) || HARNESS_PREFIXES.some((p) => key.startsWith(p)) || !owns(key)) continue;
    problems.push(`unknown setting ${key} in the environment`);
  }
  const raw: Record<string, string | undefined> = { ...fromFile, ...sources.env, ...(sources.flags ?? {}) };
  const values = parseValues(schema, raw, problems);
  if (problems.length > 0) throw new SettingsError(problems.join("; "));
  return { values, raw };
}

/** Parses each setting of `schema` from `raw` (unset or "" = the default); pushes one problem per bad value. */
export function parseValues<S extends Schema>(schema: S, raw: Record<string, string | undefined>, problems: string[]): Values<S> {
  const values: Record<string, unknown> = {};
  for (const [key, entry] of Object.entries(schema)) {
    let text = raw[key];
    if (text === "" && !entry.kind.emptyIsValue) text = undefined;
    text ??= entry.default;
    if (text === undefined) {
      values[key] = undefined;
      continue;
    }
    const result = entry.kind.schema.safeParse(text);
    if (result.success) values[key] = result.data;
    else problems.push(`${key}=${entry.secret ? "(secret)" : printable(text)}: ${result.error.issues[0]?.message ?? "invalid"}`);
  }
  return values as Values<S>;
}

/**
 * Reads a KEY=VALUE file as systemd's EnvironmentFile= and Node's util.parseEnv do (quotes, #
 * comments). parseEnv skips a line it cannot read; here such a line is an error with its number.
 */
export function readSettingsFile(file: string): Record<string, string> {
  const content = readFileSync(file, "utf8");
  content.split("\n").forEach((raw, i) => {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) return;
    if (!/^(export\s+)?[A-Za-z_][A-Za-z0-9_]*\s*=/.test(line)) throw new SettingsError(`${file}:${i + 1}: expected KEY=value`);
  });
  return parseEnv(content) as Record<string, string>;
}

/**
 * Parses a program's command line: one flag per setting (flagName), plus `extra` flags of the
 * program's own (--config, --version, ...). Unknown flags throw (the caller exits 2 with its usage).
 */
export function parseFlags<S extends Schema>(
  schema: S,
  argv: string[],
  extra: Record<string, { type: "string" | "boolean" }> = {},
): { flags: Record<string, string>; extra: Record<string, string | boolean | undefined> } {
  const options: Record<string, { type: "string" | "boolean" }> = { ...extra };
  const byFlag = new Map<string, string>();
  for (const [key, entry] of Object.entries(schema)) {
    if (entry.noFlag || !key.startsWith("IMGD_")) continue;
    byFlag.set(flagName(key), key);
    options[flagName(key)] = { type: "string" };
  }
  const { values } = parseArgs({ args: argv, options, strict: true, allowPositionals: false });
  const flags: Record<string, string> = {};
  const rest: Record<string, string | boolean | undefined> = {};
  for (const [name, value] of Object.entries(values)) {
    const key = byFlag.get(name);
    if (key !== undefined) flags[key] = value as string;
    else rest[name] = value as string | boolean | undefined;
  }
  return { flags, extra: rest };
}

/** The rows of the README's table for a schema (agent/config-doc.ts renders them). */
export function describeSchema(schema: Schema, options: { flags: boolean }): Array<{ name: string; flag?: string; type: string; default: string; doc: string }> {
  return Object.entries(schema).map(([key, entry]) => ({
    name: key,
    ...(options.flags && !entry.noFlag && key.startsWith("IMGD_") ? { flag: `--${flagName(key)}` } : {}),
    type: entry.kind.type,
    default: entry.defaultText ?? (entry.default === undefined ? "unset" : entry.default === "" ? '""' : entry.default),
    doc: entry.doc,
  }));
}

/** A value quoted for a message, everything outside printable ASCII escaped (as agent/s3/printable.ts; the helper imports nothing from the agent). */
export function printable(value: string): string {
  const chars = [...value];
  const shown = chars.slice(0, 200).map((ch) => {
    const cp = ch.codePointAt(0)!;
    if (ch === '"' || ch === "\\") return `\\${ch}`;
    return cp >= 0x20 && cp <= 0x7e ? ch : `\\u{${cp.toString(16)}}`;
  });
  return `"${shown.join("")}"${chars.length > 200 ? `...(${chars.length} chars)` : ""}`;
}
