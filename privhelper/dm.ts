// Thin wrappers around dmsetup. Callers pass only names that protocol.ts or config.ts validated;
// tables are built by the helper and passed as a single argument.
import { lstat, readdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { CommandFailed, run } from "./run.ts";

// libdevmapper's wording when the kernel has no device of that name.
function isMissingDevice(err: unknown): boolean {
  return err instanceof CommandFailed && /Device does not exist|No such device or address/.test(err.stderr);
}

/** The device's table (one line per target), or null when there is no such device. */
export async function dmTable(name: string): Promise<string | null> {
  try {
    return (await run("dmsetup", ["table", name])).stdout.trim();
  } catch (err) {
    if (isMissingDevice(err)) return null;
    throw err;
  }
}

export async function dmStatus(name: string): Promise<string | null> {
  try {
    return (await run("dmsetup", ["status", name])).stdout.trim();
  } catch (err) {
    if (isMissingDevice(err)) return null;
    throw err;
  }
}

/** Where the kernel describes its block devices; a test seam, like PROGRAMS in run.ts. */
export const SYSFS = { root: "/sys" };

/**
 * "major:minor" of a device, the form the kernel uses for it inside other tables; null when no
 * device has that name. Read from sysfs, the kernel's own record, instead of a dmsetup exec (tens
 * of milliseconds each, hundreds under emulation; every activation and apply asks): the
 * /dev/mapper node, when there is one, says where to look and sysfs confirms it; otherwise every
 * dm-N is looked at.
 */
export async function dmDeviceNumber(name: string): Promise<string | null> {
  const byNode = await nodeDeviceNumber(name);
  if (byNode !== null) return byNode;
  const entries = await readdir(join(SYSFS.root, "block")).catch(() => [] as string[]);
  for (const entry of entries) {
    if (!/^dm-[0-9]+$/.test(entry) || (await readSysfs(`block/${entry}/dm/name`)) !== name) continue;
    const number = await readSysfs(`block/${entry}/dev`);
    if (number !== null && /^[0-9]+:[0-9]+$/.test(number)) return number;
  }
  return null;
}

/** The uuid of the dm device with this number ("" when it has none, as the kernel shows it). */
export async function dmUuid(number: string): Promise<string> {
  return (await readSysfs(`dev/block/${number}/dm/uuid`)) ?? "";
}

/** The device number of /dev/mapper/NAME when that node is the device NAME's (sysfs says); else null. */
async function nodeDeviceNumber(name: string): Promise<string | null> {
  const node = await stat(`/dev/mapper/${name}`).catch(() => null);
  if (!node?.isBlockDevice()) return null;
  const number = deviceNumber(node.rdev);
  return (await readSysfs(`dev/block/${number}/dm/name`)) === name ? number : null;
}

/** A sysfs attribute's one line; null when it is gone (the device was removed meanwhile). */
async function readSysfs(path: string): Promise<string | null> {
  return readFile(join(SYSFS.root, path), "utf8").then((text) => text.trim(), () => null);
}

/** A dev_t (stat's rdev) as "major:minor", the form of sysfs and of device-mapper tables (glibc's major()/minor()). */
export function deviceNumber(dev: number): string {
  const major = Number((BigInt(dev) >> 8n) & 0xfffn) | Number((BigInt(dev) >> 32n) & ~0xfffn);
  const minor = Number(BigInt(dev) & 0xffn) | Number((BigInt(dev) >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

/**
 * Every device's table in ONE dmsetup call ("NAME: TABLE" lines; a further target of the same
 * device continues on a line of its own). One process instead of one per device: under emulation
 * each exec costs tens of milliseconds, and activation, snapshot and delete all list devices.
 */
export async function dmAllTables(): Promise<Map<string, string>> {
  return parseAllTables((await run("dmsetup", ["table"])).stdout);
}

export function parseAllTables(out: string): Map<string, string> {
  const tables = new Map<string, string>();
  if (out.trim() === "No devices found") return tables;
  let last: string | null = null;
  for (const line of out.split("\n")) {
    if (line.trim() === "") continue;
    const match = /^([^\s:]+): (.*)$/.exec(line);
    if (match) {
      last = match[1]!;
      tables.set(last, match[2]!.trim());
    } else if (last !== null) {
      tables.set(last, `${tables.get(last)}\n${line.trim()}`);
    }
  }
  return tables;
}

/**
 * libdevmapper makes and removes the /dev/mapper node itself, within the create or remove exec,
 * instead of leaving it to udev: a host without udev (the test VM without udevd) gets no node
 * from a create otherwise (measured). With udevd running, libdevmapper flags its uevents so that
 * udev's dm rules leave the node to it (seen in the VM: DM_UDEV_DISABLE_DM_RULES_FLAG=1 on each
 * event; udev still probes the filesystem, a brief open that remove retries through). The e2e
 * suite runs with udevd, every second power-test boot without. Whatever the host does, the node
 * is checked afterwards and `dmsetup mknodes` (one more exec) fixes it if need be.
 */
const NODES_BY_LIBDEVMAPPER = { env: { DM_DISABLE_UDEV: "1" } };

/** Creates and loads a device with its /dev/mapper node. */
export async function dmCreate(name: string, table: string): Promise<void> {
  await run("dmsetup", ["create", name, "--noudevsync", "--table", table], NODES_BY_LIBDEVMAPPER);
  if ((await nodeDeviceNumber(name)) === null) await dmMakeNode(name);
}

/** Makes (or fixes) the device's /dev/mapper node; a no-op when it is right. */
export async function dmMakeNode(name: string): Promise<void> {
  await run("dmsetup", ["mknodes", name]);
}

/** Removes a device; false when it did not exist. Throws CommandFailed (e.g. busy) otherwise. */
export async function dmRemove(name: string): Promise<boolean> {
  try {
    await run("dmsetup", ["remove", "--noudevsync", name], NODES_BY_LIBDEVMAPPER);
  } catch (err) {
    if (isMissingDevice(err)) return false;
    throw err;
  } finally {
    // Drops a stale /dev/mapper node whether or not the remove succeeded (a live device's node
    // is left as it is).
    if (await lstat(`/dev/mapper/${name}`).then(() => true, () => false)) await run("dmsetup", ["mknodes", name]).catch(() => undefined);
  }
  return true;
}

/** Replaces a live device's table: loaded as the inactive table, then swapped in by resume. */
export async function dmReload(name: string, table: string): Promise<void> {
  await run("dmsetup", ["reload", name, "--table", table]);
  await run("dmsetup", ["resume", "--noudevsync", name]);
}

export async function dmMessage(pool: string, message: string): Promise<void> {
  await run("dmsetup", ["message", pool, "0", message]);
}

export async function dmSuspend(name: string): Promise<void> {
  await run("dmsetup", ["suspend", "--noudevsync", name]);
}

export async function dmResume(name: string): Promise<void> {
  await run("dmsetup", ["resume", "--noudevsync", name]);
}

export function isBusy(err: unknown): boolean {
  return err instanceof CommandFailed && /Device or resource busy/.test(err.stderr);
}

export type ThinTable = { sectors: number; poolDevice: string; thinId: number };

/** Parses a single-target "0 <len> thin <pool maj:min> <id>" table; null for anything else. */
export function parseThinTable(table: string): ThinTable | null {
  const match = /^0 ([0-9]+) thin ([0-9]+:[0-9]+) ([0-9]+)$/.exec(table.trim());
  if (!match) return null;
  return { sectors: Number(match[1]), poolDevice: match[2]!, thinId: Number(match[3]) };
}

export type PoolTable = { sectors: number; metaDevice: string; dataDevice: string; blockSectors: number; features: string[] };

/** Parses a single-target "0 <len> thin-pool <meta> <data> <block> <low water> [<n> <features>...]" table. */
export function parsePoolTable(table: string): PoolTable | null {
  const lines = table.trim().split("\n");
  if (lines.length !== 1) return null;
  const words = lines[0]!.trim().split(/\s+/);
  if (words.length < 7 || words[0] !== "0" || words[2] !== "thin-pool") return null;
  const count = words.length > 7 ? Number(words[7]) : 0;
  return {
    sectors: Number(words[1]),
    metaDevice: words[3]!,
    dataDevice: words[4]!,
    blockSectors: Number(words[5]),
    features: words.slice(8, 8 + count),
  };
}
