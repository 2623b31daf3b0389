// The agent's validator of a layer tar: streams the object once, before it is ever applied, and
// either returns what it contains or refuses it with the first broken rule.
//
// Parsing is tar-stream's (the applier must use the same parser, so both see the same members);
// entry-rules.ts judges each member, framing.ts the raw block structure tar-stream is lax about.
//
// Decisions:
// - A zero-byte object is refused (NOT_A_TAR): every tar writer emits at least the two zero blocks
//   of the end-of-archive marker, so an empty object is a broken upload, not an empty layer.
// - Only POSIX ustar / PAX and GNU headers are accepted; old v7 headers (no "ustar" magic) are
//   NOT_A_TAR. gzip and zstd objects are recognized by their magic bytes (never by name) and the
//   tar inside is checked (compression.ts); xz and bzip2 are NOT_A_TAR, named in the message.
// - Devices are refused (DEVICE_NODE): no layer may create device nodes; /dev comes from the
//   runtime. Contiguous files and any other type flag are UNKNOWN_TYPE.
// - The root entry ("./" as `tar -C dir .` writes) is accepted when it is a directory.
// - What cannot be checked here is left to the apply step: that a hardlink target from a lower
//   layer exists, and that no member is written through a symlink (the applier resolves every
//   path inside the image root).
import type { Readable } from "node:stream";
import { extract as tarExtract } from "tar-stream";
import { Decompression } from "./compression.ts";
import { EntryRules, type EntryLimits, type LayerSummary, type MemberHeader } from "./entry-rules.ts";
import { LayerValidationError, WHOLE_ARCHIVE } from "./errors.ts";
import { ArchiveFraming, roundUpToBlock } from "./framing.ts";
import { DEFAULT_PATH_LIMITS } from "./names.ts";

export { LayerValidationError, printable, type LayerRule } from "./errors.ts";
export { normalizeEntryName, type PathLimits } from "./names.ts";
export type { LayerSummary } from "./entry-rules.ts";
export { detectCompression, type Compression } from "./compression.ts";

export interface LayerLimits extends EntryLimits {
  /** Largest tar, in bytes; also the largest object as stored. */
  maxLayerBytes: number;
  /** Most bytes a compressed object may decompress to (DECOMPRESSION_LIMIT): bounds the work a
   *  small hostile object (a "bomb") can cause, whatever the tar inside looks like. */
  maxDecompressedBytes: number;
  /** Most bytes of metadata headers (PAX, GNU long names) before one member. */
  maxHeaderBytes: number;
}

const GiB = 1024 * 1024 * 1024;

export const DEFAULT_LAYER_LIMITS: Readonly<LayerLimits> = {
  ...DEFAULT_PATH_LIMITS,
  maxEntries: 1_000_000,
  maxEntryBytes: 4 * GiB,
  // A layer can never unpack into more than one thin device (IMGD_THIN_SIZE, 8G by default).
  maxLayerBytes: 8 * GiB,
  maxDecompressedBytes: 16 * GiB,
  maxLinkTargetBytes: 4095,
  maxHeaderBytes: 1024 * 1024,
};

/** tar-stream copies its input in slices of at most this size, so retained bytes stay small. */
const SLICE_BYTES = 64 * 1024;

/**
 * Reads a whole layer object and checks it. Resolves to its summary; rejects with
 * LayerValidationError when the layer is refused, or with the input's own error when reading
 * fails (that is not the layer's fault: the caller may retry).
 */
export async function validateLayer(
  input: Readable | AsyncIterable<Uint8Array>,
  limits: Partial<LayerLimits> = {},
): Promise<LayerSummary> {
  const resolved = resolveLimits(limits);
  const framing = new ArchiveFraming(resolved.maxHeaderBytes);
  const rules = new EntryRules(resolved);
  const extract = tarExtract();
  const decompression = new Decompression(resolved.maxLayerBytes, resolved.maxDecompressedBytes);

  let failure: { error: unknown } | null = null;
  let parseError: unknown = null;
  const fail = (error: unknown): void => {
    if (failure !== null) return;
    failure = { error };
    extract.destroy();
    if (isDestroyable(input)) input.destroy();
  };

  const feeding = (async () => {
    for await (const bytes of decompression.tarBytes(input)) {
      for (let at = 0; at < bytes.length; at += SLICE_BYTES) {
        if (failure !== null || extract.destroying) return;
        const slice = bytes.subarray(at, at + SLICE_BYTES);
        framing.observe(slice);
        if (framing.total > resolved.maxLayerBytes) {
          throw new LayerValidationError("LAYER_TOO_LARGE", WHOLE_ARCHIVE, `layer is larger than ${resolved.maxLayerBytes} bytes`);
        }
        if (!extract.write(slice)) await drained(extract);
      }
    }
    if (failure === null && !extract.destroying) extract.end(undefined);
  })().catch(fail);

  const consuming = (async () => {
    for await (const member of extract) {
      const header = member.header as unknown as MemberHeader & { byteOffset: number };
      const dataEnd = header.byteOffset + (header.type === "directory" ? 0 : roundUpToBlock(header.size));
      framing.member(member.offset, dataEnd);
      rules.check(header);
      let received = 0;
      for await (const data of member) received += (data as Uint8Array).byteLength;
      if (received !== header.size) throw new Error(`Unexpected end of data in entry at byte ${member.offset}`);
    }
  })().catch((err: unknown) => {
    if (err instanceof LayerValidationError) fail(err);
    else parseError ??= err;
  });

  await Promise.all([feeding, consuming]);
  if (failure !== null) throw (failure as { error: unknown }).error;
  if (parseError !== null) throw classifyParseError(parseError, framing);
  framing.finish();
  rules.summary.tarBytes = framing.total;
  rules.summary.compression = decompression.compression;
  rules.summary.objectBytes = decompression.rawBytes;
  return rules.summary;
}

