// The applier's view of a blob: gzip and zstd blobs are decompressed, told by their magic bytes
// (never by a name: the helper only knows digests); anything else is a plain tar. Written
// independently of the agent's validator (agent/layers/compression.ts), on purpose: the helper
// trusts nothing the agent says about a blob, and must stand on its own.
//
// - MAX_DECOMPRESSED_BYTES caps what a blob may decompress to, so a small hostile blob (a "bomb")
//   cannot fill the shared thin pool even if the agent's limit were missing or larger. 8 GiB is
//   the default virtual size of one thin device (IMGD_THIN_SIZE): no layer can usefully unpack
//   to more. Reaching it refuses the layer (rule DECOMPRESSION_LIMIT).
// - A corrupt or truncated stream is refused (BAD_COMPRESSION, with zlib's message).
// - Concatenated gzip members are one stream. zstd frames (and skippable frames) are split here
//   and each decoded by a fresh decoder: Node's decoder only goes on into a second frame when the
//   first ends exactly at a chunk boundary, so the result would depend on read sizes otherwise.
// - Raw bytes after the last gzip member or zstd frame that are not another one: TRAILING_GARBAGE.
import { pipeline, Readable } from "node:stream";
import { createGunzip, createZstdDecompress } from "node:zlib";
import { LayerRefused } from "./refusal.ts";

export const MAX_DECOMPRESSED_BYTES = 8 * 1024 * 1024 * 1024;
const ARCHIVE = "(archive)";

export type BlobCompression = "none" | "gzip" | "zstd";

export function blobCompression(head: Buffer): BlobCompression {
  if (head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b) return "gzip";
  if (head.length >= 4 && head.readUInt32LE(0) === ZSTD_MAGIC) return "zstd";
  return "none";
}

/**
 * The tar bytes of the compressed blob `raw` (chunks that are not reused by the caller). Errors
 * of `raw` itself come out unchanged.
 */
export async function* decompressed(raw: AsyncIterable<Buffer>, compression: "gzip" | "zstd", maxDecompressedBytes = MAX_DECOMPRESSED_BYTES): AsyncGenerator<Buffer> {
  let produced = 0;
  const source = compression === "gzip" ? gunzipped(raw) : zstdDecoded(raw);
  try {
    for await (const chunk of source) {
      produced += chunk.length;
      if (produced > maxDecompressedBytes) {
        throw new LayerRefused("DECOMPRESSION_LIMIT", ARCHIVE, `${compression} blob decompresses to more than ${maxDecompressedBytes} bytes`);
      }
      yield chunk;
    }
  } catch (err) {
    if (err instanceof LayerRefused || !isZlibError(err)) throw err;
    throw new LayerRefused("BAD_COMPRESSION", ARCHIVE, `${compression} blob is corrupt or truncated: ${(err as Error).message}`);
  }
}

const isZlibError = (err: unknown) => err instanceof Error && "code" in err && /^(Z_|ZSTD_|ERR_ZSTD|ERR_ZLIB)/.test(String((err as NodeJS.ErrnoException).code));

/** Decodes `input` with `decoder`, passing on errors of either side. */
async function* through(input: AsyncIterable<Buffer>, decoder: NodeJS.ReadWriteStream & AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  let inputError: unknown = null;
  const source = Readable.from(input, { objectMode: false });
  source.on("error", (err) => (inputError ??= err));
  pipeline(source, decoder, () => undefined);
  try {
    for await (const chunk of decoder) yield chunk;
  } catch (err) {
    throw inputError ?? err;
  }
  if (inputError) throw inputError;
}

async function* gunzipped(raw: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  let rawBytes = 0;
  const decoder = createGunzip();
  yield* through((async function* () {
    for await (const chunk of raw) {
      rawBytes += chunk.length;
      yield chunk;
    }
  })(), decoder);
  // zlib stops at bytes that do not start another member (padding, junk) without an error.
  if (decoder.bytesWritten < rawBytes) {
    throw new LayerRefused("TRAILING_GARBAGE", ARCHIVE, `data after the end of the gzip stream at byte ${decoder.bytesWritten} of ${rawBytes}`);
  }
}

async function* zstdDecoded(raw: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  const pieces = zstdFrames(raw)[Symbol.asyncIterator]();
  let next = await pieces.next();
  while (!next.done) {
    const frame = next.value.frame;
    const thisFrame = async function* (): AsyncGenerator<Buffer> {
      while (!next.done && next.value.frame === frame) {
        yield next.value.bytes;
        next = await pieces.next();
      }
    };
    yield* through(thisFrame(), createZstdDecompress());
  }
}

const ZSTD_MAGIC = 0xfd2fb528;
const isSkippable = (magic: number) => magic >>> 4 === 0x184d2a5;

/**
 * Splits a zstd stream into its frames by their structure (RFC 8878): the frame header, then
 * blocks (3-byte little-endian header: bit 0 last block, bits 1-2 type, bits 3-23 size; an RLE
 * block holds 1 byte), then the optional 4-byte checksum. Skippable frames are dropped.
 * Yields the bytes of each data frame, tagged with the frame's number.
 */
