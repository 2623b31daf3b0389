// Splits a zstd object into its frames (RFC 8878), so that every write to the decoder ends at a
// frame's end: Node's zstd decoder goes on into a second frame only when the first one ends
// exactly at a chunk boundary, so without this split the result would depend on read sizes.
// No package exposes frame boundaries of a stream; the format needed here is small: a frame
// header whose length its descriptor byte tells, blocks with a 3-byte header (bit 0 last block,
// bits 1-2 type, bits 3-23 size; an RLE block carries 1 byte), an optional 4-byte checksum;
// skippable frames are a magic 0x184D2A50..5F and a 4-byte little-endian length.
import { LayerValidationError, WHOLE_ARCHIVE } from "./errors.ts";

export interface ZstdFrame {
  /** A skippable frame (user data, ignored by decoders). */
  skippable: boolean;
  /** The frame's raw bytes, as they arrive; must be consumed before the next frame is asked for. */
  bytes: AsyncGenerator<Buffer>;
}

const EMPTY: Buffer = Buffer.alloc(0);
/** Every frame costs a decoder write (~50-200 us): a hostile object of millions of empty frames
 *  stops here. zstd:chunked layers have a frame per file chunk; 1,000,000 is far above those. */
export const MAX_ZSTD_FRAMES = 1_000_000;

export class ZstdFrames {
  readonly #input: AsyncIterator<Buffer>;
  #buffered: Buffer = EMPTY;
  #ended = false;
  /** Raw bytes handed out so far (the offset of #buffered[0]). */
  #offset = 0;
  #frames = 0;

  constructor(input: AsyncIterable<Buffer>) {
    this.#input = input[Symbol.asyncIterator]();
  }

  /** The next frame, or null when the object ends exactly after a frame. */
  async next(): Promise<ZstdFrame | null> {
    if (this.#buffered.length === 0 && !(await this.#read())) return null;
    const at = this.#offset;
    if (++this.#frames > MAX_ZSTD_FRAMES) {
      throw new LayerValidationError("DECOMPRESSION_LIMIT", WHOLE_ARCHIVE, `more than ${MAX_ZSTD_FRAMES} zstd frames (at byte ${at})`);
    }
    const magic = await this.#peek(4, () => garbage(at));
    const value = magic.readUInt32LE(0);
    if (value === 0xfd2fb528) return { skippable: false, bytes: this.#frame() };
    if (value >>> 4 === 0x184d2a5) return { skippable: true, bytes: this.#skippable() };
    throw garbage(at);
  }

  async *#frame(): AsyncGenerator<Buffer> {
    const descriptor = (await this.#peek(5, truncated))[4]!;
    const singleSegment = (descriptor & 0x20) !== 0;
    const contentSizeBytes = [singleSegment ? 1 : 0, 2, 4, 8][descriptor >> 6]!;
    const dictionaryIdBytes = [0, 1, 2, 4][descriptor & 3]!;
    const hasChecksum = (descriptor & 0x04) !== 0;
    yield* this.#take(5 + (singleSegment ? 0 : 1) + dictionaryIdBytes + contentSizeBytes);
    for (let last = false; !last; ) {
      const header = await this.#peek(3, truncated);
      const value = header[0]! | (header[1]! << 8) | (header[2]! << 16);
      last = (value & 1) === 1;
      const type = (value >> 1) & 3;
      if (type === 3) throw new LayerValidationError("BAD_COMPRESSION", WHOLE_ARCHIVE, `zstd stream is corrupt or truncated: reserved block type at byte ${this.#offset}`);
      yield* this.#take(3 + (type === 1 ? 1 : value >>> 3));
    }
    if (hasChecksum) yield* this.#take(4);
  }

  async *#skippable(): AsyncGenerator<Buffer> {
    const length = (await this.#peek(8, truncated)).readUInt32LE(4);
    yield* this.#take(8 + length);
  }

  /** Yields exactly `n` bytes as they arrive. */
  async *#take(n: number): AsyncGenerator<Buffer> {
    while (n > 0) {
      if (this.#buffered.length === 0 && !(await this.#read())) throw truncated();
      const piece = this.#buffered.subarray(0, Math.min(n, this.#buffered.length));
      this.#buffered = this.#buffered.subarray(piece.length);
      this.#offset += piece.length;
      n -= piece.length;
      yield piece;
    }
  }

  /** The next `n` bytes without consuming them; `short()` is thrown when the object ends first. */
  async #peek(n: number, short: () => LayerValidationError): Promise<Buffer> {
    while (this.#buffered.length < n) {
      if (!(await this.#read())) throw short();
    }
    return this.#buffered.subarray(0, n);
  }

  async #read(): Promise<boolean> {
    if (this.#ended) return false;
    const next = await this.#input.next();
    if (next.done) {
      this.#ended = true;
      return false;
    }
    this.#buffered = this.#buffered.length === 0 ? next.value : Buffer.concat([this.#buffered, next.value]);
    return true;
  }
}

function truncated(): LayerValidationError {
  return new LayerValidationError("BAD_COMPRESSION", WHOLE_ARCHIVE, "zstd stream is corrupt or truncated: the object ends inside a frame");
}

function garbage(at: number): LayerValidationError {
  return new LayerValidationError("TRAILING_GARBAGE", WHOLE_ARCHIVE, `data at byte ${at} after the last zstd frame is not another frame`);
}
