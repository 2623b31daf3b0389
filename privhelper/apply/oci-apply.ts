// Applies one OCI image layer (a tar, pushed in chunks) to a directory tree, with OCI whiteout
// semantics. A guard by itself: every path is resolved from a directory fd of the image root,
// never by the process's root or working directory:
//   - parent directories with openat2(RESOLVE_IN_ROOT) (libc.openInRoot): symlinks of the image
//     are followed as the image means them, but absolute targets restart at the image root and
//     ".." there stays there, so no link can lead outside, whatever the layer or lower layers hold;
//   - the entry itself relative to its parent's fd, never following a symlink at the last
//     component (O_NOFOLLOW, AT_SYMLINK_NOFOLLOW, or on the fd it created): an entry replaces what
//     is at its path, it never writes through it.
// In production the child also chroots into the image's filesystem: the kernel's second fence.
// Synchronous system calls on purpose: one thing at a time, straight from the read buffer.
import { closeSync, constants, fchmodSync, fchownSync, ftruncateSync, writeSync } from "node:fs";
import { crashParentPoint, crashPoint } from "../crash-points.ts";
import {
  AT_REMOVEDIR, AT_SYMLINK_NOFOLLOW, fchmodat, fchownat, fsetxattr, futimens, linkat, makedev, mkdirat, mknodat,
  O_PATH, openat, openInRoot, readDirectory, tryOpenat, S_IFBLK, S_IFCHR, S_IFIFO, symlinkat, unlinkat, utimensat, type FileTime,
} from "./libc.ts";
import { LayerRefused } from "./refusal.ts";
import { TarReader, type TarEntry, type TarSink } from "./tar-reader.ts";

export { LayerRefused };
export type ApplyResult = { entries: number };

const WHITEOUT_PREFIX = ".wh.";
const OPAQUE_MARKER = ".wh..wh..opq";
const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_DIRECTORY } = constants;
/** A directory to work in (a dirfd for the *at calls). */
const PARENT = O_PATH | O_DIRECTORY;
/** A directory to change (owner, mode, xattrs, times) or list, never through a symlink. */
const DIRECTORY = O_RDONLY | O_DIRECTORY | O_NOFOLLOW;
const NEW_FILE = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW;
const MAX_XATTR_NAME_BYTES = 255;
const MAX_XATTR_VALUE_BYTES = 65536;
// user.* is free-form data; security.capability is how images ship file capabilities (ping,
// setcap). Other namespaces (trusted.*, security.selinux, system.*) could steer host software
// that trusts them (overlayfs, LSMs) and are refused.
const ALLOWED_XATTR = /^(user\.[^\0]+|security\.capability)$/;

/**
 * Normalizes a tar path to "a/b/c": strips leading "/" and "./", drops "." and empty components.
 * Returns "" for the root itself. Refuses ".." (DOTDOT), NUL (NUL_IN_NAME) and "" (EMPTY_NAME).
 */
export function normalizeEntryName(name: string, entry: string, rule?: string): string {
  if (name === "") throw new LayerRefused(rule ?? "EMPTY_NAME", entry, "empty name");
  if (name.includes("\0")) throw new LayerRefused(rule ?? "NUL_IN_NAME", entry, "name contains NUL");
  const parts: string[] = [];
  for (const part of name.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") throw new LayerRefused(rule ?? "DOTDOT", entry, `name ${JSON.stringify(name)} contains a ".." component`);
    parts.push(part);
  }
  return parts.join("/");
}

const errno = (err: unknown) => (err as NodeJS.ErrnoException).code;
const splitPath = (rel: string): [string, string] => {
  const slash = rel.lastIndexOf("/");
  return slash === -1 ? ["", rel] : [rel.slice(0, slash), rel.slice(slash + 1)];
};

