// One agent per state directory: two agents would both resume the same runs and race on the
// pool. An exclusive flock() on <stateDir>/imgd.lock is held for the life of the process; the
// kernel drops it when the process dies, even by SIGKILL, so a crash never leaves a stale lock.
// Node has no flock(), hence the one libc call through koffi.
import { closeSync, openSync } from "node:fs";
import { join } from "node:path";
import koffi from "koffi";

const flock = koffi.load("libc.so.6").func("int flock(int fd, int operation)");
const LOCK_EX = 2;
const LOCK_NB = 4;

export function lockStateDir(stateDir: string): { release(): void } {
  const path = join(stateDir, "imgd.lock");
  const fd = openSync(path, "a", 0o600);
  if (flock(fd, LOCK_EX | LOCK_NB) !== 0) {
    closeSync(fd);
    throw new Error(`another imgd is running on ${stateDir} (${path} is locked)`);
  }
  return { release: () => closeSync(fd) };
}
