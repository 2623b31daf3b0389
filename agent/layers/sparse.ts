// GNU sparse files, as GNU tar writes them (its manual, "Storing Sparse Files"): a file whose
// holes are not stored, described by a map of data regions (offset, size) and its real size.
//   old GNU:  type 'S'; the map in the header (4 entries) and in extension blocks after it
//             (21 entries each) while "isextended" is set; the real size in the header.
//   PAX 0.0:  GNU.sparse.size, GNU.sparse.numblocks, then GNU.sparse.offset/GNU.sparse.numbytes
//             repeated in order (the same keys many times in one header).
//   PAX 0.1:  GNU.sparse.size, GNU.sparse.numblocks, GNU.sparse.map="off,size,off,size...".
//   PAX 1.0:  GNU.sparse.major=1, GNU.sparse.minor=0, GNU.sparse.realsize, GNU.sparse.name; the map
//             is decimal text at the start of the member's data ("count\noff\nsize\n..."), padded
//             with NULs to a block boundary, and the data regions follow.
// GNU.sparse.name, when present, is the member's real name (0.1 and 1.0 put a GNUSparseFile.N/
// name in the header). The member's data is the regions' bytes, one after the other.
//
// Every map is held to one rule, BAD_SPARSE_MAP: regions in order and not overlapping (a region
// may start where the previous one ends), each inside the real size, at most MAX_SPARSE_REGIONS
// of them, sizes adding up to the bytes stored, numbers that are plain (decimal for PAX, octal or
// base-256 for old GNU) and below 2^53, no mixing of formats, no unknown GNU.sparse.* record,
// NUL padding after a 1.0 map. The applier (privhelper/apply/sparse.ts) implements the same rules
// on its own.
import { LayerValidationError, printable } from "./errors.ts";

/**
 * Most data regions in one sparse file. GNU tar writes one per run of data plus one empty region
 * at the end; real sparse files (lastlog, database and disk images) have a few to a few thousand.
 * The bound keeps a hostile map (one region per 4 KiB of a 4 GiB file is a million) from costing
 * the applier a system call each, or the readers memory.
 */
export const MAX_SPARSE_REGIONS = 65_536;

/** What a sparse member is, beyond its stored data. */
export interface SparseFile {
  /** The file's length, holes included. */
  realSize: number;
  /** Data regions in its map (empty ones included). */
  regions: number;
}

const refuse = (entry: string, message: string) => new LayerValidationError("BAD_SPARSE_MAP", printable(entry), message);

/** Checks a map one region at a time, in order (no region list is kept). */
export class RegionCheck {
  regions = 0;
  dataBytes = 0;
  #end = 0;
  readonly #realSize: number;
  readonly #entry: string;

  constructor(realSize: number, entry: string) {
    if (!Number.isSafeInteger(realSize) || realSize < 0) throw refuse(entry, `sparse real size ${realSize} is not a number below 2^53`);
    this.#realSize = realSize;
    this.#entry = entry;
  }

  add(offset: number, size: number): void {
    const entry = this.#entry;
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(size) || size < 0) throw refuse(entry, `sparse region ${this.regions + 1} has an unreadable offset or size`);
    if (++this.regions > MAX_SPARSE_REGIONS) throw refuse(entry, `sparse map has more than ${MAX_SPARSE_REGIONS} regions`);
    if (offset < this.#end) throw refuse(entry, `sparse region ${this.regions} at ${offset} starts before the previous one ends (${this.#end}): regions must be in order and not overlap`);
    if (offset > this.#realSize || size > this.#realSize - offset) {
      throw refuse(entry, `sparse region ${this.regions} (${offset}+${size}) ends beyond the file's real size ${this.#realSize}`);
    }
    this.#end = offset + size;
    this.dataBytes += size;
  }