/** Applies a layer to the tree whose root directory is open at `rootFd`; push tar bytes, then finish(). */
export class LayerApplier implements TarSink {
  private readonly rootFd: number;
  private readonly reader = new TarReader(this);
  /** Paths this layer created or updated: opaque markers and whiteouts never remove them. */
  private readonly written = new Set<string>();
  /** Symlinks this layer made (and has not replaced): writing through one is THROUGH_SYMLINK. */
  private readonly ownSymlinks = new Set<string>();
  /** Ancestors of written paths: kept (and descended into) when pruning lower content. */
  private readonly ancestors = new Set<string>();
  /** Directory times, set at the end because adding children changes them. */
  private readonly directoryTimes = new Map<string, [FileTime, FileTime]>();
  /** The last parent directory resolved (tars list a directory's members together). */
  private cached: { rel: string; fd: number; stale: boolean } | null = null;
  /** The regular file being written, and what to set on it once its content is in. */
  private file: { fd: number; entry: TarEntry } | null = null;
  /** The member being applied, for error reports. */
  current = "";

  constructor(rootFd: number) {
    this.rootFd = rootFd;
  }

  push(chunk: Buffer): void {
    this.reader.push(chunk);
  }

  /** The input ended: checks the archive's end and sets directory times. */
  finish(): ApplyResult {
    this.reader.end();
    this.forgetParent();
    for (const [rel, [atime, mtime]] of this.directoryTimes) {
      const [dir, base] = splitPath(rel);
      const parent = rel === "" ? null : this.parent(dir, false);
      const fd = parent === null ? null : openDirectoryOrNull(parent, base);
      if (fd === null) continue; // replaced or removed since
      try {
        futimens(fd, atime, mtime);
      } finally {
        closeSync(fd);
      }
    }
    this.forgetParent();
    return { entries: this.reader.entries };
  }

