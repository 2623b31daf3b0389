// Applies one OCI image layer (a tar stream) to a directory tree, with OCI whiteout semantics.
// In production the root is "/" of a chroot into the image's filesystem, so the kernel confines
// every path; the checks here are the first line of defence, not the only one.
// Synchronous fs calls on purpose: the applier does one thing at a time, and going through
// libuv's thread pool for ~10 calls per entry made it several times slower on real layers.
import {
  chmodSync, closeSync, constants, fchmodSync, fchownSync, lchownSync, linkSync, lstatSync, lutimesSync,
  mkdirSync, openSync, readdirSync, rmSync, symlinkSync, writeSync, type Stats,
} from "node:fs";
import { posix } from "node:path";
import type { Readable } from "node:stream";
import tar from "tar-stream";
import { crashParentPoint, crashPoint } from "../crash-points.ts";

export type ApplySyscalls = {
  mkfifo(path: string, mode: number): void;
  lsetxattr(path: string, name: string, value: Buffer): void;
};

export type ApplyResult = { entries: number };

/** Why a layer is refused; `rule` names the rule, `entry` the tar entry that broke it. */
export class LayerRefused extends Error {
  readonly rule: string;
  readonly entry: string;
  constructor(rule: string, entry: string, message: string) {
    super(message);
    this.name = "LayerRefused";
    this.rule = rule;
    this.entry = entry;
  }
}

const WHITEOUT_PREFIX = ".wh.";
const OPAQUE_MARKER = ".wh..wh..opq";
const XATTR_PAX_PREFIX = "SCHILY.xattr.";
const MAX_ID = 0xfffffffe; // 0xffffffff means "leave unchanged" to chown(2)

/**
 * Normalizes a tar path to "a/b/c": strips leading "./" and "/", drops "." and empty components.
 * Returns "" for the root itself. Refuses "..", NUL and names that are empty to begin with.
 */
export function normalizeEntryName(name: string, entry: string, rule = "BAD_NAME"): string {
  if (name === "") throw new LayerRefused(rule, entry, "empty name");
  if (name.includes("\0")) throw new LayerRefused(rule, entry, "name contains NUL");
  const parts: string[] = [];
  for (const part of name.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") throw new LayerRefused(rule, entry, `name ${JSON.stringify(name)} contains a ".." component`);
    parts.push(part);
  }
  return parts.join("/");
}

type Header = Omit<tar.Header, "pax" | "type"> & { type: string | null; pax?: Record<string, string> | null };

/** Applies the tar stream in `source` under `root`. Throws LayerRefused or a Node fs error. */
export async function applyLayer(root: string, source: Readable, sys: ApplySyscalls): Promise<ApplyResult> {
  const applier = new LayerApplier(root, sys);
  // tar-stream's extract is a streamx Writable: Node's pipe() feeds it, errors are forwarded by hand.
  const extract = tar.extract();
  // When the archive is malformed, the entry being read only says "Stream was destroyed":
  // keep extract's own error, which names the real cause.
  let streamError: unknown = null;
  extract.on("error", (err) => (streamError ??= err));
  source.on("error", (err) => extract.destroy(err));
  source.pipe(extract);
  let entries = 0;
  try {
    // The iteration ends when extract closes, i.e. after the whole source was written into it.
    for await (const entry of extract) {
      entries++;
      try {
        await applier.apply(entry.header as Header, entry as AsyncIterable<Buffer>);
      } catch (err) {
        // Name the entry in system errors too (ENOSPC, EIO...): it is what an operator needs.
        if (err instanceof Error && !(err instanceof LayerRefused)) Object.assign(err, { entry: entry.header.name });
        throw err;
      }
      entry.resume(); // drain whatever the entry did not read (e.g. a whiteout's body)
      crashPoint("apply.entry-applied");
      crashParentPoint("helper.apply.child-running");
    }
  } catch (err) {
    source.destroy();
    extract.destroy();
    throw asRefusalIfTarError(err instanceof LayerRefused ? err : streamError ?? err);
  }
  applier.finish();
  return { entries };
}

// tar-stream reports malformed archives as plain Errors with these messages.
function asRefusalIfTarError(err: unknown): unknown {
  if (err instanceof Error && !(err instanceof LayerRefused) && !("code" in err) &&
      /Invalid tar header|Unexpected end of data|Header exceeds max size|Invalid header/.test(err.message)) {
    return new LayerRefused("BAD_TAR", "", `malformed tar: ${err.message}`);
  }
  return err;
}

class LayerApplier {
  private readonly root: string;
  private readonly sys: ApplySyscalls;
  /** Paths this layer created or updated: opaque markers and whiteouts never remove them. */
  private readonly written = new Set<string>();
  /** Ancestors of written paths: kept (and descended into) when pruning lower content. */
  private readonly ancestors = new Set<string>();
  /** Directory mtimes, set at the end because adding children changes them. */
  private readonly directoryTimes = new Map<string, Date>();

  constructor(root: string, sys: ApplySyscalls) {
    this.root = root;
    this.sys = sys;
  }

