// The few libc calls Node has no API for, bound through koffi. Loaded by the applier child BEFORE
// it chroots (libc.so.6 is not inside the image).
import koffi from "koffi";

const libc = koffi.load("libc.so.6");

const chrootFn = libc.func("int chroot(const char *path)");
const fchdirFn = libc.func("int fchdir(int fd)");
const mountFn = libc.func("int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data)");
const umount2Fn = libc.func("int umount2(const char *target, int flags)");
const mknodFn = libc.func("int mknod(const char *path, uint32_t mode, uint64_t dev)");
const lsetxattrFn = libc.func("int lsetxattr(const char *path, const char *name, const void *value, size_t size, int flags)");
const syncfsFn = libc.func("int syncfs(int fd)");
const prctlFn = libc.func("int prctl(int option, ...)");

export const MS_NOSUID = 2;
export const MS_NODEV = 4;
export const MNT_DETACH = 2;
export const S_IFIFO = 0o010000;
const PR_SET_PDEATHSIG = 1;
const SIGKILL = 9;

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

function check(result: number, syscall: string, detail: string): void {
  if (result !== 0) throw new SyscallError(syscall, koffi.errno(), detail);
}

export function chroot(path: string): void {
  check(chrootFn(path), "chroot", path);
}

export function fchdir(fd: number): void {
  check(fchdirFn(fd), "fchdir", String(fd));
}

export function mount(source: string, target: string, fstype: string, flags: number, data: string): void {
  check(mountFn(source, target, fstype, flags, data), "mount", `${source}, ${target}`);
}

export function umount2(target: string, flags: number): void {
  check(umount2Fn(target, flags), "umount2", target);
}

export function mkfifo(path: string, mode: number): void {
  check(mknodFn(path, S_IFIFO | (mode & 0o7777), 0), "mknod", path);
}

export function lsetxattr(path: string, name: string, value: Buffer): void {
  check(lsetxattrFn(path, name, value, value.byteLength, 0), "lsetxattr", `${path}, ${name}`);
}

export function syncfs(fd: number): void {
  check(syncfsFn(fd), "syncfs", String(fd));
}

/** Asks the kernel to SIGKILL this process when its parent (the helper) dies. */
export function killMeWithParent(): void {
  check(prctlFn(PR_SET_PDEATHSIG, "unsigned long", SIGKILL, "unsigned long", 0, "unsigned long", 0, "unsigned long", 0), "prctl", "PR_SET_PDEATHSIG");
}