  entry(entry: TarEntry): void {
    this.current = entry.name;
    const rel = normalizeEntryName(entry.name, entry.name);
    const [dir, base] = splitPath(rel);
    // The root entry ("./") is a directory: the image root's owner and mode are not the layer's.
    if (rel === "" && entry.type !== "directory") throw new LayerRefused("EMPTY_NAME", entry.name, "a non-directory entry cannot replace the root");
    checkOwner(entry);

    if (base.startsWith(WHITEOUT_PREFIX)) {
      if (entry.type !== "file" || entry.sparse || entry.size !== 0) throw new LayerRefused("BAD_WHITEOUT", entry.name, "a whiteout must be an empty regular file");
      if (base === OPAQUE_MARKER) {
        this.whiteoutParent(dir);
        return this.opaque(dir);
      }
      const target = base.slice(WHITEOUT_PREFIX.length);
      if (target === "" || target === "." || target === ".." || target.startsWith(WHITEOUT_PREFIX)) {
        throw new LayerRefused("BAD_WHITEOUT", entry.name, `unsupported whiteout ${JSON.stringify(base)}`);
      }
      this.whiteoutParent(dir);
      const parent = this.parent(dir, false);
      if (parent !== null) this.removeLower(parent, dir === "" ? target : `${dir}/${target}`, target);
      return;
    }
    if (entry.size !== 0 && entry.type !== "file") throw new LayerRefused("NONZERO_SIZE", entry.name, `a ${entry.type} entry with ${entry.size} bytes of content`);
    if (rel === "") return;
    checkXattrs(entry);
    this.notThroughOwnSymlink(dir, "");
    const parent = this.parent(dir, true)!;
    const mode = entry.mode;
    const atime = entry.atime ?? entry.mtime;

    switch (entry.type) {
      case "file": {
        const fd = this.replace(parent, rel, () => openat(parent, base, NEW_FILE, 0o600));
        this.file = { fd, entry };
        break; // content, metadata and close in data() and end()
      }
      case "directory": {
        let fd = openDirectoryOrNull(parent, base);
        if (fd === null) {
          this.replace(parent, rel, () => mkdirat(parent, base, 0o700));
          fd = openat(parent, base, DIRECTORY);
        }
        try {
          fchownSync(fd, entry.uid, entry.gid);
          fchmodSync(fd, mode); // after chown, which clears setgid
          for (const [name, value] of entry.xattrs) fsetxattr(fd, name, value);
        } finally {
          closeSync(fd);
        }
        this.directoryTimes.set(rel, [atime, entry.mtime]);
        break;
      }
      case "symlink": {
        if (entry.linkname === "" || entry.linkname.includes("\0")) throw new LayerRefused("SYMLINK_TARGET_INVALID", entry.name, "empty or NUL symlink target");
        // The link text is stored as is: it is only ever resolved inside the image.
        this.replace(parent, rel, () => symlinkat(entry.linkname, parent, base));
        fchownat(parent, base, entry.uid, entry.gid, AT_SYMLINK_NOFOLLOW);
        utimensat(parent, base, atime, entry.mtime, AT_SYMLINK_NOFOLLOW);
        break;
      }
      case "hardlink": {
        const targetRel = normalizeEntryName(entry.linkname, entry.name, "HARDLINK_TARGET_INVALID");
        if (targetRel === "" || targetRel === rel) throw new LayerRefused("HARDLINK_TARGET_INVALID", entry.name, `hard link to ${JSON.stringify(entry.linkname)}`);
        // The link replaces what is at its own path: a directory holding its target goes first.
        if (targetRel.startsWith(`${rel}/`)) throw new LayerRefused("HARDLINK_TARGET_INVALID", entry.name, `hard link to ${JSON.stringify(targetRel)}, under its own path`);
        const [targetDir, targetBase] = splitPath(targetRel);
        if (targetBase.startsWith(WHITEOUT_PREFIX)) throw new LayerRefused("HARDLINK_TARGET_INVALID", entry.name, `hard link to the whiteout ${JSON.stringify(targetRel)}`);
        // The validator's rule names: a target that is not there is HARDLINK_TO_MISSING, one that
        // cannot be linked (a directory) HARDLINK_TARGET_INVALID.
        this.notThroughOwnSymlink(targetDir, "hard link target ");
        const missing = () => new LayerRefused("HARDLINK_TO_MISSING", entry.name, `hard link target ${JSON.stringify(targetRel)} does not exist in the image`);
        const directory = () => new LayerRefused("HARDLINK_TARGET_INVALID", entry.name, `hard link target ${JSON.stringify(targetRel)} is a directory`);
        // The target's parents are resolved inside the root like any path; the target itself is
        // linked as it is (a symlink is linked, not followed). Metadata belongs to the inode.
        const targetParent = this.openParentUncached(targetDir);
        if (targetParent === null) throw missing();
        try {
          this.replace(parent, rel, () => linkat(targetParent, targetBase, parent, base));
        } catch (err) {
          if (errno(err) === "EPERM") throw directory();
          if (["ENOENT", "ENOTDIR", "ELOOP"].includes(errno(err) ?? "")) throw missing();
          throw err;
        } finally {
          if (targetParent !== this.rootFd) closeSync(targetParent);
        }
        break;
      }
      case "fifo":
      case "char":
      case "block": {
        // Device nodes are created as the layer says, as containerd and moby do: every host
        // mount of an image is nodev, and inside a VM they name the guest's own devices.
        const kind = entry.type === "fifo" ? S_IFIFO : entry.type === "char" ? S_IFCHR : S_IFBLK;
        const dev = entry.type === "fifo" ? 0n : makedev(entry.devmajor, entry.devminor);
        this.replace(parent, rel, () => mknodat(parent, base, kind | 0o600, dev));
        fchownat(parent, base, entry.uid, entry.gid, AT_SYMLINK_NOFOLLOW);
        // mknodat made a node (not a symlink) at this name of a directory we hold: chmod is exact.
        fchmodat(parent, base, mode);
        utimensat(parent, base, atime, entry.mtime, AT_SYMLINK_NOFOLLOW);
        break;
      }
    }
    this.markWritten(rel);
    // A hard link to a symlink is that symlink (linkat does not follow it): one of this layer's
    // when its target is.
    const symlink = entry.type === "symlink" || (entry.type === "hardlink" && this.ownSymlinks.has(normalizeEntryName(entry.linkname, entry.name)));
    if (symlink) this.ownSymlinks.add(rel);
    else this.ownSymlinks.delete(rel);
  }

  /** Content of the file being written; a sparse file's data regions come with their position. */
  data(chunk: Buffer, position?: number): void {
    const fd = this.file!.fd;
    for (let offset = 0; offset < chunk.length; ) {
      // pwrite at a sparse region's offset: what lies between regions is never written (a hole).
      const written = writeSync(fd, chunk, offset, chunk.length - offset, position === undefined ? null : position + offset);
      if (written <= 0) throw Object.assign(new Error("short write"), { code: "EIO" });
      offset += written;
    }
  }

