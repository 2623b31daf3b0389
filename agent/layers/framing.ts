// Block-level checks on the raw bytes of a layer that tar-stream does not make: where the archive
// ends and what may follow.
//
// tar-stream skips every all-zero block it meets at a header position and keeps parsing, so it
// would accept a lone zero block followed by more members, or a second archive appended after the
// end-of-archive marker. GNU tar stops at the first zero block and Go's archive/tar refuses a zero
// block followed by data: such a layer would mean different things to different tools. So here:
//   - the archive ends at the first all-zero block at a header position; it must be followed by a
//     second zero block (the POSIX end-of-archive marker), then only zero bytes (record padding);
//   - the object length must be a multiple of 512;
//   - no all-zero block may sit among the metadata headers (PAX, GNU long name) before a member.
// Header positions come from tar-stream itself: each member's data ends at a header position.
// Only the bytes from the end of the last member on are kept, so memory stays bounded.
import { LayerValidationError, WHOLE_ARCHIVE } from "./errors.ts";

const BLOCK = 512;
const MARKER = 2 * BLOCK;

export function roundUpToBlock(n: number): number {
  return Math.ceil(n / BLOCK) * BLOCK;
}

function isZero(buf: Uint8Array): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

function firstNonZero(buf: Uint8Array): number {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return i;
  return -1;
}

export class ArchiveFraming {
  /** Bytes seen so far (absolute offset of the next byte). */
  total = 0;
  /** Absolute offset where the end-of-archive marker starts, once both zero blocks were seen. */
  endMarkerAt: number | null = null;

  readonly #maxRetained: number;
  readonly #maxHeaderBytes: number;
  /** The header position after the last member tar-stream reported (0 before the first). */
  #nextHeader = 0;
  /** Raw bytes from #retainedFrom on: everything from #nextHeader to what has been seen. */
  #retained: Buffer[] = [];
  #retainedFrom = 0;
  #retainedBytes = 0;
  /** The object's first bytes, to name compressed layers in errors. */
  head = Buffer.alloc(0);

  constructor(maxHeaderBytes: number) {
    this.#maxHeaderBytes = maxHeaderBytes;
    // Between two members tar-stream reports, only metadata headers (bounded below) plus what is
    // in flight between the reader and tar-stream (a few 64 KiB slices) can accumulate.
    this.#maxRetained = maxHeaderBytes + 4 * 1024 * 1024;
  }

  /** Called with every raw chunk, in order, BEFORE tar-stream sees it. */
  observe(chunk: Buffer): void {
    const offset = this.total;
    this.total += chunk.length;
    if (this.head.length < 8) this.head = Buffer.concat([this.head, chunk.subarray(0, 8 - this.head.length)]);

    if (this.endMarkerAt !== null) {
      const bad = firstNonZero(chunk);
      if (bad !== -1) throw this.#garbage(offset + bad);
      return;
    }
    this.#retain(chunk, offset);
    this.#checkForEnd();
    if (this.#retainedBytes > this.#maxRetained) {
      throw new LayerValidationError(
        "HEADER_TOO_LARGE",
        WHOLE_ARCHIVE,
        `more than ${this.#maxRetained} bytes of headers without a member, starting at byte ${this.#retainedFrom}`,
      );
    }
  }

  /**
   * Called when tar-stream reports a member whose main header starts at `headerOffset` and whose
   * data (if any) ends, padded, at `dataEnd`. Checks the metadata headers before it.
   */
  member(headerOffset: number, dataEnd: number): void {
    if (this.endMarkerAt !== null) throw this.#garbage(this.endMarkerAt);
    const preamble = headerOffset - this.#nextHeader;
    if (preamble > this.#maxHeaderBytes) {
      throw new LayerValidationError(
        "HEADER_TOO_LARGE",
        WHOLE_ARCHIVE,
        `${preamble} bytes of metadata headers before the member at byte ${headerOffset} (limit ${this.#maxHeaderBytes})`,
      );
    }
    for (let at = this.#nextHeader; at < headerOffset; at += BLOCK) {
      const block = this.#read(at, BLOCK);
      if (block !== null && isZero(block)) throw this.#garbage(at);
    }
    this.#nextHeader = dataEnd;
    this.#dropBefore(dataEnd);
    this.#checkForEnd();
  }

