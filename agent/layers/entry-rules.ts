// The per-member rules of a layer, applied to each header the tar reader decodes, in archive
// order. They need a little memory of earlier members (hardlink targets, whiteouts, symlinks):
// names are kept as 96-bit hashes so a hostile layer with a million 4 KiB names cannot make the
// agent hold 4 GB.
import { hash } from "node:crypto";
import type { Compression } from "./compression.ts";
import { LayerValidationError, printable, type LayerRule } from "./errors.ts";
import { baseOf, joinName, normalizeEntryName, parentOf, type PathLimits } from "./names.ts";
import type { TarMember } from "./tar-reader.ts";

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
  /** Character and block devices (created inside the image; every host mount is nodev). */
  devices: number;
  /** `.wh.NAME` members. */
  whiteouts: number;
  /** `.wh..wh..opq` members. */
  opaqueDirs: number;
  /** Bytes of regular-file content written (a sparse file's data regions, not its holes). */
  fileBytes: number;
  /** GNU sparse files, and the data regions of their maps (each may cost a partly written block). */
  sparseFiles: number;
  sparseRegions: number;
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

type SeenKind = "dir" | "symlink" | "other";
/**
 * What this layer put at a path, as the applier's tree holds it: its kind, the number of the
 * member that put it there (`at`; a directory's parents are put there by the member that implies
 * them), and for a directory from which member on its content is this layer's alone (`since`: a
 * directory made where no directory of this layer stood is new and empty). A record under a path
 * that a later member replaced (a non-directory over a directory, maybe a new directory after it)
 * went with it: it is live only when made at or after every parent's `since`.
 */
type Seen = { kind: SeenKind; at: number; since: number };

export class EntryRules {
  readonly summary: LayerSummary = {
    entries: 0,
    files: 0,
    directories: 0,
    symlinks: 0,
    hardlinks: 0,
    fifos: 0,
    devices: 0,
    whiteouts: 0,
    opaqueDirs: 0,
    fileBytes: 0,
    sparseFiles: 0,
    sparseRegions: 0,
    tarBytes: 0,
    compression: "none",
    objectBytes: 0,
    hasRootEntry: false,
    lowerLayerLinks: 0,
    notes: [],
  };

