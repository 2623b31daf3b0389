// The per-member rules of a layer, applied to each header tar-stream decodes, in archive order.
// They need a little memory of earlier members (hardlink targets, whiteouts): names are kept as
// 96-bit hashes so a hostile layer with a million 4 KiB names cannot make the agent hold 4 GB.
import { createHash } from "node:crypto";
import type { Compression } from "./compression.ts";
import { LayerValidationError, printable, type LayerRule } from "./errors.ts";
import { baseOf, joinName, normalizeEntryName, parentOf, type PathLimits } from "./names.ts";

export interface EntryLimits extends PathLimits {
  /** Most members in one layer (whiteouts and directories included). */
  maxEntries: number;
  /** Largest regular file, in bytes. */
  maxEntryBytes: number;
  /** Longest symlink target, in bytes. */
  maxLinkTargetBytes: number;
}

/** What a layer contains, for logs and for the apply step. */
export interface LayerSummary {
  /** Every member: files, directories, links, fifos, whiteouts, the root entry. */
  entries: number;
  files: number;
  directories: number;
  symlinks: number;
  hardlinks: number;
  fifos: number;
  /** `.wh.NAME` members. */
  whiteouts: number;
  /** `.wh..wh..opq` members. */
  opaqueDirs: number;
  /** Bytes of regular-file content. */
  fileBytes: number;
  /** Bytes of the tar (after decompression, for a compressed object). */
  tarBytes: number;
  /** How the object was stored, told by its magic bytes. */
  compression: Compression;
  /** Bytes of the object as stored (equal to tarBytes when not compressed). */
  objectBytes: number;
  /** The layer has an entry for the image root itself ("./"), as `tar -C dir .` writes. */
  hasRootEntry: boolean;
  /** Hardlinks whose target is not an earlier member of this layer: it must exist in a lower
   *  layer, which only the apply step can check. */
  lowerLayerLinks: number;
  /** Facts worth logging, the first few of them. */
  notes: string[];
}

const MAX_NOTES = 20;
const MAX_UID = 0xfffffffe; // (uid_t)-1 means "unchanged" to chown(2)
const MAX_XATTR_NAME_BYTES = 255;
const MAX_XATTR_VALUE_BYTES = 65536;
const OPAQUE_MARKER = ".wh..wh..opq";
const WHITEOUT_PREFIX = ".wh.";

type SeenKind = "dir" | "nondir";

/** The header fields used here, as tar-stream decodes them (type may be null for unknown flags). */
export interface MemberHeader {
  name: string;
  type: string | null;
  size: number;
  uid: number;
  gid: number;
  linkname: string | null;
  pax?: unknown;
}

export class EntryRules {
  readonly summary: LayerSummary = {
    entries: 0,
    files: 0,
    directories: 0,
    symlinks: 0,
    hardlinks: 0,
    fifos: 0,
    whiteouts: 0,
    opaqueDirs: 0,
    fileBytes: 0,
    tarBytes: 0,
    compression: "none",
    objectBytes: 0,
    hasRootEntry: false,
    lowerLayerLinks: 0,
    notes: [],
  };

  readonly #limits: EntryLimits;
  /** Members seen so far in this layer (hashed name -> kind). */
  readonly #seen = new Map<string, SeenKind>();
  /** Paths this layer deletes from lower layers (.wh.NAME), hashed. */
  readonly #whitedOut = new Set<string>();
  /** Directories whose lower content this layer hides (.wh..wh..opq), hashed. */
  readonly #opaque = new Set<string>();
  /** Targets of hardlinks to paths not (yet) seen in this layer, hashed. */
  readonly #linkedAhead = new Set<string>();

  constructor(limits: EntryLimits) {
    this.#limits = limits;
  }

