// Ranged GETs write their parts at their offsets in any order; the download's checks
// (check-thread.ts) read only the bytes before the first gap.
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
