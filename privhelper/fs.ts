// ext4 on thin devices: making the filesystem and mounting it for inspection.
import { lstat, mkdir, readFile, rmdir } from "node:fs/promises";
import { join } from "node:path";
import type { HelperConfig } from "./config.ts";
import { HelperFailure } from "./errors.ts";
import { run } from "./run.ts";

export function devicePath(name: string): string {
  return `/dev/mapper/${name}`;
}

export async function requireBlockDevice(name: string): Promise<string> {
  const path = devicePath(name);
  const info = await lstat(path).catch(() => null);
  if (!info?.isBlockDevice()) throw new HelperFailure("NOT_FOUND", `device ${name} is not active (${path} missing)`);
  return path;
}

export async function makeFilesystem(name: string): Promise<void> {
  const path = await requireBlockDevice(name);
  // blkid exit 2 = no signature found. Anything found (ext4, swap, a partition table) means the
  // device is not fresh; formatting it would destroy data, so refuse.
  const probe = await run("blkid", ["--probe", "--output", "export", path], { allowExitCodes: [2] });
  if (probe.exitCode === 0) {
    const type = /^TYPE=(.*)$/m.exec(probe.stdout)?.[1] ?? /^PTTYPE=(.*)$/m.exec(probe.stdout)?.[1] ?? "a signature";
    throw new HelperFailure("HAS_FILESYSTEM", `device ${name} already carries ${type}; refusing to format it`);
  }
  // Options chosen so that mkfs provisions only the metadata it writes, not the virtual size:
  // - lazy_itable_init=1: inode tables are not zeroed. Costs nothing here because unprovisioned
  //   thin blocks read as zeros; mounts use noinit_itable so the kernel never zeroes them either.
  // - lazy_journal_init=1: the journal is not zeroed (same reasoning). On a device that could hold
  //   stale data this would risk replaying garbage after a crash; a fresh thin device cannot.
  // - nodiscard: no discard pass over 8 GiB of nothing (it would be slow and pointless).
  // - -m 0: no blocks reserved for root; images are read-only, the default 5% would be wasted.
  await run("mkfsExt4", ["-q", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", path], { timeoutMs: 10 * 60_000 });
}

export function mountPointFor(config: HelperConfig, name: string): string {
  return join(config.stateDir, "mnt", name);
}

type MountEntry = { mountPoint: string; options: string[]; source: string };

// mountinfo escapes space, tab, newline and backslash as octal.
function unescapeMountField(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

export async function findMount(mountPoint: string): Promise<MountEntry | null> {
  const text = await readFile("/proc/self/mountinfo", "utf8");
  let found: MountEntry | null = null;
  for (const line of text.split("\n")) {
    const [left, right] = line.split(" - ");
    if (!left || !right) continue;
    const fields = left.split(" ");
    if (fields.length < 6 || unescapeMountField(fields[4]!) !== mountPoint) continue;
    // The last entry wins: it is the one on top.
    found = { mountPoint, options: fields[5]!.split(","), source: unescapeMountField(right.split(" ")[1] ?? "") };
  }
  return found;
}

export async function mountFilesystem(config: HelperConfig, name: string, readOnly: boolean): Promise<{ path: string }> {
  const source = await requireBlockDevice(name);
  const target = mountPointFor(config, name);
  const current = await findMount(target);
  if (current) {
    if (current.source === source && current.options.includes(readOnly ? "ro" : "rw")) return { path: target };
    throw new HelperFailure("CONFLICT", `${target} is already mounted (${current.source}, ${current.options.join(",")})`);
  }
  // The parent is world-traversable so the unprivileged agent can inspect what it mounted.
  await mkdir(join(config.stateDir, "mnt"), { recursive: true, mode: 0o755 });
  await mkdir(target, { recursive: true, mode: 0o755 });
  // nosuid,nodev always: image content must never grant privileges on the host.
  // noinit_itable: stops the kernel's lazy-init thread from zeroing (and so provisioning) inode
  // tables. ro,noload: a read-only mount that does not even replay the journal.
  const options = ["nosuid", "nodev", "noinit_itable", ...(readOnly ? ["ro", "noload"] : [])].join(",");
  try {
    await run("mount", ["-t", "ext4", "-o", options, source, target]);
  } catch (err) {
    await rmdir(target).catch(() => undefined);
    throw err;
  }
  return { path: target };
}

/** Unmounts; an unmounted (or never mounted) name counts as success. */
export async function unmountFilesystem(config: HelperConfig, name: string): Promise<void> {
  const target = mountPointFor(config, name);
  if (await findMount(target)) {
    try {
      await run("umount", [target]);
    } catch (err) {
      if (err instanceof Error && /target is busy/.test(err.message)) throw new HelperFailure("BUSY", `${target} is busy: ${err.message}`);
      throw err;
    }
  }
  await rmdir(target).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== "ENOENT") throw err;
  });
}
