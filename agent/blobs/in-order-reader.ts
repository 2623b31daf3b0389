// Reads a download's temp file IN ORDER while it is being written, so the layer can be checked
// (and hashed) as it arrives rather than after the last byte: ranged GETs write their parts at
// their offsets in any order, and this reader hands out only the contiguous prefix written so
// far, waiting for it to grow. The download reports progress per part (`wrote`); the reader
// ends when the whole object is there (`finish`) or fails with the download's error (`fail`).
import { createHash, type Hash } from "node:crypto";
import type { FileHandle } from "node:fs/promises";

const PIECE = 1024 * 1024;

export class InOrderReader {
  readonly #file: FileHandle;
  readonly #size: number;
  readonly #parts: Array<{ start: number; end: number; written: number }>;
  #available = 0;
  #failure: { error: unknown } | null = null;
  #wake: (() => void) | null = null;
  readonly #sha256: Hash = createHash("sha256");
  readonly #md5: Hash | undefined;
  #hashed = 0;

  /** `parts`: the byte ranges the download writes (each from its start on), in offset order. */
  constructor(file: FileHandle, size: number, parts: ReadonlyArray<{ start: number; end: number }>, withMd5: boolean) {
    this.#file = file;
    this.#size = size;
    this.#parts = parts.map((p) => ({ ...p, written: 0 }));
    this.#md5 = withMd5 ? createHash("md5") : undefined;
  }

  /** Part `index` has `n` more bytes on disk. */
  wrote(index: number, n: number): void {
    this.#parts[index]!.written += n;
    let available = 0;
    for (const p of this.#parts) {
      available = p.start + p.written;
      if (p.start + p.written < p.end) break;
    }
    if (available > this.#available) {
      this.#available = available;
      this.#notify();
    }
  }

  /** Every byte is on disk. */
  finish(): void {
    this.#available = this.#size;
    this.#notify();
  }

  /** The download failed: the reader throws `error` at its next wait. */
  fail(error: unknown): void {
    this.#failure ??= { error };
    this.#notify();
  }

  /** The object's bytes, in order, as they become available. */
  async *bytes(): AsyncGenerator<Buffer> {
    for (let position = 0; position < this.#size; ) {
      while (position >= this.#available) {
        if (this.#failure) throw this.#failure.error;
        await new Promise<void>((resolve) => (this.#wake = resolve));
      }
      if (this.#failure) throw this.#failure.error;
      const buffer = Buffer.allocUnsafe(Math.min(PIECE, this.#available - position));
      const { bytesRead } = await this.#file.read(buffer, 0, buffer.length, position);
      if (bytesRead === 0) throw new Error(`download temp file is shorter than the ${this.#available} bytes written (at ${position})`);
      const piece = buffer.subarray(0, bytesRead);
      this.#sha256.update(piece);
      this.#md5?.update(piece);
      this.#hashed += bytesRead;
      position += bytesRead;
      yield piece;
    }
  }

  /** The digests of the whole object, when the consumer read it all; else undefined. */
  digests(): { sha256Hex: string; md5Hex?: string } | undefined {
    if (this.#hashed !== this.#size) return undefined;
    return { sha256Hex: this.#sha256.digest("hex"), ...(this.#md5 ? { md5Hex: this.#md5.digest("hex") } : {}) };
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }
}
