// Helper configuration: read once from the environment at start-up and validated strictly,
// so a typo in a unit or a path fails loudly instead of creating a pool of the wrong size.
// HELPER_SETTINGS is the one list of the helper's settings (the README's table is generated from it).
import { readFileSync } from "node:fs";
import { int, loadSettings, path, setting, size, text, SettingsError, type Values } from "./settings.ts";

export { parseSize } from "./settings.ts";

export type HelperConfig = {
  socketPath: string;
  socketGroup: string;
  /** the agent's user (name or uid): blobs the helper reads must be owned by it */
  agentUser: string;
  stateDir: string;
  blobDir: string;
  poolName: string;
  poolDataBytes: number;
  poolMetaBytes: number;
  poolBlockSectors: number;
  thinBytes: number;
};

// The pool name is passed to dmsetup and appears in /dev/mapper: a plain word that cannot be
// mistaken for an option or collide with the layer/activation name patterns.
const poolName = text("name [a-z][a-z0-9_-]*, not imgd-layer-*/imgd-act-*", (v) =>
  /^[a-z][a-z0-9_-]{0,62}$/.test(v) && !/^imgd-(layer|act)-/.test(v) ? undefined : "is not allowed (a word [a-z][a-z0-9_-]*, not imgd-layer-* or imgd-act-*)",
);
const group = text("group name or gid", /^([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$/, "is not a group name or gid");
// Blobs the helper reads must be owned by this user: never root, whose files the agent must not reach.
const agentUser = text("user name or uid, not root", (v) =>
  /^([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$/.test(v) && v !== "0" && v !== "root" ? undefined : "is not a user name or uid (root is not allowed)",
);

/** Every setting of the helper: name → type/range, default, meaning. Adding one is one line here. */
export const HELPER_SETTINGS = {
  IMGD_HELPER_SOCKET: setting(path(), "/run/imgd/privhelper.sock", "the helper's Unix socket (mode 0660)"),
  IMGD_HELPER_GROUP: setting(group, "imgd", "group that may use the helper's socket: the agent's group, and nobody else"),
  IMGD_HELPER_STATE_DIR: setting(path(), "/var/lib/imgd-privhelper", "pool backing files, thin-id origin records, mount points"),
  IMGD_AGENT_USER: setting(agentUser, "imgd", "the agent's user: layer.apply reads only blobs owned by it, with one link, never through a symlink"),
  IMGD_BLOB_DIR: setting(path(), "/var/lib/imgd/blobs", "the agent's blob store, where layer.apply reads layers (the agent's IMGD_STATE_DIR + /blobs)"),
  IMGD_POOL_NAME: setting(poolName, "imgd-pool", "device-mapper name of the thin pool (made by the helper, or by hand; one with a device-mapper uuid, as LVM's thin pools have, is refused: imgd numbers thin devices itself)"),
  IMGD_POOL_DATA_SIZE: setting(size(), "2G", "pool data size, created when missing (a multiple of the block size, at least 16 blocks)"),
  IMGD_POOL_META_SIZE: setting(size(), "1M", "pool metadata size (a multiple of 4K, 1M..16G)"),
  IMGD_POOL_BLOCK_SECTORS: setting(int(128, 2097152), "2048", "pool block size in 512-byte sectors (a multiple of 128)"),
  IMGD_THIN_SIZE: setting(size(), "8G", "virtual size of every thin device (a multiple of the block size)"),
};

// The helper shares its environment with the agent in the VM and in hand-made setups; it refuses
// unknown names only in what it owns: IMGD_HELPER_*, IMGD_POOL_*, IMGD_THIN_*.
const HELPER_NAMESPACES = ["IMGD_HELPER_", "IMGD_POOL_", "IMGD_THIN_"];

export function loadConfig(env: NodeJS.ProcessEnv = process.env): HelperConfig {
  const { values } = loadSettings(HELPER_SETTINGS, { env, ownsEnvName: (key) => HELPER_NAMESPACES.some((p) => key.startsWith(p)) });
  return checkPool(values);
}

function checkPool(v: Values<typeof HELPER_SETTINGS>): HelperConfig {
  const problems: string[] = [];
  const poolBlockSectors = v.IMGD_POOL_BLOCK_SECTORS;
  // dm-thin: block size is a multiple of 128 sectors (64 KiB), between 64 KiB and 1 GiB.
  if (poolBlockSectors % 128 !== 0) problems.push("IMGD_POOL_BLOCK_SECTORS must be a multiple of 128 between 128 and 2097152");
  const blockBytes = poolBlockSectors * 512;
  if (v.IMGD_POOL_DATA_SIZE % blockBytes !== 0 || v.IMGD_POOL_DATA_SIZE < 16 * blockBytes) {
    problems.push(`IMGD_POOL_DATA_SIZE must be a multiple of the pool block size (${blockBytes} bytes) and hold at least 16 blocks`);
  }
  // The kernel uses at most ~15.8 GiB of metadata; metadata blocks are 4 KiB.
  if (v.IMGD_POOL_META_SIZE % 4096 !== 0 || v.IMGD_POOL_META_SIZE < 1024 ** 2 || v.IMGD_POOL_META_SIZE > 16 * 1024 ** 3) {
    problems.push("IMGD_POOL_META_SIZE must be a multiple of 4K between 1M and 16G");
  }
  if (v.IMGD_THIN_SIZE % blockBytes !== 0) problems.push(`IMGD_THIN_SIZE must be a multiple of the pool block size (${blockBytes} bytes)`);
  if (problems.length > 0) throw new SettingsError(problems.join("; "));
  return {
    socketPath: v.IMGD_HELPER_SOCKET,
    socketGroup: v.IMGD_HELPER_GROUP,
    agentUser: v.IMGD_AGENT_USER,
    stateDir: v.IMGD_HELPER_STATE_DIR,
    blobDir: v.IMGD_BLOB_DIR,
    poolName: v.IMGD_POOL_NAME,
    poolDataBytes: v.IMGD_POOL_DATA_SIZE,
    poolMetaBytes: v.IMGD_POOL_META_SIZE,
    poolBlockSectors,
    thinBytes: v.IMGD_THIN_SIZE,
  };
}

/** Resolves a group name (or numeric gid) through /etc/group; Node has no getgrnam. */
export function resolveGroupId(group: string, groupFile = "/etc/group"): number {
  if (/^[0-9]+$/.test(group)) return Number(group);
  for (const line of readFileSync(groupFile, "utf8").split("\n")) {
    const [name, , gid] = line.split(":");
    if (name === group && gid !== undefined && /^[0-9]+$/.test(gid)) return Number(gid);
  }
  throw new Error(`group ${group} not found in ${groupFile}`);
}

/** Resolves a user name (or numeric uid) through /etc/passwd; Node has no getpwnam. */
export function resolveUserId(user: string, passwdFile = "/etc/passwd"): number {
  if (/^[0-9]+$/.test(user)) return Number(user);
  for (const line of readFileSync(passwdFile, "utf8").split("\n")) {
    const [name, , uid] = line.split(":");
    if (name === user && uid !== undefined && /^[0-9]+$/.test(uid)) return Number(uid);
  }
  throw new Error(`user ${user} not found in ${passwdFile}`);
}
