// The helper opens a layer blob ITSELF and hands the applier the open file (issue 9, finding 1).
// The blob store lives in the agent's state directory, which the agent (possibly exploited) can
// rearrange at will: a symlink for `blobs` or `sha256` would make root read a file the agent
// cannot. So the path is walked one component at a time from "/", each opened with O_NOFOLLOW
// relative to the previous directory (openat: Node has no API for it, hence koffi), and the file
// found is then checked on its descriptor: a regular file, owned by the agent's uid, with one link
// and a sane size. The applier gets that descriptor and never opens a path itself.
import { closeSync, constants, fstatSync, openSync } from "node:fs";
import koffi from "koffi";
import { HelperFailure } from "./errors.ts";

const libc = koffi.load("libc.so.6");
const openat = libc.func("int openat(int dirfd, const char *path, int flags, ...)");
const ERRNO_NAMES = new Map(Object.entries(koffi.os.errno).map(([name, value]) => [value, name]));

const { O_RDONLY, O_DIRECTORY, O_NOFOLLOW, O_NONBLOCK, O_NOCTTY } = constants;
const O_CLOEXEC = 0o2000000; // Linux; the child gets its copy through dup2, which clears it
// The decompressed stream is capped at 8 GiB (one thin device); no stored blob is larger.
export const MAX_BLOB_BYTES = 8 * 1024 ** 3;

function openAt(dirFd: number, name: string, flags: number): number {
  const fd = openat(dirFd, name, flags | O_NOFOLLOW | O_CLOEXEC, "uint32", 0) as number;
  if (fd < 0) {
    const errno = koffi.errno();
    const error = new Error(`openat ${name}: ${ERRNO_NAMES.get(errno) ?? errno}`) as NodeJS.ErrnoException;
    error.code = ERRNO_NAMES.get(errno) ?? `errno ${errno}`;
    throw error;
  }
  return fd;
}

/**
 * Opens `<blobDir>/sha256/<hex>` for reading without following any symlink on the way, and
 * checks what it opened. Returns the descriptor (the caller closes it).
 */
export function openBlob(blobDir: string, digest: string, agentUid: number): number {
  const hex = digest.slice("sha256:".length);
  const components = [...blobDir.split("/").filter((c) => c !== ""), "sha256"];
  let dirFd = openSync("/", O_RDONLY | O_DIRECTORY);
  let walked = "";
  try {
    for (const component of components) {
      walked += `/${component}`;
      let next: number;
      try {
        next = openAt(dirFd, component, O_RDONLY | O_DIRECTORY);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === "ENOENT") throw new HelperFailure("BLOB_MISSING", `blob directory ${walked} does not exist`);
        if (code === "ELOOP" || code === "ENOTDIR") throw new HelperFailure("BLOB_REFUSED", `${walked} is a symbolic link or not a directory; the blob store must be reached without links`);
        throw err;
      }
      closeSync(dirFd);
      dirFd = next;
    }
    let fd: number;
    try {
      // O_NONBLOCK: a FIFO planted there must not hang the helper (refused below as not a file).
      fd = openAt(dirFd, hex, O_RDONLY | O_NONBLOCK | O_NOCTTY);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT") throw new HelperFailure("BLOB_MISSING", `blob ${digest} is not in ${walked}`);
      if (code === "ELOOP") throw new HelperFailure("BLOB_REFUSED", `blob ${walked}/${hex} is a symbolic link; refused`);
      throw err;
    }
    try {
      checkBlobFile(fd, `${walked}/${hex}`, agentUid);
    } catch (err) {
      closeSync(fd);
      throw err;
    }
    return fd;
  } finally {
    closeSync(dirFd);
  }
}

/** The opened blob must be a file the agent itself owns: the helper never reads on its behalf what it could not. */
function checkBlobFile(fd: number, path: string, agentUid: number): void {
  const info = fstatSync(fd);
  if (!info.isFile()) throw new HelperFailure("BLOB_REFUSED", `blob ${path} is not a regular file; refused`);
  if (info.uid !== agentUid) throw new HelperFailure("BLOB_REFUSED", `blob ${path} is owned by uid ${info.uid}, not the agent's uid ${agentUid}; refused`);
  if (info.nlink !== 1) throw new HelperFailure("BLOB_REFUSED", `blob ${path} has ${info.nlink} links; a blob has exactly one; refused`);
  if (info.size > MAX_BLOB_BYTES) throw new HelperFailure("BLOB_REFUSED", `blob ${path} is ${info.size} bytes, over the ${MAX_BLOB_BYTES}-byte limit; refused`);
}