  private full(rel: string): string {
    return posix.join(this.root, rel);
  }

  async apply(header: Header, body: AsyncIterable<Buffer>): Promise<void> {
    const entry = header.name;
    const rel = normalizeEntryName(entry, entry);
    const base = posix.basename(rel);
    const dir = posix.dirname(rel) === "." ? "" : posix.dirname(rel);

    if (base.startsWith(WHITEOUT_PREFIX)) {
      if (base === OPAQUE_MARKER) return this.pruneLowerChildren(dir);
      const target = base.slice(WHITEOUT_PREFIX.length);
      if (target === "" || target === "." || target === ".." || target.startsWith(WHITEOUT_PREFIX)) {
        throw new LayerRefused("BAD_WHITEOUT", entry, `unsupported whiteout ${JSON.stringify(base)}`);
      }
      return this.removeLower(dir === "" ? target : `${dir}/${target}`);
    }

    const type = header.type;
    if (type === "character-device" || type === "block-device") {
      // Device nodes in an image would give whoever mounts it raw access to host devices
      // (mounts use nodev, but the image may be booted elsewhere). Refused outright.
      throw new LayerRefused("DEVICE_NODE", entry, `device node (${type}) not allowed`);
    }
    if (header.pax && Object.keys(header.pax).some((key) => key.startsWith("GNU.sparse."))) {
      throw new LayerRefused("SPARSE_FILE", entry, "PAX sparse files are not supported");
    }
    if (rel === "") {
      // The root entry ("./"): the image root's ownership and mode are not the layer's to set.
      if (type === "directory") return;
      throw new LayerRefused("BAD_NAME", entry, "a non-directory entry cannot replace the root");
    }

    const owner = ownerOf(header, entry);
    const mtime = mtimeOf(header, entry);
    const mode = (header.mode ?? 0o644) & 0o7777;
    const xattrs = xattrsOf(header, entry);
    const path = this.full(rel);
    this.ensureParents(dir, entry);
    const existing = lstatOrNull(path);

    switch (type) {
      case "directory": {
        if (existing && !existing.isDirectory()) rmSync(path, { recursive: true, force: true });
        if (!existing?.isDirectory()) mkdirSync(path, { mode: 0o700 });
        lchownSync(path, owner.uid, owner.gid);
        chmodSync(path, mode); // after chown, which clears setuid/setgid
        this.setXattrs(path, xattrs);
        this.directoryTimes.set(rel, mtime);
        break;
      }
      case "file":
      case "contiguous-file": {
        if (existing) rmSync(path, { recursive: true, force: true });
        // O_EXCL|O_NOFOLLOW: never write through something that appeared at this path.
        const fd = openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
        try {
          for await (const chunk of body) writeAll(fd, chunk);
          fchownSync(fd, owner.uid, owner.gid);
          fchmodSync(fd, mode);
        } finally {
          closeSync(fd);
        }
        this.setXattrs(path, xattrs);
        lutimesSync(path, mtime, mtime);
        break;
      }
      case "symlink": {
        const target = header.linkname ?? "";
        if (target === "" || target.includes("\0")) throw new LayerRefused("BAD_LINK", entry, "empty or NUL symlink target");
        if (existing) rmSync(path, { recursive: true, force: true });
        // The link text is stored as is: inside the chroot even absolute targets stay in the image.
        symlinkSync(target, path);
        lchownSync(path, owner.uid, owner.gid);
        this.setXattrs(path, xattrs);
        lutimesSync(path, mtime, mtime);
        break;
      }
      case "link": {
        const targetRel = normalizeEntryName(header.linkname ?? "", entry, "HARDLINK_TARGET");
        if (targetRel === "" || targetRel === rel) throw new LayerRefused("HARDLINK_TARGET", entry, `hard link to ${JSON.stringify(header.linkname)}`);
        if (existing) rmSync(path, { recursive: true, force: true });
        const target = lstatOrNull(this.full(targetRel));
        if (!target || target.isDirectory()) {
          throw new LayerRefused("HARDLINK_TARGET", entry, `hard link target ${JSON.stringify(targetRel)} ${target ? "is a directory" : "does not exist"}`);
        }
        // Metadata belongs to the shared inode and was set by the target's own entry.
        linkSync(this.full(targetRel), path);
        break;
      }
      case "fifo": {
        if (existing) rmSync(path, { recursive: true, force: true });
        this.sys.mkfifo(path, 0o600);
        lchownSync(path, owner.uid, owner.gid);
        chmodSync(path, mode);
        this.setXattrs(path, xattrs);
        lutimesSync(path, mtime, mtime);
        break;
      }
      default:
        throw new LayerRefused("UNKNOWN_TYPE", entry, `unsupported entry type ${JSON.stringify(type)}`);
    }
    this.markWritten(rel);
  }

  private markWritten(rel: string): void {
    this.written.add(rel);
    for (let dir = posix.dirname(rel); dir !== "."; dir = posix.dirname(dir)) this.ancestors.add(dir);
  }