  /** The member's content is in: set a file's metadata and close it. */
  entryEnd(): void {
    const file = this.file;
    if (file) {
      this.file = null;
      try {
        const { fd, entry } = file;
        if (entry.sparse) setLength(fd, entry);
        fchownSync(fd, entry.uid, entry.gid);
        fchmodSync(fd, entry.mode); // after chown, which clears setuid/setgid
        for (const [name, value] of entry.xattrs) fsetxattr(fd, name, value);
        futimens(fd, entry.atime ?? entry.mtime, entry.mtime);
      } finally {
        closeSync(file.fd);
      }
    }
    crashPoint("apply.entry-applied");
    crashParentPoint("helper.apply.child-running");
  }

  /** Closes the file left open by a failure. */
  abort(): void {
    if (this.file) closeSync(this.file.fd);
    this.file = null;
    this.forgetParent();
  }

  /**
   * Runs `create` (which fails with EEXIST when the name is taken); if the name was taken,
   * removes what is there at `rel` (recursively: tar's "an entry replaces what is at its path")
   * and creates again. Whatever was there is never followed.
   */
  private replace<T>(parent: number, rel: string, create: () => T): T {
    try {
      return create();
    } catch (err) {
      if (errno(err) !== "EEXIST") throw err;
    }
    this.invalidateParent(); // what is removed may be a directory or link the cached parent went through
    removeAt(parent, splitPath(rel)[1]);
    // Symlinks this layer made under a removed directory are gone with it: a later member under
    // the same path meets what is there now (THROUGH_SYMLINK only for a link that still stands).
    const under = `${rel}/`;
    for (const link of this.ownSymlinks) if (link.startsWith(under)) this.ownSymlinks.delete(link);
    return create();
  }

  /**
   * THROUGH_SYMLINK, the validator's rule: a path whose parents go through a symlink this layer
   * made. Resolving inside the root would keep the write in the image anyway; a layer that means
   * to write through a link it planted itself is refused by both guards, with one name.
   */
  private notThroughOwnSymlink(dir: string, what: string): void {
    if (this.ownSymlinks.size === 0 || dir === "") return;
    for (let i = dir.indexOf("/"); ; i = dir.indexOf("/", i + 1)) {
      const prefix = i === -1 ? dir : dir.slice(0, i);
      if (this.ownSymlinks.has(prefix)) {
        throw new LayerRefused("THROUGH_SYMLINK", this.current, `${what}${JSON.stringify(this.current)} goes through ${JSON.stringify(prefix)}, a symlink made earlier in this layer`);
      }
      if (i === -1) return;
    }
  }

  /**
   * A whiteout's directory, as for any member: not through a symlink of this layer
   * (THROUGH_SYMLINK), not under a non-directory (PARENT_NOT_DIR). Absent, or under a link loop,
   * it is simply nothing to delete.
   */
  private whiteoutParent(dir: string): void {
    this.notThroughOwnSymlink(dir, "");
    if (dir === "") return;
    let fd: number;
    try {
      fd = openInRoot(this.rootFd, dir, PARENT);
    } catch (err) {
      if (errno(err) === "ENOTDIR") throw new LayerRefused("PARENT_NOT_DIR", this.current, `a parent of ${JSON.stringify(this.current)} is not a directory`);
      if (errno(err) === "ENOENT" || errno(err) === "ELOOP") return;
      throw err;
    }
    closeSync(fd);
  }

  /** The parent directory `dir` resolved inside the root; created (0755) when `create`, else null if absent. */
  private parent(dir: string, create: boolean): number | null {
    if (dir === "") return this.rootFd;
    if (this.cached?.rel === dir && !this.cached.stale) return this.cached.fd;
    const fd = create ? this.makeParents(dir) : this.openParentUncached(dir);
    if (fd === null) return null;
    this.forgetParent();
    this.cached = { rel: dir, fd, stale: false };
    return fd;
  }

