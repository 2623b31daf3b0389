// GNU sparse members for the applier: the map of data regions, read from the formats GNU tar
// writes (old GNU type 'S' with extension blocks, PAX 0.0, 0.1 and 1.0; see GNU tar's manual,
// "Storing Sparse Files"), and checked before anything is written. The applier writes each region
// at its offset and sets the length with ftruncate, so holes stay holes.
// The rules are the validator's (agent/layers/sparse.ts), with its rule name BAD_SPARSE_MAP; the
// code is this guard's own. Regions: in order, not overlapping, inside the real size, at most
// MAX_REGIONS, sizes adding up to the stored bytes; numbers plain and below 2^53; one format per
// member; no unknown GNU.sparse.* record; NUL padding after a 1.0 map.
import { LayerRefused } from "./refusal.ts";

/** The validator's bound (agent/layers/sparse.ts MAX_SPARSE_REGIONS). */
export const MAX_REGIONS = 65_536;
const BLOCK = 512;

export type Region = { offset: number; size: number };

export type SparseMap = { realSize: number; regions: Region[] };

export const badMap = (entry: string, why: string) => new LayerRefused("BAD_SPARSE_MAP", entry, why);

/** Appends a region to `regions`, refusing one out of order, overlapping, too many or past the end. */
export function addRegion(map: SparseMap, offset: number | null, size: number | null, entry: string): void {
  if (offset === null || size === null) throw badMap(entry, "unreadable sparse region offset or size");
  if (map.regions.length === MAX_REGIONS) throw badMap(entry, `more than ${MAX_REGIONS} sparse regions`);
  const last = map.regions.at(-1);
  const previousEnd = last ? last.offset + last.size : 0;
  if (offset < previousEnd) throw badMap(entry, `sparse region at ${offset} overlaps or precedes the one ending at ${previousEnd}`);
  if (offset > map.realSize || size > map.realSize - offset) throw badMap(entry, `sparse region ${offset}+${size} is past the real size ${map.realSize}`);
  map.regions.push({ offset, size });
}

/** The stored data must be exactly the regions' bytes. */
export function checkStored(map: SparseMap, stored: number, entry: string): void {
  let sum = 0;
  for (const region of map.regions) sum += region.size;
  if (sum !== stored) throw badMap(entry, `the sparse map describes ${sum} bytes but ${stored} are stored`);
}

/** A decimal number of a PAX sparse record or 1.0 map: 1-16 digits, below 2^53. */
export function decimal(text: string, entry: string): number {
  const value = /^[0-9]{1,16}$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(value)) throw badMap(entry, `sparse number ${JSON.stringify(text.slice(0, 40))} is not a decimal below 2^53`);
  return value;
}

/**
 * An old GNU sparse number field: octal digits after optional spaces, then only NULs or spaces;
 * or base-256 (first byte 0x80). Null when it is neither, or not below 2^53.
 */
export function oldGnuNumber(block: Buffer, offset: number, length: number): number | null {
  if (block[offset] === 0x80) {
    let value = 0;
    for (let i = offset + 1; i < offset + length; i++) value = value * 256 + block[i]!;
    return Number.isSafeInteger(value) ? value : null;
  }
  const match = /^ *([0-7]+)[ \0]*$/.exec(block.toString("latin1", offset, offset + length));
  const value = match ? parseInt(match[1]!, 8) : NaN;
  return Number.isSafeInteger(value) ? value : null;
}

export type PaxSparseInfo =
  /** 0.0 or 0.1: the whole map is in the header. */
  | { name: string | null; map: SparseMap; mapInData: false }
  /** 1.0: the map is at the start of the data (MapReader). */
  | { name: string | null; map: SparseMap; mapInData: true };