  /** The map is complete; `stored` is the member's data after the map. */
  finish(stored: number): SparseFile {
    if (this.dataBytes !== stored) throw refuse(this.#entry, `sparse regions hold ${this.dataBytes} bytes, but the member stores ${stored}`);
    return { realSize: this.#realSize, regions: this.regions };
  }
}

/** A decimal number of a PAX sparse record or 1.0 map (at most 16 digits, below 2^53). */
export function sparseDecimal(text: string, what: string, entry: string): number {
  const value = /^[0-9]{1,16}$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(value)) throw refuse(entry, `sparse ${what} "${printable(text.slice(0, 40))}" is not a decimal number below 2^53`);
  return value;
}

/**
 * A number field of an old GNU sparse header: octal digits after optional spaces and before only
 * NULs or spaces, or base-256 (first byte 0x80, big-endian). NaN for anything else (RegionCheck
 * refuses it).
 */
export function oldGnuField(block: Buffer, offset: number, length: number): number {
  if (block[offset] === 0x80) {
    let value = 0;
    for (let i = 1; i < length; i++) value = value * 256 + block[offset + i]!;
    return value;
  }
  const text = block.toString("latin1", offset, offset + length);
  return /^ *[0-7]+[ \0]*$/.test(text) ? parseInt(text.trim().replace(/\0+$/, ""), 8) : NaN;
}

const SINGLE_KEYS = new Set(["major", "minor", "name", "realsize", "size", "numblocks", "map"]);

/** The PAX sparse formats, told from a member's GNU.sparse.* records (in header order). */
export type PaxSparse =
  | { version: "1.0"; name: string | null; realSize: number }
  | { version: "0.x"; name: string | null; check: RegionCheck };

/**
 * Reads a member's GNU.sparse.* records (key without the prefix, value, in order); null when it
 * has none. For 0.0 and 0.1 the map is checked here; for 1.0 it is in the data (MapText).
 */
export function paxSparse(records: ReadonlyArray<readonly [string, string]>, headerName: string): PaxSparse | null {
  if (records.length === 0) return null;
  // Refusals name the member by its real name, as the rest of the rules will.
  const entry = records.findLast(([key]) => key === "name")?.[1] ?? headerName;
  const single = new Map<string, string>();
  const pairs: Array<readonly [string, string]> = [];
  for (const [key, value] of records) {
    if (key === "offset" || key === "numbytes") pairs.push([key, value]);
    else if (SINGLE_KEYS.has(key)) single.set(key, value);
    else throw refuse(entry, `unknown sparse record GNU.sparse.${printable(key)}`);
  }
  const name = single.get("name") ?? null;
  if (single.has("major") || single.has("minor")) {
    if (single.get("major") !== "1" || single.get("minor") !== "0") {
      throw refuse(entry, `sparse format version ${printable(String(single.get("major")))}.${printable(String(single.get("minor")))} is not supported (only 0.0, 0.1 and 1.0)`);
    }
    const mixed = [...["size", "numblocks", "map"].filter((k) => single.has(k)), ...(pairs.length > 0 ? [pairs[0]![0]] : [])];
    if (mixed.length > 0) throw refuse(entry, `a sparse 1.0 member also carries 0.x records (GNU.sparse.${mixed[0]})`);
    if (!single.has("realsize")) throw refuse(entry, "a sparse 1.0 member has no GNU.sparse.realsize");
    return { version: "1.0", name, realSize: sparseDecimal(single.get("realsize")!, "real size", entry) };
  }
  if (single.has("realsize")) throw refuse(entry, "GNU.sparse.realsize without GNU.sparse.major/minor 1.0");
  if (!single.has("size") || !single.has("numblocks")) throw refuse(entry, "a sparse 0.x member needs GNU.sparse.size and GNU.sparse.numblocks");
  const check = new RegionCheck(sparseDecimal(single.get("size")!, "real size", entry), entry);
  const count = sparseDecimal(single.get("numblocks")!, "region count", entry);
  if (count > MAX_SPARSE_REGIONS) throw refuse(entry, `sparse map has more than ${MAX_SPARSE_REGIONS} regions (${count})`);
  let numbers: string[];
  if (single.has("map")) {
    if (pairs.length > 0) throw refuse(entry, "a sparse member carries both GNU.sparse.map (0.1) and GNU.sparse.offset/numbytes (0.0)");
    const map = single.get("map")!;
    numbers = map === "" ? [] : map.split(",");
  } else {
    numbers = [];
    for (let i = 0; i < pairs.length; i++) {
      const expected = i % 2 === 0 ? "offset" : "numbytes";
      if (pairs[i]![0] !== expected) throw refuse(entry, `sparse 0.0 record ${i + 1} is GNU.sparse.${pairs[i]![0]}, expected GNU.sparse.${expected}`);
      numbers.push(pairs[i]![1]);
    }
  }
  if (numbers.length !== 2 * count) throw refuse(entry, `sparse map has ${numbers.length} numbers; GNU.sparse.numblocks=${count} needs ${2 * count}`);
  for (let i = 0; i < numbers.length; i += 2) check.add(sparseDecimal(numbers[i]!, "offset", entry), sparseDecimal(numbers[i + 1]!, "size", entry));
  return { version: "0.x", name, check };
}

/**
 * The 1.0 map at the start of a member's data, parsed as it streams: "count\n", then "offset\n
 * size\n" per region, then NULs up to the next 512-byte boundary. `limit` is the member's data
 * size: the map may not run past it.
 */
export class MapText {
  /** Bytes of the member's data consumed (map and padding). */
  consumed = 0;
  readonly check: RegionCheck;
  readonly #limit: number;
  readonly #entry: string;
  #digits = "";
  #count = -1;
  #offset = -1;
  #padTo = -1;

  constructor(realSize: number, limit: number, entry: string) {
    this.check = new RegionCheck(realSize, entry);
    this.#limit = limit;
    this.#entry = entry;
  }

  get done(): boolean {
    return this.consumed === this.#padTo;
  }

  /** Reads map bytes from chunk[at, end); returns where the map (and its padding) ended, or end. */
  feed(chunk: Uint8Array, at: number, end: number): number {
    while (at < end && !this.done) {
      if (this.consumed === this.#limit) throw refuse(this.#entry, `the sparse map runs past the member's ${this.#limit} bytes of data`);
      const byte = chunk[at++]!;
      this.consumed++;
      if (this.#padTo !== -1) {
        if (byte !== 0) throw refuse(this.#entry, "the sparse map's padding is not NUL bytes");
      } else if (byte === 0x0a) {
        this.#number(sparseDecimal(this.#digits, "map number", this.#entry));
        this.#digits = "";
      } else if (this.#digits.length > 16 || byte < 0x30 || byte > 0x39) {
        throw refuse(this.#entry, `the sparse map has a bad number at byte ${this.consumed - 1} of the member's data`);
      } else {
        this.#digits += String.fromCharCode(byte);
      }
    }
    return at;
  }

  #number(value: number): void {
    if (this.#count === -1) {
      if (value > MAX_SPARSE_REGIONS) throw refuse(this.#entry, `sparse map has more than ${MAX_SPARSE_REGIONS} regions (${value})`);
      this.#count = value;
    } else if (this.#offset === -1) {
      this.#offset = value;
      return;
    } else {
      this.check.add(this.#offset, value);
      this.#offset = -1;
    }
    if (this.check.regions === this.#count) this.#padTo = Math.ceil(this.consumed / 512) * 512;
  }
}
