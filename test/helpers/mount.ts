// Mounting a device to look at it, for tests that run as root in the VM. The helper mounts
// nothing in the host's namespace (issue 9: that exposed device content to the agent), so tests
// inspect devices themselves: read-only without journal replay, nosuid, nodev, in a private
// directory under /run that is removed again.
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmdirSync } from "node:fs";

export const MOUNT_READ_ONLY = "ro,noload,nosuid,nodev";
export const MOUNT_READ_WRITE = "nosuid,nodev,noinit_itable";

export async function withMounted<T>(device: string, fn: (dir: string) => T | Promise<T>, options = MOUNT_READ_ONLY): Promise<T> {
  const dir = mkdtempSync("/run/imgd-test-mnt-");
  try {
    execFileSync("/usr/bin/mount", ["-t", "ext4", "-o", options, device, dir], { stdio: ["ignore", "pipe", "pipe"] });
  } catch (err) {
    rmdirSync(dir);
    throw err;
  }
  try {
    return await fn(dir);
  } finally {
    execFileSync("/usr/bin/umount", [dir], { stdio: ["ignore", "pipe", "pipe"] });
    rmdirSync(dir);
  }
}
