// A push-based streaming tar reader for the validator: fed raw tar bytes in chunks of any size,
// it calls `onMember` with each member's header, in archive order, as soon as the header is
// complete (never waiting for the member's data), and enforces the archive's block structure.
//
// Written by hand because no package does what the validator needs (this is "what no package
// does" in this code base): tar-stream decodes PAX record values as UTF-8 (a binary
// security.capability value loses its bytes), keeps the ustar uid/gid when a PAX record carries
// the real one, skips every all-zero block and goes on parsing (a lone zero block followed by
// members, or a second archive appended, would mean different things to different tools), and
// only reports a member once the consumer asks for it. node-tar is larger still and
// filesystem-oriented. The rules here are few and fixed: 512-byte blocks, ustar/GNU headers,
// PAX ('x') and GNU long-name ('L', 'K') metadata headers.
//
// Structure rules enforced here (the member rules are entry-rules.ts'):
// - a header needs a valid checksum and the "ustar" magic (POSIX ustar/PAX or GNU); a pre-POSIX
//   v7 header is NOT_A_TAR, as is an object shorter than one block;
// - the archive ends at the first all-zero block at a header position, which must be followed by
//   a second zero block (the end-of-archive marker) and then only zero bytes, up to a multiple of
//   512 bytes (TRAILING_GARBAGE otherwise); an all-zero block among the metadata headers of a
//   member is TRAILING_GARBAGE too (GNU tar would stop there);
// - the object must not end before the end-of-archive marker (TRUNCATED);
// - at most `maxHeaderBytes` of metadata headers before one member (HEADER_TOO_LARGE);
// - PAX records are parsed as bytes ("<len> <key>=<value>\n"; key UTF-8, value raw bytes): path,
//   linkpath, size, uid and gid replace the header fields; size, uid, gid, mtime, atime and ctime
//   must be plain numbers below 2^53 (BAD_PAX); global ('g') headers may carry only comments; one
//   'x' header per member, and no empty path or linkpath (readers disagree on both: BAD_PAX).
// - GNU sparse files (sparse.ts: old GNU 'S' with its extension blocks, PAX 0.0, 0.1 and 1.0) are
//   read with their map before the member is reported: the map is part of the member's header,
//   even when (1.0) it is stored at the start of its data. BAD_SPARSE_MAP for a bad one.
import { LayerValidationError, printable, WHOLE_ARCHIVE } from "./errors.ts";
import { MapText, oldGnuField, paxSparse, RegionCheck, type SparseFile } from "./sparse.ts";

const BLOCK = 512;

export type MemberType = "file" | "directory" | "symlink" | "link" | "fifo" | "character-device" | "block-device";

export interface TarMember {
  /** Byte offset of the member's own header (after its PAX/GNU metadata headers). */
  offset: number;
  /** The header's type flag, as a character (for messages). */
  typeflag: string;
  /** null for a type flag that is not one of the member types ('S' sparse, 'V' volume...). */
  type: MemberType | null;
  /** The raw name: PAX path, else GNU long name, else ustar prefix/name. */
  name: string;
  /** Bytes of the file's content stored in the archive (for a sparse file, its data regions,
   *  without a 1.0 map; `sparse.realSize` is its length). */
  size: number;
  uid: number;
  gid: number;
  /** Symlink or hardlink target ("" when none). */
  linkname: string;
  devmajor: number;
  devminor: number;
  /** Extended attributes from `SCHILY.xattr.<name>` PAX records, values as raw bytes. */
  xattrs: Map<string, Buffer>;
  /** A GNU sparse file (type 'S' or GNU.sparse.* records); null for any other member. */
  sparse: SparseFile | null;
}

const TYPES: Record<string, MemberType> = {
  "0": "file",
  "\0": "file",
  "7": "file", // contiguous file: a regular file everywhere but on a few 1980s systems
  "1": "link",
  "2": "symlink",
  "3": "character-device",
  "4": "block-device",
  "5": "directory",
  "6": "fifo",
};