  private isKept(rel: string): boolean {
    return this.written.has(rel) || this.ancestors.has(rel);
  }

  /** Creates missing parent directories (0755, owned by root, as the helper runs as root). */
  private ensureParents(dir: string, entry: string): void {
    if (dir === "") return;
    try {
      mkdirSync(this.full(dir), { recursive: true, mode: 0o755 });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      // EEXIST/ENOTDIR: a parent is a file; ENOENT: a parent is a dangling symlink; ELOOP: a
      // parent is a symlink loop (say root -> /root, which inside the chroot names itself).
      if (code === "EEXIST" || code === "ENOTDIR" || code === "ENOENT" || code === "ELOOP") {
        throw new LayerRefused("PARENT_NOT_DIR", entry, `a parent of ${JSON.stringify(entry)} is not a directory`);
      }
      throw err;
    }
  }

  /** A whiteout: removes `rel` as it exists in lower layers; this layer's own entries stay. */
  private removeLower(rel: string): void {
    // Nothing there (a parent missing, not a directory, or a symlink loop): nothing to delete.
    // Checked with lstat first because rmSync reports ELOOP without an error code.
    const info = lstatOrNull(this.full(rel));
    if (!info) return;
    if (!this.isKept(rel)) {
      rmSync(this.full(rel), { recursive: true, force: true });
      return;
    }
    if (info.isDirectory()) this.pruneLowerChildren(rel);
  }

  /** An opaque directory: removes every child of `dir` that this layer did not write. */
  private pruneLowerChildren(dir: string): void {
    const info = lstatOrNull(this.full(dir));
    if (!info?.isDirectory()) return;
    for (const name of readdirSync(this.full(dir))) {
      this.removeLower(dir === "" ? name : `${dir}/${name}`);
    }
  }

  private setXattrs(path: string, xattrs: [string, Buffer][]): void {
    for (const [name, value] of xattrs) this.sys.lsetxattr(path, name, value);
  }

  /** Sets directory mtimes last; directories replaced or removed since are skipped. */
  finish(): void {
    for (const [rel, mtime] of this.directoryTimes) {
      const info = lstatOrNull(this.full(rel));
      if (info?.isDirectory()) lutimesSync(this.full(rel), mtime, mtime);
    }
  }
}

function writeAll(fd: number, chunk: Buffer): void {
  for (let offset = 0; offset < chunk.byteLength; ) {
    const written = writeSync(fd, chunk, offset);
    if (written <= 0) throw Object.assign(new Error("short write"), { code: "EIO" });
    offset += written;
  }
}

function lstatOrNull(path: string): Stats | null {
  try {
    return lstatSync(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // A parent that is missing, not a directory, or a symlink loop: no such path.
    if (code === "ENOENT" || code === "ENOTDIR" || code === "ELOOP") return null;
    throw err;
  }
}

function ownerOf(header: Header, entry: string): { uid: number; gid: number } {
  // PAX records carry ids too large for the ustar fields; tar-stream leaves them in header.pax.
  const uid = header.pax?.uid !== undefined ? Number(header.pax.uid) : header.uid ?? 0;
  const gid = header.pax?.gid !== undefined ? Number(header.pax.gid) : header.gid ?? 0;
  for (const id of [uid, gid]) {
    if (!Number.isInteger(id) || id < 0 || id > MAX_ID) throw new LayerRefused("BAD_OWNER", entry, `invalid uid/gid ${id}`);
  }
  return { uid, gid };
}

function mtimeOf(header: Header, entry: string): Date {
  const pax = header.pax?.mtime;
  const mtime = pax !== undefined ? new Date(Number(pax) * 1000) : header.mtime ?? new Date(0);
  if (Number.isNaN(mtime.getTime())) throw new LayerRefused("BAD_MTIME", entry, `invalid mtime ${pax}`);
  return mtime;
}

// user.* is free-form data; security.capability is how images ship file capabilities
// (e.g. ping). Other namespaces (trusted.*, security.selinux, system.*) could steer host
// software that trusts them (overlayfs, LSMs) and are refused.
const ALLOWED_XATTR = /^(user\.[^\0]+|security\.capability)$/;

function xattrsOf(header: Header, entry: string): [string, Buffer][] {
  const result: [string, Buffer][] = [];
  for (const [key, value] of Object.entries(header.pax ?? {})) {
    if (!key.startsWith(XATTR_PAX_PREFIX)) continue;
    const name = key.slice(XATTR_PAX_PREFIX.length);
    if (!ALLOWED_XATTR.test(name)) throw new LayerRefused("XATTR_NOT_ALLOWED", entry, `extended attribute ${JSON.stringify(name)} not allowed`);
    // tar-stream decodes PAX values as UTF-8; bytes that were not valid UTF-8 are already lost.
    if (value.includes("\uFFFD")) {
      throw new LayerRefused("XATTR_UNREADABLE", entry, `extended attribute ${name} holds bytes that cannot be read back exactly`);
    }
    result.push([name, Buffer.from(value, "utf8")]);
  }
  return result;
}