  private openParentUncached(dir: string): number | null {
    if (dir === "") return this.rootFd;
    try {
      return openInRoot(this.rootFd, dir, PARENT);
    } catch (err) {
      if (["ENOENT", "ENOTDIR", "ELOOP"].includes(errno(err) ?? "")) return null;
      throw err;
    }
  }

  private makeParents(dir: string): number {
    const notDir = () => new LayerRefused("PARENT_NOT_DIR", this.current, `a parent of ${JSON.stringify(this.current)} is not a directory (or a link to a missing one, or a link loop)`);
    try {
      return openInRoot(this.rootFd, dir, PARENT);
    } catch (err) {
      if (errno(err) === "ENOTDIR" || errno(err) === "ELOOP") throw notDir();
      if (errno(err) !== "ENOENT") throw err;
    }
    // Some component is missing: walk down, creating what is missing (root-owned 0755, as tar does).
    const parts = dir.split("/");
    let at = this.rootFd;
    let creating = false;
    for (let i = 0; i < parts.length; i++) {
      let next: number;
      if (!creating) {
        try {
          next = openInRoot(this.rootFd, parts.slice(0, i + 1).join("/"), PARENT);
        } catch (err) {
          if (errno(err) === "ENOTDIR" || errno(err) === "ELOOP") throw notDir();
          if (errno(err) !== "ENOENT") throw err;
          creating = true;
        }
      }
      if (creating) {
        try {
          mkdirat(at, parts[i]!, 0o755);
          next = openat(at, parts[i]!, PARENT | O_NOFOLLOW);
        } catch (err) {
          if (at !== this.rootFd) closeSync(at);
          // EEXIST: the missing component is a dangling symlink; we do not create its target.
          if (errno(err) === "EEXIST" || errno(err) === "ENOTDIR" || errno(err) === "ELOOP") throw notDir();
          throw err;
        }
      }
      if (at !== this.rootFd) closeSync(at);
      at = next!;
    }
    return at;
  }

  /** The tree changed in a way that may change what the cached path names; the fd stays open
   *  (the current member may still be using it) until the next lookup. */
  private invalidateParent(): void {
    if (this.cached) this.cached.stale = true;
  }

  private forgetParent(): void {
    if (this.cached) closeSync(this.cached.fd);
    this.cached = null;
  }

  private markWritten(rel: string): void {
    this.written.add(rel);
    for (let slash = rel.lastIndexOf("/"); slash > 0; slash = rel.lastIndexOf("/", slash - 1)) this.ancestors.add(rel.slice(0, slash));
  }

  private isKept(rel: string): boolean {
    return this.written.has(rel) || this.ancestors.has(rel);
  }

  /** An opaque marker in `dir`: removes every child of `dir` that this layer did not write. */
  private opaque(dir: string): void {
    this.invalidateParent();
    const [up, base] = splitPath(dir);
    const parent = dir === "" ? this.rootFd : this.openParentUncached(up);
    if (parent === null) return;
    try {
      // The directory itself is not followed if it is a link: a link is not an opaque directory.
      const fd = dir === "" ? openat(this.rootFd, ".", DIRECTORY) : openDirectoryOrNull(parent, base);
      if (fd === null) return;
      try {
        this.pruneLowerChildren(fd, dir);
      } finally {
        closeSync(fd);
      }
    } finally {
      if (parent !== this.rootFd) closeSync(parent);
    }
  }

  /** A whiteout: removes `name` (at `rel`) as it exists in lower layers; this layer's own entries stay. */
  private removeLower(parent: number, rel: string, name: string | Buffer): void {
    if (!this.isKept(rel)) {
      this.invalidateParent();
      removeAt(parent, name);
      return;
    }
    const fd = openDirectoryOrNull(parent, name);
    if (fd === null) return;
    try {
      this.pruneLowerChildren(fd, rel);
    } finally {
      closeSync(fd);
    }
  }

  private pruneLowerChildren(fd: number, rel: string): void {
    for (const name of readDirectory(fd)) {
      const text = name.toString("utf8", 0, name.length - 1);
      this.removeLower(fd, rel === "" ? text : `${rel}/${text}`, name);
    }
  }
}

