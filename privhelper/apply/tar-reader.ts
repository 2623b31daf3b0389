// A push-based, synchronous tar reader: feed it chunks of any size (push), then end(). It calls
// the sink for each member (entry), with the member's content as subarrays of the pushed chunks
// (data: no copies, valid only during the call), then entryEnd.
//
// Written by hand because tar-stream, the only well-kept reader, decodes PAX values as UTF-8 (a
// binary security.capability loses bytes) and is asynchronous per entry (a promise and several
// callbacks for each of a root filesystem's 30,000 members); the format itself is small.
// Reads ustar, GNU ('L'/'K' long names, base-256 numbers) and PAX ('x' and 'g') headers, and GNU
// sparse members (sparse.ts): their map is read and checked before the member is passed on (for
// PAX 1.0 it is at the start of the data), and their content goes to the sink with the file offset
// of each data region.
// Structural refusals use the validator's rule names (agent/layers/README.md), and its PAX rules:
// one 'x' header per member, no empty path or linkpath, numbers below 2^53, global headers with
// comments only.
import { LayerRefused } from "./refusal.ts";
import { addRegion, badMap, checkStored, MapReader, oldGnuNumber, paxSparseInfo, type SparseMap } from "./sparse.ts";

export type EntryType = "file" | "hardlink" | "symlink" | "char" | "block" | "directory" | "fifo";

export type TarEntry = {
  /** The member's name as written (PAX path, GNU long name, or ustar prefix/name). */
  name: string;
  type: EntryType;
  size: number;
  mode: number;
  uid: number;
  gid: number;
  /** Seconds and nanoseconds (PAX keeps fractions; ustar is whole seconds). */
  mtime: { sec: number; nsec: number };
  atime: { sec: number; nsec: number } | null;
  linkname: string;
  devmajor: number;
  devminor: number;
  /** SCHILY.xattr.* records: name -> raw value bytes. */
  xattrs: Map<string, Buffer>;
  /** A GNU sparse file: its length, holes included (`size` is then the bytes of its data regions). */
  sparse: { realSize: number } | null;
};

export interface TarSink {
  entry(entry: TarEntry): void;
  /** Content in order; `position` (a sparse file's data) is where in the file it belongs. */
  data(chunk: Buffer, position?: number): void;
  entryEnd(): void;
}

export const ARCHIVE = "(archive)";
const BLOCK = 512;
/** PAX and GNU long-name data before one member (the validator's maxHeaderBytes). */
const MAX_META_BYTES = 1024 * 1024;

/** Type flags a PAX sparse member may carry: a regular file. */
const REGULAR_FILE_FLAGS = ["0", "\0", "7"];
const SPARSE_PREFIX = "GNU.sparse.";
/** Global PAX keys that change nothing about the members. */
const HARMLESS_GLOBAL_KEYS = new Set(["comment", "charset"]);

type State = "header" | "meta" | "body" | "padding" | "end" | "sparse-extension" | "sparse-map";

export class TarReader {
  private readonly sink: TarSink;
  private state: State = "header";
  /** A header block being assembled across chunks. */
  private readonly header = Buffer.alloc(BLOCK);
  private headerFill = 0;
  /** Bytes left in the current member's content (body/meta) and in its padding. */
  private remaining = 0;
  private padding = 0;
  private metaType = "";
  private meta: Buffer[] = [];
  private metaBytes = 0;
  private pendingMeta = 0;
  private longName: string | null = null;
  private longLink: string | null = null;
  /** The next member's PAX extended header ('x'), as read: parsed at the member, which it names. */
  private paxData: Buffer | null = null;
  /** A sparse member whose map is still being read (extension blocks, or a 1.0 map in the data). */
  private pending: { entry: TarEntry; map: SparseMap; reader: MapReader | null } | null = null;
  /** The sparse member being written: its regions, the one being filled, and how far. */
  private regions: SparseMap["regions"] | null = null;
  private region = 0;
  private regionFill = 0;
  private current = "";
  /** Zero bytes after the first zero block. */
  private zeroBytes = 0;
  entries = 0;