/** Type flags a PAX sparse member may have: a regular file. */
const REGULAR_FILE_FLAGS = new Set(["0", "\0", "7"]);
const SPARSE_PREFIX = "GNU.sparse.";

/** Global PAX keys that change nothing about the members. */
const HARMLESS_GLOBAL_KEYS = new Set(["comment", "charset"]);

type State =
  | { kind: "header" }
  | { kind: "metadata"; typeflag: string; need: number; padding: number }
  | { kind: "skip"; remaining: number }
  /** Old GNU sparse extension blocks (21 map entries each) after the member's header. */
  | { kind: "sparse-extension"; member: TarMember; check: RegionCheck }
  /** A PAX 1.0 sparse map at the start of the member's data (`size`: the data's length). */
  | { kind: "sparse-map"; member: TarMember; map: MapText; size: number }
  | { kind: "second-zero-block"; seen: number }
  | { kind: "after-end" };

export class TarReader {
  /** Bytes fed so far. */
  total = 0;

  readonly #maxHeaderBytes: number;
  readonly #onMember: (member: TarMember) => void;
  #state: State = { kind: "header" };
  /** The header block being assembled. */
  readonly #block = Buffer.alloc(BLOCK);
  #blockFill = 0;
  /** Data of the metadata header being read. */
  #metadata: Buffer[] = [];
  #metadataFill = 0;
  /** Metadata gathered for the next member: its PAX extended header ('x'), GNU long names. */
  #pax: Buffer | null = null;
  #longName: Buffer | null = null;
  #longLink: Buffer | null = null;
  #metadataBytes = 0;
  #metadataFrom = -1;
  #endMarkerAt = -1;
  /** The object's first bytes, to name other compressions in errors. */
  #head = Buffer.alloc(0);

  constructor(maxHeaderBytes: number, onMember: (member: TarMember) => void) {
    this.#maxHeaderBytes = maxHeaderBytes;
    this.#onMember = onMember;
  }