/** A member's GNU.sparse.* records (prefix removed, in header order) as a sparse map; null if none. */
export function paxSparseInfo(records: [string, string][], headerName: string): PaxSparseInfo | null {
  if (records.length === 0) return null;
  let entry = headerName; // refusals name the member by its real name
  for (const [key, value] of records) if (key === "name") entry = value;
  const last: Record<string, string> = {};
  const repeated: [string, string][] = [];
  for (const [key, value] of records) {
    switch (key) {
      case "offset": case "numbytes": repeated.push([key, value]); break;
      case "major": case "minor": case "name": case "realsize": case "size": case "numblocks": case "map": last[key] = value; break;
      default: throw badMap(entry, `unknown sparse record GNU.sparse.${key}`);
    }
  }
  const name = last.name ?? null;
  if (last.major !== undefined || last.minor !== undefined) {
    if (last.major !== "1" || last.minor !== "0") throw badMap(entry, `unsupported sparse format ${last.major}.${last.minor}`);
    if (last.size !== undefined || last.numblocks !== undefined || last.map !== undefined || repeated.length > 0) throw badMap(entry, "sparse 1.0 mixed with 0.x records");
    if (last.realsize === undefined) throw badMap(entry, "sparse 1.0 without GNU.sparse.realsize");
    return { name, map: { realSize: decimal(last.realsize, entry), regions: [] }, mapInData: true };
  }
  if (last.realsize !== undefined) throw badMap(entry, "GNU.sparse.realsize outside sparse 1.0");
  if (last.size === undefined || last.numblocks === undefined) throw badMap(entry, "sparse 0.x without GNU.sparse.size and GNU.sparse.numblocks");
  const map: SparseMap = { realSize: decimal(last.size, entry), regions: [] };
  const count = decimal(last.numblocks, entry);
  if (count > MAX_REGIONS) throw badMap(entry, `more than ${MAX_REGIONS} sparse regions (${count})`);
  let numbers: string[];
  if (last.map !== undefined) {
    if (repeated.length > 0) throw badMap(entry, "sparse 0.1 map mixed with 0.0 offset/numbytes records");
    numbers = last.map === "" ? [] : last.map.split(",");
  } else {
    repeated.forEach(([key], i) => {
      if (key !== (i % 2 === 0 ? "offset" : "numbytes")) throw badMap(entry, "sparse 0.0 records out of order (offset, numbytes pairs)");
    });
    numbers = repeated.map(([, value]) => value);
  }
  if (numbers.length !== count * 2) throw badMap(entry, `GNU.sparse.numblocks is ${count} but the map has ${numbers.length} numbers`);
  for (let i = 0; i < numbers.length; i += 2) addRegion(map, decimal(numbers[i]!, entry), decimal(numbers[i + 1]!, entry), entry);
  return { name, map, mapInData: false };
}

/**
 * The 1.0 map at the start of the data: lines of decimal numbers (count, then offset and size per
 * region), padded with NULs to a 512-byte boundary; it may not run past `dataSize`.
 */
export class MapReader {
  /** Data bytes taken (map and padding). */
  taken = 0;
  complete = false;
  private line = "";
  private numbers: number[] = [];
  private expected = -1;
  private paddedEnd = -1;
  private readonly map: SparseMap;
  private readonly dataSize: number;
  private readonly entry: string;

  constructor(map: SparseMap, dataSize: number, entry: string) {
    this.map = map;
    this.dataSize = dataSize;
    this.entry = entry;
  }

  /** Takes map bytes from `chunk` starting at `at`; returns the index after the last byte taken. */
  take(chunk: Buffer, at: number): number {
    for (; at < chunk.length && !this.complete; at++) {
      if (this.taken === this.dataSize) throw badMap(this.entry, "the sparse map is longer than the member's data");
      const byte = chunk[at]!;
      this.taken++;
      if (this.paddedEnd >= 0) {
        if (byte !== 0) throw badMap(this.entry, "non-NUL bytes in the sparse map's padding");
        if (this.taken === this.paddedEnd) this.complete = true;
        continue;
      }
      if (byte !== 0x0a) {
        if (byte < 0x30 || byte > 0x39 || this.line.length > 16) throw badMap(this.entry, "a sparse map line that is not a decimal number");
        this.line += String.fromCharCode(byte);
        continue;
      }
      this.onNumber(decimal(this.line, this.entry));
      this.line = "";
    }
    return at;
  }

  private onNumber(value: number): void {
    if (this.expected === -1) {
      if (value > MAX_REGIONS) throw badMap(this.entry, `more than ${MAX_REGIONS} sparse regions (${value})`);
      this.expected = value;
    } else {
      this.numbers.push(value);
      if (this.numbers.length < 2) return;
      addRegion(this.map, this.numbers[0]!, this.numbers[1]!, this.entry);
      this.numbers = [];
    }
    if (this.map.regions.length === this.expected) {
      this.paddedEnd = Math.ceil(this.taken / BLOCK) * BLOCK;
      this.complete = this.taken === this.paddedEnd;
    }
  }
}