  constructor(sink: TarSink) {
    this.sink = sink;
  }

  push(chunk: Buffer): void {
    let at = 0;
    while (at < chunk.length) {
      switch (this.state) {
        case "header":
        case "sparse-extension": {
          const onBlock = this.state === "header" ? (block: Buffer) => this.onHeader(block) : (block: Buffer) => this.onSparseExtension(block);
          if (this.headerFill === 0 && chunk.length - at >= BLOCK) {
            onBlock(chunk.subarray(at, at + BLOCK));
            at += BLOCK;
          } else {
            const take = Math.min(BLOCK - this.headerFill, chunk.length - at);
            chunk.copy(this.header, this.headerFill, at, at + take);
            this.headerFill += take;
            at += take;
            if (this.headerFill === BLOCK) {
              this.headerFill = 0;
              onBlock(this.header);
            }
          }
          break;
        }
        case "sparse-map": {
          const pending = this.pending!;
          at = pending.reader!.take(chunk, at);
          if (pending.reader!.complete) {
            // The map's blocks are not the file's: what remains of the data is.
            const stored = pending.entry.size - pending.reader!.taken;
            checkStored(pending.map, stored, pending.entry.name);
            this.pending = null;
            this.emit({ ...pending.entry, size: stored }, pending.map, pad(pending.entry.size));
          }
          break;
        }
        case "body": {
          let take = Math.min(this.remaining, chunk.length - at);
          if (this.regions) {
            // The regions' sizes add up to the stored bytes: while bytes remain, a region has room.
            while (this.regionFill === this.regions[this.region]!.size) {
              this.region++;
              this.regionFill = 0;
            }
            const region = this.regions[this.region]!;
            take = Math.min(take, region.size - this.regionFill);
            this.sink.data(chunk.subarray(at, at + take), region.offset + this.regionFill);
            this.regionFill += take;
          } else {
            this.sink.data(chunk.subarray(at, at + take));
          }
          at += take;
          this.remaining -= take;
          if (this.remaining === 0) this.endBody();
          break;
        }
        case "meta": {
          const take = Math.min(this.remaining, chunk.length - at);
          this.meta.push(Buffer.from(chunk.subarray(at, at + take)));
          at += take;
          this.remaining -= take;
          if (this.remaining === 0) this.endMeta();
          break;
        }
        case "padding": {
          const take = Math.min(this.padding, chunk.length - at);
          at += take;
          this.padding -= take;
          if (this.padding === 0) this.state = "header";
          break;
        }
        case "end": {
          // After the first zero block only zeros may follow (a second archive, appended, is
          // what other readers would go on to read).
          const rest = chunk.subarray(at);
          const nonzero = rest.findIndex((byte) => byte !== 0);
          if (nonzero !== -1) throw new LayerRefused("TRAILING_GARBAGE", ARCHIVE, "data after the end-of-archive marker");
          this.zeroBytes += rest.length;
          at = chunk.length;
          break;
        }
      }
    }
  }

  /** The input ended: the archive must have ended properly. */
  end(): void {
    if (this.state === "end") {
      // In the validator's order: a header no member follows, a second zero block missing (or
      // cut short), then whole blocks.
      if (this.pendingMeta > 0) throw new LayerRefused("TRUNCATED", ARCHIVE, "the archive ends after an extended header that no member follows");
      if (this.zeroBytes < BLOCK) throw new LayerRefused("TRUNCATED", ARCHIVE, "one zero block instead of the two that end an archive");
      if (this.zeroBytes % BLOCK !== 0) throw new LayerRefused("TRAILING_GARBAGE", ARCHIVE, "tar length is not a multiple of 512");
      return;
    }
    if (this.state === "header" && this.pendingMeta === 0 && this.entries === 0) {
      throw new LayerRefused("NOT_A_TAR", ARCHIVE, this.headerFill === 0 ? "empty blob: not a tar" : "shorter than one tar block: not a tar");
    }
    throw new LayerRefused("TRUNCATED", ARCHIVE, `the archive ends inside ${this.current ? JSON.stringify(this.current) : "a header"} without its end-of-archive marker`);
  }

