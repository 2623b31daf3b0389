// The libc calls Node has no API for, bound through koffi: mount/chroot for the child, and the
// *at family the applier works with (Node's fs only takes paths, which the kernel would resolve
// from the process root; the applier resolves every path from a directory fd it holds instead).
// Loaded by the applier child BEFORE it chroots (libc.so.6 is not inside the image).
// Path arguments are strings or NUL-terminated Buffers (names read back from a directory).
import koffi from "koffi";

const libc = koffi.load("libc.so.6");

const chrootFn = libc.func("int chroot(const char *path)");
const fchdirFn = libc.func("int fchdir(int fd)");
const mountFn = libc.func("int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data)");
const umount2Fn = libc.func("int umount2(const char *target, int flags)");
const syncfsFn = libc.func("int syncfs(int fd)");
const prctlFn = libc.func("int prctl(int option, ...)");
const openatFn = libc.func("int openat(int dirfd, const char *path, int flags, uint32_t mode)");
// syscall(2) is variadic in C; every argument here is an integer or a pointer, which the x86-64
// and aarch64 ABIs pass the same way either way, so a fixed prototype is exact (and faster).
const openat2Fn = libc.func("long syscall(long nr, int dirfd, const char *path, void *how, size_t size)");
const getdentsFn = libc.func("long syscall(long nr, int fd, void *buffer, size_t size)");
const mkdiratFn = libc.func("int mkdirat(int dirfd, const char *path, uint32_t mode)");
const symlinkatFn = libc.func("int symlinkat(const char *target, int dirfd, const char *path)");
const linkatFn = libc.func("int linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, int flags)");
const unlinkatFn = libc.func("int unlinkat(int dirfd, const char *path, int flags)");
const mknodatFn = libc.func("int mknodat(int dirfd, const char *path, uint32_t mode, uint64_t dev)");
const fchownatFn = libc.func("int fchownat(int dirfd, const char *path, uint32_t uid, uint32_t gid, int flags)");
const fchmodatFn = libc.func("int fchmodat(int dirfd, const char *path, uint32_t mode, int flags)");
const utimensatFn = libc.func("int utimensat(int dirfd, const char *path, const void *times, int flags)");
const futimensFn = libc.func("int futimens(int fd, const void *times)");
const fsetxattrFn = libc.func("int fsetxattr(int fd, const char *name, const void *value, size_t size, int flags)");

export const MS_NOSUID = 2;
export const MS_NODEV = 4;
export const MNT_DETACH = 2;
export const S_IFIFO = 0o010000;
export const S_IFCHR = 0o020000;
export const S_IFBLK = 0o060000;
export const AT_SYMLINK_NOFOLLOW = 0x100;
export const AT_REMOVEDIR = 0x200;
// Same values on x86-64 and aarch64 (O_DIRECTORY/O_NOFOLLOW differ: take those from fs.constants).
export const O_PATH = 0o10000000;
export const O_CLOEXEC = 0o2000000;
const RESOLVE_NO_MAGICLINKS = 0x02;
const RESOLVE_IN_ROOT = 0x10;
const PR_SET_PDEATHSIG = 1;
const SIGKILL = 9;
// The generic syscall table (openat2 was added after the tables were unified).
const SYS_OPENAT2 = 437;
const SYS_GETDENTS64 = process.arch === "arm64" ? 61 : 217;

const ERRNO_NAMES = new Map(Object.entries(koffi.os.errno).map(([name, value]) => [value, name]));

/** An Error shaped like Node's own fs errors (err.code = "ENOSPC"...), so callers treat both alike. */
export class SyscallError extends Error {
  readonly code: string;
  readonly errno: number;
  readonly syscall: string;
  constructor(syscall: string, errno: number, detail: string) {
    const code = ERRNO_NAMES.get(errno) ?? `errno ${errno}`;
    super(`${syscall}(${detail}): ${code}`);
    this.code = code;
    this.errno = errno;
    this.syscall = syscall;
  }
}

type Path = string | Buffer;

function check(result: number, syscall: string, detail: () => string): number {
  if (result < 0) throw new SyscallError(syscall, koffi.errno(), detail());
  return result;
}

const show = (path: Path) => (typeof path === "string" ? path : path.subarray(0, path.indexOf(0)).toString());

export function chroot(path: string): void {
  check(chrootFn(path), "chroot", () => path);
}

export function fchdir(fd: number): void {
  check(fchdirFn(fd), "fchdir", () => String(fd));
}

export function mount(source: string, target: string, fstype: string, flags: number, data: string): void {
  check(mountFn(source, target, fstype, flags, data), "mount", () => `${source}, ${target}`);
}

export function umount2(target: string, flags: number): void {
  check(umount2Fn(target, flags), "umount2", () => target);
}

export function syncfs(fd: number): void {
  check(syncfsFn(fd), "syncfs", () => String(fd));
}

/** Asks the kernel to SIGKILL this process when its parent (the helper) dies. */
export function killMeWithParent(): void {
  check(prctlFn(PR_SET_PDEATHSIG, "unsigned long", SIGKILL, "unsigned long", 0, "unsigned long", 0, "unsigned long", 0), "prctl", () => "PR_SET_PDEATHSIG");
}