/** Limits an operator may lower (or raise) through the agent's environment. */
export const LIMIT_VARIABLES: Readonly<Record<string, keyof LayerLimits>> = {
  IMGD_LAYER_MAX_ENTRIES: "maxEntries",
  IMGD_LAYER_MAX_ENTRY_BYTES: "maxEntryBytes",
  IMGD_LAYER_MAX_BYTES: "maxLayerBytes",
  IMGD_LAYER_MAX_DECOMPRESSED_BYTES: "maxDecompressedBytes",
};

/** The limits set in `env` (IMGD_LAYER_MAX_*), as numbers; checked with the others. */
export function layerLimitsFromEnv(env: NodeJS.ProcessEnv = process.env): Partial<LayerLimits> {
  const limits: Partial<LayerLimits> = {};
  for (const [variable, limit] of Object.entries(LIMIT_VARIABLES)) {
    const text = env[variable];
    if (text === undefined || text === "") continue;
    const value = /^[0-9]+$/.test(text) ? Number(text) : NaN;
    if (!Number.isSafeInteger(value) || value <= 0) throw new TypeError(`${variable} must be a positive integer, got ${JSON.stringify(text)}`);
    limits[limit] = value;
  }
  return limits;
}

function resolveLimits(limits: Partial<LayerLimits>): LayerLimits {
  // Explicit limits win over the environment, which wins over the defaults.
  const resolved = { ...DEFAULT_LAYER_LIMITS, ...layerLimitsFromEnv(), ...limits };
  for (const [name, value] of Object.entries(resolved)) {
    if (!Number.isSafeInteger(value) || value <= 0) throw new TypeError(`layer limit ${name} must be a positive integer, got ${value}`);
  }
  return resolved;
}

function isDestroyable(input: unknown): input is { destroy(): void } {
  return typeof (input as { destroy?: unknown }).destroy === "function";
}

/** Resolves when the writable drains or closes (a destroyed stream never drains). */
function drained(stream: { once(event: string, fn: () => void): unknown; off(event: string, fn: () => void): unknown }): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      stream.off("drain", done);
      stream.off("close", done);
      resolve();
    };
    stream.once("drain", done);
    stream.once("close", done);
  });
}

/** Compressions not supported, named when an object that carries their magic is refused. */
const COMPRESSION_MAGIC: ReadonlyArray<readonly [string, number[]]> = [
  ["xz", [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]],
  ["bzip2", [0x42, 0x5a, 0x68]],
];

/** Turns tar-stream's parse failures into the validator's rules. */
function classifyParseError(err: unknown, framing: ArchiveFraming): LayerValidationError {
  const text = err instanceof Error ? err.message : String(err);
  const at = framing.nextHeader;
  const refuse = (rule: "NOT_A_TAR" | "TRUNCATED" | "HEADER_TOO_LARGE" | "TRAILING_GARBAGE", message: string) =>
    new LayerValidationError(rule, WHOLE_ARCHIVE, message);

  if (framing.endMarkerAt !== null) return refuse("TRAILING_GARBAGE", `data after the end of the archive at byte ${framing.endMarkerAt}`);
  if (at === 0) {
    const compression = COMPRESSION_MAGIC.find(([, magic]) => magic.every((b, i) => framing.head[i] === b));
    if (compression) return refuse("NOT_A_TAR", `object is ${compression[0]}-compressed; only plain, gzip and zstd tar layers are supported`);
    if (framing.total < 512) return refuse("NOT_A_TAR", `object is ${framing.total} bytes, shorter than one tar header`);
  }
  if (/Unexpected end of data/.test(text)) return refuse("TRUNCATED", `the object ends inside an entry or header (after byte ${at})`);
  if (/Header exceeds max size/.test(text)) return refuse("HEADER_TOO_LARGE", `a metadata header after byte ${at} exceeds 4 MiB`);
  if (/Invalid tar header\. Maybe/.test(text)) return refuse("NOT_A_TAR", `bad header checksum at or after byte ${at}`);
  if (/unknown format/.test(text)) {
    return refuse("NOT_A_TAR", `header at or after byte ${at} has no ustar magic (pre-POSIX v7 tar is not supported)`);
  }
  return refuse("NOT_A_TAR", `unreadable tar at or after byte ${at}: ${text}`);
}
