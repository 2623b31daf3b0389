// The agent's validator of a layer tar: streams the object once, before it is ever applied
// (while it is being downloaded, see agent/blobs), and either returns what it contains or
// refuses it with the first broken rule.
//
// tar-reader.ts parses the archive and its block structure (by hand: see why there),
// entry-rules.ts judges each member, compression.ts decompresses gzip and zstd objects.
//
// Decisions:
// - A zero-byte object is refused (NOT_A_TAR): every tar writer emits at least the two zero blocks
//   of the end-of-archive marker, so an empty object is a broken upload, not an empty layer.
// - Only POSIX ustar / PAX and GNU headers are accepted; old v7 headers (no "ustar" magic) are
//   NOT_A_TAR. gzip and zstd objects are recognized by their magic bytes (never by name) and the
//   tar inside is checked (compression.ts); xz and bzip2 are NOT_A_TAR, named in the message.
// - Device nodes are accepted (created inside the image, as containerd and moby do as root; every
//   host mount of an image is nodev). Contiguous files ('7') are regular files; GNU sparse files
//   (old GNU 'S', PAX 0.0, 0.1 and 1.0: sparse.ts) are regular files whose map must be sound
//   (BAD_SPARSE_MAP); any other type flag is UNKNOWN_TYPE.
// - The root entry ("./" as `tar -C dir .` writes) is accepted when it is a directory.
// - What cannot be checked here is left to the apply step: that a hardlink target from a lower
//   layer exists, and where a path through a LOWER layer's symlink leads (the applier resolves
//   every path inside the image root). Writing through a symlink of the same layer is refused
//   here (THROUGH_SYMLINK).
import type { Readable } from "node:stream";
import { Decompression } from "./compression.ts";
import { EntryRules, type EntryLimits, type LayerSummary } from "./entry-rules.ts";
import { LayerValidationError, WHOLE_ARCHIVE } from "./errors.ts";
import { DEFAULT_PATH_LIMITS } from "./names.ts";
import { TarReader } from "./tar-reader.ts";

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

/**
 * Reads a whole layer object and checks it. Resolves to its summary; rejects with
 * LayerValidationError when the layer is refused (at the first broken rule: the rest of the
 * input is not read, and the input is destroyed), or with the input's own error when reading
 * fails (that is not the layer's fault: the caller may retry).
 */
export async function validateLayer(
  input: Readable | AsyncIterable<Uint8Array>,
  limits: Partial<LayerLimits> = {},
): Promise<LayerSummary> {
  const resolved = resolveLimits(limits);
  const rules = new EntryRules(resolved);
  const reader = new TarReader(resolved.maxHeaderBytes, (member) => rules.check(member));
  const decompression = new Decompression(resolved.maxLayerBytes, resolved.maxDecompressedBytes);
  try {
    for await (const bytes of decompression.tarBytes(input)) {
      if (reader.total + bytes.length > resolved.maxLayerBytes) {
        throw new LayerValidationError("LAYER_TOO_LARGE", WHOLE_ARCHIVE, `layer is larger than ${resolved.maxLayerBytes} bytes`);
      }
      reader.write(bytes);
    }
    reader.end();
  } catch (err) {
    if (isDestroyable(input)) input.destroy();
    throw err;
  }
  rules.summary.tarBytes = reader.total;
  rules.summary.compression = decompression.compression;
  rules.summary.objectBytes = decompression.rawBytes;
  return rules.summary;
}

/**
 * Refuses a layer object by its listed size, before any byte of it is requested: an object
 * larger than maxLayerBytes would be refused anyway once that many bytes were read.
 */
export function checkListedSize(size: number, limits: Partial<LayerLimits> = {}): void {
  const { maxLayerBytes } = resolveLimits(limits);
  if (size > maxLayerBytes) {
    throw new LayerValidationError("LAYER_TOO_LARGE", WHOLE_ARCHIVE, `the object is listed with ${size} bytes, more than the layer limit of ${maxLayerBytes} bytes (IMGD_LAYER_MAX_BYTES)`);
  }
}

function resolveLimits(limits: Partial<LayerLimits>): LayerLimits {
  const resolved = { ...DEFAULT_LAYER_LIMITS, ...limits };
  for (const [name, value] of Object.entries(resolved)) {
    if (!Number.isSafeInteger(value) || value <= 0) throw new TypeError(`layer limit ${name} must be a positive integer, got ${value}`);
  }
  return resolved;
}

function isDestroyable(input: unknown): input is { destroy(): void } {
  return typeof (input as { destroy?: unknown }).destroy === "function";
}