export function openat(dirfd: number, path: Path, flags: number, mode = 0): number {
  return check(openatFn(dirfd, path, flags | O_CLOEXEC, mode), "openat", () => show(path));
}

/** openat without an exception for the expected failures: the fd, or the errno name ("ENOENT"...). */
export function tryOpenat(dirfd: number, path: Path, flags: number): number | string {
  const fd = openatFn(dirfd, path, flags | O_CLOEXEC, 0);
  return fd >= 0 ? fd : (ERRNO_NAMES.get(koffi.errno()) ?? "EIO");
}

const openHow = Buffer.alloc(24); // struct open_how { u64 flags; u64 mode; u64 resolve; }

/**
 * openat2(dirfd, path, flags, RESOLVE_IN_ROOT): every component of `path` is resolved as if
 * `dirfd` were the root, symlinks included (absolute targets restart at `dirfd`, ".." there stays
 * there), so nothing outside `dirfd` can be reached whatever links the tree holds.
 */
export function openInRoot(rootFd: number, path: string, flags: number): number {
  openHow.writeBigUInt64LE(BigInt(flags | O_CLOEXEC), 0);
  openHow.writeBigUInt64LE(BigInt(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS), 16);
  return check(Number(openat2Fn(SYS_OPENAT2, rootFd, path, openHow, openHow.length)), "openat2", () => path);
}

export function mkdirat(dirfd: number, path: Path, mode: number): void {
  check(mkdiratFn(dirfd, path, mode), "mkdirat", () => show(path));
}

export function symlinkat(target: string, dirfd: number, path: Path): void {
  check(symlinkatFn(target, dirfd, path), "symlinkat", () => show(path));
}

/** A hard link; never follows a symlink at `oldpath` (flags 0): the link itself is linked. */
export function linkat(olddirfd: number, oldpath: Path, newdirfd: number, newpath: Path): void {
  check(linkatFn(olddirfd, oldpath, newdirfd, newpath, 0), "linkat", () => `${show(oldpath)}, ${show(newpath)}`);
}

export function unlinkat(dirfd: number, path: Path, flags: number): void {
  check(unlinkatFn(dirfd, path, flags), "unlinkat", () => show(path));
}

/** glibc's makedev(3). */
export function makedev(major: number, minor: number): bigint {
  const [ma, mi] = [BigInt(major), BigInt(minor)];
  return ((ma & 0xfffff000n) << 32n) | ((ma & 0xfffn) << 8n) | ((mi & 0xffffff00n) << 12n) | (mi & 0xffn);
}

export function mknodat(dirfd: number, path: Path, mode: number, dev: bigint): void {
  check(mknodatFn(dirfd, path, mode, dev), "mknodat", () => show(path));
}

export function fchownat(dirfd: number, path: Path, uid: number, gid: number, flags: number): void {
  check(fchownatFn(dirfd, path, uid, gid, flags), "fchownat", () => show(path));
}

export function fchmodat(dirfd: number, path: Path, mode: number): void {
  check(fchmodatFn(dirfd, path, mode, 0), "fchmodat", () => show(path));
}

/** A file time to the nanosecond: seconds since the epoch (may be negative) and 0..999999999 ns. */
export type FileTime = { sec: number; nsec: number };

const times = Buffer.alloc(32); // struct timespec[2]: atime, mtime

function writeInt64(value: number, offset: number): void {
  const high = Math.floor(value / 2 ** 32); // no BigInt: this runs for every entry
  times.writeUInt32LE(value - high * 2 ** 32, offset);
  times.writeInt32LE(high, offset + 4);
}

function fillTimes(atime: FileTime, mtime: FileTime): Buffer {
  writeInt64(atime.sec, 0);
  writeInt64(atime.nsec, 8);
  writeInt64(mtime.sec, 16);
  writeInt64(mtime.nsec, 24);
  return times;
}

export function utimensat(dirfd: number, path: Path, atime: FileTime, mtime: FileTime, flags: number): void {
  check(utimensatFn(dirfd, path, fillTimes(atime, mtime), flags), "utimensat", () => show(path));
}

export function futimens(fd: number, atime: FileTime, mtime: FileTime): void {
  check(futimensFn(fd, fillTimes(atime, mtime)), "futimens", () => String(fd));
}

export function fsetxattr(fd: number, name: string, value: Buffer): void {
  check(fsetxattrFn(fd, name, value, value.byteLength, 0), "fsetxattr", () => name);
}

const dents = Buffer.alloc(64 * 1024);

/** The names in the directory open at `fd` (without "." and ".."), as NUL-terminated bytes. */
export function readDirectory(fd: number): Buffer[] {
  const names: Buffer[] = [];
  for (;;) {
    const length = check(Number(getdentsFn(SYS_GETDENTS64, fd, dents, dents.length)), "getdents64", () => String(fd));
    if (length === 0) return names;
    // struct linux_dirent64 { u64 d_ino; s64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
    for (let at = 0; at < length; ) {
      const reclen = dents.readUInt16LE(at + 16);
      const end = dents.indexOf(0, at + 19);
      const name = Buffer.from(dents.subarray(at + 19, end + 1));
      if (!(name.length === 2 && name[0] === 0x2e) && !(name.length === 3 && name[0] === 0x2e && name[1] === 0x2e)) names.push(name);
      at += reclen;
    }
  }
}