  private onHeader(block: Buffer): void {
    if (isZero(block)) {
      // Also right after an extended header: then only zeros may follow (TRAILING_GARBAGE for a
      // member after the zero block), and end() says the header had no member (TRUNCATED).
      this.state = "end";
      return;
    }
    if (!checksumOk(block)) {
      throw new LayerRefused("NOT_A_TAR", ARCHIVE, this.entries === 0 ? "not a tar: bad header checksum" : `bad header checksum after ${JSON.stringify(this.current)}`);
    }
    const magic = block.toString("latin1", 257, 265);
    const ustar = magic === "ustar\u000000";
    if (!ustar && magic !== "ustar  \u0000") throw new LayerRefused("NOT_A_TAR", ARCHIVE, "header without ustar magic (v7 tar)");
    const typeflag = String.fromCharCode(block[156]!);
    const isMeta = typeflag === "x" || typeflag === "g" || typeflag === "L" || typeflag === "K";
    const headerSize = numeric(block, 124, 12, "size");
    if (headerSize === null) throw new LayerRefused("NOT_A_TAR", ARCHIVE, "header with an unreadable size field");

    if (isMeta) {
      const size = headerSize;
      this.pendingMeta += BLOCK + size;
      if (this.pendingMeta > MAX_META_BYTES) throw new LayerRefused("HEADER_TOO_LARGE", ARCHIVE, `more than ${MAX_META_BYTES} bytes of extended headers before one member`);
      // Readers disagree on a second one (GNU tar and Go keep the last, libarchive refuses it):
      // no writer emits two, so it is refused rather than read one way.
      if (typeflag === "x" && this.paxData !== null) throw new LayerRefused("BAD_PAX", ARCHIVE, "several PAX extended headers before one member");
      this.metaType = typeflag;
      this.meta = [];
      this.metaBytes = size;
      this.remaining = size;
      this.padding = pad(size);
      if (size === 0) this.endMeta();
      else this.state = "meta";
      return;
    }

    const headerName = this.longName ?? nameOf(block, ustar);
    const { pax, sparse: sparseRecords } = memberPax(this.paxData, headerName);
    for (const key of ["path", "linkpath"]) {
      // POSIX says an empty value deletes the field; Go keeps the ustar name instead: refused.
      if (pax.get(key)?.length === 0) throw new LayerRefused("BAD_PAX", headerName, `PAX ${key} record with an empty value`);
    }
    let name = pax.has("path") ? text(pax.get("path")!) : headerName;
    this.current = name;
    const linkname = pax.has("linkpath") ? text(pax.get("linkpath")!) : (this.longLink ?? cString(block, 157, 100));
    const paxSparse = paxSparseInfo(sparseRecords, name);
    if (paxSparse?.name != null) {
      if (paxSparse.name.includes("\uFFFD")) throw new LayerRefused("BAD_ENCODING", paxSparse.name, "a name or link target that is not UTF-8");
      name = paxSparse.name;
      this.current = name;
    }
    // Every PAX number is checked before any is used: BAD_PAX whatever the records' order.
    const size = pax.has("size") ? paxNumber(pax, "size", name) : headerSize;
    const paxIds = { uid: pax.has("uid") ? paxNumber(pax, "uid", name) : null, gid: pax.has("gid") ? paxNumber(pax, "gid", name) : null };
    const mtime = time(pax, "mtime", name);
    const atime = time(pax, "atime", name);
    time(pax, "ctime", name); // not applied (the kernel sets it), but a number all the same
    if (paxSparse && typeflag === "S") throw badMap(name, "an old GNU sparse member (type S) with GNU.sparse.* PAX records too");
    if (paxSparse && !REGULAR_FILE_FLAGS.includes(typeflag)) throw badMap(name, `GNU.sparse.* records on a member of type ${JSON.stringify(typeflag)}`);
    const type = entryType(typeflag, name);
    const field = (offset: number, length: number, what: string) => {
      const value = numeric(block, offset, length, what);
      if (value === null) throw new LayerRefused("BAD_PAX", name, `unreadable ${what} field`);
      return value;
    };
    const xattrs = new Map<string, Buffer>();
    for (const [key, value] of pax) {
      if (key.startsWith("SCHILY.xattr.")) xattrs.set(key.slice("SCHILY.xattr.".length), value);
    }
    const entry: TarEntry = {
      name,
      type,
      size,
      mode: field(100, 8, "mode") & 0o7777,
      // Range-checked with the member's other rules (BAD_OWNER, oci-apply.ts), in the validator's order.
      uid: paxIds.uid ?? numeric(block, 108, 8, "uid") ?? NaN,
      gid: paxIds.gid ?? numeric(block, 116, 8, "gid") ?? NaN,
      mtime: mtime ?? { sec: field(136, 12, "mtime"), nsec: 0 },
      atime,
      linkname,
      devmajor: type === "char" || type === "block" ? field(329, 8, "devmajor") : 0,
      devminor: type === "char" || type === "block" ? field(337, 8, "devminor") : 0,
      xattrs,
      sparse: null,
    };
    this.paxData = null;
    this.longName = null;
    this.longLink = null;
    this.pendingMeta = 0;
    if (typeflag === "S") {
      const map: SparseMap = { realSize: oldGnuNumber(block, 483, 12) ?? -1, regions: [] };
      if (map.realSize < 0) throw badMap(name, "unreadable old GNU sparse real size");
      if (this.oldGnuEntries(block, 386, 4, 482, map, name)) {
        this.pending = { entry, map, reader: null };
        this.state = "sparse-extension";
        return;
      }
      checkStored(map, size, name);
      return this.emit(entry, map, pad(size));
    }
    if (paxSparse?.mapInData) {
      this.pending = { entry, map: paxSparse.map, reader: new MapReader(paxSparse.map, size, name) };
      this.state = "sparse-map";
      return;
    }
    if (paxSparse) checkStored(paxSparse.map, size, name);
    this.emit(entry, paxSparse?.map ?? null, pad(size));
  }

