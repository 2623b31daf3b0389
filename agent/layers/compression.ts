// Compressed layers: detected by their magic bytes (never by name), decompressed while streaming,
// with a cap on the decompressed size. An object without a known magic is passed on as plain tar.
//
// Decisions:
// - gzip (1f 8b) and zstd (28 b5 2f fd) only; xz and bzip2 stay NOT_A_TAR (named by the tar check).
// - Concatenated gzip members are one stream (RFC 1952, and what zlib does, whatever the read
//   sizes). Several zstd frames (and skippable frames) are one stream too (RFC 8878), but Node's
//   zstd decoder continues into a second frame only when the first ends exactly at a chunk
//   boundary: so the frames are split here (zstd-frames.ts) and fed so that every write ends at
//   a frame's end, which makes the result independent of how the object is read.
// - Raw bytes after the last gzip member or zstd frame that are not another member or frame
//   (zero padding, junk) are refused as TRAILING_GARBAGE, as Go's gzip reader refuses padding.
// - maxDecompressedBytes bounds the work a small object can cause (a "bomb"); maxLayerBytes
//   bounds the raw object too, so endless empty members cannot keep us busy either.
import { Readable, type Transform } from "node:stream";
import { createGunzip, createZstdDecompress } from "node:zlib";
import { LayerValidationError, WHOLE_ARCHIVE } from "./errors.ts";
import { ZstdFrames } from "./zstd-frames.ts";

export type Compression = "none" | "gzip" | "zstd";

const MAGIC: ReadonlyArray<readonly [Exclude<Compression, "none">, readonly number[]]> = [
  ["gzip", [0x1f, 0x8b]],
  ["zstd", [0x28, 0xb5, 0x2f, 0xfd]],
];
const LONGEST_MAGIC = 4;

/** The compression the first bytes of an object announce ("none": plain tar, or not a tar). */
export function detectCompression(head: Uint8Array): Compression {
  const found = MAGIC.find(([, magic]) => head.length >= magic.length && magic.every((b, i) => head[i] === b));
  return found ? found[0] : "none";
}

function asBuffer(chunk: Uint8Array | string): Buffer {
  return typeof chunk === "string" ? Buffer.from(chunk) : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
}

export class Decompression {
  /** Known once the first bytes were read. */
  compression: Compression = "none";
  /** Bytes of the object as stored. */
  rawBytes = 0;
  readonly #maxRawBytes: number;
  readonly #maxDecompressedBytes: number;

  constructor(maxRawBytes: number, maxDecompressedBytes: number) {
    this.#maxRawBytes = maxRawBytes;
    this.#maxDecompressedBytes = maxDecompressedBytes;
  }

  /**
   * The tar bytes of `input`: decompressed when its magic says so, as they are otherwise.
   * Errors of the input itself are passed through unchanged.
   */
  async *tarBytes(input: AsyncIterable<Uint8Array | string>): AsyncGenerator<Buffer> {
    const iterator = input[Symbol.asyncIterator]();
    const head: Buffer[] = [];
    let headBytes = 0;
    let ended = false;
    while (headBytes < LONGEST_MAGIC) {
      const next = await iterator.next();
      if (next.done) {
        ended = true;
        break;
      }
      const chunk = this.#counted(asBuffer(next.value));
      head.push(chunk);
      headBytes += chunk.length;
    }
    const first = Buffer.concat(head);
    this.compression = detectCompression(first);
    const raw = async function* (this: Decompression): AsyncGenerator<Buffer> {
      if (first.length > 0) yield first;
      while (!ended) {
        const next = await iterator.next();
        if (next.done) break;
        yield this.#counted(asBuffer(next.value));
      }
    }.call(this);

    if (this.compression === "none") {
      yield* raw;
      return;
    }
    yield* this.#decompressed(raw);
  }

  async *#decompressed(raw: AsyncGenerator<Buffer>): AsyncGenerator<Buffer> {
    const name = this.compression;
    let produced = 0;
    const limited = async function* (this: Decompression, output: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
      for await (const chunk of output) {
        produced += chunk.length;
        if (produced > this.#maxDecompressedBytes) {
          throw new LayerValidationError(
            "DECOMPRESSION_LIMIT",
            WHOLE_ARCHIVE,
            `${name} layer decompresses to more than ${this.#maxDecompressedBytes} bytes (from ${this.rawBytes} bytes read so far)`,
          );
        }
        yield chunk;
      }
    }.bind(this);
    if (name === "gzip") {
      const gunzip = createGunzip();
      yield* limited(decode(raw, gunzip, name));
      if (gunzip.bytesWritten < this.rawBytes) {
        throw new LayerValidationError("TRAILING_GARBAGE", WHOLE_ARCHIVE, `data after the end of the gzip stream at byte ${gunzip.bytesWritten} of ${this.rawBytes}`);
      }
      return;
    }
    // One decoder for every frame: it goes on into the next frame when each write ends exactly at
    // a frame's end, which the split guarantees (a fresh decoder per frame costs ~1 ms each, and
    // zstd:chunked layers have a frame per file). Skippable frames are not fed.
    let fed = 0;
    const frames = new ZstdFrames(raw);
    const pieces = async function* (): AsyncGenerator<Buffer> {
      for (let frame = await frames.next(); frame !== null; frame = await frames.next()) {
        for await (const piece of frame.bytes) {
          if (frame.skippable) continue;
          fed += piece.length;
          yield piece;
        }
      }
    };
    const zstd = createZstdDecompress();
    yield* limited(decode(pieces(), zstd, name));
    if (zstd.bytesWritten !== fed) {
      throw new LayerValidationError("BAD_COMPRESSION", WHOLE_ARCHIVE, `zstd stream is corrupt or truncated: the decoder stopped at byte ${zstd.bytesWritten} of the ${fed} frame bytes`);
    }
  }

  #counted(chunk: Buffer): Buffer {
    this.rawBytes += chunk.length;
    if (this.rawBytes > this.#maxRawBytes) {
      throw new LayerValidationError("LAYER_TOO_LARGE", WHOLE_ARCHIVE, `object is larger than ${this.#maxRawBytes} bytes`);
    }
    return chunk;
  }
}

/**
 * Decompresses `raw` with `decoder` (fresh). Errors of the input itself are passed through
 * unchanged; the decoder's are BAD_COMPRESSION.
 */
async function* decode(raw: AsyncIterable<Buffer>, decoder: Transform, name: string): AsyncGenerator<Buffer> {
  const source = Readable.from(raw);
  let inputError: unknown = undefined;
  source.on("error", (err) => {
    inputError = err;
    decoder.destroy(err);
  });
  source.pipe(decoder);
  try {
    for await (const chunk of decoder) yield chunk as Buffer;
  } catch (err) {
    if (err instanceof LayerValidationError || err === inputError) throw err;
    const text = err instanceof Error ? err.message : String(err);
    throw new LayerValidationError("BAD_COMPRESSION", WHOLE_ARCHIVE, `${name} stream is corrupt or truncated: ${text}`);
  } finally {
    source.destroy();
    decoder.destroy();
  }
}