  /** Checks one member; throws LayerValidationError when it breaks a rule. */
  check(header: MemberHeader): void {
    const entry = printable(header.name);
    const refuse: Refuse = (rule, message) => new LayerValidationError(rule, entry, message);

    if (++this.summary.entries > this.#limits.maxEntries) {
      throw refuse("TOO_MANY_ENTRIES", `layer has more than ${this.#limits.maxEntries} entries`);
    }
    const type = header.type;
    if (type === "character-device" || type === "block-device") {
      // Devices are never created from layers: an image gets its /dev from the runtime, and a
      // device node in a layer is a way to reach host hardware.
      throw refuse("DEVICE_NODE", `${type} entries are not allowed (an image gets /dev at run time)`);
    }
    if (type !== "file" && type !== "directory" && type !== "symlink" && type !== "link" && type !== "fifo") {
      throw refuse("UNKNOWN_TYPE", `entry type ${type ?? "(unknown type flag)"} is not supported`);
    }

    const name = normalizeEntryName(header.name, this.#limits);
    if (name === "" && type !== "directory") throw refuse("EMPTY_NAME", `a ${type} entry names the image root`);
    checkOwner(header, refuse);
    checkPax(header, refuse);
    if (name !== "" && this.#linkedAhead.has(key(name))) {
      // Applied in order, the earlier link would find no target (or a lower layer's file that
      // this very entry then replaces): a link must come after its target.
      throw refuse("HARDLINK_TARGET_INVALID", `"${printable(name)}" is the target of an earlier hardlink; a hardlink must follow its target`);
    }

    const base = baseOf(name);
    if (base.startsWith(WHITEOUT_PREFIX)) {
      this.#whiteout(name, base, header, refuse);
      return;
    }
    if (type === "file") {
      if (header.size > this.#limits.maxEntryBytes) {
        throw refuse("ENTRY_TOO_LARGE", `file of ${header.size} bytes is larger than ${this.#limits.maxEntryBytes}`);
      }
    } else if (header.size !== 0) {
      throw refuse("NONZERO_SIZE", `a ${type} entry carries ${header.size} bytes of content`);
    }

    switch (type) {
      case "file":
        this.summary.files++;
        this.summary.fileBytes += header.size;
        break;
      case "directory":
        if (name === "") this.summary.hasRootEntry = true;
        this.summary.directories++;
        break;
      case "symlink":
        this.#symlinkTarget(header.linkname, refuse);
        this.summary.symlinks++;
        break;
      case "link":
        this.#hardlinkTarget(name, header.linkname, refuse);
        this.summary.hardlinks++;
        break;
      case "fifo":
        this.summary.fifos++;
        break;
    }
    if (name !== "") this.#seen.set(key(name), type === "directory" ? "dir" : "nondir");
  }

  #whiteout(name: string, base: string, header: MemberHeader, refuse: Refuse): void {
    if (header.type !== "file") throw refuse("BAD_WHITEOUT", `a whiteout must be a regular file entry, not ${header.type}`);
    if (header.size !== 0) throw refuse("BAD_WHITEOUT", `a whiteout carries ${header.size} bytes of content`);
    const parent = parentOf(name);
    if (base === OPAQUE_MARKER) {
      this.#opaque.add(key(parent));
      this.summary.opaqueDirs++;
      return;
    }
    if (base.startsWith(WHITEOUT_PREFIX + WHITEOUT_PREFIX)) {
      throw refuse("BAD_WHITEOUT", `the ${WHITEOUT_PREFIX}${WHITEOUT_PREFIX} prefix is reserved (only ${OPAQUE_MARKER} is allowed)`);
    }
    const hidden = base.slice(WHITEOUT_PREFIX.length);
    if (hidden === "" || hidden === "." || hidden === "..") {
      throw refuse("BAD_WHITEOUT", `whiteout names no entry ("${printable(hidden)}")`);
    }
    this.#whitedOut.add(key(joinName(parent, hidden)));
    this.summary.whiteouts++;
  }