  /** Passes a member on; its `size` bytes of content follow, then `padding`. */
  private emit(entry: TarEntry, map: SparseMap | null, padding: number): void {
    if (map) entry.sparse = { realSize: map.realSize };
    this.regions = map?.regions ?? null;
    this.region = 0;
    this.regionFill = 0;
    this.entries++;
    this.sink.entry(entry);
    this.remaining = entry.size;
    this.padding = padding;
    if (entry.size === 0) this.endBody();
    else this.state = "body";
  }

  /**
   * Old GNU sparse map entries (12-byte offset and size) at `from`, `count` of them, and the
   * "isextended" byte: an entry of zeros ends the map, and then the rest of the block must be
   * zeros too, with no extension announced. True when an extension block follows.
   */
  private oldGnuEntries(block: Buffer, from: number, count: number, extendedAt: number, map: SparseMap, entry: string): boolean {
    const extended = block[extendedAt];
    if (extended !== 0 && extended !== 1) throw badMap(entry, `old GNU sparse isextended byte ${extended}`);
    for (let i = 0; i < count; i++) {
      const at = from + 24 * i;
      if (isZeroRange(block, at, at + 24)) {
        if (!isZeroRange(block, at, from + 24 * count) || extended === 1) throw badMap(entry, "old GNU sparse entries after the map's end");
        return false;
      }
      addRegion(map, oldGnuNumber(block, at, 12), oldGnuNumber(block, at + 12, 12), entry);
    }
    return extended === 1;
  }