  readonly #limits: EntryLimits;
  /** What this layer put at each path, named or implied as a parent (hashed name -> record). */
  readonly #seen = new Map<string, Seen>();
  /** Directories of this layer that a later non-directory replaced: records under them may be
   *  stale, so parents are checked in full (rare: no image build writes a path twice). */
  #replacedDirs = 0;
  /** Cheap hashes of the names of this layer's symlinks and other non-directories (to test every
   *  parent of every member quickly); a hit is confirmed in #seen. */
  readonly #nonDirHints = new Set<number>();
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
  check(member: TarMember): void {
    const refuse: Refuse = (rule, message) => new LayerValidationError(rule, printable(member.name), message);

    if (++this.summary.entries > this.#limits.maxEntries) {
      throw refuse("TOO_MANY_ENTRIES", `layer has more than ${this.#limits.maxEntries} entries`);
    }
    const type = member.type;
    if (type === null) throw refuse("UNKNOWN_TYPE", `entry type flag ${JSON.stringify(member.typeflag)} is not supported`);

    const name = normalizeEntryName(member.name, this.#limits);
    if (name === "" && type !== "directory") throw refuse("EMPTY_NAME", `a ${type} entry names the image root`);
    checkOwner(member, refuse);
    if (name !== "" && this.#linkedAhead.size > 0 && this.#linkedAhead.has(key(name))) {
      // Applied in order, the earlier link would find no target (or a lower layer's file that
      // this very entry then replaces): a link must come after its target.
      throw refuse("HARDLINK_TARGET_INVALID", `"${printable(name)}" is the target of an earlier hardlink; a hardlink must follow its target`);
    }
    // In the applier's order: what the member is, then where it goes.
    const base = baseOf(name);
    if (base.startsWith(WHITEOUT_PREFIX)) {
      this.#whiteout(name, base, member, refuse);
      this.#parentsAreDirs(name, "", "PARENT_NOT_DIR", refuse);
      return;
    }
    const index = this.summary.entries;
    if (member.sparse && type !== "file") throw refuse("BAD_SPARSE_MAP", `a ${type} entry cannot be a sparse file`);
    if (type === "file") {
      // A sparse file's limit is its length, holes included: that is what a reader of it sees.
      const length = member.sparse?.realSize ?? member.size;
      if (length > this.#limits.maxEntryBytes) {
        throw refuse("ENTRY_TOO_LARGE", `${member.sparse ? "sparse " : ""}file of ${length} bytes is larger than ${this.#limits.maxEntryBytes}`);
      }
    } else if (member.size !== 0) {
      throw refuse("NONZERO_SIZE", `a ${type} entry carries ${member.size} bytes of content`);
    }
    for (const [xattr, value] of member.xattrs) checkXattr(xattr, value, type, refuse);
    const parentsSince = this.#parentsAreDirs(name, "", "PARENT_NOT_DIR", refuse);
    this.#implyParents(name, index);
    let kind: SeenKind = type === "directory" ? "dir" : type === "symlink" ? "symlink" : "other";

    switch (type) {
      case "file":
        this.summary.files++;
        // What is written: a sparse file's holes are never stored, in the tar or in the image.
        this.summary.fileBytes += member.size;
        if (member.sparse) {
          this.summary.sparseFiles++;
          this.summary.sparseRegions += member.sparse.regions;
        }
        break;
      case "directory":
        if (name === "") this.summary.hasRootEntry = true;
        this.summary.directories++;
        break;
      case "symlink":
        this.#symlinkTarget(member.linkname, refuse);
        this.summary.symlinks++;
        break;
      case "link":
        // A hard link to a symlink is that symlink (linkat does not follow it).
        if (this.#hardlinkTarget(name, member.linkname, refuse) === "symlink") kind = "symlink";
        this.summary.hardlinks++;
        break;
      case "fifo":
        this.summary.fifos++;
        break;
      case "character-device":
      case "block-device":
        // Created as the layer says (mknod), as containerd and moby do: every host mount of an
        // image is nodev, and inside a VM the node names the guest's own device.
        this.summary.devices++;
        break;
    }
    if (name === "") return;
    const hashed = key(name);
    const before = live(this.#seen.get(hashed), parentsSince);
    if (kind === "dir") {
      // A directory over a directory keeps its content; over anything else it starts empty.
      this.#seen.set(hashed, { kind, at: index, since: before?.kind === "dir" ? before.since : index });
      return;
    }
    if (before?.kind === "dir") this.#replacedDirs++;
    this.#seen.set(hashed, { kind, at: index, since: index });
    this.#nonDirHints.add(cheapHash(name));
  }

  /**
   * THROUGH_SYMLINK: `name`'s parent path must not go through a symlink an earlier member of this
   * layer created (and no later member replaced): `a -> /etc` then `a/passwd`, whiteouts and
   * opaque markers under such a link, a hardlink whose target goes through one. The applier
   * resolves every path inside the image anyway; here the layer says it means to write through
   * a link it planted itself, which no image build does.
   * And `notDirRule` (PARENT_NOT_DIR for a member, HARDLINK_TO_MISSING for a link's target): a
   * parent that an earlier member of this layer made a file, a device or a fifo. The applier
   * keeps this layer's own entries (a whiteout never removes them), so that parent cannot be a
   * directory when the member is applied.
   * Only what still stands counts: a symlink under a directory that a later member replaced is
   * gone. Returns the parents' `since` (see Seen): records under `name` older than it are gone.
   */
  #parentsAreDirs(name: string, what: string, notDirRule: "PARENT_NOT_DIR" | "HARDLINK_TO_MISSING", refuse: Refuse): number {
    let since = -1;
    if (this.#nonDirHints.size === 0) return since;
    // One pass over the name: the hash of each parent is the running hash at its "/". Only a
    // path that once held a non-directory can make records under it stale (see Seen).
    let hash = FNV_OFFSET;
    for (let i = 0; i < name.length; i++) {
      const unit = name.charCodeAt(i);
      if (unit === SLASH && this.#nonDirHints.has(hash >>> 0)) {
        const parent = name.slice(0, i);
        const seen = live(this.#seen.get(key(parent)), since);
        if (seen?.kind === "symlink") {
          throw refuse("THROUGH_SYMLINK", `${what}"${printable(name)}" goes through "${printable(parent)}", a symlink created earlier in this layer`);
        }
        if (seen?.kind === "other") {
          throw refuse(notDirRule, `${what}"${printable(name)}" is under "${printable(parent)}", which an earlier member of this layer made a non-directory`);
        }
        if (seen) since = Math.max(since, seen.since);
      }
      hash = Math.imul(hash ^ unit, FNV_PRIME);
    }
    return since;
  }

  #whiteout(name: string, base: string, member: TarMember, refuse: Refuse): void {
    if (member.type !== "file") throw refuse("BAD_WHITEOUT", `a whiteout must be a regular file entry, not ${member.type}`);
    if (member.sparse) throw refuse("BAD_WHITEOUT", "a whiteout cannot be a sparse file");
    if (member.size !== 0) throw refuse("BAD_WHITEOUT", `a whiteout carries ${member.size} bytes of content`);
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

  #symlinkTarget(target: string, refuse: Refuse): void {
    // Absolute or relative, the text is fine: the applier resolves it inside the image's root,
    // and so does the kernel at run time.
    if (!target) throw refuse("SYMLINK_TARGET_INVALID", "symlink has an empty target");
    if (target.includes("\0")) throw refuse("SYMLINK_TARGET_INVALID", "symlink target contains a NUL byte");
    if (target.includes("\uFFFD")) throw refuse("BAD_ENCODING", "symlink target is not valid UTF-8");
    if (Buffer.byteLength(target) > this.#limits.maxLinkTargetBytes) {
      throw refuse("SYMLINK_TARGET_INVALID", `symlink target is longer than ${this.#limits.maxLinkTargetBytes} bytes`);
    }
  }

  /** Checks a hardlink's target; returns what it is in this layer (undefined: a lower layer's). */
  #hardlinkTarget(name: string, rawTarget: string, refuse: Refuse): SeenKind | undefined {
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
    // The link replaces what is at its own path: a directory holding its target goes first.
    if (target.startsWith(`${name}/`)) throw refuse("HARDLINK_TARGET_INVALID", `hardlink targets "${printable(target)}", under its own path (which it replaces)`);
    if (baseOf(target).startsWith(WHITEOUT_PREFIX)) throw refuse("HARDLINK_TARGET_INVALID", "hardlink targets a whiteout");
    const since = this.#parentsAreDirs(target, "hardlink target ", "HARDLINK_TO_MISSING", refuse);

    const seen = live(this.#seen.get(key(target)), since);
    // A directory of this layer, named or implied (a parent of a member, this link's own included).
    if (seen?.kind === "dir") throw refuse("HARDLINK_TARGET_INVALID", `hardlink targets directory "${printable(target)}"`);
    if (seen) return seen.kind;
    if (this.#deletedHere(target)) {
      throw refuse("HARDLINK_TO_MISSING", `hardlink target "${printable(target)}" was deleted earlier in this layer`);
    }
    this.#linkedAhead.add(key(target));
    this.summary.lowerLayerLinks++;
    this.#note(`hardlink "${printable(name)}" -> "${printable(target)}" refers to a lower layer`);
    return undefined;
  }

  /**
   * Records `name`'s parents as directories of this layer (the applier makes missing ones), new
   * and empty where none of this layer stands (#parentsAreDirs has refused non-directories).
   */
  #implyParents(name: string, index: number): void {
    const fresh: Seen = { kind: "dir", at: index, since: index };
    if (this.#replacedDirs === 0) {
      // Every record is live: the parents above one of this layer's directories are too.
      for (let parent = parentOf(name); parent !== "" && !this.#seen.has(key(parent)); parent = parentOf(parent)) this.#seen.set(key(parent), fresh);
      return;
    }
    let since = -1;
    for (let slash = name.indexOf("/"); slash !== -1; slash = name.indexOf("/", slash + 1)) {
      const hashed = key(name.slice(0, slash));
      const seen = live(this.#seen.get(hashed), since);
      if (seen) {
        since = Math.max(since, seen.since);
      } else {
        this.#seen.set(hashed, fresh);
        since = index;
      }
    }
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

/** A record that still stands under parents whose content is new since member `since` (see Seen). */
function live(seen: Seen | undefined, since: number): Seen | undefined {
  return seen !== undefined && seen.at >= since ? seen : undefined;
}

/** 96 bits of the name's SHA-256 (one-shot crypto.hash: about 6x cheaper than a Hash object). */
function key(name: string): string {
  return hash("sha256", name, "binary").slice(0, 12);
}

const FNV_OFFSET = 0x811c9dc5;
const FNV_PRIME = 0x01000193;
const SLASH = 0x2f;

/** FNV-1a (32 bits) over the UTF-16 units of `text`: a quick pre-filter, never trusted alone. */
function cheapHash(text: string): number {
  let hash = FNV_OFFSET;
  for (let i = 0; i < text.length; i++) hash = Math.imul(hash ^ text.charCodeAt(i), FNV_PRIME);
  return hash >>> 0;
}

function checkOwner(member: TarMember, refuse: Refuse): void {
  for (const [field, id] of [["uid", member.uid], ["gid", member.gid]] as const) {
    if (!Number.isInteger(id) || id < 0 || id > MAX_UID) throw refuse("BAD_OWNER", `${field} ${id} is out of range (0..${MAX_UID})`);
  }
}

/**
 * Extended attributes (SCHILY.xattr PAX records, binary values): only user.* and
 * security.capability, and only where Linux can set them, so the applier reproduces every one:
 * user.* on regular files and directories (and hardlinks to them), security.capability on
 * regular files.
 */
function checkXattr(name: string, value: Buffer, type: string, refuse: Refuse): void {
  const user = name.startsWith("user.") && name.length > "user.".length;
  if (!user && name !== "security.capability") {
    throw refuse("BAD_XATTR", `extended attribute "${printable(name)}" is not allowed (only user.* and security.capability)`);
  }
  if (Buffer.byteLength(name) > MAX_XATTR_NAME_BYTES) throw refuse("BAD_XATTR", "extended attribute name is too long");
  if (name.includes("\0")) throw refuse("BAD_XATTR", "extended attribute name contains a NUL byte");
  if (value.length > MAX_XATTR_VALUE_BYTES) {
    throw refuse("BAD_XATTR", `extended attribute "${printable(name)}" value is larger than ${MAX_XATTR_VALUE_BYTES} bytes`);
  }
  if (user && type === "symlink") throw refuse("BAD_XATTR", `user.* xattrs cannot be set on a symlink ("${printable(name)}")`);
  if (user && type !== "file" && type !== "directory" && type !== "link") {
    throw refuse("BAD_XATTR", `user.* xattrs can only be set on regular files and directories, not on a ${type} ("${printable(name)}")`);
  }
  if (!user && type !== "file") throw refuse("BAD_XATTR", `security.capability can only be set on a regular file, not on a ${type}`);
}