  /** Called once the input is exhausted and tar-stream has reported every member. */
  finish(): void {
    if (this.total === 0) {
      throw new LayerValidationError(
        "NOT_A_TAR",
        WHOLE_ARCHIVE,
        "empty object (0 bytes): a layer with no entries is still a tar of two zero blocks",
      );
    }
    if (this.endMarkerAt !== null) {
      if (this.total % BLOCK !== 0) {
        throw new LayerValidationError(
          "TRAILING_GARBAGE",
          WHOLE_ARCHIVE,
          `object length ${this.total} is not a multiple of ${BLOCK} bytes`,
        );
      }
      return;
    }
    const rest = this.total - this.#nextHeader;
    const first = rest >= BLOCK ? this.#read(this.#nextHeader, BLOCK) : null;
    let why: string;
    if (rest <= 0) why = "the archive ends without an end-of-archive marker";
    else if (first !== null && isZero(first)) why = "the end-of-archive marker has one zero block, not two";
    else why = "the archive ends inside a header, or after a metadata header that no member follows";
    throw new LayerValidationError("TRUNCATED", WHOLE_ARCHIVE, `${why} (at byte ${this.#nextHeader} of ${this.total})`);
  }

  /** Where parsing is: the header position after the last member reported. */
  get nextHeader(): number {
    return this.#nextHeader;
  }

  #checkForEnd(): void {
    if (this.endMarkerAt !== null) return;
    const first = this.#read(this.#nextHeader, BLOCK);
    if (first === null || !isZero(first)) return;
    const second = this.#read(this.#nextHeader + BLOCK, BLOCK);
    if (second === null) return;
    if (!isZero(second)) {
      throw new LayerValidationError(
        "TRAILING_GARBAGE",
        WHOLE_ARCHIVE,
        `a lone zero block at byte ${this.#nextHeader} is followed by data (an archive ends with two zero blocks and nothing after them)`,
      );
    }
    this.endMarkerAt = this.#nextHeader;
    const after = this.#read(this.#nextHeader + MARKER, this.#retainedEnd() - (this.#nextHeader + MARKER));
    const bad = after === null ? -1 : firstNonZero(after);
    if (bad !== -1) throw this.#garbage(this.#nextHeader + MARKER + bad);
    this.#retained = [];
    this.#retainedBytes = 0;
  }

  #garbage(at: number): LayerValidationError {
    const marker = this.endMarkerAt ?? this.#nextHeader;
    return new LayerValidationError(
      "TRAILING_GARBAGE",
      WHOLE_ARCHIVE,
      `data at byte ${at} after the end of the archive (zero block at byte ${marker})`,
    );
  }

  #retainedEnd(): number {
    return this.#retainedFrom + this.#retainedBytes;
  }

  #retain(chunk: Buffer, offset: number): void {
    if (this.#retainedBytes === 0) this.#retainedFrom = Math.max(offset, this.#nextHeader);
    const skip = Math.max(0, this.#retainedFrom + this.#retainedBytes - offset);
    if (skip >= chunk.length) return;
    const kept = chunk.subarray(skip);
    this.#retained.push(kept);
    this.#retainedBytes += kept.length;
  }

  #dropBefore(position: number): void {
    while (this.#retained.length > 0 && this.#retainedFrom < position) {
      const first = this.#retained[0]!;
      const cut = position - this.#retainedFrom;
      if (cut >= first.length) {
        this.#retained.shift();
        this.#retainedFrom += first.length;
        this.#retainedBytes -= first.length;
      } else {
        this.#retained[0] = first.subarray(cut);
        this.#retainedFrom += cut;
        this.#retainedBytes -= cut;
      }
    }
    if (this.#retained.length === 0) this.#retainedFrom = Math.max(this.#retainedFrom, position);
  }

  /** `length` raw bytes at absolute `position`, or null when not all of them were seen (yet). */
  #read(position: number, length: number): Buffer | null {
    if (length <= 0) return Buffer.alloc(0);
    if (position < this.#retainedFrom || position + length > this.#retainedEnd()) return null;
    const parts: Buffer[] = [];
    let at = this.#retainedFrom;
    let need = length;
    for (const part of this.#retained) {
      const end = at + part.length;
      if (end > position && need > 0) {
        const from = Math.max(0, position - at);
        const slice = part.subarray(from, Math.min(part.length, from + need));
        parts.push(slice);
        need -= slice.length;
        position += slice.length;
      }
      at = end;
      if (need === 0) break;
    }
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
  }
}