  private onSparseExtension(block: Buffer): void {
    const { entry, map } = this.pending!;
    if (this.oldGnuEntries(block, 0, 21, 504, map, entry.name)) return;
    this.pending = null;
    checkStored(map, entry.size, entry.name);
    this.emit(entry, map, pad(entry.size));
  }

  private endBody(): void {
    this.sink.entryEnd();
    this.state = this.padding > 0 ? "padding" : "header";
  }

  private endMeta(): void {
    const data = Buffer.concat(this.meta, this.metaBytes);
    this.meta = [];
    if (this.metaType === "L") this.longName = cString(data, 0, data.length);
    else if (this.metaType === "K") this.longLink = cString(data, 0, data.length);
    else if (this.metaType === "x") this.paxData = data;
    else {
      // A global header changes every later member, which no image needs (git archive writes a
      // comment): anything but a comment is refused, as by the validator.
      for (const [key] of parsePax(data, ARCHIVE)) {
        if (!HARMLESS_GLOBAL_KEYS.has(key)) throw new LayerRefused("BAD_PAX", ARCHIVE, `a global PAX header sets ${JSON.stringify(key)}: only comments are supported in global headers`);
      }
    }
    this.state = this.padding > 0 ? "padding" : "header";
  }
}

const pad = (size: number) => (BLOCK - (size % BLOCK)) % BLOCK;

const ZERO_BLOCK = Buffer.alloc(BLOCK);
const isZero = (block: Buffer) => block.equals(ZERO_BLOCK);
const isZeroRange = (block: Buffer, from: number, to: number) => block.subarray(from, to).every((byte) => byte === 0);

function checksumOk(block: Buffer): boolean {
  const stored = numeric(block, 148, 8, "checksum");
  let unsigned = 8 * 0x20; // the checksum field itself counts as spaces
  for (let i = 0; i < 148; i++) unsigned += block[i]!;
  for (let i = 156; i < BLOCK; i++) unsigned += block[i]!;
  if (stored === unsigned) return true;
  // Some old writers summed signed bytes.
  let signed = unsigned;
  for (let i = 0; i < BLOCK; i++) if (block[i]! >= 0x80 && (i < 148 || i >= 156)) signed -= 256;
  return stored === signed;
}

/** An octal field (NUL/space terminated) or GNU base-256 (high bit set); null when unreadable. */
function numeric(block: Buffer, offset: number, length: number, _what: string): number | null {
  const first = block[offset]!;
  if (first & 0x80) {
    if (first === 0xff) return null; // negative
    let value = first & 0x7f;
    for (let i = 1; i < length; i++) value = value * 256 + block[offset + i]!;
    return Number.isSafeInteger(value) ? value : null;
  }
  let value = 0;
  let i = offset;
  const end = offset + length;
  while (i < end && block[i] === 0x20) i++;
  for (; i < end; i++) {
    const c = block[i]!;
    if (c === 0 || c === 0x20) break;
    if (c < 0x30 || c > 0x37) return null;
    value = value * 8 + (c - 0x30);
  }
  return value;
}

function cString(block: Buffer, offset: number, length: number): string {
  const end = block.indexOf(0, offset);
  return text(block, offset, end === -1 || end > offset + length ? offset + length : end);
}

function nameOf(block: Buffer, ustar: boolean): string {
  const name = cString(block, 0, 100);
  const prefix = ustar ? cString(block, 345, 155) : "";
  return prefix === "" ? name : `${prefix}/${name}`;
}

function text(bytes: Buffer, start = 0, end = bytes.length): string {
  const value = bytes.toString("utf8", start, end);
  // U+FFFD: bytes that are not UTF-8 (the validator's BAD_ENCODING). Refused here too: a name
  // the agent could not say exactly is not one to create.
  if (value.includes("\uFFFD")) throw new LayerRefused("BAD_ENCODING", value, "a name or link target that is not UTF-8");
  return value;
}