  /** Feeds the next bytes; throws LayerValidationError (from here or from onMember). */
  write(chunk: Uint8Array): void {
    if (this.#head.length < 8) this.#head = Buffer.concat([this.#head, chunk.subarray(0, 8 - this.#head.length)]);
    let at = 0;
    while (at < chunk.length) {
      const state = this.#state;
      const offset = this.total + at;
      switch (state.kind) {
        case "header":
        case "sparse-extension": {
          const n = Math.min(BLOCK - this.#blockFill, chunk.length - at);
          this.#block.set(chunk.subarray(at, at + n), this.#blockFill);
          this.#blockFill += n;
          at += n;
          if (this.#blockFill === BLOCK) {
            this.#blockFill = 0;
            if (state.kind === "header") this.#header(offset + n - BLOCK);
            else this.#sparseExtension(state.member, state.check);
          }
          break;
        }
        case "sparse-map": {
          at = state.map.feed(chunk, at, chunk.length);
          if (state.map.done) {
            // The map's blocks are not the file's content: what follows them is.
            state.member.size = state.size - state.map.consumed;
            state.member.sparse = state.map.check.finish(state.member.size);
            this.#emit(state.member, roundUpToBlock(state.size) - state.map.consumed);
          }
          break;
        }
        case "metadata": {
          const n = Math.min(state.need - this.#metadataFill, chunk.length - at);
          this.#metadata.push(Buffer.from(chunk.subarray(at, at + n)));
          this.#metadataFill += n;
          at += n;
          if (this.#metadataFill === state.need) this.#endMetadata(state.typeflag, state.padding);
          break;
        }
        case "skip": {
          const n = Math.min(state.remaining, chunk.length - at);
          state.remaining -= n;
          at += n;
          if (state.remaining === 0) this.#state = { kind: "header" };
          break;
        }
        case "second-zero-block": {
          const n = Math.min(BLOCK - state.seen, chunk.length - at);
          if (firstNonZero(chunk, at, at + n) !== -1) {
            throw refuse("TRAILING_GARBAGE", `a lone zero block at byte ${this.#endMarkerAt} is followed by data (an archive ends with two zero blocks and nothing after them)`);
          }
          state.seen += n;
          at += n;
          if (state.seen === BLOCK) this.#state = { kind: "after-end" };
          break;
        }
        case "after-end": {
          const bad = firstNonZero(chunk, at, chunk.length);
          if (bad !== -1) throw refuse("TRAILING_GARBAGE", `data at byte ${this.total + bad} after the end of the archive (zero block at byte ${this.#endMarkerAt})`);
          at = chunk.length;
          break;
        }
      }
    }
    this.total += chunk.length;
  }

  /** Called once the input is exhausted: the archive must have ended properly. */
  end(): void {
    const state = this.#state;
    if (this.total === 0) throw refuse("NOT_A_TAR", "empty object (0 bytes): a layer with no entries is still a tar of two zero blocks");
    if (this.#metadataFrom !== -1 && (state.kind === "after-end" || state.kind === "second-zero-block")) {
      throw refuse("TRUNCATED", `the archive ends after the metadata header at byte ${this.#metadataFrom}, which no member follows`);
    }
    if (state.kind === "after-end") {
      if (this.total % BLOCK !== 0) throw refuse("TRAILING_GARBAGE", `object length ${this.total} is not a multiple of ${BLOCK} bytes`);
      return;
    }
    if (this.total < BLOCK) throw refuse("NOT_A_TAR", `object is ${this.total} bytes, shorter than one tar header`);
    let why: string;
    if (state.kind === "second-zero-block") why = "the end-of-archive marker has one zero block, not two";
    else if (state.kind === "skip" || state.kind === "sparse-map") why = "the object ends inside an entry's data";
    else if (state.kind === "sparse-extension") why = "the object ends inside a sparse file's extension headers";
    else if (state.kind === "header" && this.#blockFill === 0 && this.#metadataFrom === -1) why = "the archive ends without an end-of-archive marker";
    else why = "the archive ends inside a header, or after a metadata header that no member follows";
    throw refuse("TRUNCATED", `${why} (at byte ${this.total})`);
  }

  #header(offset: number): void {
    const block = this.#block;
    if (firstNonZero(block, 0, BLOCK) === -1) {
      // The end (also right after metadata headers: then nothing may follow, and end() says the
      // metadata had no member).
      this.#endMarkerAt = offset;
      this.#state = { kind: "second-zero-block", seen: 0 };
      return;
    }
    if (!checksumOk(block)) {
      if (offset === 0) {
        const other = OTHER_COMPRESSIONS.find(([, magic]) => magic.every((b, i) => this.#head[i] === b));
        if (other) throw refuse("NOT_A_TAR", `object is ${other[0]}-compressed; only plain, gzip and zstd tar layers are supported`);
      }
      throw refuse("NOT_A_TAR", `bad header checksum at byte ${offset}`);
    }
    const ustar = block.toString("latin1", 257, 263) === "ustar\0";
    const gnu = block.toString("latin1", 257, 265) === "ustar  \0";
    if (!ustar && !gnu) throw refuse("NOT_A_TAR", `header at byte ${offset} has no ustar magic (pre-POSIX v7 tar is not supported)`);
    const typeflag = String.fromCharCode(block[156]!);
    const size = readNumber(block, 124, 12);
    if (!Number.isSafeInteger(size) || size < 0) throw refuse("NOT_A_TAR", `header at byte ${offset} has an unreadable size field`);

    if (typeflag === "x" || typeflag === "g" || typeflag === "L" || typeflag === "K") {
      if (this.#metadataFrom === -1) this.#metadataFrom = offset;
      this.#metadataBytes += BLOCK + size;
      if (this.#metadataBytes > this.#maxHeaderBytes) {
        throw refuse("HEADER_TOO_LARGE", `${this.#metadataBytes} bytes of metadata headers from byte ${this.#metadataFrom} on, before one member (limit ${this.#maxHeaderBytes})`);
      }
      // Readers disagree on a second one (GNU tar and Go keep the last, libarchive refuses it):
      // no writer emits two, so it is refused rather than read one way.
      if (typeflag === "x" && this.#pax !== null) throw refuse("BAD_PAX", `a second PAX extended header at byte ${offset} before one member`);
      this.#metadata = [];
      this.#metadataFill = 0;
      const padding = roundUpToBlock(size) - size;
      if (size === 0) this.#endMetadata(typeflag, padding);
      else this.#state = { kind: "metadata", typeflag, need: size, padding };
      return;
    }
    this.#member(block, offset, typeflag, size, ustar);
  }

  #endMetadata(typeflag: string, padding: number): void {
    const data = Buffer.concat(this.#metadata);
    this.#metadata = [];
    if (typeflag === "x") this.#pax = data;
    else if (typeflag === "L") this.#longName = data;
    else if (typeflag === "K") this.#longLink = data;
    else {
      for (const [key] of parsePax(data, WHOLE_ARCHIVE)) {
        if (!HARMLESS_GLOBAL_KEYS.has(key)) throw refuse("BAD_PAX", `global PAX header sets "${printable(key)}": only comments are supported in global headers`);
      }
    }
    this.#state = padding > 0 ? { kind: "skip", remaining: padding } : { kind: "header" };
  }

  #member(block: Buffer, offset: number, typeflag: string, headerSize: number, ustar: boolean): void {
    let name = cString(block, 0, 100);
    if (ustar && block[345] !== 0) name = `${cString(block, 345, 155)}/${name}`;
    if (this.#longName) name = cString(this.#longName, 0, this.#longName.length);
    let linkname = this.#longLink ? cString(this.#longLink, 0, this.#longLink.length) : cString(block, 157, 100);
    let type: MemberType | null = TYPES[typeflag] ?? null;
    let size = headerSize;
    let uid = readNumber(block, 108, 8);
    let gid = readNumber(block, 116, 8);
    const xattrs = new Map<string, Buffer>();

    const records = new Map<string, Buffer>();
    // In header order, repeats kept: sparse 0.0 repeats GNU.sparse.offset/numbytes.
    const sparseRecords: Array<[string, string]> = [];
    for (const [key, value] of this.#pax === null ? [] : parsePax(this.#pax, name)) {
      if (key.startsWith(SPARSE_PREFIX)) sparseRecords.push([key.slice(SPARSE_PREFIX.length), value.toString("utf8")]);
      else records.set(key, value);
    }
    for (const key of ["path", "linkpath"]) {
      // POSIX says an empty value deletes the field (the name?); Go keeps the ustar one: refused.
      if (records.get(key)?.length === 0) throw refuse("BAD_PAX", `PAX ${key} record with an empty value`, printable(name));
    }
    const path = records.get("path");
    if (path) name = path.toString("utf8");
    const paxSparseFile = paxSparse(sparseRecords, name);
    if (paxSparseFile?.name != null) name = paxSparseFile.name;

    for (const [key, value] of records) {
      const text = () => value.toString("utf8");
      switch (key) {
        case "path":
          break;
        case "linkpath":
          linkname = text();
          break;
        case "size":
          size = paxNumber(key, text(), name, /^([0-9]+)$/);
          break;
        case "uid":
          uid = paxNumber(key, text(), name, /^([0-9]+)$/);
          break;
        case "gid":
          gid = paxNumber(key, text(), name, /^([0-9]+)$/);
          break;
        case "mtime":
        case "atime":
        case "ctime":
          paxNumber(key, text(), name, /^-?([0-9]+)(\.[0-9]+)?$/);
          break;
        default:
          // Other records (comment, charset...) change nothing about the member.
          if (key.startsWith("SCHILY.xattr.")) xattrs.set(key.slice("SCHILY.xattr.".length), value);
      }
    }
    // Pre-POSIX writers marked directories by a trailing slash on a regular file.
    if ((typeflag === "0" || typeflag === "\0") && name.endsWith("/")) type = "directory";

    if (typeflag === "S") type = "file";
    this.#pax = null;
    this.#longName = null;
    this.#longLink = null;
    this.#metadataBytes = 0;
    this.#metadataFrom = -1;
    const member: TarMember = {
      offset,
      typeflag,
      type,
      name,
      size,
      uid,
      gid,
      linkname,
      devmajor: readNumber(block, 329, 8),
      devminor: readNumber(block, 337, 8),
      xattrs,
      sparse: null,
    };
    const sparseRefusal = (message: string) => new LayerValidationError("BAD_SPARSE_MAP", printable(name), message);
    if (typeflag === "S") {
      if (paxSparseFile) throw sparseRefusal("an old GNU sparse member (type S) also carries GNU.sparse.* PAX records");
      const check = new RegionCheck(oldGnuField(block, 483, 12), name);
      if (this.#oldGnuEntries(block, 386, 4, 482, check, name)) this.#state = { kind: "sparse-extension", member, check };
      else this.#finishOldGnu(member, check);
      return;
    }
    if (paxSparseFile) {
      if (!REGULAR_FILE_FLAGS.has(typeflag)) throw sparseRefusal(`GNU.sparse.* records on a member of type ${JSON.stringify(typeflag)}: only a regular file can be sparse`);
      if (paxSparseFile.version === "0.x") {
        member.sparse = paxSparseFile.check.finish(size);
        this.#emit(member, roundUpToBlock(size));
      } else {
        const map = new MapText(paxSparseFile.realSize, size, name);
        // The map's real size and the member's stored bytes are known once the map is read.
        this.#state = { kind: "sparse-map", member, map, size };
      }
      return;
    }
    // Only regular files carry data (the member rules refuse a size on anything else).
    this.#emit(member, type === "file" ? roundUpToBlock(size) : 0);
  }

  /** Reports a member and skips `skip` bytes of its data and padding. */
  #emit(member: TarMember, skip: number): void {
    this.#onMember(member);
    this.#state = skip > 0 ? { kind: "skip", remaining: skip } : { kind: "header" };
  }

  /**
   * Old GNU sparse map entries (offset, numbytes: 12 bytes each) at `from`, `count` of them, then
   * the "isextended" byte at `extendedAt`. An all-zero entry ends the map; nothing may follow it
   * (GNU tar would stop there and read any extension blocks as data). True when an extension
   * block follows.
   */
  #oldGnuEntries(block: Buffer, from: number, count: number, extendedAt: number, check: RegionCheck, name: string): boolean {
    const refusal = (message: string) => new LayerValidationError("BAD_SPARSE_MAP", printable(name), message);
    const extended = block[extendedAt]!;
    if (extended > 1) throw refusal(`old GNU sparse "isextended" byte is ${extended}, not 0 or 1`);
    for (let i = 0; i < count; i++) {
      const at = from + 24 * i;
      if (firstNonZero(block, at, at + 24) === -1) {
        if (firstNonZero(block, at, from + 24 * count) !== -1 || extended) throw refusal("old GNU sparse map goes on after an empty entry");
        return false;
      }
      check.add(oldGnuField(block, at, 12), oldGnuField(block, at + 12, 12));
    }
    return extended === 1;
  }

  #sparseExtension(member: TarMember, check: RegionCheck): void {
    if (this.#oldGnuEntries(this.#block, 0, 21, 504, check, member.name)) return; // another block follows
    this.#finishOldGnu(member, check);
  }

  #finishOldGnu(member: TarMember, check: RegionCheck): void {
    member.sparse = check.finish(member.size);
    this.#emit(member, roundUpToBlock(member.size));
  }
}

export function roundUpToBlock(n: number): number {
  return Math.ceil(n / BLOCK) * BLOCK;
}

function refuse(rule: "NOT_A_TAR" | "TRUNCATED" | "TRAILING_GARBAGE" | "HEADER_TOO_LARGE" | "BAD_PAX", message: string, entry = WHOLE_ARCHIVE) {
  return new LayerValidationError(rule, entry, message);
}

/** Compressions not supported, named when an object that carries their magic is refused. */
const OTHER_COMPRESSIONS: ReadonlyArray<readonly [string, number[]]> = [
  ["xz", [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]],
  ["bzip2", [0x42, 0x5a, 0x68]],
];

function firstNonZero(bytes: Uint8Array, from: number, to: number): number {
  for (let i = from; i < to; i++) if (bytes[i] !== 0) return i;
  return -1;
}

/** The header checksum: the sum of all bytes with the checksum field read as spaces (unsigned, or signed as some old writers did). */
function checksumOk(block: Buffer): boolean {
  const stored = readNumber(block, 148, 8);
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const byte = i >= 148 && i < 156 ? 0x20 : block[i]!;
    unsigned += byte;
    signed += byte >= 0x80 ? byte - 256 : byte;
  }
  return stored === unsigned || stored === signed;
}

/** A text field up to its first NUL, as UTF-8 (bytes that are not UTF-8 become U+FFFD: BAD_ENCODING later). */
function cString(bytes: Buffer, offset: number, length: number): string {
  const end = bytes.indexOf(0, offset);
  return bytes.toString("utf8", offset, end === -1 || end > offset + length ? offset + length : end);
}

/**
 * A numeric header field: octal digits (leading spaces, trailing NULs or spaces), or GNU base-256
 * (first byte 0x80 positive, 0xff negative). NaN when unreadable; callers refuse it.
 */
function readNumber(block: Buffer, offset: number, length: number): number {
  const first = block[offset]!;
  if (first === 0x80 || first === 0xff) {
    let value = 0;
    for (let i = 1; i < length; i++) value = value * 256 + (first === 0xff ? 0xff - block[offset + i]! : block[offset + i]!);
    return first === 0xff ? -(value + 1) : value;
  }
  const text = block.toString("latin1", offset, offset + length).replace(/^ +/, "").replace(/[\0 ]+$/, "").replace(/\0.*$/s, "");
  if (text === "") return 0;
  return /^[0-7]+$/.test(text) ? parseInt(text, 8) : NaN;
}

/** A PAX number in `format`, whose first group (the whole number, or a time's seconds) is a safe integer. */
function paxNumber(key: string, text: string, name: string, format: RegExp): number {
  const match = format.exec(text);
  if (!match || !Number.isSafeInteger(Number(match[1]))) throw refuse("BAD_PAX", `PAX ${key} record "${printable(text)}" is not a number`, printable(name));
  return Number(text);
}

/**
 * PAX extended header records, "<length> <key>=<value>\n" each, parsed as BYTES: the key is UTF-8
 * text, the value the raw bytes between "=" and the final newline (binary xattr values stay
 * intact), in header order with repeated keys kept (sparse 0.0 repeats its offsets). A malformed
 * record is BAD_PAX. NUL bytes after the last record (padding) are allowed.
 */
export function parsePax(data: Buffer, name: string): Array<[string, Buffer]> {
  const malformed = (at: number) => refuse("BAD_PAX", `malformed PAX record at byte ${at} of its header`, name === WHOLE_ARCHIVE ? name : printable(name));
  const records: Array<[string, Buffer]> = [];
  let at = 0;
  while (at < data.length && data[at] !== 0) {
    const space = data.indexOf(0x20, at);
    const lengthText = space === -1 ? "" : data.toString("latin1", at, space);
    if (!/^[1-9][0-9]{0,8}$/.test(lengthText)) throw malformed(at);
    const end = at + Number(lengthText);
    const equals = data.indexOf(0x3d, space + 1);
    if (end > data.length || data[end - 1] !== 0x0a || equals === -1 || equals >= end - 1 || equals === space + 1) throw malformed(at);
    records.push([data.toString("utf8", space + 1, equals), Buffer.from(data.subarray(equals + 1, end - 1))]);
    at = end;
  }
  if (firstNonZero(data, at, data.length) !== -1) throw malformed(at);
  return records;
}