/** A directory at `name` in `parent` (not through a symlink), opened; null if it is anything else or nothing. */
function openDirectoryOrNull(parent: number, name: string | Buffer): number | null {
  // Called for every directory entry, and usually fails on a fresh tree: no exception for that.
  const fd = tryOpenat(parent, name, DIRECTORY);
  if (typeof fd === "number") return fd;
  if (fd === "ENOENT" || fd === "ENOTDIR" || fd === "ELOOP") return null;
  return openat(parent, name, DIRECTORY); // anything else: fails again, with a full error
}

/** rm -rf of `name` in `parent`, never following a symlink; nothing there is fine. */
function removeAt(parent: number, name: string | Buffer): void {
  try {
    unlinkat(parent, name, 0);
    return;
  } catch (err) {
    if (errno(err) === "ENOENT") return;
    if (errno(err) !== "EISDIR") throw err;
  }
  const fd = openat(parent, name, DIRECTORY);
  try {
    for (const child of readDirectory(fd)) removeAt(fd, child);
  } finally {
    closeSync(fd);
  }
  unlinkat(parent, name, AT_REMOVEDIR);
}

/**
 * A sparse file's length, holes included (a hole at the end is no region, and an all-hole file
 * has no data at all). The per-file size limit is the agent's (the validator's ENTRY_TOO_LARGE);
 * here the filesystem's own bound is the only one, refused by the same rule.
 */
function setLength(fd: number, entry: TarEntry): void {
  try {
    ftruncateSync(fd, entry.sparse!.realSize);
  } catch (err) {
    if (errno(err) === "EFBIG" || errno(err) === "EINVAL") throw new LayerRefused("ENTRY_TOO_LARGE", entry.name, `the filesystem cannot hold a file of ${entry.sparse!.realSize} bytes`);
    throw err;
  }
}

const MAX_ID = 0xfffffffe; // (uid_t)-1 means "unchanged" to chown(2)

/** BAD_OWNER: ids from the ustar fields (octal or base-256) or PAX records, 0..4294967294. */
function checkOwner(entry: TarEntry): void {
  for (const [field, id] of [["uid", entry.uid], ["gid", entry.gid]] as const) {
    if (!Number.isInteger(id) || id < 0 || id > MAX_ID) throw new LayerRefused("BAD_OWNER", entry.name, `${field} ${id} is outside 0..${MAX_ID}`);
  }
}

function checkXattrs(entry: TarEntry): void {
  for (const [name, value] of entry.xattrs) {
    const refuse = (why: string) => new LayerRefused("BAD_XATTR", entry.name, `extended attribute ${JSON.stringify(name)}: ${why}`);
    if (!ALLOWED_XATTR.test(name)) throw refuse("not allowed (only user.* and security.capability)");
    if (Buffer.byteLength(name) > MAX_XATTR_NAME_BYTES || value.length > MAX_XATTR_VALUE_BYTES) throw refuse("name or value too long");
    if (entry.type === "hardlink") continue; // a hard link shares its target's inode and attributes
    if (name === "security.capability" && entry.type !== "file") throw refuse("file capabilities can only be set on a regular file");
    if (entry.type === "symlink") throw refuse("user.* xattrs cannot be set on a symlink");
    // Linux allows user.* only on regular files and directories (xattr(7)).
    if (entry.type !== "file" && entry.type !== "directory") throw refuse(`user.* xattrs cannot be set on a ${entry.type}`);
  }
}

/**
 * Applies the tar `chunks` to the directory `root` (test and fixture use; the child drives a
 * LayerApplier itself). Compressed input must be decompressed by the caller.
 */
export async function applyLayer(root: string, chunks: Iterable<Buffer> | AsyncIterable<Buffer>): Promise<ApplyResult> {
  const rootFd = openat(-100, root, DIRECTORY);
  const applier = new LayerApplier(rootFd);
  try {
    for await (const chunk of chunks) applier.push(chunk);
    return applier.finish();
  } catch (err) {
    applier.abort();
    throw withEntry(err, applier.current);
  } finally {
    closeSync(rootFd);
  }
}

/** Names the member in system errors too (ENOSPC, EIO...): it is what an operator needs. */
export function withEntry(err: unknown, entry: string): unknown {
  if (err instanceof Error && !(err instanceof LayerRefused)) Object.assign(err, { entry });
  return err;
}