function entryType(flag: string, name: string): EntryType {
  switch (flag) {
    case "0": case "\0": case "7": case "S": return "file";
    case "1": return "hardlink";
    case "2": return "symlink";
    case "3": return "char";
    case "4": return "block";
    case "5": return "directory";
    case "6": return "fifo";
    default: throw new LayerRefused("UNKNOWN_TYPE", name, `unsupported entry type ${JSON.stringify(flag)}`);
  }
}

/**
 * A member's PAX records (none without an 'x' header): a repeated key's last value (GNU.sparse.*
 * records, which sparse 0.0 repeats, apart and in order, prefix removed). Malformed records are
 * refused in the member's name.
 */
function memberPax(data: Buffer | null, entry: string): { pax: Map<string, Buffer>; sparse: [string, string][] } {
  const pax = new Map<string, Buffer>();
  const sparse: [string, string][] = [];
  for (const [key, value] of data === null ? [] : parsePax(data, entry)) {
    if (key.startsWith(SPARSE_PREFIX)) sparse.push([key.slice(SPARSE_PREFIX.length), value.toString("utf8")]);
    else pax.set(key, value);
  }
  return { pax, sparse };
}

/** PAX records "<len> <key>=<value>\n", in order: the key is UTF-8 text, the value raw bytes. */
function parsePax(data: Buffer, entry: string): [string, Buffer][] {
  const records: [string, Buffer][] = [];
  for (let at = 0; at < data.length; ) {
    const space = data.indexOf(0x20, at);
    const lengthText = space === -1 ? "" : data.toString("latin1", at, space);
    const length = /^[1-9][0-9]{0,8}$/.test(lengthText) ? Number(lengthText) : NaN;
    if (!(length > 0) || at + length > data.length || data[at + length - 1] !== 0x0a) {
      if (data.subarray(at).every((byte) => byte === 0)) break; // some writers pad with NULs
      throw new LayerRefused("BAD_PAX", entry, "malformed PAX extended header");
    }
    const record = data.subarray(space + 1, at + length - 1);
    const equals = record.indexOf(0x3d);
    if (equals <= 0) throw new LayerRefused("BAD_PAX", entry, "malformed PAX record (no key)");
    records.push([record.toString("utf8", 0, equals), record.subarray(equals + 1)]); // `data` is our own copy
    at += length;
  }
  return records;
}

/** A PAX size, uid or gid: decimal digits, a safe integer (the validator's rule). */
function paxNumber(pax: Map<string, Buffer>, key: string, entry: string): number {
  const value = pax.get(key)!.toString("latin1");
  if (!/^[0-9]+$/.test(value) || !Number.isSafeInteger(Number(value))) throw new LayerRefused("BAD_PAX", entry, `PAX ${key} ${JSON.stringify(value)} is not a number`);
  return Number(value);
}

/** A PAX time "[-]seconds[.fraction]" (seconds a safe integer), kept to the nanosecond. */
function time(pax: Map<string, Buffer>, key: "mtime" | "atime" | "ctime", entry: string): { sec: number; nsec: number } | null {
  if (!pax.has(key)) return null;
  const value = pax.get(key)!.toString("latin1");
  const match = /^(-?)([0-9]+)(?:\.([0-9]+))?$/.exec(value);
  if (!match || !Number.isSafeInteger(Number(match[2]))) throw new LayerRefused("BAD_PAX", entry, `PAX ${key} ${JSON.stringify(value)} is not a time`);
  let sec = Number(match[2]!);
  let nsec = Number((match[3] ?? "").slice(0, 9).padEnd(9, "0"));
  if (match[1] === "-") {
    sec = -sec;
    if (nsec > 0) [sec, nsec] = [sec - 1, 1_000_000_000 - nsec];
  }
  return { sec, nsec };
}