  #symlinkTarget(target: string | null, refuse: Refuse): void {
    // Absolute or relative, the text is fine: the kernel resolves it inside the image's root at
    // apply time (chroot) and at run time.
    if (!target) throw refuse("SYMLINK_TARGET_INVALID", "symlink has an empty target");
    if (target.includes("\0")) throw refuse("SYMLINK_TARGET_INVALID", "symlink target contains a NUL byte");
    if (target.includes("\uFFFD")) throw refuse("BAD_ENCODING", "symlink target is not valid UTF-8");
    if (Buffer.byteLength(target) > this.#limits.maxLinkTargetBytes) {
      throw refuse("SYMLINK_TARGET_INVALID", `symlink target is longer than ${this.#limits.maxLinkTargetBytes} bytes`);
    }
  }

  #hardlinkTarget(name: string, rawTarget: string | null, refuse: Refuse): void {
    if (!rawTarget) throw refuse("HARDLINK_TARGET_INVALID", "hardlink has an empty target");
    let target: string;
    try {
      target = normalizeEntryName(rawTarget, this.#limits);
    } catch (err) {
      if (!(err instanceof LayerValidationError)) throw err;
      throw refuse("HARDLINK_TARGET_INVALID", `hardlink target "${err.entry}": ${err.rule}: ${err.message}`);
    }
    if (target === "") throw refuse("HARDLINK_TARGET_INVALID", "hardlink targets the image root");
    if (target === name) throw refuse("HARDLINK_TARGET_INVALID", "hardlink targets itself");
    if (baseOf(target).startsWith(WHITEOUT_PREFIX)) throw refuse("HARDLINK_TARGET_INVALID", "hardlink targets a whiteout");

    const seen = this.#seen.get(key(target));
    if (seen === "dir") throw refuse("HARDLINK_TARGET_INVALID", `hardlink targets directory "${printable(target)}"`);
    if (seen === "nondir") return;
    if (this.#deletedHere(target)) {
      throw refuse("HARDLINK_TO_MISSING", `hardlink target "${printable(target)}" was deleted earlier in this layer`);
    }
    this.#linkedAhead.add(key(target));
    this.summary.lowerLayerLinks++;
    this.#note(`hardlink "${printable(name)}" -> "${printable(target)}" refers to a lower layer`);
  }

  /** Whether a path not (re)created in this layer is hidden by this layer's whiteouts. */
  #deletedHere(target: string): boolean {
    const parts = target.split("/");
    if (this.#opaque.has(key(""))) return true;
    for (let i = 1; i <= parts.length; i++) {
      const prefix = parts.slice(0, i).join("/");
      if (this.#whitedOut.has(key(prefix))) return true;
      if (i < parts.length && this.#opaque.has(key(prefix))) return true;
    }
    return false;
  }

  #note(text: string): void {
    if (this.summary.notes.length < MAX_NOTES) this.summary.notes.push(text);
  }
}

type Refuse = (rule: LayerRule, message: string) => LayerValidationError;

function key(name: string): string {
  return createHash("sha256").update(name).digest().toString("latin1", 0, 12);
}

function checkOwner(header: MemberHeader, refuse: Refuse): void {
  for (const [field, id] of [["uid", header.uid], ["gid", header.gid]] as const) {
    if (!Number.isInteger(id) || id < 0 || id > MAX_UID) throw refuse("BAD_OWNER", `${field} ${id} is out of range`);
  }
}

/**
 * PAX records tar-stream does not apply would make the layer mean something else to other tools:
 * a uid/gid record that disagrees with the header field (tar-stream keeps the header field, so a
 * setuid file of uid 3000000 could land as uid 0), a size record that is not a plain number
 * (tar-stream's parseInt accepts "12abc"), GNU sparse files (tar-stream would write the sparse
 * map as content). Extended attributes: only user.* and security.capability may be set.
 */
function checkPax(header: MemberHeader, refuse: Refuse): void {
  const pax = header.pax;
  if (pax === null || pax === undefined || typeof pax !== "object") return;
  for (const [field, value] of Object.entries(pax as Record<string, unknown>)) {
    const text = String(value);
    if (field === "size" && !/^[0-9]+$/.test(text)) throw refuse("BAD_PAX", `PAX size record "${printable(text)}" is not a number`);
    if (field === "uid" || field === "gid") {
      if (!/^[0-9]+$/.test(text) || Number(text) !== header[field]) {
        throw refuse("BAD_PAX", `PAX ${field} record "${printable(text)}" differs from the header's ${field} ${header[field]}`);
      }
    }
    if (field.startsWith("GNU.sparse.")) throw refuse("SPARSE_FILE", "GNU sparse files are not supported");
    if (field.startsWith("SCHILY.xattr.")) checkXattr(field.slice("SCHILY.xattr.".length), text, refuse);
  }
}

function checkXattr(name: string, value: string, refuse: Refuse): void {
  const allowed = (name.startsWith("user.") && name.length > "user.".length) || name === "security.capability";
  if (!allowed) throw refuse("BAD_XATTR", `extended attribute "${printable(name)}" is not allowed (only user.* and security.capability)`);
  if (Buffer.byteLength(name) > MAX_XATTR_NAME_BYTES) throw refuse("BAD_XATTR", "extended attribute name is too long");
  if (name.includes("\0")) throw refuse("BAD_XATTR", "extended attribute name contains a NUL byte");
  if (Buffer.byteLength(value) > MAX_XATTR_VALUE_BYTES) {
    throw refuse("BAD_XATTR", `extended attribute "${printable(name)}" value is larger than ${MAX_XATTR_VALUE_BYTES} bytes`);
  }
}