export async function* zstdFrames(raw: AsyncIterable<Buffer>): AsyncGenerator<{ frame: number; bytes: Buffer }> {
  const splitter = new ZstdSplitter();
  for await (const chunk of raw) yield* splitter.push(chunk);
  splitter.end();
}

class ZstdSplitter {
  private frame = 0;
  /** What is read next: a frame's magic, the rest of its header, a block header, or content. */
  private state: "magic" | "header" | "block" | "content" | "checksum" | "skipSize" | "skip" = "magic";
  /** Small fields assembled across chunks (magic, header, block header, sizes). */
  private field: number[] = [];
  private need = 4;
  private remaining = 0;
  private lastBlock = false;
  private checksum = false;

  *push(chunk: Buffer): Generator<{ frame: number; bytes: Buffer }> {
    let at = 0;
    while (at < chunk.length) {
      if (this.state === "content" || this.state === "skip") {
        const take = Math.min(this.remaining, chunk.length - at);
        if (this.state === "content" && take > 0) yield { frame: this.frame, bytes: chunk.subarray(at, at + take) };
        at += take;
        this.remaining -= take;
        if (this.remaining === 0) this.afterContent();
        continue;
      }
      while (at < chunk.length && this.field.length < this.need) this.field.push(chunk[at++]!);
      if (this.field.length < this.need) break;
      const field = Buffer.from(this.field);
      this.field = [];
      yield* this.onField(field);
    }
  }

  private *onField(field: Buffer): Generator<{ frame: number; bytes: Buffer }> {
    switch (this.state) {
      case "magic": {
        const magic = field.readUInt32LE(0);
        if (isSkippable(magic)) {
          [this.state, this.need] = ["skipSize", 4];
          return;
        }
        if (magic !== ZSTD_MAGIC) throw new LayerRefused("TRAILING_GARBAGE", ARCHIVE, "data after the last zstd frame that is not another frame");
        this.frame++;
        yield { frame: this.frame, bytes: field };
        [this.state, this.need] = ["header", 1];
        return;
      }
      case "header": {
        if (field.length === 1) {
          // Frame_Header_Descriptor: FCS size flag (bits 7-6), single segment (5), reserved (3),
          // checksum (2), dictionary id size flag (1-0).
          const descriptor = field[0]!;
          if (descriptor & 0x08) throw new LayerRefused("BAD_COMPRESSION", ARCHIVE, "zstd blob is corrupt: reserved frame header bit set");
          const singleSegment = (descriptor >> 5) & 1;
          const fcsFlag = descriptor >> 6;
          const fcs = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
          const rest = (singleSegment ? 0 : 1) + [0, 1, 2, 4][descriptor & 3]! + fcs;
          this.checksum = (descriptor & 0x04) !== 0;
          yield { frame: this.frame, bytes: field };
          if (rest > 0) {
            // The rest of the header: passed on as content.
            [this.state, this.remaining] = ["content", rest];
            this.lastBlock = false;
            this.afterHeader = true;
            return;
          }
        }
        [this.state, this.need] = ["block", 3];
        return;
      }
      case "block": {
        const header = field[0]! | (field[1]! << 8) | (field[2]! << 16);
        this.lastBlock = (header & 1) === 1;
        const type = (header >> 1) & 3;
        if (type === 3) throw new LayerRefused("BAD_COMPRESSION", ARCHIVE, "zstd blob is corrupt: reserved block type");
        yield { frame: this.frame, bytes: field };
        [this.state, this.remaining] = ["content", type === 1 ? 1 : header >>> 3];
        if (this.remaining === 0) this.afterContent();
        return;
      }
      case "checksum":
        yield { frame: this.frame, bytes: field };
        [this.state, this.need] = ["magic", 4];
        return;
      case "skipSize":
        [this.state, this.remaining] = ["skip", field.readUInt32LE(0)];
        if (this.remaining === 0) [this.state, this.need] = ["magic", 4];
        return;
    }
  }

  private afterHeader = false;

  private afterContent(): void {
    if (this.state === "skip") {
      [this.state, this.need] = ["magic", 4];
    } else if (this.afterHeader) {
      this.afterHeader = false;
      [this.state, this.need] = ["block", 3];
    } else if (!this.lastBlock) {
      [this.state, this.need] = ["block", 3];
    } else if (this.checksum) {
      [this.state, this.need] = ["checksum", 4];
    } else {
      [this.state, this.need] = ["magic", 4];
    }
  }

  end(): void {
    if (this.state === "magic" && this.field.length === 0 && this.frame > 0) return;
    if (this.state === "magic" && this.frame > 0) throw new LayerRefused("TRAILING_GARBAGE", ARCHIVE, "data after the last zstd frame that is not another frame");
    throw new LayerRefused("BAD_COMPRESSION", ARCHIVE, "zstd blob is truncated: it ends inside a frame");
  }
}
