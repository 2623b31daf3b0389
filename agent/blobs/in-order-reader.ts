// Reads a download's temp file IN ORDER while it is being written, so the layer can be checked
// as it arrives rather than after the last byte: ranged GETs write their parts at their offsets in
// any order, and this reader hands out only the contiguous prefix written so far (WrittenPrefix),
// waiting for it to grow. The download says how far the prefix reaches (`grew`); the reader ends
// when the whole object is there (`finish`) or fails with the download's error (`fail`).
import type { FileHandle } from "node:fs/promises";

const PIECE = 1024 * 1024;

/** How far the contiguous written prefix of a download reaches, from each part's progress. */
export class WrittenPrefix {
  readonly #parts: Array<{ start: number; end: number; written: number }>;
  #reach = 0;

  /** `parts`: the byte ranges the download writes (each from its start on), in offset order. */
  constructor(parts: ReadonlyArray<{ start: number; end: number }>) {
    this.#parts = parts.map((p) => ({ ...p, written: 0 }));
  }

  /** Part `index` has `n` more bytes on disk; returns the prefix's reach now. */
  wrote(index: number, n: number): number {
    this.#parts[index]!.written += n;
    let reach = 0;
    for (const p of this.#parts) {
      reach = p.start + p.written;
      if (p.start + p.written < p.end) break;
    }
    this.#reach = Math.max(this.#reach, reach);
    return this.#reach;
  }
}

export class InOrderReader {
  readonly #file: FileHandle;
  readonly #size: number;
  #available = 0;
  #failure: { error: unknown } | null = null;
  #wake: (() => void) | null = null;

  constructor(file: FileHandle, size: number) {
    this.#file = file;
    this.#size = size;
  }

  /** Bytes [0, available) are on disk. */
  grew(available: number): void {
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
      position += bytesRead;
      yield buffer.subarray(0, bytesRead);
    }
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }
}
